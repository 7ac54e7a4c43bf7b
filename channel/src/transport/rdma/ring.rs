//! The pure bookkeeping of the RDMA rings, without verbs: where the writer
//! may put the next frame, which spans it posts, and how the reader cuts
//! frames out of the spans it is told about. Kept apart so it is tested on
//! any host, with or without an RDMA device.
//!
//! Positions are monotonic `u64` byte counts; the ring offset of position
//! `p` is `p % size`. A frame never wraps: when it does not fit before the
//! end of the ring the writer *skips* to the next ring start, and the first
//! span posted after the skip carries [`SKIP_FLAG`] in its immediate, so the
//! reader skips the same bytes.

use std::collections::VecDeque;

use super::super::TransportError;
use crate::protocol::{FRAME_HEADER_LEN, frame_len};

/// Bit 31 of the immediate: the writer skipped to the next ring start
/// before this span.
pub const SKIP_FLAG: u32 = 1 << 31;
/// Largest span length an immediate can carry.
pub const MAX_SPAN: u64 = (SKIP_FLAG - 1) as u64;

/// Frames occupy whole 8-byte units in the ring.
pub const fn pad8(len: usize) -> usize {
    len.next_multiple_of(8)
}

/// One span to post: `len` bytes at ring offset `off` (local staging and
/// remote ring alike), ending at monotonic position `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Ring offset of the first byte.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// Monotonic position just past the span.
    pub end: u64,
    /// The immediate to send: `len`, plus [`SKIP_FLAG`] after a skip.
    pub imm: u32,
}

/// The writer's view of the peer's ring (mirrored in a local staging ring).
#[derive(Debug)]
pub struct TxRing {
    size: u64,
    /// End of the committed frames.
    tail: u64,
    /// End of the bytes posted to the NIC.
    posted: u64,
    /// End of the bytes whose write completed (the NIC is done reading them).
    completed: u64,
    /// The peer's consumed position, from its status block.
    peer_consumed: u64,
    /// Open reservation: (monotonic start, reserved length).
    open: Option<(u64, usize)>,
    /// Monotonic positions where the writer skipped to the next ring start.
    skips: VecDeque<u64>,
    /// The next posted span follows a skip.
    pending_skip: bool,
}

impl TxRing {
    /// A ring of `size` bytes (a power of two).
    pub fn new(size: u64) -> Self {
        Self {
            size,
            tail: 0,
            posted: 0,
            completed: 0,
            peer_consumed: 0,
            open: None,
            skips: VecDeque::new(),
            pending_skip: false,
        }
    }

    /// Ring size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The open reservation's ring offset and length, if it can hold
    /// `max_len` bytes, or a fresh one. `Ok(None)`: no room now.
    pub fn reserve(&mut self, max_len: usize) -> Result<Option<u64>, TransportError> {
        if let Some((at, len)) = self.open {
            if len >= max_len {
                return Ok(Some(at % self.size));
            }
            return Err(TransportError::BadCommit {
                len: max_len,
                reserved: len,
            });
        }
        let need = pad8(max_len) as u64;
        let pos = self.tail % self.size;
        let contiguous = self.size - pos;
        let required = if need <= contiguous {
            need
        } else {
            contiguous + need
        };
        // Position p may be rewritten once the bytes at p - size are both
        // consumed by the peer and read by our NIC.
        let limit = self.peer_consumed.min(self.completed) + self.size;
        if self.tail + required > limit {
            return Ok(None);
        }
        if need > contiguous {
            self.skips.push_back(self.tail);
            self.tail += contiguous;
        }
        self.open = Some((self.tail, max_len));
        Ok(Some(self.tail % self.size))
    }

    /// Ring offset of the open reservation, if any.
    pub fn open_offset(&self) -> Option<u64> {
        self.open.map(|(at, _)| at % self.size)
    }

    /// Commits `len` bytes of the open reservation as one frame; returns the
    /// monotonic end of the frame in the ring (`discard`: the frame does not
    /// go into the ring at all, see the Ack interception).
    pub fn commit(&mut self, len: usize, discard: bool) -> Result<u64, TransportError> {
        let Some((at, reserved)) = self.open.take() else {
            return Err(TransportError::BadCommit { len, reserved: 0 });
        };
        if len > reserved {
            self.open = Some((at, reserved));
            return Err(TransportError::BadCommit { len, reserved });
        }
        if !discard {
            self.tail = at + pad8(len) as u64;
        }
        Ok(self.tail)
    }

