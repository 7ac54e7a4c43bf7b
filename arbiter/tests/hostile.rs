//! Hostile peers at the embedded arbiter, over real loopback sockets: many
//! slow connections that drip a byte now and then, silent connections, and
//! a wrong protocol, all at once, while a client holding the key must still
//! be served at every call.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::server;
use arbiter::{Arbiter, EmbeddedArbiter};
use common::{TempDir, id, key};

/// 100 connections drip the start of a request, one byte every 3 s (the
/// old per-read timeout was 5 s, so each could hold a slot forever), plus
/// 20 that send nothing and one speaking HTTP. A legitimate client's calls
/// all succeed meanwhile, and every slow connection is cut off by the
/// request deadline.
#[test]
fn slow_and_silent_peers_cannot_lock_a_legitimate_client_out() {
    let dir = TempDir::new("dos");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = server::spawn(listener, &dir.path().join("state"), key()).expect("server");
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let mut drippers = Vec::new();
    for i in 0..100 {
        let stop = Arc::clone(&stop);
        drippers.push(thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return None;
            };
            let started = Instant::now();
            let request = b"LSAR\x00\x01\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00";
            let mut at = 0;
            // Drip until the server closes the connection (or the test ends).
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(20) {
                if s.write_all(&request[at % request.len()..][..1]).is_err() {
                    return Some(started.elapsed());
                }
                at += 1;
                s.set_read_timeout(Some(Duration::from_millis(if i % 2 == 0 {
                    3000
                } else {
                    2900
                })))
                .expect("timeout");
                let mut b = [0u8; 64];
                match s.read(&mut b) {
                    Ok(_) => return Some(started.elapsed()), // answered or closed
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Some(started.elapsed()),
                }
            }
            None
        }));
    }
    let silent: Vec<TcpStream> = (0..20)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let mut http = TcpStream::connect(addr).expect("connect");
    http.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("send");
    thread::sleep(Duration::from_millis(300));

    let client = EmbeddedArbiter::connect(addr, key(), Duration::from_secs(2)).expect("client");
    let (p, b) = (id("p"), id("b"));
    let registered = client.register(1, 0, &p, &b);
    assert!(
        matches!(&registered, Ok(o) if o.is_won()),
        "a legitimate register while 120 hostile connections are open: {registered:?}"
    );
    for n in 0..10 {
        let read = client.read(1);
        assert!(
            matches!(&read, Ok(Some(r)) if r.generation == 1),
            "legitimate read {n}: {read:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let won = client.test_and_set(1, 1, &b);
    assert!(matches!(&won, Ok(o) if o.is_won()), "{won:?}");

    // The wrong protocol was answered (bad magic) and closed.
    let mut reply = Vec::new();
    http.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = http.read_to_end(&mut reply);
    assert!(reply.starts_with(b"LSAR"), "{reply:?}");

    // Every dripping connection is cut off: evicted, or at the deadline.
    for d in drippers {
        let cut = d.join().expect("dripper");
        assert!(
            cut.is_some(),
            "a dripping connection was still open after 20 s"
        );
    }
    stop.store(true, Ordering::SeqCst);
    drop(silent);
    assert!(
        server.stats().evicted.load(Ordering::Relaxed) > 0,
        "more than MAX_PENDING waited, so some were evicted"
    );
}
