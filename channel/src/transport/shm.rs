//! Shared-memory transport between two processes on one host: two SPSC byte
//! rings (the [`crate::ring`] protocol over bytes) in a memfd both map.
//!
//! Setup runs over a unix socket: the backup listens, the primary connects,
//! both run the authenticated [`crate::protocol::handshake`], and only then
//! does the listener create the memfd, initialize it and pass its fd over the
//! socket (`SCM_RIGHTS`). Nothing is shared with a peer that failed the
//! handshake.
//!
//! # Region layout
//!
//! ```text
//! offset        size  field
//! 0             8     magic "LKSTPSHM"
//! 8             4     version (PROTOCOL_VERSION)
//! 12            4     reserved
//! 16            8     ring_bytes R (each direction, power of two)
//! 128           8     ring 0 head  (consumer index, own cache line pair)
//! 256           8     ring 0 tail  (producer index)
//! 384           8     ring 1 head
//! 512           8     ring 1 tail
//! 640           8     ring 0 consumer asleep (1: ring its doorbell)
//! 768           8     ring 1 consumer asleep
//! 4096          R     ring 0 data: primary -> backup
//! 4096 + R      R     ring 1 data: backup -> primary
//! ```
//!
//! Each ring holds records at 8-aligned offsets; a record never wraps:
//!
//! ```text
//! offset size  field
//! 0      4     len (0xFFFF_FFFF: wrap marker, skip to offset 0)
//! 4      4     reserved
//! 8      len   one frame
//! 8+len  pad   to a multiple of 8
//! ```
//!
//! # What the peer can and cannot do to us
//!
//! The memfd is sealed by its creator before it is shared
//! (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) and the receiving end
//! refuses one without those seals: neither process can shrink the file
//! under the other's mapping (a SIGBUS on the next access) or change the
//! seals. The peer can still write any byte of the region at any time, so
//! nothing here hands out a reference into shared memory: a received record
//! is copied out with volatile reads into a private buffer, and the frame's
//! checks and its decoding both run on that one copy (no check-then-use);
//! a frame is built in a private buffer and copied into the ring with
//! volatile writes on commit; the region header is read the same way.
//! The receiver's [`Transport::recv_prehashed`] copies a frame's header,
//! then its payload in 2 KiB chunks, and feeds each chunk of the private
//! copy to the frame tag's GHASH right after it landed (still in L1), so
//! the check is on that same copy and the payload is not read a second
//! time from further away ([`crate::protocol::PreHashed`]).
//!
//! Head and tail are monotonic u64 byte counts; the producer stores `tail`
//! with Release after writing a record and the consumer loads it with
//! Acquire before reading; the consumer stores `head` with Release after it
//! is done with a record and the producer loads it with Acquire before
//! reusing the space. Indices read from the peer are bounds-checked, so a
//! corrupt or hostile peer yields an error, never an out-of-bounds access.
//!
//! # Sleeping and the doorbell
//!
//! An idle end need not poll ([`Transport::wait`]): it stores 1 in its
//! ring's *asleep* word, looks at the tail once more, and sleeps on the
//! set-up's unix socket. A producer that commits a record and then finds the
//! consumer asleep (it swaps the word back to 0, so one byte per sleep)
//! writes one doorbell byte to that socket. Both sides put a SeqCst fence
//! between their store and their load, so either the consumer sees the new
//! tail or the producer sees the asleep word: no record is slept through.
//! The socket carries nothing else after set-up; its EOF is how a consumer
//! learns that the peer exited, and it wakes a sleeper too.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Received, Transport, TransportError};
use crate::protocol::{
    FRAME_HEADER_LEN, FrameKeys, FrameOpener, PROTOCOL_VERSION, Role, SealHasher, Session,
    handshake_timed,
};

