//! The logging channel's wire protocol: handshake, frames, batches, acks,
//! heartbeats. Pure encoding and validation; the I/O lives in
//! [`crate::transport`] and the state machines in [`crate::endpoint`].
//!
//! # Handshake
//!
//! Neither end tells a peer anything (VM id, generation, a Hello) before
//! the peer has proved it holds the pre-shared key. The end that connected
//! proves first; the end that accepted (the one any process can reach)
//! checks that proof before it sends anything but its Nonce. A peer
//! without the key thus gets a Nonce (protocol, version, role, 32 random
//! bytes) and a close, from either end: a stray connection, an HTTP
//! request or garbage gets at most a Nonce and a `Verdict` naming the
//! failed check with public values only (magic, version, role, side; a
//! wrong key is `Verdict{Key}` with zeros).
//!
//! ```text
//!   connecting end (normally the primary)         accepting end (normally the backup)
//!        │── Nonce{role, side=1, nonce_c} ─────────────▶│  (both send at once)
//!        │◀──────────── Nonce{role, side=2, nonce_a} ───│  check magic, version,
//!        │                                              │  roles differ, sides differ
//!        │── Proof{HMAC(k, "proof" ‖ "C" ‖ N)} ────────▶│  verify, else Verdict{Key}
//!        │◀──────────── Proof{HMAC(k, "proof" ‖ "A" ‖ N)} ─│  and close
//!        │◀──── Hello{vm, gen, HMAC(k, "hello" ‖ "A" ‖ N ‖ fields)} ─│
//!  verify│── Hello{vm, gen, HMAC(k, "hello" ‖ "C" ‖ N ‖ fields)} ───▶│
//!        │   each checks the other's MAC, role, VM id, generation
//!        │── Verdict{ok or the failed check, with values} ─▶│
//!        │◀──────────────── Verdict{ok or the failed check} ─│
//! ```
//!
//! `N` is both Nonce messages (64 bytes each, the connecting end's first);
//! every MAC is HMAC-SHA256 under the pre-shared key, prefixed with
//! `"lockstep-channel-auth-v3"`. A proof covers both nonces and the
//! prover's side, so it can neither be replayed from another session nor
//! reflected back; a Hello's MAC covers its first 32 bytes (identity) and
//! both nonces. The side is the role's by default ([`Side::of`]: the
//! primary connects to a listening backup); a joining backup connects to
//! the primary's join port and says so with [`handshake_as`]. Two ends on
//! the same side are refused at once (`Verdict{Side}`), never left to wait
//! for each other. Every handshake message is 64 bytes, little-endian:
//!
//! ```text
//! offset size field
//! 0      8    magic     "LKSTPCHN"
//! 8      2    version   PROTOCOL_VERSION
//! 10     2    type      1 Hello, 2 Proof, 3 Verdict, 4 Nonce (0 invalid)
//! 12     2    role      Nonce, Hello: 1 primary (sends entries), 2 backup
//! 14     2    code      Nonce: side, 1 connecting, 2 accepting;
//!                       Verdict: 0 ok, else the RejectCode of the failed check
//! 16     8    a         Hello: VM id;      Verdict: the rejecter's value
//! 24     8    b         Hello: generation; Verdict: the value it was sent
//! 32     32   data      Nonce: random; Proof, Hello: HMAC-SHA256; Verdict: 0
//! ```
//!
//! # Per-connection keys
//!
//! A successful handshake derives two 32-byte frame keys, one per direction,
//! that no other connection shares (both nonces are in them) and that only
//! holders of the pre-shared key can compute ([`FrameKeys`]):
//!
//! ```text
//! material = len(psk) as u64 LE ‖ psk ‖ nonce_primary ‖ nonce_backup ‖ vm id ‖ generation
//! key P→B  = BLAKE3-derive_key("lockstep channel 2026-12 frames primary to backup v3", material)
//! key B→P  = BLAKE3-derive_key("lockstep channel 2026-12 frames backup to primary v3", material)
//! ```
//!
//! # Frames
//!
//! After the handshake both directions carry frames: a 56-byte header and a
//! payload. Every frame (batch, ack, heartbeat) is authenticated: its tag
//! is AES-256-GCM's under the direction's key, with the header's first 40
//! bytes as associated data, the payload (sent in the clear) as the
//! ciphertext and the frame counter as the nonce (see [`FrameSealer`]'s
//! `TagKey` for the exact construction; protocol 2 used keyed BLAKE3,
//! 4-7x slower here, see `benches/frame_mac.rs`). Each direction numbers its
//! frames 1, 2, 3, ...; a receiver accepts only a counter above the last
//! one it accepted, so a recorded frame can be neither replayed nor
//! reordered, and a frame or ack without the key can't be forged.
//!
//! ```text
//! offset size field
//! 0      2    kind        1 Batch, 2 Ack, 3 Heartbeat (0 invalid: a zeroed frame means nothing)
//! 2      2    flags       0
//! 4      4    len         payload bytes after the header
//! 8      8    generation  the session's generation; anything else is refused
//! 16     8    seq         Batch: sequence number (log position) of its first entry
//!                         Ack: cumulative, every entry <= seq was received
//!                         Heartbeat: the sender's latest ack (backup) or seq (primary)
//! 24     4    count       Batch: number of entries; else 0
//! 28     4    reserved    0
//! 32     8    counter     this direction's frame number, from 1, strictly increasing
//! 40     16   tag         AES-256-GCM tag (key of the direction, nonce = counter,
//!                         associated data = bytes 0..40, ciphertext = payload)
//! ```
//!
//! A batch payload is `count` entries, each length-prefixed and padded so
//! every entry starts 8-aligned (entries are opaque to the channel: each is a
//! [`crate::log`] entry with its own crc):
//!
//! ```text
//! offset size      field
//! 0      4         len       entry bytes
//! 4      4         reserved  0
//! 8      len       entry
//! 8+len  pad       zeros to a multiple of 8
//! ```
//!
//! Sequence numbers start at 1 and grow by one per entry with no gaps; the
//! receiver accepts a batch only if its first seq is exactly the next one it
//! expects, so a lost, duplicated or reordered batch stops the channel with an
//! error naming the sequence numbers.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// How long either end waits for each handshake message: a peer that
/// connects and says nothing (or a listener that never accepts) is
/// refused, never waited for forever.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Version of the handshake and frame layout; bumped on any change
/// (2: authenticated frames; 3: the accepting end reveals nothing before
/// the connecting end has proved the key).
pub const PROTOCOL_VERSION: u16 = 3;
/// Magic at the start of every handshake message.
pub const HANDSHAKE_MAGIC: [u8; 8] = *b"LKSTPCHN";
/// Size of a handshake message.
pub const HANDSHAKE_LEN: usize = size_of::<HandshakeMsg>();
/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = size_of::<FrameHeader>();
/// Size of the prefix before each entry in a batch.
pub const ENTRY_PREFIX_LEN: usize = 8;
/// Size of a frame's authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes of the header the tag covers (all before the tag).
const TAGGED_HEADER_LEN: usize = FRAME_HEADER_LEN - TAG_LEN;

/// A handshake message on the wire; see the module docs.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HandshakeMsg {
    /// "LKSTPCHN".
    pub magic: [u8; 8],
    /// Protocol version.
    pub version: U16,
    /// Message type (see [`MsgType`]).
    pub msg_type: U16,
    /// Role of the sender of a Hello.
    pub role: U16,
    /// Verdict code.
    pub code: U16,
    /// First value.
    pub a: U64,
    /// Second value.
    pub b: U64,
    /// Nonce or MAC.
    pub data: [u8; 32],
}

/// Handshake message types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum MsgType {
    /// Identity and nonce.
    Hello = 1,
    /// MAC over both hellos.
    Proof = 2,
    /// Accept (code 0) or reject.
    Verdict = 3,
    /// Role, side and random nonce: the first message of each end.
    Nonce = 4,
}

/// Which end of the connection runs a handshake: the one that proves the
/// key first ([`Side::Connecting`]) or the one that waits for that proof
/// before it sends anything but its Nonce ([`Side::Accepting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Side {
    /// The end that connected: it proves the key first.
    Connecting = 1,
    /// The end that accepted (reachable by any process that can connect).
    Accepting = 2,
}

impl Side {
    /// The default side of `role`: the primary connects to a listening
    /// backup. (A joining backup connects to the primary's join port and
    /// passes its side to [`handshake_as`].)
    pub fn of(role: Role) -> Self {
        match role {
            Role::Primary => Side::Connecting,
            Role::Backup => Side::Accepting,
        }
    }
    fn from_wire(v: u16) -> Option<Self> {
        match v {
            1 => Some(Side::Connecting),
            2 => Some(Side::Accepting),
            _ => None,
        }
    }
    fn other(self) -> Self {
        match self {
            Side::Connecting => Side::Accepting,
            Side::Accepting => Side::Connecting,
        }
    }
    fn label(self) -> &'static [u8] {
        match self {
            Side::Connecting => b"C",
            Side::Accepting => b"A",
        }
    }
}

