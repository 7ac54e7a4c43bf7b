# helpers sourced by the guest test scripts
fails=0
res() { up=$(cut -d' ' -f1 /proc/uptime)
  if [ "$2" = 0 ]; then echo "RESULT $1 PASS (t=${up}s)"; else echo "RESULT $1 FAIL (rc=$2, t=${up}s)"; fails=$((fails+1)); fi; }
IP2=/usr/bin/ip                # iproute2 (busybox sh runs its own 'ip' applet for a bare 'ip')
# index of the RoCE v2 GID that carries an IPv4 address (::ffff:a.b.c.d)
gid4() {
  p=/sys/class/infiniband/$1/ports/1
  for i in 0 1 2 3 4 5 6 7; do
    read -r g < $p/gids/$i 2>/dev/null || continue
    read -r t < $p/gid_attrs/types/$i 2>/dev/null || continue
    case "$g" in 0000:0000:0000:0000:0000:ffff:*) [ "$t" = "RoCE v2" ] && { echo $i; return 0; } ;; esac
  done
  echo 0; return 1
}
# rxe0 on eth0 with address $1 (and MTU $2, if given)
rxe_up() {
  ip link set eth0 up && ip addr add $1/24 dev eth0
  [ -n "${2:-}" ] && ip link set eth0 mtu $2
  rdma link add rxe0 type rxe netdev eth0; res rdma_link_add $?
  GID=$(gid4 rxe0); echo "rxe0 on eth0 $1, RoCE v2 GID index $GID, $(ibv_devinfo -d rxe0 | grep -m1 active_mtu | tr -s ' \t' ' ')"
}
