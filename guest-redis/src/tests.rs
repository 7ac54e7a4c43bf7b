//! Whole-store tests: request bytes in, reply bytes out. The expected
//! replies are Redis 7.0.15's (checked against Debian's `redis-server`; the
//! integration test `lockstep/tests/redis.rs` compares the running guest
//! with a real server byte for byte).

use std::cell::Cell;
use std::string::String;
use std::vec::Vec;

use crate::commands::{After, Config, DENYOOM, Server, TABLE, WRITE, lookup};

std::thread_local! {
    static USED: Cell<usize> = const { Cell::new(0) };
}

fn used() -> usize {
    USED.with(Cell::get)
}

fn server() -> Server {
    USED.with(|used| used.set(0));
    Server::new(
        Config {
            maxmemory: 1000,
            used_memory: used,
            maxclients: 100,
            port: 6379,
            seed: 42,
        },
        1_000_000,
    )
}

/// Sends `words` as one multibulk request at `now_ms`; returns the reply.
fn run(server: &mut Server, client: &mut crate::Client, now_ms: u64, words: &[&str]) -> String {
    let mut request = std::format!("*{}\r\n", words.len());
    for word in words {
        request.push_str(&std::format!("${}\r\n{word}\r\n", word.len()));
    }
    let mut out = Vec::new();
    let (used, after) = server.serve(client, request.as_bytes(), now_ms, &mut out, 1 << 20);
    assert_eq!(used, request.len(), "{words:?} consumed whole");
    assert_eq!(after, After::Continue, "{words:?}");
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a script of (request, expected reply) pairs at one time.
fn script(server: &mut Server, steps: &[(&str, &str)]) {
    let mut client = server.connect(0);
    for (request, expected) in steps {
        let words: Vec<&str> = request.split(' ').collect();
        let reply = run(server, &mut client, 1_000_000, &words);
        assert_eq!(reply, *expected, "reply to {request}");
    }
}

const WRONGTYPE: &str = "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
const NOT_INT: &str = "-ERR value is not an integer or out of range\r\n";

#[test]
fn the_table_is_sorted_and_lookup_ignores_case() {
    for pair in TABLE.windows(2) {
        assert!(
            pair[0].name < pair[1].name,
            "{} before {}",
            pair[0].name,
            pair[1].name
        );
    }
    assert_eq!(lookup(b"get").map(|s| s.name), Some("GET"));
    assert_eq!(lookup(b"ZpOpMiN").map(|s| s.name), Some("ZPOPMIN"));
    assert!(lookup(b"NOSUCHCOMMAND").is_none());
    for spec in TABLE {
        assert!(spec.name.len() <= 16, "{}", spec.name);
        if spec.flags & DENYOOM != 0 {
            assert!(
                spec.flags & WRITE != 0,
                "{} denyoom but not write",
                spec.name
            );
        }
    }
}

#[test]
fn strings_reply_like_redis() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("SET k v", "+OK\r\n"),
            ("GET k", "$1\r\nv\r\n"),
            ("GET missing", "$-1\r\n"),
            ("SET k w NX", "$-1\r\n"),
            ("SET k w XX GET", "$1\r\nv\r\n"),
            ("SET k w NX XX", "-ERR syntax error\r\n"),
            (
                "SET k w EX 0",
                "-ERR invalid expire time in 'set' command\r\n",
            ),
            ("SET k w EX x", NOT_INT),
            ("SETNX k z", ":0\r\n"),
            ("SETNX k2 z", ":1\r\n"),
            ("GETSET k2 y", "$1\r\nz\r\n"),
            ("APPEND k2 yy", ":3\r\n"),
            ("STRLEN k2", ":3\r\n"),
            ("STRLEN nope", ":0\r\n"),
            ("MSET a 1 b 2", "+OK\r\n"),
            (
                "MSET a 1 b",
                "-ERR wrong number of arguments for 'mset' command\r\n",
            ),
            ("MGET a b nope", "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"),
            ("INCR a", ":2\r\n"),
            ("INCRBY a 10", ":12\r\n"),
            ("DECRBY a 2", ":10\r\n"),
            ("DECR a", ":9\r\n"),
            ("INCR k", NOT_INT),
            ("INCRBY a x", NOT_INT),
            ("SET big 9223372036854775807", "+OK\r\n"),
            ("INCR big", "-ERR increment or decrement would overflow\r\n"),
            (
                "GET",
                "-ERR wrong number of arguments for 'get' command\r\n",
            ),
            ("LPUSH l x", ":1\r\n"),
            ("GET l", WRONGTYPE),
            ("APPEND l x", WRONGTYPE),
            ("INCR l", WRONGTYPE),
        ],
    );
}