/// Which end of the channel a process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Role {
    /// Sends log entries.
    Primary = 1,
    /// Receives log entries and acks them.
    Backup = 2,
}

impl Role {
    fn from_wire(v: u16) -> Option<Self> {
        match v {
            1 => Some(Role::Primary),
            2 => Some(Role::Backup),
            _ => None,
        }
    }
}

/// Why a handshake was refused; sent in a Verdict so both ends know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectCode {
    /// The Hello did not start with our magic.
    BadMagic = 1,
    /// Different protocol versions.
    Version = 2,
    /// Different VM identities.
    VmId = 3,
    /// Different generations.
    Generation = 4,
    /// The proof did not verify: a different key.
    Key = 5,
    /// Both ends claim the same role.
    Role = 6,
    /// Not the message expected at this step.
    Unexpected = 7,
    /// Both ends took the same [`Side`].
    Side = 8,
}

impl RejectCode {
    fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::BadMagic,
            2 => Self::Version,
            3 => Self::VmId,
            4 => Self::Generation,
            5 => Self::Key,
            6 => Self::Role,
            7 => Self::Unexpected,
            8 => Self::Side,
            _ => return None,
        })
    }
}

/// The identity one end presents in its Hello.
#[derive(Clone, Debug)]
pub struct Session {
    /// Which VM this log belongs to.
    pub vm_id: u64,
    /// Current generation (from the arbiter); older peers are refused.
    pub generation: u64,
    /// Our role.
    pub role: Role,
    /// Pre-shared key.
    pub key: Vec<u8>,
}

/// What a successful handshake established.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Established {
    /// Agreed VM id.
    pub vm_id: u64,
    /// Agreed generation.
    pub generation: u64,
    /// Peer's role.
    pub peer_role: Role,
    /// The primary's nonce then the backup's: unique to this connection,
    /// so a MAC over anything exchanged after the handshake (the RDMA
    /// set-up) that covers it cannot be replayed into another connection.
    pub binding: [u8; 64],
    /// The connection's frame keys (see the module docs).
    pub keys: FrameKeys,
}

/// The two frame keys of one connection (see the module docs); `Debug`
/// shows neither.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FrameKeys {
    /// Authenticates frames from the primary to the backup.
    pub primary_to_backup: [u8; 32],
    /// Authenticates frames from the backup to the primary.
    pub backup_to_primary: [u8; 32],
}

impl std::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKeys(..)")
    }
}

impl FrameKeys {
    /// Derives a connection's keys (see the module docs).
    pub fn derive(psk: &[u8], binding: &[u8; 64], vm_id: u64, generation: u64) -> Self {
        let mut material = Vec::with_capacity(8 + psk.len() + 64 + 16);
        material.extend_from_slice(&(psk.len() as u64).to_le_bytes());
        material.extend_from_slice(psk);
        material.extend_from_slice(binding);
        material.extend_from_slice(&vm_id.to_le_bytes());
        material.extend_from_slice(&generation.to_le_bytes());
        Self {
            primary_to_backup: blake3::derive_key(
                "lockstep channel 2026-12 frames primary to backup v3",
                &material,
            ),
            backup_to_primary: blake3::derive_key(
                "lockstep channel 2026-12 frames backup to primary v3",
                &material,
            ),
        }
    }

    /// Fixed keys for unit tests that build frames without a handshake.
    #[doc(hidden)]
    pub fn for_tests() -> Self {
        Self::derive(b"unit-test key", &[7; 64], 0, 0)
    }

    /// The sealer for frames `role` sends.
    pub fn sealer(&self, role: Role) -> FrameSealer {
        FrameSealer {
            key: FrameMac::Gcm(TagKey::new(&self.key_of(role))),
            next: 1,
        }
    }

    /// Rewrites the tag of the frame in `frame` (header and as much of
    /// its payload as is there) as `sender` would seal it, whatever its
    /// fields say: for fuzz targets that play a peer holding the key.
    #[doc(hidden)]
    pub fn retag_for_fuzzing(&self, sender: Role, frame: &mut [u8]) {
        let Ok((h, rest)) = FrameHeader::ref_from_prefix(frame) else {
            return;
        };
        let len = (h.len.get() as usize).min(rest.len());
        let tag = TagKey::new(&self.key_of(sender)).tag(
            h.counter.get(),
            &h.as_bytes()[..TAGGED_HEADER_LEN],
            &rest[..len],
        );
        frame[TAGGED_HEADER_LEN..FRAME_HEADER_LEN].copy_from_slice(&tag);
    }

    /// The opener for frames `role` receives (sent by its peer).
    pub fn opener(&self, role: Role) -> FrameOpener {
        let peer = match role {
            Role::Primary => Role::Backup,
            Role::Backup => Role::Primary,
        };
        FrameOpener {
            key: FrameMac::Gcm(TagKey::new(&self.key_of(peer))),
            last: 0,
        }
    }

    /// The key of frames sent by `sender`.
    pub fn key_of(&self, sender: Role) -> [u8; 32] {
        match sender {
            Role::Primary => self.primary_to_backup,
            Role::Backup => self.backup_to_primary,
        }
    }
}

/// Seals the frames one end sends: its direction's key and frame counter.
#[derive(Clone)]
pub struct FrameSealer {
    key: FrameMac,
    next: u64,
}

/// Checks the frames one end receives: the peer's direction key and the
/// last counter accepted.
#[derive(Clone)]
pub struct FrameOpener {
    key: FrameMac,
    last: u64,
}

impl FrameSealer {
    /// This sealer with unauthenticated crc32c framing instead of the tag:
    /// only for the same-run baseline of [`crate::bench`] (crate-private,
    /// so no replica can be built without authentication).
    pub(crate) fn crc32c_baseline(self) -> Self {
        Self {
            key: FrameMac::Crc32cBaseline,
            ..self
        }
    }
}

impl FrameOpener {
    /// Starts the tag of a frame whose header (the transport's private
    /// copy) is `header`, for a transport that hashes the payload as it
    /// copies it (see [`PreHashed`]). `None` under the bench's crc32c
    /// framing or for a header too short.
    pub(crate) fn start_hashing(&self, header: &[u8]) -> Option<FrameHasher<'_>> {
        let FrameMac::Gcm(key) = &self.key else {
            return None;
        };
        let (h, _) = FrameHeader::ref_from_prefix(header).ok()?;
        let mut tagged = [0u8; TAGGED_HEADER_LEN];
        tagged.copy_from_slice(&h.as_bytes()[..TAGGED_HEADER_LEN]);
        let mut g = key.ghash.start();
        g.update_padded(&tagged);
        Some(FrameHasher {
            key,
            g,
            header: tagged,
            counter: h.counter.get(),
            payload_len: h.len.get() as usize,
            hashed: 0,
        })
    }

    /// The opener matching [`FrameSealer::crc32c_baseline`] (bench only).
    pub(crate) fn crc32c_baseline(self) -> Self {
        Self {
            key: FrameMac::Crc32cBaseline,
            ..self
        }
    }
}

/// What a frame's 16 tag bytes hold.
// One per channel end, on the hot path: not boxed (no pointer chase).
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum FrameMac {
    /// The AES-256-GCM tag (every connection a replica makes).
    Gcm(TagKey),
    /// crc32c of the tagged header and the payload in the first 4 bytes,
    /// zeros after: the pre-authentication framing, reachable only from the
    /// crate's benchmark (its same-run baseline).
    Crc32cBaseline,
}

impl FrameMac {
    fn tag(&self, counter: u64, tagged_header: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        match self {
            FrameMac::Gcm(k) => k.tag(counter, tagged_header, payload),
            FrameMac::Crc32cBaseline => {
                let crc = crc32c::crc32c_append(crc32c::crc32c(tagged_header), payload);
                let mut tag = [0u8; TAG_LEN];
                tag[..4].copy_from_slice(&crc.to_le_bytes());
                tag
            }
        }
    }
}

/// One direction's tag key: AES-256 under the direction's frame key, and
/// GHASH keyed with `H = AES(key, 0^128)`, computed once per connection.
/// The tag of a frame is AES-GCM's (NIST SP 800-38D) with the 40 tagged
/// header bytes as associated data, the payload as the ciphertext (sent
/// in the clear: only authenticity is wanted) and the 96-bit nonce
/// `counter as u64 LE ‖ 0u32`:
///
/// ```text
/// S   = GHASH_H(header[..40] ‖ 0^64 ‖ payload ‖ 0-pad to 16 ‖ be64(40·8) ‖ be64(len·8))
/// tag = S ⊕ AES(key, counter LE ‖ 00 00 00 00 ‖ 00 00 00 01)
/// ```
///
/// The counter is the direction's frame number: it never repeats under
/// one key (keys are per connection and direction, and the sealer stops
/// at 2^64 - 1), which is what GCM's forgery bound asks. A test checks the
/// tags against RustCrypto `aes-gcm`'s own decryption.
#[derive(Clone)]
struct TagKey {
    aes: aes::Aes256,
    ghash: crate::ghash::GHashKey,
}

