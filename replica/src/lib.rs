//! The primary and backup roles and the link between them.
//!
//! # The link
//!
//! The log travels over the logging channel (`channel`): io_uring TCP
//! between hosts, or shared memory on one host. Both ends run the
//! authenticated handshake (pre-shared key, VM id, generation: a primary of
//! an older generation is refused before it sends a byte of log), and every
//! batch carries the generation, a sequence number and a crc32c.
//!
//! Channel entry 1 is the log's 80-byte file header (`channel::log`); entry
//! `n + 1` is log entry `n`, encoded exactly as in a log file (its own
//! header and crc). The primary streams entries as the guest produces them;
//! at every sync point (the guest produced output, or is about to wait) the
//! log holds a Progress mark for the exit it stands at, so the backup is
//! never starved.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as primary
//!     participant B as backup
//!     P->>B: handshake (HMAC, VM id, generation g)
//!     P->>B: batch{seq 1: log header}
//!     loop as the guest runs
//!         P->>B: batch{seq s.., entries …, Progress(exit N)}
//!         B-->>P: ack(seq)   (on drain, every 64 entries, or after 20 µs)
//!         Note over P: output gate releases every frame produced at ≤ seq - 1
//!         P-->B: heartbeats both ways when idle
//!     end
//!     P->>B: End record (with the final digest)
//! ```
//!
//! The backup acks on *receipt*, before it replays (the Output Rule needs
//! only that the backup *can* reproduce the output). Liveness is the stream
//! itself plus heartbeats: either end that hears nothing for the peer
//! timeout counts the other as lost (see [`failover`]).

pub mod backup;
pub mod command;
pub mod disk;
pub mod failover;
pub mod join;
pub mod keys;
pub mod link;
pub mod local;
pub mod metrics;
pub mod network;
pub mod pair;
pub mod primary;
pub mod promotion;
pub mod ratelimit;
pub mod relay;
pub mod status;

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
    /// The channel failed or refused the peer (handshake, frames, liveness).
    #[error("replication link: {0}")]
    Channel(String),
    /// Setting up this end failed.
    #[error("replication link set-up: {0}")]
    Setup(String),
    /// The VM failed.
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// The log stream was refused.
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
}
