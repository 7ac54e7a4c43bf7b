//! A virtio-net device's saved state as a state transfer carries it
//! (`nic::virtio::VirtioNetState::from_bytes`, then `VirtioNet::restore`).
//! What parses must re-encode to the same bytes; what restores must save
//! back to the same state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nic::virtio::{VirtioNet, VirtioNetState};

fuzz_target!(|data: &[u8]| {
    let Ok(state) = VirtioNetState::from_bytes(data) else {
        return;
    };
    // Reserved bytes are not checked by the parser: compare the fields.
    assert_eq!(
        VirtioNetState::from_bytes(&state.to_bytes()).ok(),
        Some(state)
    );
    if let Ok(device) = VirtioNet::restore(&state) {
        assert_eq!(device.save(), state, "restore changed the state");
    }
});
