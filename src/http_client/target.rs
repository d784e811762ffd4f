//! Which addresses customer-set targets (webhook endpoints, bot URLs) may have: no private,
//! loopback, link-local or otherwise internal one unless allowed by config. Checked when the
//! target is written and again at send time, where a DNS resolver drops such answers (DNS
//! rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{0}` is not an http(s) URL with a host")]
    BadUrl(String),
    #[error("the target {0} is in a private, loopback or link-local range")]
    Private(String),
}

/// Whether `ip` must not be a customer-set target.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal_v4(v4),
            None => internal_v6(v6),
        },
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        // 100.64.0.0/10 carrier-grade NAT, 0.0.0.0/8 "this network", 192.0.0.0/24 protocol
        // assignments, 198.18.0.0/15 benchmarking: none is a public receiver.
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || o[0] == 0
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        // 240.0.0.0/4 reserved, broadcast included: not routed on the internet, yet some
        // clouds number pods and services from it (GKE's class E ranges), so it can be
        // internal. The documentation networks (192.0.2.0/24, 198.51.100.0/24,
        // 203.0.113.0/24) hold no receiver either.
        || o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        internal_v4(Ipv4Addr::new(a, b, c, d))
    };
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        // fc00::/7 unique local, fe80::/10 link-local, fec0::/10 site-local (deprecated, yet
        // still routed inside the sites that used it), 2001:db8::/32 documentation, 100::/64
        // discard-only.
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || s[..2] == [0x2001, 0x0db8]
        || s[..4] == [0x0100, 0, 0, 0]
        // Forms that carry an IPv4 address, which a gateway may turn into that address:
        // IPv4-compatible ::a.b.c.d, IPv4-translated ::ffff:0:a.b.c.d, NAT64 64:ff9b::/96,
        // 6to4 2002:AABB:CCDD::/48; the local-use NAT64 prefix 64:ff9b:1::/48 whole (where
        // the IPv4 address sits depends on the site's prefix length, and nothing public is
        // in it).
        || (s[..6] == [0; 6] && embedded(s[6], s[7]))
        || (s[..6] == [0, 0, 0, 0, 0xffff, 0] && embedded(s[6], s[7]))
        || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && embedded(s[6], s[7]))
        || (s[..3] == [0x64, 0xff9b, 1])
        || (s[0] == 0x2002 && embedded(s[1], s[2]))
}

/// How long [`check_url`] waits for DNS: it runs inside an admin request, and a slow resolver
/// would otherwise hold that request (and its client) for the system resolver's whole retry
/// cycle. A name not resolved by then is accepted, as one that does not resolve yet.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Checks a URL: an IP-literal host directly, a name through DNS (a name that does not
/// resolve yet, or not within [`LOOKUP_TIMEOUT`], is accepted; send time checks again).
pub async fn check_url(url: &str, allow_private: bool) -> Result<(), TargetError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| TargetError::BadUrl(url.to_string()))?;
    if allow_private {
        return Ok(());
    }
    if let Some(ip) = literal_ip(&parsed) {
        return if is_internal(ip) {
            Err(TargetError::Private(ip.to_string()))
        } else {
            Ok(())
        };
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| TargetError::BadUrl(url.to_string()))?;
    let port = parsed.port_or_known_default().unwrap_or(443);
    check_resolved(host, tokio::net::lookup_host((host, port)), LOOKUP_TIMEOUT).await
}

/// Refuses `host` if `lookup` answers an internal address within `limit`.
async fn check_resolved<I>(
    host: &str,
    lookup: impl std::future::Future<Output = std::io::Result<I>>,
    limit: std::time::Duration,
) -> Result<(), TargetError>
where
    I: Iterator<Item = SocketAddr>,
{
    match tokio::time::timeout(limit, lookup).await {
        Ok(Ok(addrs)) => {
            for a in addrs {
                if is_internal(a.ip()) {
                    return Err(TargetError::Private(format!("{host} ({})", a.ip())));
                }
            }
            Ok(())
        }
        Ok(Err(_)) => Ok(()),
        Err(_) => {
            tracing::debug!(%host, "no DNS answer in time; the target is checked again at send time");
            Ok(())
        }
    }
}

