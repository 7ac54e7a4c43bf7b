//! A TCP relay for the replication link that can be cut: afterwards it
//! forwards nothing in either direction and closes nothing. That is a
//! partition, not a crash: neither side gets a reset, each must notice the
//! silence. Used by `lockstep chaos` and the partition tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A relay for one connection to `target`.
pub struct Relay {
    address: String,
    cut: Arc<AtomicBool>,
}

impl Relay {
    /// Listens on a free loopback port and relays the first connection to
    /// `target` (retrying for up to 10 s while the target starts).
    pub fn start(target: String) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let address = listener.local_addr()?.to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let relay_cut = Arc::clone(&cut);
        thread::spawn(move || {
            let Ok((inbound, _)) = listener.accept() else {
                return;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let outbound = loop {
                match TcpStream::connect(&target) {
                    Ok(stream) => break stream,
                    Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                    Err(_) => return,
                }
            };
            let (Ok(inbound_copy), Ok(outbound_copy)) = (inbound.try_clone(), outbound.try_clone())
            else {
                return;
            };
            for (mut from, mut to) in [(inbound_copy, outbound_copy), (outbound, inbound)] {
                let cut = Arc::clone(&relay_cut);
                thread::spawn(move || {
                    let mut buffer = vec![0u8; 1 << 16];
                    while let Ok(n) = from.read(&mut buffer) {
                        if n == 0
                            || (!cut.load(Ordering::SeqCst) && to.write_all(&buffer[..n]).is_err())
                        {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Self { address, cut })
    }

    /// Where to connect instead of the target.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Partitions the link from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_until_cut_then_stays_silent() {
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = server.local_addr().expect("addr").to_string();
        let relay = Relay::start(target).expect("relay");
        let mut client = TcpStream::connect(relay.address()).expect("connect");
        let (mut accepted, _) = server.accept().expect("accept");
        client.write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        accepted.read_exact(&mut got).expect("relayed");
        assert_eq!(&got, b"ping");
        relay.cut();
        client.write_all(b"lost").expect("write after the cut");
        accepted
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert!(
            accepted.read(&mut got).is_err(),
            "nothing crosses a cut relay, and nothing closes"
        );
    }
}
