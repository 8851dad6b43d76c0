/*
 * virtio-mmio core: command-line devices, probing, feature negotiation,
 * split virtqueues polled at CPL3 (no interrupts: IF stays 0 and no
 * interrupt controller is programmed; InterruptStatus is acknowledged after
 * each completion so the device's line drops), and the stage that runs the
 * drivers' workloads.
 *
 * Devices come from Linux-style `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`
 * entries; virtio_map_user() maps their windows (in stage_setup, before the
 * CR3 reload), virtio_run_user() does the rest from stage_run.
 */
#include "virtio.h"

struct virtio_params g_vparams = {
	.timeout_ms = 10000,
	.hostile_n = 10000,
	.blk_qd = 1,
	.blk_op_kib = 4,
	.net_rx_ethertype = 0,          /* 0: count every frame */
	.elastic_wait_ms = 60000,
	.balloon_report_delay_ms = 2000,
};

static struct vdev devs[VIRTIO_MAX_DEV];

/* ---- command line ---------------------------------------------------- */
int keq(const char *a, size_t n, const char *lit)
{
	size_t m = strlen(lit);
	return n == m && !memcmp(a, lit, n);
}

/* strtoull with base 0 (0x.. hex, 0.. octal, else decimal); *used = chars taken */
static int parse_num(const char *s, size_t n, u64 *out, size_t *used)
{
	size_t i = 0;
	u64 base = 10, v = 0;
	if (n >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	} else if (n >= 2 && s[0] == '0') {
		base = 8;
		i = 1;
	}
	size_t first = i;
	for (; i < n; i++) {
		char c = s[i];
		u64 dgt;
		if (c >= '0' && c <= '9')
			dgt = (u64)(c - '0');
		else if (c >= 'a' && c <= 'f')
			dgt = (u64)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			dgt = (u64)(c - 'A' + 10);
		else
			break;
		if (dgt >= base)
			break;
		v = v * base + dgt;
	}
	if (i == first && base != 8)
		return 0;
	*out = v;
	*used = i;
	return 1;
}


/* <size>[KMG]@<base>:<irq>[:<id>] (Linux: memparse, then "@%lli:%u%n:%d%n") */
static int parse_device(const char *v, size_t n)
{
	u64 size, base, irq, id;
	size_t u, i;
	if (!parse_num(v, n, &size, &u))
		return 2;
	i = u;
	if (i < n && (v[i] == 'K' || v[i] == 'k'))
		size <<= 10, i++;
	else if (i < n && (v[i] == 'M' || v[i] == 'm'))
		size <<= 20, i++;
	else if (i < n && (v[i] == 'G' || v[i] == 'g'))
		size <<= 30, i++;
	if (i >= n || v[i++] != '@' || !parse_num(v + i, n - i, &base, &u))
		return 2;
	i += u;
	if (i >= n || v[i++] != ':' || !parse_num(v + i, n - i, &irq, &u))
		return 2;
	i += u;
	if (i < n && v[i] == ':') {
		i++;
		if (!parse_num(v + i, n - i, &id, &u))
			return 2;
		i += u;
	}
	if (i != n || !size || irq > 0xffffffffULL)
		return 2;
	/* The command line is parsed twice (hello and setup stage): the same
	 * base twice is the same device. */
	for (u32 k = 0; k < g_vparams.nr_dev; k++)
		if (g_vparams.dev[k].base == base)
			return 0;
	if (g_vparams.nr_dev == VIRTIO_MAX_DEV)
		return 2;
	g_vparams.dev[g_vparams.nr_dev].base = base;
	g_vparams.dev[g_vparams.nr_dev].size = size;
	g_vparams.dev[g_vparams.nr_dev].irq = (u32)irq;
	g_vparams.nr_dev++;
	return 0;
}

