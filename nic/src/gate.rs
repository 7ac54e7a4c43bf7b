//! The output gate: the Output Rule, enforced.
//!
//! Every frame the guest transmits is tagged with the log position `L` of
//! the last entry the primary had logged when the guest produced it. The
//! frame may reach the outside world only when the backup has acknowledged
//! receipt of every entry up to `L`: otherwise a client could see output
//! that the backup, on taking over, would never reproduce.
//!
//! [`OutputGate::ack`] is called by whoever receives the ack (the channel's
//! receiver thread): it releases every frame the ack covers right there, in
//! order, before it returns. There is no timer and no poll interval between
//! the ack and the release. A gate created with [`OutputGate::open`] (FT off,
//! or a primary that has won the right to run alone) releases every frame as
//! it is submitted.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

pub use hdrhistogram::Histogram;

/// Where released frames go (a TAP device; a test's vector).
pub trait FrameOut: Send {
    /// Sends one frame. Errors are counted by the gate, not retried: the
    /// network may drop frames anyway, and TCP recovers.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
}

struct Held {
    position: u64,
    frame: Vec<u8>,
    since: Instant,
}

struct GateState {
    acked: u64,
    held: VecDeque<Held>,
    out: Box<dyn FrameOut>,
    hold_ns: Histogram<u64>,
    submit_wait_ns: Histogram<u64>,
    tap_write_ns: Histogram<u64>,
    released: u64,
    send_errors: u64,
    max_held: usize,
}

/// Counters and the hold-time distribution of a gate.
#[derive(Clone, Debug)]
pub struct GateStats {
    /// Highest log position acknowledged.
    pub acked: u64,
    /// Frames held now.
    pub held: usize,
    /// Most frames ever held at once.
    pub max_held: usize,
    /// Frames released.
    pub released: u64,
    /// Frames the output refused.
    pub send_errors: u64,
    /// Time each released frame was held, in ns.
    pub hold_ns: Histogram<u64>,
    /// Time `submit` (the vCPU) waited for the gate, in ns.
    pub submit_wait_ns: Histogram<u64>,
    /// Time one frame's write to the output took, in ns.
    pub tap_write_ns: Histogram<u64>,
}

/// Holds frames until the ack that covers them.
pub struct OutputGate {
    state: Mutex<GateState>,
}

impl OutputGate {
    /// A gate that holds frames until acknowledged (primary with a backup).
    pub fn new(out: Box<dyn FrameOut>) -> Self {
        Self::with_ack(out, 0)
    }

    /// A gate that holds nothing (FT off, or running alone).
    pub fn open(out: Box<dyn FrameOut>) -> Self {
        Self::with_ack(out, u64::MAX)
    }

