//! The RESP2 codec: requests in, replies out.
//!
//! # Requests
//!
//! A client sends either a *multibulk* request, an array of bulk strings:
//!
//! ```text
//! *3\r\n $3\r\n SET\r\n $1\r\n k\r\n $5\r\n hello\r\n      (spaces only for reading)
//! │      │     │       │                 └ payload: exactly <len> bytes, then CRLF
//! │      │     │       └ "$<len>\r\n": 0 ≤ len ≤ MAX_BULK_LEN
//! │      │     └ payload
//! │      └ each argument is a bulk string
//! └ "*<count>\r\n": 1 ≤ count ≤ MAX_ARGS (0 or negative: an empty request, skipped)
//! ```
//!
//! or an *inline* request, one line of words split at spaces, with Redis's
//! quoting (`"a b"`, `'a b'`, `\n`, `\xff` inside double quotes):
//!
//! ```text
//! SET k "hello world"\r\n         (the \r is optional)
//! ```
//!
//! Malformed input gets Redis's own protocol error (`-ERR Protocol error:
//! invalid bulk length`, …); the connection is then closed, as Redis does.
//! Every allocation the parser makes is fallible: when the heap is full it
//! reports [`Parsed::OutOfMemory`] rather than aborting the guest.
//!
//! # Replies
//!
//! [`Reply`] appends RESP2 values to a connection's output buffer:
//! `+OK\r\n`, `-ERR …\r\n`, `:42\r\n`, `$5\r\nhello\r\n`, `$-1\r\n` (nil),
//! `*2\r\n…` (array), `*-1\r\n` (nil array). Its writes are fallible too: once
//! one fails it records the failure and the dispatcher replaces the partial
//! reply with `-OOM …`.

use alloc::vec::Vec;

/// Longest bulk string accepted (Redis: `proto-max-bulk-len`, 512 MB there).
pub const MAX_BULK_LEN: usize = 1 << 20;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 4096;
/// Longest inline request line (Redis: `PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE_LEN: usize = 64 << 10;

/// Arguments of one request, each owned so that a command can keep them.
pub type Args = Vec<Vec<u8>>;

/// The outcome of parsing the front of a receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet: read more.
    Incomplete,
    /// A request (possibly empty: skip it) and the bytes it used.
    Request(Args, usize),
    /// A protocol error: reply `-ERR Protocol error: <text>` and close.
    Error(ProtocolError),
    /// The heap could not hold the request's arguments; it used this many
    /// bytes (skip them and reply `-OOM`).
    OutOfMemory(usize),
}

/// A malformed request, with Redis's wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*<count>` is not a number or is too large.
    MultibulkLength,
    /// `$<len>` is not a number or is too large.
    BulkLength,
    /// An argument of a multibulk request does not start with `$`.
    ExpectedDollar(u8),
    /// A bulk payload is not followed by CRLF.
    BulkNotTerminated,
    /// An inline line longer than [`MAX_INLINE_LEN`].
    InlineTooBig,
    /// A quote opened on an inline line is not closed.
    UnbalancedQuotes,
}

impl ProtocolError {
    /// Appends the reply line for this error (`-ERR Protocol error: …\r\n`).
    pub fn write(self, out: &mut Reply<'_>) {
        match self {
            Self::MultibulkLength => out.error("ERR Protocol error: invalid multibulk length"),
            Self::BulkLength => out.error("ERR Protocol error: invalid bulk length"),
            Self::ExpectedDollar(got) => {
                let text = [got];
                let got = core::str::from_utf8(&text).unwrap_or("?");
                out.error_parts(&["ERR Protocol error: expected '$', got '", got, "'"]);
            }
            Self::BulkNotTerminated => out.error("ERR Protocol error: invalid bulk format"),
            Self::InlineTooBig => out.error("ERR Protocol error: too big inline request"),
            Self::UnbalancedQuotes => out.error("ERR Protocol error: unbalanced quotes in request"),
        }
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|at| from + at)
}

