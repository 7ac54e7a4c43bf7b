//! GHASH (the universal hash of AES-GCM, NIST SP 800-38D) with carry-less
//! multiplication, for the frame tags of [`crate::protocol`].
//!
//! RustCrypto's `ghash` (kept as the fallback, and as the reference in the
//! tests) multiplies one block at a time through a function call, which
//! runs at 0.6-0.7 GB/s here, below keyed BLAKE3. This one folds many
//! blocks with the precomputed powers of `H` and reduces once per group:
//!
//! ```text
//! Y' = (Y ⊕ X1)·H^n ⊕ X2·H^(n-1) ⊕ … ⊕ Xn·H      (one reduction per n blocks)
//! ```
//!
//! Three code paths, chosen at run time (each checked against RustCrypto
//! in the tests):
//!
//! - VPCLMULQDQ + AVX2: 16 blocks (256 bytes) per reduction, two blocks
//!   per instruction in 256-bit lanes. Each `ymm` register `j` holds blocks
//!   `X(2j+1)` (low lane) and `X(2j+2)` (high lane) and is multiplied by
//!   the pair `[H^(16-2j), H^(15-2j)]`; the three Karatsuba partial
//!   products are summed over all eight registers, the two lanes folded
//!   together, and the sum reduced once:
//!
//!   ```text
//!   ymm j:   [ X(2j+1)      | X(2j+2)      ]   (j = 0..7, Y xored into X1)
//!   powers:  [ H^(16-2j)    | H^(15-2j)    ]
//!   lo  ^= clmul00(x, h)   hi ^= clmul11(x, h)   mid ^= clmul00(x ⊕ swap x, h ⊕ swap h)
//!   Y' = reduce(lane0 ⊕ lane1 of (lo, hi, mid))
//!   ```
//!
//! - PCLMULQDQ: 8 blocks per reduction (then 4, then the last 1-4) in
//!   128-bit lanes;
//!   also what the wide path uses for the tail under 256 bytes.
//! - RustCrypto `ghash`, where the CPU has no PCLMULQDQ.
//!
//! It computes in POLYVAL's representation (RFC 8452: GHASH(H, X) =
//! ByteReverse(POLYVAL(mulX(ByteReverse(H)), ByteReverse(X_i)...))), whose
//! Karatsuba product and Montgomery reduction are those of RustCrypto
//! `polyval`'s CLMUL backend. Each block is byte-reversed with PSHUFB.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// GHASH keyed with `H`: the CLMUL version when the CPU has it, else
/// RustCrypto's.
#[derive(Clone)]
pub(crate) struct GHashKey {
    #[cfg(target_arch = "x86_64")]
    clmul: Option<Powers>,
    soft: ghash::GHash,
}

/// A running GHASH.
pub(crate) enum GHashState<'k> {
    #[cfg(target_arch = "x86_64")]
    Clmul {
        powers: &'k Powers,
        /// The state, POLYVAL representation, little-endian.
        y: [u8; 16],
    },
    Soft(ghash::GHash, std::marker::PhantomData<&'k ()>),
}

impl GHashKey {
    /// The key for the GHASH subkey `h` (`AES(key, 0^128)` in GCM).
    pub(crate) fn new(h: &[u8; 16]) -> Self {
        use ghash::universal_hash::KeyInit;
        Self {
            #[cfg(target_arch = "x86_64")]
            clmul: Powers::new(h),
            soft: ghash::GHash::new(h.into()),
        }
    }

    /// A GHASH from the zero state.
    pub(crate) fn start(&self) -> GHashState<'_> {
        #[cfg(target_arch = "x86_64")]
        if let Some(powers) = &self.clmul {
            return GHashState::Clmul { powers, y: [0; 16] };
        }
        GHashState::Soft(self.soft.clone(), std::marker::PhantomData)
    }

    /// RustCrypto's GHASH only (tests compare the two).
    #[cfg(test)]
    fn start_soft(&self) -> GHashState<'_> {
        GHashState::Soft(self.soft.clone(), std::marker::PhantomData)
    }

    /// This key without the 256-bit path (tests compare the paths).
    #[cfg(all(test, target_arch = "x86_64"))]
    fn narrow(&self) -> Self {
        let mut k = self.clone();
        if let Some(p) = &mut k.clmul {
            p.wide = None;
        }
        k
    }
}

