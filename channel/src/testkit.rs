//! Drivers shared by the peer program ([`peer_main`]), the two-process tests and
//! the benchmark: deterministic entries that the receiver can verify, and
//! complete primary / backup runs over any transport.

use std::error::Error;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use tuning::{Profile, Waiter};

use crate::endpoint::{ChannelError, LogReceiver, LogSender, Metrics};
use crate::protocol::{FRAME_HEADER_LEN, FrameHeader, FrameKind};
use crate::protocol::{Role, Session};
use crate::transport::shm::{ShmListener, ShmTransport};
use crate::transport::uring_tcp::UringTcp;
use crate::transport::{Transport, TransportError};
use zerocopy::FromBytes;

/// Fills `buf` with the content of entry `seq`: the seq little-endian, then a
/// pattern derived from it, so any misplaced or damaged byte is detected.
pub fn fill_entry(seq: u64, buf: &mut [u8]) {
    let tag = seq.to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = if i < 8 {
            tag[i]
        } else {
            (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
        };
    }
}

/// True if `entry` is exactly what [`fill_entry`] writes for `seq` and `size`.
pub fn check_entry(seq: u64, size: usize, entry: &[u8]) -> bool {
    if entry.len() != size {
        return false;
    }
    let tag = seq.to_le_bytes();
    entry.iter().enumerate().all(|(i, &b)| {
        b == if i < 8 {
            tag[i]
        } else {
            (seq as u8).wrapping_mul(31).wrapping_add(i as u8)
        }
    })
}

/// How much of each entry is generated and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// Every byte generated, checked and digested (tests).
    Full,
    /// Only the 8-byte sequence tag is written and checked, and no digest is
    /// kept, so a benchmark measures the channel rather than the pattern.
    TagOnly,
}

fn stamp(seq: u64, buf: &mut [u8]) {
    let tag = seq.to_le_bytes();
    let n = buf.len().min(8);
    buf[..n].copy_from_slice(&tag[..n]);
}

fn tag_ok(seq: u64, size: usize, entry: &[u8]) -> bool {
    let n = size.min(8);
    entry.len() == size && entry[..n] == seq.to_le_bytes()[..n]
}

/// What a finished run reports.
#[derive(Debug)]
pub struct RunSummary {
    /// Entries sent (primary) or received and verified (backup).
    pub entries: u64,
    /// Wall time from the first push or receipt to the end.
    pub elapsed: Duration,
    /// The end's metrics.
    pub metrics: Metrics,
    /// crc32c over every entry in order (both ends compute the same).
    pub digest: u32,
}

/// A primary run: pushes `entries` entries of `size` bytes, optionally
/// corrupting the batch that holds entry `corrupt_at`, and waits until all
/// are acked (`entries` = `u64::MAX` runs until an error, for kill tests).
pub fn run_primary<T: Transport>(
    t: T,
    generation: u64,
    profile: &Profile,
    entries: u64,
    size: usize,
    content: Content,
    corrupt_at: Option<u64>,
) -> Result<RunSummary, ChannelError> {
    run_primary_framed(
        t,
        generation,
        profile,
        entries,
        size,
        content,
        corrupt_at,
        Framing::Authenticated,
    )
}

/// How a benchmark's frames are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// The AES-256-GCM tag, as on every replica's connection.
    Authenticated,
    /// crc32c only: the benchmark's same-run baseline (crate-private).
    Crc32cBaseline,
}

/// [`run_primary`] with the given framing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_primary_framed<T: Transport>(
    t: T,
    generation: u64,
    profile: &Profile,
    entries: u64,
    size: usize,
    content: Content,
    corrupt_at: Option<u64>,
    framing: Framing,
) -> Result<RunSummary, ChannelError> {
    let t = Corrupting {
        inner: t,
        at: corrupt_at,
    };
    let mut s = LogSender::new(t, generation, 1, profile.batch, profile.liveness)?;
    if framing == Framing::Crc32cBaseline {
        s = s.crc32c_baseline();
    }
    let mut buf = vec![0u8; size];
    fill_entry(0, &mut buf);
    let mut waiter = Waiter::new(profile.poll);
    let mut digest = 0u32;
    let start = Instant::now();
    let mut seq = 1u64;
    while seq <= entries {
        match content {
            Content::Full => fill_entry(seq, &mut buf),
            Content::TagOnly => stamp(seq, &mut buf),
        }
        match s.try_push(&buf)? {
            Some(_) => {
                if content == Content::Full {
                    digest = crc32c::crc32c_append(digest, &buf);
                }
                seq += 1;
                if seq.is_multiple_of(64) {
                    // More entries are ready: read acks, keep the batch open.
                    s.poll_io()?;
                }
                waiter.work();
            }
            None => {
                s.poll()?;
                waiter.idle();
            }
        }
    }
    s.flush()?;
    while s.acked() < seq - 1 {
        match s.poll() {
            Ok(_) => waiter.idle(),
            // The backup may close right after its final ack: an ack that
            // arrived before the close still counts.
            Err(_) if s.acked() == seq - 1 => break,
            Err(e) => return Err(e),
        }
    }
    Ok(RunSummary {
        entries: seq - 1,
        elapsed: start.elapsed(),
        metrics: s.metrics().clone(),
        digest,
    })
}

