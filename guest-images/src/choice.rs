//! Choosing a guest program: an embedded one by name, or an ELF file.

use std::borrow::Cow;

/// A guest image and its name.
pub struct GuestImage {
    name: String,
    bytes: Cow<'static, [u8]>,
}

/// The `--guest` value names neither an embedded guest nor a readable file.
#[derive(Debug, thiserror::Error)]
#[error("unknown guest '{name}': choose one of {choices}, or give the path of an ELF file{detail}")]
pub struct UnknownGuest {
    name: String,
    choices: String,
    detail: String,
}

impl GuestImage {
    /// Resolves `--guest`: a path if it contains '/', else an embedded name.
    pub fn resolve(name: &str) -> Result<Self, UnknownGuest> {
        let unknown = |detail: String| UnknownGuest {
            name: name.to_string(),
            choices: crate::names().collect::<Vec<_>>().join(", "),
            detail,
        };
        if name.contains('/') {
            let bytes = std::fs::read(name).map_err(|e| unknown(format!(" ({name}: {e})")))?;
            return Ok(Self {
                name: name.to_string(),
                bytes: Cow::Owned(bytes),
            });
        }
        let bytes = crate::image(name).ok_or_else(|| unknown(String::new()))?;
        Ok(Self {
            name: name.to_string(),
            bytes: Cow::Borrowed(bytes),
        })
    }

    /// The name given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ELF bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The image identity recorded in logs.
    pub fn id(&self) -> u64 {
        crate::image_id(&self.bytes)
    }
}

/// Help text listing the embedded guests.
pub fn help() -> String {
    let names: Vec<_> = crate::names().collect();
    format!(
        "Guest program: one of the embedded guests ({}) or the path of an ELF executable linked at 0x200000 for the lockstep ABI",
        names.join(", ")
    )
}
