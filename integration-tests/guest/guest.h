/*
 * prescient test guest: shared definitions (C and assembler).
 *
 * Everything here is freestanding: no libc, no SSE, no floating point.
 */
#ifndef GUEST_H
#define GUEST_H

/* ---- limits --------------------------------------------------------- */
#define MAX_CPUS        64
#define KSTACK_SIZE     8192    /* per-CPU CPL0 stack (also TSS.RSP0 area) */
#define USTACK_SIZE     16384   /* per-CPU CPL3 stack */
#define MAX_MEMMAP      128
#define CMDLINE_MAX     2048
#define MAX_PD_GIB      64      /* RAM is identity mapped up to 64 GiB */

/* ---- GDT selectors -------------------------------------------------- */
#define SEL_KCODE       0x08
#define SEL_KDATA       0x10
#define SEL_UDATA       0x18    /* DPL3 */
#define SEL_UCODE       0x20    /* DPL3 */
#define SEL_TSS0        0x28    /* CPU i: SEL_TSS0 + 16 * i */
#define GDT_FIXED       5       /* descriptors before the TSS ones */

/* ---- boot kinds ----------------------------------------------------- */
#define BOOT_PVH        1
#define BOOT_LINUX64    2

/* ---- fixed physical addresses --------------------------------------- */
#define TRAMP_BASE      0x10000         /* AP real-mode trampoline, SIPI vector 0x10 */
#define LAPIC_BASE      0xFEE00000UL

/* ---- user -> kernel calls: CPL3 `hlt` (#GP), rax = number, args in  */
/* rdi, rsi, rdx; result in rax; all other registers preserved.          */
#define SYS_EXIT        0       /* leave CPL3: run_user() returns rdi */
#define SYS_HALT        1       /* cli; hlt forever at CPL0 */
#define SYS_WRITE       2       /* serial_write_line(rdi = buf, rsi = len) */
#define SYS_PIO_STORM   3       /* rdi accesses (in/out alternating) to port rsi, at CPL0 */
#define SYS_CLI_SPIN    4       /* cli; spin forever at CPL0 (never returns) */
#define SYS_START_AP    5       /* INIT + SIPI to CPU rdi (g_cpus index); returns at once */
#define SYS_IDLE        6       /* sti; hlt for at most rdi us (LAPIC timer) or until a routed IRQ */
#define SYS_ROUTE_IRQ   7       /* IOAPIC pin rdi wakes this CPU from SYS_IDLE */

/* IOPL=3, IF=0, reserved bit 1. IOPL=3 lets CPL3 do port I/O natively where
 * the hypervisor honours it (QEMU TCG, hardware KVM); PVM-style software KVM
 * clears it, and arch.c then emulates in/out from the resulting #GP. */
#define RFLAGS_USER     0x3002

#ifndef __ASSEMBLER__

#include <stdint.h>
#include <stddef.h>
#include <stdarg.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

#define NORETURN __attribute__((noreturn))
#define ALIGNED(n) __attribute__((aligned(n)))

/* ---- port I/O and small CPU helpers (usable at CPL0 and at CPL3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" : : : "memory"); }
static inline void barrier(void) { __asm__ volatile("" : : : "memory"); }
static inline int cpl(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---- lib.c ---------------------------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

/* ---- spinlock (lock xchg), usable at any CPL ------------------------ */
typedef struct { volatile u32 v; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE))
		while (l->v)
			cpu_relax();
}
static inline int spin_trylock(spinlock_t *l) { return !__atomic_exchange_n(&l->v, 1, __ATOMIC_ACQUIRE); }
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->v, 0, __ATOMIC_RELEASE); }

/* ---- boot.c: what the VMM handed us, copied into BSS ---------------- */
struct mem_region { u64 addr, size; u32 type; };
#define MEM_RAM 1

struct boot_info {
	int kind;                       /* BOOT_PVH / BOOT_LINUX64 */
	int bad_magic;                  /* PVH start_info magic mismatch */
	u32 nr_mem;
	struct mem_region mem[MAX_MEMMAP];
	char cmdline[CMDLINE_MAX];
	u64 rsdp;                       /* ACPI root pointer the boot protocol passed, or 0 */
};
extern struct boot_info g_boot;
void boot_copy(int kind, u64 info_paddr);       /* CPL0, first thing */

/* ---- cmdline.c ------------------------------------------------------ */
enum { MODE_NORMAL, MODE_TRIPLE, MODE_PANIC };
enum { EXIT_RESET, EXIT_HALT, EXIT_KBD, EXIT_SERIAL };
struct params {
	u64 cpu_ms;
	u64 mem_mib;
	u64 mem_rounds;
	u64 mem_hold_ms;
	u64 tsc_khz;    /* given by the host: 0 = calibrate */
	int mode;
	int exit;
};
extern struct params g_params;
void cmdline_parse(const char *s, int report);  /* report: print unknown keys */
int parse_u64(const char *s, size_t n, u64 *out); /* decimal digits only; 0 if not a number */

