//! Sorted-set commands: ZADD, ZINCRBY, ZSCORE, ZCARD, ZREM, ZRANK, ZRANGE
//! (by index or BYSCORE, REV, LIMIT, WITHSCORES), ZPOPMIN, ZPOPMAX.

use super::{Ctx, Error, clamp_range, int_arg, take};
use crate::db::{Entry, Value, ZSet};
use crate::num::parse_double;
use crate::resp::Args;

fn zset_of(entry: Option<&mut Entry>) -> Result<Option<&mut ZSet>, Error> {
    match entry {
        None => Ok(None),
        Some(Entry {
            value: Value::ZSet(zset),
            ..
        }) => Ok(Some(zset)),
        Some(_) => Err(Error::WrongType),
    }
}

fn score_arg(arg: &[u8]) -> Result<f64, Error> {
    parse_double(arg).ok_or(Error::NotFloat)
}

pub(super) fn zadd(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let (mut nx, mut xx, mut gt, mut lt, mut ch, mut incr) =
        (false, false, false, false, false, false);
    let mut at = 2;
    while at < args.len() {
        match args[at].to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"GT" => gt = true,
            b"LT" => lt = true,
            b"CH" => ch = true,
            b"INCR" => incr = true,
            _ => break,
        }
        at += 1;
    }
    let pairs = args.len() - at;
    if pairs == 0 || !pairs.is_multiple_of(2) {
        return Err(Error::Syntax);
    }
    if nx && xx {
        return Err(Error::Other(
            "ERR XX and NX options at the same time are not compatible",
        ));
    }
    if (nx && (gt || lt)) || (gt && lt) {
        return Err(Error::Other(
            "ERR GT, LT, and/or NX options at the same time are not compatible",
        ));
    }
    if incr && pairs > 2 {
        return Err(Error::Other(
            "ERR INCR option supports a single increment-element pair",
        ));
    }
    for pair in (at..args.len()).step_by(2) {
        score_arg(&args[pair])?;
    }
    let now = ctx.now_ms;
    let mut fresh = ZSet::default();
    let existing = zset_of(ctx.db.peek(&args[1], now))?;
    let is_new = existing.is_none();
    let zset = match existing {
        Some(zset) => zset,
        None => &mut fresh,
    };
    let (mut added, mut changed) = (0, 0);
    let mut incr_result = None;
    for pair in (at..args.len()).step_by(2) {
        let mut score = score_arg(&args[pair])?;
        let member = take(args, pair + 1);
        match zset.score(&member) {
            Some(old) => {
                if nx {
                    continue;
                }
                if incr {
                    score += old;
                    if score.is_nan() {
                        return Err(Error::Nan);
                    }
                }
                if (gt && score <= old) || (lt && score >= old) {
                    continue;
                }
                incr_result = Some(score);
                if score != old {
                    zset.insert(member, score)?;
                    changed += 1;
                }
            }
            None => {
                if xx {
                    continue;
                }
                zset.insert(member, score)?;
                incr_result = Some(score);
                added += 1;
            }
        }
    }
    if is_new && !fresh.is_empty() {
        ctx.db.set(take(args, 1), Value::ZSet(fresh));
    }
    if incr {
        match incr_result {
            Some(score) => ctx.out.bulk_f64(score),
            None => ctx.out.nil(),
        }
    } else {
        ctx.out.integer(if ch { added + changed } else { added });
    }
    Ok(())
}

pub(super) fn zincrby(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let delta = score_arg(&args[2])?;
    let now = ctx.now_ms;
    let mut fresh = ZSet::default();
    let existing = zset_of(ctx.db.peek(&args[1], now))?;
    let is_new = existing.is_none();
    let zset = match existing {
        Some(zset) => zset,
        None => &mut fresh,
    };
    let score = zset.score(&args[3]).unwrap_or(0.0) + delta;
    if score.is_nan() {
        return Err(Error::Nan);
    }
    zset.insert(take(args, 3), score)?;
    if is_new {
        ctx.db.set(take(args, 1), Value::ZSet(fresh));
    }
    ctx.out.bulk_f64(score);
    Ok(())
}

pub(super) fn zscore(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match zset_of(ctx.db.lookup(&args[1], ctx.now_ms))?.and_then(|zset| zset.score(&args[2])) {
        Some(score) => ctx.out.bulk_f64(score),
        None => ctx.out.nil(),
    }
    Ok(())
}

pub(super) fn zcard(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let len = zset_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map_or(0, |zset| zset.len());
    ctx.out.integer(len as i64);
    Ok(())
}

pub(super) fn zrem(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let now = ctx.now_ms;
    let removed = match zset_of(ctx.db.lookup(&args[1], now))? {
        Some(zset) => args[2..]
            .iter()
            .filter(|member| zset.remove(member))
            .count(),
        None => 0,
    };
    ctx.db.drop_if_empty(&args[1]);
    ctx.out.integer(removed as i64);
    Ok(())
}

