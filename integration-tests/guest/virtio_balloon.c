/*
 * virtio-balloon (device id 5), CPL3. Queues: inflate, deflate, then stats,
 * hinting and reporting when negotiated (STATS_VQ, DEFLATE_ON_OOM,
 * FREE_PAGE_HINT, REPORTING are accepted when offered).
 *
 * The balloon takes pages from the bottom of free RAM (where the memory
 * phase wrote), so inflating gives back pages the host really had to back.
 * Statistics (total, free = free RAM less the balloon, available, minor
 * faults = number of balloon steps done, OOM kills = 0) go to the device at
 * start and each time it returns the buffer.
 *
 * balloon_steps=N: follow N changes of the target: wait (elastic_wait_ms)
 *   until num_pages != actual, inflate or deflate in requests of up to 256
 *   PFNs, write `actual`, print
 *   "guest: balloon0 step=K target_pages=T actual_pages=A free_mib=F ms=M".
 * balloon_report_mib=M: then write M MiB at the top of free RAM, print
 *   "guest: balloon0 touched_mib=M", wait balloon_report_delay_ms, report
 *   them free in 2 MiB ranges (16 per request) and print
 *   "guest: balloon0 reported_mib=M".
 * balloon_hint_mib=H: then write H MiB below those, print
 *   "guest: balloon0 touched_hint_mib=H", wait (elastic_wait_ms) for the host
 *   to start a hinting run (free_page_hint_cmd_id >= 2 in config space),
 *   send the run's id, the H MiB as free 2 MiB ranges (16 per request) and
 *   STOP, print "guest: balloon0 hinted_mib=H cmd=N", then wait for DONE
 *   before the pages may be used again and print
 *   "guest: balloon0 hint_done cmd=1".
 */
#include "virtio.h"

#define F_STATS_VQ      1
#define F_DEFLATE_ON_OOM 2
#define F_FREE_PAGE_HINT 3
#define F_REPORTING     5
#define CFG_HINT_CMD    8
#define HINT_STOP       0
#define HINT_DONE       1
#define PAGE 4096ULL
#define MIB2 (2ULL << 20)
#define PFNS_PER_REQ 256
#define REPORT_RANGES 16

enum { S_MINFLT = 3, S_MEMFREE = 4, S_MEMTOT = 5, S_AVAIL = 6, S_OOM_KILL = 10 };
struct stat_entry { u16 tag; u64 val; } __attribute__((packed));

static u32 pfns[PFNS_PER_REQ] ALIGNED(4096);
static struct stat_entry stats[5] ALIGNED(64);
static u32 hint_cmd ALIGNED(64);
static struct vq *inflate_q, *deflate_q, *stats_q, *hint_q, *report_q;
/* Free RAM: [lo, hi) of the RAM range holding the image's end; the balloon is [lo, lo + pages). */
static u64 ram_lo, ram_hi, ram_total;
static u32 balloon_pages;
static u64 steps_done;

static void find_free_ram(void)
{
	u64 img_end = ((u64)__image_end + PAGE - 1) & ~(PAGE - 1);
	for (u32 i = 0; i < g_boot.nr_mem; i++) {
		const struct mem_region *r = &g_boot.mem[i];
		if (r->type != MEM_RAM)
			continue;
		ram_total += r->size;
		if (r->addr <= img_end && img_end < r->addr + r->size) {
			ram_lo = img_end;
			ram_hi = (r->addr + r->size) & ~(PAGE - 1);
		}
	}
}

static u64 free_bytes(void) { return ram_hi - ram_lo - (u64)balloon_pages * PAGE; }

/* Plugged virtio-mem memory counts as RAM, free where the workload does not
 * want it. While the virtio-mem follow run is on, its workload lives only in
 * plugged blocks, so only the plugged memory it does not use is available to
 * it (the boot RAM is not): a demand above what is plugged shows as no memory
 * available, and the used memory the VMM sees is what the workload needs. */
static void send_stats(void)
{
	u64 have = g_vmem_following ? g_vmem_plugged_bytes : free_bytes() + g_vmem_plugged_bytes;
	u64 f = have > g_vmem_used_bytes ? have - g_vmem_used_bytes : 0;
	struct stat_entry s[5] = {
		{ S_MEMTOT, ram_total + g_vmem_plugged_bytes }, { S_MEMFREE, f }, { S_AVAIL, f },
		{ S_MINFLT, steps_done }, { S_OOM_KILL, 0 },
	};
	memcpy(stats, s, sizeof(s));
	struct vbuf b = { (u64)stats, sizeof(stats), 0 };
	if (vq_submit(stats_q, &b, 1) >= 0)
		vq_kick(stats_q);
}

