//! A virtio-blk device (virtio 1.x, virtio-mmio, one split queue) backed by
//! an image file through io_uring, with completions delivered only at exits.
//!
//! # Determinism
//!
//! The host finishes disk I/O whenever it likes; the guest must see it at
//! the same exit on every replica. So:
//!
//! - At the guest's `QueueNotify` exit the device pops every request,
//!   checks it, and either fails it at once (malformed, beyond the end,
//!   write to a read-only disk: a function of guest memory only, so every
//!   replica does the same) or gives it the next **tag** (1, 2, …: also a
//!   function of guest actions) and submits it to io_uring. Write data is
//!   copied out of guest memory into a host buffer at that exit; read data
//!   lands in a host buffer, never straight in guest memory, because guest
//!   memory may change only at exits.
//! - The guest polls by reading InterruptStatus (0x060). At that exit, and
//!   only there, finished requests enter the used ring: the
//!   [`crate::events::EventSource::blk_done`] of the run decides which.
//!   A live source takes what io_uring has finished (waiting for at least
//!   one if any is in flight) and logs a `BlkDone` entry; a replay takes the
//!   list from the log, waits for its *own* completion of each tag, and
//!   fails with `diverged` if its status or the hash of its read data
//!   differs from the primary's (local disks: each replica reads its own
//!   copy, so a different image is caught at its first differing read).
//!
//! # `BlkDone` payload: repeated 24-byte records
//!
//! ```text
//! offset  size  field
//! 0       8     tag      request tag (issue order, from 1)
//! 8       4     len      bytes written into the guest's buffers (data + status)
//! 12      1     status   0 OK, 1 IOERR, 2 UNSUPP
//! 13      3     zero
//! 16      8     hash     xxh3-64 of the data read (0 for other requests)
//! ```
//!
//! # Register map (virtio-mmio version 2, 32-bit accesses; device ID 2)
//!
//! As the NIC's (`nic::virtio`), with one queue (queue 0). InterruptStatus
//! (0x060) is the poll: it delivers finished requests and returns 1 if any
//! was delivered at this exit, else 0. Config space (0x100…): capacity in
//! 512-byte sectors (u64, byte reads allowed).
//!
//! # Requests
//!
//! A chain is a 16-byte read-only header (`type` u32, reserved u32, `sector`
//! u64) in its first descriptor, data descriptors (device-writable for
//! `IN` and `GET_ID`, read-only for `OUT`), and a device-writable last
//! descriptor whose last byte receives the status. Types: `IN` 0, `OUT` 1,
//! `FLUSH` 4 (fdatasync of the image: durable on the host), `GET_ID` 8
//! (the disk's 20-byte serial). Any other shape fails with IOERR (or
//! UNSUPP for an unknown type), is counted, and the host says why.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use io_uring::{IoUring, opcode, types};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::VmmError;
use nic::gate::OutputGate;
use nic::virtio::GuestRam;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 128;
/// Largest data length of one request.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Bytes of one `BlkDone` record.
pub const RECORD_LEN: usize = 24;
/// Length of the GET_ID serial.
pub const ID_LEN: usize = 20;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush (fdatasync on the host).
pub const T_FLUSH: u32 = 4;
/// The disk's serial.
pub const T_GET_ID: u32 = 8;
/// Status: done.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const S_UNSUPP: u8 = 2;

const MAGIC: u32 = 0x7472_6976;
const DEVICE_ID_BLK: u32 = 2;
const VENDOR_ID: u32 = 0x4c4b_5354;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_VERSION_1: u64 = 1 << 32;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 128;
const RING_ENTRIES: u32 = 256;

/// A finished request, as logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Bytes written into the guest's buffers (data and status byte).
    pub len: u32,
    /// Virtio status.
    pub status: u8,
    /// xxh3-64 of the data read (0 for other requests).
    pub hash: u64,
}

/// Encodes completions as a `BlkDone` payload.
pub fn encode_completions(done: &[Completion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(done.len() * RECORD_LEN);
    for completion in done {
        encode_record_into(completion, &mut out);
    }
    out
}

fn encode_record_into(completion: &Completion, out: &mut Vec<u8>) {
    out.extend_from_slice(&completion.tag.to_le_bytes());
    out.extend_from_slice(&completion.len.to_le_bytes());
    out.extend_from_slice(&[completion.status, 0, 0, 0]);
    out.extend_from_slice(&completion.hash.to_le_bytes());
}

/// Decodes a `BlkDone` payload; `None` if malformed.
pub fn decode_completions(payload: &[u8]) -> Option<Vec<Completion>> {
    if !payload.len().is_multiple_of(RECORD_LEN) {
        return None;
    }
    payload
        .chunks_exact(RECORD_LEN)
        .map(|record| {
            let u64_at = |at: usize| {
                let mut word = [0u8; 8];
                word.copy_from_slice(&record[at..at + 8]);
                u64::from_le_bytes(word)
            };
            if record[13..16] != [0, 0, 0] || record[12] > S_UNSUPP {
                return None;
            }
            Some(Completion {
                tag: u64_at(0),
                len: u32::from_le_bytes([record[8], record[9], record[10], record[11]]),
                status: record[12],
                hash: u64_at(16),
            })
        })
        .collect()
}

/// Largest payload of one shared-mode `BlkDone` entry: completions are
/// split over several entries at the same exit to stay under it. One read
/// is at most [`MAX_REQUEST_BYTES`], so every entry a guest can cause fits
/// the link's 4 MiB frame.
pub const MAX_DATA_ENTRY: usize = 2 << 20;

/// Encodes completions with their read data (shared-disk mode) as one or
/// more `BlkDone` payloads, each at most [`MAX_DATA_ENTRY`] bytes (or one
/// completion): `count` u32, 4 zero, `count` records, then the data of
/// each successful read, in record order (`len - 1` bytes each).
pub fn encode_completions_with_data<'a>(
    done: &[Completion],
    data: impl Fn(&Completion) -> &'a [u8],
) -> Vec<Vec<u8>> {
    let mut entries = Vec::new();
    let mut start = 0;
    while start < done.len() {
        // One entry: at least one completion, then as many as fit. The
        // data is copied once, from the request's buffer into the payload.
        let (mut end, mut bytes) = (start, 8usize);
        while let Some(completion) = done.get(end) {
            let size = RECORD_LEN + data(completion).len();
            if end > start && bytes + size > MAX_DATA_ENTRY {
                break;
            }
            bytes += size;
            end += 1;
        }
        let batch = &done[start..end];
        let mut payload = Vec::with_capacity(bytes);
        payload.extend_from_slice(&(batch.len() as u32).to_le_bytes());
        payload.extend_from_slice(&[0; 4]);
        for completion in batch {
            encode_record_into(completion, &mut payload);
        }
        for completion in batch {
            payload.extend_from_slice(data(completion));
        }
        entries.push(payload);
        start = end;
    }
    entries
}

/// Decodes a payload of [`encode_completions_with_data`]; `None` if
/// malformed (a count beyond the payload, data lengths that do not add up).
pub fn decode_completions_with_data(payload: &[u8]) -> Option<Vec<(Completion, &[u8])>> {
    let count = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?) as usize;
    if payload.get(4..8)? != [0; 4] {
        return None;
    }
    let records_end = count.checked_mul(RECORD_LEN)?.checked_add(8)?;
    let records = decode_completions(payload.get(8..records_end)?)?;
    let mut at = records_end;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        // `len` counts the status byte: the data is the rest.
        let len = (record.len as usize).checked_sub(1)?;
        let end = at.checked_add(len)?;
        out.push((record, payload.get(at..end)?));
        at = end;
    }
    (at == payload.len()).then_some(out)
}

/// How the event source reaches the disk's host completions.
pub trait DiskCompleter {
    /// Live: the requests the host has finished, waiting for at least one
    /// if any is in flight; none if nothing is in flight.
    fn harvest(&mut self) -> Result<Vec<Completion>, VmmError>;
    /// Replay: waits for this replica's own completion of `tag`.
    fn wait_for(&mut self, tag: u64) -> Result<Completion, VmmError>;
    /// Shared-disk mode: read data travels in the log (the primary logs
    /// it with each completion, a following backup takes it from there).
    fn carries_data(&self) -> bool {
        false
    }
    /// Live, shared-disk mode: the data the finished read `tag` returned
    /// (empty for other requests).
    fn read_data(&self, tag: u64) -> &[u8] {
        let _ = tag;
        &[]
    }
    /// A backup following in shared-disk mode: the primary's completion of
    /// `done.tag` and the data its read returned (checked against the
    /// completion's length and hash), in place of a request of its own.
    fn accept(&mut self, done: &Completion, data: &[u8]) -> Result<(), VmmError> {
        let _ = data;
        Err(VmmError::LogMismatch(format!(
            "the log carries the data of disk request {}, but this replica's disk is not in shared-disk mode",
            done.tag
        )))
    }
}

/// A replica's part in shared-disk mode (see [`Disk::shared`]).
struct Shared {
    /// Following the primary's log: the image is never touched (no read,
    /// no write) until the first live harvest, the go-live.
    following: bool,
    /// The Output Rule for writes: a write or flush is issued to the image
    /// only once this gate's ack covers the log position of the exit that
    /// produced it. None: nothing is held (no backup, FT off).
    gate: Option<Arc<OutputGate>>,
    /// Writes and flushes waiting for the ack: tag and log position, in
    /// issue order (a flush never overtakes the writes before it).
    held: VecDeque<(u64, u64)>,
    stats: SharedStats,
}

