//! Network services over virtio-net and smoltcp: echo, sink, source and a
//! Redis-protocol key-value store. Runs until the VMM stops it.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

fn main() -> u64 {
    lockstep_guest::services::run()
}
