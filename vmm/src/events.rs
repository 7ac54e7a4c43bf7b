//! Where the guest's non-determinism comes from.
//!
//! Devices never read a clock, a random source or an input stream
//! themselves: they ask an [`EventSource`], passing the number of the exit
//! they are handling. A [`Live`] source asks the host and hands every value to
//! an [`EventSink`] (a log file, later the logging channel); a [`Replay`]
//! source takes the values from a log, and refuses, as a divergence, any
//! request that does not match the log's next entry. Since the devices run
//! the same code in both cases, their own state (input at end of stream,
//! counters) stays identical on every replica.

use std::io::Read;
use std::time::Instant;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use channel::log::{
    DigestRecord, Entry, EntryKind, FLAG_END_STOPPED, FLAG_INPUT_EOF, LogReader, LogWriter,
    encode_frames, packed,
};
use nic::tap::RxQueue;
use zerocopy::IntoBytes;

use crate::VmmError;
use crate::block::{
    Completion, DiskCompleter, decode_completions, decode_completions_with_data,
    encode_completions, encode_completions_with_data,
};
use crate::digest::Digest;
use crate::state::EventPosition;

/// `BlkDone` flag: the entry is the disk's identity (payload: capacity and
/// content hash, u64 each), logged at exit 0 before the guest runs.
pub const FLAG_BLK_IDENTITY: u16 = 1;
/// `BlkDone` flag, shared-disk mode: on the identity entry, the mode; on a
/// completion entry, the read data follows the records
/// ([`crate::block::encode_completions_with_data`]).
pub const FLAG_BLK_SHARED: u16 = 2;

