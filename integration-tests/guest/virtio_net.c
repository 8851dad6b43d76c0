/*
 * virtio-net (device id 1), CPL3: receiveq (queue 0) and transmitq (queue
 * 1), no control queue, no offloads, no MRG_RXBUF. Features taken when
 * offered: MAC (and VERSION_1, required). Every buffer is one descriptor
 * holding the 12-byte virtio_net_hdr (VERSION_1 layout, all zero on TX)
 * followed by the Ethernet frame (no FCS).
 *
 * net_rx=N: post up to 40 receive buffers (2 KiB each) on every net device
 * (Firecracker receives nothing until at least 65562 bytes of receive
 * buffers are posted; mmds=1 posts them too);
 * net_tx=N: every net device sends N broadcast frames (ethertype 0x88b5,
 * 60 bytes, payload "PTG", device number, 32-bit big-endian counter);
 * then wait (virtio_timeout_ms since the last frame) until every device has
 * received N frames (of ethertype net_rx_ethertype, if given). Receive
 * queues are serviced while transmitting, so two devices on one network
 * (QEMU hub, bridge) can talk to each other.
 */
#include "virtio.h"

#define VIRTIO_NET_F_MAC        5
#define NET_HDR                 12
#define NET_RXBUFS              40
#define NET_RXBUF_SIZE          2048
#define NET_TXSLOTS             8
#define NET_FRAME               60
#define ETHERTYPE_TEST          0x88b5

static struct netst {
	struct vdev *d;
	u8 mac[6];
	u64 rx_seen, rx_count;
	int tx_free[NET_TXSLOTS], ntx_free, tx_slots;  /* tx_slots = min(8, transmitq size) */
	int rx_head_buf[VQ_MAX_SIZE], tx_head_slot[VQ_MAX_SIZE];
	u8 rx[NET_RXBUFS][NET_RXBUF_SIZE] ALIGNED(64);
	u8 tx[NET_TXSLOTS][128] ALIGNED(64);
} nst[4];
static u32 nnst;

int net_init(struct vdev *d)
{
	if (nnst == sizeof(nst) / sizeof(nst[0]) || !vdev_init(d, 1ULL << VIRTIO_NET_F_MAC, 2))
		return 0;
	struct netst *s = &nst[nnst];
	s->d = d;
	if (vd_has(d, VIRTIO_NET_F_MAC)) {
		for (u32 i = 0; i < 6; i++)
			s->mac[i] = vd_cfg8(d, i);
		gprintf("guest: %s mac=%02x:%02x:%02x:%02x:%02x:%02x\n", d->name, s->mac[0], s->mac[1],
			s->mac[2], s->mac[3], s->mac[4], s->mac[5]);
	} else {
		static const u8 local[6] = { 0x02, 0x50, 0x54, 0x47, 0x00, 0x00 };
		memcpy(s->mac, local, 6);
		s->mac[5] = (u8)nnst;
		gprintf("guest: %s mac=none\n", d->name);
	}
	s->tx_slots = d->vq[1].size < NET_TXSLOTS ? d->vq[1].size : NET_TXSLOTS;
	s->ntx_free = 0;
	for (int i = s->tx_slots - 1; i >= 0; i--)
		s->tx_free[s->ntx_free++] = i;
	nnst++;
	return 1;
}

static int rx_post(struct netst *s, int buf)
{
	struct vbuf b = { (u64)s->rx[buf], NET_RXBUF_SIZE, 1 };
	int h = vq_submit(&s->d->vq[0], &b, 1);
	if (h < 0) {
		gprintf("guest: %s rx queue full\n", s->d->name);
		return 0;
	}
	s->rx_head_buf[h] = buf;
	return 1;
}