impl GHashState<'_> {
    /// Folds in `data`, zero-padded to a multiple of 16 bytes.
    pub(crate) fn update_padded(&mut self, data: &[u8]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            GHashState::Clmul { powers, y } => {
                let mut rest = data;
                if let Some(w) = &powers.wide
                    && data.len() >= 256
                {
                    let whole = data.len() - data.len() % 256;
                    // SAFETY: `WidePowers` exist only where `Powers::new`
                    // found VPCLMULQDQ, AVX2, PCLMULQDQ and SSSE3 on this CPU.
                    *y = unsafe { update_wide(y, w, &data[..whole]) };
                    rest = &data[whole..];
                }
                // SAFETY: `Powers` exist only where `Powers::new` found
                // PCLMULQDQ and SSSE3 on this CPU.
                *y = unsafe { update(y, powers, rest) };
            }
            GHashState::Soft(g, _) => {
                use ghash::universal_hash::UniversalHash;
                g.update_padded(data);
            }
        }
    }

    /// The GHASH value (GCM's `S` before the masking block).
    pub(crate) fn finalize(self) -> [u8; 16] {
        match self {
            #[cfg(target_arch = "x86_64")]
            GHashState::Clmul { mut y, .. } => {
                y.reverse();
                y
            }
            GHashState::Soft(g, _) => {
                use ghash::universal_hash::UniversalHash;
                g.finalize().into()
            }
        }
    }
}

/// `H, H^2, ..., H^8` in POLYVAL's representation (each power carries
/// POLYVAL's `x^-128` factors, so that a sum of products needs one
/// reduction), little-endian; and, where the CPU has VPCLMULQDQ and AVX2,
/// the pairs of `H^1..H^16` the 256-bit path multiplies by.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Powers {
    narrow: [[u8; 16]; 8],
    wide: Option<WidePowers>,
}

/// For each `ymm` register `j` of a 16-block group: `[H^(16-2j) | H^(15-2j)]`
/// and the same with each lane's halves xored (Karatsuba's middle factor:
/// `h ⊕ swap(h)`, low 64 bits of each lane used).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct WidePowers {
    h: [[u8; 32]; 8],
    hk: [[u8; 32]; 8],
}

#[cfg(target_arch = "x86_64")]
impl Powers {
    fn new(h: &[u8; 16]) -> Option<Self> {
        if !(std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("ssse3"))
        {
            return None;
        }
        // POLYVAL's key: mulX(ByteReverse(H)) (RFC 8452, appendix A).
        let mut r = *h;
        r.reverse();
        let v = u128::from_le_bytes(r);
        let top = v >> 127;
        let v = (v << 1) ^ top ^ (top << 127) ^ (top << 126) ^ (top << 121);
        // SAFETY: the CPU has PCLMULQDQ and SSSE3 (checked above).
        let all = unsafe { powers(v.to_le_bytes()) };
        let mut narrow = [[0u8; 16]; 8];
        narrow.copy_from_slice(&all[..8]);
        let wide = (std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2"))
        .then(|| {
            let mut w = WidePowers {
                h: [[0; 32]; 8],
                hk: [[0; 32]; 8],
            };
            for j in 0..8 {
                // all[i] is H^(i+1).
                let (lo, hi) = (all[15 - 2 * j], all[14 - 2 * j]);
                w.h[j][..16].copy_from_slice(&lo);
                w.h[j][16..].copy_from_slice(&hi);
                for (lane, p) in [lo, hi].iter().enumerate() {
                    for k in 0..8 {
                        w.hk[j][lane * 16 + k] = p[k] ^ p[k + 8];
                    }
                }
            }
            w
        });
        Some(Self { narrow, wide })
    }
}

/// `H, H^2, ..., H^16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn powers(h: [u8; 16]) -> [[u8; 16]; 16] {
    let h1 = load(&h);
    let mut powers = [[0u8; 16]; 16];
    let mut p = h1;
    for slot in powers.iter_mut() {
        *slot = store(p);
        p = reduce(product(p, h1));
    }
    powers
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn load(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn store(v: __m128i) -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: `b` is 16 writable bytes; the store is unaligned.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) };
    b
}

