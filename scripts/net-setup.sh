#!/usr/bin/env bash
# Creates the TAP interface a lockstep guest's NIC is backed by, with the
# host side of the guest's /24, so that ordinary clients on this host reach
# the guest. Idempotent. Needs root (CAP_NET_ADMIN).
#
#   scripts/net-setup.sh [TAP] [HOST_ADDRESS/PREFIX]   (default: lstap0 10.77.0.1/24)
#   scripts/net-setup.sh --down [TAP]
set -euo pipefail
if [ "${1:-}" = "--down" ]; then
    ip link del "${2:-lstap0}" 2>/dev/null || true
    exit 0
fi
tap=${1:-lstap0}
address=${2:-10.77.0.1/24}
if [ "$(id -u)" != 0 ]; then
    echo "net-setup: creating a TAP device needs root (CAP_NET_ADMIN)" >&2
    exit 1
fi
ip link show "$tap" >/dev/null 2>&1 || ip tuntap add dev "$tap" mode tap
ip addr replace "$address" dev "$tap"
ip link set "$tap" up
echo "net-setup: $tap up with $address; the guest is 10.77.0.2 by default"
