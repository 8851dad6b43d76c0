/*
 * ACPI tables (CPL3): what a VMM with ACPI tells the guest instead of an MP
 * table and virtio_mmio.device= entries.
 *
 *   RSDP   from the boot protocol (PVH rsdp_paddr, boot_params
 *          acpi_rsdp_addr), else found by scanning the EBDA's first KiB and
 *          0xe0000-0xfffff on 16-byte boundaries ("RSD PTR ", checksum)
 *   XSDT   (RSDT if revision 0) -> FACP -> X_DSDT (DSDT), and APIC (MADT)
 *   MADT   Local APIC entries (type 0): processor UID, APIC id, enabled bit;
 *          disabled entries are CPUs that can be plugged later
 *   DSDT   every Device (0x5b 0x82) with its _HID (string or EISA id), its
 *          _CRS (Memory32Fixed and extended interrupt descriptors) and its
 *          first OperationRegion in SystemMemory. Devices are found by
 *          scanning for the Device opcode and checking the package and the
 *          name, not by interpreting AML: the guest does not run methods.
 *            LNRO0005  virtio-mmio window (base, length, GSI)
 *            ACPI0013  Generic Event Device: its GSI and its event register
 *                      (the operation region)
 *            PNP0A06 with a Memory32Fixed: the CPU hot-plug controller
 *
 * Every table's checksum is verified; a bad one is reported and ignored.
 */
#include "guest.h"

struct acpi_info g_acpi;

static int sum_ok(const u8 *p, u32 n)
{
	u8 s = 0;
	while (n--)
		s = (u8)(s + *p++);
	return s == 0;
}

static u32 rd32(const u8 *p) { return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24; }
static u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }

static const u8 *rsdp_scan(u64 lo, u64 hi)
{
	for (u64 a = lo; a + 20 <= hi; a += 16) {
		const u8 *p = (const u8 *)a;
		if (!memcmp(p, "RSD PTR ", 8) && sum_ok(p, 20))
			return p;
	}
	return 0;
}

/* A system description table at `addr` with signature `sig`, if its length
 * is sane and its checksum right. */
static const u8 *table_at(u64 addr, const char *sig)
{
	if (!addr || addr >= (1ULL << 30))     /* only the first GiB is mapped early */
		return 0;
	const u8 *t = (const u8 *)addr;
	u32 len = rd32(t + 4);
	if (memcmp(t, sig, 4) || len < 36 || len > (1u << 20))
		return 0;
	if (!sum_ok(t, len)) {
		gprintf("guest: acpi %.4s bad checksum\n", sig);
		return 0;
	}
	return t;
}

/* ---- MADT --------------------------------------------------------------- */
static void parse_madt(const u8 *m)
{
	u32 len = rd32(m + 4), enabled = 0;
	for (const u8 *p = m + 44; p + 2 <= m + len && p[1] >= 2; p += p[1]) {
		if (p[0] != 0 || p[1] < 8 || g_acpi.ncpu == MAX_CPUS)
			continue;
		u32 flags = rd32(p + 4);
		g_acpi.cpu[g_acpi.ncpu].uid = p[2];
		g_acpi.cpu[g_acpi.ncpu].apic = p[3];
		g_acpi.cpu[g_acpi.ncpu].enabled = flags & 1;
		enabled += flags & 1;
		g_acpi.ncpu++;
	}
	g_acpi.nenabled = enabled;
	gprintf("guest: acpi madt lapics=%u enabled=%u\n", g_acpi.ncpu, enabled);
}

/* ---- AML ---------------------------------------------------------------- */
/* PkgLength at p: the length it encodes (counting its own bytes), and how
 * many bytes it takes. */
static u32 pkg_length(const u8 *p, u32 *bytes)
{
	u32 follow = p[0] >> 6, len = p[0] & (follow ? 0x0f : 0x3f);
	for (u32 i = 0; i < follow; i++)
		len |= (u32)p[1 + i] << (4 + 8 * i);
	*bytes = 1 + follow;
	return len;
}

