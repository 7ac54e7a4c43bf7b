//! The channel benchmark behind `lockstep bench channel`: throughput per
//! entry size and ack round trip per transport, with baselines measured in
//! the same run (raw loopback TCP streaming with std sockets, and a 64-byte
//! std TCP ping-pong), so the ratios compare like with like on a noisy host.
//!
//! Frame authentication is measured against a second baseline in the same
//! run: each (transport, size) case runs `rounds` times with the real
//! AES-256-GCM frame tags and `rounds` times, interleaved, with crc32c-only
//! framing (the pre-authentication format, reachable only from this
//! module: [`crate::testkit::Framing`] is crate-private). The best of each
//! is kept, and `auth_ratio` = authenticated / crc32c throughput; the
//! issue's goal is at least 0.95.
//!
//! Both ends run in this process on two threads; the transports are the real
//! ones (loopback TCP through io_uring, a memfd ring through shared memory).
//! Nothing is sent anywhere but 127.0.0.1.

use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use hdrhistogram::Histogram;
use thiserror::Error;
use tuning::{Profile, Waiter};

use crate::endpoint::{ChannelError, LogSender};
use crate::protocol::{Role, Session};
use crate::testkit::{
    BackupError, Content, Framing, RunSummary, fill_entry, run_backup, run_backup_framed,
    run_primary_framed,
};
use crate::transport::shm::{ShmListener, ShmTransport};
use crate::transport::uring_tcp::UringTcp;
use crate::transport::{Transport, TransportError};

/// Which transport a case ran over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// io_uring over loopback TCP.
    UringTcp,
    /// Shared memory rings.
    Shm,
}

impl TransportKind {
    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::UringTcp => "uring-tcp",
            Self::Shm => "shm",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    /// Entry sizes in bytes.
    pub sizes: Vec<usize>,
    /// Bytes of entries sent per (transport, size) case.
    pub bytes_per_case: u64,
    /// Most entries per case (bounds the small-entry cases).
    pub max_entries: u64,
    /// Ack round trips (and ping-pongs) measured per transport.
    pub rtt_samples: u64,
    /// Transports to measure.
    pub transports: Vec<TransportKind>,
    /// Channel settings.
    pub profile: Profile,
    /// Runs of each case with each framing (authenticated, crc32c
    /// baseline), interleaved; the best of each is reported.
    pub rounds: u32,
}

impl Default for BenchOpts {
    fn default() -> Self {
        // The two-core profile with a 10 s peer timeout: both ends share
        // this process, and on a loaded host a thread descheduled for more
        // than the profile's 200 ms made the other end declare it lost and
        // end the run (seen at load 7). The timeout changes no throughput.
        let mut profile = Profile::two_core();
        profile.liveness.peer_timeout = std::time::Duration::from_secs(10);
        Self {
            sizes: vec![64, 256, 1024, 4096, 16384, 65536],
            bytes_per_case: 1 << 30,
            max_entries: 8_000_000,
            rtt_samples: 20_000,
            transports: vec![TransportKind::UringTcp, TransportKind::Shm],
            profile,
            rounds: 3,
        }
    }
}

impl BenchOpts {
    /// A tiny run for tests and smoke checks.
    pub fn quick() -> Self {
        Self {
            sizes: vec![64, 4096],
            bytes_per_case: 4 << 20,
            max_entries: 20_000,
            rtt_samples: 200,
            rounds: 3,
            ..Self::default()
        }
    }
}

