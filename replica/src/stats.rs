//! The primary's `--stats` file: one JSON object written when the guest
//! ends, read by `perf` (`lockstep bench table2`, `latency`). Writer and
//! reader share [`PrimaryStats`], so a field renamed on one side is a
//! compile error on the other, not a figure that silently goes missing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Quantiles of the output gate's hold time in `hold_quantiles_ns`.
pub const HOLD_QUANTILES: [f64; 11] = [
    0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0,
];

/// One timed hop (`hops_ns`): p50 and p99 in ns and how many were timed.
pub type Hop = [u64; 3];

/// What `lockstep primary --stats FILE` writes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStats {
    /// VM exits of the guest.
    pub exits: u64,
    /// Seconds the guest ran (ms resolution).
    pub elapsed_s: f64,
    /// Log entries produced.
    pub entries: u64,
    /// Bytes of log sent to the backup.
    pub log_bytes: u64,
    /// Acks received.
    pub acks: u64,
    /// Frames the output gate released.
    pub frames_released: u64,
    /// Most frames the gate held at once.
    pub max_held: u64,
    /// Gate hold time p50, ns.
    pub hold_p50_ns: u64,
    /// Gate hold time p99, ns.
    pub hold_p99_ns: u64,
    /// Gate hold time p99.9, ns.
    pub hold_p999_ns: u64,
    /// Gate hold time at each of [`HOLD_QUANTILES`]: `[q, ns]`.
    #[serde(default)]
    pub hold_quantiles_ns: Vec<(f64, u64)>,
    /// The transport of the link (`tcp`, `shm`, `rdma`).
    #[serde(default)]
    pub transport: String,
    /// Whether the primary ran on without a backup.
    pub unprotected: bool,
    /// The channel's figures, when the link has a channel.
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelStats>,
    /// Per-hop timing by hop name (`gate_hold`, `ack_rtt`, ...).
    #[serde(default)]
    pub hops_ns: BTreeMap<String, Hop>,
}

/// The sender's figures in [`PrimaryStats`] (flattened into it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Batches sent.
    pub batches: u64,
    /// Times the ring was full.
    pub ring_full: u64,
    /// Times the transport stalled the sender.
    pub transport_stalls: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Ack round trip p50, ns.
    pub ack_rtt_p50_ns: u64,
    /// Ack round trip p99, ns.
    pub ack_rtt_p99_ns: u64,
    /// Ack round trip p99.9, ns.
    pub ack_rtt_p999_ns: u64,
}

impl PrimaryStats {
    /// The file's text: the object and a newline.
    pub fn to_json(&self) -> String {
        // A struct of numbers, strings and maps with string keys always
        // serializes; the fallback keeps this total.
        serde_json::to_string(self).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_and_without_a_channel() {
        let mut stats = PrimaryStats {
            exits: 77,
            elapsed_s: 2.027,
            hold_quantiles_ns: vec![(0.5, 471_000), (0.9, 1_000_000)],
            transport: "tcp".into(),
            hops_ns: BTreeMap::from([("gate_hold".to_string(), [1, 2, 3])]),
            ..PrimaryStats::default()
        };
        let text = stats.to_json();
        assert!(!text.contains("batches"), "{text}");
        assert_eq!(
            serde_json::from_str::<PrimaryStats>(&text).ok(),
            Some(stats.clone())
        );
        stats.channel = Some(ChannelStats {
            batches: 5,
            ack_rtt_p99_ns: 900,
            ..ChannelStats::default()
        });
        let text = stats.to_json();
        assert!(text.contains("\"batches\":5"), "{text}");
        assert_eq!(
            serde_json::from_str::<PrimaryStats>(&text).ok(),
            Some(stats)
        );
    }
}
