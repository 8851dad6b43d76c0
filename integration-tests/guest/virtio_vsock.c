/*
 * virtio-vsock (device id 19), CPL3: rx (queue 0), tx (queue 1), event
 * (queue 2, two buffers posted, never expected to be used). One stream
 * connection at a time, stream type only. Every packet is one descriptor:
 * the 44-byte virtio_vsock_hdr followed by the payload. The guest advertises
 * buf_alloc = 64 KiB and honours the host's credit; it answers
 * CREDIT_REQUEST and sends CREDIT_UPDATE after consuming half its buffer.
 *
 * vsock_echo_listen=P: accept one host-initiated connection on port P (an
 * OP_REQUEST to any other port gets OP_RST), echo every byte back until the
 * host shuts down its sending side, then SHUTDOWN and wait for the host's RST
 * (or, if the host shut down both sides, answer with RST).
 * vsock_connect=P vsock_send=N: connect to host port P, send N bytes of a
 * pattern, read N bytes back and verify them, then SHUTDOWN and wait for RST.
 * Waits are bounded by virtio_timeout_ms without progress.
 */
#include "virtio.h"

#define HDR             44
#define RXBUFS          16
#define BUFSZ           4096
#define TXSLOTS         8
#define RING            65536           /* our buf_alloc */
#define HOST_CID        2

#define OP_REQUEST      1
#define OP_RESPONSE     2
#define OP_RST          3
#define OP_SHUTDOWN     4
#define OP_RW           5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUT_RCV        1
#define SHUT_SEND       2

struct __attribute__((packed)) vhdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
};

enum { ST_IDLE, ST_CONNECTING, ST_OPEN };

static struct vsst {
	struct vdev *d;
	u64 cid;
	int rx_head_buf[VQ_MAX_SIZE], tx_head_slot[VQ_MAX_SIZE];
	int tx_free[TXSLOTS], ntx_free, tx_slots;
	int state, closing, got_rst, need_response, credit_req, failed;
	u32 lport, pport, listen;
	u32 peer_buf_alloc, peer_fwd_cnt, tx_cnt, fwd_cnt, last_fwd_sent;
	u32 peer_shut;
	u64 rx_bytes, ring_in, ring_out, sent;
	u8 rx[RXBUFS][BUFSZ] ALIGNED(64);
	u8 tx[TXSLOTS][BUFSZ] ALIGNED(64);
	u8 evt[2][8];
	u8 ring[RING];
} vs;

static u8 pattern(u64 i) { return (u8)(i * 131 + (i >> 9) + 7); }

int vsock_init(struct vdev *d)
{
	if (vs.d) {
		gprintf("guest: %s ignored (one vsock device)\n", d->name);
		return 1;
	}
	if (!vdev_init(d, 0, 3))
		return 0;
	vs.d = d;
	vs.cid = vd_cfg64(d, 0);
	gprintf("guest: %s cid=%lu\n", d->name, vs.cid);
	vs.tx_slots = d->vq[1].size < TXSLOTS ? d->vq[1].size : TXSLOTS;
	for (int i = vs.tx_slots - 1; i >= 0; i--)
		vs.tx_free[vs.ntx_free++] = i;
	u32 n = d->vq[0].size < RXBUFS ? d->vq[0].size : RXBUFS;
	for (u32 i = 0; i < n; i++) {
		struct vbuf b = { (u64)vs.rx[i], BUFSZ, 1 };
		vs.rx_head_buf[vq_submit(&d->vq[0], &b, 1)] = (int)i;
	}
	vq_kick(&d->vq[0]);
	for (u32 i = 0; i < 2; i++) {
		struct vbuf b = { (u64)vs.evt[i], 8, 1 };
		vq_submit(&d->vq[2], &b, 1);
	}
	vq_kick(&d->vq[2]);
	return 1;
}

static void tx_reap(void)
{
	int h;
	u32 len;
	while ((h = vq_poll(&vs.d->vq[1], &len)) >= 0)
		vs.tx_free[vs.ntx_free++] = vs.tx_head_slot[h];
	if (h == -2)
		vs.failed = 1;
}

