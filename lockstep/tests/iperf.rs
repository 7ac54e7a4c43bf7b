//! Stock iperf3 (Debian's `iperf3`, installed by .ci/run) against the `net`
//! guest's iperf3 server, FT off and FT on. Needs root, /dev/kvm,
//! /dev/net/tun and iproute2.
//!
//! Network rule: every TAP, address and client lives in a network namespace
//! the test creates and removes (`lst-iperf-<pid>-<n>`); a namespace left by
//! a killed run is removed at the next start. The primary/backup link is the
//! namespace's own loopback, so concurrent runs never share a port.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const PREFIX: &str = "lst-iperf-";
/// The guest's address inside every namespace (each has its own).
const GUEST: &str = "10.77.5.2";

/// A network namespace with a TAP whose host side is 10.77.5.1/24; the
/// processes left in it are killed and it is removed on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        common::ip(&["netns", "add", &name]);
        let namespace = Self { name };
        namespace.ip(&["link", "set", "lo", "up"]);
        namespace.ip(&["tuntap", "add", "dev", "t0", "mode", "tap"]);
        namespace.ip(&["addr", "add", "10.77.5.1/24", "dev", "t0"]);
        namespace.ip(&["link", "set", "t0", "up"]);
        namespace
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        common::ip(&full);
    }

    /// `program args` inside the namespace.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args);
        command
    }

    /// Starts lockstep inside the namespace (`ip netns exec` execs it, so
    /// the child's pid is lockstep's).
    fn lockstep(&self, args: &[&str]) -> Child {
        self.command(env!("CARGO_BIN_EXE_lockstep"), args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep")
    }

    /// Runs stock iperf3 against the guest with `-J` and checks what any
    /// run must show; returns (sent, received) bits per second.
    fn iperf3(&self, args: &[&str]) -> (f64, f64) {
        let mut full = vec!["-c", GUEST, "-J"];
        full.extend_from_slice(args);
        let output = self
            .command("timeout", &["60", "iperf3"])
            .args(&full)
            .output()
            .expect("run iperf3 (Debian's iperf3 package)");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "iperf3 {full:?} failed ({}): {text}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("iperf3 {full:?} printed no JSON ({e}): {text}"));
        // With -J, iperf3 exits 0 even after an error, which it reports here.
        assert!(
            report.get("error").is_none(),
            "iperf3 {full:?} reported an error: {text}"
        );
        let end = &report["end"];
        let figure = |sum: &str, key: &str| {
            end[sum][key]
                .as_f64()
                .unwrap_or_else(|| panic!("no end.{sum}.{key} in {text}"))
        };
        for sum in ["sum_sent", "sum_received"] {
            assert!(
                figure(sum, "bytes") > 0.0,
                "iperf3 {full:?}: no bytes in end.{sum}: {text}"
            );
        }
        let streams = end["streams"].as_array().map_or(0, Vec::len);
        let parallel = full
            .windows(2)
            .find(|w| w[0] == "-P")
            .map_or(1, |w| w[1].parse().expect("-P value"));
        let directions = if full.contains(&"--bidir") { 2 } else { 1 };
        assert_eq!(
            streams,
            parallel * directions,
            "one entry per stream: {text}"
        );
        (
            figure("sum_sent", "bits_per_second"),
            figure("sum_received", "bits_per_second"),
        )
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn kill_all_in(name: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
}

/// Removes the namespaces of test processes that no longer exist.
fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        // Only names this file makes: <prefix><pid>-<n>.
        let Some((owner, number)) = rest.split_once('-') else {
            continue;
        };
        let digits = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        if digits(owner)
            && digits(number)
            && !std::path::Path::new(&format!("/proc/{owner}")).exists()
        {
            kill_all_in(name);
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The guest argument that puts the guest at 10.77.5.2/24.
fn guest_arg() -> String {
    common::guest_arg(5)
}

/// Waits for the net guest's banner on `child`'s stdout.
fn wait_for_banner(child: &mut Child) {
    let stdout = child.stdout.take().expect("stdout");
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).expect("banner");
    if line.starts_with("lockstep primary:") {
        line.clear();
        reader.read_line(&mut line).expect("banner");
    }
    assert!(
        line.starts_with("net: 10.77.5.2/24") && line.contains("iperf3 5201"),
        "unexpected first line: {line:?}"
    );
    // Keep the pipe drained (the guest prints one line per test).
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
}

fn mbit(bits_per_second: f64) -> f64 {
    bits_per_second / 1e6
}

/// Runs `work` on a thread that has entered the namespace `name` (setns
/// changes only the calling thread's network namespace).
fn in_namespace<T: Send + 'static>(name: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: `file` is an open namespace file for the whole call;
        // CLONE_NEWNET moves only this thread, which ends after `work`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        work()
    })
    .join()
    .expect("namespace thread")
}

/// Everything a raw client gets, until the guest closes the connection,
/// after sending a cookie and `then`.
fn raw_client(namespace: &Namespace, then: &[u8]) -> Vec<u8> {
    let then = then.to_vec();
    in_namespace(&namespace.name, move || {
        let mut stream = TcpStream::connect((GUEST, 5201)).expect("connect to the guest");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        stream
            .write_all(b"lockstep-iperf-test-cookie-123456789\0")
            .expect("cookie");
        stream.write_all(&then).expect("send");
        let mut reply = Vec::new();
        stream
            .read_to_end(&mut reply)
            .expect("reply until the guest closes");
        reply
    })
}

