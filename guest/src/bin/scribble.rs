//! Writes memory as fast as it can between exits: the state-transfer workload.
//!
//! Each of `arg` rounds (default 2000) reads the clock and 8 random bytes
//! (two exits), then writes 64 pages chosen by the random value anywhere in
//! the scribble area (8 MiB up to the top of memory, less its last 2 MiB)
//! and sweeps 16 more pages in order. The VMM itself writes the last 2 MiB
//! (one whole 2 MiB guest page, so no guest write shares a large page with
//! it): every 4th round, `ENTROPY_FILL` fills 512 bytes of a different page
//! there, which the guest only reads. So a clone is only right if it tracks the VMM's own
//! writes as well as the guest's (which KVM's dirty log sees).
#![no_std]
#![no_main]

lockstep_guest::entry!(main);

use lockstep_guest::pv;

const PAGE: u64 = 4096;
const AREA_START: u64 = 8 << 20;
const HOST_AREA: u64 = 2 << 20;

fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn main() -> u64 {
    let rounds = match pv::arg() {
        0 => 2000,
        n => n,
    };
    let top = pv::mem_size();
    if top < AREA_START + HOST_AREA + 64 * PAGE {
        lockstep_guest::println!(
            "scribble: needs more than {} MiB of memory",
            (AREA_START + HOST_AREA) >> 20
        );
        return 1;
    }
    let host_area = top - HOST_AREA;
    let pages = (host_area - AREA_START) / PAGE;
    let mut hash = 0x7363_7269_6262_6c65u64;
    let mut sweep = 0u64;
    for round in 0..rounds {
        hash = mix(hash ^ pv::clock());
        let mut random = pv::entropy();
        for _ in 0..64 {
            random = mix(random);
            let page = AREA_START + (random % pages) * PAGE;
            let offset = (random >> 40) % (PAGE / 8) * 8;
            let word = (page + offset) as *mut u64;
            // SAFETY: `page + offset` lies in the scribble area, guest RAM
            // that nothing else (image, stack, heap) uses; 8-aligned.
            unsafe { word.write_volatile(word.read_volatile() ^ random ^ hash) };
        }
        for _ in 0..16 {
            let word = (AREA_START + (sweep % pages) * PAGE) as *mut u64;
            // SAFETY: as above.
            unsafe { word.write_volatile(word.read_volatile().wrapping_add(round)) };
            sweep += 1;
        }
        if round % 4 == 0 {
            let target = host_area + (round / 4 % (HOST_AREA / PAGE)) * PAGE;
            // SAFETY: the last 2 MiB of RAM are the VMM's to fill; the guest
            // only hands it out as a mailbox buffer here and reads it after.
            let buf = unsafe { core::slice::from_raw_parts_mut(target as *mut u8, 512) };
            pv::entropy_fill(buf);
            hash = mix(hash ^ u64::from(buf[round as usize % 512]));
        }
        if round % 5000 == 0 {
            lockstep_guest::println!("scribble: round {round}, state {hash:016x}");
        }
    }
    lockstep_guest::println!("scribble: {rounds} rounds over {pages} pages, state {hash:016x}");
    0
}
