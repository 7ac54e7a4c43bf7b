//! Hash commands: HSET, HMSET, HGET, HMGET, HGETALL, HKEYS, HVALS, HDEL,
//! HLEN, HEXISTS, HINCRBY.

use super::{Ctx, Error, int_arg, take};
use crate::db::{Entry, Hash, Value};
use crate::resp::{Args, format_i64, parse_i64};

fn hash_of(entry: Option<&mut Entry>) -> Result<Option<&mut Hash>, Error> {
    match entry {
        None => Ok(None),
        Some(Entry {
            value: Value::Hash(hash),
            ..
        }) => Ok(Some(hash)),
        Some(_) => Err(Error::WrongType),
    }
}

/// Sets the field/value pairs from `args[2..]`; returns how many were new.
fn set_pairs(ctx: &mut Ctx<'_, '_>, args: &mut Args, name: &str) -> Result<i64, Error> {
    if !args.len().is_multiple_of(2) {
        super::arity_error(ctx.out, name, None);
        return Err(Error::Written);
    }
    let now = ctx.now_ms;
    let mut fresh = Hash::default();
    let existing = hash_of(ctx.db.peek(&args[1], now))?;
    let is_new = existing.is_none();
    let hash = match existing {
        Some(hash) => hash,
        None => &mut fresh,
    };
    let mut added = 0;
    for at in (2..args.len()).step_by(2) {
        let field = take(args, at);
        let value = take(args, at + 1);
        if hash.insert(field, value)? {
            added += 1;
        }
    }
    if is_new {
        ctx.db.set(take(args, 1), Value::Hash(fresh));
    }
    Ok(added)
}

pub(super) fn hset(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let added = set_pairs(ctx, args, "hset")?;
    ctx.out.integer(added);
    Ok(())
}

pub(super) fn hmset(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    set_pairs(ctx, args, "hmset")?;
    ctx.out.ok();
    Ok(())
}

pub(super) fn hget(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match hash_of(ctx.db.lookup(&args[1], ctx.now_ms))?.and_then(|hash| hash.get(&args[2])) {
        Some(value) => ctx.out.bulk(value),
        None => ctx.out.nil(),
    }
    Ok(())
}

pub(super) fn hmget(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let hash = hash_of(ctx.db.lookup(&args[1], now))?;
    ctx.out.array(args.len() - 2);
    for field in &args[2..] {
        match hash.as_ref().and_then(|hash| hash.get(field)) {
            Some(value) => ctx.out.bulk(value),
            None => ctx.out.nil(),
        }
    }
    Ok(())
}

fn all(ctx: &mut Ctx<'_, '_>, args: &mut Args, fields: bool, values: bool) -> Result<(), Error> {
    let now = ctx.now_ms;
    let Some(hash) = hash_of(ctx.db.lookup(&args[1], now))? else {
        ctx.out.array(0);
        return Ok(());
    };
    let per = usize::from(fields) + usize::from(values);
    ctx.out.array(hash.len() * per);
    let out = &mut *ctx.out;
    hash.for_each(|field, value| {
        if fields {
            out.bulk(field);
        }
        if values {
            out.bulk(value);
        }
    });
    Ok(())
}

pub(super) fn hgetall(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    all(ctx, args, true, true)
}

pub(super) fn hkeys(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    all(ctx, args, true, false)
}

pub(super) fn hvals(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    all(ctx, args, false, true)
}

pub(super) fn hdel(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let removed = match hash_of(ctx.db.lookup(&args[1], now))? {
        Some(hash) => args[2..].iter().filter(|field| hash.remove(field)).count(),
        None => 0,
    };
    ctx.db.drop_if_empty(&args[1]);
    ctx.out.integer(removed as i64);
    Ok(())
}

pub(super) fn hlen(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let len = hash_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map_or(0, |hash| hash.len());
    ctx.out.integer(len as i64);
    Ok(())
}

pub(super) fn hexists(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let present = hash_of(ctx.db.lookup(&args[1], ctx.now_ms))?
        .is_some_and(|hash| hash.get(&args[2]).is_some());
    ctx.out.integer(i64::from(present));
    Ok(())
}

pub(super) fn hincrby(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let delta = int_arg(&args[3])?;
    let now = ctx.now_ms;
    let current = match hash_of(ctx.db.lookup(&args[1], now))?.and_then(|hash| hash.get(&args[2])) {
        Some(value) => parse_i64(value).ok_or(Error::Other("ERR hash value is not an integer"))?,
        None => 0,
    };
    let next = current.checked_add(delta).ok_or(Error::Overflow)?;
    let mut digits = [0; 20];
    let text = super::strings::copy(format_i64(next, &mut digits))?;
    args[3] = text;
    set_pairs(ctx, args, "hincrby")?;
    ctx.out.integer(next);
    Ok(())
}