impl TagKey {
    fn new(key: &[u8; 32]) -> Self {
        use aes::cipher::{BlockEncrypt, KeyInit};
        let aes = aes::Aes256::new(key.into());
        let mut h = aes::Block::default();
        aes.encrypt_block(&mut h);
        Self {
            aes,
            ghash: crate::ghash::GHashKey::new(&h.into()),
        }
    }

    fn tag(&self, counter: u64, tagged_header: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut g = self.ghash.start();
        g.update_padded(tagged_header);
        g.update_padded(payload);
        self.finish(counter, g, tagged_header.len(), payload.len())
    }

    /// The tag from the GHASH state `g` after the header and the payload.
    fn finish(
        &self,
        counter: u64,
        mut g: crate::ghash::GHashState<'_>,
        header_len: usize,
        payload_len: usize,
    ) -> [u8; TAG_LEN] {
        use aes::cipher::BlockEncrypt;
        // Lengths in bits; a payload is at most 4 GiB (its length is a
        // u32 on the wire), so neither product overflows.
        let mut lengths = [0u8; 16];
        lengths[..8].copy_from_slice(&(header_len as u64 * 8).to_be_bytes());
        lengths[8..].copy_from_slice(&(payload_len as u64 * 8).to_be_bytes());
        g.update_padded(&lengths);
        let s = g.finalize();
        let mut j0 = aes::Block::default();
        j0[..8].copy_from_slice(&counter.to_le_bytes());
        j0[15] = 1;
        self.aes.encrypt_block(&mut j0);
        let mut tag = [0u8; TAG_LEN];
        for (t, (a, b)) in tag.iter_mut().zip(s.iter().zip(j0.iter())) {
            *t = a ^ b;
        }
        tag
    }
}

/// Constant-time equality of two tags.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A frame's tag computed by the transport while it copied the frame out
/// of memory the peer can write (the shared-memory ring), chunk by chunk
/// from its private copy as each chunk landed, so the payload is read
/// once while it is in cache instead of copied, then read again by
/// [`decode_frame`]. Only this crate's transports can make one
/// ([`FrameOpener::start_hashing`]); it is bound to the 40 tagged header
/// bytes it was computed with, and [`decode_frame_prehashed`] uses it only
/// for a frame with exactly those bytes (else it computes the tag itself).
/// The transport's contract: the payload it hashed is the payload of the
/// frame it returns (the same private copy).
#[derive(Clone, Copy, Debug)]
pub struct PreHashed {
    header: [u8; TAGGED_HEADER_LEN],
    tag: [u8; TAG_LEN],
}

/// A frame tag being computed over a payload copied in chunks (see
/// [`PreHashed`]).
pub(crate) struct FrameHasher<'k> {
    key: &'k TagKey,
    g: crate::ghash::GHashState<'k>,
    header: [u8; TAGGED_HEADER_LEN],
    counter: u64,
    payload_len: usize,
    hashed: usize,
}

impl FrameHasher<'_> {
    /// Payload bytes the header announces.
    pub(crate) fn payload_len(&self) -> usize {
        self.payload_len
    }

    /// Folds in the next payload bytes; every chunk but the last must be
    /// a multiple of 16 bytes long (GHASH pads each call's input).
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        debug_assert!(self.hashed.is_multiple_of(16));
        self.g.update_padded(chunk);
        self.hashed = self.hashed.saturating_add(chunk.len());
    }

    /// The tag, if exactly the announced payload was hashed.
    pub(crate) fn finish(self) -> Option<PreHashed> {
        (self.hashed == self.payload_len).then(|| PreHashed {
            header: self.header,
            tag: self
                .key
                .finish(self.counter, self.g, TAGGED_HEADER_LEN, self.payload_len),
        })
    }
}

/// Handshake failures. Each says which check failed and with which values.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// I/O on the handshake stream failed.
    #[error("handshake I/O failed")]
    Io(#[from] std::io::Error),
    /// The peer's first bytes are not our magic.
    #[error("peer speaks another protocol (magic {found:02x?}, expected \"LKSTPCHN\")")]
    BadMagic {
        /// The 8 bytes received.
        found: [u8; 8],
    },
    /// Same protocol, different version.
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's.
        theirs: u16,
    },
    /// The peer replicates another VM.
    #[error("VM identity mismatch: we are VM {ours:#x}, the peer is VM {theirs:#x}")]
    VmMismatch {
        /// Our VM id.
        ours: u64,
        /// The peer's.
        theirs: u64,
    },
    /// The peer's generation is older than ours: it is a stale replica.
    #[error("stale generation: the peer is at generation {theirs}, we are at {ours}")]
    StaleGeneration {
        /// Our generation.
        ours: u64,
        /// The peer's (older).
        theirs: u64,
    },
    /// The peer's generation is newer: we are the stale one and must stop.
    #[error("we are stale: we are at generation {ours}, the peer is at {theirs}")]
    WeAreStale {
        /// Our generation (older).
        ours: u64,
        /// The peer's.
        theirs: u64,
    },
    /// Both ends claim the same role.
    #[error("role conflict: both ends claim to be {0:?}")]
    RoleConflict(Role),
    /// Both ends took the same side of the handshake (both connected, or
    /// both accepted: a misconfiguration).
    #[error("side conflict: both ends took the {0:?} side of the handshake")]
    SideConflict(Side),
    /// The peer's proof did not verify under our key.
    #[error("wrong key: the peer's HMAC proof does not verify with our pre-shared key")]
    WrongKey,
    /// The peer refused us, and said why.
    #[error(
        "the peer rejected the handshake: {reason} (peer's value {peer_value}, ours {our_value})"
    )]
    Rejected {
        /// Which check failed on the peer's side.
        reason: &'static str,
        /// The peer's value.
        peer_value: u64,
        /// The value we sent.
        our_value: u64,
    },
    /// The peer sent a message out of order or of an unknown type.
    #[error("unexpected handshake message: expected type {expected}, got {got}")]
    Unexpected {
        /// Expected type.
        expected: u16,
        /// Received type.
        got: u16,
    },
    /// The key cannot key an HMAC.
    #[error("the pre-shared key cannot be used as an HMAC-SHA256 key")]
    BadKey,
    /// Randomness unavailable for the nonce.
    #[error("no randomness for the handshake nonce: {0}")]
    Random(String),
    /// The peer did not finish its part in time (it connected and fell
    /// silent, or drips bytes).
    #[error("the peer did not complete the handshake within {limit:?}")]
    TimedOut {
        /// The bound on the whole handshake.
        limit: std::time::Duration,
    },
    /// The peer closed the connection before the handshake was over.
    #[error("the peer closed the connection during the handshake")]
    Closed,
}

impl HandshakeError {
    fn reject_code(&self) -> Option<(RejectCode, u64, u64)> {
        Some(match *self {
            Self::BadMagic { .. } => (RejectCode::BadMagic, 0, 0),
            Self::VersionMismatch { ours, theirs } => {
                (RejectCode::Version, ours.into(), theirs.into())
            }
            Self::VmMismatch { ours, theirs } => (RejectCode::VmId, ours, theirs),
            Self::StaleGeneration { ours, theirs } | Self::WeAreStale { ours, theirs } => {
                (RejectCode::Generation, ours, theirs)
            }
            Self::RoleConflict(r) => (RejectCode::Role, r as u64, r as u64),
            Self::SideConflict(s) => (RejectCode::Side, s as u64, s as u64),
            Self::WrongKey => (RejectCode::Key, 0, 0),
            Self::Unexpected { expected, got } => {
                (RejectCode::Unexpected, expected.into(), got.into())
            }
            _ => return None,
        })
    }
}

fn msg(msg_type: MsgType, version: u16) -> HandshakeMsg {
    HandshakeMsg {
        magic: HANDSHAKE_MAGIC,
        version: version.into(),
        msg_type: (msg_type as u16).into(),
        role: 0.into(),
        code: 0.into(),
        a: 0.into(),
        b: 0.into(),
        data: [0; 32],
    }
}

