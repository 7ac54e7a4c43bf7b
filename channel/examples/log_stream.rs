//! Streams a real log file (made by `lockstep record`) from a primary
//! endpoint to a backup endpoint over a chosen transport, and checks that
//! every entry arrives whole, in order and acknowledged:
//!
//! ```text
//! cargo run --release -p channel --features rdma --example log_stream -- \
//!     log=FILE transport=rdma|tcp|shm role=both|primary|backup \
//!     [addr=HOST:PORT] [path=/tmp/sock] [gen=G] [key=K] [fallback]
//! ```
//!
//! - `role=both`: backup and primary in one process on two threads.
//! - `role=backup` listens (TCP `addr`, or unix socket `path` for shm) and
//!   compares each delivered entry with the file, byte for byte, at its
//!   position; it succeeds once it has all of them and the primary has
//!   closed the channel after seeing them acknowledged.
//! - `role=primary` connects (retrying for 30 s while the backup starts),
//!   sends every entry and succeeds only when the backup's ack covers the
//!   last one.
//! - `fallback`: with `transport=rdma` and no RDMA device, say so and use
//!   io_uring TCP instead (what the `lockstep` binary does).
//!
//! Prints `OK <role> entries=N bytes=B ...` and exits 0, or `ERR <cause>`
//! and exits 1.

use std::collections::HashMap;
use std::error::Error;
use std::fs::File;
use std::io::BufReader;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use channel::endpoint::{ChannelError, LogReceiver, LogSender};
use channel::log::LogReader;
use channel::protocol::{Role, Session};
use channel::testkit::error_chain;
use channel::transport::shm::{ShmListener, ShmTransport};
use channel::transport::uring_tcp::UringTcp;
use channel::transport::{Transport, TransportError};
use tuning::{Profile, Waiter};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

#[derive(Clone)]
struct Opts {
    log: String,
    transport: String,
    addr: String,
    path: String,
    session_key: Vec<u8>,
    generation: u64,
}

fn profile() -> Profile {
    // Soft-RoCE under TCG stalls for tens of milliseconds at times.
    let mut p = Profile::two_core();
    p.liveness.peer_timeout = Duration::from_secs(2);
    p.liveness.heartbeat = Duration::from_millis(20);
    p
}

fn session(o: &Opts, role: Role) -> Session {
    Session {
        vm_id: 1,
        generation: o.generation,
        role,
        key: o.session_key.clone(),
    }
}

fn max_frame() -> usize {
    profile().batch.max_bytes as usize + 4096
}

/// Every entry of the log, encoded exactly as in the file.
fn load(path: &str) -> Res<Vec<Vec<u8>>> {
    let f = File::open(path).map_err(|e| format!("opening {path}: {e}"))?;
    let mut r = LogReader::new(BufReader::new(f))?;
    let mut out = Vec::new();
    while let Some(e) = r.next_entry()? {
        let mut b = Vec::with_capacity(e.encoded_len());
        e.encode_into(&mut b);
        out.push(b);
    }
    if out.is_empty() {
        return Err(format!("{path} holds no entries").into());
    }
    Ok(out)
}

fn run_primary<T: Transport>(t: T, o: &Opts, entries: &[Vec<u8>]) -> Res<String> {
    let p = profile();
    let name = t.name();
    let mut s = LogSender::new(t, o.generation, 1, p.batch, p.liveness)?;
    let mut w = Waiter::new(p.poll);
    let start = Instant::now();
    let mut i = 0;
    while i < entries.len() {
        match s.try_push(&entries[i])? {
            Some(seq) if seq != i as u64 + 1 => {
                return Err(format!("entry {} got sequence number {seq}", i + 1).into());
            }
            Some(_) => {
                i += 1;
                if i % 64 == 0 {
                    s.poll_io()?;
                }
                w.work();
            }
            None => {
                s.poll()?;
                w.idle();
            }
        }
    }
    let n = entries.len() as u64;
    let acked = s.wait_all_acked(Duration::from_secs(60))?;
    if acked != n {
        return Err(format!("only {acked} of {n} entries acknowledged within 60 s").into());
    }
    let wm = s.watermark().load(std::sync::atomic::Ordering::Acquire);
    if wm != n {
        return Err(format!("ack watermark {wm}, expected {n}").into());
    }
    let dt = start.elapsed();
    let m = s.metrics();
    let bytes: usize = entries.iter().map(Vec::len).sum();
    Ok(format!(
        "OK primary transport={name} entries={n} bytes={bytes} acked={acked} batches={} acks={} time={:.3}s ack_rtt_p50_us={:.1} ack_rtt_p99_us={:.1}",
        m.batches,
        m.acks,
        dt.as_secs_f64(),
        m.ack_rtt_ns.value_at_quantile(0.5) as f64 / 1e3,
        m.ack_rtt_ns.value_at_quantile(0.99) as f64 / 1e3,
    ))
}

