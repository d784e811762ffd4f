//! Serving the edge: plain HTTP, or HTTPS/WSS through rustls when a certificate and key are
//! configured; on shutdown stops accepting and lets in-flight requests finish within the grace.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use axum_server::Handle;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("http.listen `{0}` is not an address")]
    Address(String),
    #[error("TLS certificate/key: {0}")]
    Tls(String),
    #[error("cannot serve on {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
}

/// A bound listener, so callers learn the port before serving (tests bind port 0).
pub struct Bound {
    pub addr: SocketAddr,
    listener: std::net::TcpListener,
    tls: Option<RustlsConfig>,
}

/// Binds the listener and loads TLS material.
pub async fn bind(config: &HttpConfig) -> Result<Bound, ServeError> {
    let addr: SocketAddr = config
        .listen
        .parse()
        .map_err(|_| ServeError::Address(config.listen.clone()))?;
    let listener = std::net::TcpListener::bind(addr).map_err(|source| ServeError::Io {
        addr: addr.to_string(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::Io {
            addr: addr.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Io {
        addr: addr.to_string(),
        source,
    })?;
    let tls = if config.tls_cert_file.is_empty() {
        None
    } else {
        crate::tls::install_crypto_provider();
        Some(
            RustlsConfig::from_pem_file(&config.tls_cert_file, &config.tls_key_file)
                .await
                .map_err(|e| ServeError::Tls(e.to_string()))?,
        )
    };
    Ok(Bound {
        addr,
        listener,
        tls,
    })
}

impl Bound {
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves until `shutdown`, then drains for at most `grace`.
    pub async fn serve(
        self,
        app: Router,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), ServeError> {
        let handle = Handle::new();
        let drain = handle.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            drain.graceful_shutdown(Some(grace));
        });
        let addr = self.addr.to_string();
        let service = app.into_make_service();
        // No Nagle: a socket push is a small write with no answer to carry the peer's ACK, so
        // with Nagle the next push can wait for a delayed ACK (up to 40 ms on Linux).
        let result = match self.tls {
            Some(tls) => {
                let acceptor = RustlsAcceptor::new(tls).acceptor(NoDelayAcceptor::new());
                axum_server::from_tcp(self.listener)
                    .acceptor(acceptor)
                    .handle(handle)
                    .serve(service)
                    .await
            }
            None => {
                axum_server::from_tcp(self.listener)
                    .acceptor(NoDelayAcceptor::new())
                    .handle(handle)
                    .serve(service)
                    .await
            }
        };
        result.map_err(|source| ServeError::Io { addr, source })
    }
}
