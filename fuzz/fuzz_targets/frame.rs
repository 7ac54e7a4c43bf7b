//! Channel frames and the batch entries inside them, as a peer (or anyone
//! on the path) sends them: `channel::protocol::{frame_len, decode_frame,
//! batch_entries}`, opened with `FrameKeys::for_tests()` as the backup opens
//! the primary's frames. The first byte picks a mode: bit 0 tags the frame
//! with the primary's key (playing a peer that holds it, so the fuzzer
//! explores what lies behind the tag), bit 1 decodes at the frame's own
//! generation (so the generation check passes). A frame must never be
//! accepted twice by one opener (replay).
#![no_main]
use channel::protocol::{
    FRAME_HEADER_LEN, FrameKeys, Role, batch_entries, decode_frame, frame_len,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    let keys = FrameKeys::for_tests();
    if mode & 1 != 0 {
        keys.retag_for_fuzzing(Role::Primary, &mut bytes);
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
    let mut opener = keys.opener(Role::Backup);
    if let Ok(frame) = decode_frame(&bytes, generation, 1, &mut opener) {
        let mut total = 0usize;
        for entry in batch_entries(&frame) {
            match entry {
                Ok((_seq, entry)) => total += entry.len(),
                Err(_) => break,
            }
        }
        assert!(total <= frame.payload.len());
        assert!(
            decode_frame(&bytes, generation, 1, &mut opener).is_err(),
            "a frame was accepted twice"
        );
    }
});