fn read_msg(s: &mut impl std::io::Read) -> Result<HandshakeMsg, HandshakeError> {
    let mut buf = [0u8; HANDSHAKE_LEN];
    // The magic first: a peer speaking another protocol (an HTTP request
    // shorter than a message, say) is refused at once, not waited for.
    s.read_exact(&mut buf[..8])?;
    if buf[..8] != HANDSHAKE_MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&buf[..8]);
        return Err(HandshakeError::BadMagic { found });
    }
    s.read_exact(&mut buf[8..])?;
    let m = HandshakeMsg::read_from_bytes(&buf[..]).map_err(|_| HandshakeError::Unexpected {
        expected: 0,
        got: 0,
    })?;
    if m.magic != HANDSHAKE_MAGIC {
        return Err(HandshakeError::BadMagic { found: m.magic });
    }
    Ok(m)
}

fn write_msgs(s: &mut impl std::io::Write, msgs: &[&HandshakeMsg]) -> Result<(), HandshakeError> {
    let mut buf = Vec::with_capacity(msgs.len() * HANDSHAKE_LEN);
    for m in msgs {
        buf.extend_from_slice(m.as_bytes());
    }
    s.write_all(&buf)?;
    s.flush()?;
    Ok(())
}

/// HMAC-SHA256 under the pre-shared key over a label, the side that
/// computes it, the two Nonce messages (connecting end's first) and
/// `extra`.
fn transcript_mac(
    key: &[u8],
    what: &[u8],
    side: Side,
    nonces: &[HandshakeMsg; 2],
    extra: &[u8],
) -> Result<Hmac<Sha256>, HandshakeError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| HandshakeError::BadKey)?;
    mac.update(b"lockstep-channel-auth-v3");
    mac.update(what);
    mac.update(side.label());
    mac.update(nonces[0].as_bytes());
    mac.update(nonces[1].as_bytes());
    mac.update(extra);
    Ok(mac)
}

/// The bytes of a Hello its MAC covers: all before `data`.
fn hello_fields(m: &HandshakeMsg) -> &[u8] {
    &m.as_bytes()[..32]
}

/// A stream whose reads can time out: what [`handshake_timed`] runs on.
pub trait TimedStream: std::io::Read + std::io::Write {
    /// As `TcpStream::set_read_timeout`.
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()>;
}

impl TimedStream for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

impl TimedStream for std::os::unix::net::UnixStream {
    fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

/// [`handshake`] bounded by [`HANDSHAKE_TIMEOUT`] as a whole (not per
/// read: a peer that drips a byte at a time is cut off as surely as a
/// silent one); the stream is left without a read timeout when it succeeds.
pub fn handshake_timed<S: TimedStream>(
    stream: &mut S,
    session: &Session,
    version: u16,
) -> Result<Established, HandshakeError> {
    handshake_within(stream, session, version, HANDSHAKE_TIMEOUT)
}

/// [`handshake_timed`] with another bound.
pub fn handshake_within<S: TimedStream>(
    stream: &mut S,
    session: &Session,
    version: u16,
    limit: std::time::Duration,
) -> Result<Established, HandshakeError> {
    let mut bounded = Deadline {
        inner: &mut *stream,
        until: std::time::Instant::now() + limit,
    };
    let established = handshake(&mut bounded, session, version).map_err(|e| match e {
        HandshakeError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            HandshakeError::TimedOut { limit }
        }
        HandshakeError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            HandshakeError::Closed
        }
        other => other,
    })?;
    stream.set_read_timeout(None)?;
    Ok(established)
}

/// A stream whose every read waits at most until `until`.
struct Deadline<'a, S: TimedStream> {
    inner: &'a mut S,
    until: std::time::Instant,
}

impl<S: TimedStream> std::io::Read for Deadline<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.inner.set_read_timeout(Some(left))?;
        self.inner.read(buf)
    }
}

impl<S: TimedStream> std::io::Write for Deadline<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Runs the handshake on a connected stream (TCP or unix socket) with the
/// given identity and `version` (normally [`PROTOCOL_VERSION`]; tests pass
/// another to play an incompatible peer), on the side [`Side::of`] the
/// role: the primary proves first, as it connects to a listening backup.
/// Where the backup connects (a joiner), use [`handshake_as`].
pub fn handshake<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    session: &Session,
    version: u16,
) -> Result<Established, HandshakeError> {
    handshake_as(stream, session, version, Side::of(session.role))
}

/// Sends the verdict for `e` (best effort: the peer may be gone) and
/// returns `e`. Before the peer has proved the key, only checks whose
/// values are public fail here (magic, version, role, side, and a wrong
/// key, whose verdict carries zeros); the VM id and generation are
/// compared, and sent back, only after both proofs.
fn fail<S: std::io::Write>(stream: &mut S, version: u16, e: HandshakeError) -> HandshakeError {
    if let Some((code, a, b)) = e.reject_code() {
        let mut v = msg(MsgType::Verdict, version);
        v.code = (code as u16).into();
        v.a = a.into();
        v.b = b.into();
        let _ = write_msgs(stream, &[&v]);
    }
    e
}

/// The error a Verdict received instead of the expected message means.
fn verdict_error(peer: &HandshakeMsg, session: &Session, version: u16) -> HandshakeError {
    let (theirs, sent) = (peer.a.get(), peer.b.get());
    match RejectCode::from_wire(peer.code.get()) {
        Some(RejectCode::Version) => HandshakeError::VersionMismatch {
            ours: version,
            theirs: u16::try_from(theirs).unwrap_or(u16::MAX),
        },
        Some(RejectCode::Generation) if sent == session.generation && theirs > sent => {
            HandshakeError::WeAreStale { ours: sent, theirs }
        }
        Some(RejectCode::Generation) if sent == session.generation && theirs < sent => {
            HandshakeError::StaleGeneration { ours: sent, theirs }
        }
        _ => rejected(peer),
    }
}

/// Reads the next message, which must be of type `want` (a Verdict
/// instead is the peer's refusal, turned into its error).
fn expect<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    want: MsgType,
    session: &Session,
    version: u16,
) -> Result<HandshakeMsg, HandshakeError> {
    let m = read_msg(stream)?;
    if m.msg_type.get() == MsgType::Verdict as u16 && want != MsgType::Verdict {
        return Err(verdict_error(&m, session, version));
    }
    if m.version.get() != version {
        return Err(fail(
            stream,
            version,
            HandshakeError::VersionMismatch {
                ours: version,
                theirs: m.version.get(),
            },
        ));
    }
    if m.msg_type.get() != want as u16 {
        return Err(fail(
            stream,
            version,
            HandshakeError::Unexpected {
                expected: want as u16,
                got: m.msg_type.get(),
            },
        ));
    }
    Ok(m)
}

