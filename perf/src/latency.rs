//! `lockstep bench latency`: what the Output Rule costs a request/response
//! service, against what this host's wake-ups cost, in one run.
//!
//! ```text
//!  testbed (unshaped links, namespaces of this run's own):
//!   client ns: stock redis-benchmark -h GUEST ──▶ host a: guest `net` (Redis on 6379)
//!                                                 FT off: lockstep run
//!                                                 FT on : lockstep primary ══ tcp | shm ══ host b: lockstep backup
//!  physical baseline (this process, same cores, same run):
//!   thread ping-pong   A ─unpark─▶ B ─unpark─▶ A       (futex wake-up, both ways)
//!   process ping-pong  parent ─pipe─▶ child ─pipe─▶ parent (fork; read/write/_exit only)
//!   spin ping-pong     A ─store─▶ B ─store─▶ A          (both spin on one atomic)
//! ```
//!
//! Every round starts each configuration fresh (FT off, FT on over tcp,
//! FT on over shm; the order rotates every round) and runs two workloads
//! of `redis-benchmark --csv`:
//!
//! - **many**: `-c 50 -t ping,set,get,incr`: requests/s (summed over the
//!   four tests' times), FT on / FT off paired within the round;
//! - **one**: `-c 1 -t set`: requests/s and p50/p99 latency; the *added*
//!   latency is FT on minus FT off of the same round.
//!
//! The primary's `--stats` gives the held-output curve (the gate's
//! hdrhistogram, at fixed quantiles) and the ack round trip; the report
//! shows the hold p50 as a multiple of the thread wake-up round trip.
//! Ratios and differences are medians over rounds: the host is shared.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use replica::stats::PrimaryStats;
use serde_json::{Value, json};
use testbed::Ns;

use crate::table2::hosts::Hosts;
use crate::table2::load::{Alive, ClientFigures, Load, Timing};
use crate::table2::runner::{self, Bench};
use crate::table2::scenario::{Config, Direction, Variant};
use crate::table2::stats::Measured;
use crate::{BenchError, Report, git_revision, median};

/// The guest's Redis port.
pub const REDIS_PORT: u16 = 6379;

/// How much to run.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Rounds (each runs every configuration once).
    pub rounds: usize,
    /// Requests of the 50-client workload, per test.
    pub many_requests: u32,
    /// Requests of the one-client workload.
    pub one_requests: u32,
    /// Round trips of each physical ping-pong.
    pub pings: u32,
}

impl Options {
    /// About a minute on a quiet 2-core host.
    pub fn quick() -> Self {
        Self {
            rounds: 3,
            many_requests: 10_000,
            one_requests: 3_000,
            pings: 20_000,
        }
    }

    /// The full run.
    pub fn full() -> Self {
        Self {
            rounds: 5,
            many_requests: 30_000,
            one_requests: 10_000,
            pings: 100_000,
        }
    }
}

/// `ft-off`, `tcp`, `shm`.
fn short_name(config: Config) -> String {
    match config {
        Config::FtOff => "ft-off".into(),
        Config::FtOn(variant) => variant.name(),
    }
}

/// The configurations, in the first round's order.
fn configs() -> [Config; 3] {
    [
        Config::FtOff,
        Config::FtOn(Variant::tcp(None)),
        Config::FtOn(Variant::shm()),
    ]
}

/// One `redis-benchmark` test's CSV row.
#[derive(Clone, Debug, PartialEq)]
pub struct CsvRow {
    /// `SET`, `PING_INLINE`, ...
    pub test: String,
    /// Requests per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
}

/// Parses `redis-benchmark --csv` output (7.x: `"test","rps",
/// "avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",
/// "p99_latency_ms","max_latency_ms"`). Lines that are not data rows are
/// skipped; a data row with unreadable figures is an error naming it.
pub fn parse_csv(text: &str) -> Result<Vec<CsvRow>, String> {
    let mut header: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for line in text.lines() {
        let fields: Vec<String> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"').to_string())
            .collect();
        if fields.len() < 2 {
            continue;
        }
        if fields[0] == "test" {
            header = Some(fields);
            continue;
        }
        let Some(names) = &header else { continue };
        let column = |name: &str| -> Result<f64, String> {
            let index = names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| format!("redis-benchmark CSV has no column '{name}'"))?;
            fields
                .get(index)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| format!("redis-benchmark CSV row '{line}': bad '{name}'"))
        };
        rows.push(CsvRow {
            test: fields[0].clone(),
            rps: column("rps")?,
            p50_us: column("p50_latency_ms")? * 1e3,
            p99_us: column("p99_latency_ms")? * 1e3,
        });
    }
    if rows.is_empty() {
        return Err(format!(
            "redis-benchmark printed no results: {}",
            text.trim()
        ));
    }
    Ok(rows)
}

