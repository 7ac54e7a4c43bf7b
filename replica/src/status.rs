//! Status files: each replica publishes what it is doing, twice a second,
//! for `lockstep status` to show (role, generation, log and ack positions,
//! held outputs, lag). One small text file per replica, replaced atomically.
//!
//! The same figures go, at the same moments, to a [`Board`] the process
//! shares with its metrics endpoint (`lockstep primary --metrics ADDR`) and
//! `lockstep status --json`: the data path keeps its own counters as
//! before, and nothing is added to it; the replica copies them into its
//! [`Figures`] when it rewrites its status (every [`INTERVAL`]), and counts
//! the rare events (peer silences, failovers, re-protections) where they
//! happen.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;

/// Where replicas publish their status unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/lockstep";
/// How often a replica rewrites its status.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// What a replica is doing, in numbers: what its status file says, for
/// the metrics endpoint and `lockstep status --json`.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// `primary`, `backup` or `live` (a promoted backup), `halted`.
    pub role: &'static str,
    /// Whether a backup follows this replica (a primary's protection).
    pub protected: bool,
    /// The generation this replica belongs to.
    pub generation: u64,
    /// Primary: log entries produced. Backup: entries replayed.
    pub log_position: u64,
    /// Primary: the highest position the backup acknowledged.
    pub acked: u64,
    /// Bytes of log entries produced (primary).
    pub log_bytes: u64,
    /// Acks that advanced the watermark (primary).
    pub acks: u64,
    /// Backup: exits between the newest entry received and the replay.
    pub lag_exits: u64,
    /// Backup: the most exits it ever trailed.
    pub max_lag_exits: u64,
    /// Backup: log entries received but not yet replayed.
    pub lag_entries: u64,
    /// Backup: the most entries it ever trailed.
    pub max_lag_entries: u64,
    /// Output frames held now (primary).
    pub held_frames: u64,
    /// Output frames released.
    pub frames_released: u64,
    /// How long each released frame was held, in ns.
    pub hold_ns: Option<Histogram<u64>>,
    /// Channel: ns from a batch to the ack covering it (primary).
    pub ack_rtt_ns: Option<Histogram<u64>>,
    /// Backup: µs from receipt of an entry to its replay.
    pub entry_wait_us: Option<Histogram<u64>>,
    /// Channel figures of the current link (reset with a new link).
    pub batches: u64,
    /// Times the vCPU found the ring to the sender full.
    pub ring_stalls: u64,
    /// Times the transport had no room.
    pub transport_stalls: u64,
    /// Heartbeats sent and received.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
    /// Times the peer fell silent or its link failed (since start).
    pub peer_silences: u64,
    /// Times this replica won the arbiter to run alone.
    pub failovers: u64,
    /// Times a new backup joined this replica by state transfer.
    pub reprotections: u64,
}

/// `p50`, `p99`, `p999`, `max`, `count` of a histogram, as JSON.
fn quantiles(histogram: Option<&Histogram<u64>>) -> serde_json::Value {
    match histogram {
        Some(h) if !h.is_empty() => serde_json::json!({
            "p50": h.value_at_quantile(0.5),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
            "count": h.len(),
        }),
        _ => serde_json::json!({"count": 0}),
    }
}

impl Figures {
    /// The figures as JSON (what `lockstep status --json` prints, with the
    /// same names as the metrics, histograms as quantiles).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "role": self.role,
            "protected": self.protected,
            "generation": self.generation,
            "log_position": self.log_position,
            "acked_position": self.acked,
            "log_bytes": self.log_bytes,
            "acks": self.acks,
            "backup_lag_exits": self.lag_exits,
            "backup_max_lag_exits": self.max_lag_exits,
            "backup_lag_entries": self.lag_entries,
            "backup_max_lag_entries": self.max_lag_entries,
            "held_frames": self.held_frames,
            "frames_released": self.frames_released,
            "held_output_ns": quantiles(self.hold_ns.as_ref()),
            "ack_rtt_ns": quantiles(self.ack_rtt_ns.as_ref()),
            "entry_wait_us": quantiles(self.entry_wait_us.as_ref()),
            "batches": self.batches,
            "ring_stalls": self.ring_stalls,
            "transport_stalls": self.transport_stalls,
            "heartbeats_sent": self.heartbeats_sent,
            "heartbeats_received": self.heartbeats_received,
            "peer_silences": self.peer_silences,
            "failovers": self.failovers,
            "reprotections": self.reprotections,
        })
    }
}

/// The figures of this process's replica, shared between the replica
/// (which writes them every [`INTERVAL`]) and its readers.
#[derive(Clone, Debug, Default)]
pub struct Board(Arc<Mutex<Figures>>);

