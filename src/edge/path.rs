//! Request paths that name nothing: once percent-decoded, bytes that are not UTF-8 or control
//! characters. Checked before the path extractor, whose rejection is plain text.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;

use super::ApiError;

/// 404 `NOT_FOUND` in the API's error shape for a path that is not plain ([`is_plain`]).
pub fn refused(request: &Request) -> Option<ApiError> {
    (!is_plain(request.uri().path())).then(|| {
        ApiError::not_found(
            "NOT_FOUND",
            "no object has such an id (control characters or bytes that are not UTF-8)",
        )
    })
}

/// Route layer: a path no object can have answers 404 (on every store alike: PostgreSQL
/// refuses a NUL in text where SQLite would look it up) before the path extractor runs.
pub async fn require_plain(request: Request, next: Next) -> Result<Response, ApiError> {
    match refused(&request) {
        Some(e) => Err(e),
        None => Ok(next.run(request).await),
    }
}

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
