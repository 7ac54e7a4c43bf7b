//! The replicas' disk options, as a plain struct the binary fills from its
//! flags (`--disk FILE --disk-mode local|shared`) and hands to each replica.
//!
//! # Local disks (the default on one host)
//!
//! Each replica has its own image, and the disk is part of each VM's
//! state: both apply every write, each reads its own copy, and the log
//! carries a hash of the data each read returned (`vmm::block`). The log's
//! first entry is the primary's disk identity (size and content hash): a
//! backup whose image differs refuses to follow it before the guest runs,
//! and a disk that changes under a replica later is caught at its first
//! differing read. So the two images start as identical copies (two fresh
//! images are: a missing image is created zero-filled with
//! [`DiskOptions::create_bytes`]).
//!
//! A joining backup's image is replaced by the primary's through the state
//! transfer (`vmm::snapshot`: dirty blocks beside dirty pages; the whole
//! image's hash checked at the hand-over).
//!
//! # Shared disk (the paper's sections 3.4, 4.1–4.2)
//!
//! One image both replicas reach (on one host: the same path). Only the
//! primary touches it while the pair runs:
//!
//! - **Writes are outputs held by the Output Rule.** The primary issues a
//!   write (or flush) to the image only once the backup has acknowledged
//!   the log up to the exit that produced it, through the same gate that
//!   holds the network's frames (`nic::gate`, `vmm::block::Disk::hold_writes`).
//!   The write itself is held, not only its completion: a write on the
//!   image that the backup's execution never produced would be an output
//!   no failover could take back. A guest that waits for the completion
//!   (a flush before the reply) waits for that ack; the vCPU waits in 2 ms
//!   slices, each followed by a sync, so a lost backup is still detected.
//! - **The backup never reads or writes the image while following.** It
//!   keeps each request's buffers; the primary's `BlkDone` entries carry
//!   the data each read returned (flag `FLAG_BLK_SHARED`, split over
//!   entries of at most 2 MiB, so every entry a guest can cause fits a link
//!   frame), and the backup takes it from there (checked against the
//!   record's length and hash).
//! - **At the go-live** (the backup's first live poll of the disk) the new
//!   primary issues again every request the guest had issued whose
//!   completion the log did not carry, in issue order; from then on it
//!   owns the image. A write made twice has the same data both times, and
//!   the Output Rule guarantees no later write of the old primary reached
//!   the image (its position was never acked).
//! - **A host I/O error on the primary is fail-stop**, with the reason:
//!   the backup cannot reproduce it, so the primary stops and the backup
//!   takes over (and re-issues the request).
//! - **Identity:** both replicas hash the whole image at start (before the
//!   primary's guest runs) and the log's identity entry carries the size,
//!   the hash and the mode; the backup refuses a different mode, size or
//!   hash. A content hash is honest on one host and on real shared
//!   storage alike (device and inode numbers differ between hosts that
//!   see the same LUN); it cannot tell two identical files apart, which
//!   does no harm before the first write, and the backup never writes.
//! - **The disk digest** covers what the guest wrote (each write's offset
//!   and data hash, folded at the exit that issued it), never a read of the
//!   image: the memory digest covers what was read.
//!
//! Not built in shared mode: re-protection (`backup --join` is refused: a
//! state transfer of a shared-disk VM is not built yet), and fencing of an
//! old primary on real shared storage beyond the arbiter's generation.

use std::path::PathBuf;
use std::str::FromStr;

use std::sync::Arc;

use nic::gate::OutputGate;
use vmm::block::Disk;
use vmm::events::EventSource;
use vmm::{Machine, VmmError};

/// How the pair's disks relate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskMode {
    /// Each replica has its own identical copy (the default on one host).
    #[default]
    Local,
    /// One image both replicas reach; only the primary touches it.
    Shared,
}

impl FromStr for DiskMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "local" => Ok(Self::Local),
            "shared" => Ok(Self::Shared),
            other => Err(format!(
                "unknown disk mode '{other}': the modes are local and shared"
            )),
        }
    }
}

/// One replica's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// The image file.
    pub path: PathBuf,
    /// How the pair's disks relate.
    pub mode: DiskMode,
    /// Size of the image when it has to be created.
    pub create_bytes: u64,
}

/// Size of a disk image created because none existed: 64 MiB (sparse).
pub const DEFAULT_CREATE_BYTES: u64 = 64 << 20;

impl DiskOptions {
    /// Local-disks options for `path`, created with the default size.
    pub fn local(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            mode: DiskMode::Local,
            create_bytes: DEFAULT_CREATE_BYTES,
        }
    }

    /// Opens (or creates) the image and hashes it (its identity): call
    /// before the replication link is up (a 64 MiB hash is tens of ms of
    /// CPU; under load on two cores it starved the channel's threads past
    /// the 50 ms peer timeout), then give it to [`Self::attach`]. In
    /// shared mode a `following` replica (the backup) never touches the
    /// image after this until it goes live.
    pub fn open(&self, following: bool) -> Result<Disk, VmmError> {
        let disk = Disk::open(&self.path, false, Some(self.create_bytes))?.identify()?;
        Ok(match self.mode {
            DiskMode::Local => disk,
            DiskMode::Shared => disk.shared(following),
        })
    }

    /// Gives the disk (from [`Self::open`]) to `machine`, which logs or
    /// checks its identity. In shared mode its writes wait for `gate`'s
    /// acks (the gate that holds the network's frames).
    pub fn attach<E: EventSource>(
        disk: Option<Disk>,
        machine: &mut Machine<E>,
        gate: &Arc<OutputGate>,
    ) -> Result<(), VmmError> {
        match disk {
            Some(mut disk) => {
                disk.hold_writes(Arc::clone(gate));
                machine.attach_disk(disk)
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_an_unknown_one_is_named() {
        assert_eq!("local".parse::<DiskMode>(), Ok(DiskMode::Local));
        assert_eq!("shared".parse::<DiskMode>(), Ok(DiskMode::Shared));
        let nfs = "nfs".parse::<DiskMode>().expect_err("unknown");
        assert!(
            nfs.contains("'nfs'") && nfs.contains("local and shared"),
            "{nfs}"
        );
    }
}
