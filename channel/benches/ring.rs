//! Criterion benchmarks of the SPSC ring: single-thread push/pop cost and a
//! two-thread streaming throughput.

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

criterion_group!(benches, single_thread, two_threads);
criterion_main!(benches);
