//! A key-value store speaking the Redis protocol (RESP2), enough for stock
//! `redis-cli` and `redis-benchmark`: PING, ECHO, SET, GET, DEL, EXISTS,
//! INCR, INCRBY, DECR, DBSIZE, FLUSHALL/FLUSHDB, and empty answers to the
//! CONFIG GET / COMMAND probes clients send on connect.
//!
//! Pure logic over byte buffers (`alloc` only), so the host's test suite
//! includes this file and tests it directly.
//!
//! Requests are RESP arrays of bulk strings (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`)
//! or inline commands (`PING\r\n`). A malformed request gets a
//! `-ERR Protocol error: …` reply and the connection is closed, as Redis does.

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// Longest bulk string accepted.
pub const MAX_BULK_LEN: usize = 1 << 20;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024;
/// Longest inline command line.
pub const MAX_INLINE_LEN: usize = 64 << 10;

/// The outcome of parsing the front of a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole command yet: read more.
    Incomplete,
    /// A command and the bytes it used.
    Command(Vec<Vec<u8>>, usize),
    /// A protocol error: reply with it and close the connection.
    Error(&'static str),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|at| from + at)
}

fn parse_number(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value
            .checked_mul(10)?
            .checked_add(i64::from(digit - b'0'))?;
    }
    Some(if negative { -value } else { value })
}

/// Parses one command from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(&first) = buf.first() else {
        return Parsed::Incomplete;
    };
    if first != b'*' {
        return parse_inline(buf);
    }
    let Some(end) = find_crlf(buf, 1) else {
        return if buf.len() > 32 {
            Parsed::Error("invalid multibulk length")
        } else {
            Parsed::Incomplete
        };
    };
    let count = match parse_number(&buf[1..end]) {
        Some(count) if (0..=MAX_ARGS as i64).contains(&count) => count as usize,
        _ => return Parsed::Error("invalid multibulk length"),
    };
    let mut at = end + 2;
    let mut args = Vec::with_capacity(count);
    for _ in 0..count {
        match buf.get(at) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Error("expected '$'"),
        }
        let Some(end) = find_crlf(buf, at + 1) else {
            return if buf.len() - at > 32 {
                Parsed::Error("invalid bulk length")
            } else {
                Parsed::Incomplete
            };
        };
        let len = match parse_number(&buf[at + 1..end]) {
            Some(len) if (0..=MAX_BULK_LEN as i64).contains(&len) => len as usize,
            _ => return Parsed::Error("invalid bulk length"),
        };
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error("bulk string not terminated by CRLF");
        }
        args.push(buf[start..start + len].to_vec());
        at = start + len + 2;
    }
    Parsed::Command(args, at)
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE_LEN {
            Parsed::Error("too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = buf[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..newline]);
    let args = line
        .split(|&b| b == b' ')
        .filter(|word| !word.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Parsed::Command(args, newline + 1)
}

/// What the connection should do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep serving.
    Continue,
    /// Close once the reply is sent (QUIT).
    Close,
}

/// The key-value store.
#[derive(Default)]
pub struct Store {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn bulk(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'$');
    integer_text(out, value.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn integer_text(out: &mut Vec<u8>, value: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

fn integer(out: &mut Vec<u8>, value: i64) {
    out.push(b':');
    integer_text(out, value);
    out.extend_from_slice(b"\r\n");
}

fn error(out: &mut Vec<u8>, message: &[u8]) {
    out.extend_from_slice(b"-");
    out.extend_from_slice(message);
    out.extend_from_slice(b"\r\n");
}

impl Store {
    /// Keys stored.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no key is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Executes one command, appending its reply to `out`.
    pub fn execute(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>) -> After {
        let Some((name, rest)) = args.split_first() else {
            return After::Continue; // an empty inline line: Redis ignores it
        };
        let name = name.to_ascii_uppercase();
        let arity_error = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"-ERR wrong number of arguments for '");
            out.extend_from_slice(&name.to_ascii_lowercase());
            out.extend_from_slice(b"' command\r\n");
        };
        match (name.as_slice(), rest.len()) {
            (b"PING", 0) => out.extend_from_slice(b"+PONG\r\n"),
            (b"PING", 1) | (b"ECHO", 1) => bulk(out, &rest[0]),
            (b"SET", 2) => {
                self.map.insert(rest[0].clone(), rest[1].clone());
                out.extend_from_slice(b"+OK\r\n");
            }
            (b"GET", 1) => match self.map.get(&rest[0]) {
                Some(value) => bulk(out, value),
                None => out.extend_from_slice(b"$-1\r\n"),
            },
            (b"DEL", n) if n >= 1 => {
                let removed = rest
                    .iter()
                    .filter(|key| self.map.remove(*key).is_some())
                    .count();
                integer(out, removed as i64);
            }
            (b"EXISTS", n) if n >= 1 => {
                let present = rest
                    .iter()
                    .filter(|key| self.map.contains_key(*key))
                    .count();
                integer(out, present as i64);
            }
            (b"INCR", 1) => self.add(&rest[0], 1, out),
            (b"DECR", 1) => self.add(&rest[0], -1, out),
            (b"INCRBY", 2) => match parse_number(&rest[1]) {
                Some(delta) => self.add(&rest[0], delta, out),
                None => error(out, b"ERR value is not an integer or out of range"),
            },
            (b"DBSIZE", 0) => integer(out, self.map.len() as i64),
            (b"FLUSHALL", _) | (b"FLUSHDB", _) => {
                self.map.clear();
                out.extend_from_slice(b"+OK\r\n");
            }
            (b"CONFIG", n) if n >= 2 && rest[0].eq_ignore_ascii_case(b"GET") => {
                // redis-benchmark asks for these on connect.
                let known: [(&[u8], &[u8]); 2] = [(b"save", b""), (b"appendonly", b"no")];
                let mut pairs = Vec::new();
                for wanted in &rest[1..] {
                    for (key, value) in known {
                        if wanted.eq_ignore_ascii_case(key) || wanted.as_slice() == b"*" {
                            pairs.push((key, value));
                        }
                    }
                }
                out.push(b'*');
                integer_text(out, 2 * pairs.len() as i64);
                out.extend_from_slice(b"\r\n");
                for (key, value) in pairs {
                    bulk(out, key);
                    bulk(out, value);
                }
            }
            (b"CONFIG", _) => out.extend_from_slice(b"+OK\r\n"),
            (b"COMMAND", _) => out.extend_from_slice(b"*0\r\n"),
            (b"QUIT", _) => {
                out.extend_from_slice(b"+OK\r\n");
                return After::Close;
            }
            (
                b"PING" | b"ECHO" | b"SET" | b"GET" | b"DEL" | b"EXISTS" | b"INCR" | b"DECR"
                | b"INCRBY" | b"DBSIZE",
                _,
            ) => arity_error(out),
            _ => {
                out.extend_from_slice(b"-ERR unknown command '");
                out.extend_from_slice(&name.to_ascii_lowercase()[..name.len().min(64)]);
                out.extend_from_slice(b"'\r\n");
            }
        }
        After::Continue
    }

    fn add(&mut self, key: &[u8], delta: i64, out: &mut Vec<u8>) {
        let current = match self.map.get(key) {
            None => 0,
            Some(value) => match parse_number(value) {
                Some(number) => number,
                None => return error(out, b"ERR value is not an integer or out of range"),
            },
        };
        let Some(next) = current.checked_add(delta) else {
            return error(out, b"ERR increment or decrement would overflow");
        };
        let mut text = Vec::new();
        integer_text(&mut text, next);
        self.map.insert(key.to_vec(), text);
        integer(out, next);
    }
}
