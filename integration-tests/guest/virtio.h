/*
 * virtio-mmio (modern, version 2) core shared by the drivers in
 * virtio_blk.c, virtio_net.c and virtio_rng.c. Everything here runs at CPL3:
 * the MMIO windows are mapped U/S=1 and uncached by virtio_map_user().
 *
 * Register accesses are 32-bit (movl) except device config space, which
 * uses the field's width (8-bit for net's MAC, 32-bit for blk's fields,
 * two 32-bit halves under ConfigGeneration for the 64-bit capacity), like
 * Linux's virtio_mmio driver.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "guest.h"

/* ---- virtio-mmio registers (virtio 1.x, 4.2.2) ------------------------ */
#define VM_MAGIC            0x000       /* "virt" */
#define VM_VERSION          0x004
#define VM_DEVICE_ID        0x008
#define VM_VENDOR_ID        0x00c
#define VM_DEV_FEAT         0x010
#define VM_DEV_FEAT_SEL     0x014
#define VM_DRV_FEAT         0x020
#define VM_DRV_FEAT_SEL     0x024
#define VM_QUEUE_SEL        0x030
#define VM_QUEUE_NUM_MAX    0x034
#define VM_QUEUE_NUM        0x038
#define VM_QUEUE_READY      0x044
#define VM_QUEUE_NOTIFY     0x050
#define VM_INT_STATUS       0x060
#define VM_INT_ACK          0x064
#define VM_STATUS           0x070
#define VM_QUEUE_DESC_LO    0x080
#define VM_QUEUE_DESC_HI    0x084
#define VM_QUEUE_DRV_LO     0x090
#define VM_QUEUE_DRV_HI     0x094
#define VM_QUEUE_DEV_LO     0x0a0
#define VM_QUEUE_DEV_HI     0x0a4
#define VM_CONFIG_GEN       0x0fc
#define VM_CONFIG           0x100

#define VIRTIO_MMIO_MAGIC   0x74726976

/* device status */
#define VS_ACK              1
#define VS_DRIVER           2
#define VS_DRIVER_OK        4
#define VS_FEATURES_OK      8
#define VS_NEEDS_RESET      64
#define VS_FAILED           128

#define VIRTIO_F_VERSION_1  32

/* device ids */
#define VIRTIO_ID_NET       1
#define VIRTIO_ID_BLK       2
#define VIRTIO_ID_RNG       4
#define VIRTIO_ID_BALLOON   5
#define VIRTIO_ID_VSOCK     19
#define VIRTIO_ID_MEM       24
#define VIRTIO_ID_PMEM      27

/* ---- split virtqueue ------------------------------------------------- */
#define VQ_MAX_SIZE         64          /* QueueNum = largest power of 2 <= min(QueueNumMax, 64) */
#define VRING_DESC_F_NEXT   1
#define VRING_DESC_F_WRITE  2

struct vring_desc { u64 addr; u32 len; u16 flags, next; };
struct vring_avail { u16 flags, idx, ring[VQ_MAX_SIZE]; u16 used_event; };
struct vring_used_elem { u32 id, len; };
struct vring_used { u16 flags, idx; struct vring_used_elem ring[VQ_MAX_SIZE]; u16 avail_event; };

struct vdev;
struct vq {
	struct vdev *dev;
	u16 index, size;
	u16 free_head, num_free;
	u16 last_used, avail_idx;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
};

#define VDEV_MAX_VQ 4
struct vdev {
	u32 index;                      /* position on the command line */
	u64 base, size;
	u32 irq, version, id;
	int mapped, usable;             /* usable: magic ok, version 2, id != 0 */
	u64 features;                   /* negotiated */
	u32 int_seen;                   /* InterruptStatus bits acked so far */
	struct vq vq[VDEV_MAX_VQ];
	char name[12];                  /* "blk0", "net1", ... */
};

struct vbuf { u64 addr; u32 len; int write; };

static inline u32 mmio_r32(u64 a)
{
	u32 v;
	__asm__ volatile("movl (%1), %0" : "=r"(v) : "r"(a) : "memory");
	return v;
}
static inline void mmio_w32(u64 a, u32 v) { __asm__ volatile("movl %0, (%1)" : : "r"(v), "r"(a) : "memory"); }
static inline u8 mmio_r8(u64 a)
{
	u8 v;
	__asm__ volatile("movb (%1), %0" : "=q"(v) : "r"(a) : "memory");
	return v;
}