/* ---- phases.c (predictor workloads) --------------------------------- */
int phases_param(const char *k, size_t kn, const char *v, size_t vn);
void phases_run(void);                          /* CPL0, after stage_run */

/* ---- cpuinfo.c (what the VMM's CPUID and MSRs show the kernel) ------ */
int cpuinfo_param(const char *k, size_t kn, const char *v, size_t vn);
void cpuinfo_print(void);                       /* CPL0, after stage_setup */

/* ---- serial.c / fmt.c ----------------------------------------------- */
void serial_init(void);
void serial_write_line(const char *s, size_t n);  /* whole line, under lock */
void serial_panic_write(const char *s, size_t n); /* ignores a stuck lock */
int serial_echo_line(u64 timeout_ms);   /* exit=serial: 1 once a typed line ended */
int vfmt(char *buf, size_t size, const char *fmt, va_list ap);
int fmt(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void gprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- arch.c --------------------------------------------------------- */
struct tss {
	u32 reserved0;
	u64 rsp0, rsp1, rsp2;
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct percpu {
	struct tss tss;
	u32 index;
	u32 apic_id;
	volatile u32 arrived;           /* AP printed its "up" line */
	volatile u32 done;              /* CPU phase finished */
	volatile u64 ms;
	volatile u32 hot;               /* started by a hot-plug: runs cpuhp_ap_user */
	volatile u32 park;              /* asked to stop (hot-unplug) */
	volatile u32 parked;            /* stopped: about to halt at CPL0 */
} ALIGNED(64);

extern struct percpu g_cpus[MAX_CPUS];
extern u8 g_kstacks[MAX_CPUS][KSTACK_SIZE];
extern u8 g_ustacks[MAX_CPUS][USTACK_SIZE];

void arch_init_bsp(void);               /* IDT + this CPU's TSS */
void arch_init_cpu(u32 index);          /* TSS/GDT slot, ltr, lidt */
void paging_extend_user(void);          /* CPL3: map RAM above 1 GiB + LAPIC */
int paging_map_ram_user(u64 addr, u64 size); /* CPL3: 2 MiB pages; 0 if it cannot all be mapped */
void paging_reload(void);               /* CPL0: reload CR3 */
NORETURN void triple_fault(void);
NORETURN void halt_forever(void);       /* CPL0 */
u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
u32 lapic_id(void);                     /* CPL0: this CPU's xAPIC id */

/* Saved by trap.S for exceptions (vectors 0-31), user calls included. */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8;
	u64 rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err;
	u64 rip, cs, rflags, rsp, ss;           /* pushed by the CPU */
};
void trap_handler(struct trap_frame *f);        /* may return: iretq */
NORETURN void user_return_to_kernel(u64 rsp0, u64 result);     /* trap.S */

/* CPL3 -> CPL0 call (only rax is clobbered). */
static inline u64 syscall3(u64 nr, u64 a0, u64 a1, u64 a2)
{
	u64 ret;
	__asm__ volatile("hlt" : "=a"(ret) : "a"(nr), "D"(a0), "S"(a1), "d"(a2) : "memory");
	return ret;
}

/* trap.S */
u64 run_user(u64 (*fn)(u64), u64 arg, u64 user_stack_top, void *rsp0_slot);
static inline u64 run_user_on(u32 cpu, u64 (*fn)(u64), u64 arg)
{
	return run_user(fn, arg, (u64)&g_ustacks[cpu][USTACK_SIZE],
			(u8 *)&g_cpus[cpu].tss + offsetof(struct tss, rsp0));
}
NORETURN void user_halt(void);          /* CPL3 -> SYS_HALT */

/* ---- smp.c ---------------------------------------------------------- */
extern u32 g_ncpus;                     /* CPUs we will try to run (<= MAX_CPUS) */
extern u32 g_ncpus_expected;            /* enabled processors in the MP table */
extern volatile u32 g_ncpus_online;
extern volatile u32 g_go;               /* BSP releases APs into the CPU phase */
u64 smp_parse_user(u64 unused);         /* CPL3: MADT or MP table -> g_cpus[].apic_id */
void smp_boot(void);                    /* CPL0: INIT-SIPI-SIPI each AP */
void smp_start_ap(u32 cpu);             /* CPL0: INIT, SIPI (and a second if need be) */
void delay_us(u64 us);                  /* any CPL, TSC based */

/* ---- kbd.c (CPL0) --------------------------------------------------- */
int kbd_wait_ctrl_alt_del(u64 timeout_ms); /* 1 once the i8042 delivered Ctrl-Alt-Del */

/* ---- tsc.c (CPL0) --------------------------------------------------- */
extern u64 g_tsc_khz;                   /* 0 if calibration failed */
extern u64 g_tsc_backwards;                /* rdtsc readings lower than the one before */
u64 tsc_forward(u64 *prev);              /* rdtsc, counting a step back in g_tsc_backwards */
u64 tsc_calibrate(void);

/* ---- user.c: CPL3 workloads ----------------------------------------- */
u64 cpu_phase_user(u64 cpu);
u64 mem_phase_user(u64 unused);         /* returns 1 on success */
u64 wait_ap_up_user(u64 cpu);           /* returns 1 if AP arrived */
u64 wait_aps_done_user(u64 unused);     /* returns number of APs not done */
u64 ap_user_main(u64 cpu);

/* ---- virtio*.c: virtio-mmio devices (all driver work at CPL3) --------- */
#define VIRTIO_MAX_DEV  12              /* Kata Containers' Firecracker VM has 11 */
struct virtio_params {
	u32 nr_dev;                     /* virtio_mmio.device=<size>@<base>:<irq>[:<id>] */
	struct { u64 base, size; u32 irq; } dev[VIRTIO_MAX_DEV];
	int off;                        /* virtio=off: ignore every device */
	u64 timeout_ms;                 /* virtio_timeout_ms: one request's bound */
	u64 blk_rw, blk_read, blk_ops, blk_sector, blk_qd, blk_op_kib, blk_write, blk_int_report;
	u64 rng_bytes;
	u64 net_tx, net_rx, net_rx_ethertype;
	u64 vsock_echo_listen, vsock_connect, vsock_send;
	u64 vmem_steps, elastic_wait_ms;
	u64 vmem_follow_ms, vmem_ramp_mib, vmem_ramp_ms, vmem_ramp_start_ms;
	u64 balloon_steps, balloon_report_mib, balloon_report_delay_ms, balloon_hint_mib;
	u64 hold_ms;
	u64 blk_crash;                  /* blk_crash=N: N acked write+FLUSH rounds (crash tests) */
	u64 blk_hotplug_ms, blk_hotplug_dev; /* blk workloads on blk<dev> once it is plugged */
	u32 hostile;                    /* hostile=<mode>: HOSTILE_* */
	u64 hostile_n;                  /* hostile_n=N: accesses/requests of the storm modes */
	u64 boot_timer;                 /* boot_timer=1: write 123 to Firecracker's boot timer */
	u64 mmds, mmds_flood;           /* mmds=1: MMDS exchanges on net0 (net_mmds.c) */
	u64 pmem_check, pmem_write;     /* virtio_pmem.c */
};
enum {
	HOSTILE_NONE, HOSTILE_DESC_LOOP, HOSTILE_OOB_ADDR, HOSTILE_BAD_QUEUE, HOSTILE_CFG_OVERRUN,
	HOSTILE_MMIO_STORM, HOSTILE_PIO_STORM, HOSTILE_CLI_SPIN, HOSTILE_PLUG_STORM,
};
#define HOSTILE_MMIO_BASE 0xd0000000UL  /* no device, no RAM: every access is unclaimed */
#define HOSTILE_PIO_PORT  0x2f0         /* no device */
extern struct virtio_params g_vparams;
int virtio_param(const char *k, size_t kn, const char *v, size_t vn); /* cmdline: 0 ok, 1 unknown, 2 bad */
void virtio_map_user(void);             /* CPL3, before paging_reload(): map the MMIO windows */
u64 virtio_run_user(u64 unused);        /* CPL3: probe + workloads; 1 = ok */
int paging_map_mmio_user(u64 base, u64 size); /* arch.c, CPL3: 4 KiB pages, UC, U/S=1 */

/* ---- acpi.c: RSDP, MADT, DSDT (CPL3) ---------------------------------- */
struct acpi_info {
	int found;                      /* an RSDP with a good checksum */
	u64 rsdp;
	u32 ncpu, nenabled;             /* MADT Local APIC entries, enabled ones */
	struct { u8 uid, apic, enabled, cpu; } cpu[MAX_CPUS];   /* cpu: g_cpus index */
	u32 ndevices;                   /* Device objects in the DSDT */
	u32 nvirtio;                    /* LNRO0005 devices */
	struct { u64 base, size; u32 irq; } virtio[VIRTIO_MAX_DEV];
	u64 ged_base;                   /* GED event register (0: none) */
	u32 ged_irq;
	u64 cpuhp_base;                 /* CPU hot-plug controller (0: none) */
};
extern struct acpi_info g_acpi;
u64 acpi_parse_user(u64 unused);        /* CPL3, in stage_setup before MMIO mapping */

/* ---- cpuhp.c: following the CPU hot-plug controller (CPL3) ------------- */
int cpuhp_param(const char *k, size_t kn, const char *v, size_t vn); /* 0 ok, 1 unknown, 2 bad */
void cpuhp_map_user(void);              /* CPL3, before paging_reload() */
u64 cpuhp_follow_user(u64 unused);      /* CPL3, in stage_run: 1 = ok (or not asked for) */
u64 cpuhp_ap_user(u64 cpu);             /* CPL3 life of a hot-plugged AP */

/* ---- main.c --------------------------------------------------------- */
extern u8 __image_start[], __image_end[];
void kmain(int kind, u64 info_paddr);
void ap_main(void);
extern volatile u32 ap_boot_index;
extern volatile u64 ap_boot_rsp;

#endif /* __ASSEMBLER__ */
#endif /* GUEST_H */
