//! The channel benchmark over RDMA next to io_uring TCP, for the soft-RoCE
//! perf gate (`ci/softroce/run.sh`): the guest runs perftest's
//! `ib_write_bw` / `ib_write_lat` on the same device in the same boot, and
//! the host turns the figures into ratios and checks them against
//! `perf/baselines/rdma.txt`.
//!
//! Runs only with `LOCKSTEP_RDMA_BENCH=1` (and an RDMA device); prints one
//! line per case:
//!
//! ```text
//! BENCH <transport> bw_size=4096 bw_MBps=<entry MB/s> rtt_p50_us=<ack round trip> rtt_p99_us=...
//! ```
//!
//! Throughput: the primary streams entries of `bw_size` bytes (only the
//! sequence tag written and checked, so the channel is measured, not the
//! pattern) until all are acked. Round trip: one 64-byte entry at a time,
//! from `try_push` to the ack that covers it. Both ends run on two threads
//! of this process with the two-core profile's adaptive polling.
#![cfg(feature = "rdma")]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use channel::endpoint::LogSender;
use channel::protocol::{Role, Session};
use channel::testkit::{Content, error_chain, run_backup, run_primary};
use channel::transport::Transport;
use channel::transport::rdma::{RdmaConfig, RdmaTransport, probe};
use channel::transport::uring_tcp::UringTcp;
use tuning::Profile;

const GEN: u64 = 3;

fn profile() -> Profile {
    // The production profile (adaptive polling): on a small guest, two
    // busy-polling threads starve rxe's own kernel work.
    let mut p = Profile::two_core();
    p.liveness.peer_timeout = Duration::from_secs(5);
    p.liveness.heartbeat = Duration::from_millis(50);
    p
}

fn session(role: Role) -> Session {
    Session {
        vm_id: 9,
        generation: GEN,
        role,
        key: b"bench-key".to_vec(),
    }
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

#[derive(Clone, Copy)]
enum Kind {
    Rdma,
    Tcp,
}

fn max_frame() -> usize {
    profile().batch.max_bytes as usize + 4096
}

/// Runs `primary` against a backup thread that receives `n` entries of `size`.
fn pair<R: Send + 'static>(
    kind: Kind,
    n: u64,
    size: usize,
    primary: impl FnOnce(Box<dyn FnOnce() -> Box<dyn TransportBox>>) -> R,
) -> R {
    let ip = std::env::var("LOCKSTEP_RDMA_TEST_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let ip = match kind {
        Kind::Rdma => ip,
        Kind::Tcp => "127.0.0.1".into(),
    };
    let l = TcpListener::bind(format!("{ip}:0")).expect("bind");
    let addr: SocketAddr = l.local_addr().expect("addr");
    let backup = std::thread::spawn(move || {
        let p = profile();
        let s = session(Role::Backup);
        let r = match kind {
            Kind::Rdma => {
                let cfg = RdmaConfig::from_env(max_frame()).expect("settings");
                let t = RdmaTransport::accept(&l, &s, &cfg).expect("rdma accept");
                run_backup(t, GEN, &p, n, size, Content::TagOnly, |_| {})
            }
            Kind::Tcp => {
                let t = UringTcp::accept(&l, &s, max_frame()).expect("tcp accept");
                run_backup(t, GEN, &p, n, size, Content::TagOnly, |_| {})
            }
        };
        if let Err(e) = r {
            panic!("backup: {}", error_chain(&e));
        }
    });
    let connect: Box<dyn FnOnce() -> Box<dyn TransportBox>> = Box::new(move || {
        let s = session(Role::Primary);
        match kind {
            Kind::Rdma => {
                let cfg = RdmaConfig::from_env(max_frame()).expect("settings");
                Box::new(RdmaTransport::connect(addr, &s, &cfg).expect("rdma connect"))
            }
            Kind::Tcp => Box::new(UringTcp::connect(addr, &s, max_frame()).expect("tcp connect")),
        }
    });
    let r = primary(connect);
    backup.join().expect("backup thread");
    r
}

/// Object-safe wrapper so one driver serves both transports.
trait TransportBox: Send {
    fn run_bw(self: Box<Self>, n: u64, size: usize) -> Duration;
    fn run_rtt(self: Box<Self>, n: u64) -> Vec<u64>;
}

impl<T: Transport + 'static> TransportBox for T {
    fn run_bw(self: Box<Self>, n: u64, size: usize) -> Duration {
        match run_primary(*self, GEN, &profile(), n, size, Content::TagOnly, None) {
            Ok(s) => s.elapsed,
            Err(e) => panic!("primary: {}", error_chain(&e)),
        }
    }

    fn run_rtt(self: Box<Self>, n: u64) -> Vec<u64> {
        let p = profile();
        let mut s = match LogSender::new(*self, GEN, 1, p.batch, p.liveness) {
            Ok(s) => s,
            Err(e) => panic!("sender: {}", error_chain(&e)),
        };
        let mut out = Vec::with_capacity(n as usize);
        let mut buf = [0u8; 64];
        for seq in 1..=n {
            buf[..8].copy_from_slice(&seq.to_le_bytes());
            let t0 = Instant::now();
            loop {
                match s.try_push(&buf) {
                    Ok(Some(_)) => break,
                    Ok(None) => {
                        s.poll().expect("poll");
                    }
                    Err(e) => panic!("push: {}", error_chain(&e)),
                }
            }
            s.flush().expect("flush");
            while s.acked() < seq {
                if let Err(e) = s.poll() {
                    panic!("poll: {}", error_chain(&e));
                }
            }
            out.push(t0.elapsed().as_nanos() as u64);
        }
        out
    }
}

fn pct(v: &mut [u64], q: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1e3
}

#[test]
fn bench_rdma_vs_uring_tcp() {
    if std::env::var("LOCKSTEP_RDMA_BENCH").as_deref() != Ok("1") {
        eprintln!("bench_rdma_vs_uring_tcp: skipped (set LOCKSTEP_RDMA_BENCH=1)");
        return;
    }
    if let Err(e) = probe() {
        panic!("LOCKSTEP_RDMA_BENCH=1 but {e}");
    }
    let size = env_u64("LOCKSTEP_BENCH_SIZE", 4096) as usize;
    let bytes = env_u64("LOCKSTEP_BENCH_BYTES", 64 << 20);
    let n = (bytes / size as u64).max(1000);
    let rtt_n = env_u64("LOCKSTEP_BENCH_RTT", 2000);
    for (kind, name) in [(Kind::Rdma, "rdma"), (Kind::Tcp, "uring-tcp")] {
        let elapsed = pair(kind, n, size, |c| c().run_bw(n, size));
        let mbps = (n * size as u64) as f64 / elapsed.as_secs_f64() / 1e6;
        let mut rtt = pair(kind, rtt_n, 64, |c| c().run_rtt(rtt_n));
        let (p50, p99) = (pct(&mut rtt, 0.5), pct(&mut rtt, 0.99));
        println!(
            "BENCH {name} bw_size={size} bw_entries={n} bw_MBps={mbps:.2} rtt_samples={rtt_n} rtt_p50_us={p50:.2} rtt_p99_us={p99:.2}"
        );
    }
}
