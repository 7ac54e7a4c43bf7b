//! The backup's side of the link: receive the log over the channel, ack on
//! receipt (before replay: the Output Rule needs only that the backup *can*
//! reproduce an output), and feed the replay in lockstep.
//!
//! ```text
//!  transport ─▶ receiver thread: LogReceiver (crc, generation, seq) ─▶ staged ─▶ queue ─▶ vCPU: Replay
//!               └ ack(seq) by policy (on drain, every N, after T µs), sent
//!                 before the staged entries are queued (which wakes the vCPU);
//!                 heartbeats when idle
//! ```

use std::collections::VecDeque;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use channel::endpoint::{ChannelError, LogReceiver};
use channel::log::{Entry, LogMeta, decode_entry};
use channel::protocol::Role;
use channel::transport::shm::ShmListener;
use channel::transport::uring_tcp::UringTcp;
use channel::transport::{Transport, TransportError};
use hdrhistogram::Histogram;
use tuning::Waiter;
use vmm::VmmError;
use vmm::events::EntrySource;

use crate::ReplicaError;
use crate::link::{LinkSettings, MAX_FRAME, SHM_RING_BYTES, TransportKind};

/// Entries received but not yet replayed, at most (then the receiver stops
/// reading, and the transport's flow control slows the primary: nothing is
/// dropped). While it is full the receiver still acks what it received
/// and heartbeats, so a slow replay throttles the primary instead of
/// looking dead to it.
pub const QUEUE_ENTRIES: usize = 65_536;

/// How long the receiver naps between looks at a full queue.
const BACKLOG_NAP: std::time::Duration = std::time::Duration::from_micros(200);

type Received = Result<(Entry, Instant), VmmError>;

/// How far the replay trails the primary.
#[derive(Clone, Debug)]
pub struct Lag {
    /// Most exits between the newest entry received and the one replayed.
    pub max_exits: u64,
    /// Most log entries received but not yet replayed.
    pub max_entries: u64,
    /// Time from receipt to replay of each entry, in µs.
    pub queue_us: Histogram<u64>,
}

/// The replay's view of the link: an [`EntrySource`] that blocks until the
/// primary's next entry arrives.
pub struct StreamSource {
    entries: Receiver<Received>,
    newest_exit: Arc<AtomicU64>,
    /// Log position of the newest entry received (the receiver's).
    newest_seq: Arc<AtomicU64>,
    /// Log position of the newest entry handed to the replay.
    replayed_seq: u64,
    lag: Lag,
    /// Detached: the receiver ends when the primary closes the link or
    /// falls silent, or when this source (the queue) is dropped.
    _receiver: JoinHandle<()>,
    lost: Arc<Mutex<Option<String>>>,
    /// The receiver's metrics (receipt-to-ack times, sleeps), once it has
    /// ended.
    ack_delay: Arc<Mutex<Option<channel::endpoint::Metrics>>>,
}

impl StreamSource {
    /// Lag figures so far.
    pub fn lag(&self) -> &Lag {
        &self.lag
    }

    /// ns from a batch's receipt to the ack covering it, as the receiver
    /// thread measured them; `None` until that thread has ended.
    pub fn ack_delay_ns(&self) -> Option<Histogram<u64>> {
        self.receiver_metrics().map(|m| m.ack_lag)
    }

