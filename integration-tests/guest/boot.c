/*
 * Boot-protocol parsing: copy the command line and the memory map out of
 * the VMM's boot structures into BSS before anything can overwrite them
 * (the AP trampoline, the memory phase).
 */
#include "guest.h"

struct boot_info g_boot;

/* PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr;
	u64 memmap_paddr;               /* version >= 1 */
	u32 memmap_entries, reserved;
};
struct hvm_memmap_entry { u64 addr, size; u32 type, reserved; };

/* Linux boot_params ("zero page") offsets */
#define BP_ACPI_RSDP_ADDR   0x070
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES     0x1e8
#define BP_CMD_LINE_PTR     0x228
#define BP_E820_TABLE       0x2d0
struct e820_entry { u64 addr, size; u32 type; } __attribute__((packed));

static void copy_cmdline(u64 paddr)
{
	if (!paddr)
		return;
	const char *s = (const char *)paddr;
	size_t i = 0;
	for (; i < CMDLINE_MAX - 1 && s[i]; i++)
		g_boot.cmdline[i] = s[i];
	g_boot.cmdline[i] = 0;
}

static void add_mem(u64 addr, u64 size, u32 type)
{
	if (g_boot.nr_mem < MAX_MEMMAP) {
		struct mem_region *r = &g_boot.mem[g_boot.nr_mem++];
		r->addr = addr;
		r->size = size;
		r->type = type;
	}
}

void boot_copy(int kind, u64 info)
{
	g_boot.kind = kind;
	if (kind == BOOT_PVH) {
		const struct hvm_start_info *si = (const void *)info;
		if (si->magic != HVM_START_MAGIC) {
			g_boot.bad_magic = 1;
			return;
		}
		copy_cmdline(si->cmdline_paddr);
		g_boot.rsdp = si->rsdp_paddr;
		if (si->version >= 1 && si->memmap_paddr) {
			const struct hvm_memmap_entry *e = (const void *)si->memmap_paddr;
			for (u32 i = 0; i < si->memmap_entries; i++)
				add_mem(e[i].addr, e[i].size, e[i].type);
		}
	} else {
		const u8 *bp = (const u8 *)info;
		u64 cmd = *(const u32 *)(bp + BP_CMD_LINE_PTR) |
			  ((u64)*(const u32 *)(bp + BP_EXT_CMD_LINE_PTR) << 32);
		copy_cmdline(cmd);
		g_boot.rsdp = *(const u64 *)(bp + BP_ACPI_RSDP_ADDR);
		u32 n = bp[BP_E820_ENTRIES];
		const struct e820_entry *e = (const void *)(bp + BP_E820_TABLE);
		for (u32 i = 0; i < n && i < 128; i++)
			add_mem(e[i].addr, e[i].size, e[i].type);
	}
}
