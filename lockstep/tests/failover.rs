//! Failover without split brain, with real processes on a testbed of
//! namespaces: an embedded arbiter (or etcd) in the arbiter's namespace, a
//! primary in host a and a backup in host b on real TAPs bridged to the
//! client's switch, SIGKILL, and a partition made by cutting the logging
//! link (both sides keep their sockets, neither hears the other; the
//! arbiter stays reachable over the management links). Needs root,
//! /dev/kvm, /dev/net/tun and iproute2.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::{Link, Net, Ns, command};

/// Failover tests run one at a time: each runs three processes and two VMs,
/// and a starved host must not look like a dead peer.
static SERIAL: Mutex<()> = Mutex::new(());

const PEER_TIMEOUT_MS: &str = "1500";

/// The embedded arbiter's key, which the replicas also use for the link.
const TEST_KEY: &[u8] = b"lockstep failover test key, 32+ bytes long";

/// An arbiter process: the embedded one, or a real etcd.
struct Arbiter {
    child: Child,
    /// What every replica of the test is started with: the arbiter, the
    /// peer timeout, a status directory of the test's own.
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Arbiter {
    /// The embedded arbiter in the arbiter's namespace.
    fn start(net: &Net) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        std::fs::write(&key, TEST_KEY).expect("key");
        let address = format!("{}:7400", net.bed.addresses().arbiter);
        let child = net
            .lockstep(Ns::Arbiter)
            .args(["arbiter", "--listen", &address, "--key-file"])
            .arg(&key)
            .arg("--state")
            .arg(dir.path().join("state"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start the arbiter");
        wait_for_port(net, &address);
        let args = vec![
            "--arbiter".into(),
            address,
            "--arbiter-key".into(),
            key.to_string_lossy().into_owned(),
            "--peer-timeout-ms".into(),
            PEER_TIMEOUT_MS.into(),
            // the test's own, so `lockstep status` on the host never lists
            // the test's replicas
            "--status-dir".into(),
            dir.path().join("status").to_string_lossy().into_owned(),
        ];
        Self { child, args, dir }
    }

    /// A single-member etcd cluster in the arbiter's namespace (Debian's
    /// etcd-server): clients on the management network, its peer URL on
    /// the namespace's own loopback.
    fn etcd(net: &Net) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let arbiter = net.bed.addresses().arbiter;
        let client = format!("http://{arbiter}:2379");
        let peer = "http://127.0.0.1:2380".to_string();
        let child = net
            .bed
            .command(Ns::Arbiter, "etcd")
            .expect("arbiter namespace")
            .arg("--name=lockstep-failover")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=lockstep-failover={peer}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (install Debian's etcd-server package)");
        let endpoint = format!("{arbiter}:2379");
        let etcd = arbiter::EtcdArbiter::new(&[endpoint.as_str()], Duration::from_secs(2))
            .expect("endpoint");
        // Asked from host a, as the replicas will.
        net.bed
            .run_in(Ns::A, || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while arbiter::Arbiter::read(&etcd, 999).is_err() {
                    assert!(Instant::now() < deadline, "etcd did not become ready");
                    thread::sleep(Duration::from_millis(100));
                }
            })
            .expect("host a");
        let key = dir.path().join("link.key");
        std::fs::write(&key, TEST_KEY).expect("link key");
        let args = vec![
            "--arbiter".into(),
            format!("etcd://{endpoint}"),
            "--link-key".into(),
            key.to_string_lossy().into_owned(),
            "--peer-timeout-ms".into(),
            PEER_TIMEOUT_MS.into(),
            // the test's own, so `lockstep status` on the host never lists
            // the test's replicas
            "--status-dir".into(),
            dir.path().join("status").to_string_lossy().into_owned(),
        ];
        Self { child, args, dir }
    }

    fn args(&self) -> Vec<String> {
        self.args.clone()
    }

    /// Where the test's replicas publish their status.
    fn status_dir(&self) -> String {
        self.dir
            .path()
            .join("status")
            .to_string_lossy()
            .into_owned()
    }
}

/// Waits until something listens on `address`, asked from host a.
fn wait_for_port(net: &Net, address: &str) {
    let target: SocketAddr = address.parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    while net
        .bed
        .connect(Ns::A, target, Duration::from_millis(500))
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on {address}");
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Arbiter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Pair {
    primary: Child,
    backup: Child,
}

/// A RESP connection from the client namespace to the pair's guest,
/// patient enough for a cut-over.
fn client(net: &Net) -> TcpStream {
    let stream = net.connect(6379);
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    stream
}

fn start_pair(net: &Net, arbiter: &Arbiter) -> Pair {
    start_pair_with(net, arbiter, &[])
}

fn start_pair_with(net: &Net, arbiter: &Arbiter, primary_extra: &[&str]) -> Pair {
    start_pair_on(net, arbiter.args(), primary_extra)
}

/// A backup in host b listening on the logging link, then a primary in
/// host a serving the guest; both take `replica_args` (the arbiter and
/// liveness flags), the primary `primary_extra` too.
fn start_pair_on(net: &Net, replica_args: Vec<String>, primary_extra: &[&str]) -> Pair {
    let both: Vec<&str> = replica_args.iter().map(String::as_str).collect();
    let backup = ["--tap", net.tap(), "--id", "backup", "--quiet"];
    let primary = [&["--id", "primary"], primary_extra].concat();
    let (primary, backup) = net.start_pair(&both, &backup, &primary);
    Pair { primary, backup }
}

fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for a child to exit, up to `timeout`.
fn exited(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn stderr_of(child: Child) -> String {
    let output = child.wait_with_output().expect("output");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// INCRs `key` until `acknowledged` replies were received, tolerating a
/// cut-over in the middle; returns the highest value acknowledged.
fn incr(stream: &mut TcpStream, key: &str, count: u64) -> u64 {
    let mut last = 0;
    for _ in 0..count {
        let reply = command(stream, &["INCR", key]);
        last = reply
            .trim_start_matches(':')
            .parse()
            .expect("an integer reply");
    }
    last
}

#[test]
fn primary_killed_under_load_backup_goes_live_and_no_acknowledged_incr_is_lost() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    let before = incr(&mut stream, "counter", 200);
    assert_eq!(before, 200);
    assert_eq!(
        net.guest_port().as_deref(),
        Some("a0"),
        "the switch has the guest behind host a"
    );
    kill(&pair.primary, "-KILL");
    let _ = pair.primary.wait();
    // The same connection keeps working: the backup's guest has the same
    // TCP state, and the client's retransmissions reach it.
    let after = incr(&mut stream, "counter", 100);
    assert!(after >= 300, "acknowledged INCRs lost: {after} < 300");
    // The backup's gratuitous ARP moved the guest's MAC to host b's port.
    assert_eq!(
        net.guest_port().as_deref(),
        Some("b0"),
        "the switch did not learn the guest behind host b"
    );
    assert_eq!(command(&mut stream, &["GET", "counter"]), after.to_string());
    drop(stream);
    kill(&pair.backup, "-TERM");
    let stdout = {
        let mut text = String::new();
        if let Some(out) = pair.backup.stdout.as_mut() {
            let _ = out.read_to_string(&mut text);
        }
        text
    };
    let stderr = stderr_of(pair.backup);
    assert!(
        stderr.contains("won generation 2 at the arbiter: live as primary"),
        "{stderr}"
    );
    assert!(stderr.contains("gratuitous ARP sent for"), "{stderr}");
    assert!(
        stdout.contains("live as primary of generation 2"),
        "{stdout}"
    );
}

/// Retransmissions the kernel made on the client's connection so far
/// (`tcpi_total_retrans` of `TCP_INFO`).
fn client_retransmissions(stream: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a plain-data struct the kernel fills up to `len`
    // bytes; `len` holds its size; the fd is the stream's, open for the call.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_total_retrans
    }
}

/// The number in "resent N frames" of a promoted backup's log.
fn resent_frames(stderr: &str) -> u64 {
    let at = stderr
        .find("resent ")
        .unwrap_or_else(|| panic!("no resend report in:\n{stderr}"));
    stderr[at + 7..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resend count in:\n{stderr}"))
}

/// The primary dies holding a reply the Output Rule kept back (the backup
/// was stopped, so nothing was acknowledged): the request reached the
/// guest, the reply never left. The promoted backup replays the request,
/// produces the same reply and must send it at once on going live, before
/// the client's next retransmission (without the resend, the client waits
/// for its TCP retransmission timer and the reply comes after it).
#[test]
fn primary_killed_holding_a_reply_the_promoted_backup_sends_it_without_waiting_for_the_client() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "held", 50), 50);
    // The backup stops acknowledging: from now on every reply is held.
    kill(&pair.backup, "-STOP");
    stream
        .write_all(b"*2\r\n$4\r\nINCR\r\n$4\r\nheld\r\n")
        .expect("send");
    // Let the request reach the guest and its reply be produced (and held);
    // the client retransmits once meanwhile (its RTO is 200 ms at least),
    // so its next retransmission is 400 ms or more after that one.
    thread::sleep(Duration::from_millis(300));
    let retransmissions = client_retransmissions(&stream);
    kill(&pair.primary, "-KILL");
    let _ = pair.primary.wait();
    let killed = Instant::now();
    kill(&pair.backup, "-CONT");
    let reply = {
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            stream.read_exact(&mut byte).expect("the held reply");
            reply.push(byte[0]);
        }
        String::from_utf8_lossy(&reply).into_owned()
    };
    let after = killed.elapsed();
    let retransmitted = client_retransmissions(&stream) - retransmissions;
    eprintln!(
        "held reply {reply:?} arrived {} ms after the primary was killed; the client retransmitted {retransmitted} times meanwhile",
        after.as_millis()
    );
    assert_eq!(reply, ":51\r\n", "the held INCR's reply");
    assert_eq!(command(&mut stream, &["GET", "held"]), "51");
    kill(&pair.backup, "-TERM");
    let stderr = stderr_of(pair.backup);
    assert!(
        stderr.contains("won generation 2 at the arbiter: live as primary"),
        "{stderr}"
    );
    assert!(resent_frames(&stderr) > 0, "{stderr}");
    assert_eq!(
        retransmitted,
        0,
        "the reply came only after the client retransmitted ({} ms after the kill):\n{stderr}",
        after.as_millis()
    );
}

