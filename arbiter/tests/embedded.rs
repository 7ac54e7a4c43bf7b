//! The embedded arbiter, end to end over loopback TCP.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::protocol::{self, Command as Op, Status};
use arbiter::server::{self, ServerHandle};
use arbiter::{Arbiter, ArbiterError, EmbeddedArbiter, Key, Loss, Outcome};
use common::{TempDir, id, key};

const TIMEOUT: Duration = Duration::from_secs(2);

fn start(state: &Path) -> ServerHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    server::spawn(listener, state, key()).expect("server starts")
}

fn client(server: &ServerHandle) -> EmbeddedArbiter {
    EmbeddedArbiter::connect(server.local_addr(), key(), TIMEOUT).expect("client")
}

#[test]
fn exactly_one_winner_among_racing_threads() {
    let dir = TempDir::new("race");
    let server = start(&dir.path().join("state"));
    common::exactly_one_winner(Arc::new(client(&server)), 1, 16);
    assert_eq!(
        server
            .stats()
            .granted
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn stale_generation_loses() {
    let dir = TempDir::new("stale");
    let server = start(&dir.path().join("state"));
    common::stale_generation_loses(&client(&server), 10);
}

#[test]
fn state_survives_a_server_restart() {
    let dir = TempDir::new("restart");
    let state = dir.path().join("state");
    let server = start(&state);
    let arbiter = client(&server);
    assert!(
        arbiter
            .register(5, 0, &id("p"), &id("b"))
            .expect("register")
            .is_won()
    );
    assert!(arbiter.test_and_set(5, 1, &id("b")).expect("tas").is_won());
    server.shutdown();

    let server = start(&state);
    let arbiter = client(&server);
    let record = arbiter.read(5).expect("read").expect("record survived");
    assert_eq!((record.generation, record.primary.as_str()), (2, "b"));
    let again = arbiter.test_and_set(5, 1, &id("p")).expect("tas");
    assert!(
        matches!(
            again,
            Outcome::Lost {
                reason: Loss::Superseded,
                ..
            }
        ),
        "{again:?}"
    );
}

/// The stand-alone server as a real process, killed with SIGKILL right after
/// it answered: the answer must already be on disk.
struct ServerProcess {
    child: Child,
    addr: String,
}

impl ServerProcess {
    /// Runs the server in a separate process: this test binary itself,
    /// re-executed to run only `arbiter_server_child_process`.
    fn start(state: &Path, key_file: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "arbiter_server_child_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("LOCKSTEP_ARBITER_STATE", state)
            .env("LOCKSTEP_ARBITER_KEY", key_file)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the arbiter server process");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("the server's output")
                .expect("read a line");
            // libtest may print "test … ... " on the same line first.
            if let Some(at) = line.find("listening on ") {
                break line[at + "listening on ".len()..].trim().to_string();
            }
        };
        Self { child, addr }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn state_survives_sigkill_of_the_server_process() {
    let dir = TempDir::new("sigkill");
    let (state, key_file) = (dir.path().join("state"), dir.path().join("key"));
    std::fs::write(&key_file, "lockstep test key: 32 bytes long\n").expect("key file");
    let server = ServerProcess::start(&state, &key_file);
    let arbiter = EmbeddedArbiter::connect(server.addr.as_str(), key(), TIMEOUT).expect("client");
    assert!(
        arbiter
            .register(9, 0, &id("p"), &id("b"))
            .expect("register")
            .is_won()
    );
    assert!(arbiter.test_and_set(9, 1, &id("p")).expect("tas").is_won());
    server.kill();

    let server = ServerProcess::start(&state, &key_file);
    let arbiter = EmbeddedArbiter::connect(server.addr.as_str(), key(), TIMEOUT).expect("client");
    let lost = arbiter.test_and_set(9, 1, &id("b")).expect("tas");
    let Outcome::Lost {
        current: Some(current),
        ..
    } = lost
    else {
        panic!("generation 1 granted twice: {lost:?}");
    };
    assert_eq!((current.generation, current.primary.as_str()), (2, "p"));
    server.kill();
}

#[test]
fn wrong_key_is_refused_with_a_clear_error() {
    let dir = TempDir::new("key");
    let server = start(&dir.path().join("state"));
    let wrong = Key::new(b"not the arbiter's key, 16+ bytes").expect("key");
    let arbiter = EmbeddedArbiter::connect(server.local_addr(), wrong, TIMEOUT).expect("client");
    let err = arbiter
        .register(1, 0, &id("p"), &id("b"))
        .expect_err("refused");
    assert!(matches!(err, ArbiterError::KeyRejected { .. }), "{err:?}");
    assert!(err.to_string().contains("pre-shared keys differ"), "{err}");
    // Nothing was granted: the right key still gets generation 1.
    assert!(
        client(&server)
            .register(1, 0, &id("p"), &id("b"))
            .expect("register")
            .is_won()
    );
}

#[test]
fn an_impostor_cannot_fool_the_client() {
    // A server with another key answers; the client must not believe it.
    let dir = TempDir::new("impostor");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let impostor = server::spawn(
        listener,
        &dir.path().join("state"),
        Key::new(b"an impostor's key, 16+ bytes....").expect("key"),
    )
    .expect("server");
    let err = client(&impostor)
        .test_and_set(1, 0, &id("p"))
        .expect_err("refused");
    assert!(!err.is_unreachable());
    assert!(err.to_string().contains("keys differ"), "{err}");

    // A fake that replays a genuine "won" reply (wrong nonce) is refused too.
    let genuine = protocol::encode_reply(
        &key(),
        Status::Ok,
        &[9; protocol::NONCE_LEN],
        Some(&protocol::Answer::Won(arbiter::VmRecord {
            generation: 1,
            primary: id("p"),
            backup: None,
        })),
    );
    let fake = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = fake.local_addr().expect("addr");
    let replayer = std::thread::spawn(move || {
        let (mut s, _) = fake.accept().expect("accept");
        let mut request = [0u8; 64];
        let _ = s.read(&mut request);
        s.write_all(&genuine).expect("write");
    });
    let arbiter = EmbeddedArbiter::connect(addr, key(), TIMEOUT).expect("client");
    let err = arbiter
        .test_and_set(1, 0, &id("p"))
        .expect_err("a replayed win is refused");
    assert!(matches!(err, ArbiterError::NotAuthentic { .. }), "{err:?}");
    replayer.join().expect("replayer");
}

#[test]
fn a_storage_failure_grants_nothing_and_the_server_stalls() {
    let dir = TempDir::new("storage");
    let state_dir = dir.path().join("gone");
    std::fs::create_dir(&state_dir).expect("state dir");
    let server = start(&state_dir.join("state"));
    let arbiter = client(&server);
    assert!(
        arbiter
            .register(4, 0, &id("p"), &id("b"))
            .expect("register")
            .is_won()
    );

    // The state can no longer be written: the grant is refused, not made.
    std::fs::remove_dir_all(&state_dir).expect("remove state dir");
    let err = arbiter
        .test_and_set(4, 1, &id("b"))
        .expect_err("not durable, not granted");
    assert!(matches!(err, ArbiterError::Storage { .. }), "{err:?}");

    // Even once the disk is back, this server grants nothing more (fail-stop):
    // the service stalls until an operator restarts the arbiter.
    std::fs::create_dir(&state_dir).expect("state dir back");
    let err = arbiter
        .test_and_set(4, 1, &id("p"))
        .expect_err("still stalled");
    assert!(matches!(err, ArbiterError::Storage { .. }), "{err:?}");
}

/// Sends raw bytes, half-closes, and decodes the server's reply.
fn exchange(server: &ServerHandle, bytes: &[u8]) -> protocol::Reply {
    let mut s = TcpStream::connect(server.local_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    protocol::read_reply(&mut s, &key()).expect("an authenticated reply")
}

#[test]
fn garbage_and_wrong_versions_are_refused_and_the_server_keeps_serving() {
    let dir = TempDir::new("garbage");
    let server = start(&dir.path().join("state"));
    let arbiter = client(&server);
    assert!(
        arbiter
            .register(3, 0, &id("p"), &id("b"))
            .expect("register")
            .is_won()
    );

    // Wrong version, correctly authenticated: refused, the server says which it speaks.
    let request = protocol::encode_request_with_version(&key(), &[1; 16], &Op::Read { vm: 3 }, 2);
    let reply = exchange(&server, &request);
    assert_eq!(
        (reply.status, reply.version),
        (Status::UnsupportedVersion, protocol::VERSION)
    );

    // Not our magic.
    assert_eq!(
        exchange(&server, b"GET / HTTP/1.1\r\n\r\n").status,
        Status::BadMagic
    );
    // Truncated.
    let tas = Op::TestAndSet {
        vm: 3,
        expected: 1,
        candidate: id("b"),
    };
    let request = protocol::encode_request(&key(), &[2; 16], &tas);
    for cut in [0, 3, 6, 20, 48, request.len() - 1] {
        assert_eq!(
            exchange(&server, &request[..cut]).status,
            Status::Malformed,
            "cut at {cut}"
        );
    }
    // A flipped MAC bit.
    let mut forged = request.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(
        exchange(&server, &forged).status,
        Status::AuthenticationFailed
    );

    // Random bytes, some behind a valid magic and version so that they get
    // past the first checks. A fixed seed: reproducible failures.
    let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.u64(..);
    for i in 0..300 {
        let len = usize::try_from(next() % 200).expect("small");
        let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        if i % 2 == 0 && bytes.len() >= 6 {
            bytes[..4].copy_from_slice(&protocol::MAGIC);
            bytes[4..6].copy_from_slice(&protocol::VERSION.to_be_bytes());
        }
        let reply = exchange(&server, &bytes);
        assert_ne!(reply.status, Status::Ok, "garbage accepted: {bytes:02x?}");
    }

    // Still serving, and nothing moved.
    let record = arbiter.read(3).expect("read").expect("record");
    assert_eq!(record.generation, 1);
    assert!(arbiter.test_and_set(3, 1, &id("b")).expect("tas").is_won());
}

#[test]
fn an_unreachable_arbiter_is_an_error_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    // Nothing listens: refused at once.
    let port = common::free_port();
    let arbiter = EmbeddedArbiter::connect(("127.0.0.1", port), key(), timeout).expect("client");
    let started = Instant::now();
    let err = arbiter
        .test_and_set(1, 1, &id("p"))
        .expect_err("nobody wins");
    assert!(err.is_unreachable(), "{err:?}");
    assert!(started.elapsed() < timeout + Duration::from_millis(500));

    // Something accepts but never answers (a hung arbiter): timed out.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let arbiter = EmbeddedArbiter::connect(silent.local_addr().expect("addr"), key(), timeout)
        .expect("client");
    let started = Instant::now();
    let err = arbiter
        .test_and_set(1, 1, &id("p"))
        .expect_err("nobody wins");
    let elapsed = started.elapsed();
    assert!(matches!(err, ArbiterError::Timeout { .. }), "{err:?}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_millis(500),
        "{elapsed:?}"
    );
    assert!(err.to_string().contains("did not answer within"), "{err}");
}

/// Not a test of its own: the body of the server process that
/// `ServerProcess::start` runs (it does nothing unless started that way).
#[test]
fn arbiter_server_child_process() {
    let (Ok(state), Ok(key_file)) = (
        std::env::var("LOCKSTEP_ARBITER_STATE"),
        std::env::var("LOCKSTEP_ARBITER_KEY"),
    ) else {
        return;
    };
    let key = arbiter::Key::from_file(Path::new(&key_file)).expect("key");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    println!("listening on {}", listener.local_addr().expect("address"));
    std::io::Write::flush(&mut std::io::stdout()).expect("flush");
    arbiter::server::serve(listener, Path::new(&state), key).expect("serve");
}
