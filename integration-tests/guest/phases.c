/*
 * Workload phases for the predictor's tests and benchmarks, after the
 * standard CPU, memory and virtio phases (and only if those passed):
 *
 *   mem_ramp_mib=N  touch N MiB from RAMP_BASE (64 MiB) upward, 1 MiB per
 *   mem_ramp_ms=T   step, the steps spread evenly over T ms (CPL3): a
 *                   memory demand that grows over time. The range must be
 *                   RAM (machine memory >= 64 + N MiB) and above what
 *                   mem_mib touched (mem_mib <= 60 keeps them apart).
 *   port_hammer=N   N byte writes to PORT_HAMMER (no device there), at CPL0
 *                   so each is one quick PIO exit: the "guest probes an
 *                   unknown port" anomaly, and the exit benchmark's load.
 *
 * Output:
 *   guest: mem_ramp mib=<N> ms=<elapsed> ok | guest: mem_ramp beyond RAM
 *   guest: port_hammer start n=<N>
 *   guest: port_hammer done us=<elapsed, TSC>
 */
#include "guest.h"

#define PORT_HAMMER 0x0511
#define RAMP_BASE (64ULL << 20)

static u64 hammer_count, ramp_mib, ramp_ms;

static int key(const char *k, size_t kn, const char *lit)
{
	return kn == strlen(lit) && !memcmp(k, lit, kn);
}

/* Returns 0 = ok, 1 = unknown key, 2 = bad value (as cmdline.c's apply). */
int phases_param(const char *k, size_t kn, const char *v, size_t vn)
{
	u64 *out = key(k, kn, "port_hammer") ? &hammer_count
		 : key(k, kn, "mem_ramp_mib") ? &ramp_mib
		 : key(k, kn, "mem_ramp_ms") ? &ramp_ms
		 : 0;
	if (!out)
		return 1;
	return parse_u64(v, vn, out) ? 0 : 2;
}

static u64 tsc_per_ms(void)
{
	return g_tsc_khz ? g_tsc_khz : 3000000ULL;
}

static int ramp_in_ram(void)
{
	u64 end = RAMP_BASE + (ramp_mib << 20);
	for (u32 i = 0; i < g_boot.nr_mem; i++) {
		const struct mem_region *m = &g_boot.mem[i];
		if (m->type == MEM_RAM && m->addr <= RAMP_BASE && end <= m->addr + m->size)
			return 1;
	}
	return 0;
}

static u64 mem_ramp_user(u64 unused)
{
	(void)unused;
	u64 start = rdtsc(), step = ramp_ms * tsc_per_ms() / ramp_mib;
	for (u64 mib = 0; mib < ramp_mib; mib++) {
		volatile u64 *p = (volatile u64 *)(RAMP_BASE + (mib << 20));
		for (u64 off = 0; off < (1 << 20) / 8; off += 4096 / 8)
			p[off] = mib ^ off;
		while (rdtsc() - start < (mib + 1) * step)
			cpu_relax();
	}
	gprintf("guest: mem_ramp mib=%lu ms=%lu ok\n", ramp_mib, (rdtsc() - start) / tsc_per_ms());
	return 0;
}

void phases_run(void)                   /* CPL0 */
{
	if (ramp_mib) {
		if (ramp_in_ram())
			run_user_on(0, mem_ramp_user, 0);
		else
			gprintf("guest: mem_ramp beyond RAM\n");
	}
	if (!hammer_count)
		return;
	gprintf("guest: port_hammer start n=%lu\n", hammer_count);
	u64 start = rdtsc();
	for (u64 i = 0; i < hammer_count; i++)
		outb(PORT_HAMMER, (u8)i);
	u64 ticks = rdtsc() - start;
	gprintf("guest: port_hammer done us=%lu\n", ticks * 1000 / tsc_per_ms());
}
