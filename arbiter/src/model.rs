//! The arbiter's model: per VM, which replica is live in which generation,
//! and the two compare-and-set decisions that move a VM to the next one.
//!
//! The decisions are pure functions ([`decide_test_and_set`],
//! [`decide_register`]) over the current [`VmRecord`], so every backend (the
//! in-memory [`Registry`], the embedded server, etcd) applies exactly the same
//! rules; a backend only has to make "read the record, decide, write the new
//! record" atomic.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::{Arbiter, ArbiterError};

/// The identity of a protected VM. The arbiter treats it as an opaque number;
/// the primary and backup of one VM must agree on it.
pub type VmId = u64;

/// The longest replica id, in bytes.
pub const MAX_REPLICA_ID_LEN: usize = 64;

/// The identity of one replica (one `lockstep` process on one host).
///
/// Opaque to the arbiter: a string of 1 to [`MAX_REPLICA_ID_LEN`] printable
/// ASCII characters without spaces (`0x21..=0x7e`), e.g. `hostA:7001` or a
/// UUID. Printable so that it reads well in logs, in `etcdctl get` and in the
/// state file's hex dump; space-free so the etcd value can be split on
/// spaces. Each replica must have an id that no other replica of the same VM
/// uses, ever: an id is what the arbiter grants a generation to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(String);

/// A replica id that breaks the rules of [`ReplicaId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica id {id:?}: {reason}")]
pub struct InvalidReplicaId {
    /// The rejected id (lossily decoded if it was not UTF-8).
    pub id: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl ReplicaId {
    /// Checks `id` against the rules of [`ReplicaId`].
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidReplicaId> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > MAX_REPLICA_ID_LEN {
            Some("it is longer than 64 bytes")
        } else if !id.bytes().all(|b| b.is_ascii_graphic()) {
            Some("only printable ASCII without spaces is allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidReplicaId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// Decodes an id from the wire or the state file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidReplicaId> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Self::new(s),
            Err(_) => Err(InvalidReplicaId {
                id: String::from_utf8_lossy(bytes).into_owned(),
                reason: "only printable ASCII without spaces is allowed",
            }),
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id's bytes (at most [`MAX_REPLICA_ID_LEN`]).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl FromStr for ReplicaId {
    type Err = InvalidReplicaId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({:?})", self.0)
    }
}

/// What the arbiter knows about one VM: its current generation and who runs it.
///
/// `primary` is the live replica of `generation`. `backup` is `None` when the
/// generation was won by [`Arbiter::test_and_set`] (the winner runs alone until
/// it re-protects itself with [`Arbiter::register`]), and `Some` when
/// [`Arbiter::register`] started it for a primary/backup pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRecord {
    /// The current generation (1 for a VM's first pair; never lowered).
    pub generation: u64,
    /// The live replica of this generation: the only one that may answer clients.
    pub primary: ReplicaId,
    /// The backup of this generation, if it has one.
    pub backup: Option<ReplicaId>,
}

impl VmRecord {
    /// Whether `id` is the primary or the backup of this generation.
    pub fn is_member(&self, id: &ReplicaId) -> bool {
        self.primary == *id || self.backup.as_ref() == Some(id)
    }
}

/// Why a compare-and-set was refused. Every refusal means the same thing to
/// the caller: it must not go live, and (for [`Arbiter::test_and_set`]) it
/// halts for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// The caller's generation is older than the current one: someone else
    /// (or the caller itself, in an earlier call) already moved the VM on.
    /// This is what every loser of a race sees.
    Superseded,
    /// The caller's generation is newer than the arbiter's. The arbiter has
    /// lost state (a deleted state file, a wiped etcd key): an operator must
    /// look. Nobody is granted anything meanwhile.
    Ahead,
    /// The caller is not a member of the current generation (rule 1: the
    /// primary of generation g+1 was the primary or backup of generation g;
    /// only the current primary may start a new pair).
    NotMember,
    /// No pair was ever registered for this VM.
    Unregistered,
}

