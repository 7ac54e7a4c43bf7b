//! Folds clock, entropy and input into its state: the record/replay workload.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

fn main() -> u64 {
    lockstep_guest::fold::run(false)
}
