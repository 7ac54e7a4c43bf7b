//! The perf-regression gate (`lockstep bench table2 --check FILE`).
//!
//! A baseline is lines of `key = number` (`#` starts a comment):
//!
//! ```text
//! tolerance = 0.07                     strict: the best round may fall this far below a row's figure, the median twice as far
//! loaded_floor = 0.25                  loaded: FT/base floor on a host too busy to judge percents
//! shared_host_max_cores = 0.5          other work above this many cores makes a row "loaded"
//! paper.link_full_mbit = 850           ... and so does FT off below this (the host, not the link, bounds it)
//! receive.tcp-1g = 0.97                the row's FT/base figure (strict floors: best round 0.97 - tolerance, median 0.97 - 2 x tolerance)
//! receive.tcp-1g.tolerance = 0.08      its own strict tolerance
//! receive.tcp-1g.loaded_floor = 0.3    its own loaded floor
//! receive.tcp-1g.held_p50_max_us = 2000   strict: held output p50 (median over rounds) ceiling
//! receive.tcp-1g.held_p99_max_us = 20000  strict: held output p99 ceiling
//! receive.tcp-1g.log_per_byte_max = 1.08  always: log bytes per client byte ceiling
//! receive.held_per_rtt_max = 2.3       always: held output p50 / ack RTT p50, median over the direction's rows
//! ```
//!
//! Every row is judged in one of two tiers, and the verdict says which:
//!
//! - **strict**, when the host was quiet enough for the shaped link to
//!   bound FT off (FT off reached `SCENARIO.link_full_mbit` and other work
//!   took at most `shared_host_max_cores`): the ratio floors (see
//!   [`strict_ratio_failure`]: one slow round of three is not a regression) and the
//!   held-output ceilings apply. A release on a timer, acks serialised or a
//!   transport that stalls lengthen the guest's TCP round trip past what its
//!   512 KiB window covers at 1 Gbit/s (4 ms), and show in both.
//! - **loaded**, otherwise: bandwidth is bounded by CPU the benchmark does
//!   not own, both sides of the ratio swing by tens of percent, and only a
//!   collapse below `loaded_floor` is a regression.
//!
//! In both tiers, a failed run (FT on or FT off), a log-volume ceiling and
//! the held-per-RTT ceiling are regressions. Held output over the ack round
//! trip measured in the same runs cancels most of a shared host's
//! scheduling delay, which inflates both: in receive (the guest's acks are
//! the held outputs, one or a few per exit) a healthy release on the ack
//! gave 1.3 to 2.1 on a host whose other work took 1.3 to 1.7 of its 2
//! cores, and releasing on a 2 ms tick instead gave 2.5 to 4.0 (median
//! 2.9). Transmit's bursts of hundreds of frames per exit wait behind each
//! other's release, so its ratio (3 to 9) says little and is not gated. Row keys are `DIRECTION.VARIANT` (see
//! [`super::scenario::Scenario::key`]); a row the run did not measure is an
//! error for tcp and shm and skipped for `rdma`.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::report::Row;
use super::stats::Spread;
use crate::BenchError;

/// The per-row checks a baseline can ask for, by key suffix.
const ROW_SUFFIXES: [&str; 5] = [
    "tolerance",
    "loaded_floor",
    "held_p50_max_us",
    "held_p99_max_us",
    "log_per_byte_max",
];

/// One row's expectations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expectation {
    /// FT/base figure; the strict floor is this minus the tolerance.
    pub ratio: Option<f64>,
    /// Allowed strict shortfall under `ratio`.
    pub tolerance: Option<f64>,
    /// FT/base floor in the loaded tier.
    pub loaded_floor: Option<f64>,
    /// Ceiling of the held-output p50, µs (strict tier).
    pub held_p50_max_us: Option<f64>,
    /// Ceiling of the held-output p99, µs (strict tier).
    pub held_p99_max_us: Option<f64>,
    /// Ceiling of log bytes per client byte (both tiers).
    pub log_per_byte_max: Option<f64>,
}