impl Loss {
    /// A short sentence for logs and exit messages.
    pub fn describe(self) -> &'static str {
        match self {
            Loss::Superseded => "the generation was already taken",
            Loss::Ahead => "the arbiter is behind the caller (it lost state)",
            Loss::NotMember => "the caller is not a member of the current generation",
            Loss::Unregistered => "no pair is registered for this VM",
        }
    }
}

/// The answer to a compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The caller won: the record is the new generation (`expected + 1`),
    /// with the caller as its primary.
    Won(VmRecord),
    /// The caller lost, and must halt for good (after a lost
    /// [`Arbiter::test_and_set`]) or give up the re-protection (after a lost
    /// [`Arbiter::register`]). `current` is the arbiter's record, if any: the
    /// current generation and its winner.
    Lost {
        /// Why.
        reason: Loss,
        /// The arbiter's current record for the VM.
        current: Option<VmRecord>,
    },
}

impl Outcome {
    /// Whether the caller won.
    pub fn is_won(&self) -> bool {
        matches!(self, Outcome::Won(_))
    }
}

/// A request that is wrong whatever the arbiter's state is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A pair needs two distinct replicas.
    #[error("primary and backup are the same replica {0}")]
    SamePrimaryAndBackup(ReplicaId),
    /// Generation `u64::MAX` has no successor.
    #[error("generation {0} has no successor")]
    GenerationExhausted(u64),
}

/// What a backend must do after a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Store this record (atomically, only if the record is still the one
    /// decided on), then answer [`Outcome::Won`].
    Grant(VmRecord),
    /// Answer [`Outcome::Lost`] with this reason and the current record.
    Refuse(Loss),
    /// The caller already won exactly this: the current record is the one
    /// its request would create (a retry after a lost reply, or an etcd
    /// transaction retried on another member). Answer [`Outcome::Won`] with
    /// it and store nothing.
    Already(VmRecord),
}

fn next_generation(current: u64) -> Result<u64, RequestError> {
    current
        .checked_add(1)
        .ok_or(RequestError::GenerationExhausted(current))
}

fn compare(current: Option<&VmRecord>, expected: u64) -> Option<Loss> {
    match current {
        None if expected == 0 => None,
        None => Some(Loss::Ahead),
        Some(r) if expected < r.generation => Some(Loss::Superseded),
        Some(r) if expected > r.generation => Some(Loss::Ahead),
        Some(_) => None,
    }
}

/// Whether `current` is exactly the record that a grant of `wanted` made:
/// the same generation, primary and backup. Only the request that asked
/// for `wanted` can have made it (a test-and-set records no backup, a
/// register always one, and replica ids are never shared), so finding it
/// means that the caller's earlier attempt won and its reply was lost.
fn already_granted(current: Option<&VmRecord>, wanted: &VmRecord) -> bool {
    current == Some(wanted)
}

/// The test-and-set rule: `candidate` wins generation `expected + 1` iff the
/// VM is registered, its current generation is exactly `expected`, and
/// `candidate` is a member of it. The winner runs alone (no backup).
///
/// Idempotent: if the current record is already `(expected + 1, candidate,
/// no backup)`, the caller's earlier call won and the decision is
/// [`Decision::Already`].
pub fn decide_test_and_set(
    current: Option<&VmRecord>,
    expected: u64,
    candidate: &ReplicaId,
) -> Result<Decision, RequestError> {
    if let Some(next) = expected.checked_add(1) {
        let wanted = VmRecord {
            generation: next,
            primary: candidate.clone(),
            backup: None,
        };
        if already_granted(current, &wanted) {
            return Ok(Decision::Already(wanted));
        }
    }
    let Some(record) = current else {
        let loss = if expected == 0 {
            Loss::Unregistered
        } else {
            Loss::Ahead
        };
        return Ok(Decision::Refuse(loss));
    };
    if let Some(loss) = compare(current, expected) {
        return Ok(Decision::Refuse(loss));
    }
    if !record.is_member(candidate) {
        return Ok(Decision::Refuse(Loss::NotMember));
    }
    Ok(Decision::Grant(VmRecord {
        generation: next_generation(expected)?,
        primary: candidate.clone(),
        backup: None,
    }))
}