/// `arbiter.args()` with the default liveness (5 ms heartbeats, 50 ms
/// peer timeout) instead of the tests' patient 1.5 s.
fn default_liveness(arbiter: &Arbiter) -> Vec<String> {
    let mut args = arbiter.args();
    let at = args
        .iter()
        .position(|a| a == "--peer-timeout-ms")
        .expect("the tests' peer timeout");
    args.drain(at..at + 2);
    args
}

/// 5 ms heartbeats, a 200 ms peer timeout.
fn slow_liveness(arbiter: &Arbiter) -> Vec<String> {
    let mut args = default_liveness(arbiter);
    args.extend(["--peer-timeout-ms".into(), "200".into()]);
    args
}

/// A backup behind a slow logging link (1 Mbit/s) under a write burst
/// acknowledges late (ack round trips of tens of ms, p99 about 60 ms: a
/// dozen heartbeat intervals), but its acks keep advancing and its
/// heartbeats keep coming: with 5 ms heartbeats and a 200 ms peer timeout
/// it must not be declared dead (no failover), and every write is
/// acknowledged. (An ack later than the peer timeout counts as lost: the
/// primary could not tell it from one sent before the backup went live.)
#[test]
fn a_slow_backup_that_still_acks_is_never_declared_dead() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    net.bed
        .set_rate(Link::Log, testbed::Rate::Mbit(1))
        .expect("shape the logging link");
    let Pair { primary, backup } = start_pair_on(&net, slow_liveness(&arbiter), &[]);
    let mut stream = client(&net);
    // 384 KiB of writes pipelined: 3 s or more of log at 1 Mbit/s, fifteen
    // times the peer timeout.
    const SETS: usize = 96;
    let value = "v".repeat(4096);
    let mut burst = String::new();
    for i in 0..SETS {
        let key = format!("k{i}");
        burst.push_str(&format!(
            "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
            key.len(),
            value.len()
        ));
    }
    let started = Instant::now();
    let mut writer = stream.try_clone().expect("clone");
    let sender = thread::spawn(move || writer.write_all(burst.as_bytes()).expect("burst"));
    let mut replies = 0;
    let mut reader = std::io::BufReader::new(&mut stream);
    let mut line = String::new();
    while replies < SETS {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("a reply");
        assert_eq!(line, "+OK\r\n");
        replies += 1;
    }
    sender.join().expect("sender");
    let took = started.elapsed();
    drop(reader);
    assert_eq!(
        command(&mut stream, &["GET", &format!("k{}", SETS - 1)]),
        value
    );
    drop(stream);
    let pair = Pair { primary, backup };
    kill(&pair.primary, "-TERM");
    let primary_stderr = stderr_of(pair.primary);
    kill(&pair.backup, "-TERM");
    let backup_stderr = stderr_of(pair.backup);
    eprintln!(
        "{SETS} SETs of 4 KiB through a 1 Mbit/s logging link took {} ms",
        took.as_millis()
    );
    for (who, text) in [("primary", &primary_stderr), ("backup", &backup_stderr)] {
        assert!(
            !text.contains("won generation") && !text.contains("lost"),
            "the {who} gave up on its peer:\n{primary_stderr}\n{backup_stderr}"
        );
    }
    assert!(
        took > Duration::from_millis(400),
        "the burst did not outlast the peer timeout ({} ms): the test proves nothing",
        took.as_millis()
    );
}