/// Benchmark failures.
#[derive(Debug, Error)]
pub enum BenchError {
    /// Setting up a connection failed.
    #[error("{transport}: setup failed")]
    Setup {
        /// Transport.
        transport: &'static str,
        /// Cause.
        #[source]
        source: TransportError,
    },
    /// The sending end failed.
    #[error("{transport}: sender failed")]
    Sender {
        /// Transport.
        transport: &'static str,
        /// Cause.
        #[source]
        source: ChannelError,
    },
    /// The receiving end failed.
    #[error("{transport}: receiver failed")]
    Receiver {
        /// Transport.
        transport: &'static str,
        /// Cause.
        #[source]
        source: BackupError,
    },
    /// A baseline's std socket failed.
    #[error("baseline {what} failed")]
    Baseline {
        /// Which baseline.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A helper thread panicked.
    #[error("a benchmark thread panicked")]
    Thread,
    /// Histogram setup failed.
    #[error("histogram: {0}")]
    Histogram(String),
}

/// Throughput of one (transport, entry size) case.
#[derive(Clone, Debug)]
pub struct ThroughputCase {
    /// Transport name.
    pub transport: &'static str,
    /// Entry size in bytes.
    pub entry_size: usize,
    /// Entries sent (and all acked).
    pub entries: u64,
    /// Seconds from the first push until the last entry was acked.
    pub seconds: f64,
    /// Entries per second.
    pub entries_per_sec: f64,
    /// Entry payload Gbit/s (framing not counted).
    pub gbit_per_sec: f64,
    /// Raw std TCP streaming Gbit/s of the same bytes, measured just before.
    pub baseline_gbit_per_sec: f64,
    /// `gbit_per_sec / baseline_gbit_per_sec`.
    pub ratio: f64,
    /// The same channel with crc32c-only framing (no authentication), in
    /// the same run: entry payload Gbit/s.
    pub crc_gbit_per_sec: f64,
    /// `gbit_per_sec / crc_gbit_per_sec`: what authentication leaves of
    /// the throughput (goal: at least 0.95).
    pub auth_ratio: f64,
    /// Batches sent.
    pub batches: u64,
    /// Sender stalls on a full transport.
    pub stalls: u64,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Samples.
    pub samples: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        let us = |q| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            p50_us: us(0.5),
            p99_us: us(0.99),
            p999_us: us(0.999),
            samples: h.len(),
        }
    }
}

/// Ack round trip of one transport: a 64-byte entry pushed and flushed, the
/// sender spinning until the ack that covers it arrives.
#[derive(Clone, Debug)]
pub struct AckRttCase {
    /// Transport name.
    pub transport: &'static str,
    /// Round-trip percentiles.
    pub rtt: Percentiles,
    /// `rtt.p50_us / baseline ping-pong p50`.
    pub ratio_p50: f64,
}

/// Everything one run measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Profile name.
    pub profile: &'static str,
    /// Throughput cases.
    pub throughput: Vec<ThroughputCase>,
    /// Ack round trips.
    pub ack_rtt: Vec<AckRttCase>,
    /// 64-byte blocking std TCP ping-pong.
    pub baseline_pingpong: Percentiles,
}

fn hist() -> Result<Histogram<u64>, BenchError> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| BenchError::Histogram(e.to_string()))
}

fn session(role: Role) -> Session {
    Session {
        vm_id: 0xbe_9c4,
        generation: 1,
        role,
        key: b"lockstep-bench".to_vec(),
    }
}

fn sock_path() -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("lockstep-bench-{}-{n}.sock", std::process::id()))
}

/// One end of a connected pair.
enum Primary {
    Uring(Box<UringTcp>),
    Shm(Box<ShmTransport>),
}

/// Sets up both ends; the backup end is handed to `backup` on a new thread.
fn connect<R, F>(
    kind: TransportKind,
    max_frame: usize,
    backup: F,
) -> Result<(Primary, std::thread::JoinHandle<Result<R, BenchError>>), BenchError>
where
    R: Send + 'static,
    F: FnOnce(Primary) -> Result<R, BenchError> + Send + 'static,
{
    let name = kind.name();
    let setup = move |source| BenchError::Setup {
        transport: name,
        source,
    };
    match kind {
        TransportKind::UringTcp => {
            let l = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Baseline {
                what: "bind",
                source,
            })?;
            let addr = l.local_addr().map_err(|source| BenchError::Baseline {
                what: "bind",
                source,
            })?;
            let h = std::thread::spawn(move || {
                let t = UringTcp::accept(&l, &session(Role::Backup), max_frame).map_err(setup)?;
                backup(Primary::Uring(Box::new(t)))
            });
            let t = UringTcp::connect(addr, &session(Role::Primary), max_frame).map_err(setup)?;
            Ok((Primary::Uring(Box::new(t)), h))
        }
        TransportKind::Shm => {
            let path = sock_path();
            let l = ShmListener::bind(&path).map_err(setup)?;
            let h = std::thread::spawn(move || {
                let t = l.accept(&session(Role::Backup), 16 << 20).map_err(setup)?;
                backup(Primary::Shm(Box::new(t)))
            });
            let t = ShmTransport::connect(&path, &session(Role::Primary)).map_err(setup);
            let _ = std::fs::remove_file(&path);
            Ok((Primary::Shm(Box::new(t?)), h))
        }
    }
}

