//! The backup's side of the link: receive the log, ack on receipt, and feed
//! the replay in lockstep.

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use channel::log::{Entry, LogError, LogMeta, LogReader};
use hdrhistogram::Histogram;
use vmm::VmmError;
use vmm::events::EntrySource;

use crate::{ACK_EVERY, HELLO_LEN, ReplicaError, decode_hello, encode_ack};

/// Entries received but not yet replayed, at most (then the receiver stops
/// reading and TCP flow control slows the primary: nothing is dropped).
pub const QUEUE_ENTRIES: usize = 65_536;

type Received = Result<(Entry, Instant), LogError>;

/// How far the replay trails the primary.
#[derive(Clone, Debug)]
pub struct Lag {
    /// Most exits between the newest entry received and the one replayed.
    pub max_exits: u64,
    /// Time from receipt to replay of each entry, in µs.
    pub queue_us: Histogram<u64>,
}

/// The replay's view of the link: an [`EntrySource`] that blocks until the
/// primary's next entry arrives.
pub struct StreamSource {
    entries: Receiver<Received>,
    newest_exit: Arc<AtomicU64>,
    lag: Lag,
    receiver: Option<JoinHandle<()>>,
    lost: Arc<Mutex<Option<String>>>,
}

impl StreamSource {
    /// Lag figures so far.
    pub fn lag(&self) -> &Lag {
        &self.lag
    }

    /// Why the primary counts as lost, once it does.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Exit number of the newest entry received.
    pub fn newest_exit(&self) -> u64 {
        self.newest_exit.load(Ordering::Acquire)
    }
}

impl Drop for StreamSource {
    fn drop(&mut self) {
        if let Some(handle) = self.receiver.take() {
            // The receiver ends once the primary closes the link.
            drop(handle);
        }
    }
}

impl EntrySource for StreamSource {
    fn next_entry(&mut self) -> Result<Option<Entry>, VmmError> {
        match self.entries.recv() {
            Ok(Ok((entry, received))) => {
                let newest = self.newest_exit.load(Ordering::Acquire);
                self.lag.max_exits = self.lag.max_exits.max(newest.saturating_sub(entry.exit));
                let waited = u64::try_from(received.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = self.lag.queue_us.record(waited.max(1));
                Ok(Some(entry))
            }
            Ok(Err(error)) => Err(VmmError::Log(error)),
            // The receiver ended without an error: the stream ended cleanly.
            Err(_) => Ok(None),
        }
    }
}

/// A primary's connection, accepted: who, which generation, what guest.
pub struct Accepted {
    /// The log header.
    pub meta: LogMeta,
    /// The entries, as the replay's source.
    pub source: StreamSource,
    /// The primary's address.
    pub peer: String,
    /// The primary's generation, from its hello.
    pub generation: u64,
}

/// Accepts the primary's connection on `listener`, reads the hello and the
/// log header, and starts the receiver thread. `check_generation` may refuse
/// the primary's generation (a stale primary); the connection is then closed.
/// The primary counts as lost when it says nothing for `peer_timeout`.
pub fn accept(
    listener: &TcpListener,
    peer_timeout: Duration,
    check_generation: impl Fn(u64) -> Result<(), String>,
) -> Result<Accepted, ReplicaError> {
    let (stream, peer) = listener.accept().map_err(|source| ReplicaError::Link {
        what: "accept the primary's connection".into(),
        source,
    })?;
    stream
        .set_nodelay(true)
        .map_err(|source| ReplicaError::Link {
            what: "set TCP_NODELAY".into(),
            source,
        })?;
    let acks = stream.try_clone().map_err(|source| ReplicaError::Link {
        what: "clone the link socket".into(),
        source,
    })?;
    stream
        .set_read_timeout(Some(peer_timeout))
        .map_err(|source| ReplicaError::Link {
            what: "set the peer timeout".into(),
            source,
        })?;
    let mut hello = [0u8; HELLO_LEN];
    (&stream)
        .read_exact(&mut hello)
        .map_err(|source| ReplicaError::Link {
            what: format!("read the hello of {peer}"),
            source,
        })?;
    let generation = decode_hello(&hello)?;
    if let Err(reason) = check_generation(generation) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Err(ReplicaError::Protocol(format!(
            "refused the primary at {peer}: {reason}"
        )));
    }
    let reader = LogReader::new(BufReader::with_capacity(1 << 16, stream))?;
    let meta = reader.meta().clone();
    let (sender, entries) = sync_channel(QUEUE_ENTRIES);
    let newest_exit = Arc::new(AtomicU64::new(0));
    let lost_reason = Arc::new(Mutex::new(None));
    let receiver = {
        let newest_exit = Arc::clone(&newest_exit);
        let lost = Arc::clone(&lost_reason);
        std::thread::Builder::new()
            .name("log-receiver".into())
            .spawn(move || {
                if let Some(reason) = receive(reader, &acks, sender, &newest_exit) {
                    *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                    // Close both directions: a primary that is merely slow
                    // learns at once that this backup stopped following it.
                    let _ = acks.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(|source| ReplicaError::Link {
                what: "start the log receiver".into(),
                source,
            })?
    };
    let lag = Lag {
        max_exits: 0,
        queue_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .expect("1 µs .. 1 h at 3 significant digits are valid histogram bounds"),
    };
    Ok(Accepted {
        meta,
        source: StreamSource {
            entries,
            newest_exit,
            lag,
            receiver: Some(receiver),
            lost: lost_reason,
        },
        peer: peer.to_string(),
        generation,
    })
}

/// The receiver thread: entries into the queue, acks back on receipt.
/// Returns why the primary counts as lost, if it does (the stream broke or
/// fell silent); a clean end or a corrupt entry return `None` (the corrupt
/// entry is passed on as an error: fail-stop, not failover).
fn receive(
    mut reader: LogReader<BufReader<TcpStream>>,
    mut acks: &TcpStream,
    queue: SyncSender<Received>,
    newest_exit: &AtomicU64,
) -> Option<String> {
    let mut unacked = 0u64;
    let mut last_seq = 0u64;
    loop {
        match reader.next_entry() {
            Ok(Some(entry)) => {
                last_seq = entry.seq;
                newest_exit.fetch_max(entry.exit, Ordering::Release);
                if queue.send(Ok((entry, Instant::now()))).is_err() {
                    return None; // the replay is gone
                }
                unacked += 1;
                // Ack when the burst has drained from the receive buffer, or
                // every ACK_EVERY entries mid-burst.
                if reader.input().buffer().is_empty() || unacked >= ACK_EVERY {
                    if let Err(error) = acks.write_all(&encode_ack(last_seq)) {
                        return Some(format!("cannot ack: {error}"));
                    }
                    unacked = 0;
                }
            }
            Ok(None) => break,
            Err(error @ (LogError::Io { .. } | LogError::Truncated { .. })) => {
                return Some(match &error {
                    LogError::Io { source, .. }
                        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                    {
                        "the primary fell silent (peer timeout)".to_string()
                    }
                    _ => error.to_string(),
                });
            }
            Err(error) => {
                let _ = queue.send(Err(error));
                return None;
            }
        }
    }
    if unacked > 0 {
        let _ = acks.write_all(&encode_ack(last_seq));
    }
    None
}
