//! A linearizability checker for the chaos campaign's key-value history, in
//! the manner of Porcupine (Wing & Gong's search with Lowe's memoization).
//!
//! Every operation a client issued is recorded with the instant it was
//! invoked and the instant its reply arrived. An operation without a reply
//! (the connection broke during a failover) may or may not have taken
//! effect: it may be placed anywhere after its invocation, with any result,
//! or nowhere at all.
//!
//! A history is linearizable if its operations can be put in one order that
//! (1) respects real time: an operation that completed before another was
//! invoked comes first, and (2) replayed one by one on a single key-value
//! store gives every reply the clients saw. Linearizability is local (a
//! history is linearizable iff its restriction to each key is), so each key
//! is checked on its own.
//!
//! ```text
//!  client 1  |--SET x 1--|                 |--GET x -> 2--|
//!  client 2        |----INCR x -> 2----|
//!  order:    SET x 1  <  INCR x  <  GET x       linearizable
//!  client 3                                   |--GET x -> nil--|   not: x was set before
//! ```
//!
//! The search: among the operations not yet placed, only those invoked
//! before the earliest completion of any unplaced operation may go next
//! (anything else would break real time). Try each whose result the model
//! accepts, recurse; remember every (placed set, state) already explored so
//! no configuration is searched twice.

use std::collections::HashSet;

/// What an operation did.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// `SET key value`.
    Set(String),
    /// `GET key`.
    Get,
    /// `INCR key`.
    Incr,
}

/// The reply a client saw.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// `+OK`.
    Ok,
    /// A bulk string, or nil.
    Value(Option<String>),
    /// An integer.
    Int(i64),
    /// An error reply (INCR of a value that is not an integer).
    Error,
}

/// One operation on one key.
#[derive(Clone, Debug)]
pub struct Op {
    /// The client that issued it.
    pub client: u32,
    /// The key.
    pub key: String,
    /// What it asked.
    pub call: Call,
    /// What it got; `None`: no reply arrived.
    pub reply: Option<Reply>,
    /// When it was invoked (ns since the start of the trial).
    pub invoked_ns: u64,
    /// When its reply arrived (ns); `u64::MAX` without a reply.
    pub completed_ns: u64,
}

/// The model: one key's value (`None`: absent). Applies `call`; returns
/// the new value and the reply a correct store gives.
fn step(value: &Option<String>, call: &Call) -> (Option<String>, Reply) {
    match call {
        Call::Set(v) => (Some(v.clone()), Reply::Ok),
        Call::Get => (value.clone(), Reply::Value(value.clone())),
        Call::Incr => match value.as_deref().map_or(Ok(0), str::parse::<i64>) {
            Ok(n) => match n.checked_add(1) {
                Some(m) => (Some(m.to_string()), Reply::Int(m)),
                None => (value.clone(), Reply::Error),
            },
            Err(_) => (value.clone(), Reply::Error),
        },
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some order explains every reply.
    Linearizable,
    /// No order explains the replies on `key`.
    Violation {
        /// The key.
        key: String,
        /// Its operations.
        ops: usize,
        /// The clients that issued them.
        clients: usize,
    },
    /// The search gave up (too many configurations): undecided.
    Unknown {
        /// The key.
        key: String,
    },
}

/// Most configurations explored per key before giving up.
const MAX_STATES: usize = 2_000_000;

/// Checks a whole history, key by key.
pub fn check(history: &[Op]) -> Verdict {
    let mut keys: Vec<&str> = history.iter().map(|op| op.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let ops: Vec<&Op> = history.iter().filter(|op| op.key == key).collect();
        match check_key(&ops) {
            Some(true) => {}
            Some(false) => {
                let mut clients: Vec<u32> = ops.iter().map(|op| op.client).collect();
                clients.sort_unstable();
                clients.dedup();
                return Verdict::Violation {
                    key: key.to_string(),
                    ops: ops.len(),
                    clients: clients.len(),
                };
            }
            None => {
                return Verdict::Unknown {
                    key: key.to_string(),
                };
            }
        }
    }
    Verdict::Linearizable
}

struct Search<'a> {
    ops: Vec<&'a Op>,
    placed: Vec<u64>,
    seen: HashSet<(Vec<u64>, Option<String>)>,
    /// Operations with a reply still to place.
    known_left: usize,
}

impl Search<'_> {
    fn is_placed(&self, i: usize) -> bool {
        self.placed[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.placed[i / 64] ^= 1 << (i % 64);
    }

    /// Some(true): an order exists from here; Some(false): none; None: gave up.
    fn run(&mut self, value: Option<String>) -> Option<bool> {
        if self.known_left == 0 {
            return Some(true);
        }
        if self.seen.len() > MAX_STATES {
            return None;
        }
        let horizon = (0..self.ops.len())
            .filter(|&i| !self.is_placed(i))
            .map(|i| self.ops[i].completed_ns)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..self.ops.len() {
            if self.is_placed(i) || self.ops[i].invoked_ns > horizon {
                continue;
            }
            let op = self.ops[i];
            let (next, reply) = step(&value, &op.call);
            if op.reply.as_ref().is_some_and(|seen| *seen != reply) {
                continue;
            }
            self.flip(i);
            let known = op.reply.is_some();
            if known {
                self.known_left -= 1;
            }
            let fresh = self.seen.insert((self.placed.clone(), next.clone()));
            let found = if fresh { self.run(next) } else { Some(false) };
            if known {
                self.known_left += 1;
            }
            self.flip(i);
            match found {
                Some(false) => {}
                other => return other,
            }
        }
        Some(false)
    }
}

