/*
 * SMP: the CPUs from the ACPI MADT (acpi.c), else from the Intel MP table
 * (CPL3), and AP start-up with INIT-SIPI-SIPI through the xAPIC ICR (CPL0;
 * the waiting is done at CPL3). With the MADT, g_cpus[i] is the MADT's
 * i-th Local APIC (the BSP's stays 0): enabled ones are started at boot,
 * disabled ones only if the VMM plugs them (cpuhp.c).
 *
 * AP start, per AP, in MP-table order (so "cpu <i>" indexes are stable):
 *   BSP: ap_boot_index = i, ap_boot_rsp = top of kernel stack i, SIPI
 *        (vector TRAMP_BASE >> 12), 200 us, SIPI again if not arrived,
 *        then wait (CPL3, bounded ~2 s) for g_cpus[i].arrived.
 *   AP:  ap_tramp_start (real mode) -> 32-bit -> long mode on boot_pml4
 *        -> ap_entry64 -> ap_main() -> TSS/IDT -> ap_user_main() at CPL3.
 * All APs get one INIT (and a 10 ms wait) before the first SIPI.
 */
#include "guest.h"

u32 g_ncpus = 1;
u32 g_ncpus_expected = 1;
volatile u32 g_ncpus_online = 1;
volatile u32 g_go;

extern const char ap_tramp_start[], ap_tramp_end[];

#define FALLBACK_TSC_KHZ 3000000ULL     /* for delays if calibration failed */

void delay_us(u64 us)
{
	u64 khz = g_tsc_khz ? g_tsc_khz : FALLBACK_TSC_KHZ;
	u64 start = rdtsc(), ticks = us * khz / 1000;
	while (rdtsc() - start < ticks)
		cpu_relax();
}

/* ---- MP table (CPL3) ------------------------------------------------- */
static int sum_ok(const u8 *p, u32 n)
{
	u8 s = 0;
	while (n--)
		s = (u8)(s + *p++);
	return s == 0;
}

static const u8 *mp_scan(u64 lo, u64 hi)
{
	for (u64 a = lo; a + 16 <= hi; a += 16) {
		const u8 *p = (const u8 *)a;
		if (p[0] == '_' && p[1] == 'M' && p[2] == 'P' && p[3] == '_' &&
		    p[8] >= 1 && sum_ok(p, 16u * p[8]))
			return p;
	}
	return 0;
}

/* CPUs from the MADT: the enabled ones (started at boot) take g_cpus 1.., the
 * disabled ones (plugged later, if ever) the indices after them. */
static void from_madt(u32 bsp)
{
	u32 expected = 0, n = 1;
	for (u32 pass = 0; pass < 2; pass++) {
		for (u32 i = 0; i < g_acpi.ncpu; i++) {
			if (g_acpi.cpu[i].enabled != !pass)
				continue;
			expected += !pass;
			if (g_acpi.cpu[i].apic == bsp) {
				g_acpi.cpu[i].cpu = 0;
			} else if (n < MAX_CPUS) {
				g_acpi.cpu[i].cpu = (u8)n;
				g_cpus[n++].apic_id = g_acpi.cpu[i].apic;
			}
		}
		if (!pass)
			g_ncpus = n;
	}
	g_ncpus_expected = expected ? expected : 1;
}

