//! `--metrics ADDR`: the replica's figures for Prometheus, at
//! `http://ADDR/metrics` in the text exposition format, written by
//! `prometheus-client`: OpenMetrics text to a scraper that asks for it
//! (`Accept: application/openmetrics-text`, as Prometheus does), otherwise
//! the classic 0.0.4 text format (the same samples; counter families named
//! with their `_total`, no `# UNIT` or `# EOF` lines), which is what
//! `promtool check metrics` reads.
//!
//! ```text
//!  vCPU thread ── every 500 ms (with the status file) ──▶ Board (Mutex<Figures>)
//!  sender thread ─ when idle, every 250 ms ─▶ channel snapshot ─┘      │
//!  rare events (peer silence, failover, join) ── counted at once ──────┤
//!                                   scrape: GET /metrics ◀── snapshot ─┘
//! ```
//!
//! Nothing is added to the data path: the figures are the counters and
//! histograms it already keeps, copied when the status file is rewritten.
//! The endpoint is served by a `tiny_http` thread bound in this process's
//! network namespace; anything but `GET /metrics` gets 404 or 405.
//!
//! Families (all prefixed `lockstep_`): `role{role}` (1 for the current
//! one), `protected`, `generation`, `log_position`, `acked_position`,
//! `backup_lag_exits`, `backup_max_lag_exits`, `backup_lag_entries`,
//! `backup_max_lag_entries`, `held_frames`,
//! `held_output_seconds` (histogram), `ack_rtt_seconds` (histogram),
//! `entry_wait_seconds` (histogram, backup), and the counters
//! `log_bytes`, `acks`, `frames_released`, `batches`, `ring_stalls`,
//! `transport_stalls`, `heartbeats_sent`, `heartbeats_received`,
//! `peer_silences`, `failovers`, `reprotections` (`_total`). The channel's
//! counters are those of the current link and start again with a new one
//! (a counter reset, which `rate()` handles).

use std::sync::Arc;

