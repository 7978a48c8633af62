//! Cutting text to a size, for what Sluice keeps of strings it did not write (response bodies,
//! error messages that quote a client's value). A leaf: it imports nothing of Sluice.

/// The largest index at most `max` that is a character boundary of `s`.
pub fn boundary_at_most(s: &str, max: usize) -> usize {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn clip(mut text: String, max: usize) -> String {
    text.truncate(boundary_at_most(&text, max));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_a_character_boundary() {
        assert_eq!(clip("héllo".into(), 2), "h");
        assert_eq!(clip("héllo".into(), 3), "hé");
        assert_eq!(clip("abc".into(), 10), "abc");
        assert_eq!(boundary_at_most("日本", 4), 3);
    }
}