/// The register rule: a new pair starts generation `expected + 1` iff the
/// current generation is exactly `expected` (0 for a VM never seen) and, for a
/// VM already registered, `primary` is its current primary (re-protection:
/// only the live replica may take a new backup).
///
/// Idempotent like [`decide_test_and_set`]: a current record `(expected +
/// 1, primary, backup)` is [`Decision::Already`].
pub fn decide_register(
    current: Option<&VmRecord>,
    expected: u64,
    primary: &ReplicaId,
    backup: &ReplicaId,
) -> Result<Decision, RequestError> {
    if primary == backup {
        return Err(RequestError::SamePrimaryAndBackup(primary.clone()));
    }
    if let Some(next) = expected.checked_add(1) {
        let wanted = VmRecord {
            generation: next,
            primary: primary.clone(),
            backup: Some(backup.clone()),
        };
        if already_granted(current, &wanted) {
            return Ok(Decision::Already(wanted));
        }
    }
    if let Some(loss) = compare(current, expected) {
        return Ok(Decision::Refuse(loss));
    }
    if let Some(record) = current
        && record.primary != *primary
    {
        return Ok(Decision::Refuse(Loss::NotMember));
    }
    Ok(Decision::Grant(VmRecord {
        generation: next_generation(expected)?,
        primary: primary.clone(),
        backup: Some(backup.clone()),
    }))
}

/// Every VM's record, in memory. Backends that keep their own state (the
/// embedded server) wrap one of these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    records: BTreeMap<VmId, VmRecord>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The record of `vm`, if registered.
    pub fn get(&self, vm: VmId) -> Option<&VmRecord> {
        self.records.get(&vm)
    }

    /// Every record, by VM id.
    pub fn iter(&self) -> impl Iterator<Item = (VmId, &VmRecord)> {
        self.records.iter().map(|(vm, r)| (*vm, r))
    }

    /// How many VMs are registered.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no VM is registered.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Stores `record` for `vm`. Crate-private: only a granted decision may
    /// change a record, and generations only go up.
    pub(crate) fn insert(&mut self, vm: VmId, record: VmRecord) {
        self.records.insert(vm, record);
    }

    /// Turns a decision into an outcome, storing a grant. Crate-private
    /// like [`Registry::insert`].
    pub(crate) fn apply(&mut self, vm: VmId, decision: Decision) -> Outcome {
        match decision {
            Decision::Grant(record) => {
                self.insert(vm, record.clone());
                Outcome::Won(record)
            }
            Decision::Already(record) => Outcome::Won(record),
            Decision::Refuse(reason) => Outcome::Lost {
                reason,
                current: self.get(vm).cloned(),
            },
        }
    }
}

/// An in-process arbiter: the model behind a mutex, for unit tests of
/// code that needs an [`Arbiter`]. Not durable and not shared between
/// processes, so never a defence against split brain on its own.
#[derive(Debug, Default)]
pub struct MemoryArbiter {
    registry: Mutex<Registry>,
}

impl MemoryArbiter {
    /// An arbiter with no VM registered.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        let mut guard = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut guard)
    }
}

impl Arbiter for MemoryArbiter {
    fn timeout(&self) -> Duration {
        Duration::ZERO
    }

    fn read(&self, vm: VmId) -> Result<Option<VmRecord>, ArbiterError> {
        Ok(self.with(|r| r.get(vm).cloned()))
    }

    fn test_and_set(
        &self,
        vm: VmId,
        expected: u64,
        candidate: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        self.with(|r| {
            let decision = decide_test_and_set(r.get(vm), expected, candidate)?;
            Ok(r.apply(vm, decision))
        })
    }