fn run_backup<T: Transport>(t: T, o: &Opts, entries: &[Vec<u8>]) -> Res<String> {
    let p = profile();
    let name = t.name();
    let mut r = LogReceiver::new(t, o.generation, 1, p.ack, p.liveness)?;
    let mut w = Waiter::new(p.poll);
    let n = entries.len() as u64;
    let bad: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
    let check = |seq: u64, e: &[u8]| {
        let mut bad = bad.borrow_mut();
        if bad.is_some() {
            return;
        }
        match entries.get((seq - 1) as usize) {
            Some(want) if want.as_slice() == e => {}
            Some(want) => {
                *bad = Some(format!(
                    "entry {seq} differs from the file ({} bytes received, {} in the file)",
                    e.len(),
                    want.len()
                ))
            }
            None => *bad = Some(format!("entry {seq} is beyond the file's {n} entries")),
        }
    };
    let mut start = None;
    while r.received() < n {
        let got = r.poll(check)?;
        if let Some(b) = bad.borrow_mut().take() {
            return Err(b.into());
        }
        if got > 0 {
            start.get_or_insert_with(Instant::now);
            w.work();
        } else {
            w.idle();
        }
    }
    let dt = start.map(|s| s.elapsed()).unwrap_or_default();
    // Keep the channel up until the primary, having seen the last ack,
    // closes it (or falls silent), so the final ack is not cut off.
    let deadline = Instant::now() + Duration::from_secs(30);
    let end = loop {
        match r.poll(check) {
            Ok(0) => w.idle(),
            Ok(k) => break format!("{k} entries beyond the file's {n}"),
            // The primary is gone (shm has no close signal: it falls silent).
            Err(ChannelError::Transport(TransportError::Closed))
            | Err(ChannelError::PeerSilent { .. }) => break String::new(),
            Err(e) => break format!("after the last entry: {}", error_chain(&e)),
        }
        if Instant::now() > deadline {
            break "the primary did not close within 30 s of the last entry".into();
        }
    };
    if !end.is_empty() {
        return Err(end.into());
    }
    let bytes: usize = entries.iter().map(Vec::len).sum();
    let m = r.metrics();
    Ok(format!(
        "OK backup transport={name} entries={} bytes={bytes} batches={} acks_sent={} time={:.3}s",
        r.received(),
        m.batches,
        m.acks,
        dt.as_secs_f64()
    ))
}

/// Retries `f` while the peer is not listening yet.
fn retrying<T>(mut f: impl FnMut() -> Result<T, TransportError>) -> Result<T, TransportError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Err(TransportError::Io { op, source })
                if op.starts_with("connecting") && Instant::now() < deadline =>
            {
                let _ = source;
                std::thread::sleep(Duration::from_millis(200));
            }
            other => return other,
        }
    }
}

fn primary(o: &Opts, entries: &[Vec<u8>]) -> Res<String> {
    let s = session(o, Role::Primary);
    match o.transport.as_str() {
        "tcp" => {
            let addr = o.addr.parse()?;
            run_primary(
                retrying(|| UringTcp::connect(addr, &s, max_frame()))?,
                o,
                entries,
            )
        }
        "shm" => run_primary(
            retrying(|| ShmTransport::connect(Path::new(&o.path), &s))?,
            o,
            entries,
        ),
        #[cfg(feature = "rdma")]
        "rdma" => {
            use channel::transport::rdma::{RdmaConfig, RdmaTransport};
            let addr = o.addr.parse()?;
            let cfg = RdmaConfig::from_env(max_frame())?;
            run_primary(
                retrying(|| RdmaTransport::connect(addr, &s, &cfg))?,
                o,
                entries,
            )
        }
        t => Err(unknown(t)),
    }
}