#[test]
fn with_an_etcd_arbiter_the_backup_goes_live_when_the_primary_dies() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::etcd(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "e", 30), 30);
    kill(&pair.primary, "-KILL");
    let _ = pair.primary.wait();
    assert_eq!(incr(&mut stream, "e", 30), 60);
    drop(stream);
    kill(&pair.backup, "-TERM");
    let stderr = stderr_of(pair.backup);
    assert!(
        stderr.contains("won generation 2 at the arbiter: live as primary"),
        "{stderr}"
    );
}

#[test]
fn backup_killed_primary_carries_on_after_winning_the_arbiter() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "c", 50), 50);
    kill(&pair.backup, "-KILL");
    let _ = pair.backup.wait();
    assert_eq!(incr(&mut stream, "c", 50), 100);
    drop(stream);
    kill(&pair.primary, "-TERM");
    let stderr = stderr_of(pair.primary);
    assert!(
        stderr.contains("won generation 2 at the arbiter: running unprotected"),
        "{stderr}"
    );
}

#[test]
fn partition_with_the_arbiter_reachable_exactly_one_goes_live() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "p", 20), 20);
    net.bed.cut(Link::Log).expect("cut the logging link");
    // Both sides stop hearing each other; both ask the arbiter; one loses
    // and halts for good (exit status 4), the other serves.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (halted, survivor) = loop {
        if let Some(status) = pair.primary.try_wait().expect("wait") {
            break (("primary", status), "backup");
        }
        if let Some(status) = pair.backup.try_wait().expect("wait") {
            break (("backup", status), "primary");
        }
        assert!(
            Instant::now() < deadline,
            "nobody halted after the partition"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        halted.1.code(),
        Some(4),
        "the {} must halt with the 'lost the arbiter' status",
        halted.0
    );
    let (survivor_child, loser_child) = if survivor == "backup" {
        (&mut pair.backup, &mut pair.primary)
    } else {
        (&mut pair.primary, &mut pair.backup)
    };
    assert!(
        exited(survivor_child, Duration::from_secs(2)).is_none(),
        "the {survivor} must keep running"
    );
    let _ = loser_child;
    // The service continues on the survivor, with every acknowledged write.
    let value = incr(&mut stream, "p", 1);
    assert_eq!(value, 21, "served by the {survivor}");
    drop(stream);
    kill(survivor_child, "-TERM");
    let _ = exited(survivor_child, Duration::from_secs(10));
}

