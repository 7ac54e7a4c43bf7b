//! The primary's vCPU → wire path allocates nothing per entry in steady
//! state: the vCPU encodes into a buffer the sender handed back
//! ([`channel::pipeline::reuse`]), the sender copies it into the
//! transport's batch and returns the buffer ([`spawn_sender_recycling`]).
//!
//! A counting global allocator counts only on the threads of that path: the
//! producer (this test's thread, standing in for the vCPU) and the sender
//! thread (armed from its ack hook, which runs there). The backup runs in
//! the same process on threads that are not counted. A control run without
//! recycling shows that the counter sees one allocation per entry.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use channel::pipeline::{reuse, spawn_sender_recycling};
use channel::protocol::{Role, Session};
use channel::ring::{PushError, RingBuffer};
use channel::testkit::{Content, fill_entry, run_backup};
use channel::transport::shm::{ShmListener, ShmTransport};
use tuning::{HostCores, Profile};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ARMED: AtomicBool = AtomicBool::new(false);

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator with the same
// arguments; counting touches only an atomic and a const-initialised
// thread-local Cell (no allocation, no destructor).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (every allocation
        // goes through this allocator).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARM_UP: u64 = 5_000;
const MEASURED: u64 = 20_000;
const SIZE: usize = 128;

fn session(role: Role) -> Session {
    Session {
        vm_id: 7,
        generation: 2,
        role,
        key: b"zero-alloc".to_vec(),
    }
}

/// Streams WARM_UP + MEASURED entries and returns the allocations counted
/// on the producer and sender threads during the MEASURED ones.
fn allocations_per_run(recycling: bool) -> u64 {
    let entries = WARM_UP + MEASURED;
    let path = std::env::temp_dir().join(format!(
        "lockstep-zero-alloc-{}-{recycling}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let listener = ShmListener::bind(&path).expect("bind");
    let mut profile = Profile::two_core();
    profile.liveness.peer_timeout = Duration::from_secs(10);
    let backup = {
        let profile = profile.clone();
        std::thread::spawn(move || {
            let t = listener
                .accept(&session(Role::Backup), 1 << 20)
                .expect("accept");
            run_backup(t, 2, &profile, entries, SIZE, Content::Full, |_| {})
                .expect("backup")
                .entries
        })
    };
    let t = ShmTransport::connect(&path, &session(Role::Primary)).expect("connect");
    let _ = std::fs::remove_file(&path);
    let cores = HostCores::detect().expect("cores");
    let (mut ring, consumer) = RingBuffer::new::<Vec<u8>>(256);
    let (recycle, mut recycled) = RingBuffer::new::<Vec<u8>>(1024);
    let on_ack = |_seq: u64| COUNTING.with(|c| c.set(ARMED.load(Ordering::Relaxed)));
    let sender = spawn_sender_recycling(
        consumer,
        recycling.then_some(recycle),
        t,
        2,
        &profile,
        &cores,
        on_ack,
    )
    .expect("sender");
    ALLOCATIONS.store(0, Ordering::Relaxed);
    for seq in 1..=entries {
        if seq == WARM_UP + 1 {
            ARMED.store(true, Ordering::Relaxed);
            COUNTING.with(|c| c.set(true));
        }
        // What the vCPU's log sink does: a buffer, the entry encoded in it.
        let mut entry = if recycling {
            reuse(&mut recycled, SIZE)
        } else {
            Vec::with_capacity(SIZE)
        };
        entry.resize(SIZE, 0);
        fill_entry(seq, &mut entry);
        loop {
            match ring.push(entry) {
                Ok(()) => break,
                Err(PushError::Full(back)) => {
                    entry = back;
                    sender.note_ring_full();
                    std::thread::yield_now();
                }
            }
        }
        if seq % 64 == 0 {
            sender.wake();
        }
    }
    COUNTING.with(|c| c.set(false));
    // The sender counts until its next ack after this.
    ARMED.store(false, Ordering::Relaxed);
    let counted = ALLOCATIONS.load(Ordering::Relaxed);
    let metrics = sender.finish().expect("finish");
    assert_eq!(backup.join().expect("backup thread"), entries);
    assert_eq!(metrics.entries, entries);
    counted
}

#[test]
fn vcpu_to_wire_allocates_nothing_per_entry_in_steady_state() {
    // Control: without recycling, every entry is a fresh Vec.
    let plain = allocations_per_run(false);
    assert!(
        plain >= MEASURED,
        "the counter must see the per-entry Vec: {plain} allocations for {MEASURED} entries"
    );
    let recycled = allocations_per_run(true);
    eprintln!("allocations over {MEASURED} entries: {plain} plain, {recycled} recycled");
    // A few are allowed (the sender's in-flight queue growing once, a
    // recycle ring momentarily empty): none per entry.
    assert!(
        recycled < MEASURED / 100,
        "{recycled} allocations for {MEASURED} entries on the vCPU -> wire path"
    );
}
