//! The keyspace and its data types.
//!
//! ```text
//! Db ── map: BTreeMap<key, Entry> ── Entry { value, expires_at_ms: Option<u64> }
//!                                            │
//!        Value::Str   bytes (integers are decimal text, as in Redis)
//!        Value::List  VecDeque<bytes>
//!        Value::Hash  Hash::Small(Vec<(field, value)>)  ≤ 128 fields of ≤ 64 bytes:
//!                     insertion order, like Redis's listpack (so HGETALL
//!                     replies match Redis byte for byte)
//!                     Hash::Large(BTreeMap<field, value>)
//!        Value::Set   BTreeSet<bytes>
//!        Value::ZSet  ZSet { scores: BTreeMap<member, f64>,
//!                            order: BTreeSet<(Score, member)> }  (score, then member)
//! ```
//!
//! Time is a number of milliseconds handed in by the caller: in the guest it
//! is the paravirtual clock as of the last `WAIT` exit, a logged value, so a
//! backup replaying the log expires exactly the same keys at the same exits.
//! Expiry is lazy (a key past its deadline is removed when a command touches
//! it) plus an active sweep ([`Db::sweep_expired`]) that walks the keyspace
//! in key order from a cursor, a bounded number of keys per call.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::cmp::Ordering;

/// Redis's `hash-max-listpack-entries`.
pub const HASH_SMALL_ENTRIES: usize = 128;
/// Redis's `hash-max-listpack-value`.
pub const HASH_SMALL_VALUE: usize = 64;

/// A stored value.
#[derive(Debug)]
pub enum Value {
    /// A string (also integers and counters).
    Str(Vec<u8>),
    /// A list.
    List(VecDeque<Vec<u8>>),
    /// A hash.
    Hash(Hash),
    /// A set.
    Set(BTreeSet<Vec<u8>>),
    /// A sorted set.
    ZSet(ZSet),
}

impl Value {
    /// The name TYPE replies with.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Str(_) => "string",
            Self::List(_) => "list",
            Self::Hash(_) => "hash",
            Self::Set(_) => "set",
            Self::ZSet(_) => "zset",
        }
    }

    /// True for an empty aggregate, which Redis deletes.
    pub fn is_empty_aggregate(&self) -> bool {
        match self {
            Self::Str(_) => false,
            Self::List(list) => list.is_empty(),
            Self::Hash(hash) => hash.is_empty(),
            Self::Set(set) => set.is_empty(),
            Self::ZSet(zset) => zset.is_empty(),
        }
    }
}

/// A key's value and its deadline.
#[derive(Debug)]
pub struct Entry {
    /// The value.
    pub value: Value,
    /// When the key expires, in ms of the caller's clock.
    pub expires_at_ms: Option<u64>,
}

/// A hash: small ones keep insertion order (like Redis's listpack).
#[derive(Debug)]
pub enum Hash {
    /// At most [`HASH_SMALL_ENTRIES`] pairs, fields and values of at most
    /// [`HASH_SMALL_VALUE`] bytes.
    Small(Vec<(Vec<u8>, Vec<u8>)>),
    /// Anything larger.
    Large(BTreeMap<Vec<u8>, Vec<u8>>),
}

impl Default for Hash {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

/// A failed allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory;

impl Hash {
    /// Number of fields.
    pub fn len(&self) -> usize {
        match self {
            Self::Small(pairs) => pairs.len(),
            Self::Large(map) => map.len(),
        }
    }

    /// True if the hash has no field.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of `field`.
    pub fn get(&self, field: &[u8]) -> Option<&Vec<u8>> {
        match self {
            Self::Small(pairs) => pairs
                .iter()
                .find(|(name, _)| name.as_slice() == field)
                .map(|(_, value)| value),
            Self::Large(map) => map.get(field),
        }
    }

    /// Sets `field`; true if it is new.
    pub fn insert(&mut self, field: Vec<u8>, value: Vec<u8>) -> Result<bool, OutOfMemory> {
        if let Self::Small(pairs) = self {
            if let Some(pair) = pairs.iter_mut().find(|(name, _)| *name == field) {
                pair.1 = value;
                return Ok(false);
            }
            let fits = pairs.len() < HASH_SMALL_ENTRIES
                && field.len() <= HASH_SMALL_VALUE
                && value.len() <= HASH_SMALL_VALUE;
            if fits {
                pairs.try_reserve(1).map_err(|_| OutOfMemory)?;
                pairs.push((field, value));
                return Ok(true);
            }
            let map: BTreeMap<_, _> = core::mem::take(pairs).into_iter().collect();
            *self = Self::Large(map);
        }
        match self {
            Self::Large(map) => Ok(map.insert(field, value).is_none()),
            Self::Small(_) => Ok(false),
        }
    }

