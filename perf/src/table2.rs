//! `lockstep bench table2`: the paper's Table 2, as the paper ran it.
//!
//! The paper measured a guest's network bandwidth to a client over a
//! 1 Gbit/s link, FT off and FT on over a 1 and a 10 Gbit/s logging link.
//! Here the hosts are network namespaces of a [`testbed`] of the run's own
//! (nothing in the root namespace), joined by veths shaped with `tbf`:
//!
//! ```text
//!  client ns ── client link (1 Gbit/s each way) ── switch ──┬── host a: tap0 ── guest (primary, or FT off)
//!   the load: iperf3 -c GUEST [-R],                         └── host b: tap0 (backup; silent)
//!   or the guest's sink/source          host a ══ logging link (1 or 10 Gbit/s; tcp) ══ host b
//! ```
//!
//! - **receive**: the client sends to the guest; every received frame is
//!   logged, and the guest's TCP acks are outputs held by the Output Rule.
//! - **transmit**: the guest sends to the client; its data frames are held.
//!
//! Rows (see [`scenario`]): FT on over tcp with a 1 Gbit/s and a 10 Gbit/s
//! logging link, over shm (same host), each against FT off in the same
//! rounds; and the unshaped, CPU-bound row (nothing shaped) that reports the
//! primary host's CPU per Gbit/s with FT on against FT off.
//!
//! Each measurement starts fresh processes ([`runner`]); configurations are
//! interleaved and the order rotates every round. The ratio is the median
//! of the ratios paired within each round, so a shared host's slow drifts
//! cancel. Every FT-on row reports the logging bandwidth, log bytes per
//! client byte, held-output percentiles, ack round trip and the backup's
//! lag; a receive log is recorded once and taken apart ([`anatomy`]) to
//! show where the log's bytes go. `--check` gates on a committed baseline
//! ([`gate`]).

mod anatomy;
pub mod gate;
pub(crate) mod hosts;
pub mod load;
mod plot;
mod procfs;
pub mod report;
pub(crate) mod runner;
pub mod scenario;
pub mod stats;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

pub use gate::check;
pub use report::Row;
pub use scenario::{Direction, GOAL_1G, GOAL_10G, PAPER, Scenario, Transport, Variant};

use crate::{BenchError, Report, git_revision};
use load::{Builtin, Iperf3, Load, Timing};
use stats::{Cells, Sample};

/// Which load generator drives the traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadKind {
    /// The guest's sink (5001) and source (5002), driven by our own client.
    Builtin,
    /// Stock `iperf3 -c GUEST [-R] -J` against the guest's port 5201.
    Iperf3,
}

impl LoadKind {
    /// `builtin` or `iperf3`.
    pub fn from_name(name: &str) -> Result<Self, BenchError> {
        match name {
            "builtin" => Ok(Self::Builtin),
            "iperf3" => Ok(Self::Iperf3),
            other => Err(BenchError::Setup(format!(
                "unknown load `{other}`: builtin or iperf3"
            ))),
        }
    }

    fn load(self) -> &'static dyn Load {
        match self {
            Self::Builtin => &Builtin,
            Self::Iperf3 => &Iperf3,
        }
    }
}

/// How to run the benchmark.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `lockstep` executable to start.
    pub exe: PathBuf,
    /// Seconds per measurement window.
    pub seconds: f64,
    /// Seconds of traffic before the window opens (TCP slow start).
    pub warmup: f64,
    /// Rounds of every configuration and direction.
    pub rounds: usize,
    /// The rows to measure.
    pub scenarios: Vec<Scenario>,
    /// What drives the traffic.
    pub load: LoadKind,
    /// Record one receive log and report where its bytes go.
    pub anatomy: bool,
    /// Where to write the SVG plots (`None`: no plots).
    pub plots: Option<PathBuf>,
}

