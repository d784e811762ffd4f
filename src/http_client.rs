//! The outbound HTTP client every worker uses: rustls with the system roots plus an optional CA
//! bundle, and a timeout on every call.

use std::path::Path;
use std::time::Duration;

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

/// The configured builder, for callers that add settings of their own (the webhooks worker's
/// resolver and redirect policy).
pub fn builder(config: &HttpClientConfig) -> Result<reqwest::ClientBuilder, ClientError> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
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
