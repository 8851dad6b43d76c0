/*
 * Boot entry points and the AP trampoline.
 *
 *  pvh_entry32    PVH (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected mode,
 *                 paging off, ebx = struct hvm_start_info *.
 *  linux64_entry  ELF e_entry, Linux 64-bit boot protocol: long mode with
 *                 the VMM's identity map, rsi = struct boot_params *.
 *  ap_tramp_*     real-mode AP startup code, copied to TRAMP_BASE.
 *
 * Both boot paths end in common64, which loads our GDT and page tables,
 * switches to CPU 0's kernel stack and calls kmain(kind, info_paddr).
 */
#include "guest.h"

#define MSR_EFER        0xC0000080
#define EFER_LME        0x100
#define CR4_PAE         0x20
#define CR0_PE_PG       0x80000001

/* ---- PVH ELF note (only kept by the PVH link, see guest.ld) ---------- */
	.section .note.Xen, "a"
	.balign 4
	.long 4                         /* namesz: "Xen\0" */
	.long 8                         /* descsz */
	.long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.quad pvh_entry32               /* 8 bytes like Linux: QEMU reads a size_t */

/* ---- boot page tables: identity map of the first GiB, 2 MiB pages ---- */
/* P|RW|US (|PS for leaves). Later GiBs and the LAPIC are added at run    */
/* time by paging_extend_user(). These are the only page tables: every    */
/* CPU uses boot_pml4.                                                    */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl boot_pml4, boot_pdpt, boot_pd0
boot_pml4:
	.quad boot_pdpt + 0x7
	.fill 511, 8, 0
boot_pdpt:
	.quad boot_pd0 + 0x7
	.fill 511, 8, 0
boot_pd0:
	.set pg, 0
	.rept 512
	.quad (pg << 21) | 0x87
	.set pg, pg + 1
	.endr

/* ---- PVH entry ------------------------------------------------------- */
	.section .text.entry, "ax"
	.code32
	.globl pvh_entry32
pvh_entry32:
	cli
	cld
	mov %ebx, %esi                  /* start_info, survives rdmsr/wrmsr */
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $boot_pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $CR0_PE_PG, %eax
	mov %eax, %cr0
	lgdt gdt_ptr                    /* 32-bit form: limit + low 32 bits of base */
	ljmp $SEL_KCODE, $pvh_entry64

	.code64
pvh_entry64:
	mov %esi, %esi                  /* zero-extend start_info address */
	mov $BOOT_PVH, %edi
	jmp common64

/* ---- Linux 64-bit boot protocol entry (ELF e_entry) ------------------ */
	.globl linux64_entry
linux64_entry:
	cli
	cld
	mov $BOOT_LINUX64, %edi         /* rsi = boot_params, passed through */

common64:
	lgdt gdt_ptr(%rip)
	lea g_kstacks+KSTACK_SIZE(%rip), %rsp
	pushq $SEL_KCODE
	lea 1f(%rip), %rax
	push %rax
	lretq
1:	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov $CR4_PAE, %eax              /* drop whatever else the VMM set (PGE, SMEP...) */
	mov %rax, %cr4
	lea boot_pml4(%rip), %rax
	mov %rax, %cr3
	xor %ebp, %ebp
	call kmain
2:	cli
	hlt
	jmp 2b

/* ---- AP 64-bit entry, reached from the trampoline -------------------- */
	.globl ap_entry64
ap_entry64:
	lgdt gdt_ptr(%rip)
	mov ap_boot_rsp(%rip), %rsp
	pushq $SEL_KCODE
	lea 1f(%rip), %rax
	push %rax
	lretq
1:	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	xor %ebp, %ebp
	call ap_main
2:	cli
	hlt
	jmp 2b

/* ---- AP trampoline: copied to TRAMP_BASE, entered by SIPI vector ----- */
/* (TRAMP_BASE >> 12) in real mode at CS:IP = (TRAMP_BASE>>4):0.          */
	.section .rodata.tramp, "a"
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl tramp_gdtr - ap_tramp_start
	mov %cr0, %eax
	and $0x9fffffff, %eax           /* clear CD/NW left set by INIT */
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x08, $(TRAMP_BASE + tramp_pm - ap_tramp_start)

	.code32
tramp_pm:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %cr4, %eax
	or $CR4_PAE, %eax
	mov %eax, %cr4
	mov $boot_pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	rdmsr
	or $EFER_LME, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000000, %eax
	mov %eax, %cr0
	ljmp $0x18, $(TRAMP_BASE + tramp_lm - ap_tramp_start)

	.code64
tramp_lm:
	mov $ap_entry64, %eax
	jmp *%rax

	.balign 8
tramp_gdt:
	.quad 0
	.quad 0x00cf9a000000ffff        /* 0x08: 32-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: data */
	.quad 0x00af9a000000ffff        /* 0x18: 64-bit code */
tramp_gdtr:
	.word 31
	.long TRAMP_BASE + tramp_gdt - ap_tramp_start
ap_tramp_end:
