//! Connection and server commands: PING, ECHO, QUIT, SELECT, HELLO,
//! CLIENT, COMMAND, INFO, CONFIG, DBSIZE, FLUSHALL/FLUSHDB, TIME.

use alloc::vec::Vec;
use core::fmt::Write;

use super::{
    ADMIN, After, Ctx, Error, FAST, FLAG_NAMES, READONLY, Spec, TABLE, WRITE, arity_error, lookup,
    raw_line, unknown_subcommand,
};
use crate::glob;
use crate::resp::Args;

/// The Redis version this subset follows (replies and error texts of 7.0).
pub const REDIS_VERSION: &str = "7.0.0";

pub(super) fn ping(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match args.len() {
        1 => ctx.out.simple("PONG"),
        2 => ctx.out.bulk(&args[1]),
        _ => {
            arity_error(ctx.out, "ping", None);
            return Err(Error::Written);
        }
    }
    Ok(())
}

pub(super) fn echo(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    ctx.out.bulk(&args[1]);
    Ok(())
}

pub(super) fn quit(ctx: &mut Ctx<'_, '_>, _args: &mut Args) -> Result<(), Error> {
    ctx.out.ok();
    ctx.after = After::Close;
    Ok(())
}

pub(super) fn select(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match super::int_arg(&args[1])? {
        0 => ctx.out.ok(),
        _ => return Err(Error::DbIndex),
    }
    Ok(())
}

pub(super) fn dbsize(ctx: &mut Ctx<'_, '_>, _args: &mut Args) -> Result<(), Error> {
    // As in Redis: keys past their deadline count until they are removed.
    ctx.out.integer(ctx.db.len() as i64);
    Ok(())
}

pub(super) fn flushall(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    match args.len() {
        1 => {}
        2 if args[1].eq_ignore_ascii_case(b"SYNC") || args[1].eq_ignore_ascii_case(b"ASYNC") => {}
        _ => return Err(Error::Syntax),
    }
    ctx.db.clear();
    ctx.out.ok();
    Ok(())
}

pub(super) fn time(ctx: &mut Ctx<'_, '_>, _args: &mut Args) -> Result<(), Error> {
    ctx.out.array(2);
    ctx.out.bulk_i64((ctx.now_ms / 1000) as i64);
    ctx.out.bulk_i64(((ctx.now_ms % 1000) * 1000) as i64);
    Ok(())
}

/// Client names: printable ASCII without spaces, as Redis requires.
fn valid_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn copy(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    super::strings::copy(bytes)
}

