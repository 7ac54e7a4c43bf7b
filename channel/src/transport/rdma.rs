//! RDMA transport (feature `rdma`, on `rdma-sys` / libibverbs): one
//! reliable-connected queue pair per channel; each end RDMA-writes frames
//! straight into a ring registered in the other end's memory, and writes its
//! status (ring credit and, on the backup, the cumulative ack) into a small
//! status block in the other end's memory. No receive copies, no ack frames.
//! Every write carries an immediate, so each one raises a receive
//! completion at the peer: an idle end sleeps on its completion channel.
//!
//! # Connection set-up
//!
//! Over TCP, exactly like [`super::uring_tcp`]: connect, then the
//! authenticated [`crate::protocol::handshake`] (key, VM id, generation,
//! version; a stale generation never gets a queue pair). Only then does each
//! end create its QP, register its memory and send one 128-byte `RdmaInfo`
//! over the same stream; both move the QP to RTS and exchange `"LKSTPRDY"`.
//! The TCP stream stays open as a liveness side channel: its close (the
//! kernel closes it when the peer process dies) is a clean `Closed`.
//!
//! ```text
//!   primary                                           backup
//!     │── TCP connect ───────────────────────────────────▶│
//!     │◀──────────── handshake (HMAC, VM id, gen) ───────▶│
//!     │── RdmaInfo{qpn, psn, gid, ring, status, mac} ────▶│  create QP, reg MRs,
//!     │◀──── RdmaInfo{qpn, psn, gid, ring, status, mac} ──│  post receives
//!     │   INIT → RTR(peer qpn, gid, psn, mtu) → RTS        │
//!     │── "LKSTPRDY" ────────────────────────────────────▶│
//!     │◀──────────────────────────────────── "LKSTPRDY" ──│
//!     │══ WRITE_WITH_IMM frames ══▶ [backup's ring]        │
//!     │   [primary's status block] ◀══ WRITE_WITH_IMM {consumed, reaped, ack} ══│
//! ```
//!
//! `RdmaInfo` (little-endian; a refusal instead carries magic `"LKSTPRDN"`
//! and a UTF-8 reason in bytes 8..96):
//!
//! ```text
//! offset size field
//! 0      8    magic "LKSTPRDM"
//! 8      4    QP number
//! 12     4    initial packet sequence number (random, 24 bits)
//! 16     16   GID (RoCE v2: the IPv4-mapped address of the interface)
//! 32     2    LID (InfiniBand; 0 on RoCE)
//! 34     1    active MTU of the port (ibv_mtu: 1=256 .. 5=4096)
//! 35     1    reserved
//! 36     4    rkey of the receive ring
//! 40     8    address of the receive ring
//! 48     8    size of the receive ring (power of two)
//! 56     4    rkey of the status block
//! 60     4    receive requests posted (the writer keeps fewer writes in flight)
//! 64     8    address of the status block
//! 72     8    largest frame accepted
//! 80     16   reserved
//! 96     32   HMAC-SHA256(key, "lockstep-rdma-info-v3" ‖ role ‖ binding ‖ bytes 0..96)
//!             binding: both handshake nonces (primary's, then backup's), so an
//!             info block recorded from one connection is refused on another
//! ```
//!
//! # Data path
//!
//! The writer builds each frame *in place* in a local staging ring that
//! mirrors the peer's ring offset for offset (registered memory, so no copy
//! on send), then posts one `RDMA WRITE WITH IMM` per contiguous span of
//! committed frames (several frames per write when the NIC is busy). The
//! immediate is the span's length, with bit 31 set when the writer skipped
//! the rest of the ring first (a frame never wraps). The receive completion
//! tells the reader the bytes are in place; it cuts frames by their headers
//! and lends them to the endpoint without copying.
//!
//! ```text
//! staging (local)  [ .. f1 f2 f3 | f4 .. ]  ─WRITE_WITH_IMM(imm = len f1..f3)─▶
//! ring (peer)      [ .. f1 f2 f3 | .....  ]  ─recv CQE(imm)─▶ recv(): &f1, &f2, &f3
//! ```
//!
//! Space is reclaimed only when both hold: the peer reported the bytes
//! consumed (its status block), and our write of them completed (the NIC
//! has finished reading the staging bytes). Every write is signaled; at most
//! 64 data writes are in flight, and never more than three quarters of the
//! receive requests the peer has posted: the last quarter is kept for status
//! writes, which consume receive requests too (so the ends can always tell
//! each other about the receives they re-posted).
//!
//! # Status block (written by the peer into our memory, RDMA WRITE WITH IMM)
//!
//! The status write's immediate is [`STATUS_IMM`] (bit 31 with a zero
//! length, which no data span can carry); its receive completion wakes the
//! peer, and its 48 bytes are in place before the completion.
//!
//! ```text
//! offset size field
//! 0      8    consumed: bytes of our frames the peer has finished with (ring credit)
//! 8      8    reaped:   our WRITE_WITH_IMMs the peer has completed and re-armed
//! 16     8    ack:      cumulative ack (backup → primary; 0 the other way)
//! 24     8    counter:  the writer's status number, from 1, rising
//! 32     16   tag:      keyed BLAKE3(status key of the writer, bytes 0..32)[..16]
//! ```
//!
//! The status key is derived from the writer's frame key (see
//! [`crate::protocol`]): only the peer of this connection can write a block
//! that verifies, so an ack can't be forged. The block is read by polling
//! memory, so a torn read is possible; one whose tag does not verify is
//! ignored (the next poll reads the complete block), and so is one whose
//! counter is below the last accepted (an old block written again); acks
//! beyond what was sent are refused by the endpoint. Frames received in
//! the ring are copied out before they are checked and decoded, so the
//! peer's later writes there cannot change a frame under its check. One
//! status write is in flight at a time; the next goes out when the ack
//! changed, when a quarter of the ring or of the receive requests is waiting
//! to be reported, or when the reader drained its ring after new frames.
//! Receiving a status block alone never makes a status due before a
//! quarter of the receive requests are waiting (else two idle ends would
//! answer each other's status writes forever).
//! Ack frames committed by the backup's endpoint do not enter the ring:
//! the transport takes their sequence number into the status block, and the
//! primary's [`Transport::transport_ack`] reports it. Heartbeats travel as
//! ordinary frames.
//!
//! # When is an entry "received by the backup"? ([`AckMode`])
//!
//! The Output Rule lets the primary release output once the backup has
//! *received* every log entry before it. Two readings are offered:
//!
//! - [`AckMode::BackupAck`] (default): the backup's endpoint acks after it
//!   validated each batch (crc, generation, sequence) and delivered its
//!   entries. This is what the TCP and shared-memory transports do.
//! - [`AckMode::SendCompletion`]: the primary counts a batch as received as
//!   soon as the RC completion of the WRITE carrying it arrives. An RC
//!   completion means the backup's NIC acknowledged the packets, which it
//!   does only after checking their ICRC and placing (or committing to
//!   place) the data in the backup's registered ring, the very buffer the
//!   backup replays from, and that ring space is not reused before the
//!   backup reports it consumed. So if the *primary* dies, the backup has
//!   the entries in memory and will replay them, as long as it drains its
//!   ring before going live. Saves one backup-side poll and status write of
//!   latency.
//!
//!   Its limits, and why it is not the default: (1) nothing above the NIC
//!   has looked at the bytes: a batch the backup later refuses (crc or
//!   sequence error from a software bug or memory corruption, which ICRC
//!   does not cover) was already counted, so output may have left for an
//!   entry the backup cannot replay, and a later failover can only stop,
//!   not go live; (2) the ack means "in the backup NIC's hands", which on
//!   some NICs precedes the DMA into host memory, so a backup *host* crash
//!   in that window loses it, harmless only because a dead backup never
//!   goes live; (3) a backup process that is alive but wedged still "acks".
//!   The explicit ack costs one status write per ack batch, coalesced with
//!   the ring credit, and keeps the rule exactly as in the paper.
//!
//! # Sleeping
//!
//! [`Transport::wait`] takes the events already on the completion channel,
//! arms the CQ (`ibv_req_notify_cq`), polls once more (a completion that
//! came before the arm raises no event), then sleeps in `ppoll` on the
//! channel's fd, the TCP side channel (readable at the peer's death) and
//! the caller's wake fd. Frames, acks, ring credit and our own write
//! completions all wake it; the caller spins briefly before it calls `wait`.
//!
//! # Failures
//!
//! Every failed work completion (retry exceeded: the peer's NIC stopped
//! answering; remote access error: its memory region is gone; flush: the QP
//! is in the error state), every fatal asynchronous event (device fatal,
//! QP fatal, port down), and a close of the TCP side channel stop the
//! transport with [`TransportError::PeerFailed`] or
//! [`TransportError::Closed`]; frames already in the ring are delivered
//! first. Nothing waits without a bound: the QP's retry timeout is
//! `4.096 µs · 2^timeout · retry_cnt` (about 0.5 s with the defaults) and
//! the endpoint's heartbeat timeout is usually shorter still.

