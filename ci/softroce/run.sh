#!/bin/bash
# Soft-RoCE CI for the RDMA logging channel (entry point for .ci/run):
#   1. set-up: host packages (qemu, rdma-core, perftest, libclang) and Debian's kernel with
#      rdma_rxe, cached under $SOFTROCE_CACHE (default /var/cache/lockstep-softroce)
#   2. builds the channel's RDMA tests, benchmark and log_stream example (--features rdma) and
#      `lockstep`, and records a real log with `lockstep record --guest fold`
#   3. one TCG guest: the channel conformance tests over rxe, the recorded log streamed primary ->
#      backup and compared with the file, perftest ib_write_bw/ib_write_lat and the channel benchmark
#      (RDMA and io_uring TCP) on the same device in the same boot, side by side in BENCH_ROUNDS
#      rounds (default 3), and a nested-KVM probe
#   4. two TCG guests back to back: the recorded log over real RoCEv2 between them, then a whole
#      pair (guest/pair.sh): arbiter + `lockstep backup` in one, `lockstep primary --transport rdma`
#      of the `net` guest on nested KVM in the other, pings through the output gate, SIGKILL of the
#      primary, the backup wins the arbiter and goes live
#   5. the perf gate: the median over the rounds of each ratio from step 3 against
#      perf/baselines/rdma.txt
# Fails on any failure. env: SKIP_2VM=1, SKIP_BENCH=1, BENCH_ROUNDS (default 3),
# RDMA_ENTRIES (default 1000000), SOFTROCE_OUT (default $CARGO_TARGET_DIR/softroce).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
OUT=${SOFTROCE_OUT:-$TARGET/softroce}
BASELINE=${RDMA_BASELINE:-$REPO/perf/baselines/rdma.txt}
mkdir -p "$OUT/bin"
T0=$(date +%s)
t() { local s=$(date +%s) r=0; "$@" || r=$?; echo "softroce: ${*:1:3} took $(( $(date +%s) - s )) s" >&2; return $r; }
quiet() { local log=$OUT/$1.log; shift; "$@" > "$log" 2>&1 || { tail -40 "$log"; echo "softroce: $* failed (log: $log)" >&2; return 1; }; }

echo "== softroce: set-up"
t quiet setup "$HERE/setup.sh"
tail -1 "$OUT/setup.log"

echo "== softroce: build"
cd "$REPO"
if [ -n "${LOCKSTEP_BIN:-}" ]; then   # a prebuilt lockstep (development only)
  cp "$LOCKSTEP_BIN" "$OUT/bin/lockstep"
else
  t quiet build-lockstep cargo build --release -p lockstep --features rdma
  cp "$TARGET/release/lockstep" "$OUT/bin/"
fi
t quiet build-channel cargo build --release -p channel --features rdma --example log_stream
t quiet clippy-rdma cargo clippy --release -p channel -p replica -p lockstep --features channel/rdma,replica/rdma,lockstep/rdma --all-targets -- -D warnings
# on the host (no RDMA device): the ring bookkeeping, the info/status encodings, and the clean
# "no RDMA device" error of every RDMA test
t quiet host-tests cargo test --release -p channel --features rdma --lib --test rdma --test rdma_bench
grep -E '^test result' "$OUT/host-tests.log"
cargo test --release -p channel --features rdma --no-run --message-format=json 2>"$OUT/build-tests.log" \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("rdma", "rdma_bench"):
        print(m["target"]["name"], m["executable"])