pub(super) fn hello(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    if args.len() >= 2 {
        let version = super::int_arg(&args[1])
            .map_err(|_| Error::Other("ERR Protocol version is not an integer or out of range"))?;
        if version != 2 {
            return Err(Error::Other("NOPROTO unsupported protocol version"));
        }
    }
    let mut at = 2;
    let mut name = None;
    while at < args.len() {
        let more = args.len() - at - 1;
        if args[at].eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            // No users or passwords here: `default` with any password, as
            // a Redis server without requirepass accepts.
            if !args[at + 1].eq_ignore_ascii_case(b"default") {
                return Err(Error::Other(
                    "WRONGPASS invalid username-password pair or user is disabled.",
                ));
            }
            at += 3;
        } else if args[at].eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            if !valid_name(&args[at + 1]) {
                return Err(Error::Other(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            name = Some(at + 1);
            at += 2;
        } else {
            ctx.out.raw(&[b"-ERR Syntax error in HELLO option '"]);
            raw_line(ctx.out, &args[at]);
            ctx.out.raw(&[b"'\r\n"]);
            return Err(Error::Written);
        }
    }
    if let Some(at) = name {
        ctx.client.name = copy(&args[at])?;
    }
    ctx.out.array(14);
    for (field, value) in [("server", "redis"), ("version", REDIS_VERSION)] {
        ctx.out.bulk(field.as_bytes());
        ctx.out.bulk(value.as_bytes());
    }
    ctx.out.bulk(b"proto");
    ctx.out.integer(2);
    ctx.out.bulk(b"id");
    ctx.out.integer(ctx.client.id as i64);
    for (field, value) in [("mode", "standalone"), ("role", "master")] {
        ctx.out.bulk(field.as_bytes());
        ctx.out.bulk(value.as_bytes());
    }
    ctx.out.bulk(b"modules");
    ctx.out.array(0);
    Ok(())
}

pub(super) fn client(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let sub = args[1].to_ascii_uppercase();
    let want = |n: usize, ctx: &mut Ctx<'_, '_>, name: &str| {
        if args.len() == n {
            Ok(())
        } else {
            arity_error(ctx.out, "client", Some(name));
            Err(Error::Written)
        }
    };
    match sub.as_slice() {
        b"SETNAME" => {
            want(3, ctx, "setname")?;
            if !valid_name(&args[2]) {
                return Err(Error::Other(
                    "ERR Client names cannot contain spaces, newlines or special characters.",
                ));
            }
            ctx.client.name = copy(&args[2])?;
            ctx.out.ok();
        }
        b"GETNAME" => {
            want(2, ctx, "getname")?;
            if ctx.client.name.is_empty() {
                ctx.out.nil();
            } else {
                ctx.out.bulk(&ctx.client.name);
            }
        }
        b"ID" => {
            want(2, ctx, "id")?;
            ctx.out.integer(ctx.client.id as i64);
        }
        b"SETINFO" => {
            want(4, ctx, "setinfo")?;
            let value = &args[3];
            if !valid_name(value) {
                return Err(Error::Other(
                    "ERR lib-name and lib-ver cannot contain spaces, newlines or special characters.",
                ));
            }
            if args[2].eq_ignore_ascii_case(b"LIB-NAME") {
                ctx.client.lib_name = copy(value)?;
            } else if args[2].eq_ignore_ascii_case(b"LIB-VER") {
                ctx.client.lib_ver = copy(value)?;
            } else {
                ctx.out.raw(&[b"-ERR Unrecognized option '"]);
                raw_line(ctx.out, &args[2]);
                ctx.out.raw(&[b"'\r\n"]);
                return Err(Error::Written);
            }
            ctx.out.ok();
        }
        b"INFO" => {
            want(2, ctx, "info")?;
            let mut text = Text::default();
            client_line(ctx, &mut text);
            ctx.out.bulk(&text.finish()?);
        }
        b"LIST" => {
            // Only this connection's line: the store does not see the others.
            let mut text = Text::default();
            client_line(ctx, &mut text);
            ctx.out.bulk(&text.finish()?);
        }
        b"HELP" => {
            let lines = [
                "CLIENT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                "GETNAME",
                "SETNAME <name>",
                "SETINFO <LIB-NAME|LIB-VER> <value>",
                "ID",
                "INFO",
                "LIST (this connection only)",
                "HELP",
            ];
            ctx.out.array(lines.len());
            for line in lines {
                ctx.out.simple(line);
            }
        }
        _ => {
            unknown_subcommand(ctx.out, &args[1], "CLIENT");
            return Err(Error::Written);
        }
    }
    Ok(())
}

fn client_line(ctx: &Ctx<'_, '_>, text: &mut Text) {
    let client = &ctx.client;
    let age = ctx.now_ms.saturating_sub(client.connected_at_ms) / 1000;
    let _ = write!(text, "id={} name=", client.id);
    text.bytes(&client.name);
    let _ = write!(text, " age={age} idle=0 flags=N db=0 resp=2 lib-name=");
    text.bytes(&client.lib_name);
    text.bytes(b" lib-ver=");
    text.bytes(&client.lib_ver);
    text.bytes(b"\n");
}

/// A growing text whose writes are fallible.
#[derive(Default)]
struct Text {
    bytes: Vec<u8>,
    failed: bool,
}

impl Text {
    fn bytes(&mut self, bytes: &[u8]) {
        if self.bytes.try_reserve(bytes.len()).is_err() {
            self.failed = true;
        } else {
            self.bytes.extend_from_slice(bytes);
        }
    }

    fn finish(self) -> Result<Vec<u8>, Error> {
        if self.failed {
            Err(Error::OutOfMemory)
        } else {
            Ok(self.bytes)
        }
    }
}

impl Write for Text {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        self.bytes(text.as_bytes());
        Ok(())
    }
}

fn lowercase_name(spec: &Spec) -> ([u8; 16], usize) {
    let mut name = [0u8; 16];
    for (slot, byte) in name.iter_mut().zip(spec.name.bytes()) {
        *slot = byte.to_ascii_lowercase();
    }
    (name, spec.name.len())
}

