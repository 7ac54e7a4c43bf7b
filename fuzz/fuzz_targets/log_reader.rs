//! A log file or replication stream read through `channel::log::LogReader`
//! (the header via `LogMeta::from_header_bytes`, then every entry) from a
//! reader that hands out the bytes in pieces. Bit 0 of the first byte fixes
//! the header's crc32c up; the other bits pick the piece size.
#![no_main]
use channel::log::{FILE_HEADER_LEN, LogMeta, LogReader};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::MockStream;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= FILE_HEADER_LEN {
        let crc = crc32c::crc32c(&bytes[..FILE_HEADER_LEN - 4]);
        bytes[FILE_HEADER_LEN - 4..FILE_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    if let Ok(meta) = LogMeta::from_header_bytes(&bytes) {
        // What a replica re-sends as the stream's first entry must decode to
        // the same values (the name is kept lossily, as UTF-8 of 20 bytes).
        let again = LogMeta::from_header_bytes(&meta.header_bytes());
        let again = again.as_ref().map(|m| {
            (
                m.image_id,
                m.mem_size,
                m.guest_arg,
                m.digest_interval,
                m.vm_flags,
            )
        });
        let want = (
            meta.image_id,
            meta.mem_size,
            meta.guest_arg,
            meta.digest_interval,
            meta.vm_flags,
        );
        assert_eq!(again.ok(), Some(want));
    }
    let Ok(mut reader) = LogReader::new(MockStream::new(&bytes, usize::from(mode >> 1))) else {
        return;
    };
    let mut last = reader.offset();
    while let Ok(Some(_entry)) = reader.next_entry() {
        assert!(reader.offset() > last);
        last = reader.offset();
    }
});
