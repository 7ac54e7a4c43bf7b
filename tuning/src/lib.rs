//! Host tuning for lockstep's logging channel: which cores the channel's
//! threads run on, how they wait, how entries are batched and acknowledged,
//! and what the host offers (KVM, hugepages, locked memory).
//!
//! # Profiles
//!
//! | setting            | [`Profile::two_core`] (default)  | [`Profile::dedicated_server`]      |
//! |--------------------|----------------------------------|------------------------------------|
//! | sender core        | none (not pinned)                | core 2                             |
//! | receiver core      | none (not pinned)                | core 3                             |
//! | poll mode          | Adaptive { spin_us: 50 }         | BusyPoll                           |
//! | max batch          | 256 entries / 256 KiB            | 1024 entries / 1 MiB               |
//! | ack                | every 64 entries or 20 µs        | every 32 entries or 5 µs           |
//! | heartbeat / timeout| 10 ms / 200 ms                   | 2 ms / 50 ms                       |
//!
//! On a 2-core host the vCPU owns one core and everything else shares the
//! other, so the channel threads spin a while, then yield, then sleep until
//! their peer or their producer wakes them (a thread that sleeps costs
//! ~70 µs to wake on this kind of VM). On a dedicated-core server
//! (cores 0-1 for the OS, vCPU on its own core, channel threads on 2 and 3,
//! isolated with `isolcpus=`/`nohz_full=`), they busy-poll forever.
//!
//! # Pinning
//!
//! `core_affinity::get_core_ids()` reports only the *calling thread's* current
//! mask: a thread spawned from a pinned thread sees one core. [`HostCores`] is
//! therefore read once, before anything is pinned, and every pin goes through
//! it.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

/// The cores this process may run on, read once before any thread is pinned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCores {
    ids: Vec<usize>,
}

/// Errors of pinning and of settings.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TuningError {
    /// The affinity mask of the process could not be read.
    #[error("cannot read the CPU affinity mask of this process")]
    NoCores,
    /// A setting names a core that this process may not use.
    #[error("core {core} is not available to this process (available: {available:?})")]
    CoreUnavailable {
        /// The core asked for.
        core: usize,
        /// The cores the process may use.
        available: Vec<usize>,
    },
    /// The kernel refused to pin the thread.
    #[error("pinning the current thread to core {core} failed")]
    PinFailed {
        /// The core asked for.
        core: usize,
    },
    /// A setting is out of its valid range.
    #[error("setting `{name}` = {value} is invalid: {reason}")]
    Invalid {
        /// The setting's name.
        name: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
}

impl HostCores {
    /// Reads the cores the calling thread may run on. Call it once, early,
    /// from a thread that has not been pinned.
    pub fn detect() -> Result<Self, TuningError> {
        let ids: Vec<usize> = core_affinity::get_core_ids()
            .ok_or(TuningError::NoCores)?
            .into_iter()
            .map(|c| c.id)
            .collect();
        if ids.is_empty() {
            return Err(TuningError::NoCores);
        }
        Ok(Self { ids })
    }

    /// A fixed list, for tests and for hosts described in a config file.
    pub fn from_ids(ids: Vec<usize>) -> Self {
        Self { ids }
    }

    /// The core ids, in the order the kernel reported them.
    pub fn ids(&self) -> &[usize] {
        &self.ids
    }

    /// Number of usable cores.
    pub fn count(&self) -> usize {
        self.ids.len()
    }

    /// Checks that `core` is usable by this process.
    pub fn check(&self, core: usize) -> Result<(), TuningError> {
        if self.ids.contains(&core) {
            Ok(())
        } else {
            Err(TuningError::CoreUnavailable {
                core,
                available: self.ids.clone(),
            })
        }
    }

    /// Pins the calling thread to `core`, after checking it is one of ours.
    pub fn pin_current(&self, core: usize) -> Result<(), TuningError> {
        self.check(core)?;
        if core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            Ok(())
        } else {
            Err(TuningError::PinFailed { core })
        }
    }

    /// Pins the calling thread to `core` if one is given; no-op otherwise.
    pub fn pin_optional(&self, core: Option<usize>) -> Result<(), TuningError> {
        match core {
            Some(c) => self.pin_current(c),
            None => Ok(()),
        }
    }
}

/// How a channel thread waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    /// Spin forever: lowest latency, burns a whole core. Dedicated cores only.
    BusyPoll,
    /// Spin for `spin_us` microseconds after the last work, then yield the
    /// core between polls, and after 100 µs idle sleep until work arrives
    /// (see [`Waiter::idle_with`]). The default on small hosts.
    Adaptive {
        /// How long to spin before yielding, in microseconds.
        spin_us: u32,
    },
    /// Sleep between polls (until work arrives, see [`Waiter::idle_with`]);
    /// lowest CPU use, highest latency.
    Blocking,
}

