//! The two ends of the channel as state machines over a [`Transport`]:
//! [`LogSender`] (primary) batches entries, tracks acks and measures their
//! round trip; [`LogReceiver`] (backup) validates batches, delivers entries in
//! order and acks them by policy. Both send heartbeats when idle and report a
//! silent peer.
//!
//! Neither blocks in `poll`: the owner calls it in its loop (spinning,
//! adaptively or sleeping, per [`tuning::PollMode`]) and, when it found
//! nothing, may call `wait`, which sleeps until the peer may have sent
//! something (see [`crate::transport::Transport::wait`]) or a timer of the
//! end's own (heartbeat, delayed ack) is due.
//!
//! ```text
//!  primary                                   backup
//!  try_push(e1..e5) ─┐
//!  poll: seal ───────┴─ Batch{seq 1, n 5} ──▶ poll: crc, gen, seq == 1? deliver 1..5
//!                                             5 >= every_entries or queue drained
//!  poll: acked = 5 ◀───────── Ack{seq 5} ──── or oldest unacked >= max_delay_us
//!  ack_rtt = now - send time of batch 1..5
//!  (idle >= heartbeat) ───── Heartbeat ─────▶ last_heard = now   (and both ways)
//! ```

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use thiserror::Error;
use tuning::{AckPolicy, BatchPolicy, Liveness};

use crate::protocol::{
    FRAME_HEADER_LEN, FrameError, FrameKind, FrameOpener, FrameSealer, Role, batch_entries,
    decode_frame, decode_frame_prehashed, encode_control, entry_space, put_entry,
};
use crate::transport::{Transport, TransportError};

/// Frames handled per `poll` at most, so a peer that never lets the queue
/// drain cannot keep `poll` from returning (and from checking liveness).
const MAX_FRAMES_PER_POLL: usize = 64;

/// Channel failures: every one stops the channel (fail-stop).
#[derive(Debug, Error)]
pub enum ChannelError {
    /// The transport failed or the peer closed it.
    #[error("transport failed")]
    Transport(#[from] TransportError),
    /// A frame was refused.
    #[error("frame refused")]
    Frame(#[from] FrameError),
    /// Nothing heard from the peer for longer than the timeout.
    #[error(
        "peer silent: last word heard {since_last_word:?} ago (timeout {timeout:?}); last sequence number {last_seq}"
    )]
    PeerSilent {
        /// Time since the last frame of any kind arrived.
        since_last_word: Duration,
        /// The configured timeout.
        timeout: Duration,
        /// Sender: last acked seq; receiver: last received seq.
        last_seq: u64,
    },
    /// An entry larger than a batch can hold.
    #[error("entry of {len} bytes exceeds the {max}-byte limit of this transport")]
    EntryTooLarge {
        /// Entry length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A frame this end never expects (an ack sent to the backup, a batch to the primary).
    #[error("unexpected {kind:?} frame at sequence number {seq}")]
    UnexpectedFrame {
        /// Its kind.
        kind: FrameKind,
        /// Its seq field.
        seq: u64,
    },
    /// Histogram setup failed.
    #[error("metrics setup failed: {0}")]
    Metrics(String),
}

/// Counters and histograms of one end. Owned by the end's thread: no atomics
/// on the hot path; read them between polls or after the run.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Entries pushed (sender) or delivered (receiver).
    pub entries: u64,
    /// Entry bytes, without framing.
    pub bytes: u64,
    /// Batches sent or received.
    pub batches: u64,
    /// Acks received (sender) or sent (receiver).
    pub acks: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Heartbeats received.
    pub heartbeats_received: u64,
    /// Times the transport had no room (sender back-pressure).
    pub transport_stalls: u64,
    /// Times the vCPU found the ring full (counted by its owner, see
    /// [`Metrics::note_ring_full`]).
    pub ring_full_stalls: u64,
    /// Sender: ns from sending a batch to the ack that covers it.
    pub ack_rtt_ns: Histogram<u64>,
    /// Sender: entries sent but not yet acked, sampled at each ack.
    /// Receiver: ns from receiving a batch to sending the ack that covers it.
    pub ack_lag: Histogram<u64>,
    /// Sender: ns from a batch's first entry to its seal (batching delay).
    pub batch_fill_ns: Histogram<u64>,
    /// Sender: ns from the producer ringing the doorbell to the sleeping
    /// sender running again (only wakes that rang; see
    /// [`crate::pipeline`]).
    pub wake_ns: Histogram<u64>,
    /// Sender: ns spent in the ack hook (the output gate's release, its
    /// TAP writes included) per ack that advanced the watermark.
    pub ack_hook_ns: Histogram<u64>,
    /// Sender: [`Metrics::ack_rtt_ns`] of the batches during whose round
    /// trip the sender entered [`LogSender::wait`] (to sleep; a wait that
    /// found something readable returns at once and counts too).
    pub ack_rtt_slept_ns: Histogram<u64>,
    /// Sender: [`Metrics::ack_rtt_ns`] of the batches whose ack found the
    /// sender awake (it polled throughout).
    pub ack_rtt_awake_ns: Histogram<u64>,
    /// Receiver: batches that arrived after the receiver had entered
    /// [`LogReceiver::wait`] since the batch before (an upper bound on the
    /// batches that paid a wake-up: a wait that found the socket or ring
    /// readable returns at once and counts too).
    pub batches_after_sleep: u64,
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Result<Self, ChannelError> {
        let h = || {
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .map_err(|e| ChannelError::Metrics(e.to_string()))
        };
        Ok(Self {
            entries: 0,
            bytes: 0,
            batches: 0,
            acks: 0,
            heartbeats_sent: 0,
            heartbeats_received: 0,
            transport_stalls: 0,
            ring_full_stalls: 0,
            ack_rtt_ns: h()?,
            ack_lag: h()?,
            batch_fill_ns: h()?,
            wake_ns: h()?,
            ack_hook_ns: h()?,
            ack_rtt_slept_ns: h()?,
            ack_rtt_awake_ns: h()?,
            batches_after_sleep: 0,
        })
    }

