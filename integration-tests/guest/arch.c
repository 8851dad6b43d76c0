/*
 * x86-64 CPU setup: GDT with one TSS per CPU, IDT (vectors 0-31), page
 * tables, traps (including user -> kernel calls), LAPIC access.
 *
 * Runs at CPL0, which the CI hosts emulate instruction by instruction:
 * keep loops here short. Bulk page-table filling happens at CPL3
 * (paging_extend_user), which is possible because every RAM page,
 * including the page tables themselves, is mapped U/S=1.
 */
#include "guest.h"

struct percpu g_cpus[MAX_CPUS];
u8 g_kstacks[MAX_CPUS][KSTACK_SIZE] ALIGNED(4096);
u8 g_ustacks[MAX_CPUS][USTACK_SIZE] ALIGNED(4096);

/* ---- GDT ------------------------------------------------------------- */
static u64 gdt[GDT_FIXED + 2 * MAX_CPUS] ALIGNED(16) = {
	0,
	0x00af9a000000ffffULL,  /* 0x08 kernel code, 64-bit */
	0x00cf92000000ffffULL,  /* 0x10 kernel data */
	0x00cff2000000ffffULL,  /* 0x18 user data, DPL3 */
	0x00affa000000ffffULL,  /* 0x20 user code, 64-bit, DPL3 */
};

struct desc_ptr { u16 limit; u64 base; } __attribute__((packed));

/* Used by entry.S (both the 32-bit and the 64-bit lgdt form). */
struct desc_ptr gdt_ptr = { sizeof(gdt) - 1, (u64)gdt };