#[test]
fn partition_with_the_arbiter_down_nobody_goes_live() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let mut arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "q", 10), 10);
    arbiter.child.kill().expect("kill the arbiter");
    let _ = arbiter.child.wait();
    net.bed.cut(Link::Log).expect("cut the logging link");
    // Both lose the peer; neither can win the arbiter: the service stalls.
    stream
        .write_all(b"*2\r\n$4\r\nINCR\r\n$1\r\nq\r\n")
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut reply = [0u8; 16];
    let result = stream.read(&mut reply);
    assert!(
        matches!(&result, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "no replica may answer without the arbiter, got {result:?}"
    );
    assert!(
        exited(&mut pair.primary, Duration::from_millis(10)).is_none(),
        "primary stalls, not exits"
    );
    assert!(
        exited(&mut pair.backup, Duration::from_millis(10)).is_none(),
        "backup stalls, not exits"
    );
    let _ = pair.primary.kill();
    let _ = pair.backup.kill();
    let primary_err = stderr_of(pair.primary);
    let backup_err = stderr_of(pair.backup);
    assert!(!primary_err.contains("won generation"), "{primary_err}");
    assert!(!backup_err.contains("won generation"), "{backup_err}");
    assert!(
        primary_err.contains("the arbiter cannot decide"),
        "{primary_err}"
    );
    assert!(
        backup_err.contains("the arbiter cannot decide"),
        "{backup_err}"
    );
}

