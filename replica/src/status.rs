//! Status files: each replica publishes what it is doing, twice a second,
//! for `lockstep status` to show (role, generation, log and ack positions,
//! held outputs, lag). One small text file per replica, replaced atomically.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Where replicas publish their status unless told otherwise.
pub const DEFAULT_DIR: &str = "/run/lockstep";
/// How often a replica rewrites its status.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// A replica's status file.
pub struct StatusFile {
    path: PathBuf,
    last: Option<Instant>,
}

impl StatusFile {
    /// The status file of replica `id` in `dir` (created if missing).
    pub fn new(dir: &Path, id: &str) -> Self {
        let _ = std::fs::create_dir_all(dir);
        Self {
            path: dir.join(format!("{id}.status")),
            last: None,
        }
    }

    /// Rewrites the file with `render()` if the last write is older than
    /// [`INTERVAL`]. Failures are ignored: status is advisory and must never
    /// stop a replica.
    pub fn maybe_write(&mut self, render: impl FnOnce() -> String) {
        if self.last.is_some_and(|last| last.elapsed() < INTERVAL) {
            return;
        }
        self.write(&render());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_status_is_read_back_and_throttled() {
        let dir = std::env::temp_dir().join(format!("lockstep-status-test-{}", std::process::id()));
        let mut file = StatusFile::new(&dir, "a");
        file.maybe_write(|| "role: primary\n".into());
        file.maybe_write(|| "role: changed too soon\n".into());
        let all = read_all(&dir).expect("read");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, "a");
        assert_eq!(all[0].2, "role: primary\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
