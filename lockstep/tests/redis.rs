//! The guest's Redis-protocol store against stock clients: redis-benchmark's
//! whole default suite (also pipelined and with 200 connections) on an FT-on
//! pair whose backup's digests must match, a script of requests whose
//! replies must equal a real `redis-server`'s byte for byte, redis-cli and
//! Python's `redis` package, and memory exhaustion answered with `-OOM`.
//!
//! Every guest, client and server runs inside the network namespaces of a
//! `testbed` the test creates and removes (nothing in the root namespace).
//! Needs root, /dev/kvm, /dev/net/tun, iproute2, redis-tools, redis-server
//! and python3-redis (installed by .ci/run).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use testbed::{Ns, Testbed};

const LOCKSTEP: &str = env!("CARGO_BIN_EXE_lockstep");

fn bed(label: &str) -> Testbed {
    Testbed::up(&testbed::Config::new(label)).expect("create the testbed (root and iproute2)")
}

/// Starts lockstep in `ns` and waits for the net guest's banner line.
fn start_in(bed: &Testbed, ns: Ns, args: &[&str]) -> (Child, String) {
    let mut child = bed
        .command(ns, LOCKSTEP)
        .expect("lockstep command")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lockstep");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("banner");
    assert!(line.starts_with("net: "), "unexpected first line: {line:?}");
    (child, line)
}

fn run_vm(bed: &Testbed, mem_mib: &str) -> (Child, String) {
    let arg = bed.addresses().guest_arg().to_string();
    start_in(
        bed,
        Ns::A,
        &[
            "run",
            "--guest",
            "net",
            "--tap",
            testbed::TAP,
            "--arg",
            &arg,
            "--mem-mib",
            mem_mib,
        ],
    )
}

fn guest(bed: &Testbed) -> String {
    bed.addresses().guest.to_string()
}

/// Runs a client program in the client namespace.
fn client(bed: &Testbed, program: &str, args: &[&str]) -> Output {
    bed.command(Ns::Client, program)
        .expect("client command")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// redis-benchmark's default suite, in its order (redis-tools 7.0).
const DEFAULT_SUITE: [&str; 20] = [
    "PING_INLINE",
    "PING_MBULK",
    "SET",
    "GET",
    "INCR",
    "LPUSH",
    "RPUSH",
    "LPOP",
    "RPOP",
    "SADD",
    "HSET",
    "SPOP",
    "ZADD",
    "ZPOPMIN",
    "LPUSH (needed to benchmark LRANGE)",
    "LRANGE_100 (first 100 elements)",
    "LRANGE_300 (first 300 elements)",
    "LRANGE_500 (first 500 elements)",
    "LRANGE_600 (first 600 elements)",
    "MSET (10 keys)",
];

/// Runs `redis-benchmark -q` (no `-t`: the default suite) with `extra`
/// options; checks that every test reported a rate and nothing else was
/// printed; returns (test, requests per second).
fn benchmark(bed: &Testbed, extra: &[&str]) -> Vec<(String, f64)> {
    let host = guest(bed);
    let mut args = vec!["-h", host.as_str(), "-q"];
    args.extend_from_slice(extra);
    let output = client(bed, "redis-benchmark", &args);
    let all = text(&output);
    assert!(output.status.success(), "redis-benchmark {extra:?}: {all}");
    // -q rewrites a progress line with \r; the final line of each test
    // follows the last \r.
    let mut rates = Vec::new();
    for line in all.split(['\n', '\r']) {
        let line = line.trim();
        if line.is_empty() || line.contains("rps=") {
            continue;
        }
        let (name, rest) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("unexpected line {line:?} in:\n{all}"));
        let rate: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {line:?}"));
        assert!(
            rest.contains("requests per second") && rate > 0.0,
            "{line:?}"
        );
        rates.push((name.to_string(), rate));
    }
    let names: Vec<&str> = rates.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, DEFAULT_SUITE, "redis-benchmark {extra:?}:\n{all}");
    assert!(!all.to_lowercase().contains("error"), "{all}");
    rates
}

