//! The primary's side of the link: the vCPU hands each log entry to a ring,
//! a sender thread batches them onto the channel, and each ack releases the
//! output gate's frames on that thread, the moment it arrives.
//!
//! ```text
//!  vCPU thread                        sender thread                      backup
//!  entry ─▶ [ SPSC ring ] ─▶ LogSender (batches, crc, generation) ─▶ transport ─▶
//!                            ack(seq) ◀──────────────────────────────────────────
//!                            gate.ack(seq - 1): frames produced at ≤ seq - 1 leave
//! ```
//!
//! Channel sequence number 1 carries the log's file header; log entry `n`
//! travels as channel sequence number `n + 1`.

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use channel::endpoint::Metrics;
use channel::log::LogMeta;
use channel::pipeline::{SenderHandle, reuse, spawn_sender_recycling};
use channel::protocol::Role;
use channel::ring::{Consumer, Producer, PushError, RingBuffer};
use channel::transport::TransportError;
use channel::transport::shm::ShmTransport;
use channel::transport::uring_tcp::UringTcp;
use nic::gate::OutputGate;
use tuning::HostCores;

use crate::ReplicaError;
use crate::link::{LinkSettings, MAX_FRAME, TransportKind};

/// Acks as the sender thread sees them.
#[derive(Debug, Default)]
struct AckCounters {
    /// Acks that advanced the watermark.
    acks: AtomicU64,
    /// Highest log position acknowledged.
    acked: AtomicU64,
}

/// The primary's end of the replication link.
pub struct PrimaryLink {
    ring: Producer<Vec<u8>>,
    /// Sent entries' buffers, back from the sender for reuse.
    recycled: Consumer<Vec<u8>>,
    /// Dates the acks: only fresh ones release output (see
    /// `failover`'s module docs).
    lease: Arc<crate::failover::Lease>,
    /// Channel seq of the last entry pushed.
    pushed: u64,
    /// When the lease was last marked.
    marked: Instant,
    sender: Option<SenderHandle>,
    counters: Arc<AckCounters>,
    transport: &'static str,
    ended: Option<String>,
}

impl PrimaryLink {
    /// Connects to the backup at `address` over `settings.kind`, retrying
    /// until `timeout` while nobody listens there yet (the backup may still
    /// be starting), runs the authenticated handshake for `generation`,
    /// sends the log header, and starts the sender thread, which releases
    /// `gate`'s frames as acks arrive.
    pub fn connect(
        address: &str,
        settings: &LinkSettings,
        generation: u64,
        meta: &LogMeta,
        gate: Arc<OutputGate>,
        timeout: Duration,
    ) -> Result<Self, ReplicaError> {
        let session = settings.session(Role::Primary, generation);
        let deadline = Instant::now() + timeout;
        let connected = loop {
            match connect_once(settings, address, &session) {
                Ok(connected) => break connected,
                Err(error) if is_not_listening(&error) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(error) => {
                    return Err(ReplicaError::Transport {
                        what: format!(
                            "cannot connect to the backup at {address} over {}",
                            settings.kind.name()
                        ),
                        source: error,
                    });
                }
            }
        };
        Self::start(connected, settings, generation, meta, gate, 0)
    }