/// Counters of a shared disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharedStats {
    /// Writes and flushes that had to wait for the backup's ack.
    pub held: u64,
    /// Most writes and flushes held at once.
    pub max_held: usize,
    /// Requests re-issued at the go-live (outstanding when the primary
    /// was lost).
    pub reissued: u64,
    /// Read bytes accepted from the log while following.
    pub followed_read_bytes: u64,
}

/// An image file and the io_uring that serves it.
pub struct Disk {
    path: PathBuf,
    file: Arc<File>,
    ring: IoUring,
    capacity: u64,
    read_only: bool,
    serial: [u8; ID_LEN],
    /// Host buffers of requests in flight or finished but not delivered:
    /// kind, byte offset, data.
    buffers: HashMap<u64, (u32, u64, Vec<u8>)>,
    /// Blocks written since a state transfer's last look (pre-copy).
    dirty: Arc<DirtyBlocks>,
    in_flight: usize,
    finished: VecDeque<Completion>,
    /// Host errors seen (each also reported on stderr).
    pub host_errors: u64,
    /// The content hash, once [`Self::identify`] computed it.
    identity: Option<u64>,
    /// Shared-disk mode (None: local disks).
    shared: Option<Shared>,
}

fn io_error(what: String, source: std::io::Error) -> VmmError {
    VmmError::Io { what, source }
}

impl Disk {
    /// Opens `path` (creating it with `create_size` bytes when missing and
    /// `create_size` is given). Its size must be a whole number of sectors.
    pub fn open(path: &Path, read_only: bool, create_size: Option<u64>) -> Result<Self, VmmError> {
        let display = path.display();
        if !path.exists()
            && let Some(size) = create_size
        {
            let file = File::create_new(path)
                .map_err(|e| io_error(format!("create disk image {display}"), e))?;
            file.set_len(size)
                .map_err(|e| io_error(format!("size disk image {display} to {size} bytes"), e))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| io_error(format!("open disk image {display}"), e))?;
        let capacity = file
            .metadata()
            .map_err(|e| io_error(format!("stat disk image {display}"), e))?
            .len();
        if capacity == 0 || !capacity.is_multiple_of(SECTOR) {
            return Err(VmmError::Config(format!(
                "disk image {display} has {capacity} bytes: it must be a non-empty whole number of {SECTOR}-byte sectors"
            )));
        }
        let ring = IoUring::new(RING_ENTRIES)
            .map_err(|e| io_error(format!("create the io_uring for disk image {display}"), e))?;
        let mut serial = [0u8; ID_LEN];
        let id = b"lockstep-disk";
        serial[..id.len()].copy_from_slice(id);
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            ring,
            capacity,
            read_only,
            serial,
            buffers: HashMap::new(),
            dirty: Arc::new(DirtyBlocks::new(capacity)),
            in_flight: 0,
            finished: VecDeque::new(),
            host_errors: 0,
            identity: None,
            shared: None,
        })
    }

    /// Shared-disk mode: this replica's image is the one image of the
    /// pair. `following` (a backup): the image is neither read nor written
    /// until the go-live; read data comes from the log. Else (the primary)
    /// writes and flushes wait for the Output Rule ([`Self::hold_writes`]),
    /// read data goes into the log, and a host I/O error is fail-stop.
    pub fn shared(mut self, following: bool) -> Self {
        self.shared = Some(Shared {
            following,
            gate: None,
            held: VecDeque::new(),
            stats: SharedStats::default(),
        });
        self
    }

    /// Shared-disk mode: writes and flushes are issued only once `gate`'s
    /// ack covers the log position of the exit that produced them (the
    /// gate that holds the network's frames).
    pub fn hold_writes(&mut self, gate: Arc<OutputGate>) {
        if let Some(shared) = self.shared.as_mut() {
            shared.gate = Some(gate);
        }
    }

    /// Whether the disk is in shared-disk mode.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Whether the disk follows a primary's log (shared mode, before the
    /// go-live).
    pub fn is_following(&self) -> bool {
        self.shared.as_ref().is_some_and(|shared| shared.following)
    }

    /// Shared-disk counters (None in local mode).
    pub fn shared_stats(&self) -> Option<SharedStats> {
        self.shared.as_ref().map(|shared| shared.stats)
    }

    /// Writes and flushes held for the backup's ack now.
    pub fn held(&self) -> usize {
        self.shared.as_ref().map_or(0, |shared| shared.held.len())
    }

    /// Requests submitted to the host and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Takes a new request: local mode submits it; shared mode submits a
    /// read, holds a write or flush produced at log `position` until the
    /// ack covers it, and (following) only keeps it for the go-live.
    fn issue(
        &mut self,
        tag: u64,
        kind: u32,
        offset: u64,
        buffer: Vec<u8>,
        position: u64,
    ) -> Result<(), VmmError> {
        let Some(shared) = self.shared.as_mut() else {
            return self.submit(tag, kind, offset, buffer);
        };
        if shared.following {
            self.buffers.insert(tag, (kind, offset, buffer));
            return Ok(());
        }
        if kind == T_IN {
            return self.submit(tag, kind, offset, buffer);
        }
        shared.held.push_back((tag, position));
        shared.stats.max_held = shared.stats.max_held.max(shared.held.len());
        self.buffers.insert(tag, (kind, offset, buffer));
        let covered = shared
            .gate
            .as_ref()
            .is_none_or(|gate| gate.acked() >= position);
        if !covered {
            shared.stats.held += 1;
        }
        self.release_held()
    }

    /// Issues every held write and flush the backup's ack now covers, in
    /// order.
    pub fn release_held(&mut self) -> Result<(), VmmError> {
        loop {
            let Some(shared) = self.shared.as_mut() else {
                return Ok(());
            };
            let acked = shared.gate.as_ref().map_or(u64::MAX, |gate| gate.acked());
            match shared.held.front() {
                Some(&(tag, position)) if position <= acked => {
                    shared.held.pop_front();
                    self.push(tag)?;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Waits up to `timeout` for the ack that releases the oldest held
    /// write; whether it came.
    pub fn wait_for_ack(&self, timeout: std::time::Duration) -> bool {
        let Some(shared) = self.shared.as_ref() else {
            return true;
        };
        match (shared.held.front(), &shared.gate) {
            (Some(&(_, position)), Some(gate)) => gate.wait_acked(position, timeout),
            _ => true,
        }
    }

    /// The go-live of a backup in shared mode: from now on this replica
    /// owns the image. Every request the guest issued whose completion the
    /// log did not carry is issued again, in issue order (a write the old
    /// primary may already have made is made again, with the same data).
    fn go_live(&mut self) -> Result<(), VmmError> {
        let Some(shared) = self.shared.as_mut() else {
            return Ok(());
        };
        if !shared.following {
            return Ok(());
        }
        shared.following = false;
        let mut tags: Vec<u64> = self.buffers.keys().copied().collect();
        tags.sort_unstable();
        shared.stats.reissued += tags.len() as u64;
        if !tags.is_empty() {
            eprintln!(
                "lockstep disk: live on the shared image {}: re-issuing {} request(s) outstanding at the go-live (tags {:?})",
                self.path.display(),
                tags.len(),
                tags
            );
        }
        for tag in tags {
            self.push(tag)?;
        }
        Ok(())
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hashes the whole image now (a CPU-heavy read of all of it) and
    /// keeps the hash as the disk's identity for [`crate::Machine::attach_disk`]:
    /// done before the replication link is up, so the burst cannot starve
    /// the channel's threads past the peer timeout.
    pub fn identify(mut self) -> Result<Self, VmmError> {
        self.identity = Some(self.content_hash()?);
        Ok(self)
    }

    /// The identity hash: the one [`Self::identify`] kept, else computed.
    pub fn identity(&self) -> Result<u64, VmmError> {
        match self.identity {
            Some(hash) => Ok(hash),
            None => self.content_hash(),
        }
    }

    /// xxh3-64 of the whole image (its identity for a handshake or digest).
    pub fn content_hash(&self) -> Result<u64, VmmError> {
        use std::io::Read;
        let mut file = File::open(&self.path)
            .map_err(|e| io_error(format!("open disk image {}", self.path.display()), e))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let count = file
                .read(&mut buf)
                .map_err(|e| io_error(format!("read disk image {}", self.path.display()), e))?;
            if count == 0 {
                return Ok(hasher.digest());
            }
            hasher.update(&buf[..count]);
        }
    }

    fn submit(
        &mut self,
        tag: u64,
        kind: u32,
        offset: u64,
        buffer: Vec<u8>,
    ) -> Result<(), VmmError> {
        self.buffers.insert(tag, (kind, offset, buffer));
        self.push(tag)
    }

    /// Submits request `tag`, whose buffer is in `self.buffers`, to io_uring.
    fn push(&mut self, tag: u64) -> Result<(), VmmError> {
        let fd = types::Fd(self.file.as_raw_fd());
        let (kind, offset, buffer) = self
            .buffers
            .get_mut(&tag)
            .ok_or_else(|| VmmError::Config(format!("disk request {tag}: its buffer vanished")))?;
        let (kind, offset) = (*kind, *offset);
        let len = u32::try_from(buffer.len()).unwrap_or(u32::MAX);
        let entry = match kind {
            T_IN => opcode::Read::new(fd, buffer.as_mut_ptr(), len)
                .offset(offset)
                .build(),
            T_OUT => opcode::Write::new(fd, buffer.as_ptr(), len)
                .offset(offset)
                .build(),
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(tag);
        // SAFETY: the buffer lives in `self.buffers` (its heap allocation
        // does not move when the map does) until the completion for `tag`
        // is reaped; `Drop` waits for every request in flight. The file
        // descriptor lives as long as `self`.
        unsafe {
            self.ring.submission().push(&entry).map_err(|_| {
                VmmError::Config(format!(
                    "disk request {tag}: the io_uring submission queue is full"
                ))
            })?;
        }
        self.in_flight += 1;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(io_error(
                        format!("submit disk request {tag} to io_uring"),
                        e,
                    ));
                }
            }
        }
    }

    /// Waits until the host has finished every request in flight (their
    /// completions stay queued for the guest's next poll).
    pub fn drain(&mut self) -> Result<(), VmmError> {
        while self.in_flight > 0 {
            self.reap(true)?;
        }
        Ok(())
    }

    /// What a state transfer's thread needs to copy this disk while the
    /// guest runs: a second descriptor of the image and the dirty blocks.
    pub fn copier(&self) -> DiskCopier {
        DiskCopier {
            file: Arc::clone(&self.file),
            path: self.path.clone(),
            capacity: self.capacity,
            dirty: Arc::clone(&self.dirty),
        }
    }

    /// Reads `len` bytes at `offset` of the image (the caller has drained
    /// the requests in flight, or copies blocks a later round re-sends).
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, VmmError> {
        read_image(&self.file, &self.path, offset, len)
    }

    /// Puts the requests a state transfer carried back: each finished on
    /// the primary's host before the capture, and its completion reaches
    /// the guest at the exit the log names.
    fn restore_requests(&mut self, pending: &[PendingState]) {
        for request in pending {
            self.buffers.insert(
                request.tag,
                (request.kind, request.offset, request.data.clone()),
            );
            self.finished.push_back(request.done);
        }
    }

    /// Moves io_uring completions into `finished`; waits for one first if
    /// `wait` and anything is in flight.
    fn reap(&mut self, wait: bool) -> Result<(), VmmError> {
        if wait && self.in_flight > 0 && self.ring.completion().is_empty() {
            loop {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error("wait for disk completions".into(), e)),
                }
            }
        }
        let entries: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (tag, result) in entries {
            self.in_flight = self.in_flight.saturating_sub(1);
            let Some((kind, offset, buffer)) = self.buffers.get(&tag) else {
                continue;
            };
            if *kind == T_OUT {
                // Landed (or failed part-way): a transfer must copy it.
                self.dirty.mark(*offset, buffer.len() as u64);
            }
            let expected = buffer.len();
            let ok = usize::try_from(result).is_ok_and(|done| done == expected);
            let status = if ok { S_OK } else { S_IOERR };
            let (len, hash) = if ok && *kind == T_IN {
                (expected as u32 + 1, xxhash_rust::xxh3::xxh3_64(buffer))
            } else {
                (1, 0)
            };
            if !ok {
                self.host_errors += 1;
                let why = if result < 0 {
                    std::io::Error::from_raw_os_error(-result).to_string()
                } else {
                    format!("{result} of {expected} bytes done")
                };
                if self.shared.is_some() {
                    // The backup cannot reproduce a host error of the one
                    // image: the primary stops, and the backup takes over.
                    return Err(io_error(
                        format!(
                            "disk request {tag} on the shared image {} failed on the host ({why}): fail-stop (in shared-disk mode a host I/O error stops the primary; the backup takes over and re-issues it)",
                            self.path.display()
                        ),
                        if result < 0 {
                            std::io::Error::from_raw_os_error(-result)
                        } else {
                            std::io::Error::other(why.clone())
                        },
                    ));
                }
                eprintln!(
                    "lockstep disk: request {tag} on {} failed on the host: {why}; the guest gets an I/O error",
                    self.path.display()
                );
            }
            self.finished.push_back(Completion {
                tag,
                len,
                status,
                hash,
            });
        }
        Ok(())
    }

    fn take_buffer(&mut self, tag: u64) -> Vec<u8> {
        self.buffers
            .remove(&tag)
            .map(|(_, _, buffer)| buffer)
            .unwrap_or_default()
    }
}