/// A source of the values that make a run non-deterministic.
pub trait EventSource {
    /// Host monotonic time in ns, as seen by the guest at `exit`.
    fn clock(&mut self, exit: u64) -> Result<u64, VmmError>;
    /// Fills `buf` with random bytes for the guest at `exit`.
    fn entropy(&mut self, exit: u64, buf: &mut [u8]) -> Result<(), VmmError>;
    /// Reads up to `buf.len()` input bytes for the guest at `exit`;
    /// `None` when the input stream has ended.
    fn input(&mut self, exit: u64, buf: &mut [u8]) -> Result<Option<usize>, VmmError>;
    /// Network frames to deliver into the guest's RX queue at `exit`: at most
    /// `max_frames`, waiting up to `wait` for the first if none is ready.
    fn net_rx(
        &mut self,
        exit: u64,
        max_frames: usize,
        wait: Duration,
    ) -> Result<Vec<Vec<u8>>, VmmError>;
    /// Disk requests that complete into the guest's used ring at `exit`
    /// (the guest polls the virtio-blk device). A live source takes what
    /// the host has finished from `disk` and logs it; a replay takes the
    /// list from the log and checks each against its own disk's completion.
    fn blk_done(
        &mut self,
        exit: u64,
        disk: &mut dyn DiskCompleter,
    ) -> Result<Vec<Completion>, VmmError> {
        let _ = disk;
        Err(VmmError::Config(format!(
            "exit {exit}: this event source cannot complete disk requests"
        )))
    }
    /// The VM has a disk of `capacity` bytes whose contents hash to `hash`
    /// (called once, before the first exit), in shared-disk mode if
    /// `shared`. A live source logs it; a replay refuses a disk that
    /// differs from the recorded one (or a different mode), so a pair whose
    /// local disks are not identical copies, or whose replicas do not see
    /// the same shared image, never starts.
    fn disk_identity(&mut self, capacity: u64, hash: u64, shared: bool) -> Result<(), VmmError> {
        let _ = (capacity, hash, shared);
        Ok(())
    }
    /// The log position of the last event so far: output produced now may
    /// leave only when the backup has acknowledged this position.
    fn log_position(&self) -> u64;
    /// Where the source stands, for a state transfer: the log position and
    /// the last clock value the guest saw. (The default knows no clock.)
    fn position(&self) -> EventPosition {
        EventPosition {
            log_position: self.log_position(),
            last_clock_ns: 0,
        }
    }
    /// A point where the backup must hear of everything so far (the guest
    /// is about to wait, or has produced output): a live source flushes its
    /// sink, first marking `exit` as passed if nothing was logged for it.
    fn sync(&mut self, _exit: u64) -> Result<(), VmmError> {
        Ok(())
    }
    /// The state digest after `exit` (logged, or checked against the log).
    fn digest(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError>;
    /// The guest finished at `exit` with `code`.
    fn end(&mut self, exit: u64, code: u64) -> Result<(), VmmError>;
    /// Whether the run is to stop after `exit` although the guest has not
    /// finished (the operator stopped the primary; a replay reached the
    /// point where the recording was stopped).
    fn stop_requested(&mut self, exit: u64) -> Result<bool, VmmError>;
    /// The run stops after `exit` on the host's request, in state `digest`
    /// (carried by the stop record, so a replay checks where it stops).
    fn stopped(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError>;
}

/// Where a [`Live`] source sends the events it produces.
pub trait EventSink {
    /// Appends an event taking effect at `exit`.
    fn append(
        &mut self,
        kind: EntryKind,
        flags: u16,
        exit: u64,
        payload: &[u8],
    ) -> Result<(), VmmError>;
    /// Makes everything appended so far durable (or sent).
    fn flush(&mut self) -> Result<(), VmmError>;
}

/// A sink that keeps nothing: `lockstep run`, and the baseline of the
/// recording-cost benchmark.
#[derive(Debug, Default)]
pub struct Discard;

impl EventSink for Discard {
    fn append(&mut self, _: EntryKind, _: u16, _: u64, _: &[u8]) -> Result<(), VmmError> {
        Ok(())
    }

    fn flush(&mut self) -> Result<(), VmmError> {
        Ok(())
    }
}

/// A sink writing a log file (or any byte stream) in the `channel::log` format.
pub struct LogSink<W: std::io::Write> {
    writer: LogWriter<W>,
    seq: u64,
}

impl<W: std::io::Write> LogSink<W> {
    /// Wraps a writer that already holds the file header.
    pub fn new(writer: LogWriter<W>) -> Self {
        Self { writer, seq: 0 }
    }

    /// Entries appended so far.
    pub fn entries(&self) -> u64 {
        self.seq
    }

    /// Bytes written so far, file header included.
    pub fn bytes(&self) -> u64 {
        self.writer.bytes_written()
    }

    /// Flushes and returns the underlying writer.
    pub fn into_inner(self) -> Result<W, VmmError> {
        Ok(self.writer.into_inner()?)
    }
}

impl<W: std::io::Write> EventSink for LogSink<W> {
    fn append(
        &mut self,
        kind: EntryKind,
        flags: u16,
        exit: u64,
        payload: &[u8],
    ) -> Result<(), VmmError> {
        self.seq += 1;
        self.writer.append(kind, flags, self.seq, exit, payload)?;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), VmmError> {
        Ok(self.writer.flush()?)
    }
}

/// Counters of a live run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveStats {
    /// Events handed to the sink (digests and the end record included).
    pub events: u64,
    /// Payload bytes handed to the sink.
    pub payload_bytes: u64,
}

/// Values from the host, each handed to the sink before the guest sees it.
pub struct Live<S: EventSink> {
    origin: Instant,
    clock_base: u64,
    last_clock: u64,
    last_logged_exit: u64,
    progress: bool,
    input: Box<dyn Read + Send>,
    network: Option<Arc<RxQueue>>,
    stop: Option<Arc<AtomicBool>>,
    sink: S,
    stats: LiveStats,
}

impl<S: EventSink> Live<S> {
    /// A live source reading guest input from `input`.
    pub fn new(input: Box<dyn Read + Send>, sink: S) -> Self {
        Self {
            origin: Instant::now(),
            clock_base: 0,
            last_clock: 0,
            last_logged_exit: 0,
            progress: false,
            input,
            network: None,
            stop: None,
            sink,
            stats: LiveStats::default(),
        }
    }

    /// Takes received network frames from `queue` (filled by the TAP reader).
    pub fn with_network(mut self, queue: Arc<RxQueue>) -> Self {
        self.network = Some(queue);
        self
    }

