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
    /// RDMA (reliable-connected queue pairs; set up over TCP at `HOST:PORT`):
    /// needs a build with the `rdma` feature and an RDMA device, see
    /// [`LinkSettings::usable`].
    Rdma,
}

impl TransportKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        }
    }
}

impl FromStr for TransportKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "tcp" | "uring-tcp" => Ok(Self::Tcp),
            "shm" => Ok(Self::Shm),
            "rdma" => Ok(Self::Rdma),
            other => Err(format!(
                "unknown transport `{other}` (expected tcp, shm or rdma)"
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

    /// These settings with a transport this build and host can use: `rdma`
    /// without the `rdma` feature or without a device falls back to
    /// io_uring TCP (same addresses), and says so.
    pub fn usable(mut self) -> Self {
        if self.kind == TransportKind::Rdma
            && let Err(why) = rdma_available()
        {
            tracing::info!("lockstep: {why}; falling back to io_uring TCP");
            self.kind = TransportKind::Tcp;
        }
        self
    }

    /// The RDMA settings (device, GID, MTU, ack mode from the
    /// `LOCKSTEP_RDMA_*` environment), with frames as large as a batch.
    #[cfg(feature = "rdma")]
    pub fn rdma_config(
        &self,
    ) -> Result<channel::transport::rdma::RdmaConfig, channel::transport::TransportError> {
        channel::transport::rdma::RdmaConfig::from_env(
            self.profile.batch.max_bytes as usize + channel::protocol::FRAME_HEADER_LEN + 4096,
        )
    }

    /// The unix socket path of the shared-memory transport.
    pub fn shm_path(address: &str) -> PathBuf {
        PathBuf::from(address)
    }
}

/// Whether the RDMA transport can run here; the reason if not.
pub fn rdma_available() -> Result<(), String> {
    #[cfg(feature = "rdma")]
    {
        match channel::transport::rdma::probe() {
            Ok(devices) if !devices.is_empty() => Ok(()),
            Ok(_) => Err("no RDMA device found".into()),
            Err(error) => Err(arbiter::error_chain(&error)),
        }
    }
    #[cfg(not(feature = "rdma"))]
    {
        Err("this build has no RDMA support (build with --features rdma)".into())
    }
}
