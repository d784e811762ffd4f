//! Request paths that name nothing: once percent-decoded, bytes that are not UTF-8 or control
//! characters. Checked before the path extractor, whose rejection is plain text.

/// Whether the percent-decoded path is UTF-8 without control characters.
pub fn is_plain(path: &str) -> bool {
    let raw = path.as_bytes();
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        let decoded = match (raw[i], raw.get(i + 1).copied(), raw.get(i + 2).copied()) {
            (b'%', Some(h), Some(l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match decoded {
            Some(b) => {
                bytes.push(b);
                i += 3;
            }
            None => {
                bytes.push(raw[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).is_ok_and(|p| !p.chars().any(char::is_control))
}

#[cfg(test)]
mod tests {
    use super::is_plain;

    #[test]
    fn paths_with_controls_or_bad_utf8_are_not_plain() {
        assert!(is_plain("/x/0193a4b2-0000-7000-8000-00000000c0de"));
        assert!(is_plain("/x/caf%C3%A9"));
        assert!(is_plain("/x/100%"));
        assert!(!is_plain("/x/%00"));
        assert!(!is_plain("/x/a%0Ab/queues"));
        assert!(!is_plain("/x/%FF"));
        assert!(!is_plain("/x/%C3"));
    }
}
