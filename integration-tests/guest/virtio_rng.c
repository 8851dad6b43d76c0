/*
 * virtio-rng / entropy device (device id 4), CPL3, one request queue.
 *
 * rng_bytes=N: ask for N bytes in requests of at most 4 KiB (one
 * device-writable descriptor each; the device may return fewer bytes, we
 * ask again), print "guest: rngK bytes=N ok" and the elapsed time. Fails on
 * a timeout, on a used length above the request, or if every byte of the
 * returned data was zero.
 */
#include "virtio.h"

#define RNG_CHUNK 4096
static u8 rng_buf[RNG_CHUNK] ALIGNED(4096);

int rng_init(struct vdev *d)
{
	return vdev_init(d, 0, 1);
}

int rng_workload(struct vdev *d)
{
	u64 want = g_vparams.rng_bytes, got = 0, nonzero = 0, t0 = rdtsc();
	struct vq *q = &d->vq[0];
	u64 stall = vt_deadline(g_vparams.timeout_ms);  /* empty answers count as no progress */
	if (!want)
		return 1;
	while (got < want) {
		u32 ask = want - got < RNG_CHUNK ? (u32)(want - got) : RNG_CHUNK, len;
		memset(rng_buf, 0, ask);
		struct vbuf b = { (u64)rng_buf, ask, 1 };
		if (vq_submit(q, &b, 1) < 0) {
			gprintf("guest: %s queue full\n", d->name);
			return 0;
		}
		vq_kick(q);
		int h = vq_wait(q, &len);
		if (h == -1)
			gprintf("guest: %s timeout after bytes=%lu\n", d->name, got);
		if (h < 0)
			return 0;
		if (len > ask) {
			gprintf("guest: %s used len=%u above request %u\n", d->name, len, ask);
			return 0;
		}
		for (u32 i = 0; i < len && !nonzero; i++)
			nonzero = rng_buf[i] != 0;
		got += len;
		if (len)
			stall = vt_deadline(g_vparams.timeout_ms);
		else if (vt_expired(stall)) {
			gprintf("guest: %s timeout after bytes=%lu\n", d->name, got);
			return 0;
		}
	}
	u64 ticks = rdtsc() - t0;
	if (!nonzero) {
		gprintf("guest: %s bytes=%lu all zero\n", d->name, got);
		return 0;
	}
	gprintf("guest: %s bytes=%lu ok\n", d->name, got);
	gprintf("guest: %s ms=%lu bytes_per_s=%lu\n", d->name, ticks / vt_ticks_per_ms(),
		ticks ? got * vt_ticks_per_ms() * 1000 / ticks : 0);
	return 1;
}