const MAGIC: [u8; 8] = *b"LKSTPSHM";
const DATA_OFFSET: usize = 4096;
const WRAP: u32 = u32::MAX;
const REC_PREFIX: usize = 8;
/// Payload bytes copied out of the ring, then hashed, at a time when the
/// receiver hashes as it copies (a multiple of 16, and small enough that
/// the chunk is still in L1 when it is hashed).
const HASH_CHUNK: usize = 2048;
/// The seals the region must carry (see the module docs).
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Copies `out.len()` bytes from `src` with volatile reads (8 bytes at a
/// time where aligned).
///
/// # Safety
/// `src .. src + out.len()` must be readable memory of a live mapping
/// (another process may write it meanwhile: the copy may then be torn,
/// which the caller's checks on the copy catch).
unsafe fn volatile_copy_from(src: *const u8, out: &mut [u8]) {
    let mut i = 0;
    if src.align_offset(8) == 0 {
        while i + 8 <= out.len() {
            // SAFETY: in bounds (the caller's contract) and 8-aligned
            // (src is, and i is a multiple of 8).
            let word = unsafe { src.add(i).cast::<u64>().read_volatile() };
            out[i..i + 8].copy_from_slice(&word.to_ne_bytes());
            i += 8;
        }
    }
    while i < out.len() {
        // SAFETY: in bounds, by the caller's contract.
        out[i] = unsafe { src.add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `bytes` to `dst` with volatile writes (8 bytes at a time where
/// aligned).
///
/// # Safety
/// `dst .. dst + bytes.len()` must be writable memory of a live mapping.
unsafe fn volatile_copy_to(bytes: &[u8], dst: *mut u8) {
    let mut i = 0;
    if dst.align_offset(8) == 0 {
        while i + 8 <= bytes.len() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i..i + 8]);
            // SAFETY: in bounds (the caller's contract) and 8-aligned.
            unsafe {
                dst.add(i)
                    .cast::<u64>()
                    .write_volatile(u64::from_ne_bytes(word))
            };
            i += 8;
        }
    }
    while i < bytes.len() {
        // SAFETY: in bounds, by the caller's contract.
        unsafe { dst.add(i).write_volatile(bytes[i]) };
        i += 1;
    }
}

/// An mmap of the shared region, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn map(fd: RawFd, len: usize) -> Result<Self, TransportError> {
        // SAFETY: a fresh shared mapping chosen by the kernel (addr = NULL),
        // of a file descriptor we own that is at least `len` bytes long; no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TransportError::last_os("mmap of the shared ring"));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn atomic(&self, offset: usize) -> *const AtomicU64 {
        debug_assert!(offset.is_multiple_of(8) && offset + 8 <= DATA_OFFSET);
        // SAFETY: offset + 8 is within the mapping (the header page), so the
        // resulting pointer stays in the same allocation.
        unsafe { self.ptr.add(offset).cast() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, and every pointer
        // derived from them lives in the transport that owns this mapping
        // and is dropped with it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One end of one byte ring inside the mapping.
struct RingEnd {
    data: *mut u8,
    size: u64,
    head: *const AtomicU64,
    tail: *const AtomicU64,
    /// Producer: local tail; consumer: local head.
    mine: u64,
    /// Producer: cached head; consumer: cached tail.
    theirs: u64,
    /// Producer: open reservation (offset of record, reserved frame len).
    open: Option<(u64, usize)>,
    /// Consumer: bytes of the record lent out by `recv`, released next call.
    lent: u64,
    /// Private memory the frames are built in (producer) or copied out to
    /// (consumer): nothing is ever referenced in shared memory.
    private: Vec<u8>,
    /// The consumer's asleep word (see the module docs): ours on the
    /// receiving end, the peer's on the sending end.
    asleep: *const AtomicU64,
}

impl RingEnd {
    fn load(p: *const AtomicU64) -> u64 {
        // SAFETY: p points into the live mapping, 8-aligned, and is only ever
        // accessed atomically by either process.
        unsafe { &*p }.load(Ordering::Acquire)
    }

    fn store(p: *const AtomicU64, v: u64) {
        // SAFETY: as in `load`.
        unsafe { &*p }.store(v, Ordering::Release)
    }

    /// Copies `out.len()` bytes at `offset` of this ring's data area into
    /// `out` with volatile reads: the peer may write them at any time, so
    /// they are never referenced, only copied.
    fn read_into(&self, offset: u64, out: &mut [u8]) {
        debug_assert!(offset as usize + out.len() <= self.size as usize);
        // SAFETY: offset + out.len() <= size (checked by every caller
        // against the ring size), so the source is inside this ring's data
        // area of the live mapping; `out` is private memory.
        unsafe { volatile_copy_from(self.data.add(offset as usize), out) }
    }

    /// Copies `bytes` to `offset` of this ring's data area with volatile
    /// writes.
    fn write_from(&mut self, offset: u64, bytes: &[u8]) {
        debug_assert!(offset as usize + bytes.len() <= self.size as usize);
        // SAFETY: offset + bytes.len() <= size (checked by every caller),
        // so the destination is inside this ring's data area of the live
        // mapping, in the part the ring protocol gives to us (between our
        // tail and the peer's head).
        unsafe { volatile_copy_to(bytes, self.data.add(offset as usize)) }
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let mut l = [0u8; 4];
        self.read_into(offset, &mut l);
        u32::from_le_bytes(l)
    }

    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
        let need = (REC_PREFIX + max_len.next_multiple_of(8)) as u64;
        if need > self.size / 2 {
            return Err(TransportError::TooBig {
                want: max_len,
                max: self.size as usize / 2 - REC_PREFIX,
            });
        }
        if let Some((_, len)) = self.open {
            if len >= max_len {
                return Ok(Some(&mut self.private[..max_len]));
            }
            return Err(TransportError::BadCommit {
                len: max_len,
                reserved: len,
            });
        }
        let pos = self.mine % self.size;
        let contiguous = self.size - pos;
        let required = if need <= contiguous {
            need
        } else {
            contiguous + need
        };
        if self.size - (self.mine - self.theirs) < required {
            // Acquire pairs with the consumer's Release of `head`.
            let head = Self::load(self.head);
            // The head is the peer's: one ahead of our tail, or more than a
            // ring behind it, is refused, and not kept (it underflowed here;
            // found by fuzzing).
            let used = self
                .mine
                .checked_sub(head)
                .filter(|&used| used <= self.size)
                .ok_or(TransportError::BadRegion("peer's head is outside the ring"))?;
            self.theirs = head;
            if self.size - used < required {
                return Ok(None);
            }
        }
        if need > contiguous {
            self.write_from(pos, &WRAP.to_le_bytes());
            self.mine += contiguous;
        }
        let at = self.mine % self.size;
        self.open = Some((at, max_len));
        if self.private.len() < max_len {
            self.private.resize(max_len, 0);
        }
        Ok(Some(&mut self.private[..max_len]))
    }

    fn commit(&mut self, len: usize) -> Result<(), TransportError> {
        let Some((at, reserved)) = self.open.take() else {
            return Err(TransportError::BadCommit { len, reserved: 0 });
        };
        if len > reserved {
            self.open = Some((at, reserved));
            return Err(TransportError::BadCommit { len, reserved });
        }
        let private = std::mem::take(&mut self.private);
        self.write_from(at + REC_PREFIX as u64, &private[..len]);
        self.private = private;
        self.publish(at, len);
        Ok(())
    }

    /// Writes the prefix of the record of `len` frame bytes at `at` and
    /// publishes it.
    fn publish(&mut self, at: u64, len: usize) {
        let mut prefix = [0u8; REC_PREFIX];
        prefix[..4].copy_from_slice(&(len as u32).to_le_bytes());
        self.write_from(at, &prefix);
        self.mine += (REC_PREFIX + len.next_multiple_of(8)) as u64;
        // Release pairs with the consumer's Acquire of `tail`: the record
        // (and any wrap marker before it) is visible before the new tail.
        Self::store(self.tail, self.mine);
    }

    /// [`RingEnd::commit`] of a frame sealed on the way: each payload
    /// chunk of the private buffer is hashed, then written to the ring
    /// while it is in L1; the header with its tag goes in last.
    fn commit_sealed(&mut self, mut frame: SealHasher<'_>) -> Result<usize, TransportError> {
        let len = frame.frame_len();
        let Some((at, reserved)) = self.open.take() else {
            return Err(TransportError::BadCommit { len, reserved: 0 });
        };
        if len > reserved || len > self.private.len() {
            self.open = Some((at, reserved));
            return Err(TransportError::BadCommit { len, reserved });
        }
        let private = std::mem::take(&mut self.private);
        let base = at + REC_PREFIX as u64;
        let mut off = FRAME_HEADER_LEN;
        while off < len {
            let n = (len - off).min(HASH_CHUNK);
            let chunk = &private[off..off + n];
            frame.update(chunk);
            self.write_from(base + off as u64, chunk);
            off += n;
        }
        self.private = private;
        self.write_from(base, &frame.finish());
        self.publish(at, len);
        Ok(len)
    }

    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
        Ok(self.recv_hashing(None)?.map(|(frame, _)| frame))
    }

    /// [`RingEnd::recv`]; with `opener`, the frame's tag is computed on the
    /// private copy chunk by chunk as each chunk is copied (each hashed
    /// while still in cache; see [`crate::protocol::PreHashed`]).
    fn recv_hashing(
        &mut self,
        opener: Option<&FrameOpener>,
    ) -> Result<Option<Received<'_>>, TransportError> {
        self.release();
        loop {
            if self.theirs == self.mine {
                // Acquire pairs with the producer's Release of `tail`.
                self.theirs = Self::load(self.tail);
                if self.theirs == self.mine {
                    return Ok(None);
                }
            }
            let avail = self.theirs.wrapping_sub(self.mine);
            if avail > self.size || avail < REC_PREFIX as u64 {
                return Err(TransportError::BadRegion("peer's tail is outside the ring"));
            }
            let pos = self.mine % self.size;
            let len = self.read_u32(pos);
            if len == WRAP {
                self.mine += self.size - pos;
                Self::store(self.head, self.mine);
                continue;
            }
            let rec = (REC_PREFIX as u64).saturating_add(u64::from(len).next_multiple_of(8));
            if rec > avail || pos.saturating_add(rec) > self.size {
                return Err(TransportError::BadRegion(
                    "record runs past the peer's tail",
                ));
            }
            let len = len as usize;
            // The frame is copied out once; everything after (crc, MAC,
            // decoding, delivery) reads this private copy only.
            let mut private = std::mem::take(&mut self.private);
            if private.len() < len {
                private.resize(len, 0);
            }
            let at = pos + REC_PREFIX as u64;
            let mut pre = None;
            let mut copied = 0;
            if let Some(opener) = opener
                && len >= FRAME_HEADER_LEN
            {
                self.read_into(at, &mut private[..FRAME_HEADER_LEN]);
                copied = FRAME_HEADER_LEN;
                if let Some(mut h) = opener.start_hashing(&private[..FRAME_HEADER_LEN]) {
                    // A header announcing more than its record gets no
                    // tag here (`finish` sees too few bytes hashed);
                    // decode_frame then refuses it as truncated.
                    let end = FRAME_HEADER_LEN.saturating_add(h.payload_len()).min(len);
                    while copied < end {
                        let n = (end - copied).min(HASH_CHUNK);
                        let chunk = &mut private[copied..copied + n];
                        self.read_into(at + copied as u64, chunk);
                        h.update(chunk);
                        copied += n;
                    }
                    pre = h.finish();
                }
            }
            self.read_into(at + copied as u64, &mut private[copied..len]);
            self.private = private;
            self.lent = rec;
            return Ok(Some((&self.private[..len], pre)));
        }
    }

    fn release(&mut self) {
        if self.lent > 0 {
            self.mine += self.lent;
            self.lent = 0;
            // Release pairs with the producer's Acquire of `head`: we are
            // done reading the record before it may be overwritten.
            Self::store(self.head, self.mine);
        }
    }
}