#[test]
fn lists_reply_like_redis() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("RPUSH l a b c", ":3\r\n"),
            ("LPUSH l z", ":4\r\n"),
            (
                "LRANGE l 0 -1",
                "*4\r\n$1\r\nz\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n",
            ),
            ("LRANGE l 1 1", "*1\r\n$1\r\na\r\n"),
            ("LRANGE l 5 10", "*0\r\n"),
            ("LRANGE l -100 0", "*1\r\n$1\r\nz\r\n"),
            ("LRANGE nope 0 -1", "*0\r\n"),
            ("LRANGE l x 1", NOT_INT),
            ("LLEN l", ":4\r\n"),
            ("LINDEX l -1", "$1\r\nc\r\n"),
            ("LINDEX l 9", "$-1\r\n"),
            ("LPOP l", "$1\r\nz\r\n"),
            ("RPOP l 2", "*2\r\n$1\r\nc\r\n$1\r\nb\r\n"),
            (
                "LPOP l -1",
                "-ERR value is out of range, must be positive\r\n",
            ),
            (
                "LPOP l 1 2",
                "-ERR wrong number of arguments for 'lpop' command\r\n",
            ),
            ("RPOP l", "$1\r\na\r\n"),
            ("EXISTS l", ":0\r\n"),
            ("LPOP l", "$-1\r\n"),
            ("LPOP l 3", "*-1\r\n"),
            ("SET s x", "+OK\r\n"),
            ("LPUSH s x", WRONGTYPE),
            (
                "LPUSH s",
                "-ERR wrong number of arguments for 'lpush' command\r\n",
            ),
        ],
    );
}

#[test]
fn hashes_keep_insertion_order_like_a_listpack() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("HSET h z 1 a 2", ":2\r\n"),
            ("HSET h z 3", ":0\r\n"),
            ("HGET h z", "$1\r\n3\r\n"),
            ("HGET h nope", "$-1\r\n"),
            (
                "HGETALL h",
                "*4\r\n$1\r\nz\r\n$1\r\n3\r\n$1\r\na\r\n$1\r\n2\r\n",
            ),
            ("HMGET h a nope", "*2\r\n$1\r\n2\r\n$-1\r\n"),
            ("HLEN h", ":2\r\n"),
            ("HEXISTS h a", ":1\r\n"),
            ("HINCRBY h a 5", ":7\r\n"),
            ("HINCRBY h a x", NOT_INT),
            ("HSET h s x", ":1\r\n"),
            ("HINCRBY h s 1", "-ERR hash value is not an integer\r\n"),
            ("HDEL h z nope", ":1\r\n"),
            ("HKEYS h", "*2\r\n$1\r\na\r\n$1\r\ns\r\n"),
            (
                "HSET h a",
                "-ERR wrong number of arguments for 'hset' command\r\n",
            ),
            ("HMSET h q 1", "+OK\r\n"),
            ("HGETALL nope", "*0\r\n"),
            ("SET str x", "+OK\r\n"),
            ("HSET str a b", WRONGTYPE),
        ],
    );
}