/// [`handshake`] on an explicit side: `Side::Connecting` for the end that
/// connected (it proves the key first), `Side::Accepting` for the end
/// that accepted (it reveals nothing until the peer has proved the key).
/// Both ends must take opposite sides; the same side on both is refused
/// with [`HandshakeError::SideConflict`] at once.
pub fn handshake_as<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    session: &Session,
    version: u16,
    side: Side,
) -> Result<Established, HandshakeError> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| HandshakeError::Random(e.to_string()))?;
    let mut mine = msg(MsgType::Nonce, version);
    mine.role = (session.role as u16).into();
    mine.code = (side as u16).into();
    mine.data = nonce;
    // 1. Both ends send their Nonce at once: nothing but the protocol,
    //    the role and 32 random bytes.
    write_msgs(stream, &[&mine])?;
    let peer = expect(stream, MsgType::Nonce, session, version)?;
    let peer_role = match Role::from_wire(peer.role.get()) {
        Some(r) if r != session.role => r,
        _ => {
            return Err(fail(
                stream,
                version,
                HandshakeError::RoleConflict(session.role),
            ));
        }
    };
    if Side::from_wire(peer.code.get()) != Some(side.other()) {
        return Err(fail(stream, version, HandshakeError::SideConflict(side)));
    }
    let nonces = match side {
        Side::Connecting => [mine, peer],
        Side::Accepting => [peer, mine],
    };
    let prove = |s: Side| -> Result<Hmac<Sha256>, HandshakeError> {
        transcript_mac(&session.key, b"proof", s, &nonces, &[])
    };
    let my_proof = || -> Result<HandshakeMsg, HandshakeError> {
        let mut p = msg(MsgType::Proof, version);
        p.data = prove(side)?.finalize().into_bytes().into();
        Ok(p)
    };
    let check_proof = |stream: &mut S| -> Result<(), HandshakeError> {
        let p = expect(stream, MsgType::Proof, session, version)?;
        if prove(side.other())?.verify_slice(&p.data).is_err() {
            return Err(fail(stream, version, HandshakeError::WrongKey));
        }
        Ok(())
    };
    let mut hello = msg(MsgType::Hello, version);
    hello.role = (session.role as u16).into();
    hello.a = session.vm_id.into();
    hello.b = session.generation.into();
    hello.data = transcript_mac(&session.key, b"hello", side, &nonces, hello_fields(&hello))?
        .finalize()
        .into_bytes()
        .into();
    // 2. The connecting end proves the key; the accepting end checks the
    //    proof before it sends anything that depends on the key or on
    //    who it is, then proves the key in turn with its Hello. The
    //    connecting end sends its Hello only after checking that proof.
    match side {
        Side::Connecting => {
            write_msgs(stream, &[&my_proof()?])?;
            check_proof(stream)?;
            write_msgs(stream, &[&hello])?;
        }
        Side::Accepting => {
            check_proof(stream)?;
            write_msgs(stream, &[&my_proof()?, &hello])?;
        }
    }
    // 3. Hellos, MAC'd under the key over the session's nonces: each end
    //    checks the other's identity and tells its verdict.
    let theirs = expect(stream, MsgType::Hello, session, version)?;
    if transcript_mac(
        &session.key,
        b"hello",
        side.other(),
        &nonces,
        hello_fields(&theirs),
    )?
    .verify_slice(&theirs.data)
    .is_err()
    {
        return Err(fail(stream, version, HandshakeError::WrongKey));
    }
    if theirs.role.get() != peer_role as u16 {
        return Err(fail(
            stream,
            version,
            HandshakeError::RoleConflict(session.role),
        ));
    }
    if theirs.a.get() != session.vm_id {
        return Err(fail(
            stream,
            version,
            HandshakeError::VmMismatch {
                ours: session.vm_id,
                theirs: theirs.a.get(),
            },
        ));
    }
    let (ours, their_gen) = (session.generation, theirs.b.get());
    if their_gen < ours {
        return Err(fail(
            stream,
            version,
            HandshakeError::StaleGeneration {
                ours,
                theirs: their_gen,
            },
        ));
    }
    if their_gen > ours {
        return Err(fail(
            stream,
            version,
            HandshakeError::WeAreStale {
                ours,
                theirs: their_gen,
            },
        ));
    }
    write_msgs(stream, &[&msg(MsgType::Verdict, version)])?;
    let verdict = expect(stream, MsgType::Verdict, session, version)?;
    if verdict.code.get() != 0 {
        return Err(verdict_error(&verdict, session, version));
    }
    let mut binding = [0u8; 64];
    let (primary, backup) = match session.role {
        Role::Primary => (&mine.data, &peer.data),
        Role::Backup => (&peer.data, &mine.data),
    };
    binding[..32].copy_from_slice(primary);
    binding[32..].copy_from_slice(backup);
    Ok(Established {
        vm_id: session.vm_id,
        generation: session.generation,
        peer_role,
        binding,
        keys: FrameKeys::derive(&session.key, &binding, session.vm_id, session.generation),
    })
}

fn rejected(v: &HandshakeMsg) -> HandshakeError {
    let reason = match RejectCode::from_wire(v.code.get()) {
        Some(RejectCode::BadMagic) => "we do not speak its protocol (bad magic)",
        Some(RejectCode::Version) => "protocol version mismatch",
        Some(RejectCode::VmId) => "VM identity mismatch",
        Some(RejectCode::Generation) => "generation mismatch",
        Some(RejectCode::Key) => "wrong key (our HMAC proof did not verify)",
        Some(RejectCode::Role) => "role conflict",
        Some(RejectCode::Unexpected) => "unexpected message",
        Some(RejectCode::Side) => "both ends took the same side (both connected or both accepted)",
        None => "unknown reason",
    };
    HandshakeError::Rejected {
        reason,
        peer_value: v.a.get(),
        our_value: v.b.get(),
    }
}

/// A frame header on the wire; see the module docs.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FrameHeader {
    /// Frame kind ([`FrameKind`]).
    pub kind: U16,
    /// Reserved flags, 0.
    pub flags: U16,
    /// Payload length.
    pub len: U32,
    /// Session generation.
    pub generation: U64,
    /// Sequence number or ack.
    pub seq: U64,
    /// Entry count.
    pub count: U32,
    /// Reserved, 0.
    pub reserved: U32,
    /// The direction's frame counter.
    pub counter: U64,
    /// Authentication tag.
    pub tag: [u8; TAG_LEN],
}

/// Frame kinds. 0 is reserved as invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Entries.
    Batch = 1,
    /// Cumulative acknowledgement.
    Ack = 2,
    /// Liveness.
    Heartbeat = 3,
}

impl FrameKind {
    fn from_wire(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::Batch),
            2 => Some(Self::Ack),
            3 => Some(Self::Heartbeat),
            _ => None,
        }
    }
}

/// Payload length announced by a frame's first bytes, for transports that
/// must find frame boundaries in a byte stream. `None` if fewer than a
/// header's bytes are given.
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    let (h, _) = FrameHeader::ref_from_prefix(bytes).ok()?;
    Some(FRAME_HEADER_LEN.saturating_add(h.len.get() as usize))
}

/// Frame and batch decoding failures. Each names the sequence numbers involved.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than a header, or than the header announces.
    #[error("truncated frame: {got} bytes, header announces {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes announced.
        want: usize,
    },
    /// The tag does not verify: the bytes were damaged on the way, or the
    /// frame was forged by someone without this connection's key.
    #[error(
        "corrupt frame: its authentication tag does not verify (damaged, or forged without the key) claiming sequence number {seq} (frame counter {counter}); expected sequence number {expected_seq}"
    )]
    Corrupt {
        /// seq field as read (it may itself be corrupt).
        seq: u64,
        /// The next sequence number we expected.
        expected_seq: u64,
        /// Frame counter as read.
        counter: u64,
    },
    /// An authentic frame whose counter is not above the last one
    /// accepted: a recorded frame played again or out of order.
    #[error(
        "replayed frame: frame counter {counter} is not above {last}, the last accepted (sequence number {seq})"
    )]
    Replayed {
        /// Its counter.
        counter: u64,
        /// The last counter accepted.
        last: u64,
        /// Its seq field.
        seq: u64,
    },
    /// The sender ran out of frame counters (2^64 frames: never in practice).
    #[error("frame counter exhausted")]
    CounterExhausted,
    /// Unknown kind (0 or newer than us).
    #[error("frame of unknown kind {kind} at sequence number {seq}")]
    UnknownKind {
        /// Kind value.
        kind: u16,
        /// seq field.
        seq: u64,
    },
    /// A frame from another generation.
    #[error(
        "stale generation: frame at sequence number {seq} is from generation {theirs}, the session is at {ours}"
    )]
    StaleGeneration {
        /// Session generation.
        ours: u64,
        /// Frame's generation.
        theirs: u64,
        /// Frame's seq.
        seq: u64,
    },
    /// A batch repeating entries already received.
    #[error("duplicate batch: starts at sequence number {seq}, but {expected} is the next expected (already received up to {})", expected - 1)]
    Duplicate {
        /// First seq of the batch.
        seq: u64,
        /// Expected first seq.
        expected: u64,
    },
    /// A batch skipping entries.
    #[error(
        "out-of-order batch: starts at sequence number {seq}, but {expected} is the next expected (entries missing)"
    )]
    Gap {
        /// First seq of the batch.
        seq: u64,
        /// Expected first seq.
        expected: u64,
    },
    /// The entries inside a batch do not add up.
    #[error("malformed batch at sequence number {seq}: {reason}")]
    Malformed {
        /// First seq of the batch.
        seq: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An ack for entries never sent.
    #[error("ack for sequence number {ack}, but only up to {sent} were sent")]
    AckBeyondSent {
        /// The ack.
        ack: u64,
        /// Highest sent seq.
        sent: u64,
    },
}

/// A validated frame (not yet checked for sequence order).
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    /// Kind.
    pub kind: FrameKind,
    /// seq field.
    pub seq: u64,
    /// count field.
    pub count: u32,
    /// Payload.
    pub payload: &'a [u8],
}

/// Checks a whole frame's tag, counter, kind and generation with `opener`
/// (which then expects a higher counter). `expected_seq` only serves the
/// error message. The returned payload is the very bytes the tag was
/// checked on: decode from it, never from another read of the source.
pub fn decode_frame<'a>(
    bytes: &'a [u8],
    generation: u64,
    expected_seq: u64,
    opener: &mut FrameOpener,
) -> Result<Frame<'a>, FrameError> {
    decode_frame_prehashed(bytes, generation, expected_seq, opener, None)
}

