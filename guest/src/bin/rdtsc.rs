//! Like `fold`, but also folds in RDTSC: replay must report a divergence.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

fn main() -> u64 {
    lockstep_guest::fold::run(true)
}
