//! Figures of one measurement and their statistics over the rounds: what
//! the client measured, what the processes reported when they stopped (the
//! primary's `--stats` JSON, its channel line, the backup's lag line), and
//! medians with min..max, the FT/base ratio paired within each round.

use std::collections::BTreeMap;

use replica::stats::PrimaryStats;
use serde_json::{Value, json};

use super::scenario::{Config, Direction, Variant};
use crate::median;

/// Everything measured in one run of one configuration and direction.
/// Figures that could not be obtained are NaN.
#[derive(Clone, Debug)]
pub struct Measured {
    /// The client's figure in the window, Mbit/s of TCP payload.
    pub mbit_s: f64,
    /// The window, s.
    pub window_s: f64,
    /// Payload bytes the client moved in all (warm-up and window).
    pub client_bytes: f64,
    /// Seconds traffic flowed (warm-up and window).
    pub active_s: f64,
    /// Guest exits in the process's life.
    pub exits: f64,
    /// Log entries sent.
    pub entries: f64,
    /// Log bytes sent (entry headers and payloads).
    pub log_bytes: f64,
    /// Acks received.
    pub acks: f64,
    /// Batches sent.
    pub batches: f64,
    /// Frames the output gate released.
    pub frames_released: f64,
    /// Most frames held at once.
    pub max_held: f64,
    /// Output hold time: (quantile, µs), ascending.
    pub hold_us: Vec<(f64, f64)>,
    /// Ack round trip p50, µs.
    pub ack_rtt_p50_us: f64,
    /// Ack round trip p99, µs.
    pub ack_rtt_p99_us: f64,
    /// Times the vCPU found the ring full.
    pub ring_stalls: f64,
    /// The backup's largest lag, exits.
    pub lag_max_exits: f64,
    /// How long the backup's entries waited before replay, p50 µs.
    pub lag_wait_p50_us: f64,
    /// ... p99 µs.
    pub lag_wait_p99_us: f64,
    /// ... max µs.
    pub lag_wait_max_us: f64,
    /// CPU use in the window, cores (see [`super::procfs::usage`]).
    pub cpu: BTreeMap<String, f64>,
}

