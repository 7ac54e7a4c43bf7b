//! The event log: the binary format of log entries and of log files.
//!
//! Every value that enters the guest at a VM exit (a clock read, entropy,
//! input bytes) is one log entry tagged with the number of the exit at which
//! it takes effect. Replaying the same entries at the same exits against the
//! same guest image reproduces the guest exactly; digest entries let the
//! replayer prove it.
//!
//! # Entry layout
//!
//! All integers little-endian. An entry is a 32-byte header followed by its
//! payload, zero-padded to a multiple of 8 bytes so that entries stay aligned
//! in a stream:
//!
//! ```text
//! offset  size  field
//! 0       4     crc32c    over bytes 4 .. 32 + padded payload length
//! 4       2     kind      EntryKind; 0 is reserved as invalid
//! 6       2     flags     kind-specific (Input: bit 0 = end of input)
//! 8       4     len       payload length in bytes (before padding)
//! 12      4     reserved  must be 0
//! 16      8     seq       log position: 1 for the first entry, then +1 each
//! 24      8     exit      exit number at which the entry takes effect
//! 32      len   payload   kind-specific, see below
//! 32+len  pad   zeros     to the next multiple of 8
//! ```
//!
//! | kind | name     | payload |
//! |------|----------|---------|
//! | 1    | Clock    | u64: host monotonic ns returned to the guest |
//! | 2    | Entropy  | random bytes handed to the guest (8 for a register read) |
//! | 3    | Input    | input-stream bytes copied into guest memory (flag bit 0: end of input, payload empty) |
//! | 4    | Digest   | [`DigestRecord`]: hashes of the registers and of memory after the exit |
//! | 5    | Progress | none: the primary has passed `exit` with no other event (live streaming) |
//! | 6    | End      | u64: the guest's exit code; `exit` is its last exit (flag bit 0: stopped by the host; the payload is then the final [`DigestRecord`]) |
//! | 7    | RxFrames | network frames delivered into the guest's RX queue: repeated `u32 length` + frame bytes |
//! | 8    | BlkDone  | disk requests completed into the guest's virtio-blk used ring: repeated 24-byte records (see `vmm::block`) |
//! | 9    | RxFramesPacked | the same, each frame's headers coded against the frame before it: see [`packed`] (what the primary writes) |
//!
//! # Log file layout
//!
//! A log file is an 80-byte [`LogFileHeader`] followed by entries back to back:
//!
//! ```text
//! offset  size  field
//! 0       8     magic            "LKSTPLOG"
//! 8       2     version          FORMAT_VERSION
//! 10      2     header_len       80
//! 12      4     reserved         0
//! 16      8     image_id         xxh3 of the guest ELF image
//! 24      8     mem_size         guest memory in bytes
//! 32      8     guest_arg        the guest argument
//! 40      8     digest_interval  a digest every this many exits
//! 48      8     vm_flags         VM settings that affect determinism
//! 56      20    guest_name       UTF-8, zero padded
//! 76      4     crc32c           over bytes 0 .. 76
//! ```

pub mod packed;

use std::io::{self, Read, Write};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of the entry and file format; bumped on any layout change.
pub const FORMAT_VERSION: u16 = 1;
/// Magic at the start of a log file.
pub const FILE_MAGIC: [u8; 8] = *b"LKSTPLOG";
/// Size of an entry header in bytes.
pub const ENTRY_HEADER_LEN: usize = size_of::<EntryHeader>();
/// Largest payload an entry may carry; anything larger is corrupt.
pub const MAX_PAYLOAD_LEN: u32 = 16 << 20;
/// `flags` bit of an Input entry: the input stream has ended.
pub const FLAG_INPUT_EOF: u16 = 1;
/// `flags` bit of an End entry: the host stopped the guest (the guest did
/// not finish by itself; the payload is the final [`DigestRecord`]).
pub const FLAG_END_STOPPED: u16 = 1;

