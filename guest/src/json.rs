//! A bounded JSON reader for the few messages the guest must understand
//! (iperf3's parameter and result objects).
//!
//! It validates the whole text against the JSON grammar (RFC 8259) and
//! hands back the members of the top-level object; nested objects and
//! arrays are checked but not kept. Everything is bounded: nesting depth
//! ([`MAX_DEPTH`]), member count ([`MAX_MEMBERS`]), and the text itself,
//! whose length the caller has already limited. Numbers are read as `i64`,
//! truncated toward zero and saturated (iperf3 reads them as C `int`s the
//! same way); strings are returned raw, escapes validated but not decoded.
//! There is no floating point and no recursion deeper than [`MAX_DEPTH`].

use alloc::vec::Vec;

/// Deepest nesting of objects and arrays accepted.
pub const MAX_DEPTH: usize = 16;
/// Most members a top-level object may have.
pub const MAX_MEMBERS: usize = 128;

/// A top-level member's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    /// Truncated toward zero, saturated to the `i64` range.
    Number(i64),
    /// The raw bytes between the quotes (escapes not decoded).
    String(&'a [u8]),
    /// An array, validated but not kept.
    Array,
    /// An object, validated but not kept.
    Object,
}

/// Why a text is not acceptable, with the byte offset where it was noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not JSON at this offset.
    Syntax(usize),
    /// Nested deeper than [`MAX_DEPTH`] at this offset.
    TooDeep(usize),
    /// The top-level value is not an object.
    NotAnObject,
    /// More than [`MAX_MEMBERS`] top-level members.
    TooManyMembers,
}

/// The members of the top-level object of `text`, in order, as
/// (raw key, value).
pub fn object_members(text: &[u8]) -> Result<Vec<(&[u8], Value<'_>)>, Error> {
    let mut parser = Parser { text, pos: 0 };
    parser.skip_space();
    if parser.peek() != Some(b'{') {
        return Err(Error::NotAnObject);
    }
    let mut members = Vec::new();
    parser.pos += 1;
    parser.skip_space();
    if parser.peek() == Some(b'}') {
        parser.pos += 1;
    } else {
        loop {
            parser.skip_space();
            let key = parser.string()?;
            parser.skip_space();
            parser.expect(b':')?;
            let value = parser.value(1)?;
            if members.len() == MAX_MEMBERS {
                return Err(Error::TooManyMembers);
            }
            members.push((key, value));
            parser.skip_space();
            match parser.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(Error::Syntax(parser.pos.saturating_sub(1))),
            }
        }
    }
    parser.skip_space();
    if parser.pos != text.len() {
        return Err(Error::Syntax(parser.pos));
    }
    Ok(members)
}

/// The value of the first member called `key`, as cJSON's
/// `cJSON_GetObjectItem` would find it.
pub fn get<'a>(members: &[(&[u8], Value<'a>)], key: &str) -> Option<Value<'a>> {
    members
        .iter()
        .find(|(name, _)| *name == key.as_bytes())
        .map(|(_, value)| *value)
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.pos += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Result<(), Error> {
        if self.next() == Some(byte) {
            Ok(())
        } else {
            Err(Error::Syntax(self.pos.saturating_sub(1)))
        }
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, Error> {
        self.skip_space();
        match self.peek() {
            Some(b'{') => self.composite(depth, b'}', true).map(|()| Value::Object),
            Some(b'[') => self.composite(depth, b']', false).map(|()| Value::Array),
            Some(b'"') => self.string().map(Value::String),
            Some(b't') => self.literal(b"true").map(|()| Value::Bool(true)),
            Some(b'f') => self.literal(b"false").map(|()| Value::Bool(false)),
            Some(b'n') => self.literal(b"null").map(|()| Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number().map(Value::Number),
            _ => Err(Error::Syntax(self.pos)),
        }
    }

    /// An object (`keyed`) or array, validated and dropped.
    fn composite(&mut self, depth: usize, close: u8, keyed: bool) -> Result<(), Error> {
        if depth >= MAX_DEPTH {
            return Err(Error::TooDeep(self.pos));
        }
        self.pos += 1;
        self.skip_space();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(());
        }
        loop {
            if keyed {
                self.skip_space();
                self.string()?;
                self.skip_space();
                self.expect(b':')?;
            }
            self.value(depth + 1)?;
            self.skip_space();
            match self.next() {
                Some(b',') => continue,
                Some(byte) if byte == close => return Ok(()),
                _ => return Err(Error::Syntax(self.pos.saturating_sub(1))),
            }
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), Error> {
        if self.text[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Error::Syntax(self.pos))
        }
    }

    /// A string; returns the bytes between the quotes.
    fn string(&mut self) -> Result<&'a [u8], Error> {
        self.expect(b'"')?;
        let start = self.pos;
        loop {
            match self.next() {
                None => return Err(Error::Syntax(self.pos)),
                Some(b'"') => return Ok(&self.text[start..self.pos - 1]),
                Some(b'\\') => match self.next() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                    Some(b'u') => {
                        for _ in 0..4 {
                            if !self.next().is_some_and(|b| b.is_ascii_hexdigit()) {
                                return Err(Error::Syntax(self.pos.saturating_sub(1)));
                            }
                        }
                    }
                    _ => return Err(Error::Syntax(self.pos.saturating_sub(1))),
                },
                Some(0..=0x1f) => return Err(Error::Syntax(self.pos - 1)),
                Some(_) => {}
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, as an i64
    /// truncated toward zero and saturated.
    fn number(&mut self) -> Result<i64, Error> {
        let negative = self.peek() == Some(b'-');
        if negative {
            self.pos += 1;
        }
        let int_start = self.pos;
        match self.next() {
            Some(b'0') => {}
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(Error::Syntax(self.pos.saturating_sub(1))),
        }
        let int_end = self.pos;
        let mut frac = (self.pos, self.pos);
        if self.peek() == Some(b'.') {
            self.pos += 1;
            let start = self.pos;
            self.digits();
            if self.pos == start {
                return Err(Error::Syntax(self.pos));
            }
            frac = (start, self.pos);
        }
        let mut exponent: i64 = 0;
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            let minus = match self.peek() {
                Some(b'-') => {
                    self.pos += 1;
                    true
                }
                Some(b'+') => {
                    self.pos += 1;
                    false
                }
                _ => false,
            };
            let start = self.pos;
            self.digits();
            if self.pos == start {
                return Err(Error::Syntax(self.pos));
            }
            for &digit in &self.text[start..self.pos] {
                exponent = (exponent * 10 + i64::from(digit - b'0')).min(1_000_000);
            }
            if minus {
                exponent = -exponent;
            }
        }
        // The digits of the integer part then the fraction; the decimal
        // point sits `exponent` places after the integer part.
        let int_digits = &self.text[int_start..int_end];
        let frac_digits = &self.text[frac.0..frac.1];
        let keep = (int_digits.len() as i64 + exponent).max(0) as usize;
        let mut magnitude: u64 = 0;
        for (index, &digit) in int_digits.iter().chain(frac_digits).enumerate() {
            if index >= keep {
                break;
            }
            magnitude = magnitude
                .saturating_mul(10)
                .saturating_add(u64::from(digit - b'0'));
        }
        let written = int_digits.len() + frac_digits.len();
        for _ in written..keep {
            if magnitude == 0 || magnitude == u64::MAX {
                break;
            }
            magnitude = magnitude.saturating_mul(10);
        }
        let value = i64::try_from(magnitude).unwrap_or(i64::MAX);
        Ok(if negative { -value } else { value })
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.pos += 1;
        }
    }
}