impl DiskCompleter for Disk {
    fn harvest(&mut self) -> Result<Vec<Completion>, VmmError> {
        // A live source asks: a following disk goes live here.
        self.go_live()?;
        self.release_held()?;
        self.reap(true)?;
        Ok(self.finished.drain(..).collect())
    }

    fn carries_data(&self) -> bool {
        self.shared.is_some()
    }

    fn read_data(&self, tag: u64) -> &[u8] {
        match self.buffers.get(&tag) {
            Some((T_IN, _, data)) => data,
            _ => &[],
        }
    }

    fn accept(&mut self, done: &Completion, data: &[u8]) -> Result<(), VmmError> {
        let tag = done.tag;
        let mismatch = |why: String| {
            Err(VmmError::LogMismatch(format!(
                "the log completes disk request {tag}: {why}"
            )))
        };
        if !self.is_following() {
            return mismatch(
                "with the primary's read data, but this replica does not follow in shared-disk mode"
                    .into(),
            );
        }
        let Some((kind, _, buffer)) = self.buffers.get_mut(&tag) else {
            return mismatch("this replica never issued it".into());
        };
        let reads = *kind == T_IN && done.status == S_OK;
        if !reads {
            if !data.is_empty() || done.len != 1 {
                return mismatch(format!(
                    "a type-{kind} request with status {} completes with {} bytes ({} of data logged)",
                    done.status,
                    done.len,
                    data.len()
                ));
            }
            return Ok(());
        }
        if data.len() != buffer.len()
            || u64::from(done.len) != buffer.len() as u64 + 1
            || xxhash_rust::xxh3::xxh3_64(data) != done.hash
        {
            return mismatch(format!(
                "a {}-byte read completes with {} bytes of data logged (length {}, hash {:016x}): the data does not match its record",
                buffer.len(),
                data.len(),
                done.len,
                done.hash
            ));
        }
        buffer.copy_from_slice(data);
        if let Some(shared) = self.shared.as_mut() {
            shared.stats.followed_read_bytes += data.len() as u64;
        }
        Ok(())
    }

    fn wait_for(&mut self, tag: u64) -> Result<Completion, VmmError> {
        loop {
            if let Some(at) = self.finished.iter().position(|done| done.tag == tag) {
                return self.finished.remove(at).ok_or_else(|| {
                    VmmError::Config(format!("disk request {tag}: completion vanished"))
                });
            }
            if !self.buffers.contains_key(&tag) || self.in_flight == 0 {
                return Err(VmmError::LogMismatch(format!(
                    "the log completes disk request {tag}, which this replica never issued"
                )));
            }
            self.reap(true)?;
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        // The kernel may still write into buffers of requests in flight.
        while self.in_flight > 0 {
            if self.reap(true).is_err() {
                break;
            }
        }
    }
}

/// A request waiting for its host completion.
struct Pending {
    head: u16,
    kind: u32,
    /// Guest buffers a read fills, in order.
    targets: Vec<(u64, u32)>,
    status_addr: u64,
}

/// Counters of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests submitted to the host.
    pub submitted: u64,
    /// Requests completed into the used ring (any status).
    pub completed: u64,
    /// Requests refused at once (malformed, out of range, read-only).
    pub refused: u64,
    /// Bytes read and written by the guest.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// The virtio-blk device.
pub struct VirtioBlk {
    disk: Disk,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queue: Queue,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    stats: BlkStats,
    /// Blocks written since the last digest (see [`Self::settle_digest`]).
    written: BTreeSet<u64>,
    /// Running hash of the disk's written blocks, as of the last digest.
    disk_digest: u64,
}

struct Refusal {
    status: u8,
    why: String,
}

impl VirtioBlk {
    /// A device over `disk`.
    pub fn new(disk: Disk) -> Result<Self, VmmError> {
        let queue = Queue::new(QUEUE_SIZE)
            .map_err(|e| VmmError::Config(format!("create the virtio-blk queue: {e:?}")))?;
        Ok(Self {
            disk,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queue,
            next_tag: 1,
            pending: HashMap::new(),
            stats: BlkStats::default(),
            written: BTreeSet::new(),
            disk_digest: 0,
        })
    }

    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Counters.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// Requests issued to the host and not yet completed to the guest.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    fn features(&self) -> u64 {
        F_VERSION_1 | F_FLUSH | if self.disk.read_only { F_RO } else { 0 }
    }

    fn is_running(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_FAILED == 0
            && self.queue.ready()
    }

