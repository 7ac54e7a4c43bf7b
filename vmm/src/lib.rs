//! lockstep's deterministic KVM VMM: one vCPU in 64-bit mode at CPL3, a
//! paravirtual device, and record/replay of everything non-deterministic.
//!
//! # The determinism contract
//!
//! Two runs of the same guest image from the same initial state stay
//! identical as long as they are fed the same non-deterministic inputs at the
//! same points. This VMM makes *guest-initiated VM exits* the only such
//! points, and numbers them:
//!
//! 1. **Exits are the clock of the log.** Every exit the guest causes and that
//!    returns to userspace (an MMIO access; PIO and HLT where a host allows
//!    them) gets the next exit number, starting at 1. A signal interrupting
//!    `KVM_RUN` is not an exit of the guest and gets no number. Between two
//!    exits the guest runs deterministically: it is a pure function of its
//!    registers and memory.
//! 2. **Nothing enters the guest except at an exit.** There are no
//!    asynchronous interrupts (no irqchip, no timer, IF stays clear, no IDT);
//!    device data is written into guest memory only while the vCPU is stopped
//!    at an exit, and the value of an MMIO read is supplied at that exit.
//! 3. **Time and entropy come from the paravirtual device**
//!    ([`guest_abi`]): the `CLOCK`, `ENTROPY`, `ENTROPY_FILL` and `INPUT`
//!    registers. Each value is an event, logged with its exit number by the
//!    recorder and supplied from the log by the replayer
//!    ([`events::EventSource`]). Deterministic registers (`ARG`, `MEM_SIZE`)
//!    and outputs (`CONSOLE`, `DONE`) are not logged.
//! 4. **Digests prove it.** Every `digest_interval` exits, and at the end,
//!    the recorder logs a digest of the registers and of all guest memory;
//!    the replayer computes its own at the same exit and stops with
//!    `diverged at exit N: …` on the first mismatch (fail-stop: it never
//!    carries on diverged).
//!
//! ## What a guest must not do
//!
//! - **RDTSC / RDTSCP**: they return the host's time-stamp counter, which
//!   differs between runs and between hosts and which this VMM cannot
//!   virtualise (on nested PVM, neither `IA32_TSC` writes nor `KVM_SET_TSC_KHZ`
//!   take effect). By default CR4.TSD is set, so at CPL3 they fault and the VM
//!   stops with a clear error; `VmConfig::trap_rdtsc = false` lets them run,
//!   and then replay reports the divergence (the `rdtsc` guest proves it).
//!   RDTSCP is also hidden in CPUID.
//! - **RDRAND / RDSEED**: host entropy; hidden in CPUID (advisory only: a
//!   guest that ignores CPUID diverges, and the digests catch it).
//! - **Rely on anything not in its memory or registers**: there is nothing
//!   else. Port I/O and HLT are refused, because on nested KVM at CPL3 they
//!   do not exit reliably; an access to an unmapped address outside the
//!   paravirtual window, or any exception, stops the VM.
//!
//! ## Why CPL3
//!
//! On this project's CI hosts, KVM is PVM (nested, shadow paging): guest code
//! at CPL0 is emulated one instruction at a time and cannot use SSE, while
//! CPL3 code runs natively. So the guest runs at CPL3 with the host's user
//! selectors and IOPL 3, and talks to the VMM by MMIO only. On an ordinary
//! KVM host the same set-up works unchanged.
//!
//! # Modules
//!
//! - [`kvm`]: the only code that touches KVM (`unsafe` lives here).
//! - [`block`]: the virtio-blk device over an image file and io_uring,
//!   whose completions reach the guest only at logged exits.
//! - [`device`]: the paravirtual device and exit handling (plain code over
//!   [`kvm::Exit`], testable without a guest).
//! - [`events`]: where non-determinism comes from: live sources (recording
//!   to a log sink) or a log being replayed.
//! - [`digest`]: state digests.
//! - [`machine`]: the exit loop.
//! - [`state`]: the complete machine state and its versioned, checksummed
//!   stream format (for cloning a running VM into a new backup).
//! - [`snapshot`]: dirty-page pre-copy and the stop-and-copy pause at an
//!   exit boundary.

