//! The guest programs lockstep runs, embedded as ELF images at build time.
//!
//! | name | what it does |
//! |---|---|
//! | `fold`  | reads clock, entropy and the input stream and folds them into 256 KiB of state; the record/replay workload |
//! | `rdtsc` | `fold` plus the host TSC: deliberately non-deterministic, replay must report divergence |
//! | `exits` | `arg` clock reads in a tight loop: the exit-cost benchmark |
//! | `net`   | virtio-net + smoltcp: TCP echo (7), sink (5001), source (5002), Redis-protocol KV store (6379) |
//! | `scribble` | writes pages all over memory between exits, and has the VMM fill others: the state-transfer (clone) workload |
//! | `bulk` | 1 MiB entropy fills and 1 MiB input reads: the largest log entries a guest can cause |
//!
//! The programs themselves live in `guest/` (a `#![no_std]` crate outside the
//! workspace); `build.rs` builds them with their own linker script.

pub mod choice;

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// Looks up an embedded guest image by name.
pub fn image(name: &str) -> Option<&'static [u8]> {
    IMAGES
        .iter()
        .find(|(image_name, _)| *image_name == name)
        .map(|(_, bytes)| *bytes)
}

/// Names of the embedded guests, for help texts and error messages.
pub fn names() -> impl Iterator<Item = &'static str> {
    IMAGES.iter().map(|(name, _)| *name)
}

/// A 64-bit identity of an image (xxh3 of its bytes): logs record it so a
/// log is never replayed against another image.
pub fn image_id(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_elf_image() {
        assert_eq!(names().count(), 7);
        for (name, bytes) in IMAGES {
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is not an ELF image");
        }
    }

    #[test]
    fn images_have_distinct_ids() {
        let fold = image_id(image("fold").expect("fold is embedded"));
        let rdtsc = image_id(image("rdtsc").expect("rdtsc is embedded"));
        assert_ne!(fold, rdtsc);
    }
}