    /// Reads a register other than InterruptStatus (see [`Self::poll`]).
    pub fn read(&self, offset: u64, len: usize) -> Result<u32, String> {
        if offset >= 0x100 {
            let config = (self.disk.capacity / SECTOR).to_le_bytes();
            let start = usize::try_from(offset - 0x100).unwrap_or(usize::MAX);
            let end = start.saturating_add(len);
            if !matches!(len, 1 | 2 | 4) || end > config.len() {
                return Err(format!(
                    "{len}-byte read at virtio-blk config offset {:#x}, outside the 8-byte config space",
                    offset - 0x100
                ));
            }
            let mut value = [0u8; 4];
            value[..len].copy_from_slice(&config[start..end]);
            return Ok(u32::from_le_bytes(value));
        }
        if len != 4 {
            return Err(format!(
                "{len}-byte read of virtio-blk register {offset:#x}: registers are 32-bit"
            ));
        }
        let features = self.features();
        Ok(match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => DEVICE_ID_BLK,
            0x00c => VENDOR_ID,
            0x010 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x034 => {
                if self.queue_sel == 0 {
                    u32::from(QUEUE_SIZE)
                } else {
                    0
                }
            }
            0x044 => u32::from(self.queue_sel == 0 && self.queue.ready()),
            0x070 => self.status,
            0x0fc => 0,
            other => {
                return Err(format!(
                    "read of virtio-blk register {other:#x}, which is not readable"
                ));
            }
        })
    }

    /// Writes a register; `Ok(true)` for a queue notify (call
    /// [`Self::notify`]).
    pub fn write(&mut self, offset: u64, len: usize, value: u32) -> Result<bool, String> {
        if len != 4 {
            return Err(format!(
                "{len}-byte write of virtio-blk register {offset:#x}: registers are 32-bit"
            ));
        }
        match offset {
            0x014 => self.device_features_sel = value,
            0x024 => self.driver_features_sel = value,
            0x020 => match self.driver_features_sel {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x030 => self.queue_sel = value,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                if self.status & STATUS_DRIVER_OK != 0 {
                    return Err(format!(
                        "virtio-blk queue register {offset:#x} written after DRIVER_OK"
                    ));
                }
                if self.queue_sel != 0 {
                    return Err(format!(
                        "write to virtio-blk register {offset:#x} with queue {} selected: there is 1 queue",
                        self.queue_sel
                    ));
                }
                let queue = &mut self.queue;
                match offset {
                    0x038 => {
                        let size = u16::try_from(value).unwrap_or(0);
                        if size == 0 || size > QUEUE_SIZE || !size.is_power_of_two() {
                            return Err(format!(
                                "virtio-blk queue size {value}: must be a power of two up to {QUEUE_SIZE}"
                            ));
                        }
                        queue.set_size(size);
                    }
                    0x044 => queue.set_ready(value == 1),
                    0x080 => queue.set_desc_table_address(Some(value), None),
                    0x084 => queue.set_desc_table_address(None, Some(value)),
                    0x090 => queue.set_avail_ring_address(Some(value), None),
                    0x094 => queue.set_avail_ring_address(None, Some(value)),
                    0x0a0 => queue.set_used_ring_address(Some(value), None),
                    _ => queue.set_used_ring_address(None, Some(value)),
                }
            }
            0x050 => {
                if value != 0 {
                    return Err(format!(
                        "notify of virtio-blk queue {value}: there is 1 queue"
                    ));
                }
                return Ok(true);
            }
            0x064 => {}
            0x070 => {
                if value == 0 {
                    if !self.pending.is_empty() {
                        return Err(format!(
                            "virtio-blk reset with {} requests in flight",
                            self.pending.len()
                        ));
                    }
                    self.status = 0;
                    self.driver_features = 0;
                    self.device_features_sel = 0;
                    self.driver_features_sel = 0;
                    self.queue_sel = 0;
                    self.queue.reset();
                    return Ok(false);
                }
                if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    let unsupported = self.driver_features & !self.features();
                    if unsupported != 0 || self.driver_features & F_VERSION_1 == 0 {
                        self.status = value & !STATUS_FEATURES_OK;
                        return Ok(false);
                    }
                }
                self.status = value;
            }
            other => {
                return Err(format!(
                    "write of {value:#x} to virtio-blk register {other:#x}, which is not writable"
                ));
            }
        }
        Ok(false)
    }

    /// The guest notified the queue: take every request, refuse the bad
    /// ones at once and submit the rest to the host.
    ///
    /// `position` is the log position at this exit: in shared-disk mode a
    /// write produced here reaches the image only once the backup's ack
    /// covers it.
    pub fn notify(&mut self, memory: &GuestRam, position: u64) -> Result<(), VmmError> {
        if !self.is_running() {
            return Ok(());
        }
        while let Some(chain) = self.queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.clone().collect();
            let cut_short = descriptors.last().is_some_and(|d| d.has_next());
            let status_addr = descriptors
                .last()
                .filter(|d| d.is_write_only() && d.len() >= 1 && !cut_short)
                .map(|d| d.addr().0 + u64::from(d.len()) - 1)
                .filter(|addr| memory.check_range(GuestAddress(*addr), 1));
            let Some(status_addr) = status_addr else {
                self.refuse(
                    memory,
                    head,
                    None,
                    "no device-writable status byte at the end of the chain (or the chain loops)",
                )?;
                continue;
            };
            match self.parse(memory, &descriptors) {
                Ok((kind, offset, buffer, targets)) => {
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    match kind {
                        T_GET_ID => {
                            let id = self.disk.serial;
                            let mut written = 0u32;
                            let mut rest: &[u8] = &id;
                            for (addr, len) in &targets {
                                let take = rest.len().min(*len as usize);
                                write_guest(memory, *addr, &rest[..take])?;
                                rest = &rest[take..];
                                written += take as u32;
                            }
                            write_guest(memory, status_addr, &[S_OK])?;
                            self.used(memory, head, written + 1)?;
                        }
                        _ => {
                            self.pending.insert(
                                tag,
                                Pending {
                                    head,
                                    kind,
                                    targets,
                                    status_addr,
                                },
                            );
                            self.stats.submitted += 1;
                            if kind == T_OUT && !buffer.is_empty() {
                                if self.disk.is_shared() {
                                    // One image: the digest covers what the
                                    // guest wrote, never a read of it.
                                    let mut record = [0u8; 24];
                                    record[..8].copy_from_slice(&self.disk_digest.to_le_bytes());
                                    record[8..16].copy_from_slice(&offset.to_le_bytes());
                                    record[16..].copy_from_slice(
                                        &xxhash_rust::xxh3::xxh3_64(&buffer).to_le_bytes(),
                                    );
                                    self.disk_digest = xxhash_rust::xxh3::xxh3_64(&record);
                                } else {
                                    let last = (offset + buffer.len() as u64 - 1) / DISK_BLOCK;
                                    self.written.extend(offset / DISK_BLOCK..=last);
                                }
                            }
                            self.disk.issue(tag, kind, offset, buffer, position)?;
                        }
                    }
                }
                Err(refusal) => self.refuse(
                    memory,
                    head,
                    Some((status_addr, refusal.status)),
                    &refusal.why,
                )?,
            }
        }
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        &self,
        memory: &GuestRam,
        descriptors: &[virtio_queue::desc::split::Descriptor],
    ) -> Result<(u32, u64, Vec<u8>, Vec<(u64, u32)>), Refusal> {
        let ioerr = |why: String| Refusal {
            status: S_IOERR,
            why,
        };
        let [header, data @ .., _status] = descriptors else {
            return Err(ioerr(
                "a chain needs a header and a status descriptor".into(),
            ));
        };
        if header.is_write_only() || header.len() < 16 {
            return Err(ioerr(format!(
                "the header descriptor must be device-readable and at least 16 bytes (it has {} bytes{})",
                header.len(),
                if header.is_write_only() {
                    ", device-writable"
                } else {
                    ""
                }
            )));
        }
        let mut raw = [0u8; 16];
        memory.read_slice(&mut raw, header.addr()).map_err(|e| {
            ioerr(format!(
                "read the request header at {:#x}: {e}",
                header.addr().0
            ))
        })?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&raw[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let mut total = 0u64;
        let mut targets = Vec::with_capacity(data.len());
        for descriptor in data {
            let wants_write = matches!(kind, T_IN | T_GET_ID);
            if descriptor.is_write_only() != wants_write {
                return Err(ioerr(format!(
                    "a data descriptor of a type-{kind} request is {}",
                    if wants_write {
                        "device-readable"
                    } else {
                        "device-writable"
                    }
                )));
            }
            if !memory.check_range(descriptor.addr(), descriptor.len() as usize) {
                return Err(ioerr(format!(
                    "data buffer {:#x}+{:#x} lies outside guest memory",
                    descriptor.addr().0,
                    descriptor.len()
                )));
            }
            total += u64::from(descriptor.len());
            targets.push((descriptor.addr().0, descriptor.len()));
        }
        match kind {
            T_IN | T_OUT => {
                if !total.is_multiple_of(SECTOR) || total == 0 || total > MAX_REQUEST_BYTES {
                    return Err(ioerr(format!(
                        "a data length of {total} bytes: must be a non-zero multiple of {SECTOR} up to {MAX_REQUEST_BYTES}"
                    )));
                }
                let offset = sector.checked_mul(SECTOR);
                if offset
                    .and_then(|offset| offset.checked_add(total))
                    .is_none_or(|end| end > self.disk.capacity)
                {
                    return Err(ioerr(format!(
                        "{total} bytes at sector {sector} lie beyond the end of the disk ({} sectors)",
                        self.disk.capacity / SECTOR
                    )));
                }
                if kind == T_OUT && self.disk.read_only {
                    return Err(ioerr(format!(
                        "a write to sector {sector} of a read-only disk"
                    )));
                }
                let mut buffer = vec![0u8; total as usize];
                if kind == T_OUT {
                    let mut at = 0usize;
                    for (addr, len) in &targets {
                        let len = *len as usize;
                        memory
                            .read_slice(&mut buffer[at..at + len], GuestAddress(*addr))
                            .map_err(|e| ioerr(format!("read write data at {addr:#x}: {e}")))?;
                        at += len;
                    }
                }
                Ok((kind, offset.unwrap_or(0), buffer, targets))
            }
            T_FLUSH => Ok((kind, 0, Vec::new(), targets)),
            T_GET_ID => Ok((kind, 0, Vec::new(), targets)),
            other => Err(Refusal {
                status: S_UNSUPP,
                why: format!("request type {other} is not supported"),
            }),
        }
    }

    fn refuse(
        &mut self,
        memory: &GuestRam,
        head: u16,
        status: Option<(u64, u8)>,
        why: &str,
    ) -> Result<(), VmmError> {
        self.stats.refused += 1;
        eprintln!(
            "lockstep disk: refused request (descriptor {head}) on {}: {why}",
            self.disk.path.display()
        );
        let len = match status {
            Some((addr, value)) => {
                write_guest(memory, addr, &[value])?;
                1
            }
            None => 0,
        };
        self.used(memory, head, len)
    }

    fn used(&mut self, memory: &GuestRam, head: u16, len: u32) -> Result<(), VmmError> {
        self.stats.completed += 1;
        self.queue
            .add_used(memory, head, len)
            .map_err(|e| VmmError::Memory(format!("return virtio-blk request {head}: {e:?}")))
    }

    /// The guest polls (reads InterruptStatus) at `exit`: the requests
    /// `events` says are done enter the used ring. Returns 1 if any did.
    pub fn poll<E: crate::events::EventSource + ?Sized>(
        &mut self,
        memory: &GuestRam,
        events: &mut E,
        exit: u64,
    ) -> Result<u32, VmmError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        if self.disk.held() > 0 {
            self.await_release(events, exit)?;
        }
        let done = events.blk_done(exit, &mut self.disk)?;
        let mut delivered = 0;
        for completion in &done {
            let pending = self.pending.remove(&completion.tag).ok_or_else(|| {
                VmmError::LogMismatch(format!(
                    "disk completion at exit {exit} names request {}, which is not outstanding",
                    completion.tag
                ))
            })?;
            let buffer = self.disk.take_buffer(completion.tag);
            let mut len = 1u32;
            if pending.kind == T_IN && completion.status == S_OK {
                let mut at = 0usize;
                for (addr, size) in &pending.targets {
                    let size = *size as usize;
                    write_guest(memory, *addr, buffer.get(at..at + size).unwrap_or(&[]))?;
                    at += size;
                }
                len += at as u32;
                self.stats.bytes_read += at as u64;
            } else if pending.kind == T_OUT && completion.status == S_OK {
                self.stats.bytes_written += pending
                    .targets
                    .iter()
                    .map(|(_, len)| u64::from(*len))
                    .sum::<u64>();
            }
            write_guest(memory, pending.status_addr, &[completion.status])?;
            self.used(memory, pending.head, len)?;
            delivered += 1;
        }
        Ok(u32::from(delivered > 0))
    }
}

