//! Hostile and mistaken peers of a running pair, with real processes on
//! loopback only (no TAP: the `exits` guest has no NIC): a second primary
//! with the same id, a primary restarted inside the failover window, a
//! stray connection to a waiting backup, and key handling. Needs /dev/kvm.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::Arbiter as _;

/// One test at a time: each runs two VMs and a starved host must not look
/// like a dead peer.
static SERIAL: Mutex<()> = Mutex::new(());

fn lockstep() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lockstep"))
}

/// A child whose stderr (and stdout) is collected by background threads.
struct Watched {
    child: Child,
    text: Arc<Mutex<String>>,
}

impl Watched {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lockstep");
        let text = Arc::new(Mutex::new(String::new()));
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().expect("stdout"));
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().expect("stderr"));
        for stream in [out, err] {
            let text = Arc::clone(&text);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let mut t = text.lock().expect("lock");
                    t.push_str(&line);
                    t.push('\n');
                }
            });
        }
        Self { child, text }
    }

    fn text(&self) -> String {
        self.text.lock().expect("lock").clone()
    }

    fn wait_for(&self, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.text().contains(what) {
            assert!(
                Instant::now() < deadline,
                "`{what}` did not appear within {within:?}:\n{}",
                self.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit; returns the exit code and everything printed.
    fn finish(mut self, within: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader threads drain the pipes.
                thread::sleep(Duration::from_millis(100));
                return (status.code(), self.text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("did not exit within {within:?}:\n{}", self.text());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An embedded arbiter process with a key made by `lockstep keygen`.
struct Setup {
    dir: tempfile::TempDir,
    key: PathBuf,
    arbiter_address: String,
    arbiter: Watched,
}

impl Setup {
    fn new(arbiter_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = common::keygen(dir.path(), "key");
        let arbiter_address = format!("127.0.0.1:{arbiter_port}");
        let mut command = lockstep();
        command
            .args(["arbiter", "--listen", &arbiter_address, "--key-file"])
            .arg(&key)
            .arg("--state")
            .arg(dir.path().join("state"));
        let arbiter = Watched::spawn(command);
        arbiter.wait_for("listening", Duration::from_secs(10));
        Self {
            dir,
            key,
            arbiter_address,
            arbiter,
        }
    }

    fn ft_args(&self, id: &str) -> Vec<String> {
        vec![
            "--arbiter".into(),
            self.arbiter_address.clone(),
            "--arbiter-key".into(),
            self.key.to_string_lossy().into_owned(),
            "--id".into(),
            id.into(),
            "--peer-timeout-ms".into(),
            "1500".into(),
            "--status-dir".into(),
            self.dir
                .path()
                .join("status")
                .to_string_lossy()
                .into_owned(),
        ]
    }

    fn backup(&self, listen: &str) -> Watched {
        let mut command = lockstep();
        command
            .args(["backup", "--quiet", "--listen", listen])
            .args(self.ft_args("backup"));
        Watched::spawn(command)
    }

    fn primary(&self, backup: &str, rounds: &str, extra: &[&str]) -> Watched {
        let mut command = lockstep();
        command
            .args(["primary", "--quiet", "--guest", "exits", "--arg", rounds])
            .args(["--backup", backup, "--digest-interval", "2000"])
            .args(self.ft_args("primary"))
            .args(extra);
        Watched::spawn(command)
    }

    fn arbiter_client(&self) -> arbiter::EmbeddedArbiter {
        let key = arbiter::Key::from_file(&self.key).expect("key");
        arbiter::EmbeddedArbiter::connect(
            self.arbiter_address.as_str(),
            key,
            Duration::from_secs(2),
        )
        .expect("client")
    }

    /// Records the pair (primary, backup) in generation 1, as a primary's
    /// start-up would, so that a waiting backup runs the handshake with
    /// every connection instead of refusing it unheard.
    fn register_pair(&self) {
        let client = self.arbiter_client();
        let (p, b) = (
            arbiter::ReplicaId::new("primary").expect("id"),
            arbiter::ReplicaId::new("backup").expect("id"),
        );
        assert!(client.register(1, 0, &p, &b).expect("register").is_won());
    }

    fn record(&self) -> Option<arbiter::VmRecord> {
        let client = self.arbiter_client();
        client.read(1).expect("read the arbiter")
    }
}

/// Issue 13, item 1. While a pair runs, a second `lockstep primary` with
/// the same id is refused (saying who holds which generation) and the
/// record is untouched; then the primary is SIGKILLed and restarted at once
/// (as a supervisor would, inside the backup's failover window): the
/// restarted one is refused too, and the backup, which holds the only
/// current state, wins generation 2 and finishes the guest live.
#[test]
fn a_second_or_restarted_primary_with_the_same_id_cannot_take_the_vm() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = Setup::new(common::free_port());
    let link = &common::free_addr();
    let backup = setup.backup(link);
    backup.wait_for("listening on", Duration::from_secs(10));
    let mut primary = setup.primary(link, "60000", &[]);
    primary.wait_for("streaming to the backup", Duration::from_secs(30));
    backup.wait_for("replaying guest exits", Duration::from_secs(10));

    // A second primary, same id, while the pair runs.
    let elsewhere = common::free_addr();
    let (code, text) = setup
        .primary(&elsewhere, "60000", &[])
        .finish(Duration::from_secs(30));
    assert_ne!(code, Some(0), "the second primary must not start: {text}");
    assert!(text.contains("refusing to start VM 1 as primary"), "{text}");
    assert!(
        text.contains("generation 1 has primary primary and backup backup"),
        "{text}"
    );
    assert!(text.contains("--supersede-generation 1"), "{text}");
    let record = setup.record().expect("a record");
    assert_eq!(record.generation, 1, "the record is untouched: {record:?}");
    // Naming another generation than the current one is refused as well.
    let (code, text) = setup
        .primary(&elsewhere, "60000", &["--supersede-generation", "7"])
        .finish(Duration::from_secs(30));
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("is not VM 1's current generation"), "{text}");

    // SIGKILL the primary and restart it at once.
    primary.kill();
    let (code, text) = setup
        .primary(link, "60000", &[])
        .finish(Duration::from_secs(30));
    assert_ne!(
        code,
        Some(0),
        "the restarted primary must not start: {text}"
    );
    assert!(text.contains("already records it"), "{text}");

    // The backup goes live in generation 2 and runs the guest to its end.
    let (code, text) = backup.finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("won generation 2 at the arbiter"),
        "the backup must win the failover: {text}"
    );
    assert!(text.contains("live as primary of generation 2"), "{text}");
    let record = setup.record().expect("a record");
    assert_eq!((record.generation, record.primary.as_str()), (2, "backup"));
    drop(setup.arbiter);
}

/// Issue 13, item 7. Stray connections to a waiting `lockstep backup
/// --listen` (an HTTP request, a silent one, garbage, a wrong key) neither
/// kill it nor get its Hello: it keeps accepting, each on its own, until a
/// peer passes the handshake, and then follows that primary to the end.
/// The pair is registered first (so the backup does run the handshake with
/// every stray), and the primary starts over that record with
/// `--supersede-generation 1`.
#[test]
fn stray_connections_do_not_kill_a_waiting_backup_or_learn_its_hello() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = Setup::new(common::free_port());
    let link = &common::free_addr();
    setup.register_pair();
    let backup = setup.backup(link);
    backup.wait_for("listening on", Duration::from_secs(10));

    let mut http = TcpStream::connect(link).expect("connect");
    http.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
    http.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let silent = TcpStream::connect(link).expect("connect");
    let mut garbage = TcpStream::connect(link).expect("connect");
    garbage.write_all(&[0xff; 64]).expect("send");
    garbage
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    thread::sleep(Duration::from_millis(300));
    // A primary of another deployment (another key, no arbiter, so
    // generation 0): refused, the backup keeps listening.
    let other = common::keygen(setup.dir.path(), "other.key");
    let mut command = lockstep();
    command
        .args(["primary", "--quiet", "--guest", "exits", "--arg", "100"])
        .args(["--backup", link, "--id", "primary", "--link-key"])
        .arg(&other)
        .args(["--status-dir", "/nonexistent-lockstep-test"]);
    let (code, text) = Watched::spawn(command).finish(Duration::from_secs(60));
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("handshake failed"), "{text}");
    assert!(
        backup.child_alive(),
        "the backup died of a stray connection:\n{}",
        backup.text()
    );

    // The real primary is served while the silent peer still waits.
    let primary = setup.primary(link, "3000", &["--supersede-generation", "1"]);
    let (code, text) = primary.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = backup.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("digests matched"), "{text}");
    assert!(text.contains("refused a connection"), "{text}");

    // Neither stray got the backup's Hello (VM id, generation).
    for (what, mut stream) in [("HTTP", http), ("garbage", garbage)] {
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(
            !is_hello(&answer),
            "the backup sent its Hello to the {what} peer: {answer:?}"
        );
    }
    drop(silent);
}