/// How long an adaptive poller yields the core between polls before it
/// starts to nap.
const ADAPTIVE_YIELD_FOR: Duration = Duration::from_micros(100);
/// An adaptive poller's nap once idle for [`ADAPTIVE_YIELD_FOR`], when it
/// has nothing to sleep on ([`Waiter::idle`]).
const ADAPTIVE_NAP: Duration = Duration::from_micros(50);

/// A waiting strategy built from a [`PollMode`]: call [`Waiter::idle`] each
/// time a poll found nothing and [`Waiter::work`] when it found something.
#[derive(Debug)]
pub struct Waiter {
    mode: PollMode,
    idle_since: Option<std::time::Instant>,
}

impl Waiter {
    /// A waiter in the given mode.
    pub fn new(mode: PollMode) -> Self {
        Self {
            mode,
            idle_since: None,
        }
    }

    /// Records that the last poll found work.
    pub fn work(&mut self) {
        self.idle_since = None;
    }

    /// Waits a little after a poll that found nothing; once past the spin
    /// and yield phases it naps for [`ADAPTIVE_NAP`], for a caller with
    /// nothing to sleep on.
    pub fn idle(&mut self) {
        let napped: Result<(), std::convert::Infallible> = self.idle_with(|_| {
            std::thread::sleep(ADAPTIVE_NAP);
            Ok(())
        });
        let Ok(()) = napped;
    }

    /// Like [`Waiter::idle`], but once past the spin and yield phases it
    /// calls `block(timeout)` to sleep (at most [`BLOCK_FOR`]): a caller that
    /// can sleep until its work arrives (a readable socket, an eventfd the
    /// producer writes) passes a `block` that does, and so spends no CPU at
    /// all while idle. `block` may return early; its error is returned.
    pub fn idle_with<E>(&mut self, block: impl FnOnce(Duration) -> Result<(), E>) -> Result<(), E> {
        match self.mode {
            PollMode::BusyPoll => std::hint::spin_loop(),
            PollMode::Adaptive { spin_us } => {
                let now = std::time::Instant::now();
                let since = *self.idle_since.get_or_insert(now);
                let idle = now.duration_since(since);
                if idle < Duration::from_micros(u64::from(spin_us)) {
                    std::hint::spin_loop();
                } else if idle < ADAPTIVE_YIELD_FOR {
                    std::thread::yield_now();
                } else {
                    // Idle for a while: give the core away for real, so a
                    // host with fewer cores than busy threads (the vCPUs
                    // first) is not eaten by pollers that yield and return.
                    return block(BLOCK_FOR);
                }
            }
            PollMode::Blocking => return block(BLOCK_FOR),
        }
        Ok(())
    }
}

/// The longest a [`Waiter::idle_with`] caller is asked to sleep at once: it
/// bounds how late a timer of the caller's (a heartbeat, an ack delay, the
/// peer-silence check) can fire while nothing arrives.
pub const BLOCK_FOR: Duration = Duration::from_millis(1);

/// When the receiver acknowledges: after `every_entries` entries, when its
/// receive queue drains, or `max_delay_us` after the oldest unacked entry,
/// whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckPolicy {
    /// Ack at least every this many entries.
    pub every_entries: u32,
    /// Ack at the latest this many microseconds after the oldest unacked entry.
    pub max_delay_us: u32,
    /// Ack whenever the receive queue drains (nothing more readable).
    pub on_drain: bool,
}

/// How the sender groups entries into batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// At most this many entries per batch.
    pub max_entries: u32,
    /// At most this many payload bytes per batch (an entry larger than this
    /// travels alone).
    pub max_bytes: u32,
}

/// Liveness settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Send a heartbeat when nothing else was sent for this long.
    pub heartbeat: Duration,
    /// Declare the peer gone after hearing nothing for this long.
    pub peer_timeout: Duration,
}

/// Everything the channel needs to know about the host and its policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Name shown in reports.
    pub name: &'static str,
    /// Core for the sender thread, if pinned.
    pub sender_core: Option<usize>,
    /// Core for the receiver thread, if pinned.
    pub receiver_core: Option<usize>,
    /// How channel threads wait.
    pub poll: PollMode,
    /// Batching.
    pub batch: BatchPolicy,
    /// Acknowledgements.
    pub ack: AckPolicy,
    /// Heartbeats and peer timeout.
    pub liveness: Liveness,
    /// Slots in the vCPU-to-sender ring.
    pub ring_slots: u32,
}

impl Default for Profile {
    fn default() -> Self {
        Self::two_core()
    }
}

