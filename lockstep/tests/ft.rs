//! Fault tolerance on: a primary and a backup as separate processes over the
//! replication link, the guest serving real clients through a real TAP, the
//! Output Rule enforced by the output gate. Needs root, /dev/kvm,
//! /dev/net/tun, iproute2 and redis-tools (installed by .ci/run).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Tap, command, connect, guest_arg, start, stop};

/// A backup listening on `port`, then a primary serving 10.77.`subnet`.2;
/// both publish their status in `/tmp/lockstep-status-<port>`.
fn start_pair(subnet: u8, port: u16, tap: &Tap) -> (Child, Child) {
    let link = format!("127.0.0.1:{port}");
    let status_dir = status_dir(port);
    let _ = std::fs::remove_dir_all(&status_dir);
    std::fs::create_dir_all(&status_dir).expect("status dir");
    let key = common::keygen(std::path::Path::new(&status_dir), "link.key");
    let key = key.to_str().expect("utf-8 path").to_string();
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "backup",
            "--listen",
            &link,
            "--quiet",
            "--peer-timeout-ms",
            "20000",
            "--status-dir",
            &status_dir,
            "--link-key",
            &key,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    let arg = guest_arg(subnet);
    let primary = start(&[
        "primary",
        "--backup",
        &link,
        "--guest",
        "net",
        "--tap",
        &tap.name,
        "--arg",
        &arg,
        "--digest-interval",
        "300",
        // No arbiter here: a peer declared lost would stop the pair, so give
        // a loaded CI host (and the SIGSTOP below) plenty of time.
        "--peer-timeout-ms",
        "20000",
        "--status-dir",
        &status_dir,
        "--link-key",
        &key,
    ]);
    (primary, backup)
}

fn status_dir(port: u16) -> String {
    format!("/tmp/lockstep-status-{port}")
}

fn finish(primary: Child, backup: Child) -> (String, String) {
    let primary = stop(primary);
    let backup = backup.wait_with_output().expect("backup");
    let primary_err = String::from_utf8_lossy(&primary.stderr).into_owned();
    let backup_out = String::from_utf8_lossy(&backup.stdout).into_owned();
    assert!(
        backup.status.success(),
        "backup failed: {backup_out}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    (primary_err, backup_out)
}

#[test]
fn ft_on_serves_redis_benchmark_and_every_acknowledged_incr_counts() {
    let subnet = 93;
    let tap = Tap::new(subnet);
    let (primary, backup) = start_pair(subnet, 17793, &tap);
    let host = format!("10.77.{subnet}.2");

    let mut stream = connect(&format!("{host}:6379"));
    let increments = 400;
    for expected in 1..=increments {
        assert_eq!(
            command(&mut stream, &["INCR", "ft"]),
            format!(":{expected}")
        );
    }
    assert_eq!(command(&mut stream, &["GET", "ft"]), increments.to_string());
    drop(stream);

    // `lockstep status` shows both replicas, their roles and figures.
    std::thread::sleep(Duration::from_millis(600));
    let status = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["status", "--dir", &status_dir(17793)])
        .output()
        .expect("lockstep status");
    let status = String::from_utf8_lossy(&status.stdout);
    for expected in [
        "== primary: updated",
        "role: primary",
        "protection: protected (backup following)",
        "held outputs:",
        "== backup: updated",
        "role: backup (following the primary)",
        "lag (exits):",
    ] {
        assert!(
            status.contains(expected),
            "`{expected}` missing from:\n{status}"
        );
    }

    common::redis_benchmark_passes(&host);

    let (primary_err, backup_out) = finish(primary, backup);
    assert!(
        primary_err.contains("(everything)"),
        "the backup acknowledged every entry: {primary_err}"
    );
    assert!(
        primary_err.contains("output gate released"),
        "{primary_err}"
    );
    let summary = backup_out.lines().last().expect("backup summary");
    assert!(summary.starts_with("backup:"), "{summary}");
    let (matched, taken) = common::digests(summary);
    assert_eq!(
        matched, taken,
        "primary's and backup's digests match at the same exits: {summary}"
    );
    assert!(matched >= 2, "{summary}");
}