    /// The receiver thread's metrics; `None` until that thread has ended.
    pub fn receiver_metrics(&self) -> Option<channel::endpoint::Metrics> {
        self.ack_delay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the primary counts as lost, once it does.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Exit number of the newest entry received.
    pub fn newest_exit(&self) -> u64 {
        self.newest_exit.load(Ordering::Acquire)
    }

    /// Log entries received but not yet handed to the replay.
    pub fn lag_entries(&self) -> u64 {
        self.newest_seq
            .load(Ordering::Acquire)
            .saturating_sub(self.replayed_seq)
    }
}

impl EntrySource for StreamSource {
    fn next_entry(&mut self) -> Result<Option<Entry>, VmmError> {
        match self.entries.recv() {
            Ok(Ok((entry, received))) => {
                let newest = self.newest_exit.load(Ordering::Acquire);
                self.lag.max_exits = self.lag.max_exits.max(newest.saturating_sub(entry.exit));
                // Behind the entry it hands over, before the handing.
                let behind = self
                    .newest_seq
                    .load(Ordering::Acquire)
                    .saturating_sub(self.replayed_seq);
                self.lag.max_entries = self.lag.max_entries.max(behind);
                self.replayed_seq = self.replayed_seq.max(entry.seq);
                let waited = u64::try_from(received.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = self.lag.queue_us.record(waited.max(1));
                Ok(Some(entry))
            }
            Ok(Err(error)) => Err(error),
            // The receiver ended without an error: the stream ended cleanly.
            Err(_) => Ok(None),
        }
    }
}

/// Where the backup waits for its primary.
pub enum LinkListener {
    /// io_uring TCP, or RDMA set up over TCP.
    Tcp(TcpListener, TransportKind),
    /// Shared memory, set up over a unix socket.
    Shm(ShmListener),
}

impl LinkListener {
    /// Listens on `address` for the transport `kind`.
    pub fn bind(kind: TransportKind, address: &str) -> Result<Self, ReplicaError> {
        match kind {
            TransportKind::Tcp | TransportKind::Rdma => TcpListener::bind(address)
                .map(|listener| Self::Tcp(listener, kind))
                .map_err(|source| ReplicaError::Link {
                    what: format!("listen on {address}"),
                    source,
                }),
            TransportKind::Shm => ShmListener::bind(&LinkSettings::shm_path(address))
                .map(Self::Shm)
                .map_err(ReplicaError::transport(format!(
                    "cannot listen on {address}"
                ))),
        }
    }

    /// Waits for a primary to connect (no handshake yet: the caller first
    /// learns its current generation, see [`Incoming::establish`]).
    pub fn accept(&self) -> Result<Incoming, ReplicaError> {
        match self {
            Self::Tcp(listener, kind) => {
                let (stream, peer) = listener.accept().map_err(|source| ReplicaError::Link {
                    what: "accept the primary's connection".into(),
                    source,
                })?;
                Ok(Incoming {
                    stream: match kind {
                        TransportKind::Rdma => IncomingStream::Rdma(stream),
                        _ => IncomingStream::Tcp(stream),
                    },
                    peer: peer.to_string(),
                })
            }
            Self::Shm(listener) => {
                let stream = listener.accept_stream().map_err(|e| match e {
                    TransportError::Io { source, .. } => ReplicaError::Link {
                        what: "accept the primary's connection".into(),
                        source,
                    },
                    source => ReplicaError::Transport {
                        what: "accept the primary's connection".into(),
                        source,
                    },
                })?;
                Ok(Incoming {
                    stream: IncomingStream::Shm(stream),
                    peer: "a local primary (shared memory)".into(),
                })
            }
        }
    }
}

/// What the backup decides about one connection before its handshake: the
/// generation to authenticate it at, or why it is refused unheard.
pub type Admission = Result<u64, String>;

impl LinkListener {
    /// Accepts connections until one passes the handshake, and returns it.
    ///
    /// Anyone may connect, so nothing a connection does may stop the backup
    /// or hold up the real primary: each connection is authenticated on its
    /// own thread (with the handshake's timeouts), and a peer that fails
    /// (a stray HTTP request, garbage, silence, a wrong key, a stale
    /// generation) is refused, reported on stderr, and forgotten; the
    /// listener keeps accepting meanwhile. `admit` is asked for every
    /// connection, before its handshake, which generation to expect (the
    /// arbiter's current one; `Err` refuses it unheard, e.g. while the
    /// arbiter knows no pair yet). If two peers pass, the first wins and
    /// the other's link is closed.
    pub fn accept_primary(
        &self,
        settings: &LinkSettings,
        admit: Arc<dyn Fn() -> Admission + Send + Sync>,
    ) -> Result<Accepted, ReplicaError> {
        self.set_nonblocking(true)?;
        let (results, arrived) = std::sync::mpsc::channel::<Result<Accepted, ReplicaError>>();
        let mut poll = Duration::from_millis(1);
        loop {
            match arrived.try_recv() {
                Ok(Ok(accepted)) => {
                    let _ = self.set_nonblocking(false);
                    return Ok(accepted);
                }
                Ok(Err(error)) => {
                    crate::warn_limited!(
                        "lockstep backup: refused a connection: {}; still listening",
                        arbiter::error_chain(&error)
                    );
                    continue;
                }
                Err(_) => {}
            }
            let incoming = match self.accept() {
                Ok(incoming) => incoming,
                Err(ReplicaError::Link { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    std::thread::sleep(poll);
                    poll = (poll * 2).min(Duration::from_millis(20));
                    continue;
                }
                Err(error) => return Err(error),
            };
            poll = Duration::from_millis(1);
            let (settings, admit, results) =
                (settings.clone(), Arc::clone(&admit), results.clone());
            let spawned = std::thread::Builder::new()
                .name("link-handshake".into())
                .spawn(move || {
                    let peer = incoming.peer.clone();
                    let result = match admit() {
                        Ok(generation) => incoming.establish(&settings, generation),
                        Err(why) => {
                            incoming.refuse();
                            Err(ReplicaError::Channel(format!(
                                "refused the peer at {peer} unheard: {why}"
                            )))
                        }
                    };
                    // Nobody listens any more once another peer won: the
                    // link is dropped, which closes it.
                    let _ = results.send(result);
                });
            if let Err(source) = spawned {
                return Err(ReplicaError::Link {
                    what: "start a handshake thread".into(),
                    source,
                });
            }
        }
    }

    fn set_nonblocking(&self, on: bool) -> Result<(), ReplicaError> {
        let result = match self {
            Self::Tcp(listener, _) => listener.set_nonblocking(on),
            Self::Shm(listener) => listener.set_nonblocking(on),
        };
        result.map_err(|source| ReplicaError::Link {
            what: "set the listener's O_NONBLOCK".into(),
            source,
        })
    }
}

enum IncomingStream {
    Tcp(TcpStream),
    Shm(UnixStream),
    /// RDMA, set up over this TCP connection.
    Rdma(TcpStream),
}

/// A primary that connected and has not been authenticated yet.
pub struct Incoming {
    stream: IncomingStream,
    /// Who connected.
    pub peer: String,
}

/// A primary's connection, accepted: who, which generation, what guest.
pub struct Accepted {
    /// The log header.
    pub meta: LogMeta,
    /// The entries, as the replay's source.
    pub source: StreamSource,
    /// The primary's address.
    pub peer: String,
    /// The generation both ends agreed on in the handshake.
    pub generation: u64,
    /// The transport's name.
    pub transport: &'static str,
    /// Log entries the stream starts after (0, but for a joined backup: the
    /// position of the state it received).
    pub base: u64,
}

impl Incoming {
    /// A primary's connection the caller already holds (a join connection,
    /// after the state transfer), to authenticate again over io_uring TCP.
    pub fn from_tcp(stream: TcpStream, peer: String) -> Self {
        Self {
            stream: IncomingStream::Tcp(stream),
            peer,
        }
    }

