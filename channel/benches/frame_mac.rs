//! Frame MAC candidates side by side, in one run (issue 13, item 10): the
//! cost of tagging one frame (its 40 tagged header bytes and a payload of
//! 64 B, 1.5 KiB and 64 KiB) with each, and crc32c (what frames carried
//! before they were authenticated) as the baseline.
//!
//! ```text
//! cargo bench -p channel --bench frame_mac            # ~10 s
//! ```
//!
//! Candidates (every key 32 bytes, per connection and direction, as the
//! channel derives them; every nonce the direction's frame counter):
//! - `blake3-keyed`: keyed BLAKE3, 128-bit output (protocol 2's tag);
//! - `aes256-ghash16 vpclmul` (the channel's tag since protocol 3, through
//!   [`channel::protocol::seal`]'s own code): the AES-GCM tag with the
//!   header as associated data and the payload as the (unencrypted)
//!   ciphertext, AES-256 via AES-NI, GHASH via VPCLMULQDQ (16 blocks per
//!   reduction) where the CPU has it, else PCLMULQDQ (8 blocks);
//! - `aes256 + RustCrypto ghash`: the same tag through RustCrypto's
//!   `ghash` (one block per call, 0.6-0.7 GB/s: why the channel has its
//!   own 8-block CLMUL GHASH, `src/ghash.rs`);
//! - `aes128-gcm-gmac`: RustCrypto `aes-gcm`, empty plaintext, header and
//!   payload as associated data (needs them contiguous: a copy here);
//! - `aes128-gcm-encrypt`: the full AEAD (encrypts the payload too), for
//!   scale;
//! - `chacha20-poly1305`: Poly1305 under a one-time key from ChaCha20's
//!   first block at the frame's nonce, as ChaCha20-Poly1305 derives it.
//!
//! Figures are GB/s of payload (and ns per frame); ratios within one run
//! are what counts on a shared host.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use chacha20::cipher::{KeyIvInit, StreamCipher};
use channel::protocol::{FRAME_HEADER_LEN, FrameKeys, FrameKind, Role, seal};
use poly1305::universal_hash::UniversalHash;

const SIZES: [usize; 3] = [64, 1536, 65536];
const BUDGET: Duration = Duration::from_millis(80);
/// Every candidate runs this many times, interleaved with the others; the
/// fastest of its runs counts (a burst of load elsewhere hits one run, not
/// one candidate).
const ROUNDS: usize = 5;
const HEADER: usize = 40;

