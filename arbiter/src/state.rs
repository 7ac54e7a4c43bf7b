//! The embedded arbiter's durable state: one file holding every VM's record.
//!
//! A grant is written with [`store`] before the server answers it: the new
//! state goes to `<file>.tmp`, which is fsync'ed, renamed over the file, and
//! the directory is fsync'ed so the rename itself survives a power cut. The
//! file is therefore always either the old state or the new one, never a mix,
//! and a generation the server announced is on disk.
//!
//! ```text
//! +--------+------+------------------------------------------------+
//! | offset | size | field                                          |
//! +--------+------+------------------------------------------------+
//! |      0 |    8 | magic "LSARSTAT"                               |
//! |      8 |    4 | format version (1)                             |
//! |     12 |    4 | N: number of records                           |
//! |     16 |    . | N records, by increasing vm id:                |
//! |        |    8 |   vm id                                        |
//! |        |    8 |   generation                                   |
//! |        |    1 |   P: length of the primary (1..=64)            |
//! |        |    1 |   B: length of the backup (0: none)            |
//! |        |    P |   primary                                      |
//! |        |    B |   backup                                       |
//! |    end |   32 | SHA-256 of every preceding byte                |
//! +--------+------+------------------------------------------------+
//! ```
//!
//! Integers are big-endian. A file that fails any check is refused whole:
//! the server then does not start, because starting empty could grant a
//! generation twice.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::model::{Registry, ReplicaId, VmRecord};

const MAGIC: [u8; 8] = *b"LSARSTAT";
const FORMAT_VERSION: u32 = 1;
const DIGEST_LEN: usize = 32;

/// The state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file system call failed.
    #[error("cannot {action} the arbiter state file {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file's contents are wrong.
    #[error("the arbiter state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Serialises a registry.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    let count = u32::try_from(registry.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (vm, r) in registry.iter() {
        out.extend_from_slice(&vm.to_be_bytes());
        out.extend_from_slice(&r.generation.to_be_bytes());
        let backup = r.backup.as_ref().map_or(&[][..], |b| b.as_bytes());
        // Replica ids are at most 64 bytes.
        out.push(u8::try_from(r.primary.as_bytes().len()).unwrap_or(u8::MAX));
        out.push(u8::try_from(backup.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(r.primary.as_bytes());
        out.extend_from_slice(backup);
    }
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Parses a state file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Registry, &'static str> {
    if bytes.len() < 16 + DIGEST_LEN {
        return Err("too short");
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_LEN);
    if Sha256::digest(body).as_slice() != digest {
        return Err("checksum mismatch");
    }
    let mut cur = Cursor(body);
    if cur.take(8)? != MAGIC {
        return Err("bad magic");
    }
    if cur.u32()? != FORMAT_VERSION {
        return Err("unknown format version");
    }
    let count = cur.u32()?;
    let mut registry = Registry::new();
    let mut previous = None;
    for _ in 0..count {
        let vm = cur.u64()?;
        if previous.is_some_and(|p| p >= vm) {
            return Err("records out of order");
        }
        previous = Some(vm);
        let generation = cur.u64()?;
        let (lp, lb) = (usize::from(cur.u8()?), usize::from(cur.u8()?));
        let primary = ReplicaId::from_bytes(cur.take(lp)?).map_err(|_| "bad replica id")?;
        let backup = match lb {
            0 => None,
            _ => Some(ReplicaId::from_bytes(cur.take(lb)?).map_err(|_| "bad replica id")?),
        };
        if generation == 0 {
            return Err("generation 0 stored");
        }
        registry.insert(
            vm,
            VmRecord {
                generation,
                primary,
                backup,
            },
        );
    }
    if !cur.0.is_empty() {
        return Err("trailing bytes");
    }
    Ok(registry)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("truncated");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

/// Loads the state file; a missing file is an empty registry (a new arbiter).
pub fn load(path: &Path) -> Result<Registry, StateError> {
    match fs::read(path) {
        Ok(bytes) => decode(&bytes).map_err(|reason| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Registry::new()),
        Err(source) => Err(StateError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the state durably: temp file, fsync, rename, fsync of the directory.
pub fn store(path: &Path, registry: &Registry) -> Result<(), StateError> {
    store_with(path, registry, |dir| {
        File::open(dir).and_then(|d| d.sync_all())
    })
}

/// [`store`] with the directory's fsync done by `sync_dir` (tests inject a
/// failure there: the rename is then visible but not known to be durable).
pub(crate) fn store_with(
    path: &Path,
    registry: &Registry,
    sync_dir: impl FnOnce(&Path) -> io::Result<()>,
) -> Result<(), StateError> {
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io {
            action,
            path,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    file.write_all(&encode(registry))
        .map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(dir).map_err(io("fsync the directory of", path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let mut r = Registry::new();
        let id = |s: &str| ReplicaId::new(s).expect("id");
        r.insert(
            1,
            VmRecord {
                generation: 4,
                primary: id("a"),
                backup: Some(id("b")),
            },
        );
        r.insert(
            9,
            VmRecord {
                generation: 7,
                primary: id("c"),
                backup: None,
            },
        );
        let bytes = encode(&r);
        assert_eq!(decode(&bytes), Ok(r));
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "byte {i}");
            assert!(decode(&bytes[..i]).is_err(), "prefix {i}");
        }
        assert_eq!(decode(&encode(&Registry::new())), Ok(Registry::new()));
    }
}
