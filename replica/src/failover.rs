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

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbiter::{Arbiter, Outcome, ReplicaId, error_chain};
use channel::log::EntryKind;
use nic::gate::OutputGate;
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

/// Builds the live event source of a backup going live (attaches the NIC to
/// the TAP, announces the guest), given the guest clock to continue from and
/// the generation it won. Its sink is a [`FailoverSink`] running alone, so a
/// new backup can join it later.
pub type Promote = Box<dyn FnMut(u64, u64) -> Result<Live<FailoverSink>, VmmError> + Send>;

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
            figures.entry_wait_us = Some(lag.queue_us.clone());
            let role = match promoted {
                Some((at, generation)) => format!("live (backup promoted at exit {at}, generation {generation})"),
                None => "backup (following the primary)".to_string(),
            };
            format!(
                "role: {role}\npid: {}\ngeneration: {}\nexit: {exit}\nnewest exit received: {}\nlag (exits): {}\nentries replayed: {}\nevents replayed: {}\ndigests matched: {}\nmost exits behind: {}\nentry wait p50/p99 us: {}/{}\n",
                std::process::id(),
                promoted.map_or(generation, |(_, g)| g),
                source.newest_exit(),
                source.newest_exit().saturating_sub(exit),
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
        let why = format!("the primary is gone (stream ended at exit {exit}: {cause})");
        if let Some(status) = &self.status {
            status.board().update(|f| f.peer_silences += 1);
        }
        let generation = membership.go_live_alone(&why)?;
        if let Some(status) = &self.status {
            status.board().update(|f| f.failovers += 1);
        }
        let clock = self.replay.stats().last_clock_ns;
        self.live = Some((self.promote)(clock, generation)?);
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
    /// The oldest flushed position not yet acknowledged, and since when.
    unacked_since: Option<(u64, Instant)>,
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
}

impl FailoverSink {
    /// Streams through `link`, whose acks release `gate`'s frames; without
    /// `membership` the loss of the backup stops the primary (fail-stop).
    /// `timeout`: a flushed position unacknowledged this long counts as a
    /// lost backup even if heartbeats still arrive.
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
        if let Some((position, since)) = self.unacked_since {
            if link.acked() >= position {
                self.unacked_since = None;
            } else if since.elapsed() > self.timeout {
                self.backup_lost(format!(
                    "backup silent: log position {position} unacknowledged for {} ms",
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
            self.unacked_since = Some((self.entries, Instant::now()));
        }
        Ok(())
    }
}
