//! io_uring TCP transport: the fallback when there is no RDMA NIC.
//!
//! Connection setup and the handshake use ordinary blocking std sockets
//! (they run once); after that the socket is only touched through io_uring:
//!
//! - **send**: committed frames wait in a queue of transport-owned buffers;
//!   one `WRITEV` covering up to [`MAX_IOV`] of them is in flight at a time
//!   (one in flight keeps the byte order of a stream socket without linked
//!   requests); buffers return to the pool only when the completion says their
//!   bytes were taken, and a short write resubmits the rest.
//! - **receive**: one `RECV` into the tail of a large buffer is always armed;
//!   frames are cut out of it in place using the header's length.
//! - **waiting**: [`Transport::poll`] never sleeps: it submits new requests
//!   and reaps the completion queue, which lives in shared memory, so a
//!   spinning caller sees completions without a system call. (On a 2-core
//!   host a thread sleeping in `io_uring_enter` costs ~70 µs to wake.)
//!
//! ```text
//!  reserve ─▶ [buf] ─commit─▶ queue [f1][f2][f3] ─WRITEV(f1,f2,f3)─▶ kernel ─CQE─▶ pool
//!  kernel ─RECV─▶ rbuf [ consumed | f4 | f5 | partial f6 |  free  ] ─recv()─▶ &f4, &f5
//! ```

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};

use super::{Transport, TransportError};
use crate::protocol::{
    FRAME_HEADER_LEN, FrameKeys, PROTOCOL_VERSION, Session, frame_len, handshake_timed,
};

/// Most frames in one `WRITEV`.
pub const MAX_IOV: usize = 64;
/// Send buffers in the pool (frames committed but not yet sent).
const MAX_SEND_BUFS: usize = 128;
const UD_SEND: u64 = 1;
/// `IORING_ENTER_GETEVENTS` from the kernel's uapi (the crate keeps `sys` private).
const IORING_ENTER_GETEVENTS: u32 = 1;
const UD_RECV: u64 = 2;

/// The io_uring TCP transport; see the module docs.
pub struct UringTcp {
    ring: IoUring,
    stream: TcpStream,
    max_frame: usize,
    /// Buffers free for `reserve`.
    pool: Vec<Vec<u8>>,
    /// Buffers handed out so far (pool + open + queued).
    allocated: usize,
    /// The open reservation.
    open: Option<Vec<u8>>,
    /// Committed frames and their lengths, oldest first.
    queue: VecDeque<(Vec<u8>, usize)>,
    /// Bytes of the front frame already sent.
    sent_off: usize,
    /// iovecs of the in-flight WRITEV; not touched while it is in flight.
    iovecs: Vec<libc::iovec>,
    send_inflight: bool,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    lent: usize,
    recv_inflight: bool,
    closed: bool,
    eof: bool,
    /// False until the first `poll` enables the (R_DISABLED) ring.
    enabled: bool,
    /// The handshake's frame keys.
    keys: FrameKeys,
}

// SAFETY: the raw pointers in `iovecs` point into buffers this struct owns
// (in `queue`); the struct moves as a whole, heap buffers do not move, and no
// other thread holds any of them.
unsafe impl Send for UringTcp {}

impl UringTcp {
    /// Connects to `addr` (loopback in tests), runs the handshake, and
    /// switches the socket to io_uring. `max_frame` bounds frames both ways.
    pub fn connect(
        addr: SocketAddr,
        session: &Session,
        max_frame: usize,
    ) -> Result<Self, TransportError> {
        Self::connect_with_version(addr, session, max_frame, PROTOCOL_VERSION)
    }