/// The shared-memory transport; see the module docs.
pub struct ShmTransport {
    tx: RingEnd,
    rx: RingEnd,
    /// The unix socket of the set-up, kept open for life: when the peer
    /// process ends, the kernel closes its end, and this end reads EOF.
    control: UnixStream,
    peer_closed: bool,
    last_check: std::time::Instant,
    /// Look at the control socket on the next `recv`, whatever the time
    /// (set after a sleep: doorbell bytes are waiting, or an EOF).
    check_now: bool,
    /// The handshake's frame keys.
    keys: FrameKeys,
    // Declared last so it is unmapped after the ring ends are gone.
    _map: Mapping,
}

// SAFETY: the raw pointers point into `_map`, which this struct owns and
// which moves with it; nothing else in this process aliases the mapping, so
// moving the whole transport to another thread is sound.
unsafe impl Send for ShmTransport {}

/// Listens for a primary on a unix socket path.
pub struct ShmListener {
    listener: UnixListener,
}

impl ShmListener {
    /// Puts the listening socket in (or out of) non-blocking mode, so an
    /// accept loop can also watch other work.
    pub fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        self.listener.set_nonblocking(on)
    }

    /// Binds `path` (removing a stale socket file first).
    pub fn bind(path: &Path) -> Result<Self, TransportError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| TransportError::Io {
            op: "binding the unix socket",
            source,
        })?;
        Ok(Self { listener })
    }

    /// Accepts one peer, runs the handshake, then creates the region with
    /// rings of `ring_bytes` (a power of two, at least 64 KiB) and shares it.
    pub fn accept(
        &self,
        session: &Session,
        ring_bytes: usize,
    ) -> Result<ShmTransport, TransportError> {
        self.accept_with_version(session, ring_bytes, PROTOCOL_VERSION)
    }

    /// [`ShmListener::accept`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn accept_with_version(
        &self,
        session: &Session,
        ring_bytes: usize,
        version: u16,
    ) -> Result<ShmTransport, TransportError> {
        let sock = self.accept_stream()?;
        Self::establish(sock, session, ring_bytes, version)
    }

    /// Accepts one peer's connection without the handshake, for a caller
    /// that learns its session (its current generation) only once a peer
    /// is there; continue with [`ShmListener::establish_accepted`].
    pub fn accept_stream(&self) -> Result<UnixStream, TransportError> {
        let (sock, _) = self
            .listener
            .accept()
            .map_err(|source| TransportError::Io {
                op: "accepting on the unix socket",
                source,
            })?;
        Ok(sock)
    }

    /// Runs the handshake on a connection from [`ShmListener::accept_stream`],
    /// then creates and shares the region as [`ShmListener::accept`] does.
    pub fn establish_accepted(
        sock: UnixStream,
        session: &Session,
        ring_bytes: usize,
    ) -> Result<ShmTransport, TransportError> {
        Self::establish(sock, session, ring_bytes, PROTOCOL_VERSION)
    }

    fn establish(
        mut sock: UnixStream,
        session: &Session,
        ring_bytes: usize,
        version: u16,
    ) -> Result<ShmTransport, TransportError> {
        if !ring_bytes.is_power_of_two() || ring_bytes < 64 << 10 {
            return Err(TransportError::BadRegion(
                "ring size must be a power of two >= 64 KiB",
            ));
        }
        let keys = handshake_timed(&mut sock, session, version)?.keys;
        let total = DATA_OFFSET + 2 * ring_bytes;
        // SAFETY: memfd_create takes a NUL-terminated name, which the literal is.
        let raw = unsafe {
            libc::memfd_create(
                c"lockstep-channel".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(TransportError::last_os("memfd_create"));
        }
        // SAFETY: raw is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on an fd we own, with a non-negative length.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), total as libc::off_t) } != 0 {
            return Err(TransportError::last_os("ftruncate of the memfd"));
        }
        // Neither end may ever resize the file under the other's mapping.
        // SAFETY: fcntl(F_ADD_SEALS) on an fd we own, with an int argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS) } != 0 {
            return Err(TransportError::last_os("sealing the memfd"));
        }
        let map = Mapping::map(fd.as_raw_fd(), total)?;
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&u32::from(version).to_le_bytes());
        header[16..24].copy_from_slice(&(ring_bytes as u64).to_le_bytes());
        // SAFETY: the mapping is at least DATA_OFFSET > 24 bytes long.
        unsafe { volatile_copy_to(&header, map.ptr) };
        send_fd(&sock, fd.as_raw_fd())?;
        Ok(ShmTransport::new(map, ring_bytes, session.role, sock, keys))
    }
}

