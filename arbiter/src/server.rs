//! The embedded arbiter server (`lockstep arbiter`): the model of
//! [`crate::model`] behind the protocol of [`crate::protocol`], with its state
//! in a file made durable before every answer that grants something.
//!
//! One thread accepts; each connection gets a thread that reads one request,
//! answers it and closes. Anyone who can connect may try, so the server
//! keeps room for the clients that hold the key:
//!
//! - **An overall deadline per request**, not per read: the whole request
//!   must arrive within [`REQUEST_DEADLINE`] of the connection (a client
//!   sends it in one write of under 200 bytes), so a client that drips a
//!   byte now and then is cut off all the same.
//! - **Unauthenticated connections are evictable.** At most
//!   [`MAX_PENDING`] connections may be waiting for their request at once;
//!   when another arrives, the oldest still waiting is closed to make room.
//!   A real client's request arrives within a round trip of its connect,
//!   so a flood of slow connections can push out only one another, never
//!   a client that is being served. A request whose HMAC verifies is never
//!   evicted.
//! - At most [`MAX_CONNECTIONS`] threads exist at once (answering,
//!   fsyncing, draining); beyond that a connection is closed unanswered.
//!
//! ```text
//!  accept ─▶ pending (≤ MAX_PENDING, oldest evicted) ──request + HMAC ok──▶ decide + fsync ─▶ reply
//!                 └── deadline REQUEST_DEADLINE from accept, or evicted: closed
//! ```
//!
//! Decisions are serialised by one mutex held across the decision and the
//! fsync, so two candidates can never both see the same generation free.
//!
//! If the state cannot be written, the request is answered "storage
//! failure" (nothing granted) and the server grants nothing more until it
//! is restarted: a fail-stop arbiter stalls the service instead of risking
//! a grant that was not durable.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::model::{Decision, Registry, VmRecord, decide_register, decide_test_and_set};
use crate::protocol::{self, Answer, Command, Key, Status};
use crate::state::{self, StateError};

/// How long a connection may take to send its whole request (from accept),
/// and to take its reply.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
/// How many connections may wait for their request at once; the oldest is
/// evicted when another arrives.
pub const MAX_PENDING: usize = 64;
/// How many connections are served at once, in every stage.
pub const MAX_CONNECTIONS: usize = 256;

