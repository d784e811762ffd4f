//! Client keys: the token a chat client gets at start and sends as `x-nexus-client-key`. A
//! JWT (HS256) binding tenant, session and participant, so any edge pod verifies it alone.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

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
}

#[derive(Clone)]
pub struct ClientKeys {
    secret: Vec<u8>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(<secret>)")
    }
}

impl ClientKeys {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        match HmacSha256::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts every key length"),
        }
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
    /// The signature is checked in constant time.
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
        }
    }

    #[test]
    fn issued_keys_verify_and_tampered_ones_do_not() {
        let keys = ClientKeys::new(b"secret");
        let token = keys.issue(&claims());
        assert_eq!(keys.verify(&token), Some(claims()));
        assert_eq!(ClientKeys::new(b"other").verify(&token), None);
        let (head, _) = token.rsplit_once('.').expect("dot");
        let forged_payload = B64.encode(br#"{"tid":"t2","sid":"s1","pid":"p1","iat":1}"#);
        let (h, _) = head.split_once('.').expect("dot");
        let forged = format!(
            "{h}.{forged_payload}.{}",
            token.rsplit_once('.').expect("dot").1
        );
        assert_eq!(keys.verify(&forged), None);
        assert_eq!(keys.verify("garbage"), None);
    }
}
