//! `lockstep bench table2`: the paper's Table 2 on this host.
//!
//! The guest is the `net` guest on a real TAP; the client is an ordinary
//! TCP client on the host (the kernel's stack), as in the paper:
//!
//! - **receive** (client to guest): the client writes to the guest's sink
//!   (port 5001) as fast as it can;
//! - **transmit** (guest to client): the client reads from the guest's
//!   source (port 5002).
//!
//! Each configuration runs as real processes, started fresh for every
//! measurement: **FT off** is `lockstep run` (no log, output leaves at once);
//! **FT on** is `lockstep backup` plus `lockstep primary` over the
//! replication link, once per available transport (`tcp`: io_uring TCP on
//! loopback; `shm`: shared memory), every received frame logged and every
//! output held until the backup's ack covers it. Configurations and
//! directions are interleaved and repeated (the order rotates every round);
//! the table reports medians with min..max, the FT/base ratio (the median of
//! the ratios paired within each round, so slow drifts of a shared host
//! cancel), the logging channel's bandwidth, the time outputs were held and
//! the backup's lag. A breakdown says where the time went, from measured
//! figures: exits, log bytes per exit, ack round trip, held outputs and the
//! CPU time of every thread of every process during the measurement window.

mod plot;
mod procfs;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{BenchError, Report, git_revision, median};

/// The paper's Table 2 (VMware FT, 2010), Mbit/s.
pub const PAPER: [(&str, f64, f64, f64, f64, f64); 2] = [
    // test, FT off, FT on 1 Gbit/s logging, FT on 10 Gbit/s logging, logging at 1G, logging at 10G
    ("receive", 940.0, 604.0, 860.0, 730.0, 990.0),
    ("transmit", 940.0, 855.0, 935.0, 42.0, 60.0),
];

/// The issue's goal for every FT/base ratio.
pub const GOAL: f64 = 0.97;

/// A logging-channel transport the benchmark drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    /// io_uring TCP over loopback.
    Tcp,
    /// Shared memory between the two processes.
    Shm,
}

impl Transport {
    /// Every transport that runs without special hardware.
    pub const ALL: [Transport; 2] = [Transport::Tcp, Transport::Shm];

    /// The name used by `--transport` and in baseline keys.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    FtOff,
    FtOn(Transport),
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::FtOff => "ft-off",
            Self::FtOn(Transport::Tcp) => "ft-on-tcp",
            Self::FtOn(Transport::Shm) => "ft-on-shm",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::FtOff => "FT off",
            Self::FtOn(Transport::Tcp) => "FT on tcp",
            Self::FtOn(Transport::Shm) => "FT on shm",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Receive,
    Transmit,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::Receive, Direction::Transmit];

    fn name(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Transmit => "transmit",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Receive => 5001,
            Self::Transmit => 5002,
        }
    }
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `lockstep` executable to start.
    pub exe: PathBuf,
    /// TAP interface (created with 10.78.0.1/24 if missing).
    pub tap: String,
    /// Seconds per measurement window.
    pub seconds: f64,
    /// Seconds of traffic before the window opens (TCP slow start).
    pub warmup: f64,
    /// Rounds of every configuration and direction.
    pub rounds: usize,
    /// Replication link port (tcp transport).
    pub link_port: u16,
    /// Transports to measure FT on with.
    pub transports: Vec<Transport>,
    /// Where to write the SVG plots (`None`: no plots).
    pub plots: Option<PathBuf>,
}

impl Options {
    /// Defaults: 4 rounds of 3 s per cell (about two minutes in all), or 4
    /// rounds of 1.2 s with `quick` (about a minute).
    pub fn new(exe: PathBuf, quick: bool) -> Self {
        let plots = Some(default_plot_dir(&exe));
        Self {
            exe,
            tap: "lsbench0".into(),
            seconds: if quick { 1.2 } else { 3.0 },
            warmup: 0.3,
            rounds: 4,
            link_port: 7790,
            transports: Transport::ALL.to_vec(),
            plots,
        }
    }
}

/// `target/table2` beside the executable's profile directory
/// (`target/release/lockstep`), or `./target/table2`.
fn default_plot_dir(exe: &Path) -> PathBuf {
    exe.parent()
        .and_then(Path::parent)
        .filter(|target| target.file_name().is_some())
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
        .join("table2")
}

/// The guest's address: a subnet of its own (10.78.0.0/24), so the bench
/// never collides with `lockstep up` (10.77.0.0/24).
const GUEST: [u8; 4] = [10, 78, 0, 2];
/// The host side of the bench's TAP.
const HOST_CIDR: &str = "10.78.0.1/24";
/// `--arg` that puts the net guest at 10.78.0.2/24 (see guest_abi).
const GUEST_ARG: &str = "103252099074"; // (24 << 32) | 0x0a4e0002
/// Hold-time quantiles the primary reports in every version of its stats.
const HOLD_QUANTILES: [(f64, &str); 3] = [
    (0.5, "hold_p50_ns"),
    (0.99, "hold_p99_ns"),
    (0.999, "hold_p999_ns"),
];

/// Everything measured in one run of one configuration and direction.
/// Figures that could not be obtained are NaN.
#[derive(Clone, Debug)]
struct Measured {
    mbit_s: f64,
    window_s: f64,
    exits: f64,
    entries: f64,
    log_bytes: f64,
    acks: f64,
    batches: f64,
    frames_released: f64,
    max_held: f64,
    /// (quantile, µs), ascending.
    hold_us: Vec<(f64, f64)>,
    ack_rtt_p50_us: f64,
    ack_rtt_p99_us: f64,
    ring_stalls: f64,
    lag_max_exits: f64,
    lag_wait_p50_us: f64,
    lag_wait_p99_us: f64,
    lag_wait_max_us: f64,
    /// CPU use in the window (see [`procfs::usage`]).
    cpu: BTreeMap<String, f64>,
}

impl Measured {
    fn new(mbit_s: f64, window_s: f64, cpu: BTreeMap<String, f64>) -> Self {
        Self {
            mbit_s,
            window_s,
            exits: f64::NAN,
            entries: f64::NAN,
            log_bytes: f64::NAN,
            acks: f64::NAN,
            batches: f64::NAN,
            frames_released: f64::NAN,
            max_held: f64::NAN,
            hold_us: Vec::new(),
            ack_rtt_p50_us: f64::NAN,
            ack_rtt_p99_us: f64::NAN,
            ring_stalls: f64::NAN,
            lag_max_exits: f64::NAN,
            lag_wait_p50_us: f64::NAN,
            lag_wait_p99_us: f64::NAN,
            lag_wait_max_us: f64::NAN,
            cpu,
        }
    }

