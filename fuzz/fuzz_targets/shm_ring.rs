//! One ring of the shared-memory transport (`channel::transport::shm`'s
//! ring ends, through `RingModel`: the code the transport runs on the
//! memfd) with a hostile peer that may write any byte of the ring and
//! either index at any time, between honest sends and receives. The
//! consumer must refuse what the peer corrupted, never read out of bounds
//! or panic; with an honest peer every frame arrives intact and in order.
#![no_main]
use std::collections::VecDeque;

use channel::transport::shm::RingModel;
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::Input;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = 64usize << (input.u8() % 8);
    let Ok(mut ring) = RingModel::new(size) else {
        return;
    };
    let mut honest = true;
    let mut expected: VecDeque<Vec<u8>> = VecDeque::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 512 {
        steps += 1;
        match input.u8() % 6 {
            0 | 1 => {
                let len = usize::from(input.u16()) % size;
                let fill = input.u8();
                let frame: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                match ring.send(&frame) {
                    Ok(true) => expected.push_back(frame),
                    Ok(false) => {}
                    Err(_) if !honest => {}
                    Err(e) => assert!(
                        8 + len.next_multiple_of(8) > size / 2,
                        "honest send refused: {e}"
                    ),
                }
            }
            2 | 3 => match ring.recv() {
                Ok(Some(frame)) => {
                    if honest {
                        assert_eq!(Some(frame), expected.pop_front(), "frame lost or changed");
                    }
                }
                Ok(None) => {
                    if honest {
                        assert!(expected.is_empty(), "a sent frame did not arrive");
                    }
                }
                Err(_) => {
                    assert!(!honest, "an honest ring refused a record");
                    return;
                }
            },
            4 => {
                honest = false;
                let offset = usize::from(input.u16());
                ring.peer_write(offset, input.chunk());
            }
            _ => {
                honest = false;
                let value = input.u64();
                if input.u8() & 1 == 0 {
                    ring.peer_set_head(value);
                } else {
                    ring.peer_set_tail(value);
                }
            }
        }
    }
});