/// The host of `url` when it is an IP literal (the resolver is not asked for those).
pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
}

/// The name a request's send-time resolver refused (it answered only internal addresses), if
/// that is why `e` (a request error, causes included) failed: the target policy's refusal,
/// not a receiver that is down.
pub fn refused_name<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a str> {
    std::iter::successors(Some(e), |e| e.source()).find_map(|e| match e.downcast_ref() {
        Some(TargetError::Private(name)) => Some(name.as_str()),
        _ => None,
    })
}

/// A resolver that answers only public addresses.
#[derive(Debug, Clone, Default)]
pub struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(Box::new(TargetError::Private(host))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// The resolver the worker's client uses, or `None` (system resolver) when private targets
/// are allowed.
pub fn resolver(allow_private: bool) -> Option<Arc<PublicOnly>> {
    (!allow_private).then(|| Arc::new(PublicOnly))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that never answers does not hold the admin request: the name is accepted
    /// after the limit (send time checks it again); an internal answer in time is refused.
    #[tokio::test]
    async fn a_silent_resolver_does_not_hold_the_check() {
        let never = std::future::pending::<std::io::Result<std::vec::IntoIter<SocketAddr>>>();
        let limit = std::time::Duration::from_millis(50);
        let checked = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            check_resolved("slow.example", never, limit),
        )
        .await;
        assert!(matches!(checked, Ok(Ok(()))), "{checked:?}");
        let internal = async { Ok(vec![SocketAddr::from(([10, 0, 0, 1], 443))].into_iter()) };
        assert!(matches!(
            check_resolved("inside.example", internal, limit).await,
            Err(TargetError::Private(name)) if name == "inside.example (10.0.0.1)"
        ));
    }

    #[test]
    fn internal_ranges_are_recognised() {
        for ip in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
            "64:ff9b:1::a9fe:a9fe",
            "64:ff9b:1:2::808:808",
            "::ffff:0:7f00:1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:5db8:d822::1",
            "::ffff:0:808:808",
        ] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }

    /// Special-purpose ranges no public receiver lives in, beyond the private ones: IPv4
    /// 240.0.0.0/4 (reserved; some clouds number pods and services from it), the documentation
    /// networks; IPv6 site-local fec0::/10, documentation 2001:db8::/32 and discard-only
    /// 100::/64; and the IPv6 forms that carry such an IPv4 address.
    #[tokio::test]
    async fn reserved_documentation_and_site_local_ranges_are_internal() {
        for ip in [
            "240.0.0.1",
            "250.10.0.5",
            "255.255.255.254",
            "192.0.2.10",
            "198.51.100.7",
            "203.0.113.9",
            "::ffff:240.0.0.1",
            "64:ff9b::f000:1",
            "2002:f000:1::1",
            "fec0::1",
            "feff:ffff::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["223.255.255.1", "198.52.0.1", "2001:db9::1", "101::1"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for url in [
            "http://240.0.0.1/x",
            "http://4026531841/x",
            "http://[fec0::1]/x",
        ] {
            assert!(check_url(url, false).await.is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn urls_with_internal_literals_or_names_are_refused() {
        assert!(check_url("http://127.0.0.1:9/x", false).await.is_err());
        assert!(check_url("http://[::1]/x", false).await.is_err());
        assert!(check_url("http://localhost/x", false).await.is_err());
        assert!(check_url("http://127.0.0.1:9/x", true).await.is_ok());
        assert!(check_url("https://93.184.216.34/x", false).await.is_ok());
    }

    #[tokio::test]
    async fn the_send_time_resolver_drops_internal_answers() {
        let name: Name = "localhost".parse().expect("name");
        assert!(PublicOnly.resolve(name).await.is_err());
        assert!(resolver(true).is_none() && resolver(false).is_some());
    }
}
