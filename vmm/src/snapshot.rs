//! Cloning a running machine: iterative pre-copy while the guest runs, then
//! a short stop-and-copy at an exit boundary.
//!
//! ```text
//!  transfer thread                          vCPU thread (Machine::run)
//!  ───────────────                          ──────────────────────────
//!  Precopy::start: dirty logging on          guest runs, exits handled
//!  round 0: every non-zero page ──▶ stream   (guest writes: KVM's log;
//!  round k: pages dirtied since k-1 ──▶       VMM writes: GuestRam bitmap)
//!  stop_and_copy: request ─────────────────▶ at the end of exit N:
//!                                             retire the MMIO access,
//!                                             read both dirty logs,
//!                                             copy those pages and the
//!                                             vCPU/device state, log off
//!                 ◀──────────── Captured ──── resume the guest at once
//!  remaining pages + state + end ──▶ stream
//! ```
//!
//! The primary is paused only while the vCPU thread copies the last dirty
//! pages and the state into memory ([`Captured::pause`]); sending them
//! happens after it resumes. The capture sits exactly between exit N and
//! exit N+1, so the log splits there too (rule 5: every operation is before
//! or after the transfer): entries with sequence numbers up to
//! [`EventPosition::log_position`] are in the transferred state, every
//! later one must be replayed by the new backup
//! ([`crate::events::Replay::resume`]).
//!
//! # Writes KVM does not see
//!
//! KVM's dirty log records the guest's own writes only. The VMM also writes
//! guest memory (mailbox buffers for `INPUT` and `ENTROPY_FILL`, virtio RX
//! frames and used-ring entries) through the host mapping. Guest memory is
//! a [`nic::virtio::GuestRam`], whose bitmap `vm-memory` sets on every such
//! write; each round reads and clears it with the KVM log and sends the
//! union. This is exact (not a guess at which regions a device might have
//! written) and costs one atomic OR per page the VMM writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::VmmError;
use crate::kvm::DirtyLog;
use crate::state::{MachineState, PAGE_SIZE, StateError, StateWriter};

/// What the vCPU thread copies while the guest is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMemory {
    /// Every non-zero page (no pre-copy ran).
    All,
    /// The pages both dirty logs name (after pre-copy rounds).
    Dirty,
}

/// A request to pause at an exit boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureRequest {
    /// Which memory to copy during the pause.
    pub memory: CaptureMemory,
    /// Also take a digest of the captured state (costs a hash of all
    /// memory during the pause: about 2 ms per 16 MiB).
    pub digest: bool,
    /// Pause at the end of this exit rather than the next one (0: next).
    pub at_exit: u64,
}

/// The state captured at an exit boundary.
pub struct Captured {
    /// vCPU, devices, counters, event position (and digest if asked).
    pub state: MachineState,
    /// Runs of guest pages `(address, bytes)` copied during the pause.
    pub pages: Vec<(u64, Vec<u8>)>,
    /// Disk blocks `(offset, bytes)` still dirty at the pause, copied
    /// during it (a VM with a disk).
    pub disk_blocks: Vec<(u64, Vec<u8>)>,
    /// How long the guest was paused.
    pub pause: Duration,
}

impl Captured {
    /// Pages copied during the pause.
    pub fn page_count(&self) -> u64 {
        self.pages
            .iter()
            .map(|(_, bytes)| bytes.len() as u64 / PAGE_SIZE)
            .sum()
    }

    /// Writes the pages (as round `round`) and the state to `out`.
    pub fn write_to<W: std::io::Write>(
        &self,
        out: &mut StateWriter<W>,
        round: u32,
    ) -> Result<(), StateError> {
        for (addr, bytes) in &self.pages {
            out.memory(round, *addr, bytes)?;
        }
        if let Some(blk) = &self.state.blk {
            for (offset, bytes) in &self.disk_blocks {
                out.disk(round, blk.capacity, *offset, bytes)?;
            }
        }
        out.round_end(round, self.page_count())?;
        out.machine(&self.state)
    }
}