impl Options {
    /// Defaults: 5 rounds of 4 s windows (after 1 s of warm-up), or with
    /// `quick` 3 rounds of 1.5 s (after 0.5 s), the form CI gates on.
    pub fn new(exe: PathBuf, quick: bool) -> Self {
        let plots = Some(default_plot_dir(&exe));
        Self {
            exe,
            seconds: if quick { 1.5 } else { 4.0 },
            warmup: if quick { 0.5 } else { 1.0 },
            rounds: if quick { 3 } else { 5 },
            scenarios: scenario::default_scenarios(),
            load: LoadKind::Iperf3,
            anatomy: true,
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

/// Why RDMA is not measured here.
fn rdma_absence() -> &'static str {
    let devices = std::fs::read_dir("/sys/class/infiniband")
        .map(|entries| entries.count())
        .unwrap_or(0);
    if devices == 0 {
        "not available (no RDMA device)"
    } else {
        "not measured (an RDMA device exists, but the bench drives tcp and shm only)"
    }
}

fn progress_line(done: usize, total: usize, sample: &Sample, scenario: &Scenario) -> String {
    let what = format!(
        "table2 [{done:>2}/{total}] round {} {:<8} {:<8} {:<16}",
        sample.round + 1,
        sample.direction.name(),
        scenario.name,
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
            if let scenario::Config::FtOn(_) = sample.config {
                let _ = write!(
                    line,
                    "; log {:.0} Mbit/s, {:.3} B per client B; held p50 {:.0} µs",
                    m.log_mbit_s(),
                    m.log_per_client_byte(),
                    m.hold_at(0.5)
                );
            }
            line.push(')');
            line
        }
        Err(why) => format!("{what} FAILED: {why}"),
    }
}

/// Runs the benchmark and returns the report and its rows.
pub fn run(options: &Options) -> Result<(Report, Vec<Row>), BenchError> {
    let mut hosts = hosts::Hosts::up().map_err(BenchError::Setup)?;
    let dir = std::env::temp_dir().join(format!("lockstep-table2-{}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| BenchError::Setup(format!("{}: {e}", dir.display())))?;
    let (cores, kernel, cpu_model, load_average) = procfs::host_facts();
    let load = options.load.load();
    let scenarios = &options.scenarios;
    let per_round: usize = scenarios
        .iter()
        .map(|s| s.configs().len() * Direction::ALL.len())
        .sum();
    let total = options.rounds * per_round;
    eprintln!(
        "table2: {total} measurements ({} rounds of {per_round}) of {:.1} s after {:.1} s of warm-up, fresh processes each, load {}; {}; host {cores} cores, load average {load_average}",
        options.rounds,
        options.seconds,
        options.warmup,
        load.name(),
        hosts.describe()
    );
    let began = Instant::now();
    let mut bench = runner::Bench {
        exe: &options.exe,
        hosts: &mut hosts,
        load,
        timing: Timing {
            warmup: options.warmup,
            seconds: options.seconds,
        },
        dir: &dir,
    };
    let mut samples: Vec<Sample> = Vec::new();
    for round in 0..options.rounds {
        for direction in Direction::ALL {
            for (index, scenario) in scenarios.iter().enumerate() {
                // Rotate the order every round so no configuration always
                // runs first (or right after another's teardown).
                let mut order = scenario.configs();
                let shift = (round + direction as usize + index) % order.len();
                order.rotate_left(shift);
                for config in order {
                    let mut sample = runner::one(&mut bench, scenario, index, config, direction);
                    sample.round = round;
                    eprintln!(
                        "{}",
                        progress_line(samples.len() + 1, total, &sample, scenario)
                    );
                    samples.push(sample);
                }
            }
        }
    }
    let anatomy = match scenarios.iter().find(|s| s.client_mbit.is_some()) {
        Some(scenario) if options.anatomy => {
            let result = runner::record_receive(&mut bench, scenario);
            if let Err(why) = &result {
                eprintln!("table2: the receive log for the byte breakdown failed: {why}");
            }
            result.ok()
        }
        _ => None,
    };
    let elapsed = began.elapsed().as_secs_f64();
    let testbed = bench.hosts.describe();
    drop(hosts);
    let _ = std::fs::remove_dir_all(&dir);
    let cells = Cells { samples: &samples };
    let rows = report::rows(scenarios, &cells, cores);
    let heading = format!(
        "Table 2: guest TCP bandwidth, Mbit/s (load {}; {} rounds of {:.1} s per cell after {:.1} s warm-up, interleaved, fresh processes; median [min..max]; {elapsed:.0} s in all)",
        load.name(),
        options.rounds,
        options.seconds,
        options.warmup
    );
    let mut text = report::tables(&rows, &heading, rdma_absence());
    if let Some(anatomy) = anatomy {
        text.push_str(&anatomy.text());
    }
    text.push_str(&report::breakdown(scenarios, &cells, cores));
    text.push_str(&report::findings(&rows, &cells, scenarios, cores));
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
            "load_average_at_start": load_average,
        },
        "testbed": testbed,
        "options": {
            "rounds": options.rounds,
            "seconds": options.seconds,
            "warmup_s": options.warmup,
            "load": load.name(),
            "scenarios": scenarios.iter().map(|s| json!({
                "name": s.name,
                "client_link_mbit": s.client_mbit,
                "variants": s.variants.iter().map(|v| v.name()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        },
        "elapsed_s": elapsed,
        "paper": PAPER.iter().map(|p| json!({
            "test": p.test, "ft_off_mbit": p.ft_off, "ft_on_1g_mbit": p.ft_on_1g,
            "ft_on_10g_mbit": p.ft_on_10g, "log_1g_mbit": p.log_1g, "log_10g_mbit": p.log_10g,
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "receive_log_anatomy": anatomy.map(anatomy::Anatomy::to_json),
        "rdma": rdma_absence(),
        "samples": samples.iter().map(|s| json!({
            "round": s.round,
            "scenario": scenarios.get(s.scenario).map(|sc| sc.name),
            "config": s.config.name(),
            "direction": s.direction.name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_default_beside_the_profile_directory() {
        assert_eq!(
            default_plot_dir(Path::new("/w/target/release/lockstep")),
            PathBuf::from("/w/target/table2")
        );
    }

    #[test]
    fn loads_are_named() {
        assert_eq!(
            LoadKind::from_name("iperf3").expect("known"),
            LoadKind::Iperf3
        );
        let error = LoadKind::from_name("netperf").expect_err("unknown");
        assert!(error.to_string().contains("`netperf`"));
    }
}
