//! The vCPU state inside a state stream (`vmm::state::decode_vcpu_state`):
//! KVM's register structures as raw bytes, MSRs and the XSAVE area, the
//! payload a primary sends a joining backup.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = vmm::state::decode_vcpu_state(data) {
        let _ = e.to_string();
    }
});