    /// Removes `field`; true if it was there.
    pub fn remove(&mut self, field: &[u8]) -> bool {
        match self {
            Self::Small(pairs) => match pairs.iter().position(|(name, _)| name == field) {
                Some(at) => {
                    pairs.remove(at);
                    true
                }
                None => false,
            },
            Self::Large(map) => map.remove(field).is_some(),
        }
    }

    /// Every (field, value), in the hash's order.
    pub fn for_each(&self, mut visit: impl FnMut(&[u8], &[u8])) {
        match self {
            Self::Small(pairs) => pairs.iter().for_each(|(f, v)| visit(f, v)),
            Self::Large(map) => map.iter().for_each(|(f, v)| visit(f, v)),
        }
    }
}

/// A score with a total order (NaN never gets in: commands refuse it).
#[derive(Debug, Clone, Copy)]
pub struct Score(pub f64);

impl PartialEq for Score {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Score {}
impl PartialOrd for Score {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Score {
    fn cmp(&self, other: &Self) -> Ordering {
        // -0.0 and 0.0 compare equal, as in Redis (a C `<` comparison).
        if self.0 == other.0 {
            Ordering::Equal
        } else {
            self.0.total_cmp(&other.0)
        }
    }
}

/// A sorted set: members ordered by (score, member bytes), as in Redis.
#[derive(Debug, Default)]
pub struct ZSet {
    scores: BTreeMap<Vec<u8>, f64>,
    order: BTreeSet<(Score, Vec<u8>)>,
}

impl ZSet {
    /// Members.
    pub fn len(&self) -> usize {
        self.scores.len()
    }

    /// True if the set has no member.
    pub fn is_empty(&self) -> bool {
        self.scores.is_empty()
    }

    /// The score of `member`.
    pub fn score(&self, member: &[u8]) -> Option<f64> {
        self.scores.get(member).copied()
    }

    /// Sets `member`'s score; true if it is new.
    pub fn insert(&mut self, member: Vec<u8>, score: f64) -> Result<bool, OutOfMemory> {
        if let Some(old) = self.scores.get_mut(&member) {
            let was = *old;
            *old = score;
            if let Some((_, name)) = self.order.take(&(Score(was), member)) {
                self.order.insert((Score(score), name));
            }
            return Ok(false);
        }
        let mut copy = Vec::new();
        copy.try_reserve_exact(member.len())
            .map_err(|_| OutOfMemory)?;
        copy.extend_from_slice(&member);
        self.scores.insert(member, score);
        self.order.insert((Score(score), copy));
        Ok(true)
    }

    /// Removes `member`; true if it was there.
    pub fn remove(&mut self, member: &[u8]) -> bool {
        match self.scores.remove(member) {
            Some(score) => {
                self.order.remove(&(Score(score), member.to_vec()));
                true
            }
            None => false,
        }
    }

    /// Removes and returns the member with the lowest score.
    pub fn pop_min(&mut self) -> Option<(Vec<u8>, f64)> {
        let (score, member) = self.order.pop_first()?;
        self.scores.remove(&member);
        Some((member, score.0))
    }

    /// Removes and returns the member with the highest score.
    pub fn pop_max(&mut self) -> Option<(Vec<u8>, f64)> {
        let (score, member) = self.order.pop_last()?;
        self.scores.remove(&member);
        Some((member, score.0))
    }

    /// Members in rank order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&[u8], f64)> + Clone {
        self.order
            .iter()
            .map(|(score, member)| (member.as_slice(), score.0))
    }

    /// The 0-based rank of `member`.
    pub fn rank(&self, member: &[u8]) -> Option<usize> {
        let score = self.score(member)?;
        Some(self.order.range(..(Score(score), member.to_vec())).count())
    }
}

/// Keyspace statistics INFO reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct DbStats {
    /// Keys removed because their deadline passed.
    pub expired_keys: u64,
    /// Lookups that found their key.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
}

/// The keyspace (one database: SELECT accepts only 0).
#[derive(Debug, Default)]
pub struct Db {
    map: BTreeMap<Vec<u8>, Entry>,
    volatile: usize,
    sweep_from: Option<Vec<u8>>,
    /// Counters for INFO.
    pub stats: DbStats,
}

impl Db {
    /// Keys stored (including ones past their deadline not yet removed).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no key is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Keys with a deadline.
    pub fn volatile(&self) -> usize {
        self.volatile
    }

