#!/bin/bash
# Two guests (TCG), one rxe device each on virtio-net, wired back to back through a qemu 'stream'
# netdev over a unix socket (no host networking): guest A is the backup, B the primary.
# usage: run-2vm.sh INITRAMFS OUTDIR   env: MEM, SMP, TMO.  MTU 9000 -> RoCE MTU 4096
set -uo pipefail
CACHE=${SOFTROCE_CACHE:-/var/cache/lockstep-softroce}
INITRD=${1:?initramfs}; OUTD=${2:?out dir}
KERNEL=$CACHE/kernel/boot/vmlinuz-$(cat "$CACHE/kernel/KVER")
MEM=${MEM:-768}; SMP=${SMP:-1}; TMO=${TMO:-900}
SOCK=$(mktemp -u "${TMPDIR:-/tmp}/lockstep-link.XXXXXX.sock")
vm() { # name mac netdev-args append-extra
  timeout --kill-after=10 "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 panic=-1 quiet rdinit=/init softroce.test=peer.sh softroce.mtu=9000 $4" \
    -nographic -no-reboot -monitor none -serial stdio -nodefaults \
    -netdev "stream,id=n0,$3" -device "virtio-net-pci,netdev=n0,mac=$2,host_mtu=9000" \
    </dev/null 2>&1 | tr -d '\r' > "$OUTD/$1.log"
}
vm vmA 52:54:00:00:00:0a "server=on,addr.type=unix,addr.path=$SOCK" "softroce.role=server softroce.ip=198.18.3.1" & pa=$!
for i in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
vm vmB 52:54:00:00:00:0b "server=off,addr.type=unix,addr.path=$SOCK" "softroce.role=client softroce.ip=198.18.3.2 softroce.peer=198.18.3.1" & pb=$!
wait $pa; wait $pb
rm -f "$SOCK"
grep -q "GUEST_DONE rc=0" "$OUTD/vmA.log" && grep -q "GUEST_DONE rc=0" "$OUTD/vmB.log"
