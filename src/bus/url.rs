//! Parsing the bus URL: `embedded://<dir>`, `kafka://host:port[,host:port]` (`kafka+ssl://` for
//! TLS), `nats://host:port` (`tls://` for TLS).

use std::path::PathBuf;

use super::BusError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUrl {
    Embedded { dir: PathBuf },
    Kafka { brokers: String, tls: bool },
    Nats { url: String, tls: bool },
}

impl BusUrl {
    pub fn parse(url: &str) -> Result<Self, BusError> {
        // Errors quote the URL without the password a NATS URL may carry (`nats://u:p@h:p`).
        let shown = crate::config::redact_url_password(url);
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| BusError::Config(format!("`{shown}` is not a URL (scheme://...)")))?;
        if rest.is_empty() {
            return Err(BusError::Config(format!("`{shown}` names no address")));
        }
        match scheme {
            "embedded" => Ok(BusUrl::Embedded { dir: PathBuf::from(rest) }),
            "kafka" | "kafka+ssl" => {
                for broker in rest.split(',') {
                    check_host_port(broker, &shown)?;
                }
                Ok(BusUrl::Kafka { brokers: rest.to_string(), tls: scheme == "kafka+ssl" })
            }
            "nats" | "tls" => {
                for server in rest.split(',') {
                    check_host_port(server.rsplit('@').next().unwrap_or(server), &shown)?;
                }
                Ok(BusUrl::Nats { url: url.to_string(), tls: scheme == "tls" })
            }
            other => Err(BusError::Config(format!(
                "unknown bus scheme `{other}` (use embedded://, kafka://, kafka+ssl://, nats:// or tls://)"
            ))),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            BusUrl::Embedded { .. } => "embedded",
            BusUrl::Kafka { .. } => "kafka",
            BusUrl::Nats { .. } => "jetstream",
        }
    }
}

fn check_host_port(addr: &str, url: &str) -> Result<(), BusError> {
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(BusError::Config(format!(
            "`{addr}` in `{url}` is not host:port"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        assert_eq!(
            BusUrl::parse("embedded://./.nexus/bus").unwrap(),
            BusUrl::Embedded {
                dir: PathBuf::from("./.nexus/bus")
            }
        );
        assert_eq!(
            BusUrl::parse("kafka://a:9092,b:9093").unwrap(),
            BusUrl::Kafka {
                brokers: "a:9092,b:9093".into(),
                tls: false
            }
        );
        assert!(matches!(
            BusUrl::parse("kafka+ssl://a:9093").unwrap(),
            BusUrl::Kafka { tls: true, .. }
        ));
        assert!(matches!(
            BusUrl::parse("tls://n:4222").unwrap(),
            BusUrl::Nats { tls: true, .. }
        ));
        assert!(BusUrl::parse("kafka://nohost").is_err());
        assert!(BusUrl::parse("redis://x:1").is_err());
        assert!(BusUrl::parse("embedded://").is_err());
        let e = BusUrl::parse("nats://u:s3cret@nats")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nats") && !e.contains("s3cret"), "{e}");
    }
}