impl VirtioBlk {
    /// Shared mode, the primary: the guest polls with only held writes
    /// outstanding. Makes sure the backup hears of the entries that
    /// produced them, then waits for its ack and issues them; the wait
    /// is in short slices, each followed by a sync, so the event sink's
    /// liveness check runs (a lost backup opens the gate, or fails over).
    fn await_release<E: crate::events::EventSource + ?Sized>(
        &mut self,
        events: &mut E,
        exit: u64,
    ) -> Result<(), VmmError> {
        loop {
            self.disk.release_held()?;
            if self.disk.in_flight() > 0 || self.disk.held() == 0 {
                return Ok(());
            }
            events.sync(exit - 1)?;
            self.disk.wait_for_ack(std::time::Duration::from_millis(2));
        }
    }
}

/// A run of disk bytes `(offset, bytes)`.
pub type DiskRun = (u64, Vec<u8>);

/// Granularity of the disk's dirty tracking (pre-copy and digests).
pub const DISK_BLOCK: u64 = 64 << 10;

fn read_image(file: &File, path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, VmmError> {
    use std::os::unix::fs::FileExt;
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset).map_err(|e| {
        io_error(
            format!(
                "read {len} bytes at offset {offset} of disk image {}",
                path.display()
            ),
            e,
        )
    })?;
    Ok(data)
}

/// The blocks written since a transfer's last look, one bit per
/// [`DISK_BLOCK`]; marked as each write completes on the host (so a block
/// read after its bit was cleared holds that write, or is sent again).
pub struct DirtyBlocks {
    logging: AtomicBool,
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl DirtyBlocks {
    fn new(capacity: u64) -> Self {
        let blocks = capacity.div_ceil(DISK_BLOCK);
        Self {
            logging: AtomicBool::new(false),
            words: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            blocks,
        }
    }

    fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.logging.load(Ordering::Acquire) {
            return;
        }
        let last = ((offset + len - 1) / DISK_BLOCK).min(self.blocks.saturating_sub(1));
        for block in offset / DISK_BLOCK..=last {
            if let Some(word) = self.words.get((block / 64) as usize) {
                word.fetch_or(1 << (block % 64), Ordering::AcqRel);
            }
        }
    }

