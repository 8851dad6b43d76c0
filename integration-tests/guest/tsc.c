/*
 * TSC frequency, measured once by the BSP at CPL0. (CPL0 because it is all
 * port I/O, which user mode cannot do directly under PVM-style KVM; the
 * polling loops are short and time-bounded.)
 */
#include "guest.h"

u64 g_tsc_khz;
u64 g_tsc_backwards;

u64 tsc_forward(u64 *prev)
{
	u64 now = rdtsc();
	if (now < *prev)
		__atomic_fetch_add(&g_tsc_backwards, 1, __ATOMIC_RELAXED);
	*prev = now;
	return now;
}

/* ---- TSC calibration -------------------------------------------------
 * 1. The classic method: PIT channel 2 in mode 0, gated through port 0x61,
 *    poll 0x61 bit 5 (OUT2) for a 10 ms count.
 * 2. If port 0x61 does not work (QEMU microvm has no PC-speaker port, so
 *    channel 2's gate can't be raised): read back PIT channel 0's counter
 *    (mode 2, full 65536 period) for ~10 ms. IF is 0 and nothing enabled
 *    IRQ0, so the channel 0 reprogramming is harmless.
 * Under Firecracker on the shared (loaded) dev host this measured anything
 * from 2.6 to 6.3 GHz for a 2.6 GHz TSC (prescient and QEMU: within 0.1 %),
 * and every guest-timed result scales with it. So the benchmarks, which
 * compare guest-timed results between VMMs, pass the host's own TSC rate as
 * `tsc_khz=`, which is used as given.
 */
#define PIT_HZ          1193182ULL
#define CAL_MS          10
#define CAL_TICKS       (PIT_HZ * CAL_MS / 1000)
#define CAL_MAX_TSC     300000000ULL    /* 30 ms at 10 GHz, 0.3 s at 1 GHz: give up */

static int khz_plausible(u64 khz) { return khz >= 100000 && khz <= 10000000; }

static u64 cal_pit_ch2(void)
{
	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));  /* gate on, speaker off */
	/* An emulated port 0x61 reads the gate back. Some software KVMs (kvm_pvm) answer 0 to
	 * every read: waiting for OUT2 there would only burn the whole time budget. */
	if (!(inb(0x61) & 0x01))
		return 0;
	outb(0x43, 0xb0);                               /* ch2, lo/hi, mode 0, binary */
	outb(0x42, (u8)CAL_TICKS);
	outb(0x42, (u8)(CAL_TICKS >> 8));

	u64 t0 = rdtsc(), t1;
	u32 polls = 0;
	while (!(inb(0x61) & 0x20)) {
		polls++;
		if (rdtsc() - t0 > CAL_MAX_TSC)
			return 0;
	}
	t1 = rdtsc();
	return polls < 2 ? 0 : (t1 - t0) / CAL_MS;      /* OUT2 high at once: no PIT */
}

static u16 pit_ch0_read(void)
{
	outb(0x43, 0x00);                               /* latch ch0 */
	u8 lo = inb(0x40);
	return (u16)(lo | (inb(0x40) << 8));
}

static u64 cal_pit_ch0(void)
{
	outb(0x43, 0x34);                               /* ch0, lo/hi, mode 2, binary */
	outb(0x40, 0);
	outb(0x40, 0);                                  /* reload 65536 */

	u16 c0 = pit_ch0_read(), c;
	u64 t0 = rdtsc(), t1, ticks;
	do {
		c = pit_ch0_read();
		t1 = rdtsc();
		ticks = (u16)(c0 - c);                  /* counts down, wraps at 65536 */
		if (t1 - t0 > CAL_MAX_TSC)
			return 0;
	} while (ticks < CAL_TICKS);
	return (t1 - t0) * PIT_HZ / (ticks * 1000);
}

u64 tsc_calibrate(void)
{
	if (khz_plausible(g_params.tsc_khz)) {
		g_tsc_khz = g_params.tsc_khz;
		gprintf("guest: tsc_khz=%lu given\n", g_tsc_khz);
		return g_tsc_khz;
	}
	u64 khz = 0;
	/* A host busy with other work can stretch one try past its give-up bound: try again. */
	for (int attempt = 0; attempt < 3 && !khz_plausible(khz); attempt++) {
		khz = cal_pit_ch2();
		if (!khz_plausible(khz))
			khz = cal_pit_ch0();
	}
	if (!khz_plausible(khz)) {
		gprintf("guest: tsc calibration failed\n");
		khz = 0;
	}
	g_tsc_khz = khz;
	gprintf("guest: tsc_khz=%lu\n", khz);
	return khz;
}