use crate::status::{Board, Figures};
use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The metrics endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be bound.
    #[error("cannot serve metrics on {address}")]
    Bind {
        address: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The serving thread cannot start.
    #[error("cannot start the metrics thread {address}")]
    Thread {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Every role a replica can report (the `role` label's values).
const ROLES: [&str; 3] = ["primary", "backup", "live"];

/// Histogram bucket bounds, in seconds: 10 µs to 10 s.
const BOUNDS_S: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The replica's figures as a `prometheus-client` collector.
#[derive(Debug)]
struct ReplicaCollector {
    board: Board,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let value = i64::try_from(value).unwrap_or(i64::MAX);
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

/// Encodes `histogram` (values in units of `scale` seconds) with
/// [`BOUNDS_S`] buckets; an absent one as empty.
fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: Option<&Histogram<u64>>,
    scale: f64,
) -> Result<(), std::fmt::Error> {
    let (sum, count, buckets) = buckets(histogram, scale);
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
}

/// (sum in seconds, count, per-bucket counts with the +Inf bucket last).
fn buckets(histogram: Option<&Histogram<u64>>, scale: f64) -> (f64, u64, Vec<(f64, u64)>) {
    let Some(h) = histogram.filter(|h| !h.is_empty()) else {
        let mut empty: Vec<(f64, u64)> = BOUNDS_S.iter().map(|b| (*b, 0)).collect();
        empty.push((f64::MAX, 0));
        return (0.0, 0, empty);
    };
    let mut out = Vec::with_capacity(BOUNDS_S.len() + 1);
    let mut below = 0u64;
    for bound in BOUNDS_S {
        // Recorded values are integers of `scale` seconds.
        let high = (bound / scale).floor() as u64;
        let cumulative = h.count_between(0, high).min(h.len());
        out.push((bound, cumulative.saturating_sub(below)));
        below = below.max(cumulative);
    }
    out.push((f64::MAX, h.len().saturating_sub(below)));
    let sum = h.mean() * h.len() as f64 * scale;
    (sum, h.len(), out)
}

impl Collector for ReplicaCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let f: Figures = self.board.snapshot();
        {
            let mut metric = encoder.encode_descriptor(
                "role",
                "The replica's role: primary, backup (following), live (a promoted backup); 1 for the current one",
                None,
                MetricType::Gauge,
            )?;
            for role in ROLES {
                let labels = [("role", role)];
                let family = metric.encode_family(&labels)?;
                ConstGauge::new(i64::from(f.role == role)).encode(family)?;
            }
        }
        let e = &mut encoder;
        gauge(
            e,
            "protected",
            "1 while a backup follows this primary",
            u64::from(f.protected),
        )?;
        gauge(
            e,
            "generation",
            "The generation this replica belongs to at the arbiter",
            f.generation,
        )?;
        gauge(
            e,
            "log_position",
            "Primary: log entries produced; backup: entries replayed",
            f.log_position,
        )?;
        gauge(
            e,
            "acked_position",
            "Primary: the highest log position the backup acknowledged",
            f.acked,
        )?;
        gauge(
            e,
            "backup_lag_exits",
            "Backup: exits between the newest entry received and the replay",
            f.lag_exits,
        )?;
        gauge(
            e,
            "backup_max_lag_exits",
            "Backup: the most exits the replay ever trailed",
            f.max_lag_exits,
        )?;
        gauge(
            e,
            "backup_lag_entries",
            "Backup: log entries received but not yet replayed",
            f.lag_entries,
        )?;
        gauge(
            e,
            "backup_max_lag_entries",
            "Backup: the most log entries the replay ever trailed",
            f.max_lag_entries,
        )?;
        gauge(
            e,
            "held_frames",
            "Output frames held for an ack now",
            f.held_frames,
        )?;
        counter(e, "log_bytes", "Bytes of log entries produced", f.log_bytes)?;
        counter(e, "acks", "Acks that advanced the watermark", f.acks)?;
        counter(
            e,
            "frames_released",
            "Output frames released",
            f.frames_released,
        )?;
        counter(e, "batches", "Batches sent on the current link", f.batches)?;
        counter(
            e,
            "ring_stalls",
            "Times the vCPU found the ring to the sender full",
            f.ring_stalls,
        )?;
        counter(
            e,
            "transport_stalls",
            "Times the transport had no room for a batch",
            f.transport_stalls,
        )?;
        counter(
            e,
            "heartbeats_sent",
            "Heartbeats sent on the current link",
            f.heartbeats_sent,
        )?;
        counter(
            e,
            "heartbeats_received",
            "Heartbeats received on the current link",
            f.heartbeats_received,
        )?;
        counter(
            e,
            "peer_silences",
            "Times the peer fell silent or its link failed",
            f.peer_silences,
        )?;
        counter(
            e,
            "failovers",
            "Times this replica won the arbiter to run alone",
            f.failovers,
        )?;
        counter(
            e,
            "reprotections",
            "Times a new backup joined by state transfer",
            f.reprotections,
        )?;
        histogram(
            e,
            "held_output",
            "How long each released output frame was held",
            f.hold_ns.as_ref(),
            1e-9,
        )?;
        histogram(
            e,
            "ack_rtt",
            "From sending a batch to the ack that covers it",
            f.ack_rtt_ns.as_ref(),
            1e-9,
        )?;
        histogram(
            e,
            "entry_wait",
            "Backup: from receipt of an entry to its replay",
            f.entry_wait_us.as_ref(),
            1e-6,
        )?;
        Ok(())
    }
}

/// The exposition text of `board`'s figures.
pub fn render(board: &Board) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("lockstep");
    registry.register_collector(Box::new(ReplicaCollector {
        board: board.clone(),
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// The classic (0.0.4) text format of an OpenMetrics exposition: a
/// counter family's HELP and TYPE name its samples' `_total` name, and the
/// `# UNIT` and `# EOF` lines go.
pub fn classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `board` at `http://address/metrics` on a thread of its own, for
/// as long as the process runs.
pub fn serve(address: &str, board: Board) -> Result<(), MetricsError> {
    let server = tiny_http::Server::http(address).map_err(|source| MetricsError::Bind {
        address: address.to_string(),
        source,
    })?;
    let server = Arc::new(server);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = match (request.method(), request.url()) {
                    (tiny_http::Method::Get, "/metrics") => match render(&board) {
                        Ok(text) => {
                            let openmetrics = request.headers().iter().any(|h| {
                                h.field.equiv("Accept")
                                    && h.value.as_str().contains("application/openmetrics-text")
                            });
                            let (text, kind): (String, &[u8]) = if openmetrics {
                                (
                                    text,
                                    b"application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                            } else {
                                (classic(&text), b"text/plain; version=0.0.4; charset=utf-8")
                            };
                            let response = tiny_http::Response::from_string(text);
                            match tiny_http::Header::from_bytes(&b"Content-Type"[..], kind) {
                                Ok(header) => response.with_header(header),
                                Err(()) => response,
                            }
                        }
                        Err(_) => tiny_http::Response::from_string("cannot encode\n")
                            .with_status_code(500),
                    },
                    (tiny_http::Method::Get, _) => {
                        tiny_http::Response::from_string("only /metrics here\n")
                            .with_status_code(404)
                    }
                    _ => tiny_http::Response::from_string("GET only\n").with_status_code(405),
                };
                let _ = request.respond(response);
            }
        })
        .map_err(|source| MetricsError::Thread {
            address: address.to_string(),
            source,
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_an_hdr_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("h");
        for ns in [5_000u64, 20_000, 20_000, 3_000_000, 20_000_000_000] {
            h.record(ns).expect("record");
        }
        let (sum, count, buckets) = buckets(Some(&h), 1e-9);
        assert_eq!(count, 5);
        assert_eq!(buckets.len(), BOUNDS_S.len() + 1);
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 5);
        assert_eq!(buckets[0], (0.000_01, 1), "5 µs <= 10 µs");
        assert_eq!(buckets[1], (0.000_025, 2), "20 µs <= 25 µs");
        assert_eq!(buckets.last().map(|b| b.1), Some(1), "20 s: +Inf");
        assert!((sum - 20.003_045).abs() < 0.05, "{sum}");
    }

    #[test]
    fn the_exposition_has_every_family() {
        let board = Board::default();
        board.update(|f| {
            f.role = "live";
            f.generation = 3;
            f.failovers = 1;
        });
        let text = render(&board).expect("render");
        for line in [
            "lockstep_role{role=\"live\"} 1",
            "lockstep_role{role=\"primary\"} 0",
            "lockstep_generation 3",
            "lockstep_failovers_total 1",
            "lockstep_held_output_seconds_count 0",
            "lockstep_ack_rtt_seconds_bucket{le=\"+Inf\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let classic = classic(&text);
        for line in [
            "# TYPE lockstep_failovers_total counter",
            "lockstep_failovers_total 1",
            "# TYPE lockstep_generation gauge",
            "# TYPE lockstep_ack_rtt_seconds histogram",
        ] {
            assert!(
                classic.lines().any(|l| l == line),
                "no {line:?} in\n{classic}"
            );
        }
        assert!(
            !classic.contains("# EOF") && !classic.contains("# UNIT"),
            "{classic}"
        );
    }
}