    /// Closes the connection without a handshake (the arbiter knows no pair
    /// with this backup in it).
    pub fn refuse(self) {
        match self.stream {
            IncomingStream::Tcp(stream) | IncomingStream::Rdma(stream) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            IncomingStream::Shm(stream) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// Runs the authenticated handshake at `generation` (a primary of any
    /// other generation is refused, and told why), reads the log header,
    /// and starts the receiver thread. The primary counts as lost when it
    /// says nothing for the profile's peer timeout.
    pub fn establish(
        self,
        settings: &LinkSettings,
        generation: u64,
    ) -> Result<Accepted, ReplicaError> {
        let session = settings.session(Role::Backup, generation);
        let peer = self.peer;
        let refused = |source: TransportError| ReplicaError::Transport {
            what: format!("refused the primary at {peer}"),
            source,
        };
        let (meta, base, source, transport) = match self.stream {
            IncomingStream::Tcp(stream) => {
                let t =
                    UringTcp::establish_accepted(stream, &session, MAX_FRAME).map_err(refused)?;
                let (meta, base, source) = start_receiver(t, generation, settings)?;
                (meta, base, source, "uring-tcp")
            }
            IncomingStream::Shm(stream) => {
                let t = ShmListener::establish_accepted(stream, &session, SHM_RING_BYTES)
                    .map_err(refused)?;
                let (meta, base, source) = start_receiver(t, generation, settings)?;
                (meta, base, source, "shm")
            }
            #[cfg(feature = "rdma")]
            IncomingStream::Rdma(stream) => {
                let config = settings.rdma_config().map_err(refused)?;
                let t = channel::transport::rdma::RdmaTransport::establish_accepted(
                    stream, &session, &config,
                )
                .map_err(refused)?;
                let (meta, base, source) = start_receiver(t, generation, settings)?;
                (meta, base, source, "rdma")
            }
            #[cfg(not(feature = "rdma"))]
            IncomingStream::Rdma(stream) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Err(ReplicaError::Channel(
                    crate::link::rdma_available().err().unwrap_or_default(),
                ));
            }
        };
        Ok(Accepted {
            meta,
            source,
            peer,
            generation,
            transport,
            base,
        })
    }
}

/// What the receiver has seen so far.
struct Receiving {
    queue: SyncSender<Received>,
    newest_exit: Arc<AtomicU64>,
    newest_seq: Arc<AtomicU64>,
    meta: Option<LogMeta>,
    /// A refused entry (fail-stop), to hand to the replay.
    refused: Option<VmmError>,
    /// The end record arrived: a close after it is the clean end.
    ended: bool,
    /// Log entries the backup already had (a joined backup: those in the
    /// state it received); the stream starts at `base + 1`.
    base: u64,
    /// The replay is gone.
    closed: bool,
    /// Entries received but not yet queued for the replay, in order: those
    /// of the current poll (queued once it has sent its ack) and those that
    /// found the queue full (at most one poll's worth more).
    pending: VecDeque<Received>,
}

impl Receiving {
    /// One channel entry: seq 1 is the header, seq n + 1 log entry n.
    fn deliver(&mut self, seq: u64, bytes: &[u8]) {
        if self.refused.is_some() || self.closed {
            return;
        }
        if seq == 1 {
            // The file header, then (a join) the base position.
            match LogMeta::from_header_bytes(bytes) {
                Ok(meta) => self.meta = Some(meta),
                Err(error) => self.refused = Some(error.into()),
            }
            if let Some(base) = bytes.get(channel::log::FILE_HEADER_LEN..) {
                let mut raw = [0u8; 8];
                if base.len() == 8 {
                    raw.copy_from_slice(base);
                    self.base = u64::from_le_bytes(raw);
                } else if !base.is_empty() {
                    self.refused = Some(VmmError::LogMismatch(format!(
                        "the stream's header entry has {} bytes after the log header (expected 0 or 8)",
                        base.len()
                    )));
                }
            }
            return;
        }
        let position = self.base + seq - 1;
        let entry = match decode_entry(bytes, position, 0) {
            Ok(Some((entry, used))) if used == bytes.len() && entry.seq == position => entry,
            Ok(Some((entry, used))) => {
                self.refused = Some(VmmError::LogMismatch(format!(
                    "channel entry {seq} of {} bytes holds log entry {} of {used} bytes",
                    bytes.len(),
                    entry.seq
                )));
                return;
            }
            Ok(None) => {
                self.refused = Some(VmmError::LogMismatch(format!(
                    "channel entry {seq} is empty"
                )));
                return;
            }
            Err(error) => {
                self.refused = Some(error.into());
                return;
            }
        };
        self.newest_exit.fetch_max(entry.exit, Ordering::Release);
        self.newest_seq.fetch_max(entry.seq, Ordering::Release);
        if entry.kind == channel::log::EntryKind::End {
            self.ended = true;
        }
        // Staged, not queued: the replay is handed (and woken for) the
        // entries only after the poll acked them (see `receive`).
        self.pending.push_back(Ok((entry, Instant::now())));
    }

