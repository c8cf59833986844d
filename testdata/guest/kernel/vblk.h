/* The virtio-blk driver (vblk.c) and its hostile modes (vblk_hostile.c). */
#ifndef VBLK_H
#define VBLK_H

#include "kernel.h"

#define VBLK_MAX 8
#define VBLK_QSIZE 8 /* descriptors in the one request queue */
#define VBLK_SECTOR 512UL

/* virtio-mmio registers (virtio 1.2, 4.2.2). */
#define VIO_MAGIC 0x000
#define VIO_VERSION 0x004
#define VIO_DEVICE_ID 0x008
#define VIO_DEV_FEATURES 0x010
#define VIO_DEV_FEATURES_SEL 0x014
#define VIO_DRV_FEATURES 0x020
#define VIO_DRV_FEATURES_SEL 0x024
#define VIO_QUEUE_SEL 0x030
#define VIO_QUEUE_NUM_MAX 0x034
#define VIO_QUEUE_NUM 0x038
#define VIO_QUEUE_READY 0x044
#define VIO_QUEUE_NOTIFY 0x050
#define VIO_INT_STATUS 0x060
#define VIO_INT_ACK 0x064
#define VIO_STATUS 0x070
#define VIO_QUEUE_DESC 0x080
#define VIO_QUEUE_DRIVER 0x090
#define VIO_QUEUE_DEVICE 0x0a0
#define VIO_CONFIG_GEN 0x0fc
#define VIO_CONFIG 0x100

/* Device status bits. */
#define VS_ACK 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 64
#define VS_FAILED 128

/* Descriptor flags. */
#define VD_NEXT 1
#define VD_WRITE 2
#define VD_INDIRECT 4

/* virtio-blk features and requests (virtio 1.2, 5.2). */
#define VBLK_F_RO 5
#define VBLK_F_BLK_SIZE 6
#define VBLK_F_FLUSH 9
#define VIRTIO_F_VERSION_1 32
#define VBLK_T_IN 0
#define VBLK_T_OUT 1
#define VBLK_T_FLUSH 4
#define VBLK_S_OK 0
#define VBLK_S_IOERR 1
#define VBLK_S_UNSUPP 2

struct vdesc {
	u64 addr;
	u32 len;
	u16 flags, next;
};

/* Ring page layout: descriptor table, available ring, used ring. */
#define VR_AVAIL 0x100
#define VR_USED 0x200

struct vblk {
	int present, broken, ro, flush;
	u64 base; /* guest-physical address of the register window */
	u32 irq;
	u64 sectors;
	u64 ring_pa; /* descriptor table, avail at +VR_AVAIL, used at +VR_USED */
	u64 req_pa;  /* request header at +0, status byte at +0x100 */
	u64 data_pa; /* one page of data */
	u64 used_pa; /* the used ring the device writes (ring_pa + VR_USED) */
	u16 avail_idx, used_idx;
	char name[4]; /* vda, vdb, ... */
};
extern struct vblk vblks[VBLK_MAX];
extern int nvblk;

u32 vio_read(struct vblk *d, u64 off);
void vio_write(struct vblk *d, u64 off, u32 v);
int vblk_setup(struct vblk *d);
int vblk_submit(struct vblk *d, int ndesc);
int vblk_request(struct vblk *d, u32 type, u64 sector, u64 len);

#endif