/// One COMMAND / COMMAND INFO entry, Redis 7's 10-element form.
fn command_entry(ctx: &mut Ctx<'_, '_>, spec: &Spec) {
    let (name, len) = lowercase_name(spec);
    ctx.out.array(10);
    ctx.out.bulk(&name[..len]);
    ctx.out.integer(i64::from(spec.arity));
    let flags = FLAG_NAMES.iter().filter(|(bit, _)| spec.flags & bit != 0);
    ctx.out.array(flags.clone().count());
    for (_, flag) in flags {
        ctx.out.simple(flag);
    }
    ctx.out.integer(i64::from(spec.keys.0));
    ctx.out.integer(i64::from(spec.keys.1));
    ctx.out.integer(i64::from(spec.keys.2));
    let mut categories: [&str; 4] = ["", "", "", ""];
    let mut count = 0;
    for (bit, category) in [
        (WRITE, "@write"),
        (READONLY, "@read"),
        (FAST, "@fast"),
        (ADMIN, "@admin"),
    ] {
        if spec.flags & bit != 0 {
            categories[count] = category;
            count += 1;
        }
    }
    ctx.out.array(count);
    for category in &categories[..count] {
        ctx.out.simple(category);
    }
    // Tips, key specifications, subcommands: none described.
    ctx.out.array(0);
    ctx.out.array(0);
    ctx.out.array(0);
}

pub(super) fn command(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    if args.len() == 1 {
        ctx.out.array(TABLE.len());
        for spec in TABLE {
            command_entry(ctx, spec);
        }
        return Ok(());
    }
    let sub = args[1].to_ascii_uppercase();
    match sub.as_slice() {
        b"COUNT" => ctx.out.integer(TABLE.len() as i64),
        b"INFO" => {
            if args.len() == 2 {
                ctx.out.array(TABLE.len());
                for spec in TABLE {
                    command_entry(ctx, spec);
                }
            } else {
                ctx.out.array(args.len() - 2);
                for name in &args[2..] {
                    match lookup(name) {
                        Some(spec) => command_entry(ctx, spec),
                        None => ctx.out.nil_array(),
                    }
                }
            }
        }
        b"DOCS" => {
            let specs = |name: &[u8]| lookup(name);
            let chosen: Vec<&Spec> = if args.len() == 2 {
                TABLE.iter().collect()
            } else {
                args[2..].iter().filter_map(|name| specs(name)).collect()
            };
            ctx.out.array(chosen.len() * 2);
            for spec in chosen {
                let (name, len) = lowercase_name(spec);
                ctx.out.bulk(&name[..len]);
                ctx.out.array(4);
                ctx.out.bulk(b"summary");
                ctx.out.bulk(spec.summary.as_bytes());
                ctx.out.bulk(b"group");
                ctx.out.bulk(spec.group.as_bytes());
            }
        }
        b"LIST" => {
            ctx.out.array(TABLE.len());
            for spec in TABLE {
                let (name, len) = lowercase_name(spec);
                ctx.out.bulk(&name[..len]);
            }
        }
        _ => {
            unknown_subcommand(ctx.out, &args[1], "COMMAND");
            return Err(Error::Written);
        }
    }
    Ok(())
}

/// The CONFIG parameters GET reports (none can be SET).
fn config_values(ctx: &Ctx<'_, '_>) -> [(&'static str, u64, &'static str); 7] {
    let config = ctx.server.config;
    [
        ("appendonly", 0, "no"),
        ("databases", 1, ""),
        ("maxclients", config.maxclients as u64, ""),
        ("maxmemory", config.maxmemory as u64, ""),
        ("maxmemory-policy", 0, "noeviction"),
        ("port", u64::from(config.port), ""),
        ("save", 0, ""),
    ]
}

pub(super) fn config(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    let sub = args[1].to_ascii_uppercase();
    match sub.as_slice() {
        b"GET" => {
            if args.len() < 3 {
                arity_error(ctx.out, "config", Some("get"));
                return Err(Error::Written);
            }
            let values = config_values(ctx);
            let chosen = |name: &str| {
                args[2..]
                    .iter()
                    .any(|pattern| glob::matches(&pattern.to_ascii_lowercase(), name.as_bytes()))
            };
            let count = values.iter().filter(|(name, _, _)| chosen(name)).count();
            ctx.out.array(count * 2);
            for (name, number, text) in values {
                if chosen(name) {
                    ctx.out.bulk(name.as_bytes());
                    if text.is_empty() && !matches!(name, "save") {
                        ctx.out.bulk_i64(number as i64);
                    } else {
                        ctx.out.bulk(text.as_bytes());
                    }
                }
            }
        }
        b"SET" => {
            if args.len() < 4 {
                arity_error(ctx.out, "config", Some("set"));
                return Err(Error::Written);
            }
            ctx.out
                .raw(&[b"-ERR Unknown option or number of arguments for CONFIG SET - '"]);
            raw_line(ctx.out, &args[2]);
            ctx.out.raw(&[b"'\r\n"]);
            return Err(Error::Written);
        }
        b"RESETSTAT" => {
            *ctx.server.stats = super::Stats::default();
            ctx.db.stats = crate::db::DbStats::default();
            ctx.out.ok();
        }
        _ => {
            unknown_subcommand(ctx.out, &args[1], "CONFIG");
            return Err(Error::Written);
        }
    }
    Ok(())
}