#[test]
fn sets_and_sorted_sets_reply_like_redis() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("SADD s b a b", ":2\r\n"),
            ("SCARD s", ":2\r\n"),
            ("SISMEMBER s a", ":1\r\n"),
            ("SMEMBERS s", "*2\r\n$1\r\na\r\n$1\r\nb\r\n"),
            ("SREM s a x", ":1\r\n"),
            ("SPOP s", "$1\r\nb\r\n"),
            ("SPOP s", "$-1\r\n"),
            ("SPOP s 2", "*0\r\n"),
            (
                "SPOP s -1",
                "-ERR value is out of range, must be positive\r\n",
            ),
            ("ZADD z 1.1 a 3 c 2 b", ":3\r\n"),
            ("ZADD z x a", "-ERR value is not a valid float\r\n"),
            (
                "ZADD z NX XX 1 a",
                "-ERR XX and NX options at the same time are not compatible\r\n",
            ),
            ("ZADD z 1 a 2", "-ERR syntax error\r\n"),
            (
                "ZADD z 1",
                "-ERR wrong number of arguments for 'zadd' command\r\n",
            ),
            ("ZADD z CH 5 a 6 d", ":2\r\n"),
            ("ZADD z INCR 1 a", "$1\r\n6\r\n"),
            ("ZSCORE z b", "$1\r\n2\r\n"),
            ("ZADD z 1.1 b", ":0\r\n"),
            ("ZSCORE z b", "$18\r\n1.1000000000000001\r\n"),
            (
                "ZRANGE z 0 -1",
                "*4\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\na\r\n$1\r\nd\r\n",
            ),
            (
                "ZRANGE z 0 0 WITHSCORES",
                "*2\r\n$1\r\nb\r\n$18\r\n1.1000000000000001\r\n",
            ),
            ("ZRANGE z (3 +inf BYSCORE LIMIT 0 1", "*1\r\n$1\r\na\r\n"),
            ("ZRANGE z 0 0 REV", "*1\r\n$1\r\nd\r\n"),
            ("ZRANK z c", ":1\r\n"),
            ("ZCARD z", ":4\r\n"),
            (
                "ZPOPMIN z",
                "*2\r\n$1\r\nb\r\n$18\r\n1.1000000000000001\r\n",
            ),
            (
                "ZPOPMIN z 2",
                "*4\r\n$1\r\nc\r\n$1\r\n3\r\n$1\r\na\r\n$1\r\n6\r\n",
            ),
            ("ZINCRBY z 1.5 d", "$3\r\n7.5\r\n"),
            ("ZREM z d", ":1\r\n"),
            ("EXISTS z", ":0\r\n"),
            ("ZPOPMIN z", "*0\r\n"),
            ("SET str x", "+OK\r\n"),
            ("SADD str a", WRONGTYPE),
            ("ZADD str 1 a", WRONGTYPE),
        ],
    );
}

#[test]
fn keys_expire_on_the_clock_handed_in() {
    let mut s = server();
    let mut client = s.connect(0);
    let t = 5_000_000;
    assert_eq!(
        run(&mut s, &mut client, t, &["SET", "k", "v", "EX", "10"]),
        "+OK\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["TTL", "k"]), ":10\r\n");
    assert_eq!(run(&mut s, &mut client, t + 2_400, &["TTL", "k"]), ":8\r\n");
    assert_eq!(
        run(&mut s, &mut client, t + 2_400, &["PTTL", "k"]),
        ":7600\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t + 9_999, &["GET", "k"]),
        "$1\r\nv\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t + 10_000, &["GET", "k"]),
        "$-1\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["TTL", "k"]), ":-2\r\n");
    assert_eq!(run(&mut s, &mut client, t, &["SET", "p", "v"]), "+OK\r\n");
    assert_eq!(run(&mut s, &mut client, t, &["TTL", "p"]), ":-1\r\n");
    assert_eq!(
        run(&mut s, &mut client, t, &["PEXPIRE", "p", "1500"]),
        ":1\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "p", "100", "NX"]),
        ":0\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "p", "100", "GT"]),
        ":1\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "p", "1", "NX", "XX"]),
        "-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "p", "1", "FOO"]),
        "-ERR Unsupported option FOO\r\n"
    );
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "p", "x"]),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        run(
            &mut s,
            &mut client,
            t,
            &["EXPIRE", "p", "9223372036854775807"]
        ),
        "-ERR invalid expire time in 'expire' command\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["PERSIST", "p"]), ":1\r\n");
    assert_eq!(run(&mut s, &mut client, t, &["PERSIST", "p"]), ":0\r\n");
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "nope", "10"]),
        ":0\r\n"
    );
    // INCR keeps the time to live; SET drops it.
    assert_eq!(
        run(&mut s, &mut client, t, &["SET", "c", "1", "PX", "5000"]),
        "+OK\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["INCR", "c"]), ":2\r\n");
    assert_eq!(run(&mut s, &mut client, t, &["PTTL", "c"]), ":5000\r\n");
    assert_eq!(
        run(&mut s, &mut client, t, &["SET", "c", "1", "KEEPTTL"]),
        "+OK\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["PTTL", "c"]), ":5000\r\n");
    // A non-positive expire deletes at once.
    assert_eq!(
        run(&mut s, &mut client, t, &["EXPIRE", "c", "-1"]),
        ":1\r\n"
    );
    assert_eq!(run(&mut s, &mut client, t, &["EXISTS", "c"]), ":0\r\n");
    // The sweep removes due keys nobody touches.
    for key in ["x1", "x2", "x3"] {
        run(&mut s, &mut client, t, &["SET", key, "v", "PX", "10"]);
    }
    assert_eq!(s.sweep_expired(t + 10), 3);
    assert_eq!(s.db().len(), 1);
}

#[test]
fn keyspace_commands_reply_like_redis() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("MSET key:1 a key:2 b other c", "+OK\r\n"),
            ("KEYS key:*", "*2\r\n$5\r\nkey:1\r\n$5\r\nkey:2\r\n"),
            ("KEYS nomatch*", "*0\r\n"),
            (
                "SCAN 0 COUNT 2",
                "*2\r\n$1\r\n2\r\n*2\r\n$5\r\nkey:1\r\n$5\r\nkey:2\r\n",
            ),
            ("SCAN 2 COUNT 2", "*2\r\n$1\r\n0\r\n*1\r\n$5\r\nother\r\n"),
            (
                "SCAN 0 MATCH o* TYPE string",
                "*2\r\n$1\r\n0\r\n*1\r\n$5\r\nother\r\n",
            ),
            ("SCAN x", "-ERR invalid cursor\r\n"),
            ("TYPE key:1", "+string\r\n"),
            ("TYPE nope", "+none\r\n"),
            ("EXISTS key:1 key:1 nope", ":2\r\n"),
            ("DEL key:1 nope", ":1\r\n"),
            ("UNLINK key:2", ":1\r\n"),
            ("DBSIZE", ":1\r\n"),
            ("SELECT 0", "+OK\r\n"),
            ("SELECT 1", "-ERR DB index is out of range\r\n"),
            ("FLUSHALL", "+OK\r\n"),
            ("DBSIZE", ":0\r\n"),
        ],
    );
}

