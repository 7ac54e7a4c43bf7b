//! The embedded arbiter's wire protocol (version 1).
//!
//! One request and one reply per TCP connection: the client connects, writes
//! a request, reads the reply, and both sides close. Integers are big-endian.
//! Every frame ends with an HMAC-SHA256 over a direction label followed by
//! all the frame's preceding bytes, keyed with the pre-shared [`Key`]; the
//! label (`"lockstep-arbiter request v1"` or `"lockstep-arbiter reply v1"`)
//! keeps a request from being reflected back as a reply.
//!
//! # Request
//!
//! ```text
//! +--------+------+-------------------------------------------------------+
//! | offset | size | field                                                 |
//! +--------+------+-------------------------------------------------------+
//! |      0 |    4 | magic "LSAR"                                          |
//! |      4 |    2 | protocol version (1)                                  |
//! |      6 |    1 | op: 1 read, 2 test_and_set, 3 register (0: invalid)   |
//! |      7 |    1 | A: length of replica id A (0..=64)                    |
//! |      8 |    1 | B: length of replica id B (0..=64)                    |
//! |      9 |    7 | reserved, zero                                        |
//! |     16 |   16 | nonce: random, echoed in the reply                    |
//! |     32 |    8 | vm id                                                 |
//! |     40 |    8 | expected generation (0 for read)                      |
//! |     48 |    A | replica id A: the candidate (test_and_set) or the     |
//! |        |      | primary (register); empty for read                    |
//! |   48+A |    B | replica id B: the backup (register); empty otherwise  |
//! | 48+A+B |   32 | HMAC-SHA256(key, "lockstep-arbiter request v1"        |
//! |        |      |             || bytes 0 .. 48+A+B)                     |
//! +--------+------+-------------------------------------------------------+
//! ```
//!
//! # Reply
//!
//! ```text
//! +--------+------+-------------------------------------------------------+
//! | offset | size | field                                                 |
//! +--------+------+-------------------------------------------------------+
//! |      0 |    4 | magic "LSAR"                                          |
//! |      4 |    2 | protocol version the server speaks (1)                |
//! |      6 |    1 | status: 1 ok, 2 bad magic, 3 unsupported version,     |
//! |        |      | 4 authentication failed, 5 malformed request,         |
//! |        |      | 6 invalid request, 7 storage failure (0: invalid)     |
//! |      7 |    1 | result (status ok only): 1 absent, 2 present, 3 won,  |
//! |        |      | 4 lost; 0 otherwise                                   |
//! |      8 |    1 | loss: 1 superseded, 2 ahead, 3 not a member,          |
//! |        |      | 4 unregistered; 0 unless result is lost               |
//! |      9 |    1 | record: 1 if a record follows, 0 if not               |
//! |     10 |    1 | P: length of the record's primary (0 if no record)    |
//! |     11 |    1 | B: length of the record's backup (0: none)            |
//! |     12 |    4 | reserved, zero                                        |
//! |     16 |   16 | nonce of the request (zero if the request could not   |
//! |        |      | be read far enough to find it)                        |
//! |     32 |    8 | the record's generation (0 if no record)              |
//! |     40 |    P | the record's primary                                  |
//! |   40+P |    B | the record's backup                                   |
//! | 40+P+B |   32 | HMAC-SHA256(key, "lockstep-arbiter reply v1"          |
//! |        |      |             || bytes 0 .. 40+P+B)                     |
//! +--------+------+-------------------------------------------------------+
//! ```
//!
//! # Security
//!
//! - Requests are authenticated, so only holders of the key can move a
//!   generation. A replayed request is harmless: it is a compare-and-set on
//!   one generation, which can succeed once, and only for the replica the
//!   original named.
//! - Replies are authenticated and carry the request's nonce, so a client is
//!   not fooled by an impostor or by a recorded "won". The client accepts an
//!   ok reply only with its own nonce; an error reply (which grants nothing)
//!   is accepted with any nonce.
//! - Nothing is encrypted: VM ids, generations and replica ids are not secret.

