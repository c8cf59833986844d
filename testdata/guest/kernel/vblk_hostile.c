/*
 * Hostile-driver modes (vblk=hostile:MODE): what a compromised or buggy
 * driver can do to the monitor's virtio-blk device on vda, once, at boot
 * after the kernel's memory is locked. Each mode breaks the virtio protocol in
 * one way, then the kernel prints what it saw, checks canary pages around
 * everything the device could reach, resets the device and checks that a
 * write and read of a sector work again. The monitor's test
 * (monitor/guest_vblk_test.go) reads the lines:
 *
 *   vblk: hostile MODE: result=R status=0xS      R: the request's status byte,
 *                                                 -5 (-EIO: no completion, the
 *                                                 device needs a reset) or
 *                                                 -1 (no request made)
 *   vblk: hostile MODE: canary intact | canary changed at PAGE+OFF
 *   vblk: hostile MODE: text canary unchanged | text canary overwritten (locked only)
 *   vblk: hostile MODE: after reset: write+read ok | after reset: FAIL ...
 *
 * Modes: outside-ram, far-addr, mmio, doorbell, locked, rings, loop,
 * long-chain, next-oob, head-oob, avail-jump, avail-back, zero-len,
 * overlong, past-end, unaligned, used-ro, lock-later, notify-unset,
 * queue-move.
 */
#include "vblk.h"
#include "pageprot.h"

extern u64 ram_size;
void pp_text_canary(void);

/* The used ring of lock-later: a page of the kernel image, which the kernel may lock. */
static u8 lock_ring[PAGE_SIZE] __attribute__((aligned(4096)));

#define NCANARY 3
static u64 canary[NCANARY];

static u8 canary_byte(int i, u64 off) { return (u8)(0xa5 ^ (u8)i ^ (u8)(off * 7)); }

static void canary_fill(void)
{
	for (int i = 0; i < NCANARY; i++) {
		u8 *b = P2V(canary[i]);
		for (u64 o = 0; o < PAGE_SIZE; o++)
			b[o] = canary_byte(i, o);
	}
}

static int canary_check(const char *mode)
{
	for (int i = 0; i < NCANARY; i++) {
		u8 *b = P2V(canary[i]);
		for (u64 o = 0; o < PAGE_SIZE; o++)
			if (b[o] != canary_byte(i, o)) {
				kprintf("vblk: hostile %s: canary changed at 0x%lx+0x%lx\n", mode, canary[i], o);
				return -1;
			}
	}
	kprintf("vblk: hostile %s: canary intact\n", mode);
	return 0;
}

/* publish puts head on the available ring, moves the index by delta and notifies. */
static void publish(struct vblk *d, u16 head, u16 delta)
{
	volatile u16 *avail = P2V(d->ring_pa + VR_AVAIL);
	avail[2 + d->avail_idx % VBLK_QSIZE] = head;
	__asm__ volatile("" ::: "memory");
	avail[1] = (u16)(d->avail_idx + delta);
	__asm__ volatile("" ::: "memory");
	vio_write(d, VIO_QUEUE_NOTIFY, 0);
}

/* header fills the request header of a read (IN) of sector 0 and arms the status byte. */
static void header(struct vblk *d, u32 type, u64 sector)
{
	u32 *hdr = P2V(d->req_pa);
	hdr[0] = type;
	hdr[1] = 0;
	*(u64 *)&hdr[2] = sector;
	*((volatile u8 *)P2V(d->req_pa) + 0x100) = 0xff;
}

/* chain3 lays out header, data and status as descriptors 0, 1, 2. */
static void chain3(struct vblk *d, u64 data, u32 len)
{
	struct vdesc *t = P2V(d->ring_pa);
	t[0] = (struct vdesc){d->req_pa, 16, VD_NEXT, 1};
	t[1] = (struct vdesc){data, len, VD_NEXT | VD_WRITE, 2};
	t[2] = (struct vdesc){d->req_pa + 0x100, 1, VD_WRITE, 0};
}

/* queue_at resets the device and sets queue 0 up again, its used ring at used. */
static void queue_at(struct vblk *d, u64 used)
{
	vio_write(d, VIO_STATUS, 0);
	vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER);
	vio_write(d, VIO_DRV_FEATURES_SEL, 1);
	vio_write(d, VIO_DRV_FEATURES, 1); /* VERSION_1 */
	vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
	vio_write(d, VIO_QUEUE_SEL, 0);
	vio_write(d, VIO_QUEUE_NUM, VBLK_QSIZE);
	vio_write(d, VIO_QUEUE_DESC, (u32)d->ring_pa);
	vio_write(d, VIO_QUEUE_DRIVER, (u32)(d->ring_pa + VR_AVAIL));
	vio_write(d, VIO_QUEUE_DEVICE, (u32)used);
	vio_write(d, VIO_QUEUE_READY, 1);
}