    /// Moves pending entries into the queue while it has room; true when
    /// none is left.
    fn flush_pending(&mut self) -> bool {
        while let Some(item) = self.pending.pop_front() {
            match self.queue.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => {
                    self.pending.push_front(item);
                    return false;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.closed = true;
                    self.pending.clear();
                }
            }
        }
        true
    }

    /// Hands every pending entry to the replay, waiting for room (the
    /// channel is ending: nothing received may be lost), then `last`.
    fn drain_pending(&mut self, last: Option<VmmError>) {
        for item in self.pending.drain(..).chain(last.map(Err)) {
            if self.queue.send(item).is_err() {
                self.closed = true;
                return;
            }
        }
    }
}

/// Starts the receiver thread over `t` (an io_uring transport must be
/// polled by one thread only: the one that first polls it), and waits for
/// the log header it reads first.
fn start_receiver<T: Transport + 'static>(
    t: T,
    generation: u64,
    settings: &LinkSettings,
) -> Result<(LogMeta, u64, StreamSource), ReplicaError> {
    let profile = settings.profile.clone();
    let receiver = LogReceiver::new(t, generation, 1, profile.ack, profile.liveness)
        .map_err(ReplicaError::stopped("start the log receiver"))?;
    let (queue, entries) = sync_channel(QUEUE_ENTRIES);
    let newest_exit = Arc::new(AtomicU64::new(0));
    let newest_seq = Arc::new(AtomicU64::new(0));
    let state = Receiving {
        queue,
        newest_exit: Arc::clone(&newest_exit),
        newest_seq: Arc::clone(&newest_seq),
        meta: None,
        refused: None,
        ended: false,
        closed: false,
        base: 0,
        pending: VecDeque::new(),
    };
    let (header_tx, header_rx) = sync_channel(1);
    let lost = Arc::new(Mutex::new(None));
    let ack_delay = Arc::new(Mutex::new(None));
    let handle = {
        let lost = Arc::clone(&lost);
        let ack_delay = Arc::clone(&ack_delay);
        std::thread::Builder::new()
            .name("log-receiver".into())
            .spawn(move || {
                let mut receiver = receiver;
                let mut state = state;
                match wait_for_header(&mut receiver, &mut state, profile.poll) {
                    Ok(meta) => {
                        let _ = header_tx.send(Ok((meta, state.base)));
                        receive(&mut receiver, state, profile.poll, &lost);
                        *ack_delay.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(receiver.metrics().clone());
                    }
                    Err(error) => {
                        let _ = header_tx.send(Err(error));
                    }
                }
            })
            .map_err(|source| ReplicaError::Link {
                what: "start the log receiver".into(),
                source,
            })?
    };
    let (meta, base) = header_rx.recv().map_err(|_| {
        ReplicaError::Setup("the log receiver ended before the log header".into())
    })??;
    let lag = Lag {
        max_exits: 0,
        max_entries: 0,
        queue_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(ReplicaError::Histogram)?,
    };
    Ok((
        meta,
        base,
        StreamSource {
            entries,
            newest_exit,
            newest_seq,
            replayed_seq: base,
            lag,
            _receiver: handle,
            lost,
            ack_delay,
        },
    ))
}

/// Polls until the log header (channel entry 1) arrives.
fn wait_for_header<T: Transport>(
    receiver: &mut LogReceiver<T>,
    state: &mut Receiving,
    poll: tuning::PollMode,
) -> Result<LogMeta, ReplicaError> {
    let mut waiter = Waiter::new(poll);
    loop {
        let delivered = receiver
            .poll(|seq, bytes| state.deliver(seq, bytes))
            .map_err(ReplicaError::stopped("before the log header"))?;
        if let Some(error) = state.refused.take() {
            return Err(ReplicaError::Vmm(error));
        }
        if let Some(meta) = state.meta.clone() {
            return Ok(meta);
        }
        if delivered == 0 {
            waiter
                .idle_with(|timeout| receiver.wait(timeout))
                .map_err(ReplicaError::stopped("before the log header"))?;
        }
    }
}

/// The receiver thread: entries into the queue, acks back on receipt.
/// Records in `lost` why the primary counts as lost, if it does (the link
/// broke or fell silent before the end record), before the queue closes; a
/// refused frame or entry is passed to the replay as an error (fail-stop,
/// not failover). Returning drops the transport, which closes the link.
fn receive<T: Transport>(
    receiver: &mut LogReceiver<T>,
    mut state: Receiving,
    poll: tuning::PollMode,
    lost: &Mutex<Option<String>>,
) {
    let mut waiter = Waiter::new(poll);
    loop {
        let result = if state.flush_pending() {
            let result = receiver.poll(|seq, bytes| state.deliver(seq, bytes));
            // The poll has sent its ack; only now wake the replay, whose
            // vCPU thread may take this core the moment it is woken (on 2
            // cores it did, and the ack waited for the guest to run).
            state.flush_pending();
            result
        } else {
            // The replay is behind and its queue is full: read nothing
            // more (the primary's transport fills and its ring stalls its
            // vCPU), but ack what was received and keep heartbeating.
            receiver.keep_alive().map(|()| {
                std::thread::sleep(BACKLOG_NAP);
                usize::MAX
            })
        };
        if let Some(error) = state.refused.take() {
            state.drain_pending(Some(error));
            return;
        }
        if state.closed {
            return; // the replay is gone
        }
        // A failed sleep counts as a failed poll.
        let result = match result {
            Ok(0) => waiter
                .idle_with(|timeout| receiver.wait(timeout))
                .map(|()| 0),
            Ok(usize::MAX) => Ok(0), // backlogged: no idle sleep either
            other => other,
        };
        match result {
            Ok(0) => {}
            Ok(_) => waiter.work(),
            Err(_) if state.ended => {
                state.drain_pending(None);
                return;
            }
            Err(
                error @ (ChannelError::PeerSilent { .. }
                | ChannelError::Transport(
                    TransportError::Closed | TransportError::Io { .. },
                )),
            ) => {
                // Nothing more can arrive (RDMA: the queue pair is torn
                // down first), and whatever already did is delivered: the
                // replay gets everything received, then learns the
                // primary is lost.
                if let Err(refused) =
                    receiver.drain_quiesced(|seq, bytes| state.deliver(seq, bytes))
                {
                    state.drain_pending(Some(VmmError::Io {
                        what: "the primary's last frames were refused".into(),
                        source: std::io::Error::other(arbiter::error_chain(&refused)),
                    }));
                    return;
                }
                if let Some(error) = state.refused.take() {
                    state.drain_pending(Some(error));
                    return;
                }
                state.drain_pending(None);
                *lost.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(arbiter::error_chain(&error));
                return;
            }
            Err(error) => {
                state.drain_pending(Some(VmmError::Io {
                    what: "the primary's log stream was refused".into(),
                    source: std::io::Error::other(arbiter::error_chain(&error)),
                }));
                return;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use channel::log::{EntryKind, encode_entry};
    use std::sync::mpsc::TryRecvError;

    /// The receiver's state after the header, with a queue of `room`.
    fn receiving(room: usize) -> (Receiving, Receiver<Received>) {
        let (queue, entries) = sync_channel(room);
        let state = Receiving {
            queue,
            newest_exit: Arc::new(AtomicU64::new(0)),
            newest_seq: Arc::new(AtomicU64::new(0)),
            meta: None,
            refused: None,
            ended: false,
            base: 0,
            closed: false,
            pending: VecDeque::new(),
        };
        (state, entries)
    }

    fn clock_entry(seq: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode_entry(
            EntryKind::Clock,
            0,
            seq,
            10 * seq,
            &seq.to_le_bytes(),
            &mut out,
        );
        out
    }

    /// Delivering stages an entry; the replay (whose wake-up may take the
    /// receiver's core before it acks) sees it only once the receiver
    /// flushes, which it does after the poll that acked.
    #[test]
    fn delivered_entries_reach_the_replay_only_when_flushed() {
        let (mut state, entries) = receiving(4);
        // Channel entry n + 1 carries log entry n.
        state.deliver(2, &clock_entry(1));
        state.deliver(3, &clock_entry(2));
        assert!(state.refused.is_none());
        assert_eq!(state.newest_seq.load(Ordering::Acquire), 2);
        assert!(matches!(entries.try_recv(), Err(TryRecvError::Empty)));
        assert!(state.flush_pending());
        let seqs: Vec<u64> = entries
            .try_iter()
            .map(|r| r.map(|(entry, _)| entry.seq).unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    /// A full queue keeps the rest staged, in order, for the next flush.
    #[test]
    fn a_full_queue_keeps_the_rest_staged_in_order() {
        let (mut state, entries) = receiving(1);
        for n in 1..=3 {
            state.deliver(n + 1, &clock_entry(n));
        }
        assert!(!state.flush_pending());
        assert_eq!(entries.try_recv().unwrap().unwrap().0.seq, 1);
        assert!(!state.flush_pending());
        assert_eq!(entries.try_recv().unwrap().unwrap().0.seq, 2);
        assert!(state.flush_pending());
        assert_eq!(entries.try_recv().unwrap().unwrap().0.seq, 3);
    }
}
