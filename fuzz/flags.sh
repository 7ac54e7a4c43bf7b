# Sourced by run.sh: the flags cargo-fuzz would pass, all of them stable rustc
# options (libFuzzer's SanitizerCoverage instrumentation, compare tracing for
# its value profile and dictionaries, `cfg(fuzzing)`).
FUZZ_TARGET_TRIPLE=x86_64-unknown-linux-gnu
FUZZ_RUSTFLAGS="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
-Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing"