#[test]
fn connection_commands_reply_like_redis() {
    let mut s = server();
    script(
        &mut s,
        &[
            ("PING", "+PONG\r\n"),
            ("PING hi", "$2\r\nhi\r\n"),
            (
                "PING a b",
                "-ERR wrong number of arguments for 'ping' command\r\n",
            ),
            ("ECHO x", "$1\r\nx\r\n"),
            ("HELLO 3", "-NOPROTO unsupported protocol version\r\n"),
            (
                "HELLO x",
                "-ERR Protocol version is not an integer or out of range\r\n",
            ),
            ("CLIENT SETNAME bench", "+OK\r\n"),
            ("CLIENT GETNAME", "$5\r\nbench\r\n"),
            (
                "CLIENT SETNAME",
                "-ERR wrong number of arguments for 'client|setname' command\r\n",
            ),
            ("CLIENT SETINFO LIB-NAME redis-py", "+OK\r\n"),
            ("CLIENT SETINFO LIB-VER 5.0.1", "+OK\r\n"),
            (
                "CLIENT FOO",
                "-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n",
            ),
            (
                "COMMAND FOO",
                "-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n",
            ),
            ("CONFIG GET save", "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
            (
                "CONFIG GET appendonly",
                "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n",
            ),
            (
                "NOSUCH a b",
                "-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n",
            ),
        ],
    );
    let mut client = s.connect(0);
    let hello = run(&mut s, &mut client, 0, &["HELLO", "2"]);
    assert!(
        hello.starts_with("*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n"),
        "{hello}"
    );
    assert!(hello.contains("$5\r\nproto\r\n:2\r\n"), "{hello}");
    let count = run(&mut s, &mut client, 0, &["COMMAND", "COUNT"]);
    assert_eq!(count, std::format!(":{}\r\n", TABLE.len()));
    let info = run(&mut s, &mut client, 0, &["COMMAND", "INFO", "get"]);
    assert!(
        info.starts_with(
            "*1\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n"
        ),
        "{info}"
    );
    let docs = run(&mut s, &mut client, 0, &["COMMAND", "DOCS", "set"]);
    assert!(
        docs.starts_with("*2\r\n$3\r\nset\r\n*4\r\n$7\r\nsummary\r\n"),
        "{docs}"
    );
    run(&mut s, &mut client, 0, &["SET", "k", "v", "PX", "100000"]);
    let info = run(&mut s, &mut client, 0, &["INFO"]);
    for field in [
        "# Server\r\nredis_version:",
        "connected_clients:2",
        "maxmemory:1000",
        "db0:keys=1,expires=1,avg_ttl=100000",
    ] {
        assert!(info.contains(field), "{field} in {info}");
    }
    let keyspace = run(&mut s, &mut client, 0, &["INFO", "keyspace"]);
    assert!(keyspace.starts_with("$"), "{keyspace}");
    assert!(
        keyspace.contains("\r\n# Keyspace\r\ndb0:keys=1") && !keyspace.contains("# Server"),
        "{keyspace}"
    );
    let mut out = Vec::new();
    assert_eq!(
        s.serve(&mut client, b"QUIT\r\nPING\r\n", 0, &mut out, 1 << 20),
        (6, After::Close)
    );
    assert_eq!(out, b"+OK\r\n");
}

#[test]
fn commands_that_grow_memory_get_oom_above_maxmemory() {
    let mut s = server();
    let mut client = s.connect(0);
    assert_eq!(run(&mut s, &mut client, 0, &["RPUSH", "l", "a"]), ":1\r\n");
    USED.with(|used| used.set(1001));
    let oom = "-OOM command not allowed when used memory > 'maxmemory'.\r\n";
    for words in [
        &["SET", "k", "v"][..],
        &["RPUSH", "l", "b"],
        &["HSET", "h", "f", "v"],
        &["SADD", "s", "m"],
        &["ZADD", "z", "1", "m"],
        &["INCR", "n"],
        &["APPEND", "a", "x"],
        &["MSET", "a", "b"],
    ] {
        assert_eq!(run(&mut s, &mut client, 0, words), oom, "{words:?}");
    }
    // Reads, deletes and pops go on, so a full store can be emptied.
    assert_eq!(
        run(&mut s, &mut client, 0, &["LRANGE", "l", "0", "-1"]),
        "*1\r\n$1\r\na\r\n"
    );
    assert_eq!(run(&mut s, &mut client, 0, &["RPOP", "l"]), "$1\r\na\r\n");
    assert_eq!(run(&mut s, &mut client, 0, &["DEL", "l"]), ":0\r\n");
    assert_eq!(run(&mut s, &mut client, 0, &["PING"]), "+PONG\r\n");
    assert_eq!(s.stats().oom_rejections, 8);
    USED.with(|used| used.set(10));
    assert_eq!(run(&mut s, &mut client, 0, &["SET", "k", "v"]), "+OK\r\n");
}

#[test]
fn pipelined_requests_run_in_order_with_output_back_pressure() {
    let mut s = server();
    let mut client = s.connect(0);
    let mut input = Vec::new();
    for _ in 0..16 {
        input.extend_from_slice(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n");
    }
    input.extend_from_slice(b"PING\r\n*2\r\n$3\r\nGET"); // the last one incomplete
    let mut out = Vec::new();
    let (used, after) = s.serve(&mut client, &input, 0, &mut out, 1 << 20);
    assert_eq!(after, After::Continue);
    assert_eq!(used, 16 * 21 + 6);
    let expected: String = (1..=16)
        .map(|n| std::format!(":{n}\r\n"))
        .collect::<String>()
        + "+PONG\r\n";
    assert_eq!(String::from_utf8_lossy(&out), expected);
    // With a small output limit the store stops after the reply that
    // crosses it; the rest waits in the input.
    let mut out = Vec::new();
    let (used, _) = s.serve(&mut client, &input, 0, &mut out, 8);
    assert_eq!(used, 2 * 21);
    assert_eq!(out, b":17\r\n:18\r\n");
    // A protocol error closes after its reply.
    let mut out = Vec::new();
    let (used, after) = s.serve(&mut client, b"PING\r\n*1\r\n+x\r\n", 0, &mut out, 1 << 20);
    assert_eq!((used, after), (6, After::Close));
    assert_eq!(
        out,
        b"+PONG\r\n-ERR Protocol error: expected '$', got '+'\r\n"
    );
}

#[test]
fn spop_is_a_function_of_the_seed() {
    let picks = |seed: u64| {
        let mut s = Server::new(
            Config {
                maxmemory: usize::MAX,
                used_memory: used,
                maxclients: 1,
                port: 1,
                seed,
            },
            0,
        );
        let mut client = s.connect(0);
        let members: Vec<String> = (0..50).map(|i| std::format!("m{i}")).collect();
        let mut words = std::vec!["SADD", "s"];
        words.extend(members.iter().map(String::as_str));
        run(&mut s, &mut client, 0, &words);
        (0..10)
            .map(|_| run(&mut s, &mut client, 0, &["SPOP", "s"]))
            .collect::<Vec<_>>()
    };
    assert_eq!(picks(7), picks(7));
    assert_ne!(picks(7), picks(8));
}

/// A deterministic stream of request-like garbage: RESP punctuation,
/// digits, command names and arbitrary bytes.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    const PIECES: [&[u8]; 16] = [
        b"*",
        b"$",
        b"\r\n",
        b"\n",
        b"-1",
        b"3",
        b"0",
        b"99999999999999999999",
        b"SET ",
        b"GET",
        b"ZADD",
        b"\"",
        b"'",
        b"\\x4",
        b" ",
        b"LPUSH",
    ];
    let mut state = seed | 1;
    let mut out = Vec::new();
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state.is_multiple_of(5) {
            out.push((state >> 8) as u8);
        } else {
            out.extend_from_slice(PIECES[(state >> 16) as usize % PIECES.len()]);
        }
    }
    out
}

