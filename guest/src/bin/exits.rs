//! Takes `arg` clock-read exits (default 20000) and stops: the exit-cost benchmark.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

fn main() -> u64 {
    let count = match lockstep_guest::pv::arg() {
        0 => 20_000,
        n => n,
    };
    let mut sum = 0u64;
    for _ in 0..count {
        sum = sum.wrapping_add(lockstep_guest::pv::clock());
    }
    lockstep_guest::println!("exits: {count} clock reads, sum {sum:x}");
    0
}