/// The hostile-peer list at a waiting `lockstep backup --listen`, through
/// the real binary: 100 peers dripping a Hello a byte every 300 ms, a
/// handshake message whose values are all at their maximum (2^64-1), a
/// frame header announcing 2^32-1 bytes and garbage all connect at once;
/// then the real primary is served beside them, the pair runs to the end
/// with every digest matched, and the backup reports the refusals and
/// never dies of them.
#[test]
fn a_hundred_slow_peers_and_absurd_lengths_at_a_waiting_backup_do_not_stop_the_pair() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = Setup::new(common::free_port());
    let link = common::free_addr();
    setup.register_pair();
    let backup = setup.backup(&link);
    backup.wait_for("listening on", Duration::from_secs(10));

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..100 {
        let (stop, link) = (Arc::clone(&stop), link.clone());
        slow.push(thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(&link) else {
                return;
            };
            for byte in absurd_handshake() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) || s.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        }));
    }
    let mut four_gib = vec![0u8; channel::protocol::FRAME_HEADER_LEN];
    four_gib[..2].copy_from_slice(&1u16.to_le_bytes());
    four_gib[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut strays = Vec::new();
    for attack in [absurd_handshake(), four_gib, vec![0xff; 4096]] {
        let mut s = TcpStream::connect(&link).expect("connect");
        s.write_all(&attack).expect("send");
        strays.push(s);
    }
    thread::sleep(Duration::from_millis(300));

    let primary = setup.primary(&link, "3000", &["--supersede-generation", "1"]);
    let (code, text) = primary.finish(Duration::from_secs(90));
    assert_eq!(code, Some(0), "{text}");
    assert!(
        backup.child_alive(),
        "the backup died of a hostile peer:\n{}",
        backup.text()
    );
    let (code, text) = backup.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("digests matched"), "{text}");
    assert!(text.contains("refused a connection"), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(strays);
    for t in slow {
        let _ = t.join();
    }
}