fn join<R>(h: std::thread::JoinHandle<Result<R, BenchError>>) -> Result<R, BenchError> {
    h.join().map_err(|_| BenchError::Thread)?
}

fn throughput(
    kind: TransportKind,
    size: usize,
    entries: u64,
    profile: &Profile,
    framing: Framing,
) -> Result<(RunSummary, RunSummary), BenchError> {
    let name = kind.name();
    let max_frame = profile.batch.max_bytes as usize + 4096;
    let p2 = profile.clone();
    let (t, h) = connect(kind, max_frame, move |t| {
        let r = match t {
            Primary::Uring(t) => {
                run_backup_framed(*t, 1, &p2, entries, size, Content::TagOnly, |_| {}, framing)
            }
            Primary::Shm(t) => {
                run_backup_framed(*t, 1, &p2, entries, size, Content::TagOnly, |_| {}, framing)
            }
        };
        r.map_err(|source| BenchError::Receiver {
            transport: name,
            source,
        })
    })?;
    let sent = match t {
        Primary::Uring(t) => run_primary_framed(
            *t,
            1,
            profile,
            entries,
            size,
            Content::TagOnly,
            None,
            framing,
        ),
        Primary::Shm(t) => run_primary_framed(
            *t,
            1,
            profile,
            entries,
            size,
            Content::TagOnly,
            None,
            framing,
        ),
    };
    // If both ends failed, the receiver's error is the cause (the sender
    // only saw the connection close).
    let recv = join(h)?;
    let sent = sent.map_err(|source| BenchError::Sender {
        transport: name,
        source,
    })?;
    Ok((sent, recv))
}

fn ack_rtt_on<T: Transport>(
    t: T,
    samples: u64,
    profile: &Profile,
) -> Result<Histogram<u64>, ChannelError> {
    let mut s = LogSender::new(t, 1, 1, profile.batch, profile.liveness)?;
    let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .map_err(|e| ChannelError::Metrics(e.to_string()))?;
    let mut buf = [0u8; 64];
    let mut waiter = Waiter::new(tuning::PollMode::BusyPoll);
    for seq in 1..=samples {
        fill_entry(seq, &mut buf);
        while s.try_push(&buf)?.is_none() {
            s.poll()?;
        }
        let t0 = Instant::now();
        s.flush()?;
        while s.acked() < seq {
            match s.poll() {
                Ok(_) => waiter.idle(),
                Err(_) if s.acked() == seq => break,
                Err(e) => return Err(e),
            }
        }
        h.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    Ok(h)
}

fn ack_rtt(
    kind: TransportKind,
    samples: u64,
    profile: &Profile,
) -> Result<Histogram<u64>, BenchError> {
    let name = kind.name();
    let max_frame = profile.batch.max_bytes as usize + 4096;
    let p2 = profile.clone();
    let (t, h) = connect(kind, max_frame, move |t| {
        let r = match t {
            Primary::Uring(t) => run_backup(*t, 1, &p2, samples, 64, Content::Full, |_| {}),
            Primary::Shm(t) => run_backup(*t, 1, &p2, samples, 64, Content::Full, |_| {}),
        };
        r.map_err(|source| BenchError::Receiver {
            transport: name,
            source,
        })
    })?;
    let hist = match t {
        Primary::Uring(t) => ack_rtt_on(*t, samples, profile),
        Primary::Shm(t) => ack_rtt_on(*t, samples, profile),
    };
    join(h)?;
    let hist = hist.map_err(|source| BenchError::Sender {
        transport: name,
        source,
    })?;
    Ok(hist)
}

/// Raw std TCP streaming of `bytes` bytes in 256 KiB writes; Gbit/s.
fn baseline_stream(bytes: u64) -> Result<f64, BenchError> {
    let io = |what| move |source| BenchError::Baseline { what, source };
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("stream bind"))?;
    let addr = l.local_addr().map_err(io("stream bind"))?;
    let h = std::thread::spawn(move || -> Result<(), BenchError> {
        let (mut s, _) = l.accept().map_err(io("stream accept"))?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).map_err(io("stream read"))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        s.write_all(b"k").map_err(io("stream ack"))?;
        Ok(())
    });
    let mut s = TcpStream::connect(addr).map_err(io("stream connect"))?;
    let buf = vec![0x5au8; 256 << 10];
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).map_err(io("stream write"))?;
        sent += n as u64;
    }
    let mut k = [0u8; 1];
    s.read_exact(&mut k).map_err(io("stream final ack"))?;
    let secs = start.elapsed().as_secs_f64();
    join(h)?;
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// 64-byte blocking std TCP ping-pong.
fn baseline_pingpong(samples: u64) -> Result<Histogram<u64>, BenchError> {
    let io = |what| move |source| BenchError::Baseline { what, source };
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("ping bind"))?;
    let addr = l.local_addr().map_err(io("ping bind"))?;
    let h = std::thread::spawn(move || -> Result<(), BenchError> {
        let (mut s, _) = l.accept().map_err(io("ping accept"))?;
        s.set_nodelay(true).map_err(io("ping nodelay"))?;
        let mut buf = [0u8; 64];
        for _ in 0..samples {
            s.read_exact(&mut buf).map_err(io("pong read"))?;
            s.write_all(&buf).map_err(io("pong write"))?;
        }
        Ok(())
    });
    let mut s = TcpStream::connect(addr).map_err(io("ping connect"))?;
    s.set_nodelay(true).map_err(io("ping nodelay"))?;
    let mut hist = hist()?;
    let mut buf = [7u8; 64];
    for _ in 0..samples {
        let t0 = Instant::now();
        s.write_all(&buf).map_err(io("ping write"))?;
        s.read_exact(&mut buf).map_err(io("ping read"))?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
    }
    join(h)?;
    Ok(hist)
}

