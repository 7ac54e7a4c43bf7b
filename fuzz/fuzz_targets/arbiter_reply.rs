//! A reply as an arbiter client reads it (`arbiter::protocol::read_reply`),
//! from the arbiter or from whoever answers in its place. Bit 0 of the
//! first byte seals the bytes with the key (see `arbiter_request`).
#![no_main]
use arbiter::Key;
use arbiter::protocol::{MAC_LEN, REPLY_HEADER_LEN, encode_reply, read_reply};
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
    if mode & 1 != 0 && bytes.len() >= REPLY_HEADER_LEN {
        let ids =
            (usize::from(bytes[10]) + usize::from(bytes[11])).min(bytes.len() - REPLY_HEADER_LEN);
        let signed = REPLY_HEADER_LEN + ids;
        let tag = hmac_sha256(KEY, &[b"lockstep-arbiter reply v1", &bytes[..signed]]);
        bytes.truncate(signed);
        bytes.extend_from_slice(&tag[..MAC_LEN]);
    }
    let mut stream = MockStream::new(&bytes, usize::from(mode >> 1));
    match read_reply(&mut stream, &key) {
        Ok(reply) => {
            // An accepted reply re-encodes to one that reads back the same.
            let again = encode_reply(&key, reply.status, &reply.nonce, reply.answer.as_ref());
            let back = read_reply(&mut &again[..], &key).expect("our own reply reads back");
            assert_eq!(back.answer, reply.answer);
            assert_eq!(back.status, reply.status);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
