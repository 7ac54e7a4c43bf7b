//! How the two replicas reach each other: which transport of `channel`
//! carries the log, with which key and tuning.

use std::path::PathBuf;
use std::str::FromStr;

use channel::protocol::{Role, Session};
pub use tuning::Profile;

/// Largest channel frame: a batch of log entries (a received-frames entry
/// can carry a few dozen 1.5 KiB frames, so leave room for several).
pub const MAX_FRAME: usize = 4 << 20;
/// Each direction's ring of the shared-memory transport.
pub const SHM_RING_BYTES: usize = 16 << 20;

/// The transport that carries the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// io_uring TCP: the address is `HOST:PORT`.
    Tcp,
    /// Shared memory (both replicas on one host): the address is the path of
    /// the unix socket the backup listens on.
    Shm,
}

impl TransportKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
        }
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "tcp" | "uring-tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "rdma" => Err(
                "transport `rdma` needs a build with the `rdma` feature and an RDMA device; use tcp"
                    .into(),
            ),
            other => Err(format!(
                "unknown transport `{other}` (expected tcp or shm)"
            )),
        }
    }
}

/// Everything both ends must agree on, but the generation (which comes from
/// the arbiter at connection time).
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// The transport.
    pub kind: TransportKind,
    /// The pre-shared key both ends prove in the handshake.
    pub key: Vec<u8>,
    /// The VM's identity (both ends must name the same VM).
    pub vm_id: u64,
    /// Batching, acks, polling and liveness (the peer timeout).
    pub profile: Profile,
}

impl LinkSettings {
    /// The handshake identity of one end.
    pub fn session(&self, role: Role, generation: u64) -> Session {
        Session {
            vm_id: self.vm_id,
            generation,
            role,
            key: self.key.clone(),
        }
    }

    /// The unix socket path of the shared-memory transport.
    pub fn shm_path(address: &str) -> PathBuf {
        PathBuf::from(address)
    }
}

/// A channel error with all its causes, on one line.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
}