/// Runs the whole benchmark.
pub fn run(opts: &BenchOpts) -> Result<BenchReport, BenchError> {
    let ping = Percentiles::of(&baseline_pingpong(opts.rtt_samples)?);
    let mut throughput_cases = Vec::new();
    for &size in &opts.sizes {
        let entries = (opts.bytes_per_case / size.max(1) as u64).clamp(1, opts.max_entries);
        let bytes = entries * size as u64;
        let base = baseline_stream(bytes)?;
        for &kind in &opts.transports {
            // Interleaved, so that a burst of load elsewhere hits both.
            let mut best: Option<(f64, RunSummary)> = None;
            let mut best_crc = 0f64;
            for round in 0..opts.rounds.max(1) {
                let order = if round % 2 == 0 {
                    [Framing::Authenticated, Framing::Crc32cBaseline]
                } else {
                    [Framing::Crc32cBaseline, Framing::Authenticated]
                };
                for framing in order {
                    let (sent, _recv) = throughput(kind, size, entries, &opts.profile, framing)?;
                    let secs = sent.elapsed.as_secs_f64().max(1e-9);
                    match framing {
                        Framing::Authenticated => {
                            if best.as_ref().is_none_or(|(s, _)| secs < *s) {
                                best = Some((secs, sent));
                            }
                        }
                        Framing::Crc32cBaseline => {
                            best_crc = best_crc.max(bytes as f64 * 8.0 / secs / 1e9);
                        }
                    }
                }
            }
            let Some((secs, sent)) = best else {
                return Err(BenchError::Thread);
            };
            let gbit = bytes as f64 * 8.0 / secs / 1e9;
            throughput_cases.push(ThroughputCase {
                transport: kind.name(),
                entry_size: size,
                entries,
                seconds: secs,
                entries_per_sec: entries as f64 / secs,
                gbit_per_sec: gbit,
                baseline_gbit_per_sec: base,
                ratio: gbit / base,
                crc_gbit_per_sec: best_crc,
                auth_ratio: gbit / best_crc.max(1e-9),
                batches: sent.metrics.batches,
                stalls: sent.metrics.transport_stalls,
            });
        }
    }
    let mut rtt_cases = Vec::new();
    for &kind in &opts.transports {
        let rtt = Percentiles::of(&ack_rtt(kind, opts.rtt_samples, &opts.profile)?);
        rtt_cases.push(AckRttCase {
            transport: kind.name(),
            ratio_p50: rtt.p50_us / ping.p50_us.max(1e-9),
            rtt,
        });
    }
    Ok(BenchReport {
        profile: opts.profile.name,
        throughput: throughput_cases,
        ack_rtt: rtt_cases,
        baseline_pingpong: ping,
    })
}

fn pct_json(p: &Percentiles) -> String {
    format!(
        "{{\"p50_us\":{:.3},\"p99_us\":{:.3},\"p999_us\":{:.3},\"samples\":{}}}",
        p.p50_us, p.p99_us, p.p999_us, p.samples
    )
}