/// A GHASH block (bytes as on the wire) in POLYVAL's representation.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn block(b: &[u8; 16]) -> __m128i {
    let reverse = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    _mm_shuffle_epi8(load(b), reverse)
}

/// The `i`-th block of a 64-byte chunk.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn block_of(q: &[u8], i: usize) -> __m128i {
    let mut a = [0u8; 16];
    if let Some(b) = q.get(i * 16..i * 16 + 16).and_then(|b| b.try_into().ok()) {
        return block(b);
    }
    // A last, partial block: zero-padded.
    let rest = q.get(i * 16..).unwrap_or(&[]);
    a[..rest.len().min(16)].copy_from_slice(&rest[..rest.len().min(16)]);
    block(&a)
}

/// An unreduced 256-bit product, Karatsuba: `(lo·lo, hi·hi, mid)`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Wide(__m128i, __m128i, __m128i);

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn product(y: __m128i, h: __m128i) -> Wide {
    let h2 = _mm_xor_si128(h, _mm_shuffle_epi32(h, 0x0E));
    let y2 = _mm_xor_si128(y, _mm_shuffle_epi32(y, 0x0E));
    Wide(
        _mm_clmulepi64_si128(y, h, 0x00),
        _mm_clmulepi64_si128(y, h, 0x11),
        _mm_clmulepi64_si128(y2, h2, 0x00),
    )
}

#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn add(a: Wide, b: Wide) -> Wide {
    Wide(
        _mm_xor_si128(a.0, b.0),
        _mm_xor_si128(a.1, b.1),
        _mm_xor_si128(a.2, b.2),
    )
}

/// POLYVAL's Montgomery reduction of a product (as in RustCrypto
/// `polyval`'s CLMUL backend).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn reduce(w: Wide) -> __m128i {
    let (t0, t1) = (w.0, w.1);
    let t2 = _mm_xor_si128(w.2, _mm_xor_si128(t0, t1));
    let v0 = t0;
    let v1 = _mm_xor_si128(_mm_shuffle_epi32(t0, 0x0E), t2);
    let v2 = _mm_xor_si128(t1, _mm_shuffle_epi32(t2, 0x0E));
    let v3 = _mm_shuffle_epi32(t1, 0x0E);
    let x = |a, b| _mm_xor_si128(a, b);
    let v2 = x(
        x(v2, v0),
        x(
            x(_mm_srli_epi64(v0, 1), _mm_srli_epi64(v0, 2)),
            _mm_srli_epi64(v0, 7),
        ),
    );
    let v1 = x(
        x(v1, _mm_slli_epi64(v0, 63)),
        x(_mm_slli_epi64(v0, 62), _mm_slli_epi64(v0, 57)),
    );
    let v3 = x(
        x(v3, v1),
        x(
            x(_mm_srli_epi64(v1, 1), _mm_srli_epi64(v1, 2)),
            _mm_srli_epi64(v1, 7),
        ),
    );
    let v2 = x(
        x(v2, _mm_slli_epi64(v1, 63)),
        x(_mm_slli_epi64(v1, 62), _mm_slli_epi64(v1, 57)),
    );
    _mm_unpacklo_epi64(v2, v3)
}

/// Folds `data` (zero-padded) into the state `y`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq,ssse3")]
fn update(y: &[u8; 16], p: &Powers, data: &[u8]) -> [u8; 16] {
    let [h1, h2, h3, h4, h5, h6, h7, h8] = p.narrow.map(|h| load(&h));
    let mut y = load(y);
    let mut eights = data.chunks_exact(128);
    for q in &mut eights {
        let x0 = _mm_xor_si128(y, block_of(q, 0));
        let w = add(
            add(
                add(product(x0, h8), product(block_of(q, 1), h7)),
                add(product(block_of(q, 2), h6), product(block_of(q, 3), h5)),
            ),
            add(
                add(product(block_of(q, 4), h4), product(block_of(q, 5), h3)),
                add(product(block_of(q, 6), h2), product(block_of(q, 7), h1)),
            ),
        );
        y = reduce(w);
    }
    let mut quads = eights.remainder().chunks_exact(64);
    for q in &mut quads {
        let x0 = _mm_xor_si128(y, block_of(q, 0));
        let w = add(
            add(product(x0, h4), product(block_of(q, 1), h3)),
            add(product(block_of(q, 2), h2), product(block_of(q, 3), h1)),
        );
        y = reduce(w);
    }
    // The last 1-4 blocks (the last one maybe partial) with one reduction
    // too: X1·H^n ⊕ … ⊕ Xn·H.
    let rest = quads.remainder();
    let n = rest.len().div_ceil(16);
    if n > 0 {
        let hs = [h1, h2, h3, h4];
        let mut w = product(_mm_xor_si128(y, block_of(rest, 0)), hs[n - 1]);
        for i in 1..n {
            w = add(w, product(block_of(rest, i), hs[n - 1 - i]));
        }
        y = reduce(w);
    }
    store(y)
}