int virtio_param(const char *k, size_t kn, const char *v, size_t vn)
{
	static const struct { const char *key; u64 *val; } nums[] = {
		{ "virtio_timeout_ms", &g_vparams.timeout_ms },
		{ "blk_rw", &g_vparams.blk_rw },
		{ "blk_read", &g_vparams.blk_read },
		{ "blk_ops", &g_vparams.blk_ops },
		{ "blk_sector", &g_vparams.blk_sector },
		{ "blk_qd", &g_vparams.blk_qd },
		{ "blk_op_kib", &g_vparams.blk_op_kib },
		{ "blk_write", &g_vparams.blk_write },
		{ "blk_int_report", &g_vparams.blk_int_report },
		{ "rng_bytes", &g_vparams.rng_bytes },
		{ "net_tx", &g_vparams.net_tx },
		{ "net_rx", &g_vparams.net_rx },
		{ "vsock_echo_listen", &g_vparams.vsock_echo_listen },
		{ "vsock_connect", &g_vparams.vsock_connect },
		{ "vsock_send", &g_vparams.vsock_send },
		{ "vmem_steps", &g_vparams.vmem_steps },
		{ "elastic_wait_ms", &g_vparams.elastic_wait_ms },
		{ "vmem_follow_ms", &g_vparams.vmem_follow_ms },
		{ "vmem_ramp_mib", &g_vparams.vmem_ramp_mib },
		{ "vmem_ramp_ms", &g_vparams.vmem_ramp_ms },
		{ "vmem_ramp_start_ms", &g_vparams.vmem_ramp_start_ms },
		{ "balloon_steps", &g_vparams.balloon_steps },
		{ "balloon_report_mib", &g_vparams.balloon_report_mib },
		{ "balloon_report_delay_ms", &g_vparams.balloon_report_delay_ms },
		{ "balloon_hint_mib", &g_vparams.balloon_hint_mib },
		{ "blk_crash", &g_vparams.blk_crash },
		{ "blk_hotplug_ms", &g_vparams.blk_hotplug_ms },
		{ "blk_hotplug_dev", &g_vparams.blk_hotplug_dev },
		{ "hostile_n", &g_vparams.hostile_n },
		{ "hold_ms", &g_vparams.hold_ms },
		{ "boot_timer", &g_vparams.boot_timer },
		{ "mmds", &g_vparams.mmds },
		{ "mmds_flood", &g_vparams.mmds_flood },
		{ "pmem_check", &g_vparams.pmem_check },
		{ "pmem_write", &g_vparams.pmem_write },
	};
	if (keq(k, kn, "virtio_mmio.device"))
		return parse_device(v, vn);
	if (keq(k, kn, "virtio")) {
		if (keq(v, vn, "on"))
			g_vparams.off = 0;
		else if (keq(v, vn, "off"))
			g_vparams.off = 1;
		else
			return 2;
		return 0;
	}
	if (keq(k, kn, "hostile")) {
		int m = hostile_mode(v, vn);
		if (m < 0)
			return 2;
		g_vparams.hostile = (u32)m;
		return 0;
	}
	if (keq(k, kn, "net_rx_ethertype")) {
		u64 t;
		size_t u;
		if (vn > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X') && parse_num(v, vn, &t, &u) &&
		    u == vn && t <= 0xffff) {
			g_vparams.net_rx_ethertype = t;
			return 0;
		}
		return 2;
	}
	for (size_t i = 0; i < sizeof(nums) / sizeof(nums[0]); i++)
		if (keq(k, kn, nums[i].key))
			return parse_u64(v, vn, nums[i].val) ? 0 : 2;
	return 1;
}

/* ---- mapping (stage_setup, CPL3) -------------------------------------- */
#define MAP_MAX (64 * 1024)

/* Firecracker's boot timer (--boot-timer): one MMIO page at the start of the 32-bit gap. */
#define BOOT_TIMER_BASE 0xc0000000ULL
#define BOOT_TIMER_DONE 123