fn print_rates(label: &str, rates: &[(String, f64)]) {
    let line: Vec<String> = rates.iter().map(|(n, r)| format!("{n} {r:.0}")).collect();
    eprintln!("{label}: {}", line.join(", "));
}

#[test]
fn ft_on_pair_serves_the_default_suite_pipelined_and_200_clients_and_digests_match() {
    let bed = bed("test-redis-ft");
    let at = bed.addresses().clone();
    let link = format!("{}:7793", at.log_b);
    let status_dir = format!("/tmp/lockstep-status-redis-{}", bed.run_id());
    let _ = std::fs::remove_dir_all(&status_dir);
    std::fs::create_dir_all(&status_dir).expect("status dir");
    let key = common::keygen(std::path::Path::new(&status_dir), "link.key");
    let key = key.to_str().expect("utf-8 path").to_string();
    let backup = bed
        .command(Ns::B, LOCKSTEP)
        .expect("backup command")
        .args([
            "backup",
            "--listen",
            &link,
            "--quiet",
            "--peer-timeout-ms",
            "20000",
        ])
        .args(["--status-dir", &status_dir, "--link-key", &key])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the backup");
    let arg = at.guest_arg().to_string();
    let (primary, banner) = start_in(
        &bed,
        Ns::A,
        &[
            "primary",
            "--backup",
            &link,
            "--guest",
            "net",
            "--tap",
            testbed::TAP,
            "--arg",
            &arg,
            "--mem-mib",
            "32",
            "--digest-interval",
            "300",
            "--peer-timeout-ms",
            "20000",
            "--status-dir",
            &status_dir,
            "--link-key",
            &key,
        ],
    );
    assert!(banner.contains("(512 connections"), "{banner}");

    // Expiry on the paravirtual clock, under replication: the key is gone
    // once its time is up, and the backup (checked below) agrees.
    let host = guest(&bed);
    let cli = |args: &[&str]| {
        let mut all = vec!["-h", host.as_str()];
        all.extend_from_slice(args);
        text(&client(&bed, "redis-cli", &all)).trim().to_string()
    };
    assert_eq!(cli(&["SET", "soon", "v", "PX", "300"]), "OK");
    assert_eq!(cli(&["GET", "soon"]), "v");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(cli(&["EXISTS", "soon"]), "0");

    let plain = benchmark(&bed, &["-n", "2000"]);
    print_rates("FT on, -n 2000", &plain);
    let pipelined = benchmark(&bed, &["-n", "2000", "-P", "16"]);
    print_rates("FT on, -n 2000 -P 16", &pipelined);
    let many = benchmark(&bed, &["-n", "2000", "-c", "200"]);
    print_rates("FT on, -n 2000 -c 200", &many);
    let info = cli(&["INFO", "stats"]);
    assert!(info.contains("expired_keys:1"), "{info}");

    let primary = common::stop(primary);
    let backup = backup.wait_with_output().expect("backup");
    let primary_err = String::from_utf8_lossy(&primary.stderr);
    let backup_out = String::from_utf8_lossy(&backup.stdout);
    assert!(
        backup.status.success(),
        "backup failed: {backup_out}{}",
        String::from_utf8_lossy(&backup.stderr)
    );
    assert!(primary_err.contains("(everything)"), "{primary_err}");
    let summary = backup_out.lines().last().expect("backup summary");
    let (matched, taken) = common::digests(summary);
    assert_eq!(matched, taken, "digests match at the same exits: {summary}");
    assert!(matched >= 2, "{summary}");
    let _ = std::fs::remove_dir_all(&status_dir);
}

