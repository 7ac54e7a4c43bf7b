//! The disk's `BlkDone` log payloads, which a backup decodes before it
//! completes a virtio-blk request in its guest (`vmm::block`): the local
//! form (24-byte records: tag, length, status, hash of the read data) and
//! the shared-disk form (a count, the records, then the read data itself).
//! Bit 0 of the first byte picks the form. Whatever decodes must re-encode
//! to exactly the bytes it came from, and a shared payload's data slices
//! must tile the payload after its records.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vmm::block::{
    MAX_DATA_ENTRY, decode_completions, decode_completions_with_data, encode_completions,
    encode_completions_with_data,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Some(done) = decode_completions(payload) {
            assert_eq!(encode_completions(&done), payload, "re-encoding differs");
        }
        return;
    }
    let Some(decoded) = decode_completions_with_data(payload) else {
        return;
    };
    let records: Vec<_> = decoded.iter().map(|(c, _)| *c).collect();
    let data_of = |c: &vmm::block::Completion| {
        decoded
            .iter()
            .find(|(d, _)| d == c)
            .map_or(&[][..], |(_, bytes)| *bytes)
    };
    // Records need not be unique in hostile input; re-encode only when they
    // are, so each record's data is found by its record.
    let mut unique = records.clone();
    unique.sort_unstable_by_key(|c| (c.tag, c.len, c.status, c.hash));
    unique.dedup();
    if unique.len() == records.len() && payload.len() <= MAX_DATA_ENTRY && !records.is_empty() {
        let entries = encode_completions_with_data(&records, data_of);
        assert_eq!(entries.len(), 1, "a payload under the limit split");
        assert_eq!(entries[0], payload, "re-encoding differs");
    }
});
