//! The primary's side of the link: stream the log to the backup, and feed
//! the backup's acks to the output gate.

use std::io::BufWriter;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use channel::log::{LogMeta, LogWriter};
use nic::gate::OutputGate;
use vmm::events::LogSink;

use std::io::Write;

use crate::{ReplicaError, encode_hello, read_ack};

/// The log sink that streams to the backup.
pub type LinkSink = LogSink<BufWriter<TcpStream>>;

/// Connects to the backup at `address`, retrying until `timeout` (the backup
/// may still be starting), and sends the log header.
pub fn connect(
    address: &str,
    meta: &LogMeta,
    generation: u64,
    timeout: Duration,
) -> Result<(LinkSink, TcpStream), ReplicaError> {
    let deadline = Instant::now() + timeout;
    let stream = loop {
        let attempt = address
            .to_socket_addrs()
            .and_then(|mut addresses| {
                addresses.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address")
                })
            })
            .and_then(|resolved| TcpStream::connect_timeout(&resolved, Duration::from_secs(1)));
        match attempt {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(source) => {
                return Err(ReplicaError::Link {
                    what: format!("connect to the backup at {address}"),
                    source,
                });
            }
        }
    };
    let link_error = |what: &str| {
        let what = what.to_string();
        move |source| ReplicaError::Link { what, source }
    };
    stream
        .set_nodelay(true)
        .map_err(link_error("set TCP_NODELAY"))?;
    let acks = stream
        .try_clone()
        .map_err(link_error("clone the link socket"))?;
    (&stream)
        .write_all(&encode_hello(generation))
        .map_err(link_error("send the hello"))?;
    let writer = LogWriter::new(BufWriter::with_capacity(1 << 16, stream), meta)?;
    Ok((LogSink::new(writer), acks))
}

/// What the ack reader has seen.
#[derive(Debug, Default)]
pub struct AckState {
    /// Acks received.
    pub acks: u64,
    /// Highest log position acknowledged.
    pub acked: u64,
    /// Why the link ended, if it has.
    pub ended: Option<String>,
}

/// The thread that applies the backup's acks to the output gate.
pub struct AckReader {
    state: Arc<Mutex<AckState>>,
    latest: Arc<AtomicU64>,
    lost: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl AckReader {
    /// Reads acks from `stream` and releases the gate's frames the moment
    /// each ack arrives, on this thread (no timer, no hand-off).
    pub fn spawn(mut stream: TcpStream, gate: Arc<OutputGate>) -> Result<Self, ReplicaError> {
        let state = Arc::new(Mutex::new(AckState::default()));
        let latest = Arc::new(AtomicU64::new(0));
        let lost = Arc::new(AtomicBool::new(false));
        let handle = {
            let (state, latest, lost) =
                (Arc::clone(&state), Arc::clone(&latest), Arc::clone(&lost));
            std::thread::Builder::new()
                .name("ack-reader".into())
                .spawn(move || {
                    let ending = loop {
                        match read_ack(&mut stream) {
                            Ok(Some(seq)) => {
                                gate.ack(seq);
                                latest.fetch_max(seq, Ordering::Release);
                                let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                                state.acks += 1;
                                state.acked = state.acked.max(seq);
                            }
                            Ok(None) => break "the backup closed the link".to_string(),
                            Err(error) => {
                                let mut message = error.to_string();
                                let mut cause = std::error::Error::source(&error);
                                while let Some(inner) = cause {
                                    message.push_str(&format!(": {inner}"));
                                    cause = inner.source();
                                }
                                break message;
                            }
                        }
                    };
                    lost.store(true, Ordering::Release);
                    state.lock().unwrap_or_else(|p| p.into_inner()).ended = Some(ending);
                })
                .map_err(|source| ReplicaError::Link {
                    what: "start the ack reader".into(),
                    source,
                })?
        };
        Ok(Self {
            state,
            latest,
            lost,
            handle: Some(handle),
        })
    }

    /// Highest position acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.latest.load(Ordering::Acquire)
    }

    /// True once the backup is gone.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// Waits until the backup acknowledges `seq` or `timeout` passes.
    pub fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.acked() < seq {
            if Instant::now() >= deadline || self.lost() {
                return self.acked() >= seq;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Counters and how the link ended.
    pub fn state(&self) -> AckState {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        AckState {
            acks: state.acks,
            acked: state.acked,
            ended: state.ended.clone(),
        }
    }

    /// Waits for the thread to end (after the backup closed the link).
    pub fn join(mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
