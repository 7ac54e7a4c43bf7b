//! What an RDMA peer sends or writes into our memory, decoded by pure
//! functions: its 128-byte `RdmaInfo` (`PeerInfo::decode`, or a refusal
//! with a reason) and its status block (`decode_status`, keyed). Bit 0 of the
//! first byte seals the info with the key and this connection's binding
//! (playing a peer that holds the key), so the decoding behind the MAC is
//! reached; what decodes must encode back to the same bytes. Bit 2 tags the
//! status block with the status key (a peer that holds it): a tagged block
//! with a nonzero counter must decode to its own words, and any block must
//! be refused under another key.
#![no_main]
use channel::protocol::Role;
use channel::transport::rdma::{PeerInfo, STATUS_LEN, decode_status};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::{Input, hmac_sha256};

const KEY: &[u8] = b"fuzzing key, 32 bytes long......";
/// The key the peer's status blocks are tagged with.
const STATUS_KEY: [u8; 32] = *b"fuzzing status key, 32 bytes...!";

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
            &[b"lockstep-rdma-info-v3", label, &binding, &info[..96]],
        );
        info[96..].copy_from_slice(&tag);
    }
    match PeerInfo::decode(&info, KEY, role, &binding) {
        Ok(peer) => {
            let again = peer.encode(KEY, role, &binding).expect("encode");
            // Bytes 35 and 80..96 are reserved: compare the rest.
            assert_eq!(again[..35], info[..35]);
            assert_eq!(again[36..80], info[36..80]);
            // What establish checks before it allocates for the peer's
            // ring: an error or fine, never a panic; fine means usable.
            if peer.check_usable().is_ok() {
                assert!(peer.ring_bytes.is_power_of_two() && peer.ring_bytes <= 1 << 30);
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let mut block = [0u8; STATUS_LEN];
    let got = input.bytes(STATUS_LEN);
    block[..got.len()].copy_from_slice(got);
    if mode & 4 != 0 {
        let mut tag = [0u8; 16];
        blake3::Hasher::new_keyed(&STATUS_KEY)
            .update(&block[..32])
            .finalize_xof()
            .fill(&mut tag);
        block[32..].copy_from_slice(&tag);
    }
    let word = |i: usize| u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    match decode_status(&STATUS_KEY, &block) {
        Some((counter, consumed, reaped, ack)) => {
            assert_eq!(
                (counter, consumed, reaped, ack),
                (word(3), word(0), word(1), word(2))
            );
            assert!(counter > 0, "a status block with counter 0 was accepted");
        }
        None => assert!(
            mode & 4 == 0 || word(3) == 0,
            "a correctly tagged status block was refused"
        ),
    }
    let mut other = STATUS_KEY;
    other[0] ^= 1;
    if mode & 4 != 0 {
        assert!(
            decode_status(&other, &block).is_none(),
            "a status block tagged under another key was accepted"
        );
    }
});
