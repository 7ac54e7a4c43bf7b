//! The arbiter: the outside authority that keeps a primary/backup pair from
//! splitting its brain.
//!
//! # Why
//!
//! No replica can tell a dead peer from a broken network. So before a replica
//! goes live alone (a backup promoting itself, or a primary carrying on
//! without its backup) it must win an atomic test-and-set at the arbiter:
//!
//! - **The winner of generation g becomes the primary of generation g+1.**
//!   [`Arbiter::test_and_set`]`(vm, g, me)` succeeds exactly once per
//!   `(vm, g)`; the stored generation becomes g+1 and `me` its only live
//!   replica.
//! - **The loser halts for good.** Every later or concurrent caller with the
//!   same `g`, and every caller with a stale `g`, gets [`Outcome::Lost`] with
//!   the current generation and its winner. It must stop: it may never serve
//!   clients again, and it may come back only as a new backup made by state
//!   transfer, in a new generation.
//! - **A stalled arbiter stalls the service rather than split it.** An
//!   unreachable or failing arbiter is an [`ArbiterError`], never a win: the
//!   caller keeps its outputs held and retries (or gives up), and nobody goes
//!   live alone. Every call has a timeout ([`Arbiter::timeout`]).
//! - **Generations, never a reset flag.** There is no way to lower a
//!   generation. [`Arbiter::register`] starts a new pair (a new VM, or
//!   re-protection after a failover) and is a compare-and-set on the current
//!   generation too. Every channel handshake and log batch carries the
//!   generation, and the replicas reject anything from an older one.
//!
//! The view-server rules from MISSION.md that this crate enforces: (1) the
//! primary of generation i+1 was the primary or backup of generation i
//! ([`model::Loss::NotMember`] otherwise; only the live primary may
//! register a new backup). Rules 2-5 are the replicas' business; the
//! generation this crate hands out is what rule 3 compares.
//!
//! # A lost reply
//!
//! If a call times out, the caller does not know whether it won. It must not
//! go live; it retries the same call. Every call is idempotent: a retry
//! that finds the record its request would have made (`g+1`, the caller as
//! primary, no backup for a `test_and_set`; `g+1`, this primary and this
//! backup for a `register`) is answered [`Outcome::Won`] again, without a
//! second write. So a lost reply (a dropped connection, an etcd transaction
//! retried on another member, an fsync that failed after the rename) costs a
//! retry, never a halt. The key of a request is the caller's identity and
//! the generation it asks for: replica ids must therefore never be shared
//! between two replicas (two processes with one id are one replica to the
//! arbiter; see `lockstep primary --supersede-generation`).
//!
//! # Backends
//!
//! - [`EmbeddedArbiter`], a client of [`server`]: one process on one host,
//!   durable (fsync before every answer that grants), with an authenticated
//!   binary protocol ([`protocol`]). The default for one host and for tests;
//!   it is a single point of failure.
//! - [`EtcdArbiter`] ([`etcd`]): the record kept in etcd and changed by a
//!   transaction, for production, where the authority must itself be
//!   replicated.
//! - [`MemoryArbiter`]: in-process, for unit tests of code that needs an
//!   arbiter.
//!
//! # Example
//!
//! A backup that lost contact with its primary, with the generation `g` it
//! learnt at the last handshake:
//!
//! ```
//! use arbiter::{Arbiter, MemoryArbiter, Outcome, ReplicaId};
//!
//! let arbiter = MemoryArbiter::new(); // or EmbeddedArbiter / EtcdArbiter
//! let (a, b) = (ReplicaId::new("hostA").unwrap(), ReplicaId::new("hostB").unwrap());
//! let Outcome::Won(pair) = arbiter.register(42, 0, &a, &b).unwrap() else { panic!() };
//! let g = pair.generation;
//!
//! // Both sides think the other died and race for generation g + 1.
//! let backup = arbiter.test_and_set(42, g, &b).unwrap();
//! let primary = arbiter.test_and_set(42, g, &a).unwrap();
//! assert!(backup.is_won()); // hostB goes live as primary of g + 1
//! match primary {
//!     Outcome::Lost { current, .. } => {
//!         // hostA halts for good; hostB now owns the VM.
//!         assert_eq!(current.unwrap().primary, b);
//!     }
//!     Outcome::Won(_) => unreachable!("two winners of one generation"),
//! }
//! ```