/// Parses a signed decimal integer the way Redis's `string2ll` does: no
/// leading `+`, no spaces, no leading zeros (except `0` itself).
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 19 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    if negative && digits == b"0" {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        let digit = i64::from(digit - b'0');
        value = value.checked_mul(10)?;
        value = if negative {
            value.checked_sub(digit)?
        } else {
            value.checked_add(digit)?
        };
    }
    Some(value)
}

fn owned(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut copy = Vec::new();
    copy.try_reserve_exact(bytes.len()).ok()?;
    copy.extend_from_slice(bytes);
    Some(copy)
}

/// Parses one request from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_multibulk(buf),
        Some(_) => parse_inline(buf),
    }
}

fn parse_multibulk(buf: &[u8]) -> Parsed {
    let Some(end) = find_crlf(buf, 1) else {
        return if buf.len() > MAX_INLINE_LEN {
            Parsed::Error(ProtocolError::MultibulkLength)
        } else {
            Parsed::Incomplete
        };
    };
    let count = match parse_i64(&buf[1..end]) {
        Some(count) if count <= 0 => return Parsed::Request(Vec::new(), end + 2),
        Some(count) if count <= MAX_ARGS as i64 => count as usize,
        _ => return Parsed::Error(ProtocolError::MultibulkLength),
    };
    // First find the whole request, then allocate: an incomplete request
    // costs no allocation however often it is re-parsed.
    let mut spans = [(0usize, 0usize); 16];
    let mut at = end + 2;
    let mut bounds: Vec<(usize, usize)> = Vec::new();
    for index in 0..count {
        match buf.get(at) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(&other) => return Parsed::Error(ProtocolError::ExpectedDollar(other)),
        }
        let Some(end) = find_crlf(buf, at + 1) else {
            return if buf.len() - at > 32 {
                Parsed::Error(ProtocolError::BulkLength)
            } else {
                Parsed::Incomplete
            };
        };
        let len = match parse_i64(&buf[at + 1..end]) {
            Some(len) if (0..=MAX_BULK_LEN as i64).contains(&len) => len as usize,
            _ => return Parsed::Error(ProtocolError::BulkLength),
        };
        let start = end + 2;
        if buf.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Error(ProtocolError::BulkNotTerminated);
        }
        if index < spans.len() {
            spans[index] = (start, len);
        } else {
            if bounds.is_empty() {
                if bounds.try_reserve_exact(count).is_err() {
                    return skip_oom(buf, start + len + 2, count - index - 1);
                }
                bounds.extend_from_slice(&spans);
            }
            bounds.push((start, len));
        }
        at = start + len + 2;
    }
    let spans: &[(usize, usize)] = if bounds.is_empty() {
        &spans[..count]
    } else {
        &bounds
    };
    let mut args = Vec::new();
    if args.try_reserve_exact(count).is_err() {
        return Parsed::OutOfMemory(at);
    }
    for &(start, len) in spans {
        match owned(&buf[start..start + len]) {
            Some(arg) => args.push(arg),
            None => return Parsed::OutOfMemory(at),
        }
    }
    Parsed::Request(args, at)
}

/// Out of memory while finding the bounds of a long request: find its end
/// without remembering the bounds, so it can be skipped whole.
fn skip_oom(buf: &[u8], mut at: usize, remaining: usize) -> Parsed {
    for _ in 0..remaining {
        match buf.get(at) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(&other) => return Parsed::Error(ProtocolError::ExpectedDollar(other)),
        }
        let Some(end) = find_crlf(buf, at + 1) else {
            return Parsed::Incomplete;
        };
        let len = match parse_i64(&buf[at + 1..end]) {
            Some(len) if (0..=MAX_BULK_LEN as i64).contains(&len) => len as usize,
            _ => return Parsed::Error(ProtocolError::BulkLength),
        };
        if buf.len() < end + 2 + len + 2 {
            return Parsed::Incomplete;
        }
        at = end + 2 + len + 2;
    }
    Parsed::OutOfMemory(at)
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE_LEN {
            Parsed::Error(ProtocolError::InlineTooBig)
        } else {
            Parsed::Incomplete
        };
    };
    if newline > MAX_INLINE_LEN {
        return Parsed::Error(ProtocolError::InlineTooBig);
    }
    let line = buf[..newline]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[..newline]);
    match split_args(line) {
        Ok(args) => Parsed::Request(args, newline + 1),
        Err(SplitError::Unbalanced) => Parsed::Error(ProtocolError::UnbalancedQuotes),
        Err(SplitError::OutOfMemory) => Parsed::OutOfMemory(newline + 1),
    }
}