static int result(struct vblk *d)
{
	int r = vblk_submit(d, 3);
	return r < 0 ? r : *((volatile u8 *)P2V(d->req_pa) + 0x100);
}

/* recover resets the device and checks a write and read of sector 1. */
static void recover(struct vblk *d, const char *mode)
{
	if (vblk_setup(d) < 0) {
		kprintf("vblk: hostile %s: after reset: FAIL set-up\n", mode);
		return;
	}
	u8 *data = P2V(d->data_pa);
	for (int i = 0; i < 512; i++)
		data[i] = (u8)(i * 13 + 1);
	int w = vblk_request(d, VBLK_T_OUT, 1, 512);
	memset(data, 0, 512);
	int r = vblk_request(d, VBLK_T_IN, 1, 512);
	for (int i = 0; i < 512 && w == 0 && r == 0; i++)
		if (data[i] != (u8)(i * 13 + 1))
			r = 100 + i;
	if (w || r)
		kprintf("vblk: hostile %s: after reset: FAIL write=%d read=%d\n", mode, w, r);
	else
		kprintf("vblk: hostile %s: after reset: write+read ok\n", mode);
}

void vblk_hostile(const char *mode)
{
	struct vblk *d = &vblks[0];
	if (!nvblk || !d->present) {
		kprintf("vblk: hostile %s: no usable disk vda\n", mode);
		guest_exit(STATUS_CMDLINE);
	}
	for (int i = 0; i < NCANARY; i++)
		if (!(canary[i] = frame_alloc_nozero()))
			panic("vblk: out of memory");
	canary_fill();
	struct vdesc *t = P2V(d->ring_pa);
	u64 text = KIMG2P((u64)pp_text_canary);
	u8 text_before[16];
	memcpy(text_before, (void *)pp_text_canary, 16);
	int r = -1;

	header(d, VBLK_T_IN, 0);
	if (!strcmp(mode, "outside-ram")) {
		chain3(d, ram_size - 512, 4096); /* straddles the end of RAM */
		r = result(d);
	} else if (!strcmp(mode, "far-addr")) {
		chain3(d, 1UL << 52, 512);
		r = result(d);
	} else if (!strcmp(mode, "mmio")) {
		chain3(d, d->base, 512); /* the device's own registers */
		r = result(d);
	} else if (!strcmp(mode, "doorbell")) {
		chain3(d, 0xe0000000UL, 512);
		r = result(d);
	} else if (!strcmp(mode, "locked")) {
		/* 16 bytes of the disk into the kernel's locked text, the rest elsewhere. */
		t[0] = (struct vdesc){d->req_pa, 16, VD_NEXT, 1};
		t[1] = (struct vdesc){text, 16, VD_NEXT | VD_WRITE, 2};
		t[2] = (struct vdesc){d->data_pa, 496, VD_NEXT | VD_WRITE, 3};
		t[3] = (struct vdesc){d->req_pa + 0x100, 1, VD_WRITE, 0};
		r = result(d);
	} else if (!strcmp(mode, "rings")) {
		chain3(d, d->ring_pa + VR_USED, 512); /* the device writes its own used ring */
		r = result(d);
	} else if (!strcmp(mode, "loop")) {
		chain3(d, d->data_pa, 512);
		t[1].next = 1;
		r = result(d);
	} else if (!strcmp(mode, "long-chain")) {
		for (int i = 0; i < VBLK_QSIZE; i++)
			t[i] = (struct vdesc){d->data_pa + 512 * (u64)i, 512, VD_NEXT, (u16)((i + 1) % VBLK_QSIZE)};
		t[0].addr = d->req_pa;
		t[0].len = 16;
		r = result(d);
	} else if (!strcmp(mode, "next-oob")) {
		chain3(d, d->data_pa, 512);
		t[1].next = 200;
		r = result(d);
	} else if (!strcmp(mode, "head-oob")) {
		chain3(d, d->data_pa, 512);
		publish(d, 200, 1);
	} else if (!strcmp(mode, "avail-jump")) {
		chain3(d, d->data_pa, 512);
		publish(d, 0, VBLK_QSIZE + 5);
	} else if (!strcmp(mode, "avail-back")) {
		chain3(d, d->data_pa, 512);
		r = result(d); /* one good request, then the index goes back by one */
		kprintf("vblk: hostile %s: first request %d\n", mode, r);
		publish(d, 0, (u16)-1);
		r = -1;
	} else if (!strcmp(mode, "zero-len")) {
		chain3(d, d->data_pa, 0);
		t[0].len = 0;
		t[2].len = 0;
		r = result(d);
	} else if (!strcmp(mode, "overlong")) {
		chain3(d, d->data_pa, 0xffffffffU);
		r = result(d);
	} else if (!strcmp(mode, "past-end")) {
		header(d, VBLK_T_IN, d->sectors - 1);
		chain3(d, d->data_pa, 4096);
		r = result(d);
	} else if (!strcmp(mode, "unaligned")) {
		chain3(d, d->data_pa, 100);
		r = result(d);
	} else if (!strcmp(mode, "used-ro")) {
		/* Set the queue up again with its used ring in the locked kernel text. */
		queue_at(d, text & PAGE_MASK);
		kprintf("vblk: hostile %s: queue ready=%u\n", mode, vio_read(d, VIO_QUEUE_READY));
	} else if (!strcmp(mode, "lock-later")) {
		/* A queue whose used ring is a page the kernel locks after DRIVER_OK. */
		u64 used = KIMG2P((u64)lock_ring);
		queue_at(d, used);
		vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
		memset(P2V(d->ring_pa), 0, PAGE_SIZE);
		d->avail_idx = d->used_idx = 0;
		d->used_pa = used;
		long id = pp_lock_page((u64)lock_ring);
		kprintf("vblk: hostile %s: used ring frame 0x%lx locked: %ld\n", mode, used, id);
		header(d, VBLK_T_IN, 0);
		chain3(d, d->data_pa, 512);
		r = result(d);
		kprintf("vblk: hostile %s: locked used ring idx=%u (%s)\n", mode, *(volatile u16 *)(lock_ring + 2),
			*(volatile u16 *)(lock_ring + 2) ? "written" : "not written");
	} else if (!strcmp(mode, "notify-unset")) {
		vio_write(d, VIO_QUEUE_NOTIFY, 3);
	} else if (!strcmp(mode, "queue-move")) {
		/* Move the rings to canary pages while the queue runs, then make a request. */
		vio_write(d, VIO_QUEUE_SEL, 0);
		vio_write(d, VIO_QUEUE_DESC, (u32)canary[0]);
		vio_write(d, VIO_QUEUE_DEVICE, (u32)canary[1]);
		chain3(d, d->data_pa, 512);
		r = result(d);
	} else {
		kprintf("kernel: command line: unknown vblk hostile mode \"%s\"\n", mode);
		guest_exit(STATUS_CMDLINE);
	}
	kprintf("vblk: hostile %s: result=%d status=0x%x\n", mode, r, vio_read(d, VIO_STATUS));
	canary_check(mode);
	if (!strcmp(mode, "locked") || !strcmp(mode, "used-ro")) {
		const u8 *now = (const u8 *)pp_text_canary;
		char hex[40];
		for (int i = 0; i < 16; i++)
			snprintf(hex + 2 * i, 3, "%02x", now[i]);
		kprintf("vblk: hostile %s: text canary %s: %s\n", mode,
			memcmp(now, text_before, 16) ? "overwritten" : "unchanged", hex);
	}
	d->broken = 0;
	recover(d, mode);
}