/// A transport that flips one payload byte of the batch carrying entry
/// `at` after the sender sealed it (as a bad link or an on-path forger
/// would), and is otherwise `inner`: how tests damage a frame without a
/// hook in the production sealing path.
pub struct Corrupting<T> {
    /// The real transport.
    pub inner: T,
    /// The entry whose batch to damage, once.
    pub at: Option<u64>,
}

impl<T: Transport> Transport for Corrupting<T> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }
    fn frame_keys(&self) -> &crate::protocol::FrameKeys {
        self.inner.frame_keys()
    }
    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
        self.inner.reserve(max_len)
    }
    fn commit(&mut self, len: usize) -> Result<(), TransportError> {
        if let Some(at) = self.at
            && len > FRAME_HEADER_LEN
            && let Some(frame) = self.inner.reserve(len)?
            && let Ok((h, _)) = FrameHeader::ref_from_prefix(&frame[..])
            && h.kind.get() == FrameKind::Batch as u16
            && (h.seq.get()..h.seq.get().saturating_add(u64::from(h.count.get()))).contains(&at)
        {
            frame[FRAME_HEADER_LEN + (len - FRAME_HEADER_LEN) / 2] ^= 0x5a;
            self.at = None;
        }
        self.inner.commit(len)
    }
    fn poll(&mut self) -> Result<bool, TransportError> {
        self.inner.poll()
    }
    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
        self.inner.recv()
    }
    fn flushed(&self) -> bool {
        self.inner.flushed()
    }
    fn sends_only_when_polled(&self) -> bool {
        self.inner.sends_only_when_polled()
    }
    fn transport_ack(&mut self) -> Option<u64> {
        self.inner.transport_ack()
    }
    fn wait(
        &mut self,
        wake: Option<std::os::fd::RawFd>,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        self.inner.wait(wake, timeout)
    }
}

/// Why a backup run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The channel failed (the error says how), after `received` entries.
    #[error("channel failed after {received} entries")]
    Channel {
        /// Entries received and verified before the failure.
        received: u64,
        /// The failure.
        #[source]
        source: ChannelError,
    },
    /// An entry arrived with the wrong content.
    #[error("entry {seq} has the wrong content")]
    BadEntry {
        /// Its sequence number.
        seq: u64,
    },
}

/// A backup run: receives and verifies `entries` entries of `size` bytes.
/// `on_progress` is called after each poll with the count so far.
pub fn run_backup<T: Transport>(
    t: T,
    generation: u64,
    profile: &Profile,
    entries: u64,
    size: usize,
    content: Content,
    on_progress: impl FnMut(u64),
) -> Result<RunSummary, BackupError> {
    run_backup_framed(
        t,
        generation,
        profile,
        entries,
        size,
        content,
        on_progress,
        Framing::Authenticated,
    )
}