void virtio_map_user(void)
{
	if (g_vparams.boot_timer && !paging_map_mmio_user(BOOT_TIMER_BASE, 4096))
		gprintf("guest: boot timer page cannot be mapped\n");
	if (g_vparams.off)
		return;
	for (u32 i = 0; i < g_vparams.nr_dev; i++) {
		u64 sz = g_vparams.dev[i].size < MAP_MAX ? g_vparams.dev[i].size : MAP_MAX;
		devs[i].mapped = paging_map_mmio_user(g_vparams.dev[i].base, sz);
	}
	if (g_vparams.hostile == HOSTILE_MMIO_STORM &&
	    !paging_map_mmio_user(HOSTILE_MMIO_BASE, 4096))
		gprintf("guest: hostile mmio_storm page cannot be mapped\n");
}

/* ---- time -------------------------------------------------------------- */
u64 vt_ticks_per_ms(void) { return g_tsc_khz ? g_tsc_khz : 3000000ULL; }
u64 vt_deadline(u64 ms) { return rdtsc() + ms * vt_ticks_per_ms(); }
int vt_expired(u64 deadline) { return (i64)(rdtsc() - deadline) > 0; }
u64 vt_ms_since(u64 start) { return (rdtsc() - start) / vt_ticks_per_ms(); }

/* ---- config space ------------------------------------------------------ */
u8 vd_cfg8(struct vdev *d, u32 off) { return mmio_r8(d->base + VM_CONFIG + off); }
u32 vd_cfg32(struct vdev *d, u32 off) { return mmio_r32(d->base + VM_CONFIG + off); }
u64 vd_cfg64(struct vdev *d, u32 off)
{
	u32 gen, lo, hi, tries = 0;
	do {
		gen = vd_r(d, VM_CONFIG_GEN);
		lo = vd_cfg32(d, off);
		hi = vd_cfg32(d, off + 4);
	} while (gen != vd_r(d, VM_CONFIG_GEN) && ++tries < 100);
	return ((u64)hi << 32) | lo;
}

/* ---- virtqueues -------------------------------------------------------- */
#define VQ_POOL 24
static u8 vq_mem[VQ_POOL][4096] ALIGNED(4096);     /* desc @0, avail @1024, used @2048 */
static u32 vq_mem_used;

static int vq_setup(struct vdev *d, u16 index)
{
	struct vq *q = &d->vq[index];
	vd_w(d, VM_QUEUE_SEL, index);
	if (vd_r(d, VM_QUEUE_READY)) {
		gprintf("guest: virtio %u queue %u already ready\n", d->index, index);
		return 0;
	}
	u32 max = vd_r(d, VM_QUEUE_NUM_MAX), size = VQ_MAX_SIZE;
	if (!max) {
		gprintf("guest: virtio %u queue %u not available\n", d->index, index);
		return 0;
	}
	while (size > max)
		size >>= 1;
	if (vq_mem_used == VQ_POOL) {
		gprintf("guest: virtio %u out of queue memory\n", d->index);
		return 0;
	}
	u8 *m = vq_mem[vq_mem_used++];
	memset(m, 0, 4096);
	q->dev = d;
	q->index = index;
	q->size = (u16)size;
	q->desc = (struct vring_desc *)m;
	q->avail = (struct vring_avail *)(m + 1024);
	q->used = (struct vring_used *)(m + 2048);
	q->free_head = 0;
	q->num_free = (u16)size;
	q->last_used = q->avail_idx = 0;
	for (u32 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);

	vd_w(d, VM_QUEUE_NUM, size);
	vd_w(d, VM_QUEUE_DESC_LO, (u32)(u64)q->desc);
	vd_w(d, VM_QUEUE_DESC_HI, (u32)((u64)q->desc >> 32));
	vd_w(d, VM_QUEUE_DRV_LO, (u32)(u64)q->avail);
	vd_w(d, VM_QUEUE_DRV_HI, (u32)((u64)q->avail >> 32));
	vd_w(d, VM_QUEUE_DEV_LO, (u32)(u64)q->used);
	vd_w(d, VM_QUEUE_DEV_HI, (u32)((u64)q->used >> 32));
	vd_w(d, VM_QUEUE_READY, 1);
	if (vd_r(d, VM_QUEUE_READY) != 1) {
		gprintf("guest: virtio %u queue %u did not become ready\n", d->index, index);
		return 0;
	}
	return 1;
}