    /// Hold time at quantile `q` (one of the reported ones), µs.
    fn hold_at(&self, q: f64) -> f64 {
        self.hold_us
            .iter()
            .find(|(quantile, _)| (quantile - q).abs() < 1e-9)
            .map_or(f64::NAN, |(_, us)| *us)
    }

    /// The logging channel's bandwidth: log bytes over the time traffic
    /// flowed (warm-up and window; the idle start adds a few KiB at most).
    fn log_mbit_s(&self, active_s: f64) -> f64 {
        self.log_bytes * 8.0 / active_s.max(1e-9) / 1e6
    }

    fn to_json(&self) -> Value {
        json!({
            "mbit_s": self.mbit_s,
            "window_s": self.window_s,
            "exits": self.exits,
            "entries": self.entries,
            "log_bytes": self.log_bytes,
            "acks": self.acks,
            "batches": self.batches,
            "frames_released": self.frames_released,
            "max_held": self.max_held,
            "hold_us": self.hold_us.iter().map(|(q, us)| json!([q, us])).collect::<Vec<_>>(),
            "ack_rtt_p50_us": self.ack_rtt_p50_us,
            "ack_rtt_p99_us": self.ack_rtt_p99_us,
            "ring_stalls": self.ring_stalls,
            "backup_lag_max_exits": self.lag_max_exits,
            "backup_wait_p50_us": self.lag_wait_p50_us,
            "backup_wait_p99_us": self.lag_wait_p99_us,
            "backup_wait_max_us": self.lag_wait_max_us,
            "cpu_cores": self.cpu,
        })
    }
}

/// One measurement: which, when, and its figures or why it failed.
#[derive(Clone, Debug)]
struct Sample {
    round: usize,
    config: Config,
    direction: Direction,
    result: Result<Measured, String>,
    /// Seconds from spawning the processes until the guest answered.
    startup_s: f64,
    /// Seconds from SIGTERM until every process was gone.
    stop_s: f64,
}

/// A benchmark process: its role, and files holding its stdout and stderr.
struct Proc {
    role: &'static str,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn output(&self) -> String {
        let mut text = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        text.push_str(&std::fs::read_to_string(&self.stderr).unwrap_or_default());
        text
    }

    /// The last line the process printed that says something went wrong,
    /// or its last line.
    fn last_words(&self) -> String {
        let output = self.output();
        let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        lines
            .iter()
            .rev()
            .find(|line| line.contains("halted") || line.contains("error") || line.contains("fail"))
            .or(lines.last())
            .map_or_else(|| "no output".into(), |line| line.trim().to_string())
    }
}

/// The processes of one configuration, stopped and reaped on drop.
struct Running {
    procs: Vec<Proc>,
    stats: Option<PathBuf>,
    /// Where the replicas publish their status (`ROLE.status`).
    status_dir: PathBuf,
}