    /// Records that the producer found the vCPU ring full.
    pub fn note_ring_full(&mut self) {
        self.ring_full_stalls += 1;
    }
}

fn silent(
    last_heard: Instant,
    now: Instant,
    liveness: &Liveness,
    last_seq: u64,
) -> Result<(), ChannelError> {
    let since = now.saturating_duration_since(last_heard);
    if since > liveness.peer_timeout {
        return Err(ChannelError::PeerSilent {
            since_last_word: since,
            timeout: liveness.peer_timeout,
            last_seq,
        });
    }
    Ok(())
}

/// Sends a control frame if the transport has room; false if it had none.
fn send_control<T: Transport>(
    t: &mut T,
    sealer: &mut FrameSealer,
    kind: FrameKind,
    generation: u64,
    seq: u64,
) -> Result<bool, ChannelError> {
    let Some(buf) = t.reserve(FRAME_HEADER_LEN)? else {
        return Ok(false);
    };
    let n = encode_control(buf, kind, generation, seq, sealer)?;
    t.commit(n)?;
    Ok(true)
}

#[derive(Clone, Copy, Debug)]
struct OpenBatch {
    first_seq: u64,
    count: u32,
    len: usize,
    /// Payload bytes of its reservation (`cap`, or one oversized entry's space).
    reserved: usize,
    /// When its first entry was put in.
    opened: Instant,
}

/// The primary's end; see the module docs.
pub struct LogSender<T: Transport> {
    t: T,
    generation: u64,
    batch: BatchPolicy,
    liveness: Liveness,
    /// Payload bytes a batch is filled to (the batch policy's size, within
    /// the transport's frame): the size of every ordinary reservation.
    cap: usize,
    /// Payload bytes the transport's largest frame holds: an entry larger
    /// than `cap` but within this travels alone in a batch of its own size.
    max_payload: usize,
    next_seq: u64,
    open: Option<OpenBatch>,
    acked: u64,
    watermark: Arc<AtomicU64>,
    /// Batches sent and not yet acked: last entry, when sealed, and
    /// [`LogSender::waits`] at that moment (hop timing).
    inflight: VecDeque<(u64, Instant, u64)>,
    last_sent: Instant,
    last_heard: Instant,
    metrics: Metrics,
    /// Seals the frames we send; checks those we receive.
    sealer: FrameSealer,
    opener: FrameOpener,
    /// Called with the new watermark whenever an ack advances it.
    ack_hook: Option<Box<dyn FnMut(u64) + Send>>,
    /// Calls of [`LogSender::wait`] so far (hop timing: a counter, not a
    /// clock read, because reading the clock costs microseconds in some
    /// guests, the soft-RoCE TCG ones among them).
    waits: u64,
}

impl<T: Transport> LogSender<T> {
    /// A sender over an established transport. The first entry gets
    /// sequence number `first_seq` (1 for a fresh log).
    pub fn new(
        t: T,
        generation: u64,
        first_seq: u64,
        batch: BatchPolicy,
        liveness: Liveness,
    ) -> Result<Self, ChannelError> {
        let max_payload = t.max_frame().saturating_sub(FRAME_HEADER_LEN);
        let cap = (batch.max_bytes as usize).min(max_payload);
        let now = Instant::now();
        let keys = *t.frame_keys();
        Ok(Self {
            sealer: keys.sealer(Role::Primary),
            opener: keys.opener(Role::Primary),
            t,
            generation,
            batch,
            liveness,
            cap,
            max_payload,
            next_seq: first_seq,
            open: None,
            acked: first_seq - 1,
            watermark: Arc::new(AtomicU64::new(first_seq - 1)),
            inflight: VecDeque::new(),
            last_sent: now,
            last_heard: now,
            metrics: Metrics::new()?,
            ack_hook: None,
            waits: 0,
        })
    }

