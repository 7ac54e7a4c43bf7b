#!/bin/bash
# Build the test guest's initramfs: busybox, rdma_rxe and its module dependencies (plus kvm for the
# nested-KVM probe and the pair's nested guests, tun for their TAPs), libibverbs with the rxe provider, perftest, the guest scripts, and the given
# host binaries (with their shared libraries) and data files.
# usage: build-initramfs.sh OUT.cpio.gz [--data FILE]... [BINARY]...
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${SOFTROCE_CACHE:-/var/cache/lockstep-softroce}
OUT=${1:?out file}; shift
KROOT=$CACHE/kernel
KVER=$(cat "$KROOT/KVER")
MODDIR=$KROOT/lib/modules/$KVER
ROOT=$(mktemp -d "${TMPDIR:-/tmp}/lockstep-initrd.XXXXXX")
trap 'rm -rf "$ROOT"' EXIT

mkdir -p "$ROOT"/{bin,dev,proc,sys,tmp,run,data,etc/libibverbs.d,usr/bin,usr/lib/x86_64-linux-gnu/libibverbs,usr/lib64}
ln -s usr/lib "$ROOT/lib"; ln -s usr/lib64 "$ROOT/lib64"; ln -s bin "$ROOT/sbin"; ln -s ../bin "$ROOT/usr/sbin"

cp /bin/busybox "$ROOT/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$ROOT/bin/$a" ] || ln -s busybox "$ROOT/bin/$a"; done

# a dynamic binary and its shared libraries (as the host's ldd resolves them)
copy_libs() {
  ldd "$1" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib64/{print $1}' | while read -r lib; do
    case "$lib" in
      */ld-linux-x86-64.so.2) cp -L "$lib" "$ROOT/usr/lib64/ld-linux-x86-64.so.2" ;;
      *) [ -e "$ROOT/usr/lib/x86_64-linux-gnu/$(basename "$lib")" ] || cp -L "$lib" "$ROOT/usr/lib/x86_64-linux-gnu/" ;;
    esac
  done
}
copy_bin() { cp -L "$1" "$ROOT/usr/bin/"; copy_libs "$1"; }

for b in ibv_devices ibv_devinfo ib_write_bw ib_write_lat /usr/bin/rdma /usr/sbin/ip; do
  copy_bin "$(command -v "$b" || echo "$b")"
done
rm "$ROOT/bin/ip"   # iproute2's ip; busybox sh still prefers its applet for a bare "ip": call /usr/bin/ip
cp -L /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so "$ROOT/usr/lib/x86_64-linux-gnu/libibverbs/"
copy_libs /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
cp /etc/libibverbs.d/rxe.driver "$ROOT/etc/libibverbs.d/"

while [ $# -gt 0 ]; do
  case "$1" in
    --data) cp -L "$2" "$ROOT/data/"; shift 2 ;;
    *) copy_bin "$1"; shift ;;
  esac
done

# kernel modules: the wanted ones plus their dependencies (modules.dep of the unpacked tree);
# crc32_generic: rxe asks the crypto API for "crc32" but modules.dep does not say so
WANT="rdma_rxe crc32_generic virtio_net virtio_pci rdma_ucm kvm kvm-amd kvm-intel tun"
need=""
for m in $WANT; do
  line=$(grep -E "/$m\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep" || true)
  [ -n "$line" ] || { echo "build-initramfs: module $m not in $KVER (skipped)" >&2; continue; }
  need="$need ${line%%:*} ${line#*:}"
done
for p in $(echo $need | tr ' ' '\n' | sort -u); do
  mkdir -p "$ROOT/usr/lib/modules/$KVER/$(dirname "$p")"
  cp "$MODDIR/$p" "$ROOT/usr/lib/modules/$KVER/$p"
done
cp "$MODDIR"/modules.{order,builtin} "$ROOT/usr/lib/modules/$KVER/"
busybox depmod -b "$ROOT" "$KVER"

install -m755 "$HERE/guest/init" "$ROOT/init"
install -m755 "$HERE"/guest/*.sh "$ROOT/"
(cd "$ROOT" && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) > "$OUT"
echo "initramfs: $OUT $(du -h "$OUT" | cut -f1) (unpacked $(du -sh "$ROOT" | cut -f1))"