/// A RESP2 connection that reads whole replies as raw bytes.
struct Resp {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Resp {
    fn connect(bed: &Testbed, address: SocketAddr) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match bed.connect(Ns::Client, address, Duration::from_secs(2)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    return Self {
                        stream,
                        buffer: Vec::new(),
                    };
                }
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(error) => panic!("cannot connect to {address}: {error}"),
            }
        }
    }

    fn fill(&mut self, need: usize) {
        while self.buffer.len() < need {
            let mut chunk = [0u8; 65536];
            let got = self.stream.read(&mut chunk).expect("read reply");
            assert!(got > 0, "connection closed mid-reply");
            self.buffer.extend_from_slice(&chunk[..got]);
        }
    }

    fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(at) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                return self.buffer.drain(..at + 2).collect();
            }
            let len = self.buffer.len();
            self.fill(len + 1);
        }
    }

    fn reply(&mut self) -> Vec<u8> {
        let mut line = self.line();
        let count = || -> i64 {
            String::from_utf8_lossy(&line[1..line.len() - 2])
                .parse()
                .expect("length")
        };
        match line[0] {
            b'$' if count() >= 0 => {
                let len = count() as usize + 2;
                self.fill(len);
                line.extend(self.buffer.drain(..len));
            }
            b'*' if count() > 0 => {
                for _ in 0..count() {
                    let item = self.reply();
                    line.extend(item);
                }
            }
            _ => {}
        }
        line
    }

    fn request(&mut self, words: &[&str]) -> Vec<u8> {
        let mut request = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            request.extend(format!("${}\r\n{word}\r\n", word.len()).bytes());
        }
        self.stream.write_all(&request).expect("send");
        self.reply()
    }
}