use std::fmt;
use std::io::{self, Read};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::model::{Loss, MAX_REPLICA_ID_LEN, ReplicaId, VmId, VmRecord};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"LSAR";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// Length of the nonce.
pub const NONCE_LEN: usize = 16;
/// Length of the HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Length of a request before its replica ids.
pub const REQUEST_HEADER_LEN: usize = 48;
/// Length of a reply before its replica ids.
pub const REPLY_HEADER_LEN: usize = 40;
/// The shortest pre-shared key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;

const REQUEST_LABEL: &[u8] = b"lockstep-arbiter request v1";
const REPLY_LABEL: &[u8] = b"lockstep-arbiter reply v1";

type HmacSha256 = Hmac<Sha256>;

/// A request nonce.
pub type Nonce = [u8; NONCE_LEN];

/// The pre-shared key of an arbiter and its clients. Its `Debug` output
/// never shows the key.
#[derive(Clone)]
pub struct Key {
    mac: HmacSha256,
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Too short to resist guessing.
    #[error("the arbiter key is {len} bytes long; at least {MIN_KEY_LEN} are needed")]
    TooShort {
        /// Its length.
        len: usize,
    },
    /// The key file holds too short a key.
    #[error(
        "the arbiter key in {path} is {len} bytes long; at least {MIN_KEY_LEN} are needed (make one with `lockstep keygen FILE`)"
    )]
    FileTooShort {
        /// The file.
        path: String,
        /// The key's length.
        len: usize,
    },
    /// The key file could not be read.
    #[error("cannot read the arbiter key file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Key {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len: bytes.len() });
        }
        // HMAC takes keys of any length, so this cannot fail; map it anyway.
        let mac = HmacSha256::new_from_slice(bytes)
            .map_err(|_| KeyError::TooShort { len: bytes.len() })?;
        Ok(Self { mac })
    }

    /// Reads a key file: its bytes, less leading and trailing ASCII
    /// whitespace (so `head -c 32 /dev/urandom | base64 > key` works).
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let key = bytes.trim_ascii();
        if key.len() < MIN_KEY_LEN {
            return Err(KeyError::FileTooShort {
                path: path.display().to_string(),
                len: key.len(),
            });
        }
        Self::new(key)
    }

    fn tag(&self, label: &[u8], bytes: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = self.mac.clone();
        mac.update(label);
        mac.update(bytes);
        let mut tag = [0; MAC_LEN];
        tag.copy_from_slice(&mac.finalize().into_bytes());
        tag
    }

    fn verify(&self, label: &[u8], bytes: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(label);
        mac.update(bytes);
        // Constant-time comparison.
        mac.verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// [`crate::Arbiter::read`].
    Read {
        /// The VM.
        vm: VmId,
    },
    /// [`crate::Arbiter::test_and_set`].
    TestAndSet {
        /// The VM.
        vm: VmId,
        /// The generation the candidate saw.
        expected: u64,
        /// Who wants to go live.
        candidate: ReplicaId,
    },
    /// [`crate::Arbiter::register`].
    Register {
        /// The VM.
        vm: VmId,
        /// The generation the primary saw (0 for a new VM).
        expected: u64,
        /// The live replica.
        primary: ReplicaId,
        /// Its new backup.
        backup: ReplicaId,
    },
}

impl Command {
    fn op(&self) -> u8 {
        match self {
            Command::Read { .. } => 1,
            Command::TestAndSet { .. } => 2,
            Command::Register { .. } => 3,
        }
    }
}

/// A reply's status byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The request was carried out.
    Ok = 1,
    /// The request did not start with [`MAGIC`].
    BadMagic = 2,
    /// The request's version is not [`VERSION`].
    UnsupportedVersion = 3,
    /// The request's MAC did not verify: the keys differ.
    AuthenticationFailed = 4,
    /// The request's layout is wrong.
    Malformed = 5,
    /// The request is well-formed but wrong whatever the state (e.g. a pair
    /// whose primary is its backup).
    InvalidRequest = 6,
    /// The decision could not be made durable: nothing was granted, and the
    /// server grants nothing more until it is restarted.
    StorageFailure = 7,
}

