//! Re-protection: a new backup joins a primary that runs alone, by state
//! transfer, and the pair goes on in lockstep in a new generation.
//!
//! One TCP connection to the primary's join address carries everything:
//!
//! ```text
//!  joiner (new backup)                               primary (running alone, generation g)
//!  ── channel handshake at g (key, VM id) ──────────▶ refuses any other generation
//!  ── "LKJN" u16 len, replica name ─────────────────▶ arbiter: register pair (me, joiner) as g+1
//!  ◀──────────────── u64 new generation (0: refused) ─ hold output after the current position
//!  ◀──── state stream (vmm::state): pre-copy rounds while the guest runs,
//!        stop-and-copy at exit N, log position P, digest at the hand-over
//!  ── 1 byte: state received and checked ───────────▶
//!  ── channel handshake at g+1, then io_uring ──────▶ LogSender from log entry P+1
//!  ◀──── header{log header, base P}, entries P+1 … ─ (buffered since the hold began)
//!  ── acks ─────────────────────────────────────────▶ release the held output
//! ```
//!
//! Rule 5 of the view-server lecture: the capture sits between exit N and
//! N+1, so every log entry is either inside the state (≤ P) or streamed
//! after it (> P), never both or neither. Output produced after the hold
//! began waits for the joiner's acks; if the join fails after the arbiter
//! recorded generation g+1, the primary treats it as a lost backup and must
//! win g+2 before it releases anything.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::ReplicaError;
use crate::primary::PrimaryLink;

/// Magic before the joiner's name.
pub const JOIN_MAGIC: [u8; 4] = *b"LKJN";
/// Longest replica name.
pub const MAX_NAME: usize = 255;

/// Sends the joiner's name.
pub fn send_name(stream: &mut TcpStream, name: &str) -> Result<(), ReplicaError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ReplicaError::Setup(format!(
            "a replica name has 1 to {MAX_NAME} bytes, `{name}` has {}",
            name.len()
        )));
    }
    let mut message = Vec::with_capacity(6 + name.len());
    message.extend_from_slice(&JOIN_MAGIC);
    message.extend_from_slice(&(name.len() as u16).to_le_bytes());
    message.extend_from_slice(name.as_bytes());
    stream
        .write_all(&message)
        .map_err(link("send the join request"))
}

/// Reads the joiner's name (from the join connection; any [`Read`], so the
/// fuzz targets can feed it bytes).
pub fn read_name(stream: &mut impl Read) -> Result<String, ReplicaError> {
    let mut head = [0u8; 6];
    stream
        .read_exact(&mut head)
        .map_err(link("read the join request"))?;
    if head[..4] != JOIN_MAGIC {
        return Err(ReplicaError::Channel(format!(
            "join request magic {:02x?}, expected \"LKJN\"",
            &head[..4]
        )));
    }
    let len = usize::from(u16::from_le_bytes([head[4], head[5]]));
    if len == 0 || len > MAX_NAME {
        return Err(ReplicaError::Channel(format!(
            "join request names a replica of {len} bytes (1 to {MAX_NAME})"
        )));
    }
    let mut name = vec![0u8; len];
    stream
        .read_exact(&mut name)
        .map_err(link("read the joiner's name"))?;
    String::from_utf8(name)
        .map_err(|_| ReplicaError::Channel("the joiner's name is not UTF-8".into()))
}

/// Sends the new generation (0: refused).
pub fn send_generation(stream: &mut TcpStream, generation: u64) -> Result<(), ReplicaError> {
    stream
        .write_all(&generation.to_le_bytes())
        .map_err(link("send the new generation"))
}

/// Reads the new generation; 0 means the primary refused.
pub fn read_generation(stream: &mut TcpStream) -> Result<u64, ReplicaError> {
    let mut raw = [0u8; 8];
    stream
        .read_exact(&mut raw)
        .map_err(link("read the new generation"))?;
    Ok(u64::from_le_bytes(raw))
}

/// The joiner's "state received and checked".
pub const STATE_RECEIVED: u8 = 0x5a;

fn link(what: &'static str) -> impl Fn(std::io::Error) -> ReplicaError {
    move |source| ReplicaError::Link {
        what: what.into(),
        source,
    }
}

