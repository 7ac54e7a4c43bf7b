//! The largest log entries a guest can legally cause travel over the
//! logging channel: the `bulk` guest fills a 1 MiB mailbox buffer with
//! entropy and reads 1 MiB of input at a time (each exit one log entry of
//! 1 MiB + its header, larger than the default 1 MiB batch), and the pair
//! must replicate every one over io_uring TCP and over shared memory, the
//! backup matching every digest. Needs /dev/kvm; loopback and unix sockets
//! only.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

const KEY: &[u8] = b"lockstep big-entries test key, 32+ bytes";

/// Runs `bulk` as primary and backup over `transport`; returns the
/// primary's stderr and the backup's stdout+stderr.
fn bulk_pair(transport: &str, address: &str, dir: &std::path::Path) -> (String, String) {
    let key = dir.join("key");
    std::fs::write(&key, KEY).expect("key");
    let input = dir.join("input");
    // 3 MiB: three full 1 MiB reads, then the end of input.
    let bytes: Vec<u8> = (0..3u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&input, bytes).expect("input");
    let status = dir.join("status");
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "backup",
            "--quiet",
            "--transport",
            transport,
            "--listen",
            address,
        ])
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    std::thread::sleep(Duration::from_millis(300));
    let primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "primary",
            "--guest",
            "bulk",
            "--arg",
            "5",
            "--mem-mib",
            "16",
        ])
        .args(["--transport", transport, "--backup", address])
        .args(["--digest-interval", "2"])
        .arg("--input")
        .arg(&input)
        .arg("--link-key")
        .arg(&key)
        .arg("--status-dir")
        .arg(&status)
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let backup = backup.wait_with_output().expect("backup");
    (
        String::from_utf8_lossy(&primary.stdout).into_owned()
            + &String::from_utf8_lossy(&primary.stderr),
        String::from_utf8_lossy(&backup.stdout).into_owned()
            + &String::from_utf8_lossy(&backup.stderr),
    )
}

fn check(transport: &str, primary: &str, backup: &str) {
    assert!(
        primary.contains("bulk: 5 rounds of 1024 KiB, 3145728 input bytes"),
        "{transport}: {primary}"
    );
    assert!(primary.contains("(everything)"), "{transport}: {primary}");
    let summary = backup
        .lines()
        .find(|line| line.starts_with("backup:"))
        .unwrap_or_else(|| panic!("{transport}: no backup summary in {backup}"));
    let (matched, taken) = common::digests(summary);
    assert_eq!(matched, taken, "{transport}: {summary}");
    assert!(matched >= 5, "{transport}: {summary}");
}

#[test]
fn one_mib_entropy_and_input_entries_replicate_over_tcp_and_shm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("link.sock");
    let (primary, backup) = bulk_pair("shm", socket.to_str().expect("utf-8"), dir.path());
    check("shm", &primary, &backup);
    let (primary, backup) = bulk_pair("tcp", &common::free_addr(), dir.path());
    check("tcp", &primary, &backup);
}
