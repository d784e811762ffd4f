//! The outbound HTTP client every worker uses: rustls with the system roots plus an optional CA
//! bundle, and a timeout on every call; and what a 429 or 503 asks of its caller (`Retry-After`).

pub mod target;

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::HttpClientConfig;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("CA bundle {path}: {message}")]
    Bundle { path: String, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

pub fn build(config: &HttpClientConfig) -> Result<reqwest::Client, ClientError> {
    builder(config)?
        .build()
        .map_err(|e| ClientError::Build(e.to_string()))
}

/// The configured builder (rustls, timeout, CA bundle, no redirects), for callers that add
/// settings of their own (the webhooks worker's resolver).
pub fn builder(config: &HttpClientConfig) -> Result<reqwest::ClientBuilder, ClientError> {
    crate::tls::install_crypto_provider();
    // No redirects: a peer's body (a transcript, credentials in headers) must not be posted
    // again to wherever an answer points; a 3xx is the caller's to report.
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(config.timeout_ms))
        .user_agent(concat!("nexus/", env!("CARGO_PKG_VERSION")));
    if !config.ca_file.is_empty() {
        let pem = crate::tls::read_pem(Path::new(&config.ca_file))?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::Bundle {
                path: config.ca_file.clone(),
                message: e.to_string(),
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

/// Why an answer's body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer failed: {0}")]
    Read(#[from] reqwest::Error),
}

/// An answer's body, at most `max` bytes: a peer cannot make the caller hold more.
pub async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Most bytes of a request error's text that [`describe`] keeps.
const MAX_ERROR_TEXT: usize = 512;

/// A request error as logs and attempt logs show it: reqwest's message without the URL (its
/// query may carry a receiver's key), then the causes, which say what to fix ("tcp connect
/// error: Connection refused", "dns error: ...", "invalid peer certificate: Expired"), where
/// reqwest's own text is only "error sending request". Control characters are dropped (a
/// PostgreSQL text column refuses NUL) and the text is cut at [`MAX_ERROR_TEXT`] bytes.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        // Another reqwest error would print its URL; a cause that repeats what its wrapper
        // already printed adds nothing.
        let part = c.to_string();
        if c.downcast_ref::<reqwest::Error>().is_none() && !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    let mut text: String = text.chars().filter(|c| !c.is_control()).collect();
    if text.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A URL as errors, logs and events show it: without user info and with every query value masked
/// (a receiver's key often rides there: `code=`, `sig=`, `api_key=`, …).
pub fn shown_url(url: &str) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else {
        return crate::config::redact_url_password(url);
    };
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let masked: Vec<String> = u
        .query_pairs()
        .map(|(k, _)| format!("{k}=redacted"))
        .collect();
    if !masked.is_empty() {
        u.set_query(Some(&masked.join("&")));
    }
    u.to_string()
}

/// How long a 429 or 503 answer asks the caller to wait (`Retry-After`); `None` for other
/// statuses and for a missing or unreadable header.
pub fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    if !matches!(response.status().as_u16(), 429 | 503) {
        return None;
    }
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    parse_retry_after(value.to_str().ok()?, SystemTime::now())
}

/// A `Retry-After` value (RFC 9110 10.2.3): delay-seconds or an HTTP date, as a delay from
/// `now`; a date in the past is no delay. `None` when it is neither.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_cap() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "x".repeat(100) }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let get = || client.get(format!("http://{addr}/")).send();
        let body = read_capped(get().await.expect("get"), 100)
            .await
            .expect("body");
        assert_eq!(body, vec![b'x'; 100]);
        let over = read_capped(get().await.expect("get"), 99).await;
        assert!(matches!(over, Err(BodyError::TooLarge(99))), "{over:?}");
    }

    #[test]
    fn event_urls_show_no_credentials() {
        assert_eq!(
            super::shown_url("https://u:p4ss@hooks.example.com/in?code=s3cret&tenant=a"),
            "https://hooks.example.com/in?code=redacted&tenant=redacted"
        );
        assert_eq!(
            super::shown_url("https://hooks.example.com/in"),
            "https://hooks.example.com/in"
        );
    }
}