/*
 * vblk_ring_attack is attack=vblkring (attack.c) on vda: at the victim's first
 * yield (step 1) the kernel sets queue 0 up again with its used ring at pa, the
 * victim's data page 0, which the kernel has just read (so a cloaked page is
 * ciphertext then and the device may take it); at the second (step 2), after
 * the victim wrote the page again, it makes a request: the device writes the
 * used entry over the victim's data unless it checks the ring again.
 */
void vblk_ring_attack(int step, u64 pa, const char *victim)
{
	struct vblk *d = &vblks[0];
	if (!nvblk || !d->present) {
		kprintf("attack vblkring: victim=%s no usable disk vda\n", victim);
		return;
	}
	if (step == 1) {
		queue_at(d, pa);
		vio_write(d, VIO_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
		memset(P2V(d->ring_pa), 0, VR_USED);
		d->avail_idx = d->used_idx = 0;
		d->used_pa = pa;
		kprintf("attack vblkring: victim=%s used ring at 0x%lx ready=%u status=0x%x\n", victim, pa,
			vio_read(d, VIO_QUEUE_READY), vio_read(d, VIO_STATUS));
		return;
	}
	header(d, VBLK_T_IN, 0);
	chain3(d, d->data_pa, 512);
	int r = result(d);
	kprintf("attack vblkring: victim=%s result=%d status=0x%x\n", victim, r, vio_read(d, VIO_STATUS));
}