static int name_char(u8 c) { return (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'; }

/* An integer term (Zero, One, Ones, Byte/Word/DWord/QWord constants). */
static const u8 *aml_int(const u8 *p, const u8 *end, u64 *v)
{
	u32 n = 0;
	switch (p[0]) {
	case 0x00: *v = 0; return p + 1;
	case 0x01: *v = 1; return p + 1;
	case 0xff: *v = ~0ULL; return p + 1;
	case 0x0a: n = 1; break;
	case 0x0b: n = 2; break;
	case 0x0c: n = 4; break;
	case 0x0e: n = 8; break;
	default: return 0;
	}
	if (p + 1 + n > end)
		return 0;
	*v = 0;
	for (u32 i = 0; i < n; i++)
		*v |= (u64)p[1 + i] << (8 * i);
	return p + 1 + n;
}

/* `Name (NAME, ...)` inside [p, end): where its value starts. */
static const u8 *find_name(const u8 *p, const u8 *end, const char *name)
{
	for (; p + 6 <= end; p++)
		if (p[0] == 0x08 && !memcmp(p + 1, name, 4))
			return p + 5;
	return 0;
}

struct aml_device {
	char name[5];
	char hid[9];
	u64 mem_base, mem_len;          /* first Memory32Fixed of _CRS */
	u32 irq, has_irq;               /* first extended interrupt of _CRS */
	u64 region;                     /* first SystemMemory OperationRegion */
};

static void parse_hid(const u8 *v, const u8 *end, char *hid)
{
	if (v[0] == 0x0d) {             /* string */
		u32 i = 0;
		for (; i < 8 && v + 1 + i < end && v[1 + i]; i++)
			hid[i] = (char)v[1 + i];
		hid[i] = 0;
	} else if (v[0] == 0x0c && v + 5 <= end) {     /* EISA id, e.g. PNP0A06 */
		u32 id = rd32(v + 1);
		id = (id >> 24) | ((id >> 8) & 0xff00) | ((id << 8) & 0xff0000) | (id << 24);
		static const char hex[] = "0123456789ABCDEF";
		hid[0] = (char)('@' + ((id >> 26) & 0x1f));
		hid[1] = (char)('@' + ((id >> 21) & 0x1f));
		hid[2] = (char)('@' + ((id >> 16) & 0x1f));
		for (int i = 0; i < 4; i++)
			hid[3 + i] = hex[(id >> (12 - 4 * i)) & 0xf];
		hid[7] = 0;
	}
}

static void parse_crs(const u8 *v, const u8 *end, struct aml_device *d)
{
	if (v[0] != 0x11)               /* BufferOp */
		return;
	u32 nb, len = pkg_length(v + 1, &nb);
	const u8 *bend = v + 1 + len;
	u64 size;
	const u8 *p = aml_int(v + 1 + nb, end, &size);
	if (!p || bend > end)
		return;
	while (p < bend && p[0] != 0x79) {             /* until the end tag */
		if (p[0] & 0x80) {                      /* large descriptor */
			u32 dl = (u32)p[1] | (u32)p[2] << 8;
			if (p[0] == 0x86 && dl >= 9 && !d->mem_len) {
				d->mem_base = rd32(p + 4);
				d->mem_len = rd32(p + 8);
			}
			if (p[0] == 0x89 && dl >= 6 && !d->has_irq) {
				d->irq = rd32(p + 5);
				d->has_irq = 1;
			}
			p += 3 + dl;
		} else {
			p += 1 + (p[0] & 7);
		}
	}
}

/* The device's own objects end where its first nested device starts. */
static const u8 *own_end(const u8 *p, const u8 *end)
{
	for (; p + 1 < end; p++)
		if (p[0] == 0x5b && p[1] == 0x82)
			return p;
	return end;
}

static void parse_device(const u8 *body, const u8 *end, struct aml_device *d)
{
	end = own_end(body, end);
	const u8 *v = find_name(body, end, "_HID");
	if (v)
		parse_hid(v, end, d->hid);
	v = find_name(body, end, "_CRS");
	if (v)
		parse_crs(v, end, d);
	for (const u8 *p = body; p + 7 < end; p++) {
		/* OperationRegion (NAME, SystemMemory, offset, length) */
		if (p[0] == 0x5b && p[1] == 0x80 && name_char(p[2]) && p[6] == 0x00) {
			u64 base;
			if (aml_int(p + 7, end, &base)) {
				d->region = base;
				break;
			}
		}
	}
}

static void add_virtio(const struct aml_device *d)
{
	for (u32 k = 0; k < g_acpi.nvirtio; k++)
		if (g_acpi.virtio[k].base == d->mem_base)
			return;
	if (g_acpi.nvirtio == VIRTIO_MAX_DEV || !d->mem_len)
		return;
	g_acpi.virtio[g_acpi.nvirtio].base = d->mem_base;
	g_acpi.virtio[g_acpi.nvirtio].size = d->mem_len;
	g_acpi.virtio[g_acpi.nvirtio].irq = d->irq;
	g_acpi.nvirtio++;
}

static void parse_dsdt(const u8 *t)
{
	const u8 *end = t + rd32(t + 4);
	u32 devices = 0;
	for (const u8 *p = t + 36; p + 7 < end; p++) {
		if (p[0] != 0x5b || p[1] != 0x82)
			continue;
		u32 nb, len = pkg_length(p + 2, &nb);
		const u8 *dend = p + 2 + len, *name = p + 2 + nb;
		if (dend > end || len < nb + 4 || !name_char(name[0]) || !name_char(name[1]) ||
		    !name_char(name[2]) || !name_char(name[3]))
			continue;
		struct aml_device d;
		memset(&d, 0, sizeof(d));
		memcpy(d.name, name, 4);
		parse_device(name + 4, dend, &d);
		devices++;
		if (!memcmp(d.hid, "LNRO0005", 9))
			add_virtio(&d);
		else if (!memcmp(d.hid, "ACPI0013", 9) && d.region) {
			g_acpi.ged_base = d.region;
			g_acpi.ged_irq = d.irq;
		} else if (!memcmp(d.hid, "PNP0A06", 8) && d.mem_len) {
			g_acpi.cpuhp_base = d.mem_base;
		}
	}
	g_acpi.ndevices = devices;
	gprintf("guest: acpi dsdt devices=%u virtio=%u\n", devices, g_acpi.nvirtio);
	if (g_acpi.ged_base)
		gprintf("guest: acpi ged=0x%lx irq=%u cpuhp=0x%lx\n", g_acpi.ged_base, g_acpi.ged_irq,
			g_acpi.cpuhp_base);
}

u64 acpi_parse_user(u64 unused)
{
	(void)unused;
	const u8 *rsdp = 0;
	if (g_boot.rsdp && g_boot.rsdp < (1ULL << 30)) {
		rsdp = (const u8 *)g_boot.rsdp;
		if (memcmp(rsdp, "RSD PTR ", 8) || !sum_ok(rsdp, 20))
			rsdp = 0;
	}
	if (!rsdp) {
		u64 bda = 0x40e;
		__asm__("" : "+r"(bda));        /* hide the low address from -Warray-bounds */
		u64 ebda = (u64)*(const volatile u16 *)bda << 4;
		if (ebda >= 0x80000 && ebda < 0xa0000)
			rsdp = rsdp_scan(ebda, ebda + 1024);
	}
	if (!rsdp)
		rsdp = rsdp_scan(0xe0000, 0x100000);
	if (!rsdp) {
		gprintf("guest: no acpi\n");
		return 0;
	}
	g_acpi.found = 1;
	g_acpi.rsdp = (u64)rsdp;
	/* Revision 2+: the XSDT (64-bit entries); else the RSDT (32-bit). */
	const u8 *sdt = 0;
	u32 entry = 4;
	u32 rlen = rd32(rsdp + 20);
	if (rsdp[15] >= 2 && rlen >= 36 && rlen <= 64 && sum_ok(rsdp, rlen)) {
		sdt = table_at(rd64(rsdp + 24), "XSDT");
		entry = 8;
	}
	if (!sdt) {
		sdt = table_at(rd32(rsdp + 16), "RSDT");
		entry = 4;
	}
	gprintf("guest: acpi rsdp=0x%lx oem=%.6s %s\n", g_acpi.rsdp, (const char *)rsdp + 9,
		entry == 8 ? "xsdt" : "rsdt");
	if (!sdt)
		return 0;
	const u8 *madt = 0, *dsdt = 0;
	for (u32 off = 36; off + entry <= rd32(sdt + 4); off += entry) {
		u64 a = entry == 8 ? rd64(sdt + off) : rd32(sdt + off);
		const u8 *t;
		if ((t = table_at(a, "APIC")))
			madt = t;
		else if ((t = table_at(a, "FACP"))) {
			u32 flen = rd32(t + 4);
			u64 d = flen >= 148 ? rd64(t + 140) : 0;
			dsdt = table_at(d ? d : rd32(t + 40), "DSDT");
		}
	}
	if (madt)
		parse_madt(madt);
	if (dsdt)
		parse_dsdt(dsdt);
	return 0;
}
