/*
 * A minimal virtio-blk driver over virtio-mmio (virtio 1.2, modern only).
 *
 * The monitor describes each device on the command line as Linux's
 * virtio_mmio.device=4K@0xADDR:IRQ. Each gets one split virtqueue of
 * VBLK_QSIZE descriptors in one page, one request at a time: header, one data
 * buffer of at most a page, status byte. Completion is polled: the monitor
 * serves a queue when the driver writes QueueNotify, so the used ring has
 * moved when that write returns (the loop still bounds its wait). The
 * device's interrupt line is acknowledged, never unmasked.
 *
 * A device that sets DEVICE_NEEDS_RESET, or a request that does not complete,
 * marks the disk broken: every later request fails with -EIO.
 */
#include "vblk.h"

struct vblk vblks[VBLK_MAX];
int nvblk;
static char hostile_mode[24];

#define barrier() __asm__ volatile("" ::: "memory")

u32 vio_read(struct vblk *d, u64 off)
{
	return *(volatile u32 *)P2V(d->base + off);
}

void vio_write(struct vblk *d, u64 off, u32 v)
{
	*(volatile u32 *)P2V(d->base + off) = v;
}

static int parse_hex(const char *s, const char *end, u64 *out)
{
	u64 v = 0;
	if (end - s < 3 || s[0] != '0' || (s[1] != 'x' && s[1] != 'X'))
		return -1;
	for (s += 2; s < end; s++) {
		int c = *s, x;
		if (c >= '0' && c <= '9')
			x = c - '0';
		else if (c >= 'a' && c <= 'f')
			x = c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			x = c - 'A' + 10;
		else
			return -1;
		if (v >> 60)
			return -1;
		v = v << 4 | (u64)x;
	}
	*out = v;
	return 0;
}

/*
 * vblk_cmdline takes the driver's command-line words: 1 if it took key, 0 if
 * key is not its own, -1 for a bad value.
 *   virtio_mmio.device=4K@0xADDR:IRQ  a device (the monitor adds these)
 *   vblk=hostile:MODE                 run a hostile-driver mode on vda (vblk_hostile.c)
 */
int vblk_cmdline(const char *key, char *v)
{
	if (!strcmp(key, "vblk")) {
		if (strncmp(v, "hostile:", 8) || strlen(v + 8) == 0 || strlen(v + 8) >= sizeof hostile_mode)
			return -1;
		memcpy(hostile_mode, v + 8, strlen(v + 8) + 1);
		return 1;
	}
	if (strcmp(key, "virtio_mmio.device"))
		return 0;
	if (strncmp(v, "4K@", 3) || nvblk == VBLK_MAX)
		return -1;
	char *colon = v + 3;
	while (*colon && *colon != ':')
		colon++;
	u64 base, irq;
	if (!*colon || parse_hex(v + 3, colon, &base) || parse_u64(colon + 1, &irq) || irq > 23)
		return -1;
	if (base & (PAGE_SIZE - 1) || base < 0xc0000000UL || base >= 0xe0000000UL)
		return -1; /* not RAM, not the doorbell, below 4 GiB: what the direct map covers */
	struct vblk *d = &vblks[nvblk];
	d->base = base;
	d->irq = (u32)irq;
	d->name[0] = 'v';
	d->name[1] = 'd';
	d->name[2] = (char)('a' + nvblk);
	nvblk++;
	return 1;
}

const char *vblk_hostile_mode(void) { return hostile_mode; }