int vdev_init(struct vdev *d, u64 want, u32 nq)
{
	u32 st;
	vd_w(d, VM_STATUS, 0);                          /* reset */
	u64 end = vt_deadline(1000);
	while ((st = vd_r(d, VM_STATUS)) != 0 && !vt_expired(end))
		cpu_relax();
	if (st) {
		gprintf("guest: virtio %u reset timeout status=0x%x\n", d->index, st);
		return 0;
	}
	vd_w(d, VM_STATUS, VS_ACK);
	vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER);

	vd_w(d, VM_DEV_FEAT_SEL, 0);
	u64 offered = vd_r(d, VM_DEV_FEAT);
	vd_w(d, VM_DEV_FEAT_SEL, 1);
	offered |= (u64)vd_r(d, VM_DEV_FEAT) << 32;
	if (!((offered >> VIRTIO_F_VERSION_1) & 1)) {
		gprintf("guest: virtio %u no VERSION_1 feature (offered 0x%lx)\n", d->index, offered);
		vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FAILED);
		return 0;
	}
	d->features = offered & (want | (1ULL << VIRTIO_F_VERSION_1));
	vd_w(d, VM_DRV_FEAT_SEL, 0);
	vd_w(d, VM_DRV_FEAT, (u32)d->features);
	vd_w(d, VM_DRV_FEAT_SEL, 1);
	vd_w(d, VM_DRV_FEAT, (u32)(d->features >> 32));
	vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
	if (!(vd_r(d, VM_STATUS) & VS_FEATURES_OK)) {
		gprintf("guest: virtio %u features 0x%lx not accepted\n", d->index, d->features);
		vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FAILED);
		return 0;
	}
	for (u32 i = 0; i < nq; i++)
		if (!vq_setup(d, (u16)i)) {
			vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_FAILED);
			return 0;
		}
	vd_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
	st = vd_r(d, VM_STATUS);
	if (st & (VS_NEEDS_RESET | VS_FAILED) || !(st & VS_DRIVER_OK)) {
		gprintf("guest: virtio %u status=0x%x after DRIVER_OK\n", d->index, st);
		return 0;
	}
	return 1;
}

void vdev_ack_irq(struct vdev *d)
{
	u32 s = vd_r(d, VM_INT_STATUS);
	d->int_seen |= s;
	if (s)
		vd_w(d, VM_INT_ACK, s);
}

int vq_submit(struct vq *q, const struct vbuf *b, int n)
{
	if (n < 1 || n > q->num_free)
		return -1;
	u16 head = q->free_head, i = head;
	for (int k = 0; k < n; k++) {
		struct vring_desc *dd = &q->desc[i];
		dd->addr = b[k].addr;
		dd->len = b[k].len;
		dd->flags = (u16)((b[k].write ? VRING_DESC_F_WRITE : 0) | (k + 1 < n ? VRING_DESC_F_NEXT : 0));
		i = dd->next;                   /* free list link = chain link */
	}
	q->free_head = i;
	q->num_free = (u16)(q->num_free - n);
	q->avail->ring[q->avail_idx & (q->size - 1)] = head;
	q->avail_idx++;
	__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
	return head;
}

void vq_kick(struct vq *q)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);        /* ring stores before the notify */
	vd_w(q->dev, VM_QUEUE_NOTIFY, q->index);
}

