//! Failover without split brain.
//!
//! Neither replica can tell a dead peer from a broken link, so neither goes
//! live alone before winning the arbiter's test-and-set for the generation
//! it belongs to (see the `arbiter` crate):
//!
//! - **Backup** ([`BackupSource`]): replays the primary's stream. When the
//!   stream ends without an end record (the primary died, or was silent for
//!   the heartbeat timeout), it asks the arbiter for generation g+1. Won: it
//!   has already consumed every entry it received, so it switches its event
//!   source to live values (clock continuing from the last value the guest
//!   saw), attaches the NIC to the TAP, announces the guest with a gratuitous
//!   ARP and serves. Lost: it halts for good.
//! - **Primary** ([`FailoverSink`]): when its backup stops acknowledging
//!   (link closed, or acks overdue by the heartbeat timeout) it keeps every
//!   output held, asks the arbiter for generation g+1, and only when it wins
//!   opens the gate and runs unprotected. Lost: it halts for good.
//! - **Arbiter unreachable**: the caller retries and stays as it is (outputs
//!   held, or not live): the service stalls rather than splits.
//!
//! # Frames at cut-over
//!
//! A frame the guest produced at log position `L` left the old primary only
//! once the primary *processed* an ack `>= L`. The backup acks on receipt,
//! but it cannot know which of its acks the primary acted on before it died
//! (an ack can be in flight, or read but not yet turned into a release):
//! frames near the end of the log may never have reached the client. Left
//! alone, the client gets them only when its TCP retransmission timer fires
//! (200 ms at least on Linux), and the guest's reply after that.
//!
//! So the backup's NIC output while it replays ([`CutoverOutput`]) is not
//! simply dropped: it keeps the frames its replay produced recently, and on
//! going live sends every one produced within the *resend window* before the
//! stream was found ended, right after the gratuitous ARP and before the
//! first live frame:
//!
//! ```text
//!  replay frames:  f1 f2 f3 ... fk fk+1 ... fn   │ stream ended (t_end)  │ won g+1
//!  kept:                         └─ produced ≥ t_end - window ─┘            │
//!                                                               resend ─────┘ then live
//! ```
//!
//! The window is twice the peer timeout: the primary was alive at least until
//! the last word the backup heard from it (`t_end`, or `t_end - timeout` when
//! it fell silent), and an ack the backup sent a full peer timeout before that
//! was read and acted on by a primary that was still running. A frame older
//! than the window was therefore released; one inside it may not have been,
//! and is sent again. Duplicates are harmless by design (bit-identical
//! frames: the replica is deterministic; TCP drops segments it already has).
//! The number kept is bounded ([`CUTOVER_MAX_FRAMES`], [`CUTOVER_MAX_BYTES`];
//! the oldest go first), and the count sent is reported per failover.
//!
//! # The stale side never releases a frame: acks have a lease
//!
//! A primary that was frozen (SIGSTOP, a stalled host) or cut off may
//! resume after its backup went live, with acks the backup sent before it
//! went live waiting in its socket, and a guest that carries on where it
//! stopped. Releasing on those acks would put the old primary's frames on
//! the wire after the new generation was granted. So an ack releases output
//! only while it is *fresh* ([`Lease`]): the backup received entry `s` after
//! the primary pushed it, and it goes live only after hearing nothing for
//! the peer timeout and then winning the arbiter; so until `t_push(s) +
//! peer timeout` it cannot be live. The primary marks, at every flush, how
//! many entries it had pushed and when; an ack for `s` is dated by the last
//! mark before `s` (a lower bound of its push time):
//!
//! ```text
//!  marks:  (seq 40, t1)   (seq 57, t2)        ack 55 arrives at now
//!  ack 55 ⇒ entry 55 pushed after t1 ⇒ the backup is not live before t1 + timeout
//!  fresh  (now <  t1 + timeout): release, lease runs until t1 + timeout
//!  stale  (now >= t1 + timeout): release nothing, the link counts as lost,
//!                                the primary asks the arbiter (and halts if it lost)
//! ```
//!
//! Every frame also passes the primary's [`OutputGuard`] on its way to the
//! TAP, which sends only while the lease runs (or the primary won the right
//! to run alone): a frame the resumed guest produces at a position already
//! acknowledged would otherwise leave at once. What it withholds leaves
//! when a fresh ack renews the lease, or when the primary wins the arbiter;
//! if it lost, nothing ever does. A stale ack is treated like silence: a
//! backup whose acks take longer than the peer timeout counts as lost.
//! (Left: the microseconds between the check and the write(2) to the TAP.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arbiter::{Arbiter, Outcome, ReplicaId, error_chain};
use channel::log::EntryKind;
use nic::gate::{FrameOut, OutputGate};
use vmm::VmmError;
use vmm::digest::Digest;
use vmm::events::{EventSink, EventSource, Live, Replay};

use crate::backup::StreamSource;
use crate::primary::PrimaryLink;

/// Exit status of a replica that lost the arbitration and halted for good.
pub const EXIT_HALTED: u8 = 4;

/// Who this replica is, to the arbiter.
#[derive(Clone)]
pub struct Membership {
    /// The arbiter.
    pub arbiter: Arc<dyn Arbiter>,
    /// The VM's identity.
    pub vm: u64,
    /// This replica.
    pub me: ReplicaId,
    /// The generation this replica belongs to.
    pub generation: u64,
}

