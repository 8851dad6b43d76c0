/*
 * virtio-blk (device id 2), CPL3, one request queue (queue 0).
 *
 * Features taken when offered: SIZE_MAX, SEG_MAX, RO, BLK_SIZE, FLUSH (and
 * VERSION_1, required). Every request is header (16 bytes, driver->device)
 * + at most one data descriptor + status byte (device->driver): 2 or 3
 * descriptors, so SEG_MAX >= 1 is all we need; the data descriptor never
 * exceeds SIZE_MAX (or 64 KiB). Sectors are 512 bytes whatever BLK_SIZE says.
 *
 * Workloads (each blk device, in order): blk_rw, blk_read, blk_ops; see
 * README.md for the parameters and output lines. With blk_hotplug_ms they
 * run on one drive, once it is plugged (blk_hotplug).
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX   1
#define VIRTIO_BLK_F_SEG_MAX    2
#define VIRTIO_BLK_F_RO         5
#define VIRTIO_BLK_F_BLK_SIZE   6
#define VIRTIO_BLK_F_FLUSH      9

#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4
#define T_GET_ID        8
#define S_OK            0
#define ID_BYTES        20

#define BLK_BUF         (64 * 1024)
#define BLK_QD_MAX      16

struct blk_req { u32 type, reserved; u64 sector; };
static struct blk_slot { struct blk_req hdr; volatile u8 status; } slots[BLK_QD_MAX] ALIGNED(32);
static u8 blk_buf[BLK_BUF] ALIGNED(4096);
static int head_slot[VQ_MAX_SIZE];

static struct blkinfo {
	u64 capacity;                   /* 512-byte sectors */
	u32 size_max, seg_max, blk_size, max_bytes;
} binfo[VIRTIO_MAX_DEV];

static const char *op_name(u32 t)
{
	switch (t) {
	case T_IN: return "read";
	case T_OUT: return "write";
	case T_FLUSH: return "flush";
	case T_GET_ID: return "get_id";
	default: return "?";
	}
}

static int blk_submit(struct vdev *d, int slot, u32 type, u64 sector, void *buf, u32 len)
{
	struct blk_slot *s = &slots[slot];
	struct vbuf b[3];
	int n = 0;
	s->hdr.type = type;
	s->hdr.reserved = 0;
	s->hdr.sector = sector;
	s->status = 0xff;                       /* a device that never writes it: status=255 */
	b[n++] = (struct vbuf){ (u64)&s->hdr, sizeof(s->hdr), 0 };
	if (len)
		b[n++] = (struct vbuf){ (u64)buf, len, type == T_IN || type == T_GET_ID };
	b[n++] = (struct vbuf){ (u64)&s->status, 1, 1 };
	int h = vq_submit(&d->vq[0], b, n);
	if (h >= 0)
		head_slot[h] = slot;
	return h;
}

/* One request, waited for. Returns the virtio status (printed unless 0 or
 * quiet), or -1 after a timeout/device error (printed). */
static int blk_sync(struct vdev *d, u32 type, u64 sector, void *buf, u32 len, int quiet)
{
	u32 ulen;
	if (blk_submit(d, 0, type, sector, buf, len) < 0) {
		gprintf("guest: %s queue full op=%s\n", d->name, op_name(type));
		return -1;
	}
	vq_kick(&d->vq[0]);
	int h = vq_wait(&d->vq[0], &ulen);
	if (h == -1)
		gprintf("guest: %s timeout op=%s\n", d->name, op_name(type));
	if (h < 0)
		return -1;
	int st = slots[0].status;
	if (st != S_OK && !quiet)
		gprintf("guest: %s status=%d op=%s\n", d->name, st, op_name(type));
	return st;
}