impl ShmTransport {
    /// Connects to a listener at `path`, runs the handshake and maps the
    /// region it shares.
    pub fn connect(path: &Path, session: &Session) -> Result<Self, TransportError> {
        Self::connect_with_version(path, session, PROTOCOL_VERSION)
    }

    /// [`ShmTransport::connect`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn connect_with_version(
        path: &Path,
        session: &Session,
        version: u16,
    ) -> Result<Self, TransportError> {
        let mut sock = UnixStream::connect(path).map_err(|source| TransportError::Io {
            op: "connecting to the unix socket",
            source,
        })?;
        let keys = handshake_timed(&mut sock, session, version)?.keys;
        let fd = recv_fd(&sock)?;
        // SAFETY: fcntl(F_GET_SEALS) on an fd we own; no pointer argument.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(TransportError::BadRegion(
                "the peer's memfd is not sealed against shrinking, growing and unsealing",
            ));
        }
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes one `stat` into the pointed-to buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(TransportError::last_os("fstat of the shared memfd"));
        }
        // SAFETY: fstat succeeded, so it initialized the struct.
        let total = unsafe { st.assume_init() }.st_size as usize;
        if total < DATA_OFFSET {
            return Err(TransportError::BadRegion("memfd smaller than its header"));
        }
        let map = Mapping::map(fd.as_raw_fd(), total)?;
        let mut header = [0u8; 24];
        // SAFETY: the mapping is at least DATA_OFFSET > 24 bytes long.
        unsafe { volatile_copy_from(map.ptr, &mut header) };
        if header[..8] != MAGIC {
            return Err(TransportError::BadRegion("bad magic"));
        }
        let mut rb = [0u8; 8];
        rb.copy_from_slice(&header[16..24]);
        let ring_bytes = u64::from_le_bytes(rb) as usize;
        if !ring_bytes.is_power_of_two() || DATA_OFFSET + 2 * ring_bytes != total {
            return Err(TransportError::BadRegion(
                "ring size does not match the region",
            ));
        }
        Ok(Self::new(map, ring_bytes, session.role, sock, keys))
    }

    fn new(
        map: Mapping,
        ring_bytes: usize,
        role: Role,
        control: UnixStream,
        keys: FrameKeys,
    ) -> Self {
        let end = |ring: usize| {
            // SAFETY: DATA_OFFSET + (ring + 1) * ring_bytes == map.len, checked
            // by both constructors, so the data area is inside the mapping.
            let data = unsafe { map.ptr.add(DATA_OFFSET + ring * ring_bytes) };
            RingEnd {
                data,
                size: ring_bytes as u64,
                head: map.atomic(128 + ring * 256),
                tail: map.atomic(256 + ring * 256),
                mine: 0,
                theirs: 0,
                open: None,
                lent: 0,
                private: Vec::new(),
                asleep: map.atomic(640 + ring * 128),
            }
        };
        let (tx, rx) = match role {
            Role::Primary => (end(0), end(1)),
            Role::Backup => (end(1), end(0)),
        };
        Self {
            tx,
            rx,
            control,
            peer_closed: false,
            last_check: std::time::Instant::now(),
            check_now: false,
            keys,
            _map: map,
        }
    }
}

