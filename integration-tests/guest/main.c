/*
 * Boot flow. CPL0 code (kmain, ap_main) only does what needs privilege;
 * each stage of real work is a CPL3 function entered with run_user_on().
 *
 *   kmain (CPL0)   boot_copy, arch_init_bsp, serial_init
 *   stage_hello    hello line; returns 1 for mode=triple
 *   stage_setup    cmdline/memory lines, page tables above 1 GiB, ACPI tables
 *                  (acpi.c), MMIO mappings, mode=panic
 *   cpuinfo_print (CPL0) cpuinfo=1: CPUID leaves and ARCH_CAPABILITIES
 *   tsc_calibrate (CPL0, port I/O)
 *   stage_mp       CPUs from the MADT or the MP table, "cpu 0 ... up"
 *   smp_boot (CPL0) INIT-SIPI-SIPI, waiting at CPL3
 *   stage_run      "cpus online", release APs, CPU phase, memory phase,
 *                  wait for APs, CPU hot-plug (cpuhp.c), final line
 *   exit (CPL0)    i8042 reset (fallback: triple fault), or halt, or wait
 *                  for Ctrl-Alt-Del on the i8042 keyboard first, or for a
 *                  line typed on the serial console
 */
#include "guest.h"

static u64 stage_hello(u64 unused)
{
	(void)unused;
	cmdline_parse(g_boot.cmdline, 0);
	gprintf("prescient-test-guest: hello boot=%s\n", g_boot.kind == BOOT_PVH ? "pvh" : "linux64");
	if (g_boot.bad_magic)
		gprintf("guest: bad start_info magic\n");
	return g_params.mode == MODE_TRIPLE;
}

static u64 stage_setup(u64 unused)
{
	(void)unused;
	gprintf("guest: cmdline \"%s\"\n", g_boot.cmdline);
	cmdline_parse(g_boot.cmdline, 1);

	u64 total = 0;
	for (u32 i = 0; i < g_boot.nr_mem; i++)
		if (g_boot.mem[i].type == MEM_RAM)
			total += g_boot.mem[i].size;
	gprintf("guest: memory total_mib=%lu entries=%u\n", total >> 20, g_boot.nr_mem);
	paging_extend_user();
	acpi_parse_user(0);
	/* Devices on the command line win (a VMM without ACPI, or one that gives both). */
	if (!g_vparams.nr_dev)
		for (u32 i = 0; i < g_acpi.nvirtio; i++) {
			g_vparams.dev[i].base = g_acpi.virtio[i].base;
			g_vparams.dev[i].size = g_acpi.virtio[i].size;
			g_vparams.dev[i].irq = g_acpi.virtio[i].irq;
			g_vparams.nr_dev++;
		}
	virtio_map_user();
	cpuhp_map_user();

	if (g_params.mode == MODE_PANIC)
		__asm__ volatile("ud2");
	return 0;
}

static u64 stage_mp(u64 unused)
{
	smp_parse_user(unused);
	gprintf("guest: cpu 0 apic=%u up\n", g_cpus[0].apic_id);
	return 0;
}

static u64 stage_run(u64 unused)
{
	(void)unused;
	gprintf("guest: cpus online=%u expected=%u\n", g_ncpus_online, g_ncpus_expected);
	__atomic_store_n(&g_go, 1, __ATOMIC_RELEASE);
	cpu_phase_user(0);
	u64 ok = mem_phase_user(0);
	if (!virtio_run_user(0))
		ok = 0;
	if (wait_aps_done_user(0))
		ok = 0;
	u64 back = __atomic_load_n(&g_tsc_backwards, __ATOMIC_RELAXED);
	if (back) {
		gprintf("guest: tsc went backwards n=%lu\n", back);
		ok = 0;
	}
	if (ok && !cpuhp_follow_user(0))
		ok = 0;
	gprintf(ok ? "prescient-test-guest: done\n" : "prescient-test-guest: failed\n");
	return ok;
}

static NORETURN void guest_exit(u64 ok)
{
	if (!ok)
		triple_fault();                 /* VMM reports a non-clean exit */
	if (g_params.exit == EXIT_HALT)
		halt_forever();
	if (g_params.exit == EXIT_KBD && !kbd_wait_ctrl_alt_del(60000))
		triple_fault();
	if (g_params.exit == EXIT_SERIAL && !serial_echo_line(60000))
		triple_fault();
	outb(0x64, 0xfe);                       /* i8042: pulse reset line */
	delay_us(100000);                       /* VMM may act asynchronously */
	triple_fault();                         /* no i8042 (e.g. QEMU microvm) */
}

void kmain(int kind, u64 info_paddr)
{
	boot_copy(kind, info_paddr);
	arch_init_bsp();
	serial_init();

	if (run_user_on(0, stage_hello, 0))
		triple_fault();
	run_user_on(0, stage_setup, 0);
	paging_reload();
	cpuinfo_print();
	tsc_calibrate();
	run_user_on(0, stage_mp, 0);
	smp_boot();
	u64 ok = run_user_on(0, stage_run, 0);
	if (ok)
		phases_run();
	guest_exit(ok);
}

void ap_main(void)
{
	u32 cpu = ap_boot_index;
	arch_init_cpu(cpu);
	run_user_on(cpu, g_cpus[cpu].hot ? cpuhp_ap_user : ap_user_main, cpu);
	halt_forever();
}