/// Folds whole 256-byte groups of `data` (its length is a multiple of
/// 256) into the state `y`, 16 blocks per reduction (see the module docs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "vpclmulqdq,avx2,pclmulqdq,ssse3")]
fn update_wide(y: &[u8; 16], w: &WidePowers, data: &[u8]) -> [u8; 16] {
    let lanes = |a: &[u8; 32]| {
        // SAFETY: `a` is 32 readable bytes; the load is unaligned.
        unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
    };
    let h = w.h.map(|a| lanes(&a));
    let hk = w.hk.map(|a| lanes(&a));
    let reverse = _mm256_set_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
        12, 13, 14, 15,
    );
    let mut y = load(y);
    for group in data.chunks_exact(256) {
        let mut lo = _mm256_setzero_si256();
        let mut hi = _mm256_setzero_si256();
        let mut mid = _mm256_setzero_si256();
        // The first pair last: only it depends on the previous group's
        // reduction, so the other seven products overlap that reduction.
        for j in (0..8).rev() {
            let Some(pair) = group.get(j * 32..j * 32 + 32) else {
                break;
            };
            // SAFETY: `pair` is 32 readable bytes; the load is unaligned.
            let raw = unsafe { _mm256_loadu_si256(pair.as_ptr().cast()) };
            let mut x = _mm256_shuffle_epi8(raw, reverse);
            if j == 0 {
                x = _mm256_xor_si256(x, _mm256_set_m128i(_mm_setzero_si128(), y));
            }
            let xk = _mm256_xor_si256(x, _mm256_shuffle_epi32(x, 0x0E));
            lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, h[j], 0x00));
            hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, h[j], 0x11));
            mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(xk, hk[j], 0x00));
        }
        let fold =
            |v: __m256i| _mm_xor_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        y = reduce(Wide(fold(lo), fold(hi), fold(mid)));
    }
    store(y)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The CLMUL GHASH equals RustCrypto's on every length around the
    /// 8- and 4-block strides, pieces fed in any split.
    #[test]
    fn clmul_matches_rustcrypto() {
        let mut h = [0u8; 16];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(73).wrapping_add(5);
        }
        let key = GHashKey::new(&h);
        #[cfg(target_arch = "x86_64")]
        assert!(key.clmul.is_some(), "this host has PCLMULQDQ");
        #[cfg(target_arch = "x86_64")]
        let narrow = key.narrow();
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 5) as u8).collect();
        let lens = (0..600).chain([767, 768, 769, 1000, 1023, 1024, 1025, 4096, 4999]);
        for len in lens {
            for split in [0, 1, 40, 256, 300, len / 2] {
                let split = split.min(len);
                let mut b = key.start_soft();
                b.update_padded(&data[..split]);
                b.update_padded(&data[split..len]);
                let want = b.finalize();
                let mut a = key.start();
                a.update_padded(&data[..split]);
                a.update_padded(&data[split..len]);
                assert_eq!(a.finalize(), want, "len {len} split {split}");
                #[cfg(target_arch = "x86_64")]
                {
                    let mut n = narrow.start();
                    n.update_padded(&data[..split]);
                    n.update_padded(&data[split..len]);
                    assert_eq!(n.finalize(), want, "narrow: len {len} split {split}");
                }
            }
        }
    }

    /// This host has the 256-bit path, so the test above covered it (the
    /// CI hosts are of the same kind; elsewhere this says why the wide
    /// path was not checked).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn wide_path_is_present_where_the_cpu_has_it() {
        let key = GHashKey::new(&[9; 16]);
        let has = std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2");
        assert_eq!(
            key.clmul.as_ref().and_then(|p| p.wide.as_ref()).is_some(),
            has
        );
    }
}