impl Measured {
    /// A measurement with the client's figures and nothing reported yet.
    pub fn new(mbit_s: f64, window_s: f64, cpu: BTreeMap<String, f64>) -> Self {
        Self {
            mbit_s,
            window_s,
            client_bytes: f64::NAN,
            active_s: f64::NAN,
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
    pub fn hold_at(&self, q: f64) -> f64 {
        self.hold_us
            .iter()
            .find(|(quantile, _)| (quantile - q).abs() < 1e-9)
            .map_or(f64::NAN, |(_, us)| *us)
    }

    /// The logging channel's bandwidth: log bytes over the time traffic
    /// flowed (warm-up and window; the idle start adds a few KiB at most).
    pub fn log_mbit_s(&self) -> f64 {
        self.log_bytes * 8.0 / self.active_s.max(1e-9) / 1e6
    }

    /// Log bytes per payload byte the client moved.
    pub fn log_per_client_byte(&self) -> f64 {
        if self.client_bytes > 0.0 {
            self.log_bytes / self.client_bytes
        } else {
            f64::NAN
        }
    }

    /// Cores of the primary host's process: the primary, or the lone VM.
    pub fn primary_host_cores(&self) -> f64 {
        self.cpu
            .get("primary")
            .or_else(|| self.cpu.get("vm"))
            .copied()
            .unwrap_or(f64::NAN)
    }

    /// The primary host's core-seconds per Gbit of client traffic.
    pub fn primary_cpu_per_gbit(&self) -> f64 {
        self.primary_host_cores() / (self.mbit_s / 1e3)
    }

    /// The backup host's core-seconds per Gbit (NaN with FT off).
    pub fn backup_cpu_per_gbit(&self) -> f64 {
        self.cpu.get("backup").copied().unwrap_or(f64::NAN) / (self.mbit_s / 1e3)
    }

    /// The sample's JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "mbit_s": self.mbit_s,
            "window_s": self.window_s,
            "client_bytes": self.client_bytes,
            "active_s": self.active_s,
            "exits": self.exits,
            "entries": self.entries,
            "log_bytes": self.log_bytes,
            "log_bytes_per_client_byte": self.log_per_client_byte(),
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
pub struct Sample {
    /// Round, from 0.
    pub round: usize,
    /// Index of its scenario in the run's list.
    pub scenario: usize,
    /// Which processes.
    pub config: Config,
    /// Which way.
    pub direction: Direction,
    /// Its figures, or why it failed.
    pub result: Result<Measured, String>,
    /// Seconds from spawning the processes until the guest answered.
    pub startup_s: f64,
    /// Seconds from SIGTERM until every process was gone.
    pub stop_s: f64,
}

/// The number right after `marker` in `text`, if both are there.
pub fn number_after(text: &str, marker: &str) -> Option<f64> {
    let rest = &text[text.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Takes what a process printed when it stopped: the lone VM's exit count,
/// the primary's channel line, the backup's lag line.
pub fn apply_output(measured: &mut Measured, role: &str, output: &str) {
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    match role {
        "vm" => measured.exits = nan(number_after(output, " after ")),
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
            }
        }
        _ => {}
    }
}

/// Takes the backup's last published status (used when it was stopped
/// before it printed its summary: at most half a second old, same figures).
pub fn apply_backup_status(measured: &mut Measured, status: &str) {
    let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
    measured.lag_max_exits = nan(number_after(status, "most exits behind: "));
    measured.lag_wait_p50_us = nan(number_after(status, "entry wait p50/p99 us: "));
    measured.lag_wait_p99_us = nan(status
        .lines()
        .find_map(|line| line.strip_prefix("entry wait p50/p99 us: "))
        .and_then(|v| v.split('/').nth(1))
        .and_then(|v| v.trim().parse().ok()));
}

/// Takes the primary's `--stats` figures (its channel's only when the
/// link had a channel; the hold curve from `hold_quantiles_ns` and the
/// p50/p99/p99.9 fields).
pub fn apply_stats(measured: &mut Measured, stats: &PrimaryStats) {
    // Counts far below 2^53: exact as f64.
    let f = |v: u64| v as f64;
    measured.exits = f(stats.exits);
    measured.entries = f(stats.entries);
    measured.log_bytes = f(stats.log_bytes);
    measured.acks = f(stats.acks);
    measured.frames_released = f(stats.frames_released);
    measured.max_held = f(stats.max_held);
    if let Some(c) = &stats.channel {
        measured.batches = f(c.batches);
        measured.ring_stalls = f(c.ring_full);
        measured.ack_rtt_p50_us = f(c.ack_rtt_p50_ns) / 1e3;
        measured.ack_rtt_p99_us = f(c.ack_rtt_p99_ns) / 1e3;
    }
    let mut curve: Vec<(f64, f64)> = stats
        .hold_quantiles_ns
        .iter()
        .map(|(q, ns)| (*q, f(*ns) / 1e3))
        .collect();
    for (q, ns) in [
        (0.5, stats.hold_p50_ns),
        (0.99, stats.hold_p99_ns),
        (0.999, stats.hold_p999_ns),
    ] {
        if !curve.iter().any(|(p, _)| (p - q).abs() < 1e-9) {
            curve.push((q, f(ns) / 1e3));
        }
    }
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    measured.hold_us = curve;
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

    /// `median [min..max]`, or `-` without figures.
    pub fn text(&self, precision: usize) -> String {
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

    /// `{"median", "min", "max", "n"}`.
    pub fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "n": self.n})
    }
}

/// Figures per scenario, configuration and direction, gathered from the samples.
pub struct Cells<'a> {
    /// Every sample of the run.
    pub samples: &'a [Sample],
}

