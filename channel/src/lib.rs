//! The logging channel: how non-deterministic events travel from the primary
//! to the backup.
//!
//! - [`log`]: the binary format of log entries and log files (what travels).
//! - [`ring`]: the SPSC lock-free ring between the vCPU and the sender.
//! - [`protocol`]: handshake, frames, batches, acks (the wire format).
//! - [`transport`]: io_uring TCP and shared memory, behind one trait.
//! - [`endpoint`]: the sender and receiver state machines (batches, acks, heartbeats).
//! - [`pipeline`]: the pinned sender thread between the vCPU's ring and the transport.
//! - [`bench`]: the channel benchmark behind `lockstep bench channel`.
//! - [`testkit`]: verifiable entries and whole primary/backup runs (tests, bench, `channel-peer`).

pub mod bench;
pub mod endpoint;
mod ghash;
pub mod log;
pub mod pipeline;
pub mod protocol;
pub mod ring;
pub mod testkit;
pub mod transport;

/// Renders an error and its chain of causes on one line, `a: b: c`: the
/// one renderer of the workspace (`arbiter`, `testkit` and the binary use
/// it).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