impl Profile {
    /// Defaults for a 2-core host (CI, a laptop VM): nothing pinned, adaptive polling.
    pub fn two_core() -> Self {
        Self {
            name: "two-core",
            sender_core: None,
            receiver_core: None,
            poll: PollMode::Adaptive { spin_us: 50 },
            batch: BatchPolicy {
                max_entries: 256,
                // A batch must hold the largest single entry: a burst of 256
                // received frames is one entry of about 390 KB.
                max_bytes: 1 << 20,
            },
            ack: AckPolicy {
                every_entries: 64,
                max_delay_us: 20,
                on_drain: true,
            },
            liveness: Liveness {
                heartbeat: Duration::from_millis(10),
                peer_timeout: Duration::from_millis(200),
            },
            ring_slots: 4096,
        }
    }

    /// A server with cores to dedicate: cores 0-1 for the OS and the vCPU,
    /// the sender on core 2 and the receiver on core 3 (on the backup host),
    /// both busy-polling. Boot with `isolcpus=2,3 nohz_full=2,3` for best results.
    pub fn dedicated_server() -> Self {
        Self {
            name: "dedicated-server",
            sender_core: Some(2),
            receiver_core: Some(3),
            poll: PollMode::BusyPoll,
            batch: BatchPolicy {
                max_entries: 1024,
                max_bytes: 1 << 20,
            },
            ack: AckPolicy {
                every_entries: 32,
                max_delay_us: 5,
                on_drain: true,
            },
            liveness: Liveness {
                heartbeat: Duration::from_millis(2),
                peer_timeout: Duration::from_millis(50),
            },
            ring_slots: 16384,
        }
    }

    /// Checks every setting, and that pinned cores exist on `cores`.
    pub fn validate(&self, cores: &HostCores) -> Result<(), TuningError> {
        fn invalid(name: &'static str, value: u64, reason: &'static str) -> TuningError {
            TuningError::Invalid {
                name,
                value,
                reason,
            }
        }
        if self.batch.max_entries == 0 {
            return Err(invalid("batch.max_entries", 0, "must be at least 1"));
        }
        if self.batch.max_bytes < 64 || self.batch.max_bytes > 64 << 20 {
            return Err(invalid(
                "batch.max_bytes",
                self.batch.max_bytes.into(),
                "must be between 64 B and 64 MiB",
            ));
        }
        if self.ack.every_entries == 0 {
            return Err(invalid("ack.every_entries", 0, "must be at least 1"));
        }
        if self.ack.max_delay_us > 1_000_000 {
            return Err(invalid(
                "ack.max_delay_us",
                self.ack.max_delay_us.into(),
                "must be at most 1 s (the Output Rule holds outputs that long)",
            ));
        }
        let hb = self.liveness.heartbeat;
        let to = self.liveness.peer_timeout;
        if hb.is_zero() {
            return Err(invalid("liveness.heartbeat", 0, "must be positive"));
        }
        if to < hb * 3 {
            return Err(invalid(
                "liveness.peer_timeout",
                to.as_micros() as u64,
                "must be at least 3 heartbeat intervals, or a late heartbeat looks like a death",
            ));
        }
        if self.ring_slots == 0 || !self.ring_slots.is_power_of_two() {
            return Err(invalid(
                "ring_slots",
                self.ring_slots.into(),
                "must be a power of two",
            ));
        }
        for core in [self.sender_core, self.receiver_core].into_iter().flatten() {
            cores.check(core)?;
        }
        if let PollMode::Adaptive { spin_us } = self.poll
            && spin_us > 1_000_000
        {
            return Err(invalid(
                "poll.spin_us",
                spin_us.into(),
                "must be at most 1 s",
            ));
        }
        Ok(())
    }
}

/// One host check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether the host passes.
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
}

/// What the host offers, as a list of checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    /// All checks, in a fixed order.
    pub checks: Vec<Check>,
}

impl HostReport {
    /// True if every check passed.
    pub fn all_ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            writeln!(
                f,
                "{:<10} {:<4} {}",
                c.name,
                if c.ok { "ok" } else { "FAIL" },
                c.detail
            )?;
        }
        Ok(())
    }
}

/// Is `/dev/kvm` present and can this process open it read-write?
pub fn check_kvm() -> Check {
    check_kvm_at(Path::new("/dev/kvm"))
}

fn check_kvm_at(path: &Path) -> Check {
    let (ok, detail) = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => (true, format!("{} opens read-write", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            false,
            format!("{} is missing (no KVM module loaded)", path.display()),
        ),
        Err(e) => (false, format!("{} cannot be opened: {e}", path.display())),
    };
    Check {
        name: "kvm",
        ok,
        detail,
    }
}