/* Sends one packet (waiting, bounded, for a transmit slot). 0 = failure. */
static int send_to(u32 src_port, u32 dst_port, u16 op, u32 flags, const u8 *data, u32 len)
{
	u64 end = vt_deadline(g_vparams.timeout_ms);
	for (;;) {
		tx_reap();
		if (vs.failed)
			return 0;
		if (vs.ntx_free)
			break;
		if (vt_expired(end)) {
			gprintf("guest: %s tx timeout\n", vs.d->name);
			return 0;
		}
		cpu_relax();
	}
	int slot = vs.tx_free[--vs.ntx_free];
	struct vhdr *h = (struct vhdr *)vs.tx[slot];
	h->src_cid = vs.cid;
	h->dst_cid = HOST_CID;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = RING;
	h->fwd_cnt = vs.fwd_cnt;
	if (len)
		memcpy(vs.tx[slot] + HDR, data, len);
	struct vbuf b = { (u64)vs.tx[slot], HDR + len, 0 };
	int head = vq_submit(&vs.d->vq[1], &b, 1);
	if (head < 0) {
		gprintf("guest: %s tx queue full\n", vs.d->name);
		return 0;
	}
	vs.tx_head_slot[head] = slot;
	vq_kick(&vs.d->vq[1]);
	vs.last_fwd_sent = vs.fwd_cnt;
	return 1;
}

static int send_pkt(u16 op, u32 flags, const u8 *data, u32 len)
{
	if (op == OP_RW)
		vs.tx_cnt += len;
	return send_to(vs.lport, vs.pport, op, flags, data, len);
}

static u32 peer_credit(void)
{
	u32 in_flight = vs.tx_cnt - vs.peer_fwd_cnt;
	return in_flight >= vs.peer_buf_alloc ? 0 : vs.peer_buf_alloc - in_flight;
}

/* One received packet. 0 = protocol failure (printed). */
static int rx_packet(const u8 *p, u32 used)
{
	const struct vhdr *h = (const struct vhdr *)p;
	if (used < HDR || h->len > used - HDR || h->dst_cid != vs.cid || h->src_cid != HOST_CID) {
		gprintf("guest: %s bad rx packet used=%u len=%u\n", vs.d->name, used, used >= HDR ? h->len : 0);
		return 0;
	}
	const u8 *data = p + HDR;
	int ours = vs.state != ST_IDLE && h->src_port == vs.pport && h->dst_port == vs.lport;
	if (!ours) {
		if (h->op == OP_REQUEST && vs.state == ST_IDLE && vs.listen && h->dst_port == vs.listen) {
			vs.lport = h->dst_port;
			vs.pport = h->src_port;
			vs.state = ST_OPEN;
			vs.peer_buf_alloc = h->buf_alloc;
			vs.peer_fwd_cnt = h->fwd_cnt;
			vs.need_response = 1;
			return 1;
		}
		if (h->op != OP_RST)
			return send_to(h->dst_port, h->src_port, OP_RST, 0, 0, 0);
		return 1;
	}
	vs.peer_buf_alloc = h->buf_alloc;
	vs.peer_fwd_cnt = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (vs.state == ST_CONNECTING)
			vs.state = ST_OPEN;
		break;
	case OP_RW:
		if (vs.listen) {
			if (vs.ring_in - vs.ring_out + h->len > RING) {
				gprintf("guest: %s host overran our credit\n", vs.d->name);
				return 0;
			}
			for (u32 i = 0; i < h->len; i++)
				vs.ring[(vs.ring_in + i) % RING] = data[i];
			vs.ring_in += h->len;
		} else {
			for (u32 i = 0; i < h->len; i++)
				if (data[i] != pattern(vs.rx_bytes + i)) {
					gprintf("guest: %s data mismatch at byte %lu\n", vs.d->name, vs.rx_bytes + i);
					return 0;
				}
			vs.fwd_cnt += h->len;           /* consumed at once */
		}
		vs.rx_bytes += h->len;
		break;
	case OP_CREDIT_REQUEST:
		vs.credit_req = 1;
		break;
	case OP_SHUTDOWN:
		vs.peer_shut |= h->flags;
		break;
	case OP_RST:
		vs.got_rst = 1;
		vs.state = ST_IDLE;
		break;
	default:
		break;
	}
	return 1;
}

/* Takes received packets and reposts their buffers. -1 = failure, else count. */
static int rx_service(void)
{
	struct vq *q = &vs.d->vq[0];
	int n = 0, h;
	u32 len;
	while ((h = vq_poll(q, &len)) >= 0) {
		int buf = vs.rx_head_buf[h];
		if (len > BUFSZ || !rx_packet(vs.rx[buf], len))
			return -1;
		struct vbuf b = { (u64)vs.rx[buf], BUFSZ, 1 };
		vs.rx_head_buf[vq_submit(q, &b, 1)] = buf;
		n++;
	}
	if (h == -2)
		return -1;
	if (n) {
		vq_kick(q);
		vdev_ack_irq(vs.d);
	}
	return n;
}

