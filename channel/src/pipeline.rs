//! The primary's sending thread: entries leave the vCPU through the SPSC
//! [`ring`](crate::ring), a sender thread (pinned per [`tuning::Profile`])
//! batches them onto the transport and publishes the ack watermark.
//!
//! ```text
//!  vCPU thread                      sender thread (pinned: profile.sender_core)
//!  push(entry) ─▶ [ SPSC ring ] ─▶ pop up to batch.max_entries ─▶ LogSender ─▶ transport
//!   └ Full(entry): stall, retry      ring empty: poll() seals the batch
//!                                   acks ─▶ watermark (AtomicU64, Release) ─▶ output gate
//! ```
//!
//! # Sleeping
//!
//! An idle sender spins, then yields, then sleeps ([`tuning::Waiter`]) in
//! [`LogSender::wait`]: on the transport (an ack or a close wakes it) and on
//! an eventfd, the doorbell. Before it sleeps it sets `asleep` and looks at
//! the ring once more; [`SenderHandle::wake`] (the producer, at a sync point:
//! the guest produced output or is about to wait) and a stall on a full ring
//! swap `asleep` back and write the eventfd only if it was set, so the vCPU
//! pays a system call only when the sender really sleeps. A SeqCst fence on
//! both sides between the store and the load makes sure one of them sees
//! the other. Entries pushed without a wake wait for the next poll, at most
//! [`tuning::BLOCK_FOR`] later.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tuning::{HostCores, Profile, Waiter};

use crate::endpoint::{ChannelError, LogSender, Metrics};
use crate::ring::{Consumer, Producer};
use crate::transport::Transport;