impl Running {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        self.procs.iter().map(|p| (p.role, p.child.id())).collect()
    }

    /// `Err` naming the first process that has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        for proc in &mut self.procs {
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    proc.role,
                    proc.last_words()
                ));
            }
        }
        Ok(())
    }

    /// SIGTERM to the first process (the primary, or the lone VM): a primary
    /// ends its stream with a stop record, which ends the backup. Waits up
    /// to 10 s for the first, then up to 0.5 s for the others (a backup
    /// over shm only notices the end after its peer timeout; its figures
    /// then come from its status file), then kills stragglers.
    fn stop(&mut self) {
        if let Some(first) = self.procs.first_mut()
            && let Ok(None) = first.child.try_wait()
        {
            let _ = Command::new("kill")
                .args(["-TERM", &first.child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for (index, proc) in self.procs.iter_mut().enumerate() {
            let patience = if index == 0 { 10_000 } else { 500 };
            let deadline = Instant::now() + Duration::from_millis(patience);
            while proc.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if let Ok(None) = proc.child.try_wait() {
                let _ = proc.child.kill();
                let _ = proc.child.wait();
            }
        }
    }
}

fn spawn(options: &Options, role: &'static str, args: &[&str], dir: &Path) -> Result<Proc, String> {
    let stdout = dir.join(format!("{role}.out"));
    let stderr = dir.join(format!("{role}.err"));
    let file = |path: &Path| {
        std::fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
    };
    let mut command = Command::new(&options.exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file(&stdout)?)
        .stderr(file(&stderr)?);
    // SAFETY: the hook runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe and touches no shared state.
    unsafe {
        command.pre_exec(|| {
            // Die with the benchmark: a bench stopped by a signal must not
            // leave a VM on the TAP or a backup on the link port.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", options.exe.display()))?;
    Ok(Proc {
        role,
        child,
        stdout,
        stderr,
    })
}

fn guest(port: u16) -> SocketAddr {
    SocketAddr::from((GUEST, port))
}

/// Starts `config` and waits until the guest's sink answers.
fn start(options: &Options, config: Config, dir: &Path) -> Result<Running, String> {
    let tap = options.tap.as_str();
    let status_path = dir.join("status");
    let _ = std::fs::remove_dir_all(&status_path);
    let status_dir = status_path.to_string_lossy().into_owned();
    let vm = [
        "--guest",
        "net",
        "--tap",
        tap,
        "--arg",
        GUEST_ARG,
        "--quiet",
        "--mem-mib",
        "32",
    ];
    let mut running = match config {
        Config::FtOff => {
            let mut args = vec!["run"];
            args.extend(vm);
            Running {
                procs: vec![spawn(options, "vm", &args, dir)?],
                stats: None,
                status_dir: status_path,
            }
        }
        Config::FtOn(transport) => {
            let link = match transport {
                Transport::Tcp => format!("127.0.0.1:{}", options.link_port),
                Transport::Shm => dir.join("link.sock").to_string_lossy().into_owned(),
            };
            if transport == Transport::Shm {
                let _ = std::fs::remove_file(&link);
            }
            let stats = dir.join("primary.json");
            let _ = std::fs::remove_file(&stats);
            // Both replicas prove a key of this run's own (`lockstep keygen`).
            let key = dir.join("link.key");
            let _ = std::fs::remove_file(&key);
            let made = Command::new(&options.exe)
                .arg("keygen")
                .arg(&key)
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {} keygen: {e}", options.exe.display()))?;
            if !made.success() {
                return Err(format!("`lockstep keygen {}` failed", key.display()));
            }
            let key_text = key.to_string_lossy().into_owned();
            let common = [
                "--link-key",
                &key_text,
                "--transport",
                transport.name(),
                "--peer-timeout-ms",
                "60000",
                "--status-dir",
                &status_dir,
            ];
            let mut args = vec!["backup", "--listen", &link, "--quiet"];
            args.extend(common);
            let backup = spawn(options, "backup", &args, dir)?;
            // Dropping `running` on an error below stops the backup.
            let mut running = Running {
                procs: vec![backup],
                stats: Some(stats.clone()),
                status_dir: status_path,
            };
            let stats_text = stats.to_string_lossy().into_owned();
            let mut args = vec!["primary", "--backup", &link, "--stats", &stats_text];
            args.extend(vm);
            args.extend(common);
            // Primary first: stopping it ends the backup.
            running
                .procs
                .insert(0, spawn(options, "primary", &args, dir)?);
            running
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&guest(5001), Duration::from_millis(100)).is_ok() {
            return Ok(running);
        }
        running.check_alive()?;
        if Instant::now() > deadline {
            return Err(format!(
                "the {} guest did not come up on {tap} within 20 s",
                config.name()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Client throughput in the window and the CPU use over it.
fn measure(
    direction: Direction,
    options: &Options,
    running: &mut Running,
) -> Result<Measured, String> {
    let port = direction.port();
    let mut stream = TcpStream::connect_timeout(&guest(port), Duration::from_secs(2))
        .map_err(|e| format!("connect to the guest's port {port}: {e}"))?;
    let _ = stream.set_write_timeout(Some(Duration::from_millis(250)));
    let _ = stream.set_read_timeout(Some(Duration::from_millis(250)));
    let pids = running.pids();
    let mut buffer = vec![0x5au8; 1 << 16];
    let warmup_end = Instant::now() + Duration::from_secs_f64(options.warmup);
    let window = Duration::from_secs_f64(options.seconds);
    let mut opened: Option<(Instant, procfs::Snapshot)> = None;
    let mut bytes = 0u64;
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        if opened.is_none() && now >= warmup_end {
            opened = Some((now, procfs::snapshot(&pids)));
        }
        if let Some((from, _)) = &opened
            && now.duration_since(*from) >= window
        {
            break;
        }
        // Only operations that start inside the window count.
        let counted = opened.is_some();
        let moved = match direction {
            Direction::Receive => stream.write(&buffer),
            Direction::Transmit => stream.read(&mut buffer),
        };
        match moved {
            Ok(0) => {
                running.check_alive()?;
                return Err(format!("the guest closed the {} stream", direction.name()));
            }
            Ok(n) => {
                if counted {
                    bytes += n as u64;
                }
                last_progress = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                running.check_alive()?;
                if last_progress.elapsed() > Duration::from_secs(3) {
                    return Err(format!(
                        "the {} stream made no progress for 3 s",
                        direction.name()
                    ));
                }
            }
            Err(e) => {
                running.check_alive()?;
                return Err(format!("{} stream: {e}", direction.name()));
            }
        }
    }
    let end = Instant::now();
    let after = procfs::snapshot(&pids);
    let _ = stream.shutdown(Shutdown::Both);
    let Some((from, before)) = opened else {
        return Err("the window never opened".into());
    };
    let seconds = end.duration_since(from).as_secs_f64();
    running.check_alive()?;
    Ok(Measured::new(
        bytes as f64 * 8.0 / seconds / 1e6,
        seconds,
        procfs::usage(&before, &after, seconds),
    ))
}

/// The number right after `marker` in `text`, if both are there.
fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Fills in the figures the processes reported when they stopped: the
/// primary's `--stats` JSON, the primary's channel line, the backup's lag
/// line, the lone VM's exit count.
fn read_reports(measured: &mut Measured, running: &Running) {
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    for proc in &running.procs {
        let output = proc.output();
        match proc.role {
            "vm" => measured.exits = nan(number_after(&output, " after ")),
            "primary" => {
                if let Some(at) = output.find("ack round trip") {
                    let channel = &output[at..];
                    measured.ack_rtt_p50_us = nan(number_after(channel, "p50 "));
                    measured.ack_rtt_p99_us = nan(number_after(channel, "p99 "));
                }
                if let Some(at) = output.find(" batches, ack round trip") {
                    let start = output[..at].rfind(' ').map_or(0, |s| s + 1);
                    measured.batches = nan(output[start..at].parse().ok());
                }
            }
            "backup" => {
                if let Some(at) = output.find("lag: at most ") {
                    let lag = &output[at..];
                    measured.lag_max_exits = nan(number_after(lag, "lag: at most "));
                    measured.lag_wait_p50_us = nan(number_after(lag, "waited p50 "));
                    measured.lag_wait_p99_us = nan(number_after(lag, ", p99 "));
                    measured.lag_wait_max_us = nan(number_after(lag, ", max "));
                } else if let Ok(status) =
                    std::fs::read_to_string(running.status_dir.join("backup.status"))
                {
                    // Stopped before it printed its summary: its last status
                    // (at most half a second old) has the same figures.
                    measured.lag_max_exits = nan(number_after(&status, "most exits behind: "));
                    measured.lag_wait_p50_us =
                        nan(number_after(&status, "entry wait p50/p99 us: "));
                    measured.lag_wait_p99_us = nan(status
                        .lines()
                        .find_map(|line| line.strip_prefix("entry wait p50/p99 us: "))
                        .and_then(|v| v.split('/').nth(1))
                        .and_then(|v| v.trim().parse().ok()));
                }
            }
            _ => {}
        }
    }
    let Some(stats) = running
        .stats
        .as_ref()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
    else {
        return;
    };
    apply_stats(measured, &stats);
}

/// Takes the primary's `--stats` figures. Optional fields the primary may
/// add: `hold_quantiles_ns` ([[q, ns], ...], a finer latency curve),
/// `ack_rtt_p50_ns` / `ack_rtt_p99_ns`, `batches`, `ring_full` (stalls).
fn apply_stats(measured: &mut Measured, stats: &Value) {
    let get = |key: &str| stats.get(key).and_then(Value::as_f64);
    let or = |key: &str, old: f64| get(key).unwrap_or(old);
    measured.exits = or("exits", measured.exits);
    measured.entries = or("entries", measured.entries);
    measured.log_bytes = or("log_bytes", measured.log_bytes);
    measured.acks = or("acks", measured.acks);
    measured.frames_released = or("frames_released", measured.frames_released);
    measured.max_held = or("max_held", measured.max_held);
    measured.batches = or("batches", measured.batches);
    measured.ring_stalls = or("ring_full", measured.ring_stalls);
    measured.ack_rtt_p50_us = get("ack_rtt_p50_ns").map_or(measured.ack_rtt_p50_us, |v| v / 1e3);
    measured.ack_rtt_p99_us = get("ack_rtt_p99_ns").map_or(measured.ack_rtt_p99_us, |v| v / 1e3);
    let mut curve: Vec<(f64, f64)> = stats
        .get("hold_quantiles_ns")
        .and_then(Value::as_array)
        .map(|points| {
            points
                .iter()
                .filter_map(|point| {
                    let pair = point.as_array()?;
                    Some((pair.first()?.as_f64()?, pair.get(1)?.as_f64()? / 1e3))
                })
                .collect()
        })
        .unwrap_or_default();
    for (q, key) in HOLD_QUANTILES {
        if let Some(ns) = get(key)
            && !curve.iter().any(|(p, _)| (p - q).abs() < 1e-9)
        {
            curve.push((q, ns / 1e3));
        }
    }
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    measured.hold_us = curve;
}

fn one(options: &Options, config: Config, direction: Direction, dir: &Path) -> Sample {
    let began = Instant::now();
    let mut startup_s = f64::NAN;
    let mut stop_s = f64::NAN;
    let result = start(options, config, dir).and_then(|mut running| {
        startup_s = began.elapsed().as_secs_f64();
        let measured = measure(direction, options, &mut running);
        let stopping = Instant::now();
        running.stop();
        stop_s = stopping.elapsed().as_secs_f64();
        let mut measured = measured?;
        read_reports(&mut measured, &running);
        Ok(measured)
    });
    Sample {
        round: 0,
        config,
        direction,
        result,
        startup_s,
        stop_s,
    }
}

/// Median, minimum, maximum and count of a list of figures (NaNs ignored).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many figures.
    pub n: usize,
}

impl Spread {
    /// The spread of `values` (NaN figures when there are none).
    pub fn of(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        let mid = median(&mut sorted);
        Self {
            median: mid,
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
            n: sorted.len(),
        }
    }

    fn text(&self, precision: usize) -> String {
        if self.n == 0 {
            return "-".into();
        }
        format!(
            "{:.p$} [{:.p$}..{:.p$}]",
            self.median,
            self.min,
            self.max,
            p = precision
        )
    }

    fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "n": self.n})
    }
}

/// One row of results: a direction with FT on over one transport, against
/// FT off in the same rounds.
#[derive(Clone, Debug)]
pub struct Row {
    /// receive or transmit.
    pub direction: &'static str,
    /// tcp or shm.
    pub transport: &'static str,
    /// FT off, Mbit/s.
    pub base: Spread,
    /// FT on, Mbit/s.
    pub ft: Spread,
    /// FT on / FT off, paired within each round.
    pub ratio: Spread,
    /// Logging channel bandwidth during FT on, Mbit/s.
    pub logging: Spread,
    /// Output hold time during FT on, µs (medians of p50, p99, p99.9).
    pub hold_us: (f64, f64, f64),
    /// Ack round trip during FT on, µs (medians of p50, p99).
    pub ack_rtt_us: (f64, f64),
    /// The backup's lag: (most exits behind, entry wait p50 µs, p99 µs).
    pub lag: (f64, f64, f64),
    /// Why FT-on runs failed, if any did.
    pub failures: Vec<String>,
}

impl Row {
    /// The median FT/base ratio, if FT on produced any figure.
    pub fn ratio(&self) -> Option<f64> {
        (self.ratio.n > 0).then_some(self.ratio.median)
    }
}

/// Figures per configuration and direction, gathered from the samples.
struct Cells<'a> {
    samples: &'a [Sample],
}

impl Cells<'_> {
    fn ok(&self, config: Config, direction: Direction) -> impl Iterator<Item = &Measured> {
        self.samples
            .iter()
            .filter(move |s| s.config == config && s.direction == direction)
            .filter_map(|s| s.result.as_ref().ok())
    }

    fn values(&self, config: Config, direction: Direction, f: impl Fn(&Measured) -> f64) -> Spread {
        Spread::of(&self.ok(config, direction).map(f).collect::<Vec<_>>())
    }

    fn failures(&self, config: Config, direction: Direction) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.config == config && s.direction == direction)
            .filter_map(|s| s.result.as_ref().err().cloned())
            .collect()
    }

    /// FT on / FT off per round where both succeeded.
    fn ratios(&self, transport: Transport, direction: Direction) -> Spread {
        let rounds = self.samples.iter().map(|s| s.round).max().unwrap_or(0);
        let mut ratios = Vec::new();
        for round in 0..=rounds {
            let find = |config: Config| {
                self.samples
                    .iter()
                    .find(|s| s.round == round && s.config == config && s.direction == direction)
                    .and_then(|s| s.result.as_ref().ok())
                    .map(|m| m.mbit_s)
            };
            if let (Some(base), Some(ft)) = (find(Config::FtOff), find(Config::FtOn(transport)))
                && base > 0.0
            {
                ratios.push(ft / base);
            }
        }
        Spread::of(&ratios)
    }
}

fn rows(options: &Options, cells: &Cells) -> Vec<Row> {
    let active = options.warmup + options.seconds;
    let mut rows = Vec::new();
    for direction in Direction::ALL {
        for &transport in &options.transports {
            let ft = Config::FtOn(transport);
            rows.push(Row {
                direction: direction.name(),
                transport: transport.name(),
                base: cells.values(Config::FtOff, direction, |m| m.mbit_s),
                ft: cells.values(ft, direction, |m| m.mbit_s),
                ratio: cells.ratios(transport, direction),
                logging: cells.values(ft, direction, |m| m.log_mbit_s(active)),
                hold_us: (
                    cells.values(ft, direction, |m| m.hold_at(0.5)).median,
                    cells.values(ft, direction, |m| m.hold_at(0.99)).median,
                    cells.values(ft, direction, |m| m.hold_at(0.999)).median,
                ),
                ack_rtt_us: (
                    cells.values(ft, direction, |m| m.ack_rtt_p50_us).median,
                    cells.values(ft, direction, |m| m.ack_rtt_p99_us).median,
                ),
                lag: (
                    cells.values(ft, direction, |m| m.lag_max_exits).median,
                    cells.values(ft, direction, |m| m.lag_wait_p50_us).median,
                    cells.values(ft, direction, |m| m.lag_wait_p99_us).median,
                ),
                failures: cells.failures(ft, direction),
            });
        }
    }
    rows
}

/// Why RDMA is not measured here.
fn rdma_absence() -> &'static str {
    let devices = std::fs::read_dir("/sys/class/infiniband")
        .map(|entries| entries.count())
        .unwrap_or(0);
    if devices == 0 {
        "not available (no RDMA device)"
    } else {
        "not measured (an RDMA device exists, but this build's bench drives tcp and shm only)"
    }
}