/* ---- IDT ------------------------------------------------------------- */
struct idt_gate {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

static struct idt_gate idt[256] ALIGNED(16);
static struct desc_ptr idt_ptr = { sizeof(idt) - 1, (u64)idt };

extern const u64 exc_stub_table[32];

static void set_gate(int vec, u64 handler, u8 type)
{
	struct idt_gate *g = &idt[vec];
	g->off0 = (u16)handler;
	g->sel = SEL_KCODE;
	g->ist = 0;
	g->type = type;
	g->off1 = (u16)(handler >> 16);
	g->off2 = (u32)(handler >> 32);
	g->zero = 0;
}

static void paging_map_lapic(void);

void arch_init_bsp(void)
{
	paging_map_lapic();
	for (int v = 0; v < 32; v++)
		set_gate(v, exc_stub_table[v], 0x8e);           /* interrupt gate, DPL0 */
	arch_init_cpu(0);
}

void arch_init_cpu(u32 index)
{
	struct percpu *pc = &g_cpus[index];
	u64 base = (u64)&pc->tss;

	pc->index = index;
	pc->apic_id = lapic_id();
	pc->tss.rsp0 = (u64)&g_kstacks[index][KSTACK_SIZE];
	pc->tss.iomap_base = sizeof(struct tss);        /* no bitmap: IOPL decides */

	u64 *d = &gdt[GDT_FIXED + 2 * index];
	d[0] = (sizeof(struct tss) - 1) | ((base & 0xffffff) << 16) |
	       (0x89ULL << 40) | (((base >> 24) & 0xff) << 56);
	d[1] = base >> 32;

	u16 sel = SEL_TSS0 + 16 * index;
	__asm__ volatile("ltr %0" : : "r"(sel));
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
}

/* ---- paging ---------------------------------------------------------- */
extern u64 boot_pml4[512], boot_pdpt[512], boot_pd0[512];

#define PTE_P   0x1ULL
#define PTE_RW  0x2ULL
#define PTE_US  0x4ULL
#define PTE_PWT 0x8ULL
#define PTE_PCD 0x10ULL
#define PTE_PS  0x80ULL
#define GIB     (1ULL << 30)
#define MIB2    (1ULL << 21)

/* Page directories (one per GiB mapped above the first) and page-directory
 * pointer tables (one per 512 GiB above the first) come from static pools:
 * RAM up to MAX_PD_GIB GiB plus 16 GiB elsewhere (a virtio-mem region, which
 * Firecracker puts at 512 GiB). */
#define PD_POOL   (MAX_PD_GIB + 16)
#define PDPT_POOL 4
static u64 pd_pool[PD_POOL][512] ALIGNED(4096);
static u64 pdpt_pool[PDPT_POOL][512] ALIGNED(4096);
static u32 pd_used, pdpt_used;

/* The table an entry points to, taking a fresh one from `pool` (and making
 * the entry present, U/S=1) if there is none yet; 0 if the pool is empty. */
static u64 *next_level(u64 *entry, u64 (*pool)[512], u32 *used, u32 size)
{
	if (!(*entry & PTE_P)) {
		if (*used == size)
			return 0;
		*entry = (u64)pool[(*used)++] | PTE_P | PTE_RW | PTE_US;
	}
	return (u64 *)(*entry & ~0xfffULL);
}

/* The page directory of GiB `gib` (below 256 TiB); 0 if the pools are empty. */
static u64 *pd_for(u64 gib)
{
	u64 *pdpt = next_level(&boot_pml4[(gib >> 9) & 511], pdpt_pool, &pdpt_used, PDPT_POOL);
	return pdpt ? next_level(&pdpt[gib & 511], pd_pool, &pd_used, PD_POOL) : 0;
}

/* CPL3: identity-map [addr, addr + size) with 2 MiB pages, U/S=1, above
 * 1 GiB. Only not-present entries become present, so no TLB flush is
 * needed. Returns 0 if part of the range could not be mapped (above 256 TiB
 * or out of page tables). */
int paging_map_ram_user(u64 addr, u64 size)
{
	u64 lo = addr & ~(MIB2 - 1), hi = addr + size;
	if (lo < GIB)
		lo = GIB;
	if (hi > (1ULL << 48))
		return 0;
	for (u64 a = lo; a < hi; a += MIB2) {
		u64 *pd = pd_for(a >> 30);
		if (!pd)
			return 0;
		pd[(a >> 21) & 511] = a | PTE_P | PTE_RW | PTE_US | PTE_PS;
	}
	return 1;
}

/* CPL3: map every RAM range of the memory map. (The LAPIC page, CPL0 only
 * and uncached, is mapped by paging_map_lapic() at boot.) */
void paging_extend_user(void)
{
	for (u32 i = 0; i < g_boot.nr_mem; i++) {
		u64 lo = g_boot.mem[i].addr, hi = lo + g_boot.mem[i].size;
		if (hi > MAX_PD_GIB * GIB)
			hi = MAX_PD_GIB * GIB;
		if (g_boot.mem[i].type == MEM_RAM && hi > lo)
			paging_map_ram_user(lo, hi - lo);
	}
}

/* CPL3 (before the next paging_reload()): identity-map an MMIO window with
 * 4 KiB pages, uncached (PCD|PWT), U/S=1, so user-mode drivers can use it.
 * Page tables come from a small static pool (one per 2 MiB region); a
 * 2 MiB page already there (RAM) is split, keeping its flags. Returns 0 if
 * the window lies above MAX_PD_GIB or a pool is exhausted. */
#define MMIO_PTS 8
static u64 mmio_pt[MMIO_PTS][512] ALIGNED(4096);
static u32 mmio_pt_used;

int paging_map_mmio_user(u64 base, u64 size)
{
	u64 lo = base & ~0xfffULL, hi = (base + size + 0xfff) & ~0xfffULL;
	if (hi > MAX_PD_GIB * GIB || hi <= lo)
		return 0;
	for (u64 a = lo; a < hi; a += 4096) {
		u64 *pd = pd_for(a >> 30);
		if (!pd)
			return 0;
		u64 *pde = &pd[(a >> 21) & 511];
		if (!(*pde & PTE_P) || (*pde & PTE_PS)) {
			if (mmio_pt_used == MMIO_PTS)
				return 0;
			u64 *pt = mmio_pt[mmio_pt_used++], big = *pde;
			for (int i = 0; (big & PTE_P) && i < 512; i++)
				pt[i] = ((big & ~(MIB2 - 1)) + ((u64)i << 12)) | (big & 0x1f);
			*pde = (u64)pt | PTE_P | PTE_RW | PTE_US;
		}
		((u64 *)(*pde & ~0xfffULL))[(a >> 12) & 511] = a | PTE_P | PTE_RW | PTE_US | PTE_PCD | PTE_PWT;
	}
	return 1;
}

/* CPL0, before anything reads the LAPIC: two stores and a CR3 reload. */
static void paging_map_lapic(void)
{
	pd_for(LAPIC_BASE >> 30)[(LAPIC_BASE >> 21) & 511] =
		LAPIC_BASE | PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_PS;
	paging_reload();
}

void paging_reload(void)
{
	__asm__ volatile("mov %0, %%cr3" : : "r"((u64)boot_pml4) : "memory");
}

/* ---- idling: sti; hlt until the LAPIC timer or a routed IRQ ------------- */
#define VEC_WAKE        0x40
#define LAPIC_EOI       0xb0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define LAPIC_LVT_LINT0 0x350
#define LVT_MASKED      (1u << 16)
#define IOAPIC_BASE     0xFEC00000UL

extern void wake_isr(void);
static u64 timer_per_ms;

/* CPL0, once: the wake-up vector, the IOAPIC page and the LAPIC timer's rate
 * against the TSC (divide by 1, counted down for 2 ms). */
static void idle_init(void)
{
	if (timer_per_ms)
		return;
	set_gate(VEC_WAKE, (u64)wake_isr, 0x8e);
	pd_for(IOAPIC_BASE >> 30)[(IOAPIC_BASE >> 21) & 511] =
		IOAPIC_BASE | PTE_P | PTE_RW | PTE_PWT | PTE_PCD | PTE_PS;
	paging_reload();
	lapic_write(0xf0, lapic_read(0xf0) | 0x100);    /* software-enable the LAPIC */
	/* LINT0 is the 8259's ExtINT line: with IF=1 its (uninitialised, base 0) vectors
	 * would arrive as exceptions; the PIT the TSC calibration left running ticks it. */
	lapic_write(LAPIC_LVT_LINT0, lapic_read(LAPIC_LVT_LINT0) | LVT_MASKED);
	lapic_write(LAPIC_TIMER_DIV, 0xb);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_WAKE);
	lapic_write(LAPIC_TIMER_INIT, 0xffffffffu);
	delay_us(2000);
	u64 counted = 0xffffffffu - lapic_read(LAPIC_TIMER_CUR);
	lapic_write(LAPIC_TIMER_INIT, 0);
	timer_per_ms = counted / 2 ? counted / 2 : 1000000;
}

