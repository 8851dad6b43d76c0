/*
 * CPU hot-plug, as a guest OS does it through ACPI (all at CPL3 but the
 * INIT/SIPI and the idling): the GED's interrupt (acpi.c found its GSI and
 * its event register in the DSDT) is routed through the IOAPIC to the BSP,
 * which idles (sti; hlt, woken by it or by the LAPIC timer after at most
 * 10 ms) unless it has work. On a CPU event it scans the hot-plug controller
 * like the DSDT's CSCN method: select each CPU, read its status, clear an
 * insert or remove event it shows. An inserted CPU is started (INIT, SIPI)
 * and runs CPL3 work; a CPU to remove is parked (it leaves its work and
 * halts) and then ejected (the eject bit: the guest's consent, after which
 * the VMM ends the vCPU's thread).
 *
 * Controller registers (the VMM's CPU hot-plug controller): +0 selector
 * (32-bit), +4 status (8-bit; read: 1 present, 2 insert event, 4 remove event;
 * write: 2 or 4 clears that event, 8 ejects).
 *
 *   cpuhp_ms=T     follow the controller for at most T ms after the other
 *                  phases (0: not at all)
 *   cpuhp_ops=N    ... until N inserts and ejects are done (then the line
 *                  below and the usual final line); fewer in T ms: failed
 *   cpu_load=W:MS,W:MS,...  while following, a CPU demand: W CPUs busy (the
 *                  BSP first, then APs) for MS ms, step after step, then 0.
 *                  An idle BSP halts between events; APs beyond the demand
 *                  are parked (halted: no host CPU) and started again when
 *                  it rises; a plugged CPU waits parked until the demand
 *                  wants it. Each ms in which the demand exceeded the CPUs
 *                  present counts as short. Without cpu_load a plugged CPU
 *                  works until it is unplugged.
 *
 * Output:
 *   guest: cpuhp first scan events=<n>  (inserts and ejects found before the
 *                                       first interrupt)
 *   guest: cpuhp following ms=<T> ops=<N>
 *   guest: cpuhp cpu <i> inserted | guest: cpuhp cpu <i> ejected
 *   guest: cpu <i> apic=<a> up          (the AP, once at CPL3)
 *   guest: cpu <i> parked               (the AP, leaving its work)
 *   guest: cpu_load step <k> workers=<W> at_ms=<t>
 *   guest: cpuhp done ops=<n> short_ms=<s> present=<p>
 *   guest: cpuhp no controller | guest: cpuhp timeout ops=<n> | guest: cpuhp cpu <i> did not park
 */
#include "guest.h"

#define CPUHP_SELECT    0
#define CPUHP_STATUS    4
#define ST_PRESENT      1
#define ST_INSERT       2
#define ST_REMOVE       4
#define CMD_EJECT       8
#define MAX_LOAD_STEPS  16

static u64 follow_ms, want_ops;
static u32 load_steps;
static struct { u64 workers, ms; } load[MAX_LOAD_STEPS];

static int key(const char *k, size_t kn, const char *lit)
{
	return kn == strlen(lit) && !memcmp(k, lit, kn);
}

/* cpu_load=W:MS,W:MS,... */
static int parse_load(const char *v, size_t n)
{
	u32 steps = 0;
	size_t i = 0;
	while (i < n) {
		size_t a = i;
		while (i < n && v[i] != ':')
			i++;
		if (i == n || steps == MAX_LOAD_STEPS || !parse_u64(v + a, i - a, &load[steps].workers))
			return 2;
		size_t b = ++i;
		while (i < n && v[i] != ',')
			i++;
		if (!parse_u64(v + b, i - b, &load[steps].ms))
			return 2;
		steps++;
		i += i < n;
	}
	load_steps = steps;
	return 0;
}

int cpuhp_param(const char *k, size_t kn, const char *v, size_t vn)
{
	if (key(k, kn, "cpuhp_ms"))
		return parse_u64(v, vn, &follow_ms) ? 0 : 2;
	if (key(k, kn, "cpuhp_ops"))
		return parse_u64(v, vn, &want_ops) ? 0 : 2;
	if (key(k, kn, "cpu_load"))
		return parse_load(v, vn);
	return 1;
}