/// A channel handshake message (a primary's Hello) whose VM id,
/// generation and every other word is at its maximum: 2^64-1 where the
/// field is 64 bits, 2^16-1 for the version and type.
fn absurd_handshake() -> Vec<u8> {
    let mut m = b"LKSTPCHN".to_vec();
    m.extend_from_slice(&[0xff; 4]);
    m.extend_from_slice(&1u16.to_le_bytes());
    m.extend_from_slice(&[0xff; 2]);
    m.extend_from_slice(&u64::MAX.to_le_bytes());
    m.extend_from_slice(&u64::MAX.to_le_bytes());
    m.extend_from_slice(&[0xff; 32]);
    m
}

/// Whether `bytes` start with a channel handshake Hello (type 1).
fn is_hello(bytes: &[u8]) -> bool {
    bytes.len() >= 64 && bytes[..8] == *b"LKSTPCHN" && bytes[10..12] == [1, 0]
}

impl Watched {
    fn child_alive(&self) -> bool {
        // try_wait needs &mut; a signal 0 tells without reaping.
        Command::new("kill")
            .args(["-0", &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && !self.text().contains("lockstep: ")
    }
}

/// Issue 13, item 11: no built-in key, short keys refused, `keygen` makes
/// private ones.
#[test]
fn replicas_need_a_real_key_and_keygen_makes_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = common::free_addr();
    let output = lockstep()
        .args(["backup", "--listen", &listen, "--quiet"])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("no link key"), "{text}");
    assert!(text.contains("lockstep keygen FILE"), "{text}");