    /// Removes `key` if its deadline has passed; true if it did.
    fn expire_if_due(&mut self, key: &[u8], now_ms: u64) -> bool {
        let due = matches!(self.map.get(key), Some(Entry { expires_at_ms: Some(at), .. }) if *at <= now_ms);
        if due {
            self.remove(key);
            self.stats.expired_keys += 1;
        }
        due
    }

    /// The live entry at `key`, without counting a hit or miss.
    pub fn peek(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        self.expire_if_due(key, now_ms);
        self.map.get_mut(key)
    }

    /// The live entry at `key`, counting a keyspace hit or miss.
    pub fn lookup(&mut self, key: &[u8], now_ms: u64) -> Option<&mut Entry> {
        self.expire_if_due(key, now_ms);
        match self.map.get_mut(key) {
            Some(entry) => {
                self.stats.hits += 1;
                Some(entry)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// True if `key` is live.
    pub fn contains(&mut self, key: &[u8], now_ms: u64) -> bool {
        self.peek(key, now_ms).is_some()
    }

    /// Stores `value` at `key` with no deadline (SET semantics).
    pub fn set(&mut self, key: Vec<u8>, value: Value) {
        self.set_with_deadline(key, value, None);
    }

    /// Stores `value` at `key` with `deadline`.
    pub fn set_with_deadline(&mut self, key: Vec<u8>, value: Value, deadline: Option<u64>) {
        let entry = Entry {
            value,
            expires_at_ms: deadline,
        };
        if deadline.is_some() {
            self.volatile += 1;
        }
        if let Some(old) = self.map.insert(key, entry)
            && old.expires_at_ms.is_some()
        {
            self.volatile -= 1;
        }
    }

    /// Removes `key`; returns its entry.
    pub fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let entry = self.map.remove(key)?;
        if entry.expires_at_ms.is_some() {
            self.volatile -= 1;
        }
        Some(entry)
    }

    /// Sets or clears the deadline of a live key; false if there is none.
    pub fn set_deadline(&mut self, key: &[u8], deadline: Option<u64>, now_ms: u64) -> bool {
        let Some(entry) = self.peek(key, now_ms) else {
            return false;
        };
        let had = entry.expires_at_ms.is_some();
        entry.expires_at_ms = deadline;
        match (had, deadline.is_some()) {
            (false, true) => self.volatile += 1,
            (true, false) => self.volatile -= 1,
            _ => {}
        }
        true
    }

    /// Removes `key` if its value is an empty aggregate (after a pop/remove).
    pub fn drop_if_empty(&mut self, key: &[u8]) {
        if self
            .map
            .get(key)
            .is_some_and(|entry| entry.value.is_empty_aggregate())
        {
            self.remove(key);
        }
    }

    /// Removes every key.
    pub fn clear(&mut self) {
        self.map.clear();
        self.volatile = 0;
        self.sweep_from = None;
    }

    /// Live keys in order, from `start` on (for KEYS and SCAN).
    pub fn keys_from<'a>(
        &'a self,
        start: Option<&[u8]>,
        now_ms: u64,
    ) -> impl Iterator<Item = (&'a Vec<u8>, &'a Entry)> + 'a {
        let range = match start {
            Some(start) => self.map.range::<[u8], _>((
                core::ops::Bound::Included(start),
                core::ops::Bound::Unbounded,
            )),
            None => self.map.range::<[u8], _>(..),
        };
        range.filter(move |(_, entry)| entry.expires_at_ms.is_none_or(|at| at > now_ms))
    }

    /// The first live key at or after `probe` in key order, wrapping around
    /// (a cheap pseudo-random pick when `probe` is random).
    pub fn key_near(&self, probe: &[u8], now_ms: u64) -> Option<&Vec<u8>> {
        self.keys_from(Some(probe), now_ms)
            .chain(self.keys_from(None, now_ms))
            .map(|(key, _)| key)
            .next()
    }

