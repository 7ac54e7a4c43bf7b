//! Received-frames decoding: the payload of an RxFrames log entry
//! (`channel::log::decode_frames`), which the backup turns into frames it
//! writes into its guest. Whatever decodes must re-encode to the same bytes.
#![no_main]
use channel::log::{decode_frames, encode_frames};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(frames) = decode_frames(data) {
        assert_eq!(encode_frames(&frames), data);
    }
});
