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
 *   plug_storm   vmem0: waits (elastic_wait_ms) for a requested size, then
 *                hostile_n requests back to back: PLUG/UNPLUG of random runs
 *                (past the requested size: NACK), PLUG of plugged blocks,
 *                UNPLUG of unplugged ones, misaligned, empty and out-of-region
 *                ranges, unknown types, STATE and now and then UNPLUG_ALL;
 *                every answer is checked against the guest's own bitmap.
 *                Then STATE of every block gives the plugged count it prints:
 *                "guest: hostile plug_storm requests=N ack=A nack=K error=E
 *                 mismatch=M requested_mib=R plugged_mib=P state_plugged_mib=S
 *                 ms=T"
 *
 * Lines: "guest: hostile <mode> start", mode-specific lines, then
 * "guest: hostile <mode> done" (never for cli_spin).
 */
#include "virtio.h"

static const char *const names[] = {
	[HOSTILE_DESC_LOOP] = "desc_loop",     [HOSTILE_OOB_ADDR] = "oob_addr",
	[HOSTILE_BAD_QUEUE] = "bad_queue",     [HOSTILE_CFG_OVERRUN] = "cfg_overrun",
	[HOSTILE_MMIO_STORM] = "mmio_storm",   [HOSTILE_PIO_STORM] = "pio_storm",
	[HOSTILE_CLI_SPIN] = "cli_spin",     [HOSTILE_PLUG_STORM] = "plug_storm",
};

