//! The command table and the dispatcher.
//!
//! Each command is one [`Spec`] row: its name, Redis's arity (`n`: exactly
//! `n` words including the name; `-n`: at least `n`), its flags, the key
//! positions COMMAND reports, its group and summary (COMMAND DOCS), and its
//! handler. [`Server::execute`] looks the name up, checks the arity, applies
//! the `-OOM` gate to `denyoom` commands, runs the handler and turns a
//! handler's [`Error`] (or a reply that could not allocate) into Redis's
//! error line. Handlers validate everything before they write their reply,
//! so an error never follows a partial reply.

mod hashes;
mod keys;
mod lists;
mod server;
mod sets;
mod strings;
mod zsets;

use alloc::vec::Vec;

use crate::db::{Db, Entry, OutOfMemory, Value};
use crate::resp::{Args, Parsed, Reply, parse};

/// The command may modify the dataset.
pub const WRITE: u16 = 1 << 0;
/// The command only reads.
pub const READONLY: u16 = 1 << 1;
/// The command may grow memory use: refused above `maxmemory`.
pub const DENYOOM: u16 = 1 << 2;
/// The command is O(1) or O(log n).
pub const FAST: u16 = 1 << 3;
/// Connection/server management.
pub const ADMIN: u16 = 1 << 4;
/// Allowed while loading, served even when stale (connection commands).
pub const LOADING: u16 = 1 << 5;

const FLAG_NAMES: [(u16, &str); 6] = [
    (WRITE, "write"),
    (READONLY, "readonly"),
    (DENYOOM, "denyoom"),
    (ADMIN, "admin"),
    (LOADING, "loading"),
    (FAST, "fast"),
];

/// A handler: runs one command whose arity has been checked.
pub type Handler = fn(&mut Ctx<'_, '_>, &mut Args) -> Result<(), Error>;

/// One row of the command table.
pub struct Spec {
    /// Upper-case name.
    pub name: &'static str,
    /// Redis's arity: `n` exactly, `-n` at least (the name counts).
    pub arity: i32,
    /// Flag bits ([`WRITE`], [`DENYOOM`], …).
    pub flags: u16,
    /// Position of the first key, the last (negative: from the end) and the
    /// step between keys, as COMMAND reports them (0, 0, 0: no keys).
    pub keys: (i32, i32, i32),
    /// Redis's command group (COMMAND DOCS).
    pub group: &'static str,
    /// One line of documentation (COMMAND DOCS).
    pub summary: &'static str,
    /// The implementation.
    pub handler: Handler,
}

