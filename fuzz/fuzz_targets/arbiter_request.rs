//! A request as the embedded arbiter's server reads it from any process
//! that connects (`arbiter::protocol::read_request`). With bit 0 of the
//! first byte set the harness seals the bytes with the key (the HMAC of the
//! protocol docs), playing a client that holds the key but sends garbage,
//! so the parsing behind the MAC is fuzzed too. The other bits pick the
//! read size.
#![no_main]
use arbiter::Key;
use arbiter::protocol::{MAC_LEN, REQUEST_HEADER_LEN, read_request};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{MockStream, hmac_sha256};

const KEY: &[u8] = b"fuzzing key, 32 bytes long......";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(key) = Key::new(KEY) else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= REQUEST_HEADER_LEN {
        let ids =
            (usize::from(bytes[7]) + usize::from(bytes[8])).min(bytes.len() - REQUEST_HEADER_LEN);
        let signed = REQUEST_HEADER_LEN + ids;
        let tag = hmac_sha256(KEY, &[b"lockstep-arbiter request v1", &bytes[..signed]]);
        bytes.truncate(signed);
        bytes.extend_from_slice(&tag[..MAC_LEN]);
    }
    let mut stream = MockStream::new(&bytes, usize::from(mode >> 1));
    if let Err(rejection) = read_request(&mut stream, &key) {
        let _ = rejection.error.to_string();
    }
});