/// What the join thread hands the primary's log sink.
pub enum JoinEvent {
    /// The new backup has the state up to `base` and follows from here.
    Ready {
        /// The link to it.
        link: PrimaryLink,
        /// The log position of the state.
        base: u64,
        /// The pair's generation.
        generation: u64,
        /// Entries logged since the hold began, `(seq, bytes)`.
        buffered: Vec<(u64, Vec<u8>)>,
    },
    /// The join failed after the arbiter recorded `generation`: the
    /// primary's backup of that generation is lost.
    Failed {
        /// Why.
        why: String,
        /// The generation the arbiter recorded.
        generation: u64,
    },
}

#[derive(Default)]
struct JoinState {
    /// The generation this primary runs alone in; `None` while protected.
    alone: Option<u64>,
    /// Buffering entries for a joiner.
    armed: bool,
    buffer: Vec<(u64, Vec<u8>)>,
    event: Option<JoinEvent>,
}

/// Shared by the primary's log sink and its join thread.
#[derive(Default)]
pub struct JoinPort {
    state: Mutex<JoinState>,
    /// The log position the sink has reached.
    position: AtomicU64,
    /// A join is under way or has news for the sink: only then does the
    /// sink take the lock (it looks at every entry, on the vCPU thread).
    attention: std::sync::atomic::AtomicBool,
}

impl JoinPort {
    fn lock(&self) -> std::sync::MutexGuard<'_, JoinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sink: this primary now runs alone in `generation` (a joiner may come).
    pub fn set_alone(&self, generation: Option<u64>) {
        self.lock().alone = generation;
    }

    /// The join thread: the generation to authenticate a joiner at, if
    /// this primary runs alone and no join is under way.
    pub fn alone(&self) -> Option<u64> {
        let state = self.lock();
        if state.armed { None } else { state.alone }
    }

    /// The join thread: start buffering every entry for the joiner; returns
    /// the log position reached (output after it waits for the joiner).
    pub fn arm(&self) -> u64 {
        let mut state = self.lock();
        state.armed = true;
        state.buffer.clear();
        // SeqCst pairs with `observe`: either it sees the flag and buffers
        // its entry, or this load sees that entry's position.
        self.attention.store(true, Ordering::SeqCst);
        self.position.load(Ordering::SeqCst)
    }

    /// The join thread: the joiner follows.
    pub fn ready(&self, link: PrimaryLink, base: u64, generation: u64) {
        let mut state = self.lock();
        let buffered = std::mem::take(&mut state.buffer);
        state.armed = false;
        state.alone = None;
        state.event = Some(JoinEvent::Ready {
            link,
            base,
            generation,
            buffered,
        });
        self.attention.store(true, Ordering::SeqCst);
    }

    /// The join thread: the join failed. Before the arbiter recorded a new
    /// generation (`recorded` is `None`) the primary simply goes on alone.
    pub fn failed(&self, why: String, recorded: Option<u64>) {
        let mut state = self.lock();
        state.armed = false;
        state.buffer.clear();
        if let Some(generation) = recorded {
            state.alone = None;
            state.event = Some(JoinEvent::Failed { why, generation });
            self.attention.store(true, Ordering::SeqCst);
        }
    }

    /// The sink, at every entry: keeps it for a joiner if armed, and
    /// collects what the join thread decided.
    pub fn observe(&self, seq: u64, entry: &[u8]) -> Option<JoinEvent> {
        self.position.store(seq, Ordering::SeqCst);
        if !self.attention.load(Ordering::SeqCst) {
            return None;
        }
        let mut state = self.lock();
        if state.armed {
            state.buffer.push((seq, entry.to_vec()));
        }
        let event = state.event.take();
        if !state.armed {
            self.attention.store(false, Ordering::SeqCst);
        }
        event
    }
}

/// What the primary's join service needs.
pub struct JoinService {
    /// Shared with the primary's log sink.
    pub port: Arc<JoinPort>,
    /// Pauses the running machine and reads its memory.
    pub transfer: vmm::TransferHandle,
    /// The primary's output gate.
    pub gate: Arc<nic::gate::OutputGate>,
    /// Channel settings (key, VM id, profile).
    pub settings: crate::link::LinkSettings,
    /// The arbiter that records each new pair.
    pub arbiter: Arc<dyn arbiter::Arbiter>,
    /// This primary's name there.
    pub me: arbiter::ReplicaId,
    /// The log header of this VM.
    pub meta: channel::log::LogMeta,
    /// The state stream's header (image, memory, flags).
    pub header: vmm::StateHeader,
}

