//! Log entries as they arrive inside batches or sit in a log file:
//! `channel::log::decode_entry`, entry after entry, and the payload views
//! (`payload_u64`, `digest`, `rx_frames` for both kinds of received frames). Bit 0 of the
//! first byte fixes each entry's crc32c up. Every entry that decodes must
//! re-encode to exactly the bytes it came from.
#![no_main]
use channel::log::{ENTRY_HEADER_LEN, decode_entry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    let mut at = 0usize;
    let mut index = 1u64;
    while at < bytes.len() {
        if mode & 1 != 0 && bytes.len() - at >= ENTRY_HEADER_LEN {
            let e = &bytes[at..];
            let len = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as usize;
            let end = (at + ENTRY_HEADER_LEN + len.div_ceil(8) * 8).min(bytes.len());
            let crc = crc32c::crc32c(&bytes[at + 4..end]);
            bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        }
        match decode_entry(&bytes[at..], index, at as u64) {
            Ok(Some((entry, used))) => {
                assert!(used >= ENTRY_HEADER_LEN && used <= bytes.len() - at);
                let mut again = Vec::new();
                entry.encode_into(&mut again);
                assert_eq!(again, bytes[at..at + used], "re-encoding differs");
                assert_eq!(entry.encoded_len(), used);
                let _ = entry.payload_u64();
                let _ = entry.digest();
                let _ = entry.rx_frames();
                at += used;
                index += 1;
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
});
