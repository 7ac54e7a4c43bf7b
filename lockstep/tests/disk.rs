//! The disk in a fault-tolerant pair (local disks): a real primary and a
//! real backup process, each with its own image file, the log over shared
//! memory (a unix socket in the test's own directory). Needs /dev/kvm.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const KEY: &[u8] = b"lockstep disk test key, at least 32 bytes";

/// Runs the `disk` guest as primary (image `a`) and backup (image `b`);
/// returns both outputs.
fn pair(dir: &Path, a: &Path, b: &Path, rounds: u64) -> (Output, Output) {
    let key = dir.join("key");
    std::fs::write(&key, KEY).expect("key");
    let socket = dir.join("link.sock");
    let status = dir.join("status");
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["backup", "--quiet", "--transport", "shm"])
        .args(["--peer-timeout-ms", "5000", "--listen"])
        .arg(&socket)
        .arg("--disk")
        .arg(b)
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["primary", "--guest", "disk", "--arg", &rounds.to_string()])
        .args(["--transport", "shm", "--backup"])
        .arg(&socket)
        .args(["--digest-interval", "20", "--peer-timeout-ms", "5000"])
        .arg("--disk")
        .arg(a)
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    // A backup that refused every connection keeps listening: stop it.
    let mut backup = backup;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while backup.try_wait().expect("backup status").is_none()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = backup.kill();
    let backup = backup.wait_with_output().expect("backup");
    (primary, backup)
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn a_pair_with_local_disks_keeps_both_images_identical_across_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    for boot in 1..=2 {
        let (primary, backup) = pair(dir.path(), &a, &b, 30);
        let (primary_text, backup_text) = (text(&primary), text(&backup));
        assert!(
            primary.status.success(),
            "primary: {primary_text}\nbackup: {backup_text}"
        );
        assert!(backup.status.success(), "backup: {backup_text}");
        assert!(
            primary_text.contains(&format!("disk: boot {boot} id lockstep-disk"))
                && primary_text.contains("mismatches 0"),
            "{primary_text}"
        );
        let (a_bytes, b_bytes) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(a_bytes.len(), 64 << 20, "created with the default size");
        assert!(
            a_bytes == b_bytes,
            "run {boot}: the replicas' images differ"
        );
    }
}

#[test]
fn a_backup_whose_image_differs_refuses_the_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    std::fs::write(&a, vec![0u8; 1 << 20]).expect("a");
    let mut other = vec![0u8; 1 << 20];
    other[4096] = 7;
    std::fs::write(&b, other).expect("b");
    let (primary, backup) = pair(dir.path(), &a, &b, 5);
    let backup_text = text(&backup);
    assert!(!backup.status.success(), "backup: {backup_text}");
    assert!(
        backup_text.contains("the disks differ") && backup_text.contains("content hash"),
        "{backup_text}"
    );
    // The primary learns of it only by losing its backup (fail-stop without
    // an arbiter); this guest is short enough to finish first.
    let _ = primary;
}