fn measure(mut f: impl FnMut(u64)) -> (f64, u64) {
    // Warm up, then run until the budget is spent.
    for i in 0..64 {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < BUDGET {
        for _ in 0..64 {
            f(n);
            n += 1;
        }
    }
    let took = start.elapsed().as_secs_f64();
    (took / n as f64, n)
}

fn main() {
    let key = [0x5au8; 32];
    let mut rows: Vec<(usize, Vec<(&str, f64)>)> = Vec::new();
    for round in 0..ROUNDS {
        for (si, size) in SIZES.into_iter().enumerate() {
            let mut frame = vec![0x17u8; FRAME_HEADER_LEN + size];
            let data = vec![0x17u8; HEADER + size];
            let mut cands: Vec<(&str, f64)> = Vec::new();

            let (t, _) = measure(|_| {
                black_box(crc32c::crc32c(black_box(&data)));
            });
            cands.push(("crc32c (baseline)", t));

            let (t, _) = measure(|_| {
                let mut h = blake3::Hasher::new_keyed(&key);
                h.update(black_box(&data[..HEADER]));
                h.update(black_box(&data[HEADER..]));
                let mut tag = [0u8; 16];
                h.finalize_xof().fill(&mut tag);
                black_box(tag);
            });
            cands.push(("blake3-keyed", t));

            let keys = FrameKeys::for_tests();
            let mut sealer = keys.sealer(Role::Primary);
            let (t, _) = measure(|_| {
                let n = seal(
                    black_box(&mut frame),
                    FrameKind::Batch,
                    1,
                    1,
                    1,
                    size,
                    &mut sealer,
                );
                black_box(n.is_ok());
            });
            cands.push(("aes256-ghash16 vpclmul (channel seal)", t));

            let aes256 = <aes::Aes256 as aes::cipher::KeyInit>::new((&key).into());
            let gh = {
                use aes::cipher::BlockEncrypt;
                use ghash::universal_hash::KeyInit;
                let mut h = aes::Block::default();
                aes256.encrypt_block(&mut h);
                ghash::GHash::new(&h)
            };
            let (t, _) = measure(|i| {
                use aes::cipher::BlockEncrypt;
                use ghash::universal_hash::UniversalHash;
                let mut g = gh.clone();
                g.update_padded(black_box(&data[..HEADER]));
                g.update_padded(black_box(&data[HEADER..]));
                let mut lengths = ghash::Block::default();
                lengths[..8].copy_from_slice(&(HEADER as u64 * 8).to_be_bytes());
                lengths[8..].copy_from_slice(&(size as u64 * 8).to_be_bytes());
                g.update(&[lengths]);
                let mut s = g.finalize();
                let mut j0 = aes::Block::default();
                j0[..8].copy_from_slice(&i.to_le_bytes());
                j0[15] = 1;
                aes256.encrypt_block(&mut j0);
                for (a, b) in s.iter_mut().zip(j0.iter()) {
                    *a ^= b;
                }
                black_box(s);
            });
            cands.push(("aes256 + RustCrypto ghash", t));

            let gcm = aes_gcm::Aes128Gcm::new_from_slice(&key[..16]).expect("key");
            let mut empty: [u8; 0] = [];
            let (t, _) = measure(|i| {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&i.to_le_bytes());
                let tag =
                    gcm.encrypt_in_place_detached((&nonce).into(), black_box(&data), &mut empty);
                black_box(tag.is_ok());
            });
            cands.push(("aes128-gcm-gmac", t));

            let mut buf = vec![0u8; size];
            let (t, _) = measure(|i| {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&i.to_le_bytes());
                let tag = gcm.encrypt_in_place_detached(
                    (&nonce).into(),
                    black_box(&data[..HEADER]),
                    black_box(&mut buf),
                );
                black_box(tag.is_ok());
            });
            cands.push(("aes128-gcm-encrypt", t));

            let (t, _) = measure(|i| {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&i.to_le_bytes());
                let mut block = [0u8; 32];
                chacha20::ChaCha20::new((&key).into(), (&nonce).into()).apply_keystream(&mut block);
                let mut mac = poly1305::Poly1305::new((&block).into());
                mac.update_padded(black_box(&data[..HEADER]));
                mac.update_padded(black_box(&data[HEADER..]));
                black_box(mac.finalize());
            });
            cands.push(("chacha20-poly1305", t));

            if round == 0 {
                rows.push((size, cands));
            } else {
                for (best, (_, t)) in rows[si].1.iter_mut().zip(cands) {
                    best.1 = best.1.min(t);
                }
            }
        }
    }
    println!(
        "frame MAC cost, one run, best of {ROUNDS} interleaved (payload GB/s, ns per frame; header 40 B tagged too)"
    );
    println!(
        "{:<28} {:>22} {:>22} {:>22}",
        "candidate", "64 B", "1.5 KiB", "64 KiB"
    );
    let names: Vec<&str> = rows[0].1.iter().map(|(n, _)| *n).collect();
    for (i, name) in names.iter().enumerate() {
        let mut line = format!("{name:<28}");
        for (size, cands) in &rows {
            let t = cands[i].1;
            line.push_str(&format!(
                " {:>10.2} GB/s {:>6.0} ns",
                *size as f64 / t / 1e9,
                t * 1e9
            ));
        }
        println!("{line}");
    }
    // The figure the issue's goal is about: cost at 125 MB/s (1 GbE line
    // rate) in 1.5 KiB frames, as a share of one core.
    let (_, at_mtu) = &rows[1];
    for (name, t) in at_mtu {
        let frames_per_s = 125e6 / 1536.0;
        println!(
            "{name:<28} at 125 MB/s in 1.5 KiB frames: {:.2} % of a core",
            frames_per_s * t * 100.0
        );
    }
}