    /// Starts streaming over an established transport; the stream's first
    /// log entry is `base + 1` (a joined backup already has entries up to
    /// `base` in the state it received).
    fn start(
        connected: Connected,
        settings: &LinkSettings,
        generation: u64,
        meta: &LogMeta,
        gate: Arc<OutputGate>,
        base: u64,
    ) -> Result<Self, ReplicaError> {
        let cores = HostCores::detect().map_err(ReplicaError::Cores)?;
        let (ring, consumer) = RingBuffer::new::<Vec<u8>>(settings.profile.ring_slots as usize);
        let (recycle, recycled) = RingBuffer::new::<Vec<u8>>(settings.profile.ring_slots as usize);
        let counters = Arc::new(AckCounters::default());
        let lease = Arc::new(crate::failover::Lease::new(
            settings.profile.liveness.peer_timeout,
        ));
        let on_ack = {
            let counters = Arc::clone(&counters);
            let lease = Arc::clone(&lease);
            move |seq: u64| {
                // Channel seq 1 is the header: log position = base + seq - 1.
                let position = base + seq - 1;
                // A stale ack releases nothing (the backup may be live).
                if !lease.acknowledged(seq) {
                    return;
                }
                gate.ack(position);
                lease.renewed();
                counters.acked.fetch_max(position, Ordering::Release);
                counters.acks.fetch_add(1, Ordering::Relaxed);
            }
        };
        counters.acked.store(base, Ordering::Release);
        let (sender, transport) = match connected {
            Connected::Tcp(t) => (
                spawn_sender_recycling(
                    consumer,
                    Some(recycle),
                    *t,
                    generation,
                    &settings.profile,
                    &cores,
                    on_ack,
                ),
                "uring-tcp",
            ),
            Connected::Shm(t) => (
                spawn_sender_recycling(
                    consumer,
                    Some(recycle),
                    *t,
                    generation,
                    &settings.profile,
                    &cores,
                    on_ack,
                ),
                "shm",
            ),
            #[cfg(feature = "rdma")]
            Connected::Rdma(t) => (
                spawn_sender_recycling(
                    consumer,
                    Some(recycle),
                    *t,
                    generation,
                    &settings.profile,
                    &cores,
                    on_ack,
                ),
                "rdma",
            ),
        };
        let sender = sender.map_err(|source| ReplicaError::Pipeline {
            what: "cannot start the log sender".into(),
            source,
        })?;
        let mut link = Self {
            ring,
            recycled,
            lease,
            pushed: 0,
            // In the past, so that the first push (the header) is dated.
            marked: Instant::now()
                .checked_sub(Duration::from_secs(1))
                .unwrap_or_else(Instant::now),
            sender: Some(sender),
            counters,
            transport,
            ended: None,
        };
        let mut header = meta.header_bytes().to_vec();
        if base > 0 {
            header.extend_from_slice(&base.to_le_bytes());
        }
        link.push(header).map_err(ReplicaError::Channel)?;
        Ok(link)
    }

    /// Streams to a joined backup over `stream` (its join connection, now
    /// authenticated again for `generation`), from log entry `base + 1`.
    pub fn joined(
        stream: std::net::TcpStream,
        settings: &LinkSettings,
        generation: u64,
        meta: &LogMeta,
        gate: Arc<OutputGate>,
        base: u64,
    ) -> Result<Self, ReplicaError> {
        let session = settings.session(Role::Primary, generation);
        let t = UringTcp::establish_accepted(stream, &session, MAX_FRAME)
            .map_err(ReplicaError::transport("authenticate the joined backup"))?;
        Self::start(
            Connected::Tcp(Box::new(t)),
            settings,
            generation,
            meta,
            gate,
            base,
        )
    }

    /// The transport's name.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// An empty buffer with room for `capacity` bytes to encode the next
    /// entry into: one the sender handed back, so the vCPU allocates
    /// nothing per entry in steady state (see [`channel::pipeline::reuse`]).
    pub fn buffer(&mut self, capacity: usize) -> Vec<u8> {
        reuse(&mut self.recycled, capacity)
    }