    /// Stops the run at the next exit once `flag` is set (by a signal
    /// handler, say), logging a stop record so that replay ends there too.
    pub fn with_stop(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// Starts the guest clock at `ns` (a backup going live continues the
    /// clock its primary's guest last saw, so guest time never goes back).
    pub fn with_clock_base(mut self, ns: u64) -> Self {
        self.clock_base = ns;
        self
    }

    /// Streams to a live backup: at each sync point, mark the exit as passed
    /// (a Progress entry) if nothing else was logged for it, and flush.
    pub fn streaming(mut self) -> Self {
        self.progress = true;
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> LiveStats {
        self.stats
    }

    /// The sink, for callers that need it back (to finish a file).
    pub fn into_sink(self) -> S {
        self.sink
    }

    fn log(
        &mut self,
        kind: EntryKind,
        flags: u16,
        exit: u64,
        payload: &[u8],
    ) -> Result<(), VmmError> {
        self.stats.events += 1;
        self.stats.payload_bytes += payload.len() as u64;
        self.last_logged_exit = exit;
        self.sink.append(kind, flags, exit, payload)
    }
}

impl<S: EventSink> EventSource for Live<S> {
    fn clock(&mut self, exit: u64) -> Result<u64, VmmError> {
        let elapsed = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let now = self.clock_base.saturating_add(elapsed);
        self.log(EntryKind::Clock, 0, exit, &now.to_le_bytes())?;
        self.last_clock = now;
        Ok(now)
    }

    fn entropy(&mut self, exit: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        getrandom::fill(buf).map_err(|e| VmmError::Io {
            what: "read host entropy".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        self.log(EntryKind::Entropy, 0, exit, buf)
    }

    fn input(&mut self, exit: u64, buf: &mut [u8]) -> Result<Option<usize>, VmmError> {
        let count = loop {
            match self.input.read(buf) {
                Ok(count) => break count,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(VmmError::Io {
                        what: format!("read guest input at exit {exit}"),
                        source,
                    });
                }
            }
        };
        if count == 0 && !buf.is_empty() {
            self.log(EntryKind::Input, FLAG_INPUT_EOF, exit, &[])?;
            return Ok(None);
        }
        self.log(EntryKind::Input, 0, exit, &buf[..count])?;
        Ok(Some(count))
    }

    fn net_rx(
        &mut self,
        exit: u64,
        max_frames: usize,
        wait: Duration,
    ) -> Result<Vec<Vec<u8>>, VmmError> {
        let Some(queue) = &self.network else {
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            return Ok(Vec::new());
        };
        let frames = queue.take(max_frames, wait);
        if !frames.is_empty() {
            // The NIC delivers frames of 14 ..= 1514 bytes, which always
            // pack; anything else would go unpacked.
            match packed::encode_vec(&frames) {
                Ok(payload) => self.log(EntryKind::RxFramesPacked, 0, exit, &payload)?,
                Err(_) => self.log(EntryKind::RxFrames, 0, exit, &encode_frames(&frames))?,
            }
        }
        Ok(frames)
    }

    fn blk_done(
        &mut self,
        exit: u64,
        disk: &mut dyn DiskCompleter,
    ) -> Result<Vec<Completion>, VmmError> {
        let done = disk.harvest()?;
        if done.is_empty() {
            return Ok(done);
        }
        if disk.carries_data() {
            // Shared disk: the backup never reads the image; the data
            // travels with the completion.
            let disk: &dyn DiskCompleter = disk;
            let data = |c: &Completion| {
                if c.len > 1 {
                    disk.read_data(c.tag)
                } else {
                    &[]
                }
            };
            for payload in encode_completions_with_data(&done, data) {
                self.log(EntryKind::BlkDone, FLAG_BLK_SHARED, exit, &payload)?;
            }
        } else {
            self.log(EntryKind::BlkDone, 0, exit, &encode_completions(&done))?;
        }
        Ok(done)
    }

    fn disk_identity(&mut self, capacity: u64, hash: u64, shared: bool) -> Result<(), VmmError> {
        let mut payload = capacity.to_le_bytes().to_vec();
        payload.extend_from_slice(&hash.to_le_bytes());
        let mode = if shared { FLAG_BLK_SHARED } else { 0 };
        self.log(EntryKind::BlkDone, FLAG_BLK_IDENTITY | mode, 0, &payload)
    }

    fn log_position(&self) -> u64 {
        self.stats.events
    }

    fn position(&self) -> EventPosition {
        EventPosition {
            log_position: self.stats.events,
            last_clock_ns: self.last_clock,
        }
    }

    fn digest(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        self.log(EntryKind::Digest, 0, exit, digest.record().as_bytes())
    }

    fn end(&mut self, exit: u64, code: u64) -> Result<(), VmmError> {
        self.log(EntryKind::End, 0, exit, &code.to_le_bytes())?;
        self.sink.flush()
    }

    fn sync(&mut self, exit: u64) -> Result<(), VmmError> {
        if !self.progress {
            return Ok(());
        }
        if self.last_logged_exit < exit {
            self.log(EntryKind::Progress, 0, exit, &[])?;
        }
        self.sink.flush()
    }

    fn stop_requested(&mut self, _exit: u64) -> Result<bool, VmmError> {
        Ok(self
            .stop
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed)))
    }

    fn stopped(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        self.log(
            EntryKind::End,
            FLAG_END_STOPPED,
            exit,
            digest.record().as_bytes(),
        )?;
        self.sink.flush()
    }
}

/// Counters of a replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Clock, entropy and input events supplied to the guest.
    pub events: u64,
    /// Digests compared (all matched, or the replay stopped).
    pub digests_matched: u64,
    /// Log entries consumed in all.
    pub entries: u64,
    /// Progress marks consumed (live streaming).
    pub progress_marks: u64,
    /// The last clock value supplied to the guest, in ns.
    pub last_clock_ns: u64,
}

/// Where a replay gets its entries: a log file, or a live stream from the
/// primary (which blocks until the next entry arrives).
pub trait EntrySource {
    /// The next entry; `Ok(None)` when the stream has ended cleanly.
    fn next_entry(&mut self) -> Result<Option<Entry>, VmmError>;
}

impl<R: Read> EntrySource for LogReader<R> {
    fn next_entry(&mut self) -> Result<Option<Entry>, VmmError> {
        Ok(LogReader::next_entry(self)?)
    }
}

impl<R: EntrySource> Replay<R> {
    /// Shared-disk mode: the completions at `exit` with the primary's read
    /// data, from every data entry logged there (large reads are split
    /// over several entries), handed to the following disk.
    fn blk_done_with_data(
        &mut self,
        exit: u64,
        disk: &mut dyn DiskCompleter,
    ) -> Result<Vec<Completion>, VmmError> {
        let mut done = Vec::new();
        loop {
            let next = self.peek(exit)?;
            if next.exit != exit || next.kind != EntryKind::BlkDone || next.flags != FLAG_BLK_SHARED
            {
                break;
            }
            let entry = self.take(exit, EntryKind::BlkDone)?;
            if !disk.carries_data() {
                return Err(VmmError::LogMismatch(format!(
                    "blk-done entry {} carries the primary's read data (shared-disk mode), but this replica's disk is local",
                    entry.seq
                )));
            }
            let records = decode_completions_with_data(&entry.payload).ok_or_else(|| {
                VmmError::LogMismatch(format!(
                    "blk-done entry {} has a malformed payload (shared-disk records and data)",
                    entry.seq
                ))
            })?;
            for (completion, data) in records {
                disk.accept(&completion, data)?;
                done.push(completion);
            }
            self.stats.events += 1;
        }
        if done.is_empty() {
            let next = self.peek(exit)?;
            if next.exit == exit && next.kind == EntryKind::BlkDone {
                return Err(VmmError::LogMismatch(format!(
                    "blk-done entry {} carries no read data, but this replica's disk is in shared-disk mode (it never reads the image while following)",
                    next.seq
                )));
            }
        }
        Ok(done)
    }
}

/// Values from a log, checked against what the guest asks for.
pub struct Replay<R: EntrySource> {
    reader: R,
    next: Option<Entry>,
    stats: ReplayStats,
    /// Entries with sequence numbers up to this one precede a state
    /// transfer: they are skipped if the source still holds them.
    base: u64,
}

impl<R: EntrySource> Replay<R> {
    /// Replays the entries of `reader` (whose header the caller has checked).
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            next: None,
            stats: ReplayStats::default(),
            base: 0,
        }
    }

    /// Replays from a state transfer at `position`: the machine was restored
    /// right after the entry `position.log_position`, so replay expects the
    /// next one. `reader` may start there (a primary streaming from the
    /// transfer point) or earlier (a whole log): entries up to the position
    /// are skipped. [`ReplayStats::entries`] counts from the position.
    pub fn resume(reader: R, position: &EventPosition) -> Self {
        Self {
            reader,
            next: None,
            stats: ReplayStats {
                entries: position.log_position,
                last_clock_ns: position.last_clock_ns,
                ..ReplayStats::default()
            },
            base: position.log_position,
        }
    }

    /// Where the entries come from.
    pub fn source(&self) -> &R {
        &self.reader
    }

    /// Counters so far.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// The next entry that matters at `exit`. Progress marks for earlier
    /// exits are consumed on the way: they only said that nothing happened
    /// there. Blocks until the entry arrives when the log is a live stream:
    /// that is how a backup never runs past an exit it cannot vouch for.
    fn peek(&mut self, exit: u64) -> Result<&Entry, VmmError> {
        loop {
            if self.next.is_none() {
                let entry = self.reader.next_entry()?.ok_or(VmmError::LogIncomplete {
                    exit,
                    entries: self.stats.entries,
                })?;
                if entry.seq <= self.base {
                    continue;
                }
                let expected = self.stats.entries + 1;
                if entry.seq != expected {
                    return Err(VmmError::LogMismatch(format!(
                        "log entry {expected} has sequence number {}: entries are missing or out of order",
                        entry.seq
                    )));
                }
                self.next = Some(entry);
            }
            match &self.next {
                Some(entry) if entry.kind == EntryKind::Progress && entry.exit < exit => {
                    self.next = None;
                    self.stats.entries += 1;
                    self.stats.progress_marks += 1;
                }
                Some(_) => break,
                None => {}
            }
        }
        self.next.as_ref().ok_or(VmmError::LogIncomplete {
            exit,
            entries: self.stats.entries,
        })
    }

    /// Takes the next entry, which must be of `kind` at `exit`.
    fn take(&mut self, exit: u64, kind: EntryKind) -> Result<Entry, VmmError> {
        let entry = self.peek(exit)?;
        if entry.exit != exit || entry.kind != kind {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest asks for {kind}, but the log's next entry ({}) is {} at exit {}",
                    entry.seq, entry.kind, entry.exit
                ),
            });
        }
        self.stats.entries += 1;
        self.next.take().ok_or(VmmError::LogIncomplete {
            exit,
            entries: self.stats.entries,
        })
    }

    /// Compares `digest` with the digest record carried by `entry`.
    fn check_digest(&mut self, exit: u64, entry: &Entry, digest: &Digest) -> Result<(), VmmError> {
        let recorded = entry.digest().ok_or_else(|| {
            VmmError::LogMismatch(format!(
                "{} entry {} has a {}-byte payload, not a {}-byte digest",
                entry.kind,
                entry.seq,
                entry.payload.len(),
                size_of::<DigestRecord>()
            ))
        })?;
        if let Some(difference) = digest.compare(&recorded) {
            return Err(VmmError::Diverged {
                exit,
                detail: difference,
            });
        }
        self.stats.digests_matched += 1;
        Ok(())
    }

    /// The log must end here: `ended` says how the run ended, for the message.
    fn expect_end_of_log(&mut self, ended: &str) -> Result<(), VmmError> {
        match self.reader.next_entry()? {
            None => Ok(()),
            Some(extra) => Err(VmmError::LogMismatch(format!(
                "{ended}, but the log goes on with entry {} ({} at exit {})",
                extra.seq, extra.kind, extra.exit
            ))),
        }
    }

    fn bytes_into(
        &mut self,
        exit: u64,
        kind: EntryKind,
        buf: &mut [u8],
    ) -> Result<Entry, VmmError> {
        let entry = self.take(exit, kind)?;
        if entry.payload.len() > buf.len() {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest offers {} bytes for {kind}, but the log's entry {} holds {}",
                    buf.len(),
                    entry.seq,
                    entry.payload.len()
                ),
            });
        }
        buf[..entry.payload.len()].copy_from_slice(&entry.payload);
        self.stats.events += 1;
        Ok(entry)
    }
}