    /// Examines up to `budget` keys from where the last sweep stopped and
    /// removes those past their deadline; returns how many it removed.
    pub fn sweep_expired(&mut self, now_ms: u64, budget: usize) -> usize {
        if self.volatile == 0 {
            self.sweep_from = None;
            return 0;
        }
        let mut due: Vec<Vec<u8>> = Vec::new();
        let mut next = None;
        {
            let range = match &self.sweep_from {
                Some(from) => self.map.range::<[u8], _>((
                    core::ops::Bound::Included(from.as_slice()),
                    core::ops::Bound::Unbounded,
                )),
                None => self.map.range::<[u8], _>(..),
            };
            for (seen, (key, entry)) in range.enumerate() {
                if seen == budget {
                    next = Some(key.clone());
                    break;
                }
                if entry.expires_at_ms.is_some_and(|at| at <= now_ms) {
                    if due.try_reserve(1).is_err() {
                        next = Some(key.clone());
                        break;
                    }
                    due.push(key.clone());
                }
            }
        }
        self.sweep_from = next;
        for key in &due {
            self.remove(key);
        }
        self.stats.expired_keys += due.len() as u64;
        due.len()
    }

    /// Sum of the remaining time to live of the keys with a deadline, over
    /// how many there are (INFO's `avg_ttl`, in ms).
    pub fn average_ttl(&self, now_ms: u64) -> u64 {
        if self.volatile == 0 {
            return 0;
        }
        let total: u64 = self
            .map
            .values()
            .filter_map(|entry| entry.expires_at_ms)
            .map(|at| at.saturating_sub(now_ms))
            .sum();
        total / self.volatile as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn keys_expire_lazily_and_by_sweep() {
        let mut db = Db::default();
        db.set_with_deadline(b"a".to_vec(), Value::Str(b"1".to_vec()), Some(100));
        db.set_with_deadline(b"b".to_vec(), Value::Str(b"2".to_vec()), Some(200));
        db.set(b"c".to_vec(), Value::Str(b"3".to_vec()));
        assert_eq!(db.volatile(), 2);
        assert!(db.contains(b"a", 99));
        assert!(!db.contains(b"a", 100));
        assert_eq!(db.stats.expired_keys, 1);
        assert_eq!(db.sweep_expired(500, 10), 1);
        assert_eq!(db.len(), 1);
        assert_eq!(db.volatile(), 0);
    }

    #[test]
    fn sweep_resumes_where_it_stopped() {
        let mut db = Db::default();
        for key in 0..10u8 {
            db.set_with_deadline(vec![b'k', b'0' + key], Value::Str(vec![]), Some(1));
        }
        assert_eq!(db.sweep_expired(5, 4), 4);
        assert_eq!(db.sweep_expired(5, 4), 4);
        assert_eq!(db.sweep_expired(5, 4), 2);
        assert!(db.is_empty());
    }

    #[test]
    fn small_hashes_keep_insertion_order_then_convert() {
        let mut hash = Hash::default();
        assert_eq!(hash.insert(b"z".to_vec(), b"1".to_vec()), Ok(true));
        assert_eq!(hash.insert(b"a".to_vec(), b"2".to_vec()), Ok(true));
        assert_eq!(hash.insert(b"z".to_vec(), b"3".to_vec()), Ok(false));
        let mut seen = Vec::new();
        hash.for_each(|f, v| seen.push((f.to_vec(), v.to_vec())));
        assert_eq!(
            seen,
            vec![
                (b"z".to_vec(), b"3".to_vec()),
                (b"a".to_vec(), b"2".to_vec())
            ]
        );
        assert_eq!(hash.insert(b"long".to_vec(), vec![b'x'; 65]), Ok(true));
        assert!(matches!(hash, Hash::Large(_)));
        assert_eq!(hash.len(), 3);
        assert!(hash.remove(b"z"));
        assert_eq!(hash.get(b"a"), Some(&b"2".to_vec()));
    }

    #[test]
    fn sorted_sets_order_by_score_then_member() {
        let mut zset = ZSet::default();
        assert_eq!(zset.insert(b"b".to_vec(), 1.0), Ok(true));
        assert_eq!(zset.insert(b"a".to_vec(), 1.0), Ok(true));
        assert_eq!(zset.insert(b"c".to_vec(), 0.5), Ok(true));
        assert_eq!(zset.insert(b"c".to_vec(), 2.0), Ok(false));
        let order: Vec<&[u8]> = zset.iter().map(|(m, _)| m).collect();
        assert_eq!(order, vec![&b"a"[..], b"b", b"c"]);
        assert_eq!(zset.rank(b"c"), Some(2));
        assert_eq!(zset.pop_min(), Some((b"a".to_vec(), 1.0)));
        assert!(zset.remove(b"c"));
        assert_eq!(zset.len(), 1);
    }
}