int blk_init(struct vdev *d)
{
	struct blkinfo *b = &binfo[d->index];
	u64 want = (1ULL << VIRTIO_BLK_F_SIZE_MAX) | (1ULL << VIRTIO_BLK_F_SEG_MAX) |
		   (1ULL << VIRTIO_BLK_F_RO) | (1ULL << VIRTIO_BLK_F_BLK_SIZE) | (1ULL << VIRTIO_BLK_F_FLUSH);
	if (!vdev_init(d, want, 1))
		return 0;
	b->capacity = vd_cfg64(d, 0);
	b->size_max = vd_has(d, VIRTIO_BLK_F_SIZE_MAX) ? vd_cfg32(d, 8) : 0;
	b->seg_max = vd_has(d, VIRTIO_BLK_F_SEG_MAX) ? vd_cfg32(d, 12) : 0;
	b->blk_size = vd_has(d, VIRTIO_BLK_F_BLK_SIZE) ? vd_cfg32(d, 20) : 512;
	b->max_bytes = BLK_BUF;
	if (b->size_max && b->size_max < b->max_bytes)
		b->max_bytes = b->size_max < 512 ? 512 : b->size_max & ~511u;

	char id[ID_BYTES + 1];
	u32 n = 0;
	memset(blk_buf, 0, ID_BYTES);
	if (blk_sync(d, T_GET_ID, 0, blk_buf, ID_BYTES, 1) == S_OK)
		for (; n < ID_BYTES && blk_buf[n]; n++)
			id[n] = blk_buf[n] > ' ' && blk_buf[n] < 0x7f ? (char)blk_buf[n] : '_';
	if (!n)
		id[n++] = '-';
	id[n] = 0;
	gprintf("guest: %s capacity=%lu id=%s ro=%d\n", d->name, b->capacity, id,
		vd_has(d, VIRTIO_BLK_F_RO));
	gprintf("guest: %s blk_size=%u size_max=%u seg_max=%u flush=%d\n", d->name, b->blk_size,
		b->size_max, b->seg_max, vd_has(d, VIRTIO_BLK_F_FLUSH));
	return 1;
}

/* ---- blk_rw: pattern write, flush, read back --------------------------- */
static u64 pattern(u64 seed, u64 sector, u64 word)
{
	u64 x = seed ^ (sector * 0x9e3779b97f4a7c15ULL) ^ (word << 40) ^ word;
	x ^= x >> 29;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 32;
	return x;
}

/* op: T_OUT writes the pattern, T_IN reads and checks it (check) or hashes
 * it (*fnv). Returns 1 if everything went well. */
static int blk_span(struct vdev *d, u32 op, u64 first, u64 count, u64 seed, int check, u64 *fnv)
{
	struct blkinfo *b = &binfo[d->index];
	u64 per = b->max_bytes / 512;
	for (u64 s = first; s < first + count; s += per) {
		u64 n = first + count - s < per ? first + count - s : per;
		u64 *w = (u64 *)blk_buf;
		if (op == T_OUT)
			for (u64 i = 0; i < n * 64; i++)
				w[i] = pattern(seed, s + i / 64, i % 64);
		else
			memset(blk_buf, 0, n * 512);
		if (blk_sync(d, op, s, blk_buf, (u32)(n * 512), 0) != S_OK)
			return 0;
		if (op == T_IN && check) {
			for (u64 i = 0; i < n * 64; i++)
				if (w[i] != pattern(seed, s + i / 64, i % 64)) {
					gprintf("guest: %s rw mismatch sector=%lu\n", d->name, s + i / 64);
					return 0;
				}
		} else if (op == T_IN && fnv) {
			for (u64 i = 0; i < n * 512; i++)
				*fnv = (*fnv ^ blk_buf[i]) * 0x100000001b3ULL;
		}
	}
	return 1;
}

static int in_range(struct vdev *d, const char *what, u64 n)
{
	u64 cap = binfo[d->index].capacity, s = g_vparams.blk_sector;
	if (s > cap || n > cap - s) {
		gprintf("guest: %s %s sectors=%lu at %lu beyond capacity=%lu\n", d->name, what, n, s, cap);
		return 0;
	}
	return 1;
}

