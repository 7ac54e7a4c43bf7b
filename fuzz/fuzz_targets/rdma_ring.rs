//! The RDMA transport's ring bookkeeping (`channel::transport::rdma::{RxRing,
//! TxRing}`) against a hostile peer: the reader is told of spans by write
//! completions whose immediates and lengths the peer chooses and cuts
//! frames out of ring memory the peer wrote; the writer is told by the
//! peer's status block how much it consumed. Both must refuse what does not
//! add up, never index out of the ring or panic.
#![no_main]
use channel::transport::rdma::{RxRing, TxRing};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = 256u64 << (input.u8() % 6);
    let max_frame = usize::from(input.u16()).max(32);
    let mut memory = vec![0u8; size as usize];
    let mut rx = RxRing::new(size, max_frame);
    let mut tx = TxRing::new(size);
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                let offset = usize::from(input.u16()) % memory.len();
                let bytes = input.chunk();
                let n = bytes.len().min(memory.len() - offset);
                memory[offset..offset + n].copy_from_slice(&bytes[..n]);
            }
            1 | 2 => {
                let imm = input.u32();
                let len = if input.u8() & 1 == 0 {
                    imm & 0x7fff_ffff
                } else {
                    input.u32()
                };
                if rx.on_span(imm, len).is_err() {
                    return;
                }
            }
            3 => match rx.next_frame(&memory) {
                Ok(Some((off, len))) => {
                    assert!(off + len <= memory.len(), "a frame outside the ring");
                    assert!(len <= max_frame);
                }
                Ok(None) => {}
                Err(_) => return,
            },
            4 => {
                let len = usize::from(input.u16()) % (size as usize);
                if let Ok(Some(off)) = tx.reserve(len) {
                    assert!(
                        off + len.next_multiple_of(8) as u64 <= size,
                        "a reservation wraps"
                    );
                    let commit = len.saturating_sub(usize::from(input.u8()));
                    let _ = tx.commit(commit, input.u8() & 1 == 0);
                }
            }
            5 => {
                if let Some(span) = tx.next_span() {
                    assert!(span.off + span.len <= size, "a span runs past the ring");
                    tx.posted(&span);
                    if input.u8() & 1 == 0 {
                        tx.completed(span.end);
                    }
                }
            }
            6 => {
                let _ = tx.peer_consumed(input.u64());
            }
            _ => {
                let _ = (rx.consumed(), rx.drained(), tx.flushed(), tx.has_unposted());
            }
        }
    }
});