void cpuhp_map_user(void)
{
	if (!follow_ms || !g_acpi.ged_base || !g_acpi.cpuhp_base)
		return;
	if (!paging_map_mmio_user(g_acpi.ged_base, 4) || !paging_map_mmio_user(g_acpi.cpuhp_base, 8))
		gprintf("guest: cpuhp registers cannot be mapped\n");
}

static u32 r32(u64 a) { return *(volatile u32 *)a; }
static void w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static u8 r8(u64 a) { return *(volatile u8 *)a; }
static void w8(u64 a, u8 v) { *(volatile u8 *)a = v; }

static u64 tsc_per_ms(void) { return g_tsc_khz ? g_tsc_khz : 3000000ULL; }

/* ---- the AP ---------------------------------------------------------------- */
u64 cpuhp_ap_user(u64 cpu)
{
	struct percpu *c = &g_cpus[cpu];
	gprintf("guest: cpu %lu apic=%u up\n", cpu, c->apic_id);
	__atomic_add_fetch(&g_ncpus_online, 1, __ATOMIC_SEQ_CST);
	__atomic_store_n(&c->arrived, 1, __ATOMIC_RELEASE);
	u64 x = 0x9e3779b97f4a7c15ULL ^ cpu;
	while (!__atomic_load_n(&c->park, __ATOMIC_ACQUIRE))
		for (int i = 0; i < 1000; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
		}
	__asm__ volatile("" : : "r"(x));
	__atomic_sub_fetch(&g_ncpus_online, 1, __ATOMIC_SEQ_CST);
	gprintf("guest: cpu %lu parked\n", cpu);
	__atomic_store_n(&c->parked, 1, __ATOMIC_RELEASE);
	return 0;       /* ap_main halts it: no host CPU until the next INIT */
}

/* ---- the BSP ---------------------------------------------------------------- */
static u8 present[MAX_CPUS], running[MAX_CPUS];

static int wait_flag(volatile u32 *flag, u64 ms)
{
	u64 end = rdtsc() + ms * tsc_per_ms();
	while (!__atomic_load_n(flag, __ATOMIC_ACQUIRE))
		if ((i64)(rdtsc() - end) > 0)
			return 0;
		else
			cpu_relax();
	return 1;
}

static void start(u32 cpu)
{
	struct percpu *c = &g_cpus[cpu];
	c->arrived = c->park = c->parked = 0;
	c->hot = 1;
	syscall3(SYS_START_AP, cpu, 0, 0);
	if (wait_flag(&c->arrived, 2000))
		running[cpu] = 1;
	else
		gprintf("guest: cpu %u did not come up\n", cpu);
}

static int park(u32 cpu)
{
	if (!running[cpu])
		return 1;
	__atomic_store_n(&g_cpus[cpu].park, 1, __ATOMIC_RELEASE);
	if (!wait_flag(&g_cpus[cpu].parked, 2000)) {
		gprintf("guest: cpu %u did not park\n", cpu);
		return 0;
	}
	running[cpu] = 0;
	return 1;
}

/* The CSCN of the DSDT: each CPU's events, cleared as they are handled. */
static u64 scan(void)
{
	u64 base = g_acpi.cpuhp_base, ops = 0;
	for (u32 m = 0; m < g_acpi.ncpu; m++) {
		u32 cpu = g_acpi.cpu[m].cpu;
		w32(base + CPUHP_SELECT, g_acpi.cpu[m].uid);
		u8 st = r8(base + CPUHP_STATUS);
		if (st & ST_INSERT) {
			w8(base + CPUHP_STATUS, ST_INSERT);
			present[cpu] = 1;
			gprintf("guest: cpuhp cpu %u inserted\n", cpu);
			if (!load_steps)
				start(cpu);
			ops++;
		}
		if (st & ST_REMOVE) {
			w8(base + CPUHP_STATUS, ST_REMOVE);
			if (park(cpu)) {
				w32(base + CPUHP_SELECT, g_acpi.cpu[m].uid);
				w8(base + CPUHP_STATUS, CMD_EJECT);
				present[cpu] = 0;
				gprintf("guest: cpuhp cpu %u ejected\n", cpu);
				ops++;
			}
		}
	}
	return ops;
}