    /// The marked blocks, in order; clears them.
    fn take(&self) -> Vec<u64> {
        let mut blocks = Vec::new();
        for (index, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                blocks.push(index as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        blocks
    }
}

/// A state transfer's access to the disk while the guest runs (from
/// [`Disk::copier`]): read blocks through the image's descriptor, learn
/// which were written since the last look.
#[derive(Clone)]
pub struct DiskCopier {
    file: Arc<File>,
    path: PathBuf,
    capacity: u64,
    dirty: Arc<DirtyBlocks>,
}

impl DiskCopier {
    /// Size of the disk in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Turns dirty tracking on and forgets older marks: a first round
    /// that reads every block after this call misses no write.
    pub fn start(&self) {
        self.dirty.logging.store(true, Ordering::Release);
        self.dirty.take();
    }

    /// Turns dirty tracking off (the transfer ended or was abandoned).
    pub fn stop(&self) {
        self.dirty.logging.store(false, Ordering::Release);
    }

    /// The blocks written since the last call (or [`Self::start`]).
    pub fn take_dirty(&self) -> Vec<u64> {
        self.dirty.take()
    }

    /// Block `index`'s bytes (the last block may be short).
    pub fn read_block(&self, index: u64) -> Result<Vec<u8>, VmmError> {
        let offset = index * DISK_BLOCK;
        let len = DISK_BLOCK.min(self.capacity.saturating_sub(offset)) as usize;
        read_image(&self.file, &self.path, offset, len)
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.dirty.blocks
    }
}

/// A request issued to the host before a state transfer's capture and not
/// yet delivered to the guest: the capture waited for its host completion,
/// which travels with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingState {
    /// Its tag.
    pub tag: u64,
    /// Head descriptor index.
    pub head: u16,
    /// Request type.
    pub kind: u32,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Guest address of the status byte.
    pub status_addr: u64,
    /// Guest buffers a read fills (or a write's sources), in order.
    pub targets: Vec<(u64, u32)>,
    /// The host's completion.
    pub done: Completion,
    /// The data a read returned (empty for other requests); travels in
    /// its own `disk-read` chunk, not in [`BlkState::to_bytes`].
    pub data: Vec<u8>,
}

/// The virtio-blk device's complete state, for a state transfer (the
/// image's blocks travel beside it).
///
/// ```text
/// offset  size  field
/// 0       8     capacity in bytes
/// 8       8     content hash of the image at the capture (xxh3-64)
/// 16      1     content hash present (0/1), 7 zero
/// 24      16    status, DeviceFeaturesSel, DriverFeaturesSel, QueueSel (u32 each)
/// 40      8     driver features
/// 48      40    the queue: max size, size, next avail, next used (u16 each),
///               ready, event idx (u8 each), 6 zero, desc, avail, used (u64 each)
/// 88      64    next tag, submitted, completed, refused, bytes read,
///               bytes written, host errors, disk digest (u64 each)
/// 152     8     written blocks count n (u32), pending count m (u32)
/// 160     8n    written blocks since the last digest (u64 each)
///         …     m pending requests: tag u64, head u16, 2 zero, kind u32,
///               offset u64, status addr u64, len u32, status u8, 3 zero,
///               hash u64, target count t u32, 4 zero (56 bytes), then
///               t targets: address u64, length u32, 4 zero
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkState {
    /// Size of the disk.
    pub capacity: u64,
    /// xxh3-64 of the whole image at the capture, if taken: the receiver
    /// checks its copy against it (the disk's part of the hand-over digest).
    pub content_hash: Option<u64>,
    /// Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// The request queue.
    pub queue: nic::virtio::QueueSnapshot,
    /// The next request's tag.
    pub next_tag: u64,
    /// Counters.
    pub stats: BlkStats,
    /// Host errors seen.
    pub host_errors: u64,
    /// The running digest of written blocks.
    pub disk_digest: u64,
    /// Blocks written since the last digest.
    pub written: Vec<u64>,
    /// Requests not yet delivered.
    pub pending: Vec<PendingState>,
}

const BLK_STATE_FIXED: usize = 160;
const PENDING_FIXED: usize = 56;

impl BlkState {
    /// The state's bytes (see the type's docs); read data excluded.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLK_STATE_FIXED + 8 * self.written.len());
        let u64s = |out: &mut Vec<u8>, words: &[u64]| {
            for word in words {
                out.extend_from_slice(&word.to_le_bytes());
            }
        };
        u64s(&mut out, &[self.capacity, self.content_hash.unwrap_or(0)]);
        out.push(u8::from(self.content_hash.is_some()));
        out.extend_from_slice(&[0; 7]);
        for word in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
            self.queue_sel,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        u64s(&mut out, &[self.driver_features]);
        let q = &self.queue;
        for half in [q.max_size, q.size, q.next_avail, q.next_used] {
            out.extend_from_slice(&half.to_le_bytes());
        }
        out.extend_from_slice(&[u8::from(q.ready), u8::from(q.event_idx), 0, 0, 0, 0, 0, 0]);
        u64s(&mut out, &[q.desc_table, q.avail_ring, q.used_ring]);
        let st = &self.stats;
        u64s(
            &mut out,
            &[
                self.next_tag,
                st.submitted,
                st.completed,
                st.refused,
                st.bytes_read,
                st.bytes_written,
                self.host_errors,
                self.disk_digest,
            ],
        );
        out.extend_from_slice(&(self.written.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.pending.len() as u32).to_le_bytes());
        u64s(&mut out, &self.written);
        for p in &self.pending {
            out.extend_from_slice(&p.tag.to_le_bytes());
            out.extend_from_slice(&p.head.to_le_bytes());
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&p.kind.to_le_bytes());
            u64s(&mut out, &[p.offset, p.status_addr]);
            out.extend_from_slice(&p.done.len.to_le_bytes());
            out.extend_from_slice(&[p.done.status, 0, 0, 0]);
            u64s(&mut out, &[p.done.hash]);
            out.extend_from_slice(&(p.targets.len() as u32).to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            for (addr, len) in &p.targets {
                out.extend_from_slice(&addr.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
        }
        out
    }

    /// Parses [`Self::to_bytes`]; says what is wrong, and where.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let mut at = 0usize;
        let mut take = |len: usize, what: &str| -> Result<&[u8], String> {
            let part = bytes.get(at..at + len).ok_or_else(|| {
                format!(
                    "virtio-blk state ends at byte {} inside {what} ({len} bytes from byte {at})",
                    bytes.len()
                )
            })?;
            at += len;
            Ok(part)
        };
        let u64_of = |raw: &[u8]| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&raw[..8]);
            u64::from_le_bytes(word)
        };
        let u32_of = |raw: &[u8]| u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let u16_of = |raw: &[u8]| u16::from_le_bytes([raw[0], raw[1]]);
        let flag = |value: u8, what: &str| match value {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("virtio-blk state: {what} is {other}, not 0 or 1")),
        };
        let fixed = take(BLK_STATE_FIXED, "the fixed part")?;
        let capacity = u64_of(&fixed[0..]);
        let content_hash = flag(fixed[16], "the content-hash flag")?.then(|| u64_of(&fixed[8..]));
        if fixed[17..24] != [0; 7] || fixed[58..64] != [0; 6] {
            return Err("virtio-blk state: non-zero padding".into());
        }
        if capacity == 0 || !capacity.is_multiple_of(SECTOR) {
            return Err(format!(
                "virtio-blk state: a disk of {capacity} bytes is not a whole number of sectors"
            ));
        }
        let queue = nic::virtio::QueueSnapshot {
            max_size: u16_of(&fixed[48..]),
            size: u16_of(&fixed[50..]),
            next_avail: u16_of(&fixed[52..]),
            next_used: u16_of(&fixed[54..]),
            ready: flag(fixed[56], "queue ready")?,
            event_idx: flag(fixed[57], "queue event idx")?,
            desc_table: u64_of(&fixed[64..]),
            avail_ring: u64_of(&fixed[72..]),
            used_ring: u64_of(&fixed[80..]),
        };
        let word = |i: usize| u64_of(&fixed[88 + 8 * i..]);
        let written_count = u32_of(&fixed[152..]) as u64;
        let pending_count = u32_of(&fixed[156..]);
        let blocks = capacity.div_ceil(DISK_BLOCK);
        if written_count > blocks {
            return Err(format!(
                "virtio-blk state: {written_count} written blocks, the disk has {blocks}"
            ));
        }
        if pending_count > u32::from(QUEUE_SIZE) {
            return Err(format!(
                "virtio-blk state: {pending_count} pending requests, the queue holds {QUEUE_SIZE}"
            ));
        }
        // Each written block takes 8 bytes of the state, so a count the
        // bytes cannot hold is refused before anything is allocated for it.
        if written_count > (bytes.len() / 8) as u64 {
            return Err(format!(
                "virtio-blk state: {written_count} written blocks do not fit in its {} bytes",
                bytes.len()
            ));
        }
        let mut written = Vec::with_capacity(written_count as usize);
        for _ in 0..written_count {
            let block = u64_of(take(8, "a written block")?);
            if block >= blocks {
                return Err(format!(
                    "virtio-blk state: written block {block} is beyond the disk's {blocks}"
                ));
            }
            written.push(block);
        }
        let mut pending = Vec::with_capacity(pending_count as usize);
        for index in 0..pending_count {
            let raw = take(PENDING_FIXED, "a pending request")?;
            let done = Completion {
                tag: u64_of(&raw[0..]),
                len: u32_of(&raw[32..]),
                status: raw[36],
                hash: u64_of(&raw[40..]),
            };
            if done.status > S_UNSUPP {
                return Err(format!(
                    "virtio-blk state: pending request {index} has status {}",
                    done.status
                ));
            }
            let targets_count = u32_of(&raw[48..]);
            if targets_count > u32::from(QUEUE_SIZE) {
                return Err(format!(
                    "virtio-blk state: pending request {index} has {targets_count} buffers"
                ));
            }
            let mut request = PendingState {
                tag: done.tag,
                head: u16_of(&raw[8..]),
                kind: u32_of(&raw[12..]),
                offset: u64_of(&raw[16..]),
                status_addr: u64_of(&raw[24..]),
                targets: Vec::with_capacity(targets_count as usize),
                done,
                data: Vec::new(),
            };
            for _ in 0..targets_count {
                let target = take(16, "a request buffer")?;
                request
                    .targets
                    .push((u64_of(&target[0..]), u32_of(&target[8..])));
            }
            pending.push(request);
        }
        if at != bytes.len() {
            return Err(format!(
                "virtio-blk state has {} bytes after its end at byte {at}",
                bytes.len() - at
            ));
        }
        Ok(Self {
            capacity,
            content_hash,
            status: u32_of(&fixed[24..]),
            device_features_sel: u32_of(&fixed[28..]),
            driver_features_sel: u32_of(&fixed[32..]),
            queue_sel: u32_of(&fixed[36..]),
            driver_features: u64_of(&fixed[40..]),
            queue,
            next_tag: word(0),
            stats: BlkStats {
                submitted: word(1),
                completed: word(2),
                refused: word(3),
                bytes_read: word(4),
                bytes_written: word(5),
            },
            host_errors: word(6),
            disk_digest: word(7),
            written,
            pending,
        })
    }
}

impl VirtioBlk {
    /// The running digest of the disk as of the last [`Self::settle_digest`].
    pub fn disk_digest(&self) -> u64 {
        self.disk_digest
    }