/* The device returns the stats buffer to ask for a fresh report. */
void balloon_service(void)
{
	u32 len;
	if (stats_q && vq_poll(stats_q, &len) >= 0) {
		vdev_ack_irq(stats_q->dev);
		send_stats();
	}
}

int balloon_init(struct vdev *d)
{
	vd_w(d, VM_DEV_FEAT_SEL, 0);
	u64 offered = vd_r(d, VM_DEV_FEAT);
	u64 want = (1ULL << F_STATS_VQ) | (1ULL << F_DEFLATE_ON_OOM) | (1ULL << F_FREE_PAGE_HINT) |
		   (1ULL << F_REPORTING);
	u32 nq = 2, next = 2;
	nq += ((offered >> F_STATS_VQ) & 1) + ((offered >> F_FREE_PAGE_HINT) & 1) +
	      ((offered >> F_REPORTING) & 1);
	if (!vdev_init(d, want, nq))
		return 0;
	inflate_q = &d->vq[0];
	deflate_q = &d->vq[1];
	stats_q = vd_has(d, F_STATS_VQ) ? &d->vq[next++] : 0;
	hint_q = vd_has(d, F_FREE_PAGE_HINT) ? &d->vq[next++] : 0;
	report_q = vd_has(d, F_REPORTING) ? &d->vq[next++] : 0;
	find_free_ram();
	gprintf("guest: %s stats=%d deflate_on_oom=%d hinting=%d reporting=%d target_pages=%u "
		"free_mib=%lu\n",
		d->name, stats_q != 0, vd_has(d, F_DEFLATE_ON_OOM), hint_q != 0, report_q != 0,
		vd_cfg32(d, 0), free_bytes() >> 20);
	if (stats_q)
		send_stats();
	return 1;
}

/* Sends `n` PFNs starting at balloon page `first` on `q`. */
static int send_pfns(struct vdev *d, struct vq *q, u32 first, u32 n)
{
	for (u32 i = 0; i < n; i++)
		pfns[i] = (u32)((ram_lo >> 12) + first + i);
	struct vbuf b = { (u64)pfns, n * 4, 0 };
	u32 len;
	if (vq_submit(q, &b, 1) < 0)
		return 0;
	vq_kick(q);
	if (vq_wait(q, &len) < 0) {
		gprintf("guest: %s page list not returned\n", d->name);
		return 0;
	}
	return 1;
}

static int adjust(struct vdev *d, u32 target)
{
	u32 max = (u32)((ram_hi - ram_lo) / PAGE);
	if (target > max) {
		gprintf("guest: %s target %u pages above free RAM (%u)\n", d->name, target, max);
		target = max;
	}
	while (balloon_pages != target) {
		balloon_service();
		if (target > balloon_pages) {
			u32 n = target - balloon_pages < PFNS_PER_REQ ? target - balloon_pages : PFNS_PER_REQ;
			if (!send_pfns(d, inflate_q, balloon_pages, n))
				return 0;
			balloon_pages += n;
		} else {
			u32 n = balloon_pages - target < PFNS_PER_REQ ? balloon_pages - target : PFNS_PER_REQ;
			if (!send_pfns(d, deflate_q, balloon_pages - n, n))
				return 0;
			balloon_pages -= n;
		}
		vd_wcfg32(d, 4, balloon_pages);
	}
	return 1;
}

/* Submits `n` buffers as one chain on `q` and waits for the device to return it. */
static int submit_wait(struct vdev *d, struct vq *q, struct vbuf *b, int n)
{
	u32 len;
	if (vq_submit(q, b, n) < 0)
		return 0;
	vq_kick(q);
	if (vq_wait(q, &len) < 0) {
		gprintf("guest: %s buffer not returned\n", d->name);
		return 0;
	}
	return 1;
}

