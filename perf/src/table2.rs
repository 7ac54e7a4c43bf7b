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
//! replication link, every received frame logged and every output held until
//! the backup's ack covers it. Configurations and directions are interleaved
//! and repeated; the table reports medians with min..max, the FT/base ratio,
//! the logging channel's bandwidth, and the time outputs were held.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{BenchError, Report, git_revision, median};

/// The paper's Table 2 (VMware FT, 2010), Mbit/s.
pub const PAPER: [(&str, f64, f64, f64, f64, f64); 2] = [
    // test, FT off, FT on 1 Gbit/s logging, FT on 10 Gbit/s logging, logging at 1G, logging at 10G
    ("receive", 940.0, 604.0, 860.0, 730.0, 990.0),
    ("transmit", 940.0, 855.0, 935.0, 42.0, 60.0),
];

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `lockstep` executable to start.
    pub exe: PathBuf,
    /// TAP interface (created with 10.78.0.1/24 if missing).
    pub tap: String,
    /// Seconds per measurement.
    pub seconds: f64,
    /// Rounds of every configuration and direction.
    pub rounds: usize,
    /// Replication link port.
    pub link_port: u16,
}

impl Options {
    /// Defaults: 3 rounds of 3 s, or 2 rounds of 1.5 s with `quick`.
    pub fn new(exe: PathBuf, quick: bool) -> Self {
        Self {
            exe,
            tap: "lsbench0".into(),
            seconds: if quick { 1.5 } else { 3.0 },
            rounds: if quick { 2 } else { 3 },
            link_port: 7790,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    FtOff,
    FtOnTcp,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::FtOff => "ft-off",
            Self::FtOnTcp => "ft-on-tcp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Receive,
    Transmit,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Transmit => "transmit",
        }
    }
}

/// The guest's address: a subnet of its own (10.78.0.0/24), so the bench
/// never collides with `lockstep up` (10.77.0.0/24).
const GUEST: &str = "10.78.0.2";
/// The host side of the bench's TAP.
const HOST_CIDR: &str = "10.78.0.1/24";
/// `--arg` that puts the net guest at 10.78.0.2/24 (see guest_abi).
const GUEST_ARG: &str = "103252099074"; // (24 << 32) | 0x0a4e0002

/// One measurement.
#[derive(Clone, Debug, Default)]
struct Sample {
    mbit_s: f64,
    log_mbit_s: f64,
    hold_p50_us: f64,
    hold_p99_us: f64,
    hold_p999_us: f64,
}

struct Running {
    children: Vec<Child>,
    stats: Option<PathBuf>,
}

