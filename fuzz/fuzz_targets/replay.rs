//! The VMM's reading of a log: `vmm::events::Replay` over a
//! `channel::log::LogReader`, asked for events by a synthetic guest.
//! Input: one byte N, N bytes of guest requests (bits 0-2: which event,
//! bit 3: an 8- or 64-byte buffer, bits 4-7: exits to advance first), then the log itself (header crc fixed up when
//! bit 0 of the first request byte is set). The replay must refuse
//! whatever does not match, never panic or run past a missing entry.
#![no_main]
use std::time::Duration;

use channel::log::{FILE_HEADER_LEN, LogReader};
use libfuzzer_sys::fuzz_target;
use lockstep_fuzz::Input;
use vmm::digest::Digest;
use vmm::events::{EventSource, Replay};
use vmm::state::EventPosition;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let n = usize::from(input.u8());
    let requests = input.bytes(n);
    let mut log = input.rest().to_vec();
    if requests.first().is_some_and(|r| r & 1 != 0) && log.len() >= FILE_HEADER_LEN {
        let crc = crc32c::crc32c(&log[..FILE_HEADER_LEN - 4]);
        log[FILE_HEADER_LEN - 4..FILE_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(reader) = LogReader::new(&log[..]) else {
        return;
    };
    let mut replay = match requests.get(1) {
        Some(&b) if b & 0x80 != 0 => Replay::resume(
            reader,
            &EventPosition {
                log_position: u64::from(b & 0x7f),
                last_clock_ns: 0,
            },
        ),
        _ => Replay::new(reader),
    };
    let digest = Digest {
        registers: 0,
        memory: 0,
        rip: 0,
    };
    let mut exit = 1u64;
    let mut buf = [0u8; 64];
    for &r in requests {
        exit += u64::from(r >> 4);
        let len = if r & 8 != 0 { 64 } else { 8 };
        let result = match r & 7 {
            0 => replay.clock(exit).map(drop),
            1 => replay.entropy(exit, &mut buf[..len]),
            2 => replay.input(exit, &mut buf[..len]).map(drop),
            3 => replay
                .net_rx(exit, usize::from(r >> 4), Duration::ZERO)
                .map(drop),
            4 => replay.digest(exit, &digest),
            5 => replay.stop_requested(exit).map(drop),
            6 => replay.stopped(exit, &digest),
            _ => replay.end(exit, u64::from(r >> 3 & 1)),
        };
        let _ = replay.position();
        if let Err(e) = result {
            let _ = e.to_string();
            break;
        }
    }
});
