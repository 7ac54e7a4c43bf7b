//! Benchmarks behind `lockstep bench`.
//!
//! Every benchmark measures against a baseline **in the same run**,
//! interleaving the cases and repeating them, and reports ratios: these hosts
//! are shared and noisy, so an absolute time says little.
//!
//! | name | measures |
//! |---|---|
//! | `channel` | the logging channel alone: throughput per entry size and ack round trip per transport, against raw loopback TCP and a 64-byte ping-pong |
//! | `exits` | guest-initiated exits per second, and the cost of recording: the same guest run with its events logged against it run with nothing logged |
//! | `latency` | what the Output Rule costs a request/response service: stock `redis-benchmark` FT off vs FT on, held output, against thread/process/spin ping-pongs |
//! | `table2` | the paper's Table 2: guest network bandwidth with FT off and on, logging bandwidth, held-output latency |

pub mod cli;
pub mod exits;
pub mod latency;
pub mod table2;

use std::process::Command;

/// The benchmarks `lockstep bench` knows: (name, description).
pub const BENCHMARKS: &[(&str, &str)] = &[
    (
        "exits",
        "exits/s of a clock-reading guest, recording vs not recording (ratio)",
    ),
    (
        "channel",
        "logging-channel throughput 64 B..64 KiB and ack round trip per transport, vs raw TCP and a ping-pong in the same run",
    ),
    (
        "latency",
        "stock redis-benchmark FT off vs FT on (tcp, shm): req/s ratios, added p50/p99, held output, vs wake-up ping-pongs in the same run",
    ),
    (
        "table2",
        "the paper's Table 2: guest TCP bandwidth FT off vs FT on, logging bandwidth, held-output latency",
    ),
];

/// Why a benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// No such benchmark.
    #[error("unknown benchmark '{0}': run `lockstep bench` for the list")]
    Unknown(String),
    /// The VM failed.
    #[error("benchmark run failed")]
    Vmm(#[from] vmm::VmmError),
    /// The channel benchmark failed.
    #[error("channel benchmark failed")]
    Channel(#[from] channel::bench::BenchError),
    /// Something else the benchmark needs is missing.
    #[error("{0}")]
    Setup(String),
    /// A file could not be read or written.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--check`: a ratio fell below the baseline by more than its tolerance.
    #[error("performance regression: {0}")]
    Regression(String),
}

/// A finished benchmark: a human-readable table and the same figures as JSON.
#[derive(Clone, Debug)]
pub struct Report {
    /// Text for the terminal.
    pub text: String,
    /// JSON for the perf harness (with the git revision).
    pub json: String,
}

/// Runs benchmark `name`; `quick` shortens it for CI.
pub fn run(name: &str, quick: bool) -> Result<Report, BenchError> {
    match name {
        "exits" => exits::run(quick),
        "latency" => latency::run(quick),
        "channel" => {
            let options = if quick {
                channel::bench::BenchOpts::quick()
            } else {
                channel::bench::BenchOpts::default()
            };
            let report = channel::bench::run(&options)?;
            Ok(Report {
                text: report.to_string(),
                json: report.to_json(&git_revision()),
            })
        }
        other => Err(BenchError::Unknown(other.to_string())),
    }
}

/// The git revision of the working tree, or "unknown".
pub fn git_revision() -> String {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Median of a non-empty list (the list is sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn unknown_benchmark_is_named() {
        let error = run("nope", true).expect_err("unknown");
        assert!(error.to_string().contains("'nope'"));
    }
}