#[derive(Default)]
struct Slot {
    request: Option<CaptureRequest>,
    result: Option<Result<Captured, VmmError>>,
    closed: Option<String>,
}

/// Shared between a [`crate::Machine`] and its [`PauseHandle`]s.
#[derive(Default)]
pub(crate) struct PauseShared {
    pending: AtomicBool,
    at_exit: AtomicU64,
    slot: Mutex<Slot>,
    done: Condvar,
}

impl PauseShared {
    /// The request to serve after exit `exit`, if one is due.
    pub(crate) fn due(&self, exit: u64) -> Option<CaptureRequest> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let at = self.at_exit.load(Ordering::Acquire);
        if at != 0 && at != exit {
            return None;
        }
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let request = slot.request.take();
        self.pending.store(false, Ordering::Release);
        request
    }

    pub(crate) fn deliver(&self, result: Result<Captured, VmmError>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.result = Some(result);
        self.done.notify_all();
    }

    /// The machine stopped running: fail any waiting request.
    pub(crate) fn close(&self, why: &str) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.closed = Some(why.into());
        if slot.request.take().is_some() {
            self.pending.store(false, Ordering::Release);
            slot.result = Some(Err(VmmError::Halted(format!(
                "the machine stopped before it could pause for a state transfer: {why}"
            ))));
        }
        self.done.notify_all();
    }

    pub(crate) fn reopen(&self) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.closed = None;
    }
}

/// Asks a running machine to pause at an exit boundary and hand over its
/// state. Cloneable and `Send`: made by [`crate::Machine::pause_handle`]
/// before the machine moves to its vCPU thread.
#[derive(Clone)]
pub struct PauseHandle {
    pub(crate) shared: Arc<PauseShared>,
}

impl PauseHandle {
    /// Files `request`; the machine serves it at the next exit boundary
    /// (or at exit `request.at_exit`). Any earlier result not taken is
    /// discarded.
    pub fn request(&self, request: CaptureRequest) {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.result = None;
        slot.request = Some(request);
        self.shared
            .at_exit
            .store(request.at_exit, Ordering::Release);
        self.shared.pending.store(true, Ordering::Release);
    }

    /// Takes the result if the machine has served the request.
    pub fn try_take(&self) -> Option<Result<Captured, VmmError>> {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.result.take()
    }

    /// Waits up to `timeout` for the result.
    pub fn wait(&self, timeout: Duration) -> Result<Captured, VmmError> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(result) = slot.result.take() {
                return result;
            }
            if let Some(why) = &slot.closed
                && slot.request.is_none()
            {
                return Err(VmmError::Halted(format!(
                    "the machine is not running ({why}): it cannot pause for a state transfer"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                // Withdraw the request so a late pause does not happen.
                slot.request = None;
                self.shared.pending.store(false, Ordering::Release);
                return Err(VmmError::Halted(format!(
                    "the machine did not reach an exit boundary within {timeout:?}"
                )));
            }
            slot = self
                .shared
                .done
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Requests and waits: the capture at the next exit boundary.
    pub fn capture(
        &self,
        request: CaptureRequest,
        timeout: Duration,
    ) -> Result<Captured, VmmError> {
        self.request(request);
        self.wait(timeout)
    }
}

/// Everything a transfer thread needs: the dirty logs and the pause handle.
#[derive(Clone)]
pub struct TransferHandle {
    /// The dirty-page logs.
    pub dirty: DirtyLog,
    /// The pause handle.
    pub pause: PauseHandle,
    /// The disk, if the VM has one: its blocks travel as pages do.
    pub disk: Option<crate::block::DiskCopier>,
}

/// What one pre-copy round did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundReport {
    /// Round number (0: all memory).
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Pages the dirty logs named (round 0: all pages scanned).
    pub dirty: u64,
    /// Disk blocks ([`crate::block::DISK_BLOCK`] bytes each) sent.
    pub disk_blocks: u64,
    /// Time the round took (the guest ran meanwhile).
    pub elapsed: Duration,
}

/// What a whole transfer did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferReport {
    /// Each pre-copy round.
    pub rounds: Vec<RoundReport>,
    /// Pages copied during the pause.
    pub final_pages: u64,
    /// How long the guest was paused.
    pub pause: Duration,
    /// The exit the state was captured after.
    pub exit: u64,
    /// The log position at the capture (entries after it follow the transfer).
    pub log_position: u64,
    /// Bytes of the stream.
    pub bytes: u64,
    /// From the first round to the end chunk written.
    pub total: Duration,
}

/// When to stop pre-copying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrecopyPolicy {
    /// Most rounds after round 0.
    pub max_rounds: u32,
    /// Stop once a round sends at most this many pages.
    pub converged_pages: u64,
    /// Take a digest during the pause (for verification; costs pause time).
    pub digest: bool,
    /// Longest wait for the machine to reach an exit boundary.
    pub pause_timeout: Duration,
}