pub mod client;
pub mod etcd;
pub mod model;
pub mod protocol;
pub mod server;
pub mod state;

use std::time::Duration;

pub use client::EmbeddedArbiter;
pub use etcd::{EtcdArbiter, EtcdSecurity};
pub use model::{Loss, MemoryArbiter, Outcome, ReplicaId, RequestError, VmId, VmRecord};
pub use protocol::Key;

/// An authority that decides which replica of a VM is live in which
/// generation. See the crate docs for the rules.
///
/// Every call returns within [`Arbiter::timeout`] (plus scheduling noise) and
/// an error never means "won".
pub trait Arbiter: Send + Sync {
    /// The bound on every call.
    fn timeout(&self) -> Duration;

    /// The VM's current record, or `None` if no pair was ever registered.
    fn read(&self, vm: VmId) -> Result<Option<VmRecord>, ArbiterError>;

    /// Asks to go live alone in generation `expected + 1`. Wins iff the VM's
    /// current generation is `expected` and `candidate` is its primary or
    /// backup; once per `(vm, expected)`.
    fn test_and_set(
        &self,
        vm: VmId,
        expected: u64,
        candidate: &ReplicaId,
    ) -> Result<Outcome, ArbiterError>;

    /// Starts generation `expected + 1` for a primary/backup pair: a new VM
    /// (`expected == 0`) or the re-protection of a VM whose live replica is
    /// `primary`. Wins iff the current generation is `expected`.
    fn register(
        &self,
        vm: VmId,
        expected: u64,
        primary: &ReplicaId,
        backup: &ReplicaId,
    ) -> Result<Outcome, ArbiterError>;
}

/// Why an arbiter call did not produce an outcome. None of these is a win:
/// the caller must not go live.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// The arbiter could not be reached (refused, reset, unroutable).
    #[error("the arbiter at {addr} is unreachable")]
    Unreachable {
        /// Where it should be.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The arbiter did not answer in time.
    #[error("the arbiter at {addr} did not answer within {timeout:?}")]
    Timeout {
        /// Where it is.
        addr: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The arbiter refused our MAC.
    #[error("the arbiter at {addr} refused our authentication: the pre-shared keys differ")]
    KeyRejected {
        /// Where it is.
        addr: String,
    },
    /// The reply's MAC or nonce did not verify.
    #[error(
        "the reply from {addr} is not authentic: the pre-shared keys differ, or something other than our arbiter answered"
    )]
    NotAuthentic {
        /// Where it came from.
        addr: String,
    },
    /// Client and server speak different protocol versions.
    #[error("the arbiter at {addr} speaks protocol version {theirs}, this client speaks {ours}")]
    VersionMismatch {
        /// Where it is.
        addr: String,
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The arbiter refused the request (bad magic, malformed, invalid).
    #[error("the arbiter at {addr} refused the request ({status:?})")]
    Refused {
        /// Where it is.
        addr: String,
        /// The status it answered.
        status: protocol::Status,
    },
    /// The arbiter could not make its decision durable; nothing was granted.
    #[error("the arbiter at {addr} cannot write its state; it grants nothing until restarted")]
    Storage {
        /// Where it is.
        addr: String,
    },
    /// The reply could not be decoded.
    #[error("the arbiter at {addr} sent a malformed reply")]
    BadReply {
        /// Where it came from.
        addr: String,
        /// What was wrong.
        #[source]
        source: protocol::ProtocolError,
    },
    /// The request is wrong whatever the arbiter's state.
    #[error("invalid arbiter request")]
    Invalid(#[from] RequestError),
    /// No randomness for the nonce.
    #[error("cannot draw a nonce: {0}")]
    Random(String),
    /// The etcd backend failed.
    #[error("the etcd arbiter at {endpoints} failed")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: Box<etcd::EtcdError>,
    },
}

impl ArbiterError {
    /// Whether the error says the arbiter could not be reached or answered
    /// too late (as opposed to refusing the request).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ArbiterError::Unreachable { .. } | ArbiterError::Timeout { .. }
        ) || matches!(self, ArbiterError::Etcd { source, .. } if source.is_unreachable())
    }
}

/// Renders an error and its chain of causes on one line, `a: b: c`
/// (the workspace's one renderer, `channel::error_chain`).
pub use channel::error_chain;
