//! Transports: how frames move between the two ends.
//!
//! A [`Transport`] moves whole frames (see [`crate::protocol`]) in both
//! directions, never blocks, and owns its buffers: the sender builds a frame
//! *inside* a transport buffer ([`Transport::reserve`]) and hands it over with
//! [`Transport::commit`]; the transport keeps it until the I/O completes (an
//! io_uring completion, a shared-ring consumer, an RDMA work completion).
//!
//! The shape is chosen so an RDMA transport fits: `reserve` is a slot of a
//! registered memory region, `commit` posts a work request, `poll` reaps the
//! completion queue, and [`Transport::transport_ack`] reports acks the peer's
//! NIC writes straight into our memory (an RDMA WRITE of the ack word), with
//! no ack frame at all.
//!
//! | transport              | setup                            | data path                      | an idle end sleeps on |
//! |------------------------|----------------------------------|--------------------------------|-----------------------|
//! | [`uring_tcp::UringTcp`]| std TCP connect + handshake      | io_uring writev / recv, CQ polled | the socket (and the ring fd) |
//! | [`shm::ShmTransport`]  | unix socket: handshake, memfd fd | two SPSC byte rings in a memfd | the unix socket: a doorbell byte or EOF |
//! | `rdma::RdmaTransport` (feature `rdma`) | TCP handshake, then QPN/GID/rkeys exchanged | RDMA WRITE WITH IMM into the peer's ring; status block written back (WITH IMM too) | its completion channel (every write raises a receive completion) and the TCP side channel |

#[cfg(feature = "rdma")]
pub mod rdma;
pub mod shm;
pub mod uring_tcp;

use std::os::fd::RawFd;
use std::time::Duration;

use thiserror::Error;

use crate::protocol::{
    FRAME_HEADER_LEN, FrameKeys, FrameOpener, HandshakeError, PreHashed, SealHasher,
};