/// Every command, sorted by name (checked by a test): looked up by binary search.
#[rustfmt::skip]
pub static TABLE: &[Spec] = &[
    spec("APPEND", 3, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Appends a string to the value of a key.", strings::append),
    spec("CLIENT", -2, ADMIN | LOADING, (0, 0, 0), "connection", "SETNAME, GETNAME, SETINFO, ID, INFO.", server::client),
    spec("COMMAND", -1, LOADING, (0, 0, 0), "server", "Returns detailed information about all commands.", server::command),
    spec("CONFIG", -2, ADMIN | LOADING, (0, 0, 0), "server", "GET, SET, RESETSTAT.", server::config),
    spec("DBSIZE", 1, READONLY | FAST, (0, 0, 0), "server", "Returns the number of keys in the database.", server::dbsize),
    spec("DECR", 2, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Decrements the integer value of a key by one.", strings::decr),
    spec("DECRBY", 3, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Decrements a number from the integer value of a key.", strings::decrby),
    spec("DEL", -2, WRITE, (1, -1, 1), "generic", "Deletes one or more keys.", keys::del),
    spec("ECHO", 2, FAST | LOADING, (0, 0, 0), "connection", "Returns the given string.", server::echo),
    spec("EXISTS", -2, READONLY | FAST, (1, -1, 1), "generic", "Determines whether one or more keys exist.", keys::exists),
    spec("EXPIRE", -3, WRITE | FAST, (1, 1, 1), "generic", "Sets the expiration time of a key in seconds.", keys::expire),
    spec("FLUSHALL", -1, WRITE, (0, 0, 0), "server", "Removes all keys from all databases.", server::flushall),
    spec("FLUSHDB", -1, WRITE, (0, 0, 0), "server", "Remove all keys from the current database.", server::flushall),
    spec("GET", 2, READONLY | FAST, (1, 1, 1), "string", "Returns the string value of a key.", strings::get),
    spec("GETSET", 3, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Returns the previous string value of a key after setting it to a new value.", strings::getset),
    spec("HDEL", -3, WRITE | FAST, (1, 1, 1), "hash", "Deletes one or more fields and their values from a hash.", hashes::hdel),
    spec("HELLO", -1, FAST | LOADING, (0, 0, 0), "connection", "Handshakes with the Redis server (protocol 2 only).", server::hello),
    spec("HEXISTS", 3, READONLY | FAST, (1, 1, 1), "hash", "Determines whether a field exists in a hash.", hashes::hexists),
    spec("HGET", 3, READONLY | FAST, (1, 1, 1), "hash", "Returns the value of a field in a hash.", hashes::hget),
    spec("HGETALL", 2, READONLY, (1, 1, 1), "hash", "Returns all fields and values in a hash.", hashes::hgetall),
    spec("HINCRBY", 4, WRITE | DENYOOM | FAST, (1, 1, 1), "hash", "Increments the integer value of a field in a hash by a number.", hashes::hincrby),
    spec("HKEYS", 2, READONLY, (1, 1, 1), "hash", "Returns all fields in a hash.", hashes::hkeys),
    spec("HLEN", 2, READONLY | FAST, (1, 1, 1), "hash", "Returns the number of fields in a hash.", hashes::hlen),
    spec("HMGET", -3, READONLY | FAST, (1, 1, 1), "hash", "Returns the values of all fields in a hash.", hashes::hmget),
    spec("HMSET", -4, WRITE | DENYOOM | FAST, (1, 1, 1), "hash", "Sets the values of multiple fields.", hashes::hmset),
    spec("HSET", -4, WRITE | DENYOOM | FAST, (1, 1, 1), "hash", "Creates or modifies the value of a field in a hash.", hashes::hset),
    spec("HVALS", 2, READONLY, (1, 1, 1), "hash", "Returns all values in a hash.", hashes::hvals),
    spec("INCR", 2, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Increments the integer value of a key by one.", strings::incr),
    spec("INCRBY", 3, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Increments the integer value of a key by a number.", strings::incrby),
    spec("INFO", -1, LOADING, (0, 0, 0), "server", "Returns information and statistics about the server.", server::info),
    spec("KEYS", 2, READONLY, (0, 0, 0), "generic", "Returns all key names that match a pattern.", keys::keys),
    spec("LINDEX", 3, READONLY, (1, 1, 1), "list", "Returns an element from a list by its index.", lists::lindex),
    spec("LLEN", 2, READONLY | FAST, (1, 1, 1), "list", "Returns the length of a list.", lists::llen),
    spec("LPOP", -2, WRITE | FAST, (1, 1, 1), "list", "Returns the first elements in a list after removing it.", lists::lpop),
    spec("LPUSH", -3, WRITE | DENYOOM | FAST, (1, 1, 1), "list", "Prepends one or more elements to a list.", lists::lpush),
    spec("LRANGE", 4, READONLY, (1, 1, 1), "list", "Returns a range of elements from a list.", lists::lrange),
    spec("MGET", -2, READONLY | FAST, (1, -1, 1), "string", "Atomically returns the string values of one or more keys.", strings::mget),
    spec("MSET", -3, WRITE | DENYOOM, (1, -1, 2), "string", "Atomically creates or modifies the string values of one or more keys.", strings::mset),
    spec("PERSIST", 2, WRITE | FAST, (1, 1, 1), "generic", "Removes the expiration time of a key.", keys::persist),
    spec("PEXPIRE", -3, WRITE | FAST, (1, 1, 1), "generic", "Sets the expiration time of a key in milliseconds.", keys::pexpire),
    spec("PING", -1, FAST | LOADING, (0, 0, 0), "connection", "Returns the server's liveliness response.", server::ping),
    spec("PTTL", 2, READONLY | FAST, (1, 1, 1), "generic", "Returns the expiration time in milliseconds of a key.", keys::pttl),
    spec("QUIT", -1, FAST | LOADING, (0, 0, 0), "connection", "Closes the connection.", server::quit),
    spec("RPOP", -2, WRITE | FAST, (1, 1, 1), "list", "Returns and removes the last elements of a list.", lists::rpop),
    spec("RPUSH", -3, WRITE | DENYOOM | FAST, (1, 1, 1), "list", "Appends one or more elements to a list.", lists::rpush),
    spec("SADD", -3, WRITE | DENYOOM | FAST, (1, 1, 1), "set", "Adds one or more members to a set.", sets::sadd),
    spec("SCAN", -2, READONLY, (0, 0, 0), "generic", "Iterates over the key names in the database.", keys::scan),
    spec("SCARD", 2, READONLY | FAST, (1, 1, 1), "set", "Returns the number of members in a set.", sets::scard),
    spec("SELECT", 2, FAST | LOADING, (0, 0, 0), "connection", "Changes the selected database (only 0 exists).", server::select),
    spec("SET", -3, WRITE | DENYOOM, (1, 1, 1), "string", "Sets the string value of a key, ignoring its type.", strings::set),
    spec("SETNX", 3, WRITE | DENYOOM | FAST, (1, 1, 1), "string", "Set the string value of a key only when the key doesn't exist.", strings::setnx),
    spec("SISMEMBER", 3, READONLY | FAST, (1, 1, 1), "set", "Determines whether a member belongs to a set.", sets::sismember),
    spec("SMEMBERS", 2, READONLY, (1, 1, 1), "set", "Returns all members of a set.", sets::smembers),
    spec("SPOP", -2, WRITE | FAST, (1, 1, 1), "set", "Returns one or more random members from a set after removing them.", sets::spop),
    spec("SREM", -3, WRITE | FAST, (1, 1, 1), "set", "Removes one or more members from a set.", sets::srem),
    spec("STRLEN", 2, READONLY | FAST, (1, 1, 1), "string", "Returns the length of a string value.", strings::strlen),
    spec("TIME", 1, FAST | LOADING, (0, 0, 0), "server", "Returns the server time (the paravirtual clock).", server::time),
    spec("TTL", 2, READONLY | FAST, (1, 1, 1), "generic", "Returns the expiration time in seconds of a key.", keys::ttl),
    spec("TYPE", 2, READONLY | FAST, (1, 1, 1), "generic", "Determines the type of value stored at a key.", keys::type_),
    spec("UNLINK", -2, WRITE | FAST, (1, -1, 1), "generic", "Deletes one or more keys.", keys::del),
    spec("ZADD", -4, WRITE | DENYOOM | FAST, (1, 1, 1), "sorted-set", "Adds one or more members to a sorted set, or updates their scores.", zsets::zadd),
    spec("ZCARD", 2, READONLY | FAST, (1, 1, 1), "sorted-set", "Returns the number of members in a sorted set.", zsets::zcard),
    spec("ZINCRBY", 4, WRITE | DENYOOM | FAST, (1, 1, 1), "sorted-set", "Increments the score of a member in a sorted set.", zsets::zincrby),
    spec("ZPOPMAX", -2, WRITE | FAST, (1, 1, 1), "sorted-set", "Returns the highest-scoring members from a sorted set after removing them.", zsets::zpopmax),
    spec("ZPOPMIN", -2, WRITE | FAST, (1, 1, 1), "sorted-set", "Returns the lowest-scoring members from a sorted set after removing them.", zsets::zpopmin),
    spec("ZRANGE", -4, READONLY, (1, 1, 1), "sorted-set", "Returns members in a sorted set within a range of indexes.", zsets::zrange),
    spec("ZRANK", 3, READONLY | FAST, (1, 1, 1), "sorted-set", "Returns the index of a member in a sorted set ordered by ascending scores.", zsets::zrank),
    spec("ZREM", -3, WRITE | FAST, (1, 1, 1), "sorted-set", "Removes one or more members from a sorted set.", zsets::zrem),
    spec("ZSCORE", 3, READONLY | FAST, (1, 1, 1), "sorted-set", "Returns the score of a member in a sorted set.", zsets::zscore),
];

#[allow(clippy::too_many_arguments)]
const fn spec(
    name: &'static str,
    arity: i32,
    flags: u16,
    keys: (i32, i32, i32),
    group: &'static str,
    summary: &'static str,
    handler: Handler,
) -> Spec {
    Spec {
        name,
        arity,
        flags,
        keys,
        group,
        summary,
        handler,
    }
}

/// Finds `name` (any case) in [`TABLE`].
pub fn lookup(name: &[u8]) -> Option<&'static Spec> {
    let mut upper = [0u8; 16];
    if name.len() > upper.len() {
        return None;
    }
    for (slot, byte) in upper.iter_mut().zip(name) {
        *slot = byte.to_ascii_uppercase();
    }
    let upper = &upper[..name.len()];
    TABLE
        .binary_search_by(|spec| spec.name.as_bytes().cmp(upper))
        .ok()
        .map(|at| &TABLE[at])
}

/// Why a command failed; each maps to Redis's own error line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The key holds another type.
    WrongType,
    /// An argument or value is not a 64-bit integer.
    NotInteger,
    /// An argument or value is not a double.
    NotFloat,
    /// INCR and friends would overflow.
    Overflow,
    /// Options that do not parse.
    Syntax,
    /// An allocation failed.
    OutOfMemory,
    /// An expire time that is negative or overflows; names the command.
    InvalidExpire(&'static str),
    /// SELECT of a database other than 0.
    DbIndex,
    /// A count that must not be negative.
    NotPositive,
    /// A score computation produced NaN.
    Nan,
    /// Any other error, the whole line (`ERR …`).
    Other(&'static str),
    /// The handler wrote its own error line (one with variable text) and
    /// nothing before it.
    Written,
}

/// Redis's reply for a command refused above `maxmemory`.
pub const OOM_MESSAGE: &str = "OOM command not allowed when used memory > 'maxmemory'.";

impl From<OutOfMemory> for Error {
    fn from(_: OutOfMemory) -> Self {
        Self::OutOfMemory
    }
}

impl Error {
    fn write(self, out: &mut Reply<'_>) {
        match self {
            Self::WrongType => {
                out.error("WRONGTYPE Operation against a key holding the wrong kind of value")
            }
            Self::NotInteger => out.error("ERR value is not an integer or out of range"),
            Self::NotFloat => out.error("ERR value is not a valid float"),
            Self::Overflow => out.error("ERR increment or decrement would overflow"),
            Self::Syntax => out.error("ERR syntax error"),
            Self::OutOfMemory => out.error(OOM_MESSAGE),
            Self::InvalidExpire(name) => {
                out.error_parts(&["ERR invalid expire time in '", name, "' command"])
            }
            Self::DbIndex => out.error("ERR DB index is out of range"),
            Self::NotPositive => out.error("ERR value is out of range, must be positive"),
            Self::Nan => out.error("ERR resulting score is not a number (NaN)"),
            Self::Other(line) => out.error(line),
            Self::Written => {}
        }
    }
}

/// What the connection should do after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Close once the reply is sent (QUIT, protocol errors).
    Close,
}

/// Settings fixed when the store starts.
#[derive(Clone, Copy)]
pub struct Config {
    /// Bytes of memory use above which `denyoom` commands are refused.
    pub maxmemory: usize,
    /// Reports the memory in use now (the guest: its heap's figure).
    pub used_memory: fn() -> usize,
    /// Most simultaneous connections (INFO's `maxclients`).
    pub maxclients: usize,
    /// The TCP port (INFO's `tcp_port`).
    pub port: u16,
    /// Seed of the pseudo-random generator (SPOP picks).
    pub seed: u64,
}

/// Counters INFO reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections refused because every slot was busy.
    pub rejected_connections: u64,
    /// Commands executed.
    pub commands: u64,
    /// Commands refused with -OOM.
    pub oom_rejections: u64,
}

/// One connection's state.
#[derive(Debug, Default)]
pub struct Client {
    id: u64,
    name: Vec<u8>,
    lib_name: Vec<u8>,
    lib_ver: Vec<u8>,
    connected_at_ms: u64,
}

impl Client {
    /// The client's id (CLIENT ID).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// The store and its server-wide state.
pub struct Server {
    db: Db,
    config: Config,
    stats: Stats,
    rng: u64,
    next_client_id: u64,
    connected: usize,
    start_ms: u64,
    /// Write commands executed since the last [`Server::take_aof`], as the
    /// request bytes that carried them, while the append-only log is on.
    aof: Option<Vec<u8>>,
}

/// What a handler sees.
pub struct Ctx<'s, 'o> {
    /// The keyspace.
    pub db: &'s mut Db,
    /// The connection running the command.
    pub client: &'s mut Client,
    /// Where the reply goes.
    pub out: &'s mut Reply<'o>,
    /// The time, in ms.
    pub now_ms: u64,
    /// Server-wide state other than the keyspace.
    pub server: ServerView<'s>,
    /// What the connection does after the command.
    pub after: After,
}

/// The parts of [`Server`] handlers other than the keyspace may use.
pub struct ServerView<'s> {
    /// Settings.
    pub config: &'s Config,
    /// Counters.
    pub stats: &'s mut Stats,
    /// The pseudo-random generator's state.
    pub rng: &'s mut u64,
    /// Open connections.
    pub connected: usize,
    /// When the store started, in ms.
    pub start_ms: u64,
}

impl ServerView<'_> {
    /// The next pseudo-random number (xorshift64*: deterministic).
    pub fn random(&mut self) -> u64 {
        let mut x = *self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Keys examined per call of [`Server::sweep_expired`].
pub const SWEEP_BUDGET: usize = 64;

impl Server {
    /// An empty store started at `now_ms`.
    pub fn new(config: Config, now_ms: u64) -> Self {
        Self {
            db: Db::default(),
            config,
            stats: Stats::default(),
            rng: config.seed | 1,
            next_client_id: 1,
            connected: 0,
            start_ms: now_ms,
            aof: None,
        }
    }

    /// The keyspace (for tests and the guest's banner).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A new connection.
    pub fn connect(&mut self, now_ms: u64) -> Client {
        self.stats.connections += 1;
        self.connected += 1;
        let id = self.next_client_id;
        self.next_client_id += 1;
        Client {
            id,
            connected_at_ms: now_ms,
            ..Client::default()
        }
    }

    /// A connection closed.
    pub fn disconnect(&mut self, client: Client) {
        drop(client);
        self.connected = self.connected.saturating_sub(1);
    }

    /// A connection refused for want of a free slot.
    pub fn reject_connection(&mut self) {
        self.stats.rejected_connections += 1;
    }

    /// Starts (or stops) collecting the append-only log: every write
    /// command that succeeds is kept as the request bytes that carried it,
    /// for the caller to make durable (with [`Self::take_aof`]) before it
    /// sends the replies. Replaying the bytes through [`Self::serve`] at
    /// boot rebuilds the keyspace (relative expiries restart from the
    /// reload, and SPOP picks from the new seed, unlike Redis's rewritten
    /// AOF).
    pub fn set_aof(&mut self, on: bool) {
        self.aof = on.then(Vec::new);
    }

    /// The write commands collected since the last call (empty when the
    /// append-only log is off).
    pub fn take_aof(&mut self) -> Vec<u8> {
        match self.aof.as_mut() {
            Some(aof) => core::mem::take(aof),
            None => Vec::new(),
        }
    }

    /// Removes keys past their deadline, a bounded number per call.
    pub fn sweep_expired(&mut self, now_ms: u64) -> usize {
        self.db.sweep_expired(now_ms, SWEEP_BUDGET)
    }

    /// Parses and executes every whole request at the front of `input`,
    /// appending the replies to `out`, until the input runs out, a request
    /// asks to close, or `out` holds more than `output_limit` bytes
    /// (back-pressure: the rest waits for the output to drain). Returns the
    /// bytes used and what the connection should do.
    pub fn serve(
        &mut self,
        client: &mut Client,
        input: &[u8],
        now_ms: u64,
        out: &mut Vec<u8>,
        output_limit: usize,
    ) -> (usize, After) {
        let mut used = 0;
        while out.len() <= output_limit {
            match parse(&input[used..]) {
                Parsed::Incomplete => break,
                Parsed::Request(args, consumed) => {
                    let request = used..used + consumed;
                    used += consumed;
                    let logged = self.aof.is_some()
                        && args
                            .first()
                            .and_then(|name| lookup(name))
                            .is_some_and(|spec| spec.flags & WRITE != 0);
                    let reply_at = out.len();
                    let after = self.execute(client, args, now_ms, out);
                    if logged
                        && out.get(reply_at) != Some(&b'-')
                        && let Some(aof) = self.aof.as_mut()
                    {
                        aof.extend_from_slice(&input[request]);
                    }
                    if after == After::Close {
                        return (used, After::Close);
                    }
                }
                Parsed::OutOfMemory(consumed) => {
                    used += consumed;
                    self.stats.oom_rejections += 1;
                    // The message itself must fit: reserve it before anything.
                    let _ = out.try_reserve(OOM_MESSAGE.len() + 3);
                    Reply::new(out).error(OOM_MESSAGE);
                }
                Parsed::Error(error) => {
                    error.write(&mut Reply::new(out));
                    return (used, After::Close);
                }
            }
        }
        (used, After::Continue)
    }

    /// Executes one request, appending its reply to `out`.
    pub fn execute(
        &mut self,
        client: &mut Client,
        mut args: Args,
        now_ms: u64,
        out: &mut Vec<u8>,
    ) -> After {
        let Some(name) = args.first() else {
            return After::Continue; // an empty request: Redis ignores it
        };
        let start = out.len();
        let mut reply = Reply::new(out);
        let Some(spec) = lookup(name) else {
            unknown_command(&mut reply, &args);
            return self.finish(reply, start, After::Continue);
        };
        self.stats.commands += 1;
        let count = args.len() as i32;
        if (spec.arity > 0 && count != spec.arity) || (spec.arity < 0 && count < -spec.arity) {
            arity_error(&mut reply, spec.name, None);
            return self.finish(reply, start, After::Continue);
        }
        if spec.flags & DENYOOM != 0 && (self.config.used_memory)() > self.config.maxmemory {
            self.stats.oom_rejections += 1;
            reply.error(OOM_MESSAGE);
            return self.finish(reply, start, After::Continue);
        }
        let mut ctx = Ctx {
            db: &mut self.db,
            client,
            out: &mut reply,
            now_ms,
            server: ServerView {
                config: &self.config,
                stats: &mut self.stats,
                rng: &mut self.rng,
                connected: self.connected,
                start_ms: self.start_ms,
            },
            after: After::Continue,
        };
        let result = (spec.handler)(&mut ctx, &mut args);
        let after = ctx.after;
        if let Err(error) = result
            && error != Error::Written
        {
            reply.truncate(start);
            if error == Error::OutOfMemory {
                self.stats.oom_rejections += 1;
            }
            error.write(&mut reply);
        }
        self.finish(reply, start, after)
    }

    fn finish(&mut self, mut reply: Reply<'_>, start: usize, after: After) -> After {
        if reply.failed() {
            // The reply did not fit in memory: say so instead (small enough
            // to fit in what the partial reply had taken).
            self.stats.oom_rejections += 1;
            reply.truncate(start);
            reply.error(OOM_MESSAGE);
        }
        after
    }
}

/// `ERR unknown command 'x', with args beginning with: 'a' 'b' ` (Redis 7.0).
fn unknown_command(out: &mut Reply<'_>, args: &Args) {
    let name = &args[0][..args[0].len().min(128)];
    out.raw(&[b"-ERR unknown command '"]);
    raw_line(out, name);
    out.raw(&[b"', with args beginning with: "]);
    let mut shown = 0;
    for arg in &args[1..] {
        if shown >= 128 {
            break;
        }
        let take = arg.len().min(128 - shown);
        out.raw(&[b"'"]);
        raw_line(out, &arg[..take]);
        out.raw(&[b"' "]);
        shown += take + 3;
    }
    out.raw(&[b"\r\n"]);
}

/// Bytes inside an error line, with CR and LF turned into spaces.
fn raw_line(out: &mut Reply<'_>, bytes: &[u8]) {
    for chunk in bytes.split_inclusive(|&b| b == b'\r' || b == b'\n') {
        match chunk.split_last() {
            Some((b'\r' | b'\n', body)) => out.raw(&[body, b" "]),
            _ => out.raw(&[chunk]),
        }
    }
}

/// `ERR wrong number of arguments for 'get' command` (or `'client|setname'`).
fn arity_error(out: &mut Reply<'_>, name: &str, sub: Option<&str>) {
    let mut lower = [0u8; 40];
    let mut len = 0;
    for byte in name.bytes().chain(
        sub.into_iter()
            .flat_map(|sub| core::iter::once(b'|').chain(sub.bytes())),
    ) {
        if len < lower.len() {
            lower[len] = byte.to_ascii_lowercase();
            len += 1;
        }
    }
    out.raw(&[
        b"-ERR wrong number of arguments for '",
        &lower[..len],
        b"' command\r\n",
    ]);
}

/// `ERR unknown subcommand 'x'. Try CLIENT HELP.`
fn unknown_subcommand(out: &mut Reply<'_>, sub: &[u8], parent: &str) {
    out.raw(&[b"-ERR unknown subcommand '"]);
    raw_line(out, &sub[..sub.len().min(128)]);
    out.raw(&[b"'. Try ", parent.as_bytes(), b" HELP.\r\n"]);
}

/// Parses an integer argument.
fn int_arg(arg: &[u8]) -> Result<i64, Error> {
    crate::resp::parse_i64(arg).ok_or(Error::NotInteger)
}

/// Takes the argument at `index`, leaving an empty one behind.
fn take(args: &mut Args, index: usize) -> Vec<u8> {
    core::mem::take(&mut args[index])
}

/// The value at a live key if it is a string; `Err(WrongType)` otherwise.
fn string_of(entry: Option<&mut Entry>) -> Result<Option<&mut Vec<u8>>, Error> {
    match entry {
        None => Ok(None),
        Some(Entry {
            value: Value::Str(bytes),
            ..
        }) => Ok(Some(bytes)),
        Some(_) => Err(Error::WrongType),
    }
}

/// Clamps Redis-style start/stop indexes (negative from the end) to a
/// range of `len` items; `None` if empty.
fn clamp_range(start: i64, stop: i64, len: usize) -> Option<(usize, usize)> {
    let len = len as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let stop = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    if start > stop || start >= len {
        None
    } else {
        Some((start as usize, stop as usize))
    }
}
