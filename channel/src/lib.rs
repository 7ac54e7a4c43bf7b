//! The logging channel: how non-deterministic events travel from the primary
//! to the backup.
//!
//! - [`log`]: the binary format of log entries and log files (what travels).

pub mod log;