/* CPL0: IOAPIC pin `gsi` delivers VEC_WAKE to this CPU (edge, active high). */
static void route_irq(u32 gsi)
{
	volatile u32 *sel = (volatile u32 *)IOAPIC_BASE, *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
	*sel = 0x11 + 2 * gsi;
	*win = lapic_id() << 24;
	*sel = 0x10 + 2 * gsi;
	*win = VEC_WAKE;
}

/* CPL0: halts until `us` have passed or a routed IRQ arrives (no host CPU
 * meanwhile), then returns with interrupts off again. */
static void idle(u64 us)
{
	idle_init();
	u64 count = timer_per_ms * us / 1000;
	lapic_write(LAPIC_LVT_TIMER, VEC_WAKE);         /* one-shot, unmasked */
	lapic_write(LAPIC_TIMER_INIT, (u32)(count ? (count < 0xffffffffu ? count : 0xffffffffu) : 1));
	__asm__ volatile("sti; hlt; cli" ::: "memory");
	lapic_write(LAPIC_TIMER_INIT, 0);
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | VEC_WAKE);
}

/* ---- LAPIC ----------------------------------------------------------- */
u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* From the LAPIC, not CPUID: under PVM-style KVM a CPL3 CPUID may run
 * natively and report the host's APIC id. */
u32 lapic_id(void) { return lapic_read(0x20) >> 24; }

/* ---- traps ----------------------------------------------------------- */
NORETURN void triple_fault(void)
{
	static const struct desc_ptr null_idt = { 0, 0 };
	__asm__ volatile("lidt %0\n\tud2" : : "m"(null_idt));
	for (;;)
		;
}