#[test]
fn a_primary_of_a_stale_generation_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair(&net, &arbiter);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "s", 5), 5);
    drop(stream);
    // Fail over: the backup becomes the primary of generation 2.
    kill(&pair.primary, "-KILL");
    let _ = pair.primary.wait();
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "s", 1), 6);
    drop(stream);

    // The old primary comes back: the arbiter refuses to let it start a pair.
    let old_link = net.log_address(Ns::B, 7899);
    let mut old_args = vec![
        "primary".to_string(),
        "--backup".into(),
        old_link.clone(),
        "--id".into(),
        "primary".into(),
    ];
    old_args.extend(arbiter.args());
    let output = net
        .lockstep(Ns::A)
        .args(&old_args)
        .output()
        .expect("old primary");
    assert_eq!(
        output.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("already records it")
            && stderr.contains("generation 2 has primary backup and no backup"),
        "{stderr}"
    );
    // Even naming the generation, only its primary may start a new pair.
    let output = net
        .lockstep(Ns::A)
        .args(&old_args)
        .args(["--supersede-generation", "2"])
        .output()
        .expect("old primary");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(
        stderr.contains("only the primary of generation 2"),
        "{stderr}"
    );

    // A backup of the old pair refuses a stream that claims generation 1.
    let mut backup_args = vec![
        "backup".to_string(),
        "--listen".into(),
        old_link.clone(),
        "--id".into(),
        "backup".into(),
    ];
    backup_args.extend(arbiter.args());
    let backup = net
        .lockstep(Ns::B)
        .args(&backup_args)
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup");
    // It speaks the channel's handshake with the right key, but for
    // generation 1: refused before a byte of log, and told why.
    let session = channel::protocol::Session {
        vm_id: 1,
        generation: 1,
        role: channel::protocol::Role::Primary,
        key: TEST_KEY.to_vec(),
    };
    let address = old_link.parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    // From host a, over the logging link.
    let refusal = net
        .bed
        .run_in(Ns::A, || {
            loop {
                match channel::transport::uring_tcp::UringTcp::connect(address, &session, 1 << 20) {
                    Ok(_) => panic!("a primary of generation 1 was accepted"),
                    Err(channel::transport::TransportError::Io { source, .. })
                        if Instant::now() < deadline
                            && source.kind() == std::io::ErrorKind::ConnectionRefused =>
                    {
                        thread::sleep(Duration::from_millis(20));
                    }
                    Err(error) => break arbiter::error_chain(&error),
                }
            }
        })
        .expect("host a");
    assert!(
        refusal.contains("we are stale: we are at generation 1, the peer is at 2"),
        "{refusal}"
    );
    // The backup keeps listening for a primary that passes the handshake.
    let mut backup = backup;
    thread::sleep(Duration::from_millis(500));
    let _ = backup.kill();
    let stderr = stderr_of(backup);
    assert!(
        stderr.contains("refused the primary") && stderr.contains("stale generation"),
        "{stderr}"
    );
    kill(&pair.backup, "-TERM");
    let _ = exited(&mut pair.backup, Duration::from_secs(10));
}

