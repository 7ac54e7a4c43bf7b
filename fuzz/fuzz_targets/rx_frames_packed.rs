//! Packed received-frames decoding: the payload of an RxFramesPacked log
//! entry (`channel::log::packed::decode`), which the backup turns into
//! frames it writes into its guest, each coded against the frame before
//! it. Whatever decodes must pack again and decode to the same frames.
#![no_main]
use channel::log::packed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = packed::decode(data) {
        let again = packed::encode_vec(&frames).expect("decoded frames pack");
        assert_eq!(packed::decode(&again).expect("own packing decodes"), frames);
    }
});