enum SplitError {
    Unbalanced,
    OutOfMemory,
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn push_byte(word: &mut Vec<u8>, byte: u8) -> Result<(), SplitError> {
    word.try_reserve(1).map_err(|_| SplitError::OutOfMemory)?;
    word.push(byte);
    Ok(())
}

/// Splits an inline line into words like Redis's `sdssplitargs`.
fn split_args(line: &[u8]) -> Result<Args, SplitError> {
    let mut args: Args = Vec::new();
    let mut at = 0;
    loop {
        while at < line.len() && line[at].is_ascii_whitespace() {
            at += 1;
        }
        if at >= line.len() {
            return Ok(args);
        }
        let mut word = Vec::new();
        match line[at] {
            b'"' => {
                at += 1;
                loop {
                    let Some(&byte) = line.get(at) else {
                        return Err(SplitError::Unbalanced);
                    };
                    if byte == b'\\'
                        && line.get(at + 1) == Some(&b'x')
                        && let (Some(high), Some(low)) = (
                            line.get(at + 2).copied().and_then(hex_value),
                            line.get(at + 3).copied().and_then(hex_value),
                        )
                    {
                        push_byte(&mut word, high * 16 + low)?;
                        at += 4;
                        continue;
                    }
                    if byte == b'\\' && at + 1 < line.len() {
                        let escaped = match line[at + 1] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            other => other,
                        };
                        push_byte(&mut word, escaped)?;
                        at += 2;
                        continue;
                    }
                    if byte == b'"' {
                        // The closing quote must be followed by a space or the end.
                        if line.get(at + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return Err(SplitError::Unbalanced);
                        }
                        at += 1;
                        break;
                    }
                    push_byte(&mut word, byte)?;
                    at += 1;
                }
            }
            b'\'' => {
                at += 1;
                loop {
                    let Some(&byte) = line.get(at) else {
                        return Err(SplitError::Unbalanced);
                    };
                    if byte == b'\\' && line.get(at + 1) == Some(&b'\'') {
                        push_byte(&mut word, b'\'')?;
                        at += 2;
                        continue;
                    }
                    if byte == b'\'' {
                        if line.get(at + 1).is_some_and(|b| !b.is_ascii_whitespace()) {
                            return Err(SplitError::Unbalanced);
                        }
                        at += 1;
                        break;
                    }
                    push_byte(&mut word, byte)?;
                    at += 1;
                }
            }
            _ => {
                let start = at;
                while at < line.len() && !line[at].is_ascii_whitespace() {
                    at += 1;
                }
                word = owned(&line[start..at]).ok_or(SplitError::OutOfMemory)?;
            }
        }
        args.try_reserve(1).map_err(|_| SplitError::OutOfMemory)?;
        args.push(word);
    }
}

/// Formats `value` in decimal into `digits`, returning the used tail.
pub fn format_i64(value: i64, digits: &mut [u8; 20]) -> &[u8] {
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
        at -= 1;
        digits[at] = b'-';
    }
    &digits[at..]
}

/// Appends RESP2 values to an output buffer; every write is fallible.
pub struct Reply<'a> {
    out: &'a mut Vec<u8>,
    failed: bool,
}