mod ring;
mod verbs;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rdma_sys::{ibv_access_flags, ibv_wc_opcode, ibv_wc_status};
use sha2::Sha256;

pub use self::ring::{RxRing, SKIP_FLAG, Span, TxRing, pad8};
use self::verbs::{Buf, DeviceList, Verbs, wc_array, wc_fields};
pub use self::verbs::{DeviceInfo, list_devices};
use super::{Transport, TransportError};
use crate::protocol::{
    FRAME_HEADER_LEN, FrameKeys, FrameKind, PROTOCOL_VERSION, Role, Session, handshake_timed,
};

const INFO_LEN: usize = 128;
const INFO_MAGIC: [u8; 8] = *b"LKSTPRDM";
const REFUSE_MAGIC: [u8; 8] = *b"LKSTPRDN";
const READY: [u8; 8] = *b"LKSTPRDY";
/// Bytes of a status block: four words, then a 16-byte tag.
pub const STATUS_LEN: usize = 48;
/// Receive requests each end keeps posted.
const RECV_DEPTH: u32 = 256;
/// Send queue depth: data writes + status writes.
const SQ_DEPTH: u32 = 128;
/// Data writes in flight at most.
const MAX_DATA_INFLIGHT: usize = 64;
const WR_RECV: u64 = 1;
const WR_DATA: u64 = 2;
const WR_STATUS: u64 = 3;
/// Immediate of a status write: the skip flag with a zero length, which no
/// data span carries.
pub const STATUS_IMM: u32 = SKIP_FLAG;
/// `IBV_PORT_ACTIVE`.
const IBV_PORT_ACTIVE: u32 = 4;
/// `IBV_LINK_LAYER_INFINIBAND`.
const IBV_LINK_LAYER_INFINIBAND: u8 = 1;
/// How often `poll` looks at the TCP side channel and the async events.
const CHECK_EVERY: Duration = Duration::from_millis(1);

/// What makes the primary count an entry as received; see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckMode {
    /// The backup's explicit ack, after it validated and delivered the
    /// batch (safe; the default).
    #[default]
    BackupAck,
    /// The RC completion of the RDMA WRITE carrying the batch.
    SendCompletion,
}

/// RDMA settings; [`RdmaConfig::default`] picks everything automatically.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Device name (`mlx5_0`, `rxe0`); `None`: the device that has a GID for
    /// the TCP connection's local address, else the first one.
    pub device: Option<String>,
    /// Port number (1-based).
    pub port: u8,
    /// GID index; `None`: the RoCE v2 GID of the TCP connection's local
    /// IPv4 address, else the first RoCE v2 IPv4 GID, else index 0.
    pub gid_index: Option<u8>,
    /// Size of the ring the peer writes into (power of two, >= 64 KiB);
    /// `None`: 8 MiB for the backup (at least 4 max frames), 256 KiB for
    /// the primary (it only receives heartbeats).
    pub rx_ring_bytes: Option<usize>,
    /// Largest frame, both ways.
    pub max_frame: usize,
    /// Path MTU in bytes (256..4096); `None`: the smaller active MTU of the
    /// two ports.
    pub mtu: Option<u32>,
    /// Local ACK timeout exponent: 4.096 µs · 2^timeout per try.
    pub timeout: u8,
    /// Transport retries before the QP fails with "retry exceeded".
    pub retry_cnt: u8,
    /// See [`AckMode`].
    pub ack_mode: AckMode,
    /// Bound on the TCP handshake and the info exchange.
    pub setup_timeout: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: 1,
            gid_index: None,
            rx_ring_bytes: None,
            max_frame: (256 << 10) + 4096,
            mtu: None,
            timeout: 14,
            retry_cnt: 7,
            ack_mode: AckMode::BackupAck,
            setup_timeout: Duration::from_secs(30),
        }
    }
}

fn invalid(what: String) -> TransportError {
    TransportError::Io {
        op: "reading the RDMA settings",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
    }
}

impl RdmaConfig {
    /// Defaults overridden by `LOCKSTEP_RDMA_DEVICE`, `LOCKSTEP_RDMA_PORT`,
    /// `LOCKSTEP_RDMA_GID_INDEX`, `LOCKSTEP_RDMA_MTU` and
    /// `LOCKSTEP_RDMA_ACK` (`backup` or `completion`).
    pub fn from_env(max_frame: usize) -> Result<Self, TransportError> {
        let mut c = Self {
            max_frame,
            ..Self::default()
        };
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let num = |k: &str, v: String| {
            v.parse::<u32>()
                .map_err(|e| invalid(format!("{k}={v}: {e}")))
        };
        c.device = var("LOCKSTEP_RDMA_DEVICE");
        if let Some(v) = var("LOCKSTEP_RDMA_PORT") {
            c.port = u8::try_from(num("LOCKSTEP_RDMA_PORT", v)?)
                .map_err(|e| invalid(format!("LOCKSTEP_RDMA_PORT: {e}")))?;
        }
        if let Some(v) = var("LOCKSTEP_RDMA_GID_INDEX") {
            c.gid_index = Some(
                u8::try_from(num("LOCKSTEP_RDMA_GID_INDEX", v)?)
                    .map_err(|e| invalid(format!("LOCKSTEP_RDMA_GID_INDEX: {e}")))?,
            );
        }
        if let Some(v) = var("LOCKSTEP_RDMA_MTU") {
            c.mtu = Some(num("LOCKSTEP_RDMA_MTU", v)?);
        }
        if let Some(v) = var("LOCKSTEP_RDMA_ACK") {
            c.ack_mode = AckMode::parse(&v)?;
        }
        Ok(c)
    }
}