/// How often an idle end looks at the control socket for the peer's exit.
const PEER_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);

impl ShmTransport {
    /// True once the peer process has closed its end of the control socket
    /// (it exited or was killed). Looked at most every
    /// [`PEER_CHECK_INTERVAL`]: one non-blocking `recv` with `MSG_PEEK`.
    fn peer_gone(&mut self) -> bool {
        if self.peer_closed {
            return self.peer_closed;
        }
        if !self.check_now && self.last_check.elapsed() < PEER_CHECK_INTERVAL {
            return false;
        }
        self.check_now = false;
        self.last_check = std::time::Instant::now();
        // Doorbell bytes are read and dropped until the socket is empty
        // (alive) or reads EOF (gone).
        let mut bytes = [0u8; 64];
        loop {
            // SAFETY: recv writes at most `bytes.len()` bytes into `bytes`,
            // which outlives the call, on a socket `self.control` owns;
            // MSG_DONTWAIT never blocks.
            let n = unsafe {
                libc::recv(
                    self.control.as_raw_fd(),
                    bytes.as_mut_ptr().cast(),
                    bytes.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                continue;
            }
            self.peer_closed = n == 0
                || !matches!(
                    std::io::Error::last_os_error().kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                );
            return self.peer_closed;
        }
    }

    /// After a commit: one doorbell byte if the consumer is asleep.
    fn ring_doorbell(&mut self) {
        // SAFETY: `asleep` points into the live mapping, 8-aligned, and is
        // only ever accessed atomically by either process.
        let asleep = unsafe { &*self.tx.asleep };
        // Pairs with the consumer's fence between its asleep store and its
        // tail load: our tail store (in commit) is ordered before this load.
        std::sync::atomic::fence(Ordering::SeqCst);
        if asleep.load(Ordering::Relaxed) == 0 || asleep.swap(0, Ordering::SeqCst) == 0 {
            return;
        }
        let byte = [1u8];
        // SAFETY: send reads one byte from `byte`, which outlives the call,
        // on a socket `self.control` owns; it never blocks (MSG_DONTWAIT)
        // and never raises SIGPIPE (MSG_NOSIGNAL). A full socket already
        // holds a doorbell, and a dead peer is found by its reader: the
        // result is not needed.
        let _ = unsafe {
            libc::send(
                self.control.as_raw_fd(),
                byte.as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

impl ShmTransport {
    fn recv_prehashed_with(
        &mut self,
        opener: Option<&FrameOpener>,
    ) -> Result<Option<Received<'_>>, TransportError> {
        // Checked before reading: a peer gone by now wrote everything it
        // ever will, so its frames are all delivered before `Closed`.
        let gone = self.peer_gone();
        match self.rx.recv_hashing(opener)? {
            Some(frame) => Ok(Some(frame)),
            None if gone => Err(TransportError::Closed),
            None => Ok(None),
        }
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn max_frame(&self) -> usize {
        self.tx.size as usize / 2 - REC_PREFIX
    }

    fn frame_keys(&self) -> &FrameKeys {
        &self.keys
    }

    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
        self.tx.reserve(max_len)
    }

    fn commit(&mut self, len: usize) -> Result<(), TransportError> {
        self.tx.commit(len)?;
        self.ring_doorbell();
        Ok(())
    }

    fn commit_sealed(
        &mut self,
        _reserved: usize,
        frame: SealHasher<'_>,
    ) -> Result<usize, TransportError> {
        let len = self.tx.commit_sealed(frame)?;
        self.ring_doorbell();
        Ok(len)
    }

    fn poll(&mut self) -> Result<bool, TransportError> {
        self.rx.release();
        Ok(false)
    }

    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
        Ok(self.recv_prehashed_with(None)?.map(|(frame, _)| frame))
    }

    fn recv_prehashed(
        &mut self,
        opener: &FrameOpener,
    ) -> Result<Option<Received<'_>>, TransportError> {
        self.recv_prehashed_with(Some(opener))
    }

    fn flushed(&self) -> bool {
        // A committed record is in the shared ring: it has left this process.
        true
    }

    /// Sleeps on the control socket, woken by the peer's doorbell or its
    /// exit (see the module docs).
    fn wait(&mut self, wake: Option<RawFd>, timeout: Duration) -> Result<(), TransportError> {
        if self.peer_closed {
            return Ok(());
        }
        // SAFETY: as in `ring_doorbell`.
        let asleep = unsafe { &*self.rx.asleep };
        asleep.store(1, Ordering::SeqCst);
        // Pairs with the producer's fence between its tail store and its
        // asleep load.
        std::sync::atomic::fence(Ordering::SeqCst);
        let result = if RingEnd::load(self.rx.tail) != self.rx.mine + self.rx.lent {
            Ok(()) // a record arrived meanwhile
        } else {
            super::wait_readable(&[self.control.as_raw_fd()], wake, timeout)
        };
        asleep.store(0, Ordering::Relaxed);
        // The next recv reads the doorbell bytes (and sees an EOF) at once.
        self.check_now = true;
        result
    }
}

/// Shares `fd` over `sock` with one data byte (`SCM_RIGHTS`), as the
/// listening end does with its memfd.
pub fn send_fd(sock: &UnixStream, fd: RawFd) -> Result<(), TransportError> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    // SAFETY: msg_control points to 64 aligned bytes, more than CMSG_SPACE(4),
    // so the first header and its data fit; CMSG_FIRSTHDR/CMSG_DATA only
    // compute pointers inside that buffer.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: msg and everything it points to (iov, byte, cbuf) are live for
    // the duration of the call.
    if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } != 1 {
        return Err(TransportError::last_os("sending the memfd (SCM_RIGHTS)"));
    }
    Ok(())
}

