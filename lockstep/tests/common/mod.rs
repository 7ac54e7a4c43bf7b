//! Helpers shared by the network tests: TAP interfaces, the RESP client,
//! and starting and stopping lockstep processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A TAP interface with the host side of 10.77.`subnet`.0/24, removed on drop.
pub struct Tap {
    pub name: String,
}

impl Tap {
    pub fn new(subnet: u8) -> Self {
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
pub fn guest_arg(subnet: u8) -> String {
    let address = u64::from(u32::from_be_bytes([10, 77, subnet, 2]));
    (address | (24 << 32)).to_string()
}

/// Starts lockstep with the net guest and waits for its banner.
pub fn start(args: &[&str]) -> Child {
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

pub fn stop(mut child: Child) -> Output {
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

pub fn connect(address: &str) -> TcpStream {
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

pub fn command(stream: &mut TcpStream, words: &[&str]) -> String {
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

/// Runs stock `redis-benchmark` against `host` and checks that every test
/// completed without an error.
pub fn redis_benchmark_passes(host: &str) {
    let output = Command::new("redis-benchmark")
        .args(["-h", host, "-t", "ping,set,get,incr", "-n", "3000", "--csv"])
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
}

/// The "M of N digests matched" of a replay or backup summary line: (M, N).
pub fn digests(summary: &str) -> (u64, u64) {
    let words: Vec<&str> = summary.split_whitespace().collect();
    let at = words
        .windows(4)
        .position(|w| w[1] == "of" && w[3] == "digests")
        .unwrap_or_else(|| panic!("no digest count in {summary:?}"));
    let number = |word: &str| {
        word.parse::<u64>()
            .unwrap_or_else(|_| panic!("{word:?} in {summary:?}"))
    };
    (number(words[at]), number(words[at + 2]))
}

/// A new link key made by `lockstep keygen` in `dir` (32 random bytes, 0600).
pub fn keygen(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let status = Command::new(env!("CARGO_BIN_EXE_lockstep"))
        .arg("keygen")
        .arg(&path)
        .stderr(Stdio::null())
        .status()
        .expect("run lockstep keygen");
    assert!(status.success(), "lockstep keygen {}", path.display());
    path
}
