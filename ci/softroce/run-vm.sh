#!/bin/bash
# One guest (TCG), running guest/conformance.sh; exit 0 iff the guest reported success.
# usage: run-vm.sh INITRAMFS LOG [extra kernel args]   env: MEM (MiB), SMP, TMO (s)
set -uo pipefail
CACHE=${SOFTROCE_CACHE:-/var/cache/lockstep-softroce}
INITRD=${1:?initramfs}; LOG=${2:?log file}; EXTRA=${3:-}
KERNEL=$CACHE/kernel/boot/vmlinuz-$(cat "$CACHE/kernel/KVER")
MEM=${MEM:-1536}; SMP=${SMP:-2}; TMO=${TMO:-1500}
# TCG: this host's KVM (if any) is nested and cannot boot a stock kernel; -cpu max emulates SVM too.
timeout --kill-after=10 "$TMO" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m "$MEM" -smp "$SMP" \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "console=ttyS0 panic=-1 quiet rdinit=/init softroce.test=conformance.sh $EXTRA" \
  -nographic -no-reboot -monitor none -serial stdio -nodefaults \
  -netdev user,id=n0,restrict=on,net=198.18.2.0/24 -device virtio-net-pci,netdev=n0 \
  </dev/null 2>&1 | tr -d '\r' > "$LOG"
grep -q "GUEST_DONE rc=0" "$LOG"
