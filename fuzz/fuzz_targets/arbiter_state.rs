//! The embedded arbiter's state file (`arbiter::state::decode`), which it
//! reads at start: whatever decodes must encode back to the same bytes.
//! Bit 0 of the first byte fixes the SHA-256 trailer up.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= 32 {
        let body = bytes.len() - 32;
        let digest = Sha256::digest(&bytes[..body]);
        bytes[body..].copy_from_slice(&digest);
    }
    if let Ok(registry) = arbiter::state::decode(&bytes) {
        assert_eq!(
            arbiter::state::encode(&registry),
            bytes,
            "state does not re-encode"
        );
    }
});