impl Board {
    /// A copy of the figures now.
    pub fn snapshot(&self) -> Figures {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes the figures.
    pub fn update(&self, change: impl FnOnce(&mut Figures)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// A replica's status file.
pub struct StatusFile {
    path: PathBuf,
    last: Option<Instant>,
    board: Board,
}

impl StatusFile {
    /// The status file of replica `id` in `dir` (created if missing).
    pub fn new(dir: &Path, id: &str) -> Self {
        let _ = std::fs::create_dir_all(dir);
        Self {
            path: dir.join(format!("{id}.status")),
            last: None,
            board: Board::default(),
        }
    }

    /// Publishes the figures on `board` too (the metrics endpoint's).
    pub fn with_board(mut self, board: Board) -> Self {
        self.board = board;
        self
    }

    /// The board the figures go to.
    pub fn board(&self) -> &Board {
        &self.board
    }

    /// Rewrites the file with `render(figures)` if the last write is older
    /// than [`INTERVAL`]; `render` also fills in the board's figures.
    /// Failures are ignored: status is advisory and must never stop a
    /// replica.
    pub fn maybe_write(&mut self, render: impl FnOnce(&mut Figures) -> String) {
        if self.last.is_some_and(|last| last.elapsed() < INTERVAL) {
            return;
        }
        let mut text = String::new();
        let mut json = String::new();
        self.board.update(|figures| {
            text = render(figures);
            json = figures.to_json().to_string() + "\n";
        });
        self.write(&text);
        let path = self.path.with_extension("json");
        let temporary = self.path.with_extension("json.tmp");
        if std::fs::write(&temporary, json).is_ok() {
            let _ = std::fs::rename(&temporary, &path);
        }
    }

    /// Rewrites the file now.
    pub fn write(&mut self, text: &str) {
        self.last = Some(Instant::now());
        let temporary = self.path.with_extension("status.tmp");
        if std::fs::write(&temporary, text).is_ok() {
            let _ = std::fs::rename(&temporary, &self.path);
        }
    }
}

/// Reads every status file in `dir`: (replica id, age, text).
pub fn read_all(dir: &Path) -> std::io::Result<Vec<(String, Duration, String)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("status") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let age = std::fs::metadata(&path)?
            .modified()
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .unwrap_or_default();
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        found.push((id, age, text));
    }
    found.sort();
    Ok(found)
}

/// Reads every replica's figures in `dir` (the `.json` files written with
/// the status files): (replica id, age, figures).
pub fn read_all_json(dir: &Path) -> std::io::Result<Vec<(String, Duration, serde_json::Value)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let figures = serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        let age = std::fs::metadata(&path)?
            .modified()
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .unwrap_or_default();
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        found.push((id, age, figures));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// `dir` holds no readable status.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}", dir.display())]
pub struct StatusError {
    what: &'static str,
    dir: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

/// `lockstep status`: what every replica publishing in `dir` says it is
/// doing, as text (a `== id: state` line and its status, indented, per
/// replica) or, with `json`, one JSON array of `{id, updated_ms_ago,
/// running, figures}` (a replica silent for over 3 s is not running). The
/// text ends with a newline.
pub fn report(dir: &Path, json: bool) -> Result<String, StatusError> {
    use std::fmt::Write as _;
    let error = |what: &'static str| {
        move |source| StatusError {
            what,
            dir: dir.to_path_buf(),
            source,
        }
    };
    if json {
        let replicas = read_all_json(dir).map_err(error("no replica figures in"))?;
        let list: Vec<serde_json::Value> = replicas
            .into_iter()
            .map(|(id, age, figures)| {
                serde_json::json!({
                    "id": id,
                    "updated_ms_ago": u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                    "running": age <= Duration::from_secs(3),
                    "figures": figures,
                })
            })
            .collect();
        return Ok(format!("{}\n", serde_json::Value::Array(list)));
    }
    let replicas = read_all(dir).map_err(error("no replica status in"))?;
    let mut out = String::new();
    if replicas.is_empty() {
        let _ = writeln!(
            out,
            "no replicas have published a status in {}",
            dir.display()
        );
    }
    for (id, age, text) in replicas {
        let state = if age > Duration::from_secs(3) {
            format!("NOT RUNNING (last word {:.1} s ago)", age.as_secs_f64())
        } else {
            format!("updated {} ms ago", age.as_millis())
        };
        let _ = writeln!(out, "== {id}: {state}");
        for line in text.lines() {
            let _ = writeln!(out, "   {line}");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_is_read_back_and_throttled() {
        let dir = std::env::temp_dir().join(format!("lockstep-status-test-{}", std::process::id()));
        let file = StatusFile::new(&dir, "a");
        let board = Board::default();
        let mut file = file.with_board(board.clone());
        file.maybe_write(|figures| {
            figures.role = "primary";
            "role: primary\n".into()
        });
        file.maybe_write(|figures| {
            figures.role = "changed too soon";
            "role: changed too soon\n".into()
        });
        assert_eq!(board.snapshot().role, "primary");
        let json = read_all_json(&dir).expect("json");
        assert_eq!(json.len(), 1);
        assert_eq!(json[0].2["role"], "primary");
        let all = read_all(&dir).expect("read");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a");
        assert_eq!(all[0].2, "role: primary\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