impl AckMode {
    /// `backup` or `completion`.
    pub fn parse(s: &str) -> Result<Self, TransportError> {
        match s {
            "backup" | "backup-ack" => Ok(Self::BackupAck),
            "completion" | "send-completion" => Ok(Self::SendCompletion),
            other => Err(invalid(format!(
                "unknown RDMA ack mode {other:?} (backup | completion)"
            ))),
        }
    }
}

/// The names of the RDMA devices present, or
/// [`TransportError::NoRdmaDevice`]: what a binary checks before choosing
/// this transport (and falling back to io_uring TCP).
pub fn probe() -> Result<Vec<String>, TransportError> {
    Ok(list_devices()?.into_iter().map(|d| d.name).collect())
}

/// Fails with [`TransportError::NoRdmaDevice`] unless the device `cfg`
/// names (or any device) exists: checked before any network traffic.
fn check_device(cfg: &RdmaConfig) -> Result<(), TransportError> {
    let names = probe()?;
    match &cfg.device {
        Some(want) if !names.contains(want) => Err(TransportError::NoRdmaDevice {
            detail: format!("device {want:?} not found (present: {})", names.join(", ")),
        }),
        _ => Ok(()),
    }
}

/// What the peer told us in its `RdmaInfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// QP number.
    pub qpn: u32,
    /// Initial PSN.
    pub psn: u32,
    /// GID.
    pub gid: [u8; 16],
    /// LID.
    pub lid: u16,
    /// Active MTU (ibv_mtu).
    pub mtu: u8,
    /// Ring rkey.
    pub ring_rkey: u32,
    /// Ring address.
    pub ring_addr: u64,
    /// Ring size.
    pub ring_bytes: u64,
    /// Status block rkey.
    pub status_rkey: u32,
    /// Receive requests posted.
    pub recv_depth: u32,
    /// Status block address.
    pub status_addr: u64,
    /// Largest frame accepted.
    pub max_frame: u64,
}

fn role_label(r: Role) -> &'static [u8] {
    match r {
        Role::Primary => b"P",
        Role::Backup => b"B",
    }
}

fn info_mac(
    key: &[u8],
    role: Role,
    binding: &[u8; 64],
    body: &[u8],
) -> Result<Hmac<Sha256>, TransportError> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .map_err(|_| TransportError::Handshake(crate::protocol::HandshakeError::BadKey))?;
    mac.update(b"lockstep-rdma-info-v3");
    mac.update(role_label(role));
    mac.update(binding);
    mac.update(body);
    Ok(mac)
}

impl PeerInfo {
    /// Refuses an (authenticated) info block whose ring this end cannot
    /// use: a size not a power of two in 64 KiB..1 GiB (2^64-1, 0, ...),
    /// or no posted receives. Every other field is bounded where it is
    /// used (`max_frame` by our own, the addresses and keys by the NIC).
    pub fn check_usable(&self) -> Result<(), TransportError> {
        if !self.ring_bytes.is_power_of_two()
            || !(64 << 10..=1 << 30).contains(&self.ring_bytes)
            || self.recv_depth < 4
        {
            return Err(TransportError::BadRegion(
                "the peer announced an unusable ring (size not a power of two in 64 KiB..1 GiB, or fewer than 4 receives)",
            ));
        }
        Ok(())
    }
}

impl PeerInfo {
    /// Encodes and MACs for the connection whose handshake gave `binding`
    /// (see the module docs).
    pub fn encode(
        &self,
        key: &[u8],
        role: Role,
        binding: &[u8; 64],
    ) -> Result<[u8; INFO_LEN], TransportError> {
        let mut b = [0u8; INFO_LEN];
        b[..8].copy_from_slice(&INFO_MAGIC);
        b[8..12].copy_from_slice(&self.qpn.to_le_bytes());
        b[12..16].copy_from_slice(&self.psn.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..34].copy_from_slice(&self.lid.to_le_bytes());
        b[34] = self.mtu;
        b[36..40].copy_from_slice(&self.ring_rkey.to_le_bytes());
        b[40..48].copy_from_slice(&self.ring_addr.to_le_bytes());
        b[48..56].copy_from_slice(&self.ring_bytes.to_le_bytes());
        b[56..60].copy_from_slice(&self.status_rkey.to_le_bytes());
        b[60..64].copy_from_slice(&self.recv_depth.to_le_bytes());
        b[64..72].copy_from_slice(&self.status_addr.to_le_bytes());
        b[72..80].copy_from_slice(&self.max_frame.to_le_bytes());
        let mac = info_mac(key, role, binding, &b[..96])?
            .finalize()
            .into_bytes();
        b[96..].copy_from_slice(&mac);
        Ok(b)
    }

