#!/bin/sh
# A whole fault-tolerant pair over RoCEv2 between the two guests (sourced by peer.sh after the log
# stream): the server guest (A) runs `lockstep arbiter` and `lockstep backup --transport rdma`, the
# client guest (B) `lockstep primary --transport rdma` of the `net` guest on nested KVM, each
# replica with a TAP (tap0, 10.77.0.1/24 on the guest's side; the nested guest is 10.77.0.2).
#   B: TCP echo requests (port 7, busybox nc) to the nested guest through tap0: every segment the
#      guest sends back is an output the primary's gate holds until the backup's ack arrives over
#      RDMA; the primary's status file must show frames
#      released and acks received, its log must say "over rdma" (no fallback to TCP); then
#      SIGKILL of the primary.
#   A: the backup must have replayed with every digest matching (a divergence ends it with an
#      error), see the primary's death over the RDMA link, win generation 2 at the arbiter, go
#      live on its own tap0 (gratuitous ARP) and answer echo requests there; then SIGTERM, and its
#      summary must say it is live as primary of generation 2.
# The two TAPs are separate L2 segments (one per guest), so a client connection cannot follow
# the guest from B to A: the request after the failover is a new one, made in A.
# Prints "RESULT pair_* PASS|FAIL" and "PAIR ..." figures.

PAIR_KEY=/data/link.key
GUEST_IP=10.77.0.2
# the `net` guest's --arg: its address in bits 0..32, the prefix length in bits 32..40
GUEST_ARG=$(( (24 << 32) | (10 << 24) | (77 << 16) | 2 ))
PAIR_FT="--arbiter-key $PAIR_KEY --vm-id 1 --heartbeat-ms 50 --peer-timeout-ms 3000 --status-dir /tmp/st --transport rdma"

pair_tap() {
  modprobe tun || return 1
  $IP2 tuntap add tap0 mode tap && $IP2 addr add 10.77.0.1/24 dev tap0 && $IP2 link set tap0 up
}

# echo_requests N LABEL: N TCP echo connections with the nested guest, three lines each, sent 1 s
# apart (so three requests and replies a connection); fails unless every connection got its lines
# back. The `net` guest answers no ICMP, and has four echo slots (each in TIME-WAIT for a while
# after its close): at most four connections per phase.
echo_requests() {
  # first the guest's MAC (the nested guest boots after the primary connected): ARP through ping,
  # which the guest itself does not answer
  for i in $(seq 1 60); do
    $IP2 neigh show $GUEST_IP | grep -q lladdr && break
    ping -c 1 -W 1 $GUEST_IP >/dev/null 2>&1
  done
  echo "PAIR $2: guest at $($IP2 neigh show $GUEST_IP)"
  ok=0; t0=$(cut -d' ' -f1 /proc/uptime)
  for n in $(seq 1 $1); do
    want=$(for l in 1 2 3; do echo "lockstep-$2-$n-$l"; done)
    got=$(echo "$want" | timeout 60 nc -i 1 -w 10 $GUEST_IP 7 2>&1)
    if [ "$got" = "$want" ]; then ok=$((ok + 1)); else echo "PAIR $2: connection $n got: $(echo $got | head -c 200)"; fi
  done
  echo "PAIR $2: $ok of $1 echo connections (3 requests each) answered in $(awk -v a=$t0 -v b=$(cut -d' ' -f1 /proc/uptime) 'BEGIN {printf "%.1f", b - a}') s"
  [ $ok = $1 ]
}

# wait_for FILE PATTERN SECONDS
wait_for() {
  i=0
  while [ $i -lt $(( $3 * 4 )) ]; do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.25; i=$((i + 1)); done
  return 1
}

# the figure after "KEY": in a one-line JSON object
json_num() { grep -o "\"$2\":[0-9]*" "$1" | head -1 | cut -d: -f2; }

# stop PID SIGNAL: signal it, SIGKILL after 30 s; $? = its exit status
stop() {
  kill -$2 $1; i=0
  while kill -0 $1 2>/dev/null && [ $i -lt 120 ]; do sleep 0.25; i=$((i + 1)); done
  kill -0 $1 2>/dev/null && { echo "PAIR pid $1 ignored SIG$2 for 30 s: SIGKILL"; kill -KILL $1; }
  wait $1
}

