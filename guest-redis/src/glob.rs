//! Glob-style patterns as KEYS and SCAN MATCH use them (Redis's
//! `stringmatchlen`): `*`, `?`, `[abc]`, `[^a-z]`, `\x` escapes.

/// True if `text` matches `pattern`.
pub fn matches(pattern: &[u8], text: &[u8]) -> bool {
    match_at(pattern, text, 0)
}

/// Deepest `*` nesting followed before giving up (bounds the work a hostile
/// pattern can cause, as Redis 7 does).
const MAX_NESTING: usize = 1000;

fn match_at(mut pattern: &[u8], mut text: &[u8], nesting: usize) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    while let Some((&p, rest)) = pattern.split_first() {
        match p {
            b'*' => {
                let mut rest = rest;
                while let Some((b'*', more)) = rest.split_first() {
                    rest = more;
                }
                if rest.is_empty() {
                    return true;
                }
                for start in 0..=text.len() {
                    if match_at(rest, &text[start..], nesting + 1) {
                        return true;
                    }
                }
                return false;
            }
            b'?' => {
                let Some((_, more)) = text.split_first() else {
                    return false;
                };
                text = more;
                pattern = rest;
            }
            b'[' => {
                let Some((&c, more)) = text.split_first() else {
                    return false;
                };
                let (matched, after) = match_class(rest, c);
                if !matched {
                    return false;
                }
                text = more;
                pattern = after;
            }
            b'\\' if !rest.is_empty() => {
                let Some((&c, more)) = text.split_first() else {
                    return false;
                };
                if c != rest[0] {
                    return false;
                }
                text = more;
                pattern = &rest[1..];
            }
            literal => {
                let Some((&c, more)) = text.split_first() else {
                    return false;
                };
                if c != literal {
                    return false;
                }
                text = more;
                pattern = rest;
            }
        }
    }
    text.is_empty()
}

/// Matches `c` against a class whose text follows the `[`; returns whether
/// it matched and the pattern after the closing `]`.
fn match_class(mut class: &[u8], c: u8) -> (bool, &[u8]) {
    let negate = class.first() == Some(&b'^');
    if negate {
        class = &class[1..];
    }
    let mut matched = false;
    loop {
        match class {
            [] => break,
            [b']', rest @ ..] => {
                class = rest;
                return (matched != negate, class);
            }
            [b'\\', escaped, rest @ ..] => {
                matched |= *escaped == c;
                class = rest;
            }
            [low, b'-', high, rest @ ..] if *high != b']' => {
                let (low, high) = if low <= high {
                    (*low, *high)
                } else {
                    (*high, *low)
                };
                matched |= (low..=high).contains(&c);
                class = rest;
            }
            [single, rest @ ..] => {
                matched |= *single == c;
                class = rest;
            }
        }
    }
    // An unclosed class: Redis treats the end of the pattern as its end.
    (matched != negate, class)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs_match_like_redis() {
        assert!(matches(b"*", b""));
        assert!(matches(b"key:*", b"key:1"));
        assert!(!matches(b"key:*", b"ke"));
        assert!(matches(b"h?llo", b"hello"));
        assert!(matches(b"h[ae]llo", b"hallo"));
        assert!(!matches(b"h[^e]llo", b"hello"));
        assert!(matches(b"h[a-b]llo", b"hbllo"));
        assert!(matches(b"a\\*b", b"a*b"));
        assert!(!matches(b"a\\*b", b"axb"));
        assert!(matches(b"*a*b*c*", b"xxaxxbxxcxx"));
        assert!(!matches(b"*a*b*c*d", b"aaaaaaaaaaaaaaaaaaaaaaaaabc"));
    }
}