/// What an entry records. The discriminants are the wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum EntryKind {
    /// A clock read: the u64 nanoseconds returned.
    Clock = 1,
    /// Random bytes handed to the guest.
    Entropy = 2,
    /// Input-stream bytes copied into guest memory.
    Input = 3,
    /// State digest after the exit.
    Digest = 4,
    /// The primary passed this exit with nothing else to log.
    Progress = 5,
    /// The guest finished; payload is its exit code.
    End = 6,
    /// Network frames delivered to the guest (see [`encode_frames`]).
    RxFrames = 7,
    /// Disk requests completed at this exit (see `vmm::block`).
    BlkDone = 8,
    /// Network frames delivered to the guest, headers packed (see [`packed`]).
    RxFramesPacked = 9,
}

impl EntryKind {
    /// Decodes a wire value; 0 and unknown values are `None`.
    pub fn from_wire(value: u16) -> Option<Self> {
        Some(match value {
            1 => Self::Clock,
            2 => Self::Entropy,
            3 => Self::Input,
            4 => Self::Digest,
            5 => Self::Progress,
            6 => Self::End,
            7 => Self::RxFrames,
            8 => Self::BlkDone,
            9 => Self::RxFramesPacked,
            _ => return None,
        })
    }

    /// Lower-case name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Clock => "clock",
            Self::Entropy => "entropy",
            Self::Input => "input",
            Self::Digest => "digest",
            Self::Progress => "progress",
            Self::End => "end",
            Self::RxFrames => "rx-frames",
            Self::BlkDone => "blk-done",
            Self::RxFramesPacked => "rx-frames-packed",
        }
    }
}

impl std::fmt::Display for EntryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The 32-byte entry header, as it is on the wire.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct EntryHeader {
    crc: U32,
    kind: U16,
    flags: U16,
    len: U32,
    reserved: U32,
    seq: U64,
    exit: U64,
}

/// The payload of a Digest entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DigestRecord {
    /// Hash of the vCPU's registers (general, instruction pointer, flags, FPU/SSE).
    pub registers: U64,
    /// Hash of all of guest memory.
    pub memory: U64,
    /// The guest instruction pointer, for messages.
    pub rip: U64,
}

/// One log entry, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What the entry records.
    pub kind: EntryKind,
    /// Kind-specific flags.
    pub flags: u16,
    /// Log position, 1-based.
    pub seq: u64,
    /// Exit number at which the entry takes effect.
    pub exit: u64,
    /// Kind-specific payload.
    pub payload: Vec<u8>,
}

impl Entry {
    /// Encoded length of this entry, header and padding included.
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER_LEN + padded(self.payload.len())
    }

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode_entry(
            self.kind,
            self.flags,
            self.seq,
            self.exit,
            &self.payload,
            out,
        );
    }

    /// The payload as a u64 (Clock, End), if it is exactly 8 bytes.
    pub fn payload_u64(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.as_slice().try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }

    /// The payload as a digest record (Digest).
    pub fn digest(&self) -> Option<DigestRecord> {
        DigestRecord::read_from_bytes(&self.payload).ok()
    }

    /// The frames of an RxFrames or RxFramesPacked entry; `None` for the
    /// other kinds.
    pub fn rx_frames(&self) -> Option<Result<Vec<Vec<u8>>, packed::PackedError>> {
        match self.kind {
            EntryKind::RxFrames => Some(decode_frames(&self.payload).ok_or(packed::PackedError {
                frame: 0,
                offset: 0,
                what: "the u32-length frames do not fill the payload exactly",
            })),
            EntryKind::RxFramesPacked => Some(packed::decode(&self.payload)),
            _ => None,
        }
    }
}