/// Hugepages: total and free 2 MiB pages and the THP mode. Passes if THP is
/// not `never` or some hugepages are reserved.
pub fn check_hugepages() -> Check {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let total = field("HugePages_Total:");
    let free = field("HugePages_Free:");
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .find(|w| w.starts_with('['))
                .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Check {
        name: "hugepages",
        ok: total > 0 || (thp != "never" && thp != "unknown"),
        detail: format!("{total} reserved, {free} free; transparent hugepages: {thp}"),
    }
}

/// The locked-memory limit (RLIMIT_MEMLOCK). Passes if at least `need_bytes`.
pub fn check_memlock(need_bytes: u64) -> Check {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through the pointer, which points
    // to a live, properly aligned local; RLIMIT_MEMLOCK is a valid resource.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return Check {
            name: "memlock",
            ok: false,
            detail: format!("getrlimit failed: {}", std::io::Error::last_os_error()),
        };
    }
    let cur = lim.rlim_cur;
    let unlimited = cur == libc::RLIM_INFINITY;
    let show = |v: u64| {
        if v == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", v >> 10)
        }
    };
    Check {
        name: "memlock",
        ok: unlimited || cur >= need_bytes,
        detail: format!(
            "soft limit {}, hard limit {}, need {} KiB",
            show(cur),
            show(lim.rlim_max),
            need_bytes >> 10
        ),
    }
}

/// Runs every host check. `memlock_need` is the memory the caller wants to lock.
pub fn host_report(memlock_need: u64) -> HostReport {
    HostReport {
        checks: vec![check_kvm(), check_hugepages(), check_memlock(memlock_need)],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn profiles_validate() {
        let cores = HostCores::from_ids(vec![0, 1, 2, 3]);
        Profile::two_core().validate(&cores).unwrap();
        Profile::dedicated_server().validate(&cores).unwrap();
        let small = HostCores::from_ids(vec![0, 1]);
        assert_eq!(
            Profile::dedicated_server().validate(&small),
            Err(TuningError::CoreUnavailable {
                core: 2,
                available: vec![0, 1]
            })
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let cores = HostCores::from_ids(vec![0]);
        let mut p = Profile::two_core();
        p.liveness.peer_timeout = p.liveness.heartbeat;
        let e = p.validate(&cores).unwrap_err().to_string();
        assert!(e.contains("liveness.peer_timeout"), "{e}");
        let mut p = Profile::two_core();
        p.ring_slots = 1000;
        let e = p.validate(&cores).unwrap_err().to_string();
        assert!(e.contains("`ring_slots` = 1000"), "{e}");
    }

    #[test]
    fn detect_then_pin_in_a_thread() {
        let cores = HostCores::detect().unwrap();
        assert!(cores.count() >= 1);
        let last = *cores.ids().last().unwrap();
        let c2 = cores.clone();
        std::thread::spawn(move || {
            c2.pin_current(last).unwrap();
            // After pinning, this thread's own view shrinks to one core; the
            // list read before still has all of them.
            assert_eq!(HostCores::detect().unwrap().ids(), &[last]);
            assert!(c2.check(c2.ids()[0]).is_ok());
        })
        .join()
        .unwrap();
        assert!(cores.pin_current(100_000).is_err());
    }

    #[test]
    fn host_checks_report() {
        let r = host_report(1 << 20);
        assert_eq!(r.checks.len(), 3);
        let text = r.to_string();
        assert!(text.contains("memlock"));
        let missing = check_kvm_at(Path::new("/nonexistent/kvm"));
        assert!(!missing.ok && missing.detail.contains("missing"));
    }

    #[test]
    fn adaptive_waiter_spins_then_yields() {
        let mut w = Waiter::new(PollMode::Adaptive { spin_us: 1 });
        for _ in 0..1000 {
            w.idle();
        }
        w.work();
        Waiter::new(PollMode::BusyPoll).idle();
    }

    #[test]
    fn idle_with_blocks_only_past_the_spin_and_yield_phases() {
        let mut w = Waiter::new(PollMode::Adaptive { spin_us: 1 });
        let mut asked = None;
        let mut ask = |w: &mut Waiter| {
            w.idle_with(|t| {
                asked = Some(t);
                Err::<(), _>(t)
            })
        };
        assert_eq!(ask(&mut w), Ok(()), "the first idle poll spins");
        std::thread::sleep(ADAPTIVE_YIELD_FOR);
        assert_eq!(ask(&mut w), Err(BLOCK_FOR), "block's error is returned");
        w.work();
        assert_eq!(ask(&mut w), Ok(()), "work starts the phases again");
        let mut blocking = Waiter::new(PollMode::Blocking);
        assert_eq!(ask(&mut blocking), Err(BLOCK_FOR));
        assert_eq!(asked, Some(BLOCK_FOR));
    }
}