    /// [`UringTcp::connect`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn connect_with_version(
        addr: SocketAddr,
        session: &Session,
        max_frame: usize,
        version: u16,
    ) -> Result<Self, TransportError> {
        let stream = TcpStream::connect(addr).map_err(|source| TransportError::Io {
            op: "connecting",
            source,
        })?;
        Self::establish(stream, session, max_frame, version)
    }

    /// Accepts one peer on `listener` and runs the handshake.
    pub fn accept(
        listener: &TcpListener,
        session: &Session,
        max_frame: usize,
    ) -> Result<Self, TransportError> {
        Self::accept_with_version(listener, session, max_frame, PROTOCOL_VERSION)
    }

    /// [`UringTcp::accept`] announcing another protocol version (tests).
    #[doc(hidden)]
    pub fn accept_with_version(
        listener: &TcpListener,
        session: &Session,
        max_frame: usize,
        version: u16,
    ) -> Result<Self, TransportError> {
        let (stream, _) = listener.accept().map_err(|source| TransportError::Io {
            op: "accepting",
            source,
        })?;
        Self::establish(stream, session, max_frame, version)
    }

    /// Runs the handshake on a stream accepted by the caller (who may have
    /// had to learn its current generation after the peer connected) and
    /// switches it to io_uring.
    pub fn establish_accepted(
        stream: TcpStream,
        session: &Session,
        max_frame: usize,
    ) -> Result<Self, TransportError> {
        Self::establish(stream, session, max_frame, PROTOCOL_VERSION)
    }

    fn establish(
        mut stream: TcpStream,
        session: &Session,
        max_frame: usize,
        version: u16,
    ) -> Result<Self, TransportError> {
        let io = |op| move |source| TransportError::Io { op, source };
        stream
            .set_nodelay(true)
            .map_err(io("setting TCP_NODELAY"))?;
        let keys = handshake_timed(&mut stream, session, version)?.keys;
        // Non-blocking, so io_uring never hands a request to a worker thread
        // (waking one costs tens of µs): it tries inline, then arms a poll.
        stream
            .set_nonblocking(true)
            .map_err(io("setting O_NONBLOCK"))?;
        // SINGLE_ISSUER | DEFER_TASKRUN: completion work runs only when we
        // enter the kernel asking for events, which `poll` does once per
        // call, so a spinning poller gets completions with no interrupt and
        // no worker wake-up. R_DISABLED: the ring is enabled by the first
        // `poll`, so the issuer is the thread that polls (the pinned sender),
        // not the one that connected. Older kernels get a plain ring.
        let (ring, enabled) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(64)
        {
            Ok(r) => (r, false),
            Err(_) => (IoUring::new(64).map_err(io("creating the io_uring"))?, true),
        };
        let max_frame = max_frame.max(FRAME_HEADER_LEN + 64);
        Ok(Self {
            ring,
            stream,
            max_frame,
            pool: Vec::new(),
            allocated: 0,
            open: None,
            queue: VecDeque::new(),
            sent_off: 0,
            iovecs: Vec::with_capacity(MAX_IOV),
            send_inflight: false,
            rbuf: vec![0; (4 * max_frame).max(1 << 20)],
            rstart: 0,
            rend: 0,
            lent: 0,
            recv_inflight: false,
            closed: false,
            eof: false,
            enabled,
            keys,
        })
    }

    fn release(&mut self) {
        self.rstart += self.lent;
        self.lent = 0;
        if self.rstart == self.rend && !self.recv_inflight {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    fn reap(&mut self) -> Result<bool, TransportError> {
        let mut moved = false;
        let mut results = [(0u64, 0i32); 8];
        loop {
            let mut n = 0;
            for cqe in self.ring.completion().take(results.len()) {
                results[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            if n == 0 {
                return Ok(moved);
            }
            moved = true;
            for &(ud, res) in &results[..n] {
                match ud {
                    UD_SEND => {
                        self.send_inflight = false;
                        if res < 0 {
                            return Err(self.failed("io_uring writev", -res));
                        }
                        let mut done = res as usize;
                        while let Some((_, len)) = self.queue.front() {
                            let left = len - self.sent_off;
                            if done < left {
                                self.sent_off += done;
                                break;
                            }
                            done -= left;
                            self.sent_off = 0;
                            if let Some((buf, _)) = self.queue.pop_front() {
                                self.pool.push(buf);
                            }
                        }
                    }
                    UD_RECV => {
                        self.recv_inflight = false;
                        if res == 0 {
                            // Frames already buffered are still delivered;
                            // `recv` reports the close after the last one.
                            self.eof = true;
                        } else if res < 0 {
                            return Err(self.failed("io_uring recv", -res));
                        } else {
                            self.rend += res as usize;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn failed(&mut self, op: &'static str, errno: i32) -> TransportError {
        self.closed = true;
        if errno == libc::ECONNRESET || errno == libc::EPIPE {
            return TransportError::Closed;
        }
        TransportError::Io {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    fn arm(&mut self) -> Result<bool, TransportError> {
        let mut armed = false;
        if !self.send_inflight && !self.queue.is_empty() {
            self.iovecs.clear();
            for (i, (buf, len)) in self.queue.iter().take(MAX_IOV).enumerate() {
                let off = if i == 0 { self.sent_off } else { 0 };
                self.iovecs.push(libc::iovec {
                    // The kernel only reads through this pointer.
                    iov_base: buf[off..*len].as_ptr() as *mut libc::c_void,
                    iov_len: len - off,
                });
            }
            let sqe = opcode::Writev::new(
                types::Fd(self.stream.as_raw_fd()),
                self.iovecs.as_ptr(),
                self.iovecs.len() as u32,
            )
            .build()
            .user_data(UD_SEND);
            self.push(&sqe)?;
            self.send_inflight = true;
            armed = true;
        }
        if !self.recv_inflight && self.lent == 0 && !self.eof {
            let free_tail = self.rbuf.len() - self.rend;
            if free_tail < self.max_frame && self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            let free_tail = self.rbuf.len() - self.rend;
            if free_tail > 0 {
                let sqe = opcode::Recv::new(
                    types::Fd(self.stream.as_raw_fd()),
                    self.rbuf[self.rend..].as_mut_ptr(),
                    free_tail as u32,
                )
                .build()
                .user_data(UD_RECV);
                self.push(&sqe)?;
                self.recv_inflight = true;
                armed = true;
            }
        }
        Ok(armed)
    }

    /// One `io_uring_enter`: submits what `arm` queued and runs pending
    /// completion work (GETEVENTS) without waiting for any.
    fn enter(&mut self) -> Result<(), TransportError> {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: io_uring_enter with no argument struct (arg = None, so
        // size 0) and flags GETEVENTS only; to_submit is the number of
        // entries queued in our own submission queue, whose buffers `push`
        // vouches for.
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                to_submit,
                0,
                IORING_ENTER_GETEVENTS,
                None,
            )
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(source) => Err(TransportError::Io {
                op: "io_uring enter",
                source,
            }),
        }
    }

    fn push(&mut self, sqe: &io_uring::squeue::Entry) -> Result<(), TransportError> {
        // SAFETY: the single submission site. Every buffer the entry names
        // stays valid and unmoved until its completion is reaped: WRITEV reads
        // `iovecs` and the queued frames, which are neither modified nor freed
        // while `send_inflight`; RECV writes `rbuf[rend..]`, which is neither
        // moved (no compaction) nor read past `rend` while `recv_inflight`;
        // `Drop` waits for both completions before freeing anything.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        pushed.map_err(|_| TransportError::Io {
            op: "io_uring push (submission queue full)",
            source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
        })
    }
}

impl Drop for UringTcp {
    fn drop(&mut self) {
        // Let committed frames (the final ack, say) leave first, for at most
        // 100 ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
        while self.enabled
            && !self.closed
            && !self.queue.is_empty()
            && std::time::Instant::now() < deadline
            && self.reap().is_ok()
            && self.arm().is_ok()
            && self.enter().is_ok()
        {
            std::hint::spin_loop();
        }
        // Make in-flight requests complete, then wait for them, so the kernel
        // never touches our buffers after they are freed.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if !self.enabled {
            return; // never polled: nothing was ever submitted
        }
        let mut tries = 0;
        while (self.send_inflight || self.recv_inflight) && tries < 1000 {
            let _ = self.ring.submit_and_wait(1);
            for cqe in self.ring.completion() {
                match cqe.user_data() {
                    UD_SEND => self.send_inflight = false,
                    UD_RECV => self.recv_inflight = false,
                    _ => {}
                }
            }
            tries += 1;
        }
        if self.send_inflight || self.recv_inflight {
            // Should never happen; leaking is the only sound choice left.
            std::mem::forget(std::mem::take(&mut self.rbuf));
            std::mem::forget(std::mem::take(&mut self.queue));
        }
    }
}

impl Transport for UringTcp {
    fn name(&self) -> &'static str {
        "uring-tcp"
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    fn frame_keys(&self) -> &FrameKeys {
        &self.keys
    }

    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError> {
        if max_len > self.max_frame {
            return Err(TransportError::TooBig {
                want: max_len,
                max: self.max_frame,
            });
        }
        if self.open.is_none() {
            let buf = match self.pool.pop() {
                Some(b) => b,
                None if self.allocated < MAX_SEND_BUFS => {
                    self.allocated += 1;
                    Vec::new()
                }
                None => return Ok(None),
            };
            self.open = Some(buf);
        }
        let Some(buf) = self.open.as_mut() else {
            return Ok(None);
        };
        if buf.len() < max_len {
            buf.resize(max_len, 0);
        }
        Ok(Some(&mut buf[..max_len]))
    }

    fn commit(&mut self, len: usize) -> Result<(), TransportError> {
        match self.open.take() {
            Some(buf) if len <= buf.len() => {
                self.queue.push_back((buf, len));
                Ok(())
            }
            Some(buf) => {
                let reserved = buf.len();
                self.open = Some(buf);
                Err(TransportError::BadCommit { len, reserved })
            }
            None => Err(TransportError::BadCommit { len, reserved: 0 }),
        }
    }

    fn poll(&mut self) -> Result<bool, TransportError> {
        if self.closed {
            return Err(TransportError::Closed);
        }
        if !self.enabled {
            self.ring
                .submitter()
                .register_enable_rings()
                .map_err(|source| TransportError::Io {
                    op: "enabling the io_uring",
                    source,
                })?;
            self.enabled = true;
        }
        self.release();
        let reaped = self.reap()?;
        let armed = self.arm()?;
        self.enter()?;
        let reaped_after = self.reap()?;
        Ok(reaped || armed || reaped_after)
    }

    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError> {
        self.release();
        let have = self.rend - self.rstart;
        let closed = |eof| {
            if eof {
                Err(TransportError::Closed)
            } else {
                Ok(None)
            }
        };
        let Some(len) = frame_len(&self.rbuf[self.rstart..self.rend]) else {
            return closed(self.eof);
        };
        if len > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if have < len {
            return closed(self.eof);
        }
        self.lent = len;
        Ok(Some(&self.rbuf[self.rstart..self.rstart + len]))
    }

    fn flushed(&self) -> bool {
        self.queue.is_empty()
    }

    fn sends_only_when_polled(&self) -> bool {
        true
    }

    /// Sleeps on the socket itself: with DEFER_TASKRUN an armed RECV only
    /// completes when we next enter the ring, so bytes that arrived are still
    /// in the socket and make it readable (a close makes it hang up). The
    /// ring's fd is watched too, for completions already posted. While a
    /// WRITEV is in flight its completion raises no event we can sleep on,
    /// so the nap is short then.
    fn wait(&mut self, wake: Option<RawFd>, timeout: Duration) -> Result<(), TransportError> {
        if self.closed || self.eof {
            return Ok(());
        }
        let timeout = if self.send_inflight {
            timeout.min(super::UNWAKEABLE_NAP)
        } else {
            timeout
        };
        super::wait_readable(
            &[self.stream.as_raw_fd(), self.ring.as_raw_fd()],
            wake,
            timeout,
        )
    }
}