/// Requests/s over several tests of `requests` each: total requests over
/// total time.
fn combined_rps(rows: &[CsvRow]) -> f64 {
    let seconds: f64 = rows.iter().map(|r| 1.0 / r.rps).sum();
    rows.len() as f64 / seconds
}

/// Only the readiness port: the runner waits for it. The latency bench
/// drives its own client (redis-benchmark), not a bandwidth load.
struct RedisReady;

impl Load for RedisReady {
    fn name(&self) -> &'static str {
        "redis-benchmark"
    }

    fn ready_port(&self) -> u16 {
        REDIS_PORT
    }

    fn run(
        &self,
        _hosts: &Hosts,
        _direction: Direction,
        _timing: Timing,
        _pids: &[(&'static str, u32)],
        _alive: &mut Alive<'_>,
    ) -> Result<ClientFigures, String> {
        Err("the latency bench drives redis-benchmark itself".into())
    }
}

/// One configuration's measurement in one round.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Round number.
    pub round: usize,
    /// `ft-off`, `tcp`, `shm`.
    pub config: String,
    /// 50 clients: requests/s.
    pub many_rps: f64,
    /// One client: requests/s, p50 and p99 in µs.
    pub one: CsvRow,
    /// Held output (µs at quantile), ack RTT (FT on only).
    pub hold_us: Vec<(f64, f64)>,
    /// Frames the gate released.
    pub released: f64,
    /// Ack round trip p50/p99, µs.
    pub ack_rtt_us: (f64, f64),
    /// Per-hop timing: (hop, p50 µs, p99 µs), see [`HOPS`].
    pub hops: Vec<(String, f64, f64)>,
}

/// The hops the primary (`--stats` `hops_ns`) and the backup (its `lag:`
/// line) time, in path order, and what each covers.
pub const HOPS: &[(&str, &str)] = &[
    (
        "gate_submit_wait",
        "vCPU: waiting for the gate's lock in submit",
    ),
    (
        "sender_wake",
        "doorbell rung by the vCPU -> sleeping sender runs",
    ),
    (
        "sender_batch_fill",
        "first entry into a batch -> batch sealed onto the transport",
    ),
    (
        "ack_rtt",
        "batch sealed -> its ack read by the sender (wire both ways + backup)",
    ),
    (
        "ack_rtt_sender_slept",
        "ack_rtt of batches during which the sender slept (its wake-up included)",
    ),
    (
        "ack_rtt_sender_awake",
        "ack_rtt of batches whose ack found the sender polling",
    ),
    ("backup_ack_delay", "backup: batch received -> ack sent"),
    (
        "backup_slept_pct",
        "backup: % of batches that arrived after its receiver slept (a %, not µs)",
    ),
    (
        "ack_release",
        "ack read -> gate released what it covers (TAP writes incl.)",
    ),
    ("gate_tap_write", "one frame's TAP write"),
    (
        "gate_hold",
        "frame submitted -> released (the whole Output Rule wait)",
    ),
];

/// Reads the hop figures from the primary's stats JSON and the backup's
/// output.
fn hops(stats: Option<&PrimaryStats>, backup_output: &str) -> Vec<(String, f64, f64)> {
    let mut hops = Vec::new();
    for (name, _) in HOPS {
        if *name == "backup_slept_pct" {
            let after = "µs after receipt; ";
            let slept = crate::table2::stats::number_after(backup_output, after);
            let of = backup_output.find(after).and_then(|at| {
                crate::table2::stats::number_after(&backup_output[at + after.len()..], " of ")
            });
            if let (Some(slept), Some(of)) = (slept, of)
                && of > 0.0
            {
                let pct = 100.0 * slept / of;
                hops.push((name.to_string(), pct, pct));
            }
            continue;
        }
        if *name == "backup_ack_delay" {
            let p50 = crate::table2::stats::number_after(backup_output, "acks sent p50 ");
            let p99 = backup_output
                .find("acks sent p50 ")
                .and_then(|at| crate::table2::stats::number_after(&backup_output[at..], "p99 "));
            if let (Some(p50), Some(p99)) = (p50, p99) {
                hops.push((name.to_string(), p50, p99));
            }
            continue;
        }
        if let Some([p50, p99, _]) = stats.and_then(|s| s.hops_ns.get(*name)) {
            hops.push((name.to_string(), *p50 as f64 / 1e3, *p99 as f64 / 1e3));
        }
    }
    hops
}

