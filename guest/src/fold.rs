//! The workload of the `fold` and `rdtsc` guests: draw on every source of
//! non-determinism the VMM offers (clock, entropy, the input stream) and fold
//! it into a state that spreads over memory, so that any divergence in any
//! input shows up in the state digests.

use crate::pv;

/// Words of folded state (256 KiB, on the stack).
const STATE_WORDS: usize = 1 << 15;
/// Rounds when the guest argument is 0.
const DEFAULT_ROUNDS: u64 = 2000;

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Fold {
    words: [u64; STATE_WORDS],
    hash: u64,
}

impl Fold {
    fn word(&mut self, value: u64) {
        self.hash = mix(self.hash ^ value);
        let slot = (self.hash as usize) % STATE_WORDS;
        self.words[slot] = self.words[slot].rotate_left(7) ^ self.hash;
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.word(u64::from_le_bytes(word));
        }
    }
}

/// Runs the workload; with `use_rdtsc` it also folds in the host TSC, which
/// a replica cannot reproduce.
pub fn run(use_rdtsc: bool) -> u64 {
    let rounds = match pv::arg() {
        0 => DEFAULT_ROUNDS,
        n => n,
    };
    let mut state = Fold {
        words: [0; STATE_WORDS],
        hash: 0x6c6f_636b_7374_6570,
    };
    let mut input = [0u8; 4096];
    let mut random = [0u8; 512];
    let mut input_bytes = 0u64;
    let mut input_open = true;
    for round in 0..rounds {
        state.word(pv::clock());
        state.word(pv::entropy());
        if round % 4 == 0 {
            pv::entropy_fill(&mut random);
            state.bytes(&random);
        }
        if input_open {
            match pv::input(&mut input) {
                Some(count) => {
                    state.bytes(&input[..count]);
                    input_bytes += count as u64;
                }
                None => input_open = false,
            }
        }
        if use_rdtsc {
            // SAFETY: RDTSC has no memory effects; it is forbidden for
            // determinism, which is exactly what this guest demonstrates.
            state.word(unsafe { core::arch::x86_64::_rdtsc() });
        }
        if round % 500 == 0 {
            crate::println!("round {round}: state {:016x}", state.hash);
        }
    }
    let mut total = state.hash;
    for word in state.words.iter() {
        total = mix(total ^ word);
    }
    crate::println!("fold: {rounds} rounds, {input_bytes} input bytes, final state {total:016x}");
    0
}