static int blk_rw(struct vdev *d, u64 n)
{
	u64 seed = rdtsc() | 1, s = g_vparams.blk_sector;
	if (!in_range(d, "rw", n) || !blk_span(d, T_OUT, s, n, seed, 0, 0))
		return 0;
	if (vd_has(d, VIRTIO_BLK_F_FLUSH)) {
		if (blk_sync(d, T_FLUSH, 0, 0, 0, 0) != S_OK)
			return 0;
		gprintf("guest: %s flush ok\n", d->name);
	} else {
		gprintf("guest: %s flush unsupported\n", d->name);
	}
	virtio_hold(d->name);
	if (!blk_span(d, T_IN, s, n, seed, 1, 0))
		return 0;
	gprintf("guest: %s rw sectors=%lu ok\n", d->name, n);
	return 1;
}

static int blk_read(struct vdev *d, u64 n)
{
	u64 fnv = 0xcbf29ce484222325ULL;
	if (!in_range(d, "read", n) || !blk_span(d, T_IN, g_vparams.blk_sector, n, 0, 0, &fnv))
		return 0;
	gprintf("guest: %s read sectors=%lu ok fnv1a=0x%016lx\n", d->name, n, fnv);
	return 1;
}

/* ---- blk_ops: N reads (or writes) of blk_op_kib, blk_qd in flight, timed - */
static int blk_ops(struct vdev *d, u64 n)
{
	struct vq *q = &d->vq[0];
	u64 kib = g_vparams.blk_op_kib, qd = g_vparams.blk_qd;
	if (kib < 4 || kib > BLK_BUF / 1024 || (kib & (kib - 1))) {
		gprintf("guest: %s ops: blk_op_kib=%lu is not a power of two in 4..64\n", d->name, kib);
		return 0;
	}
	u32 bytes = (u32)(kib * 1024), type = g_vparams.blk_write ? T_OUT : T_IN;
	u64 blocks = binfo[d->index].capacity / (bytes / 512);
	if (!blocks) {
		gprintf("guest: %s ops: capacity below %u bytes\n", d->name, bytes);
		return 0;
	}
	if (binfo[d->index].max_bytes < bytes) {
		gprintf("guest: %s ops: size_max below %u bytes\n", d->name, bytes);
		return 0;
	}
	if (qd < 1)
		qd = 1;
	if (qd > BLK_QD_MAX)
		qd = BLK_QD_MAX;
	if (qd > (u64)q->size / 3)
		qd = q->size / 3 ? q->size / 3 : 1;
	if (qd > BLK_BUF / bytes)               /* each request in flight has its own buffer */
		qd = BLK_BUF / bytes;

	int free_slots[BLK_QD_MAX], nfree = 0;
	for (int i = (int)qd - 1; i >= 0; i--)
		free_slots[nfree++] = i;
	u64 issued = 0, done = 0, t0 = rdtsc();
	while (done < n) {
		int sub = 0;
		while (nfree && issued < n) {
			int slot = free_slots[--nfree];
			u64 sector = (issued % blocks) * (bytes / 512);
			if (blk_submit(d, slot, type, sector, blk_buf + (u64)slot * bytes, bytes) < 0) {
				gprintf("guest: %s queue full op=%s\n", d->name, op_name(type));
				return 0;
			}
			issued++;
			sub = 1;
		}
		if (sub)
			vq_kick(q);
		u32 ulen;
		int h = vq_wait(q, &ulen);      /* at least one request is in flight */
		if (h == -1) {
			gprintf("guest: %s timeout op=%s\n", d->name, op_name(type));
			return 0;
		}
		while (h >= 0) {
			int slot = head_slot[h];
			if (slots[slot].status != S_OK) {
				gprintf("guest: %s status=%d op=%s\n", d->name, slots[slot].status, op_name(type));
				return 0;
			}
			free_slots[nfree++] = slot;
			done++;
			h = vq_poll(q, &ulen);
		}
		if (h == -2)
			return 0;
	}
	u64 ticks = rdtsc() - t0;
	u64 ms = ticks / vt_ticks_per_ms();
	u64 rate = ticks ? n * vt_ticks_per_ms() * 1000 / ticks : 0;
	gprintf("guest: %s ops=%lu qd=%lu ms=%lu ops_per_s=%lu kib=%lu op=%s kib_per_s=%lu\n",
		d->name, n, qd, ms, rate, kib, op_name(type), rate * kib);
	return 1;
}

