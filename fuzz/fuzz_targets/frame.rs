//! Channel frames and the batch entries inside them, as a peer (or anyone
//! on the path) sends them: `channel::protocol::{frame_len, decode_frame,
//! batch_entries}`. The first byte picks a mode: bit 0 fixes the crc32c up
//! (so the fuzzer explores what lies behind it), bit 1 decodes at the
//! frame's own generation (so the generation check passes).
#![no_main]
use channel::protocol::{FRAME_HEADER_LEN, batch_entries, decode_frame, frame_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 && bytes.len() >= FRAME_HEADER_LEN {
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let end = (FRAME_HEADER_LEN + len).min(bytes.len());
        let crc =
            crc32c::crc32c_append(crc32c::crc32c(&bytes[..28]), &bytes[FRAME_HEADER_LEN..end]);
        bytes[28..32].copy_from_slice(&crc.to_le_bytes());
    }
    let generation = if mode & 2 != 0 && bytes.len() >= 16 {
        u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]))
    } else {
        1
    };
    // A stream transport cuts frames by this length: it must not overflow.
    if let Some(len) = frame_len(&bytes) {
        assert!(len >= FRAME_HEADER_LEN);
    }
    if let Ok(frame) = decode_frame(&bytes, generation, 1) {
        let mut total = 0usize;
        for entry in batch_entries(&frame) {
            match entry {
                Ok((_seq, entry)) => total += entry.len(),
                Err(_) => break,
            }
        }
        assert!(total <= frame.payload.len());
    }
});