    /// This sender with crc32c framing in place of the frame tags (and
    /// expecting the same from its peer): the benchmark's same-run
    /// baseline only, crate-private so that no replica runs without
    /// authentication.
    pub(crate) fn crc32c_baseline(mut self) -> Self {
        self.sealer = self.sealer.crc32c_baseline();
        self.opener = self.opener.crc32c_baseline();
        self
    }

    /// Calls `hook(seq)` on this end's thread the moment an ack advances the
    /// watermark to `seq` (the output gate releases its frames from there:
    /// no timer, no hand-off to another thread).
    pub fn with_ack_hook(mut self, hook: impl FnMut(u64) + Send + 'static) -> Self {
        self.ack_hook = Some(Box::new(hook));
        self
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &'static str {
        self.t.name()
    }

    /// Highest sequence number the backup has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The ack watermark, shared with the output gate: stored with Release
    /// after every ack, so a reader that loads it with Acquire and sees `A`
    /// may release every output produced at a log position <= `A`.
    pub fn watermark(&self) -> Arc<AtomicU64> {
        self.watermark.clone()
    }

    /// The sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Counters and histograms so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Mutable metrics (to count ring-full stalls seen by the producer).
    pub fn metrics_mut(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// Appends `entry` to the open batch (opening one if needed) and returns
    /// its sequence number, or `None` if the transport has no room now (call
    /// [`LogSender::poll`] and retry; counted as a stall).
    ///
    /// An entry larger than the batch policy's size (a 1 MiB mailbox fill:
    /// the guest may legally cause one) closes the open batch and travels
    /// alone in a batch sized to it; only an entry larger than the
    /// transport's largest frame is refused ([`ChannelError::EntryTooLarge`]).
    pub fn try_push(&mut self, entry: &[u8]) -> Result<Option<u64>, ChannelError> {
        let space = entry_space(entry.len());
        if space > self.max_payload {
            return Err(ChannelError::EntryTooLarge {
                len: entry.len(),
                max: self.max_payload.saturating_sub(entry_space(0)),
            });
        }
        if let Some(o) = self.open
            && (o.count >= self.batch.max_entries || o.len + space > o.reserved)
        {
            self.seal()?;
        }
        let reserved = match self.open {
            Some(o) => o.reserved,
            None => space.max(self.cap),
        };
        let Some(buf) = self.t.reserve(FRAME_HEADER_LEN + reserved)? else {
            self.metrics.transport_stalls += 1;
            return Ok(None);
        };
        let o = self.open.get_or_insert(OpenBatch {
            first_seq: self.next_seq,
            count: 0,
            len: 0,
            reserved,
            opened: Instant::now(),
        });
        let end = put_entry(buf, FRAME_HEADER_LEN + o.len, entry);
        o.len = end - FRAME_HEADER_LEN;
        o.count += 1;
        let oversized = o.reserved > self.cap;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.metrics.entries += 1;
        self.metrics.bytes += entry.len() as u64;
        if oversized {
            // Its reservation fits it alone: send it now, so the next
            // entry opens an ordinary batch.
            self.seal()?;
        }
        Ok(Some(seq))
    }

    /// Seals and sends the open batch, if any.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        if self.open.is_some() {
            self.seal()?;
        }
        Ok(())
    }

    fn seal(&mut self) -> Result<(), ChannelError> {
        let Some(o) = self.open else { return Ok(()) };
        if self.t.reserve(FRAME_HEADER_LEN + o.reserved)?.is_none() {
            // An open batch always has its reservation.
            return Err(TransportError::BadCommit {
                len: o.len,
                reserved: 0,
            }
            .into());
        }
        // Sealed as the transport sends it (the shm ring hashes each chunk
        // as it copies it in).
        let frame = self.sealer.begin(
            FrameKind::Batch,
            self.generation,
            o.first_seq,
            o.count,
            o.len,
        )?;
        self.t.commit_sealed(FRAME_HEADER_LEN + o.reserved, frame)?;
        self.open = None;
        let now = Instant::now();
        self.metrics
            .batch_fill_ns
            .saturating_record(now.saturating_duration_since(o.opened).as_nanos() as u64);
        self.inflight
            .push_back((o.first_seq + u64::from(o.count) - 1, now, self.waits));
        self.last_sent = now;
        self.metrics.batches += 1;
        Ok(())
    }

    fn on_ack(&mut self, ack: u64, now: Instant) -> Result<(), ChannelError> {
        let sent = self.next_seq - 1;
        if ack > sent {
            return Err(FrameError::AckBeyondSent { ack, sent }.into());
        }
        if ack <= self.acked {
            return Ok(());
        }
        self.acked = ack;
        // Release pairs with the output gate's Acquire load.
        self.watermark.store(ack, Ordering::Release);
        if let Some(hook) = self.ack_hook.as_mut() {
            hook(ack);
            self.metrics
                .ack_hook_ns
                .saturating_record(now.elapsed().as_nanos() as u64);
        }
        self.metrics.acks += 1;
        while let Some(&(last, at, waits_at_seal)) = self.inflight.front() {
            if last > ack {
                break;
            }
            let rtt = now.saturating_duration_since(at).as_nanos() as u64;
            self.metrics.ack_rtt_ns.saturating_record(rtt);
            if self.waits > waits_at_seal {
                self.metrics.ack_rtt_slept_ns.saturating_record(rtt);
            } else {
                self.metrics.ack_rtt_awake_ns.saturating_record(rtt);
            }
            self.inflight.pop_front();
        }
        self.metrics.ack_lag.saturating_record(sent - ack);
        Ok(())
    }

    /// Drives I/O: reads acks and heartbeats, seals the open batch when the
    /// transport is idle (so batches grow only under load), sends a heartbeat
    /// when idle, and fails if the peer is silent. Returns the acked seq.
    ///
    /// Call it when the entry source has run dry; while more entries are
    /// ready, call [`LogSender::poll_io`] instead so batches fill up.
    pub fn poll(&mut self) -> Result<u64, ChannelError> {
        self.poll_inner(true)
    }

    /// [`LogSender::poll`] without sealing the open batch: for a sender that
    /// has more entries ready (the batch is sealed when full or on `flush`).
    pub fn poll_io(&mut self) -> Result<u64, ChannelError> {
        self.poll_inner(false)
    }

    fn poll_inner(&mut self, seal_when_idle: bool) -> Result<u64, ChannelError> {
        self.t.poll()?;
        let mut now = Instant::now();
        if let Some(a) = self.t.transport_ack() {
            self.last_heard = now;
            self.on_ack(a, now)?;
        }
        for _ in 0..MAX_FRAMES_PER_POLL {
            let (kind, seq) = {
                let Some(bytes) = self.t.recv()? else { break };
                let f = decode_frame(bytes, self.generation, self.acked + 1, &mut self.opener)?;
                (f.kind, f.seq)
            };
            now = Instant::now();
            self.last_heard = now;
            match kind {
                FrameKind::Ack => self.on_ack(seq, now)?,
                FrameKind::Heartbeat => self.metrics.heartbeats_received += 1,
                FrameKind::Batch => return Err(ChannelError::UnexpectedFrame { kind, seq }),
            }
        }
        if seal_when_idle && self.open.is_some() && self.t.flushed() {
            self.seal()?;
        }
        if self.open.is_none()
            && now.saturating_duration_since(self.last_sent) >= self.liveness.heartbeat
            && send_control(
                &mut self.t,
                &mut self.sealer,
                FrameKind::Heartbeat,
                self.generation,
                self.next_seq - 1,
            )?
        {
            self.last_sent = now;
            self.metrics.heartbeats_sent += 1;
        }
        silent(self.last_heard, now, &self.liveness, self.acked)?;
        Ok(self.acked)
    }

    /// Sleeps until the peer may have sent something (an ack), `wake`
    /// turned readable (the producer has entries), or `timeout` passed, and
    /// no longer than until the next heartbeat is due; see
    /// [`Transport::wait`]. For an owner whose `poll` found nothing to do.
    pub fn wait(&mut self, wake: Option<RawFd>, timeout: Duration) -> Result<(), ChannelError> {
        let until_heartbeat = self
            .liveness
            .heartbeat
            .saturating_sub(self.last_sent.elapsed());
        self.waits += 1;
        self.t.wait(wake, timeout.min(until_heartbeat))?;
        Ok(())
    }

    /// Flushes, then polls until every entry pushed so far is acked or
    /// `timeout` passes; returns the acked seq either way.
    pub fn wait_all_acked(&mut self, timeout: Duration) -> Result<u64, ChannelError> {
        self.flush()?;
        let deadline = Instant::now() + timeout;
        while self.acked < self.next_seq - 1 && Instant::now() < deadline {
            match self.poll() {
                Ok(_) => {}
                // The peer may close as soon as its last ack is out: the
                // poll that read that ack then also saw the close.
                Err(_) if self.acked >= self.next_seq - 1 => break,
                Err(error) => return Err(error),
            }
        }
        Ok(self.acked)
    }
}