/// Waits until the replica `id` publishes a status containing `text`.
fn wait_for_status(dir: &str, id: &str, text: &str, timeout: Duration) {
    let path = format!("{dir}/{id}.status");
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|status| status.contains(text)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reported `{text}`: {:?}",
            std::fs::read_to_string(&path)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_new_backup_joins_by_state_transfer_and_takes_over_at_the_next_failover() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let status = arbiter.status_dir();
    // New backups join over the logging link, at host a's end.
    let join = net.log_address(Ns::A, 7800);
    let mut pair = start_pair_with(&net, &arbiter, &["--join-listen", &join]);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "j", 50), 50);

    // The backup dies: the primary wins generation 2 and runs alone.
    kill(&pair.backup, "-KILL");
    let _ = pair.backup.wait();
    assert_eq!(incr(&mut stream, "j", 20), 70);

    // A new backup joins under load: cloned by state transfer, generation 3.
    let load = {
        let mut stream = client(&net);
        thread::spawn(move || incr(&mut stream, "load", 300))
    };
    // The new backup runs in host b, where the dead one ran.
    let mut joiner_args: Vec<String> = [
        "backup",
        "--join",
        &join,
        "--tap",
        net.tap(),
        "--id",
        "backup2",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    joiner_args.extend(arbiter.args());
    let joiner = net
        .lockstep(Ns::B)
        .args(&joiner_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the joining backup");
    wait_for_status(
        &status,
        "backup2",
        "role: backup (following the primary)",
        Duration::from_secs(60),
    );
    wait_for_status(
        &status,
        "primary",
        "protection: protected",
        Duration::from_secs(20),
    );
    assert_eq!(load.join().expect("load"), 300);
    assert_eq!(incr(&mut stream, "j", 30), 100);

    // The primary dies: the joined backup goes live with every write.
    kill(&pair.primary, "-KILL");
    let _ = pair.primary.wait();
    let after = incr(&mut stream, "j", 5);
    assert!(
        after >= 105,
        "acknowledged INCRs lost across two failovers: {after}"
    );
    assert_eq!(command(&mut stream, &["GET", "load"]), "300");
    drop(stream);
    kill(&joiner, "-TERM");
    let stderr = stderr_of(joiner);
    eprintln!("the joined backup said:\n{stderr}");
    assert!(stderr.contains("as generation 3"), "{stderr}");
    assert!(stderr.contains("clone verified"), "{stderr}");
    assert!(
        stderr.contains("won generation 4 at the arbiter: live as primary"),
        "{stderr}"
    );
}

/// Liveness settings under which a late heartbeat would look like a dead
/// peer are refused with a message naming both flags.
#[test]
fn a_peer_timeout_shorter_than_three_heartbeats_is_refused() {
    for command in ["primary", "backup"] {
        let output = Command::new(env!("CARGO_BIN_EXE_lockstep"))
            .args([command, "--heartbeat-ms", "20", "--peer-timeout-ms", "30"])
            .args(if command == "primary" {
                ["--backup", "127.0.0.1:9"]
            } else {
                ["--listen", "127.0.0.1:0"]
            })
            .output()
            .expect("run lockstep");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains(
                "--peer-timeout-ms 30 is shorter than three heartbeats (--heartbeat-ms 20)"
            ),
            "{command}: {stderr}"
        );
    }
}

/// A capture on one switch port in the client's namespace: the instants at
/// which frames sent by the guest's MAC arrived from that port's host.
struct PortCapture {
    frames: std::sync::Arc<Mutex<Vec<Instant>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<thread::JoinHandle<()>>,
}

impl PortCapture {
    fn start(net: &Net, port: &'static str) -> Self {
        use std::os::fd::{FromRawFd, OwnedFd};
        let fd = net
            .bed
            .run_in(Ns::Client, move || {
                let name = std::ffi::CString::new(port).expect("name");
                let protocol = (libc::ETH_P_ALL as u16).to_be();
                // SAFETY: socket(2), if_nametoindex(3) and bind(2) with a
                // NUL-terminated name and a zeroed, filled-in sockaddr_ll of
                // the size passed; the fd is owned by the OwnedFd at once.
                unsafe {
                    let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol));
                    assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
                    let fd = OwnedFd::from_raw_fd(fd);
                    let mut address: libc::sockaddr_ll = std::mem::zeroed();
                    address.sll_family = libc::AF_PACKET as u16;
                    address.sll_protocol = protocol;
                    address.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                    assert!(address.sll_ifindex > 0, "no port {port}");
                    let rc = libc::bind(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        (&address as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    );
                    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
                    let timeout = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 50_000,
                    };
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&timeout as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    );
                    fd
                }
            })
            .expect("client namespace");
        let frames = std::sync::Arc::new(Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (frames, stop) = (frames.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // SAFETY: recvfrom(2) into `buf` (its length passed) and
                    // into a zeroed sockaddr_ll whose size is passed.
                    let (n, kind) = unsafe {
                        let mut from: libc::sockaddr_ll = std::mem::zeroed();
                        let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                        let n = libc::recvfrom(
                            std::os::fd::AsRawFd::as_raw_fd(&fd),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                            0,
                            (&mut from as *mut libc::sockaddr_ll).cast(),
                            &mut len,
                        );
                        (n, from.sll_pkttype)
                    };
                    // Frames the port received from its host, not the ones
                    // the switch sent to it (a flooded broadcast of the new
                    // primary's guest crosses a0 outwards too).
                    if n >= 12 && kind != libc::PACKET_OUTGOING && buf[6..12] == testbed::GUEST_MAC
                    {
                        frames.lock().expect("frames").push(Instant::now());
                    }
                }
            })
        };
        Self {
            frames,
            stop,
            reader: Some(reader),
        }
    }

    /// Guest frames that arrived from the port at or after `since`.
    fn since(&self, since: Instant) -> usize {
        self.frames
            .lock()
            .expect("frames")
            .iter()
            .filter(|at| **at >= since)
            .count()
    }

    fn total(&self) -> usize {
        self.frames.lock().expect("frames").len()
    }
}