/// Receives the one file descriptor a peer shares over `sock`
/// (`SCM_RIGHTS`); anything else is [`TransportError::BadRegion`].
pub fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, TransportError> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&cbuf);
    // SAFETY: msg points to live buffers of the declared sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n != 1 {
        return Err(TransportError::last_os("receiving the memfd (SCM_RIGHTS)"));
    }
    // SAFETY: recvmsg filled msg_control with msg_controllen bytes of control
    // messages; CMSG_FIRSTHDR returns null or a header inside that buffer.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    if cmsg.is_null() {
        return Err(TransportError::BadRegion(
            "the peer sent no file descriptor",
        ));
    }
    // SAFETY: cmsg is a non-null header inside cbuf (see above).
    let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
    if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        return Err(TransportError::BadRegion(
            "the peer sent no file descriptor",
        ));
    }
    // SAFETY: an SCM_RIGHTS message carries at least one fd in its data,
    // which the kernel installed in our table; we take ownership of it.
    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>()) };
    // SAFETY: fd was just installed by the kernel for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Both ends of one ring over private memory, for the fuzz targets and
/// tests: the same [`RingEnd`] code the transport runs on the shared
/// mapping, plus the writes a hostile peer can make to the region (any data
/// byte, either index). Not part of the transport's API.
#[doc(hidden)]
pub struct RingModel {
    /// Words: head, tail, asleep, then the data area. Owned (from
    /// `Box::into_raw`); freed on drop. Every access goes through this pointer.
    base: *mut u64,
    words: usize,
    producer: RingEnd,
    consumer: RingEnd,
}

