//! The network guest on a real TAP device, driven by real clients: stock
//! `redis-benchmark` and a raw RESP client. Needs root, /dev/kvm,
//! /dev/net/tun, iproute2 and redis-tools (installed by .ci/run).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A TAP interface with the host side of 10.77.`subnet`.0/24, removed on drop.
struct Tap {
    name: String,
}

impl Tap {
    fn new(subnet: u8) -> Self {
        let name = format!("lst{subnet}x{}", std::process::id() % 10_000);
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        ip(&["addr", "add", &format!("10.77.{subnet}.1/24"), "dev", &name]);
        ip(&["link", "set", &name, "up"]);
        Self { name }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// The guest argument that puts the guest at 10.77.`subnet`.2/24.
fn guest_arg(subnet: u8) -> String {
    let address = u64::from(u32::from_be_bytes([10, 77, subnet, 2]));
    (address | (24 << 32)).to_string()
}

/// Starts lockstep with the net guest and waits for its banner.
fn start(args: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockstep");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("banner");
    assert!(
        line.starts_with("net: 10.77."),
        "unexpected first line: {line:?}"
    );
    child
}

fn stop(mut child: Child) -> Output {
    // SIGTERM, so that the recording ends with its stop record.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "lockstep did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn connect(address: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect(address) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                return stream;
            }
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(error) => panic!("cannot connect to {address}: {error}"),
        }
    }
}

fn command(stream: &mut TcpStream, words: &[&str]) -> String {
    let mut request = format!("*{}\r\n", words.len());
    for word in words {
        request.push_str(&format!("${}\r\n{word}\r\n", word.len()));
    }
    stream.write_all(request.as_bytes()).expect("send");
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\r\n") {
        stream.read_exact(&mut byte).expect("reply");
        reply.push(byte[0]);
    }
    if reply.starts_with(b"$") && reply != b"$-1\r\n" {
        let len: usize = String::from_utf8_lossy(&reply[1..reply.len() - 2])
            .parse()
            .expect("bulk length");
        let mut body = vec![0u8; len + 2];
        stream.read_exact(&mut body).expect("bulk body");
        return String::from_utf8_lossy(&body[..len]).into_owned();
    }
    String::from_utf8_lossy(&reply[..reply.len() - 2]).into_owned()
}

#[test]
fn redis_clients_against_a_recorded_guest_then_replay_matches() {
    let subnet = 91;
    let tap = Tap::new(subnet);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("net.log");
    let log_str = log.to_str().expect("utf-8");
    let arg = guest_arg(subnet);
    let child = start(&[
        "record",
        "--guest",
        "net",
        "--tap",
        &tap.name,
        "--arg",
        &arg,
        "--log",
        log_str,
        "--digest-interval",
        "300",
    ]);
    let host = format!("10.77.{subnet}.2");

    // A counter incremented N times by acknowledged INCRs reads N.
    let mut stream = connect(&format!("{host}:6379"));
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
    let output = Command::new("redis-benchmark")
        .args([
            "-h",
            &host,
            "-t",
            "ping,set,get,incr",
            "-n",
            "3000",
            "--csv",
        ])
        .output()
        .expect("run redis-benchmark (Debian's redis-tools)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        assert!(
            text.contains(&format!("\"{test}\"")),
            "{test} missing from:\n{text}"
        );
    }
    assert!(!text.to_lowercase().contains("error"), "{text}");

    // Echo and sink carry bulk data.
    let mut echo = connect(&format!("{host}:7"));
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
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words[7], "of", "{summary}");
    assert_eq!(words[6], words[8], "every digest matches: {summary}");
    assert!(words[6].parse::<u64>().expect("digests") >= 3, "{summary}");
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
    let subnet = 92;
    let tap = Tap::new(subnet);
    let arg = guest_arg(subnet);
    let mut primary = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .args([
            "record",
            "--guest",
            "net",
            "--tap",
            &tap.name,
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
    let host = format!("10.77.{subnet}.2");
    let mut stream = connect(&format!("{host}:6379"));
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
    let words: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(words[6], words[8], "every digest matches: {summary}");
    assert!(summary.contains("was stopped by the host"), "{summary}");
}
