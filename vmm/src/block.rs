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

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use io_uring::{IoUring, opcode, types};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::VmmError;
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
        out.extend_from_slice(&completion.tag.to_le_bytes());
        out.extend_from_slice(&completion.len.to_le_bytes());
        out.extend_from_slice(&[completion.status, 0, 0, 0]);
        out.extend_from_slice(&completion.hash.to_le_bytes());
    }
    out
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

/// How the event source reaches the disk's host completions.
pub trait DiskCompleter {
    /// Live: the requests the host has finished, waiting for at least one
    /// if any is in flight; none if nothing is in flight.
    fn harvest(&mut self) -> Result<Vec<Completion>, VmmError>;
    /// Replay: waits for this replica's own completion of `tag`.
    fn wait_for(&mut self, tag: u64) -> Result<Completion, VmmError>;
}

/// An image file and the io_uring that serves it.
pub struct Disk {
    path: PathBuf,
    file: File,
    ring: IoUring,
    capacity: u64,
    read_only: bool,
    serial: [u8; ID_LEN],
    /// Host buffers of requests in flight or finished but not delivered.
    buffers: HashMap<u64, (u32, Vec<u8>)>,
    in_flight: usize,
    finished: VecDeque<Completion>,
    /// Host errors seen (each also reported on stderr).
    pub host_errors: u64,
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
            file,
            ring,
            capacity,
            read_only,
            serial,
            buffers: HashMap::new(),
            in_flight: 0,
            finished: VecDeque::new(),
            host_errors: 0,
        })
    }

    /// Size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
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
        let fd = types::Fd(self.file.as_raw_fd());
        self.buffers.insert(tag, (kind, buffer));
        let (_, buffer) = self
            .buffers
            .get_mut(&tag)
            .ok_or_else(|| VmmError::Config(format!("disk request {tag}: its buffer vanished")))?;
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
        self.ring
            .submit()
            .map_err(|e| io_error(format!("submit disk request {tag} to io_uring"), e))?;
        Ok(())
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
            let Some((kind, buffer)) = self.buffers.get(&tag) else {
                continue;
            };
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
            .map(|(_, buffer)| buffer)
            .unwrap_or_default()
    }
}

impl DiskCompleter for Disk {
    fn harvest(&mut self) -> Result<Vec<Completion>, VmmError> {
        self.reap(true)?;
        Ok(self.finished.drain(..).collect())
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
    pub fn notify(&mut self, memory: &GuestRam) -> Result<(), VmmError> {
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
                            self.disk.submit(tag, kind, offset, buffer)?;
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
                self.stats.bytes_written += buffer.len() as u64;
            }
            write_guest(memory, pending.status_addr, &[completion.status])?;
            self.used(memory, pending.head, len)?;
            delivered += 1;
        }
        Ok(u32::from(delivered > 0))
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
            self.device.notify(&self.memory).expect("notify handled");
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