    /// At a digest exit (the same on every replica): waits for the
    /// requests in flight, then folds every block written since the last
    /// digest, read back from this replica's own image, into the running
    /// digest, in block order: `d = xxh3(d ‖ block ‖ xxh3(block bytes))`.
    /// So images that differ in a written block make the digests differ
    /// without the guest reading it; the cost is one read per written
    /// block per digest.
    pub fn settle_digest(&mut self) -> Result<u64, VmmError> {
        if self.written.is_empty() {
            return Ok(self.disk_digest);
        }
        self.disk.drain()?;
        for block in std::mem::take(&mut self.written) {
            let offset = block * DISK_BLOCK;
            let len = DISK_BLOCK.min(self.disk.capacity.saturating_sub(offset)) as usize;
            let data = self.disk.read_at(offset, len)?;
            let mut record = [0u8; 24];
            record[..8].copy_from_slice(&self.disk_digest.to_le_bytes());
            record[8..16].copy_from_slice(&block.to_le_bytes());
            record[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&data).to_le_bytes());
            self.disk_digest = xxhash_rust::xxh3::xxh3_64(&record);
        }
        Ok(self.disk_digest)
    }

    /// A state transfer's pause: waits for the requests in flight, stops
    /// the dirty tracking, and copies what is still dirty (`(offset,
    /// bytes)` runs) and the device's state (with the image's content hash
    /// if `content_hash`: a read of the whole image during the pause).
    pub fn capture(&mut self, content_hash: bool) -> Result<(BlkState, Vec<DiskRun>), VmmError> {
        if self.disk.is_shared() {
            return Err(VmmError::Config(
                "a state transfer of a VM in shared-disk mode is not built yet (issue 19): a backup cannot join it; run the pair in local-disks mode to re-protect".into(),
            ));
        }
        self.disk.drain()?;
        self.disk.dirty.logging.store(false, Ordering::Release);
        let mut blocks = Vec::new();
        for block in self.disk.dirty.take() {
            let offset = block * DISK_BLOCK;
            let len = DISK_BLOCK.min(self.disk.capacity.saturating_sub(offset)) as usize;
            blocks.push((offset, self.disk.read_at(offset, len)?));
        }
        let mut pending = Vec::with_capacity(self.pending.len());
        let mut tags: Vec<u64> = self.pending.keys().copied().collect();
        tags.sort_unstable();
        for tag in tags {
            let Some(request) = self.pending.get(&tag) else {
                continue;
            };
            let done = self
                .disk
                .finished
                .iter()
                .find(|done| done.tag == tag)
                .copied()
                .ok_or_else(|| {
                    VmmError::Config(format!(
                        "disk request {tag} is outstanding but has no host completion after the drain"
                    ))
                })?;
            let (offset, data) = match self.disk.buffers.get(&tag) {
                Some((T_IN, offset, data)) => (*offset, data.clone()),
                Some((_, offset, _)) => (*offset, Vec::new()),
                None => (0, Vec::new()),
            };
            pending.push(PendingState {
                tag,
                head: request.head,
                kind: request.kind,
                offset,
                status_addr: request.status_addr,
                targets: request.targets.clone(),
                done,
                data,
            });
        }
        let state = self.queue.state();
        let saved = BlkState {
            capacity: self.disk.capacity,
            content_hash: if content_hash {
                Some(self.disk.content_hash()?)
            } else {
                None
            },
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            driver_features: self.driver_features,
            queue: nic::virtio::QueueSnapshot {
                max_size: state.max_size,
                size: state.size,
                next_avail: state.next_avail,
                next_used: state.next_used,
                ready: state.ready,
                event_idx: state.event_idx_enabled,
                desc_table: state.desc_table,
                avail_ring: state.avail_ring,
                used_ring: state.used_ring,
            },
            next_tag: self.next_tag,
            stats: self.stats,
            host_errors: self.disk.host_errors,
            disk_digest: self.disk_digest,
            written: self.written.iter().copied().collect(),
            pending,
        };
        Ok((saved, blocks))
    }

    /// Rebuilds the device of a state transfer over `disk` (the receiver's
    /// copy of the image, already written).
    pub fn restore(mut disk: Disk, state: &BlkState) -> Result<Self, VmmError> {
        if disk.capacity != state.capacity {
            return Err(VmmError::Config(format!(
                "disk image {} has {} bytes, the transferred disk {}",
                disk.path.display(),
                disk.capacity,
                state.capacity
            )));
        }
        let q = state.queue;
        if q.max_size != QUEUE_SIZE {
            return Err(VmmError::Config(format!(
                "the transferred virtio-blk queue has maximum size {}, this device offers {QUEUE_SIZE}",
                q.max_size
            )));
        }
        let queue = Queue::try_from(virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        })
        .map_err(|e| VmmError::Config(format!("the transferred virtio-blk queue: {e:?}")))?;
        disk.host_errors = state.host_errors;
        disk.restore_requests(&state.pending);
        let pending = state
            .pending
            .iter()
            .map(|p| {
                (
                    p.tag,
                    Pending {
                        head: p.head,
                        kind: p.kind,
                        targets: p.targets.clone(),
                        status_addr: p.status_addr,
                    },
                )
            })
            .collect();
        Ok(Self {
            disk,
            status: state.status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.driver_features,
            queue_sel: state.queue_sel,
            queue,
            next_tag: state.next_tag,
            pending,
            stats: state.stats,
            written: state.written.iter().copied().collect(),
            disk_digest: state.disk_digest,
        })
    }
}