u64 smp_parse_user(u64 unused)
{
	(void)unused;
	u32 bsp = g_cpus[0].apic_id;            /* read from the LAPIC at boot */
	if (g_acpi.ncpu) {
		from_madt(bsp);
		return 0;
	}

	/* EBDA (segment at 0x40e) first KiB, last KiB of base memory, BIOS ROM */
	u64 bda = 0x40e;
	__asm__("" : "+r"(bda));                /* hide the low address from -Warray-bounds */
	u64 ebda = (u64)*(const volatile u16 *)bda << 4;
	const u8 *fp = 0;
	if (ebda >= 0x80000 && ebda < 0xa0000)
		fp = mp_scan(ebda, ebda + 1024);
	if (!fp)
		fp = mp_scan(0x9fc00, 0xa0000);
	if (!fp)
		fp = mp_scan(0xf0000, 0x100000);

	const u8 *cfg = fp ? (const u8 *)(u64)*(const u32 *)(fp + 4) : 0;
	if (!cfg || cfg[0] != 'P' || cfg[1] != 'C' || cfg[2] != 'M' || cfg[3] != 'P') {
		gprintf("guest: no mp table\n");
		return 0;
	}

	u16 len = *(const u16 *)(cfg + 4), count = *(const u16 *)(cfg + 0x22);
	const u8 *p = cfg + 0x2c, *end = cfg + len;
	u32 expected = 0;
	/* Walk by length; the entry count is only a bound if set (QEMU microvm's
	 * firmware leaves it 0). */
	for (u32 i = 0; (!count || i < count) && p < end; i++) {
		if (p[0] == 0) {                /* processor */
			if (p[3] & 1) {         /* enabled */
				expected++;
				if (p[1] != bsp && g_ncpus < MAX_CPUS)
					g_cpus[g_ncpus++].apic_id = p[1];
			}
			p += 20;
		} else if (p[0] <= 4) {         /* bus, I/O APIC, interrupt entries */
			p += 8;
		} else {
			break;
		}
	}
	g_ncpus_expected = expected ? expected : 1;
	return 0;
}

/* ---- AP start (CPL0) ------------------------------------------------- */
#define LAPIC_SVR       0xf0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define ICR_INIT        0x00004500      /* INIT, level assert */
#define ICR_STARTUP     0x00004600
#define ICR_BUSY        (1u << 12)

volatile u32 ap_boot_index;
volatile u64 ap_boot_rsp;

static void send_ipi(u32 apic_id, u32 lo)
{
	lapic_write(LAPIC_ICR_HI, apic_id << 24);
	lapic_write(LAPIC_ICR_LO, lo);
	for (u32 i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LO) & ICR_BUSY); i++)
		cpu_relax();
}

/* SIPI to AP `cpu` (which has had its INIT), and a second one if it has not
 * arrived after 200 us. */
static void sipi(u32 cpu)
{
	ap_boot_index = cpu;
	ap_boot_rsp = (u64)&g_kstacks[cpu][KSTACK_SIZE];
	barrier();
	send_ipi(g_cpus[cpu].apic_id, ICR_STARTUP | (TRAMP_BASE >> 12));
	delay_us(200);
	if (!g_cpus[cpu].arrived)
		send_ipi(g_cpus[cpu].apic_id, ICR_STARTUP | (TRAMP_BASE >> 12));
}

/* The trampoline in place and this LAPIC software-enabled, once. */
static void tramp_ready(void)
{
	static int ready;
	if (ready)
		return;
	memcpy((void *)TRAMP_BASE, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100);
	ready = 1;
}

/* A plugged (or re-plugged) AP: a virtual CPU needs no 10 ms INIT settle. */
void smp_start_ap(u32 cpu)
{
	tramp_ready();
	send_ipi(g_cpus[cpu].apic_id, ICR_INIT);
	sipi(cpu);
}

void smp_boot(void)
{
	if (g_ncpus <= 1)
		return;

	tramp_ready();

	for (u32 i = 1; i < g_ncpus; i++)
		send_ipi(g_cpus[i].apic_id, ICR_INIT);
	delay_us(10000);

	for (u32 i = 1; i < g_ncpus; i++) {
		sipi(i);
		if (!run_user_on(0, wait_ap_up_user, i)) {
			/* Park it again so a late start cannot reuse the next AP's slot. */
			send_ipi(g_cpus[i].apic_id, ICR_INIT);
			gprintf("guest: cpu %u did not come up\n", i);
		}
	}
}