pair_kvm() { modprobe kvm_amd 2>/dev/null || modprobe kvm_intel 2>/dev/null; [ -c /dev/kvm ]; }

pair_server() {
  pair_kvm; res pair_kvm $?
  pair_tap; res pair_tap $?
  lockstep arbiter --listen $ip:7400 --state /tmp/arbiter.state --key-file $PAIR_KEY 2>/tmp/arbiter.err &
  arb=$!
  lockstep backup --listen $ip:7700 --tap tap0 --arbiter $ip:7400 --id backup $PAIR_FT --quiet \
    >/tmp/backup.out 2>/tmp/backup.err &
  bk=$!
  # the primary connects, streams, and is killed by the other guest; then this backup goes live
  wait_for /tmp/backup.err "connected over rdma" 120; r=$?
  [ $r = 0 ] || { echo "PAIR backup never saw a primary over rdma"; tail -5 /tmp/backup.err; }
  res pair_backup_connected_over_rdma $r
  wait_for /tmp/backup.err "won generation 2 at the arbiter: live as primary" 240; r=$?
  res pair_backup_won_arbiter_and_went_live $r
  if [ $r = 0 ]; then
    # the live guest answers on this guest's TAP: a new request after the failover
    echo_requests 2 live-in-A; res pair_live_guest_answers $?
  fi
  stop $bk TERM; rc=$?
  stop $arb TERM
  sed 's/^/  backup: /' /tmp/backup.err | tail -12
  cat /tmp/backup.out
  summary=$(grep '^backup:' /tmp/backup.out | tail -1)
  echo "$summary" | grep -q "live as primary of generation 2"; r=$?
  echo "$summary" | grep -qE " [1-9][0-9]* digests matched while following the primary"; d=$?
  echo "PAIR backup exit=$rc $(echo "$summary" | grep -oE '[0-9]+ digests matched while following the primary')"
  res pair_backup_summary_live_gen2 $r
  res pair_backup_digests_matched $d
  grep -q "gratuitous ARP sent" /tmp/backup.err; res pair_backup_gratuitous_arp $?
}

pair_client() {
  pair_kvm; res pair_kvm $?
  pair_tap; res pair_tap $?
  # the arbiter (and the backup right after it) start when the server guest's log stream ends
  for i in $(seq 1 120); do nc -w 1 $peer 7400 </dev/null >/dev/null 2>&1 && break; sleep 0.5; done
  sleep 1
  lockstep primary --backup $peer:7700 --backup-id backup --id primary --arbiter $peer:7400 $PAIR_FT \
    --guest net --arg $GUEST_ARG --tap tap0 --digest-interval 20 --quiet >/tmp/primary.out 2>/tmp/primary.err &
  pr=$!
  wait_for /tmp/primary.err "streaming to the backup at .* over rdma" 120; r=$?
  [ $r = 0 ] || { echo "PAIR primary not streaming over rdma"; tail -8 /tmp/primary.err; }
  res pair_primary_over_rdma $r
  # every echo reply leaves the gate only once the backup acked the entries before it
  echo_requests 4 primary-in-B; res pair_guest_answers_through_the_gate $?
  sleep 1.2   # the status file is rewritten twice a second
  st=/tmp/st/primary.json
  cat $st 2>/dev/null | head -c 600; echo
  released=$(json_num $st frames_released); acks=$(json_num $st acks); acked=$(json_num $st acked_position)
  echo "PAIR primary gate: frames_released=${released:-none} acks=${acks:-none} acked_position=${acked:-none} over rdma"
  [ "${released:-0}" -ge 12 ] && [ "${acks:-0}" -ge 1 ] && [ "${acked:-0}" -ge 1 ]
  res pair_gate_released_on_rdma_acks $?
  kill -KILL $pr; wait $pr
  echo "PAIR primary SIGKILLed"
  grep -q "falling back" /tmp/primary.err && { echo "PAIR primary fell back:"; grep "falling back" /tmp/primary.err; }
  sed 's/^/  primary: /' /tmp/primary.err | tail -6
}
