//! The replicas' disk options, as a plain struct the binary fills from its
//! flags (`--disk FILE --disk-mode local`) and hands to each replica.
//!
//! # Local disks (the only mode built so far)
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
//! image's hash checked at the hand-over). Not built yet (issue 19):
//! shared-disk mode.

use std::path::PathBuf;
use std::str::FromStr;

use vmm::block::Disk;
use vmm::events::EventSource;
use vmm::{Machine, VmmError};

/// How the pair's disks relate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskMode {
    /// Each replica has its own identical copy (the default on one host).
    #[default]
    Local,
}

impl FromStr for DiskMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "local" => Ok(Self::Local),
            "shared" => Err(
                "--disk-mode shared is not built yet (issue 19): use local, each replica with its own copy of the image".into(),
            ),
            other => Err(format!(
                "unknown disk mode '{other}': the modes are local (and, later, shared)"
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
    /// the 50 ms peer timeout), then give it to [`Self::attach`].
    pub fn open(&self) -> Result<Disk, VmmError> {
        Disk::open(&self.path, false, Some(self.create_bytes))?.identify()
    }

    /// Gives the disk (from [`Self::open`]) to `machine`, which logs or
    /// checks its identity.
    pub fn attach<E: EventSource>(
        disk: Option<Disk>,
        machine: &mut Machine<E>,
    ) -> Result<(), VmmError> {
        match disk {
            Some(disk) => machine.attach_disk(disk),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_shared_says_it_is_not_built() {
        assert_eq!("local".parse::<DiskMode>(), Ok(DiskMode::Local));
        let shared = "shared".parse::<DiskMode>().expect_err("not built");
        assert!(shared.contains("not built yet"), "{shared}");
        assert!("nfs".parse::<DiskMode>().is_err());
    }
}