impl Cells<'_> {
    /// The successful measurements of one cell.
    pub fn ok(
        &self,
        scenario: usize,
        config: Config,
        direction: Direction,
    ) -> impl Iterator<Item = &Measured> {
        self.samples
            .iter()
            .filter(move |s| {
                s.scenario == scenario && s.config == config && s.direction == direction
            })
            .filter_map(|s| s.result.as_ref().ok())
    }

    /// The spread of `f` over one cell.
    pub fn values(
        &self,
        scenario: usize,
        config: Config,
        direction: Direction,
        f: impl Fn(&Measured) -> f64,
    ) -> Spread {
        Spread::of(
            &self
                .ok(scenario, config, direction)
                .map(f)
                .collect::<Vec<_>>(),
        )
    }

    /// Why the runs of one cell failed.
    pub fn failures(&self, scenario: usize, config: Config, direction: Direction) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.scenario == scenario && s.config == config && s.direction == direction)
            .filter_map(|s| s.result.as_ref().err().cloned())
            .collect()
    }

    /// `f(FT on) / f(FT off)` per round where both succeeded.
    pub fn paired(
        &self,
        scenario: usize,
        variant: Variant,
        direction: Direction,
        f: impl Fn(&Measured) -> f64,
    ) -> Spread {
        let rounds = self.samples.iter().map(|s| s.round).max().unwrap_or(0);
        let mut ratios = Vec::new();
        for round in 0..=rounds {
            let find = |config: Config| {
                self.samples
                    .iter()
                    .find(|s| {
                        s.round == round
                            && s.scenario == scenario
                            && s.config == config
                            && s.direction == direction
                    })
                    .and_then(|s| s.result.as_ref().ok())
                    .map(&f)
            };
            if let (Some(base), Some(ft)) = (find(Config::FtOff), find(Config::FtOn(variant)))
                && base > 0.0
            {
                ratios.push(ft / base);
            }
        }
        Spread::of(&ratios)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_reports_are_parsed() {
        let primary = "lockstep primary: guest net was stopped by the host after 125 exits; 89 acks; \
            backup acknowledged 98 of 98 entries (everything); channel uring-tcp: 94 batches, \
            ack round trip p50 272 µs, p99 5636 µs, 53 heartbeats sent\n\
            lockstep primary: output gate released 3 frames, held at most 1; hold time p50 471 µs, p99 3839 µs";
        let mut m = Measured::new(1.0, 1.0, BTreeMap::new());
        apply_output(&mut m, "primary", primary);
        assert_eq!(
            (m.ack_rtt_p50_us, m.ack_rtt_p99_us, m.batches),
            (272.0, 5636.0, 94.0)
        );
        let backup = "backup: replayed 77 exits and 45 events; 1 of 1 digests matched; guest net was stopped by the host; \
            lag: at most 3 exits behind; entries waited p50 41 µs, p99 9199 µs, max 9300 µs";
        apply_output(&mut m, "backup", backup);
        assert_eq!(
            (
                m.lag_max_exits,
                m.lag_wait_p50_us,
                m.lag_wait_p99_us,
                m.lag_wait_max_us
            ),
            (3.0, 41.0, 9199.0, 9300.0)
        );
        let vm = "lockstep: guest net was stopped by the host after 3068 exits in 1.943 s (1579 exits/s)";
        apply_output(&mut m, "vm", vm);
        assert_eq!(m.exits, 3068.0);
        apply_backup_status(
            &mut m,
            "role: backup\nmost exits behind: 17\nentry wait p50/p99 us: 12/345\n",
        );
        assert_eq!(
            (m.lag_max_exits, m.lag_wait_p50_us, m.lag_wait_p99_us),
            (17.0, 12.0, 345.0)
        );
    }

    #[test]
    fn stats_json_fills_the_figures_and_the_hold_curve() {
        let mut m = Measured::new(100.0, 1.0, BTreeMap::new());
        let stats: PrimaryStats = serde_json::from_str(
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
    fn per_byte_and_per_gbit_figures() {
        let cpu = BTreeMap::from([("primary".to_string(), 0.5), ("backup".to_string(), 0.25)]);
        let mut m = Measured::new(500.0, 1.0, cpu);
        m.client_bytes = 1000.0;
        m.log_bytes = 1050.0;
        m.active_s = 2.0;
        assert_eq!(m.log_per_client_byte(), 1.05);
        assert_eq!(m.log_mbit_s(), 1050.0 * 8.0 / 2.0 / 1e6);
        assert_eq!(m.primary_cpu_per_gbit(), 1.0);
        assert_eq!(m.backup_cpu_per_gbit(), 0.5);
        let lone = Measured::new(1000.0, 1.0, BTreeMap::from([("vm".to_string(), 0.8)]));
        assert_eq!(lone.primary_cpu_per_gbit(), 0.8);
        assert!(lone.backup_cpu_per_gbit().is_nan());
        assert!(
            Measured::new(1.0, 1.0, BTreeMap::new())
                .log_per_client_byte()
                .is_nan()
        );
    }

    fn sample(round: usize, config: Config, mbit: f64) -> Sample {
        Sample {
            round,
            scenario: 0,
            config,
            direction: Direction::Receive,
            result: Ok(Measured::new(mbit, 1.0, BTreeMap::new())),
            startup_s: 0.0,
            stop_s: 0.0,
        }
    }

    #[test]
    fn ratios_pair_within_rounds() {
        let ft = Variant::tcp(Some(1000));
        let mut failed = sample(2, Config::FtOn(ft), 0.0);
        failed.result = Err("primary exited".into());
        let samples = [
            sample(0, Config::FtOff, 1000.0),
            sample(0, Config::FtOn(ft), 900.0),
            sample(1, Config::FtOff, 500.0),
            sample(1, Config::FtOn(ft), 500.0),
            sample(2, Config::FtOff, 800.0),
            failed,
        ];
        let cells = Cells { samples: &samples };
        let ratio = cells.paired(0, ft, Direction::Receive, |m| m.mbit_s);
        assert_eq!((ratio.n, ratio.min, ratio.max), (2, 0.9, 1.0));
        assert_eq!(
            cells
                .failures(0, Config::FtOn(ft), Direction::Receive)
                .len(),
            1
        );
        assert_eq!(
            cells
                .values(0, Config::FtOff, Direction::Receive, |m| m.mbit_s)
                .median,
            800.0
        );
    }

    #[test]
    fn spreads_ignore_missing_figures() {
        let s = Spread::of(&[3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(Spread::of(&[]).text(0), "-");
    }
}