/* ---- blk_crash: acked write + FLUSH rounds, for crash-consistency tests ---- */
/* Round k writes sector blk_sector + k % 64 with every u64 = CRASH_WORD(k, sector),
 * FLUSHes, then prints "crash ack k=<k> sector=<s>": an acked round is on stable
 * storage, whatever happens to the VMM afterwards. */
#define CRASH_WORD(k, s) (0x5052000000000000ULL | ((u64)(k) << 20) | (u64)(s))

int blk_crash(struct vdev *d, u64 n)
{
	if (!vd_has(d, VIRTIO_BLK_F_FLUSH)) {
		gprintf("guest: %s crash: flush unsupported\n", d->name);
		return 0;
	}
	if (!in_range(d, "crash", 64))
		return 0;
	u64 *w = (u64 *)blk_buf;
	for (u64 k = 0; k < n; k++) {
		u64 sector = g_vparams.blk_sector + k % 64;
		for (int i = 0; i < 64; i++)
			w[i] = CRASH_WORD(k, sector);
		if (blk_sync(d, T_OUT, sector, blk_buf, 512, 0) != S_OK ||
		    blk_sync(d, T_FLUSH, 0, 0, 0, 0) != S_OK)
			return 0;
		gprintf("guest: %s crash ack k=%lu sector=%lu\n", d->name, k, sector);
	}
	return 1;
}

/* ---- hostile=: requests a buggy or malicious driver sends ------------- */
/* Bounded wait for the device to move used.idx, without consuming the entry. */
static int used_moved(struct vq *q, u64 ms)
{
	u64 end = vt_deadline(ms);
	while (__atomic_load_n(&q->used->idx, __ATOMIC_ACQUIRE) == q->last_used)
		if (vt_expired(end))
			return 0;
	return 1;
}

/* The device's answer to a request whose chain was broken after vq_submit:
 * its used entry (consumed), or -1 if it returned nothing within 1 s. The
 * broken descriptors stay off the free list: the queue just has fewer. */
static int broken_answer(struct vdev *d, u32 *id)
{
	struct vq *q = &d->vq[0];
	int moved = used_moved(q, 1000);
	if (moved) {
		*id = q->used->ring[q->last_used & (q->size - 1)].id;
		q->last_used++;
		vdev_ack_irq(d);
	}
	return moved ? 0 : -1;
}