impl Drop for PortCapture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The primary is frozen (SIGSTOP) under load from several clients, the
/// backup goes live, then the primary resumes (SIGCONT): it must learn at
/// once that it lost and halt, and nothing it sends may reach the client
/// after the new generation was granted (checked by a capture on the
/// switch port of host a in the client's namespace). A frozen primary
/// resumes with acks its backup sent before going live waiting in its
/// socket, and a guest that carries on where it stopped.
#[test]
fn a_frozen_primary_resumed_after_the_backup_went_live_sends_nothing_and_halts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair_on(&net, default_liveness(&arbiter), &[]);
    let capture = PortCapture::start(&net, "a0");
    // Several clients INCR without pause: replies are held and released
    // all the time, so the freeze lands with some in flight.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut clients = Vec::new();
    for c in 0..4 {
        let mut stream = client(&net);
        let running = running.clone();
        clients.push(thread::spawn(move || {
            let mut last = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let reply = command(&mut stream, &["INCR", &format!("frozen{c}")]);
                last = reply[1..].parse::<u64>().expect("an integer");
            }
            last
        }));
    }
    thread::sleep(Duration::from_millis(500));
    assert!(capture.total() > 0, "the capture saw no frame of the guest");
    kill(&pair.primary, "-STOP");
    // The backup notices the silence, wins generation 2 and announces the
    // guest on host b's port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while net.guest_port().as_deref() != Some("b0") {
        if Instant::now() >= deadline {
            kill(&pair.primary, "-CONT");
            kill(&pair.primary, "-KILL");
            kill(&pair.backup, "-KILL");
            panic!(
                "the backup never went live:\n{}\n{}",
                stderr_of(pair.primary),
                stderr_of(pair.backup)
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    let granted = Instant::now();
    thread::sleep(Duration::from_millis(200));
    kill(&pair.primary, "-CONT");
    let status = exited(&mut pair.primary, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(200));
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let totals: Vec<u64> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let leaked = capture.since(granted);
    drop(capture);
    let primary_stderr = stderr_of(pair.primary);
    kill(&pair.backup, "-TERM");
    let backup_stderr = stderr_of(pair.backup);
    eprintln!(
        "INCRs per client {totals:?}; guest frames from host a after the grant: {leaked}; the old primary ended {status:?}"
    );
    assert!(
        backup_stderr.contains("won generation 2 at the arbiter: live as primary"),
        "{backup_stderr}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(4),
        "the resumed primary did not halt as the loser:\n{primary_stderr}"
    );
    assert!(
        primary_stderr.contains("lost generation 2"),
        "{primary_stderr}"
    );
    assert_eq!(
        leaked, 0,
        "the resumed old primary sent {leaked} guest frames to the client after the new generation was granted:\n{primary_stderr}"
    );
}

/// The backup is frozen (SIGSTOP) under load from several clients. Its
/// socket fills and the primary's sender can no longer send, but no ack
/// or heartbeat arrives either: after the peer timeout the primary must
/// declare the backup dead, win generation 2 at the arbiter and serve
/// alone, so the clients' requests keep completing while the backup is
/// still frozen. Resumed (SIGCONT), the backup must learn that it lost and
/// halt with the fail-stop code, without one guest frame leaving host b
/// (checked by a capture on host b's switch port).
#[test]
fn a_frozen_backup_is_given_up_on_the_primary_serves_alone_and_the_resumed_backup_halts() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair_on(&net, default_liveness(&arbiter), &[]);
    let capture = PortCapture::start(&net, "b0");
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let mut stream = client(&net);
        let (running, done) = (running.clone(), done.clone());
        clients.push(thread::spawn(move || {
            // Two clients INCR, two SET 16 KiB values: the log carries
            // megabytes a second, so the frozen backup's socket fills.
            let value = "w".repeat(16 << 10);
            let mut last = 0;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("stopped{c}");
                if c % 2 == 0 {
                    let reply = command(&mut stream, &["INCR", &key]);
                    last = reply[1..].parse::<u64>().expect("an integer");
                } else {
                    assert_eq!(command(&mut stream, &["SET", &key, &value]), "+OK");
                    last += 1;
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            last
        }));
    }
    thread::sleep(Duration::from_millis(500));
    let before = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(before > 0, "no INCR completed before the freeze");
    kill(&pair.backup, "-STOP");
    let stopped = Instant::now();
    // Give the primary ample time (the peer timeout is 50 ms) to give up
    // on the frozen backup, then count what completes while it is frozen.
    thread::sleep(Duration::from_millis(1500));
    let at_1500 = done.load(std::sync::atomic::Ordering::Relaxed);
    thread::sleep(Duration::from_millis(1500));
    let at_3000 = done.load(std::sync::atomic::Ordering::Relaxed);
    let frozen_for = stopped.elapsed();
    kill(&pair.backup, "-CONT");
    let status = exited(&mut pair.backup, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(200));
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let totals: Vec<u64> = clients
        .into_iter()
        .map(|c| c.join().expect("client"))
        .collect();
    let leaked = capture.since(stopped);
    drop(capture);
    if status.is_none() {
        kill(&pair.backup, "-KILL");
    }
    let backup_stderr = stderr_of(pair.backup);
    kill(&pair.primary, "-TERM");
    let primary_stderr = stderr_of(pair.primary);
    eprintln!(
        "INCRs: {before} before the freeze, {} in the frozen backup's first 1.5 s, {} in the next 1.5 s (frozen {} ms); per client {totals:?}; the resumed backup ended {status:?}; guest frames from host b since the freeze: {leaked}",
        at_1500 - before,
        at_3000 - at_1500,
        frozen_for.as_millis()
    );
    assert!(
        at_3000 > at_1500,
        "no INCR completed between 1.5 s and 3 s after the backup froze: the primary stalled behind it:\n{primary_stderr}"
    );
    the_resumed_backup_lost(status, &backup_stderr, &primary_stderr);
    assert_eq!(
        leaked, 0,
        "the resumed backup sent {leaked} guest frames from host b:\n{backup_stderr}"
    );
}

