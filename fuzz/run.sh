#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: builds every fuzz target (libFuzzer, stable Rust)
# and runs each for SECONDS (default 20), FUZZ_JOBS at a time (default 2).
# Fails if any target crashes, leaks past its memory limit or hangs; the
# input that did it is kept under $FUZZ_OUT/artifacts and the command that
# replays it is printed.
#
# env: FUZZ_TARGETS   targets to run (default: every [[bin]] in Cargo.toml)
#      FUZZ_JOBS      targets run at once (default 2)
#      FUZZ_CACHE     build and corpus cache, kept between runs so CI rebuilds
#                     only lockstep's own crates and each corpus keeps growing
#                     (default /var/cache/lockstep-fuzz)
#      FUZZ_TARGET_DIR cargo's target directory (default $FUZZ_CACHE/target)
#      FUZZ_OUT       logs and artifacts (default $FUZZ_CACHE/out)
#      FUZZ_ARGS      extra libFuzzer flags (e.g. -use_value_profile=1)
# fuzz/Cargo.lock is not enforced (--locked): a dependency another crate adds
# must not break this build.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SECS=${1:-20}
JOBS=${FUZZ_JOBS:-2}
CACHE=${FUZZ_CACHE:-/var/cache/lockstep-fuzz}
OUT=${FUZZ_OUT:-$CACHE/out}
# shellcheck source=flags.sh
. "$HERE/flags.sh"
TARGET_DIR=${FUZZ_TARGET_DIR:-$CACHE/target}
BIN=$TARGET_DIR/$FUZZ_TARGET_TRIPLE/release
mkdir -p "$CACHE/corpus" "$OUT/artifacts" "$OUT/logs"

all=$(awk '/^\[\[bin\]\]/{b=1} b && /^name =/{gsub(/"/,"",$3); print $3; b=0}' "$HERE/Cargo.toml")
targets=${FUZZ_TARGETS:-$all}

T0=$(date +%s)
echo "fuzz: building $(echo "$targets" | wc -w) targets (cache $CACHE)"
(cd "$HERE" && CARGO_TARGET_DIR=$TARGET_DIR RUSTFLAGS="$FUZZ_RUSTFLAGS" \
    cargo build --release --target "$FUZZ_TARGET_TRIPLE" --bins -q) \
    || { echo "fuzz: build failed"; exit 1; }
echo "fuzz: built in $(( $(date +%s) - T0 )) s; running each target for $SECS s, $JOBS at a time"

run_one() {
    local t=$1 corpus=$CACHE/corpus/$1 seeds=$HERE/seeds/$1 log=$OUT/logs/$1.log
    mkdir -p "$corpus"
    local dirs=("$corpus")
    [ -d "$seeds" ] && dirs+=("$seeds")
    # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a
    # decoder that allocates what a length field claims is a failure.
    if "$BIN/$t" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t-" ${FUZZ_ARGS:-} \
        "${dirs[@]}" > "$log" 2>&1; then
        local execs cov ft
        execs=$(awk '/stat::number_of_executed_units/{print $2}' "$log")
        cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
        ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
        printf 'fuzz: %-18s ok    %10s execs  cov %5s  ft %6s  corpus %5s\n' \
            "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$(ls "$corpus" | wc -l)"
    else
        printf 'fuzz: %-18s FAILED (log %s)\n' "$t" "$log"
        grep -E '^==[0-9]+==|panicked|ERROR|SUMMARY|Test unit written' "$log" | head -20 || tail -30 "$log"
        for a in "$OUT"/artifacts/"$t"-*; do
            [ -e "$a" ] && echo "fuzz: reproduce with: $BIN/$t $a"
        done
        return 1
    fi
}
export -f run_one
export CACHE OUT HERE BIN SECS FUZZ_ARGS
rm -f "$OUT"/artifacts/*
status=0
printf '%s\n' $targets | xargs -P "$JOBS" -I{} bash -c 'run_one {}' || status=1
echo "fuzz: done in $(( $(date +%s) - T0 )) s"
if [ "$status" != 0 ]; then
    echo "fuzz: a target failed; its input is in $OUT/artifacts"
    exit 1
fi
