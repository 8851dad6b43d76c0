/*
 * hostile=<mode>: the guest misbehaves on purpose, once, after the virtio
 * devices are initialized and before their workloads (which then show that
 * the devices still work). The VMM must stay up, count the fault, and keep
 * every other device and VM unaffected. Modes:
 *
 *   desc_loop    blk0: a request whose chain loops back to its head
 *   oob_addr     blk0: a data buffer, then a status byte, beyond RAM
 *   bad_queue    blk0: a head past the descriptor table, an available index
 *                a ring ahead, queue registers after DRIVER_OK / of a queue
 *                that does not exist, a notify of queue 77
 *   cfg_overrun  blk0: config-space writes (read-only space) up to the end
 *                of the window, and a read past the config
 *   mmio_storm   hostile_n reads+writes of an address no device owns (CPL3)
 *   pio_storm    hostile_n in/out of a port no device owns (CPL0)
 *   cli_spin     cli and spin forever at CPL0 (never returns)
 *
 * Lines: "guest: hostile <mode> start", mode-specific lines, then
 * "guest: hostile <mode> done" (never for cli_spin).
 */
#include "virtio.h"

static const char *const names[] = {
	[HOSTILE_DESC_LOOP] = "desc_loop",     [HOSTILE_OOB_ADDR] = "oob_addr",
	[HOSTILE_BAD_QUEUE] = "bad_queue",     [HOSTILE_CFG_OVERRUN] = "cfg_overrun",
	[HOSTILE_MMIO_STORM] = "mmio_storm",   [HOSTILE_PIO_STORM] = "pio_storm",
	[HOSTILE_CLI_SPIN] = "cli_spin",
};

int hostile_mode(const char *v, size_t vn)
{
	for (int m = HOSTILE_DESC_LOOP; m <= HOSTILE_CLI_SPIN; m++)
		if (keq(v, vn, names[m]))
			return m;
	return -1;
}

static int cfg_overrun(struct vdev *d)
{
	vd_w(d, VM_CONFIG, 0x12345678);                 /* capacity is read-only */
	vd_w(d, VM_CONFIG + 0x400, 0xdeadbeef);         /* past the end of the config */
	vd_w(d, 0xffc, 0xdeadbeef);                     /* the window's last word */
	*(volatile u8 *)(d->base + 0xfff) = 0xff;       /* its last byte */
	u32 past = vd_r(d, VM_CONFIG + 0x800);
	gprintf("guest: %s hostile cfg_overrun read_past=0x%x capacity=%lu\n", d->name, past,
		vd_cfg64(d, 0));
	return 1;
}

static void mmio_storm(u64 n)
{
	volatile u32 *reg = (volatile u32 *)HOSTILE_MMIO_BASE;
	u32 sum = 0;
	for (u64 i = 0; i < n; i++) {
		if (i & 1)
			*reg = (u32)i;
		else
			sum += *reg;
	}
	gprintf("guest: hostile mmio_storm accesses=%lu sum=0x%x\n", n, sum);
}

int hostile_run(struct vdev *blk)
{
	u32 mode = g_vparams.hostile;
	int ok = 1;
	gprintf("guest: hostile %s start\n", names[mode]);
	switch (mode) {
	case HOSTILE_DESC_LOOP:
	case HOSTILE_OOB_ADDR:
	case HOSTILE_BAD_QUEUE:
	case HOSTILE_CFG_OVERRUN:
		if (!blk) {
			gprintf("guest: virtio no usable blk device\n");
			return 0;
		}
		ok = mode == HOSTILE_CFG_OVERRUN ? cfg_overrun(blk) : blk_hostile(blk, mode);
		break;
	case HOSTILE_MMIO_STORM:
		mmio_storm(g_vparams.hostile_n);
		break;
	case HOSTILE_PIO_STORM:
		syscall3(SYS_PIO_STORM, g_vparams.hostile_n, HOSTILE_PIO_PORT, 0);
		gprintf("guest: hostile pio_storm accesses=%lu\n", g_vparams.hostile_n);
		break;
	case HOSTILE_CLI_SPIN:
		syscall3(SYS_CLI_SPIN, 0, 0, 0);
		break;
	default:
		break;
	}
	gprintf("guest: hostile %s done\n", names[mode]);
	return ok;
}