/// A backup frozen and resumed lost: the primary gave up on it and won
/// generation 2, and the backup halted with the fail-stop code.
fn the_resumed_backup_lost(status: Option<ExitStatus>, backup_stderr: &str, primary_stderr: &str) {
    assert!(
        primary_stderr.contains("won generation 2 at the arbiter: running unprotected"),
        "{primary_stderr}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(4),
        "the resumed backup did not halt as the loser:\n{backup_stderr}\n{primary_stderr}"
    );
    assert!(
        backup_stderr.contains("lost generation 2"),
        "{backup_stderr}"
    );
}

/// The backup is frozen while the guest is idle (no client traffic): the
/// primary must still give up on it after the peer timeout and win
/// generation 2, so that the backup, resumed, halts (it must not take
/// over from a healthy primary because it was the one asleep).
#[test]
fn a_backup_frozen_while_the_guest_idles_is_given_up_on_and_halts_when_resumed() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let net = Net::new();
    let arbiter = Arbiter::start(&net);
    let mut pair = start_pair_on(&net, default_liveness(&arbiter), &[]);
    let mut stream = client(&net);
    assert_eq!(incr(&mut stream, "idle", 20), 20);
    kill(&pair.backup, "-STOP");
    thread::sleep(Duration::from_millis(1000));
    kill(&pair.backup, "-CONT");
    let status = exited(&mut pair.backup, Duration::from_secs(10));
    if status.is_none() {
        kill(&pair.backup, "-KILL");
    }
    let backup_stderr = stderr_of(pair.backup);
    let served = incr(&mut stream, "idle", 20);
    drop(stream);
    kill(&pair.primary, "-TERM");
    let primary_stderr = stderr_of(pair.primary);
    the_resumed_backup_lost(status, &backup_stderr, &primary_stderr);
    assert_eq!(served, 40, "acknowledged INCRs lost");
}
