//! Bounds on the shape of a message's JSON, decided once, at the edge: how deep it nests, and
//! numbers that every later reader can hold (finite as a 64-bit float). A message past them is
//! rejected with the reason; one within them parses everywhere after (the tracking plan, profiles
//! and rules, the lake's tables, destinations' scripts) without meeting a recursion limit or a
//! number out of range.

/// Levels of objects and arrays a message may nest, itself included. Segment's SDKs send five or
/// six; parsers downstream recurse per level.
pub const MAX_DEPTH: usize = 64;

/// Checks `json` (one well-formed JSON value), found `above` levels deep in a message, against
/// the bounds; the error is the reason to reject the message.
pub fn check(json: &[u8], above: usize) -> Result<(), String> {
    let start = json
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(json.len());
    value_end(json, start, above).map(|_| ())
}

/// The index after the value that starts at `start` in well-formed JSON, found `above` levels deep
/// in a message, checking it against the bounds on the way. Knowing the JSON well-formed, it only
/// looks for where things end: string contents are skipped eight bytes at a time, the rest is
/// looked at a byte at a time.
pub fn value_end(json: &[u8], start: usize, above: usize) -> Result<usize, String> {
    let mut depth = above;
    let mut i = start;
    while let Some(&byte) = json.get(i) {
        match byte {
            b'"' => i = after_string(json, i + 1).0,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("JSON nested deeper than {MAX_DEPTH} levels"));
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(json, i);
                number(&json[i..end])?;
                i = end;
            }
            b't' | b'f' | b'n' => {
                while json.get(i).is_some_and(u8::is_ascii_lowercase) {
                    i += 1;
                }
            }
            // Whitespace, commas and colons, all inside a value.
            _ => {
                i += 1;
                continue;
            }
        }
        if depth <= above {
            return Ok(i);
        }
    }
    Ok(json.len())
}

/// The index after the number that starts at `i`.
pub fn number_end(json: &[u8], mut i: usize) -> usize {
    while json
        .get(i)
        .is_some_and(|b| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
    {
        i += 1;
    }
    i
}

/// The index after the closing quote of a string whose content starts at `i`, and whether the
/// string has escapes. Eight bytes at a time while none of them is a quote or a backslash (the
/// usual bit trick for a zero byte in a word, on the word xor'ed with each).
pub fn after_string(json: &[u8], mut i: usize) -> (usize, bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    const QUOTES: u64 = ONES * b'"' as u64;
    const SLASHES: u64 = ONES * b'\\' as u64;
    let mut escaped = false;
    loop {
        while let Some(word) = json.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            let (q, s) = (w ^ QUOTES, w ^ SLASHES);
            let found = (q.wrapping_sub(ONES) & !q | s.wrapping_sub(ONES) & !s) & HIGHS;
            if found != 0 {
                // The lowest flagged byte is always a true match.
                i += (found.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match json.get(i) {
            None => return (json.len(), escaped),
            Some(b'"') => return (i + 1, escaped),
            Some(b'\\') => {
                escaped = true;
                i += 2;
            }
            Some(_) => i += 1,
        }
    }
}

fn number(token: &[u8]) -> Result<(), String> {
    // Without an exponent, a number needs over 300 digits to be past what a 64-bit float holds
    // (about 1.8e308); only the rare others are parsed.
    if token.len() < 300 && !token.iter().any(|b| matches!(b, b'e' | b'E')) {
        return Ok(());
    }
    let text = std::str::from_utf8(token).unwrap_or_default();
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(()),
        _ => {
            let shown = crate::text::clip(text.to_string(), 40);
            let more = if shown.len() < text.len() { "…" } else { "" };
            Err(format!(
                "the number {shown}{more} is out of range (larger than a 64-bit float holds)"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_messages_pass() {
        for json in [
            r#"{"a":[1,-2,3.5,1e10,-0.0,18446744073709551617,-9223372036854775809],"b":{"c":"]]]{{{"}}"#,
            r#"{"s":"a \" quote [ and \\ backslash {","n":null,"t":true}"#,
            "[]",
        ] {
            assert_eq!(check(json.as_bytes(), 0), Ok(()), "{json}");
        }
        let nested = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(check(nested.as_bytes(), 0), Ok(()));
    }

    #[test]
    fn each_value_ends_where_it_ends() {
        let json = br#"{"a":[1,"]}",{"b":{}}],"c":"x\"y"} "s\\" -1.5e3,true null [] 7"#;
        let mut ends = Vec::new();
        let mut i = 0;
        while i < json.len() {
            if json[i] == b' ' || json[i] == b',' {
                i += 1;
                continue;
            }
            i = value_end(json, i, 0).unwrap();
            ends.push(i);
        }
        assert_eq!(ends, vec![34, 40, 47, 52, 57, 60, 62]);
    }

    #[test]
    fn deep_nesting_and_numbers_out_of_range_are_named() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(check(deep.as_bytes(), 0)
            .unwrap_err()
            .contains("nested deeper than 64"));
        for n in ["1e400", "-1e309", &"9".repeat(500)] {
            let json = format!(r#"{{"v":[{n}]}}"#);
            let err = check(json.as_bytes(), 0).unwrap_err();
            assert!(
                err.contains("out of range") && err.len() < 200,
                "{n}: {err}"
            );
        }
        // Brackets and digits inside strings are text.
        let text = format!(r#"{{"v":"{}1e999"}}"#, "[".repeat(100));
        assert_eq!(check(text.as_bytes(), 0), Ok(()));
    }
}