int blk_hostile(struct vdev *d, u32 mode)
{
	struct vq *q = &d->vq[0];
	u32 id = ~0u;
	int r;
	switch (mode) {
	case HOSTILE_DESC_LOOP: {
		/* header -> data -> status -> header ...: a chain that never ends */
		int h = blk_submit(d, 0, T_IN, 0, blk_buf, 512);
		u16 last = q->desc[q->desc[h].next].next;
		q->desc[last].flags |= VRING_DESC_F_NEXT;
		q->desc[last].next = (u16)h;
		vq_kick(q);
		r = broken_answer(d, &id);
		gprintf("guest: %s hostile desc_loop answered=%d id=%u status=%u\n", d->name, r == 0,
			id, slots[0].status);
		return 1;
	}
	case HOSTILE_OOB_ADDR: {
		/* data beyond RAM, then a status byte beyond RAM */
		int st = blk_sync(d, T_IN, 0, (void *)(1ULL << 40), 4096, 1);
		gprintf("guest: %s hostile oob_addr data status=%d\n", d->name, st);
		int h = blk_submit(d, 0, T_IN, 0, blk_buf, 512);
		q->desc[q->desc[q->desc[h].next].next].addr = 1ULL << 40;
		vq_kick(q);
		r = broken_answer(d, &id);
		gprintf("guest: %s hostile oob_addr status answered=%d id=%u\n", d->name, r == 0, id);
		return st >= 0;
	}
	case HOSTILE_BAD_QUEUE: {
		/* a head past the table */
		q->avail->ring[q->avail_idx & (q->size - 1)] = (u16)(q->size + 5);
		q->avail_idx++;
		__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
		vq_kick(q);
		r = broken_answer(d, &id);
		gprintf("guest: %s hostile bad_queue head answered=%d id=%u\n", d->name, r == 0, id);
		/* an available index a ring and more ahead, then the right one again */
		__atomic_store_n(&q->avail->idx, (u16)(q->avail_idx + 3 * q->size), __ATOMIC_RELEASE);
		vq_kick(q);
		r = used_moved(q, 200);
		__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
		gprintf("guest: %s hostile bad_queue idx answered=%d\n", d->name, r);
		/* queue registers after DRIVER_OK, a queue that does not exist */
		vd_w(d, VM_QUEUE_SEL, 9);
		vd_w(d, VM_QUEUE_NUM, 4096);
		vd_w(d, VM_QUEUE_READY, 1);
		vd_w(d, VM_QUEUE_SEL, 0);
		vd_w(d, VM_QUEUE_NUM, 3);
		vd_w(d, VM_QUEUE_NOTIFY, 77);
		return 1;
	}
	default:
		return 1;
	}
}

int blk_workload(struct vdev *d)
{
	const struct virtio_params *p = &g_vparams;
	if (p->blk_crash && !blk_crash(d, p->blk_crash))
		return 0;
	if (p->blk_rw && !blk_rw(d, p->blk_rw))
		return 0;
	if (p->blk_read && !blk_read(d, p->blk_read))
		return 0;
	if (p->blk_ops && !blk_ops(d, p->blk_ops))
		return 0;
	if (p->blk_int_report)
		gprintf("guest: %s int_status_seen=0x%x\n", d->name, d->int_seen);
	return 1;
}

/* ---- blk_hotplug_ms: a drive plugged while the guest runs -------------
 * Firecracker, and Kata Containers on it, plug a disk into a running VM by
 * pointing an empty placeholder drive at the disk's file (PATCH /drives/{id}):
 * the device's capacity changes and it raises a configuration change
 * interrupt. Drive blk<blk_hotplug_dev> is watched (its capacity read once a
 * millisecond, up to blk_hotplug_ms; the host may have plugged it before the
 * driver started); once it has a capacity, the blk workloads run on it alone. */
int blk_hotplug(struct vdev **blks, u32 n)
{
	if (g_vparams.blk_hotplug_dev >= n) {
		gprintf("guest: blk hotplug no blk%lu\n", g_vparams.blk_hotplug_dev);
		return 0;
	}
	struct vdev *d = blks[g_vparams.blk_hotplug_dev];
	gprintf("guest: %s hotplug wait ms=%lu\n", d->name, g_vparams.blk_hotplug_ms);
	u64 start = rdtsc(), end = vt_deadline(g_vparams.blk_hotplug_ms), cap;
	while (!(cap = vd_cfg64(d, 0))) {
		if (vt_expired(end)) {
			gprintf("guest: %s hotplug timeout\n", d->name);
			return 0;
		}
		u64 next = vt_deadline(1);
		while (!vt_expired(next))
			cpu_relax();
	}
	u32 irq = vd_r(d, VM_INT_STATUS);
	if (irq)
		vd_w(d, VM_INT_ACK, irq);
	binfo[d->index].capacity = cap;
	gprintf("guest: %s hotplug capacity=%lu config_irq=%d ms=%lu\n", d->name, cap,
		(irq & 2) != 0, vt_ms_since(start));
	return blk_workload(d);
}