fn spawn(options: &Options, args: &[&str]) -> Result<Child, BenchError> {
    Command::new(&options.exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start {}: {e}", options.exe.display())))
}

fn start(options: &Options, config: Config, dir: &Path) -> Result<Running, BenchError> {
    let tap = options.tap.as_str();
    let running = match config {
        Config::FtOff => Running {
            children: vec![spawn(
                options,
                &[
                    "run",
                    "--guest",
                    "net",
                    "--tap",
                    tap,
                    "--arg",
                    GUEST_ARG,
                    "--quiet",
                    "--mem-mib",
                    "32",
                ],
            )?],
            stats: None,
        },
        Config::FtOnTcp => {
            let link = format!("127.0.0.1:{}", options.link_port);
            let stats = dir.join("primary.json");
            let _ = std::fs::remove_file(&stats);
            let backup = spawn(
                options,
                &[
                    "backup",
                    "--listen",
                    &link,
                    "--quiet",
                    "--peer-timeout-ms",
                    "60000",
                ],
            )?;
            let stats_text = stats.to_string_lossy().into_owned();
            let primary = spawn(
                options,
                &[
                    "primary",
                    "--backup",
                    &link,
                    "--guest",
                    "net",
                    "--tap",
                    tap,
                    "--arg",
                    GUEST_ARG,
                    "--quiet",
                    "--mem-mib",
                    "32",
                    "--peer-timeout-ms",
                    "60000",
                    "--stats",
                    &stats_text,
                ],
            )?;
            // Primary first: stopping it ends the backup.
            Running {
                children: vec![primary, backup],
                stats: Some(stats),
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stream) = TcpStream::connect_timeout(
            &format!("{GUEST}:5001")
                .parse()
                .map_err(|_| BenchError::Setup("address".into()))?,
            Duration::from_millis(200),
        ) {
            drop(stream);
            return Ok(running);
        }
        if Instant::now() > deadline {
            stop(running)?;
            return Err(BenchError::Setup(format!(
                "the {} guest did not come up on {tap}",
                config.name()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(running: Running) -> Result<Option<String>, BenchError> {
    // SIGTERM to the first process (the primary, or the lone VM): a primary
    // ends its stream with a stop record, which ends the backup.
    if let Some(first) = running.children.first() {
        let _ = Command::new("kill")
            .args(["-TERM", &first.id().to_string()])
            .status();
    }
    for mut child in running.children {
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(running
        .stats
        .and_then(|path| std::fs::read_to_string(path).ok()))
}

fn measure(direction: Direction, seconds: f64) -> Result<f64, BenchError> {
    let port = match direction {
        Direction::Receive => 5001,
        Direction::Transmit => 5002,
    };
    let mut stream = TcpStream::connect(format!("{GUEST}:{port}"))
        .map_err(|e| BenchError::Setup(format!("connect to the guest's port {port}: {e}")))?;
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buffer = vec![0x5au8; 1 << 16];
    let warmup = Duration::from_millis(300);
    let started = Instant::now();
    let mut counted_from = None;
    let mut bytes = 0u64;
    while started.elapsed() < warmup + Duration::from_secs_f64(seconds) {
        let moved = match direction {
            Direction::Receive => stream.write(&buffer),
            Direction::Transmit => stream.read(&mut buffer),
        }
        .map_err(|e| BenchError::Setup(format!("{} stream: {e}", direction.name())))?;
        if moved == 0 {
            return Err(BenchError::Setup(format!(
                "the guest closed the {} stream",
                direction.name()
            )));
        }
        if started.elapsed() >= warmup {
            counted_from.get_or_insert_with(Instant::now);
            bytes += moved as u64;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    let elapsed = counted_from.map_or(1.0, |t| t.elapsed().as_secs_f64());
    Ok(bytes as f64 * 8.0 / elapsed / 1e6)
}

fn json_number(json: &str, key: &str) -> f64 {
    let pattern = format!("\"{key}\":");
    json.find(&pattern)
        .map(|at| &json[at + pattern.len()..])
        .and_then(|rest| rest.split([',', '}']).next())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn one(
    options: &Options,
    config: Config,
    direction: Direction,
    dir: &Path,
) -> Result<Sample, BenchError> {
    let running = start(options, config, dir)?;
    let measured = measure(direction, options.seconds);
    let stats = stop(running)?;
    let mbit_s = measured?;
    let mut sample = Sample {
        mbit_s,
        ..Sample::default()
    };
    if let Some(json) = stats {
        let elapsed = json_number(&json, "elapsed_s");
        sample.log_mbit_s = json_number(&json, "log_bytes") * 8.0 / elapsed.max(1e-9) / 1e6;
        sample.hold_p50_us = json_number(&json, "hold_p50_ns") / 1000.0;
        sample.hold_p99_us = json_number(&json, "hold_p99_ns") / 1000.0;
        sample.hold_p999_us = json_number(&json, "hold_p999_ns") / 1000.0;
    }
    Ok(sample)
}

/// One row of results: medians over the rounds.
#[derive(Clone, Debug)]
pub struct Row {
    /// receive or transmit.
    pub direction: &'static str,
    /// FT off, Mbit/s (median, min, max).
    pub base: (f64, f64, f64),
    /// FT on over the TCP link, Mbit/s (median, min, max).
    pub ft: (f64, f64, f64),
    /// Logging channel bandwidth during FT on, Mbit/s (median).
    pub logging: f64,
    /// Output hold time during FT on, µs (median of p50, p99, p99.9).
    pub hold_us: (f64, f64, f64),
}

impl Row {
    /// FT on / FT off.
    pub fn ratio(&self) -> f64 {
        self.ft.0 / self.base.0
    }
}

fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    let mid = median(&mut sorted);
    let lo = sorted.first().copied().unwrap_or(f64::NAN);
    let hi = sorted.last().copied().unwrap_or(f64::NAN);
    (mid, lo, hi)
}

/// Runs the benchmark and returns the table.
pub fn run(options: &Options) -> Result<(Report, Vec<Row>), BenchError> {
    nic::tap::ensure_persistent(&options.tap, HOST_CIDR)
        .map_err(|e| BenchError::Setup(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("lockstep-table2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let mut samples: Vec<(Config, Direction, Sample)> = Vec::new();
    let total = options.rounds * 4;
    let mut done = 0;
    for _round in 0..options.rounds {
        for direction in [Direction::Receive, Direction::Transmit] {
            for config in [Config::FtOff, Config::FtOnTcp] {
                done += 1;
                eprint!(
                    "\rtable2: [{done}/{total}] {} {}          ",
                    direction.name(),
                    config.name()
                );
                let sample = one(options, config, direction, &dir)?;
                samples.push((config, direction, sample));
            }
        }
    }
    eprintln!();
    let _ = std::fs::remove_dir_all(&dir);
    let pick = |config: Config, direction: Direction, field: fn(&Sample) -> f64| -> Vec<f64> {
        samples
            .iter()
            .filter(|(c, d, _)| *c == config && *d == direction)
            .map(|(_, _, s)| field(s))
            .collect()
    };
    let rows: Vec<Row> = [Direction::Receive, Direction::Transmit]
        .into_iter()
        .map(|direction| Row {
            direction: direction.name(),
            base: summary(&pick(Config::FtOff, direction, |s| s.mbit_s)),
            ft: summary(&pick(Config::FtOnTcp, direction, |s| s.mbit_s)),
            logging: summary(&pick(Config::FtOnTcp, direction, |s| s.log_mbit_s)).0,
            hold_us: (
                summary(&pick(Config::FtOnTcp, direction, |s| s.hold_p50_us)).0,
                summary(&pick(Config::FtOnTcp, direction, |s| s.hold_p99_us)).0,
                summary(&pick(Config::FtOnTcp, direction, |s| s.hold_p999_us)).0,
            ),
        })
        .collect();
    let mut text = format!(
        "Table 2: guest network bandwidth, Mbit/s ({} round(s) of {:.1} s per cell, interleaved, fresh processes; median [min..max])\n\n\
         {:<9} | {:>7} {:>16} {:>10} | {:>22} {:>22} {:>7} {:>9}\n",
        options.rounds,
        options.seconds,
        "test",
        "paper",
        "paper FT on",
        "paper log",
        "lockstep FT off",
        "lockstep FT on (tcp)",
        "FT/base",
        "log Mbit/s"
    );
    text.push_str(&format!(
        "{:<9} | {:>7} {:>16} {:>10} | {:>22} {:>22} {:>7} {:>9}\n",
        "", "FT off", "1G / 10G log", "1G / 10G", "", "", "", ""
    ));
    for (row, paper) in rows.iter().zip(PAPER) {
        text.push_str(&format!(
            "{:<9} | {:>7.0} {:>16} {:>10} | {:>22} {:>22} {:>7.3} {:>9.1}\n",
            row.direction,
            paper.1,
            format!("{:.0} / {:.0}", paper.2, paper.3),
            format!("{:.0} / {:.0}", paper.4, paper.5),
            format!("{:.0} [{:.0}..{:.0}]", row.base.0, row.base.1, row.base.2),
            format!("{:.0} [{:.0}..{:.0}]", row.ft.0, row.ft.1, row.ft.2),
            row.ratio(),
            row.logging
        ));
    }
    text.push_str("\nheld output (FT on), time from production to release: ");
    for row in &rows {
        text.push_str(&format!(
            "{} p50 {:.0} µs p99 {:.0} µs p99.9 {:.0} µs; ",
            row.direction, row.hold_us.0, row.hold_us.1, row.hold_us.2
        ));
    }
    text.push_str(
        "\npaper ratios: receive 0.643 (1G) / 0.915 (10G), transmit 0.910 / 0.995; goal: >= 0.97\n",
    );
    let mut json = format!(
        "{{\"benchmark\":\"table2\",\"git_revision\":\"{}\",\"rounds\":{},\"seconds\":{},\"host_cpus\":{},\"rows\":[",
        git_revision(),
        options.rounds,
        options.seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (index, row) in rows.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"test\":\"{}\",\"ft_off_mbit_s\":{:.1},\"ft_on_tcp_mbit_s\":{:.1},\"ratio_tcp\":{:.4},\"logging_mbit_s\":{:.1},\"hold_p50_us\":{:.1},\"hold_p99_us\":{:.1},\"hold_p999_us\":{:.1}}}",
            row.direction, row.base.0, row.ft.0, row.ratio(), row.logging, row.hold_us.0, row.hold_us.1, row.hold_us.2
        ));
    }
    json.push_str("]}\n");
    Ok((Report { text, json }, rows))
}

/// Checks ratios against a committed baseline (`key = value` lines:
/// `tolerance = 0.15`, `receive.tcp = 0.60`, `transmit.tcp = 0.60`). Returns
/// the regressions found, as sentences.
pub fn check(rows: &[Row], baseline: &str) -> Result<Vec<String>, BenchError> {
    let mut tolerance = 0.0;
    let mut failures = Vec::new();
    let mut expected = Vec::new();
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
        match key.trim() {
            "tolerance" => tolerance = value,
            other => expected.push((other.to_string(), value)),
        }
    }
    for (key, value) in expected {
        let Some((direction, transport)) = key.split_once('.') else {
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: expected DIRECTION.TRANSPORT"
            )));
        };
        if transport != "tcp" {
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: transport `{transport}` is not measured"
            )));
        }
        let row = rows
            .iter()
            .find(|row| row.direction == direction)
            .ok_or_else(|| BenchError::Setup(format!("baseline key `{key}`: no such test")))?;
        if row.ratio() < value - tolerance {
            failures.push(format!(
                "{key}: FT/base ratio {:.3} is below the baseline {value:.3} - tolerance {tolerance:.3}",
                row.ratio()
            ));
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(direction: &'static str, base: f64, ft: f64) -> Row {
        Row {
            direction,
            base: (base, base, base),
            ft: (ft, ft, ft),
            logging: 0.0,
            hold_us: (0.0, 0.0, 0.0),
        }
    }

    #[test]
    fn gate_fails_only_beyond_the_tolerance() {
        let rows = [
            row("receive", 1000.0, 800.0),
            row("transmit", 1000.0, 950.0),
        ];
        let baseline = "tolerance = 0.1\nreceive.tcp = 0.85 # comment\ntransmit.tcp = 0.95\n";
        assert!(check(&rows, baseline).expect("valid").is_empty());
        let strict = "tolerance = 0.0\nreceive.tcp = 0.85\n";
        let failures = check(&rows, strict).expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("receive.tcp"), "{failures:?}");
    }

    #[test]
    fn malformed_baselines_are_refused() {
        let rows = [row("receive", 1.0, 1.0)];
        assert!(check(&rows, "receive.tcp 0.9").is_err());
        assert!(check(&rows, "receive.tcp = x").is_err());
        assert!(check(&rows, "receive.rdma = 0.9").is_err());
        assert!(check(&rows, "sideways.tcp = 0.9").is_err());
    }

    #[test]
    fn guest_arg_puts_the_guest_at_the_bench_address() {
        let arg: u64 = GUEST_ARG.parse().expect("number");
        let (address, prefix) = guest_abi::net_address_from_arg(arg);
        assert_eq!(
            format!(
                "{}.{}.{}.{}",
                address[0], address[1], address[2], address[3]
            ),
            GUEST
        );
        assert_eq!(prefix, 24);
    }

    #[test]
    fn json_numbers_are_found() {
        let json = "{\"a\":1.5,\"log_bytes\":1024,\"z\":true}";
        assert_eq!(json_number(json, "log_bytes"), 1024.0);
        assert!(json_number(json, "missing").is_nan());
    }
}