/// A parsed baseline.
#[derive(Clone, Debug, PartialEq)]
pub struct Baseline {
    /// Default strict tolerance.
    pub tolerance: f64,
    /// Default loaded floor.
    pub loaded_floor: f64,
    /// Other work (cores) above which a row is judged loaded.
    pub shared_host_max_cores: f64,
    /// Per row key, in file order.
    pub rows: Vec<(String, Expectation)>,
    /// Per scenario: the FT-off Mbit/s at which the link, not the host,
    /// bounds the rows.
    pub link_full_mbit: BTreeMap<String, f64>,
    /// Per direction: the ceiling of held output p50 over ack RTT p50
    /// (median over the direction's FT-on rows).
    pub held_per_rtt_max: BTreeMap<String, f64>,
}

impl Default for Baseline {
    fn default() -> Self {
        Self {
            tolerance: 0.0,
            loaded_floor: 0.0,
            shared_host_max_cores: 0.5,
            rows: Vec::new(),
            link_full_mbit: BTreeMap::new(),
            held_per_rtt_max: BTreeMap::new(),
        }
    }
}

impl Baseline {
    fn row(&mut self, key: &str) -> &mut Expectation {
        if let Some(index) = self.rows.iter().position(|(k, _)| k == key) {
            return &mut self.rows[index].1;
        }
        self.rows.push((key.to_string(), Expectation::default()));
        let last = self.rows.len() - 1;
        &mut self.rows[last].1
    }
}

fn bad(line: usize, what: String) -> BenchError {
    BenchError::Setup(format!("baseline line {line}: {what}"))
}

/// Parses a baseline (see the module docs).
pub fn parse_baseline(text: &str) -> Result<Baseline, BenchError> {
    let mut baseline = Baseline::default();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(number, "expected `key = value`".into()));
        };
        let (key, value) = (key.trim(), value.trim());
        let value: f64 = value
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| bad(number, format!("`{value}` is not a non-negative number")))?;
        match key {
            "tolerance" => {
                baseline.tolerance = value;
                continue;
            }
            "loaded_floor" => {
                baseline.loaded_floor = value;
                continue;
            }
            "shared_host_max_cores" => {
                baseline.shared_host_max_cores = value;
                continue;
            }
            _ => {}
        }
        if let Some(scenario) = key.strip_suffix(".link_full_mbit") {
            baseline.link_full_mbit.insert(scenario.to_string(), value);
            continue;
        }
        let parts: Vec<&str> = key.split('.').collect();
        if let [direction, "held_per_rtt_max"] = parts.as_slice()
            && super::scenario::Direction::from_name(direction).is_some()
        {
            baseline
                .held_per_rtt_max
                .insert((*direction).to_string(), value);
            continue;
        }
        let (row, suffix) = match parts.as_slice() {
            [direction, variant] => (format!("{direction}.{variant}"), None),
            [direction, variant, suffix] => (format!("{direction}.{variant}"), Some(*suffix)),
            _ => {
                return Err(bad(
                    number,
                    format!("key `{key}`: expected DIRECTION.VARIANT[.CHECK]"),
                ));
            }
        };
        let direction = parts[0];
        if super::scenario::Direction::from_name(direction).is_none() {
            return Err(bad(
                number,
                format!("key `{key}`: no test `{direction}` (receive, transmit)"),
            ));
        }
        let expectation = baseline.row(&row);
        let slot = match suffix {
            None => &mut expectation.ratio,
            Some("tolerance") => &mut expectation.tolerance,
            Some("loaded_floor") => &mut expectation.loaded_floor,
            Some("held_p50_max_us") => &mut expectation.held_p50_max_us,
            Some("held_p99_max_us") => &mut expectation.held_p99_max_us,
            Some("log_per_byte_max") => &mut expectation.log_per_byte_max,
            Some(other) => {
                return Err(bad(
                    number,
                    format!(
                        "key `{key}`: unknown check `{other}` (one of: {})",
                        ROW_SUFFIXES.join(", ")
                    ),
                ));
            }
        };
        *slot = Some(value);
    }
    for (key, expectation) in &baseline.rows {
        if expectation.ratio.is_none() && expectation.tolerance.is_some() {
            return Err(BenchError::Setup(format!(
                "baseline: `{key}.tolerance` has no `{key}` ratio"
            )));
        }
    }
    Ok(baseline)
}