int vq_poll(struct vq *q, u32 *len)
{
	u16 idx = __atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE);
	if (idx == q->last_used)
		return -1;
	struct vring_used_elem e = q->used->ring[q->last_used & (q->size - 1)];
	q->last_used++;
	if (e.id >= q->size || (u16)(idx - q->last_used) >= q->size) {
		gprintf("guest: virtio %u queue %u bad used entry id=%u idx=%u\n",
			q->dev->index, q->index, e.id, idx);
		return -2;
	}
	u16 i = (u16)e.id, n = 1;
	while ((q->desc[i].flags & VRING_DESC_F_NEXT) && n <= q->size) {
		i = q->desc[i].next;
		n++;
	}
	q->desc[i].next = q->free_head;
	q->free_head = (u16)e.id;
	q->num_free = (u16)(q->num_free + n);
	*len = e.len;
	return (int)e.id;
}

int vq_wait(struct vq *q, u32 *len)
{
	u64 end = vt_deadline(g_vparams.timeout_ms);
	for (;;) {
		int r = vq_poll(q, len);
		if (r != -1) {
			vdev_ack_irq(q->dev);
			return r;
		}
		if (vt_expired(end))
			return -1;
		cpu_relax();
	}
}

/* ---- the virtio stage (CPL3, from stage_run) -------------------------- */
#define NET_MAX 4

static int workload_wanted(void)
{
	const struct virtio_params *p = &g_vparams;
	return p->blk_rw || p->blk_read || p->blk_ops || p->rng_bytes || p->net_tx || p->net_rx || p->mmds || p->pmem_check || p->pmem_write ||
	       p->vsock_echo_listen || p->vsock_connect || p->vmem_steps || p->vmem_follow_ms ||
	       p->balloon_steps || p->balloon_report_mib || p->balloon_hint_mib || p->blk_crash ||
	       p->blk_hotplug_ms || p->hostile;
}

static int need(const char *what, u32 have, int wanted)
{
	if (wanted && !have) {
		gprintf("guest: virtio no usable %s device\n", what);
		return 0;
	}
	return 1;
}

/* hold_ms=N: a quiet point (the host snapshots the VM there) announced by a line. */
void virtio_hold(const char *what)
{
	if (!g_vparams.hold_ms)
		return;
	gprintf("guest: %s hold ms=%lu\n", what, g_vparams.hold_ms);
	u64 start = rdtsc(), prev = start;
	while (tsc_forward(&prev) - start < g_vparams.hold_ms * vt_ticks_per_ms())
		cpu_relax();
}