impl<R: EntrySource> EventSource for Replay<R> {
    fn clock(&mut self, exit: u64) -> Result<u64, VmmError> {
        let entry = self.take(exit, EntryKind::Clock)?;
        self.stats.events += 1;
        if let Some(ns) = entry.payload_u64() {
            self.stats.last_clock_ns = ns;
        }
        entry.payload_u64().ok_or_else(|| {
            VmmError::LogMismatch(format!(
                "clock entry {} has a {}-byte payload, not 8",
                entry.seq,
                entry.payload.len()
            ))
        })
    }

    fn entropy(&mut self, exit: u64, buf: &mut [u8]) -> Result<(), VmmError> {
        let entry = self.bytes_into(exit, EntryKind::Entropy, buf)?;
        if entry.payload.len() != buf.len() {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest asks for {} random bytes, the log's entry {} holds {}",
                    buf.len(),
                    entry.seq,
                    entry.payload.len()
                ),
            });
        }
        Ok(())
    }

    fn input(&mut self, exit: u64, buf: &mut [u8]) -> Result<Option<usize>, VmmError> {
        let entry = self.bytes_into(exit, EntryKind::Input, buf)?;
        if entry.flags & FLAG_INPUT_EOF != 0 {
            return Ok(None);
        }
        Ok(Some(entry.payload.len()))
    }

    fn net_rx(
        &mut self,
        exit: u64,
        max_frames: usize,
        _wait: Duration,
    ) -> Result<Vec<Vec<u8>>, VmmError> {
        // No entry for this exit means no frames arrived here on the primary.
        let next = self.peek(exit)?;
        let kind = next.kind;
        if next.exit != exit || !matches!(kind, EntryKind::RxFrames | EntryKind::RxFramesPacked) {
            return Ok(Vec::new());
        }
        let entry = self.take(exit, kind)?;
        let frames = match entry.rx_frames() {
            Some(Ok(frames)) => frames,
            Some(Err(error)) => {
                return Err(VmmError::LogMismatch(format!(
                    "{kind} entry {} has a malformed payload: {error}",
                    entry.seq
                )));
            }
            None => Vec::new(),
        };
        if frames.len() > max_frames {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest posted {max_frames} receive buffers, the log's entry {} delivers {} frames",
                    entry.seq,
                    frames.len()
                ),
            });
        }
        self.stats.events += 1;
        Ok(frames)
    }

    fn blk_done(
        &mut self,
        exit: u64,
        disk: &mut dyn DiskCompleter,
    ) -> Result<Vec<Completion>, VmmError> {
        // No entry for this exit: nothing completed here on the primary.
        let next = self.peek(exit)?;
        if next.exit != exit
            || next.kind != EntryKind::BlkDone
            || next.flags & FLAG_BLK_IDENTITY != 0
        {
            return Ok(Vec::new());
        }
        if next.flags == FLAG_BLK_SHARED || disk.carries_data() {
            return self.blk_done_with_data(exit, disk);
        }
        let entry = self.take(exit, EntryKind::BlkDone)?;
        let recorded = decode_completions(&entry.payload).ok_or_else(|| {
            VmmError::LogMismatch(format!(
                "blk-done entry {} has a malformed payload",
                entry.seq
            ))
        })?;
        for logged in &recorded {
            let own = disk.wait_for(logged.tag)?;
            if own != *logged {
                return Err(VmmError::Diverged {
                    exit,
                    detail: format!(
                        "disk request {}: this replica's disk gives status {} ({} bytes, data hash {:016x}), the log's entry {} says status {} ({} bytes, data hash {:016x}): the disk images differ",
                        logged.tag,
                        own.status,
                        own.len,
                        own.hash,
                        entry.seq,
                        logged.status,
                        logged.len,
                        logged.hash
                    ),
                });
            }
        }
        self.stats.events += 1;
        Ok(recorded)
    }

    fn disk_identity(&mut self, capacity: u64, hash: u64, shared: bool) -> Result<(), VmmError> {
        let next = self.peek(0)?;
        if next.exit != 0
            || next.kind != EntryKind::BlkDone
            || next.flags & !FLAG_BLK_SHARED != FLAG_BLK_IDENTITY
        {
            return Err(VmmError::LogMismatch(format!(
                "this replica has a disk ({capacity} bytes), but the recording's VM had none (its first entry is {} at exit {})",
                next.kind, next.exit
            )));
        }
        let entry = self.take(0, EntryKind::BlkDone)?;
        let word = |at: usize| {
            entry
                .payload
                .get(at..at + 8)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let (Some(their_capacity), Some(their_hash), 16) = (word(0), word(8), entry.payload.len())
        else {
            return Err(VmmError::LogMismatch(format!(
                "disk identity entry {} has a {}-byte payload, not 16",
                entry.seq,
                entry.payload.len()
            )));
        };
        let their_shared = entry.flags & FLAG_BLK_SHARED != 0;
        let mode = |shared: bool| if shared { "shared" } else { "local" };
        if their_shared != shared {
            return Err(VmmError::LogMismatch(format!(
                "the disk modes differ: the primary runs --disk-mode {}, this replica --disk-mode {}; both must use the same mode",
                mode(their_shared),
                mode(shared)
            )));
        }
        if (their_capacity, their_hash) != (capacity, hash) {
            let rule = if shared {
                "in shared-disk mode both must open the same image (on one host, the same file), before the guest writes to it"
            } else {
                "in local-disks mode both must start as identical copies"
            };
            return Err(VmmError::LogMismatch(format!(
                "the disks differ: the primary's image has {their_capacity} bytes (content hash {their_hash:016x}), this replica's {capacity} bytes (content hash {hash:016x}); {rule}"
            )));
        }
        Ok(())
    }

    fn log_position(&self) -> u64 {
        self.stats.entries
    }

    fn position(&self) -> EventPosition {
        EventPosition {
            log_position: self.stats.entries,
            last_clock_ns: self.stats.last_clock_ns,
        }
    }

    fn digest(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        let entry = self.take(exit, EntryKind::Digest)?;
        self.check_digest(exit, &entry, digest)
    }

    fn stop_requested(&mut self, exit: u64) -> Result<bool, VmmError> {
        // At the end of the log, carry on: the next event the guest needs
        // reports the log as incomplete.
        match self.peek(exit) {
            Ok(next) => Ok(next.kind == EntryKind::End
                && next.exit == exit
                && next.flags & FLAG_END_STOPPED != 0),
            Err(VmmError::LogIncomplete { .. }) => Ok(false),
            Err(other) => Err(other),
        }
    }

    fn stopped(&mut self, exit: u64, digest: &Digest) -> Result<(), VmmError> {
        let entry = self.take(exit, EntryKind::End)?;
        self.check_digest(exit, &entry, digest)?;
        self.expect_end_of_log(&format!("the recording was stopped at exit {exit}"))
    }

    fn end(&mut self, exit: u64, code: u64) -> Result<(), VmmError> {
        let entry = self.take(exit, EntryKind::End)?;
        if entry.flags & FLAG_END_STOPPED != 0 {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest ends with code {code}, but the recording was stopped by the host here"
                ),
            });
        }
        let recorded = entry.payload_u64().unwrap_or(u64::MAX);
        if recorded != code {
            return Err(VmmError::Diverged {
                exit,
                detail: format!(
                    "the guest ends with code {code}, the recording ended with {recorded}"
                ),
            });
        }
        self.expect_end_of_log(&format!("the guest ended at exit {exit}"))
    }
}