/* Take received frames (until N counted), repost their buffers. 0 = error. */
static int rx_service(struct netst *s)
{
	struct vq *q = &s->d->vq[0];
	u64 want = g_vparams.net_rx, type_filter = g_vparams.net_rx_ethertype;
	int any = 0, h = -1;
	u32 len;
	while (s->rx_count < want && (h = vq_poll(q, &len)) >= 0) {
		int buf = s->rx_head_buf[h];
		const u8 *f = s->rx[buf] + NET_HDR;
		u32 flen = len >= NET_HDR ? len - NET_HDR : 0;
		u32 type = flen >= 14 ? (u32)f[12] << 8 | f[13] : 0;
		if (len > NET_RXBUF_SIZE) {
			gprintf("guest: %s rx used len=%u above buffer\n", s->d->name, len);
			return 0;
		}
		gprintf("guest: %s rx frame %lu len=%u ethertype=0x%04x\n", s->d->name, s->rx_seen, flen, type);
		s->rx_seen++;
		if (!type_filter || type == type_filter)
			s->rx_count++;
		if (!rx_post(s, buf))
			return 0;
		any = 1;
	}
	if (h == -2)
		return 0;
	if (any) {
		vq_kick(q);
		vdev_ack_irq(s->d);
	}
	return 1;
}

static int rx_service_all(u32 n)
{
	int ok = 1;
	for (u32 i = 0; i < n; i++)
		if (g_vparams.net_rx)
			ok &= rx_service(&nst[i]);
	return ok;
}

/* Reclaim finished transmissions. Returns how many, or -1 on a device error. */
static int tx_reap(struct netst *s)
{
	int n = 0, h;
	u32 len;
	while ((h = vq_poll(&s->d->vq[1], &len)) >= 0) {
		s->tx_free[s->ntx_free++] = s->tx_head_slot[h];
		n++;
	}
	if (h == -2)
		return -1;
	if (n)
		vdev_ack_irq(s->d);
	return n;
}

/* Wait until a transmit slot is free (all: every slot), servicing every
 * receive queue; bounded by virtio_timeout_ms since the last completion. */
static int tx_wait(struct netst *s, u32 n, int all)
{
	u64 end = vt_deadline(g_vparams.timeout_ms);
	for (;;) {
		int r = tx_reap(s);
		if (r < 0 || !rx_service_all(n))
			return 0;
		if (all ? s->ntx_free == s->tx_slots : s->ntx_free > 0)
			return 1;
		if (r > 0)
			end = vt_deadline(g_vparams.timeout_ms);
		else if (vt_expired(end)) {
			gprintf("guest: %s tx timeout\n", s->d->name);
			return 0;
		}
		cpu_relax();
	}
}

static int net_tx(struct netst *s, u32 n, u64 count)
{
	for (u64 i = 0; i < count; i++) {
		if (!s->ntx_free && !tx_wait(s, n, 0))
			return 0;
		int slot = s->tx_free[--s->ntx_free];
		u8 *p = s->tx[slot], *e = p + NET_HDR;
		memset(p, 0, NET_HDR + NET_FRAME);
		memset(e, 0xff, 6);
		memcpy(e + 6, s->mac, 6);
		e[12] = ETHERTYPE_TEST >> 8;
		e[13] = ETHERTYPE_TEST & 0xff;
		e[14] = 'P';
		e[15] = 'T';
		e[16] = 'G';
		e[17] = (u8)(s - nst);
		e[18] = (u8)(i >> 24);
		e[19] = (u8)(i >> 16);
		e[20] = (u8)(i >> 8);
		e[21] = (u8)i;
		struct vbuf b = { (u64)p, NET_HDR + NET_FRAME, 0 };
		int h = vq_submit(&s->d->vq[1], &b, 1);
		if (h < 0) {
			gprintf("guest: %s tx queue full\n", s->d->name);
			return 0;
		}
		s->tx_head_slot[h] = slot;
		vq_kick(&s->d->vq[1]);
	}
	if (!tx_wait(s, n, 1))
		return 0;
	gprintf("guest: %s tx=%lu ok\n", s->d->name, count);
	return 1;
}

/* ---- single frames, for the MMDS client (net_mmds.c), on device 0 ----- */

