//! lockstep's network device: a vhost-style virtio-net NIC whose output
//! obeys the Output Rule.
//!
//! ```text
//!  TAP ──reader thread──▶ RxQueue ──(vCPU, at an exit; logged)──▶ guest RX ring
//!  guest TX ring ──(vCPU, at QueueNotify)──▶ frame @ log position L
//!       ──▶ OutputGate: held while ack < L ──(the ack's own thread, at once)──▶ TAP
//! ```
//!
//! - [`virtio`]: the device model (virtio-mmio registers, split virtqueues).
//! - [`gate`]: the output gate: a frame produced at log position L leaves only
//!   once the backup has acknowledged every entry up to L.
//! - [`tap`]: the TAP backend and the RX queue filled by its reader thread.
//!
//! `nic` knows nothing of the logging channel: it sees only log positions
//! and the ack watermark.

pub mod gate;
pub mod tap;
pub mod virtio;

/// Errors of the NIC. Messages say what and where.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    /// The guest accessed a register in a way the device does not allow.
    #[error("virtio-net register access refused: {0}")]
    Register(String),
    /// A virtqueue could not be made, restored or used.
    #[error("virtio-net queue: cannot {what}")]
    Queue {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: virtio_queue::Error,
    },
    /// Saved device state could not be restored.
    #[error("virtio-net state: {0}")]
    State(String),
    /// The TAP device could not be set up or used.
    #[error("TAP device {name}: {what}")]
    Tap {
        /// Interface name.
        name: String,
        /// What failed.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl NicError {
    /// A virtqueue error, saying what was being done.
    pub fn queue(what: impl Into<String>) -> impl FnOnce(virtio_queue::Error) -> Self {
        let what = what.into();
        move |source| NicError::Queue { what, source }
    }
}