impl Default for PrecopyPolicy {
    fn default() -> Self {
        Self {
            max_rounds: 8,
            converged_pages: 256,
            digest: false,
            pause_timeout: Duration::from_secs(10),
        }
    }
}

/// Iterative pre-copy of a running machine's memory.
pub struct Precopy {
    handle: TransferHandle,
    round: u32,
    logging: bool,
}

impl Precopy {
    /// Turns dirty logging on and clears the VMM's write log. Round 0 then
    /// sends everything; every write after this call is in a later round.
    pub fn start(handle: &TransferHandle) -> Result<Self, VmmError> {
        handle.dirty.set_logging(true)?;
        handle.dirty.take_host_dirty();
        if let Some(disk) = &handle.disk {
            disk.start();
        }
        Ok(Self {
            handle: handle.clone(),
            round: 0,
            logging: true,
        })
    }

    /// Runs one round while the guest keeps running: round 0 sends every
    /// non-zero page (the receiver's memory starts zeroed), later rounds the
    /// pages dirtied since the previous round's harvest.
    pub fn round<W: std::io::Write>(
        &mut self,
        out: &mut StateWriter<W>,
    ) -> Result<RoundReport, StateError> {
        let started = Instant::now();
        let round = self.round;
        let memory = self.handle.dirty.memory();
        let mem_size = self.handle.dirty.mem_size();
        let pages_total = mem_size / PAGE_SIZE;
        let mut sent = 0u64;
        let mut dirty = 0u64;
        let mut run: Vec<u8> = Vec::with_capacity(crate::state::MAX_MEMORY_RUN);
        let mut run_start = 0u64;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let flush = |out: &mut StateWriter<W>, run: &mut Vec<u8>, start: u64| {
            if run.is_empty() {
                return Ok(());
            }
            out.memory(round, start, run)?;
            run.clear();
            Ok::<(), StateError>(())
        };
        let read = |addr: u64, page: &mut [u8]| {
            memory
                .read_slice(page, GuestAddress(addr))
                .map_err(|e| StateError::from(VmmError::memory(format!("read page {addr:#x}"))(e)))
        };
        if round == 0 {
            // Read 1 MiB at a time; send only non-zero pages.
            let mut block = vec![0u8; crate::state::MAX_MEMORY_RUN];
            let mut base = 0u64;
            while base < mem_size {
                let len = (mem_size - base).min(block.len() as u64) as usize;
                read(base, &mut block[..len])?;
                for (i, page) in block[..len].chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let addr = base + i as u64 * PAGE_SIZE;
                    dirty += 1;
                    if is_zero(page) {
                        flush(out, &mut run, run_start)?;
                        continue;
                    }
                    if run.is_empty() {
                        run_start = addr;
                    }
                    run.extend_from_slice(page);
                    sent += 1;
                    if run.len() >= crate::state::MAX_MEMORY_RUN {
                        flush(out, &mut run, run_start)?;
                    }
                }
                base += len as u64;
            }
        } else {
            let bitmap = self.harvest()?;
            let mut last = None;
            for index in set_bits(&bitmap, pages_total) {
                let addr = index * PAGE_SIZE;
                if last != Some(index.wrapping_sub(1)) || run.len() >= crate::state::MAX_MEMORY_RUN
                {
                    flush(out, &mut run, run_start)?;
                    run_start = addr;
                }
                read(addr, &mut page)?;
                run.extend_from_slice(&page);
                last = Some(index);
                dirty += 1;
                sent += 1;
            }
        }
        flush(out, &mut run, run_start)?;
        let disk_blocks = match &self.handle.disk {
            Some(disk) => copy_disk_round(disk, round, out)?,
            None => 0,
        };
        out.round_end(round, sent)?;
        self.round += 1;
        Ok(RoundReport {
            round,
            pages: sent,
            dirty,
            disk_blocks,
            elapsed: started.elapsed(),
        })
    }

    fn harvest(&self) -> Result<Vec<u64>, StateError> {
        let mut bitmap = self.handle.dirty.take_guest_dirty()?;
        for (word, host) in bitmap.iter_mut().zip(self.handle.dirty.take_host_dirty()) {
            *word |= host;
        }
        Ok(bitmap)
    }

    /// Pauses the machine at its next exit boundary, which copies what is
    /// still dirty and its state and resumes at once; then writes those
    /// pages and the state to `out` (the guest already runs again).
    pub fn stop_and_copy<W: std::io::Write>(
        mut self,
        out: &mut StateWriter<W>,
        digest: bool,
        timeout: Duration,
    ) -> Result<Captured, StateError> {
        let captured = self.handle.pause.capture(
            CaptureRequest {
                memory: CaptureMemory::Dirty,
                digest,
                at_exit: 0,
            },
            timeout,
        )?;
        // The vCPU thread turned logging off during the pause.
        self.logging = false;
        captured.write_to(out, self.round)?;
        Ok(captured)
    }

    /// Rounds run so far.
    pub fn rounds(&self) -> u32 {
        self.round
    }
}