int net_mac(u32 dev, u8 mac[6])
{
	if (dev >= nnst)
		return 0;
	memcpy(mac, nst[dev].mac, 6);
	return 1;
}

int net_post_rx(u32 dev)
{
	struct netst *s = &nst[dev];
	u32 bufs = s->d->vq[0].size < NET_RXBUFS ? s->d->vq[0].size : NET_RXBUFS;
	for (u32 b = 0; b < bufs; b++)
		if (!rx_post(s, (int)b))
			return 0;
	vq_kick(&s->d->vq[0]);
	return 1;
}

static u8 big_tx[NET_TXSLOTS][600] ALIGNED(64);  /* net_send: frames up to 588 bytes */

int net_send(u32 dev, const u8 *frame, u32 len)
{
	struct netst *s = &nst[dev];
	if (len > sizeof(big_tx[0]) - NET_HDR)
		return 0;
	if (!s->ntx_free && !tx_wait(s, 0, 0))
		return 0;
	int slot = s->tx_free[--s->ntx_free];
	u8 *p = big_tx[slot];
	memset(p, 0, NET_HDR);
	memcpy(p + NET_HDR, frame, len);
	struct vbuf b = { (u64)p, NET_HDR + len, 0 };
	int h = vq_submit(&s->d->vq[1], &b, 1);
	if (h < 0)
		return 0;
	s->tx_head_slot[h] = slot;
	vq_kick(&s->d->vq[1]);
	return 1;
}

int net_recv(u32 dev, u8 *out, u32 cap, u64 timeout_ms)
{
	struct netst *s = &nst[dev];
	struct vq *q = &s->d->vq[0];
	u64 end = vt_deadline(timeout_ms);
	for (;;) {
		u32 len;
		if (tx_reap(s) < 0)
			return -1;
		int h = vq_poll(q, &len);
		if (h == -2)
			return -1;
		if (h >= 0) {
			int buf = s->rx_head_buf[h];
			u32 flen = len >= NET_HDR ? len - NET_HDR : 0;
			if (flen > cap)
				flen = cap;
			memcpy(out, s->rx[buf] + NET_HDR, flen);
			if (!rx_post(s, buf))
				return -1;
			vq_kick(q);
			vdev_ack_irq(s->d);
			return (int)flen;
		}
		if (vt_expired(end))
			return -1;
		cpu_relax();
	}
}

int net_workload(struct vdev **nets, u32 n)
{
	const struct virtio_params *p = &g_vparams;
	int ok = 1;
	(void)nets;                             /* net_init() filled nst[] in the same order */
	if (p->net_rx)
		for (u32 i = 0; i < n; i++)
			if (!net_post_rx(i))
				return 0;
	if (p->net_tx)
		for (u32 i = 0; i < n; i++)
			if (!net_tx(&nst[i], n, p->net_tx))
				ok = 0;
	if (!p->net_rx)
		return ok;

	u64 end = vt_deadline(p->timeout_ms);
	for (;;) {
		u64 before = 0, after = 0, missing = 0;
		for (u32 i = 0; i < n; i++)
			before += nst[i].rx_seen;
		if (!rx_service_all(n))
			return 0;
		for (u32 i = 0; i < n; i++) {
			after += nst[i].rx_seen;
			missing += nst[i].rx_count < p->net_rx;
		}
		if (!missing)
			break;
		if (after != before)
			end = vt_deadline(p->timeout_ms);
		else if (vt_expired(end))
			break;
		cpu_relax();
	}
	for (u32 i = 0; i < n; i++) {
		struct netst *s = &nst[i];
		if (s->rx_count >= p->net_rx) {
			gprintf("guest: %s rx=%lu ok\n", s->d->name, s->rx_count);
		} else {
			gprintf("guest: %s rx=%lu of %lu timeout\n", s->d->name, s->rx_count, p->net_rx);
			ok = 0;
		}
	}
	return ok;
}