    fn register(
        &self,
        vm: VmId,
        expected: u64,
        primary: &ReplicaId,
        backup: &ReplicaId,
    ) -> Result<Outcome, ArbiterError> {
        self.with(|r| {
            let decision = decide_register(r.get(vm), expected, primary, backup)?;
            Ok(r.apply(vm, decision))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("ok")
    }

    #[test]
    fn replica_ids_are_checked() {
        assert!(ReplicaId::new("hostA:7001").is_ok());
        assert!(ReplicaId::new("").is_err());
        assert!(ReplicaId::new("a b").is_err());
        assert!(ReplicaId::new("x".repeat(65)).is_err());
        assert!(ReplicaId::new("x".repeat(64)).is_ok());
        assert!(ReplicaId::from_bytes(&[0xff]).is_err());
    }

    #[test]
    fn the_rules() {
        let a = MemoryArbiter::new();
        let (p, b, x) = (id("p"), id("b"), id("x"));
        // Nothing registered: nobody wins.
        let lost = a.test_and_set(7, 0, &p).expect("ok");
        assert!(matches!(
            lost,
            Outcome::Lost {
                reason: Loss::Unregistered,
                current: None
            }
        ));
        // A new pair starts generation 1.
        let won = a.register(7, 0, &p, &b).expect("ok");
        assert_eq!(
            won,
            Outcome::Won(VmRecord {
                generation: 1,
                primary: p.clone(),
                backup: Some(b.clone())
            })
        );
        // Only once: another pair cannot take generation 1 (the same pair
        // asking again is a retry, see `retries_of_a_win_are_recognised`).
        assert!(!a.register(7, 0, &b, &p).expect("ok").is_won());
        // A stranger never wins (rule 1).
        let lost = a.test_and_set(7, 1, &x).expect("ok");
        assert!(matches!(
            lost,
            Outcome::Lost {
                reason: Loss::NotMember,
                ..
            }
        ));
        // The backup wins generation 2 and runs alone; the primary loses.
        let won = a.test_and_set(7, 1, &b).expect("ok");
        assert_eq!(
            won,
            Outcome::Won(VmRecord {
                generation: 2,
                primary: b.clone(),
                backup: None
            })
        );
        let Outcome::Lost { reason, current } = a.test_and_set(7, 1, &p).expect("ok") else {
            panic!("second winner of generation 1");
        };
        assert_eq!(reason, Loss::Superseded);
        assert_eq!(current.expect("ok").primary, b);
        // The future is refused too.
        assert!(matches!(
            a.test_and_set(7, 9, &b).expect("ok"),
            Outcome::Lost {
                reason: Loss::Ahead,
                ..
            }
        ));
        // Re-protection: only the live primary, only on the current generation.
        assert!(matches!(
            a.register(7, 2, &p, &x).expect("ok"),
            Outcome::Lost {
                reason: Loss::NotMember,
                ..
            }
        ));
        assert!(a.register(7, 2, &b, &x).expect("ok").is_won());
        assert_eq!(a.read(7).expect("ok").expect("ok").generation, 3);
        // Bad requests are errors, not outcomes.
        assert!(a.register(8, 0, &p, &p).is_err());
    }

    /// A retry of a call that won (its reply was lost) wins again, with the
    /// same record and nothing stored twice; anyone else still loses.
    #[test]
    fn retries_of_a_win_are_recognised() {
        let a = MemoryArbiter::new();
        let (p, b, x) = (id("p"), id("b"), id("x"));
        let first = a.register(7, 0, &p, &b).expect("ok");
        assert!(first.is_won());
        assert_eq!(a.register(7, 0, &p, &b).expect("ok"), first);
        // Another pair for the same generation still loses.
        assert!(!a.register(7, 0, &p, &x).expect("ok").is_won());
        let won = a.test_and_set(7, 1, &b).expect("ok");
        assert!(won.is_won());
        assert_eq!(a.test_and_set(7, 1, &b).expect("ok"), won);
        // The other member of generation 1 lost for good, retries included.
        assert!(!a.test_and_set(7, 1, &p).expect("ok").is_won());
        assert_eq!(a.read(7).expect("ok").expect("ok").generation, 2);
        // A register that moved on is not mistaken for a test-and-set win.
        assert!(a.register(7, 2, &b, &x).expect("ok").is_won());
        assert!(!a.test_and_set(7, 2, &b).expect("ok").is_won());
        assert!(a.test_and_set(7, 3, &b).expect("ok").is_won());
        assert!(!a.register(7, 2, &b, &x).expect("ok").is_won());
    }
}