/// Encodes frames as an RxFrames payload: for each, a little-endian u32
/// length and the bytes.
pub fn encode_frames(frames: &[Vec<u8>]) -> Vec<u8> {
    let total = frames.iter().map(|frame| 4 + frame.len()).sum();
    let mut payload = Vec::with_capacity(total);
    for frame in frames {
        // Frames are at most 64 KiB (MAX_PAYLOAD_LEN bounds the entry).
        payload.extend_from_slice(&u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes());
        payload.extend_from_slice(frame);
    }
    payload
}

/// Decodes an RxFrames payload; `None` if it is malformed.
pub fn decode_frames(mut payload: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut frames = Vec::new();
    while !payload.is_empty() {
        let (length, rest) = payload.split_first_chunk::<4>()?;
        let length = u32::from_le_bytes(*length) as usize;
        if rest.len() < length {
            return None;
        }
        frames.push(rest[..length].to_vec());
        payload = &rest[length..];
    }
    Some(frames)
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

/// Appends one encoded entry to `out` without building an [`Entry`] first.
pub fn encode_entry(
    kind: EntryKind,
    flags: u16,
    seq: u64,
    exit: u64,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    let header = EntryHeader {
        crc: U32::new(0),
        kind: U16::new(kind as u16),
        flags: U16::new(flags),
        // A payload longer than u32::MAX cannot be produced by the VMM (the
        // mailbox caps buffers at 1 MiB); saturating keeps this infallible and
        // the decoder rejects the entry as oversized.
        len: U32::new(u32::try_from(payload.len()).unwrap_or(u32::MAX)),
        reserved: U32::new(0),
        seq: U64::new(seq),
        exit: U64::new(exit),
    };
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out.resize(start + ENTRY_HEADER_LEN + padded(payload.len()), 0);
    let crc = crc32c::crc32c(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Why an entry or a log file was refused. Every variant names where.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The stream ended inside an entry.
    #[error(
        "log truncated inside entry {index} at byte {offset}: needed {needed} more bytes, got {got}"
    )]
    Truncated {
        /// 1-based index of the entry in the stream.
        index: u64,
        /// Byte offset of the entry's start.
        offset: u64,
        /// Bytes the entry still needed.
        needed: usize,
        /// Bytes that were there.
        got: usize,
    },
    /// The checksum does not match the bytes.
    #[error(
        "log entry {index} at byte {offset} is corrupt: crc32c {found:#010x}, expected {expected:#010x}"
    )]
    Corrupt {
        /// 1-based index of the entry in the stream.
        index: u64,
        /// Byte offset of the entry's start.
        offset: u64,
        /// Checksum stored in the entry.
        found: u32,
        /// Checksum of the bytes as read.
        expected: u32,
    },
    /// The header is well-formed by checksum but says something impossible.
    #[error("log entry {index} at byte {offset} is invalid: {reason}")]
    Invalid {
        /// 1-based index of the entry in the stream.
        index: u64,
        /// Byte offset of the entry's start.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log file does not start with a lockstep header.
    #[error("not a lockstep log (magic {found:02x?}, expected {FILE_MAGIC:02x?})")]
    NotALog {
        /// The first bytes found.
        found: [u8; 8],
    },
    /// The file was written by another format version.
    #[error(
        "log format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version {
        /// Version in the file.
        found: u16,
    },
    /// The file header fails its checksum.
    #[error("log file header is corrupt: crc32c {found:#010x}, expected {expected:#010x}")]
    HeaderCorrupt {
        /// Stored checksum.
        found: u32,
        /// Checksum of the bytes as read.
        expected: u32,
    },
    /// The file is shorter than its header.
    #[error("log file is truncated inside its {len}-byte header ({got} bytes)")]
    HeaderTruncated {
        /// Header length.
        len: usize,
        /// Bytes present.
        got: usize,
    },
    /// Reading or writing failed.
    #[error("log I/O failed at byte {offset}")]
    Io {
        /// Byte offset of the failed operation.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Decodes one entry at the start of `bytes`.
///
/// `index` and `offset` are used only for error messages. Returns the entry
/// and the number of bytes it occupied, `Ok(None)` if `bytes` is empty, and
/// [`LogError::Truncated`] if it ends inside the entry.
pub fn decode_entry(
    bytes: &[u8],
    index: u64,
    offset: u64,
) -> Result<Option<(Entry, usize)>, LogError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let Ok((header, _)) = EntryHeader::read_from_prefix(bytes) else {
        return Err(LogError::Truncated {
            index,
            offset,
            needed: ENTRY_HEADER_LEN,
            got: bytes.len(),
        });
    };
    let len = header.len.get();
    if len > MAX_PAYLOAD_LEN {
        // Checked before the crc so that a corrupt length cannot make the
        // reader wait for (or allocate) gigabytes.
        return Err(LogError::Invalid {
            index,
            offset,
            reason: format!(
                "payload length {len} exceeds the limit of {MAX_PAYLOAD_LEN} bytes (corrupt length field?)"
            ),
        });
    }
    let total = ENTRY_HEADER_LEN + padded(len as usize);
    if bytes.len() < total {
        return Err(LogError::Truncated {
            index,
            offset,
            needed: total,
            got: bytes.len(),
        });
    }
    check_entry(&header, &bytes[..total], index, offset)?;
    let kind = EntryKind::from_wire(header.kind.get()).ok_or_else(|| LogError::Invalid {
        index,
        offset,
        reason: format!("unknown entry kind {}", header.kind.get()),
    })?;
    let payload = bytes[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + len as usize].to_vec();
    Ok(Some((
        Entry {
            kind,
            flags: header.flags.get(),
            seq: header.seq.get(),
            exit: header.exit.get(),
            payload,
        },
        total,
    )))
}