fn progress_line(done: usize, total: usize, sample: &Sample, options: &Options) -> String {
    let what = format!(
        "table2 [{done:>2}/{total}] round {} {:<8} {:<9}",
        sample.round + 1,
        sample.direction.name(),
        sample.config.name()
    );
    match &sample.result {
        Ok(m) => {
            let mut line = format!(
                "{what} {:>6.0} Mbit/s  (up {:.1} s, down {:.1} s; host busy {:.0} %",
                m.mbit_s,
                sample.startup_s,
                sample.stop_s,
                m.cpu.get("host.busy").copied().unwrap_or(f64::NAN) * 100.0
            );
            if let Config::FtOn(_) = sample.config {
                let _ = write!(
                    line,
                    "; log {:.0} Mbit/s; held p50 {:.0} µs",
                    m.log_mbit_s(options.warmup + options.seconds),
                    m.hold_at(0.5)
                );
            }
            line.push(')');
            line
        }
        Err(why) => format!("{what} FAILED: {why}"),
    }
}

/// Runs the benchmark and returns the table.
pub fn run(options: &Options) -> Result<(Report, Vec<Row>), BenchError> {
    nic::tap::ensure_persistent(&options.tap, HOST_CIDR)
        .map_err(|e| BenchError::Setup(format!("TAP {}: {e}", options.tap)))?;
    let dir = std::env::temp_dir().join(format!("lockstep-table2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let (cores, kernel, cpu_model, load) = procfs::host_facts();
    let mut configs = vec![Config::FtOff];
    configs.extend(options.transports.iter().map(|&t| Config::FtOn(t)));
    let total = options.rounds * Direction::ALL.len() * configs.len();
    eprintln!(
        "table2: {total} measurements ({} rounds x {} directions x {} configurations) of {:.1} s + {:.1} s warm-up, fresh processes each; host {cores} cores, load {load}",
        options.rounds,
        Direction::ALL.len(),
        configs.len(),
        options.seconds,
        options.warmup
    );
    let began = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..options.rounds {
        for direction in Direction::ALL {
            // Rotate the order every round so no configuration always runs
            // first (or right after another's teardown).
            let mut order = configs.clone();
            let shift = (round + direction as usize) % order.len();
            order.rotate_left(shift);
            for config in order {
                let mut sample = one(options, config, direction, &dir);
                sample.round = round;
                eprintln!(
                    "{}",
                    progress_line(samples.len() + 1, total, &sample, options)
                );
                samples.push(sample);
            }
        }
    }
    let elapsed = began.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    let cells = Cells { samples: &samples };
    let rows = rows(options, &cells);
    let mut text = table(options, &rows, elapsed);
    text.push_str(&breakdown(options, &cells, &configs, cores));
    let mut plots = Vec::new();
    if let Some(plot_dir) = &options.plots {
        std::fs::create_dir_all(plot_dir)
            .map_err(|e| BenchError::Setup(format!("{}: {e}", plot_dir.display())))?;
        plots = plot::write_all(plot_dir, &rows, &cells, options)?;
        text.push_str("\nplots:\n");
        for path in &plots {
            let _ = writeln!(text, "  {}", path.display());
        }
    }
    let json = json!({
        "benchmark": "table2",
        "git_revision": git_revision(),
        "host": {
            "cores": cores,
            "kernel": kernel,
            "cpu_model": cpu_model,
            "load_average_at_start": load,
        },
        "options": {
            "rounds": options.rounds,
            "seconds": options.seconds,
            "warmup_s": options.warmup,
            "transports": options.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "tap": options.tap,
        },
        "elapsed_s": elapsed,
        "paper": PAPER.iter().map(|p| json!({
            "test": p.0, "ft_off_mbit_s": p.1, "ft_on_1g_mbit_s": p.2, "ft_on_10g_mbit_s": p.3,
            "logging_1g_mbit_s": p.4, "logging_10g_mbit_s": p.5,
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(|row| json!({
            "test": row.direction,
            "transport": row.transport,
            "ft_off_mbit_s": row.base.to_json(),
            "ft_on_mbit_s": row.ft.to_json(),
            "ratio": row.ratio.to_json(),
            "logging_mbit_s": row.logging.to_json(),
            "hold_p50_us": row.hold_us.0,
            "hold_p99_us": row.hold_us.1,
            "hold_p999_us": row.hold_us.2,
            "ack_rtt_p50_us": row.ack_rtt_us.0,
            "ack_rtt_p99_us": row.ack_rtt_us.1,
            "backup_lag_max_exits": row.lag.0,
            "backup_wait_p50_us": row.lag.1,
            "backup_wait_p99_us": row.lag.2,
            "failures": row.failures,
        })).collect::<Vec<_>>(),
        "rdma": rdma_absence(),
        "samples": samples.iter().map(|s| json!({
            "round": s.round,
            "config": s.config.name(),
            "test": s.direction.name(),
            "startup_s": s.startup_s,
            "stop_s": s.stop_s,
            "result": match &s.result {
                Ok(m) => m.to_json(),
                Err(why) => json!({"error": why}),
            },
        })).collect::<Vec<_>>(),
        "plots": plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
    });
    let json = serde_json::to_string_pretty(&json)
        .map_err(|e| BenchError::Setup(format!("cannot encode the JSON report: {e}")))?;
    Ok((Report { text, json }, rows))
}

fn table(options: &Options, rows: &[Row], elapsed: f64) -> String {
    let mut text = format!(
        "Table 2: guest network bandwidth, Mbit/s ({} rounds of {:.1} s per cell, interleaved, fresh processes; median [min..max]; {elapsed:.0} s in all)\n\n",
        options.rounds, options.seconds,
    );
    let _ = writeln!(
        text,
        "{:<9} {:<4} | {:>6} {:>9} {:>9} | {:>18} {:>18} {:>19} {:>17}",
        "test", "link", "paper", "paper FT", "paper log", "FT off", "FT on", "FT/base", "logging"
    );
    let _ = writeln!(
        text,
        "{:<9} {:<4} | {:>6} {:>9} {:>9} | {:>18} {:>18} {:>19} {:>17}",
        "", "", "FT off", "1G / 10G", "1G / 10G", "", "", "paired per round", ""
    );
    for row in rows {
        let paper = PAPER.iter().find(|p| p.0 == row.direction);
        let (p_off, p_ft, p_log) = paper.map_or_else(
            || ("-".into(), "-".into(), "-".into()),
            |p| {
                (
                    format!("{:.0}", p.1),
                    format!("{:.0}/{:.0}", p.2, p.3),
                    format!("{:.0}/{:.0}", p.4, p.5),
                )
            },
        );
        let ft = if row.ft.n == 0 {
            format!("FAILED x{}", row.failures.len())
        } else {
            row.ft.text(0)
        };
        let _ = writeln!(
            text,
            "{:<9} {:<4} | {:>6} {:>9} {:>9} | {:>18} {:>18} {:>19} {:>17}",
            row.direction,
            row.transport,
            p_off,
            p_ft,
            p_log,
            row.base.text(0),
            ft,
            row.ratio.text(3),
            row.logging.text(0),
        );
    }
    for direction in Direction::ALL {
        let _ = writeln!(
            text,
            "{:<9} {:<4} | {:>6} {:>9} {:>9} | {:>18} {}",
            direction.name(),
            "rdma",
            "",
            "",
            "",
            "",
            rdma_absence()
        );
    }
    let _ = writeln!(
        text,
        "\npaper ratios: receive 0.643 (1G) / 0.915 (10G), transmit 0.910 / 0.995; goal: >= {GOAL}\n"
    );
    let _ = writeln!(
        text,
        "{:<9} {:<4} | {:>28} | {:>19} | {:>31}",
        "FT on",
        "link",
        "held output p50/p99/p99.9 µs",
        "ack RTT p50/p99 µs",
        "backup lag: exits, wait p50/p99"
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{:<9} {:<4} | {:>28} | {:>19} | {:>31}",
            row.direction,
            row.transport,
            format!(
                "{:.0} / {:.0} / {:.0}",
                row.hold_us.0, row.hold_us.1, row.hold_us.2
            ),
            format!("{:.0} / {:.0}", row.ack_rtt_us.0, row.ack_rtt_us.1),
            format!(
                "<= {:.0}, {:.0} / {:.0} µs",
                row.lag.0, row.lag.1, row.lag.2
            ),
        );
    }
    for row in rows.iter().filter(|r| !r.failures.is_empty()) {
        let _ = writeln!(
            text,
            "\n{} {}: {} of {} FT-on runs failed; first: {}",
            row.direction,
            row.transport,
            row.failures.len(),
            row.failures.len() + row.ft.n,
            row.failures.first().map_or("", String::as_str)
        );
    }
    text
}

/// The measured breakdown: where the time goes, per direction and
/// configuration (medians over the rounds).
fn breakdown(options: &Options, cells: &Cells, configs: &[Config], cores: usize) -> String {
    let active = options.warmup + options.seconds;
    let mut text = String::from(
        "\nWhere the time goes (medians over the rounds; CPU in cores = CPU seconds per second of the window):\n",
    );
    for direction in Direction::ALL {
        let _ = write!(text, "\n{:<34}", direction.name());
        for config in configs {
            let _ = write!(text, " {:>12}", config.label());
        }
        text.push('\n');
        let line =
            |text: &mut String, name: &str, f: &dyn Fn(&Measured) -> f64, precision: usize| {
                let figures: Vec<Spread> = configs
                    .iter()
                    .map(|&c| cells.values(c, direction, f))
                    .collect();
                if figures.iter().all(|s| s.n == 0) {
                    return;
                }
                let _ = write!(text, "  {name:<32}");
                for spread in figures {
                    if spread.n == 0 {
                        let _ = write!(text, " {:>12}", "-");
                    } else {
                        let _ = write!(text, " {:>12.p$}", spread.median, p = precision);
                    }
                }
                text.push('\n');
            };
        // Exit counts and log bytes cover the whole process life, which
        // beyond the active traffic is an idle start of a few dozen exits.
        line(&mut text, "guest Mbit/s", &|m| m.mbit_s, 0);
        line(&mut text, "exits/s", &|m| m.exits / active, 0);
        line(
            &mut text,
            "guest bytes per exit",
            &|m| m.mbit_s * 1e6 / 8.0 / (m.exits / active),
            0,
        );
        line(&mut text, "log entries/s", &|m| m.entries / active, 0);
        line(
            &mut text,
            "log bytes per exit",
            &|m| m.log_bytes / m.exits,
            1,
        );
        line(&mut text, "logging Mbit/s", &|m| m.log_mbit_s(active), 0);
        line(
            &mut text,
            "entries per batch",
            &|m| m.entries / m.batches,
            1,
        );
        line(&mut text, "ack round trip p50 µs", &|m| m.ack_rtt_p50_us, 0);
        line(&mut text, "ack round trip p99 µs", &|m| m.ack_rtt_p99_us, 0);
        line(&mut text, "held output p50 µs", &|m| m.hold_at(0.5), 0);
        line(&mut text, "held output p99 µs", &|m| m.hold_at(0.99), 0);
        line(&mut text, "frames held at most", &|m| m.max_held, 0);
        line(&mut text, "ring-full stalls", &|m| m.ring_stalls, 0);
        line(
            &mut text,
            "backup lag, exits (max)",
            &|m| m.lag_max_exits,
            0,
        );
        line(
            &mut text,
            "backup entry wait p50 µs",
            &|m| m.lag_wait_p50_us,
            0,
        );
        // CPU per thread: every name seen in any configuration.
        let mut names: Vec<String> = configs
            .iter()
            .flat_map(|&c| cells.ok(c, direction).flat_map(|m| m.cpu.keys().cloned()))
            .filter(|name| !name.starts_with("host."))
            .collect();
        names.sort();
        names.dedup();
        // Processes first, then their threads (`role/thread` sorts after `role`).
        for name in &names {
            let label = if name.contains('/') {
                format!("  cpu {name}")
            } else {
                format!("cpu {name}")
            };
            line(&mut text, &label, &|m| cpu_of(m, name), 2);
        }
        line(
            &mut text,
            &format!("host busy, cores of {cores}"),
            &|m| m.cpu.get("host.busy").copied().unwrap_or(f64::NAN) * cores as f64,
            2,
        );
        line(
            &mut text,
            "  of which outside the benchmark",
            &|m| outside(m, cores),
            2,
        );
        line(
            &mut text,
            "  of which softirq",
            &|m| m.cpu.get("host.softirq").copied().unwrap_or(f64::NAN) * cores as f64,
            2,
        );
    }
    text.push_str(&findings(options, cells, configs, cores));
    text
}

/// Sentences from the measured figures: for every FT-on configuration short
/// of the goal, how its cost compares with FT off.
fn findings(options: &Options, cells: &Cells, configs: &[Config], cores: usize) -> String {
    let active = options.warmup + options.seconds;
    let mut text = String::from("\nFindings:\n");
    for direction in Direction::ALL {
        let base = |f: &dyn Fn(&Measured) -> f64| cells.values(Config::FtOff, direction, f).median;
        let base_busy =
            base(&|m| m.cpu.get("host.busy").copied().unwrap_or(f64::NAN)) * cores as f64;
        let base_mbit = base(&|m| m.mbit_s);
        let base_cpu_per_gbit = base(&|m| total_cpu(m) / (m.mbit_s / 1e3));
        for &config in configs.iter().filter(|c| **c != Config::FtOff) {
            let Config::FtOn(transport) = config else {
                continue;
            };
            let ratio = cells.ratios(transport, direction);
            if ratio.n == 0 {
                let _ = writeln!(
                    text,
                    "- {} {}: no FT-on figure: {}",
                    direction.name(),
                    transport.name(),
                    cells
                        .failures(config, direction)
                        .first()
                        .map_or("no runs", String::as_str)
                );
                continue;
            }
            let ft = |f: &dyn Fn(&Measured) -> f64| cells.values(config, direction, f).median;
            let busy = ft(&|m| m.cpu.get("host.busy").copied().unwrap_or(f64::NAN)) * cores as f64;
            let cpu_per_gbit = ft(&|m| total_cpu(m) / (m.mbit_s / 1e3));
            let backup = ft(&|m| m.cpu.get("backup").copied().unwrap_or(0.0));
            let sender = ft(&|m| m.cpu.get("primary/lockstep-sender").copied().unwrap_or(0.0));
            let primary_vcpu = ft(&|m| m.cpu.get("primary/vcpu").copied().unwrap_or(0.0));
            let base_vcpu = base(&|m| m.cpu.get("vm/vcpu").copied().unwrap_or(0.0));
            let verdict = if ratio.median >= GOAL {
                "meets the goal"
            } else {
                "short of the goal"
            };
            let _ = writeln!(
                text,
                "- {} {}: FT/base {:.3} [{:.3}..{:.3}] ({verdict}; {:.0} vs {:.0} Mbit/s). Host busy {:.2} of {cores} cores vs {:.2} with FT off; \
                 measured processes used {:.2} core-s per Gbit vs {:.2} FT off. FT on adds the backup ({:.2} cores) and the sender thread ({:.2}); \
                 the vCPU thread used {:.2} vs {:.2}. Exits/s {:.0} vs {:.0}; log {:.1} bytes per exit; ack RTT p50 {:.0} µs; held output p50 {:.0} µs, p99 {:.0} µs.",
                direction.name(),
                transport.name(),
                ratio.median,
                ratio.min,
                ratio.max,
                ft(&|m| m.mbit_s),
                base_mbit,
                busy,
                base_busy,
                cpu_per_gbit,
                base_cpu_per_gbit,
                backup,
                sender,
                primary_vcpu,
                base_vcpu,
                ft(&|m| m.exits / active),
                base(&|m| m.exits / active),
                ft(&|m| m.log_bytes / m.exits),
                ft(&|m| m.ack_rtt_p50_us),
                ft(&|m| m.hold_at(0.5)),
                ft(&|m| m.hold_at(0.99)),
            );
            let others = ft(&|m| outside(m, cores));
            if busy >= 0.9 * cores as f64 {
                let _ = writeln!(
                    text,
                    "  The host's cores were saturated during FT on ({others:.2} cores outside the benchmark): throughput is bounded by CPU here, so the replication's CPU cost (backup + sender) translates into bandwidth."
                );
            }
        }
    }
    text
}

/// CPU cores of `name` (`ROLE` or `ROLE/THREAD`): 0 for a thread that did
/// not run in a process that did, NaN where there is no such process.
fn cpu_of(m: &Measured, name: &str) -> f64 {
    let role = name.split('/').next().unwrap_or(name);
    match (m.cpu.get(name), m.cpu.contains_key(role)) {
        (Some(cores), _) => *cores,
        (None, true) => 0.0,
        (None, false) => f64::NAN,
    }
}

/// Host CPU (cores) not used by the benchmark's processes or its client:
/// other work on a shared host, plus kernel work not charged to a process.
fn outside(m: &Measured, cores: usize) -> f64 {
    let busy = m.cpu.get("host.busy").copied().unwrap_or(f64::NAN) * cores as f64;
    (busy - total_cpu(m)).max(0.0)
}

/// CPU cores used by the benchmark's processes and the client.
fn total_cpu(m: &Measured) -> f64 {
    ["vm", "primary", "backup", "client"]
        .iter()
        .filter_map(|k| m.cpu.get(*k))
        .sum()
}

/// A committed baseline: `tolerance = T` (default for every key),
/// `DIRECTION.TRANSPORT = RATIO` and optionally
/// `DIRECTION.TRANSPORT.tolerance = T`.
struct Baseline {
    /// (key, expected ratio, tolerance)
    expected: Vec<(String, f64, f64)>,
}

fn parse_baseline(baseline: &str) -> Result<Baseline, BenchError> {
    let mut tolerance = 0.0;
    let mut values = Vec::new();
    let mut tolerances = BTreeMap::new();
    for (number, line) in baseline.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(BenchError::Setup(format!(
                "baseline line {}: expected `key = value`",
                number + 1
            )));
        };
        let value: f64 = value.trim().parse().map_err(|_| {
            BenchError::Setup(format!(
                "baseline line {}: `{}` is not a number",
                number + 1,
                value.trim()
            ))
        })?;
        let key = key.trim();
        if key == "tolerance" {
            tolerance = value;
        } else if let Some(of) = key.strip_suffix(".tolerance") {
            tolerances.insert(of.to_string(), value);
        } else {
            values.push((key.to_string(), value));
        }
    }
    for key in tolerances.keys() {
        if !values.iter().any(|(k, _)| k == key) {
            return Err(BenchError::Setup(format!(
                "baseline: `{key}.tolerance` has no `{key}` ratio"
            )));
        }
    }
    Ok(Baseline {
        expected: values
            .into_iter()
            .map(|(key, value)| {
                let t = tolerances.get(&key).copied().unwrap_or(tolerance);
                (key, value, t)
            })
            .collect(),
    })
}

/// Checks ratios against a committed baseline (see `perf/baselines/table2.txt`:
/// `tolerance = 0.3`, `receive.tcp = 0.60`, `receive.tcp.tolerance = 0.4`,
/// ...). Returns the regressions found, as sentences; a configuration whose
/// FT-on runs all failed is a regression. `rdma` keys are skipped on hosts
/// where it is not measured.
pub fn check(rows: &[Row], baseline: &str) -> Result<Vec<String>, BenchError> {
    let baseline = parse_baseline(baseline)?;
    let mut failures = Vec::new();
    for (key, value, tolerance) in baseline.expected {
        let Some((direction, transport)) = key.split_once('.') else {
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: expected DIRECTION.TRANSPORT"
            )));
        };
        if !Direction::ALL.iter().any(|d| d.name() == direction) {
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: no test `{direction}` (receive, transmit)"
            )));
        }
        let Some(row) = rows
            .iter()
            .find(|row| row.direction == direction && row.transport == transport)
        else {
            if transport == "rdma" {
                continue;
            }
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: transport `{transport}` is not measured"
            )));
        };
        match row.ratio() {
            None => failures.push(format!(
                "{key}: FT on never completed a run ({})",
                row.failures.first().map_or("no runs", String::as_str)
            )),
            Some(ratio) if ratio < value - tolerance => failures.push(format!(
                "{key}: FT/base ratio {ratio:.3} is below the baseline {value:.3} - tolerance {tolerance:.3}"
            )),
            Some(_) => {}
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(direction: &'static str, transport: &'static str, base: f64, ft: f64) -> Row {
        let one = |v: f64| Spread::of(&[v]);
        Row {
            direction,
            transport,
            base: one(base),
            ft: one(ft),
            ratio: one(ft / base),
            logging: one(0.0),
            hold_us: (0.0, 0.0, 0.0),
            ack_rtt_us: (0.0, 0.0),
            lag: (0.0, 0.0, 0.0),
            failures: Vec::new(),
        }
    }

    #[test]
    fn gate_fails_only_beyond_the_tolerance() {
        let rows = [
            row("receive", "tcp", 1000.0, 800.0),
            row("transmit", "tcp", 1000.0, 950.0),
            row("receive", "shm", 1000.0, 500.0),
        ];
        let baseline = "tolerance = 0.1\nreceive.tcp = 0.85 # comment\ntransmit.tcp = 0.95\n\
                        receive.shm = 0.9\nreceive.shm.tolerance = 0.45\nreceive.rdma = 0.99\n";
        assert!(check(&rows, baseline).expect("valid").is_empty());
        let strict = "tolerance = 0.0\nreceive.tcp = 0.85\n";
        let failures = check(&rows, strict).expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("receive.tcp"), "{failures:?}");
    }

    #[test]
    fn a_configuration_that_never_ran_is_a_regression() {
        let mut broken = row("receive", "shm", 1000.0, 0.0);
        broken.ft = Spread::of(&[]);
        broken.ratio = Spread::of(&[]);
        broken.failures = vec!["primary exited: entry too large".into()];
        let failures = check(&[broken], "tolerance = 0.5\nreceive.shm = 0.5").expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("entry too large"), "{failures:?}");
    }

    #[test]
    fn malformed_baselines_are_refused() {
        let rows = [row("receive", "tcp", 1.0, 1.0)];
        assert!(check(&rows, "receive.tcp 0.9").is_err());
        assert!(check(&rows, "receive.tcp = x").is_err());
        assert!(check(&rows, "receive.shm = 0.9").is_err());
        assert!(check(&rows, "sideways.tcp = 0.9").is_err());
        assert!(check(&rows, "receive.tcp = 0.9\ntransmit.tcp.tolerance = 0.1").is_err());
    }

    #[test]
    fn committed_baseline_parses_and_covers_every_measured_row() {
        let text = include_str!("../baselines/table2.txt");
        let baseline = parse_baseline(text).expect("valid baseline");
        for direction in Direction::ALL {
            for transport in Transport::ALL {
                let key = format!("{}.{}", direction.name(), transport.name());
                assert!(
                    baseline.expected.iter().any(|(k, _, _)| *k == key),
                    "the baseline has no {key}"
                );
            }
        }
        let rows: Vec<Row> = Direction::ALL
            .iter()
            .flat_map(|d| Transport::ALL.map(|t| row(d.name(), t.name(), 1.0, 1.0)))
            .collect();
        assert!(check(&rows, text).expect("valid").is_empty());
    }

    #[test]
    fn guest_arg_puts_the_guest_at_the_bench_address() {
        let arg: u64 = GUEST_ARG.parse().expect("number");
        let (address, prefix) = guest_abi::net_address_from_arg(arg);
        assert_eq!(address, GUEST);
        assert_eq!(prefix, 24);
    }

    #[test]
    fn process_reports_are_parsed() {
        let primary = "lockstep primary: guest net was stopped by the host after 125 exits; 89 acks; \
            backup acknowledged 98 of 98 entries (everything); channel uring-tcp: 94 batches, \
            ack round trip p50 272 µs, p99 5636 µs, 53 heartbeats sent\n\
            lockstep primary: output gate released 3 frames, held at most 1; hold time p50 471 µs, p99 3839 µs";
        assert_eq!(number_after(primary, "p50 "), Some(272.0));
        let at = primary.find(" batches, ack round trip").expect("batches");
        let start = primary[..at].rfind(' ').map_or(0, |s| s + 1);
        assert_eq!(&primary[start..at], "94");
        let backup = "backup: replayed 77 exits and 45 events; 1 of 1 digests matched; guest net was stopped by the host; \
            lag: at most 3 exits behind; entries waited p50 41 µs, p99 9199 µs, max 9300 µs";
        let lag = &backup[backup.find("lag: at most ").expect("lag")..];
        assert_eq!(number_after(lag, "lag: at most "), Some(3.0));
        assert_eq!(number_after(lag, ", p99 "), Some(9199.0));
        assert_eq!(number_after(lag, ", max "), Some(9300.0));
        let vm = "lockstep: guest net was stopped by the host after 3068 exits in 1.943 s (1579 exits/s)";
        assert_eq!(number_after(vm, " after "), Some(3068.0));
    }

    #[test]
    fn stats_json_fills_the_figures_and_the_hold_curve() {
        let mut m = Measured::new(100.0, 1.0, BTreeMap::new());
        let stats: Value = serde_json::from_str(
            r#"{"exits":77,"elapsed_s":2.027,"entries":47,"log_bytes":2064,"acks":44,"frames_released":3,
                "max_held":1,"hold_p50_ns":471000,"hold_p99_ns":3839000,"hold_p999_ns":3839000,"unprotected":false,
                "hold_quantiles_ns":[[0.9,1000000],[0.5,471000]]}"#,
        )
        .expect("json");
        apply_stats(&mut m, &stats);
        assert_eq!(m.log_bytes, 2064.0);
        assert_eq!(m.hold_at(0.5), 471.0);
        assert_eq!(m.hold_at(0.999), 3839.0);
        let quantiles: Vec<f64> = m.hold_us.iter().map(|(q, _)| *q).collect();
        assert_eq!(quantiles, [0.5, 0.9, 0.99, 0.999]);
        assert!(m.ring_stalls.is_nan());
    }

    #[test]
    fn spreads_ignore_missing_figures() {
        let s = Spread::of(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[]).text(0), "-");
    }

    #[test]
    fn plots_default_beside_the_profile_directory() {
        assert_eq!(
            default_plot_dir(Path::new("/w/target/release/lockstep")),
            PathBuf::from("/w/target/table2")
        );
    }
}