int hostile_mode(const char *v, size_t vn)
{
	for (int m = HOSTILE_DESC_LOOP; m <= HOSTILE_PLUG_STORM; m++)
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

static u64 storm_bits[VMEM_MAX_BLOCKS / 64];
static u64 rng_state;

static u64 next_rand(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static u64 plugged_in(u64 first, u64 n)
{
	u64 c = 0;
	for (u64 b = first; b < first + n; b++)
		c += (storm_bits[b / 64] >> (b % 64)) & 1;
	return c;
}

static void set_bits(u64 first, u64 n, int on)
{
	for (u64 b = first; b < first + n; b++) {
		if (on)
			storm_bits[b / 64] |= 1ULL << (b % 64);
		else
			storm_bits[b / 64] &= ~(1ULL << (b % 64));
	}
}

/* A block whose plugged state is `on`, searching from a random one; nblocks if none. */
static u64 block_in_state(u64 nblocks, int on)
{
	u64 start = next_rand() % nblocks;
	for (u64 i = 0; i < nblocks; i++) {
		u64 b = (start + i) % nblocks;
		if ((int)plugged_in(b, 1) == on)
			return b;
	}
	return nblocks;
}

/* What the device must answer to `type` for blocks [first, first + len) of the region. */
static int storm_expect(u16 type, u64 first, u64 len, u64 nblocks, u64 plugged, u64 requested)
{
	if (!len || first + len > nblocks)
		return VMEM_ERROR;
	u64 on = plugged_in(first, len);
	switch (type) {
	case VMEM_PLUG:
		return on ? VMEM_ERROR : plugged + len > requested ? VMEM_NACK : VMEM_ACK;
	case VMEM_UNPLUG:
		return on == len ? VMEM_ACK : VMEM_ERROR;
	default:
		return VMEM_ACK;
	}
}

static int plug_storm(struct vdev *d, u64 n)
{
	const struct vmem_geometry g = g_vmem;
	u64 end = vt_deadline(g_vparams.elastic_wait_ms), requested;
	while (!(requested = vd_cfg64(d, VMEM_CFG_REQUESTED) / g.block)) {
		if (vt_expired(end)) {
			gprintf("guest: hostile plug_storm no requested size\n");
			return 0;
		}
		delay_us(1000);
	}
	vdev_ack_irq(d);
	u64 t0 = rdtsc();
	rng_state = t0 | 1;
	u64 plugged = 0, answers[4] = { 0 }, mismatch = 0;
	for (u64 i = 0; i < n; i++) {
		u64 first = next_rand() % g.nblocks, len = 1 + next_rand() % 4, op = next_rand() % 16;
		/* PLUG, UNPLUG or STATE at random for the ranges that are wrong whatever the type */
		u16 type = (u16)(next_rand() % 3 == 2 ? VMEM_STATE : next_rand() & 1);
		u64 addr = 0;
		int expect = VMEM_ERROR;
		if (op < 7) {                   /* a random run, past the requested size or not */
			type = op < 4 ? VMEM_PLUG : VMEM_UNPLUG;
		} else if (op < 9) {            /* a plugged block again, an unplugged one again */
			type = op == 7 ? VMEM_PLUG : VMEM_UNPLUG;
			u64 b = block_in_state(g.nblocks, type == VMEM_PLUG);
			if (b < g.nblocks) {
				first = b;
				len = 1;
			}
		} else if (op < 12) {           /* STATE */
			type = VMEM_STATE;
		} else if (op == 12) {          /* UNPLUG_ALL, rarely */
			type = next_rand() % 8 ? VMEM_STATE : VMEM_UNPLUG_ALL;
		}
		switch (op) {
		case 13:                        /* misaligned */
			addr = g.base + first * g.block + 1 + next_rand() % (g.block - 1);
			break;
		case 14: {                      /* outside the region, straddling its end, wrapping */
			const u64 wrong[] = { 0, g.base - g.block, g.base + g.nblocks * g.block,
					      ~0ULL - g.block + 1 };
			addr = wrong[next_rand() % 4];
			if (next_rand() & 1) {
				addr = g.base + (g.nblocks - 1) * g.block;
				len = 2;
			}
			break;
		}
		case 15:                        /* no blocks, or a type that does not exist */
			addr = g.base + first * g.block;
			if (next_rand() & 1)
				len = 0;
			else
				type = (u16)(4 + next_rand() % 100);
			break;
		default:
			addr = g.base + first * g.block;
			expect = type == VMEM_UNPLUG_ALL ? VMEM_ACK
				: storm_expect(type, first, len, g.nblocks, plugged, requested);
			break;
		}
		u16 state = 0xffff;
		int r = vmem_request_at(d, type, addr, (u16)len, &state);
		if (r < 0)
			return 0;
		answers[r & 3]++;
		int wrong = r != expect;
		if (type == VMEM_STATE && r == VMEM_ACK) {
			u64 on = plugged_in(first, len);
			wrong |= state != (!on ? VMEM_UNPLUGGED : on == len ? VMEM_PLUGGED : VMEM_MIXED);
		}
		if (wrong && !mismatch++)
			gprintf("guest: hostile plug_storm request %lu type=%u addr=0x%lx n=%lu answered %d state %u, expected %d\n",
				i, type, addr, len, r, state, expect);
		/* the model follows the device, so one wrong answer is reported once */
		if (r != VMEM_ACK || op >= 13)
			continue;
		if (type == VMEM_UNPLUG_ALL) {
			set_bits(0, g.nblocks, 0);
			plugged = 0;
		} else if ((type == VMEM_PLUG || type == VMEM_UNPLUG) && first + len <= g.nblocks) {
			set_bits(first, len, type == VMEM_PLUG);
			plugged = type == VMEM_PLUG ? plugged + len : plugged - len;
		}
	}
	u64 seen = 0;
	for (u64 b = 0; b < g.nblocks; b++) {
		u16 st = 0xffff;
		if (vmem_request_at(d, VMEM_STATE, g.base + b * g.block, 1, &st) != VMEM_ACK)
			mismatch++;
		seen += st == VMEM_PLUGGED;
	}
	gprintf("guest: hostile plug_storm requests=%lu ack=%lu nack=%lu error=%lu mismatch=%lu requested_mib=%lu plugged_mib=%lu state_plugged_mib=%lu ms=%lu\n",
		n, answers[VMEM_ACK], answers[VMEM_NACK], answers[VMEM_ERROR], mismatch,
		requested * g.block >> 20, plugged * g.block >> 20, seen * g.block >> 20,
		vt_ms_since(t0));
	return !mismatch && seen == plugged;
}

int hostile_run(struct vdev *blk, struct vdev *vmem)
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
	case HOSTILE_PLUG_STORM:
		if (!vmem) {
			gprintf("guest: virtio no usable virtio-mem device\n");
			return 0;
		}
		ok = plug_storm(vmem, g_vparams.hostile_n);
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
