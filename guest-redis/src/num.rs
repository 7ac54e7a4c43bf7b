//! Numbers as Redis reads and prints them: doubles (`%.17g`, `inf`) and
//! their parsing (`strtod` rules, NaN refused).

use core::fmt::Write;

/// A fixed buffer holding one formatted double.
pub struct DoubleText {
    bytes: [u8; 40],
    len: usize,
}

impl Default for DoubleText {
    fn default() -> Self {
        Self::new()
    }
}

impl DoubleText {
    /// An empty buffer.
    pub fn new() -> Self {
        Self {
            bytes: [0; 40],
            len: 0,
        }
    }

    /// The text written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn push(&mut self, byte: u8) {
        if self.len < self.bytes.len() {
            self.bytes[self.len] = byte;
            self.len += 1;
        }
    }
}

impl Write for DoubleText {
    fn write_str(&mut self, text: &str) -> core::fmt::Result {
        for &byte in text.as_bytes() {
            self.push(byte);
        }
        Ok(())
    }
}

/// Formats `value` like C's `printf("%.17g")`, which Redis 7.0 uses for
/// scores: `1.1000000000000001`, `3`, `1.0000000000000001e+300`, `inf`.
pub fn format_double(value: f64, out: &mut DoubleText) {
    if value.is_infinite() {
        let _ = out.write_str(if value > 0.0 { "inf" } else { "-inf" });
        return;
    }
    if value.is_nan() {
        let _ = out.write_str("nan");
        return;
    }
    if value == 0.0 {
        // Redis replies 0 for a score of -0 too.
        let _ = out.write_str("0");
        return;
    }
    // 17 significant digits, correctly rounded, from core's formatter:
    // "d.dddddddddddddddde<exp>".
    let mut scientific = DoubleText::new();
    let _ = write!(scientific, "{:.16e}", value);
    let text = scientific.as_bytes();
    let (negative, text) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    let Some(e_at) = text.iter().position(|&b| b == b'e') else {
        return;
    };
    let mut digits = [0u8; 17];
    let mut count = 0;
    for &byte in &text[..e_at] {
        if byte.is_ascii_digit() && count < digits.len() {
            digits[count] = byte;
            count += 1;
        }
    }
    let exponent = core::str::from_utf8(&text[e_at + 1..])
        .ok()
        .and_then(|e| e.parse::<i32>().ok())
        .unwrap_or(0);
    // %g drops trailing zeros of the significand.
    while count > 1 && digits[count - 1] == b'0' {
        count -= 1;
    }
    let digits = &digits[..count];
    if negative {
        out.push(b'-');
    }
    if !(-4..17).contains(&exponent) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            for &digit in &digits[1..] {
                out.push(digit);
            }
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.unsigned_abs()
        );
    } else if exponent < 0 {
        let _ = out.write_str("0.");
        for _ in 0..(-exponent - 1) {
            out.push(b'0');
        }
        for &digit in digits {
            out.push(digit);
        }
    } else {
        let whole = exponent as usize + 1;
        for index in 0..whole {
            out.push(digits.get(index).copied().unwrap_or(b'0'));
        }
        if digits.len() > whole {
            out.push(b'.');
            for &digit in &digits[whole..] {
                out.push(digit);
            }
        }
    }
}

/// Parses a double as Redis does (`strtod` over the whole argument, no
/// spaces, NaN refused); `inf`, `-inf` and `+inf` are accepted.
pub fn parse_double(bytes: &[u8]) -> Option<f64> {
    let text = core::str::from_utf8(bytes).ok()?;
    if text.is_empty() || text.starts_with(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    let value: f64 = text.parse().ok()?;
    if value.is_nan() { None } else { Some(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(value: f64) -> alloc::string::String {
        let mut text = DoubleText::new();
        format_double(value, &mut text);
        alloc::string::String::from_utf8(text.as_bytes().to_vec()).unwrap_or_default()
    }

    #[test]
    fn doubles_print_like_percent_17g() {
        // Each expected text is what Redis 7.0.15 replied to ZSCORE.
        assert_eq!(show(1.1), "1.1000000000000001");
        assert_eq!(show(3.0), "3");
        assert_eq!(show(1e300), "1.0000000000000001e+300");
        assert_eq!(show(-2.5), "-2.5");
        assert_eq!(show(0.0001), "0.0001");
        assert_eq!(show(0.00001), "1.0000000000000001e-05");
        assert_eq!(show(123456789012345680.0), "1.2345678901234568e+17");
        assert_eq!(show(1e16), "10000000000000000");
        assert_eq!(show(f64::INFINITY), "inf");
        assert_eq!(show(f64::NEG_INFINITY), "-inf");
        assert_eq!(show(0.0), "0");
        assert_eq!(show(-0.0), "0");
    }

    #[test]
    fn doubles_parse_like_strtod() {
        assert_eq!(parse_double(b"1.5"), Some(1.5));
        assert_eq!(parse_double(b"-inf"), Some(f64::NEG_INFINITY));
        assert_eq!(parse_double(b"+inf"), Some(f64::INFINITY));
        assert_eq!(parse_double(b"1e3"), Some(1000.0));
        for bad in [&b""[..], b" 1", b"1 ", b"abc", b"nan"] {
            assert_eq!(parse_double(bad), None, "{bad:?}");
        }
    }
}