fn backup(o: &Opts, entries: &[Vec<u8>], ready: impl FnOnce()) -> Res<String> {
    let s = session(o, Role::Backup);
    match o.transport.as_str() {
        "tcp" => {
            let l = TcpListener::bind(&o.addr)?;
            ready();
            run_backup(UringTcp::accept(&l, &s, max_frame())?, o, entries)
        }
        "shm" => {
            let l = ShmListener::bind(Path::new(&o.path))?;
            ready();
            let t = l.accept(&s, 16 << 20)?;
            let _ = std::fs::remove_file(&o.path);
            run_backup(t, o, entries)
        }
        #[cfg(feature = "rdma")]
        "rdma" => {
            use channel::transport::rdma::{RdmaConfig, RdmaTransport};
            let cfg = RdmaConfig::from_env(max_frame())?;
            let l = TcpListener::bind(&o.addr)?;
            ready();
            run_backup(RdmaTransport::accept(&l, &s, &cfg)?, o, entries)
        }
        t => Err(unknown(t)),
    }
}

fn unknown(t: &str) -> Box<dyn Error + Send + Sync> {
    if t == "rdma" {
        "transport=rdma: this binary was built without the `rdma` feature".into()
    } else {
        format!("unknown transport {t:?} (rdma | tcp | shm)").into()
    }
}

fn main_inner(args: &[String]) -> Res<Vec<String>> {
    let mut opt = HashMap::new();
    for a in args {
        let (k, v) = a.split_once('=').unwrap_or((a.as_str(), ""));
        opt.insert(k.to_string(), v.to_string());
    }
    let get = |k: &str, d: &str| opt.get(k).cloned().unwrap_or_else(|| d.to_string());
    let mut o = Opts {
        log: opt.get("log").cloned().ok_or("log=FILE is required")?,
        transport: get("transport", "tcp"),
        addr: get("addr", "127.0.0.1:7100"),
        path: get(
            "path",
            &format!("/tmp/lockstep-log-stream-{}.sock", std::process::id()),
        ),
        session_key: get("key", "lockstep-log-stream-key").into_bytes(),
        generation: get("gen", "1").parse()?,
    };
    if o.transport == "rdma" && opt.contains_key("fallback") {
        #[cfg(feature = "rdma")]
        let present = channel::transport::rdma::probe().map_err(|e| e.to_string());
        #[cfg(not(feature = "rdma"))]
        let present: Result<Vec<String>, String> = Err("built without the rdma feature".into());
        if let Err(e) = present {
            eprintln!("log_stream: {e}; falling back to io_uring TCP");
            o.transport = "tcp".into();
        }
    }
    let entries = load(&o.log)?;
    eprintln!(
        "log_stream: {} entries ({} bytes) from {} over {}",
        entries.len(),
        entries.iter().map(Vec::len).sum::<usize>(),
        o.log,
        o.transport
    );
    match get("role", "both").as_str() {
        "primary" => Ok(vec![primary(&o, &entries)?]),
        "backup" => Ok(vec![backup(&o, &entries, || {})?]),
        "both" => {
            let (tx, rx) = std::sync::mpsc::channel();
            let (bo, be) = (o.clone(), entries.clone());
            let b = std::thread::spawn(move || {
                backup(&bo, &be, || {
                    let _ = tx.send(());
                })
                .map_err(|e| e.to_string())
            });
            // Wait until the backup listens (or failed before it could).
            let _ = rx.recv_timeout(Duration::from_secs(30));
            let p = primary(&o, &entries);
            let b = b.join().map_err(|_| "the backup thread panicked")?;
            let p = p?;
            Ok(vec![b?, p])
        }
        r => Err(format!("unknown role {r:?} (primary | backup | both)").into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match main_inner(&args) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("ERR {}", error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    }
}
