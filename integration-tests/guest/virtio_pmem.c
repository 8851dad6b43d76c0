/*
 * virtio-pmem (device id 27), CPL3: the configuration space gives the
 * region's guest-physical start and size (le64 each); the region is mapped
 * (2 MiB pages, below MAX_PD_GIB) and read and written with loads and
 * stores; the one request queue takes FLUSH (a 4-byte type 0, answered by a
 * 4-byte status, 0 = ok).
 *
 * pmem_check=N: FNV-1a of the region's first N bytes, printed as
 *   guest: pmemK start=0x... size=... fnv1a=0x...
 * pmem_write=1: then store "prescient-pmem" at offset 4096 and FLUSH:
 *   guest: pmemK flush ret=0
 */
#include "virtio.h"

static u32 req ALIGNED(64), resp ALIGNED(64);

int pmem_init(struct vdev *d)
{
	return vdev_init(d, 0, 1);
}

int pmem_workload(struct vdev *d)
{
	const struct virtio_params *p = &g_vparams;
	if (!p->pmem_check && !p->pmem_write)
		return 1;
	u64 start = vd_cfg64(d, 0), size = vd_cfg64(d, 8);
	if (!size || (start & ((2ULL << 20) - 1)) || !paging_map_ram_user(start, size)) {
		gprintf("guest: %s region start=0x%lx size=%lu cannot be mapped\n", d->name, start, size);
		return 0;
	}
	u64 n = p->pmem_check < size ? p->pmem_check : size, h = 0xcbf29ce484222325ULL;
	const volatile u8 *r = (const volatile u8 *)start;
	for (u64 i = 0; i < n; i++)
		h = (h ^ r[i]) * 0x100000001b3ULL;
	gprintf("guest: %s start=0x%lx size=%lu fnv1a=0x%016lx\n", d->name, start, size, h);
	if (!p->pmem_write)
		return 1;
	static const char mark[] = "prescient-pmem";
	volatile u8 *w = (volatile u8 *)(start + 4096);
	for (u32 i = 0; i + 1 < sizeof(mark); i++)
		w[i] = (u8)mark[i];
	req = 0;
	resp = 0xffffffff;
	struct vbuf b[2] = { { (u64)&req, 4, 0 }, { (u64)&resp, 4, 1 } };
	struct vq *q = &d->vq[0];
	if (vq_submit(q, b, 2) < 0)
		return 0;
	vq_kick(q);
	u32 len;
	if (vq_wait(q, &len) < 0 || len != 4) {
		gprintf("guest: %s flush no answer\n", d->name);
		return 0;
	}
	gprintf("guest: %s flush ret=%u\n", d->name, resp);
	return resp == 0;
}