impl<'a> Reply<'a> {
    /// A writer appending to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, failed: false }
    }

    /// True once a write could not allocate (the reply is then incomplete).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Bytes in the output buffer.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// True if the output buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// Drops everything after the first `len` bytes and clears the failure.
    pub fn truncate(&mut self, len: usize) {
        self.out.truncate(len);
        self.failed = false;
    }

    /// Appends raw bytes.
    pub fn raw(&mut self, parts: &[&[u8]]) {
        if self.failed {
            return;
        }
        let total = parts.iter().map(|part| part.len()).sum();
        if self.out.try_reserve(total).is_err() {
            self.failed = true;
            return;
        }
        for part in parts {
            self.out.extend_from_slice(part);
        }
    }

    /// `+<text>\r\n`.
    pub fn simple(&mut self, text: &str) {
        self.raw(&[b"+", text.as_bytes(), b"\r\n"]);
    }

    /// `+OK\r\n`.
    pub fn ok(&mut self) {
        self.raw(&[b"+OK\r\n"]);
    }

    /// `-<message>\r\n`; the message starts with its code (`ERR`, `WRONGTYPE`).
    pub fn error(&mut self, message: &str) {
        self.raw(&[b"-", message.as_bytes(), b"\r\n"]);
    }

    /// An error line assembled from parts; CR and LF in them become spaces.
    pub fn error_parts(&mut self, parts: &[&str]) {
        self.raw(&[b"-"]);
        for part in parts {
            for chunk in part
                .as_bytes()
                .split_inclusive(|&b| b == b'\r' || b == b'\n')
            {
                match chunk.split_last() {
                    Some((b'\r' | b'\n', body)) => self.raw(&[body, b" "]),
                    _ => self.raw(&[chunk]),
                }
            }
        }
        self.raw(&[b"\r\n"]);
    }

    /// `:<value>\r\n`.
    pub fn integer(&mut self, value: i64) {
        let mut digits = [0; 20];
        let text = format_i64(value, &mut digits);
        self.raw(&[b":", text, b"\r\n"]);
    }

    /// `$<len>\r\n<bytes>\r\n`.
    pub fn bulk(&mut self, bytes: &[u8]) {
        let mut digits = [0; 20];
        let len = format_i64(bytes.len() as i64, &mut digits);
        self.raw(&[b"$", len, b"\r\n", bytes, b"\r\n"]);
    }

    /// A bulk string holding `value` in decimal.
    pub fn bulk_i64(&mut self, value: i64) {
        let mut digits = [0; 20];
        let text = format_i64(value, &mut digits);
        let mut len_digits = [0; 20];
        let len = format_i64(text.len() as i64, &mut len_digits);
        self.raw(&[b"$", len, b"\r\n", text, b"\r\n"]);
    }

    /// A bulk string holding `value` as Redis prints doubles (`%.17g`).
    pub fn bulk_f64(&mut self, value: f64) {
        let mut text = crate::num::DoubleText::new();
        crate::num::format_double(value, &mut text);
        self.bulk(text.as_bytes());
    }

    /// `$-1\r\n`: nil.
    pub fn nil(&mut self) {
        self.raw(&[b"$-1\r\n"]);
    }

    /// `*-1\r\n`: a nil array.
    pub fn nil_array(&mut self) {
        self.raw(&[b"*-1\r\n"]);
    }

    /// `*<len>\r\n`, to be followed by `len` values.
    pub fn array(&mut self, len: usize) {
        let mut digits = [0; 20];
        let text = format_i64(len as i64, &mut digits);
        self.raw(&[b"*", text, b"\r\n"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// Encodes `words` as a multibulk request and checks it parses back.
    fn request(words: &[&str]) {
        let args: Args = words.iter().map(|w| w.as_bytes().to_vec()).collect();
        let mut text = alloc::format!("*{}\r\n", words.len());
        for word in words {
            text.push_str(&alloc::format!("${}\r\n{word}\r\n", word.len()));
        }
        assert_eq!(parse(text.as_bytes()), Parsed::Request(args, text.len()));
    }

    #[test]
    fn multibulk_requests_parse_whole_and_incomplete() {
        request(&["GET", "k"]);
        request(&[
            "MSET", "a", "1", "b", "2", "c", "3", "d", "4", "e", "5", "f", "6", "g", "7", "h", "8",
            "i", "9",
        ]);
        let whole = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Parsed::Incomplete, "cut at {cut}");
        }
        let mut two = whole.to_vec();
        two.extend_from_slice(b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(
            parse(&two),
            Parsed::Request(vec![b"GET".to_vec(), b"k".to_vec()], whole.len())
        );
        assert_eq!(parse(b"*0\r\n"), Parsed::Request(vec![], 4));
        assert_eq!(parse(b"*-1\r\n"), Parsed::Request(vec![], 5));
        assert_eq!(
            parse(b"*1\r\n$0\r\n\r\n"),
            Parsed::Request(vec![vec![]], 10)
        );
    }

    #[test]
    fn malformed_multibulk_gets_redis_protocol_errors() {
        assert_eq!(
            parse(b"*x\r\n"),
            Parsed::Error(ProtocolError::MultibulkLength)
        );
        assert_eq!(
            parse(b"*99999999\r\n"),
            Parsed::Error(ProtocolError::MultibulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n+GET\r\n"),
            Parsed::Error(ProtocolError::ExpectedDollar(b'+'))
        );
        assert_eq!(
            parse(b"*1\r\n$-5\r\n"),
            Parsed::Error(ProtocolError::BulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n$2000000\r\n"),
            Parsed::Error(ProtocolError::BulkLength)
        );
        assert_eq!(
            parse(b"*1\r\n$1\r\nab\r\n"),
            Parsed::Error(ProtocolError::BulkNotTerminated)
        );
        let mut out = Vec::new();
        ProtocolError::ExpectedDollar(b'+').write(&mut Reply::new(&mut out));
        assert_eq!(out, b"-ERR Protocol error: expected '$', got '+'\r\n");
    }

    #[test]
    fn inline_requests_split_like_redis() {
        assert_eq!(
            parse(b"PING\r\n"),
            Parsed::Request(vec![b"PING".to_vec()], 6)
        );
        assert_eq!(
            parse(b"set  k \"a b\\n\\x41\" 'it\\'s'\n"),
            Parsed::Request(
                vec![
                    b"set".to_vec(),
                    b"k".to_vec(),
                    b"a b\nA".to_vec(),
                    b"it's".to_vec()
                ],
                27
            )
        );
        assert_eq!(parse(b"\r\n"), Parsed::Request(vec![], 2));
        assert_eq!(parse(b"PING"), Parsed::Incomplete);
        assert_eq!(
            parse(b"set k \"abc\r\n"),
            Parsed::Error(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse(b"set k \"abc\"x\r\n"),
            Parsed::Error(ProtocolError::UnbalancedQuotes)
        );
        let long = vec![b'a'; MAX_INLINE_LEN + 1];
        assert_eq!(parse(&long), Parsed::Error(ProtocolError::InlineTooBig));
    }

    #[test]
    fn integers_parse_like_string2ll() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"+1",
            b" 1",
            b"01",
            b"-0",
            b"1x",
            b"9223372036854775808",
        ] {
            assert_eq!(parse_i64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn replies_encode_resp2() {
        let mut out = Vec::new();
        let mut reply = Reply::new(&mut out);
        reply.ok();
        reply.integer(-7);
        reply.bulk(b"hi");
        reply.nil();
        reply.array(2);
        reply.bulk_i64(10);
        reply.bulk_f64(1.1);
        reply.error_parts(&["ERR a\r\nb"]);
        assert_eq!(
            out,
            b"+OK\r\n:-7\r\n$2\r\nhi\r\n$-1\r\n*2\r\n$2\r\n10\r\n$18\r\n1.1000000000000001\r\n-ERR a  b\r\n"
        );
    }
}
