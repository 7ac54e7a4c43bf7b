//! The etcd client against a hostile fake etcd on loopback: a chunk size of
//! ffffffffffffffff, lengths of 2^32 and 2^64-1, garbage, a body larger
//! than any answer, and silence. Each call must end with a clear error
//! within its timeout (never a panic, never "won"), and a real-looking
//! answer afterwards is still understood.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, EtcdArbiter};

/// Answers each connection with the next canned response (after reading
/// the request's head); `None` says nothing and holds the connection.
fn fake_etcd(responses: Vec<Option<Vec<u8>>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for (stream, response) in listener.incoming().zip(responses) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = stream.read(&mut buf);
            match response {
                Some(bytes) => {
                    let _ = stream.write_all(&bytes);
                }
                None => held.push(stream),
            }
        }
    });
    addr.to_string()
}

#[test]
fn hostile_etcd_answers_are_clear_errors_never_panics() {
    let huge = {
        let mut r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n".to_vec();
        r.extend(std::iter::repeat_n(b'7', 3 << 20));
        r
    };
    let cases: Vec<(&str, Option<Vec<u8>>)> = vec![
        (
            "chunk size 2^64-1",
            Some(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab\r\n0\r\n\r\n".to_vec()),
        ),
        (
            "chunk size 2^32",
            Some(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000000\r\nab\r\n".to_vec()),
        ),
        (
            "Content-Length 2^64-1",
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n{}".to_vec()),
        ),
        ("garbage", Some(b"\x00\xff garbage, not HTTP at all".to_vec())),
        (
            "not JSON",
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{{{{{".to_vec()),
        ),
        (
            "a record that is not ours",
            Some(b"HTTP/1.1 200 OK\r\nContent-Length: 66\r\n\r\n{\"kvs\":[{\"value\":\"bm90IGEgcmVjb3Jk\",\"mod_revision\":\"1\"}]}       ".to_vec()),
        ),
        ("a body larger than any answer", Some(huge)),
        ("silence", None),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let endpoint = fake_etcd(cases.into_iter().map(|(_, r)| r).collect());
    let timeout = Duration::from_secs(2);
    let etcd = EtcdArbiter::new(&[endpoint.as_str()], timeout).expect("endpoint");
    for name in names {
        let started = Instant::now();
        let result = etcd.read(1);
        assert!(result.is_err(), "{name}: {result:?}");
        let message = arbiter::error_chain(&result.expect_err("error"));
        assert!(message.contains("etcd"), "{name}: {message}");
        assert!(
            started.elapsed() < timeout + Duration::from_secs(2),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
    // A well-formed answer from the same kind of server is understood.
    let ok = fake_etcd(vec![Some(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
    )]);
    let etcd = EtcdArbiter::new(&[ok.as_str()], timeout).expect("endpoint");
    assert_eq!(etcd.read(1).expect("an empty range"), None);
}
