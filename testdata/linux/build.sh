#!/bin/bash
# Build umbra's test Linux guest: a tinyconfig 6.1 kernel from Debian's linux-source-6.1 with
# config.fragment and patches/, and an initramfs holding the static init (init.c).
#
# usage: build.sh OUT_DIR
#   OUT_DIR receives vmlinux, bzImage, initramfs.cpio.gz, config and build.log.
#   JOBS (environment) sets make's parallelism (default: the number of CPUs).
# The patches work around gaps of one instruction emulator (kvm_pvm, see README.md); the
# product never depends on them, only the tests on such hosts do.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
# OUT_DIR may not exist yet (a fresh machine has no cache directory): create it before
# resolving it, since readlink -f fails on a path whose parent is missing.
mkdir -p "$1"
out=$(readlink -f "$1")
jobs=${JOBS:-$(nproc)}
tarball=/usr/src/linux-source-6.1.tar.xz
if [ ! -r "$tarball" ]; then
	echo "build.sh: $tarball is missing: apt-get install linux-source-6.1" >&2
	exit 1
fi
mkdir -p "$out"
work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "build.sh: extracting $tarball" >&2
tar -C "$work" -xf "$tarball"
src=$(echo "$work"/linux-source-6.1)
cd "$src"
for p in "$here"/patches/*.patch; do
	patch -p1 --forward -s < "$p"
done
make -s ARCH=x86_64 tinyconfig
# shellcheck disable=SC2046
./scripts/config $(grep -v '^#' "$here/config.fragment")
make -s ARCH=x86_64 olddefconfig
for opt in PVH SERIAL_8250_CONSOLE BLK_DEV_INITRD DEVMEM VIRTIO_MMIO VIRTIO_BLK EXT2_FS; do
	grep -q "^CONFIG_$opt=y" .config || { echo "build.sh: CONFIG_$opt did not survive olddefconfig" >&2; exit 1; }
done
echo "build.sh: building with -j$jobs" >&2
KBUILD_BUILD_TIMESTAMP='1970-01-01' KBUILD_BUILD_USER=umbra KBUILD_BUILD_HOST=umbra \
	nice -n 10 make -s ARCH=x86_64 -j"$jobs" vmlinux bzImage >"$out/build.log" 2>&1 || { tail -40 "$out/build.log" >&2; exit 1; }
# The init: freestanding, static, no libc.
gcc -Os -static -nostdlib -ffreestanding -fno-builtin -fno-pie -no-pie -fno-stack-protector -fno-asynchronous-unwind-tables \
	-mno-sse -mno-mmx -mgeneral-regs-only -Wall -Werror -o "$work/init" "$here/init.c"
cat > "$work/initramfs.list" <<LIST
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/mem 0600 0 0 c 1 1
dir /proc 0755 0 0
file /init $work/init 0755 0 0
LIST
./usr/gen_init_cpio -t 0 "$work/initramfs.list" | gzip -9 -n > "$out/initramfs.cpio.gz"
cp vmlinux "$out/vmlinux"
cp arch/x86/boot/bzImage "$out/bzImage"
cp .config "$out/config"
echo "build.sh: done in $out" >&2
