//! String commands: GET, SET, SETNX, GETSET, MGET, MSET, INCR, INCRBY, DECR,
//! DECRBY, APPEND, STRLEN.

use alloc::vec::Vec;

use super::{Ctx, Error, int_arg, string_of, take};
use crate::db::{Entry, Value};
use crate::resp::{Args, format_i64};

/// Longest string APPEND may build (Redis's default `proto-max-bulk-len`).
pub const MAX_STRING_LEN: usize = 512 << 20;

pub(super) fn get(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match string_of(ctx.db.lookup(&args[1], ctx.now_ms))? {
        Some(bytes) => ctx.out.bulk(bytes),
        None => ctx.out.nil(),
    }
    Ok(())
}

/// A fallible copy of `bytes`.
pub(super) fn copy(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let mut copy = Vec::new();
    copy.try_reserve_exact(bytes.len())
        .map_err(|_| Error::OutOfMemory)?;
    copy.extend_from_slice(bytes);
    Ok(copy)
}

/// Turns a relative time to live into a deadline; `None` if it is not
/// positive or overflows (Redis: "invalid expire time").
pub(super) fn deadline(now_ms: u64, amount: i64, unit_ms: i64) -> Option<u64> {
    if amount <= 0 {
        return None;
    }
    let ms = amount.checked_mul(unit_ms)?;
    now_ms
        .checked_add(ms as u64)
        .filter(|at| *at <= i64::MAX as u64)
}

pub(super) fn set(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire: Option<(i64, i64)> = None;
    let mut at = 3;
    while at < args.len() {
        let option = args[at].to_ascii_uppercase();
        match option.as_slice() {
            b"NX" if !xx => nx = true,
            b"XX" if !nx => xx = true,
            b"GET" => get = true,
            b"KEEPTTL" if expire.is_none() => keepttl = true,
            b"EX" | b"PX" if expire.is_none() && !keepttl && at + 1 < args.len() => {
                let unit = if option.as_slice() == b"EX" { 1000 } else { 1 };
                expire = Some((int_arg(&args[at + 1])?, unit));
                at += 1;
            }
            _ => return Err(Error::Syntax),
        }
        at += 1;
    }
    let deadline = match expire {
        Some((amount, unit)) => {
            Some(deadline(ctx.now_ms, amount, unit).ok_or(Error::InvalidExpire("set"))?)
        }
        None => None,
    };
    let now = ctx.now_ms;
    let existing = ctx.db.peek(&args[1], now);
    let exists = existing.is_some();
    let old_ttl = existing.as_ref().and_then(|entry| entry.expires_at_ms);
    let old = match (get, existing) {
        (false, _) | (true, None) => None,
        (
            true,
            Some(Entry {
                value: Value::Str(bytes),
                ..
            }),
        ) => Some(copy(bytes)?),
        (true, Some(_)) => return Err(Error::WrongType),
    };
    let proceed = if exists { !nx } else { !xx };
    if proceed {
        let deadline = if keepttl { old_ttl } else { deadline };
        let key = take(args, 1);
        let value = take(args, 2);
        ctx.db.set_with_deadline(key, Value::Str(value), deadline);
    }
    match (get, old) {
        (true, Some(old)) => ctx.out.bulk(&old),
        (true, None) => ctx.out.nil(),
        (false, _) if proceed => ctx.out.ok(),
        (false, _) => ctx.out.nil(),
    }
    Ok(())
}

pub(super) fn setnx(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    if ctx.db.contains(&args[1], ctx.now_ms) {
        ctx.out.integer(0);
    } else {
        let key = take(args, 1);
        let value = take(args, 2);
        ctx.db.set(key, Value::Str(value));
        ctx.out.integer(1);
    }
    Ok(())
}

pub(super) fn getset(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let old = string_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map(core::mem::take);
    let key = take(args, 1);
    let value = take(args, 2);
    ctx.db.set(key, Value::Str(value));
    match old {
        Some(old) => ctx.out.bulk(&old),
        None => ctx.out.nil(),
    }
    Ok(())
}

pub(super) fn mget(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    ctx.out.array(args.len() - 1);
    for key in &args[1..] {
        match ctx.db.lookup(key, ctx.now_ms) {
            Some(Entry {
                value: Value::Str(bytes),
                ..
            }) => ctx.out.bulk(bytes),
            _ => ctx.out.nil(),
        }
    }
    Ok(())
}

pub(super) fn mset(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    if args.len().is_multiple_of(2) {
        return Err(Error::Other(
            "ERR wrong number of arguments for 'mset' command",
        ));
    }
    for pair in (1..args.len()).step_by(2) {
        let key = take(args, pair);
        let value = take(args, pair + 1);
        ctx.db.set(key, Value::Str(value));
    }
    ctx.out.ok();
    Ok(())
}

fn add(ctx: &mut Ctx<'_, '_>, args: &mut Args, delta: i64) -> Result<(), Error> {
    let now = ctx.now_ms;
    let current = match string_of(ctx.db.lookup(&args[1], now))? {
        None => 0,
        Some(bytes) => crate::resp::parse_i64(bytes).ok_or(Error::NotInteger)?,
    };
    let next = current.checked_add(delta).ok_or(Error::Overflow)?;
    let mut digits = [0; 20];
    let text = format_i64(next, &mut digits);
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(text.len())
        .map_err(|_| Error::OutOfMemory)?;
    bytes.extend_from_slice(text);
    match ctx.db.peek(&args[1], now) {
        // In place: INCR keeps the key's time to live, as in Redis.
        Some(entry) => entry.value = Value::Str(bytes),
        None => ctx.db.set(take(args, 1), Value::Str(bytes)),
    }
    ctx.out.integer(next);
    Ok(())
}

pub(super) fn incr(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    add(ctx, args, 1)
}

pub(super) fn decr(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    add(ctx, args, -1)
}

pub(super) fn incrby(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let delta = int_arg(&args[2])?;
    add(ctx, args, delta)
}

pub(super) fn decrby(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let delta = int_arg(&args[2])?;
    if delta == i64::MIN {
        return Err(Error::Other("ERR decrement would overflow"));
    }
    add(ctx, args, -delta)
}

pub(super) fn append(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let len = match string_of(ctx.db.lookup(&args[1], now))? {
        Some(bytes) => {
            let total = bytes.len() + args[2].len();
            if total > MAX_STRING_LEN {
                return Err(Error::Other(
                    "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
                ));
            }
            bytes
                .try_reserve(args[2].len())
                .map_err(|_| Error::OutOfMemory)?;
            bytes.extend_from_slice(&args[2]);
            total
        }
        None => {
            let len = args[2].len();
            let key = take(args, 1);
            let value = take(args, 2);
            ctx.db.set(key, Value::Str(value));
            len
        }
    };
    ctx.out.integer(len as i64);
    Ok(())
}

pub(super) fn strlen(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let len = string_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map_or(0, |bytes| bytes.len());
    ctx.out.integer(len as i64);
    Ok(())
}