' > "$OUT/test-bins.txt" || { tail -40 "$OUT/build-tests.log"; exit 1; }
conf=$(awk '$1 == "rdma" {print $2}' "$OUT/test-bins.txt")
bench=$(awk '$1 == "rdma_bench" {print $2}' "$OUT/test-bins.txt")
[ -x "$conf" ] && [ -x "$bench" ] || { echo "softroce: test binaries not found"; cat "$OUT/test-bins.txt"; exit 1; }
cp "$conf" "$OUT/bin/rdma-conformance"; cp "$bench" "$OUT/bin/rdma-bench"
cp "$TARGET/release/examples/log_stream" "$OUT/bin/"
strip --strip-debug "$OUT"/bin/*

echo "== softroce: record a log"
head -c 1048576 /dev/urandom > "$OUT/input.bin"
"$OUT/bin/lockstep" record --guest fold --input "$OUT/input.bin" --log "$OUT/fold.log" --quiet
ls -l "$OUT/fold.log"
rm -f "$OUT/link.key"; "$OUT/bin/lockstep" keygen "$OUT/link.key"   # the pair's link and arbiter key
# the example itself, on the host, over the transports that need no RDMA
for tr in tcp shm; do
  "$OUT/bin/log_stream" log="$OUT/fold.log" transport=$tr role=both addr=127.0.0.1:$((17000 + $$ % 1000)) > "$OUT/host-$tr.log" 2>&1 \
    || { cat "$OUT/host-$tr.log"; echo "softroce: log_stream over $tr on the host failed"; exit 1; }
done

t "$HERE/build-initramfs.sh" "$OUT/initramfs.cpio.gz" --data "$OUT/fold.log" --data "$OUT/link.key" "$OUT"/bin/rdma-conformance \
  "$OUT"/bin/rdma-bench "$OUT"/bin/log_stream "$OUT"/bin/lockstep

rc=0
echo "== softroce: one guest (conformance, log stream, benchmark)"
extra="softroce.entries=${RDMA_ENTRIES:-1000000}"
[ -n "${SKIP_BENCH:-}" ] && extra="$extra softroce.bench=0"
extra="$extra softroce.bench_rounds=${BENCH_ROUNDS:-3}"
t "$HERE/run-vm.sh" "$OUT/initramfs.cpio.gz" "$OUT/vm1.log" "$extra" || rc=1
grep -E '^(RESULT|PERF|BENCH|KVM_PROBE|===)|^test .*\.\.\. |entries in|reported after' "$OUT/vm1.log" || true
grep -q 'GUEST_DONE' "$OUT/vm1.log" || { echo "softroce: the guest did not finish; console tail:"; tail -30 "$OUT/vm1.log"; }

if [ -z "${SKIP_2VM:-}" ]; then
  echo "== softroce: two guests (a recorded log, then a whole pair over RoCEv2)"
  t "$HERE/run-2vm.sh" "$OUT/initramfs.cpio.gz" "$OUT" || rc=1
  grep -hE '^(RESULT|OK |ERR |PAIR |===)' "$OUT/vmA.log" "$OUT/vmB.log" || true
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== softroce: perf gate ($BASELINE)"
  python3 - "$OUT/vm1.log" "$BASELINE" > "$OUT/gate.log" <<'PY' || rc=1
import re, statistics, sys
log, base = open(sys.argv[1]).read(), sys.argv[2]
# the guest measures in rounds, each opened by "PERF_ROUND n"; a log without markers is one round
rounds = [r for r in re.split(r"(?m)^PERF_ROUND \d+\s*$", log) if "BENCH " in r or "PERF " in r]
def kv(text, prefix):
    out = {}
    for line in text.splitlines():
        if prefix in line:   # libtest may print "test name ... " before it
            for k, v in re.findall(r"(\w+)=([^\s]+)", line[line.index(prefix):]):
                out[k] = v
    return out
def num(d, k):
    try:
        x = float(d[k])
        return x if x == x and x not in (float("inf"), 0.0) else None
    except (KeyError, ValueError):
        return None
per_round = []
for i, text in enumerate(rounds, 1):
    bw, lat = kv(text, "PERF ib_write_bw"), kv(text, "PERF ib_write_lat")
    rdma, tcp = kv(text, "BENCH rdma "), kv(text, "BENCH uring-tcp ")
    ib_mbps = num(bw, "avg_gbps") and num(bw, "avg_gbps") * 1000 / 8
    ib_lat = num(lat, "typical_us")
    r_bw, r_rtt = num(rdma, "bw_MBps"), num(rdma, "rtt_p50_us")
    t_bw, t_rtt = num(tcp, "bw_MBps"), num(tcp, "rtt_p50_us")
    per_round.append({
        "bw_vs_ib_write_bw": r_bw / ib_mbps if r_bw and ib_mbps else None,
        "rtt_vs_ib_write_lat": 2 * ib_lat / r_rtt if ib_lat and r_rtt else None,
        "bw_vs_uring_tcp": r_bw / t_bw if r_bw and t_bw else None,
        "rtt_vs_uring_tcp": t_rtt / r_rtt if t_rtt and r_rtt else None,
    })
    print(f"  round {i}: ib_write_bw {ib_mbps and round(ib_mbps, 2)} MB/s, ib_write_lat {ib_lat} us one-way;"
          f" channel rdma {r_bw} MB/s, ack rtt p50 {r_rtt} us; io_uring tcp {t_bw} MB/s, ack rtt p50 {t_rtt} us")
keys = ["bw_vs_ib_write_bw", "rtt_vs_ib_write_lat", "bw_vs_uring_tcp", "rtt_vs_uring_tcp"]
ratios = {}
for k in keys:
    got = [r[k] for r in per_round if r[k] is not None]
    ratios[k] = statistics.median(got) if got else None
    if got:
        print(f"  {k}: rounds " + " ".join(f"{x:.3f}" for x in got) + f", median {ratios[k]:.3f}")
tol, want = None, {}
for line in open(base):
    line = line.split("#")[0].strip()
    if "=" in line:
        k, v = (x.strip() for x in line.split("=", 1))
        if k == "tolerance": tol = float(v)
        else: want[k] = float(v)
bad = 0
for k, v in ratios.items():
    b = want.get(k)
    floor = b * (1 - tol) if b is not None and tol is not None else None
    if v is None:
        ok = k not in want or k == "rtt_vs_ib_write_lat"   # perftest's TSC calibration may fail under TCG
        print(f"  {k}: not measured{'' if ok else ' (FAIL: required)'}")
        bad += not ok
        continue
    ok = floor is None or v >= floor
    print(f"  {k} = {v:.3f} (baseline {b}, floor {floor and round(floor, 3)}) {'ok' if ok else 'REGRESSION'}")
    bad += not ok
print(f"RESULT perf_gate {'PASS' if bad == 0 else 'FAIL'}")
sys.exit(1 if bad else 0)
PY
  cat "$OUT/gate.log"
fi

logs="$OUT/vm1.log"; [ -z "${SKIP_2VM:-}" ] && logs="$logs $OUT/vmA.log $OUT/vmB.log"
[ -z "${SKIP_BENCH:-}" ] && logs="$logs $OUT/gate.log"
pass=$(cat $logs | grep -c '^RESULT .* PASS' || true); fail=$(cat $logs | grep -c '^RESULT .* FAIL' || true)
[ "$rc" = 0 ] || [ "$fail" -gt 0 ] || fail=1
echo "softroce: total $(( $(date +%s) - T0 )) s"
echo "softroce: $pass passed, $fail failed"
exit $rc