fn write_guest(memory: &GuestRam, addr: u64, bytes: &[u8]) -> Result<(), VmmError> {
    memory
        .write_slice(bytes, GuestAddress(addr))
        .map_err(|e| VmmError::Memory(format!("write disk data at {addr:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Discard, Live};
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HEADER: u64 = 0x20000;
    const DATA: u64 = 0x30000;
    const STATUS: u64 = 0x40000;

    /// Found by the `state_stream` fuzz target: a state claiming a huge disk
    /// and 2^32 - 1 written blocks made the parser allocate 32 GiB and abort.
    /// The count must fit in the bytes that carry it.
    #[test]
    fn a_written_block_count_the_state_cannot_hold_is_refused_before_allocating() {
        let mut bytes = vec![0u8; BLK_STATE_FIXED];
        bytes[0..8].copy_from_slice(&(512u64 << 40).to_le_bytes());
        bytes[152..156].copy_from_slice(&u32::MAX.to_le_bytes());
        let Err(error) = BlkState::from_bytes(&bytes) else {
            panic!("a state with 2^32 - 1 written blocks in 160 bytes was accepted");
        };
        assert!(error.contains("do not fit"), "{error}");
    }

    struct Fixture {
        _dir: tempdir::Dir,
        memory: GuestRam,
        queue: MockSplitQueue<'static, GuestRam>,
        device: VirtioBlk,
        events: Live<Discard>,
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = std::env::temp_dir()
                    .join(format!("lockstep-block-unit-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&dir).expect("scratch dir");
                Self(dir)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn fixture(read_only: bool) -> Fixture {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("disk.img");
        Disk::open(&path, false, Some(64 * SECTOR)).expect("create");
        let disk = Disk::open(&path, read_only, None).expect("open");
        // The mock queue borrows the memory: leak one small region per test.
        let memory: &'static GuestRam = Box::leak(Box::new(
            GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory"),
        ));
        let queue = MockSplitQueue::create(memory, GuestAddress(0x1000), 16);
        let mut device = VirtioBlk::new(disk).expect("device");
        start(&mut device, &queue);
        Fixture {
            _dir: dir,
            memory: memory.clone(),
            queue,
            device,
            events: Live::new(Box::new(std::io::empty()), Discard),
        }
    }

    fn start(device: &mut VirtioBlk, queue: &MockSplitQueue<GuestRam>) {
        assert_eq!(device.read(0x000, 4).expect("magic"), MAGIC);
        assert_eq!(device.read(0x008, 4).expect("id"), DEVICE_ID_BLK);
        device.write(0x070, 4, 1 | 2).expect("ack");
        device.write(0x024, 4, 1).expect("sel");
        device.write(0x020, 4, 1).expect("VERSION_1");
        device.write(0x070, 4, 1 | 2 | 8).expect("features ok");
        assert_ne!(device.read(0x070, 4).expect("status") & 8, 0);
        device.write(0x030, 4, 0).expect("sel");
        device.write(0x038, 4, 16).expect("size");
        let (desc, avail, used) = (
            queue.desc_table_addr().0,
            queue.avail_addr().0,
            queue.used_addr().0,
        );
        for (low, value) in [(0x080, desc), (0x090, avail), (0x0a0, used)] {
            device.write(low, 4, value as u32).expect("low");
            device
                .write(low + 4, 4, (value >> 32) as u32)
                .expect("high");
        }
        device.write(0x044, 4, 1).expect("ready");
        device.write(0x070, 4, 1 | 2 | 8 | 4).expect("driver ok");
        assert!(device.is_running());
    }

    impl Fixture {
        fn header(&self, kind: u32, sector: u64) {
            let mut raw = kind.to_le_bytes().to_vec();
            raw.extend_from_slice(&[0; 4]);
            raw.extend_from_slice(&sector.to_le_bytes());
            self.memory
                .write_slice(&raw, GuestAddress(HEADER))
                .expect("header");
            self.memory
                .write_slice(&[0xff], GuestAddress(STATUS))
                .expect("status");
        }

        /// Submits one request (header, optional data, status) and polls
        /// until it is back; returns its status byte and used length.
        fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
            self.header(kind, sector);
            let mut chain = vec![RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT, 1))];
            if let Some((len, device_writes)) = data {
                chain.push(RawDescriptor::from(Descriptor::new(
                    DATA,
                    len,
                    NEXT | if device_writes { WRITE } else { 0 },
                    2,
                )));
            }
            chain.push(RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)));
            self.submit(&chain)
        }

        fn submit(&mut self, chain: &[RawDescriptor]) -> (u8, u32) {
            let before = self.queue.used().idx().load();
            self.queue.build_desc_chain(chain).expect("chain");
            self.device.write(0x050, 4, 0).expect("notify");
            self.device.notify(&self.memory, 0).expect("notify handled");
            let mut polls = 0;
            while self.queue.used().idx().load() == before {
                self.device
                    .poll(&self.memory, &mut self.events, 1)
                    .expect("poll");
                polls += 1;
                assert!(polls < 1000, "the request never completed");
            }
            let element = self
                .queue
                .used()
                .ring()
                .ref_at(usize::from(before) % 16)
                .expect("used element")
                .load();
            let mut status = [0u8];
            self.memory
                .read_slice(&mut status, GuestAddress(STATUS))
                .expect("status");
            (status[0], element.len())
        }
    }

    #[test]
    fn write_flush_read_round_trip_through_the_image() {
        let mut f = fixture(false);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        f.memory
            .write_slice(&data, GuestAddress(DATA))
            .expect("data");
        assert_eq!(f.request(T_OUT, 3, Some((1024, false))), (S_OK, 1));
        assert_eq!(f.request(T_FLUSH, 0, None), (S_OK, 1));
        f.memory
            .write_slice(&[0u8; 1024], GuestAddress(DATA))
            .expect("clear");
        assert_eq!(f.request(T_IN, 3, Some((1024, true))), (S_OK, 1025));
        let mut back = vec![0u8; 1024];
        f.memory
            .read_slice(&mut back, GuestAddress(DATA))
            .expect("back");
        assert_eq!(back, data);
        let image = std::fs::read(f.device.disk().path()).expect("image");
        assert_eq!(&image[3 * 512..5 * 512], &data[..], "on the host file");
        assert_eq!(f.request(T_GET_ID, 0, Some((20, true))), (S_OK, 21));
        let mut id = [0u8; 13];
        f.memory
            .read_slice(&mut id, GuestAddress(DATA))
            .expect("id");
        assert_eq!(&id, b"lockstep-disk");
        let stats = f.device.stats();
        assert_eq!((stats.submitted, stats.refused), (3, 0));
        assert_eq!((stats.bytes_read, stats.bytes_written), (1024, 1024));
        assert_eq!(
            f.events.stats().events,
            3,
            "one blk-done event per completion poll"
        );
    }

    #[test]
    fn shared_mode_a_write_reaches_the_image_only_after_the_backups_ack() {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("shared.img");
        Disk::open(&path, false, Some(64 * SECTOR)).expect("create");
        let gate = Arc::new(OutputGate::new(Box::new(nic::gate::Dropped)));
        let mut disk = Disk::open(&path, false, None).expect("open").shared(false);
        disk.hold_writes(Arc::clone(&gate));
        let mut f = fixture(false);
        f.device = VirtioBlk::new(disk).expect("device");
        start(&mut f.device, &f.queue);
        let data = vec![0xa5u8; 1024];
        f.memory
            .write_slice(&data, GuestAddress(DATA))
            .expect("data");
        f.header(T_OUT, 3);
        let chain = [
            RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 1024, NEXT, 2)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ];
        f.queue.build_desc_chain(&chain).expect("chain");
        // Produced at log position 5; the backup has acked nothing.
        f.device.notify(&f.memory, 5).expect("notify");
        assert_eq!(
            (f.device.disk().held(), f.device.disk().in_flight()),
            (1, 0)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        let on_image =
            |path: &std::path::Path| std::fs::read(path).expect("image")[3 * 512..5 * 512].to_vec();
        assert_eq!(on_image(&path), vec![0u8; 1024], "written before the ack");
        // The guest polls: the vCPU waits for the ack (an ack of 4 does not
        // cover it), then issues the write and completes it.
        let acker = {
            let (gate, path) = (Arc::clone(&gate), path.clone());
            std::thread::spawn(move || {
                gate.ack(4);
                std::thread::sleep(std::time::Duration::from_millis(200));
                let before = on_image(&path);
                gate.ack(5);
                before
            })
        };
        let mut delivered = 0;
        while delivered == 0 {
            delivered = f.device.poll(&f.memory, &mut f.events, 2).expect("poll");
        }
        assert_eq!(
            acker.join().expect("acker"),
            vec![0u8; 1024],
            "written at ack 4"
        );
        assert_eq!(on_image(&path), data, "on the image after the ack");
        let mut status = [0xffu8];
        f.memory
            .read_slice(&mut status, GuestAddress(STATUS))
            .expect("status");
        assert_eq!(status[0], S_OK);
        assert_eq!(f.device.disk().shared_stats().map(|s| s.held), Some(1));
    }

    #[test]
    fn shared_records_with_data_round_trip_and_split_and_malformed_ones_are_refused() {
        let done: Vec<Completion> = (1..=5)
            .map(|tag| Completion {
                tag,
                len: (MAX_REQUEST_BYTES + 1) as u32,
                status: S_OK,
                hash: tag,
            })
            .collect();
        let buffers: Vec<Vec<u8>> = done
            .iter()
            .map(|c| vec![c.tag as u8; MAX_REQUEST_BYTES as usize])
            .collect();
        let data = |c: &Completion| &buffers[(c.tag - 1) as usize][..];
        let entries = encode_completions_with_data(&done, data);
        assert_eq!(entries.len(), 5, "1 MiB reads: one per entry under 2 MiB");
        for (entry, expected) in entries.iter().zip(&done) {
            assert!(entry.len() <= MAX_DATA_ENTRY);
            let decoded = decode_completions_with_data(entry).expect("decode");
            assert_eq!(decoded.len(), 1);
            assert_eq!(decoded[0].0, *expected);
            assert_eq!(decoded[0].1, data(expected));
        }
        let mut bad = entries[0].clone();
        bad.pop();
        assert!(decode_completions_with_data(&bad).is_none(), "short data");
        let mut bad = entries[0].clone();
        bad[0] = 200;
        assert!(
            decode_completions_with_data(&bad).is_none(),
            "count beyond the payload"
        );
        assert!(decode_completions_with_data(&[1, 0, 0, 0]).is_none());
    }

    #[test]
    fn bad_requests_get_an_error_status_never_a_panic() {
        let mut f = fixture(false);
        // Beyond the end: 2 sectors at sector 63 of 64; a sector so large
        // its byte offset overflows.
        assert_eq!(f.request(T_IN, 63, Some((1024, true))).0, S_IOERR);
        assert_eq!(
            f.request(T_OUT, u64::MAX / 8, Some((512, false))).0,
            S_IOERR
        );
        // Not whole sectors; data in the wrong direction; unknown type.
        assert_eq!(f.request(T_IN, 0, Some((100, true))).0, S_IOERR);
        assert_eq!(f.request(T_IN, 0, Some((512, false))).0, S_IOERR);
        assert_eq!(f.request(77, 0, None).0, S_UNSUPP);
        // A data buffer outside guest memory.
        f.header(T_IN, 0);
        let chain = [
            RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x4000_0000, 512, NEXT | WRITE, 2)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ];
        assert_eq!(f.submit(&chain).0, S_IOERR);
        // A header that is device-writable; a chain of one descriptor (no
        // status byte: returned with length 0).
        let chain = [
            RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT | WRITE, 1)),
            RawDescriptor::from(Descriptor::new(STATUS, 1, WRITE, 0)),
        ];
        assert_eq!(f.submit(&chain).0, S_IOERR);
        let chain = [RawDescriptor::from(Descriptor::new(HEADER, 16, 0, 0))];
        f.header(T_IN, 0);
        assert_eq!(f.submit(&chain), (0xff, 0));
        assert_eq!(f.device.stats().refused, 8);
        assert_eq!(f.device.stats().submitted, 0);
        // The device still works.
        assert_eq!(f.request(T_IN, 0, Some((512, true))), (S_OK, 513));
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_says_so_in_its_features() {
        let mut f = fixture(true);
        assert_ne!(
            f.device.read(0x010, 4).expect("features") & (F_RO as u32),
            0
        );
        assert_eq!(f.request(T_OUT, 0, Some((512, false))).0, S_IOERR);
        assert_eq!(f.request(T_IN, 0, Some((512, true))).0, S_OK);
        assert_eq!(f.device.stats().refused, 1);
    }

    #[test]
    fn a_host_io_error_reaches_the_guest_as_an_error_status() {
        let mut f = fixture(true);
        // The file is open read-only; pretend the disk is writable, so the
        // write reaches the host and fails there (EBADF).
        f.device.disk.read_only = false;
        assert_eq!(f.request(T_OUT, 0, Some((512, false))).0, S_IOERR);
        assert_eq!(f.device.disk().host_errors, 1);
        assert_eq!(f.device.stats().submitted, 1);
    }

    #[test]
    fn completion_records_round_trip_and_malformed_ones_are_refused() {
        let done = [
            Completion {
                tag: 1,
                len: 513,
                status: S_OK,
                hash: 0x1234,
            },
            Completion {
                tag: 9,
                len: 1,
                status: S_IOERR,
                hash: 0,
            },
        ];
        let bytes = encode_completions(&done);
        assert_eq!(bytes.len(), 2 * RECORD_LEN);
        assert_eq!(decode_completions(&bytes).expect("decode"), done);
        assert!(decode_completions(&bytes[..30]).is_none(), "short");
        let mut bad = bytes.clone();
        bad[12] = 9;
        assert!(decode_completions(&bad).is_none(), "status 9");
        let mut bad = bytes;
        bad[14] = 1;
        assert!(decode_completions(&bad).is_none(), "padding");
    }

    #[test]
    fn an_image_that_is_not_whole_sectors_is_refused() {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("odd.img");
        std::fs::write(&path, [0u8; 1000]).expect("write");
        let text = Disk::open(&path, false, None)
            .err()
            .expect("refused")
            .to_string();
        assert!(text.contains("whole number of 512-byte sectors"), "{text}");
        let text = Disk::open(&dir.0.join("missing.img"), false, None)
            .err()
            .expect("missing")
            .to_string();
        assert!(text.contains("open disk image"), "{text}");
    }
}
