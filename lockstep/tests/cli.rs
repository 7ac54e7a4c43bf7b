//! The `lockstep` command line, run as a real process (needs /dev/kvm).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lockstep(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .output()
        .expect("start lockstep")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn record_fold(dir: &Path, rounds: &str) -> PathBuf {
    let input = dir.join("input.bin");
    std::fs::write(
        &input,
        (0..200_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .expect("input");
    let log = dir.join("fold.log");
    let output = lockstep(&[
        "record",
        "--log",
        path_str(&log),
        "--guest",
        "fold",
        "--arg",
        rounds,
        "--input",
        path_str(&input),
        "--digest-interval",
        "250",
    ]);
    assert!(
        output.status.success(),
        "record failed: {}",
        text(&output.stderr)
    );
    log
}

#[test]
fn record_and_replay_report_what_was_checked() {
    let dir = temp_dir();
    let log = record_fold(dir.path(), "1500");
    let recorded = lockstep(&["replay", "--log", path_str(&log)]);
    assert!(
        recorded.status.success(),
        "replay failed: {}",
        text(&recorded.stderr)
    );
    let stdout = text(&recorded.stdout);
    let summary = stdout.lines().last().expect("a summary line");
    // "replayed N exits and M events; D of D digests matched; ..."
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words[0], "replayed", "{summary}");
    let exits: u64 = words[1].parse().expect("exits");
    let events: u64 = words[4].parse().expect("events");
    let (matched, taken) = common::digests(summary);
    assert!(exits > 3000 && events > 3000, "{summary}");
    assert!(matched == taken && matched >= 12, "{summary}");
    assert!(stdout.contains("200000 input bytes"), "{stdout}");
}

#[test]
fn corrupt_truncated_missing_and_foreign_logs_are_refused_clearly() {
    let dir = temp_dir();
    let log = record_fold(dir.path(), "300");
    let bytes = std::fs::read(&log).expect("read log");

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let flipped_path = dir.path().join("flipped.log");
    std::fs::write(&flipped_path, &flipped).expect("write");
    let output = lockstep(&["replay", "--log", path_str(&flipped_path), "--quiet"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("log entry ") || stderr.contains("inside entry "),
        "{stderr}"
    );

    let cut_path = dir.path().join("cut.log");
    std::fs::write(&cut_path, &bytes[..bytes.len() - 3]).expect("write");
    let output = lockstep(&["replay", "--log", path_str(&cut_path), "--quiet"]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("truncated"),
        "{}",
        text(&output.stderr)
    );

    let missing = dir.path().join("missing.log");
    let output = lockstep(&["replay", "--log", path_str(&missing)]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("cannot open the log file") && stderr.contains("missing.log"),
        "{stderr}"
    );

    let output = lockstep(&["replay", "--log", path_str(&log), "--guest", "rdtsc"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("recorded from guest 'fold'") && stderr.contains("not from 'rdtsc'"),
        "{stderr}"
    );

    let not_a_log = dir.path().join("input.bin");
    let output = lockstep(&["replay", "--log", path_str(&not_a_log)]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("not a lockstep log"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn rdtsc_guest_replay_reports_divergence() {
    let dir = temp_dir();
    let log = dir.path().join("rdtsc.log");
    let output = lockstep(&[
        "record",
        "--log",
        path_str(&log),
        "--guest",
        "rdtsc",
        "--allow-rdtsc",
        "--arg",
        "200",
        "--quiet",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let output = lockstep(&["replay", "--log", path_str(&log), "--quiet"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(stderr.contains("diverged at exit "), "{stderr}");
}

#[test]
fn unknown_guest_lists_the_choices() {
    let output = lockstep(&["run", "--guest", "nosuch"]);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("unknown guest 'nosuch'") && stderr.contains("fold, rdtsc, exits"),
        "{stderr}"
    );
}

#[test]
fn missing_kvm_device_is_a_clear_error() {
    // Hide /dev in a private mount namespace (needs root, as CI runs).
    let binary = env!("CARGO_BIN_EXE_lockstep");
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs none /dev && exec {binary} run --guest fold --arg 10"
        ))
        .output()
        .expect("start unshare");
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
}

#[test]
fn a_live_backup_replays_in_lockstep_through_a_pipe() {
    let dir = temp_dir();
    let input = dir.path().join("input.bin");
    std::fs::write(&input, vec![7u8; 100_000]).expect("input");
    let mut primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "record",
            "--log",
            "-",
            "--guest",
            "fold",
            "--arg",
            "1500",
            "--quiet",
            "--digest-interval",
            "100",
        ])
        .arg("--input")
        .arg(&input)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("primary");
    let stream = primary.stdout.take().expect("primary stdout");
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["replay", "--log", "-", "--quiet"])
        .stdin(stream)
        .output()
        .expect("backup");
    let primary = primary.wait_with_output().expect("primary exit");
    assert!(primary.status.success(), "{}", text(&primary.stderr));
    let summary = text(&backup.stdout);
    assert!(backup.status.success(), "{summary}{}", text(&backup.stderr));
    let (matched, taken) = common::digests(&summary);
    assert_eq!(matched, taken, "every digest matches: {summary}");
    assert!(matched >= 30, "{summary}");
}