/// Transport failures.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection (or died: the kernel closes its sockets).
    #[error("the peer closed the connection")]
    Closed,
    /// The peer announced a frame larger than we accept.
    #[error("peer announced a {len}-byte frame, larger than the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A reservation larger than the transport can ever hold.
    #[error("a {want}-byte frame does not fit this transport (at most {max})")]
    TooBig {
        /// Requested.
        want: usize,
        /// Limit.
        max: usize,
    },
    /// `commit` without `reserve`, or a commit longer than the reservation.
    #[error("commit of {len} bytes does not match the open reservation of {reserved}")]
    BadCommit {
        /// Committed length.
        len: usize,
        /// Reserved length (0 if none).
        reserved: usize,
    },
    /// The handshake failed.
    #[error("handshake failed")]
    Handshake(#[from] HandshakeError),
    /// The shared memory region is not what we expect.
    #[error("shared memory region invalid: {0}")]
    BadRegion(&'static str),
    /// The peer, the path to it or our RDMA device failed, as reported by
    /// the NIC (a failed work completion: retries exceeded, remote access
    /// error, QP in the error state) or an asynchronous device event. The
    /// channel is dead, exactly as if the peer had closed it.
    #[error("peer failure while {op}: {reason}")]
    PeerFailed {
        /// What was being done.
        op: &'static str,
        /// What the NIC or device reported.
        reason: String,
    },
    /// No RDMA device to run the RDMA transport on; the caller falls back
    /// to io_uring TCP.
    #[error("no RDMA device found: {detail}")]
    NoRdmaDevice {
        /// What was looked for and found.
        detail: String,
    },
}

impl TransportError {
    /// Wraps the last OS error.
    pub(crate) fn last_os(op: &'static str) -> Self {
        Self::Io {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// A received frame (valid until the transport's next `&mut self` call)
/// and, if the transport computed it while copying, its tag
/// ([`Transport::recv_prehashed`]).
pub type Received<'a> = (&'a [u8], Option<PreHashed>);

/// A non-blocking, frame-oriented, bidirectional transport.
pub trait Transport: Send {
    /// Short name for reports ("uring-tcp", "shm", "rdma").
    fn name(&self) -> &'static str;

    /// Largest frame this transport carries.
    fn max_frame(&self) -> usize;

    /// The frame keys its handshake derived: every frame either end sends
    /// over this connection is authenticated with them (see
    /// [`crate::protocol`]).
    fn frame_keys(&self) -> &FrameKeys;

    /// Opens (or returns the already open) reservation of `max_len` bytes to
    /// build one frame in. `Ok(None)` means no room right now: call
    /// [`Transport::poll`] and retry (the caller counts a stall). The
    /// reservation and its contents stay valid across `poll` and `recv` until
    /// [`Transport::commit`].
    fn reserve(&mut self, max_len: usize) -> Result<Option<&mut [u8]>, TransportError>;

    /// Sends the first `len` bytes of the open reservation as one frame.
    fn commit(&mut self, len: usize) -> Result<(), TransportError>;

    /// Seals the frame whose payload sits in the open reservation (of
    /// `reserved` bytes) with `frame` and sends it; returns its length.
    /// The default hashes the payload, writes the header, then
    /// [`Transport::commit`]s; the shared-memory ring hashes each chunk as
    /// it copies it into the ring ([`SealHasher`]).
    fn commit_sealed(
        &mut self,
        reserved: usize,
        mut frame: SealHasher<'_>,
    ) -> Result<usize, TransportError> {
        let len = frame.frame_len();
        let Some(buf) = self.reserve(reserved)?.filter(|b| b.len() >= len) else {
            return Err(TransportError::BadCommit { len, reserved: 0 });
        };
        frame.update(&buf[FRAME_HEADER_LEN..len]);
        buf[..FRAME_HEADER_LEN].copy_from_slice(&frame.finish());
        self.commit(len)?;
        Ok(len)
    }

    /// Makes progress on I/O without blocking; true if anything moved.
    fn poll(&mut self) -> Result<bool, TransportError>;

    /// The next complete received frame, if any. It stays valid until the
    /// next call of any `&mut self` method.
    fn recv(&mut self) -> Result<Option<&[u8]>, TransportError>;

    /// [`Transport::recv`], and the frame's tag if the transport computed
    /// it while copying the frame out of memory the peer can write (the
    /// shared-memory ring does, with `opener`'s key: see
    /// [`crate::protocol::PreHashed`]). The default computes nothing.
    fn recv_prehashed(
        &mut self,
        opener: &FrameOpener,
    ) -> Result<Option<Received<'_>>, TransportError> {
        let _ = opener;
        Ok(self.recv()?.map(|b| (b, None)))
    }

    /// True once every committed frame has left this process (the open
    /// reservation, if any, does not count). The sender seals a batch when
    /// this is true, so batches grow only while the transport is busy.
    fn flushed(&self) -> bool;

    /// True if committed frames leave only when [`Transport::poll`] is
    /// called (io_uring: the ring is entered there). A receiver that
    /// committed an ack polls once more before it hands the entries on, so
    /// the ack is not held until its next poll. Transports that send at
    /// commit (shm, RDMA: the ack is a status write posted at once) keep
    /// the default and pay no extra poll.
    fn sends_only_when_polled(&self) -> bool {
        false
    }

    /// A cumulative ack delivered by the transport itself (RDMA: the
    /// backup's NIC writes its ack word into our memory). `None` for
    /// transports whose acks travel as frames.
    fn transport_ack(&mut self) -> Option<u64> {
        None
    }

    /// Makes sure the peer can deliver nothing more, then lets every frame
    /// that already arrived be read with [`Transport::recv`]: called by a
    /// receiver that gives up on its peer (silence) before it goes live, so
    /// an entry already in its memory (and perhaps counted as received) is
    /// replayed, and none lands after the last look. Sockets need nothing
    /// (the caller stops reading; what was read is delivered); RDMA moves
    /// its queue pair to the error state and reaps the completions.
    fn quiesce(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Sleeps until a frame may have arrived from the peer (or the peer is
    /// gone), `wake` turned readable, or `timeout` passed; it may return
    /// early. The caller has just found `recv` empty. A transport that can
    /// be woken by the peer (a readable socket, a doorbell) sleeps for the
    /// whole `timeout`; the default, for one that cannot (the peer writes
    /// into our memory and raises no event), sleeps on `wake` alone for at
    /// most [`UNWAKEABLE_NAP`] and polls again.
    fn wait(&mut self, wake: Option<RawFd>, timeout: Duration) -> Result<(), TransportError> {
        wait_readable(&[], wake, timeout.min(UNWAKEABLE_NAP))
    }
}

/// The longest a transport that cannot be woken by its peer sleeps in
/// [`Transport::wait`].
pub const UNWAKEABLE_NAP: Duration = Duration::from_micros(50);

/// Sleeps until one of `fds` (at most two) or `wake` is readable (or hung
/// up), or `timeout` passed. `EINTR` counts as an early return.
pub(crate) fn wait_readable(
    fds: &[RawFd],
    wake: Option<RawFd>,
    timeout: Duration,
) -> Result<(), TransportError> {
    let unused = libc::pollfd {
        fd: -1, // ppoll skips negative descriptors
        events: libc::POLLIN,
        revents: 0,
    };
    let mut polled = [unused; 3];
    assert!(
        fds.len() < polled.len(),
        "wait_readable takes at most two fds"
    );
    let mut n = 0;
    for fd in fds.iter().copied().chain(wake) {
        polled[n].fd = fd;
        n += 1;
    }
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `polled[..n]` is a live, initialised array of pollfd the call
    // may write `revents` into; `ts` outlives the call; a null sigmask keeps
    // the thread's mask.
    let r = unsafe {
        libc::ppoll(
            polled.as_mut_ptr(),
            n as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let source = std::io::Error::last_os_error();
        if source.kind() != std::io::ErrorKind::Interrupted {
            return Err(TransportError::Io {
                op: "ppoll (waiting for the peer)",
                source,
            });
        }
    }
    Ok(())
}