impl Membership {
    /// Asks to go live alone in generation `generation + 1`. Retries while
    /// the arbiter is unreachable (stalling, never splitting); returns the new
    /// generation when won, and `Halted` when lost.
    pub fn go_live_alone(&self, why: &str) -> Result<u64, VmmError> {
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            match self
                .arbiter
                .test_and_set(self.vm, self.generation, &self.me)
            {
                Ok(Outcome::Won(record)) => return Ok(record.generation),
                Ok(lost @ Outcome::Lost { .. }) => {
                    return Err(VmmError::Halted(format!(
                        "{why}; {} lost generation {} at the arbiter ({lost:?})",
                        self.me,
                        self.generation + 1
                    )));
                }
                Err(error) => {
                    if attempt == 1 || attempt.is_multiple_of(20) {
                        tracing::warn!(
                            "lockstep: {why}; the arbiter cannot decide ({}): not going live, retrying",
                            error_chain(&error)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }
}

/// What a backup that won the arbiter goes live with.
#[derive(Clone, Copy, Debug)]
pub struct GoLive {
    /// The guest clock to continue from (the last value the guest saw).
    pub clock_ns: u64,
    /// The generation it won.
    pub generation: u64,
    /// When the primary's stream was found ended (the replay had consumed
    /// every entry received): the resend window ends here.
    pub stream_ended: Instant,
}

/// Builds the live event source of a backup going live (attaches the NIC to
/// the TAP, announces the guest, resends the frames the old primary may not
/// have released). Its sink is a [`FailoverSink`] running alone, so a new
/// backup can join it later.
pub type Promote = Box<dyn FnMut(GoLive) -> Result<Live<FailoverSink>, VmmError> + Send>;

/// Most frames a replaying backup keeps for the cut-over.
pub const CUTOVER_MAX_FRAMES: usize = 4096;
/// Most frame bytes a replaying backup keeps for the cut-over.
pub const CUTOVER_MAX_BYTES: usize = 16 << 20;

/// What [`CutoverOutput::go_live`] sent again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resent {
    /// Frames sent again.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames kept and not sent (produced before the window).
    pub older: u64,
}

struct Kept {
    at: Instant,
    frame: Vec<u8>,
}

struct CutoverState {
    live: Option<Box<dyn FrameOut>>,
    kept: VecDeque<Kept>,
    bytes: usize,
    window: Duration,
    produced: u64,
}

/// A backup's NIC output (see the module docs, *Frames at cut-over*): while
/// it replays, frames go nowhere but the most recent are kept; on going live
/// the ones inside the resend window are sent, then everything goes to the
/// live output. Clones share one state; the output gate of the backup is
/// open, so frames arrive here in the order the guest produced them.
#[derive(Clone)]
pub struct CutoverOutput(Arc<Mutex<CutoverState>>);

impl CutoverOutput {
    /// Keeps the frames produced in the last `window` (at least 10 ms).
    pub fn new(window: Duration) -> Self {
        Self(Arc::new(Mutex::new(CutoverState {
            live: None,
            kept: VecDeque::new(),
            bytes: 0,
            window: window.max(Duration::from_millis(10)),
            produced: 0,
        })))
    }

    /// The resend window for a pair with this peer timeout: twice the
    /// timeout (see the module docs), at most 3 s.
    pub fn window_for(peer_timeout: Duration) -> Duration {
        (peer_timeout * 2).min(Duration::from_secs(3))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CutoverState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a frame the replay produced.
    fn keep(&self, frame: &[u8]) {
        let mut state = self.lock();
        let now = Instant::now();
        state.produced += 1;
        state.bytes += frame.len();
        state.kept.push_back(Kept {
            at: now,
            frame: frame.to_vec(),
        });
        let window = state.window;
        while let Some(front) = state.kept.front() {
            let expired = now.saturating_duration_since(front.at) > window;
            let over = state.kept.len() > CUTOVER_MAX_FRAMES || state.bytes > CUTOVER_MAX_BYTES;
            if !(expired || over) {
                break;
            }
            let len = front.frame.len();
            state.kept.pop_front();
            state.bytes -= len;
        }
    }

    /// Frames the replay produced so far.
    pub fn produced(&self) -> u64 {
        self.lock().produced
    }

    /// Goes live on `out`: first sends again every kept frame produced
    /// within the window before `stream_ended`, in order, then lets every
    /// later frame through to `out`.
    pub fn go_live(&self, mut out: Box<dyn FrameOut>, stream_ended: Instant) -> Resent {
        let mut state = self.lock();
        let since = stream_ended
            .checked_sub(state.window)
            .unwrap_or(stream_ended);
        let mut resent = Resent::default();
        for kept in std::mem::take(&mut state.kept) {
            if kept.at < since {
                resent.older += 1;
                continue;
            }
            // Errors as the gate counts them: the network may drop a frame.
            let _ = out.send(&kept.frame);
            resent.frames += 1;
            resent.bytes += kept.frame.len() as u64;
        }
        state.bytes = 0;
        state.live = Some(out);
        resent
    }
}

impl FrameOut for CutoverOutput {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        {
            let mut state = self.lock();
            if let Some(live) = state.live.as_mut() {
                return live.send(frame);
            }
        }
        self.keep(frame);
        Ok(())
    }
}

/// The backup's event source: the primary's stream while it lasts, then,
/// after winning the arbiter, live values.
pub struct BackupSource {
    replay: Replay<StreamSource>,
    live: Option<Live<FailoverSink>>,
    membership: Option<Membership>,
    promote: Promote,
    promoted: Option<(u64, u64)>,
    status: Option<crate::status::StatusFile>,
}

impl BackupSource {
    /// Replays `replay`; fails over through `membership` (none: the backup
    /// stops when the primary is lost).
    pub fn new(
        replay: Replay<StreamSource>,
        membership: Option<Membership>,
        promote: Promote,
    ) -> Self {
        Self {
            replay,
            live: None,
            membership,
            promote,
            promoted: None,
            status: None,
        }
    }

    /// Publishes this backup's status in `file` (see `lockstep status`).
    pub fn with_status(mut self, file: crate::status::StatusFile) -> Self {
        self.status = Some(file);
        self
    }

    fn publish(&mut self, exit: u64) {
        let Some(status) = self.status.as_mut() else {
            return;
        };
        let replay = &self.replay;
        let promoted = self.promoted;
        let generation = self.membership.as_ref().map_or(0, |m| m.generation);
        status.maybe_write(|figures| {
            let stats = replay.stats();
            let source = replay.source();
            let lag = source.lag();
            figures.role = if promoted.is_some() { "live" } else { "backup" };
            figures.protected = false;
            figures.generation = promoted.map_or(generation, |(_, g)| g);
            figures.log_position = stats.entries;
            figures.lag_exits = source.newest_exit().saturating_sub(exit);
            figures.max_lag_exits = lag.max_exits;
            figures.lag_entries = source.lag_entries();
            figures.max_lag_entries = lag.max_entries;
            figures.entry_wait_us = Some(lag.queue_us.clone());
            let role = match promoted {
                Some((at, generation)) => format!("live (backup promoted at exit {at}, generation {generation})"),
                None => "backup (following the primary)".to_string(),
            };
            format!(
                "role: {role}\npid: {}\ngeneration: {}\nexit: {exit}\nnewest exit received: {}\nlag (exits): {}\nlag (entries): {}\nentries replayed: {}\nevents replayed: {}\ndigests matched: {}\nmost exits behind: {}\nentry wait p50/p99 us: {}/{}\n",
                std::process::id(),
                promoted.map_or(generation, |(_, g)| g),
                source.newest_exit(),
                source.newest_exit().saturating_sub(exit),
                source.lag_entries(),
                stats.entries,
                stats.events,
                stats.digests_matched,
                lag.max_exits,
                lag.queue_us.value_at_quantile(0.5),
                lag.queue_us.value_at_quantile(0.99),
            )
        });
    }

    /// The replay (statistics, lag).
    pub fn replay(&self) -> &Replay<StreamSource> {
        &self.replay
    }

    /// The exit at which this replica went live, and its generation.
    pub fn promoted(&self) -> Option<(u64, u64)> {
        self.promoted
    }

    fn go_live(&mut self, exit: u64, cause: VmmError) -> Result<(), VmmError> {
        let Some(membership) = &self.membership else {
            return Err(cause);
        };
        let stream_ended = Instant::now();
        let why = format!("the primary is gone (stream ended at exit {exit}: {cause})");
        if let Some(status) = &self.status {
            status.board().update(|f| f.peer_silences += 1);
        }
        let generation = membership.go_live_alone(&why)?;
        if let Some(status) = &self.status {
            status.board().update(|f| f.failovers += 1);
        }
        let clock_ns = self.replay.stats().last_clock_ns;
        self.live = Some((self.promote)(GoLive {
            clock_ns,
            generation,
            stream_ended,
        })?);
        self.promoted = Some((exit, generation));
        tracing::info!(
            "lockstep backup: primary lost at exit {exit}; won generation {generation} at the arbiter: live as primary"
        );
        Ok(())
    }

    fn with<T>(
        &mut self,
        exit: u64,
        mut call: impl FnMut(&mut dyn EventSource) -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        self.publish(exit);
        if let Some(live) = self.live.as_mut() {
            return call(live);
        }
        match call(&mut self.replay) {
            Err(cause @ VmmError::LogIncomplete { .. }) => {
                self.go_live(exit, cause)?;
                match self.live.as_mut() {
                    Some(live) => call(live),
                    None => Err(VmmError::Halted("promotion produced no live source".into())),
                }
            }
            other => other,
        }
    }
}

impl EventSource for BackupSource {
    fn clock(&mut self, exit: u64) -> Result<u64, VmmError> {
        self.with(exit, |source| source.clock(exit))
    }

    fn entropy(&mut self, exit: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        self.with(exit, |source| source.entropy(exit, buf))
    }

    fn input(&mut self, exit: u64, buf: &mut [u8]) -> Result<Option<usize>, VmmError> {
        self.with(exit, |source| source.input(exit, buf))
    }

    fn net_rx(
        &mut self,
        exit: u64,
        max_frames: usize,
        wait: Duration,
    ) -> Result<Vec<Vec<u8>>, VmmError> {
        self.with(exit, |source| source.net_rx(exit, max_frames, wait))
    }

    fn blk_done(
        &mut self,
        exit: u64,
        disk: &mut dyn vmm::block::DiskCompleter,
    ) -> Result<Vec<vmm::block::Completion>, VmmError> {
        self.with(exit, |source| source.blk_done(exit, disk))
    }

    fn disk_identity(&mut self, capacity: u64, hash: u64, shared: bool) -> Result<(), VmmError> {
        self.with(0, |source| source.disk_identity(capacity, hash, shared))
    }

    fn log_position(&self) -> u64 {
        match &self.live {
            Some(live) => live.log_position(),
            None => self.replay.log_position(),
        }
    }

    fn position(&self) -> vmm::EventPosition {
        match &self.live {
            Some(live) => live.position(),
            None => self.replay.position(),
        }
    }

    fn sync(&mut self, exit: u64) -> Result<(), VmmError> {
        self.with(exit, |source| source.sync(exit))
    }

    fn digest(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        self.with(exit, |source| source.digest(exit, digest))
    }

    fn end(&mut self, exit: u64, code: u64) -> Result<(), VmmError> {
        self.with(exit, |source| source.end(exit, code))
    }

    fn stop_requested(&mut self, exit: u64) -> Result<bool, VmmError> {
        self.with(exit, |source| source.stop_requested(exit))
    }

    fn stopped(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        self.with(exit, |source| source.stopped(exit, digest))
    }
}

/// The freshness of a link's acks (see the module docs, *acks have a
/// lease*). Shared by the link's sender thread (which dates each ack), the
/// vCPU thread (which marks pushes at every flush) and the primary's
/// [`OutputGuard`].
pub struct Lease {
    base: Instant,
    length: Duration,
    /// `(pushed, at)`: every entry with a larger channel seq was pushed
    /// after `at`.
    marks: Mutex<VecDeque<(u64, Instant)>>,
    /// Nanoseconds after `base` until which output may leave.
    until_ns: std::sync::atomic::AtomicU64,
    stale: Mutex<Option<String>>,
    /// `stale` is set (read on every frame and ack without the lock).
    is_stale: std::sync::atomic::AtomicBool,
    /// The guard following this lease (set once, read on every ack).
    output: std::sync::OnceLock<std::sync::Weak<GuardInner>>,
}

impl Lease {
    /// A lease of `length` (the peer timeout) for a link starting now.
    pub fn new(length: Duration) -> Self {
        let base = Instant::now();
        Self {
            base,
            length,
            marks: Mutex::new(VecDeque::from([(0, base)])),
            until_ns: std::sync::atomic::AtomicU64::new(0),
            stale: Mutex::new(None),
            is_stale: std::sync::atomic::AtomicBool::new(false),
            output: std::sync::OnceLock::new(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The primary had pushed entries up to channel seq `pushed` by now.
    pub fn mark(&self, pushed: u64) {
        self.mark_at(pushed, Instant::now());
    }

    /// The primary had pushed entries up to channel seq `pushed` by `at`
    /// (and no further: later entries are pushed after `at`).
    pub fn mark_at(&self, pushed: u64, at: Instant) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        match marks.back_mut() {
            // Nothing pushed since: the later instant is the better bound.
            Some(last) if last.0 == pushed => last.1 = last.1.max(at),
            Some(last) if last.0 > pushed => {}
            _ => marks.push_back((pushed, at)),
        }
    }

    /// An ack covering channel seq `seq` arrived: true if it is fresh (it
    /// may release output; the lease is renewed), false if stale (nothing
    /// may be released on it; the link is lost for good).
    pub fn acknowledged(&self, seq: u64) -> bool {
        if self.is_stale.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let pushed_after = {
            let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
            while marks.len() >= 2 && marks[1].0 < seq {
                marks.pop_front();
            }
            marks.front().map_or(self.base, |&(_, at)| at)
        };
        let age = pushed_after.elapsed();
        if age >= self.length {
            *self.stale.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                "the ack for channel seq {seq} came {} ms after the entry was pushed, beyond the {} ms peer timeout: the backup may have gone live",
                age.as_millis(),
                self.length.as_millis()
            ));
            self.is_stale
                .store(true, std::sync::atomic::Ordering::Release);
            return false;
        }
        // SeqCst: see `renewed`.
        self.until_ns.fetch_max(
            self.nanos(pushed_after + self.length),
            std::sync::atomic::Ordering::SeqCst,
        );
        true
    }

    /// Why the acks are no longer trusted, once one came too late.
    pub fn stale(&self) -> Option<String> {
        if !self.is_stale.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.stale.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether output may leave now.
    pub fn running(&self) -> bool {
        !self.is_stale.load(std::sync::atomic::Ordering::Acquire)
            && self.nanos(Instant::now()) < self.until_ns.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sends what the guard withheld while the lease had lapsed, now that a
    /// fresh ack renewed it (called by the link after releasing).
    pub fn renewed(&self) {
        // SeqCst pairs with the guard's `send`: it raises `pending` before
        // it reads the lease, we extended the lease before reading
        // `pending`, so a frame withheld on the old lease is seen here.
        if let Some(guard) = self.output.get().and_then(std::sync::Weak::upgrade)
            && guard.pending.load(std::sync::atomic::Ordering::SeqCst)
            && self.running()
        {
            guard.flush_if_running();
        }
    }
}

/// Most frames the guard withholds (the oldest are dropped beyond: TCP
/// recovers them, and a primary that lost never sends them anyway).
pub const GUARD_MAX_FRAMES: usize = 4096;

/// What decides whether a frame may leave, and the frames withheld: held
/// only for these few checks and moves, never across a TAP write.
struct GuardState {
    lease: Option<Arc<Lease>>,
    alone: bool,
    withheld: VecDeque<Vec<u8>>,
    withheld_total: u64,
}

impl GuardState {
    fn may_send(&self) -> bool {
        self.alone || self.lease.as_ref().is_some_and(|lease| lease.running())
    }
}

/// The guard's two locks, always taken in this order: `out` (the TAP
/// writer: one write at a time, and frames in order) and then, briefly,
/// `state`. On the data path only the gate's one writer takes `out`, so it
/// is uncontended; the sender thread's ack hook takes neither unless frames
/// were withheld (see [`Lease::renewed`]).
struct GuardInner {
    out: Mutex<Box<dyn FrameOut>>,
    state: Mutex<GuardState>,
    /// Frames are withheld (read without a lock on every ack).
    pending: std::sync::atomic::AtomicBool,
}

impl GuardInner {
    fn lock_out(&self) -> std::sync::MutexGuard<'_, Box<dyn FrameOut>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the withheld frames if output may leave now (the caller holds
    /// `out` and writes them, in order, before anything newer).
    fn take_withheld(
        state: &mut GuardState,
        pending: &std::sync::atomic::AtomicBool,
    ) -> VecDeque<Vec<u8>> {
        pending.store(false, std::sync::atomic::Ordering::SeqCst);
        std::mem::take(&mut state.withheld)
    }

    /// Sends what was withheld, if output may leave now.
    fn flush_if_running(&self) {
        let mut out = self.lock_out();
        let frames = {
            let mut state = self.lock_state();
            if !state.may_send() {
                return;
            }
            Self::take_withheld(&mut state, &self.pending)
        };
        for frame in frames {
            let _ = out.send(&frame);
        }
    }
}

/// The primary's output on its way to the TAP: sends only while the link's
/// [`Lease`] runs or after the primary won the right to run alone.
///
/// ```text
///  gate writer ─send(f)─▶ lock out ─▶ lock state, pending = true, may send?
///                 yes ─▶ take withheld, pending = false, unlock state, write withheld.., f
///                 no  ─▶ withhold f (pending stays true)
///  ack hook ─▶ Lease::renewed ─▶ pending? ─no─▶ return (no lock)
///                                  └─yes─▶ lock out, lock state, take, write
/// ```
#[derive(Clone)]
pub struct OutputGuard(Arc<GuardInner>);

impl OutputGuard {
    /// Guards `out`; nothing leaves until [`OutputGuard::follow`] or
    /// [`OutputGuard::alone`].
    pub fn new(out: Box<dyn FrameOut>) -> Self {
        Self(Arc::new(GuardInner {
            out: Mutex::new(out),
            state: Mutex::new(GuardState {
                lease: None,
                alone: false,
                withheld: VecDeque::new(),
                withheld_total: 0,
            }),
            pending: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Output follows `lease` (a link's; a backup is protecting us).
    pub fn follow(&self, lease: Arc<Lease>) {
        // A lease belongs to one link, followed by one guard.
        let _ = lease.output.set(Arc::downgrade(&self.0));
        let mut state = self.0.lock_state();
        state.lease = Some(lease);
        state.alone = false;
    }

    /// This primary won the right to run alone: everything leaves.
    pub fn alone(&self) {
        self.0.lock_state().alone = true;
        self.0.flush_if_running();
    }

    /// Frames withheld so far because the lease had lapsed.
    pub fn withheld(&self) -> u64 {
        self.0.lock_state().withheld_total
    }
}

impl FrameOut for OutputGuard {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let mut out = self.0.lock_out();
        let earlier = {
            let mut state = self.0.lock_state();
            // Raised before the lease is read (SeqCst, see
            // `Lease::renewed`): an ack renewing the lease after our check
            // then sees it and sends what we withhold.
            self.0
                .pending
                .store(true, std::sync::atomic::Ordering::SeqCst);
            if !state.may_send() {
                state.withheld_total += 1;
                state.withheld.push_back(frame.to_vec());
                if state.withheld.len() > GUARD_MAX_FRAMES {
                    state.withheld.pop_front();
                }
                return Ok(());
            }
            GuardInner::take_withheld(&mut state, &self.0.pending)
        };
        // Only the writer lock is held across the writes.
        for withheld in earlier {
            let _ = out.send(&withheld);
        }
        out.send(frame)
    }
}

/// The primary's log sink: streams to the backup while it acknowledges,
/// and on its loss holds output until the arbiter lets this replica run
/// alone.
pub struct FailoverSink {
    link: Option<PrimaryLink>,
    gate: Arc<OutputGate>,
    membership: Option<Membership>,
    timeout: Duration,
    entries: u64,
    bytes: u64,
    /// The oldest flushed position not yet acknowledged, the acknowledged
    /// position when the clock started, and since when: the clock restarts
    /// whenever the acks advance (a slow backup that acks is not dead).
    unacked_since: Option<(u64, u64, Instant)>,
    unprotected: Option<u64>,
    status: Option<crate::status::StatusFile>,
    /// Acks and the last acknowledged position, kept when the link goes.
    acks: u64,
    acked: u64,
    /// The channel's figures, once the link has finished.
    metrics: Option<channel::endpoint::Metrics>,
    transport: &'static str,
    /// Where new backups join, if this primary accepts them.
    joins: Option<Arc<crate::join::JoinPort>>,
    /// Where its events are counted (its status file's, or a promoted
    /// backup's).
    board: Option<crate::status::Board>,
    /// The primary's output guard, if its frames pass one.
    guard: Option<OutputGuard>,
}

impl FailoverSink {
    /// Streams through `link`, whose acks release `gate`'s frames; without
    /// `membership` the loss of the backup stops the primary (fail-stop).
    /// `timeout`: acks that do not advance at all for this long while a
    /// flushed position is outstanding count as a lost backup even if
    /// heartbeats still arrive; acks that advance, however slowly, restart
    /// the clock (a slow backup slows the primary through the ring's
    /// back-pressure, it is never declared dead).
    pub fn new(
        link: PrimaryLink,
        gate: Arc<OutputGate>,
        membership: Option<Membership>,
        timeout: Duration,
    ) -> Self {
        Self {
            transport: link.transport(),
            link: Some(link),
            ..Self::unlinked(gate, membership, timeout, None)
        }
    }

    /// The sink of a replica that went live alone in `membership`'s
    /// generation (a promoted backup): no link, output open, until a new
    /// backup joins through the port given with [`FailoverSink::with_joins`].
    pub fn alone(gate: Arc<OutputGate>, membership: Membership, timeout: Duration) -> Self {
        let generation = membership.generation;
        Self::unlinked(gate, Some(membership), timeout, Some(generation))
    }

    fn unlinked(
        gate: Arc<OutputGate>,
        membership: Option<Membership>,
        timeout: Duration,
        unprotected: Option<u64>,
    ) -> Self {
        Self {
            link: None,
            gate,
            membership,
            timeout,
            entries: 0,
            bytes: 0,
            unacked_since: None,
            unprotected,
            status: None,
            acks: 0,
            acked: 0,
            metrics: None,
            transport: "none",
            joins: None,
            board: None,
            guard: None,
        }
    }

    /// Counts this sink's events (silences, failovers, re-protections) on
    /// `board` (a promoted backup's, whose status file it keeps).
    pub fn with_board(mut self, board: crate::status::Board) -> Self {
        self.board = Some(board);
        self
    }

    fn count(&self, event: impl FnOnce(&mut crate::status::Figures)) {
        if let Some(board) = &self.board {
            board.update(event);
        }
    }

    /// The primary's frames pass `guard`: they leave only while the link's
    /// acks are fresh, or once this primary won the right to run alone.
    pub fn with_guard(mut self, guard: OutputGuard) -> Self {
        match (&self.link, self.unprotected) {
            (Some(link), None) => guard.follow(link.lease()),
            _ => guard.alone(),
        }
        self.guard = Some(guard);
        self
    }

    /// Lets new backups join through `port` while this primary runs alone.
    pub fn with_joins(mut self, port: Arc<crate::join::JoinPort>) -> Self {
        if let Some(generation) = self.unprotected {
            port.set_alone(Some(generation));
        }
        self.joins = Some(port);
        self
    }

    /// A join finished (or failed): take the new backup on.
    fn on_join(&mut self, event: crate::join::JoinEvent) -> Result<(), VmmError> {
        match event {
            crate::join::JoinEvent::Ready {
                mut link,
                base,
                generation,
                buffered,
            } => {
                if let Some(membership) = self.membership.as_mut() {
                    membership.generation = generation;
                }
                let mut failure = None;
                for (_, entry) in buffered.into_iter().filter(|(seq, _)| *seq > base) {
                    if let Err(why) = link.push(entry) {
                        failure = Some(why);
                        break;
                    }
                }
                self.transport = link.transport();
                if let Some(guard) = &self.guard {
                    guard.follow(link.lease());
                }
                self.link = Some(link);
                self.unprotected = None;
                self.unacked_since = None;
                self.count(|f| f.reprotections += 1);
                tracing::info!(
                    "lockstep primary: a new backup joined at log position {base}: protected again in generation {generation}"
                );
                if let Some(why) = failure {
                    self.backup_lost(format!("the joined backup's link failed ({why})"))?;
                }
                Ok(())
            }
            crate::join::JoinEvent::Failed { why, generation } => {
                if let Some(membership) = self.membership.as_mut() {
                    membership.generation = generation;
                }
                self.unprotected = None;
                self.backup_lost(format!(
                    "the backup joining in generation {generation} failed ({why})"
                ))
            }
        }
    }

    /// Publishes this primary's status in `file` (see `lockstep status`).
    pub fn with_status(mut self, file: crate::status::StatusFile) -> Self {
        self.board = Some(file.board().clone());
        self.status = Some(file);
        self
    }

    fn publish(&mut self) {
        let channel = self.link.as_ref().and_then(PrimaryLink::metrics);
        let (acks, acked) = (self.acks(), self.acked());
        let Some(status) = self.status.as_mut() else {
            return;
        };
        let gate = &self.gate;
        let (entries, bytes, unprotected) = (self.entries, self.bytes, self.unprotected);
        let generation = self.membership.as_ref().map_or(0, |m| m.generation);
        let linked = self.link.is_some();
        let transport = self.transport;
        status.maybe_write(|figures| {
            let gate = gate.stats();
            figures.role = "primary";
            figures.protected = unprotected.is_none() && linked;
            figures.generation = unprotected.unwrap_or(generation);
            figures.log_position = entries;
            figures.acked = acked;
            figures.log_bytes = bytes;
            figures.acks = acks;
            figures.held_frames = gate.held as u64;
            figures.frames_released = gate.released;
            figures.hold_ns = Some(gate.hold_ns.clone());
            if let Some(m) = channel {
                figures.batches = m.batches;
                figures.ring_stalls = m.ring_full_stalls;
                figures.transport_stalls = m.transport_stalls;
                figures.heartbeats_sent = m.heartbeats_sent;
                figures.heartbeats_received = m.heartbeats_received;
                figures.ack_rtt_ns = Some(m.ack_rtt_ns);
            }
            format!(
                "role: primary\npid: {}\ngeneration: {}\nprotection: {}\ntransport: {transport}\nlog position: {entries}\nlog bytes: {bytes}\nacknowledged: {acked}\nentries in flight: {}\nacks received: {acks}\nheld outputs: {}\nmost held: {}\nframes released: {}\nhold p50/p99/p99.9 us: {}/{}/{}\n",
                std::process::id(),
                unprotected.unwrap_or(generation),
                match (unprotected, linked) {
                    (Some(_), _) => "UNPROTECTED (backup lost; won the arbiter)",
                    (None, true) => "protected (backup following)",
                    (None, false) => "backup lost, waiting for the arbiter",
                },
                entries.saturating_sub(acked),
                gate.held,
                gate.max_held,
                gate.released,
                gate.hold_ns.value_at_quantile(0.5) / 1000,
                gate.hold_ns.value_at_quantile(0.99) / 1000,
                gate.hold_ns.value_at_quantile(0.999) / 1000,
            )
        });
    }

    /// Entries produced.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes of log entries produced (what the link carries).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The generation this primary runs unprotected in, if its backup was lost.
    pub fn unprotected(&self) -> Option<u64> {
        self.unprotected
    }

    /// Acks received that advanced the watermark.
    pub fn acks(&self) -> u64 {
        self.link.as_ref().map_or(self.acks, PrimaryLink::acks)
    }

    /// Highest log position the backup acknowledged.
    pub fn acked(&self) -> u64 {
        self.link.as_ref().map_or(self.acked, PrimaryLink::acked)
    }

    /// The transport carrying the log.
    pub fn transport(&self) -> &'static str {
        self.transport
    }

    /// The channel's figures (ack round trips, batches), once finished.
    pub fn metrics(&self) -> Option<&channel::endpoint::Metrics> {
        self.metrics.as_ref()
    }

    /// Finishes the stream: sends what is queued, waits up to 5 s for the
    /// last acks, and closes the link (if still up). Returns whether every
    /// entry was acknowledged.
    pub fn finish(&mut self) -> Result<bool, VmmError> {
        let Some(link) = self.link.take() else {
            return Ok(false);
        };
        let end = link.finish();
        self.acks = end.acks;
        self.acked = end.acked;
        match end.metrics {
            Ok(metrics) => self.metrics = Some(metrics),
            Err(reason) => tracing::warn!(
                "lockstep primary: the link ended before every entry was acknowledged: {reason}"
            ),
        }
        Ok(self.acked >= self.entries)
    }

    fn take_link(&mut self) {
        if let Some(link) = self.link.take() {
            self.acks = link.acks();
            self.acked = link.acked();
            link.abandon();
        }
    }

    fn backup_lost(&mut self, why: String) -> Result<(), VmmError> {
        self.take_link(); // closes our side
        let Some(membership) = &self.membership else {
            return Err(VmmError::Halted(format!(
                "{why}, and no arbiter is configured to let the primary run alone"
            )));
        };
        tracing::warn!("lockstep primary: {why}; holding output until the arbiter decides");
        self.count(|f| f.peer_silences += 1);
        let generation = membership.go_live_alone(&why)?;
        self.count(|f| f.failovers += 1);
        self.unprotected = Some(generation);
        if let Some(guard) = &self.guard {
            guard.alone();
        }
        self.gate.open_fully();
        if let Some(port) = &self.joins {
            port.set_alone(Some(generation));
        }
        tracing::info!(
            "lockstep primary: won generation {generation} at the arbiter: running unprotected (no backup)"
        );
        Ok(())
    }

    fn check(&mut self) -> Result<bool, VmmError> {
        let Some(link) = self.link.as_mut() else {
            return Ok(false);
        };
        if let Some(why) = link.lost() {
            self.backup_lost(format!("backup lost ({why})"))?;
            return Ok(false);
        }
        if let Some((position, acked_then, since)) = self.unacked_since {
            let acked = link.acked();
            if acked >= position {
                self.unacked_since = None;
            } else if acked > acked_then {
                // Slow, but acknowledging: not dead. Restart the clock.
                self.unacked_since = Some((position, acked, Instant::now()));
            } else if since.elapsed() > self.timeout {
                self.backup_lost(format!(
                    "backup silent: no acknowledgement for {} ms (log position {position} outstanding, {acked} acknowledged)",
                    since.elapsed().as_millis()
                ))?;
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl EventSink for FailoverSink {
    fn append(
        &mut self,
        kind: EntryKind,
        flags: u16,
        exit: u64,
        payload: &[u8],
    ) -> Result<(), VmmError> {
        self.entries += 1;
        let capacity = channel::log::ENTRY_HEADER_LEN + payload.len() + 8;
        let mut entry = match self.link.as_mut() {
            Some(link) => link.buffer(capacity),
            None => Vec::with_capacity(capacity),
        };
        channel::log::encode_entry(kind, flags, self.entries, exit, payload, &mut entry);
        self.bytes += entry.len() as u64;
        if let Some(event) = self
            .joins
            .as_ref()
            .and_then(|port| port.observe(self.entries, &entry))
        {
            self.on_join(event)?;
        }
        if !self.check()? {
            return Ok(());
        }
        let result = match self.link.as_mut() {
            Some(link) => link.push(entry),
            None => Ok(()),
        };
        if let Err(why) = result {
            self.backup_lost(format!("the link to the backup failed ({why})"))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), VmmError> {
        self.publish();
        if !self.check()? {
            return Ok(());
        }
        // The sender thread sends whatever the ring holds as soon as it runs
        // dry; wake it if it naps. Start the ack clock for this position.
        if let Some(link) = &self.link {
            link.wake();
        }
        if self.unacked_since.is_none() && self.acked() < self.entries {
            self.unacked_since = Some((self.entries, self.acked(), Instant::now()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sent(Arc<Mutex<Vec<Vec<u8>>>>);

    impl FrameOut for Sent {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().expect("lock").push(frame.to_vec());
            Ok(())
        }
    }

    #[test]
    fn replay_frames_are_kept_and_resent_on_going_live_then_passed_through() {
        let mut output = CutoverOutput::new(Duration::from_secs(10));
        output.send(&[1]).expect("kept");
        output.send(&[2, 2]).expect("kept");
        let sent = Sent::default();
        let resent = output.go_live(Box::new(sent.clone()), Instant::now());
        assert_eq!(
            resent,
            Resent {
                frames: 2,
                bytes: 3,
                older: 0
            }
        );
        output.send(&[3]).expect("live");
        assert_eq!(
            *sent.0.lock().expect("lock"),
            vec![vec![1], vec![2, 2], vec![3]]
        );
        assert_eq!(output.produced(), 2);
    }

    #[test]
    fn frames_older_than_the_window_are_not_resent() {
        let mut output = CutoverOutput::new(Duration::from_millis(30));
        output.send(&[1]).expect("kept");
        std::thread::sleep(Duration::from_millis(60));
        output.send(&[2]).expect("kept");
        let sent = Sent::default();
        let resent = output.go_live(Box::new(sent.clone()), Instant::now());
        assert_eq!(resent.frames, 1);
        assert_eq!(*sent.0.lock().expect("lock"), vec![vec![2]]);
        // The window ends when the stream ended, not when the arbiter
        // answered: a frame kept before `stream_ended - window` stays out.
        let mut output = CutoverOutput::new(Duration::from_millis(30));
        output.send(&[1]).expect("kept");
        std::thread::sleep(Duration::from_millis(60));
        let resent = output.go_live(Box::new(Sent::default()), Instant::now());
        assert_eq!((resent.frames, resent.older), (0, 1));
    }

    #[test]
    fn an_ack_releases_only_within_the_lease_of_its_entry() {
        let lease = Arc::new(Lease::new(Duration::from_millis(40)));
        let sent = Sent::default();
        let mut guard = OutputGuard::new(Box::new(sent.clone()));
        guard.follow(Arc::clone(&lease));
        // No ack yet: withheld.
        guard.send(&[1]).expect("withheld");
        assert!(sent.0.lock().expect("lock").is_empty());
        lease.mark(3);
        assert!(lease.acknowledged(4), "a fresh ack");
        lease.renewed();
        assert_eq!(*sent.0.lock().expect("lock"), vec![vec![1]]);
        guard.send(&[2]).expect("sent");
        assert_eq!(sent.0.lock().expect("lock").len(), 2);
        // The lease lapses (a frozen primary): frames are withheld ...
        std::thread::sleep(Duration::from_millis(60));
        guard.send(&[3]).expect("withheld");
        assert_eq!(sent.0.lock().expect("lock").len(), 2);
        // ... and an ack for an entry pushed before the freeze is stale:
        // it releases nothing and the link is lost for good.
        assert!(!lease.acknowledged(4 + 1));
        assert!(
            lease
                .stale()
                .is_some_and(|why| why.contains("peer timeout"))
        );
        lease.mark(9);
        assert!(!lease.acknowledged(10), "stale stays stale");
        assert_eq!(sent.0.lock().expect("lock").len(), 2);
        // Winning the arbiter lets everything out.
        guard.alone();
        assert_eq!(sent.0.lock().expect("lock").len(), 3);
        assert_eq!(guard.withheld(), 2);
    }

    /// An output whose writes block until the test lets them through.
    struct Blocking {
        entered: std::sync::mpsc::Sender<()>,
        go: std::sync::mpsc::Receiver<()>,
    }

    impl FrameOut for Blocking {
        fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
            let _ = self.entered.send(());
            let _ = self.go.recv();
            Ok(())
        }
    }

    /// The ack path (`Lease::renewed`, on the sender thread) never waits
    /// behind a TAP write in progress: the guard used to hold its one lock
    /// across the write, and every ack took that lock.
    #[test]
    fn an_ack_never_waits_behind_a_tap_write() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel();
        let guard = OutputGuard::new(Box::new(Blocking {
            entered: entered_tx,
            go: go_rx,
        }));
        let lease = Arc::new(Lease::new(Duration::from_secs(30)));
        guard.follow(Arc::clone(&lease));
        lease.mark(3);
        assert!(lease.acknowledged(4));
        let mut writer = guard.clone();
        let write = std::thread::spawn(move || writer.send(&[1]));
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the write started");
        // The write is in progress (blocked): an ack arrives.
        let (done_tx, done) = std::sync::mpsc::channel();
        let acker = {
            let lease = Arc::clone(&lease);
            std::thread::spawn(move || {
                lease.mark(5);
                assert!(lease.acknowledged(6));
                lease.renewed();
                let _ = done_tx.send(());
            })
        };
        let returned = done.recv_timeout(Duration::from_secs(5));
        go.send(()).expect("let the write finish");
        write.join().expect("writer").expect("sent");
        acker.join().expect("acker");
        assert!(
            returned.is_ok(),
            "the ack waited for the TAP write to finish"
        );
    }

    #[test]
    fn at_most_the_bounded_number_of_frames_is_kept() {
        let mut output = CutoverOutput::new(Duration::from_secs(10));
        for i in 0..CUTOVER_MAX_FRAMES + 10 {
            output.send(&i.to_le_bytes()).expect("kept");
        }
        let sent = Sent::default();
        let resent = output.go_live(Box::new(sent.clone()), Instant::now());
        assert_eq!(resent.frames, CUTOVER_MAX_FRAMES as u64);
        // The oldest went first.
        assert_eq!(sent.0.lock().expect("lock")[0], 10usize.to_le_bytes());
    }
}