/// [`decode_frame`] with the tag the transport computed as it copied the
/// frame ([`PreHashed`]; used only if its header bytes are this frame's).
pub fn decode_frame_prehashed<'a>(
    bytes: &'a [u8],
    generation: u64,
    expected_seq: u64,
    opener: &mut FrameOpener,
    pre: Option<PreHashed>,
) -> Result<Frame<'a>, FrameError> {
    let (h, rest) = FrameHeader::ref_from_prefix(bytes).map_err(|_| FrameError::Truncated {
        got: bytes.len(),
        want: FRAME_HEADER_LEN,
    })?;
    let len = h.len.get() as usize;
    if rest.len() < len {
        return Err(FrameError::Truncated {
            got: bytes.len(),
            want: FRAME_HEADER_LEN.saturating_add(len),
        });
    }
    let payload = &rest[..len];
    let tagged = &h.as_bytes()[..TAGGED_HEADER_LEN];
    let computed = match pre {
        Some(p) if matches!(opener.key, FrameMac::Gcm(_)) && p.header[..] == *tagged => p.tag,
        _ => opener.key.tag(h.counter.get(), tagged, payload),
    };
    if !tags_equal(&computed, &h.tag) {
        return Err(FrameError::Corrupt {
            seq: h.seq.get(),
            expected_seq,
            counter: h.counter.get(),
        });
    }
    if h.counter.get() <= opener.last {
        return Err(FrameError::Replayed {
            counter: h.counter.get(),
            last: opener.last,
            seq: h.seq.get(),
        });
    }
    opener.last = h.counter.get();
    let kind = FrameKind::from_wire(h.kind.get()).ok_or(FrameError::UnknownKind {
        kind: h.kind.get(),
        seq: h.seq.get(),
    })?;
    if h.generation.get() != generation {
        return Err(FrameError::StaleGeneration {
            ours: generation,
            theirs: h.generation.get(),
            seq: h.seq.get(),
        });
    }
    Ok(Frame {
        kind,
        seq: h.seq.get(),
        count: h.count.get(),
        payload,
    })
}

/// Writes a complete frame with an empty payload (ack, heartbeat) into `buf`;
/// returns its length.
pub fn encode_control(
    buf: &mut [u8],
    kind: FrameKind,
    generation: u64,
    seq: u64,
    sealer: &mut FrameSealer,
) -> Result<usize, FrameError> {
    seal(buf, kind, generation, seq, 0, 0, sealer)
}

/// Writes the header of a frame whose `payload_len` payload bytes already sit
/// at `buf[FRAME_HEADER_LEN..]`, with the next counter of `sealer` and the
/// tag; returns the frame length.
///
/// # Panics
/// If `buf` is shorter than the frame (a caller bug).
pub fn seal(
    buf: &mut [u8],
    kind: FrameKind,
    generation: u64,
    seq: u64,
    count: u32,
    payload_len: usize,
    sealer: &mut FrameSealer,
) -> Result<usize, FrameError> {
    let mut h = sealer.begin(kind, generation, seq, count, payload_len)?;
    h.update(&buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload_len]);
    buf[..FRAME_HEADER_LEN].copy_from_slice(&h.finish());
    Ok(FRAME_HEADER_LEN + payload_len)
}

/// A frame being sealed: its header (counter taken) and its tag, computed
/// over the payload chunk by chunk as the transport copies it
/// ([`crate::transport::Transport::commit_sealed`]: the shared-memory ring
/// hashes each chunk as it writes it, so the payload is read once). Made
/// only by this crate ([`seal`] and the sender).
pub struct SealHasher<'k> {
    header: FrameHeader,
    mac: Running<'k>,
    hashed: usize,
}

/// A tag under way.
enum Running<'k> {
    Gcm(&'k TagKey, crate::ghash::GHashState<'k>),
    Crc32c(u32),
}

impl FrameSealer {
    /// Takes the next counter and starts the frame (see [`SealHasher`]).
    pub(crate) fn begin(
        &mut self,
        kind: FrameKind,
        generation: u64,
        seq: u64,
        count: u32,
        payload_len: usize,
    ) -> Result<SealHasher<'_>, FrameError> {
        let counter = self.next;
        self.next = counter.checked_add(1).ok_or(FrameError::CounterExhausted)?;
        let header = FrameHeader {
            kind: (kind as u16).into(),
            flags: 0.into(),
            len: u32::try_from(payload_len)
                .map_err(|_| FrameError::Malformed {
                    seq,
                    reason: "payload longer than 4 GiB",
                })?
                .into(),
            generation: generation.into(),
            seq: seq.into(),
            count: count.into(),
            reserved: 0.into(),
            counter: counter.into(),
            tag: [0; TAG_LEN],
        };
        let tagged = &header.as_bytes()[..TAGGED_HEADER_LEN];
        let mac = match &self.key {
            FrameMac::Gcm(key) => {
                let mut g = key.ghash.start();
                g.update_padded(tagged);
                Running::Gcm(key, g)
            }
            FrameMac::Crc32cBaseline => Running::Crc32c(crc32c::crc32c(tagged)),
        };
        Ok(SealHasher {
            header,
            mac,
            hashed: 0,
        })
    }
}

impl SealHasher<'_> {
    /// The whole frame's length.
    pub(crate) fn frame_len(&self) -> usize {
        FRAME_HEADER_LEN + self.header.len.get() as usize
    }

    /// Folds in the next payload bytes; every chunk but the last must be
    /// a multiple of 16 bytes long (GHASH pads each call's input).
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        debug_assert!(self.hashed.is_multiple_of(16));
        self.hashed = self.hashed.saturating_add(chunk.len());
        match &mut self.mac {
            Running::Gcm(_, g) => g.update_padded(chunk),
            Running::Crc32c(c) => *c = crc32c::crc32c_append(*c, chunk),
        }
    }

    /// The header with its tag, to be written before the payload.
    pub(crate) fn finish(self) -> [u8; FRAME_HEADER_LEN] {
        debug_assert_eq!(self.hashed, self.header.len.get() as usize);
        let mut header = self.header;
        header.tag = match self.mac {
            Running::Gcm(key, g) => key.finish(
                header.counter.get(),
                g,
                TAGGED_HEADER_LEN,
                header.len.get() as usize,
            ),
            Running::Crc32c(c) => {
                let mut tag = [0u8; TAG_LEN];
                tag[..4].copy_from_slice(&c.to_le_bytes());
                tag
            }
        };
        let mut out = [0u8; FRAME_HEADER_LEN];
        out.copy_from_slice(header.as_bytes());
        out
    }
}

/// Space an entry of `len` bytes takes in a batch payload.
pub const fn entry_space(len: usize) -> usize {
    ENTRY_PREFIX_LEN + len.next_multiple_of(8)
}

/// Appends one entry at `buf[at..]` (which must have room for
/// [`entry_space`]`(entry.len())`); returns the new end.
pub fn put_entry(buf: &mut [u8], at: usize, entry: &[u8]) -> usize {
    let len = entry.len();
    buf[at..at + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[at + 4..at + 8].fill(0);
    buf[at + 8..at + 8 + len].copy_from_slice(entry);
    let end = at + entry_space(len);
    buf[at + 8 + len..end].fill(0);
    end
}

/// Iterates over a batch's entries, checking the count and the lengths.
pub fn batch_entries<'a>(frame: &Frame<'a>) -> BatchEntries<'a> {
    BatchEntries {
        rest: frame.payload,
        left: frame.count,
        seq: frame.seq,
        past_last_seq: false,
    }
}

/// Iterator over `(seq, entry)` of a batch; see [`batch_entries`].
#[derive(Debug)]
pub struct BatchEntries<'a> {
    rest: &'a [u8],
    left: u32,
    seq: u64,
    /// The last entry had sequence number `u64::MAX`.
    past_last_seq: bool,
}