/// How long a joiner has, from its connect, to pass the handshake and name
/// itself. Until it has, it holds nothing but its own thread.
pub const AUTH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Joiners being authenticated at once, at most. A connection that
/// arrives when this many are waiting closes the one that has waited
/// longest (see [`Unauthenticated`]).
pub const MAX_UNAUTHENTICATED: usize = 32;

/// The join connections that have not yet authenticated, oldest first.
///
/// The cap bounds the threads that strangers can hold. When it is reached,
/// the newcomer is admitted and the connection that has waited longest is
/// shut down, rather than the newcomer refused: a real joiner proves its
/// key within milliseconds, so under a flood of slow or silent peers it is
/// never the oldest for long, while refusing newcomers would let 32 peers
/// that say nothing lock re-protection out for as long as they reconnect.
#[derive(Default)]
pub struct Unauthenticated {
    waiting: Mutex<std::collections::VecDeque<(u64, String, TcpStream)>>,
    next_id: AtomicU64,
}

impl Unauthenticated {
    /// Admits `stream` (from `peer`) and returns its id, and the peer whose
    /// connection was shut down to make room, if any; `Err` if the stream
    /// cannot be tracked (its handle cannot be cloned), so it must not be
    /// served.
    pub fn admit(&self, stream: &TcpStream, peer: &str) -> std::io::Result<(u64, Option<String>)> {
        let handle = stream.try_clone()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let evicted = if waiting.len() >= MAX_UNAUTHENTICATED {
            waiting.pop_front().map(|(_, oldest, stream)| {
                let _ = stream.shutdown(std::net::Shutdown::Both);
                oldest
            })
        } else {
            None
        };
        waiting.push_back((id, peer.to_owned(), handle));
        Ok((id, evicted))
    }

    /// Forgets connection `id`: it authenticated, failed or was shut down.
    pub fn done(&self, id: u64) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        waiting.retain(|(waiting_id, _, _)| *waiting_id != id);
    }

    /// Connections waiting to authenticate now.
    pub fn len(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Serves join requests on `listener` until the process ends; each failed
/// join is reported and the primary goes on.
///
/// Anyone can connect, so each connection is authenticated on its own
/// thread, within [`AUTH_DEADLINE`] overall (not per read): a slow or
/// silent peer holds only its thread, never the port, and a real joiner is
/// served meanwhile. Joins that passed the handshake run one at a time.
pub fn serve(listener: std::net::TcpListener, service: JoinService) {
    let service = Arc::new(service);
    let one_at_a_time = Arc::new(Mutex::new(()));
    let unauthenticated = Arc::new(Unauthenticated::default());
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let id = match unauthenticated.admit(&stream, &peer) {
            Ok((id, None)) => id,
            Ok((id, Some(oldest))) => {
                crate::warn_limited!(
                    "lockstep primary: join from {oldest} closed unauthenticated: {MAX_UNAUTHENTICATED} joiners were being authenticated and {peer} arrived"
                );
                id
            }
            Err(error) => {
                crate::warn_limited!(
                    "lockstep primary: join from {peer} refused: cannot track its connection: {error}"
                );
                continue;
            }
        };
        let (service, one_at_a_time, waiting) = (
            Arc::clone(&service),
            Arc::clone(&one_at_a_time),
            Arc::clone(&unauthenticated),
        );
        let spawned = std::thread::Builder::new()
            .name("join-conn".into())
            .spawn(move || {
                let result = serve_one(stream, &service, &one_at_a_time, &waiting, id);
                match result {
                    Ok(report) => tracing::info!("lockstep primary: join from {peer}: {report}"),
                    Err(error) => crate::warn_limited!(
                        "lockstep primary: join from {peer} refused or failed: {}",
                        arbiter::error_chain(&error)
                    ),
                }
            });
        if spawned.is_err() {
            unauthenticated.done(id);
        }
    }
}

/// Reads and writes a stream with one deadline for all reads together.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: std::time::Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self
            .until
            .saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the joiner did not authenticate in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