/// The backup's end; see the module docs.
pub struct LogReceiver<T: Transport> {
    t: T,
    generation: u64,
    ack: AckPolicy,
    liveness: Liveness,
    /// Next sequence number expected.
    expected: u64,
    /// Last ack sent.
    acked_sent: u64,
    /// Receive times of batches not yet acked: (last seq, when).
    unacked: VecDeque<(u64, Instant)>,
    last_sent: Instant,
    last_heard: Instant,
    metrics: Metrics,
    /// Seals the frames we send; checks those we receive.
    sealer: FrameSealer,
    opener: FrameOpener,
    /// [`LogReceiver::wait`] slept since the last batch (hop timing).
    slept: bool,
}

impl<T: Transport> LogReceiver<T> {
    /// A receiver over an established transport expecting `first_seq` next.
    pub fn new(
        t: T,
        generation: u64,
        first_seq: u64,
        ack: AckPolicy,
        liveness: Liveness,
    ) -> Result<Self, ChannelError> {
        let now = Instant::now();
        let keys = *t.frame_keys();
        Ok(Self {
            sealer: keys.sealer(Role::Backup),
            opener: keys.opener(Role::Backup),
            t,
            generation,
            ack,
            liveness,
            expected: first_seq,
            acked_sent: first_seq - 1,
            unacked: VecDeque::new(),
            last_sent: now,
            last_heard: now,
            metrics: Metrics::new()?,
            slept: false,
        })
    }