    let short = dir.path().join("short");
    std::fs::write(&short, "31 bytes is one byte too short.").expect("write");
    let output = lockstep()
        .args(["backup", "--listen", &listen, "--quiet", "--link-key"])
        .arg(&short)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("is 31 bytes long; at least 32"), "{text}");
    assert!(text.contains(short.to_str().expect("utf-8")), "{text}");

    let output = lockstep()
        .args(["arbiter", "--listen", &listen, "--state"])
        .arg(dir.path().join("state"))
        .arg("--key-file")
        .arg(&short)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("at least 32"), "{text}");

    let key = common::keygen(dir.path(), "new.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&key).expect("key");
    assert_eq!(text.trim().len(), 64, "{text}");
    assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
    let again = lockstep().arg("keygen").arg(&key).output().expect("run");
    assert!(
        !again.status.success(),
        "an existing key is never overwritten"
    );
    assert_eq!(std::fs::read_to_string(&key).expect("key"), text);
    let _ = Path::new(&key);
}

/// Issue 13, item 8 and the hostile-peer list. A primary running alone
/// (its backup SIGKILLed) takes a new backup on its join port while 100
/// peers hold connections to that port (50 dripping a byte every 3 s, 50
/// saying nothing: more than the 32 it authenticates at once), besides
/// garbage and a handshake message whose values are all 2^64-1: the real
/// joiner is authenticated and served meanwhile (it closes the oldest
/// waiting stranger, not itself), and the pair goes on to the end. Before
/// the join port closed the oldest, the joiner was refused here.
#[test]
fn slow_peers_on_the_join_port_do_not_block_re_protection() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let setup = Setup::new(common::free_port());
    let link = &common::free_addr();
    let join = common::free_addr();
    let join = join.as_str();
    let mut backup = setup.backup(link);
    backup.wait_for("listening on", Duration::from_secs(10));
    let primary = setup.primary(link, "100000", &["--join-listen", join]);
    primary.wait_for("streaming to the backup", Duration::from_secs(30));
    backup.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while setup.record().map(|r| r.generation) != Some(2) {
        assert!(
            Instant::now() < deadline,
            "the primary did not win generation 2: {}",
            primary.text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Slow peers on the join port.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut slow = Vec::new();
    for _ in 0..50 {
        let stop = Arc::clone(&stop);
        let join = join.to_owned();
        slow.push(thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(&join) else {
                return;
            };
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if s.write_all(b"L").is_err() {
                    return;
                }
                thread::sleep(Duration::from_secs(3));
            }
        }));
    }
    let mut silent: Vec<TcpStream> = (0..50)
        .filter_map(|_| TcpStream::connect(join).ok())
        .collect();
    for attack in [vec![0xff; 64], absurd_handshake()] {
        if let Ok(mut s) = TcpStream::connect(join) {
            let _ = s.write_all(&attack);
            silent.push(s);
        }
    }
    thread::sleep(Duration::from_millis(300));

    let mut command = lockstep();
    command
        .args(["backup", "--quiet", "--join", join])
        .args(setup.ft_args("backup-2"));
    let joiner = Watched::spawn(command);
    joiner.wait_for("state received", Duration::from_secs(30));
    let (code, text) = primary.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("backup-2 joined in generation 3"), "{text}");
    let (code, text) = joiner.finish(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{text}");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(silent);
    for t in slow {
        let _ = t.join();
    }
}
