//! What an RDMA peer sends or writes into our memory, decoded by pure
//! functions: its 128-byte `RdmaInfo` (`PeerInfo::decode`, or a refusal
//! with a reason) and its status block (`decode_status`). Bit 0 of the
//! first byte seals the info with the key and this connection's binding
//! (playing a peer that holds the key), so the decoding behind the MAC is
//! reached; what decodes must encode back to the same bytes.
#![no_main]
use channel::protocol::Role;
use channel::transport::rdma::{PeerInfo, decode_status};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{Input, hmac_sha256};

const KEY: &[u8] = b"fuzzing key, 32 bytes long......";

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mode = input.u8();
    let role = if mode & 2 == 0 {
        Role::Primary
    } else {
        Role::Backup
    };
    let binding = [0x5au8; 64];
    let mut info = [0u8; 128];
    let got = input.bytes(128);
    info[..got.len()].copy_from_slice(got);
    if mode & 1 != 0 {
        let label: &[u8] = if role == Role::Primary { b"P" } else { b"B" };
        let tag = hmac_sha256(
            KEY,
            &[b"lockstep-rdma-info-v2", label, &binding, &info[..96]],
        );
        info[96..].copy_from_slice(&tag);
    }
    match PeerInfo::decode(&info, KEY, role, &binding) {
        Ok(peer) => {
            let again = peer.encode(KEY, role, &binding).expect("encode");
            // Bytes 35 and 80..96 are reserved: compare the rest.
            assert_eq!(again[..35], info[..35]);
            assert_eq!(again[36..80], info[36..80]);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let words = [input.u64(), input.u64(), input.u64(), input.u64()];
    let _ = decode_status(words);
});
