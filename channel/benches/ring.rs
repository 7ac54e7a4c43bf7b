//! Criterion benchmarks of the SPSC ring: single-thread push/pop cost, a
//! two-thread streaming throughput, and ours side by side with `rtrb` on the
//! same workloads (64 B entries, the size of a log record header; group
//! `ring_vs_rtrb`):
//!
//! ```text
//! ours/rtrb  push_pop_1       one push then one pop, one thread
//!            stream_1          2^18 entries, producer thread -> consumer thread,
//!                              one push / one pop at a time, ring of 4096
//!            stream_batch_64   the same in batches of up to 64
//!                              (push_slice/pop_slice vs push_partial_slice/
//!                              pop_partial_slice)
//! ```
//!
//! Run: `nice -n 10 cargo bench -p channel --bench ring -- ring_vs_rtrb`.

use std::hint::black_box;

use channel::ring::RingBuffer;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_single_thread");
    g.throughput(Throughput::Elements(1));
    let (mut p, mut co) = RingBuffer::new::<u64>(1024);
    g.bench_function("push_pop", |b| {
        b.iter(|| {
            let _ = p.push(black_box(7));
            black_box(co.pop())
        })
    });
    g.throughput(Throughput::Elements(64));
    let mut buf = [0u64; 64];
    let src = [1u64; 64];
    g.bench_function("push_pop_slice_64", |b| {
        b.iter(|| {
            p.push_slice(black_box(&src));
            black_box(co.pop_slice(&mut buf))
        })
    });
    g.finish();
}

fn two_threads(c: &mut Criterion) {
    const N: u64 = 1 << 20;
    let mut g = c.benchmark_group("ring_two_threads");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    g.bench_function("stream_1M_u64", |b| {
        b.iter(|| {
            let (mut p, mut co) = RingBuffer::new::<u64>(4096);
            let t = std::thread::spawn(move || {
                let mut i = 0;
                while i < N {
                    if p.push(i).is_ok() {
                        i += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            });
            let mut got = 0;
            while got < N {
                match co.pop() {
                    Some(v) => {
                        black_box(v);
                        got += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
            let _ = t.join();
        })
    });
    g.finish();
}

/// A 64-byte entry.
type Entry = [u64; 8];

/// The two rings under one interface, so each workload is written once and
/// both run exactly the same code around the ring calls.
trait Spsc: Send + 'static {
    type P: Send + 'static;
    type C: Send + 'static;
    fn new(capacity: usize) -> (Self::P, Self::C);
    fn push(p: &mut Self::P, v: Entry) -> bool;
    fn pop(c: &mut Self::C) -> Option<Entry>;
    fn push_slice(p: &mut Self::P, v: &[Entry]) -> usize;
    fn pop_slice(c: &mut Self::C, out: &mut [Entry]) -> usize;
}

struct Ours;
impl Spsc for Ours {
    type P = channel::ring::Producer<Entry>;
    type C = channel::ring::Consumer<Entry>;
    fn new(capacity: usize) -> (Self::P, Self::C) {
        RingBuffer::new(capacity)
    }
    #[inline]
    fn push(p: &mut Self::P, v: Entry) -> bool {
        p.push(v).is_ok()
    }
    #[inline]
    fn pop(c: &mut Self::C) -> Option<Entry> {
        c.pop()
    }
    #[inline]
    fn push_slice(p: &mut Self::P, v: &[Entry]) -> usize {
        p.push_slice(v)
    }
    #[inline]
    fn pop_slice(c: &mut Self::C, out: &mut [Entry]) -> usize {
        c.pop_slice(out)
    }
}

struct Rtrb;
impl Spsc for Rtrb {
    type P = rtrb::Producer<Entry>;
    type C = rtrb::Consumer<Entry>;
    fn new(capacity: usize) -> (Self::P, Self::C) {
        rtrb::RingBuffer::new(capacity)
    }
    #[inline]
    fn push(p: &mut Self::P, v: Entry) -> bool {
        p.push(v).is_ok()
    }
    #[inline]
    fn pop(c: &mut Self::C) -> Option<Entry> {
        c.pop().ok()
    }
    #[inline]
    fn push_slice(p: &mut Self::P, v: &[Entry]) -> usize {
        p.push_partial_slice(v).0.len()
    }
    #[inline]
    fn pop_slice(c: &mut Self::C, out: &mut [Entry]) -> usize {
        c.pop_partial_slice(out).0.len()
    }
}

const STREAM: u64 = 1 << 18;

/// One push then one pop on one thread (no contention: the cost of the calls).
fn push_pop_1<R: Spsc>(b: &mut criterion::Bencher<'_>) {
    let (mut p, mut c) = R::new(1024);
    let v = [7u64; 8];
    b.iter(|| {
        let _ = R::push(&mut p, black_box(v));
        black_box(R::pop(&mut c))
    });
}

/// `STREAM` entries from a producer thread to this thread, `batch` at a time
/// (1: single push/pop). The consumer checks the sequence number in each entry.
fn stream<R: Spsc>(b: &mut criterion::Bencher<'_>, batch: usize) {
    b.iter(|| {
        let (mut p, mut c) = R::new(4096);
        let t = std::thread::spawn(move || {
            let mut i = 0u64;
            let mut src = vec![[0u64; 8]; batch];
            while i < STREAM {
                if batch == 1 {
                    if R::push(&mut p, [i; 8]) {
                        i += 1;
                    } else {
                        std::hint::spin_loop();
                    }
                } else {
                    let n = (STREAM - i).min(batch as u64) as usize;
                    for (k, e) in src.iter_mut().take(n).enumerate() {
                        *e = [i + k as u64; 8];
                    }
                    let pushed = R::push_slice(&mut p, &src[..n]);
                    if pushed == 0 {
                        std::hint::spin_loop();
                    }
                    i += pushed as u64;
                }
            }
        });
        let mut got = 0u64;
        let mut out = vec![[0u64; 8]; batch];
        while got < STREAM {
            if batch == 1 {
                match R::pop(&mut c) {
                    Some(v) => {
                        assert_eq!(v[0], got);
                        got += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            } else {
                let n = R::pop_slice(&mut c, &mut out);
                if n == 0 {
                    std::hint::spin_loop();
                }
                for v in &out[..n] {
                    assert_eq!(v[0], got);
                    got += 1;
                }
            }
        }
        let _ = t.join();
    });
}

fn ring_vs_rtrb(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_vs_rtrb");
    g.throughput(Throughput::Elements(1));
    g.bench_function("push_pop_1/ours", push_pop_1::<Ours>);
    g.bench_function("push_pop_1/rtrb", push_pop_1::<Rtrb>);
    g.throughput(Throughput::Elements(STREAM));
    g.sample_size(20);
    g.bench_function("stream_1/ours", |b| stream::<Ours>(b, 1));
    g.bench_function("stream_1/rtrb", |b| stream::<Rtrb>(b, 1));
    g.bench_function("stream_batch_64/ours", |b| stream::<Ours>(b, 64));
    g.bench_function("stream_batch_64/rtrb", |b| stream::<Rtrb>(b, 64));
    g.finish();
}

criterion_group!(benches, single_thread, two_threads, ring_vs_rtrb);
criterion_main!(benches);