    /// Hands one encoded log entry to the sender thread, waiting while the
    /// ring is full. `Err` says why the link is gone (the backup failed, fell
    /// silent, or refused a frame); the entry is then dropped.
    pub fn push(&mut self, entry: Vec<u8>) -> Result<(), String> {
        if let Some(reason) = self.lost() {
            return Err(reason);
        }
        // Date the entries for the lease, at most once a millisecond: every
        // entry after `pushed` is pushed after now.
        let now = Instant::now();
        if now.saturating_duration_since(self.marked) >= Duration::from_millis(1) {
            self.lease.mark_at(self.pushed, now);
            self.marked = now;
        }
        let mut entry = entry;
        loop {
            match self.ring.push(entry) {
                Ok(()) => {
                    self.pushed += 1;
                    return Ok(());
                }
                Err(PushError::Full(back)) => {
                    entry = back;
                    if let Some(sender) = &self.sender {
                        sender.note_ring_full();
                    }
                    if let Some(reason) = self.lost() {
                        return Err(reason);
                    }
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Wakes the sender thread: the entries pushed so far must leave now.
    pub fn wake(&self) {
        self.lease.mark(self.pushed);
        if let Some(sender) = &self.sender {
            sender.wake();
        }
    }

    /// The lease that dates this link's acks.
    pub fn lease(&self) -> Arc<crate::failover::Lease> {
        Arc::clone(&self.lease)
    }

    /// Why the link is gone, once it is (the sender thread ended, or an ack
    /// came too late to be trusted).
    pub fn lost(&mut self) -> Option<String> {
        if self.ended.is_none()
            && let Some(stale) = self.lease.stale()
        {
            self.ended = Some(stale);
        }
        if self.ended.is_none() && self.sender.as_ref().is_some_and(SenderHandle::ended) {
            let reason = match self.sender.take().map(SenderHandle::abandon) {
                Some(Err(error)) => arbiter::error_chain(&error),
                _ => "the sender thread stopped".to_string(),
            };
            self.ended = Some(reason);
        }
        self.ended.clone()
    }

    /// The channel's figures so far (batches, ack round trips, stalls,
    /// heartbeats), as of the sender's last idle moment.
    pub fn metrics(&self) -> Option<Metrics> {
        self.sender.as_ref().and_then(SenderHandle::snapshot)
    }

    /// Highest log position the backup has acknowledged.
    pub fn acked(&self) -> u64 {
        self.counters.acked.load(Ordering::Acquire)
    }

    /// Acks that advanced the watermark.
    pub fn acks(&self) -> u64 {
        self.counters.acks.load(Ordering::Relaxed)
    }

    /// Sends what is in the ring, waits up to 5 s for the last acks, and
    /// closes the link.
    pub fn finish(mut self) -> LinkEnd {
        let metrics = match self.lost() {
            Some(reason) => Err(reason),
            None => match self.sender.take() {
                Some(sender) => sender.finish().map_err(|e| arbiter::error_chain(&e)),
                None => Err("the link was already closed".into()),
            },
        };
        // The sender thread has ended: its last acks are counted.
        LinkEnd {
            metrics,
            acked: self.acked(),
            acks: self.acks(),
        }
    }

    /// Closes the link at once (the backup is being given up on).
    pub fn abandon(mut self) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.abandon();
        }
    }
}

/// How a finished link ended.
pub struct LinkEnd {
    /// The channel's figures, or why the link failed before the end.
    pub metrics: Result<Metrics, String>,
    /// The last log position acknowledged.
    pub acked: u64,
    /// Acks that advanced the watermark.
    pub acks: u64,
}

enum Connected {
    Tcp(Box<UringTcp>),
    Shm(Box<ShmTransport>),
    #[cfg(feature = "rdma")]
    Rdma(Box<channel::transport::rdma::RdmaTransport>),
}

fn connect_once(
    settings: &LinkSettings,
    address: &str,
    session: &channel::protocol::Session,
) -> Result<Connected, TransportError> {
    match settings.kind {
        TransportKind::Tcp => UringTcp::connect(resolve(address)?, session, MAX_FRAME)
            .map(|t| Connected::Tcp(Box::new(t))),
        TransportKind::Shm => ShmTransport::connect(&LinkSettings::shm_path(address), session)
            .map(|t| Connected::Shm(Box::new(t))),
        #[cfg(feature = "rdma")]
        TransportKind::Rdma => {
            let config = settings.rdma_config()?;
            channel::transport::rdma::RdmaTransport::connect(resolve(address)?, session, &config)
                .map(|t| Connected::Rdma(Box::new(t)))
        }
        #[cfg(not(feature = "rdma"))]
        TransportKind::Rdma => Err(TransportError::Io {
            op: "connecting over RDMA",
            source: std::io::Error::other(crate::link::rdma_available().err().unwrap_or_default()),
        }),
    }
}

fn resolve(address: &str) -> Result<std::net::SocketAddr, TransportError> {
    address
        .to_socket_addrs()
        .map_err(|source| TransportError::Io {
            op: "resolving the backup's address",
            source,
        })?
        .next()
        .ok_or_else(|| TransportError::Io {
            op: "resolving the backup's address",
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })
}

/// Nobody listens there yet: worth retrying.
fn is_not_listening(error: &TransportError) -> bool {
    matches!(
        error,
        TransportError::Io { op, source }
            if op.starts_with("connecting")
                && matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                )
    )
}

/// Why a starting primary may not register its pair.
#[derive(Debug, thiserror::Error)]
pub enum SupersedeError {
    /// `--supersede-generation` names a VM the arbiter has never seen (a
    /// usage error).
    #[error(
        "--supersede-generation {generation}: the arbiter has no record of VM {vm}; start without it"
    )]
    NoRecord { vm: u64, generation: u64 },
    /// The arbiter's record forbids it: the replica must halt (fail-stop)
    /// with this explanation.
    #[error("{0}")]
    Refused(String),
}

