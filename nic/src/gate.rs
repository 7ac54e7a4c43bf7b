//! The output gate: the Output Rule, enforced.
//!
//! Every frame the guest transmits is tagged with the log position `L` of
//! the last entry the primary had logged when the guest produced it. The
//! frame may reach the outside world only when the backup has acknowledged
//! receipt of every entry up to `L`: otherwise a client could see output
//! that the backup, on taking over, would never reproduce.
//!
//! [`OutputGate::ack`] is called by whoever receives the ack (the channel's
//! sender thread): it releases every frame the ack covers right there, in
//! order. There is no timer and no poll interval between the ack and the
//! release. A gate created with [`OutputGate::open`] (FT off, or a primary
//! that has won the right to run alone) releases every frame as it is
//! submitted.
//!
//! # Locking: one writer, outside the state lock
//!
//! ```text
//!  vCPU  submit(L, frame) ─┐                      ┌─ ack(A)  sender thread
//!                          ▼                      ▼
//!        state lock: queue frame / set acked; a writer already? return
//!                          │ no: become the writer
//!                          ▼
//!        pop every frame with position <= acked (in order), unlock
//!        output lock: write them to the TAP          ◀─ no state lock held
//!        relock; more released meanwhile? write those too; else stop
//! ```
//!
//! The state lock is held only to queue and pop, never across a TAP
//! write, so the vCPU's `submit` never waits behind a write of the sender
//! thread, and an ack never waits behind the vCPU's. One writer at a time
//! (the `writing` flag) and FIFO pops keep frames in order.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
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
    /// A thread is writing released frames (outside this lock): the others
    /// only queue theirs, and that writer takes them in order.
    writing: bool,
    /// The writer's batch, kept for its capacity (no allocation per release).
    spare: Vec<Held>,
    hold_ns: Histogram<u64>,
    submit_wait_ns: Histogram<u64>,
    released: u64,
    max_held: usize,
    /// Threads in [`OutputGate::wait_acked`]: an ack signals `advanced`
    /// only when there is one (a notify is a system call, and the ack path
    /// of a VM without a shared disk has no waiter).
    ack_waiters: u32,
}

/// The output, locked only by the one writer (see the module docs).
struct Output {
    out: Box<dyn FrameOut>,
    tap_write_ns: Histogram<u64>,
    send_errors: u64,
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
    /// Time each released frame was held (submit to its turn to be
    /// written), in ns.
    pub hold_ns: Histogram<u64>,
    /// Time `submit` (the vCPU) waited for the gate's lock, in ns.
    pub submit_wait_ns: Histogram<u64>,
    /// Time one frame's write to the output took, in ns.
    pub tap_write_ns: Histogram<u64>,
}

/// Holds frames until the ack that covers them.
pub struct OutputGate {
    state: Mutex<GateState>,
    output: Mutex<Output>,
    /// Signalled at every ack that advances the watermark (for outputs the
    /// gate does not carry itself: the shared disk's writes).
    advanced: Condvar,
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
        let histogram = || {
            Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .expect("1 ns .. 100 s at 3 significant digits are valid histogram bounds")
        };
        Self {
            state: Mutex::new(GateState {
                acked,
                held: VecDeque::new(),
                writing: false,
                spare: Vec::new(),
                hold_ns: histogram(),
                submit_wait_ns: histogram(),
                released: 0,
                max_held: 0,
                ack_waiters: 0,
            }),
            output: Mutex::new(Output {
                out,
                tap_write_ns: histogram(),
                send_errors: 0,
            }),
            advanced: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // A panic while holding the lock aborts the process (panic = abort),
        // so the lock cannot be poisoned in practice; recover the data if so.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_output(&self) -> MutexGuard<'_, Output> {
        self.output
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Submits a frame produced at log position `position`: sent now if the
    /// ack already covers it and no other thread is writing, else queued.
    /// Never waits behind another thread's write.
    pub fn submit(&self, position: u64, frame: Vec<u8>) {
        let asked = Instant::now();
        let mut state = self.lock();
        let _ = state.submit_wait_ns.record(ns_since(asked));
        let covered = position <= state.acked;
        state.held.push_back(Held {
            position,
            frame,
            since: asked,
        });
        if !covered {
            state.max_held = state.max_held.max(state.held.len());
        }
        if !state.writing {
            self.write_released(state);
        }
    }

    /// The backup has received every entry up to `position`: release every
    /// frame that covers, now, in order (written by this thread, or by the
    /// thread already writing, which takes them before it stops).
    pub fn ack(&self, position: u64) {
        let mut state = self.lock();
        if position <= state.acked {
            return;
        }
        state.acked = position;
        if state.ack_waiters > 0 {
            self.advanced.notify_all();
        }
        if !state.writing {
            self.write_released(state);
        }
    }

    /// Becomes the writer: takes the released frames off the queue in
    /// order, writes them without the state lock, and repeats until none is
    /// left (frames released meanwhile by other threads included).
    fn write_released<'a>(&'a self, mut state: MutexGuard<'a, GateState>) {
        state.writing = true;
        let mut batch = std::mem::take(&mut state.spare);
        loop {
            let acked = state.acked;
            while state
                .held
                .front()
                .is_some_and(|held| held.position <= acked)
            {
                let Some(held) = state.held.pop_front() else {
                    break;
                };
                let _ = state.hold_ns.record(ns_since(held.since));
                batch.push(held);
            }
            if batch.is_empty() {
                state.writing = false;
                state.spare = batch;
                return;
            }
            let count = batch.len() as u64;
            drop(state);
            {
                let mut output = self.lock_output();
                for held in batch.drain(..) {
                    let began = Instant::now();
                    let result = output.out.send(&held.frame);
                    let _ = output.tap_write_ns.record(ns_since(began));
                    output.send_errors += u64::from(result.is_err());
                }
            }
            state = self.lock();
            state.released += count;
        }
    }