    /// The receiver matching [`LogSender::crc32c_baseline`] (bench only).
    pub(crate) fn crc32c_baseline(mut self) -> Self {
        self.sealer = self.sealer.crc32c_baseline();
        self.opener = self.opener.crc32c_baseline();
        self
    }

    /// The transport's name.
    pub fn transport_name(&self) -> &'static str {
        self.t.name()
    }

    /// True once every frame this end sent (acks, heartbeats) has left the
    /// process: poll until it is before closing, or the last ack may be lost.
    pub fn sent_everything(&self) -> bool {
        self.t.flushed()
    }

    /// Highest sequence number received.
    pub fn received(&self) -> u64 {
        self.expected - 1
    }

    /// Counters and histograms so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn send_ack(&mut self, now: Instant) -> Result<(), ChannelError> {
        let upto = self.expected - 1;
        if !send_control(
            &mut self.t,
            &mut self.sealer,
            FrameKind::Ack,
            self.generation,
            upto,
        )? {
            return Ok(()); // no room now; the next poll retries
        }
        self.acked_sent = upto;
        self.last_sent = now;
        self.metrics.acks += 1;
        while let Some(&(last, at)) = self.unacked.front() {
            if last > upto {
                break;
            }
            self.metrics
                .ack_lag
                .saturating_record(now.saturating_duration_since(at).as_nanos() as u64);
            self.unacked.pop_front();
        }
        Ok(())
    }

    /// Receives whatever has arrived, hands each entry to `deliver(seq,
    /// bytes)` in order, acks by policy, heartbeats when idle, and fails on
    /// any refused frame or a silent peer. Returns the entries delivered.
    ///
    /// A batch is validated whole (crc, generation, sequence, entry layout)
    /// before any of its entries is delivered.
    pub fn poll<F: FnMut(u64, &[u8])>(&mut self, mut deliver: F) -> Result<usize, ChannelError> {
        self.t.poll()?;
        let mut now = Instant::now();
        let mut delivered = 0usize;
        let acks_before = self.metrics.acks;
        for _ in 0..MAX_FRAMES_PER_POLL {
            let (kind, seq, count) = {
                let Some((bytes, pre)) = self.t.recv_prehashed(&self.opener)? else {
                    break;
                };
                let f = decode_frame_prehashed(
                    bytes,
                    self.generation,
                    self.expected,
                    &mut self.opener,
                    pre,
                )?;
                if f.kind == FrameKind::Batch {
                    if f.seq < self.expected {
                        return Err(FrameError::Duplicate {
                            seq: f.seq,
                            expected: self.expected,
                        }
                        .into());
                    }
                    if f.seq > self.expected {
                        return Err(FrameError::Gap {
                            seq: f.seq,
                            expected: self.expected,
                        }
                        .into());
                    }
                    for e in batch_entries(&f) {
                        e?;
                    }
                    for (seq, entry) in batch_entries(&f).flatten() {
                        self.metrics.bytes += entry.len() as u64;
                        deliver(seq, entry);
                    }
                }
                (f.kind, f.seq, f.count)
            };
            now = Instant::now();
            self.last_heard = now;
            match kind {
                FrameKind::Batch => {
                    self.expected = self.expected.checked_add(u64::from(count)).ok_or(
                        FrameError::Malformed {
                            seq,
                            reason: "sequence numbers past 2^64",
                        },
                    )?;
                    delivered += count as usize;
                    self.metrics.entries += u64::from(count);
                    self.metrics.batches += 1;
                    if std::mem::take(&mut self.slept) {
                        self.metrics.batches_after_sleep += 1;
                    }
                    self.unacked.push_back((self.expected - 1, now));
                    if self.expected - 1 - self.acked_sent >= u64::from(self.ack.every_entries) {
                        self.send_ack(now)?;
                    }
                }
                FrameKind::Heartbeat => self.metrics.heartbeats_received += 1,
                FrameKind::Ack => return Err(ChannelError::UnexpectedFrame { kind, seq }),
            }
        }
        // The receive queue is drained here (or the frame budget is spent).
        if self.expected - 1 > self.acked_sent {
            let oldest = self.unacked.front().map(|&(_, at)| at).unwrap_or(now);
            let late = now.saturating_duration_since(oldest)
                >= Duration::from_micros(u64::from(self.ack.max_delay_us));
            if self.ack.on_drain || late {
                self.send_ack(now)?;
            }
        }
        // An ack leaves now, not at the next poll (an io_uring transport
        // submits committed frames only when polled): the owner may hand
        // the entries to a consumer next, whose wake-up can take this core.
        // Only for such transports: shm and RDMA send at commit, and an
        // extra poll there (on RDMA: reaping the CQ, status bookkeeping)
        // would cost without sending anything sooner.
        if self.metrics.acks != acks_before && self.t.sends_only_when_polled() && !self.t.flushed()
        {
            self.t.poll()?;
        }
        self.heartbeat_if_due(now)?;
        silent(self.last_heard, now, &self.liveness, self.expected - 1)?;
        Ok(delivered)
    }

    /// Sends a heartbeat (carrying the last ack sent) if none went out for
    /// the liveness interval.
    fn heartbeat_if_due(&mut self, now: Instant) -> Result<(), ChannelError> {
        if now.saturating_duration_since(self.last_sent) >= self.liveness.heartbeat
            && send_control(
                &mut self.t,
                &mut self.sealer,
                FrameKind::Heartbeat,
                self.generation,
                self.acked_sent,
            )?
        {
            self.last_sent = now;
            self.metrics.heartbeats_sent += 1;
        }
        Ok(())
    }

    /// For an owner that cannot take more entries now (its consumer is
    /// behind): reads nothing, but acks every entry already received (the
    /// ack means *received*: they are in this process's memory) and sends
    /// heartbeats, so the primary is slowed by back-pressure (its transport
    /// fills, its ring stalls the vCPU) and never mistakes a slow backup
    /// for a dead one. Silence from the primary is not counted meanwhile:
    /// its frames wait unread in our transport; when the owner polls again,
    /// the peer timeout starts afresh.
    pub fn keep_alive(&mut self) -> Result<(), ChannelError> {
        self.t.poll()?;
        let now = Instant::now();
        self.last_heard = now;
        if self.expected - 1 > self.acked_sent {
            self.send_ack(now)?;
        }
        self.heartbeat_if_due(now)?;
        Ok(())
    }

    /// For an owner that gives up on a silent primary (before it goes
    /// live): quiesces the transport ([`Transport::quiesce`]: on RDMA the
    /// queue pair is torn down first, so nothing can land after) and hands
    /// every complete, valid batch that already arrived to `deliver`, in
    /// order. Returns the entries delivered; stops at the first frame that
    /// is refused (its error is returned) or at the end of what arrived.
    pub fn drain_quiesced<F: FnMut(u64, &[u8])>(
        &mut self,
        mut deliver: F,
    ) -> Result<usize, ChannelError> {
        self.t.quiesce()?;
        let mut delivered = 0usize;
        loop {
            let bytes = match self.t.recv() {
                Ok(Some(bytes)) => bytes,
                Ok(None) | Err(TransportError::Closed) => return Ok(delivered),
                Err(e) => return Err(e.into()),
            };
            let f = decode_frame(bytes, self.generation, self.expected, &mut self.opener)?;
            if f.kind != FrameKind::Batch {
                continue;
            }
            if f.seq != self.expected {
                return Err(FrameError::Gap {
                    seq: f.seq,
                    expected: self.expected,
                }
                .into());
            }
            for e in batch_entries(&f) {
                e?;
            }
            for (seq, entry) in batch_entries(&f).flatten() {
                deliver(seq, entry);
            }
            self.expected = self.expected.saturating_add(u64::from(f.count));
            delivered += f.count as usize;
        }
    }

    /// Sleeps until the primary may have sent something or `timeout`
    /// passed, and no longer than until the next heartbeat or delayed ack
    /// is due; see [`Transport::wait`]. For an owner whose `poll` delivered
    /// nothing.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), ChannelError> {
        let now = Instant::now();
        let mut until = self
            .liveness
            .heartbeat
            .saturating_sub(now.saturating_duration_since(self.last_sent));
        if let Some(&(_, oldest)) = self.unacked.front() {
            let delay = Duration::from_micros(u64::from(self.ack.max_delay_us));
            until = until.min(delay.saturating_sub(now.saturating_duration_since(oldest)));
        }
        self.slept = true;
        self.t.wait(None, timeout.min(until))?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{FrameKeys, seal};
    use std::cell::RefCell;
    use std::collections::VecDeque;

    thread_local! {
        /// Seal frames as the primary and as the backup would, counters
        /// rising across a test's frames.
        static SEALERS: RefCell<(FrameSealer, FrameSealer)> = RefCell::new((
            FrameKeys::for_tests().sealer(Role::Primary),
            FrameKeys::for_tests().sealer(Role::Backup),
        ));
    }

    fn as_primary<R>(f: impl FnOnce(&mut FrameSealer) -> R) -> R {
        SEALERS.with(|s| f(&mut s.borrow_mut().0))
    }

    fn as_backup<R>(f: impl FnOnce(&mut FrameSealer) -> R) -> R {
        SEALERS.with(|s| f(&mut s.borrow_mut().1))
    }

    /// An in-memory transport: frames pushed by the test arrive in order;
    /// frames the end sends are collected.
    struct Mock {
        inbox: VecDeque<Vec<u8>>,
        current: Vec<u8>,
        open: Vec<u8>,
        sent: Vec<Vec<u8>>,
        keys: FrameKeys,
    }

    impl Default for Mock {
        fn default() -> Self {
            Self {
                inbox: VecDeque::new(),
                current: Vec::new(),
                open: Vec::new(),
                sent: Vec::new(),
                keys: FrameKeys::for_tests(),
            }
        }
    }

    impl Transport for Mock {
        fn name(&self) -> &'static str {
            "mock"
        }
        fn frame_keys(&self) -> &FrameKeys {
            &self.keys
        }
        fn max_frame(&self) -> usize {
            1 << 20
        }
        fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
            if self.open.len() < max_len {
                self.open.resize(max_len, 0);
            }
            Ok(Some(&mut self.open[..max_len]))
        }
        fn commit(&mut self, len: usize) -> Result<(), TransportError> {
            self.sent.push(self.open[..len].to_vec());
            self.open.clear();
            Ok(())
        }
        fn poll(&mut self) -> Result<bool, TransportError> {
            Ok(false)
        }
        fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
            match self.inbox.pop_front() {
                Some(f) => {
                    self.current = f;
                    Ok(Some(&self.current))
                }
                None => Ok(None),
            }
        }
        fn flushed(&self) -> bool {
            true
        }
    }

    fn batch(generation: u64, seq: u64, n: u32) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut at = FRAME_HEADER_LEN;
        for i in 0..n {
            at = put_entry(&mut buf, at, &(seq + u64::from(i)).to_le_bytes());
        }
        let len = as_primary(|s| {
            seal(
                &mut buf,
                FrameKind::Batch,
                generation,
                seq,
                n,
                at - FRAME_HEADER_LEN,
                s,
            )
        })
        .unwrap();
        buf.truncate(len);
        buf
    }

    fn backup_opener() -> FrameOpener {
        FrameKeys::for_tests().opener(Role::Backup)
    }

    fn receiver(frames: Vec<Vec<u8>>) -> LogReceiver<Mock> {
        let p = tuning::Profile::two_core();
        let t = Mock {
            inbox: frames.into(),
            ..Mock::default()
        };
        LogReceiver::new(t, 5, 1, p.ack, p.liveness).unwrap()
    }

    fn first_error(frames: Vec<Vec<u8>>) -> (u64, ChannelError) {
        let mut r = receiver(frames);
        let mut got = Vec::new();
        let e = r.poll(|seq, _| got.push(seq)).unwrap_err();
        assert_eq!(
            got,
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "delivered in order"
        );
        (got.len() as u64, e)
    }

    #[test]
    fn in_order_batches_are_delivered_and_acked() {
        let mut r = receiver(vec![batch(5, 1, 3), batch(5, 4, 2)]);
        let mut got = Vec::new();
        assert_eq!(r.poll(|seq, e| got.push((seq, e.to_vec()))).unwrap(), 5);
        assert_eq!(got.len(), 5);
        assert!(got.iter().all(|(s, e)| e == &s.to_le_bytes()));
        // On drain the receiver acked everything, cumulatively.
        let ack = r.t.sent.last().unwrap();
        let f = decode_frame(ack, 5, 0, &mut FrameKeys::for_tests().opener(Role::Primary)).unwrap();
        assert_eq!((f.kind, f.seq), (FrameKind::Ack, 5));
    }

    #[test]
    fn duplicate_batch_is_refused_naming_sequences() {
        let (n, e) = first_error(vec![batch(5, 1, 3), batch(5, 2, 2)]);
        assert_eq!(n, 3);
        let msg = e.to_string() + &std::error::Error::source(&e).unwrap().to_string();
        assert!(
            matches!(
                e,
                ChannelError::Frame(FrameError::Duplicate {
                    seq: 2,
                    expected: 4
                })
            ),
            "{e:?}"
        );
        assert!(msg.contains("sequence number 2"), "{msg}");
    }

    #[test]
    fn gap_is_refused() {
        let (n, e) = first_error(vec![batch(5, 1, 3), batch(5, 9, 1)]);
        assert_eq!(n, 3);
        assert!(
            matches!(
                e,
                ChannelError::Frame(FrameError::Gap {
                    seq: 9,
                    expected: 4
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn stale_generation_is_refused_mid_stream() {
        let (n, e) = first_error(vec![batch(5, 1, 1), batch(4, 2, 1)]);
        assert_eq!(n, 1);
        assert!(
            matches!(
                e,
                ChannelError::Frame(FrameError::StaleGeneration {
                    ours: 5,
                    theirs: 4,
                    seq: 2
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn corrupt_batch_delivers_nothing_of_it() {
        let mut bad = batch(5, 2, 4);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        let (n, e) = first_error(vec![batch(5, 1, 1), bad]);
        assert_eq!(n, 1);
        assert!(
            matches!(
                e,
                ChannelError::Frame(FrameError::Corrupt {
                    seq: 2,
                    expected_seq: 2,
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn sender_batches_and_counts_acks() {
        let p = tuning::Profile::two_core();
        let mut s = LogSender::new(Mock::default(), 5, 1, p.batch, p.liveness).unwrap();
        for i in 0..10u64 {
            assert_eq!(s.try_push(&i.to_le_bytes()).unwrap(), Some(i + 1));
        }
        s.flush().unwrap();
        let f = decode_frame(&s.t.sent[0], 5, 1, &mut backup_opener()).unwrap();
        assert_eq!((f.kind, f.seq, f.count), (FrameKind::Batch, 1, 10));
        let mut ack = vec![0u8; FRAME_HEADER_LEN];
        as_backup(|b| encode_control(&mut ack, FrameKind::Ack, 5, 10, b)).unwrap();
        s.t.inbox.push_back(ack);
        assert_eq!(s.poll().unwrap(), 10);
        assert_eq!(s.watermark().load(Ordering::Acquire), 10);
        assert_eq!(s.metrics().ack_rtt_ns.len(), 1);
        let mut beyond = vec![0u8; FRAME_HEADER_LEN];
        as_backup(|b| encode_control(&mut beyond, FrameKind::Ack, 5, 11, b)).unwrap();
        s.t.inbox.push_back(beyond);
        assert!(matches!(
            s.poll(),
            Err(ChannelError::Frame(FrameError::AckBeyondSent {
                ack: 11,
                sent: 10
            }))
        ));
    }

    /// An entry larger than the batch policy's size travels alone (it used
    /// to be refused with EntryTooLarge, killing the sender); only one
    /// larger than the transport's frame is refused.
    #[test]
    fn oversized_entries_travel_alone_and_only_frame_sized_ones_are_refused() {
        let mut p = tuning::Profile::two_core();
        p.batch.max_bytes = 4096;
        let mut s = LogSender::new(Mock::default(), 5, 1, p.batch, p.liveness).unwrap();
        let big = vec![0xb1u8; 100_000];
        assert_eq!(s.try_push(b"small-1").unwrap(), Some(1));
        assert_eq!(s.try_push(&big).unwrap(), Some(2));
        assert_eq!(s.try_push(b"small-3").unwrap(), Some(3));
        s.flush().unwrap();
        let frames: Vec<_> = s.t.sent.clone();
        assert_eq!(frames.len(), 3, "small, big alone, small");
        let mut r = receiver(frames);
        let mut got = Vec::new();
        assert_eq!(r.poll(|seq, e| got.push((seq, e.len()))).unwrap(), 3);
        assert_eq!(got, vec![(1, 7), (2, 100_000), (3, 7)]);

        let huge = vec![0u8; (1 << 20) - FRAME_HEADER_LEN - entry_space(0) + 1];
        assert!(matches!(
            s.try_push(&huge),
            Err(ChannelError::EntryTooLarge { len, max })
                if len == huge.len() && max == huge.len() - 1
        ));
        let largest = vec![0u8; huge.len() - 8];
        assert_eq!(s.try_push(&largest).unwrap(), Some(4));
    }

    /// A receiver giving up on its primary still delivers every valid
    /// batch that arrived, in order, after quiescing the transport.
    #[test]
    fn drain_after_silence_delivers_what_arrived() {
        let mut r = receiver(vec![batch(5, 1, 3), batch(5, 4, 2)]);
        let mut got = Vec::new();
        assert_eq!(r.drain_quiesced(|seq, _| got.push(seq)).unwrap(), 5);
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        assert_eq!(r.received(), 5);
        let mut r = receiver(vec![batch(5, 1, 1), batch(5, 3, 1)]);
        assert!(matches!(
            r.drain_quiesced(|_, _| {}),
            Err(ChannelError::Frame(FrameError::Gap {
                seq: 3,
                expected: 2
            }))
        ));
    }
}