NORETURN void halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Which CPU are we? Exceptions always run on a per-CPU kernel stack. */
static u32 cpu_from_stack(u64 rsp)
{
	u64 base = (u64)g_kstacks;
	if (rsp < base || rsp >= base + sizeof(g_kstacks))
		return 0xffffffff;
	return (u32)((rsp - base) / KSTACK_SIZE);
}

/*
 * in/out at CPL3 when the hypervisor ignores RFLAGS.IOPL (#GP, error code
 * 0): decode and perform it here. Handles [66] E4-E7 / EC-EF (imm8 or dx
 * port; byte, word, dword). Returns 0 if this is not such an instruction.
 */
static int emulate_user_pio(struct trap_frame *f)
{
	const u8 *ip = (const u8 *)f->rip;
	int len = 1, size = 4;
	if (ip[0] == 0x66) {
		size = 2;
		ip++;
		len++;
	}
	u8 op = ip[0];
	u16 port;
	if (op >= 0xe4 && op <= 0xe7) {
		port = ip[1];
		len++;
	} else if (op >= 0xec && op <= 0xef) {
		port = (u16)f->rdx;
	} else {
		return 0;
	}
	if (!(op & 1))
		size = 1;
	u32 v = (u32)f->rax;
	if (op & 2) {                                   /* out */
		if (size == 1)
			__asm__ volatile("outb %b0, %w1" : : "a"(v), "Nd"(port));
		else if (size == 2)
			__asm__ volatile("outw %w0, %w1" : : "a"(v), "Nd"(port));
		else
			__asm__ volatile("outl %0, %w1" : : "a"(v), "Nd"(port));
	} else {                                        /* in */
		if (size == 1) {
			u8 b;
			__asm__ volatile("inb %w1, %b0" : "=a"(b) : "Nd"(port));
			f->rax = (f->rax & ~0xffULL) | b;
		} else if (size == 2) {
			u16 w;
			__asm__ volatile("inw %w1, %w0" : "=a"(w) : "Nd"(port));
			f->rax = (f->rax & ~0xffffULL) | w;
		} else {
			u32 d;
			__asm__ volatile("inl %w1, %0" : "=a"(d) : "Nd"(port));
			f->rax = d;                     /* 32-bit writes zero-extend */
		}
	}
	f->rip += (u64)len;
	return 1;
}

/* A CPL3 `hlt` is a user -> kernel call (see guest.h, SYS_*). */
static void syscall_trap(struct trap_frame *f)
{
	f->rip += 1;
	switch (f->rax) {
	case SYS_EXIT:
		/* run_user() put RSP0 right above this frame */
		user_return_to_kernel((u64)(f + 1), f->rdi);
	case SYS_HALT:
		halt_forever();
	case SYS_WRITE:
		serial_write_line((const char *)f->rdi, f->rsi);
		f->rax = 0;
		break;
	case SYS_PIO_STORM:
		for (u64 i = 0; i < f->rdi; i++) {
			if (i & 1)
				outb((u16)f->rsi, (u8)i);
			else
				(void)inb((u16)f->rsi);
		}
		f->rax = 0;
		break;
	case SYS_IDLE:
		idle(f->rdi);
		f->rax = 0;
		break;
	case SYS_ROUTE_IRQ:
		idle_init();
		route_irq((u32)f->rdi);
		f->rax = 0;
		break;
	case SYS_START_AP:
		if (f->rdi > 0 && f->rdi < MAX_CPUS)
			smp_start_ap((u32)f->rdi);
		f->rax = 0;
		break;
	case SYS_CLI_SPIN:
		__asm__ volatile("cli");
		for (;;)
			barrier();
	default:
		f->rax = ~0ULL;
		break;
	}
}

void trap_handler(struct trap_frame *f)
{
	if (f->vec == 13 && f->err == 0 && (f->cs & 3) == 3) {
		if (*(const u8 *)f->rip == 0xf4) {
			syscall_trap(f);
			return;
		}
		if (emulate_user_pio(f))
			return;
	}

	u64 rsp;
	__asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
	char buf[128];
	int n = fmt(buf, sizeof(buf), "guest: PANIC exception %lu err=0x%lx rip=0x%lx cpu=%d\n",
		    f->vec, f->err, f->rip, (int)cpu_from_stack(rsp));
	serial_panic_write(buf, (size_t)n);
	triple_fault();
}
