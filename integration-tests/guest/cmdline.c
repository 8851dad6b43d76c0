/*
 * Command line: space-separated key=value pairs. Unknown keys are reported
 * as "guest: unknown param KEY", malformed values as "guest: bad param KEY".
 *
 * To add a parameter: add a field to struct params (guest.h), a default
 * below and a branch in apply().
 */
#include "guest.h"

struct params g_params = {
	.cpu_ms = 50,
	.mem_mib = 16,
	.mem_rounds = 1,
	.mode = MODE_NORMAL,
	.exit = EXIT_RESET,
};

static int eq(const char *a, size_t n, const char *lit)
{
	size_t m = strlen(lit);
	return n == m && !memcmp(a, lit, n);
}

int parse_u64(const char *s, size_t n, u64 *out)
{
	u64 v = 0;
	if (!n)
		return 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (u64)(s[i] - '0');
	}
	*out = v;
	return 1;
}

/* Returns 0 = ok, 1 = unknown key, 2 = bad value. */
static int apply(const char *k, size_t kn, const char *v, size_t vn)
{
	if (eq(k, kn, "cpu_ms"))
		return parse_u64(v, vn, &g_params.cpu_ms) ? 0 : 2;
	if (eq(k, kn, "mem_mib"))
		return parse_u64(v, vn, &g_params.mem_mib) ? 0 : 2;
	if (eq(k, kn, "mem_rounds"))
		return parse_u64(v, vn, &g_params.mem_rounds) && g_params.mem_rounds ? 0 : 2;
	if (eq(k, kn, "mem_hold_ms"))
		return parse_u64(v, vn, &g_params.mem_hold_ms) ? 0 : 2;
	if (eq(k, kn, "tsc_khz"))
		return parse_u64(v, vn, &g_params.tsc_khz) ? 0 : 2;
	if (eq(k, kn, "mode")) {
		if (eq(v, vn, "normal"))
			g_params.mode = MODE_NORMAL;
		else if (eq(v, vn, "triple"))
			g_params.mode = MODE_TRIPLE;
		else if (eq(v, vn, "panic"))
			g_params.mode = MODE_PANIC;
		else
			return 2;
		return 0;
	}
	if (eq(k, kn, "exit")) {
		if (eq(v, vn, "reset"))
			g_params.exit = EXIT_RESET;
		else if (eq(v, vn, "halt"))
			g_params.exit = EXIT_HALT;
		else if (eq(v, vn, "kbd"))
			g_params.exit = EXIT_KBD;
		else if (eq(v, vn, "serial"))
			g_params.exit = EXIT_SERIAL;
		else
			return 2;
		return 0;
	}
	int r = phases_param(k, kn, v, vn);     /* port_hammer= */
	if (r != 1)
		return r;
	r = cpuinfo_param(k, kn, v, vn);        /* cpuinfo= */
	if (r != 1)
		return r;
	r = cpuhp_param(k, kn, v, vn);          /* cpuhp_ms=, cpuhp_ops=, cpu_load= */
	if (r != 1)
		return r;
	return virtio_param(k, kn, v, vn);      /* virtio_mmio.device=, blk_*, net_*, rng_* */
}

void cmdline_parse(const char *s, int report)
{
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		if (!*s)
			break;
		const char *tok = s;
		while (*s && *s != ' ' && *s != '\t' && *s != '\n')
			s++;
		size_t tn = (size_t)(s - tok), kn = 0;
		while (kn < tn && tok[kn] != '=')
			kn++;
		const char *v = tok + kn + (kn < tn);
		size_t vn = tn - kn - (kn < tn);
		int r = apply(tok, kn, v, vn);
		if (r && report)
			gprintf("guest: %s param %.*s\n", r == 1 ? "unknown" : "bad", (int)kn, tok);
	}
}
