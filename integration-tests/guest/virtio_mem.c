/*
 * virtio-mem (device id 24), CPL3, one request queue.
 *
 * vmem_init: accept UNPLUGGED_INACCESSIBLE, print the region
 *   "guest: vmem0 addr=.. region_mib=.. block_kib=.. plugged_mib=.. requested_mib=..",
 *   map the whole region in the page tables (2 MiB pages; touching an
 *   unplugged part is then an MMIO exit, not a page fault), and unplug
 *   everything a previous driver left plugged.
 * vmem_workload, vmem_steps=N: first check that unplugged memory is not
 *   RAM (a write there does not read back), then follow N changes of the
 *   requested size: wait (elastic_wait_ms) until requested != plugged,
 *   plug the lowest free blocks or unplug the highest plugged ones, write a
 *   pattern to each page it plugs and check it before unplugging, then ask
 *   STATE for every run of blocks of the usable region and compare with its own bitmap and the
 *   device's plugged_size. One line per step:
 *   "guest: vmem0 step=K requested_mib=R plugged_mib=P device_plugged_mib=D state=ok ms=T"
 * vmem_follow_ms=F, vmem_ramp_mib=R, vmem_ramp_ms=T, vmem_ramp_start_ms=S:
 *   for F ms, a workload that is idle for S ms, whose demand then rises
 *   linearly to R MiB over T ms, falls back to 0 over the next T ms and
 *   stays there, lives in plugged memory only, while the
 *   driver follows the requested size (plugging without touching, never
 *   unplugging blocks in use). Each ms where the demand exceeds what is
 *   plugged is an allocation failure. The balloon's statistics (when there
 *   is a balloon) count plugged memory as RAM and the demand as used, met
 *   or not (as memory pressure would show in Linux).
 *   A line every 500 ms "guest: vmem0 t=.. demand_mib=.. plugged_mib=..
 *   requested_mib=..", then "guest: vmem0 follow done failures=N
 *   peak_plugged_mib=P max_demand_mib=D final_plugged_mib=Q".
 */
#include "virtio.h"

#define F_UNPLUGGED_INACCESSIBLE 1
/* config space */
#define C_BLOCK_SIZE    0
#define C_ADDR          16
#define C_REGION_SIZE   24

#define PAGE 4096ULL
#define PATTERN 0x3c3c5a5aa5a5c3c3ULL

struct vmem_req { u16 type, pad[3]; u64 addr; u16 nb_blocks, pad2[3]; } __attribute__((packed));
struct vmem_resp { u16 type, pad[3]; u16 state; } __attribute__((packed));

static struct vmem_req req ALIGNED(64);
static struct vmem_resp resp ALIGNED(64);
static u64 plugged_bits[VMEM_MAX_BLOCKS / 64];
static u64 base, block, nblocks, nplugged;
struct vmem_geometry g_vmem;
u64 g_vmem_plugged_bytes, g_vmem_used_bytes;
int g_vmem_following;

static int is_plugged(u64 b) { return (plugged_bits[b / 64] >> (b % 64)) & 1; }
static void mark(u64 b, int on)
{
	if (on)
		plugged_bits[b / 64] |= 1ULL << (b % 64);
	else
		plugged_bits[b / 64] &= ~(1ULL << (b % 64));
}

int vmem_request_at(struct vdev *d, u16 type, u64 addr, u16 n, u16 *state)
{
	memset(&req, 0, sizeof(req));
	req.type = type;
	req.addr = addr;
	req.nb_blocks = n;
	resp.type = 0xffff;
	struct vbuf b[2] = { { (u64)&req, sizeof(req), 0 }, { (u64)&resp, sizeof(resp), 1 } };
	u32 len;
	if (vq_submit(&d->vq[0], b, 2) < 0)
		return -1;
	vq_kick(&d->vq[0]);
	if (vq_wait(&d->vq[0], &len) < 0 || len < sizeof(resp)) {
		gprintf("guest: %s request %u got no answer\n", d->name, type);
		return -1;
	}
	if (state)
		*state = resp.state;
	return resp.type;
}

/* One request for blocks [first, first + n) of the region. */
static int request(struct vdev *d, u16 type, u64 first, u64 n, u16 *state)
{
	return vmem_request_at(d, type, base + first * block, (u16)n, state);
}

/* Pattern in the first word of every page of blocks [first, first + n). */
static u64 pattern_op(u64 first, u64 n, int write)
{
	for (u64 a = base + first * block; a < base + (first + n) * block; a += PAGE) {
		volatile u64 *p = (volatile u64 *)a;
		if (write)
			*p = a ^ PATTERN;
		else if (*p != (a ^ PATTERN))
			return a;
	}
	return 0;
}