impl Status {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            1 => Status::Ok,
            2 => Status::BadMagic,
            3 => Status::UnsupportedVersion,
            4 => Status::AuthenticationFailed,
            5 => Status::Malformed,
            6 => Status::InvalidRequest,
            7 => Status::StorageFailure,
            _ => return None,
        })
    }
}

/// The body of an ok reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// To a read: the VM is not registered.
    Absent,
    /// To a read: the VM's record.
    Present(VmRecord),
    /// To a compare-and-set: the caller won; the new record.
    Won(VmRecord),
    /// To a compare-and-set: the caller lost.
    Lost {
        /// Why.
        reason: Loss,
        /// The arbiter's current record.
        current: Option<VmRecord>,
    },
}

/// A decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The server's version.
    pub version: u16,
    /// The status.
    pub status: Status,
    /// The nonce it echoes.
    pub nonce: Nonce,
    /// The answer, when `status` is [`Status::Ok`].
    pub answer: Option<Answer>,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer closed or failed mid-frame (includes timeouts).
    #[error("cannot read the frame")]
    Io(#[from] io::Error),
    /// Not a lockstep arbiter frame.
    #[error("bad magic {found:02x?}: not a lockstep arbiter frame")]
    BadMagic {
        /// What came instead.
        found: [u8; 4],
    },
    /// A version this crate does not speak.
    #[error("unsupported protocol version {found}; this side speaks {VERSION}")]
    UnsupportedVersion {
        /// What came.
        found: u16,
    },
    /// The MAC did not verify.
    #[error("the frame's HMAC does not verify: wrong key, or not our peer")]
    BadMac {
        /// The status byte as sent, unauthenticated: lets a client tell "the
        /// server refused my key" from "an impostor answered".
        unverified_status: u8,
    },
    /// A field out of range.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// A replica id breaks the rules.
    #[error("malformed frame")]
    BadReplicaId(#[from] crate::model::InvalidReplicaId),
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn id_len(id: &ReplicaId) -> u8 {
    // ReplicaId guarantees 1..=64 bytes.
    u8::try_from(id.as_bytes().len()).unwrap_or(u8::MAX)
}

/// Encodes a request for [`VERSION`].
pub fn encode_request(key: &Key, nonce: &Nonce, command: &Command) -> Vec<u8> {
    encode_request_with_version(key, nonce, command, VERSION)
}

/// Encodes a request claiming protocol `version`: for testing how a server
/// handles versions it does not speak.
pub fn encode_request_with_version(
    key: &Key,
    nonce: &Nonce,
    command: &Command,
    version: u16,
) -> Vec<u8> {
    let (vm, expected, a, b) = match command {
        Command::Read { vm } => (*vm, 0, None, None),
        Command::TestAndSet {
            vm,
            expected,
            candidate,
        } => (*vm, *expected, Some(candidate), None),
        Command::Register {
            vm,
            expected,
            primary,
            backup,
        } => (*vm, *expected, Some(primary), Some(backup)),
    };
    let mut out = Vec::with_capacity(REQUEST_HEADER_LEN + 2 * MAX_REPLICA_ID_LEN + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.push(command.op());
    out.push(a.map_or(0, id_len));
    out.push(b.map_or(0, id_len));
    out.extend_from_slice(&[0; 7]);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&vm.to_be_bytes());
    out.extend_from_slice(&expected.to_be_bytes());
    for id in [a, b].into_iter().flatten() {
        out.extend_from_slice(id.as_bytes());
    }
    let tag = key.tag(REQUEST_LABEL, &out);
    out.extend_from_slice(&tag);
    out
}

/// A request the server refuses, with the status to answer and the nonce to
/// echo (zero if it could not be read).
#[derive(Debug)]
pub struct Rejection {
    /// The status to answer with.
    pub status: Status,
    /// The request's nonce, if it got that far.
    pub nonce: Nonce,
    /// Why, for the server's log.
    pub error: ProtocolError,
}

/// Reads and checks one request from `r`. Never panics, whatever the bytes.
pub fn read_request(r: &mut impl Read, key: &Key) -> Result<(Nonce, Command), Box<Rejection>> {
    let reject = |status, nonce, error| {
        Box::new(Rejection {
            status,
            nonce,
            error,
        })
    };
    let mut header = [0u8; REQUEST_HEADER_LEN];
    // Read the magic and version first, so that a short garbage frame is
    // answered "bad magic" rather than left to time out.
    if let Err(e) = r.read_exact(&mut header[..6]) {
        return Err(reject(Status::Malformed, [0; NONCE_LEN], e.into()));
    }
    let mut found = [0; 4];
    found.copy_from_slice(&header[..4]);
    if found != MAGIC {
        return Err(reject(
            Status::BadMagic,
            [0; NONCE_LEN],
            ProtocolError::BadMagic { found },
        ));
    }
    let version = be_u16(&header[4..6]);
    if version != VERSION {
        return Err(reject(
            Status::UnsupportedVersion,
            [0; NONCE_LEN],
            ProtocolError::UnsupportedVersion { found: version },
        ));
    }
    if let Err(e) = r.read_exact(&mut header[6..]) {
        return Err(reject(Status::Malformed, [0; NONCE_LEN], e.into()));
    }
    let mut nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&header[16..32]);
    let (op, len_a, len_b) = (header[6], usize::from(header[7]), usize::from(header[8]));
    if len_a > MAX_REPLICA_ID_LEN || len_b > MAX_REPLICA_ID_LEN {
        return Err(reject(
            Status::Malformed,
            nonce,
            ProtocolError::Malformed("replica id longer than 64 bytes"),
        ));
    }
    let mut rest = vec![0u8; len_a + len_b + MAC_LEN];
    if let Err(e) = r.read_exact(&mut rest) {
        return Err(reject(Status::Malformed, nonce, e.into()));
    }
    let (ids, tag) = rest.split_at(len_a + len_b);
    let mut signed = Vec::with_capacity(REQUEST_HEADER_LEN + ids.len());
    signed.extend_from_slice(&header);
    signed.extend_from_slice(ids);
    if !key.verify(REQUEST_LABEL, &signed, tag) {
        return Err(reject(
            Status::AuthenticationFailed,
            nonce,
            ProtocolError::BadMac {
                unverified_status: 0,
            },
        ));
    }
    // Authenticated from here on: a malformed request now is a client bug.
    let malformed = |what| reject(Status::Malformed, nonce, ProtocolError::Malformed(what));
    if header[9..16].iter().any(|&b| b != 0) {
        return Err(malformed("reserved bytes are not zero"));
    }
    let vm = be_u64(&header[32..40]);
    let expected = be_u64(&header[40..48]);
    let (a, b) = ids.split_at(len_a);
    let id = |bytes: &[u8]| {
        ReplicaId::from_bytes(bytes)
            .map_err(|e| reject(Status::Malformed, nonce, ProtocolError::BadReplicaId(e)))
    };
    let command = match (op, len_a, len_b) {
        (1, 0, 0) if expected == 0 => Command::Read { vm },
        (1, _, _) => return Err(malformed("a read carries no replica id and no generation")),
        (2, 1.., 0) => Command::TestAndSet {
            vm,
            expected,
            candidate: id(a)?,
        },
        (2, _, _) => return Err(malformed("a test_and_set carries exactly one replica id")),
        (3, 1.., 1..) => Command::Register {
            vm,
            expected,
            primary: id(a)?,
            backup: id(b)?,
        },
        (3, _, _) => return Err(malformed("a register carries two replica ids")),
        _ => return Err(malformed("unknown op")),
    };
    Ok((nonce, command))
}

/// Encodes a reply. `answer` must be `Some` exactly when `status` is ok.
pub fn encode_reply(key: &Key, status: Status, nonce: &Nonce, answer: Option<&Answer>) -> Vec<u8> {
    let (result, loss, record) = match answer {
        None => (0, 0, None),
        Some(Answer::Absent) => (1, 0, None),
        Some(Answer::Present(r)) => (2, 0, Some(r)),
        Some(Answer::Won(r)) => (3, 0, Some(r)),
        Some(Answer::Lost { reason, current }) => (4, loss_byte(*reason), current.as_ref()),
    };
    let mut out = Vec::with_capacity(REPLY_HEADER_LEN + 2 * MAX_REPLICA_ID_LEN + MAC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.push(status as u8);
    out.push(result);
    out.push(loss);
    out.push(u8::from(record.is_some()));
    out.push(record.map_or(0, |r| id_len(&r.primary)));
    out.push(record.and_then(|r| r.backup.as_ref()).map_or(0, id_len));
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(nonce);
    out.extend_from_slice(&record.map_or(0, |r| r.generation).to_be_bytes());
    if let Some(r) = record {
        out.extend_from_slice(r.primary.as_bytes());
        if let Some(b) = &r.backup {
            out.extend_from_slice(b.as_bytes());
        }
    }
    let tag = key.tag(REPLY_LABEL, &out);
    out.extend_from_slice(&tag);
    out
}

fn loss_byte(loss: Loss) -> u8 {
    match loss {
        Loss::Superseded => 1,
        Loss::Ahead => 2,
        Loss::NotMember => 3,
        Loss::Unregistered => 4,
    }
}

fn loss_from_byte(b: u8) -> Option<Loss> {
    Some(match b {
        1 => Loss::Superseded,
        2 => Loss::Ahead,
        3 => Loss::NotMember,
        4 => Loss::Unregistered,
        _ => return None,
    })
}

/// Reads and authenticates one reply from `r`. Checks the MAC before
/// anything else it reports, except a bad magic or an unreadable frame.
pub fn read_reply(r: &mut impl Read, key: &Key) -> Result<Reply, ProtocolError> {
    let mut header = [0u8; REPLY_HEADER_LEN];
    r.read_exact(&mut header)?;
    let mut found = [0; 4];
    found.copy_from_slice(&header[..4]);
    if found != MAGIC {
        return Err(ProtocolError::BadMagic { found });
    }
    let (len_p, len_b) = (usize::from(header[10]), usize::from(header[11]));
    if len_p > MAX_REPLICA_ID_LEN || len_b > MAX_REPLICA_ID_LEN {
        return Err(ProtocolError::Malformed("replica id longer than 64 bytes"));
    }
    let mut rest = vec![0u8; len_p + len_b + MAC_LEN];
    r.read_exact(&mut rest)?;
    let (ids, tag) = rest.split_at(len_p + len_b);
    let mut signed = Vec::with_capacity(REPLY_HEADER_LEN + ids.len());
    signed.extend_from_slice(&header);
    signed.extend_from_slice(ids);
    if !key.verify(REPLY_LABEL, &signed, tag) {
        return Err(ProtocolError::BadMac {
            unverified_status: header[6],
        });
    }
    let version = be_u16(&header[4..6]);
    let status = Status::from_byte(header[6]).ok_or(ProtocolError::Malformed("unknown status"))?;
    let mut nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&header[16..32]);
    if status != Status::Ok {
        return Ok(Reply {
            version,
            status,
            nonce,
            answer: None,
        });
    }
    if version != VERSION {
        return Err(ProtocolError::UnsupportedVersion { found: version });
    }
    let record = match header[9] {
        0 if len_p == 0 && len_b == 0 => None,
        1 if len_p > 0 => {
            let (p, b) = ids.split_at(len_p);
            Some(VmRecord {
                generation: be_u64(&header[32..40]),
                primary: ReplicaId::from_bytes(p)?,
                backup: if b.is_empty() {
                    None
                } else {
                    Some(ReplicaId::from_bytes(b)?)
                },
            })
        }
        _ => return Err(ProtocolError::Malformed("record flag and lengths disagree")),
    };
    let answer = match (header[7], header[8], record) {
        (1, 0, None) => Answer::Absent,
        (2, 0, Some(r)) => Answer::Present(r),
        (3, 0, Some(r)) => Answer::Won(r),
        (4, loss, current) => Answer::Lost {
            reason: loss_from_byte(loss).ok_or(ProtocolError::Malformed("unknown loss"))?,
            current,
        },
        _ => return Err(ProtocolError::Malformed("result, loss and record disagree")),
    };
    Ok(Reply {
        version,
        status,
        nonce,
        answer: Some(answer),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(b"0123456789abcdef0123456789abcdef").expect("key")
    }

    #[test]
    fn request_round_trip() {
        let k = key();
        let nonce = [7; NONCE_LEN];
        let commands = [
            Command::Read { vm: 1 },
            Command::TestAndSet {
                vm: 2,
                expected: 3,
                candidate: ReplicaId::new("a").expect("id"),
            },
            Command::Register {
                vm: u64::MAX,
                expected: 0,
                primary: ReplicaId::new("p".repeat(64)).expect("id"),
                backup: ReplicaId::new("b").expect("id"),
            },
        ];
        for c in commands {
            let bytes = encode_request(&k, &nonce, &c);
            let (n, back) = read_request(&mut &bytes[..], &k).expect("decodes");
            assert_eq!((n, back), (nonce, c));
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let k = key();
        let c = Command::TestAndSet {
            vm: 2,
            expected: 3,
            candidate: ReplicaId::new("ab").expect("id"),
        };
        let bytes = encode_request(&k, &[1; NONCE_LEN], &c);
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(read_request(&mut &b[..], &k).is_err(), "bit {i}");
        }
    }

    #[test]
    fn reply_round_trip() {
        let k = key();
        let r = VmRecord {
            generation: 9,
            primary: ReplicaId::new("p").expect("id"),
            backup: None,
        };
        let answers = [
            Answer::Absent,
            Answer::Present(r.clone()),
            Answer::Won(r.clone()),
            Answer::Lost {
                reason: Loss::Superseded,
                current: Some(r),
            },
            Answer::Lost {
                reason: Loss::Unregistered,
                current: None,
            },
        ];
        for a in answers {
            let bytes = encode_reply(&k, Status::Ok, &[3; NONCE_LEN], Some(&a));
            let reply = read_reply(&mut &bytes[..], &k).expect("decodes");
            assert_eq!(reply.answer, Some(a));
            let other = Key::new(b"another key, at least 32 bytes long").expect("key");
            assert!(matches!(
                read_reply(&mut &bytes[..], &other),
                Err(ProtocolError::BadMac { .. })
            ));
        }
    }

    /// Decoders of untrusted bytes never panic: random frames, and valid
    /// frames with random bytes changed, cut or appended.
    #[test]
    fn decoders_survive_random_bytes() {
        let k = key();
        let mut rng = fastrand::Rng::with_seed(0x2545_f491_4f6c_dd1d);
        let mut next = move || rng.u64(..);
        let request = encode_request(
            &k,
            &[5; NONCE_LEN],
            &Command::Register {
                vm: 1,
                expected: 2,
                primary: ReplicaId::new("p").expect("id"),
                backup: ReplicaId::new("b").expect("id"),
            },
        );
        let reply = encode_reply(&k, Status::Ok, &[5; NONCE_LEN], Some(&Answer::Absent));
        for i in 0..20_000u32 {
            let mut bytes = match i % 3 {
                0 => request.clone(),
                1 => reply.clone(),
                _ => (0..next() % 256).map(|_| next().to_le_bytes()[0]).collect(),
            };
            for _ in 0..next() % 4 {
                if !bytes.is_empty() {
                    let at = usize::try_from(next() % bytes.len() as u64).expect("small");
                    bytes[at] = next().to_le_bytes()[0];
                }
            }
            if next() % 4 == 0 {
                bytes.truncate(usize::try_from(next() % 200).expect("small"));
            }
            let _ = read_request(&mut &bytes[..], &k);
            let _ = read_reply(&mut &bytes[..], &k);
            let _ = crate::state::decode(&bytes);
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(Key::new(b"short").is_err());
    }
}