pub mod block;
pub mod device;
pub mod digest;
pub mod events;
pub mod kvm;
pub mod machine;
pub mod snapshot;
pub mod state;

pub use kvm::{DEFAULT_MAC, DirtyLog, Exit, VcpuState, Vm, VmConfig};
pub use machine::{Machine, RunSummary};
pub use snapshot::{
    CaptureMemory, CaptureRequest, Captured, PauseHandle, Precopy, PrecopyPolicy, RoundReport,
    TransferHandle, TransferReport, send_state,
};
pub use state::{
    EventPosition, MachineState, Received, StateError, StateHeader, StateReader, StateWriter,
    receive, receive_from, receive_with_disk,
};

/// Everything that can stop the VMM. Messages say what and where.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// KVM is missing or unusable on this host.
    #[error("{0}")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The VM configuration is invalid.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// Guest memory could not be set up or accessed (a message only:
    /// prefer [`VmmError::GuestMemory`], which keeps the cause).
    #[error("guest memory: {0}")]
    Memory(String),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {what}")]
    GuestMemory {
        /// What was being done, and where.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The guest image does not fit this VM.
    #[error("cannot load the guest image: {0}")]
    Image(String),
    /// The guest image is not a loadable ELF file.
    #[error("cannot load the guest image")]
    Elf(#[source] linux_loader::loader::Error),
    /// The NIC could not be set up, restored or attached.
    #[error("the NIC: cannot {what}")]
    Nic {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: nic::NicError,
    },
    /// The guest broke the paravirtual ABI (a bad register, a bad buffer).
    #[error("guest error at exit {exit}: {detail}")]
    Guest {
        /// Exit number.
        exit: u64,
        /// What the guest did.
        detail: String,
    },
    /// Replay found a difference from the recording. Fail-stop.
    #[error("diverged at exit {exit}: {detail}")]
    Diverged {
        /// Exit number.
        exit: u64,
        /// What differs.
        detail: String,
    },
    /// The log ended before the guest did.
    #[error(
        "the log ends after entry {entries} but the guest is still running at exit {exit}: the log is truncated or the recording was cut short"
    )]
    LogIncomplete {
        /// Exit number the replay reached.
        exit: u64,
        /// Entries read.
        entries: u64,
    },
    /// This replica must stop for good: it lost the arbitration for a
    /// generation, or its peer is gone and nothing may decide who goes live.
    #[error("halted for good: {0}")]
    Halted(String),
    /// The log cannot be used with this guest.
    #[error("log does not match: {0}")]
    LogMismatch(String),
    /// The log could not be read or written.
    #[error(transparent)]
    Log(#[from] channel::log::LogError),
    /// A state transfer failed.
    #[error(transparent)]
    State(Box<state::StateError>),
    /// An input or output stream of the VM failed.
    #[error("{what}")]
    Io {
        /// Which stream.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl VmmError {
    /// A guest-memory error, saying what was being done and where.
    pub fn memory<E: std::error::Error + Send + Sync + 'static>(
        what: impl Into<String>,
    ) -> impl FnOnce(E) -> Self {
        let what = what.into();
        move |source| VmmError::GuestMemory {
            what,
            source: Box::new(source),
        }
    }

    /// A NIC error, saying what was being done.
    pub fn nic(what: &'static str) -> impl FnOnce(nic::NicError) -> Self {
        move |source| VmmError::Nic { what, source }
    }
}

impl From<state::StateError> for VmmError {
    fn from(error: state::StateError) -> Self {
        match error {
            state::StateError::Vmm(inner) => *inner,
            other => Self::State(Box::new(other)),
        }
    }
}
