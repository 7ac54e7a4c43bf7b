//! Set commands: SADD, SREM, SPOP, SMEMBERS, SISMEMBER, SCARD.
//!
//! SPOP picks with the store's seeded generator, so its choice is the same
//! on a replaying backup.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::{Ctx, Error, ServerView, int_arg, take};
use crate::db::{Entry, Value};
use crate::resp::Args;

type Set = BTreeSet<Vec<u8>>;

/// Sets up to this size pick a uniformly random member (a walk of up to
/// this many); larger ones pick the first member at or after a random
/// probe (O(log n), not uniform).
const UNIFORM_PICK_MAX: usize = 4096;

fn set_of(entry: Option<&mut Entry>) -> Result<Option<&mut Set>, Error> {
    match entry {
        None => Ok(None),
        Some(Entry {
            value: Value::Set(set),
            ..
        }) => Ok(Some(set)),
        Some(_) => Err(Error::WrongType),
    }
}

pub(super) fn sadd(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let mut fresh = Set::new();
    let existing = set_of(ctx.db.peek(&args[1], now))?;
    let is_new = existing.is_none();
    let set = match existing {
        Some(set) => set,
        None => &mut fresh,
    };
    let mut added = 0;
    for at in 2..args.len() {
        if set.insert(take(args, at)) {
            added += 1;
        }
    }
    if is_new {
        ctx.db.set(take(args, 1), Value::Set(fresh));
    }
    ctx.out.integer(added);
    Ok(())
}

pub(super) fn srem(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let removed = match set_of(ctx.db.lookup(&args[1], now))? {
        Some(set) => args[2..]
            .iter()
            .filter(|member| set.remove(*member))
            .count(),
        None => 0,
    };
    ctx.db.drop_if_empty(&args[1]);
    ctx.out.integer(removed as i64);
    Ok(())
}

fn pick(set: &Set, server: &mut ServerView<'_>) -> Option<Vec<u8>> {
    let len = set.len();
    if len == 0 {
        return None;
    }
    let random = server.random();
    if len <= UNIFORM_PICK_MAX {
        return set.iter().nth((random % len as u64) as usize).cloned();
    }
    let (first, last) = (set.first()?, set.last()?);
    let common = first.iter().zip(last).take_while(|(a, b)| a == b).count();
    let mut probe = first[..common].to_vec();
    probe.extend_from_slice(&random.to_be_bytes());
    set.range(probe..).next().or(set.first()).cloned()
}

pub(super) fn spop(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    if args.len() > 3 {
        return Err(Error::Syntax);
    }
    let count = match args.get(2) {
        Some(arg) => match int_arg(arg) {
            Ok(n) if n >= 0 => Some(n as usize),
            _ => return Err(Error::NotPositive),
        },
        None => None,
    };
    let now = ctx.now_ms;
    let Some(set) = set_of(ctx.db.lookup(&args[1], now))? else {
        match count {
            Some(_) => ctx.out.array(0),
            None => ctx.out.nil(),
        }
        return Ok(());
    };
    match count {
        None => match pick(set, &mut ctx.server) {
            Some(member) => {
                set.remove(&member);
                ctx.out.bulk(&member);
            }
            None => ctx.out.nil(),
        },
        Some(count) => {
            let count = count.min(set.len());
            ctx.out.array(count);
            for _ in 0..count {
                if let Some(member) = pick(set, &mut ctx.server) {
                    set.remove(&member);
                    ctx.out.bulk(&member);
                }
            }
        }
    }
    ctx.db.drop_if_empty(&args[1]);
    Ok(())
}

pub(super) fn smembers(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let Some(set) = set_of(ctx.db.lookup(&args[1], now))? else {
        ctx.out.array(0);
        return Ok(());
    };
    ctx.out.array(set.len());
    for member in set.iter() {
        ctx.out.bulk(member);
    }
    Ok(())
}

pub(super) fn sismember(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let present =
        set_of(ctx.db.lookup(&args[1], ctx.now_ms))?.is_some_and(|set| set.contains(&args[2]));
    ctx.out.integer(i64::from(present));
    Ok(())
}

pub(super) fn scard(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let len = set_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map_or(0, |set| set.len());
    ctx.out.integer(len as i64);
    Ok(())
}
