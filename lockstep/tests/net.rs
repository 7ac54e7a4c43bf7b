//! The network guest on a real TAP device, driven by real clients: stock
//! `redis-benchmark` and a raw RESP client. The guest's TAP is in host a of
//! a testbed of namespaces, the clients in its client namespace. Needs
//! root, /dev/kvm, /dev/net/tun, iproute2 and redis-tools (installed by
//! .ci/run).

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Net, Ns, command, stop};

#[test]
fn redis_clients_against_a_recorded_guest_then_replay_matches() {
    let net = Net::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("net.log");
    let log_str = log.to_str().expect("utf-8");
    let arg = net.guest_arg();
    let child = net.start(
        Ns::A,
        &[
            "record",
            "--guest",
            "net",
            "--tap",
            net.tap(),
            "--arg",
            &arg,
            "--log",
            log_str,
            "--digest-interval",
            "300",
        ],
    );

    // A counter incremented N times by acknowledged INCRs reads N.
    let mut stream = net.connect(6379);
    assert_eq!(command(&mut stream, &["PING"]), "+PONG");
    assert_eq!(command(&mut stream, &["DEL", "counter"]), ":0");
    let increments = 500;
    for expected in 1..=increments {
        assert_eq!(
            command(&mut stream, &["INCR", "counter"]),
            format!(":{expected}")
        );
    }
    assert_eq!(
        command(&mut stream, &["GET", "counter"]),
        increments.to_string()
    );
    assert_eq!(command(&mut stream, &["INCRBY", "counter", "-500"]), ":0");
    assert_eq!(command(&mut stream, &["SET", "greeting", "hello"]), "+OK");
    assert_eq!(command(&mut stream, &["EXISTS", "greeting", "nope"]), ":1");
    assert!(command(&mut stream, &["NOSUCH"]).starts_with("-ERR unknown command"));
    drop(stream);

    // Stock redis-benchmark, unchanged: every test completes without errors.
    net.redis_benchmark_passes();

    // Echo and sink carry bulk data.
    let mut echo = net.connect(7);
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    echo.write_all(&payload).expect("echo send");
    let mut back = vec![0u8; payload.len()];
    echo.read_exact(&mut back).expect("echo receive");
    assert_eq!(back, payload);
    drop(echo);

    let output = stop(child);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("was stopped by the host"), "{stderr}");

    // The replay, with no network at all, reproduces the guest exactly.
    let replay = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["replay", "--log", log_str, "--quiet"])
        .output()
        .expect("replay");
    let stdout = String::from_utf8_lossy(&replay.stdout);
    assert!(
        replay.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let summary = stdout.lines().last().expect("summary");
    let (matched, taken) = common::digests(summary);
    assert_eq!(matched, taken, "every digest matches: {summary}");
    assert!(matched >= 3, "{summary}");
    assert!(Path::new(log_str).exists());
}

#[test]
fn tap_without_privileges_or_bad_name_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "run",
            "--guest",
            "net",
            "--tap",
            "this-name-is-too-long-for-linux",
        ])
        .output()
        .expect("run");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TAP device") && stderr.contains("invalid interface name"),
        "{stderr}"
    );
}

#[test]
fn a_live_backup_follows_a_serving_primary_exit_by_exit() {
    let net = Net::new();
    let arg = net.guest_arg();
    let mut primary = net
        .lockstep(Ns::A)
        .args([
            "record",
            "--guest",
            "net",
            "--tap",
            net.tap(),
            "--arg",
            &arg,
            "--log",
            "-",
            "--digest-interval",
            "200",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("primary");
    let stream = primary.stdout.take().expect("primary stdout");
    let backup = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(["replay", "--log", "-", "--quiet"])
        .stdin(stream)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup");
    let mut stream = net.connect(6379);
    for expected in 1..=300 {
        assert_eq!(
            command(&mut stream, &["INCR", "lockstep"]),
            format!(":{expected}")
        );
    }
    drop(stream);
    let primary_output = stop(primary);
    assert!(
        String::from_utf8_lossy(&primary_output.stderr).contains("was stopped by the host"),
        "{}",
        String::from_utf8_lossy(&primary_output.stderr)
    );
    let backup = backup.wait_with_output().expect("backup");
    let summary = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let (matched, taken) = common::digests(&summary);
    assert_eq!(matched, taken, "every digest matches: {summary}");
    assert!(summary.contains("was stopped by the host"), "{summary}");
}