u64 virtio_run_user(u64 unused)
{
	(void)unused;
	const struct virtio_params *p = &g_vparams;
	if (p->boot_timer) {
		__asm__ volatile("movb %0, (%1)" : : "q"((u8)BOOT_TIMER_DONE), "r"(BOOT_TIMER_BASE) : "memory");
		gprintf("guest: boot timer written\n");
	}
	if (p->off || (!p->nr_dev && !workload_wanted()))
		return 1;

	int ok = 1;
	u32 nblk = 0, nnet = 0, nrng = 0, nvsock = 0;
	struct vdev *blks[VIRTIO_MAX_DEV], *nets[NET_MAX], *rngs[VIRTIO_MAX_DEV], *vsock = 0;
	struct vdev *balloon = 0, *vmem = 0, *pmem = 0;
	u32 npmem = 0;

	for (u32 i = 0; i < p->nr_dev; i++) {
		struct vdev *d = &devs[i];
		d->index = i;
		d->base = p->dev[i].base;
		d->size = p->dev[i].size;
		d->irq = p->dev[i].irq;
		if (!d->mapped) {
			gprintf("guest: virtio %u base=0x%lx cannot be mapped\n", i, d->base);
			ok = 0;
			continue;
		}
		u32 magic = vd_r(d, VM_MAGIC);
		if (magic != VIRTIO_MMIO_MAGIC) {
			gprintf("guest: virtio %u base=0x%lx bad magic 0x%x\n", i, d->base, magic);
			ok = 0;
			continue;
		}
		d->version = vd_r(d, VM_VERSION);
		d->id = vd_r(d, VM_DEVICE_ID);
		gprintf("guest: virtio %u id=%u base=0x%lx irq=%u version=%u\n", i, d->id, d->base, d->irq,
			d->version);
		if (d->version != 2) {
			gprintf("guest: virtio %u version=%u not supported (legacy)\n", i, d->version);
			continue;
		}
		if (!d->id)
			continue;               /* empty transport */
		d->usable = 1;
		switch (d->id) {
		case VIRTIO_ID_BLK:
			fmt(d->name, sizeof(d->name), "blk%u", nblk);
			if (blk_init(d))
				blks[nblk++] = d;
			else
				ok = 0;
			break;
		case VIRTIO_ID_NET:
			fmt(d->name, sizeof(d->name), "net%u", nnet);
			if (nnet == NET_MAX) {
				gprintf("guest: %s ignored (max %u)\n", d->name, NET_MAX);
			} else if (net_init(d)) {
				nets[nnet++] = d;
			} else {
				ok = 0;
			}
			break;
		case VIRTIO_ID_RNG:
			fmt(d->name, sizeof(d->name), "rng%u", nrng);
			if (rng_init(d))
				rngs[nrng++] = d;
			else
				ok = 0;
			break;
		case VIRTIO_ID_VSOCK:
			fmt(d->name, sizeof(d->name), "vsock%u", nvsock++);
			if (!vsock_init(d))
				ok = 0;
			else if (!vsock)
				vsock = d;
			break;
		case VIRTIO_ID_BALLOON:
			fmt(d->name, sizeof(d->name), "balloon%u", balloon != 0);
			if (balloon)
				break;
			if (balloon_init(d))
				balloon = d;
			else
				ok = 0;
			break;
		case VIRTIO_ID_MEM:
			fmt(d->name, sizeof(d->name), "vmem%u", vmem != 0);
			if (vmem)
				break;
			if (vmem_init(d))
				vmem = d;
			else
				ok = 0;
			break;
		case VIRTIO_ID_PMEM:
			fmt(d->name, sizeof(d->name), "pmem%u", npmem++);
			if (pmem)
				break;
			if (pmem_init(d))
				pmem = d;
			else
				ok = 0;
			break;
		default:
			break;
		}
	}

	virtio_hold("virtio");
	ok &= need("pmem", pmem != 0, p->pmem_check || p->pmem_write);
	ok &= need("blk", nblk,
		   p->blk_rw || p->blk_read || p->blk_ops || p->blk_crash || p->blk_hotplug_ms);
	if (p->hostile)
		ok &= hostile_run(nblk ? blks[0] : 0, vmem);
	ok &= need("rng", nrng, p->rng_bytes != 0);
	ok &= need("net", nnet, p->net_tx || p->net_rx || p->mmds);
	ok &= need("vsock", vsock != 0, p->vsock_echo_listen || p->vsock_connect);
	ok &= need("balloon", balloon != 0,
		   p->balloon_steps || p->balloon_report_mib || p->balloon_hint_mib);
	ok &= need("virtio-mem", vmem != 0, p->vmem_steps || p->vmem_follow_ms);
	if (p->blk_hotplug_ms)
		ok &= blk_hotplug(blks, nblk);
	else
		for (u32 i = 0; i < nblk; i++)
			ok &= blk_workload(blks[i]);
	for (u32 i = 0; i < nrng; i++)
		ok &= rng_workload(rngs[i]);
	if (pmem)
		ok &= pmem_workload(pmem);
	if (nnet && p->mmds)
		ok &= mmds_workload();
	if (nnet)
		ok &= net_workload(nets, nnet);
	if (vsock && (p->vsock_echo_listen || p->vsock_connect))
		ok &= vsock_workload(vsock);
	if (balloon)
		ok &= balloon_workload(balloon);
	if (vmem)
		ok &= vmem_workload(vmem);
	return (u64)ok;
}