fn serve_one(
    mut stream: TcpStream,
    service: &JoinService,
    one_at_a_time: &Mutex<()>,
    unauthenticated: &Unauthenticated,
    id: u64,
) -> Result<String, ReplicaError> {
    use channel::protocol::{PROTOCOL_VERSION, Role, Side, handshake_as};
    let authenticated = (|| {
        let Some(generation) = service.port.alone() else {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Err(ReplicaError::Setup(
                "this primary has a backup (or a join is under way)".into(),
            ));
        };
        stream
            .set_write_timeout(Some(AUTH_DEADLINE))
            .map_err(link("set the join timeout"))?;
        let mut timed = Deadline {
            stream: &stream,
            until: std::time::Instant::now() + AUTH_DEADLINE,
        };
        // The joiner connected: it proves the key before we say anything.
        handshake_as(
            &mut timed,
            &service.settings.session(Role::Primary, generation),
            PROTOCOL_VERSION,
            Side::Accepting,
        )
        .map_err(ReplicaError::handshake("authenticate the joiner"))?;
        let name = read_name(&mut timed)?;
        Ok((generation, name))
    })();
    unauthenticated.done(id);
    let (generation, name) = authenticated?;
    let _one = one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
    if service.port.alone() != Some(generation) {
        let _ = send_generation(&mut stream, 0);
        return Err(ReplicaError::Setup(
            "another backup joined first (or this primary's generation moved on)".into(),
        ));
    }
    stream
        .set_read_timeout(Some(channel::protocol::HANDSHAKE_TIMEOUT))
        .map_err(link("set the join timeout"))?;
    let joiner = arbiter::ReplicaId::new(name.clone())
        .map_err(|e| ReplicaError::Channel(format!("joiner name: {e}")))?;
    let vm = service.settings.vm_id;
    let record = match register(service, vm, generation, &joiner) {
        Ok(arbiter::Outcome::Won(record)) => record,
        Ok(lost) => {
            let _ = send_generation(&mut stream, 0);
            return Err(ReplicaError::Setup(format!(
                "the arbiter refused the pair ({}, {name}) for generation {}: {lost:?}",
                service.me,
                generation + 1
            )));
        }
        Err(error) => {
            let _ = send_generation(&mut stream, 0);
            return Err(ReplicaError::Arbiter {
                what: "the arbiter cannot record the new pair".into(),
                source: error,
            });
        }
    };
    let new_generation = record.generation;
    let result = transfer(&mut stream, service, new_generation);
    match result {
        Ok((link, report)) => {
            service
                .port
                .ready(link, report.log_position, new_generation);
            Ok(format!(
                "{name} joined in generation {new_generation}: {} pre-copy rounds ({} pages), {} pages during a pause of {} µs at exit {}, log position {}; {:.1} MiB in {} ms",
                report.rounds.len(),
                report.rounds.iter().map(|r| r.pages).sum::<u64>(),
                report.final_pages,
                report.pause.as_micros(),
                report.exit,
                report.log_position,
                report.bytes as f64 / (1 << 20) as f64,
                report.total.as_millis()
            ))
        }
        Err(error) => {
            service
                .port
                .failed(arbiter::error_chain(&error), Some(new_generation));
            Err(error)
        }
    }
}