    /// Highest log position acknowledged (`u64::MAX` while open): an
    /// output produced at a position up to this one may leave.
    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Waits up to `timeout` for the ack to cover `position`; whether it
    /// does. For outputs the gate does not carry itself (the shared disk's
    /// writes, issued by the vCPU thread).
    pub fn wait_acked(&self, position: u64, timeout: Duration) -> bool {
        let mut state = self.lock();
        if state.acked >= position {
            return true;
        }
        state.ack_waiters += 1;
        let (mut state, _) = self
            .advanced
            .wait_timeout_while(state, timeout, |state| state.acked < position)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.ack_waiters -= 1;
        state.acked >= position
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
        let (acked, held, max_held, released, hold_ns, submit_wait_ns) = {
            let state = self.lock();
            (
                state.acked,
                state.held.len(),
                state.max_held,
                state.released,
                state.hold_ns.clone(),
                state.submit_wait_ns.clone(),
            )
        };
        let output = self.lock_output();
        GateStats {
            acked,
            held,
            max_held,
            released,
            send_errors: output.send_errors,
            hold_ns,
            submit_wait_ns,
            tap_write_ns: output.tap_write_ns.clone(),
        }
    }
}

/// ns since `since`, at least 1 (the histograms start at 1).
fn ns_since(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Frames of a VM without a NIC (there are none).
pub struct Dropped;

impl FrameOut for Dropped {
    fn send(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
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

    /// A thread waiting for an ack (the shared disk's writes) is woken by
    /// the ack that covers its position, not by its timeout, and a lower
    /// ack leaves it waiting.
    #[test]
    fn a_waiter_is_woken_by_the_covering_ack() {
        let gate = Arc::new(OutputGate::new(Box::new(Sent::default())));
        assert!(!gate.wait_acked(1, Duration::from_millis(1)));
        let waiter = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                let start = Instant::now();
                (gate.wait_acked(5, Duration::from_secs(30)), start.elapsed())
            })
        };
        while gate.lock().ack_waiters == 0 {
            std::thread::yield_now();
        }
        gate.ack(4);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "ack 4 woke a waiter for 5 for good");
        gate.ack(5);
        let (covered, took) = waiter.join().expect("waiter");
        assert!(covered);
        assert!(
            took < Duration::from_secs(20),
            "woken by its timeout: {took:?}"
        );
        assert_eq!(gate.lock().ack_waiters, 0);
        assert!(gate.wait_acked(5, Duration::ZERO), "already covered");
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

    /// An output whose writes block until the test lets them through.
    struct Stuck {
        entered: std::sync::mpsc::Sender<()>,
        go: Arc<(Mutex<bool>, std::sync::Condvar)>,
        sent: Sent,
    }

    impl FrameOut for Stuck {
        fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
            let _ = self.entered.send(());
            let (lock, cvar) = &*self.go;
            let mut go = lock.lock().expect("lock");
            while !*go {
                go = cvar.wait(go).expect("wait");
            }
            self.sent.send(frame)
        }
    }

    #[test]
    fn submit_never_waits_behind_a_write_and_order_holds() {
        let sent = Sent::default();
        let go = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (entered, writing) = std::sync::mpsc::channel();
        let gate = Arc::new(OutputGate::new(Box::new(Stuck {
            entered,
            go: Arc::clone(&go),
            sent: sent.clone(),
        })));
        gate.submit(1, vec![1]);
        let acker = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || gate.ack(1))
        };
        writing.recv().expect("the ack's write began");
        // The ack's thread is inside a (stuck) TAP write: the vCPU's
        // submits must return all the same, covered or not.
        let (done, submitted) = std::sync::mpsc::channel();
        let vcpu = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                gate.submit(1, vec![2]);
                gate.submit(7, vec![3]);
                gate.ack(7);
                let _ = done.send(());
            })
        };
        submitted
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("submit and ack returned while another thread was writing");
        assert!(sent.frames().is_empty(), "the write is still stuck");
        {
            let (lock, cvar) = &*go;
            *lock.lock().expect("lock") = true;
            cvar.notify_all();
        }
        acker.join().expect("acker");
        vcpu.join().expect("vcpu");
        // The writer took the frames queued meanwhile, in order.
        assert_eq!(sent.frames(), vec![vec![1], vec![2], vec![3]]);
        let stats = gate.stats();
        assert_eq!((stats.released, stats.held), (3, 0));
        assert_eq!(stats.tap_write_ns.len(), 3);
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