    /// Checks the MAC (made by a peer of role `role` on the connection
    /// whose handshake gave `binding`) and decodes.
    pub fn decode(
        b: &[u8; INFO_LEN],
        key: &[u8],
        role: Role,
        binding: &[u8; 64],
    ) -> Result<Self, TransportError> {
        if b[..8] == REFUSE_MAGIC {
            let reason = String::from_utf8_lossy(&b[8..96])
                .trim_end_matches('\0')
                .to_string();
            return Err(TransportError::PeerFailed {
                op: "RDMA set-up",
                reason: format!("the peer could not set up RDMA: {reason}"),
            });
        }
        if b[..8] != INFO_MAGIC {
            return Err(TransportError::BadRegion(
                "the peer's RDMA info has a bad magic",
            ));
        }
        if info_mac(key, role, binding, &b[..96])?
            .verify_slice(&b[96..])
            .is_err()
        {
            return Err(TransportError::BadRegion(
                "the peer's RDMA info does not verify under the session key and this connection's nonces",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[16..32]);
        Ok(Self {
            qpn: u32_at(8),
            psn: u32_at(12),
            gid,
            lid: u16::from_le_bytes([b[32], b[33]]),
            mtu: b[34],
            ring_rkey: u32_at(36),
            ring_addr: u64_at(40),
            ring_bytes: u64_at(48),
            status_rkey: u32_at(56),
            recv_depth: u32_at(60),
            status_addr: u64_at(64),
            max_frame: u64_at(72),
        })
    }
}

/// The key of the status blocks `sender` writes on a connection.
fn status_key(keys: &FrameKeys, sender: Role) -> [u8; 32] {
    blake3::derive_key(
        "lockstep rdma 2026-12 status block v1",
        &keys.key_of(sender),
    )
}

fn status_tag(key: &[u8; 32], head: &[u8]) -> [u8; 16] {
    let mut tag = [0u8; 16];
    blake3::Hasher::new_keyed(key)
        .update(head)
        .finalize_xof()
        .fill(&mut tag);
    tag
}

fn encode_status(
    key: &[u8; 32],
    counter: u64,
    consumed: u64,
    reaped: u64,
    ack: u64,
) -> [u8; STATUS_LEN] {
    let mut b = [0u8; STATUS_LEN];
    for (i, v) in [consumed, reaped, ack, counter].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let tag = status_tag(key, &b[..32]);
    b[32..].copy_from_slice(&tag);
    b
}

/// Decodes a status block as read from the peer's memory (see the module
/// docs): `(counter, consumed, reaped, ack)` if its tag verifies under `key`
/// and its counter is nonzero, else `None` (a torn read, garbage, or a
/// forgery). Public so the fuzz targets can feed it arbitrary blocks.
pub fn decode_status(key: &[u8; 32], b: &[u8; STATUS_LEN]) -> Option<(u64, u64, u64, u64)> {
    let tag = status_tag(key, &b[..32]);
    if tag
        .iter()
        .zip(&b[32..])
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        != 0
    {
        return None;
    }
    let w = |i: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_le_bytes(x)
    };
    let counter = w(3);
    (counter > 0).then(|| (counter, w(0), w(1), w(2)))
}

/// The chosen device, port and GID.
struct Chosen {
    ctx: verbs::Context,
    name: String,
    port: verbs::PortInfo,
    gid_index: u8,
    gid: [u8; 16],
}

fn ipv4_mapped(g: &[u8; 16]) -> Option<[u8; 4]> {
    (g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff)
        .then(|| [g[12], g[13], g[14], g[15]])
}

fn gid_is_roce_v2(dev: &str, port: u8, index: u8) -> bool {
    std::fs::read_to_string(format!(
        "/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}"
    ))
    .map(|t| t.trim() == "RoCE v2")
    .unwrap_or(false)
}

/// Picks the device and GID (see [`RdmaConfig::device`] and
/// [`RdmaConfig::gid_index`]).
fn choose(cfg: &RdmaConfig, local: IpAddr) -> Result<Chosen, TransportError> {
    let list = DeviceList::get()?;
    let names = list.names();
    if names.is_empty() {
        return Err(TransportError::NoRdmaDevice {
            detail: "libibverbs lists no device".into(),
        });
    }
    let candidates: Vec<usize> = match &cfg.device {
        Some(want) => match names.iter().position(|n| n == want) {
            Some(i) => vec![i],
            None => {
                return Err(TransportError::NoRdmaDevice {
                    detail: format!("device {want:?} not found (present: {})", names.join(", ")),
                });
            }
        },
        None => (0..names.len()).collect(),
    };
    let want_v4 = match local {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(a) => a.to_ipv4_mapped().map(|a| a.octets()),
    };
    let mut best: Option<(u8, Chosen)> = None;
    for i in candidates {
        let ctx = list.open(i)?;
        let port = ctx.port(cfg.port)?;
        let (mut score, gid_index, gid) = if let Some(g) = cfg.gid_index {
            (4, g, ctx.gid(cfg.port, g)?)
        } else if port.link_layer == IBV_LINK_LAYER_INFINIBAND {
            // Native InfiniBand: GID 0 (the port GID) routes within the subnet.
            (3, 0, ctx.gid(cfg.port, 0)?)
        } else {
            let mut pick = (0u8, 0u8, ctx.gid(cfg.port, 0).unwrap_or([0; 16]));
            for g in 0..=254u8 {
                let Ok(gid) = ctx.gid(cfg.port, g) else { break };
                let Some(v4) = ipv4_mapped(&gid) else {
                    continue;
                };
                let v2 = gid_is_roce_v2(&names[i], cfg.port, g);
                let score = match (Some(v4) == want_v4, v2) {
                    (true, true) => 3,
                    (false, true) => 2,
                    (true, false) => 1,
                    _ => continue,
                };
                if score > pick.0 {
                    pick = (score, g, gid);
                }
            }
            pick
        };
        if port.state != IBV_PORT_ACTIVE {
            score = 0; // usable only if nothing else is
        }
        let c = Chosen {
            ctx,
            name: names[i].clone(),
            port,
            gid_index,
            gid,
        };
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, c));
        }
        if score >= 3 {
            break;
        }
    }
    best.map(|(_, c)| c).ok_or(TransportError::NoRdmaDevice {
        detail: "no usable device".into(),
    })
}

fn mtu_enum(bytes: u32) -> Result<u32, TransportError> {
    Ok(match bytes {
        256 => 1,
        512 => 2,
        1024 => 3,
        2048 => 4,
        4096 => 5,
        other => {
            return Err(invalid(format!(
                "RDMA MTU {other} (256, 512, 1024, 2048 or 4096)"
            )));
        }
    })
}

/// The verbs objects and the buffers they cover. Fields drop in declaration
/// order: `verbs` (QP, then MRs) goes before any buffer is unmapped.
struct Conn {
    verbs: Verbs,
    rx_buf: Buf,
    tx_buf: Buf,
    status_in: Buf,
    status_out: Buf,
    tx_lkey: u32,
    status_out_lkey: u32,
}

/// What [`RdmaTransport::prepare`] found besides the resources.
struct Local {
    name: String,
    port: verbs::PortInfo,
    gid_index: u8,
}

fn read_err(op: &'static str) -> impl Fn(std::io::Error) -> TransportError {
    move |e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            TransportError::Closed
        } else {
            TransportError::Io { op, source: e }
        }
    }
}

/// The RDMA transport; see the module docs.
pub struct RdmaTransport {
    conn: Conn,
    device: String,
    peer: PeerInfo,
    tx: TxRing,
    rx: RxRing,
    /// Ends of the data writes in flight, in post order.
    inflight: VecDeque<u64>,
    /// Writes with immediate posted (data spans and status writes): each
    /// consumes one of the peer's receive requests.
    spans_posted: u64,
    peer_reaped: u64,
    /// Receive completions reaped (and receive requests re-posted).
    reaped: u64,
    /// Of these, the data spans.
    reaped_data: u64,
    /// `reaped_data` when the last status went out.
    status_sent_data: u64,
    status_inflight: bool,
    /// (consumed, reaped, ack) last written to the peer.
    status_sent: (u64, u64, u64),
    /// Our cumulative ack to the peer (backup).
    ack_out: u64,
    /// The peer's cumulative ack (primary).
    peer_ack: u64,
    reported_ack: u64,
    ack_mode: AckMode,
    /// SendCompletion: (ring end of a batch frame, its last seq).
    batch_ends: VecDeque<(u64, u64)>,
    completion_ack: u64,
    max_frame: usize,
    control: TcpStream,
    peer_eof: bool,
    last_check: Instant,
    failed: Option<(&'static str, String)>,
    /// The handshake's frame keys.
    keys: FrameKeys,
    /// Key and last counter of the status blocks we write and read.
    status_out_key: [u8; 32],
    status_out_counter: u64,
    status_in_key: [u8; 32],
    status_in_counter: u64,
    /// The frame `recv` lends: a private copy of the peer-written ring bytes.
    rx_copy: Vec<u8>,
}

// SAFETY: the raw verbs pointers and buffer addresses are owned by this
// struct alone (no other handle exists in this process), libibverbs objects
// may be used from any thread, and the struct moves as a whole.
unsafe impl Send for RdmaTransport {}

impl RdmaTransport {
    /// Connects to `addr`, runs the handshake and the RDMA set-up. Fails at
    /// once with [`TransportError::NoRdmaDevice`] (before any network
    /// traffic) if this host has no RDMA device.
    pub fn connect(
        addr: SocketAddr,
        session: &Session,
        cfg: &RdmaConfig,
    ) -> Result<Self, TransportError> {
        Self::connect_with_version(addr, session, cfg, PROTOCOL_VERSION)
    }

    /// [`RdmaTransport::connect`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn connect_with_version(
        addr: SocketAddr,
        session: &Session,
        cfg: &RdmaConfig,
        version: u16,
    ) -> Result<Self, TransportError> {
        check_device(cfg)?;
        let stream = TcpStream::connect_timeout(&addr, cfg.setup_timeout).map_err(|source| {
            TransportError::Io {
                op: "connecting",
                source,
            }
        })?;
        Self::establish(stream, session, cfg, version)
    }

