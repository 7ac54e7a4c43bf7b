#!/bin/bash
# One-time (cached) setup for the soft-RoCE CI on a Debian bookworm host.
#  - host packages: qemu-system-x86 from bookworm-backports (bookworm's 7.2 would force removal of
#    a preinstalled qemu-utils from backports), busybox-static, rdma userspace, perftest,
#    libibverbs-dev/librdmacm-dev + libclang for the rdma-sys crate (bindgen)
#  - guest kernel: Debian's stock linux-image-<abi>-amd64 (CONFIG_RDMA_RXE=m), only unpacked into
#    the cache, never installed on the host
# Cache: $SOFTROCE_CACHE (default /var/cache/lockstep-softroce): apt lists, the kernel .deb, the
# unpacked kernel tree. A rerun with everything present does no network access at all.
set -euo pipefail
CACHE=${SOFTROCE_CACHE:-/var/cache/lockstep-softroce}
export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -q -y --no-install-recommends)

# private apt config = the machine's own Debian mirror + bookworm-backports, without editing /etc/apt
A=$CACHE/apt; mkdir -p "$A/lists/partial" "$A/empty.d"
SRCS=/etc/apt/sources.list.d/debian.sources
if [ -f "$SRCS" ]; then
  MAIN=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$SRCS")
  SEC=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' "$SRCS")
else
  MAIN=$(awk '/^deb / && $0 !~ /security/ {for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
  SEC=""
fi
KEY=/usr/share/keyrings/debian-archive-keyring.gpg
{
  echo "deb [signed-by=$KEY] $MAIN bookworm main"
  echo "deb [signed-by=$KEY] $MAIN bookworm-updates main"
  echo "deb [signed-by=$KEY] $MAIN bookworm-backports main"
  [ -n "$SEC" ] && echo "deb [signed-by=$KEY] $SEC bookworm-security main"
} > "$A/sources.list"
APTO=(-o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/empty.d" -o Dir::State::Lists="$A/lists")
updated=""
update() { [ -n "$updated" ] || { apt-get "${APTO[@]}" -q update >/dev/null; updated=1; }; }

missing() { for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || return 0; done; return 1; }
PKGS=(busybox-static ibverbs-utils ibverbs-providers perftest libibverbs-dev librdmacm-dev libclang1-14 libclang-common-14-dev bc)
if missing qemu-system-x86 "${PKGS[@]}"; then
  update
  missing qemu-system-x86 && "${APT[@]}" "${APTO[@]}" -t bookworm-backports install qemu-system-x86
  missing "${PKGS[@]}" && "${APT[@]}" "${APTO[@]}" install "${PKGS[@]}"
fi

# guest kernel: pinned by KPKG if given, else the one already unpacked, else what linux-image-amd64
# points at today (e.g. linux-image-6.1.0-56-amd64)
K=$CACHE/kernel
LAYOUT=2   # bump when the set of files unpacked below changes
if [ -z "${KPKG:-}" ] && [ -f "$K/KVER" ] && [ "$(cat "$K/LAYOUT" 2>/dev/null)" = "$LAYOUT" ] \
   && ls "$K"/boot/vmlinuz-"$(cat "$K/KVER")" >/dev/null 2>&1; then
  KVER=$(cat "$K/KVER")
else
  if [ -z "${KPKG:-}" ]; then
    update
    KPKG=$(apt-cache "${APTO[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  fi
  KVER=${KPKG#linux-image-}
  if [ ! -f "$K/boot/vmlinuz-$KVER" ] || [ "$(cat "$K/LAYOUT" 2>/dev/null)" != "$LAYOUT" ]; then
    mkdir -p "$CACHE/debs"
    if ! ls "$CACHE"/debs/"${KPKG}"_*.deb >/dev/null 2>&1; then
      update
      (cd "$CACHE/debs" && apt-get "${APTO[@]}" -q download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    fi
    rm -rf "$K"; mkdir -p "$K"
    dpkg-deb --fsys-tarfile "$CACHE"/debs/"${KPKG}"_*.deb | tar -x -C "$K" --wildcards \
      './boot/vmlinuz-*' './lib/modules/*/modules.order' './lib/modules/*/modules.builtin' \
      './lib/modules/*/kernel/drivers/infiniband/*' './lib/modules/*/kernel/net/*' './lib/modules/*/kernel/drivers/net/*' \
      './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/crypto/*' './lib/modules/*/kernel/fs/configfs/*' \
      './lib/modules/*/kernel/arch/x86/kvm/*' './lib/modules/*/kernel/virt/*' \
      './lib/modules/*/kernel/drivers/crypto/*' './lib/modules/*/kernel/drivers/char/*'
    busybox depmod -b "$K" "$KVER"
    echo "$LAYOUT" > "$K/LAYOUT"
  fi
  echo "$KVER" > "$K/KVER"
fi
echo "setup: qemu $(qemu-system-x86_64 --version | head -1 | awk '{print $4}'), guest kernel $KVER (cache $CACHE)"