#[test]
fn arbitrary_input_never_panics_and_never_over_consumes() {
    let mut s = server();
    USED.with(|used| used.set(0));
    for seed in 0..3000u64 {
        let input = garbage(seed, (seed % 200) as usize + 1);
        let mut client = s.connect(0);
        let mut out = Vec::new();
        let mut at = 0;
        // Feed it in two pieces, as a socket might.
        for end in [input.len() / 2, input.len()] {
            let (used, after) = s.serve(&mut client, &input[at..end], 0, &mut out, 1 << 20);
            assert!(at + used <= end, "seed {seed}");
            at += used;
            if after == After::Close {
                assert!(
                    out.starts_with(b"-") || out.ends_with(b"\r\n"),
                    "seed {seed}"
                );
                break;
            }
        }
        s.disconnect(client);
    }
    // Arbitrary commands with arbitrary arguments, too.
    let mut client = s.connect(0);
    for (index, spec) in TABLE.iter().enumerate() {
        if spec.name == "QUIT" {
            continue;
        }
        for seed in 0..40u64 {
            let words = garbage(seed * 97 + index as u64, 24);
            let mut args: Vec<&str> = std::vec![spec.name];
            let text = String::from_utf8_lossy(&words).replace(['\r', '\n'], "");
            args.extend(text.split(' ').filter(|w| !w.is_empty()).take(6));
            run(&mut s, &mut client, seed, &args);
        }
    }
}