static int report_free(struct vdev *d)
{
	u64 bytes = g_vparams.balloon_report_mib << 20;
	u64 top = ram_hi & ~(MIB2 - 1), lo = top - bytes;
	if (!report_q || bytes > top || lo < ram_lo + (u64)balloon_pages * PAGE) {
		gprintf("guest: %s cannot report %lu MiB\n", d->name, g_vparams.balloon_report_mib);
		return 0;
	}
	for (u64 a = lo; a < top; a += PAGE)
		*(volatile u64 *)a = a;
	gprintf("guest: %s touched_mib=%lu\n", d->name, g_vparams.balloon_report_mib);
	u64 until = vt_deadline(g_vparams.balloon_report_delay_ms);
	while (!vt_expired(until)) {
		balloon_service();
		delay_us(1000);
	}
	for (u64 a = lo; a < top;) {
		struct vbuf b[REPORT_RANGES];
		int n = 0;
		for (; n < REPORT_RANGES && a < top; n++, a += MIB2)
			b[n] = (struct vbuf){ a, (u32)MIB2, 1 };
		if (!submit_wait(d, report_q, b, n))
			return 0;
	}
	gprintf("guest: %s reported_mib=%lu\n", d->name, g_vparams.balloon_report_mib);
	return 1;
}

static int send_hint_cmd(struct vdev *d, u32 cmd)
{
	hint_cmd = cmd;
	struct vbuf b = { (u64)&hint_cmd, 4, 0 };
	return submit_wait(d, hint_q, &b, 1);
}

/* Waits (elastic_wait_ms) for the host's hinting command: a run's id (2 and
 * up) if `run`, else DONE; returns the last one read. */
static u32 wait_hint_cmd(struct vdev *d, int run)
{
	u64 until = vt_deadline(g_vparams.elastic_wait_ms);
	u32 cmd;
	for (;;) {
		cmd = vd_cfg32(d, CFG_HINT_CMD);
		if ((run ? cmd >= 2 : cmd == HINT_DONE) || vt_expired(until))
			break;
		balloon_service();
		delay_us(1000);
	}
	vdev_ack_irq(d);
	return cmd;
}

/* One free page hinting run over H MiB below the reported region. */
static int hint_free(struct vdev *d)
{
	u64 bytes = g_vparams.balloon_hint_mib << 20;
	u64 top = (ram_hi & ~(MIB2 - 1)) - (g_vparams.balloon_report_mib << 20), lo = top - bytes;
	if (!hint_q || bytes > top || lo < ram_lo + (u64)balloon_pages * PAGE) {
		gprintf("guest: %s cannot hint %lu MiB\n", d->name, g_vparams.balloon_hint_mib);
		return 0;
	}
	for (u64 a = lo; a < top; a += PAGE)
		*(volatile u64 *)a = a;
	gprintf("guest: %s touched_hint_mib=%lu\n", d->name, g_vparams.balloon_hint_mib);
	u32 cmd = wait_hint_cmd(d, 1);
	if (cmd < 2) {
		gprintf("guest: %s no hinting run (cmd=%u)\n", d->name, cmd);
		return 0;
	}
	if (!send_hint_cmd(d, cmd))
		return 0;
	for (u64 a = lo; a < top;) {
		struct vbuf b[REPORT_RANGES];
		int n = 0;
		for (; n < REPORT_RANGES && a < top; n++, a += MIB2)
			b[n] = (struct vbuf){ a, (u32)MIB2, 1 };
		if (!submit_wait(d, hint_q, b, n))
			return 0;
	}
	if (!send_hint_cmd(d, HINT_STOP))
		return 0;
	gprintf("guest: %s hinted_mib=%lu cmd=%u\n", d->name, g_vparams.balloon_hint_mib, cmd);
	/* The hinted pages stay untouched until the host says DONE. */
	cmd = wait_hint_cmd(d, 0);
	if (cmd != HINT_DONE) {
		gprintf("guest: %s hinting run not ended (cmd=%u)\n", d->name, cmd);
		return 0;
	}
	gprintf("guest: %s hint_done cmd=%u\n", d->name, cmd);
	return 1;
}

int balloon_workload(struct vdev *d)
{
	for (u64 step = 1; step <= g_vparams.balloon_steps; step++) {
		u64 end = vt_deadline(g_vparams.elastic_wait_ms);
		u32 target;
		while ((target = vd_cfg32(d, 0)) == balloon_pages) {
			if (vt_expired(end)) {
				gprintf("guest: %s step=%lu no new target\n", d->name, step);
				return 0;
			}
			balloon_service();
			delay_us(1000);
		}
		vdev_ack_irq(d);
		u64 t0 = rdtsc();
		if (!adjust(d, target))
			return 0;
		steps_done = step;
		gprintf("guest: %s step=%lu target_pages=%u actual_pages=%u free_mib=%lu ms=%lu\n", d->name,
			step, target, vd_cfg32(d, 4), free_bytes() >> 20, vt_ms_since(t0));
	}
	if (g_vparams.balloon_report_mib && !report_free(d))
		return 0;
	if (g_vparams.balloon_hint_mib && !hint_free(d))
		return 0;
	return 1;
}