/// Which generation a starting primary registers its pair over: 0 for a VM
/// the arbiter has never seen, or the generation the operator named with
/// `--supersede-generation`, which must be the current one. Anything else
/// is refused with who holds which generation: a primary restarted by a
/// supervisor, or a second one started by mistake with the same id, must
/// never take the VM from a running pair (or from a backup failing over,
/// which holds the only current state).
pub fn generation_to_supersede(
    vm: u64,
    me: &arbiter::ReplicaId,
    record: Option<&arbiter::VmRecord>,
    supersede: Option<u64>,
) -> Result<u64, SupersedeError> {
    let describe = |r: &arbiter::VmRecord| {
        format!(
            "generation {} has primary {} and {}",
            r.generation,
            r.primary,
            r.backup.as_ref().map_or_else(
                || "no backup (it runs alone)".to_string(),
                |b| format!("backup {b}")
            )
        )
    };
    match (record, supersede) {
        (None, None) => Ok(0),
        (None, Some(g)) => Err(SupersedeError::NoRecord { vm, generation: g }),
        (Some(r), None) => Err(SupersedeError::Refused(format!(
            "refusing to start VM {vm} as {me}: the arbiter already records it ({}). A running pair, or a backup taking over, may hold the only current state. If that pair is gone for good, start again with --supersede-generation {}",
            describe(r),
            r.generation
        ))),
        (Some(r), Some(g)) if r.generation != g => Err(SupersedeError::Refused(format!(
            "--supersede-generation {g} is not VM {vm}'s current generation: {}; refusing to start",
            describe(r)
        ))),
        (Some(r), Some(g)) if r.primary != *me => Err(SupersedeError::Refused(format!(
            "--supersede-generation {g}: only the primary of generation {g} may start a new pair for VM {vm} ({}), not {me}; refusing to start",
            describe(r)
        ))),
        (Some(_), Some(g)) => Ok(g),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter::{ReplicaId, VmRecord};

    fn id(name: &str) -> ReplicaId {
        ReplicaId::new(name.to_string()).expect("id")
    }

    #[test]
    fn a_primary_supersedes_only_the_generation_it_names_and_leads() {
        let me = id("host-a");
        let record = VmRecord {
            generation: 3,
            primary: me.clone(),
            backup: Some(id("host-b")),
        };
        assert_eq!(generation_to_supersede(1, &me, None, None).ok(), Some(0));
        assert!(matches!(
            generation_to_supersede(1, &me, None, Some(3)),
            Err(SupersedeError::NoRecord { .. })
        ));
        assert!(matches!(
            generation_to_supersede(1, &me, Some(&record), None),
            Err(SupersedeError::Refused(why)) if why.contains("--supersede-generation 3")
        ));
        assert!(matches!(
            generation_to_supersede(1, &me, Some(&record), Some(2)),
            Err(SupersedeError::Refused(_))
        ));
        assert!(matches!(
            generation_to_supersede(1, &id("host-c"), Some(&record), Some(3)),
            Err(SupersedeError::Refused(why)) if why.contains("not host-c")
        ));
        assert_eq!(
            generation_to_supersede(1, &me, Some(&record), Some(3)).ok(),
            Some(3)
        );
    }
}
