/*
 * CPL3 workloads. Everything here runs in user mode (IOPL=3, IF=0), which
 * the CI's software KVM executes natively: put real work here, not in
 * CPL0 code. Entered through run_user_on(cpu, fn, arg); fn's return value
 * comes back to the kernel.
 *
 * To add a workload: write a `u64 fn(u64 arg)` here, declare it in guest.h
 * and call it with run_user_on() from main.c (or from ap_user_main()).
 */
#include "guest.h"

#define FALLBACK_ITERS_PER_MS 1000000ULL

/* ---- CPU phase: every vCPU ------------------------------------------- */
u64 cpu_phase_user(u64 cpu)
{
	u64 x = 0x9e3779b97f4a7c15ULL ^ cpu, ms;
	u64 start = rdtsc(), prev = start;

	if (g_tsc_khz) {
		u64 target = g_params.cpu_ms * g_tsc_khz;
		while (tsc_forward(&prev) - start < target)
			for (int i = 0; i < 1000; i++) {
				x ^= x << 13;
				x ^= x >> 7;
				x ^= x << 17;
			}
		ms = (rdtsc() - start) / g_tsc_khz;
	} else {
		for (u64 i = 0; i < g_params.cpu_ms * FALLBACK_ITERS_PER_MS; i++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			barrier();
		}
		ms = g_params.cpu_ms;
	}
	g_cpus[cpu].ms = ms;
	__asm__ volatile("" : : "r"(x));   /* keep the burn loop */
	gprintf("guest: cpu %lu cpu_phase done ms=%lu\n", cpu, ms);
	__atomic_store_n(&g_cpus[cpu].done, 1, __ATOMIC_RELEASE);
	return ms;
}

/* ---- memory phase: BSP only ------------------------------------------ */
#define PAGE 4096ULL
#define PATTERN 0x5a5aa5a5c3c33c3cULL

enum { MEM_COUNT, MEM_WRITE, MEM_CHECK };

/* The pattern of round r: every round's differs, so a page that lost a round's write (or came
 * back from a snapshot with older content) is found by the next round's check. */
static u64 pattern(u64 a, u64 round)
{
	return a ^ PATTERN ^ (round * 0x9e3779b97f4a7c15ULL);
}

static u64 mem_round;

/* Walk free RAM (above the image, below the mapped limit) page by page.
 * Returns the number of bytes walked; *bad = first mismatching address. */
static u64 mem_walk(int op, u64 limit, u64 *bad)
{
	u64 img_end = ((u64)__image_end + PAGE - 1) & ~(PAGE - 1), done = 0;
	for (u32 i = 0; i < g_boot.nr_mem && done < limit; i++) {
		const struct mem_region *r = &g_boot.mem[i];
		if (r->type != MEM_RAM)
			continue;
		u64 lo = (r->addr + PAGE - 1) & ~(PAGE - 1), hi = (r->addr + r->size) & ~(PAGE - 1);
		if (lo < img_end)
			lo = img_end;
		if (hi > (u64)MAX_PD_GIB << 30)
			hi = (u64)MAX_PD_GIB << 30;
		for (u64 a = lo; a < hi && done < limit; a += PAGE, done += PAGE) {
			volatile u64 *p = (volatile u64 *)a;
			if (op == MEM_WRITE) {
				/* From the second round on, each page must still hold the last round's. */
				if (mem_round && *p != pattern(a, mem_round - 1)) {
					*bad = a;
					return done;
				}
				*p = pattern(a, mem_round);
			} else if (op == MEM_CHECK && *p != pattern(a, mem_round)) {
				*bad = a;
				return done;
			}
		}
	}
	return done;
}

u64 mem_phase_user(u64 unused)
{
	(void)unused;
	u64 want = g_params.mem_mib << 20, bad = 0;
	u64 free = mem_walk(MEM_COUNT, ~0ULL, &bad);
	if (want > free) {
		gprintf("guest: mem_mib %lu exceeds free RAM %lu MiB\n", g_params.mem_mib, free >> 20);
		return 0;
	}
	u64 start = rdtsc(), prev = start;
	u64 khz = g_tsc_khz ? g_tsc_khz : 3000000ULL;
	for (mem_round = 0; mem_round < g_params.mem_rounds && !bad; mem_round++) {
		u64 round_start = tsc_forward(&prev);
		mem_walk(MEM_WRITE, want, &bad);
		if (!bad)
			mem_walk(MEM_CHECK, want, &bad);
		tsc_forward(&prev);
		/* mem_hold_ms: every round's time, and a quiet point after the first (the host
		 * snapshots the VM there): the first round after a restore pays for faulting the
		 * working set back in, as the first of all did for populating it. */
		if (g_params.mem_hold_ms)
			gprintf("guest: mem_round n=%lu us=%lu\n", mem_round,
				(prev - round_start) * 1000 / khz);
		if (g_params.mem_hold_ms && !mem_round && !bad) {
			gprintf("guest: mem hold ms=%lu\n", g_params.mem_hold_ms);
			u64 hold = tsc_forward(&prev);
			while (tsc_forward(&prev) - hold < g_params.mem_hold_ms * khz)
				cpu_relax();
		}
	}
	if (g_params.mem_rounds > 1)
		gprintf("guest: mem_phase rounds=%lu ms=%lu\n", mem_round,
			(u64)((rdtsc() - start) / khz));
	if (bad) {
		gprintf("guest: mem_phase touched_mib=%lu FAILED at 0x%lx\n", g_params.mem_mib, bad);
		return 0;
	}
	gprintf("guest: mem_phase touched_mib=%lu ok\n", g_params.mem_mib);
	return 1;
}

/* ---- SMP waits (BSP) and the AP's whole CPL3 life ---------------------- */
static u64 deadline_after_ms(u64 ms)
{
	return rdtsc() + ms * (g_tsc_khz ? g_tsc_khz : 3000000ULL);
}

u64 wait_ap_up_user(u64 cpu)
{
	u64 end = deadline_after_ms(2000);
	while (!__atomic_load_n(&g_cpus[cpu].arrived, __ATOMIC_ACQUIRE))
		if ((i64)(rdtsc() - end) > 0)
			return 0;
		else
			cpu_relax();
	return 1;
}

u64 wait_aps_done_user(u64 unused)
{
	(void)unused;
	u64 end = deadline_after_ms(g_params.cpu_ms + 2000), missing = 0;
	for (u32 i = 1; i < g_ncpus; i++) {
		if (!g_cpus[i].arrived)
			continue;
		while (!__atomic_load_n(&g_cpus[i].done, __ATOMIC_ACQUIRE) && (i64)(rdtsc() - end) < 0)
			cpu_relax();
		if (!g_cpus[i].done) {
			gprintf("guest: cpu %u did not finish\n", i);
			missing++;
		}
	}
	return missing;
}

u64 ap_user_main(u64 cpu)
{
	gprintf("guest: cpu %lu apic=%u up\n", cpu, g_cpus[cpu].apic_id);
	__atomic_add_fetch(&g_ncpus_online, 1, __ATOMIC_SEQ_CST);
	__atomic_store_n(&g_cpus[cpu].arrived, 1, __ATOMIC_RELEASE);
	while (!__atomic_load_n(&g_go, __ATOMIC_ACQUIRE))
		cpu_relax();
	return cpu_phase_user(cpu);
}