fn wait_until_stopped(pid: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
        let all_stopped = tasks.filter_map(Result::ok).all(|task| {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            stat.rsplit(')')
                .next()
                .map(str::trim_start)
                .is_some_and(|rest| rest.starts_with('T'))
        });
        if all_stopped {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backup did not stop"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn output_waits_for_the_backups_ack() {
    let subnet = 94;
    let tap = Tap::new(subnet);
    let (primary, backup) = start_pair(subnet, 17794, &tap);
    let host = format!("10.77.{subnet}.2");
    let mut stream = connect(&format!("{host}:6379"));
    assert_eq!(command(&mut stream, &["PING"]), "+PONG");

    // Freeze the backup: it can no longer acknowledge anything.
    let pid = backup.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("kill")
            .success()
    );
    // SIGSTOP takes effect only once one of its threads dequeues it: wait
    // until every thread of the backup is stopped.
    wait_until_stopped(&pid);
    stream
        .write_all(b"*2\r\n$4\r\nINCR\r\n$4\r\nheld\r\n")
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    let mut reply = [0u8; 16];
    let early = stream.read(&mut reply);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "the reply must be held while the backup cannot ack it, got {early:?}"
    );
    // Thaw it: the ack arrives and releases the reply.
    assert!(
        Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .expect("kill")
            .success()
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let count = stream.read(&mut reply).expect("the reply after the ack");
    assert_eq!(&reply[..count], b":1\r\n");
    drop(stream);
    let (primary_err, backup_out) = finish(primary, backup);
    assert!(primary_err.contains("(everything)"), "{primary_err}");
    assert!(backup_out.starts_with("backup: "), "{backup_out}");
}

/// Runs `fold` as primary and backup over `transport` with the given link
/// keys; returns both outputs (primary's stderr, backup's stdout+stderr).
fn fold_pair(transport: &str, address: &str, keys: [&std::path::Path; 2]) -> (String, String) {
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
        .arg(keys[1])
        .args(["--status-dir", "/tmp/lockstep-status-fold"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    std::thread::sleep(Duration::from_millis(300));
    let primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "primary",
            "--quiet",
            "--guest",
            "fold",
            "--transport",
            transport,
        ])
        .args(["--backup", address, "--digest-interval", "500"])
        .arg("--link-key")
        .arg(keys[0])
        .args(["--status-dir", "/tmp/lockstep-status-fold"])
        .stdin(Stdio::null())
        .output()
        .expect("run the primary");
    let mut backup = backup;
    if !primary.status.success() {
        // A refused primary leaves the backup listening for the real one.
        std::thread::sleep(Duration::from_millis(500));
        let _ = backup.kill();
    }
    let backup = backup.wait_with_output().expect("backup");
    (
        String::from_utf8_lossy(&primary.stderr).into_owned(),
        String::from_utf8_lossy(&backup.stdout).into_owned()
            + &String::from_utf8_lossy(&backup.stderr),
    )
}

#[test]
fn the_log_streams_over_shared_memory_and_a_wrong_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("key");
    let other = dir.path().join("other");
    std::fs::write(&key, "the right key, at least 32 bytes long").expect("key");
    std::fs::write(&other, "another key, also 32 bytes or more").expect("key");
    let socket = dir.path().join("link.sock");
    let socket = socket.to_str().expect("utf-8 path");

    let (primary, backup) = fold_pair("shm", socket, [&key, &key]);
    assert!(primary.contains("over shm"), "{primary}");
    assert!(primary.contains("(everything)"), "{primary}");
    let summary = backup
        .lines()
        .find(|line| line.starts_with("backup:"))
        .unwrap_or_else(|| panic!("no backup summary in {backup}"));
    let (matched, taken) = common::digests(summary);
    assert_eq!(matched, taken, "{summary}");
    assert!(matched >= 5, "{summary}");

    // Same over io_uring TCP, but the primary proves another key.
    let (primary, backup) = fold_pair("tcp", "127.0.0.1:17795", [&other, &key]);
    assert!(
        primary.contains("wrong key") || primary.contains("rejected"),
        "{primary}"
    );
    assert!(backup.contains("refused a connection"), "{backup}");
    assert!(backup.contains("wrong key"), "{backup}");
}