    fn with_ack(out: Box<dyn FrameOut>, acked: u64) -> Self {
        let hold_ns = Histogram::new_with_bounds(1, 100_000_000_000, 3)
            .expect("1 ns .. 100 s at 3 significant digits are valid histogram bounds");
        Self {
            state: Mutex::new(GateState {
                acked,
                held: VecDeque::new(),
                out,
                hold_ns: hold_ns.clone(),
                submit_wait_ns: hold_ns.clone(),
                tap_write_ns: hold_ns,
                released: 0,
                send_errors: 0,
                max_held: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // A panic while holding the lock aborts the process (panic = abort),
        // so the lock cannot be poisoned in practice; recover the data if so.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Submits a frame produced at log position `position`: sent now if the
    /// ack already covers it, else held.
    pub fn submit(&self, position: u64, frame: Vec<u8>) {
        let asked = Instant::now();
        let mut state = self.lock();
        let _ = state.submit_wait_ns.record(ns_since(asked));
        if position <= state.acked && state.held.is_empty() {
            let began = Instant::now();
            let result = state.out.send(&frame);
            let _ = state.tap_write_ns.record(ns_since(began));
            state.released += 1;
            state.send_errors += u64::from(result.is_err());
            let _ = state.hold_ns.record(1);
            return;
        }
        state.held.push_back(Held {
            position,
            frame,
            since: Instant::now(),
        });
        state.max_held = state.max_held.max(state.held.len());
    }

    /// The backup has received every entry up to `position`: release every
    /// frame that covers, now, in order.
    pub fn ack(&self, position: u64) {
        let mut state = self.lock();
        if position <= state.acked {
            return;
        }
        state.acked = position;
        while state
            .held
            .front()
            .is_some_and(|held| held.position <= position)
        {
            let Some(held) = state.held.pop_front() else {
                break;
            };
            let began = Instant::now();
            let result = state.out.send(&held.frame);
            let _ = state.tap_write_ns.record(ns_since(began));
            state.released += 1;
            state.send_errors += u64::from(result.is_err());
            let waited = u64::try_from(held.since.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ = state.hold_ns.record(waited);
        }
    }

    /// Stops holding: releases everything and lets later frames through
    /// (the primary won the right to run without its backup).
    pub fn open_fully(&self) {
        self.ack(u64::MAX);
    }

    /// Holds again after running alone (a new backup is joining): frames
    /// produced after log position `position` wait for its acks.
    pub fn hold_after(&self, position: u64) {
        self.lock().acked = position;
    }

    /// Current counters.
    pub fn stats(&self) -> GateStats {
        let state = self.lock();
        GateStats {
            acked: state.acked,
            held: state.held.len(),
            max_held: state.max_held,
            released: state.released,
            send_errors: state.send_errors,
            hold_ns: state.hold_ns.clone(),
            submit_wait_ns: state.submit_wait_ns.clone(),
            tap_write_ns: state.tap_write_ns.clone(),
        }
    }
}

/// ns since `since`, at least 1 (the histograms start at 1).
fn ns_since(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sent(Arc<Mutex<Vec<Vec<u8>>>>);

    impl FrameOut for Sent {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.0.lock().expect("lock").push(frame.to_vec());
            Ok(())
        }
    }

    impl Sent {
        fn frames(&self) -> Vec<Vec<u8>> {
            self.0.lock().expect("lock").clone()
        }
    }

    #[test]
    fn frames_wait_for_the_ack_that_covers_them() {
        let sent = Sent::default();
        let gate = OutputGate::new(Box::new(sent.clone()));
        gate.submit(3, vec![3]);
        gate.submit(5, vec![5]);
        gate.submit(9, vec![9]);
        assert!(sent.frames().is_empty(), "nothing leaves before an ack");
        gate.ack(4);
        assert_eq!(sent.frames(), vec![vec![3]], "ack 4 covers only position 3");
        gate.ack(2);
        assert_eq!(sent.frames().len(), 1, "an older ack changes nothing");
        gate.ack(9);
        assert_eq!(sent.frames(), vec![vec![3], vec![5], vec![9]], "in order");
        gate.submit(8, vec![8]);
        assert_eq!(sent.frames().len(), 4, "already covered: sent at once");
        let stats = gate.stats();
        assert_eq!((stats.released, stats.held, stats.max_held), (4, 0, 3));
        assert_eq!(stats.hold_ns.len(), 4);
    }

    #[test]
    fn open_gate_holds_nothing() {
        let sent = Sent::default();
        let gate = OutputGate::open(Box::new(sent.clone()));
        gate.submit(u64::MAX - 1, vec![1]);
        assert_eq!(sent.frames().len(), 1);
    }

    #[test]
    fn release_happens_inside_the_ack_call_from_another_thread() {
        let sent = Sent::default();
        let gate = Arc::new(OutputGate::new(Box::new(sent.clone())));
        for position in 1..=1000u64 {
            gate.submit(position, position.to_le_bytes().to_vec());
        }
        let acker = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                for position in (10..=1000u64).step_by(10) {
                    gate.ack(position);
                }
            })
        };
        acker.join().expect("acker");
        let frames = sent.frames();
        assert_eq!(
            frames.len(),
            1000,
            "every frame released by the time ack returns"
        );
        for (index, frame) in frames.iter().enumerate() {
            assert_eq!(frame, &(index as u64 + 1).to_le_bytes().to_vec());
        }
    }
}