fn redis_benchmark(hosts: &Hosts, args: &[String]) -> Result<Vec<CsvRow>, String> {
    let guest = hosts.guest().to_string();
    let mut command = hosts.command(Ns::Client, Path::new("redis-benchmark"))?;
    command
        .args(["-h", &guest, "-p", &REDIS_PORT.to_string(), "--csv"])
        .args(args)
        .stdin(Stdio::null());
    let output = command
        .output()
        .map_err(|e| format!("cannot run redis-benchmark (apt-get install redis-tools): {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "redis-benchmark {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    parse_csv(&text)
}

fn measure(
    bench: &Bench,
    options: &Options,
    round: usize,
    config: Config,
) -> Result<Sample, String> {
    let mut running = runner::start(bench, config)?;
    let many = redis_benchmark(
        bench.hosts,
        &[
            "-c".into(),
            "50".into(),
            "-n".into(),
            options.many_requests.to_string(),
            "-t".into(),
            "ping,set,get,incr".into(),
        ],
    );
    let one = many.and_then(|many| {
        redis_benchmark(
            bench.hosts,
            &[
                "-c".into(),
                "1".into(),
                "-n".into(),
                options.one_requests.to_string(),
                "-t".into(),
                "set".into(),
            ],
        )
        .map(|one| (many, one))
    });
    let alive = running.check_alive();
    running.stop();
    let (many, one) = one?;
    alive?;
    let mut measured = Measured::new(f64::NAN, f64::NAN, Default::default());
    running.read_reports(&mut measured);
    let stats = std::fs::read_to_string(bench.dir.join("primary.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<PrimaryStats>(&text).ok());
    let backup_output = running
        .procs
        .iter()
        .find(|p| p.role == "backup")
        .map(|p| p.output())
        .unwrap_or_default();
    let hops = hops(stats.as_ref(), &backup_output);
    Ok(Sample {
        round,
        config: short_name(config),
        many_rps: combined_rps(&many),
        one: one
            .into_iter()
            .next()
            .ok_or("redis-benchmark -t set printed no row")?,
        hold_us: measured.hold_us.clone(),
        released: measured.frames_released,
        ack_rtt_us: (measured.ack_rtt_p50_us, measured.ack_rtt_p99_us),
        hops,
    })
}

/// Round-trip times of one physical ping-pong, ns.
#[derive(Clone, Debug)]
pub struct PingPong {
    /// `thread`, `process`, `spin`.
    pub name: &'static str,
    /// Round trips, ns.
    pub rtt_ns: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .expect("1 ns .. 60 s at 3 significant digits are valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let _ = hist.record(ns.max(1));
}

/// Two threads that wake each other with park/unpark (a futex each way).
pub fn thread_ping_pong(pings: u32) -> PingPong {
    let turn = Arc::new(AtomicU64::new(0));
    let mut rtt_ns = histogram();
    let main = std::thread::current();
    let peer_turn = Arc::clone(&turn);
    let peer = std::thread::spawn(move || {
        for i in 0..u64::from(pings) {
            // Wait for the ping (2i+1), answer with 2i+2.
            while peer_turn.load(Ordering::Acquire) != 2 * i + 1 {
                std::thread::park();
            }
            peer_turn.store(2 * i + 2, Ordering::Release);
            main.unpark();
        }
    });
    let peer_thread = peer.thread().clone();
    for i in 0..u64::from(pings) {
        let began = Instant::now();
        turn.store(2 * i + 1, Ordering::Release);
        peer_thread.unpark();
        while turn.load(Ordering::Acquire) != 2 * i + 2 {
            std::thread::park();
        }
        record(&mut rtt_ns, began);
    }
    let _ = peer.join();
    PingPong {
        name: "thread",
        rtt_ns,
    }
}

/// Two threads that spin on one atomic (no wake-up: cache-line transfer,
/// or a time slice when both share a core).
pub fn spin_ping_pong(pings: u32) -> PingPong {
    let turn = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut rtt_ns = histogram();
    let (peer_turn, peer_stop) = (Arc::clone(&turn), Arc::clone(&stop));
    let peer = std::thread::spawn(move || {
        let mut expect = 1;
        while !peer_stop.load(Ordering::Relaxed) {
            if peer_turn.load(Ordering::Acquire) == expect {
                peer_turn.store(expect + 1, Ordering::Release);
                expect += 2;
            } else {
                std::hint::spin_loop();
            }
        }
    });
    for i in 0..u64::from(pings) {
        let began = Instant::now();
        turn.store(2 * i + 1, Ordering::Release);
        while turn.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
        record(&mut rtt_ns, began);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = peer.join();
    PingPong {
        name: "spin",
        rtt_ns,
    }
}

/// A forked child echoes one byte per round trip over two pipes.
pub fn process_ping_pong(pings: u32) -> Result<PingPong, String> {
    let mut to_child = [0i32; 2];
    let mut to_parent = [0i32; 2];
    // SAFETY: pipe2(2) writes two descriptors into each valid 2-int array.
    let made = unsafe {
        libc::pipe2(to_child.as_mut_ptr(), libc::O_CLOEXEC) == 0
            && libc::pipe2(to_parent.as_mut_ptr(), libc::O_CLOEXEC) == 0
    };
    if !made {
        return Err(format!(
            "cannot make the ping-pong pipes: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fork(2) in a process that may have other threads: the child
    // only calls read(2), write(2) and _exit(2), which are
    // async-signal-safe, on descriptors it owns, with a stack buffer; it
    // takes no lock and allocates nothing.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: closing the parent's ends in the child (descriptors this
        // process owns), so that the parent closing its write end is EOF
        // here.
        unsafe {
            libc::close(to_child[1]);
            libc::close(to_parent[0]);
        }
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: a read of 1 byte into a 1-byte stack buffer and a
            // write of it, on the pipes made above; _exit ends the child
            // without running the parent's atexit handlers.
            unsafe {
                if libc::read(to_child[0], byte.as_mut_ptr().cast(), 1) != 1
                    || libc::write(to_parent[1], byte.as_ptr().cast(), 1) != 1
                {
                    libc::_exit(0);
                }
            }
        }
    }
    // SAFETY: closing the child's ends in the parent (descriptors we own).
    unsafe {
        libc::close(to_child[0]);
        libc::close(to_parent[1]);
    }
    let result = if pid < 0 {
        Err(format!(
            "cannot fork the ping-pong child: {}",
            std::io::Error::last_os_error()
        ))
    } else {
        let mut rtt_ns = histogram();
        let mut byte = [1u8; 1];
        let mut failed = None;
        for _ in 0..pings {
            let began = Instant::now();
            // SAFETY: 1-byte write and read with a 1-byte stack buffer on
            // our own ends of the pipes.
            let ok = unsafe {
                libc::write(to_child[1], byte.as_ptr().cast(), 1) == 1
                    && libc::read(to_parent[0], byte.as_mut_ptr().cast(), 1) == 1
            };
            if !ok {
                failed = Some(std::io::Error::last_os_error());
                break;
            }
            record(&mut rtt_ns, began);
        }
        match failed {
            Some(e) => Err(format!("the ping-pong child stopped answering: {e}")),
            None => Ok(PingPong {
                name: "process",
                rtt_ns,
            }),
        }
    };
    // SAFETY: closing our ends (the child then reads EOF and exits), then
    // reaping our own child.
    unsafe {
        libc::close(to_child[1]);
        libc::close(to_parent[0]);
        if pid > 0 {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
    result
}

fn physical(pings: u32) -> Result<Vec<PingPong>, String> {
    Ok(vec![
        thread_ping_pong(pings),
        process_ping_pong(pings)?,
        spin_ping_pong(pings),
    ])
}

fn us(hist: &Histogram<u64>, q: f64) -> f64 {
    hist.value_at_quantile(q) as f64 / 1e3
}

fn hold_at(sample: &Sample, q: f64) -> f64 {
    sample
        .hold_us
        .iter()
        .find(|(p, _)| (p - q).abs() < 1e-9)
        .map_or(f64::NAN, |(_, v)| *v)
}

/// Median over rounds of `f(ft_on, ft_off)` paired within each round.
fn paired(samples: &[Sample], config: &str, f: impl Fn(&Sample, &Sample) -> f64) -> f64 {
    let mut values: Vec<f64> = samples
        .iter()
        .filter(|s| s.config == config)
        .filter_map(|on| {
            samples
                .iter()
                .find(|off| off.round == on.round && off.config == "ft-off")
                .map(|off| f(on, off))
        })
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        f64::NAN
    } else {
        median(&mut values)
    }
}

fn median_of(samples: &[Sample], config: &str, f: impl Fn(&Sample) -> f64) -> f64 {
    let mut values: Vec<f64> = samples
        .iter()
        .filter(|s| s.config == config)
        .map(f)
        .filter(|v| v.is_finite())
        .collect();
    if values.is_empty() {
        f64::NAN
    } else {
        median(&mut values)
    }
}

/// Runs the benchmark with the `lockstep` executable `exe`.
pub fn run_with(exe: &Path, options: &Options) -> Result<Report, BenchError> {
    let began = Instant::now();
    let dir = scratch_dir()?;
    let baseline_before = physical(options.pings).map_err(BenchError::Setup)?;
    let mut hosts = Hosts::up().map_err(BenchError::Setup)?;
    hosts.shape(None, None).map_err(BenchError::Setup)?;
    let load = RedisReady;
    let mut samples = Vec::new();
    let mut failures = Vec::new();
    {
        let bench = Bench {
            exe,
            hosts: &mut hosts,
            load: &load,
            timing: Timing {
                warmup: 0.0,
                seconds: 0.0,
            },
            dir: &dir,
        };
        let order = configs();
        for round in 0..options.rounds {
            for k in 0..order.len() {
                let config = order[(k + round) % order.len()];
                match measure(&bench, options, round, config) {
                    Ok(sample) => samples.push(sample),
                    Err(e) => failures.push(format!("round {round} {}: {e}", config.name())),
                }
            }
        }
    }
    let baseline_after = physical(options.pings).map_err(BenchError::Setup)?;
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(report(
        options,
        &samples,
        &failures,
        &[baseline_before, baseline_after],
        began.elapsed(),
    ))
}

/// `lockstep bench latency [--quick]`, run inside the `lockstep` binary.
pub fn run(quick: bool) -> Result<Report, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup(format!("cannot find this program: {e}")))?;
    let options = if quick {
        Options::quick()
    } else {
        Options::full()
    };
    run_with(&exe, &options)
}

fn scratch_dir() -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("lockstep-latency-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn report(
    options: &Options,
    samples: &[Sample],
    failures: &[String],
    baselines: &[Vec<PingPong>],
    took: Duration,
) -> Report {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "lockstep bench latency: {} rounds, redis-benchmark -c 50 -n {} -t ping,set,get,incr and -c 1 -n {} -t set; {:.0} s",
        options.rounds,
        options.many_requests,
        options.one_requests,
        took.as_secs_f64()
    );
    let _ = writeln!(
        text,
        "\nphysical baseline (round trip = two wake-ups; before / after the VMs):"
    );
    let _ = writeln!(text, "  {:<8} {:>16} {:>16}", "", "p50 µs", "p99 µs");
    let mut baseline_json = Vec::new();
    for (index, name) in ["thread", "process", "spin"].iter().enumerate() {
        let pick: Vec<&PingPong> = baselines.iter().filter_map(|b| b.get(index)).collect();
        let p50: Vec<String> = pick
            .iter()
            .map(|p| format!("{:.1}", us(&p.rtt_ns, 0.5)))
            .collect();
        let p99: Vec<String> = pick
            .iter()
            .map(|p| format!("{:.1}", us(&p.rtt_ns, 0.99)))
            .collect();
        let _ = writeln!(
            text,
            "  {name:<8} {:>16} {:>16}",
            p50.join(" / "),
            p99.join(" / ")
        );
        baseline_json.push(json!({
            "name": name,
            "rtt_p50_us": pick.iter().map(|p| us(&p.rtt_ns, 0.5)).collect::<Vec<_>>(),
            "rtt_p99_us": pick.iter().map(|p| us(&p.rtt_ns, 0.99)).collect::<Vec<_>>(),
        }));
    }
    let wake_p50 = {
        let mut v: Vec<f64> = baselines
            .iter()
            .filter_map(|b| b.first())
            .map(|p| us(&p.rtt_ns, 0.5))
            .collect();
        median(&mut v)
    };

    let _ = writeln!(
        text,
        "\n{:<7} {:>11} {:>7} {:>10} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "config",
        "50c req/s",
        "ratio",
        "1c req/s",
        "ratio",
        "1c p50µs",
        "+p50 µs",
        "+p99 µs",
        "hold p50",
        "hold p99",
        "ack p50",
        "hold/wk"
    );
    let mut rows = Vec::new();
    for config in ["ft-off", "tcp", "shm"] {
        let many = median_of(samples, config, |s| s.many_rps);
        let one = median_of(samples, config, |s| s.one.rps);
        let one_p50 = median_of(samples, config, |s| s.one.p50_us);
        let (many_ratio, one_ratio, added_p50, added_p99) = if config == "ft-off" {
            (1.0, 1.0, 0.0, 0.0)
        } else {
            (
                paired(samples, config, |on, off| on.many_rps / off.many_rps),
                paired(samples, config, |on, off| on.one.rps / off.one.rps),
                paired(samples, config, |on, off| on.one.p50_us - off.one.p50_us),
                paired(samples, config, |on, off| on.one.p99_us - off.one.p99_us),
            )
        };
        let hold_p50 = median_of(samples, config, |s| hold_at(s, 0.5));
        let hold_p99 = median_of(samples, config, |s| hold_at(s, 0.99));
        let ack_p50 = median_of(samples, config, |s| s.ack_rtt_us.0);
        let _ = writeln!(
            text,
            "{config:<7} {many:>11.0} {many_ratio:>7.2} {one:>10.0} {one_ratio:>7.2} {one_p50:>8.0} {added_p50:>8.0} {added_p99:>9.0} {hold_p50:>9.0} {hold_p99:>9.0} {ack_p50:>9.0} {:>8.1}",
            hold_p50 / wake_p50
        );
        rows.push(json!({
            "config": config,
            "many_rps": many,
            "many_ratio": many_ratio,
            "one_rps": one,
            "one_ratio": one_ratio,
            "one_p50_us": one_p50,
            "added_p50_us": added_p50,
            "added_p99_us": added_p99,
            "hold_p50_us": hold_p50,
            "hold_p99_us": hold_p99,
            "ack_rtt_p50_us": ack_p50,
            "hold_p50_over_thread_wakeup_rtt": hold_p50 / wake_p50,
        }));
    }
    let _ = writeln!(
        text,
        "\nheld output (µs at quantile; the gate's hdrhistogram, whole run incl. both workloads), per round:"
    );
    for sample in samples.iter().filter(|s| s.config != "ft-off") {
        let curve: Vec<String> = sample
            .hold_us
            .iter()
            .map(|(q, v)| format!("{}:{v:.0}", q * 100.0))
            .collect();
        let _ = writeln!(
            text,
            "  round {} {:<4} {:>7.0} frames  {}",
            sample.round,
            sample.config,
            sample.released,
            curve.join(" ")
        );
    }
    let _ = writeln!(
        text,
        "\nper hop (µs, median over rounds of each run's p50 / p99):"
    );
    let _ = writeln!(text, "  {:<18} {:>15} {:>15}  covers", "hop", "tcp", "shm");
    let mut hops_json = Vec::new();
    for (hop, about) in HOPS {
        let figure = |config: &str, pick: fn(&(String, f64, f64)) -> f64| {
            median_of(samples, config, |s| {
                s.hops.iter().find(|h| h.0 == *hop).map_or(f64::NAN, pick)
            })
        };
        let cell = |config: &str| {
            format!(
                "{:.0} / {:.0}",
                figure(config, |h| h.1),
                figure(config, |h| h.2)
            )
        };
        let _ = writeln!(
            text,
            "  {hop:<18} {:>15} {:>15}  {about}",
            cell("tcp"),
            cell("shm")
        );
        hops_json.push(json!({
            "hop": hop,
            "tcp_p50_us": figure("tcp", |h| h.1),
            "tcp_p99_us": figure("tcp", |h| h.2),
            "shm_p50_us": figure("shm", |h| h.1),
            "shm_p99_us": figure("shm", |h| h.2),
        }));
    }
    let _ = writeln!(
        text,
        "goals (issue 15): 50c ratio >= 0.90; one client +p50 <= 50 µs; hold p50 <= 50 µs, p99 <= 500 µs"
    );
    for failure in failures {
        let _ = writeln!(text, "FAILED: {failure}");
    }
    let samples_json: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({
                "round": s.round,
                "config": s.config,
                "many_rps": s.many_rps,
                "one_rps": s.one.rps,
                "one_p50_us": s.one.p50_us,
                "one_p99_us": s.one.p99_us,
                "hold_quantiles_us": s.hold_us,
                "frames_released": s.released,
                "ack_rtt_p50_us": s.ack_rtt_us.0,
                "ack_rtt_p99_us": s.ack_rtt_us.1,
                "hops_us": s.hops,
            })
        })
        .collect();
    let json = json!({
        "benchmark": "latency",
        "git": git_revision(),
        "rounds": options.rounds,
        "baseline": baseline_json,
        "rows": rows,
        "hops": hops_json,
        "samples": samples_json,
        "failures": failures,
    });
    Report {
        text,
        json: format!("{json:#}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn redis_benchmark_csv_is_parsed() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"1666.67\",\"0.590\",\"0.300\",\"0.551\",\"0.903\",\"1.207\",\"3.055\"\n\
                    \"GET\",\"2000.00\",\"0.490\",\"0.300\",\"0.451\",\"0.803\",\"1.007\",\"3.055\"\n";
        let rows = parse_csv(text).expect("parses");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].test, "SET");
        assert!((rows[0].rps - 1666.67).abs() < 1e-9);
        assert!((rows[0].p50_us - 551.0).abs() < 1e-6);
        assert!((rows[0].p99_us - 1207.0).abs() < 1e-6);
        // 1 request per 1/1666.67 s and per 1/2000 s: 2 over their sum.
        let combined = combined_rps(&rows);
        assert!((combined - 2.0 / (1.0 / 1666.67 + 1.0 / 2000.0)).abs() < 1e-6);
    }

    #[test]
    fn csv_without_results_or_with_bad_figures_is_an_error() {
        let error = parse_csv("Could not connect to Redis at 10.0.0.2:6379").expect_err("empty");
        assert!(error.contains("no results"), "{error}");
        let error = parse_csv(
            "\"test\",\"rps\",\"p50_latency_ms\",\"p99_latency_ms\"\n\"SET\",\"x\",\"1\",\"2\"",
        )
        .expect_err("bad");
        assert!(error.contains("'rps'"), "{error}");
    }

    #[test]
    fn hop_figures_come_from_the_stats_and_the_backup_line() {
        let stats = PrimaryStats {
            hops_ns: BTreeMap::from([
                ("ack_rtt".to_string(), [190_000, 900_000, 10]),
                ("gate_hold".to_string(), [800_000, 5_000_000, 99]),
            ]),
            ..PrimaryStats::default()
        };
        let backup = "lockstep backup: lag: at most 3 exits behind; entries waited p50 9 µs, p99 40 µs, max 77 µs; acks sent p50 12 µs, p99 80 µs after receipt; 30 of 120 batches arrived after the receiver slept";
        let hops = hops(Some(&stats), backup);
        assert_eq!(
            hops,
            vec![
                ("ack_rtt".to_string(), 190.0, 900.0),
                ("backup_ack_delay".to_string(), 12.0, 80.0),
                ("backup_slept_pct".to_string(), 25.0, 25.0),
                ("gate_hold".to_string(), 800.0, 5000.0),
            ]
        );
    }

    #[test]
    fn ping_pongs_measure_round_trips() {
        for pong in [
            thread_ping_pong(200),
            spin_ping_pong(200),
            process_ping_pong(200).expect("fork"),
        ] {
            assert_eq!(pong.rtt_ns.len(), 200, "{}", pong.name);
            assert!(pong.rtt_ns.min() >= 1, "{}", pong.name);
        }
    }

    #[test]
    fn added_latency_pairs_within_rounds() {
        let sample = |round, config: &str, p50| Sample {
            round,
            config: config.into(),
            many_rps: 100.0,
            one: CsvRow {
                test: "SET".into(),
                rps: 10.0,
                p50_us: p50,
                p99_us: p50,
            },
            hold_us: vec![],
            released: 0.0,
            ack_rtt_us: (f64::NAN, f64::NAN),
            hops: vec![],
        };
        let samples = [
            sample(0, "ft-off", 200.0),
            sample(0, "tcp", 260.0),
            sample(1, "ft-off", 400.0),
            sample(1, "tcp", 420.0),
            sample(2, "tcp", 999.0), // no FT-off partner: ignored
        ];
        let added = paired(&samples, "tcp", |on, off| on.one.p50_us - off.one.p50_us);
        assert!((added - 40.0).abs() < 1e-9, "{added}");
    }
}
