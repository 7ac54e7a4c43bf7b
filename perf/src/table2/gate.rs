//! The perf-regression gate (`lockstep bench table2 --check FILE`).
//!
//! A baseline is lines of `key = number` (`#` starts a comment):
//!
//! ```text
//! tolerance = 0.05                     default for every ratio below
//! receive.tcp-1g = 0.97                FT/base floor: fails below 0.97 - tolerance
//! receive.tcp-1g.tolerance = 0.08      this row's own tolerance
//! receive.tcp-1g.held_p50_max_us = 3000   held output p50 (median over rounds) ceiling
//! receive.tcp-1g.held_p99_max_us = 20000  held output p99 ceiling
//! receive.tcp-1g.log_per_byte_max = 1.10  log bytes per client byte ceiling
//! paper.ft_off_min_mbit = 800          the scenario's FT-off runs must reach this
//! ```
//!
//! Row keys are `DIRECTION.VARIANT` (see [`super::scenario::Scenario::key`]);
//! a row the run did not measure is an error for tcp and shm and skipped for
//! `rdma`. A row whose FT-on runs all failed is a regression.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::report::Row;
use crate::BenchError;

/// The per-row checks a baseline can ask for, by key suffix.
const ROW_SUFFIXES: [&str; 4] = [
    "tolerance",
    "held_p50_max_us",
    "held_p99_max_us",
    "log_per_byte_max",
];

/// One row's expectations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expectation {
    /// FT/base floor before the tolerance.
    pub ratio: Option<f64>,
    /// Allowed shortfall under `ratio`.
    pub tolerance: Option<f64>,
    /// Ceiling of the held-output p50, µs.
    pub held_p50_max_us: Option<f64>,
    /// Ceiling of the held-output p99, µs.
    pub held_p99_max_us: Option<f64>,
    /// Ceiling of log bytes per client byte.
    pub log_per_byte_max: Option<f64>,
}

/// A parsed baseline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Baseline {
    /// Default ratio tolerance.
    pub tolerance: f64,
    /// Per row key, in file order.
    pub rows: Vec<(String, Expectation)>,
    /// Per scenario: the least FT-off Mbit/s.
    pub ft_off_min_mbit: BTreeMap<String, f64>,
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
        if key == "tolerance" {
            baseline.tolerance = value;
            continue;
        }
        if let Some(scenario) = key.strip_suffix(".ft_off_min_mbit") {
            baseline.ft_off_min_mbit.insert(scenario.to_string(), value);
            continue;
        }
        let parts: Vec<&str> = key.split('.').collect();
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
        match suffix {
            None => expectation.ratio = Some(value),
            Some("tolerance") => expectation.tolerance = Some(value),
            Some("held_p50_max_us") => expectation.held_p50_max_us = Some(value),
            Some("held_p99_max_us") => expectation.held_p99_max_us = Some(value),
            Some("log_per_byte_max") => expectation.log_per_byte_max = Some(value),
            Some(other) => {
                return Err(bad(
                    number,
                    format!(
                        "key `{key}`: unknown check `{other}` (one of: {})",
                        ROW_SUFFIXES.join(", ")
                    ),
                ));
            }
        }
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

