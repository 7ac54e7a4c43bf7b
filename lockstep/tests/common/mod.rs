//! Helpers shared by the network tests: a testbed of namespaces per test
//! (TAPs, addresses and clients never in the root namespace), the RESP
//! client, and starting and stopping lockstep processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use testbed::{Config, Link, Ns, Rate, Testbed};

/// The paper's hosts as network namespaces (the `testbed` crate): the
/// client, host a, host b and the arbiter, for this test alone. Every TAP,
/// address and client of a test lives in them; dropping it removes them.
pub struct Net {
    pub bed: Testbed,
}

impl Net {
    pub fn new() -> Self {
        Self {
            bed: Testbed::up(&Config::new("test")).expect("testbed up (root, iproute2)"),
        }
    }

    /// The guest's address on the client segment.
    pub fn host(&self) -> String {
        self.bed.addresses().guest.to_string()
    }

    /// The `net` guest argument that puts the guest at [`Net::host`].
    pub fn guest_arg(&self) -> String {
        self.bed.addresses().guest_arg().to_string()
    }

    /// The guest TAP's name in host a and in host b.
    pub fn tap(&self) -> &'static str {
        testbed::TAP
    }

    /// `ADDRESS:port` of host `ns`'s end of the logging link.
    pub fn log_address(&self, ns: Ns, port: u16) -> String {
        format!(
            "{}:{port}",
            self.bed.addresses().log(ns).expect("a replica host")
        )
    }

    /// The lockstep binary, to run inside namespace `ns`.
    pub fn lockstep(&self, ns: Ns) -> Command {
        self.bed
            .command(ns, env!("CARGO_BIN_EXE_lockstep"))
            .expect("testbed namespace")
    }

    /// Starts lockstep with the net guest in `ns` and waits for its banner.
    pub fn start(&self, ns: Ns, args: &[&str]) -> Child {
        let mut child = self
            .lockstep(ns)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("banner");
        assert!(
            line.starts_with(&format!("net: {}/", self.host())),
            "unexpected first line: {line:?}"
        );
        child
    }

    /// A fault-tolerant pair of the `net` guest: a backup in host b
    /// listening on host b's end of the logging link (port 7700; stdout and
    /// stderr piped), then a primary in host a serving the guest through
    /// the TAP, its banner read. `both` goes to both replicas, `backup` and
    /// `primary` to one each. Returns (primary, backup).
    pub fn start_pair(&self, both: &[&str], backup: &[&str], primary: &[&str]) -> (Child, Child) {
        let link = self.log_address(Ns::B, 7700);
        let backup = self
            .lockstep(Ns::B)
            .args(["backup", "--listen", &link])
            .args(both)
            .args(backup)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the backup");
        let arg = self.guest_arg();
        let mut args = vec!["primary", "--backup", &link, "--guest", "net"];
        args.extend(["--tap", self.tap(), "--arg", &arg]);
        args.extend(both.iter().chain(primary));
        (self.start(Ns::A, &args), backup)
    }

    /// A RESP connection from the client namespace to the guest's `port`.
    pub fn connect(&self, port: u16) -> TcpStream {
        let address: SocketAddr = format!("{}:{port}", self.host()).parse().expect("address");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .bed
                .connect(Ns::Client, address, Duration::from_secs(2))
            {
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

    /// Runs stock `redis-benchmark` in the client namespace against the
    /// guest and checks that every test completed without an error.
    pub fn redis_benchmark_passes(&self) {
        let output = self
            .bed
            .command(Ns::Client, "redis-benchmark")
            .expect("client namespace")
            .args([
                "-h",
                &self.host(),
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
    }

    /// The switch port the guest's MAC was learnt on (`a0`: host a, `b0`:
    /// host b).
    pub fn guest_port(&self) -> Option<String> {
        self.bed.status().expect("testbed status").guest_port
    }
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

/// A loopback port no socket holds right now, from the kernel's ephemeral
/// range (bind to port 0, read it, close): tests that run at the same time
/// never share a fixed port. The kernel does not hand the same port out
/// again at once, so the short window before the child binds it is safe
/// in practice.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("an ephemeral loopback port")
        .port()
}

/// `127.0.0.1:PORT` on a [`free_port`].
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}