/* Workers the demand wants `ms` into the schedule (0 once it is over). */
static u64 load_at(u64 ms, u32 *step)
{
	u64 t = 0;
	for (u32 i = 0; i < load_steps; i++) {
		t += load[i].ms;
		if (ms < t) {
			*step = i;
			return load[i].workers;
		}
	}
	*step = load_steps;
	return 0;
}

/* Moves the number of running APs towards what `want` workers need besides
 * the BSP, one AP per call. */
static void follow_load(u64 want)
{
	u64 aps_wanted = want > 1 ? want - 1 : 0, aps = 0;
	for (u32 c = 1; c < MAX_CPUS; c++)
		aps += running[c];
	if (aps_wanted > aps) {
		for (u32 c = 1; c < MAX_CPUS; c++)
			if (present[c] && !running[c]) {
				start(c);
				return;
			}
	} else if (aps_wanted < aps) {
		for (u32 c = MAX_CPUS - 1; c > 0; c--)
			if (running[c]) {
				park(c);
				return;
			}
	}
}

u64 cpuhp_follow_user(u64 unused)
{
	(void)unused;
	if (!follow_ms)
		return 1;
	if (!g_acpi.ged_base || !g_acpi.cpuhp_base) {
		gprintf("guest: cpuhp no controller\n");
		return 0;
	}
	for (u32 m = 0; m < g_acpi.ncpu; m++)
		present[g_acpi.cpu[m].cpu] = g_acpi.cpu[m].enabled;
	syscall3(SYS_ROUTE_IRQ, g_acpi.ged_irq, 0, 0);
	/* With the interrupt routed, one scan takes the controller into use, as a guest OS
	 * does when its hot-plug support starts (Linux reads each CPU's _STA); it finds the
	 * events of a CPU inserted before (none, if the VMM waited for this). */
	u64 ops = scan();
	gprintf("guest: cpuhp first scan events=%lu\n", ops);
	gprintf("guest: cpuhp following ms=%lu ops=%lu\n", follow_ms, want_ops);
	u64 t0 = rdtsc(), short_ms = 0, last_ms = 0;
	u32 step = ~0u;
	for (;;) {
		u64 ms = (rdtsc() - t0) / tsc_per_ms();
		u32 at;
		u64 want = load_at(ms, &at);
		int load_over = at == load_steps;
		if (ms >= follow_ms || (want_ops && ops >= want_ops && load_over))
			break;
		/* Reading the register takes the pending events (the interrupt only wakes us). */
		if (r32(g_acpi.ged_base) & 1)
			ops += scan();
		if (load_steps) {
			if (at != step) {
				step = at;
				if (!load_over)
					gprintf("guest: cpu_load step %u workers=%lu at_ms=%lu\n", at, want, ms);
			}
			u64 cpus = 0;
			for (u32 c = 0; c < MAX_CPUS; c++)
				cpus += present[c];
			if (ms > last_ms && want > cpus)
				short_ms += ms - last_ms;
			follow_load(want);
		}
		last_ms = ms;
		if (load_steps && want)
			delay_us(1000);                 /* the BSP is a worker: busy */
		else
			syscall3(SYS_IDLE, 10000, 0, 0);   /* the GED interrupt wakes it earlier */
	}
	u64 cpus = 0;
	for (u32 c = 0; c < MAX_CPUS; c++)
		cpus += present[c];
	for (u32 c = 1; c < MAX_CPUS; c++)
		park(c);
	if (want_ops && ops < want_ops) {
		gprintf("guest: cpuhp timeout ops=%lu\n", ops);
		return 0;
	}
	gprintf("guest: cpuhp done ops=%lu short_ms=%lu present=%lu\n", ops, short_ms, cpus);
	return 1;
}