fn human(text: &mut Text, bytes: u64) {
    let value = bytes as f64;
    let _ = if value >= (1 << 30) as f64 {
        write!(text, "{:.2}G", value / (1u64 << 30) as f64)
    } else if value >= (1 << 20) as f64 {
        write!(text, "{:.2}M", value / (1u64 << 20) as f64)
    } else if value >= 1024.0 {
        write!(text, "{:.2}K", value / 1024.0)
    } else {
        write!(text, "{bytes}B")
    };
}

pub(super) fn info(ctx: &mut Ctx<'_, '_>, args: &mut Args) -> Result<(), Error> {
    const SECTIONS: [&str; 7] = [
        "server",
        "clients",
        "memory",
        "persistence",
        "stats",
        "replication",
        "keyspace",
    ];
    let everything = args.len() == 1
        || args[1..].iter().any(|a| {
            a.eq_ignore_ascii_case(b"all")
                || a.eq_ignore_ascii_case(b"default")
                || a.eq_ignore_ascii_case(b"everything")
        });
    let wanted = |section: &str| {
        everything
            || args[1..]
                .iter()
                .any(|a| a.eq_ignore_ascii_case(section.as_bytes()))
    };
    let now = ctx.now_ms;
    let config = *ctx.server.config;
    let used = (config.used_memory)();
    let mut text = Text::default();
    let mut first = true;
    for section in SECTIONS {
        if !wanted(section) {
            continue;
        }
        if !first {
            text.bytes(b"\r\n");
        }
        first = false;
        match section {
            "server" => {
                let uptime = now.saturating_sub(ctx.server.start_ms) / 1000;
                let _ = write!(
                    text,
                    "# Server\r\nredis_version:{REDIS_VERSION}\r\nredis_mode:standalone\r\n\
                     server_name:lockstep\r\nos:lockstep net guest (no_std, smoltcp)\r\n\
                     arch_bits:64\r\nmultiplexing_api:poll\r\nprocess_id:1\r\n\
                     tcp_port:{}\r\nuptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\
                     clock:paravirtual (logged; expiry replays exactly)\r\n",
                    config.port,
                    uptime / 86_400
                );
            }
            "clients" => {
                let _ = write!(
                    text,
                    "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\n",
                    ctx.server.connected, config.maxclients
                );
            }
            "memory" => {
                let _ = write!(text, "# Memory\r\nused_memory:{used}\r\nused_memory_human:");
                human(&mut text, used as u64);
                let _ = write!(
                    text,
                    "\r\nmaxmemory:{}\r\nmaxmemory_human:",
                    config.maxmemory
                );
                human(&mut text, config.maxmemory as u64);
                let _ = write!(text, "\r\nmaxmemory_policy:noeviction\r\n");
            }
            "persistence" => {
                let _ = write!(
                    text,
                    "# Persistence\r\nloading:0\r\nrdb_bgsave_in_progress:0\r\naof_enabled:0\r\n"
                );
            }
            "stats" => {
                let stats = *ctx.server.stats;
                let db = ctx.db.stats;
                let _ = write!(
                    text,
                    "# Stats\r\ntotal_connections_received:{}\r\ntotal_commands_processed:{}\r\n\
                     rejected_connections:{}\r\nexpired_keys:{}\r\nevicted_keys:0\r\n\
                     keyspace_hits:{}\r\nkeyspace_misses:{}\r\noom_rejections:{}\r\n",
                    stats.connections,
                    stats.commands,
                    stats.rejected_connections,
                    db.expired_keys,
                    db.hits,
                    db.misses,
                    stats.oom_rejections
                );
            }
            "replication" => {
                let _ = write!(
                    text,
                    "# Replication\r\nrole:master\r\nconnected_slaves:0\r\n"
                );
            }
            _ => {
                let _ = write!(text, "# Keyspace\r\n");
                if !ctx.db.is_empty() {
                    let _ = write!(
                        text,
                        "db0:keys={},expires={},avg_ttl={}\r\n",
                        ctx.db.len(),
                        ctx.db.volatile(),
                        ctx.db.average_ttl(now)
                    );
                }
            }
        }
    }
    let text = text.finish()?;
    ctx.out.bulk(&text);
    Ok(())
}