/* vblk_setup resets the device and brings it up: features, queue 0, DRIVER_OK. */
int vblk_setup(struct vblk *d)
{
	d->broken = 1;
	if (vio_read(d, VIO_MAGIC) != 0x74726976 || vio_read(d, VIO_VERSION) != 2) {
		kprintf("vblk: %s at 0x%lx: not a modern virtio-mmio device\n", d->name, d->base);
		return -1;
	}
	if (vio_read(d, VIO_DEVICE_ID) != 2) {
		kprintf("vblk: %s: device type %u is not a block device\n", d->name, vio_read(d, VIO_DEVICE_ID));
		return -1;
	}
	vio_write(d, VIO_STATUS, 0);
	vio_write(d, VIO_STATUS, VS_ACK);
	vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER);
	vio_write(d, VIO_DEV_FEATURES_SEL, 0);
	u64 feat = vio_read(d, VIO_DEV_FEATURES);
	vio_write(d, VIO_DEV_FEATURES_SEL, 1);
	feat |= (u64)vio_read(d, VIO_DEV_FEATURES) << 32;
	if (!(feat & (1UL << VIRTIO_F_VERSION_1))) {
		kprintf("vblk: %s: device does not offer VIRTIO_F_VERSION_1\n", d->name);
		vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FAILED);
		return -1;
	}
	u64 want = feat & (1UL << VIRTIO_F_VERSION_1 | 1UL << VBLK_F_RO | 1UL << VBLK_F_FLUSH | 1UL << VBLK_F_BLK_SIZE);
	vio_write(d, VIO_DRV_FEATURES_SEL, 0);
	vio_write(d, VIO_DRV_FEATURES, (u32)want);
	vio_write(d, VIO_DRV_FEATURES_SEL, 1);
	vio_write(d, VIO_DRV_FEATURES, (u32)(want >> 32));
	vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
	if (!(vio_read(d, VIO_STATUS) & VS_FEATURES_OK)) {
		kprintf("vblk: %s: device refused features 0x%lx\n", d->name, want);
		return -1;
	}
	d->ro = (want >> VBLK_F_RO) & 1;
	d->flush = (want >> VBLK_F_FLUSH) & 1;
	vio_write(d, VIO_QUEUE_SEL, 0);
	if (vio_read(d, VIO_QUEUE_NUM_MAX) < VBLK_QSIZE) {
		kprintf("vblk: %s: queue 0 holds %u descriptors, need %u\n", d->name, vio_read(d, VIO_QUEUE_NUM_MAX),
			(u32)VBLK_QSIZE);
		return -1;
	}
	if (!d->ring_pa && !(d->ring_pa = frame_alloc()))
		return -1;
	if (!d->req_pa && !(d->req_pa = frame_alloc()))
		return -1;
	if (!d->data_pa && !(d->data_pa = frame_alloc()))
		return -1;
	memset(P2V(d->ring_pa), 0, PAGE_SIZE);
	d->avail_idx = d->used_idx = 0;
	d->used_pa = d->ring_pa + VR_USED;
	vio_write(d, VIO_QUEUE_NUM, VBLK_QSIZE);
	vio_write(d, VIO_QUEUE_DESC, (u32)d->ring_pa);
	vio_write(d, VIO_QUEUE_DESC + 4, (u32)(d->ring_pa >> 32));
	vio_write(d, VIO_QUEUE_DRIVER, (u32)(d->ring_pa + VR_AVAIL));
	vio_write(d, VIO_QUEUE_DRIVER + 4, (u32)((d->ring_pa + VR_AVAIL) >> 32));
	vio_write(d, VIO_QUEUE_DEVICE, (u32)(d->ring_pa + VR_USED));
	vio_write(d, VIO_QUEUE_DEVICE + 4, (u32)((d->ring_pa + VR_USED) >> 32));
	vio_write(d, VIO_QUEUE_READY, 1);
	if (vio_read(d, VIO_QUEUE_READY) != 1) {
		kprintf("vblk: %s: queue 0 not ready (status 0x%x)\n", d->name, vio_read(d, VIO_STATUS));
		return -1;
	}
	vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
	u32 gen;
	do {
		gen = vio_read(d, VIO_CONFIG_GEN);
		d->sectors = *(volatile u64 *)P2V(d->base + VIO_CONFIG);
	} while (gen != vio_read(d, VIO_CONFIG_GEN));
	if (vio_read(d, VIO_STATUS) & VS_NEEDS_RESET) {
		kprintf("vblk: %s: device needs reset after set-up\n", d->name);
		return -1;
	}
	d->broken = 0;
	return 0;
}

/*
 * vblk_submit publishes the chain at descriptor 0 (ndesc descriptors, filled by
 * the caller), notifies and waits for the used ring. 0: completed; -EIO: the
 * device needs a reset or never answered (the disk is then broken).
 */
int vblk_submit(struct vblk *d, int ndesc)
{
	(void)ndesc;
	volatile u16 *avail = P2V(d->ring_pa + VR_AVAIL);
	volatile u16 *used_idx = P2V(d->used_pa + 2);
	avail[2 + d->avail_idx % VBLK_QSIZE] = 0;
	barrier();
	d->avail_idx++;
	avail[1] = d->avail_idx;
	barrier();
	vio_write(d, VIO_QUEUE_NOTIFY, 0);
	u64 deadline = now_ns() + 2000000000UL;
	while (*used_idx == d->used_idx) {
		if (vio_read(d, VIO_STATUS) & VS_NEEDS_RESET)
			break;
		if (now_ns() > deadline) {
			kprintf("vblk: %s: request not completed in 2 s\n", d->name);
			break;
		}
		__asm__ volatile("pause");
	}
	u32 is = vio_read(d, VIO_INT_STATUS);
	if (is)
		vio_write(d, VIO_INT_ACK, is);
	if (*used_idx == d->used_idx || (vio_read(d, VIO_STATUS) & VS_NEEDS_RESET)) {
		if (!d->broken)
			kprintf("vblk: %s: device error (status 0x%x): disk marked broken\n", d->name,
				vio_read(d, VIO_STATUS));
		d->broken = 1;
		return -EIO;
	}
	d->used_idx++;
	return 0;
}

