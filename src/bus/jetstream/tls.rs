//! What a failed TLS handshake with the NATS server means for the operator: the rustls error
//! in a connect error's source chain, worded with the setting that fixes it. async-nats files
//! a certificate the client refused under its `Io` kind, which alone reads as an outage.

use std::error::Error as StdError;

use rustls::{AlertDescription, CertificateError};

use crate::config::BusConfig;

/// The rustls error somewhere in `e`'s source chain. tokio-rustls hands it over inside an
/// `io::Error`, whose own `source()` skips it, so each `io::Error` is opened too.
pub(super) fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>());
        if inner.is_some() {
            return inner;
        }
        next = e.source();
    }
    None
}

/// The cause of a failed handshake and what to change, naming the `bus.*` setting.
pub(super) fn explain(e: &rustls::Error, config: &BusConfig) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => server_certificate(c, config),
        rustls::Error::AlertReceived(alert) => client_certificate(*alert, config),
        other => format!("TLS handshake failed: {other}"),
    }
}

/// The client refused the server's certificate.
fn server_certificate(c: &CertificateError, config: &BusConfig) -> String {
    let untrusted = || {
        if config.ca_file.is_empty() {
            "bus.ca_file is not set, so only the system roots are trusted: set it to the PEM \
             bundle of the CA that signed the server's certificate"
                .to_string()
        } else {
            format!(
                "bus.ca_file ({}) does not hold the CA that signed the server's certificate",
                config.ca_file
            )
        }
    };
    match c {
        CertificateError::UnknownIssuer => format!(
            "certificate verification failed: unknown issuer (the NATS server's certificate is \
             not signed by a trusted CA); {}",
            untrusted()
        ),
        CertificateError::BadSignature => format!(
            "certificate verification failed: bad signature on the NATS server's certificate; {}",
            untrusted()
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!(
                "certificate verification failed: the NATS server's certificate has expired ({c})"
            )
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("certificate verification failed: the NATS server's certificate is not valid yet ({c})")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "certificate verification failed: the NATS server's certificate is not valid for \
                 the host in bus.url ({c})"
            )
        }
        other => format!("certificate verification failed: {other} (bus.ca_file)"),
    }
}

/// The server ended the handshake: with mutual TLS, mostly over the client's certificate.
fn client_certificate(alert: AlertDescription, config: &BusConfig) -> String {
    let refused = matches!(
        alert,
        AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure
    );
    if !refused {
        return format!("the NATS server ended the TLS handshake: {alert:?}");
    }
    if config.client_cert_file.is_empty() {
        format!(
            "the NATS server requires a client certificate (mutual TLS, alert {alert:?}): set \
             bus.client_cert_file and bus.client_key_file"
        )
    } else {
        format!(
            "the NATS server refused the client certificate in bus.client_cert_file ({}): alert \
             {alert:?}; it must be signed by a CA the server trusts",
            config.client_cert_file
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ca_file: &str) -> BusConfig {
        let mut c = crate::config::Config::defaults().bus;
        c.ca_file = ca_file.into();
        c
    }

    /// The shape async-nats hands over: its error around an `io::Error` around rustls's.
    #[test]
    fn the_rustls_error_is_found_inside_an_io_error() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let wrapped: Box<dyn StdError + Send + Sync> = Box::new(io);
        assert!(matches!(
            rustls_error(wrapped.as_ref()),
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
        let plain = std::io::Error::other("connection refused");
        assert!(rustls_error(&plain).is_none());
    }

    #[test]
    fn an_unknown_issuer_names_bus_ca_file() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let unset = explain(&e, &config(""));
        assert!(unset.contains("unknown issuer"), "{unset}");
        assert!(unset.contains("bus.ca_file is not set"), "{unset}");
        let wrong = explain(&e, &config("/etc/nexus/ca.pem"));
        assert!(
            wrong.contains("bus.ca_file (/etc/nexus/ca.pem) does not hold"),
            "{wrong}"
        );
    }

    #[test]
    fn a_required_client_certificate_names_the_settings() {
        let e = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        let m = explain(&e, &config(""));
        assert!(
            m.contains("bus.client_cert_file and bus.client_key_file"),
            "{m}"
        );
    }
}