/// Checks the crc, the reserved field and the padding of a complete entry.
fn check_entry(
    header: &EntryHeader,
    entry: &[u8],
    index: u64,
    offset: u64,
) -> Result<(), LogError> {
    let expected = crc32c::crc32c(&entry[4..]);
    let found = header.crc.get();
    if found != expected {
        return Err(LogError::Corrupt {
            index,
            offset,
            found,
            expected,
        });
    }
    if header.reserved.get() != 0 {
        return Err(LogError::Invalid {
            index,
            offset,
            reason: "reserved field is not zero".into(),
        });
    }
    let len = header.len.get() as usize;
    if entry[ENTRY_HEADER_LEN + len..].iter().any(|&b| b != 0) {
        return Err(LogError::Invalid {
            index,
            offset,
            reason: "padding is not zero".into(),
        });
    }
    if header.seq.get() == 0 {
        return Err(LogError::Invalid {
            index,
            offset,
            reason: "sequence number 0 is reserved".into(),
        });
    }
    Ok(())
}

/// The header of a log file: what a log must be replayed against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogMeta {
    /// xxh3 of the guest ELF image.
    pub image_id: u64,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// The guest argument.
    pub guest_arg: u64,
    /// A digest every this many exits (0: only at the end).
    pub digest_interval: u64,
    /// VM settings that affect determinism (see `vmm::VmConfig`).
    pub vm_flags: u64,
    /// Name of the guest program (at most 20 bytes are kept).
    pub guest_name: String,
}

/// The 80-byte file header, as it is on disk.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LogFileHeader {
    magic: [u8; 8],
    version: U16,
    header_len: U16,
    reserved: U32,
    image_id: U64,
    mem_size: U64,
    guest_arg: U64,
    digest_interval: U64,
    vm_flags: U64,
    guest_name: [u8; 20],
    crc: U32,
}

/// Size of the file header in bytes.
pub const FILE_HEADER_LEN: usize = size_of::<LogFileHeader>();

