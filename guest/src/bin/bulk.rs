//! The largest mailbox operations a guest may ask for: each of `arg` rounds
//! (default 4) fills a [`MAILBOX_MAX_LEN`] buffer with entropy and reads up
//! to as much of the input stream into it, folding both into a hash. Each
//! such exit makes the largest log entry of its kind (an `ENTROPY_FILL` or
//! `INPUT` of 1 MiB), which must travel over the logging channel like any
//! other.
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

use guest_abi::MAILBOX_MAX_LEN;
use lockstep_guest::pv;

/// The buffer: the top `MAILBOX_MAX_LEN` bytes of guest RAM, which nothing
/// else (image, stack, heap) uses in a guest of at least 8 MiB.
const MIN_MEM: u64 = 8 << 20;

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fold(mut hash: u64, bytes: &[u8]) -> u64 {
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = mix(hash ^ u64::from_le_bytes(word));
    }
    hash
}

fn main() -> u64 {
    let rounds = match pv::arg() {
        0 => 4,
        n => n,
    };
    let top = pv::mem_size();
    if top < MIN_MEM {
        lockstep_guest::println!("bulk: needs at least {} MiB of memory", MIN_MEM >> 20);
        return 1;
    }
    // SAFETY: the top MAILBOX_MAX_LEN bytes of RAM are unused by the image,
    // the stack and the heap (see MIN_MEM); only this slice refers to them.
    let buf = unsafe {
        core::slice::from_raw_parts_mut(
            (top - MAILBOX_MAX_LEN) as *mut u8,
            MAILBOX_MAX_LEN as usize,
        )
    };
    let mut hash = 0x6275_6c6b_6275_6c6bu64;
    let mut input = 0u64;
    let mut input_open = true;
    for _ in 0..rounds {
        pv::entropy_fill(buf);
        hash = fold(hash, buf);
        if input_open {
            match pv::input(buf) {
                Some(count) => {
                    hash = fold(hash, &buf[..count]);
                    input += count as u64;
                }
                None => input_open = false,
            }
        }
    }
    lockstep_guest::println!(
        "bulk: {rounds} rounds of {} KiB, {input} input bytes, state {hash:016x}",
        MAILBOX_MAX_LEN >> 10
    );
    0
}