impl RingModel {
    const DATA_WORD: usize = 3;

    /// A ring of `ring_bytes` (a power of two, at least 64).
    pub fn new(ring_bytes: usize) -> Result<Self, TransportError> {
        if !ring_bytes.is_power_of_two() || ring_bytes < 64 {
            return Err(TransportError::BadRegion(
                "ring size must be a power of two >= 64",
            ));
        }
        let words = Self::DATA_WORD + ring_bytes / 8;
        let base = Box::into_raw(vec![0u64; words].into_boxed_slice()).cast::<u64>();
        let end = || RingEnd {
            // SAFETY: DATA_WORD < words: the data area starts inside the allocation.
            data: unsafe { base.add(Self::DATA_WORD) }.cast::<u8>(),
            size: ring_bytes as u64,
            head: base.cast::<AtomicU64>(),
            // SAFETY: word 1 is inside the allocation.
            tail: unsafe { base.add(1) }.cast::<AtomicU64>(),
            mine: 0,
            theirs: 0,
            open: None,
            lent: 0,
            private: Vec::new(),
            // SAFETY: word 2 is inside the allocation.
            asleep: unsafe { base.add(2) }.cast::<AtomicU64>(),
        };
        Ok(Self {
            base,
            words,
            producer: end(),
            consumer: end(),
        })
    }

    /// The producer sends one frame; `Ok(false)` when the ring is full.
    pub fn send(&mut self, frame: &[u8]) -> Result<bool, TransportError> {
        let Some(buf) = self.producer.reserve(frame.len())? else {
            return Ok(false);
        };
        buf.copy_from_slice(frame);
        self.producer.commit(frame.len())?;
        Ok(true)
    }

    /// The consumer takes the next record, if any.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        Ok(self.consumer.recv()?.map(<[u8]>::to_vec))
    }

    /// A hostile peer writes `bytes` into the data area at `offset` (both
    /// taken modulo the ring size).
    pub fn peer_write(&mut self, offset: usize, bytes: &[u8]) {
        let size = (self.words - Self::DATA_WORD) * 8;
        for (i, &b) in bytes.iter().enumerate() {
            // SAFETY: the index is reduced modulo the data area's size, so the
            // byte is inside the allocation; written with a volatile copy,
            // as the peer's writes to the shared mapping are seen.
            unsafe {
                volatile_copy_to(
                    &[b],
                    self.base
                        .add(Self::DATA_WORD)
                        .cast::<u8>()
                        .add((offset + i) % size),
                )
            };
        }
    }

    /// A hostile peer stores `value` as the ring's head (it plays the consumer).
    pub fn peer_set_head(&mut self, value: u64) {
        RingEnd::store(self.producer.head, value);
    }

    /// A hostile peer stores `value` as the ring's tail (it plays the producer).
    pub fn peer_set_tail(&mut self, value: u64) {
        RingEnd::store(self.consumer.tail, value);
    }
}

impl Drop for RingModel {
    fn drop(&mut self) {
        // SAFETY: base and words are the allocation made by `new` with
        // Box::into_raw, freed exactly once here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.base, self.words)) });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{FRAME_HEADER_LEN, FrameKind, encode_control, handshake};

    fn session(role: Role) -> Session {
        Session {
            vm_id: 9,
            generation: 1,
            role,
            key: b"shm test key, thirty-two bytes long".to_vec(),
        }
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("lockstep-shm-{name}-{}.sock", std::process::id()))
    }

