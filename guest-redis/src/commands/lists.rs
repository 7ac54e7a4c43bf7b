//! List commands: LPUSH, RPUSH, LPOP, RPOP, LRANGE, LLEN, LINDEX.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::{Ctx, Error, clamp_range, int_arg, take};
use crate::db::{Entry, Value};
use crate::resp::Args;

type List = VecDeque<Vec<u8>>;

fn list_of(entry: Option<&mut Entry>) -> Result<Option<&mut List>, Error> {
    match entry {
        None => Ok(None),
        Some(Entry {
            value: Value::List(list),
            ..
        }) => Ok(Some(list)),
        Some(_) => Err(Error::WrongType),
    }
}

fn push(ctx: &mut Ctx<'_, '_>, args: &mut Args, front: bool) -> Result<(), Error> {
    let now = ctx.now_ms;
    let count = args.len() - 2;
    let mut fresh = List::new();
    let existing = list_of(ctx.db.peek(&args[1], now))?;
    let is_new = existing.is_none();
    let list = match existing {
        Some(list) => list,
        None => &mut fresh,
    };
    list.try_reserve(count).map_err(|_| Error::OutOfMemory)?;
    for at in 2..args.len() {
        let element = take(args, at);
        if front {
            list.push_front(element);
        } else {
            list.push_back(element);
        }
    }
    let len = list.len();
    if is_new {
        ctx.db.set(take(args, 1), Value::List(fresh));
    }
    ctx.out.integer(len as i64);
    Ok(())
}

pub(super) fn lpush(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    push(ctx, args, true)
}

pub(super) fn rpush(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    push(ctx, args, false)
}

fn pop(ctx: &mut Ctx<'_, '_>, args: &mut Args, front: bool) -> Result<(), Error> {
    if args.len() > 3 {
        let name = if front { "lpop" } else { "rpop" };
        super::arity_error(ctx.out, name, None);
        return Err(Error::Written);
    }
    let count = match args.get(2) {
        Some(arg) => match int_arg(arg) {
            Ok(n) if n >= 0 => Some(n as usize),
            _ => return Err(Error::NotPositive),
        },
        None => None,
    };
    let now = ctx.now_ms;
    let Some(list) = list_of(ctx.db.lookup(&args[1], now))? else {
        match count {
            Some(_) => ctx.out.nil_array(),
            None => ctx.out.nil(),
        }
        return Ok(());
    };
    match count {
        None => {
            let element = if front {
                list.pop_front()
            } else {
                list.pop_back()
            };
            match element {
                Some(element) => ctx.out.bulk(&element),
                None => ctx.out.nil(),
            }
        }
        Some(count) => {
            let count = count.min(list.len());
            ctx.out.array(count);
            for _ in 0..count {
                let element = if front {
                    list.pop_front()
                } else {
                    list.pop_back()
                };
                if let Some(element) = element {
                    ctx.out.bulk(&element);
                }
            }
        }
    }
    ctx.db.drop_if_empty(&args[1]);
    Ok(())
}

pub(super) fn lpop(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    pop(ctx, args, true)
}

pub(super) fn rpop(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    pop(ctx, args, false)
}

pub(super) fn lrange(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let start = int_arg(&args[2])?;
    let stop = int_arg(&args[3])?;
    let Some(list) = list_of(ctx.db.lookup(&args[1], ctx.now_ms))? else {
        ctx.out.array(0);
        return Ok(());
    };
    match clamp_range(start, stop, list.len()) {
        None => ctx.out.array(0),
        Some((first, last)) => {
            ctx.out.array(last - first + 1);
            for element in list.range(first..=last) {
                ctx.out.bulk(element);
            }
        }
    }
    Ok(())
}

pub(super) fn llen(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let len = list_of(ctx.db.lookup(&args[1], ctx.now_ms))?.map_or(0, |list| list.len());
    ctx.out.integer(len as i64);
    Ok(())
}

pub(super) fn lindex(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let index = int_arg(&args[2])?;
    let Some(list) = list_of(ctx.db.lookup(&args[1], ctx.now_ms))? else {
        ctx.out.nil();
        return Ok(());
    };
    let len = list.len() as i64;
    let at = if index < 0 { len + index } else { index };
    match (0..len).contains(&at).then(|| &list[at as usize]) {
        Some(element) => ctx.out.bulk(element),
        None => ctx.out.nil(),
    }
    Ok(())
}