    /// Accepts one peer on `listener`, runs the handshake and the RDMA
    /// set-up; [`TransportError::NoRdmaDevice`] before accepting if this
    /// host has no RDMA device.
    pub fn accept(
        listener: &TcpListener,
        session: &Session,
        cfg: &RdmaConfig,
    ) -> Result<Self, TransportError> {
        Self::accept_with_version(listener, session, cfg, PROTOCOL_VERSION)
    }

    /// [`RdmaTransport::accept`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn accept_with_version(
        listener: &TcpListener,
        session: &Session,
        cfg: &RdmaConfig,
        version: u16,
    ) -> Result<Self, TransportError> {
        check_device(cfg)?;
        let (stream, _) = listener.accept().map_err(|source| TransportError::Io {
            op: "accepting",
            source,
        })?;
        Self::establish(stream, session, cfg, version)
    }

    /// Runs the handshake and the RDMA set-up on a connection the caller
    /// accepted itself (having learnt its current generation since).
    pub fn establish_accepted(
        stream: TcpStream,
        session: &Session,
        cfg: &RdmaConfig,
    ) -> Result<Self, TransportError> {
        check_device(cfg)?;
        Self::establish(stream, session, cfg, PROTOCOL_VERSION)
    }

    /// The device in use.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The peer's announced parameters.
    pub fn peer_info(&self) -> &PeerInfo {
        &self.peer
    }

    fn establish(
        mut stream: TcpStream,
        session: &Session,
        cfg: &RdmaConfig,
        version: u16,
    ) -> Result<Self, TransportError> {
        let io = |op| move |source| TransportError::Io { op, source };
        stream
            .set_nodelay(true)
            .map_err(io("setting TCP_NODELAY"))?;
        let established = handshake_timed(&mut stream, session, version)?;
        // The RDMA set-up that follows on this stream has its own bound.
        stream
            .set_read_timeout(Some(cfg.setup_timeout))
            .map_err(io("setting the set-up timeout"))?;
        let local_ip = stream
            .local_addr()
            .map_err(io("reading the local address"))?
            .ip();
        let (mut conn, local, ours) = match Self::prepare(cfg, session, local_ip) {
            Ok(v) => v,
            Err(e) => {
                // Tell the peer why, so both ends report the cause.
                let mut b = [0u8; INFO_LEN];
                b[..8].copy_from_slice(&REFUSE_MAGIC);
                let msg = crate::error_chain(&e);
                let mut n = msg.len().min(88);
                while !msg.is_char_boundary(n) {
                    n -= 1;
                }
                b[8..8 + n].copy_from_slice(&msg.as_bytes()[..n]);
                let _ = stream.write_all(&b);
                return Err(e);
            }
        };
        stream
            .write_all(&ours.encode(&session.key, session.role, &established.binding)?)
            .map_err(io("sending the RDMA info"))?;
        let mut b = [0u8; INFO_LEN];
        stream
            .read_exact(&mut b)
            .map_err(read_err("receiving the RDMA info"))?;
        let peer = PeerInfo::decode(
            &b,
            &session.key,
            established.peer_role,
            &established.binding,
        )?;
        peer.check_usable()?;
        conn.tx_buf = Buf::new(peer.ring_bytes as usize)?;
        let (tx_lkey, _) = conn
            .verbs
            .register(&conn.tx_buf, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0)?;
        conn.tx_lkey = tx_lkey;
        let mtu = match cfg.mtu {
            Some(m) => mtu_enum(m)?,
            None => local.port.active_mtu.min(u32::from(peer.mtu)).max(1),
        };
        conn.verbs.to_rts(
            cfg.port,
            local.gid_index,
            mtu,
            &peer,
            ours.psn,
            cfg.timeout,
            cfg.retry_cnt,
        )?;
        stream
            .write_all(&READY)
            .map_err(io("sending the RDMA ready mark"))?;
        let mut r = [0u8; 8];
        stream
            .read_exact(&mut r)
            .map_err(read_err("receiving the RDMA ready mark"))?;
        if r != READY {
            return Err(TransportError::BadRegion(
                "the peer's RDMA ready mark is wrong",
            ));
        }
        stream
            .set_nonblocking(true)
            .map_err(io("setting O_NONBLOCK"))?;
        let rx_size = conn.rx_buf.len() as u64;
        let max_frame = cfg
            .max_frame
            .min(peer.max_frame as usize)
            .min(peer.ring_bytes as usize / 2)
            .max(FRAME_HEADER_LEN + 64);
        let rx_max = cfg.max_frame.min(rx_size as usize / 2);
        Ok(Self {
            conn,
            device: local.name,
            tx: TxRing::new(peer.ring_bytes),
            rx: RxRing::new(rx_size, rx_max),
            peer,
            inflight: VecDeque::new(),
            spans_posted: 0,
            peer_reaped: 0,
            reaped: 0,
            reaped_data: 0,
            status_sent_data: 0,
            status_inflight: false,
            status_sent: (0, 0, 0),
            ack_out: 0,
            peer_ack: 0,
            reported_ack: 0,
            ack_mode: cfg.ack_mode,
            batch_ends: VecDeque::new(),
            completion_ack: 0,
            max_frame,
            control: stream,
            peer_eof: false,
            last_check: Instant::now(),
            failed: None,
            keys: established.keys,
            status_out_key: status_key(&established.keys, session.role),
            status_out_counter: 0,
            status_in_key: status_key(&established.keys, established.peer_role),
            status_in_counter: 0,
            rx_copy: Vec::new(),
        })
    }

    /// Opens the device, registers the ring and the status blocks, creates
    /// the QP (INIT, receives posted) and returns our info.
    fn prepare(
        cfg: &RdmaConfig,
        session: &Session,
        local_ip: IpAddr,
    ) -> Result<(Conn, Local, PeerInfo), TransportError> {
        let Chosen {
            ctx,
            name,
            port,
            gid_index,
            gid,
        } = choose(cfg, local_ip)?;
        ctx.nonblocking_async()?;
        let rx_bytes = cfg.rx_ring_bytes.unwrap_or(match session.role {
            Role::Backup => (8usize << 20).max((4 * cfg.max_frame).next_power_of_two()),
            Role::Primary => 256 << 10,
        });
        if !rx_bytes.is_power_of_two() || !(64 << 10..=1 << 30).contains(&rx_bytes) {
            return Err(invalid(format!(
                "RDMA ring of {rx_bytes} bytes: must be a power of two in 64 KiB..1 GiB"
            )));
        }
        let mut v = Verbs::new(ctx, (SQ_DEPTH + RECV_DEPTH + 16) as i32)?;
        let remote = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        let rx_buf = Buf::new(rx_bytes)?;
        let (_, ring_rkey) = v.register(&rx_buf, remote)?;
        let status_in = Buf::new(4096)?;
        let (_, status_rkey) = v.register(&status_in, remote)?;
        let status_out = Buf::new(4096)?;
        let (status_out_lkey, _) =
            v.register(&status_out, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0)?;
        let qpn = v.create_qp(SQ_DEPTH, RECV_DEPTH)?;
        v.to_init(cfg.port)?;
        v.post_recvs(RECV_DEPTH as usize, WR_RECV)?;
        let mut r = [0u8; 4];
        getrandom::fill(&mut r).map_err(|e| invalid(format!("no randomness for the PSN: {e}")))?;
        let psn = u32::from_le_bytes(r) & 0x00ff_ffff;
        let info = PeerInfo {
            qpn,
            psn,
            gid,
            lid: port.lid,
            mtu: port.active_mtu as u8,
            ring_rkey,
            ring_addr: rx_buf.ptr() as u64,
            ring_bytes: rx_bytes as u64,
            status_rkey,
            recv_depth: RECV_DEPTH,
            status_addr: status_in.ptr() as u64,
            max_frame: cfg.max_frame as u64,
        };
        let conn = Conn {
            verbs: v,
            rx_buf,
            // Sized after the peer's info arrives; a page until then.
            tx_buf: Buf::new(4096)?,
            status_in,
            status_out,
            tx_lkey: 0,
            status_out_lkey,
        };
        Ok((
            conn,
            Local {
                name,
                port,
                gid_index,
            },
            info,
        ))
    }

    fn fail(&mut self, op: &'static str, reason: String) -> TransportError {
        if self.failed.is_none() {
            self.failed = Some((op, reason));
        }
        self.failure().unwrap_or(TransportError::Closed)
    }

    fn failure(&self) -> Option<TransportError> {
        self.failed
            .as_ref()
            .map(|(op, reason)| TransportError::PeerFailed {
                op,
                reason: reason.clone(),
            })
    }

    fn wc_error(&mut self, wr_id: u64, status: u32) -> TransportError {
        let op = match wr_id {
            WR_RECV => "receiving the peer's writes",
            WR_DATA => "writing frames into the peer's ring",
            _ => "writing our status to the peer",
        };
        let why = match status {
            ibv_wc_status::IBV_WC_RETRY_EXC_ERR => {
                "transport retries exceeded: the peer's NIC stopped acknowledging (peer host or process dead, its QP destroyed, or the link down)"
            }
            ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR => {
                "receiver-not-ready retries exceeded: the peer stopped posting receives"
            }
            ibv_wc_status::IBV_WC_WR_FLUSH_ERR => "flushed: the queue pair is in the error state",
            ibv_wc_status::IBV_WC_REM_ACCESS_ERR => {
                "the peer refused the write (its memory region is gone or the key is wrong)"
            }
            ibv_wc_status::IBV_WC_REM_OP_ERR | ibv_wc_status::IBV_WC_REM_INV_REQ_ERR => {
                "the peer's NIC refused the request"
            }
            _ => "work request failed",
        };
        let reason = format!("{why} [{}]", verbs::wc_status_str(status));
        self.fail(op, reason)
    }

    /// Reaps the completion queue.
    fn reap(&mut self) -> Result<bool, TransportError> {
        let mut wcs = wc_array::<32>();
        let mut moved = false;
        let mut repost = 0usize;
        loop {
            let n = match self.conn.verbs.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    let r = crate::error_chain(&e);
                    return Err(self.fail("polling the completion queue", r));
                }
            };
            for wc in &wcs[..n] {
                let (wr_id, status, opcode, byte_len, imm) = wc_fields(wc);
                if status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(self.wc_error(wr_id, status));
                }
                moved = true;
                match wr_id {
                    WR_RECV => {
                        if opcode != ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                            return Err(TransportError::BadRegion(
                                "the peer sent something other than a write with immediate",
                            ));
                        }
                        if imm == STATUS_IMM {
                            // A status block: read by `refresh_status`.
                            if byte_len as usize != STATUS_LEN {
                                return Err(TransportError::BadRegion(
                                    "the peer's status write has the wrong length",
                                ));
                            }
                        } else {
                            self.rx.on_span(imm, byte_len)?;
                            self.reaped_data += 1;
                        }
                        self.reaped += 1;
                        repost += 1;
                    }
                    WR_DATA => {
                        let Some(end) = self.inflight.pop_front() else {
                            return Err(TransportError::BadRegion(
                                "a write completed that was never posted",
                            ));
                        };
                        self.tx.completed(end);
                        while let Some(&(e, last)) = self.batch_ends.front() {
                            if e > end {
                                break;
                            }
                            self.completion_ack = self.completion_ack.max(last);
                            self.batch_ends.pop_front();
                        }
                    }
                    _ => self.status_inflight = false,
                }
            }
            if n < wcs.len() {
                break;
            }
        }
        if repost > 0 {
            self.conn.verbs.post_recvs(repost, WR_RECV)?;
        }
        Ok(moved)
    }

    /// Reads the status block the peer writes into our memory.
    fn refresh_status(&mut self) -> Result<(), TransportError> {
        let p = self.conn.status_in.ptr().cast::<u64>();
        let mut b = [0u8; STATUS_LEN];
        for (i, x) in b.chunks_exact_mut(8).enumerate() {
            // SAFETY: the status page is ours, 8-aligned, and at least
            // STATUS_LEN bytes; the peer's NIC may write it at any time,
            // hence volatile loads and the tag.
            x.copy_from_slice(&unsafe { std::ptr::read_volatile(p.add(i)) }.to_ne_bytes());
        }
        let Some((counter, consumed, reaped, ack)) = decode_status(&self.status_in_key, &b) else {
            return Ok(()); // never written yet, torn or forged: read again next time
        };
        if counter < self.status_in_counter {
            return Ok(()); // an older block than one already read
        }
        self.status_in_counter = counter;
        if reaped > self.spans_posted {
            return Err(TransportError::BadRegion(
                "the peer reports more writes than we posted",
            ));
        }
        self.tx.peer_consumed(consumed)?;
        self.peer_reaped = self.peer_reaped.max(reaped);
        self.peer_ack = self.peer_ack.max(ack);
        Ok(())
    }

    /// Receive requests of the peer that data writes may use: all but a
    /// quarter, kept for status writes.
    fn data_credit(&self) -> u64 {
        let depth = u64::from(self.peer.recv_depth);
        depth - (depth / 4).max(1)
    }

    /// Posts committed spans while the limits allow.
    fn post(&mut self) -> Result<bool, TransportError> {
        let mut posted = false;
        while self.inflight.len() < MAX_DATA_INFLIGHT
            && self.spans_posted - self.peer_reaped < self.data_credit()
        {
            let Some(span) = self.tx.next_span() else {
                break;
            };
            self.conn.verbs.post_write(
                WR_DATA,
                self.conn.tx_buf.ptr() as u64 + span.off,
                self.conn.tx_lkey,
                span.len as u32,
                self.peer.ring_addr + span.off,
                self.peer.ring_rkey,
                Some(span.imm),
            )?;
            self.tx.posted(&span);
            self.inflight.push_back(span.end);
            self.spans_posted += 1;
            posted = true;
        }
        Ok(posted)
    }

    /// Writes our status block into the peer's memory when due.
    fn send_status(&mut self, force: bool) -> Result<bool, TransportError> {
        if self.status_inflight {
            return Ok(false);
        }
        let now = (self.rx.consumed(), self.reaped, self.ack_out);
        let (c0, r0, a0) = self.status_sent;
        if now == self.status_sent {
            return Ok(false);
        }
        let fresh_data = now.0 != c0 || self.reaped_data != self.status_sent_data;
        let due = force
            || now.2 != a0
            || now.0 - c0 >= self.rx_size() / 4
            || now.1 - r0 >= u64::from(RECV_DEPTH / 4)
            || (fresh_data && self.rx.drained());
        // A status write takes one of the peer's receive requests too.
        if !due || self.spans_posted - self.peer_reaped >= u64::from(self.peer.recv_depth) {
            return Ok(false);
        }
        self.status_out_counter += 1;
        let bytes = encode_status(
            &self.status_out_key,
            self.status_out_counter,
            now.0,
            now.1,
            now.2,
        );
        // SAFETY: the status source page is ours and holds 4096 bytes; the
        // NIC reads it only while a status write is in flight, and none is.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.conn.status_out.ptr(), STATUS_LEN)
        };
        self.conn.verbs.post_write(
            WR_STATUS,
            self.conn.status_out.ptr() as u64,
            self.conn.status_out_lkey,
            STATUS_LEN as u32,
            self.peer.status_addr,
            self.peer.status_rkey,
            Some(STATUS_IMM),
        )?;
        self.spans_posted += 1;
        self.status_inflight = true;
        self.status_sent = now;
        self.status_sent_data = self.reaped_data;
        Ok(true)
    }

    fn rx_size(&self) -> u64 {
        self.conn.rx_buf.len() as u64
    }

    /// The TCP side channel and the async events, at most every
    /// [`CHECK_EVERY`].
    fn check_health(&mut self) -> Result<(), TransportError> {
        let now = Instant::now();
        if now.saturating_duration_since(self.last_check) < CHECK_EVERY {
            return Ok(());
        }
        self.last_check = now;
        while let Some((kind, name)) = self.conn.verbs.ctx.async_event() {
            if verbs::event_is_fatal(kind) {
                return Err(self.fail(
                    "watching the RDMA device",
                    format!("asynchronous event: {name}"),
                ));
            }
        }
        if !self.peer_eof {
            let mut b = [0u8; 1];
            // SAFETY: recv into a 1-byte buffer we own, non-blocking peek.
            let n = unsafe {
                libc::recv(
                    self.control.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                self.peer_eof = true;
            } else if n < 0 {
                let e = std::io::Error::last_os_error();
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                    self.peer_eof = true;
                }
            }
        }
        Ok(())
    }
}