/// How a row was judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The link bounded FT off on a quiet host: percents count.
    Strict,
    /// The host's CPU did: only collapses count.
    Loaded,
}

/// The gate's verdict.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// Regressions, as sentences (empty: the gate passes).
    pub regressions: Vec<String>,
    /// One line per judged row: its tier and why.
    pub notes: Vec<String>,
}

/// `value <= ceiling`, with a missing figure (NaN) failing.
fn within(value: f64, ceiling: f64) -> bool {
    matches!(
        value.partial_cmp(&ceiling),
        Some(Ordering::Less | Ordering::Equal)
    )
}

/// Judges the rows against a committed baseline (see the module docs).
pub fn judge(rows: &[Row], baseline: &str) -> Result<Verdict, BenchError> {
    let baseline = parse_baseline(baseline)?;
    for scenario in baseline.link_full_mbit.keys() {
        if !rows.iter().any(|r| r.scenario == scenario) {
            return Err(BenchError::Setup(format!(
                "baseline key `{scenario}.link_full_mbit`: scenario `{scenario}` is not measured"
            )));
        }
    }
    let mut verdict = Verdict::default();
    for (direction, ceiling) in &baseline.held_per_rtt_max {
        let mut ratios: Vec<f64> = rows
            .iter()
            .filter(|r| r.direction.name() == direction && r.ft.n > 0)
            .map(|r| r.hold_us.0 / r.ack_rtt_us.0)
            .filter(|v| v.is_finite())
            .collect();
        let ratio = crate::median(&mut ratios);
        verdict.notes.push(format!(
            "{direction}: held output p50 / ack RTT p50 {ratio:.2} over {} rows (ceiling {ceiling:.2})",
            ratios.len()
        ));
        if !within(ratio, *ceiling) {
            verdict.regressions.push(format!(
                "{direction}: held output waits {ratio:.2} ack round trips at p50 (median over {} rows), above the ceiling {ceiling:.2}: is output released late?",
                ratios.len()
            ));
        }
    }
    for (key, expect) in &baseline.rows {
        let Some(row) = rows.iter().find(|row| row.key == *key) else {
            if key.ends_with(".rdma") || key.contains(".rdma-") {
                continue;
            }
            return Err(BenchError::Setup(format!(
                "baseline key `{key}`: no such row is measured"
            )));
        };
        let full = baseline.link_full_mbit.get(row.scenario).copied();
        let quiet = within(row.outside_cores, baseline.shared_host_max_cores);
        let filled = full.is_none_or(|least| within(least, row.base.median));
        let tier = if quiet && filled {
            Tier::Strict
        } else {
            Tier::Loaded
        };
        verdict.notes.push(format!(
            "{key}: {} (FT off {:.0} Mbit/s{}; other work {:.2} cores, at most {:.2} for strict)",
            match tier {
                Tier::Strict => "strict",
                Tier::Loaded => "loaded: only a collapse counts",
            },
            row.base.median,
            full.map_or_else(String::new, |least| format!(", {least:.0} fills the link")),
            row.outside_cores,
            baseline.shared_host_max_cores,
        ));
        let regressions = &mut verdict.regressions;
        for (what, failures, done) in [
            ("FT-on", &row.failures, row.ft.n),
            ("FT-off", &row.base_failures, row.base.n),
        ] {
            if !failures.is_empty() {
                regressions.push(format!(
                    "{key}: {} of {} {what} runs failed ({})",
                    failures.len(),
                    failures.len() + done,
                    failures.first().map_or("", String::as_str)
                ));
            }
        }
        let Some(ratio) = row.ratio() else {
            if row.failures.is_empty() {
                regressions.push(format!("{key}: no FT/base ratio (no paired rounds)"));
            }
            continue;
        };
        match tier {
            Tier::Strict => {
                if let Some(value) = expect.ratio {
                    let tolerance = expect.tolerance.unwrap_or(baseline.tolerance);
                    if let Some(failure) = strict_ratio_failure(&row.ratio, value, tolerance) {
                        regressions.push(format!("{key}: {failure}"));
                    }
                }
                for (what, ceiling, value) in [
                    ("held output p50", expect.held_p50_max_us, row.hold_us.0),
                    ("held output p99", expect.held_p99_max_us, row.hold_us.1),
                ] {
                    if let Some(ceiling) = ceiling
                        && !within(value, ceiling)
                    {
                        regressions.push(format!(
                            "{key}: {what} {value:.0} µs is above the ceiling {ceiling:.0} µs"
                        ));
                    }
                }
            }
            Tier::Loaded => {
                let floor = expect.loaded_floor.unwrap_or(baseline.loaded_floor);
                if ratio < floor {
                    regressions.push(format!(
                        "{key}: FT/base ratio {ratio:.3} collapsed below the loaded-host floor {floor:.3}"
                    ));
                }
            }
        }
        if let Some(ceiling) = expect.log_per_byte_max
            && !within(row.log_per_client_byte.median, ceiling)
        {
            regressions.push(format!(
                "{key}: log bytes per client byte {:.3} is above the ceiling {ceiling:.3}",
                row.log_per_client_byte.median
            ));
        }
    }
    Ok(verdict)
}