/*
 * vblk_request does one request of len bytes (at most a page) between sector
 * and the data page. It returns the status byte (0 = OK), or -EIO.
 */
int vblk_request(struct vblk *d, u32 type, u64 sector, u64 len)
{
	if (d->broken)
		return -EIO;
	u32 *hdr = P2V(d->req_pa);
	volatile u8 *status = (u8 *)P2V(d->req_pa) + 0x100;
	hdr[0] = type;
	hdr[1] = 0;
	*(u64 *)&hdr[2] = sector;
	*status = 0xff;
	struct vdesc *t = P2V(d->ring_pa);
	t[0] = (struct vdesc){d->req_pa, 16, VD_NEXT, 1};
	int n = 1;
	if (len) {
		t[1] = (struct vdesc){d->data_pa, (u32)len, (u16)(VD_NEXT | (type == VBLK_T_IN ? VD_WRITE : 0)), 2};
		n = 2;
	} else {
		t[0].next = 2;
	}
	t[2] = (struct vdesc){d->req_pa + 0x100, 1, VD_WRITE, 0};
	int r = vblk_submit(d, n + 1);
	if (r < 0)
		return r;
	return *status;
}

static struct vblk *vblk_get(int i)
{
	if (i < 0 || i >= nvblk || !vblks[i].present)
		return NULL;
	return &vblks[i];
}

u64 vblk_size(int i)
{
	struct vblk *d = vblk_get(i);
	return d ? d->sectors * VBLK_SECTOR : 0;
}

int vblk_readonly(int i)
{
	struct vblk *d = vblk_get(i);
	return !d || d->ro;
}

/*
 * vblk_rw moves n bytes between the disk at byte offset off and user memory of
 * p at ubuf, through the data page, a page at most per request; writes not
 * aligned to sectors read the sectors first. It returns the bytes moved (short
 * at the end of the disk), or -errno if none were.
 */
long vblk_rw(int i, u64 off, struct proc *p, u64 ubuf, u64 n, int write)
{
	struct vblk *d = vblk_get(i);
	if (!d)
		return -ENXIO;
	if (d->broken)
		return -EIO;
	u64 size = d->sectors * VBLK_SECTOR;
	if (off >= size)
		return write && n ? -ENOSPC : 0;
	if (n > size - off)
		n = size - off;
	u64 done = 0;
	u8 *data = P2V(d->data_pa);
	while (done < n) {
		u64 pos = off + done, so = pos % VBLK_SECTOR;
		u64 c = PAGE_SIZE - so;
		if (c > n - done)
			c = n - done;
		u64 sector = pos / VBLK_SECTOR, len = (so + c + VBLK_SECTOR - 1) & ~(VBLK_SECTOR - 1);
		long r = 0;
		if (!write || so || (so + c) % VBLK_SECTOR)
			r = vblk_request(d, VBLK_T_IN, sector, len);
		if (r == 0 && write) {
			if (copy_from_user(p, data + so, ubuf + done, c))
				return done ? (long)done : -EFAULT;
			r = vblk_request(d, VBLK_T_OUT, sector, len);
		} else if (r == 0 && copy_to_user(p, ubuf + done, data + so, c))
			return done ? (long)done : -EFAULT;
		if (r != 0)
			return done ? (long)done : -EIO;
		done += c;
	}
	return (long)done;
}

/* vblk_flush makes the disk's writes durable (FLUSH, when the device has it). */
int vblk_flush(int i)
{
	struct vblk *d = vblk_get(i);
	if (!d)
		return -ENXIO;
	if (!d->flush || d->ro)
		return 0;
	return vblk_request(d, VBLK_T_FLUSH, 0, 0) == 0 ? 0 : -EIO;
}

/* vblk_init brings up every device the command line named and adds /dev/vdX. */
void vblk_init(void)
{
	for (int i = 0; i < nvblk; i++) {
		struct vblk *d = &vblks[i];
		if (vblk_setup(d) < 0) {
			kprintf("vblk: %s at 0x%lx irq %u: not usable\n", d->name, d->base, d->irq);
			continue;
		}
		d->present = 1;
		fs_add_disk(d->name, i);
		kprintf("vblk: %s at 0x%lx irq %u: %lu sectors%s%s\n", d->name, d->base, d->irq, d->sectors,
			d->ro ? ", read-only" : "", d->flush ? ", flush" : "");
	}
}
