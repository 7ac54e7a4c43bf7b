//! The guest's RESP2 parser and store (`guest/src/resp.rs`, a `no_std`
//! file included here as it is), fed a client's byte stream: commands are
//! parsed off the front of the buffer and executed until it is used up,
//! incomplete or refused, as the guest's connection loop does.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../guest/src/resp.rs"]
#[allow(dead_code, clippy::all)]
mod resp;

fuzz_target!(|data: &[u8]| {
    let mut store = resp::Store::default();
    let mut buf = data;
    let mut out = Vec::new();
    for _ in 0..1024 {
        match resp::parse(buf) {
            resp::Parsed::Incomplete => break,
            resp::Parsed::Error(_) => break,
            resp::Parsed::Command(args, used) => {
                assert!(
                    used > 0 && used <= buf.len(),
                    "parser used {used} of {} bytes",
                    buf.len()
                );
                buf = &buf[used..];
                if store.execute(&args, &mut out) == resp::After::Close {
                    break;
                }
            }
        }
    }
});