/// The strict tier's ratio rule, on the paired rounds' spread: a row
/// regresses when even its best round falls below `figure - tolerance`, or
/// when its median falls below `figure - 2 * tolerance`.
///
/// The median alone flaked on CI's quiet host: one slow round among three
/// (receive shm [0.725..0.925], median 0.799 against a floor of 0.80; the
/// previous run on the same host had 0.880 [0.874..0.901]). A change that
/// costs the row more than the tolerance moves every round, so it still
/// fails the first clause; one that costs it twice the tolerance fails
/// the second even with a lucky round.
fn strict_ratio_failure(ratio: &Spread, figure: f64, tolerance: f64) -> Option<String> {
    let floor = figure - tolerance;
    let median_floor = figure - 2.0 * tolerance;
    if ratio.max < floor {
        Some(format!(
            "FT/base ratio {:.3} [{:.3}..{:.3}]: even the best of {} rounds is below the baseline {figure:.3} - tolerance {tolerance:.3}",
            ratio.median, ratio.min, ratio.max, ratio.n
        ))
    } else if ratio.median < median_floor {
        Some(format!(
            "FT/base ratio {:.3} [{:.3}..{:.3}]: the median of {} rounds is below the baseline {figure:.3} - 2 x tolerance {tolerance:.3}",
            ratio.median, ratio.min, ratio.max, ratio.n
        ))
    } else {
        None
    }
}

