/*
 * cpuinfo=1: print, at CPL0, the CPUID leaves Firecracker's CPU templates
 * change and IA32_ARCH_CAPABILITIES, for tests that compare what two VMMs
 * show the guest. CPL0 matters: a software KVM that runs guest user code
 * natively (kvm_pvm) lets CPL3 CPUID reach the host CPU, while CPL0 code is
 * emulated and sees what the VMM set with KVM_SET_CPUID2.
 *
 * Output (after the setup lines, before the CPU phase):
 *   guest: cpuid leaf=0x<leaf> sub=<n> eax=0x.. ebx=0x.. ecx=0x.. edx=0x..
 *   guest: msr 0x10a=0x<value>         (only where CPUID.7.0:EDX[29] says it exists)
 *   guest: cpuinfo done
 */
#include "guest.h"

#define MSR_ARCH_CAPABILITIES 0x10a
#define CPUID7_EDX_ARCH_CAPABILITIES (1U << 29)

static u64 wanted;

static const struct { u32 leaf, sub; } leaves[] = {
	{ 0x1, 0 }, { 0x7, 0 }, { 0xd, 0 }, { 0xd, 1 }, { 0x80000001, 0 }, { 0x80000008, 0 },
};

/* Returns 0 = ok, 1 = unknown key, 2 = bad value (as cmdline.c's apply). */
int cpuinfo_param(const char *k, size_t kn, const char *v, size_t vn)
{
	if (kn != 7 || memcmp(k, "cpuinfo", 7))
		return 1;
	return parse_u64(v, vn, &wanted) ? 0 : 2;
}

static void cpuid_sub(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static u64 rdmsr(u32 index)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
	return ((u64)hi << 32) | lo;
}

void cpuinfo_print(void)                /* CPL0 */
{
	if (!wanted)
		return;
	u32 r[4], max_basic, max_ext;
	cpuid_sub(0, 0, r);
	max_basic = r[0];
	cpuid_sub(0x80000000, 0, r);
	max_ext = r[0];
	for (size_t i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
		u32 leaf = leaves[i].leaf;
		if (leaf > (leaf >= 0x80000000 ? max_ext : max_basic))
			continue;
		cpuid_sub(leaf, leaves[i].sub, r);
		gprintf("guest: cpuid leaf=0x%x sub=%u eax=0x%x ebx=0x%x ecx=0x%x edx=0x%x\n",
			leaf, leaves[i].sub, r[0], r[1], r[2], r[3]);
	}
	if (max_basic >= 7) {
		cpuid_sub(7, 0, r);
		if (r[3] & CPUID7_EDX_ARCH_CAPABILITIES)
			gprintf("guest: msr 0x10a=0x%lx\n", rdmsr(MSR_ARCH_CAPABILITIES));
	}
	gprintf("guest: cpuinfo done\n");
}