/// Registers the new pair, retrying for a few seconds while the arbiter
/// cannot answer: a register is idempotent, so a retry after a lost reply
/// finds the pair recorded and wins again, instead of leaving the arbiter
/// with a pair this primary does not know it made.
fn register(
    service: &JoinService,
    vm: u64,
    generation: u64,
    joiner: &arbiter::ReplicaId,
) -> Result<arbiter::Outcome, arbiter::ArbiterError> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match service
            .arbiter
            .register(vm, generation, &service.me, joiner)
        {
            Err(error) if error.is_unreachable() && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn transfer(
    stream: &mut TcpStream,
    service: &JoinService,
    generation: u64,
) -> Result<(PrimaryLink, vmm::TransferReport), ReplicaError> {
    send_generation(stream, generation)?;
    // From here on, output waits for the joiner's acks.
    let held_from = service.port.arm();
    service.gate.hold_after(held_from);
    let writer = vmm::StateWriter::new(
        std::io::BufWriter::with_capacity(1 << 20, &*stream),
        &service.header,
    )
    .map_err(|e| ReplicaError::Vmm(e.into()))?;
    let policy = vmm::PrecopyPolicy {
        digest: true,
        ..vmm::PrecopyPolicy::default()
    };
    let (writer, report, _captured) = vmm::send_state(&service.transfer, writer, &policy)
        .map_err(|e| ReplicaError::Vmm(e.into()))?;
    writer.into_inner().map_err(|e| ReplicaError::Link {
        what: "send the state".into(),
        source: e.into_error(),
    })?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(link("set the join timeout"))?;
    let mut received = [0u8; 1];
    stream
        .read_exact(&mut received)
        .map_err(link("read the joiner's receipt"))?;
    if received[0] != STATE_RECEIVED {
        return Err(ReplicaError::Channel(format!(
            "the joiner answered the state with {:#04x}",
            received[0]
        )));
    }
    stream
        .set_read_timeout(None)
        .map_err(link("clear the join timeout"))?;
    let stream = stream
        .try_clone()
        .map_err(link("clone the join connection"))?;
    let link = PrimaryLink::joined(
        stream,
        &service.settings,
        generation,
        &service.meta,
        Arc::clone(&service.gate),
        report.log_position,
    )?;
    Ok((link, report))
}

/// The joining backup's side of the join handshake (`lockstep backup
/// --join PRIMARY`): connects to the primary's join address, proves the
/// link key for the pair's current `generation` (the connecting side
/// proves first), sends this replica's name `me` and reads the generation
/// the primary registered for the new pair (0: refused). The stream is
/// left with the handshake's read timeout; the state transfer follows on it.
pub fn connect(
    primary: &str,
    settings: &crate::link::LinkSettings,
    generation: u64,
    me: &str,
) -> Result<(TcpStream, u64), ReplicaError> {
    let mut stream = TcpStream::connect(primary).map_err(|source| ReplicaError::Link {
        what: format!("connect to the primary's join address {primary}"),
        source,
    })?;
    let link_error = |what: &'static str| {
        move |source| ReplicaError::Link {
            what: what.into(),
            source,
        }
    };
    stream
        .set_nodelay(true)
        .map_err(link_error("set TCP_NODELAY"))?;
    stream
        .set_read_timeout(Some(channel::protocol::HANDSHAKE_TIMEOUT))
        .map_err(link_error("set the join timeout"))?;
    // We connected to the primary's join port: we prove the key first.
    channel::protocol::handshake_as(
        &mut stream,
        &settings.session(channel::protocol::Role::Backup, generation),
        channel::protocol::PROTOCOL_VERSION,
        channel::protocol::Side::Connecting,
    )
    .map_err(ReplicaError::handshake(
        "authenticate at the primary's join port",
    ))?;
    send_name(&mut stream, me)?;
    let generation = read_generation(&mut stream)?;
    Ok((stream, generation))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The cap admits newcomers by closing the connection that waited
    /// longest, never the newcomer: 33 silent peers, then the first one's
    /// socket sees the primary hang up while the 33rd is tracked.
    #[test]
    fn a_newcomer_past_the_cap_closes_the_oldest_waiting_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let waiting = Unauthenticated::default();
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        let mut ids = Vec::new();
        for i in 0..=MAX_UNAUTHENTICATED {
            clients.push(TcpStream::connect(address).expect("connect"));
            let (stream, peer) = listener.accept().expect("accept");
            let (id, evicted) = waiting.admit(&stream, &peer.to_string()).expect("admit");
            if i < MAX_UNAUTHENTICATED {
                assert_eq!(evicted, None, "connection {i} evicted one");
            } else {
                let first = clients[0].local_addr().expect("address").to_string();
                assert_eq!(evicted.as_deref(), Some(first.as_str()));
            }
            ids.push(id);
            accepted.push(stream);
        }
        assert_eq!(waiting.len(), MAX_UNAUTHENTICATED);
        clients[0]
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        assert_eq!(
            clients[0].read(&mut byte).expect("the oldest is shut down"),
            0
        );
        waiting.done(ids[MAX_UNAUTHENTICATED]);
        waiting.done(ids[0]);
        assert_eq!(waiting.len(), MAX_UNAUTHENTICATED - 1);
    }
}