impl LogMeta {
    /// Encodes the file header.
    pub fn to_header(&self) -> LogFileHeader {
        let mut guest_name = [0u8; 20];
        let name = self.guest_name.as_bytes();
        let keep = name.len().min(guest_name.len());
        guest_name[..keep].copy_from_slice(&name[..keep]);
        let mut header = LogFileHeader {
            magic: FILE_MAGIC,
            version: U16::new(FORMAT_VERSION),
            header_len: U16::new(FILE_HEADER_LEN as u16),
            reserved: U32::new(0),
            image_id: U64::new(self.image_id),
            mem_size: U64::new(self.mem_size),
            guest_arg: U64::new(self.guest_arg),
            digest_interval: U64::new(self.digest_interval),
            vm_flags: U64::new(self.vm_flags),
            guest_name,
            crc: U32::new(0),
        };
        header.crc = U32::new(crc32c::crc32c(&header.as_bytes()[..FILE_HEADER_LEN - 4]));
        header
    }

    /// The encoded file header, as it starts a log file (and as the first
    /// entry of a replication stream carries it).
    pub fn header_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut bytes = [0u8; FILE_HEADER_LEN];
        bytes.copy_from_slice(self.to_header().as_bytes());
        bytes
    }

    /// Decodes and checks a file header.
    pub fn from_header_bytes(bytes: &[u8]) -> Result<Self, LogError> {
        if bytes.len() >= 8 && bytes[..8] != FILE_MAGIC {
            let mut found = [0u8; 8];
            found.copy_from_slice(&bytes[..8]);
            return Err(LogError::NotALog { found });
        }
        let Ok((header, _)) = LogFileHeader::read_from_prefix(bytes) else {
            return Err(LogError::HeaderTruncated {
                len: FILE_HEADER_LEN,
                got: bytes.len(),
            });
        };
        if header.version.get() != FORMAT_VERSION {
            return Err(LogError::Version {
                found: header.version.get(),
            });
        }
        let expected = crc32c::crc32c(&header.as_bytes()[..FILE_HEADER_LEN - 4]);
        if header.crc.get() != expected {
            return Err(LogError::HeaderCorrupt {
                found: header.crc.get(),
                expected,
            });
        }
        let name_len = header
            .guest_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(header.guest_name.len());
        Ok(Self {
            image_id: header.image_id.get(),
            mem_size: header.mem_size.get(),
            guest_arg: header.guest_arg.get(),
            digest_interval: header.digest_interval.get(),
            vm_flags: header.vm_flags.get(),
            guest_name: String::from_utf8_lossy(&header.guest_name[..name_len]).into_owned(),
        })
    }
}

/// Writes a log file: the header, then entries as they come.
pub struct LogWriter<W: Write> {
    out: W,
    offset: u64,
    scratch: Vec<u8>,
}

impl<W: Write> LogWriter<W> {
    /// Writes the file header.
    pub fn new(mut out: W, meta: &LogMeta) -> Result<Self, LogError> {
        out.write_all(meta.to_header().as_bytes())
            .map_err(|source| LogError::Io { offset: 0, source })?;
        Ok(Self {
            out,
            offset: FILE_HEADER_LEN as u64,
            scratch: Vec::with_capacity(4096),
        })
    }

    /// Appends one entry.
    pub fn append(
        &mut self,
        kind: EntryKind,
        flags: u16,
        seq: u64,
        exit: u64,
        payload: &[u8],
    ) -> Result<(), LogError> {
        self.scratch.clear();
        encode_entry(kind, flags, seq, exit, payload, &mut self.scratch);
        self.out
            .write_all(&self.scratch)
            .map_err(|source| LogError::Io {
                offset: self.offset,
                source,
            })?;
        self.offset += self.scratch.len() as u64;
        Ok(())
    }

    /// Flushes buffered entries to the underlying writer.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(|source| LogError::Io {
            offset: self.offset,
            source,
        })
    }

    /// Bytes written so far, header included.
    pub fn bytes_written(&self) -> u64 {
        self.offset
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(mut self) -> Result<W, LogError> {
        self.flush()?;
        Ok(self.out)
    }
}

