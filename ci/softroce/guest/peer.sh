#!/bin/sh
# Two guests, each with rxe0 on its virtio-net, linked back to back: a recorded log streamed from the
# primary (client guest) to the backup (server guest) over real RoCEv2, then a whole fault-tolerant
# pair over it (pair.sh; skipped with softroce.pair=0).
# role=server|client, ip=<own address>, peer=<server address>, mtu from the kernel cmdline.
. /common.sh
. /pair.sh
rxe_up $ip ${mtu:-}
export LOCKSTEP_RDMA_DEVICE=rxe0
if [ "$role" = server ]; then
  timeout 300 /usr/bin/log_stream log=/data/fold.log transport=rdma role=backup addr=$ip:7100 2>&1
  res log_stream_rdma_backup $?
  [ "${pair:-1}" = 1 ] && pair_server
else
  for i in $(seq 1 100); do ping -c1 -W1 $peer >/dev/null 2>&1 && break; sleep 0.5; done
  timeout 300 /usr/bin/log_stream log=/data/fold.log transport=rdma role=primary addr=$peer:7100 2>&1
  res log_stream_rdma_primary $?
  [ "${pair:-1}" = 1 ] && pair_client
fi
echo "=== peer.sh ($role) finished: $fails failure(s)"
exit $fails