/// Checks the rows against a committed baseline. Returns the regressions
/// found, as sentences.
pub fn check(rows: &[Row], baseline: &str) -> Result<Vec<String>, BenchError> {
    let baseline = parse_baseline(baseline)?;
    let mut failures = Vec::new();
    for (scenario, least) in &baseline.ft_off_min_mbit {
        let Some(row) = rows.iter().find(|r| r.scenario == scenario) else {
            return Err(BenchError::Setup(format!(
                "baseline key `{scenario}.ft_off_min_mbit`: scenario `{scenario}` is not measured"
            )));
        };
        if row.base.n == 0 || row.base.median < *least {
            failures.push(format!(
                "{scenario}: FT off reached {:.0} Mbit/s, below {least:.0} (is the client link shaped and the guest healthy?)",
                row.base.median
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
        let Some(ratio) = row.ratio() else {
            failures.push(format!(
                "{key}: FT on never completed a run ({})",
                row.failures.first().map_or("no runs", String::as_str)
            ));
            continue;
        };
        if let Some(value) = expect.ratio {
            let tolerance = expect.tolerance.unwrap_or(baseline.tolerance);
            if ratio < value - tolerance {
                failures.push(format!(
                    "{key}: FT/base ratio {ratio:.3} is below the baseline {value:.3} - tolerance {tolerance:.3}"
                ));
            }
        }
        let ceilings = [
            (
                "held output p50",
                "µs",
                expect.held_p50_max_us,
                row.hold_us.0,
            ),
            (
                "held output p99",
                "µs",
                expect.held_p99_max_us,
                row.hold_us.1,
            ),
            (
                "log bytes per client byte",
                "",
                expect.log_per_byte_max,
                row.log_per_client_byte.median,
            ),
        ];
        for (what, unit, ceiling, value) in ceilings {
            if let Some(ceiling) = ceiling
                // NaN (no figure) fails too.
                && !matches!(value.partial_cmp(&ceiling), Some(Ordering::Less | Ordering::Equal))
            {
                failures.push(format!(
                    "{key}: {what} {value:.2}{unit} is above the ceiling {ceiling:.2}{unit}"
                ));
            }
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::super::report::tests::row;
    use super::*;

    #[test]
    fn gate_fails_only_beyond_the_tolerance() {
        let rows = [
            row("receive", "tcp-1g", 1000.0, 960.0),
            row("transmit", "tcp-1g", 1000.0, 990.0),
            row("receive", "shm", 1000.0, 500.0),
        ];
        let baseline = "tolerance = 0.05\nreceive.tcp-1g = 0.97 # comment\ntransmit.tcp-1g = 0.99\n\
                        receive.shm = 0.9\nreceive.shm.tolerance = 0.45\nreceive.rdma = 0.99\n";
        assert!(check(&rows, baseline).expect("valid").is_empty());
        let strict = "tolerance = 0.0\nreceive.tcp-1g = 0.97\n";
        let failures = check(&rows, strict).expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("receive.tcp-1g"), "{failures:?}");
    }

    #[test]
    fn held_output_and_log_volume_ceilings() {
        let mut slow = row("receive", "tcp-1g", 1000.0, 990.0);
        slow.hold_us = (4000.0, 9000.0, 9500.0);
        slow.log_per_client_byte = crate::table2::stats::Spread::of(&[1.3]);
        let baseline = "receive.tcp-1g = 0.9\nreceive.tcp-1g.held_p50_max_us = 3000\n\
                        receive.tcp-1g.held_p99_max_us = 20000\nreceive.tcp-1g.log_per_byte_max = 1.1\n";
        let failures = check(&[slow.clone()], baseline).expect("valid");
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(failures[0].contains("held output p50 4000"), "{failures:?}");
        assert!(
            failures[1].contains("log bytes per client byte 1.30"),
            "{failures:?}"
        );
        // A missing figure (NaN) fails a ceiling rather than passing it.
        slow.hold_us = (f64::NAN, 1.0, 1.0);
        slow.log_per_client_byte = crate::table2::stats::Spread::of(&[1.0]);
        assert_eq!(check(&[slow], baseline).expect("valid").len(), 1);
    }

    #[test]
    fn ft_off_must_reach_the_scenario_floor() {
        let rows = [row("receive", "tcp-1g", 400.0, 400.0)];
        let failures = check(&rows, "paper.ft_off_min_mbit = 800").expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("FT off reached 400"), "{failures:?}");
        assert!(check(&rows, "elsewhere.ft_off_min_mbit = 800").is_err());
    }

    #[test]
    fn a_configuration_that_never_ran_is_a_regression() {
        let mut broken = row("receive", "shm", 1000.0, 0.0);
        broken.ft = crate::table2::stats::Spread::of(&[]);
        broken.ratio = crate::table2::stats::Spread::of(&[]);
        broken.failures = vec!["primary exited: entry too large".into()];
        let failures = check(&[broken], "tolerance = 0.5\nreceive.shm = 0.5").expect("valid");
        assert_eq!(failures.len(), 1);
        assert!(failures[0].contains("entry too large"), "{failures:?}");
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
        // Rows at the goal with healthy figures pass it.
        let rows: Vec<Row> = baseline
            .rows
            .iter()
            .map(|(key, _)| {
                let (direction, variant) = key.split_once('.').expect("key");
                let mut healthy = row(direction, variant, 940.0, 935.0);
                healthy.hold_us = (100.0, 500.0, 900.0);
                healthy.log_per_client_byte = crate::table2::stats::Spread::of(&[1.0]);
                healthy
            })
            .collect();
        assert!(check(&rows, text).expect("valid").is_empty());
    }
}