/// The regressions [`judge`] finds (empty: the gate passes).
pub fn check(rows: &[Row], baseline: &str) -> Result<Vec<String>, BenchError> {
    Ok(judge(rows, baseline)?.regressions)
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::row;
    use super::super::stats::Spread;
    use super::*;

    #[test]
    fn strict_rows_fail_beyond_the_tolerance() {
        let rows = [
            row("receive", "tcp-1g", 940.0, 910.0),
            row("transmit", "tcp-1g", 940.0, 935.0),
            row("receive", "shm", 940.0, 470.0),
        ];
        let baseline = "tolerance = 0.05\nreceive.tcp-1g = 0.97 # comment\ntransmit.tcp-1g = 0.99\n\
                        receive.shm = 0.9\nreceive.shm.tolerance = 0.45\nreceive.rdma = 0.99\n";
        let verdict = judge(&rows, baseline).expect("valid");
        assert!(verdict.regressions.is_empty(), "{verdict:?}");
        assert!(verdict.notes[0].contains("strict"), "{verdict:?}");
        let strict = "tolerance = 0.0\nreceive.tcp-1g = 0.97\n";
        let failures = check(&rows, strict).expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("receive.tcp-1g"), "{failures:?}");
    }

    #[test]
    fn one_slow_round_does_not_fail_a_strict_row_but_a_shifted_row_does() {
        let baseline = "tolerance = 0.10\nreceive.shm = 0.90\n";
        let judged = |rounds: &[f64]| {
            let mut shm = row("receive", "shm", 940.0, 900.0);
            shm.ratio = Spread::of(rounds);
            check(&[shm], baseline).expect("valid")
        };
        // CI's quiet host, stop 13: one slow round of three.
        assert!(judged(&[0.725, 0.799, 0.925]).is_empty());
        // Every round below the floor: a regression.
        let failures = judged(&[0.70, 0.75, 0.79]);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("even the best of 3 rounds"),
            "{failures:?}"
        );
        // One lucky round does not hide a median twice the tolerance down.
        let failures = judged(&[0.60, 0.65, 0.95]);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("the median of 3 rounds"),
            "{failures:?}"
        );
    }

    #[test]
    fn a_busy_host_or_an_unfilled_link_only_fails_a_collapse() {
        let baseline = "tolerance = 0.05\nloaded_floor = 0.25\nshared_host_max_cores = 0.5\n\
                        paper.link_full_mbit = 850\nreceive.tcp-1g = 0.97\nreceive.tcp-1g.held_p50_max_us = 2000\n";
        // Other work took 1.2 cores: judged loaded, 0.5 passes.
        let mut busy = row("receive", "tcp-1g", 940.0, 470.0);
        busy.outside_cores = 1.2;
        busy.hold_us = (5000.0, 30000.0, 40000.0);
        let verdict = judge(&[busy.clone()], baseline).expect("valid");
        assert!(verdict.regressions.is_empty(), "{verdict:?}");
        assert!(verdict.notes[0].contains("loaded"), "{verdict:?}");
        // FT off could not fill the link: loaded too.
        let unfilled = row("receive", "tcp-1g", 540.0, 270.0);
        assert!(check(&[unfilled], baseline).expect("valid").is_empty());
        // A collapse fails even so.
        busy.ft = Spread::of(&[94.0]);
        busy.ratio = Spread::of(&[0.1]);
        let failures = check(&[busy], baseline).expect("valid");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("collapsed below the loaded-host floor 0.250"),
            "{failures:?}"
        );
        // On a quiet host with the link filled, the same held output fails.
        let mut quiet = row("receive", "tcp-1g", 940.0, 935.0);
        quiet.hold_us = (5000.0, 30000.0, 40000.0);
        let failures = check(&[quiet], baseline).expect("valid");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("held output p50 5000"), "{failures:?}");
    }

    #[test]
    fn log_volume_and_missing_figures() {
        let mut heavy = row("receive", "tcp-1g", 940.0, 935.0);
        heavy.log_per_client_byte = Spread::of(&[1.3]);
        heavy.outside_cores = 1.5;
        let baseline = "receive.tcp-1g = 0.9\nreceive.tcp-1g.log_per_byte_max = 1.1\n\
                        receive.tcp-1g.held_p99_max_us = 20000\n";
        let failures = check(&[heavy.clone()], baseline).expect("valid");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("log bytes per client byte 1.300"),
            "{failures:?}"
        );
        // A missing figure (NaN) fails a ceiling rather than passing it.
        heavy.outside_cores = 0.0;
        heavy.log_per_client_byte = Spread::of(&[1.0]);
        heavy.hold_us = (1.0, f64::NAN, 1.0);
        assert_eq!(check(&[heavy], baseline).expect("valid").len(), 1);
    }

    #[test]
    fn output_held_past_the_ack_round_trip_fails_in_any_tier() {
        let baseline = "receive.held_per_rtt_max = 2.3\n";
        let mut rows = Vec::new();
        for (variant, held, rtt) in [
            ("tcp-1g", 2941.0, 1098.0),
            ("tcp-10g", 2404.0, 956.0),
            ("shm", 2482.0, 623.0),
        ] {
            let mut r = row("receive", variant, 400.0, 280.0);
            r.outside_cores = 1.6;
            r.hold_us = (held, 20000.0, 30000.0);
            r.ack_rtt_us = (rtt, 15000.0);
            rows.push(r);
        }
        // The figures of a 2 ms release tick on a loaded host.
        let failures = check(&rows, baseline).expect("valid");
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("2.68 ack round trips"), "{failures:?}");
        // The same host, releasing on the ack.
        for (r, (held, rtt)) in
            rows.iter_mut()
                .zip([(2570.0, 1747.0), (1868.0, 1304.0), (1890.0, 967.0)])
        {
            r.hold_us.0 = held;
            r.ack_rtt_us.0 = rtt;
        }
        assert!(check(&rows, baseline).expect("valid").is_empty());
        // No figures at all fail too.
        for r in &mut rows {
            r.ack_rtt_us.0 = f64::NAN;
        }
        assert_eq!(check(&rows, baseline).expect("valid").len(), 1);
        assert!(check(&rows, "sideways.held_per_rtt_max = 2").is_err());
    }

    #[test]
    fn failed_runs_are_regressions() {
        let mut broken = row("receive", "shm", 1000.0, 0.0);
        broken.ft = Spread::of(&[]);
        broken.ratio = Spread::of(&[]);
        broken.failures = vec!["primary exited: entry too large".into()];
        let failures = check(&[broken], "tolerance = 0.5\nreceive.shm = 0.5").expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].contains("1 of 1 FT-on runs failed"),
            "{failures:?}"
        );
        assert!(failures[0].contains("entry too large"), "{failures:?}");
        let mut flaky = row("receive", "shm", 1000.0, 990.0);
        flaky.base_failures = vec!["vm exited".into()];
        let failures = check(&[flaky], "receive.shm = 0.5").expect("valid");
        assert!(
            failures[0].contains("1 of 2 FT-off runs failed"),
            "{failures:?}"
        );
    }

    #[test]
    fn malformed_baselines_are_refused() {
        let rows = [row("receive", "tcp-1g", 1.0, 1.0)];
        for (text, says) in [
            ("receive.tcp-1g 0.9", "line 1: expected `key = value`"),
            ("\nreceive.tcp-1g = x", "line 2: `x` is not"),
            ("receive.tcp-1g = -1", "not a non-negative number"),
            ("receive.shm = 0.9", "no such row"),
            ("sideways.tcp-1g = 0.9", "no test `sideways`"),
            ("receive.tcp-1g.speed = 1", "unknown check `speed`"),
            ("receive = 1", "expected DIRECTION.VARIANT"),
            (
                "receive.tcp-1g = 0.9\ntransmit.tcp-1g.tolerance = 0.1",
                "has no",
            ),
            (
                "elsewhere.link_full_mbit = 800",
                "scenario `elsewhere` is not measured",
            ),
        ] {
            let error = check(&rows, text).expect_err(text).to_string();
            assert!(error.contains(says), "{text:?}: {error}");
        }
    }

    #[test]
    fn committed_baseline_parses_and_covers_every_default_row() {
        let text = include_str!("../../baselines/table2.txt");
        let baseline = parse_baseline(text).expect("valid baseline");
        let scenario = super::super::scenario::Scenario::paper();
        for direction in super::super::scenario::Direction::ALL {
            for &variant in &scenario.variants {
                let key = scenario.key(direction, variant);
                assert!(
                    baseline
                        .rows
                        .iter()
                        .any(|(k, e)| *k == key && e.ratio.is_some()),
                    "the baseline has no {key}"
                );
            }
        }
        // Healthy rows at the paper's line rate pass it, strict or loaded.
        for outside in [0.0, 1.5] {
            let rows: Vec<Row> = baseline
                .rows
                .iter()
                .map(|(key, _)| {
                    let (direction, variant) = key.split_once('.').expect("key");
                    let mut healthy = row(direction, variant, 940.0, 935.0);
                    healthy.hold_us = (300.0, 2000.0, 4000.0);
                    healthy.ack_rtt_us = (200.0, 1500.0);
                    healthy.log_per_client_byte = Spread::of(&[1.045]);
                    healthy.outside_cores = outside;
                    healthy
                })
                .collect();
            let verdict = judge(&rows, text).expect("valid");
            assert!(verdict.regressions.is_empty(), "{verdict:?}");
        }
    }
}