impl BenchReport {
    /// The report as JSON (no serde), for the perf harness; `git_rev` is
    /// recorded as given.
    pub fn to_json(&self, git_rev: &str) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"bench\":\"channel\",\"git_rev\":\"{}\",\"profile\":\"{}\",\"baseline_pingpong_64b\":{},\"throughput\":[",
            git_rev.replace(['"', '\\'], ""),
            self.profile,
            pct_json(&self.baseline_pingpong)
        );
        for (i, c) in self.throughput.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"transport\":\"{}\",\"entry_size\":{},\"entries\":{},\"seconds\":{:.6},\"entries_per_sec\":{:.0},\"gbit_per_sec\":{:.3},\"baseline_gbit_per_sec\":{:.3},\"ratio\":{:.3},\"crc32c_gbit_per_sec\":{:.3},\"auth_ratio\":{:.3},\"batches\":{},\"stalls\":{}}}",
                if i > 0 { "," } else { "" },
                c.transport,
                c.entry_size,
                c.entries,
                c.seconds,
                c.entries_per_sec,
                c.gbit_per_sec,
                c.baseline_gbit_per_sec,
                c.ratio,
                c.crc_gbit_per_sec,
                c.auth_ratio,
                c.batches,
                c.stalls
            );
        }
        s.push_str("],\"ack_rtt\":[");
        for (i, c) in self.ack_rtt.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"transport\":\"{}\",\"rtt\":{},\"ratio_p50_vs_pingpong\":{:.3}}}",
                if i > 0 { "," } else { "" },
                c.transport,
                pct_json(&c.rtt),
                c.ratio_p50
            );
        }
        s.push_str("]}");
        s
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "channel benchmark, profile {}", self.profile)?;
        writeln!(
            f,
            "(Gbit/s with AES-256-GCM frame tags; crc32c Gb/s: the same channel with crc32c-only framing in the same run; auth/crc: their ratio, goal >= 0.95)"
        )?;
        writeln!(
            f,
            "{:<10} {:>7} {:>10} {:>12} {:>9} {:>12} {:>6} {:>11} {:>9} {:>8}",
            "transport",
            "size",
            "entries",
            "entries/s",
            "Gbit/s",
            "raw TCP Gb/s",
            "ratio",
            "crc32c Gb/s",
            "auth/crc",
            "batches"
        )?;
        for c in &self.throughput {
            writeln!(
                f,
                "{:<10} {:>7} {:>10} {:>12.0} {:>9.2} {:>12.2} {:>6.2} {:>11.2} {:>9.3} {:>8}",
                c.transport,
                c.entry_size,
                c.entries,
                c.entries_per_sec,
                c.gbit_per_sec,
                c.baseline_gbit_per_sec,
                c.ratio,
                c.crc_gbit_per_sec,
                c.auth_ratio,
                c.batches
            )?;
        }
        let p = &self.baseline_pingpong;
        writeln!(
            f,
            "64 B std TCP ping-pong: p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs",
            p.p50_us, p.p99_us, p.p999_us
        )?;
        for c in &self.ack_rtt {
            writeln!(
                f,
                "ack round trip {:<10} p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs  (p50 {:.2}x ping-pong)",
                c.transport, c.rtt.p50_us, c.rtt.p99_us, c.rtt.p999_us, c.ratio_p50
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quick_bench_runs_and_reports() {
        let mut opts = BenchOpts::quick();
        // Other tests of this binary spin too: no false peer-silence alarms.
        opts.profile.liveness.peer_timeout = std::time::Duration::from_secs(5);
        let r = run(&opts).unwrap();
        assert_eq!(r.throughput.len(), 4);
        assert_eq!(r.ack_rtt.len(), 2);
        assert!(r.throughput.iter().all(|c| c.gbit_per_sec > 0.0
            && c.baseline_gbit_per_sec > 0.0
            && c.crc_gbit_per_sec > 0.0
            && c.auth_ratio > 0.0));
        let j = r.to_json("abc");
        assert!(j.starts_with("{\"bench\":\"channel\",\"git_rev\":\"abc\""));
        assert!(j.contains("\"transport\":\"shm\""));
        assert!(j.contains("\"auth_ratio\":"));
        eprintln!("{r}");
    }
}
