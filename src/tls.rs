//! TLS plumbing shared by listeners and clients: one rustls crypto provider (ring) for the
//! process, and loading of PEM bundles.

use std::path::Path;

/// Installs ring as the process's rustls provider; harmless when already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    Empty { path: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
}

/// Checks that a PEM file holds a private key, so a wrong file is refused at config load
/// rather than when a listener or client first uses it.
pub fn check_key(path: &Path) -> Result<(), TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(bytes.as_slice());
    match rustls_pemfile::private_key(&mut reader) {
        Ok(Some(_)) => Ok(()),
        _ => Err(TlsError::NoKey {
            path: path.display().to_string(),
        }),
    }
}

/// Reads a PEM file (CA bundle) fully; callers hand the bytes to their client library.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(bytes.as_slice());
    if rustls_pemfile::certs(&mut reader).next().is_none() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(bytes)
}
