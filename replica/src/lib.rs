//! The primary and backup roles and the link between them.
//!
//! # The link
//!
//! One TCP connection, opened by the primary to the backup's listening
//! address. The primary first sends a 16-byte hello (`"LKLN"`, link version
//! u32, its generation u64), so that a backup refuses a primary of an older
//! generation before it reads anything else. Then it streams the log exactly as a log file is laid out
//! (`channel::log`: the 80-byte file header, then entries, each with its own
//! crc32c) as the guest produces it, flushing at every sync point (the guest
//! produced output, or is about to wait) with a Progress mark for the exit it
//! stands at. The backup answers with cumulative acks:
//!
//! ```text
//! backup → primary, 16 bytes each, little-endian
//! offset  size  field
//! 0       4     magic   "LKAK"
//! 4       4     crc32c  over bytes 8..16
//! 8       8     seq     every entry up to this log position has been received
//! ```
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as primary
//!     participant B as backup
//!     P->>B: log header (image, memory, flags)
//!     loop as the guest runs
//!         P->>B: entries …, Progress(exit N)   (flush at a sync point)
//!         B-->>P: ack(seq)   (when its receive buffer drains, or every 64 entries)
//!         Note over P: output gate releases every frame produced at ≤ seq
//!     end
//!     P->>B: End / stop record (with the final digest)
//! ```
//!
//! The backup acks on *receipt*, before it replays (the Output Rule needs
//! only that the backup *can* reproduce the output). Acks are sent when the
//! backup's receive buffer has drained (so one ack covers a whole burst) and
//! at least every [`ACK_EVERY`] entries.
//!
//! This link is the plain-TCP form of the logging channel; the authenticated,
//! io_uring and shared-memory transports of `channel` replace it without
//! changing the roles.

pub mod backup;
pub mod failover;
pub mod primary;
pub mod relay;
pub mod status;

/// Magic of the link hello, sent by the primary before the log header.
pub const HELLO_MAGIC: [u8; 4] = *b"LKLN";
/// Version of the link protocol.
pub const LINK_VERSION: u32 = 1;
/// Size of the link hello.
pub const HELLO_LEN: usize = 16;

/// Encodes the hello: magic, version, the primary's generation.
pub fn encode_hello(generation: u64) -> [u8; HELLO_LEN] {
    let mut hello = [0u8; HELLO_LEN];
    hello[..4].copy_from_slice(&HELLO_MAGIC);
    hello[4..8].copy_from_slice(&LINK_VERSION.to_le_bytes());
    hello[8..].copy_from_slice(&generation.to_le_bytes());
    hello
}

/// Decodes a hello; returns the primary's generation.
pub fn decode_hello(hello: &[u8; HELLO_LEN]) -> Result<u64, ReplicaError> {
    if hello[..4] != HELLO_MAGIC {
        return Err(ReplicaError::Protocol(format!(
            "hello magic {:02x?}",
            &hello[..4]
        )));
    }
    let version = u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]);
    if version != LINK_VERSION {
        return Err(ReplicaError::Protocol(format!(
            "link version {version}, this build speaks {LINK_VERSION}"
        )));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&hello[8..]);
    Ok(u64::from_le_bytes(generation))
}

use std::io::Read;

/// Magic of an ack message.
pub const ACK_MAGIC: [u8; 4] = *b"LKAK";
/// Size of an ack message.
pub const ACK_LEN: usize = 16;
/// The backup acks at least this often, in entries, even mid-burst.
pub const ACK_EVERY: u64 = 64;

/// Errors of the replication link.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Connecting, accepting or socket I/O failed.
    #[error("replication link: {what}")]
    Link {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer sent something that is not this protocol.
    #[error("replication link: the peer does not speak the lockstep ack protocol: {0}")]
    Protocol(String),
    /// The VM failed.
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// The log stream was refused.
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
}

/// Encodes an ack for `seq`.
pub fn encode_ack(seq: u64) -> [u8; ACK_LEN] {
    let mut message = [0u8; ACK_LEN];
    message[..4].copy_from_slice(&ACK_MAGIC);
    message[8..].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&message[8..]);
    message[4..8].copy_from_slice(&crc.to_le_bytes());
    message
}

/// Decodes an ack, checking magic and checksum.
pub fn decode_ack(message: &[u8; ACK_LEN]) -> Result<u64, ReplicaError> {
    if message[..4] != ACK_MAGIC {
        return Err(ReplicaError::Protocol(format!(
            "ack magic {:02x?}",
            &message[..4]
        )));
    }
    let stored = u32::from_le_bytes([message[4], message[5], message[6], message[7]]);
    if stored != crc32c::crc32c(&message[8..]) {
        return Err(ReplicaError::Protocol("ack checksum mismatch".into()));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&message[8..]);
    Ok(u64::from_le_bytes(seq))
}

/// Reads exactly one ack; `Ok(None)` at a clean end of stream.
pub fn read_ack(input: &mut impl Read) -> Result<Option<u64>, ReplicaError> {
    let mut message = [0u8; ACK_LEN];
    let mut filled = 0;
    while filled < ACK_LEN {
        match input.read(&mut message[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(ReplicaError::Protocol(format!(
                    "ack cut short after {filled} bytes"
                )));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ReplicaError::Link {
                    what: "read an ack".into(),
                    source,
                });
            }
        }
    }
    decode_ack(&message).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_round_trip_and_damage_is_refused() {
        let message = encode_ack(0x1234_5678_9abc);
        assert_eq!(decode_ack(&message).expect("valid"), 0x1234_5678_9abc);
        let mut damaged = message;
        damaged[12] ^= 1;
        assert!(decode_ack(&damaged).is_err());
        let mut foreign = message;
        foreign[..4].copy_from_slice(b"HTTP");
        let error = decode_ack(&foreign).expect_err("foreign");
        assert!(error.to_string().contains("does not speak"), "{error}");
    }

    #[test]
    fn read_ack_distinguishes_clean_end_from_a_cut() {
        let message = encode_ack(7);
        assert_eq!(read_ack(&mut &message[..]).expect("ack"), Some(7));
        assert_eq!(read_ack(&mut &[][..]).expect("end"), None);
        assert!(read_ack(&mut &message[..5]).is_err());
    }
}