/// [`run_backup`] with the given framing.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_backup_framed<T: Transport>(
    t: T,
    generation: u64,
    profile: &Profile,
    entries: u64,
    size: usize,
    content: Content,
    mut on_progress: impl FnMut(u64),
    framing: Framing,
) -> Result<RunSummary, BackupError> {
    let chan = |received, source| BackupError::Channel { received, source };
    let mut r = LogReceiver::new(t, generation, 1, profile.ack, profile.liveness)
        .map_err(|e| chan(0, e))?;
    if framing == Framing::Crc32cBaseline {
        r = r.crc32c_baseline();
    }
    let mut waiter = Waiter::new(profile.poll);
    let mut digest = 0u32;
    let mut bad = None;
    let mut start = None;
    while r.received() < entries {
        let polled = r.poll(|seq, e| {
            let ok = match content {
                Content::Full => {
                    digest = crc32c::crc32c_append(digest, e);
                    check_entry(seq, size, e)
                }
                Content::TagOnly => tag_ok(seq, size, e),
            };
            if bad.is_none() && !ok {
                bad = Some(seq);
            }
        });
        let n = match polled {
            Ok(n) => n,
            // Everything arrived; the sender may close at once (it counts
            // entries as delivered on its own completions, see the RDMA
            // transport's ack modes), so the final ack finds it gone.
            Err(_) if r.received() >= entries && bad.is_none() => break,
            Err(e) => return Err(chan(r.received(), e)),
        };
        if let Some(seq) = bad {
            return Err(BackupError::BadEntry { seq });
        }
        if n > 0 {
            start.get_or_insert_with(Instant::now);
            waiter.work();
            on_progress(r.received());
        } else {
            // Sleeps on the transport (the shm doorbell, the socket) once
            // past the spin and yield phases.
            waiter
                .idle_with(|timeout| r.wait(timeout))
                .map_err(|e| chan(r.received(), e))?;
        }
    }
    // Poll until the final ack has left (even under a lazy policy), so the
    // sender hears it before it sees this end close.
    let deadline = Instant::now() + std::time::Duration::from_secs(1);
    while r.poll(|_, _| {}).is_ok() && !r.sent_everything() && Instant::now() < deadline {}
    let _ = r.poll(|_, _| {});
    Ok(RunSummary {
        entries: r.received(),
        elapsed: start.map(|s| s.elapsed()).unwrap_or_default(),
        metrics: r.metrics().clone(),
        digest,
    })
}

// ---- the peer program: one channel end in its own process ----

pub use crate::error_chain;

/// Runs one channel end as told by `key=value` arguments (see the module
/// docs of `examples/channel_peer.rs`): connects or listens, runs the
/// handshake, then sends or receives and verifies the entries. Returns the
/// `OK entries=N digest=HEX` line.
pub fn peer_main(args: &[String]) -> Result<String, Box<dyn Error>> {
    let mut opt = std::collections::HashMap::new();
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or((a.as_str(), ""));
        opt.insert(k.to_string(), v.to_string());
    }
    let get = |k: &str, d: &str| opt.get(k).cloned().unwrap_or_else(|| d.to_string());
    let num = |k: &str, d: u64| -> Result<u64, Box<dyn Error>> {
        match opt.get(k) {
            Some(v) if v == "forever" => Ok(u64::MAX),
            Some(v) => Ok(v.parse()?),
            None => Ok(d),
        }
    };
    let role = match get("role", "primary").as_str() {
        "primary" => Role::Primary,
        "backup" => Role::Backup,
        r => return Err(format!("unknown role {r}").into()),
    };
    let session = Session {
        vm_id: num("vm", 1)?,
        generation: num("gen", 1)?,
        role,
        key: get("key", "lockstep-test-key").into_bytes(),
    };
    let version = num("version", u64::from(crate::protocol::PROTOCOL_VERSION))? as u16;
    let entries = num("entries", 1000)?;
    let size = num("size", 64)? as usize;
    let corrupt_at = opt.get("corrupt_at").map(|v| v.parse()).transpose()?;
    let endpoint = get("endpoint", "127.0.0.1:7000");
    let listen = opt.contains_key("listen");
    let mut profile = Profile::two_core();
    if let Some(ms) = opt.get("peer_timeout_ms") {
        profile.liveness.peer_timeout = Duration::from_millis(ms.parse()?);
    }
    let max_frame = profile.batch.max_bytes as usize + 4096;
    let g = session.generation;
    match get("transport", "uring").as_str() {
        "uring" => {
            let t = if listen {
                let l = TcpListener::bind(&endpoint)?;
                UringTcp::accept_with_version(&l, &session, max_frame, version)?
            } else {
                UringTcp::connect_with_version(endpoint.parse()?, &session, max_frame, version)?
            };
            drive(t, role, g, &profile, entries, size, corrupt_at)
        }
        "shm" => {
            let t = if listen {
                ShmListener::bind(Path::new(&endpoint))?.accept_with_version(
                    &session,
                    8 << 20,
                    version,
                )?
            } else {
                ShmTransport::connect_with_version(Path::new(&endpoint), &session, version)?
            };
            drive(t, role, g, &profile, entries, size, corrupt_at)
        }
        t => Err(format!("unknown transport {t}").into()),
    }
}

fn drive<T: Transport>(
    t: T,
    role: Role,
    generation: u64,
    profile: &Profile,
    entries: u64,
    size: usize,
    corrupt_at: Option<u64>,
) -> Result<String, Box<dyn Error>> {
    let s = match role {
        Role::Primary => run_primary(
            t,
            generation,
            profile,
            entries,
            size,
            Content::Full,
            corrupt_at,
        )?,
        Role::Backup => run_backup(t, generation, profile, entries, size, Content::Full, |_| {})?,
    };
    Ok(format!("OK entries={} digest={:08x}", s.entries, s.digest))
}
