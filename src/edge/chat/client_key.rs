//! Client keys: the token a chat client gets at start and sends as `x-nexus-client-key`. A
//! JWT (HS256) binding tenant, session and participant, so any edge pod verifies it alone.
//! Keys expire (`exp`, from `chat.client_key_ttl_s`); keys issued before they carried `exp`
//! expire `ttl` after `iat`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// How far the clocks of the edge pods (issuer and verifier) may disagree: a key counts as
/// expired only this long after its `exp`.
pub const CLOCK_SKEW_S: i64 = 60;

/// What a client key proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Tenant.
    pub tid: String,
    /// Session (conversation) id.
    pub sid: String,
    /// The customer's participant id.
    pub pid: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch; absent in keys issued before keys expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<i64>,
}

#[derive(Clone)]
pub struct ClientKeys {
    /// The HMAC keyed with the secret once (its inner and outer pads hashed), cloned per key.
    keyed: HmacSha256,
    /// Lifetime of a key, seconds.
    ttl_s: i64,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(<secret>)")
    }
}

impl ClientKeys {
    /// Keys signed with `secret` that live `ttl_s` seconds.
    pub fn new(secret: &[u8], ttl_s: u64) -> Self {
        // HMAC takes keys of any length.
        let keyed = match HmacSha256::new_from_slice(secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts every key length"),
        };
        Self {
            keyed,
            ttl_s: i64::try_from(ttl_s).unwrap_or(i64::MAX),
        }
    }

    /// The `exp` of a key issued at `iat`.
    pub fn expiry(&self, iat: i64) -> i64 {
        iat.saturating_add(self.ttl_s)
    }

    /// Whether a verified key is past its expiry at `now_s` (beyond [`CLOCK_SKEW_S`]). A key
    /// without `exp` lives `ttl` from `iat`.
    pub fn expired(&self, claims: &Claims, now_s: i64) -> bool {
        now_s > self.valid_until(claims)
    }

    /// The last second (since the epoch) a verified key is accepted, skew included.
    pub fn valid_until(&self, claims: &Claims) -> i64 {
        let exp = claims.exp.unwrap_or_else(|| self.expiry(claims.iat));
        exp.saturating_add(CLOCK_SKEW_S)
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signing = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
        let mut mac = self.mac();
        mac.update(signing.as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        format!("{signing}.{sig}")
    }

    /// The claims of a key this edge (or one with the same secret) issued; `None` otherwise.
    /// The signature is checked in constant time; expiry is the caller's check ([`Self::expired`]),
    /// made after it knows the key is for the session at hand.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let (signing, sig) = token.rsplit_once('.')?;
        let (header, payload) = signing.split_once('.')?;
        let sig = B64.decode(sig).ok()?;
        let mut mac = self.mac();
        mac.update(signing.as_bytes());
        mac.verify_slice(&sig).ok()?;
        if B64.decode(header).ok()? != HEADER.as_bytes() {
            return None;
        }
        serde_json::from_slice(&B64.decode(payload).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            tid: "t1".into(),
            sid: "s1".into(),
            pid: "p1".into(),
            iat: 1,
            exp: Some(3601),
        }
    }

    #[test]
    fn issued_keys_verify_and_tampered_ones_do_not() {
        let keys = ClientKeys::new(b"secret", 3600);
        let token = keys.issue(&claims());
        assert_eq!(keys.verify(&token), Some(claims()));
        assert_eq!(ClientKeys::new(b"other", 3600).verify(&token), None);
        let (head, _) = token.rsplit_once('.').expect("dot");
        let forged_payload =
            B64.encode(br#"{"tid":"t2","sid":"s1","pid":"p1","iat":1,"exp":3601}"#);
        let (h, _) = head.split_once('.').expect("dot");
        let forged = format!(
            "{h}.{forged_payload}.{}",
            token.rsplit_once('.').expect("dot").1
        );
        assert_eq!(keys.verify(&forged), None);
        assert_eq!(keys.verify("garbage"), None);
    }

    #[test]
    fn keys_expire_after_exp_plus_the_clock_skew() {
        let keys = ClientKeys::new(b"secret", 3600);
        let c = keys
            .verify(&keys.issue(&claims()))
            .expect("verifies: expiry is checked apart");
        assert_eq!(c.exp, Some(keys.expiry(1)));
        assert!(!keys.expired(&c, 3601));
        assert!(!keys.expired(&c, 3601 + CLOCK_SKEW_S));
        assert!(keys.expired(&c, 3602 + CLOCK_SKEW_S));
        // `exp` wins over the configured ttl, either way.
        let short = Claims {
            exp: Some(10),
            ..claims()
        };
        assert!(keys.expired(&short, 11 + CLOCK_SKEW_S));
        let long = Claims {
            exp: Some(100_000),
            ..claims()
        };
        assert!(!keys.expired(&long, 50_000));
    }

    #[test]
    fn keys_without_exp_still_verify_until_iat_plus_ttl() {
        let keys = ClientKeys::new(b"secret", 3600);
        // A key as issued before keys carried `exp`: the payload has no such field.
        let legacy = Claims {
            exp: None,
            ..claims()
        };
        let token = keys.issue(&legacy);
        let payload = token.split('.').nth(1).expect("payload");
        let json = String::from_utf8(B64.decode(payload).expect("b64")).expect("utf8");
        assert!(!json.contains("exp"), "{json}");
        let c = keys.verify(&token).expect("verifies");
        assert_eq!(c, legacy);
        assert!(!keys.expired(&c, 1 + 3600 + CLOCK_SKEW_S));
        assert!(keys.expired(&c, 2 + 3600 + CLOCK_SKEW_S));
        // The ttl in force decides.
        assert!(ClientKeys::new(b"secret", 60).expired(&c, 62 + CLOCK_SKEW_S));
    }
}