/// The server could not start or keep accepting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The state file could not be loaded.
    #[error("cannot load the arbiter state")]
    Load(#[from] StateError),
    /// The listener is unusable.
    #[error("the arbiter listener failed while {action}")]
    Listener {
        /// What it was doing.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Counters of what a server did, for tests and status output.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests answered "ok".
    pub answered: AtomicU64,
    /// Requests refused (bad magic, version, MAC, layout, invalid).
    pub refused: AtomicU64,
    /// Generations granted (and made durable).
    pub granted: AtomicU64,
    /// Connections closed before their request arrived, to make room.
    pub evicted: AtomicU64,
}

struct Decisions {
    registry: Registry,
    /// Set when a store failed: grant nothing more.
    failed: bool,
}

struct Shared {
    decisions: Mutex<Decisions>,
    state_path: PathBuf,
    key: Key,
    stop: AtomicBool,
    connections: AtomicUsize,
    stats: ServerStats,
    /// Test hook: the next store's directory fsync fails (after the rename).
    fail_dir_sync: Arc<AtomicBool>,
    /// Connections still waiting for their request, oldest first (a clone
    /// of each socket, to close it when evicted).
    pending: Mutex<VecDeque<(u64, TcpStream)>>,
    next_connection: AtomicU64,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, TcpStream)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection among the pending ones, evicting the oldest
    /// if they are [`MAX_PENDING`] already.
    fn admit(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let mut pending = self.pending();
        while pending.len() >= MAX_PENDING {
            if let Some((_, oldest)) = pending.pop_front() {
                let _ = oldest.shutdown(Shutdown::Both);
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        pending.push_back((id, clone));
        Some(id)
    }

    /// The connection's request is in (or it failed): no longer evictable.
    fn settle(&self, id: u64) {
        self.pending().retain(|(other, _)| *other != id);
    }
}

/// Serves forever on `listener` (or until the listener fails for good),
/// keeping the state in `state_path`. A missing state file starts an empty
/// arbiter; a corrupt one is an error.
pub fn serve(listener: TcpListener, state_path: &Path, key: Key) -> Result<(), ServerError> {
    let shared = start(state_path, key, Arc::new(AtomicBool::new(false)))?;
    accept_loop(&listener, &shared);
    Ok(())
}

/// Starts a server on a background thread and returns a handle that can stop
/// it (for tests and for embedding in another process).
pub fn spawn(
    listener: TcpListener,
    state_path: &Path,
    key: Key,
) -> Result<ServerHandle, ServerError> {
    spawn_with_faults(listener, state_path, key, Arc::new(AtomicBool::new(false)))
}

/// [`spawn`] for fault-injection tests: while `fail_dir_sync` is set, the
/// next grant's state is renamed into place but the directory's fsync
/// "fails" (and the flag is cleared), as a disk error would.
#[doc(hidden)]
pub fn spawn_with_faults(
    listener: TcpListener,
    state_path: &Path,
    key: Key,
    fail_dir_sync: Arc<AtomicBool>,
) -> Result<ServerHandle, ServerError> {
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listener {
            action: "reading its address",
            source,
        })?;
    let shared = start(state_path, key, fail_dir_sync)?;
    let for_thread = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name("arbiter-accept".into())
        .spawn(move || accept_loop(&listener, &for_thread))
        .map_err(|source| ServerError::Listener {
            action: "starting its thread",
            source,
        })?;
    Ok(ServerHandle {
        addr,
        shared,
        thread: Some(thread),
    })
}

fn start(
    state_path: &Path,
    key: Key,
    fail_dir_sync: Arc<AtomicBool>,
) -> Result<Arc<Shared>, ServerError> {
    let registry = state::load(state_path)?;
    Ok(Arc::new(Shared {
        decisions: Mutex::new(Decisions {
            registry,
            failed: false,
        }),
        state_path: state_path.to_path_buf(),
        key,
        stop: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        stats: ServerStats::default(),
        fail_dir_sync,
        pending: Mutex::new(VecDeque::new()),
        next_connection: AtomicU64::new(0),
    }))
}

/// A running server started by [`spawn`]. Dropping it stops the server.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// What it did so far.
    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    /// Stops accepting and waits for the accept thread. Connections being
    /// served finish on their own threads; new ones are refused.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // Wake the blocked accept() with a connection of our own.
            let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
            let _ = thread.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // Usually out of file descriptors: back off, keep serving.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            continue; // dropping the stream closes it
        }
        let Some(id) = shared.admit(&stream) else {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        let for_thread = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name("arbiter-conn".into())
            .spawn(move || {
                handle(&for_thread, stream, id);
                for_thread.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            shared.settle(id);
            shared.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Reads with the socket's timeout set to what is left of one deadline
/// before every read: the deadline bounds the whole request, however the
/// peer spreads its bytes.
struct DeadlineRead<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl Read for DeadlineRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request's deadline passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

fn handle(shared: &Shared, stream: TcpStream, id: u64) {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    if stream.set_write_timeout(Some(REQUEST_DEADLINE)).is_err() {
        shared.settle(id);
        return;
    }
    let _ = stream.set_nodelay(true);
    let request = protocol::read_request(
        &mut DeadlineRead {
            stream: &stream,
            deadline,
        },
        &shared.key,
    );
    shared.settle(id);
    let reply = match request {
        Err(rejection) => {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            protocol::encode_reply(&shared.key, rejection.status, &rejection.nonce, None)
        }
        Ok((nonce, command)) => {
            let (status, answer) = execute(shared, command);
            let counter = match status {
                Status::Ok => &shared.stats.answered,
                _ => &shared.stats.refused,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            protocol::encode_reply(&shared.key, status, &nonce, answer.as_ref())
        }
    };
    // The decision is already durable; if the client is gone, so be it.
    let _ = (&stream).write_all(&reply);
    let _ = stream.shutdown(Shutdown::Write);
    // Read what is left of a refused request until the client closes, so that
    // closing with unread bytes does not reset the connection (a reset can
    // destroy the reply before the client reads it). Bounded in bytes and time.
    let until = Instant::now() + DRAIN_TIMEOUT;
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_LIMIT {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match (&stream).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

const DRAIN_TIMEOUT: Duration = Duration::from_millis(200);
const DRAIN_LIMIT: usize = 64 * 1024;

fn execute(shared: &Shared, command: Command) -> (Status, Option<Answer>) {
    let Ok(mut decisions) = shared.decisions.lock() else {
        return (Status::StorageFailure, None);
    };
    if decisions.failed {
        return (Status::StorageFailure, None);
    }
    let registry = &decisions.registry;
    let (vm, decision) = match command {
        Command::Read { vm } => {
            let answer = match registry.get(vm) {
                Some(r) => Answer::Present(r.clone()),
                None => Answer::Absent,
            };
            return (Status::Ok, Some(answer));
        }
        Command::TestAndSet {
            vm,
            expected,
            candidate,
        } => (
            vm,
            decide_test_and_set(registry.get(vm), expected, &candidate),
        ),
        Command::Register {
            vm,
            expected,
            primary,
            backup,
        } => (
            vm,
            decide_register(registry.get(vm), expected, &primary, &backup),
        ),
    };
    let record: VmRecord = match decision {
        Err(_) => return (Status::InvalidRequest, None),
        Ok(Decision::Refuse(reason)) => {
            let current = registry.get(vm).cloned();
            return (Status::Ok, Some(Answer::Lost { reason, current }));
        }
        Ok(Decision::Already(record)) => {
            // A retry of a request that won: nothing to store.
            return (Status::Ok, Some(Answer::Won(record)));
        }
        Ok(Decision::Grant(record)) => record,
    };
    let mut next = decisions.registry.clone();
    next.apply(vm, Decision::Grant(record.clone()));
    let stored = state::store_with(&shared.state_path, &next, |dir| {
        if shared.fail_dir_sync.swap(false, Ordering::SeqCst) {
            return Err(std::io::Error::other("injected directory fsync failure"));
        }
        std::fs::File::open(dir).and_then(|d| d.sync_all())
    });
    if let Err(e) = stored {
        decisions.failed = true;
        eprintln!(
            "lockstep arbiter: {}; granting nothing more until restarted",
            crate::error_chain(&e)
        );
        return (Status::StorageFailure, None);
    }
    decisions.registry = next;
    shared.stats.granted.fetch_add(1, Ordering::Relaxed);
    (Status::Ok, Some(Answer::Won(record)))
}
