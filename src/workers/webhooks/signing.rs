//! Signatures of outgoing bodies: `X-Hub-Signature: sha1=<hex HMAC-SHA1(secret, body)>` for the
//! genesys format, and Standard Webhooks `webhook-signature` (one `v1,` entry per live secret).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use crate::stores::provisioning::webhooks::secret_key;
use crate::stores::provisioning::{SigningSecrets, WebhookFormat};

/// `sha1=<hex>` of the body under the genesys secret.
pub fn hub_signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha1={hex}")
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The `webhook-signature` header: the current secret's signature, then the replaced ones'
/// while their rotation's overlap lasts (receivers accept any entry that verifies).
pub fn standard_header(secrets: &SigningSecrets, id: &str, timestamp: i64, body: &[u8]) -> String {
    std::iter::once(&secrets.current)
        .chain(&secrets.previous)
        .filter_map(|s| secret_key(WebhookFormat::Standard, s))
        .map(|key| standard_signature(&key, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_signature_matches_the_specs_example() {
        // The example of the Standard Webhooks specification.
        let key = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("b64");
        let sig = standard_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn hub_signature_is_hex_hmac_sha1() {
        // RFC 2202 test case 2.
        assert_eq!(
            hub_signature("Jefe", b"what do ya want for nothing?"),
            "sha1=effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn rotation_signs_with_both_secrets() {
        let a = format!("whsec_{}", STANDARD.encode([1u8; 24]));
        let b = format!("whsec_{}", STANDARD.encode([2u8; 24]));
        let one = SigningSecrets {
            current: a.clone(),
            previous: vec![],
        };
        let two = SigningSecrets {
            current: b,
            previous: vec![a],
        };
        let h1 = standard_header(&one, "msg_1", 10, b"{}");
        let h2 = standard_header(&two, "msg_1", 10, b"{}");
        assert_eq!(h2.split(' ').count(), 2);
        assert!(h2.ends_with(&h1), "{h2} / {h1}");
    }
}