/// Requests whose replies are the same on every Redis 7.0 server (no
/// times, ids or random picks among several), one per line, words split at
/// spaces. Real redis-server must answer each exactly as the guest does;
/// a line marked `~ ` has an unordered reply (Redis's hash-table order) and
/// is compared as a sorted list of elements.
const SCRIPT: &str = "
FLUSHALL
PING
PING hello
PING a b
ECHO hi
SET k v
GET k
GET missing
SET k w NX
SET k w XX GET
SET k w NX XX
SET k w EX 0
SET k w EX -5
SET k w EX abc
SET k w PX 100 EX 100
SET k w BADOPT
SET k
SETNX k z
SETNX k2 z
GETSET k2 y
GETSET nokey y
APPEND k2 yy
APPEND newkey abc
STRLEN k2
STRLEN nope
MSET a 1 b 2
MSET a 1 b
MGET a b nope
INCR a
INCRBY a 10
DECRBY a 2
DECR a
INCR k
INCRBY a x
INCRBY a 1.5
SET big 9223372036854775807
INCR big
DECRBY a -9223372036854775808
SET neg -9223372036854775808
DECR neg
SET lead 007
INCR lead
GET
get k
gEt k
NOSUCH a b
NOSUCH
LPUSH l x
GET l
APPEND l x
INCR l
STRLEN l
RPUSH list a b c
LPUSH list z
LRANGE list 0 -1
LRANGE list 1 1
LRANGE list 5 10
LRANGE list -100 0
LRANGE list 2 1
LRANGE nope 0 -1
LRANGE list x 1
LLEN list
LLEN nope
LINDEX list -1
LINDEX list 9
LINDEX list x
LPOP list
RPOP list 2
LPOP list -1
LPOP list x
LPOP list 1 2
LPOP list 0
RPOP list
EXISTS list
LPOP list
LPOP list 3
RPOP nope 0
LPUSH k x
LPUSH k
HSET h z 1 a 2
HSET h z 3
HGET h z
HGET h nope
HGET nope f
HGETALL h
HMGET h a nope
HMGET nope a
HLEN h
HEXISTS h a
HEXISTS h q
HINCRBY h a 5
HINCRBY h a x
HINCRBY h new 5
HSET h s x
HINCRBY h s 1
HSET h big 9223372036854775807
HINCRBY h big 1
HDEL h z nope
HKEYS h
HVALS h
HSET h a
HMSET h q 1
HGETALL nope
HSET k a b
HGET k a
HDEL h a s q new big
EXISTS h
SADD s b a b
SCARD s
SISMEMBER s a
SISMEMBER s zz
SISMEMBER nope zz
SREM s a x
SMEMBERS s
SPOP s
SPOP s
SPOP s 2
SPOP s -1
SPOP s x
SPOP nope
SPOP nope 3
SADD k a
SCARD k
SMEMBERS nope
ZADD z 1.1 a 3 c 2 b
ZADD z x a
ZADD z NX XX 1 a
ZADD z NX GT 1 a
ZADD z GT LT 1 a
ZADD z INCR 1 a 2 b
ZADD z 1 a 2
ZADD z 1
ZADD z CH 5 a 6 d
ZADD z INCR 1 a
ZADD z NX INCR 1 a
ZADD z XX 10 nope
ZADD z GT 1 a
ZADD z GT CH 100 a
ZADD z LT 1 a
ZSCORE z b
ZSCORE z nope
ZSCORE nope b
ZADD z 1.1 b
ZSCORE z b
ZADD z inf i -inf j
ZSCORE z i
ZSCORE z j
ZADD z 1e300 e 0.00001 f -0 g
ZRANGE z 0 -1
ZRANGE z 0 -1 WITHSCORES
ZRANGE z 0 0 WITHSCORES
ZRANGE z (3 +inf BYSCORE LIMIT 0 1
ZRANGE z 1 3 BYSCORE
ZRANGE z (1.1 3 BYSCORE WITHSCORES
ZRANGE z +inf -inf BYSCORE REV
ZRANGE z x y BYSCORE
ZRANGE z 0 0 REV
ZRANGE z 0 -1 LIMIT 0 1
ZRANGE z 0 -1 FOO
ZRANGE nope 0 -1
ZRANK z c
ZRANK z nope
ZCARD z
ZCARD nope
ZINCRBY z 1.5 d
ZINCRBY z x d
ZINCRBY z 1 newm
ZINCRBY z inf i
ZINCRBY z -inf i
ZREM z d nope
ZPOPMIN z
ZPOPMIN z 2
ZPOPMAX z
ZPOPMIN z -1
ZPOPMIN nope
ZPOPMIN z 0
ZPOPMIN z 100
EXISTS z
ZADD k 1 a
ZSCORE k a
MSET key:1 a key:2 b other c
~ KEYS key:*
KEYS nomatch*
~ KEYS key:[12]
KEYS ?ther
TYPE key:1
TYPE nope
TYPE h
EXISTS key:1 key:1 nope
DEL key:1 nope
UNLINK key:2
DEL
SELECT 0
SELECT x
SET e v
TTL e
PTTL e
TTL nope
PTTL nope
EXPIRE e 100
TTL e
EXPIRE e 100 NX
EXPIRE e 200 XX
EXPIRE e 50 GT
EXPIRE e 50 LT
TTL e
EXPIRE e 1 NX XX
EXPIRE e 1 GT LT
EXPIRE e 1 FOO
EXPIRE e x
EXPIRE e 9223372036854775807
PEXPIRE e 9223372036854775807
EXPIRE e
PERSIST e
PERSIST e
PERSIST nope
EXPIRE nope 10
PEXPIRE e 100000
TTL e
SET e v KEEPTTL
TTL e
INCR e
SET c 1 EX 100
INCR c
TTL c
EXPIRE c -1
EXISTS c
SET e2 v EX 100 KEEPTTL
HELLO x
CLIENT SETNAME bench
CLIENT GETNAME
CLIENT SETNAME
CLIENT FOO
CLIENT
COMMAND FOO
CONFIG GET save
CONFIG GET appendonly
CONFIG GET
CONFIG FOO
DBSIZE
FLUSHALL FOO
FLUSHALL
DBSIZE
";

/// An array reply of bulk strings with its elements sorted.
fn sorted_elements(reply: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(reply);
    let mut lines = text.split("\r\n");
    let header = lines.next().unwrap_or_default().to_string();
    let mut elements: Vec<String> = Vec::new();
    while let (Some(len), Some(body)) = (lines.next(), lines.next()) {
        elements.push(format!("{len}\r\n{body}\r\n"));
    }
    elements.sort();
    format!("{header}\r\n{}", elements.concat()).into_bytes()
}

#[test]
fn replies_match_a_real_redis_server_byte_for_byte_and_stock_clients_work() {
    let bed = bed("test-redis-compat");
    let at = bed.addresses().clone();
    let (vm, banner) = run_vm(&bed, "32");
    // Debian's redis-server, in the client namespace on the client's address.
    let real_port = 16_379;
    let mut real = bed
        .command(Ns::Client, "redis-server")
        .expect("redis-server command")
        .args([
            "--port",
            &real_port.to_string(),
            "--bind",
            &at.client.to_string(),
        ])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (Debian's redis-server package)");
    let mut ours = Resp::connect(&bed, SocketAddr::from((at.guest, 6379)));
    let mut theirs = Resp::connect(&bed, SocketAddr::from((at.client, real_port)));
    let mut compared = 0;
    let mut differences = Vec::new();
    for request in SCRIPT.lines().filter(|line| !line.is_empty()) {
        let (unordered, request) = match request.strip_prefix("~ ") {
            Some(rest) => (true, rest),
            None => (false, request),
        };
        let words: Vec<&str> = request.split(' ').collect();
        let (mut a, mut b) = (ours.request(&words), theirs.request(&words));
        if unordered {
            (a, b) = (sorted_elements(&a), sorted_elements(&b));
        }
        if a != b {
            differences.push(format!(
                "{request}\n  guest: {:?}\n  redis: {:?}",
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b)
            ));
        }
        compared += 1;
    }
    assert!(
        differences.is_empty(),
        "{} of {compared} replies differ:\n{}",
        differences.len(),
        differences.join("\n")
    );
    assert!(compared > 240, "{compared}");
    let _ = real.kill();
    let _ = real.wait();

    // Where the guest differs from Redis on purpose (documented limits).
    assert_eq!(
        ours.request(&["HELLO", "3"]),
        b"-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        ours.request(&["SELECT", "1"]),
        b"-ERR DB index is out of range\r\n"
    );
    let hello = ours.request(&["HELLO", "2"]);
    assert!(
        hello.starts_with(b"*14\r\n$6\r\nserver\r\n$5\r\nredis\r\n"),
        "{hello:?}"
    );

    // redis-cli, as a user types it.
    let host = guest(&bed);
    let cli = |args: &[&str]| {
        let mut all = vec!["-h", host.as_str()];
        all.extend_from_slice(args);
        text(&client(&bed, "redis-cli", &all)).trim().to_string()
    };
    assert_eq!(cli(&["SET", "name", "lockstep", "EX", "100"]), "OK");
    assert_eq!(cli(&["TTL", "name"]), "100");
    assert_eq!(
        cli(&["LPUSH", "name", "x"]),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert_eq!(
        cli(&["GET"]),
        "ERR wrong number of arguments for 'get' command"
    );
    assert_eq!(cli(&["EXPIRE", "name", "5"]), "1");
    assert_eq!(cli(&["TTL", "name"]), "5");
    assert_eq!(cli(&["PERSIST", "name"]), "1");
    assert_eq!(cli(&["TTL", "name"]), "-1");
    let info = cli(&["INFO", "keyspace"]);
    assert!(
        info.contains("# Keyspace") && info.contains("db0:keys=1,expires=0"),
        "{info}"
    );
    let docs = cli(&["COMMAND", "DOCS", "get"]);
    assert!(docs.contains("summary"), "{docs}");

    // Python's redis package: connect, pipeline, read back.
    let script = format!(
        "import redis\n\
         r = redis.Redis(host='{host}', port=6379)\n\
         assert r.ping()\n\
         r.client_setname('py')\n\
         assert r.client_getname() in ('py', b'py')\n\
         p = r.pipeline(transaction=False)\n\
         for i in range(100): p.incr('py:counter')\n\
         p.hset('py:h', mapping={{'a': '1', 'b': '2'}})\n\
         p.rpush('py:l', *range(10))\n\
         p.zadd('py:z', {{'m1': 1, 'm2': 2}})\n\
         p.set('py:ttl', 'v', ex=30)\n\
         results = p.execute()\n\
         assert results[99] == 100, results\n\
         assert r.hgetall('py:h') == {{b'a': b'1', b'b': b'2'}}\n\
         assert r.lrange('py:l', 0, -1) == [str(i).encode() for i in range(10)]\n\
         assert r.zrange('py:z', 0, -1, withscores=True) == [(b'm1', 1.0), (b'm2', 2.0)]\n\
         assert 0 < r.ttl('py:ttl') <= 30\n\
         assert r.info()['redis_version']\n\
         print('python ok', r.dbsize())\n"
    );
    // Debian's interpreter, the one python3-redis installs for.
    let python = client(&bed, "/usr/bin/python3", &["-c", &script]);
    assert!(python.status.success(), "{}", text(&python));
    assert!(text(&python).starts_with("python ok"), "{}", text(&python));

    let output = common::stop(vm);
    assert!(!banner.is_empty());
    let _ = output;
}

#[test]
fn memory_exhaustion_gets_oom_and_the_guest_keeps_serving() {
    let bed = bed("test-redis-oom");
    let at = bed.addresses().clone();
    let (mut vm, banner) = run_vm(&bed, "16");
    eprintln!("{banner}");
    let mut redis = Resp::connect(&bed, SocketAddr::from((at.guest, 6379)));
    let value = "x".repeat(256 << 10);
    let mut stored = 0;
    let oom = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n";
    loop {
        let key = format!("big:{stored}");
        let reply = redis.request(&["SET", &key, &value]);
        if reply == oom {
            break;
        }
        assert_eq!(reply, b"+OK\r\n", "SET {key}");
        stored += 1;
        assert!(
            stored < 64,
            "16 MiB of guest memory cannot hold {stored} × 256 KiB"
        );
    }
    assert!(stored >= 4, "only {stored} values fit before -OOM");
    // Reads go on (used memory hovers at the line: a small write may fit
    // again once the failed request's buffer is freed, as in Redis).
    assert_eq!(redis.request(&["PING"]), b"+PONG\r\n");
    assert_eq!(
        redis.request(&["STRLEN", "big:0"]),
        format!(":{}\r\n", 256 << 10).into_bytes()
    );
    // A pipeline of big requests arriving at a full guest: each answered.
    let mut pipeline = Vec::new();
    for i in 0..8 {
        let key = format!("more:{i}");
        pipeline.extend(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n",
                key.len(),
                value.len()
            )
            .bytes(),
        );
    }
    redis.stream.write_all(&pipeline).expect("send pipeline");
    for _ in 0..8 {
        assert_eq!(redis.reply(), oom);
    }
    let info = String::from_utf8_lossy(&redis.request(&["INFO", "stats"])).into_owned();
    let rejections: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("oom_rejections:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no oom_rejections in {info}"));
    assert!(rejections >= 9, "{info}");
    // Deleting makes room again.
    for i in 0..stored {
        assert_eq!(redis.request(&["DEL", &format!("big:{i}")]), b":1\r\n");
    }
    assert_eq!(redis.request(&["SET", "after", "ok"]), b"+OK\r\n");
    assert_eq!(redis.request(&["GET", "after"]), b"$2\r\nok\r\n");
    assert!(
        vm.try_wait().expect("wait").is_none(),
        "the guest is still running"
    );
    let output = common::stop(vm);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("guest panic"), "{stderr}");
}