#[test]
fn the_append_only_log_keeps_successful_writes_and_rebuilds_the_store() {
    let mut server = server();
    let mut client = server.connect(0);
    let mut out = Vec::new();
    let input = b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\nGET a\r\n*2\r\n$4\r\nINCR\r\n$1\r\na\r\nINCR nokey extra\r\nRPUSH l x y\r\n";
    assert!(server.take_aof().is_empty(), "off by default");
    server.set_aof(true);
    let (used, _) = server.serve(&mut client, input, 0, &mut out, usize::MAX);
    assert_eq!(used, input.len());
    let aof = server.take_aof();
    assert_eq!(
        aof,
        b"*3\r\n$3\r\nSET\r\n$1\r\na\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\na\r\nRPUSH l x y\r\n",
        "reads and failed writes are not logged"
    );
    assert!(server.take_aof().is_empty(), "taken");
    let mut reloaded = self::server();
    let mut loader = reloaded.connect(0);
    let mut ignored = Vec::new();
    reloaded.serve(&mut loader, &aof, 0, &mut ignored, usize::MAX);
    assert_eq!(
        run(&mut reloaded, &mut loader, 0, &["GET", "a"]),
        "$1\r\n2\r\n"
    );
    assert_eq!(run(&mut reloaded, &mut loader, 0, &["LLEN", "l"]), ":2\r\n");
}