fn check_key(ops: &[&Op]) -> Option<bool> {
    let mut sorted = ops.to_vec();
    sorted.sort_by_key(|op| (op.invoked_ns, op.completed_ns));
    let mut search = Search {
        known_left: sorted.iter().filter(|op| op.reply.is_some()).count(),
        placed: vec![0; sorted.len().div_ceil(64).max(1)],
        ops: sorted,
        seen: HashSet::new(),
    };
    // Deep histories recurse deeply: run the search on a thread with room.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn_scoped(scope, || search.run(None))
            .ok()?
            .join()
            .ok()?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, call: Call, reply: Option<Reply>, from: u64, to: u64) -> Op {
        Op {
            client,
            key: "x".into(),
            call,
            reply,
            invoked_ns: from,
            completed_ns: to,
        }
    }

    #[test]
    fn a_sequential_history_is_linearizable() {
        let history = [
            op(1, Call::Set("1".into()), Some(Reply::Ok), 0, 10),
            op(1, Call::Incr, Some(Reply::Int(2)), 20, 30),
            op(2, Call::Get, Some(Reply::Value(Some("2".into()))), 40, 50),
        ];
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn overlapping_operations_may_take_effect_in_either_order() {
        // The GET overlaps the INCR: it may see the value before or after.
        let history = [
            op(1, Call::Set("5".into()), Some(Reply::Ok), 0, 10),
            op(1, Call::Incr, Some(Reply::Int(6)), 20, 60),
            op(2, Call::Get, Some(Reply::Value(Some("5".into()))), 30, 70),
            op(3, Call::Get, Some(Reply::Value(Some("6".into()))), 35, 40),
        ];
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_rejected() {
        let history = [
            op(1, Call::Set("1".into()), Some(Reply::Ok), 0, 10),
            op(2, Call::Get, Some(Reply::Value(None)), 20, 30),
        ];
        assert!(matches!(check(&history), Verdict::Violation { .. }));
    }

    #[test]
    fn the_lectures_inc_twice_to_eleven_is_rejected() {
        // Two INCRs, one after the other, both told 11: one was lost.
        let history = [
            op(1, Call::Set("10".into()), Some(Reply::Ok), 0, 5),
            op(1, Call::Incr, Some(Reply::Int(11)), 10, 20),
            op(2, Call::Incr, Some(Reply::Int(11)), 30, 40),
        ];
        assert!(matches!(check(&history), Verdict::Violation { .. }));
        // Concurrent, they still cannot both see 11.
        let history = [
            op(1, Call::Set("10".into()), Some(Reply::Ok), 0, 5),
            op(1, Call::Incr, Some(Reply::Int(11)), 10, 40),
            op(2, Call::Incr, Some(Reply::Int(11)), 15, 35),
        ];
        assert!(matches!(check(&history), Verdict::Violation { .. }));
    }

    #[test]
    fn an_unanswered_operation_may_have_happened_or_not() {
        // The INCR got no reply (failover): a later GET may see it ...
        let seen = [
            op(1, Call::Set("1".into()), Some(Reply::Ok), 0, 5),
            op(1, Call::Incr, None, 10, u64::MAX),
            op(2, Call::Get, Some(Reply::Value(Some("2".into()))), 30, 40),
        ];
        assert_eq!(check(&seen), Verdict::Linearizable);
        // ... or not.
        let lost = [
            op(1, Call::Set("1".into()), Some(Reply::Ok), 0, 5),
            op(1, Call::Incr, None, 10, u64::MAX),
            op(2, Call::Get, Some(Reply::Value(Some("1".into()))), 30, 40),
        ];
        assert_eq!(check(&lost), Verdict::Linearizable);
        // But an acknowledged INCR must not vanish.
        let vanished = [
            op(1, Call::Set("1".into()), Some(Reply::Ok), 0, 5),
            op(1, Call::Incr, Some(Reply::Int(2)), 10, 20),
            op(2, Call::Get, Some(Reply::Value(Some("1".into()))), 30, 40),
        ];
        assert!(matches!(check(&vanished), Verdict::Violation { .. }));
    }

    #[test]
    fn keys_are_checked_independently_and_a_long_history_is_decided() {
        let mut history = Vec::new();
        for i in 0..600u64 {
            let mut a = op(
                1,
                Call::Incr,
                Some(Reply::Int(i as i64 + 1)),
                i * 10,
                i * 10 + 15,
            );
            a.key = "a".into();
            history.push(a);
            let mut b = op(2, Call::Get, None, i * 10 + 3, u64::MAX);
            b.key = "b".into();
            if i % 7 == 0 {
                history.push(b);
            }
        }
        assert_eq!(check(&history), Verdict::Linearizable);
    }
}
