//! The join request a would-be backup sends a primary's join port after the
//! channel handshake (`replica::join::read_name`, then the replica id check
//! the primary makes before it asks the arbiter). The first byte picks the
//! read size.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::MockStream;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut stream = MockStream::new(rest, usize::from(mode));
    match replica::join::read_name(&mut stream) {
        Ok(name) => {
            assert!(!name.is_empty() && name.len() <= replica::join::MAX_NAME);
            let _ = arbiter::ReplicaId::new(name);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