impl<'a> Iterator for BatchEntries<'a> {
    type Item = Result<(u64, &'a [u8]), FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            if self.rest.is_empty() {
                return None;
            }
            self.rest = &[];
            return Some(Err(FrameError::Malformed {
                seq: self.seq,
                reason: "bytes left after the last entry",
            }));
        }
        if self.past_last_seq {
            self.left = 0;
            self.rest = &[];
            return Some(Err(FrameError::Malformed {
                seq: self.seq,
                reason: "entries run past sequence number 2^64 - 1",
            }));
        }
        let bad = |reason| {
            Some(Err(FrameError::Malformed {
                seq: self.seq,
                reason,
            }))
        };
        if self.rest.len() < ENTRY_PREFIX_LEN {
            self.left = 0;
            return bad("entry prefix past the end of the batch");
        }
        let mut l = [0u8; 4];
        l.copy_from_slice(&self.rest[..4]);
        let len = u32::from_le_bytes(l) as usize;
        let space = entry_space(len);
        if space > self.rest.len() {
            self.left = 0;
            return bad("entry runs past the end of the batch");
        }
        let entry = &self.rest[ENTRY_PREFIX_LEN..ENTRY_PREFIX_LEN + len];
        self.rest = &self.rest[space..];
        self.left -= 1;
        let seq = self.seq;
        // The seq field comes off the wire: a batch whose entries would run
        // past the last sequence number is malformed (found by fuzzing).
        match seq.checked_add(1) {
            Some(next) => self.seq = next,
            None => self.past_last_seq = true,
        }
        Some(Ok((seq, entry)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sealer() -> FrameSealer {
        FrameKeys::for_tests().sealer(Role::Primary)
    }

    fn opener() -> FrameOpener {
        FrameKeys::for_tests().opener(Role::Backup)
    }

    fn batch(gen_: u64, seq: u64, entries: &[&[u8]]) -> Vec<u8> {
        batch_with(&mut sealer(), gen_, seq, entries)
    }

    fn batch_with(sealer: &mut FrameSealer, gen_: u64, seq: u64, entries: &[&[u8]]) -> Vec<u8> {
        batch_with_cap(sealer, gen_, seq, entries, 4096)
    }

    fn batch_with_cap(
        sealer: &mut FrameSealer,
        gen_: u64,
        seq: u64,
        entries: &[&[u8]],
        cap: usize,
    ) -> Vec<u8> {
        let mut buf = vec![0u8; cap.max(4096)];
        let mut at = FRAME_HEADER_LEN;
        for e in entries {
            at = put_entry(&mut buf, at, e);
        }
        let n = seal(
            &mut buf,
            FrameKind::Batch,
            gen_,
            seq,
            entries.len() as u32,
            at - FRAME_HEADER_LEN,
            sealer,
        )
        .unwrap();
        buf.truncate(n);
        buf
    }

    /// A tag computed chunk by chunk as a transport copies the payload
    /// ([`FrameOpener::start_hashing`]) equals the sealed one, for payloads
    /// around the GHASH strides; a damaged payload hashed that way is
    /// refused; a pre-hashed tag is ignored for a frame with other header
    /// bytes, and a header announcing more than was hashed gets none.
    #[test]
    fn tags_hashed_while_copying_match_and_still_refuse() {
        let mut s = sealer();
        let mut o = opener();
        let mut seq = 1;
        for len in [0usize, 1, 16, 255, 256, 257, 2048, 2049, 5000, 65536] {
            let entry = vec![0xa5u8; len];
            let frame = batch_with_cap(&mut s, 1, seq, &[&entry], len + 64);
            for chunk in [16, 256, 2048] {
                let mut h = o.start_hashing(&frame).unwrap();
                let end = FRAME_HEADER_LEN + h.payload_len();
                for c in frame[FRAME_HEADER_LEN..end].chunks(chunk) {
                    h.update(c);
                }
                let pre = h.finish().unwrap();
                let want = FrameHeader::ref_from_prefix(&frame[..]).unwrap().0.tag;
                assert_eq!(pre.tag, want, "len {len} chunk {chunk}");
                let mut bad = frame.clone();
                *bad.last_mut().unwrap() ^= 1;
                let mut h = o.start_hashing(&bad).unwrap();
                h.update(&bad[FRAME_HEADER_LEN..]);
                let pre_bad = h.finish();
                assert!(matches!(
                    decode_frame_prehashed(&bad, 1, seq, &mut o.clone(), pre_bad),
                    Err(FrameError::Corrupt { .. })
                ));
            }
            let mut h = o.start_hashing(&frame).unwrap();
            h.update(&frame[FRAME_HEADER_LEN..frame.len() - 8]);
            assert!(h.finish().is_none(), "too few bytes hashed");
            let mut h = o.start_hashing(&frame).unwrap();
            h.update(&frame[FRAME_HEADER_LEN..]);
            let pre = h.finish();
            decode_frame_prehashed(&frame, 1, seq, &mut o, pre).unwrap();
            seq += 1;
        }
        // A tag hashed for one frame is not used for another header: the
        // next frame is checked on its own bytes (and passes).
        let first = batch_with(&mut s, 1, seq, &[b"a"]);
        let second = batch_with(&mut s, 1, seq + 1, &[b"b"]);
        let mut h = o.start_hashing(&first).unwrap();
        h.update(&first[FRAME_HEADER_LEN..]);
        let pre_first = h.finish();
        let mut o2 = o.clone();
        decode_frame_prehashed(&second, 1, seq + 1, &mut o2, pre_first).unwrap();
        // The crc32c baseline opener hashes nothing ahead.
        assert!(opener().crc32c_baseline().start_hashing(&first).is_none());
    }

    /// A frame sealed chunk by chunk (as the shm ring seals while it
    /// copies) is the frame [`seal`] makes, in both framings.
    #[test]
    fn sealing_in_chunks_equals_sealing_whole() {
        for crc in [false, true] {
            for len in [0usize, 1, 255, 2048, 2049, 5000, 65536] {
                let mut whole = sealer();
                if crc {
                    whole = whole.crc32c_baseline();
                }
                let mut chunked = whole.clone();
                let mut buf = vec![0u8; FRAME_HEADER_LEN + len];
                for (i, b) in buf[FRAME_HEADER_LEN..].iter_mut().enumerate() {
                    *b = (i * 7) as u8;
                }
                let payload = buf[FRAME_HEADER_LEN..].to_vec();
                seal(&mut buf, FrameKind::Batch, 2, 5, 1, len, &mut whole).unwrap();
                let mut h = chunked.begin(FrameKind::Batch, 2, 5, 1, len).unwrap();
                assert_eq!(h.frame_len(), buf.len());
                for c in payload.chunks(2048) {
                    h.update(c);
                }
                assert_eq!(
                    h.finish()[..],
                    buf[..FRAME_HEADER_LEN],
                    "crc {crc} len {len}"
                );
            }
        }
    }

    /// The bench-only crc32c framing round-trips with its own opener, and
    /// a frame it sealed is refused by every real (authenticating) opener:
    /// it cannot stand in for a tag.
    #[test]
    fn crc32c_baseline_frames_are_refused_by_authenticating_ends() {
        let mut crc = sealer().crc32c_baseline();
        let frame = batch_with(&mut crc, 1, 1, &[b"unauthenticated"]);
        let f = decode_frame(&frame, 1, 1, &mut opener().crc32c_baseline()).unwrap();
        assert_eq!(f.count, 1);
        assert!(matches!(
            decode_frame(&frame, 1, 1, &mut opener()),
            Err(FrameError::Corrupt { .. })
        ));
        // And the crc still catches damage in the baseline.
        let mut bad = frame.clone();
        bad[FRAME_HEADER_LEN + 9] ^= 1;
        assert!(matches!(
            decode_frame(&bad, 1, 1, &mut opener().crc32c_baseline()),
            Err(FrameError::Corrupt { .. })
        ));
    }

    /// A frame sealed with another connection's keys (an attacker who saw
    /// the handshake but lacks the pre-shared key), or replayed, or sent
    /// in the wrong direction, is refused.
    #[test]
    fn forged_replayed_and_reflected_frames_are_refused() {
        let other = FrameKeys::derive(b"another key", &[7; 64], 0, 0);
        let forged = batch_with(&mut other.sealer(Role::Primary), 1, 1, &[b"x"]);
        assert!(matches!(
            decode_frame(&forged, 1, 1, &mut opener()),
            Err(FrameError::Corrupt { .. })
        ));
        let mut s = sealer();
        let first = batch_with(&mut s, 1, 1, &[b"a"]);
        let second = batch_with(&mut s, 1, 2, &[b"b"]);
        let mut o = opener();
        decode_frame(&first, 1, 1, &mut o).unwrap();
        decode_frame(&second, 1, 2, &mut o).unwrap();
        let e = decode_frame(&first, 1, 3, &mut o).unwrap_err();
        assert_eq!(
            e,
            FrameError::Replayed {
                counter: 1,
                last: 2,
                seq: 1
            }
        );
        // An ack the backup sent, reflected back to it as if from the primary.
        let mut ack = vec![0u8; FRAME_HEADER_LEN];
        let keys = FrameKeys::for_tests();
        encode_control(
            &mut ack,
            FrameKind::Ack,
            1,
            9,
            &mut keys.sealer(Role::Backup),
        )
        .unwrap();
        assert!(matches!(
            decode_frame(&ack, 1, 1, &mut keys.opener(Role::Backup)),
            Err(FrameError::Corrupt { .. })
        ));
        assert!(decode_frame(&ack, 1, 1, &mut keys.opener(Role::Primary)).is_ok());
    }

    #[test]
    fn handshake_keys_agree_and_differ_per_connection() {
        let (a, b) = pair(s(Role::Primary, 5, b"k"), 1, s(Role::Backup, 5, b"k"), 1);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.keys, b.keys);
        assert_ne!(a.keys.primary_to_backup, a.keys.backup_to_primary);
        let (c, _) = pair(s(Role::Primary, 5, b"k"), 1, s(Role::Backup, 5, b"k"), 1);
        assert_ne!(c.unwrap().keys, a.keys, "fresh nonces, fresh keys");
        assert_eq!(format!("{:?}", a.keys), "FrameKeys(..)");
    }

    /// Frame tags are genuine AES-256-GCM tags: RustCrypto `aes-gcm`
    /// accepts each as the tag of (nonce = counter, associated data =
    /// the tagged header, ciphertext = the payload), and rejects it once
    /// any of them changes.
    #[test]
    fn frame_tags_are_aes_gcm_tags() {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        let keys = FrameKeys::for_tests();
        let gcm = aes_gcm::Aes256Gcm::new((&keys.primary_to_backup).into());
        let mut s = sealer();
        for payload_len in [0usize, 1, 15, 16, 17, 40, 255, 256, 257, 1500, 4000, 65536] {
            let mut buf = vec![0u8; FRAME_HEADER_LEN + payload_len];
            for (i, b) in buf[FRAME_HEADER_LEN..].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31);
            }
            seal(&mut buf, FrameKind::Batch, 3, 9, 1, payload_len, &mut s).unwrap();
            let h = FrameHeader::ref_from_prefix(&buf[..]).unwrap().0;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&h.counter.get().to_le_bytes());
            let verify = |aad: &[u8], payload: &[u8], nonce: &[u8; 12]| {
                let mut c = payload.to_vec();
                gcm.decrypt_in_place_detached(nonce.into(), aad, &mut c, (&h.tag).into())
                    .is_ok()
            };
            let (aad, payload) = (&buf[..TAGGED_HEADER_LEN], &buf[FRAME_HEADER_LEN..]);
            assert!(verify(aad, payload, &nonce), "payload {payload_len}");
            let mut other = nonce;
            other[0] ^= 1;
            assert!(!verify(aad, payload, &other));
            let mut aad2 = aad.to_vec();
            aad2[16] ^= 1;
            assert!(!verify(&aad2, payload, &nonce));
            if payload_len > 0 {
                let mut p2 = payload.to_vec();
                p2[payload_len - 1] ^= 0x80;
                assert!(!verify(aad, &p2, &nonce));
            }
        }
    }

    #[test]
    fn batch_roundtrip() {
        let b = batch(7, 10, &[b"hello", b"", &[9u8; 16]]);
        assert_eq!(frame_len(&b), Some(b.len()));
        let f = decode_frame(&b, 7, 10, &mut opener()).unwrap();
        assert_eq!(f.kind, FrameKind::Batch);
        let got: Vec<_> = batch_entries(&f).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            got,
            vec![(10, &b"hello"[..]), (11, &b""[..]), (12, &[9u8; 16][..])]
        );
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let b = batch(1, 5, &[b"abcdefgh", b"xyz"]);
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            match decode_frame(&c, 1, 5, &mut opener()) {
                Err(FrameError::Corrupt { .. }) | Err(FrameError::Truncated { .. }) => {}
                other => panic!("byte {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn stale_generation_named() {
        let b = batch(3, 42, &[b"a"]);
        let e = decode_frame(&b, 4, 42, &mut opener()).unwrap_err();
        assert_eq!(
            e,
            FrameError::StaleGeneration {
                ours: 4,
                theirs: 3,
                seq: 42
            }
        );
        assert!(e.to_string().contains("sequence number 42"));
    }

    #[test]
    fn sequence_numbers_past_u64_max_are_malformed() {
        // Regression (fuzz target `frame`): a batch claiming seq u64::MAX with
        // two entries overflowed the iterator's sequence counter.
        let bytes = batch(1, u64::MAX, &[b"last", b"past"]);
        let frame = decode_frame(&bytes, 1, 1, &mut opener()).unwrap();
        let mut entries = batch_entries(&frame);
        assert_eq!(entries.next(), Some(Ok((u64::MAX, &b"last"[..]))));
        assert!(matches!(
            entries.next(),
            Some(Err(FrameError::Malformed { seq: u64::MAX, .. }))
        ));
        assert_eq!(entries.next(), None);
        // One entry at the last sequence number is fine.
        let bytes = batch(1, u64::MAX, &[b"last"]);
        let frame = decode_frame(&bytes, 1, 1, &mut opener()).unwrap();
        let all: Vec<_> = batch_entries(&frame).collect();
        assert_eq!(all, vec![Ok((u64::MAX, &b"last"[..]))]);
    }

    #[test]
    fn malformed_count() {
        let mut buf = vec![0u8; 256];
        let at = put_entry(&mut buf, FRAME_HEADER_LEN, b"abc");
        let n = seal(
            &mut buf,
            FrameKind::Batch,
            1,
            1,
            2,
            at - FRAME_HEADER_LEN,
            &mut sealer(),
        )
        .unwrap();
        let f = decode_frame(&buf[..n], 1, 1, &mut opener()).unwrap();
        let r: Result<Vec<_>, _> = batch_entries(&f).collect();
        assert!(
            matches!(r, Err(FrameError::Malformed { seq: 2, .. })),
            "{r:?}"
        );
    }

    /// Runs both ends of a handshake over a socketpair.
    fn pair(
        a: Session,
        va: u16,
        b: Session,
        vb: u16,
    ) -> (
        Result<Established, HandshakeError>,
        Result<Established, HandshakeError>,
    ) {
        let (mut x, mut y) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || handshake(&mut y, &b, vb));
        let ra = handshake(&mut x, &a, va);
        drop(x);
        (ra, t.join().unwrap())
    }

    fn s(role: Role, generation: u64, key: &[u8]) -> Session {
        Session {
            vm_id: 0xabc,
            generation,
            role,
            key: key.to_vec(),
        }
    }

    #[test]
    fn handshake_ok_and_failures_named() {
        let (a, b) = pair(s(Role::Primary, 5, b"k"), 1, s(Role::Backup, 5, b"k"), 1);
        assert_eq!(a.unwrap().peer_role, Role::Backup);
        assert_eq!(b.unwrap().peer_role, Role::Primary);

        let (a, b) = pair(
            s(Role::Primary, 5, b"k"),
            1,
            s(Role::Backup, 5, b"other"),
            1,
        );
        let (a, b) = (a.unwrap_err().to_string(), b.unwrap_err().to_string());
        assert!(a.contains("wrong key"), "{a}");
        assert!(b.contains("wrong key"), "{b}");

        let (a, b) = pair(s(Role::Primary, 4, b"k"), 1, s(Role::Backup, 5, b"k"), 1);
        assert!(
            matches!(a, Err(HandshakeError::WeAreStale { ours: 4, theirs: 5 })),
            "{a:?}"
        );
        assert!(
            matches!(
                b,
                Err(HandshakeError::StaleGeneration { ours: 5, theirs: 4 })
            ),
            "{b:?}"
        );

        let (a, b) = pair(s(Role::Primary, 5, b"k"), 2, s(Role::Backup, 5, b"k"), 1);
        assert!(
            matches!(
                a,
                Err(HandshakeError::VersionMismatch { ours: 2, theirs: 1 })
            ),
            "{a:?}"
        );
        assert!(
            matches!(
                b,
                Err(HandshakeError::VersionMismatch { ours: 1, theirs: 2 })
            ),
            "{b:?}"
        );

        let (a, _) = pair(s(Role::Primary, 5, b"k"), 1, s(Role::Primary, 5, b"k"), 1);
        assert!(
            matches!(
                a,
                Err(HandshakeError::RoleConflict(_)) | Err(HandshakeError::Rejected { .. })
            ),
            "{a:?}"
        );
    }

    /// A joining backup connects and proves first; the accepting primary
    /// waits for it. Two ends on the same side are told so at once.
    #[test]
    fn sides_are_explicit_and_a_side_conflict_is_named() {
        let run = |sa: Side, sb: Side| {
            let (mut x, mut y) = std::os::unix::net::UnixStream::pair().unwrap();
            let b = s(Role::Primary, 5, b"k");
            let t = std::thread::spawn(move || handshake_as(&mut y, &b, PROTOCOL_VERSION, sb));
            let ra = handshake_as(&mut x, &s(Role::Backup, 5, b"k"), PROTOCOL_VERSION, sa);
            drop(x);
            (ra, t.join().unwrap())
        };
        let (a, b) = run(Side::Connecting, Side::Accepting);
        assert_eq!(a.unwrap().keys, b.unwrap().keys);
        for side in [Side::Connecting, Side::Accepting] {
            let (a, b) = run(side, side);
            assert!(
                matches!(a, Err(HandshakeError::SideConflict(s)) if s == side),
                "{a:?}"
            );
            assert!(
                matches!(b, Err(HandshakeError::SideConflict(s)) if s == side),
                "{b:?}"
            );
        }
    }

    #[test]
    fn foreign_protocol_is_bad_magic() {
        let (mut x, mut y) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::io::Write;
        let t = std::thread::spawn(move || {
            y.write_all(&[b'G'; 64]).unwrap();
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut y, &mut sink);
        });
        let e = handshake(&mut x, &s(Role::Backup, 1, b"k"), PROTOCOL_VERSION).unwrap_err();
        drop(x);
        t.join().unwrap();
        assert!(e.to_string().contains("another protocol"), "{e}");
    }
}
