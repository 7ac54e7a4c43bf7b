//! Helpers shared by the arbiter's integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use arbiter::{Arbiter, Key, Loss, Outcome, ReplicaId};

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("lockstep-arbiter-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn key() -> Key {
    Key::new(b"lockstep test key: 32 bytes long").expect("key")
}

pub fn id(s: &str) -> ReplicaId {
    ReplicaId::new(s).expect("replica id")
}

/// A free loopback port (free when this returns; good enough for tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Registers a pair for `vm`, then has `threads` threads race
/// test_and_set on generation 1, candidates alternating between the primary
/// and the backup. Asserts exactly one winner and that every loser is told
/// generation 2 and the winner.
pub fn exactly_one_winner(arbiter: Arc<dyn Arbiter>, vm: u64, threads: usize) {
    let (p, b) = (id("primary"), id("backup"));
    let registered = arbiter.register(vm, 0, &p, &b).expect("register");
    assert!(registered.is_won(), "{registered:?}");

    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (arbiter, barrier) = (Arc::clone(&arbiter), Arc::clone(&barrier));
            let candidate = if i % 2 == 0 { p.clone() } else { b.clone() };
            thread::spawn(move || {
                barrier.wait();
                arbiter
                    .test_and_set(vm, 1, &candidate)
                    .expect("test_and_set")
            })
        })
        .collect();
    let outcomes: Vec<Outcome> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    // Threads of the winning replica all hear "won" (a call is idempotent
    // for its caller); exactly one replica wins, with one record.
    let mut winners: Vec<_> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Won(r) => Some(r.clone()),
            Outcome::Lost { .. } => None,
        })
        .collect();
    winners.dedup();
    assert_eq!(winners.len(), 1, "exactly one winner, got {outcomes:?}");
    let winner = &winners[0];
    assert_eq!(winner.generation, 2);
    assert_eq!(winner.backup, None);
    for o in &outcomes {
        if let Outcome::Lost { reason, current } = o {
            assert_eq!(*reason, Loss::Superseded);
            assert_eq!(current.as_ref(), Some(winner), "losers are told the winner");
        }
    }
    assert_eq!(arbiter.read(vm).expect("read").as_ref(), Some(winner));

    // Racing registrations of a new VM: one pair wins generation 1.
    let vm2 = vm + 1_000_000;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (arbiter, barrier) = (Arc::clone(&arbiter), Arc::clone(&barrier));
            thread::spawn(move || {
                barrier.wait();
                let (p, b) = (id(&format!("p{i}")), id(&format!("b{i}")));
                arbiter.register(vm2, 0, &p, &b).expect("register")
            })
        })
        .collect();
    let won = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .filter(Outcome::is_won)
        .count();
    assert_eq!(won, 1);
}

/// Stale and future generations lose; strangers lose; nothing is granted.
pub fn stale_generation_loses(arbiter: &dyn Arbiter, vm: u64) {
    let (p, b, c) = (id("p"), id("b"), id("c"));
    assert!(arbiter.register(vm, 0, &p, &b).expect("register").is_won());
    assert!(arbiter.test_and_set(vm, 1, &b).expect("tas").is_won()); // generation 2: b alone
    assert!(arbiter.register(vm, 2, &b, &c).expect("register").is_won()); // generation 3: b + c
    let stale = arbiter.test_and_set(vm, 1, &p).expect("tas");
    let Outcome::Lost {
        reason: Loss::Superseded,
        current: Some(current),
    } = stale
    else {
        panic!("a stale generation must lose: {stale:?}");
    };
    assert_eq!((current.generation, current.primary.as_str()), (3, "b"));
    // The old primary is no longer a member, even with the right generation.
    let outsider = arbiter.test_and_set(vm, 3, &p).expect("tas");
    assert!(
        matches!(
            outsider,
            Outcome::Lost {
                reason: Loss::NotMember,
                ..
            }
        ),
        "{outsider:?}"
    );
    // A generation from the future means the arbiter lost state: refused.
    let future = arbiter.test_and_set(vm, 7, &b).expect("tas");
    assert!(
        matches!(
            future,
            Outcome::Lost {
                reason: Loss::Ahead,
                ..
            }
        ),
        "{future:?}"
    );
    // An unregistered VM grants nothing.
    let unknown = arbiter.test_and_set(vm + 1, 0, &p).expect("tas");
    assert!(
        matches!(
            unknown,
            Outcome::Lost {
                reason: Loss::Unregistered,
                current: None
            }
        ),
        "{unknown:?}"
    );
    assert_eq!(
        arbiter.read(vm).expect("read").map(|r| r.generation),
        Some(3)
    );
    // A pair of one replica is a bad request, not an outcome.
    assert!(arbiter.register(vm + 2, 0, &p, &p).is_err());
}

/// A fault-injecting TCP proxy on loopback: connection `n` (counting from
/// 0) of `drop_replies` has its request forwarded to `upstream` and the
/// whole reply read from it, then the client's connection is closed
/// without a byte of that reply: the server decided, the client never
/// hears what. Every other connection is forwarded both ways.
pub struct LossyProxy {
    pub addr: std::net::SocketAddr,
    pub dropped: Arc<AtomicU32>,
}

impl LossyProxy {
    pub fn start(upstream: std::net::SocketAddr, drop_replies: &'static [u32]) -> Self {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let dropped = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&dropped);
        thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { continue };
                let drop_reply = drop_replies.contains(&u32::try_from(n).expect("few"));
                let counter = Arc::clone(&counter);
                thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(upstream) else {
                        return;
                    };
                    let (mut c_in, mut s_out) = (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    );
                    let up = thread::spawn(move || {
                        let _ = std::io::copy(&mut c_in, &mut s_out);
                        let _ = s_out.shutdown(Shutdown::Write);
                    });
                    let mut reply = Vec::new();
                    let mut server = server;
                    let mut client = client;
                    if drop_reply {
                        let _ = server.read_to_end(&mut reply);
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = client.shutdown(Shutdown::Both);
                    } else {
                        let _ = std::io::copy(&mut server, &mut client);
                        let _ = client.flush();
                        let _ = client.shutdown(Shutdown::Write);
                    }
                    let _ = up.join();
                });
            }
        });
        Self { addr, dropped }
    }
}
