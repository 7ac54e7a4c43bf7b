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
pub mod stats;
pub mod status;

/// Errors of the replication link. Every variant that stands for another
/// error keeps it as its `source`; the chain is rendered once, by the
/// `lockstep` binary.
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
    /// The channel's transport failed: connect, listen, handshake, I/O.
    #[error("replication link: {what}")]
    Transport {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: channel::transport::TransportError,
    },
    /// The channel stopped (a frame refused, the peer lost or closed).
    #[error("replication link: {what}")]
    Stopped {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: channel::endpoint::ChannelError,
    },
    /// The sender pipeline could not start.
    #[error("replication link: {what}")]
    Pipeline {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: channel::pipeline::PipelineError,
    },
    /// The authenticated handshake of a join connection failed.
    #[error("replication link: {what}")]
    Handshake {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: channel::protocol::HandshakeError,
    },
    /// The arbiter could not be asked, or failed.
    #[error("{what}")]
    Arbiter {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: arbiter::ArbiterError,
    },
    /// The host's cores could not be read (to pin the channel's threads).
    #[error("replication link set-up: cannot read the host's cores")]
    Cores(#[source] tuning::TuningError),
    /// A latency histogram could not be made.
    #[error("replication link set-up: a latency histogram")]
    Histogram(#[source] hdrhistogram::CreationError),
    /// The peer broke the protocol or refused us (a wrong pair, a bad
    /// request): what it did, in words.
    #[error("replication link: {0}")]
    Channel(String),
    /// This end cannot take the peer on now (a join while a backup is
    /// attached, a lost race): why, in words.
    #[error("replication link set-up: {0}")]
    Setup(String),
    /// The VM failed.
    #[error(transparent)]
    Vmm(#[from] vmm::VmmError),
    /// The log stream was refused.
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
}

impl ReplicaError {
    /// A transport error, saying what was being done.
    pub fn transport(
        what: impl Into<String>,
    ) -> impl FnOnce(channel::transport::TransportError) -> Self {
        let what = what.into();
        move |source| ReplicaError::Transport { what, source }
    }

    /// A channel error, saying what was being done.
    pub fn stopped(
        what: impl Into<String>,
    ) -> impl FnOnce(channel::endpoint::ChannelError) -> Self {
        let what = what.into();
        move |source| ReplicaError::Stopped { what, source }
    }

    /// An arbiter error, saying what was being done.
    pub fn arbiter(what: impl Into<String>) -> impl FnOnce(arbiter::ArbiterError) -> Self {
        let what = what.into();
        move |source| ReplicaError::Arbiter { what, source }
    }

    /// A handshake error, saying what was being done.
    pub fn handshake(
        what: impl Into<String>,
    ) -> impl FnOnce(channel::protocol::HandshakeError) -> Self {
        let what = what.into();
        move |source| ReplicaError::Handshake { what, source }
    }
}