/// Errors of the sender thread.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Pinning failed.
    #[error("cannot pin the sender thread")]
    Pin(#[from] tuning::TuningError),
    /// The channel failed.
    #[error("the channel failed")]
    Channel(#[from] ChannelError),
    /// Spawning the thread failed.
    #[error("cannot spawn the sender thread")]
    Spawn(#[source] std::io::Error),
    /// Creating the sender's doorbell (an eventfd) failed.
    #[error("cannot create the sender's eventfd")]
    Doorbell(#[source] std::io::Error),
    /// The thread panicked (a bug: nothing the peer sends may cause it).
    #[error("the sender thread panicked")]
    Panicked,
}

/// Handle on a running sender thread.
pub struct SenderHandle {
    watermark: Arc<AtomicU64>,
    control: Arc<AtomicU8>,
    ring_full: AtomicU64,
    doorbell: Arc<Doorbell>,
    join: JoinHandle<Result<Metrics, PipelineError>>,
    /// A copy of the sender's metrics, refreshed when the ring runs dry
    /// (at most every [`SNAPSHOT_INTERVAL`]; never on the busy path).
    snapshot: Arc<Mutex<Option<Metrics>>>,
}

/// How often an idle sender refreshes [`SenderHandle::snapshot`].
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(250);

/// How the producer wakes a sleeping sender (see the module docs).
struct Doorbell {
    /// Readable while a wake is pending; non-blocking.
    eventfd: OwnedFd,
    /// Set by the sender before it sleeps.
    asleep: AtomicBool,
    /// When the last ring was rung: ns since `epoch` (hop timing).
    rang_ns: AtomicU64,
    epoch: Instant,
}

impl Doorbell {
    fn new() -> Result<Self, PipelineError> {
        // SAFETY: eventfd takes no pointers; the fd it returns is checked
        // and then owned by the OwnedFd alone.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(PipelineError::Doorbell(std::io::Error::last_os_error()));
        }
        Ok(Self {
            // SAFETY: fd is a fresh, valid descriptor nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            asleep: AtomicBool::new(false),
            rang_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Rings if the sender sleeps (or is about to).
    fn wake(&self) {
        // Pairs with the sender's fence between its `asleep` store and its
        // look at the ring: our push is ordered before this load.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed) && self.asleep.swap(false, Ordering::SeqCst) {
            self.rang_ns.store(self.now_ns(), Ordering::Relaxed);
            self.ring();
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Makes the eventfd readable.
    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write reads 8 bytes from `one`, which outlives the call,
        // on the eventfd this struct owns; it never blocks (EFD_NONBLOCK:
        // a counter at its maximum is already readable, so the result is
        // not needed).
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Consumes pending wakes. A wake that lands after this (its producer
    /// took `asleep` just before the sender did) only makes the next sleep
    /// return at once.
    fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: read writes at most 8 bytes into `count`, which outlives
        // the call, on the eventfd this struct owns; EFD_NONBLOCK: an empty
        // counter returns EAGAIN at once, which is as good as a read.
        let _ = unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
    }
}

/// What the owner asks of the sender thread (`control`).
const RUN: u8 = 0;
/// Drain the ring, wait for the last acks, stop.
const DRAIN: u8 = 1;
/// Stop at once (the peer is being given up on).
const ABANDON: u8 = 2;

impl SenderHandle {
    /// Highest acked sequence number (Acquire load: pairs with the sender's
    /// Release store, so outputs at positions <= the value may be released).
    pub fn acked(&self) -> u64 {
        self.watermark.load(Ordering::Acquire)
    }

    /// The shared watermark itself, for the output gate.
    pub fn watermark(&self) -> Arc<AtomicU64> {
        self.watermark.clone()
    }

    /// Counts one stall of the producer on a full ring (the vCPU calls it
    /// when `push` hands its entry back).
    /// It also wakes the sender, which is evidently behind.
    pub fn note_ring_full(&self) {
        self.ring_full.fetch_add(1, Ordering::Relaxed);
        self.doorbell.wake();
    }

    /// Wakes the sender thread if it sleeps (see the module docs): the
    /// producer calls it when entries must leave now (the guest produced
    /// output or is about to wait). Costs a fence and a load when the
    /// sender is awake.
    pub fn wake(&self) {
        self.doorbell.wake();
    }

    /// True once the thread has ended: it failed (the peer is gone, silent
    /// or refused a frame), or it finished after [`SenderHandle::finish`].
    pub fn ended(&self) -> bool {
        self.join.is_finished()
    }

    /// Asks the thread to drain the ring, wait up to 5 s for the last
    /// acks, and stop; returns its metrics (with the producer's ring-full
    /// stalls), or the error that ended it.
    pub fn finish(self) -> Result<Metrics, PipelineError> {
        self.control.store(DRAIN, Ordering::Release);
        self.doorbell.ring();
        self.join_thread()
    }

    /// Stops the thread at once, without waiting for acks; returns the
    /// error that ended it, if it had already failed.
    pub fn abandon(self) -> Result<Metrics, PipelineError> {
        self.control.store(ABANDON, Ordering::Release);
        self.doorbell.ring();
        self.join_thread()
    }

    /// The sender's metrics as of its last idle moment (within about
    /// [`SNAPSHOT_INTERVAL`] of now while it idles), with the ring stalls
    /// counted so far; `None` before the first.
    pub fn snapshot(&self) -> Option<Metrics> {
        let mut m = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        m.ring_full_stalls += self.ring_full.load(Ordering::Relaxed);
        Some(m)
    }

    fn join_thread(self) -> Result<Metrics, PipelineError> {
        let mut m = self.join.join().unwrap_or(Err(PipelineError::Panicked))?;
        m.ring_full_stalls += self.ring_full.load(Ordering::Relaxed);
        Ok(m)
    }
}

/// Starts the sender thread. `cores` must have been read before anything
/// was pinned (see [`tuning::HostCores`]).
pub fn spawn_sender<T: Transport + 'static>(
    ring: Consumer<Vec<u8>>,
    transport: T,
    generation: u64,
    profile: &Profile,
    cores: &HostCores,
) -> Result<SenderHandle, PipelineError> {
    spawn_sender_with(ring, transport, generation, profile, cores, |_| {})
}

/// [`spawn_sender`] that also calls `on_ack(seq)` on the sender thread the
/// moment an ack advances the watermark to `seq` (the output gate releases
/// held frames from there: no timer, no hand-off to another thread).
pub fn spawn_sender_with<T, F>(
    ring: Consumer<Vec<u8>>,
    transport: T,
    generation: u64,
    profile: &Profile,
    cores: &HostCores,
    on_ack: F,
) -> Result<SenderHandle, PipelineError>
where
    T: Transport + 'static,
    F: FnMut(u64) + Send + 'static,
{
    spawn_sender_recycling(ring, None, transport, generation, profile, cores, on_ack)
}

/// Entry buffers larger than this are not handed back for reuse (a burst
/// of received frames can make a 390 KB entry; a pool of those would pin
/// memory for nothing).
pub const RECYCLE_MAX_CAPACITY: usize = 64 << 10;

/// A buffer for the next entry: one the sender handed back through
/// `recycled` (emptied, with at least `capacity` bytes of room), or a new
/// one. With [`spawn_sender_recycling`] this makes the producer's path
/// allocation-free in steady state:
///
/// ```text
///  vCPU: reuse(recycled) ─▶ encode entry ─▶ push ─▶ [ ring ] ─▶ sender: copy into batch
///        ▲                                                          │
///        └──────────────── [ recycle ring ] ◀── push the empty Vec ─┘
/// ```
pub fn reuse(recycled: &mut Consumer<Vec<u8>>, capacity: usize) -> Vec<u8> {
    match recycled.pop() {
        Some(mut buffer) => {
            buffer.clear();
            buffer.reserve(capacity);
            buffer
        }
        None => Vec::with_capacity(capacity),
    }
}

/// [`spawn_sender_with`] that hands every sent entry's buffer back to the
/// producer through `recycle` (see [`reuse`]); a full recycle ring, or a
/// buffer over [`RECYCLE_MAX_CAPACITY`], just drops it.
pub fn spawn_sender_recycling<T, F>(
    mut ring: Consumer<Vec<u8>>,
    mut recycle: Option<Producer<Vec<u8>>>,
    transport: T,
    generation: u64,
    profile: &Profile,
    cores: &HostCores,
    on_ack: F,
) -> Result<SenderHandle, PipelineError>
where
    T: Transport + 'static,
    F: FnMut(u64) + Send + 'static,
{
    profile.validate(cores)?;
    let sender = LogSender::new(transport, generation, 1, profile.batch, profile.liveness)?
        .with_ack_hook(on_ack);
    let watermark = sender.watermark();
    let control = Arc::new(AtomicU8::new(RUN));
    let control2 = control.clone();
    let doorbell = Arc::new(Doorbell::new()?);
    let bell = doorbell.clone();
    let profile = profile.clone();
    let cores = cores.clone();
    let snapshot = Arc::new(Mutex::new(None));
    let published = Arc::clone(&snapshot);
    let join = std::thread::Builder::new()
        .name("lockstep-sender".into())
        .spawn(move || -> Result<Metrics, PipelineError> {
            cores.pin_optional(profile.sender_core)?;
            let mut s = sender;
            let mut waiter = Waiter::new(profile.poll);
            let mut batch = Vec::with_capacity(profile.batch.max_entries as usize);
            let mut last_snapshot: Option<Instant> = None;
            loop {
                if control2.load(Ordering::Acquire) == ABANDON {
                    return Ok(s.metrics().clone());
                }
                batch.clear();
                let n = ring.pop_into(&mut batch, profile.batch.max_entries as usize);
                for e in batch.drain(..) {
                    while s.try_push(&e)?.is_none() {
                        s.poll_io()?;
                    }
                    if let Some(recycle) = recycle.as_mut()
                        && e.capacity() <= RECYCLE_MAX_CAPACITY
                    {
                        let _ = recycle.push(e);
                    }
                }
                if n == 0 {
                    // The ring ran dry: seal what we have, read acks.
                    s.poll()?;
                    if last_snapshot.is_none_or(|at| at.elapsed() >= SNAPSHOT_INTERVAL) {
                        last_snapshot = Some(Instant::now());
                        *published.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(s.metrics().clone());
                    }
                    if control2.load(Ordering::Acquire) != RUN && ring.is_empty() {
                        break;
                    }
                    waiter.idle_with(|timeout| {
                        bell.asleep.store(true, Ordering::SeqCst);
                        // Pairs with the fence in `Doorbell::wake`.
                        fence(Ordering::SeqCst);
                        let slept = if ring.is_empty() && control2.load(Ordering::Acquire) == RUN {
                            s.wait(Some(bell.eventfd.as_raw_fd()), timeout)
                        } else {
                            Ok(())
                        };
                        // Still set: nobody rang. Taken: a producer rang
                        // (or is about to), so the eventfd is emptied.
                        if !bell.asleep.swap(false, Ordering::SeqCst) {
                            bell.clear();
                            // Hop timing: how long the rung sender took
                            // to run again.
                            let rang = bell.rang_ns.load(Ordering::Relaxed);
                            s.metrics_mut()
                                .wake_ns
                                .saturating_record(bell.now_ns().saturating_sub(rang));
                        }
                        slept
                    })?;
                } else {
                    s.poll_io()?;
                    waiter.work();
                }
            }
            s.wait_all_acked(DRAIN_ACK_TIMEOUT)?;
            Ok(s.metrics().clone())
        })
        .map_err(PipelineError::Spawn)?;
    Ok(SenderHandle {
        watermark,
        control,
        ring_full: AtomicU64::new(0),
        doorbell,
        join,
        snapshot,
    })
}

/// How long a finishing sender waits for the acks of its last entries.
const DRAIN_ACK_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{FRAME_HEADER_LEN, FrameKind, Role, Session, encode_control};
    use crate::ring::{PushError, RingBuffer};
    use crate::testkit::{Content, fill_entry, run_backup};
    use crate::transport::TransportError;
    use crate::transport::shm::{ShmListener, ShmTransport};
    use crate::transport::uring_tcp::UringTcp;

    /// The two tests spin on both cores; running them at once would starve
    /// the backups past the peer timeout.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Two-core defaults with a peer timeout long enough that other tests
    /// spinning in this binary cannot starve an end into a false alarm.
    fn profile() -> Profile {
        let mut p = Profile::two_core();
        p.liveness.peer_timeout = Duration::from_secs(5);
        p
    }

    fn drive<T: Transport + 'static>(t: T, backup: std::thread::JoinHandle<u64>, entries: u64) {
        let profile = profile();
        let cores = HostCores::detect().unwrap();
        let mut pinned = profile.clone();
        pinned.sender_core = cores.ids().last().copied();
        let (mut prod, cons) = RingBuffer::new::<Vec<u8>>(256);
        let h = spawn_sender(cons, t, 2, &pinned, &cores).unwrap();
        let mut stalls = 0u64;
        for seq in 1..=entries {
            let mut v = vec![0u8; 128];
            fill_entry(seq, &mut v);
            loop {
                match prod.push(v) {
                    Ok(()) => break,
                    Err(PushError::Full(back)) => {
                        stalls += 1;
                        h.note_ring_full();
                        v = back;
                        std::thread::yield_now();
                    }
                }
            }
        }
        let m = h.finish().unwrap();
        assert_eq!(backup.join().unwrap(), entries);
        assert_eq!(m.entries, entries);
        assert_eq!(m.ring_full_stalls, stalls);
        eprintln!(
            "ring-full stalls: {stalls}, batches {}, acks {}",
            m.batches, m.acks
        );
    }

    fn session(role: Role) -> Session {
        Session {
            vm_id: 3,
            generation: 2,
            role,
            key: b"k".to_vec(),
        }
    }

    #[test]
    fn vcpu_ring_to_backup_through_pinned_sender_shm() {
        let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let entries = 50_000u64;
        let path = std::env::temp_dir().join(format!("lockstep-pipe-{}.sock", std::process::id()));
        let l = ShmListener::bind(&path).unwrap();
        let backup = std::thread::spawn(move || {
            let t = l.accept(&session(Role::Backup), 1 << 20).unwrap();
            let p = profile();
            run_backup(t, 2, &p, entries, 128, Content::Full, |_| {})
                .unwrap()
                .entries
        });
        let t = ShmTransport::connect(&path, &session(Role::Primary)).unwrap();
        let _ = std::fs::remove_file(&path);
        drive(t, backup, entries);
    }

    /// The io_uring transport is connected on this thread and used on the
    /// sender thread: its ring must follow it (R_DISABLED until first poll).
    #[test]
    fn vcpu_ring_to_backup_through_pinned_sender_uring() {
        let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let entries = 50_000u64;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let backup = std::thread::spawn(move || {
            let t = UringTcp::accept(&l, &session(Role::Backup), 1 << 20).unwrap();
            let p = profile();
            run_backup(t, 2, &p, entries, 128, Content::Full, |_| {})
                .unwrap()
                .entries
        });
        let t = UringTcp::connect(addr, &session(Role::Primary), 1 << 20).unwrap();
        drive(t, backup, entries);
    }

    /// A sleeping end wakes when the peer sends a frame, and when the peer
    /// goes away, long before its timeout; the doorbell wakes it too.
    fn sleeper_wakes<T: Transport + 'static>(mut primary: T, mut backup: T) {
        const LONG: Duration = Duration::from_secs(20);
        fn heartbeat<T: Transport>(t: &mut T) {
            let mut sealer = t.frame_keys().sealer(Role::Primary);
            let buf = t.reserve(FRAME_HEADER_LEN).unwrap().unwrap();
            let len = encode_control(buf, FrameKind::Heartbeat, 2, 0, &mut sealer).unwrap();
            t.commit(len).unwrap();
            while !t.flushed() {
                t.poll().unwrap();
            }
        }
        fn sleep_until_frame<T: Transport>(t: &mut T) -> Duration {
            let start = std::time::Instant::now();
            loop {
                t.poll().unwrap();
                if t.recv().unwrap().is_some() {
                    return start.elapsed();
                }
                t.wait(None, LONG).unwrap();
                assert!(start.elapsed() < LONG, "slept through a frame");
            }
        }
        primary.poll().unwrap();
        let (woke, woke_rx) = std::sync::mpsc::channel();
        let sleeper = std::thread::spawn(move || {
            woke.send(sleep_until_frame(&mut backup)).unwrap();
            // then sleep until the primary is gone
            let start = std::time::Instant::now();
            loop {
                match backup
                    .poll()
                    .and_then(|_| backup.recv().map(|f| f.is_some()))
                {
                    Err(TransportError::Closed) => break start.elapsed(),
                    Err(e) => panic!("{e}"),
                    Ok(_) => backup.wait(None, LONG).unwrap(),
                }
                assert!(start.elapsed() < LONG, "slept through the close");
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        heartbeat(&mut primary);
        // The primary stays until the frame woke the sleeper: its close
        // must not be what wakes it.
        let woke_after = woke_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the sleeper did not wake on the frame");
        assert!(
            woke_after < Duration::from_secs(5),
            "woke after {woke_after:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        drop(primary);
        let closed_after = sleeper.join().unwrap();
        assert!(
            closed_after < Duration::from_secs(5),
            "close seen after {closed_after:?}"
        );

        let bell = Arc::new(Doorbell::new().unwrap());
        let bell2 = bell.clone();
        let start = std::time::Instant::now();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            bell2.asleep.store(true, Ordering::SeqCst); // as the sender does
            bell2.wake();
        });
        crate::transport::wait_readable(&[], Some(bell.eventfd.as_raw_fd()), LONG).unwrap();
        waker.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            !bell.asleep.load(Ordering::SeqCst),
            "wake swaps asleep back"
        );
    }

    #[test]
    fn sleeping_ends_wake_on_frames_close_and_doorbell_shm() {
        let path = std::env::temp_dir().join(format!("lockstep-sleep-{}.sock", std::process::id()));
        let l = ShmListener::bind(&path).unwrap();
        let backup = std::thread::spawn(move || l.accept(&session(Role::Backup), 1 << 20).unwrap());
        let primary = ShmTransport::connect(&path, &session(Role::Primary)).unwrap();
        let _ = std::fs::remove_file(&path);
        sleeper_wakes(primary, backup.join().unwrap());
    }

    #[test]
    fn sleeping_ends_wake_on_frames_close_and_doorbell_uring() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let backup = std::thread::spawn(move || {
            UringTcp::accept(&l, &session(Role::Backup), 1 << 20).unwrap()
        });
        let primary = UringTcp::connect(addr, &session(Role::Primary), 1 << 20).unwrap();
        sleeper_wakes(primary, backup.join().unwrap());
    }
}