int vmem_init(struct vdev *d)
{
	if (!vdev_init(d, 1ULL << F_UNPLUGGED_INACCESSIBLE, 1))
		return 0;
	block = vd_cfg64(d, C_BLOCK_SIZE);
	base = vd_cfg64(d, C_ADDR);
	u64 size = vd_cfg64(d, C_REGION_SIZE);
	gprintf("guest: %s addr=0x%lx region_mib=%lu block_kib=%lu plugged_mib=%lu requested_mib=%lu\n",
		d->name, base, size >> 20, block >> 10, vd_cfg64(d, VMEM_CFG_PLUGGED) >> 20,
		vd_cfg64(d, VMEM_CFG_REQUESTED) >> 20);
	if (!block || (block & (block - 1)) || block < PAGE || base % block || size % block) {
		gprintf("guest: %s bad geometry\n", d->name);
		return 0;
	}
	nblocks = size / block;
	g_vmem = (struct vmem_geometry){ base, block, nblocks };
	if (nblocks > VMEM_MAX_BLOCKS || !paging_map_ram_user(base, size)) {
		gprintf("guest: %s region too large for this guest\n", d->name);
		return 0;
	}
	if (vd_cfg64(d, VMEM_CFG_PLUGGED) && request(d, VMEM_UNPLUG_ALL, 0, 0, 0) != VMEM_ACK) {
		gprintf("guest: %s unplug-all refused\n", d->name);
		return 0;
	}
	return 1;
}

/* Plugs the lowest unplugged blocks until `want` are plugged (writing and
 * checking a pattern on them if `touch`); 0 on failure. */
static int plug_to(struct vdev *d, u64 want, int touch)
{
	u64 b = 0;
	while (nplugged < want && b < nblocks) {
		if (is_plugged(b)) {
			b++;
			continue;
		}
		u64 n = 0;
		while (b + n < nblocks && !is_plugged(b + n) && nplugged + n < want && n < 0xffff)
			n++;
		int r = request(d, VMEM_PLUG, b, n, 0);
		if (r == VMEM_NACK)
			return 1;               /* the host lowered the request meanwhile */
		if (r != VMEM_ACK) {
			gprintf("guest: %s plug of %lu blocks at %lu answered %d\n", d->name, n, b, r);
			return 0;
		}
		for (u64 i = 0; i < n; i++)
			mark(b + i, 1);
		nplugged += n;
		g_vmem_plugged_bytes = nplugged * block;
		u64 bad = touch ? (pattern_op(b, n, 1), pattern_op(b, n, 0)) : 0;
		if (bad) {
			gprintf("guest: %s plugged memory does not hold data at 0x%lx\n", d->name, bad);
			return 0;
		}
		b += n;
	}
	return 1;
}

/* Unplugs the highest plugged blocks until `want` are left; checks their data
 * first if `check`. */
static int unplug_to(struct vdev *d, u64 want, int check)
{
	u64 b = nblocks;
	while (nplugged > want && b > 0) {
		if (!is_plugged(b - 1)) {
			b--;
			continue;
		}
		u64 n = 0;
		while (b - n > 0 && is_plugged(b - n - 1) && nplugged - n > want && n < 0xffff)
			n++;
		u64 bad = check ? pattern_op(b - n, n, 0) : 0;
		if (bad) {
			gprintf("guest: %s lost data at 0x%lx while plugged\n", d->name, bad);
			return 0;
		}
		int r = request(d, VMEM_UNPLUG, b - n, n, 0);
		if (r != VMEM_ACK) {
			gprintf("guest: %s unplug of %lu blocks at %lu answered %d\n", d->name, n, b - n, r);
			return 0;
		}
		for (u64 i = 0; i < n; i++)
			mark(b - n + i, 0);
		nplugged -= n;
		g_vmem_plugged_bytes = nplugged * block;
		b -= n;
	}
	return 1;
}

/* STATE of every run of equal blocks of the usable region (the part the
 * device serves requests for; Firecracker's is smaller than the region) must
 * match our bitmap. */
