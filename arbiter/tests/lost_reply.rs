//! A lost arbiter reply: the server decided (and made it durable), but the
//! client never heard. The client's retry must recognise its own win
//! instead of reading itself as the loser and halting. Real server, real
//! sockets on loopback, a proxy that drops exactly one reply.

mod common;

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arbiter::server;
use arbiter::{Arbiter, EmbeddedArbiter, Outcome};
use common::{LossyProxy, TempDir, id, key};

#[test]
fn a_retry_after_a_lost_reply_recognises_its_own_win() {
    let dir = TempDir::new("lost-reply");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = server::spawn(listener, &dir.path().join("state"), key()).expect("server");
    // Connection 1 (the test_and_set) has its reply dropped.
    let proxy = LossyProxy::start(server.local_addr(), &[1]);
    let arbiter =
        EmbeddedArbiter::connect(proxy.addr, key(), Duration::from_secs(2)).expect("client");
    let (p, b) = (id("p"), id("b"));
    assert!(arbiter.register(9, 0, &p, &b).expect("register").is_won());

    let first = arbiter.test_and_set(9, 1, &b);
    assert!(first.is_err(), "the reply was dropped: {first:?}");
    assert_eq!(proxy.dropped.load(Ordering::SeqCst), 1);
    // What a replica does on an error: retry the same call.
    let retry = arbiter.test_and_set(9, 1, &b).expect("retry");
    let Outcome::Won(record) = retry else {
        panic!("the retry of a winning call reads as {retry:?}");
    };
    assert_eq!((record.generation, record.primary.as_str()), (2, "b"));
    assert_eq!(
        server.stats().granted.load(Ordering::Relaxed),
        2,
        "the retry stored nothing"
    );
    // The other member lost for good.
    assert!(!arbiter.test_and_set(9, 1, &p).expect("tas").is_won());
}

/// The same for a register (re-protection: a new pair).
#[test]
fn a_register_retried_after_a_lost_reply_still_wins() {
    let dir = TempDir::new("lost-register");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = server::spawn(listener, &dir.path().join("state"), key()).expect("server");
    let proxy = LossyProxy::start(server.local_addr(), &[0]);
    let arbiter =
        EmbeddedArbiter::connect(proxy.addr, key(), Duration::from_secs(2)).expect("client");
    let (p, b) = (id("p"), id("b"));
    assert!(arbiter.register(4, 0, &p, &b).is_err(), "reply dropped");
    assert!(arbiter.register(4, 0, &p, &b).expect("retry").is_won());
    assert!(
        !arbiter
            .register(4, 0, &p, &id("x"))
            .expect("other")
            .is_won()
    );
}

/// The directory fsync fails after the rename: the grant is answered
/// "storage failure" (not durable, not granted) and the server stalls, but
/// the new state is in the file. After the operator restarts the arbiter,
/// the caller's retry finds its own win there and must be told "won".
#[test]
fn a_retry_after_a_failed_directory_fsync_and_a_restart_wins() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let dir = TempDir::new("dir-fsync");
    let state = dir.path().join("state");
    let fail = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server =
        server::spawn_with_faults(listener, &state, key(), Arc::clone(&fail)).expect("server");
    let arbiter = EmbeddedArbiter::connect(addr, key(), Duration::from_secs(2)).expect("client");
    let (p, b) = (id("p"), id("b"));
    assert!(arbiter.register(2, 0, &p, &b).expect("register").is_won());
    fail.store(true, Ordering::SeqCst);
    let failed = arbiter.test_and_set(2, 1, &b);
    assert!(
        matches!(failed, Err(arbiter::ArbiterError::Storage { .. })),
        "{failed:?}"
    );
    // The operator restarts the arbiter on the same state file.
    server.shutdown();
    let listener = TcpListener::bind(addr).expect("rebind the same port");
    let _server = server::spawn(listener, &state, key()).expect("restarted server");
    let retry = arbiter.test_and_set(2, 1, &b).expect("retry");
    assert!(
        retry.is_won(),
        "the retry after a restart reads as {retry:?}"
    );
    assert!(!arbiter.test_and_set(2, 1, &p).expect("tas").is_won());
}