impl Drop for Precopy {
    fn drop(&mut self) {
        if self.logging {
            // An abandoned transfer: stop write-protecting the guest. A
            // failure here only costs performance, so it is not reported.
            let _ = self.handle.dirty.set_logging(false);
        }
        if let Some(disk) = &self.handle.disk {
            disk.stop();
        }
    }
}

/// Sends the whole state of a running machine to `out`: pre-copy rounds
/// until they converge or `policy.max_rounds`, then stop-and-copy, then the
/// end chunk. Returns the writer and what happened.
pub fn send_state<W: std::io::Write>(
    handle: &TransferHandle,
    mut out: StateWriter<W>,
    policy: &PrecopyPolicy,
) -> Result<(W, TransferReport, Captured), StateError> {
    let started = Instant::now();
    let mut precopy = Precopy::start(handle)?;
    let mut rounds = vec![precopy.round(&mut out)?];
    while precopy.rounds() <= policy.max_rounds {
        let report = precopy.round(&mut out)?;
        rounds.push(report);
        // A disk block is 16 pages' worth of bytes.
        let blocks_as_pages = report.disk_blocks * (crate::block::DISK_BLOCK / PAGE_SIZE);
        if report.pages + blocks_as_pages <= policy.converged_pages {
            break;
        }
    }
    let captured = precopy.stop_and_copy(&mut out, policy.digest, policy.pause_timeout)?;
    let bytes_before_end = out.bytes_written();
    let writer = out.finish()?;
    let report = TransferReport {
        rounds,
        final_pages: captured.page_count(),
        pause: captured.pause,
        exit: captured.state.exits,
        log_position: captured.state.events.log_position,
        bytes: bytes_before_end + (crate::state::CHUNK_HEADER_LEN as u64 + 16),
        total: started.elapsed(),
    };
    Ok((writer, report, captured))
}