impl Transport for RdmaTransport {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn frame_keys(&self) -> &FrameKeys {
        &self.keys
    }

    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
        if max_len > self.max_frame {
            return Err(TransportError::TooBig {
                want: max_len,
                max: self.max_frame,
            });
        }
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let mut at = self.tx.reserve(max_len)?;
        if at.is_none() {
            self.reap()?;
            self.refresh_status()?;
            at = self.tx.reserve(max_len)?;
        }
        let Some(at) = at else { return Ok(None) };
        let at = at as usize;
        Ok(Some(&mut self.conn.tx_buf.bytes_mut()[at..at + max_len]))
    }

    fn commit(&mut self, len: usize) -> Result<(), TransportError> {
        let Some(at) = self.tx.open_offset() else {
            return Err(TransportError::BadCommit { len, reserved: 0 });
        };
        let at = at as usize;
        if at + len > self.conn.tx_buf.len() {
            return self.tx.commit(len, false).map(|_| ());
        }
        let frame = &self.conn.tx_buf.bytes()[at..at + len];
        let word = |o: usize, n: usize| {
            let mut x = [0u8; 8];
            x[..n].copy_from_slice(&frame[o..o + n]);
            u64::from_le_bytes(x)
        };
        let (kind, seq, count) = if len >= FRAME_HEADER_LEN {
            (word(0, 2), word(16, 8), word(24, 4))
        } else {
            (0, 0, 0)
        };
        if kind == FrameKind::Ack as u64 {
            // The ack travels in the status block, not the ring.
            self.tx.commit(len, true)?;
            self.ack_out = self.ack_out.max(seq);
            self.send_status(true)?;
            return Ok(());
        }
        let end = self.tx.commit(len, false)?;
        if self.ack_mode == AckMode::SendCompletion && kind == FrameKind::Batch as u64 && count > 0
        {
            self.batch_ends.push_back((end, seq + count - 1));
        }
        self.post()?;
        Ok(())
    }

    fn poll(&mut self) -> Result<bool, TransportError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let reaped = self.reap()?;
        self.refresh_status()?;
        let posted = self.post()?;
        let status = self.send_status(false)?;
        self.check_health()?;
        Ok(reaped || posted || status)
    }

    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
        match self.rx.next_frame(self.conn.rx_buf.bytes())? {
            Some((off, len)) => {
                // One copy, checked and decoded by the endpoint: the peer
                // may write the ring again at any time.
                self.rx_copy.clear();
                self.rx_copy
                    .extend_from_slice(&self.conn.rx_buf.bytes()[off..off + len]);
                Ok(Some(&self.rx_copy))
            }
            None => {
                if let Some(e) = self.failure() {
                    return Err(e);
                }
                if self.peer_eof {
                    return Err(TransportError::Closed);
                }
                Ok(None)
            }
        }
    }

    fn flushed(&self) -> bool {
        self.tx.flushed()
    }

    /// Tears the queue pair down (ERR: the peer's NIC can write nothing
    /// more into our ring), then reaps every completion so that each write
    /// that landed before is visible to `recv`: the receiver drains the
    /// ring only after this, so nothing counted as received is left behind
    /// (item 5 of issue 13: it used to return on silence with the QP up).
    fn quiesce(&mut self) -> Result<(), TransportError> {
        self.conn.verbs.to_error()?;
        let mut wcs = wc_array::<32>();
        loop {
            let n =
                self.conn.verbs.poll(&mut wcs).map_err(|e| {
                    self.fail("draining the completion queue", crate::error_chain(&e))
                })?;
            for wc in &wcs[..n] {
                let (wr_id, status, _, byte_len, imm) = wc_fields(wc);
                // Flushed requests (status != SUCCESS) carried nothing.
                if wr_id == WR_RECV && status == ibv_wc_status::IBV_WC_SUCCESS && imm != STATUS_IMM
                {
                    self.rx.on_span(imm, byte_len)?;
                }
            }
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// Sleeps on the completion channel and the TCP side channel (see
    /// "Sleeping" in the module docs).
    fn wait(&mut self, wake: Option<RawFd>, timeout: Duration) -> Result<(), TransportError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if self.peer_eof {
            return Ok(());
        }
        self.conn.verbs.take_events();
        self.conn.verbs.arm()?;
        // Completions that came before the arm raised no event.
        if self.poll()? {
            return Ok(());
        }
        super::wait_readable(
            &[self.conn.verbs.event_fd(), self.control.as_raw_fd()],
            wake,
            timeout,
        )?;
        // The next poll looks at the side channel at once (a readable
        // side channel means the peer is gone).
        self.last_check = Instant::now()
            .checked_sub(CHECK_EVERY)
            .unwrap_or(self.last_check);
        Ok(())
    }

    fn transport_ack(&mut self) -> Option<u64> {
        if let Err(e) = self.refresh_status() {
            let r = crate::error_chain(&e);
            self.fail("reading the peer's status block", r);
            return None;
        }
        let mut best = self.peer_ack;
        if self.ack_mode == AckMode::SendCompletion {
            best = best.max(self.completion_ack);
        }
        (best > self.reported_ack).then(|| {
            self.reported_ack = best;
            best
        })
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        // Let committed frames and the final status (the last ack) reach the
        // peer, for at most 100 ms; then `Conn` destroys the QP before
        // anything it could touch is freed.
        let deadline = Instant::now() + Duration::from_millis(100);
        while self.failed.is_none() && Instant::now() < deadline {
            // Owed: consumption or the ack (receives re-posted for the
            // peer's last status writes are not worth another round trip,
            // and the peer, dropping too, would answer it).
            let owed =
                (self.rx.consumed(), self.ack_out) != (self.status_sent.0, self.status_sent.2);
            let step = self.reap().and_then(|_| self.post()).and_then(|_| {
                if owed {
                    self.send_status(true)
                } else {
                    Ok(false)
                }
            });
            if step.is_err() {
                break;
            }
            if !self.status_inflight && self.inflight.is_empty() && !self.tx.has_unposted() && !owed
            {
                break;
            }
            std::hint::spin_loop();
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn info() -> PeerInfo {
        PeerInfo {
            qpn: 0x11,
            psn: 0xabcdef,
            gid: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 18, 3, 1],
            lid: 0,
            mtu: 5,
            ring_rkey: 0x1234,
            ring_addr: 0x7f00_0000_1000,
            ring_bytes: 8 << 20,
            status_rkey: 0x5678,
            recv_depth: 256,
            status_addr: 0x7f00_0000_9000,
            max_frame: 266_240,
        }
    }

    #[test]
    fn info_round_trips_and_is_authenticated() {
        let binding = [7u8; 64];
        let b = info().encode(b"key", Role::Backup, &binding).unwrap();
        assert_eq!(
            PeerInfo::decode(&b, b"key", Role::Backup, &binding).unwrap(),
            info()
        );
        // Another key, a primary's info replayed as a backup's, or an info
        // block recorded from another connection: refused.
        assert!(PeerInfo::decode(&b, b"other", Role::Backup, &binding).is_err());
        assert!(PeerInfo::decode(&b, b"key", Role::Primary, &binding).is_err());
        let mut other = binding;
        other[40] ^= 1;
        let e = PeerInfo::decode(&b, b"key", Role::Backup, &other).unwrap_err();
        assert!(e.to_string().contains("nonces"), "{e}");
        let mut t = b;
        t[40] ^= 1;
        assert!(PeerInfo::decode(&t, b"key", Role::Backup, &binding).is_err());
    }

    /// Hostile info blocks: every single flipped bit, garbage, all ones,
    /// a refusal without a reason, are each a clear error (no panic); an
    /// authenticated block announcing absurd values (ring of 2^64-1 or 0
    /// bytes, 2^32-1 + 1 not a power of two, no receives) is refused by
    /// `check_usable` before anything is allocated for it.
    #[test]
    fn hostile_info_blocks_are_refused() {
        let binding = [9u8; 64];
        let b = info().encode(b"key", Role::Backup, &binding).unwrap();
        for i in 0..INFO_LEN {
            for bit in [0x01u8, 0x80] {
                let mut t = b;
                t[i] ^= bit;
                assert!(
                    PeerInfo::decode(&t, b"key", Role::Backup, &binding).is_err(),
                    "byte {i} bit {bit:#x}"
                );
            }
        }
        for junk in [[0u8; INFO_LEN], [0xff; INFO_LEN], [b'G'; INFO_LEN]] {
            let e = PeerInfo::decode(&junk, b"key", Role::Backup, &binding).unwrap_err();
            assert!(!e.to_string().is_empty());
        }
        let mut refusal = [0xffu8; INFO_LEN];
        refusal[..8].copy_from_slice(&REFUSE_MAGIC);
        // Not UTF-8 after the magic: still a clear error.
        assert!(PeerInfo::decode(&refusal, b"key", Role::Backup, &binding).is_err());
        assert!(info().check_usable().is_ok());
        for (ring_bytes, recv_depth) in [
            (u64::MAX, 256),
            (0, 256),
            ((1u64 << 32) + 1, 256),
            (1 << 40, 256),
            (32 << 10, 256),
            (8 << 20, 0),
            (8 << 20, 3),
        ] {
            let hostile = PeerInfo {
                ring_bytes,
                recv_depth,
                ..info()
            };
            let b = hostile.encode(b"key", Role::Backup, &binding).unwrap();
            let decoded = PeerInfo::decode(&b, b"key", Role::Backup, &binding).unwrap();
            let e = decoded.check_usable().unwrap_err();
            assert!(e.to_string().contains("unusable ring"), "{ring_bytes}: {e}");
        }
    }

    /// Status blocks a hostile peer (or a torn RDMA write) leaves: all
    /// zeros, all ones, any single flipped bit, counters of 2^64-1 under
    /// another key: never accepted, never a panic.
    #[test]
    fn hostile_status_blocks_are_refused() {
        let keys = FrameKeys::for_tests();
        let key = status_key(&keys, Role::Backup);
        let b = encode_status(&key, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(
            decode_status(&key, &b),
            Some((u64::MAX, u64::MAX, u64::MAX, u64::MAX))
        );
        for i in 0..STATUS_LEN {
            let mut t = b;
            t[i] ^= 0x40;
            assert_eq!(decode_status(&key, &t), None, "byte {i}");
        }
        assert_eq!(decode_status(&key, &[0xff; STATUS_LEN]), None);
        let other = status_key(&FrameKeys::derive(b"x", &[0; 64], 1, 1), Role::Backup);
        let forged = encode_status(&other, u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(decode_status(&key, &forged), None);
    }

    #[test]
    fn refusal_names_the_reason() {
        let mut b = [0u8; INFO_LEN];
        b[..8].copy_from_slice(&REFUSE_MAGIC);
        b[8..19].copy_from_slice(b"no gid here");
        let e = PeerInfo::decode(&b, b"key", Role::Backup, &[0; 64]).unwrap_err();
        assert!(e.to_string().contains("no gid here"), "{e}");
    }

    #[test]
    fn status_block_detects_torn_reads_and_forgeries() {
        let keys = FrameKeys::for_tests();
        let key = status_key(&keys, Role::Backup);
        let b = encode_status(&key, 3, 4096, 17, 99);
        assert_eq!(decode_status(&key, &b), Some((3, 4096, 17, 99)));
        let mut torn = b;
        torn[16] ^= 1;
        assert_eq!(decode_status(&key, &torn), None);
        let unwritten = [0u8; STATUS_LEN];
        assert_eq!(
            decode_status(&key, &unwritten),
            None,
            "an unwritten block is invalid"
        );
        // The primary's own key, or another connection's, cannot make an
        // ack the primary accepts as the backup's.
        let forged = encode_status(&status_key(&keys, Role::Primary), 4, 0, 0, 1 << 40);
        assert_eq!(decode_status(&key, &forged), None);
        let other = FrameKeys::derive(b"other", &[1; 64], 0, 0);
        let forged = encode_status(&status_key(&other, Role::Backup), 4, 0, 0, 1 << 40);
        assert_eq!(decode_status(&key, &forged), None);
    }

    #[test]
    fn ack_mode_and_mtu_settings_parse() {
        assert_eq!(AckMode::parse("backup").unwrap(), AckMode::BackupAck);
        assert_eq!(
            AckMode::parse("completion").unwrap(),
            AckMode::SendCompletion
        );
        assert!(AckMode::parse("sometimes").is_err());
        assert_eq!(AckMode::default(), AckMode::BackupAck);
        assert_eq!(mtu_enum(4096).unwrap(), 5);
        assert!(mtu_enum(1500).is_err());
    }

    #[test]
    fn ipv4_mapped_gids_are_recognized() {
        assert_eq!(ipv4_mapped(&info().gid), Some([198, 18, 3, 1]));
        let mut g = info().gid;
        g[0] = 0xfe;
        assert_eq!(ipv4_mapped(&g), None);
    }
}