    /// The next span to post (committed, not yet posted), if any; call
    /// [`TxRing::posted`] once it is posted.
    pub fn next_span(&mut self) -> Option<Span> {
        loop {
            if self.posted >= self.tail {
                return None;
            }
            if self.skips.front() == Some(&self.posted) {
                self.skips.pop_front();
                self.posted += self.size - self.posted % self.size;
                self.pending_skip = true;
                continue;
            }
            let off = self.posted % self.size;
            let mut end = self.tail.min(self.posted + (self.size - off));
            if let Some(&s) = self.skips.front() {
                end = end.min(s);
            }
            let len = (end - self.posted).min(MAX_SPAN);
            let end = self.posted + len;
            let imm = len as u32 | if self.pending_skip { SKIP_FLAG } else { 0 };
            return Some(Span { off, len, end, imm });
        }
    }

    /// The span returned by [`TxRing::next_span`] was posted.
    pub fn posted(&mut self, span: &Span) {
        self.posted = span.end;
        self.pending_skip = false;
    }

    /// A posted span's write completed.
    pub fn completed(&mut self, end: u64) {
        self.completed = self.completed.max(end);
    }

    /// The peer reports it consumed everything before `consumed`.
    pub fn peer_consumed(&mut self, consumed: u64) -> Result<(), TransportError> {
        if consumed > self.posted {
            return Err(TransportError::BadRegion(
                "the peer reports consuming bytes we never wrote",
            ));
        }
        self.peer_consumed = self.peer_consumed.max(consumed);
        Ok(())
    }

    /// True once every committed byte was posted and its write completed.
    pub fn flushed(&self) -> bool {
        self.completed >= self.tail
    }

    /// True if committed bytes wait to be posted.
    pub fn has_unposted(&self) -> bool {
        self.posted < self.tail
    }
}

/// The reader's view of its own ring.
#[derive(Debug)]
pub struct RxRing {
    size: u64,
    max_frame: usize,
    /// End of the last span announced.
    written: u64,
    /// Read position (everything before it is consumed, once `lent` is released).
    cur: u64,
    /// Padded bytes of the frame lent out by the last `next_frame`.
    lent: u64,
    /// Announced spans not yet fully read: (start, end).
    spans: VecDeque<(u64, u64)>,
}

impl RxRing {
    /// A ring of `size` bytes accepting frames up to `max_frame`.
    pub fn new(size: u64, max_frame: usize) -> Self {
        Self {
            size,
            max_frame,
            written: 0,
            cur: 0,
            lent: 0,
            spans: VecDeque::new(),
        }
    }

    /// A write with immediate `imm` arrived (its bytes are in the ring).
    pub fn on_span(&mut self, imm: u32, byte_len: u32) -> Result<(), TransportError> {
        let len = u64::from(imm & !SKIP_FLAG);
        if u64::from(byte_len) != len {
            return Err(TransportError::BadRegion(
                "a write's length differs from the length in its immediate",
            ));
        }
        if imm & SKIP_FLAG != 0 {
            self.written = self.written.next_multiple_of(self.size);
        }
        let start = self.written;
        let end = start + len;
        if len == 0 || start % self.size + len > self.size {
            return Err(TransportError::BadRegion(
                "the peer wrote a span that is empty or runs past the ring's end",
            ));
        }
        if end - self.consumed_floor() > self.size {
            return Err(TransportError::BadRegion(
                "the peer wrote into ring space we had not released",
            ));
        }
        self.written = end;
        self.spans.push_back((start, end));
        Ok(())
    }

    /// The oldest position still in use (released bytes are below it).
    fn consumed_floor(&self) -> u64 {
        self.cur
    }

    /// Everything before this position is consumed (reported to the writer).
    pub fn consumed(&self) -> u64 {
        self.cur
    }

    /// True when every announced byte was read and released.
    pub fn drained(&self) -> bool {
        self.spans.is_empty() && self.lent == 0
    }

    /// Releases the frame lent by the last [`RxRing::next_frame`].
    pub fn release(&mut self) {
        self.cur += self.lent;
        self.lent = 0;
        while let Some(&(start, end)) = self.spans.front() {
            if self.cur < start {
                self.cur = start; // the writer skipped these bytes
            }
            if self.cur < end {
                break;
            }
            self.spans.pop_front();
        }
    }

