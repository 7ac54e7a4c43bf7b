//! The guest's Redis store (the `guest-redis` crate: RESP2 parser, data
//! types, command table), fed a client's byte stream as its connection loop
//! does: `resp::parse` off the front of the buffer (a request must use at
//! least one byte and no more than there are), and `Server::serve` on the
//! stream cut in two pieces where the first byte says (it must never use
//! more than it was given, and closes only after a reply or an error).
#![no_main]
use guest_redis::resp::{Parsed, parse};
use guest_redis::{After, Config, Server};
use libfuzzer_sys::fuzz_target;

fn used_memory() -> usize {
    0
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut buf = stream;
    for _ in 0..1024 {
        match parse(buf) {
            Parsed::Incomplete | Parsed::Error(_) => break,
            Parsed::Request(_, used) | Parsed::OutOfMemory(used) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "parser used {used} of {} bytes",
                    buf.len()
                );
                buf = &buf[used..];
            }
        }
    }
    let mut server = Server::new(
        Config {
            maxmemory: 1 << 20,
            used_memory,
            maxclients: 4,
            port: 6379,
            seed: 42,
        },
        0,
    );
    let mut client = server.connect(0);
    let mut out = Vec::new();
    let mut at = 0;
    let half = stream.len() * usize::from(cut) / 255;
    for end in [half, stream.len()] {
        let (used, after) = server.serve(&mut client, &stream[at..end], 0, &mut out, 1 << 20);
        assert!(at + used <= end, "served {used} bytes of {}", end - at);
        at += used;
        if after == After::Close {
            break;
        }
    }
    server.disconnect(client);
});
