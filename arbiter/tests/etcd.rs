//! The etcd backend against a real etcd (Debian's `etcd-server`), started on
//! loopback on free ports with a temporary data directory and killed at the
//! end of each test.

mod common;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, EtcdArbiter, Loss, Outcome};
use common::{TempDir, free_port, id};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Etcd {
    child: Child,
    endpoint: String,
    peer_port: u16,
    dir: TempDir,
}

impl Etcd {
    fn start() -> Self {
        let dir = TempDir::new("etcd");
        Self::start_in(dir, free_port(), free_port())
    }

    fn start_in(dir: TempDir, client_port: u16, peer_port: u16) -> Self {
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log = File::create(dir.path().join("etcd.log")).expect("etcd log file");
        let spawned = Command::new("etcd")
            .arg("--name=lockstep-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=lockstep-test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "the etcd tests need an `etcd` binary on PATH: install Debian's etcd-server package \
                 (apt-get install -y etcd-server)"
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        };
        let mut etcd = Self {
            child,
            endpoint: client,
            peer_port,
            dir,
        };
        etcd.wait_ready();
        etcd
    }

    fn arbiter(&self, prefix: &str) -> EtcdArbiter {
        EtcdArbiter::new(&[self.endpoint.as_str()], TIMEOUT)
            .expect("etcd arbiter")
            .with_prefix(prefix)
    }

    fn wait_ready(&mut self) {
        let probe = self.arbiter("/probe");
        let started = Instant::now();
        loop {
            if probe.read(0).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("etcd exited with {status}: {}", self.log());
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("etcd did not come up within 30 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// SIGKILLs etcd and starts it again on the same data directory.
    fn restart(mut self) -> Self {
        self.kill();
        let port = self
            .endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("client port");
        let peer = self.peer_port;
        let dir = std::mem::replace(&mut self.dir, TempDir::new("etcd-moved"));
        Self::start_in(dir, port, peer)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn etcd_exactly_one_winner_among_racing_threads() {
    let etcd = Etcd::start();
    common::exactly_one_winner(Arc::new(etcd.arbiter("/race")), 1, 16);
}

#[test]
fn etcd_stale_generation_loses_and_state_survives_a_restart() {
    let etcd = Etcd::start();
    let arbiter = etcd.arbiter("/stale");
    common::stale_generation_loses(&arbiter, 10);

    let etcd = etcd.restart();
    let arbiter = etcd.arbiter("/stale");
    let record = arbiter.read(10).expect("read").expect("record survived");
    assert_eq!((record.generation, record.primary.as_str()), (3, "b"));
    let lost = arbiter.test_and_set(10, 2, &id("b")).expect("tas");
    assert!(
        matches!(
            lost,
            Outcome::Lost {
                reason: Loss::Superseded,
                ..
            }
        ),
        "{lost:?}"
    );
}

#[test]
fn etcd_unreachable_is_an_error_within_the_timeout() {
    let timeout = Duration::from_millis(300);
    let port = free_port();
    let arbiter = EtcdArbiter::new(&[format!("127.0.0.1:{port}")], timeout).expect("arbiter");
    let err = arbiter
        .test_and_set(1, 1, &id("p"))
        .expect_err("nobody wins");
    assert!(err.is_unreachable(), "{err:?}");

    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = silent.local_addr().expect("addr").to_string();
    let arbiter = EtcdArbiter::new(&[endpoint], timeout).expect("arbiter");
    let started = Instant::now();
    let err = arbiter
        .register(1, 0, &id("p"), &id("b"))
        .expect_err("nobody wins");
    let elapsed = started.elapsed();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(
        elapsed < timeout + Duration::from_millis(500),
        "{elapsed:?}"
    );
}

/// The transaction commits but its reply is lost; the client retries it on
/// the next endpoint, where the compare now fails: the record it finds is
/// its own win, and the call must say "won", not "lost" (which would halt
/// the only replica that may go live).
#[test]
fn etcd_a_transaction_retried_on_another_member_after_a_lost_reply_still_wins() {
    let etcd = Etcd::start();
    let upstream: std::net::SocketAddr = etcd
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("etcd address");
    // register: range (connection 0), txn (1, reply dropped), then the
    // second endpoint; test_and_set: range (2), txn (3, reply dropped).
    let proxy = common::LossyProxy::start(upstream, &[1, 3]);
    let through = format!("127.0.0.1:{}", proxy.addr.port());
    let arbiter = EtcdArbiter::new(&[through.as_str(), etcd.endpoint.as_str()], TIMEOUT)
        .expect("etcd arbiter")
        .with_prefix("/lost-reply");
    let (p, b) = (id("p"), id("b"));
    let registered = arbiter.register(3, 0, &p, &b).expect("register");
    assert!(registered.is_won(), "{registered:?}");
    let won = arbiter.test_and_set(3, 1, &b).expect("test_and_set");
    assert_eq!(
        proxy.dropped.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "both transactions' replies were dropped"
    );
    let Outcome::Won(record) = won else {
        panic!("a committed transaction whose reply was lost reads as {won:?}");
    };
    assert_eq!((record.generation, record.primary.as_str()), (2, "b"));
    assert_eq!(arbiter.read(3).expect("read"), Some(record));
    // The other member still loses.
    assert!(!arbiter.test_and_set(3, 1, &p).expect("tas").is_won());
}