/// Reads a log file entry by entry, checking every checksum.
pub struct LogReader<R: Read> {
    input: R,
    meta: LogMeta,
    offset: u64,
    index: u64,
    buffer: Vec<u8>,
}

impl<R: Read> LogReader<R> {
    /// Reads and checks the file header.
    pub fn new(mut input: R) -> Result<Self, LogError> {
        let mut header = [0u8; FILE_HEADER_LEN];
        let got = read_full(&mut input, &mut header, 0)?;
        if got == 0 {
            return Err(LogError::HeaderTruncated {
                len: FILE_HEADER_LEN,
                got: 0,
            });
        }
        let meta = LogMeta::from_header_bytes(&header[..got])?;
        Ok(Self {
            input,
            meta,
            offset: FILE_HEADER_LEN as u64,
            index: 0,
            buffer: Vec::with_capacity(4096),
        })
    }

    /// The file header.
    pub fn meta(&self) -> &LogMeta {
        &self.meta
    }

    /// Reads the next entry; `Ok(None)` at a clean end of file.
    pub fn next_entry(&mut self) -> Result<Option<Entry>, LogError> {
        let index = self.index + 1;
        self.buffer.resize(ENTRY_HEADER_LEN, 0);
        let got = read_full(&mut self.input, &mut self.buffer, self.offset)?;
        if got == 0 {
            return Ok(None);
        }
        if got < ENTRY_HEADER_LEN {
            return Err(LogError::Truncated {
                index,
                offset: self.offset,
                needed: ENTRY_HEADER_LEN,
                got,
            });
        }
        let len = u32::from_le_bytes([
            self.buffer[8],
            self.buffer[9],
            self.buffer[10],
            self.buffer[11],
        ]);
        if len > MAX_PAYLOAD_LEN {
            // Let the decoder produce the error (it names the limit).
            decode_entry(&self.buffer, index, self.offset)?;
        }
        let total = ENTRY_HEADER_LEN + padded(len as usize);
        self.buffer.resize(total, 0);
        let rest = read_full(
            &mut self.input,
            &mut self.buffer[ENTRY_HEADER_LEN..],
            self.offset + ENTRY_HEADER_LEN as u64,
        )?;
        let available = ENTRY_HEADER_LEN + rest;
        let decoded = decode_entry(&self.buffer[..available], index, self.offset)?;
        let Some((entry, used)) = decoded else {
            return Ok(None);
        };
        self.offset += used as u64;
        self.index = index;
        Ok(Some(entry))
    }

    /// Byte offset of the next entry.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The underlying reader (to see, say, whether a buffer has drained).
    pub fn input(&self) -> &R {
        &self.input
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full<R: Read>(input: &mut R, buf: &mut [u8], offset: u64) -> Result<usize, LogError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(LogError::Io {
                    offset: offset + filled as u64,
                    source,
                });
            }
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> LogMeta {
        LogMeta {
            image_id: 0x1234,
            mem_size: 16 << 20,
            guest_arg: 7,
            digest_interval: 100,
            vm_flags: 1,
            guest_name: "fold".into(),
        }
    }

    fn sample_log(entries: u64) -> Vec<u8> {
        let mut writer = LogWriter::new(Vec::new(), &meta()).expect("write header");
        for seq in 1..=entries {
            let payload: Vec<u8> = (0..(seq % 13) as u8).collect();
            writer
                .append(EntryKind::Entropy, 0, seq, seq * 3, &payload)
                .expect("append");
        }
        writer.into_inner().expect("flush")
    }

    #[test]
    fn layout_sizes_are_as_documented() {
        assert_eq!(ENTRY_HEADER_LEN, 32);
        assert_eq!(FILE_HEADER_LEN, 80);
        assert_eq!(size_of::<DigestRecord>(), 24);
    }

