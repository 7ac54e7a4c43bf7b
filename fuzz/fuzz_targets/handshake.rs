//! The channel handshake (`channel::protocol::handshake`) against a peer
//! whose every message is the fuzzer's bytes, for both roles. The peer
//! cannot forge the HMAC proof (our nonce is random), so this covers every
//! check before it and the handling of verdicts, truncation and garbage.
#![no_main]
use channel::protocol::{PROTOCOL_VERSION, Role, Session, handshake};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::MockStream;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let session = Session {
        role: if mode & 1 == 0 {
            Role::Primary
        } else {
            Role::Backup
        },
        vm_id: 7,
        generation: 3,
        key: b"fuzzing key, 32 bytes long......".to_vec(),
    };
    let mut stream = MockStream::new(rest, usize::from(mode >> 1));
    if handshake(&mut stream, &session, PROTOCOL_VERSION).is_ok() {
        panic!("a handshake succeeded without the key");
    }
});
