//! Pre-shared keys: how they are made, kept and read.
//!
//! - `lockstep keygen FILE` draws 32 random bytes from the host's entropy
//!   and writes them as 64 hex digits and a newline to a *new* file created
//!   0600 (an existing file is never overwritten).
//! - A key file holds at least [`MIN_KEY_LEN`] bytes once surrounding
//!   whitespace is trimmed; a shorter key is refused, naming the file.
//! - There is no built-in key: a replica without `--link-key` (or an
//!   `--arbiter-key` to fall back on) refuses to start and says how to make
//!   one.
//! - `lockstep up` makes a private directory (0700, a random name, created
//!   exclusively so nobody can prepare it in advance) and its own key in it.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The shortest key accepted, in bytes (the arbiter's own minimum too).
pub const MIN_KEY_LEN: usize = arbiter::protocol::MIN_KEY_LEN;

/// A key cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The host has no entropy to draw a key from.
    #[error("no host entropy for a key")]
    Entropy(#[source] getrandom::Error),
    /// A key file or directory cannot be created, written or read.
    #[error("{what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key in a file is too short.
    #[error(
        "the {what} in {} is {len} bytes long; at least {MIN_KEY_LEN} are needed (make one with `lockstep keygen FILE`)",
        path.display()
    )]
    Short {
        what: String,
        path: PathBuf,
        len: usize,
    },
}

fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut secret = vec![0u8; bytes];
    getrandom::fill(&mut secret).map_err(KeyError::Entropy)?;
    Ok(secret.iter().map(|b| format!("{b:02x}")).collect())
}

/// `lockstep keygen FILE`: a new 0600 file holding 32 random bytes in hex.
pub fn generate(path: &Path) -> Result<(), KeyError> {
    let text = random_hex(32)? + "\n";
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| KeyError::File {
            what: "cannot create the key file (it must not exist yet)",
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::File {
            what: "cannot write the key file",
            path: path.to_path_buf(),
            source,
        })
}

/// Reads a link key file: trimmed, at least [`MIN_KEY_LEN`] bytes. Warns
/// when others may read it.
pub fn read(path: &Path, what: &str) -> Result<Vec<u8>, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::File {
        what: "cannot read the key file",
        path: path.to_path_buf(),
        source,
    })?;
    let key = bytes.trim_ascii().to_vec();
    if key.len() < MIN_KEY_LEN {
        return Err(KeyError::Short {
            what: what.to_string(),
            path: path.to_path_buf(),
            len: key.len(),
        });
    }
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "lockstep: warning: the {what} {} can be read by other users (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    Ok(key)
}

/// A new private directory (0700) with an unpredictable name under the
/// temporary directory, created exclusively.
pub fn private_dir(prefix: &str) -> Result<PathBuf, KeyError> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", random_hex(8)?));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|source| KeyError::File {
            what: "cannot create the private directory",
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_private_long_and_never_overwritten() {
        let dir = private_dir("lockstep-keys-test").expect("dir");
        let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = dir.join("key");
        generate(&path).expect("keygen");
        let mode = std::fs::metadata(&path).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = read(&path, "link key").expect("read");
        assert_eq!(key.len(), 64);
        assert!(generate(&path).is_err(), "an existing key is kept");
        std::fs::write(dir.join("short"), "only 31 bytes long, not enough").expect("write");
        let short = read(&dir.join("short"), "link key").expect_err("too short");
        assert!(short.to_string().contains("lockstep keygen"), "{short}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