    /// A peer that passed the handshake and holds the memfd cannot shrink
    /// it (which would SIGBUS this process at its next ring access) nor
    /// grow it, nor remove the seals; the listener's end keeps working.
    #[test]
    fn the_peer_cannot_resize_the_region() {
        let path = socket_path("seal");
        let listener = ShmListener::bind(&path).unwrap();
        let backup =
            std::thread::spawn(move || listener.accept(&session(Role::Backup), 64 << 10).unwrap());
        let mut sock = UnixStream::connect(&path).unwrap();
        handshake(&mut sock, &session(Role::Primary), PROTOCOL_VERSION).unwrap();
        let fd = recv_fd(&sock).unwrap();
        let mut backup = backup.join().unwrap();
        let _ = std::fs::remove_file(&path);
        for size in [0, 4096, 1 << 30] {
            // SAFETY: ftruncate on an fd we own.
            let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size) };
            let e = std::io::Error::last_os_error();
            assert_eq!(r, -1, "a resize to {size} bytes succeeded");
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        }
        // SAFETY: fcntl(F_ADD_SEALS) on an fd we own.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(r, -1, "seals could still be changed");
        // The backup still reads and writes its rings.
        let mut sealer = backup.frame_keys().sealer(Role::Backup);
        let buf = backup.reserve(FRAME_HEADER_LEN).unwrap().unwrap();
        let n = encode_control(buf, FrameKind::Heartbeat, 1, 0, &mut sealer).unwrap();
        backup.commit(n).unwrap();
        assert!(backup.recv().unwrap().is_none());
    }

    /// A listener that shares an unsealed memfd (which it could shrink
    /// under our mapping) is refused before anything is mapped.
    #[test]
    fn an_unsealed_region_is_refused() {
        let path = socket_path("unsealed");
        let listener = UnixListener::bind(&path).unwrap();
        let hostile = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            handshake(&mut sock, &session(Role::Backup), PROTOCOL_VERSION).unwrap();
            // SAFETY: a NUL-terminated literal name.
            let raw = unsafe { libc::memfd_create(c"hostile".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(raw >= 0);
            // SAFETY: raw is a fresh fd nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let total = DATA_OFFSET + 2 * (64 << 10);
            // SAFETY: ftruncate on an fd we own.
            assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), total as i64) }, 0);
            let map = Mapping::map(fd.as_raw_fd(), total).unwrap();
            let mut header = [0u8; 24];
            header[..8].copy_from_slice(&MAGIC);
            header[16..24].copy_from_slice(&(64u64 << 10).to_le_bytes());
            // SAFETY: the mapping is longer than 24 bytes.
            unsafe { volatile_copy_to(&header, map.ptr) };
            send_fd(&sock, fd.as_raw_fd()).unwrap();
            let mut rest = Vec::new();
            let _ = std::io::Read::read_to_end(&mut sock, &mut rest);
        });
        let result = ShmTransport::connect(&path, &session(Role::Primary));
        let _ = std::fs::remove_file(&path);
        let error = result.err().expect("an unsealed region was accepted");
        assert!(error.to_string().contains("not sealed"), "{error}");
        hostile.join().unwrap();
    }

    /// Bytes the peer changes after a frame was received do not change the
    /// frame this end is looking at: it is a private copy.
    #[test]
    fn a_received_frame_is_a_private_copy() {
        let path = socket_path("copy");
        let listener = ShmListener::bind(&path).unwrap();
        let backup =
            std::thread::spawn(move || listener.accept(&session(Role::Backup), 64 << 10).unwrap());
        let mut primary = ShmTransport::connect(&path, &session(Role::Primary)).unwrap();
        let mut backup = backup.join().unwrap();
        let _ = std::fs::remove_file(&path);
        let buf = primary.reserve(64).unwrap().unwrap();
        buf.fill(0x11);
        primary.commit(64).unwrap();
        let data = primary.tx.data;
        let frame = backup.recv().unwrap().unwrap();
        // The "peer" overwrites the record in the shared ring meanwhile.
        // SAFETY: the first 72 bytes of ring 0's data area (prefix + frame).
        unsafe { volatile_copy_to(&[0x22; 64], data.add(REC_PREFIX)) };
        assert!(frame.iter().all(|&b| b == 0x11));
    }

    #[test]
    fn frames_cross_the_ring_model_intact() {
        let mut ring = RingModel::new(256).expect("ring");
        for round in 0..40u8 {
            let frame = vec![round; usize::from(round) % 90];
            assert!(ring.send(&frame).expect("send"), "room for one frame");
            assert_eq!(ring.recv().expect("recv"), Some(frame));
        }
        assert_eq!(ring.recv().expect("recv"), None);
    }

    #[test]
    fn a_peer_head_outside_the_ring_is_refused() {
        // Regression (fuzz target `shm_ring`): a consumer whose head is ahead
        // of the producer's tail made `reserve` underflow.
        for head in [u64::MAX, 1 << 20, 1000] {
            let mut ring = RingModel::new(256).expect("ring");
            assert!(ring.send(&[1; 60]).expect("send"));
            ring.peer_set_head(head);
            let error = loop {
                match ring.send(&[2; 60]) {
                    Ok(true) => continue,
                    Ok(false) => panic!("head {head}: the ring looked full, not corrupt"),
                    Err(error) => break error,
                }
            };
            assert!(
                error.to_string().contains("head is outside the ring"),
                "head {head}: {error}"
            );
            // The refused head is not kept: the next send is refused the same way.
            let again = ring.send(&[3; 60]).expect_err("still corrupt");
            assert!(
                again.to_string().contains("head is outside the ring"),
                "{again}"
            );
        }
    }

    #[test]
    fn a_peer_tail_outside_the_ring_is_refused() {
        let mut ring = RingModel::new(256).expect("ring");
        ring.peer_set_tail(1 << 40);
        assert!(ring.recv().is_err());
    }
}