/// One pre-copy round of the disk: round 0 every non-zero block (the
/// receiver's image starts zeroed), later rounds the blocks written since
/// the previous round. Returns the blocks sent.
fn copy_disk_round<W: std::io::Write>(
    disk: &crate::block::DiskCopier,
    round: u32,
    out: &mut StateWriter<W>,
) -> Result<u64, StateError> {
    let blocks: Vec<u64> = if round == 0 {
        (0..disk.blocks()).collect()
    } else {
        disk.take_dirty()
    };
    let mut sent = 0u64;
    for block in blocks {
        let data = disk.read_block(block)?;
        if round == 0 && is_zero(&data) {
            continue;
        }
        out.disk(
            round,
            disk.capacity(),
            block * crate::block::DISK_BLOCK,
            &data,
        )?;
        sent += 1;
    }
    Ok(sent)
}

/// True if every byte of `page` is zero (branch-free over 8-byte words, so
/// it vectorises).
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8).fold(0u64, |acc, word| {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(word);
        acc | u64::from_ne_bytes(raw)
    }) == 0
        && page
            .chunks_exact(8)
            .remainder()
            .iter()
            .all(|byte| *byte == 0)
}

/// Page indices of the set bits of `bitmap`, below `limit`.
pub(crate) fn set_bits(bitmap: &[u64], limit: u64) -> impl Iterator<Item = u64> + '_ {
    bitmap
        .iter()
        .enumerate()
        .flat_map(move |(word_index, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                Some(word_index as u64 * 64 + bit)
            })
            .filter(move |index| *index < limit)
        })
}

/// Copies the pages named by `bitmap` (or every non-zero page) out of
/// `memory` into runs: done on the vCPU thread during the pause.
pub(crate) fn copy_pages(
    dirty: &DirtyLog,
    what: CaptureMemory,
) -> Result<Vec<(u64, Vec<u8>)>, VmmError> {
    let memory = dirty.memory();
    let pages_total = dirty.mem_size() / PAGE_SIZE;
    let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut push = |index: u64, page: &[u8]| {
        let addr = index * PAGE_SIZE;
        match runs.last_mut() {
            Some((start, bytes))
                if *start + bytes.len() as u64 == addr
                    && bytes.len() < crate::state::MAX_MEMORY_RUN =>
            {
                bytes.extend_from_slice(page);
            }
            _ => runs.push((addr, page.to_vec())),
        }
    };
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let read = |index: u64, page: &mut [u8]| {
        memory
            .read_slice(page, GuestAddress(index * PAGE_SIZE))
            .map_err(VmmError::memory(format!(
                "read page {:#x}",
                index * PAGE_SIZE
            )))
    };
    match what {
        CaptureMemory::All => {
            let mut block = vec![0u8; crate::state::MAX_MEMORY_RUN];
            let per_block = block.len() as u64 / PAGE_SIZE;
            let mut first = 0u64;
            while first < pages_total {
                let count = (pages_total - first).min(per_block);
                let bytes = &mut block[..(count * PAGE_SIZE) as usize];
                read(first, bytes)?;
                for (i, page) in bytes.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    if !is_zero(page) {
                        push(first + i as u64, page);
                    }
                }
                first += count;
            }
        }
        CaptureMemory::Dirty => {
            let mut bitmap = dirty.take_guest_dirty()?;
            for (word, host) in bitmap.iter_mut().zip(dirty.take_host_dirty()) {
                *word |= host;
            }
            for index in set_bits(&bitmap, pages_total) {
                read(index, &mut page)?;
                push(index, &page);
            }
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_lists_pages_in_order() {
        let bitmap = [0b1011u64, 0, 1 << 63];
        let pages: Vec<u64> = set_bits(&bitmap, 1000).collect();
        assert_eq!(pages, vec![0, 1, 3, 191]);
        let capped: Vec<u64> = set_bits(&bitmap, 100).collect();
        assert_eq!(capped, vec![0, 1, 3]);
    }
}