static inline u32 vd_r(struct vdev *d, u32 off) { return mmio_r32(d->base + off); }
static inline void vd_w(struct vdev *d, u32 off, u32 v) { mmio_w32(d->base + off, v); }
static inline int vd_has(struct vdev *d, int bit) { return (d->features >> bit) & 1; }
u8 vd_cfg8(struct vdev *d, u32 off);
u32 vd_cfg32(struct vdev *d, u32 off);
u64 vd_cfg64(struct vdev *d, u32 off);
static inline void vd_wcfg32(struct vdev *d, u32 off, u32 v) { mmio_w32(d->base + VM_CONFIG + off, v); }

/* Reset, negotiate VERSION_1 + (offered & want), set up nq queues, DRIVER_OK.
 * Prints a line and returns 0 on any failure. */
int vdev_init(struct vdev *d, u64 want, u32 nq);
void vdev_ack_irq(struct vdev *d);      /* InterruptStatus -> InterruptACK */

int vq_submit(struct vq *q, const struct vbuf *b, int n);      /* head, or -1: no room */
void vq_kick(struct vq *q);
int vq_poll(struct vq *q, u32 *len);    /* head, -1: nothing yet, -2: device bug (printed) */
int vq_wait(struct vq *q, u32 *len);    /* bounded by virtio_timeout_ms: head, -1 timeout, -2 bug */

/* time (TSC; 3 GHz assumed when calibration failed) */
u64 vt_ticks_per_ms(void);
u64 vt_deadline(u64 ms);
int vt_expired(u64 deadline);
u64 vt_ms_since(u64 start);

/* drivers: *_init prints the device line(s), returns 1 if usable */
void virtio_hold(const char *what);    /* hold_ms: announce, then spin that long */
int blk_init(struct vdev *d);
int blk_workload(struct vdev *d);       /* 1 = ok */
int blk_hotplug(struct vdev **blks, u32 n); /* blk_hotplug_ms; 1 = ok */
int pmem_init(struct vdev *d);
int pmem_workload(struct vdev *d);       /* pmem_check=, pmem_write= */
int rng_init(struct vdev *d);
int rng_workload(struct vdev *d);
int net_init(struct vdev *d);           /* at most NET_MAX devices */
int net_workload(struct vdev **nets, u32 n);  /* all net devices together */
int net_mac(u32 dev, u8 mac[6]);
int net_post_rx(u32 dev);                /* post every receive buffer */
int net_send(u32 dev, const u8 *frame, u32 len);          /* one Ethernet frame */
int net_recv(u32 dev, u8 *out, u32 cap, u64 timeout_ms);  /* its length, -1: none in time */
int mmds_workload(void);                 /* net_mmds.c: mmds=1 on net device 0 */
int vsock_init(struct vdev *d);         /* the first vsock device is driven */
int vsock_workload(struct vdev *d);     /* 1 = ok */
int balloon_init(struct vdev *d);       /* the first balloon is driven */
int balloon_workload(struct vdev *d);   /* 1 = ok */
int vmem_init(struct vdev *d);          /* the first virtio-mem device is driven */
int vmem_workload(struct vdev *d);      /* 1 = ok */
/* virtio-mem requests, answers, block states and config fields, for hostile.c's plug storm. */
enum { VMEM_PLUG, VMEM_UNPLUG, VMEM_UNPLUG_ALL, VMEM_STATE };
enum { VMEM_ACK, VMEM_NACK, VMEM_BUSY, VMEM_ERROR };
enum { VMEM_PLUGGED, VMEM_UNPLUGGED, VMEM_MIXED };
#define VMEM_CFG_USABLE    32
#define VMEM_CFG_PLUGGED   40
#define VMEM_CFG_REQUESTED 48
#define VMEM_MAX_BLOCKS (64 * 1024)
/* The region of the device vmem_init accepted. */
struct vmem_geometry { u64 base, block, nblocks; };
extern struct vmem_geometry g_vmem;
/* One request of `type` for n blocks at guest address `addr` (anything, however wrong); the
 * response type, or -1 if the device did not answer. *state gets a STATE answer's state. */
int vmem_request_at(struct vdev *d, u16 type, u64 addr, u16 n, u16 *state);
/* What virtio-mem adds to the guest's memory, for the balloon's statistics (bytes). */
extern u64 g_vmem_plugged_bytes, g_vmem_used_bytes;
extern int g_vmem_following;
void balloon_service(void);             /* answer a pending statistics request, if any */
int blk_hostile(struct vdev *d, u32 mode);      /* hostile.c's blk modes, 1 = device survived */
int blk_crash(struct vdev *d, u64 n);   /* blk_crash=N, 1 = ok */
/* hostile=: the mode, then "hostile <mode> done" */
int hostile_run(struct vdev *first_blk, struct vdev *first_vmem);
int hostile_mode(const char *v, size_t vn);
int keq(const char *a, size_t n, const char *lit);      /* a[0..n) == lit */     /* HOSTILE_* of a mode name, -1 unknown */

#endif
