//! Keyspace commands: DEL/UNLINK, EXISTS, TYPE, KEYS, SCAN, EXPIRE,
//! PEXPIRE, TTL, PTTL, PERSIST.
//!
//! SCAN's cursor is a position in key order (keys are kept sorted): a full
//! iteration returns every key that existed throughout it when nothing is
//! deleted meanwhile; deleting keys during a scan may make it skip others
//! (Redis guarantees it does not). Each call costs O(cursor + COUNT).

use super::{Ctx, Error, int_arg};
use crate::glob;
use crate::resp::{Args, parse_i64};

pub(super) fn del(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let mut removed = 0;
    for key in &args[1..] {
        if ctx.db.contains(key, ctx.now_ms) {
            ctx.db.remove(key);
            removed += 1;
        }
    }
    ctx.out.integer(removed);
    Ok(())
}

pub(super) fn exists(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let present = args[1..]
        .iter()
        .filter(|key| ctx.db.contains(key, ctx.now_ms))
        .count();
    ctx.out.integer(present as i64);
    Ok(())
}

pub(super) fn type_(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let name = ctx
        .db
        .peek(&args[1], ctx.now_ms)
        .map_or("none", |entry| entry.value.type_name());
    ctx.out.simple(name);
    Ok(())
}

pub(super) fn keys(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let pattern = &args[1];
    let count = ctx
        .db
        .keys_from(None, ctx.now_ms)
        .filter(|(key, _)| glob::matches(pattern, key))
        .count();
    ctx.out.array(count);
    for (key, _) in ctx.db.keys_from(None, ctx.now_ms) {
        if glob::matches(pattern, key) {
            ctx.out.bulk(key);
        }
    }
    Ok(())
}

pub(super) fn scan(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let cursor = match parse_i64(&args[1]) {
        Some(cursor) if cursor >= 0 => cursor as usize,
        _ => return Err(Error::Other("ERR invalid cursor")),
    };
    let mut pattern: Option<&[u8]> = None;
    let mut count = 10usize;
    let mut kind: Option<&[u8]> = None;
    let mut at = 2;
    while at < args.len() {
        if at + 1 >= args.len() {
            return Err(Error::Syntax);
        }
        let value = &args[at + 1];
        if args[at].eq_ignore_ascii_case(b"MATCH") {
            pattern = Some(value);
        } else if args[at].eq_ignore_ascii_case(b"COUNT") {
            count = match int_arg(value)? {
                n if n < 1 => return Err(Error::Syntax),
                n => n as usize,
            };
        } else if args[at].eq_ignore_ascii_case(b"TYPE") {
            kind = Some(value);
        } else {
            return Err(Error::Syntax);
        }
        at += 2;
    }
    let live = ctx.db.keys_from(None, ctx.now_ms).skip(cursor).take(count);
    let wanted = |key: &[u8], type_name: &str| {
        pattern.is_none_or(|p| glob::matches(p, key))
            && kind.is_none_or(|k| k.eq_ignore_ascii_case(type_name.as_bytes()))
    };
    let mut seen = 0;
    let mut found = 0;
    for (key, entry) in live {
        seen += 1;
        if wanted(key, entry.value.type_name()) {
            found += 1;
        }
    }
    let next = if seen < count { 0 } else { cursor + seen };
    ctx.out.array(2);
    ctx.out.bulk_i64(next as i64);
    ctx.out.array(found);
    for (key, entry) in ctx.db.keys_from(None, ctx.now_ms).skip(cursor).take(count) {
        if wanted(key, entry.value.type_name()) {
            ctx.out.bulk(key);
        }
    }
    Ok(())
}

fn expire_generic(
    ctx: &mut Ctx<'_, '_>,
    args: &mut Args,
    unit_ms: i64,
    name: &'static str,
) -> Result<(), Error> {
    let amount = int_arg(&args[2])?;
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in &args[3..] {
        match option.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            _ => return Err(unsupported_option(ctx, option)),
        }
    }
    if nx && (xx || gt || lt) {
        return Err(Error::Other(
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        ));
    }
    if gt && lt {
        return Err(Error::Other(
            "ERR GT and LT options at the same time are not compatible",
        ));
    }
    let ms = amount
        .checked_mul(unit_ms)
        .ok_or(Error::InvalidExpire(name))?;
    let when = (ctx.now_ms as i64)
        .checked_add(ms)
        .ok_or(Error::InvalidExpire(name))?;
    let now = ctx.now_ms;
    let Some(entry) = ctx.db.peek(&args[1], now) else {
        ctx.out.integer(0);
        return Ok(());
    };
    let current = entry.expires_at_ms;
    let allowed = match current {
        None => !xx && !gt,
        Some(at) => !nx && (!gt || when > at as i64) && (!lt || when < at as i64),
    };
    if !allowed {
        ctx.out.integer(0);
        return Ok(());
    }
    if when <= now as i64 {
        ctx.db.remove(&args[1]);
    } else {
        ctx.db.set_deadline(&args[1], Some(when as u64), now);
    }
    ctx.out.integer(1);
    Ok(())
}

fn unsupported_option(ctx: &mut Ctx<'_, '_>, option: &[u8]) -> Error {
    ctx.out.raw(&[b"-ERR Unsupported option "]);
    super::raw_line(ctx.out, option);
    ctx.out.raw(&[b"\r\n"]);
    Error::Written
}

pub(super) fn expire(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    expire_generic(ctx, args, 1000, "expire")
}

pub(super) fn pexpire(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    expire_generic(ctx, args, 1, "pexpire")
}

fn ttl_generic(ctx: &mut Ctx<'_, '_>, args: &mut Args, in_ms: bool) -> Result<(), Error> {
    let now = ctx.now_ms;
    let reply = match ctx.db.peek(&args[1], now) {
        None => -2,
        Some(entry) => match entry.expires_at_ms {
            None => -1,
            Some(at) => {
                let left = at.saturating_sub(now) as i64;
                if in_ms { left } else { (left + 500) / 1000 }
            }
        },
    };
    ctx.out.integer(reply);
    Ok(())
}

pub(super) fn ttl(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    ttl_generic(ctx, args, false)
}

pub(super) fn pttl(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    ttl_generic(ctx, args, true)
}

pub(super) fn persist(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let had = ctx
        .db
        .peek(&args[1], now)
        .is_some_and(|entry| entry.expires_at_ms.is_some());
    if had {
        ctx.db.set_deadline(&args[1], None, now);
    }
    ctx.out.integer(i64::from(had));
    Ok(())
}