#[test]
fn stock_iperf3_receive_and_transmit_ft_off() {
    let namespace = Namespace::new();
    let arg = guest_arg();
    let mut guest = namespace.lockstep(&["run", "--guest", "net", "--tap", "t0", "--arg", &arg]);
    wait_for_banner(&mut guest);

    let (sent, received) = namespace.iperf3(&["-t", "2"]);
    eprintln!(
        "FT off receive (iperf3 -c): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    let (sent, received) = namespace.iperf3(&["-t", "2", "-R"]);
    eprintln!(
        "FT off transmit (iperf3 -c -R): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    namespace.iperf3(&["-t", "1", "-P", "2"]);
    namespace.iperf3(&["-t", "1", "-R", "-P", "3"]);
    namespace.iperf3(&["-n", "4M"]);
    namespace.iperf3(&["-t", "1", "--bidir"]);
    let output = common::stop(guest);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("was stopped by the host"),
        "{stdout}{stderr}"
    );
}

#[test]
fn one_test_at_a_time_and_bad_clients_get_iperf3_errors() {
    let namespace = Namespace::new();
    let arg = guest_arg();
    let mut guest = namespace.lockstep(&["run", "--guest", "net", "--tap", "t0", "--arg", &arg]);
    wait_for_banner(&mut guest);

    // A second stock client while a test runs: "the server is busy".
    let first = namespace
        .command("timeout", &["60", "iperf3", "-c", GUEST, "-t", "4", "-J"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3");
    std::thread::sleep(Duration::from_millis(1500));
    let second = namespace
        .command("timeout", &["30", "iperf3", "-c", GUEST, "-t", "1"])
        .output()
        .expect("iperf3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(!second.status.success(), "{text}");
    assert!(text.contains("the server is busy running a test"), "{text}");
    let first = first.wait_with_output().expect("first iperf3");
    let report = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{report}");
    assert!(
        !report.contains("\"error\""),
        "the running test was not disturbed: {report}"
    );

    // Hand-made bad control messages: PARAM_EXCHANGE (9), then SERVER_ERROR
    // (-2) with iperf3's error number and an errno, big-endian.
    let server_error = |number: i32, errno: i32| {
        let mut bytes = vec![9u8, 0xfe];
        bytes.extend_from_slice(&number.to_be_bytes());
        bytes.extend_from_slice(&errno.to_be_bytes());
        bytes
    };
    let framed = |json: &str| {
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes
    };
    // IERECVPARAMS, EMSGSIZE: a 4 GiB parameter message is refused at once.
    assert_eq!(
        raw_client(&namespace, &[0xff, 0xff, 0xff, 0xff]),
        server_error(114, 90)
    );
    // IERECVPARAMS, EINVAL: not JSON.
    assert_eq!(
        raw_client(&namespace, &framed("{\"tcp\":true,\"time\":")),
        server_error(114, 22)
    );
    // IEPROTOCOL: UDP is not served.
    assert_eq!(
        raw_client(&namespace, &framed("{\"udp\":true,\"time\":1}")),
        server_error(131, 0)
    );
    // IENUMSTREAMS: more streams than the guest serves.
    assert_eq!(
        raw_client(&namespace, &framed("{\"tcp\":true,\"parallel\":99}")),
        server_error(6, 0)
    );
    // IEMESSAGE: an unknown state byte after CREATE_STREAMS (10).
    let mut unknown = framed("{\"tcp\":true,\"parallel\":1,\"time\":1}");
    unknown.push(99);
    let mut expected = vec![9u8, 10];
    expected.extend_from_slice(&server_error(110, 0)[1..]);
    assert_eq!(raw_client(&namespace, &unknown), expected);

    // After all that, a stock client still runs a full test.
    namespace.iperf3(&["-t", "1"]);
    let output = common::stop(guest);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("was stopped by the host"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn stock_iperf3_against_an_ft_pair_and_the_backup_matches() {
    let namespace = Namespace::new();
    let arg = guest_arg();
    // The replication link is the namespace's own loopback.
    let link = "127.0.0.1:7701";
    let status_dir = tempfile::tempdir().expect("tempdir");
    let status = status_dir.path().to_str().expect("utf-8");
    let backup = namespace.lockstep(&[
        "backup",
        "--listen",
        link,
        "--quiet",
        "--peer-timeout-ms",
        "20000",
        "--status-dir",
        status,
    ]);
    let mut primary = namespace.lockstep(&[
        "primary",
        "--backup",
        link,
        "--guest",
        "net",
        "--tap",
        "t0",
        "--arg",
        &arg,
        "--digest-interval",
        "300",
        "--peer-timeout-ms",
        "20000",
        "--status-dir",
        status,
    ]);
    wait_for_banner(&mut primary);

    let (sent, received) = namespace.iperf3(&["-t", "2"]);
    eprintln!(
        "FT on receive (iperf3 -c): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );
    let (sent, received) = namespace.iperf3(&["-t", "2", "-R"]);
    eprintln!(
        "FT on transmit (iperf3 -c -R): sender {:.0} Mbit/s, receiver {:.0} Mbit/s",
        mbit(sent),
        mbit(received)
    );

    let primary: Output = common::stop(primary);
    let primary_err = String::from_utf8_lossy(&primary.stderr);
    assert!(
        primary_err.contains("(everything)"),
        "the backup acknowledged every entry: {primary_err}"
    );
    let backup = wait_with_deadline(backup, Duration::from_secs(30));
    let summary = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "backup failed: {summary}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    let line = summary.lines().last().expect("backup summary");
    assert!(line.starts_with("backup:"), "{line}");
    let (matched, taken) = common::digests(line);
    assert_eq!(
        matched, taken,
        "primary's and backup's digests match at the same exits: {line}"
    );
    assert!(matched >= 2, "{line}");
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}