    /// Ring offset and length of the next frame, if one is complete; `ring`
    /// is the ring's memory. The frame stays lent until the next call.
    pub fn next_frame(&mut self, ring: &[u8]) -> Result<Option<(usize, usize)>, TransportError> {
        self.release();
        let Some(&(_, end)) = self.spans.front() else {
            return Ok(None);
        };
        let off = (self.cur % self.size) as usize;
        let avail = (end - self.cur) as usize;
        if avail < FRAME_HEADER_LEN {
            return Err(TransportError::BadRegion(
                "a span ends inside a frame header",
            ));
        }
        let Some(len) = frame_len(&ring[off..off + avail]) else {
            return Err(TransportError::BadRegion(
                "a span ends inside a frame header",
            ));
        };
        if len > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if pad8(len) > avail {
            return Err(TransportError::BadRegion("a frame runs past its span"));
        }
        self.lent = pad8(len) as u64;
        Ok(Some((off, len)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::protocol::{FrameKeys, FrameKind, Role, encode_control, seal};

    thread_local! {
        static SEALER: std::cell::RefCell<crate::protocol::FrameSealer> =
            std::cell::RefCell::new(FrameKeys::for_tests().sealer(Role::Primary));
    }

    /// A frame of `payload` bytes whose payload encodes `id`.
    fn frame(buf: &mut [u8], id: u64, payload: usize) -> usize {
        for (i, b) in buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload]
            .iter_mut()
            .enumerate()
        {
            *b = (id as u8).wrapping_add(i as u8);
        }
        SEALER
            .with(|s| {
                seal(
                    buf,
                    FrameKind::Batch,
                    1,
                    id,
                    0,
                    payload,
                    &mut s.borrow_mut(),
                )
            })
            .unwrap()
    }

    /// Writer and reader over two byte arrays standing in for the staging
    /// ring and the remote ring: every frame arrives once, whole, in order,
    /// through skips and credit stalls.
    #[test]
    fn frames_cross_the_ring_whole_and_in_order() {
        let size = 4096u64;
        let mut tx = TxRing::new(size);
        let mut rx = RxRing::new(size, 2048);
        let mut staging = vec![0u8; size as usize];
        let mut remote = vec![0u8; size as usize];
        let mut inflight: VecDeque<(Span, bool)> = VecDeque::new();
        let mut next_id = 1u64;
        let mut expect = 1u64;
        let mut opener = FrameKeys::for_tests().opener(Role::Backup);
        let mut seed = 0x1234_5678u64;
        let mut rand = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut stalls = 0;
        let mut skipped = 0;
        while expect < 5000 {
            // Writer: reserve + commit some frames.
            for _ in 0..(rand() % 4) {
                let payload = (rand() % 1500) as usize;
                let Some(off) = tx.reserve(FRAME_HEADER_LEN + payload).unwrap() else {
                    stalls += 1;
                    break;
                };
                let off = off as usize;
                let n = frame(&mut staging[off..], next_id, payload);
                next_id += 1;
                tx.commit(n, false).unwrap();
            }
            // Post, "transfer" (copy staging -> remote) and complete some spans.
            while let Some(s) = tx.next_span() {
                tx.posted(&s);
                skipped += u32::from(s.imm & SKIP_FLAG != 0);
                inflight.push_back((s, false));
            }
            while let Some((s, _)) = inflight.pop_front() {
                let (o, l) = (s.off as usize, s.len as usize);
                remote[o..o + l].copy_from_slice(&staging[o..o + l]);
                rx.on_span(s.imm, s.len as u32).unwrap();
                tx.completed(s.end);
            }
            // Reader: take some frames, then report consumption.
            for _ in 0..(rand() % 6) {
                let Some((off, len)) = rx.next_frame(&remote).unwrap() else {
                    break;
                };
                let f =
                    crate::protocol::decode_frame(&remote[off..off + len], 1, expect, &mut opener)
                        .unwrap();
                assert_eq!(f.seq, expect);
                expect += 1;
            }
            rx.release();
            tx.peer_consumed(rx.consumed()).unwrap();
        }
        assert!(stalls > 0, "the test should exercise credit stalls");
        assert!(skipped > 0, "the test should exercise ring-end skips");
    }

    #[test]
    fn reader_refuses_overrun_and_bad_spans() {
        let mut rx = RxRing::new(4096, 2048);
        assert!(rx.on_span(4096, 4096).is_ok());
        // The ring is full and nothing was released: any more is an overrun.
        assert!(matches!(
            rx.on_span(8, 8),
            Err(TransportError::BadRegion(m)) if m.contains("not released")
        ));
        let mut rx = RxRing::new(4096, 2048);
        assert!(rx.on_span(8, 16).is_err(), "length mismatch");
        assert!(rx.on_span(0, 0).is_err(), "empty span");
        let mut rx = RxRing::new(4096, 64);
        rx.on_span(128, 128).unwrap();
        let mut ring = vec![0u8; 4096];
        let n = SEALER
            .with(|s| encode_control(&mut ring, FrameKind::Heartbeat, 1, 0, &mut s.borrow_mut()))
            .unwrap();
        assert_eq!(n, FRAME_HEADER_LEN);
        // A header announcing more than max_frame.
        ring[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            rx.next_frame(&ring),
            Err(TransportError::FrameTooLarge { len, max: 64 }) if len == FRAME_HEADER_LEN + 100
        ));
    }

    #[test]
    fn writer_refuses_bogus_credit() {
        let mut tx = TxRing::new(4096);
        assert!(tx.peer_consumed(8).is_err());
        assert!(tx.commit(8, false).is_err(), "commit without reserve");
        tx.reserve(64).unwrap();
        assert!(tx.commit(128, false).is_err(), "commit beyond reservation");
    }
}