/* Sends what can go now: the echo ring or the pattern; credit updates. */
static int tx_pump(u64 total)
{
	if (vs.need_response) {
		vs.need_response = 0;
		if (!send_pkt(OP_RESPONSE, 0, 0, 0))
			return -1;
	}
	int n = 0;
	for (;;) {
		tx_reap();
		if (vs.state != ST_OPEN || !vs.ntx_free)
			break;
		u32 chunk = BUFSZ - HDR, credit = peer_credit();
		u64 avail = vs.listen ? vs.ring_in - vs.ring_out : total - vs.sent;
		if (chunk > credit)
			chunk = credit;
		if (chunk > avail)
			chunk = (u32)avail;
		if (!chunk)
			break;
		static u8 tmp[BUFSZ];
		for (u32 i = 0; i < chunk; i++)
			tmp[i] = vs.listen ? vs.ring[(vs.ring_out + i) % RING] : pattern(vs.sent + i);
		if (vs.listen) {
			vs.ring_out += chunk;
			vs.fwd_cnt += chunk;            /* consumed from the ring */
		} else {
			vs.sent += chunk;
		}
		if (!send_pkt(OP_RW, 0, tmp, chunk))
			return -1;
		n++;
	}
	if (vs.state == ST_OPEN && (vs.credit_req || vs.fwd_cnt - vs.last_fwd_sent >= RING / 2)) {
		vs.credit_req = 0;
		if (!send_pkt(OP_CREDIT_UPDATE, 0, 0, 0))
			return -1;
		n++;
	}
	return vs.failed ? -1 : n;
}

int vsock_workload(struct vdev *d)
{
	const struct virtio_params *p = &g_vparams;
	int echo = p->vsock_echo_listen != 0;
	u32 port = (u32)(echo ? p->vsock_echo_listen : p->vsock_connect);
	u64 total = p->vsock_send;
	const char *what = echo ? "echo" : "connect";
	(void)d;
	if (echo) {
		vs.listen = port;
	} else {
		vs.lport = 49152 + (u32)(rdtsc() & 0x3fff);
		vs.pport = port;
		vs.state = ST_CONNECTING;
		if (!send_pkt(OP_REQUEST, 0, 0, 0))
			return 0;
	}
	u64 end = vt_deadline(p->timeout_ms);
	int ok = 0;
	for (;;) {
		int r = rx_service(), t = r < 0 ? -1 : tx_pump(total);
		if (r < 0 || t < 0)
			break;
		if (vs.got_rst) {
			ok = vs.closing;
			if (!ok)
				gprintf("guest: %s %s port=%u reset by the host after %lu bytes\n", vs.d->name,
					what, port, vs.rx_bytes);
			break;
		}
		if (vs.state == ST_OPEN && !vs.closing) {
			int done = echo ? (vs.peer_shut & SHUT_SEND) && vs.ring_out == vs.ring_in
					: vs.sent == total && vs.rx_bytes >= total;
			if (!echo && vs.rx_bytes > total) {
				gprintf("guest: %s got %lu bytes, sent %lu\n", vs.d->name, vs.rx_bytes, total);
				break;
			}
			if (done && vs.peer_shut == (SHUT_RCV | SHUT_SEND)) {
				/* The host closed both ways (Firecracker does on a host-side
				 * close) and everything is echoed: answer with RST, as Linux does. */
				ok = send_pkt(OP_RST, 0, 0, 0);
				break;
			}
			if (done) {
				vs.closing = 1;
				if (!send_pkt(OP_SHUTDOWN, SHUT_RCV | SHUT_SEND, 0, 0))
					break;
			}
		}
		if (r > 0 || t > 0)
			end = vt_deadline(p->timeout_ms);
		else if (vt_expired(end)) {
			gprintf("guest: %s %s port=%u timeout state=%d bytes=%lu\n", vs.d->name, what, port,
				vs.state, vs.rx_bytes);
			break;
		}
		cpu_relax();
	}
	if (ok)
		gprintf("guest: %s %s port=%u bytes=%lu ok\n", vs.d->name, what, port, vs.rx_bytes);
	return ok;
}