pub(super) fn zrank(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match zset_of(ctx.db.lookup(&args[1], ctx.now_ms))?.and_then(|zset| zset.rank(&args[2])) {
        Some(rank) => ctx.out.integer(rank as i64),
        None => ctx.out.nil(),
    }
    Ok(())
}

/// A ZRANGE BYSCORE bound: `1.5`, `(1.5` (exclusive), `-inf`, `+inf`.
fn score_bound(arg: &[u8]) -> Result<(f64, bool), Error> {
    let (exclusive, text) = match arg.split_first() {
        Some((b'(', rest)) => (true, rest),
        _ => (false, arg),
    };
    let value = parse_double(text).ok_or(Error::Other("ERR min or max is not a float"))?;
    Ok((value, exclusive))
}

pub(super) fn zrange(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let (mut by_score, mut rev, mut with_scores) = (false, false, false);
    let mut limit: Option<(i64, i64)> = None;
    let mut at = 4;
    while at < args.len() {
        match args[at].to_ascii_uppercase().as_slice() {
            b"BYSCORE" => by_score = true,
            b"REV" => rev = true,
            b"WITHSCORES" => with_scores = true,
            b"LIMIT" if at + 2 < args.len() => {
                limit = Some((int_arg(&args[at + 1])?, int_arg(&args[at + 2])?));
                at += 2;
            }
            _ => return Err(Error::Syntax),
        }
        at += 1;
    }
    if limit.is_some() && !by_score {
        return Err(Error::Other(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        ));
    }
    if by_score {
        let (mut low, mut high) = (score_bound(&args[2])?, score_bound(&args[3])?);
        if rev {
            core::mem::swap(&mut low, &mut high);
        }
        let (offset, count) = limit.unwrap_or((0, -1));
        let Some(zset) = zset_of(ctx.db.lookup(&args[1], ctx.now_ms))? else {
            ctx.out.array(0);
            return Ok(());
        };
        let inside = |score: f64| {
            (if low.1 { score > low.0 } else { score >= low.0 })
                && (if high.1 {
                    score < high.0
                } else {
                    score <= high.0
                })
        };
        let skip = if offset < 0 {
            usize::MAX
        } else {
            offset as usize
        };
        let take_n = if count < 0 {
            usize::MAX
        } else {
            count as usize
        };
        if rev {
            let items = zset.iter().rev().filter(|(_, s)| inside(*s));
            write_items(ctx.out, items.skip(skip).take(take_n), with_scores);
        } else {
            let items = zset.iter().filter(|(_, s)| inside(*s));
            write_items(ctx.out, items.skip(skip).take(take_n), with_scores);
        }
        return Ok(());
    }
    let start = int_arg(&args[2])?;
    let stop = int_arg(&args[3])?;
    let Some(zset) = zset_of(ctx.db.lookup(&args[1], ctx.now_ms))? else {
        ctx.out.array(0);
        return Ok(());
    };
    let Some((first, last)) = clamp_range(start, stop, zset.len()) else {
        ctx.out.array(0);
        return Ok(());
    };
    let len = last - first + 1;
    if rev {
        write_items(
            ctx.out,
            zset.iter().rev().skip(first).take(len),
            with_scores,
        );
    } else {
        write_items(ctx.out, zset.iter().skip(first).take(len), with_scores);
    }
    Ok(())
}

/// Writes (member, score) items as an array, scores included if asked.
fn write_items<'a>(
    out: &mut crate::resp::Reply<'_>,
    items: impl Iterator<Item = (&'a [u8], f64)> + Clone,
    with_scores: bool,
) {
    let per = if with_scores { 2 } else { 1 };
    out.array(items.clone().count() * per);
    for (member, score) in items {
        out.bulk(member);
        if with_scores {
            out.bulk_f64(score);
        }
    }
}

fn pop(ctx: &mut Ctx<'_, '_>, args: &mut Args, min: bool) -> Result<(), Error> {
    if args.len() > 3 {
        return Err(Error::Syntax);
    }
    let count = match args.get(2) {
        Some(arg) => match int_arg(arg) {
            Ok(n) if n >= 0 => n as usize,
            _ => return Err(Error::NotPositive),
        },
        None => 1,
    };
    let now = ctx.now_ms;
    let Some(zset) = zset_of(ctx.db.lookup(&args[1], now))? else {
        ctx.out.array(0);
        return Ok(());
    };
    let count = count.min(zset.len());
    ctx.out.array(count * 2);
    for _ in 0..count {
        let popped = if min { zset.pop_min() } else { zset.pop_max() };
        if let Some((member, score)) = popped {
            ctx.out.bulk(&member);
            ctx.out.bulk_f64(score);
        }
    }
    ctx.db.drop_if_empty(&args[1]);
    Ok(())
}

pub(super) fn zpopmin(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    pop(ctx, args, true)
}

pub(super) fn zpopmax(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    pop(ctx, args, false)
}