    #[test]
    fn round_trip_preserves_every_entry() {
        let bytes = sample_log(200);
        let mut reader = LogReader::new(bytes.as_slice()).expect("header");
        assert_eq!(reader.meta(), &meta());
        for seq in 1..=200u64 {
            let entry = reader.next_entry().expect("entry").expect("not at end");
            assert_eq!(entry.seq, seq);
            assert_eq!(entry.exit, seq * 3);
            assert_eq!(entry.payload, (0..(seq % 13) as u8).collect::<Vec<_>>());
        }
        assert!(reader.next_entry().expect("clean end").is_none());
    }

    #[test]
    fn every_flipped_byte_is_caught_and_located() {
        let bytes = sample_log(5);
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x40;
            let result = LogReader::new(damaged.as_slice()).and_then(|mut reader| {
                while reader.next_entry()?.is_some() {}
                Ok(())
            });
            let error = result.expect_err("a flipped byte must be refused");
            if position >= FILE_HEADER_LEN {
                let text = error.to_string();
                assert!(
                    text.contains("log entry") || text.contains("truncated inside entry"),
                    "byte {position}: {text}"
                );
            }
        }
    }

    #[test]
    fn truncation_is_a_clean_error_naming_the_entry() {
        let bytes = sample_log(3);
        let cut = bytes.len() - 5;
        let mut reader = LogReader::new(&bytes[..cut]).expect("header");
        assert!(reader.next_entry().expect("first").is_some());
        assert!(reader.next_entry().expect("second").is_some());
        let error = reader.next_entry().expect_err("third is cut");
        assert!(
            matches!(error, LogError::Truncated { index: 3, .. }),
            "{error}"
        );
    }

    #[test]
    fn zeroed_entry_is_invalid_not_accepted() {
        let mut bytes = meta().to_header().as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 32]);
        let mut reader = LogReader::new(bytes.as_slice()).expect("header");
        let error = reader.next_entry().expect_err("zeroed entry");
        // crc32c of 28 zero bytes is not zero, so this is a checksum failure.
        assert!(
            matches!(error, LogError::Corrupt { index: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn kind_zero_is_reserved() {
        assert_eq!(EntryKind::from_wire(0), None);
        let mut bytes = Vec::new();
        encode_entry(EntryKind::Clock, 0, 1, 1, &5u64.to_le_bytes(), &mut bytes);
        bytes[4] = 0;
        let crc = crc32c::crc32c(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        let error = decode_entry(&bytes, 1, 0).expect_err("kind 0");
        assert!(
            error.to_string().contains("unknown entry kind 0"),
            "{error}"
        );
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut bytes = Vec::new();
        encode_entry(EntryKind::Input, 0, 1, 1, b"abc", &mut bytes);
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let error = decode_entry(&bytes, 1, 0).expect_err("huge length");
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
    }

    #[test]
    fn other_files_are_not_logs() {
        let error = LogReader::new(&b"\x7fELF\x02\x01\x01\x00 and more bytes"[..])
            .err()
            .expect("an ELF file is not a log");
        assert!(matches!(error, LogError::NotALog { .. }));
        let error = LogReader::new(&b""[..]).err().expect("empty");
        assert!(matches!(error, LogError::HeaderTruncated { got: 0, .. }));
    }

    #[test]
    fn frames_round_trip_and_malformed_payloads_are_refused() {
        let frames = vec![vec![1u8; 60], vec![], vec![2u8; 1514]];
        let payload = encode_frames(&frames);
        assert_eq!(decode_frames(&payload), Some(frames));
        assert_eq!(decode_frames(&payload[..payload.len() - 1]), None);
        assert_eq!(decode_frames(&[1, 0, 0]), None);
    }

    #[test]
    fn other_versions_are_refused() {
        let mut header = meta().to_header();
        header.version = U16::new(FORMAT_VERSION + 1);
        let error = LogMeta::from_header_bytes(header.as_bytes()).expect_err("version");
        assert!(matches!(error, LogError::Version { .. }));
    }
}