static int states_agree(struct vdev *d)
{
	u64 usable = vd_cfg64(d, VMEM_CFG_USABLE) / block;
	if (usable > nblocks)
		usable = nblocks;
	for (u64 b = 0; b < usable;) {
		int on = is_plugged(b);
		u64 n = 1;
		while (b + n < usable && is_plugged(b + n) == on && n < 0xffff)
			n++;
		u16 st;
		if (request(d, VMEM_STATE, b, n, &st) != VMEM_ACK ||
		    st != (on ? VMEM_PLUGGED : VMEM_UNPLUGGED)) {
			gprintf("guest: %s STATE of %lu blocks at %lu is %u, expected %s\n", d->name, n, b,
				st, on ? "plugged" : "unplugged");
			return 0;
		}
		b += n;
	}
	return 1;
}

/* The demand at `ms` into the follow run, in blocks. */
static u64 demand_blocks(u64 ms)
{
	if (ms < g_vparams.vmem_ramp_start_ms)
		return 0;
	ms -= g_vparams.vmem_ramp_start_ms;
	u64 r = g_vparams.vmem_ramp_mib << 20, t = g_vparams.vmem_ramp_ms ? g_vparams.vmem_ramp_ms : 1;
	u64 bytes = ms < t ? r * ms / t : ms < 2 * t ? r * (2 * t - ms) / t : 0;
	return (bytes + block - 1) / block;
}

/* Plugged blocks are the lowest ones (plug_to fills from the bottom, unplug_to
 * takes from the top), so the workload's memory is blocks [0, need). */
static int follow(struct vdev *d)
{
	u64 t0 = rdtsc(), touched = 0, failures = 0, peak = 0, max_need = 0, next_line = 0;
	g_vmem_following = 1;
	for (;;) {
		u64 ms = vt_ms_since(t0);
		if (ms >= g_vparams.vmem_follow_ms)
			break;
		u64 need = demand_blocks(ms), requested = vd_cfg64(d, VMEM_CFG_REQUESTED) / block;
		if (requested > nplugged && !plug_to(d, requested, 0))
			return 0;
		if (requested < nplugged && !unplug_to(d, requested > need ? requested : need, 0))
			return 0;
		if (need > nplugged)
			failures++;
		u64 use = need < nplugged ? need : nplugged;
		if (use > touched)
			pattern_op(touched, use - touched, 1);
		touched = use;
		g_vmem_used_bytes = need * block;       /* what it wants, met or not */
		peak = nplugged > peak ? nplugged : peak;
		max_need = need > max_need ? need : max_need;
		balloon_service();
		vdev_ack_irq(d);
		if (ms >= next_line) {
			gprintf("guest: %s t=%lu demand_mib=%lu plugged_mib=%lu requested_mib=%lu\n", d->name,
				ms, need * block >> 20, nplugged * block >> 20, requested * block >> 20);
			next_line = ms + 500;
		}
		delay_us(1000);
	}
	gprintf("guest: %s follow done failures=%lu peak_plugged_mib=%lu max_demand_mib=%lu final_plugged_mib=%lu\n",
		d->name, failures, peak * block >> 20, max_need * block >> 20, nplugged * block >> 20);
	return 1;
}

int vmem_workload(struct vdev *d)
{
	if (g_vparams.vmem_follow_ms)
		return follow(d);
	if (!g_vparams.vmem_steps)
		return 1;
	/* Nothing is plugged: the region's first word is not memory. */
	volatile u64 *probe = (volatile u64 *)base;
	*probe = PATTERN;
	if (*probe == PATTERN) {
		gprintf("guest: %s unplugged memory is accessible\n", d->name);
		return 0;
	}
	gprintf("guest: %s unplugged memory inaccessible\n", d->name);
	for (u64 step = 1; step <= g_vparams.vmem_steps; step++) {
		u64 end = vt_deadline(g_vparams.elastic_wait_ms), requested;
		while ((requested = vd_cfg64(d, VMEM_CFG_REQUESTED) / block) == nplugged) {
			if (vt_expired(end)) {
				gprintf("guest: %s step=%lu no new requested size\n", d->name, step);
				return 0;
			}
			delay_us(1000);
		}
		vdev_ack_irq(d);
		u64 t0 = rdtsc();
		int ok = requested > nplugged ? plug_to(d, requested, 1) : unplug_to(d, requested, 1);
		if (!ok || !states_agree(d))
			return 0;
		u64 dev = vd_cfg64(d, VMEM_CFG_PLUGGED);
		gprintf("guest: %s step=%lu requested_mib=%lu plugged_mib=%lu device_plugged_mib=%lu state=%s ms=%lu\n",
			d->name, step, requested * block >> 20, nplugged * block >> 20, dev >> 20,
			dev == nplugged * block ? "ok" : "MISMATCH", vt_ms_since(t0));
		if (dev != nplugged * block)
			return 0;
	}
	return 1;
}
