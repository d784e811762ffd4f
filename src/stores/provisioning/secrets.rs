//! Secrets of provisioning: API keys, agent and bot tokens (random, stored as SHA-256, compared
//! in constant time) and bot credentials (encrypted at rest with XChaCha20-Poly1305).

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of tenant API keys, so a leaked key is recognisable (secret scanners, logs).
pub const API_KEY_PREFIX: &str = "nxk_";
/// Prefix of agent tokens.
pub const AGENT_TOKEN_PREFIX: &str = "nxa_";
/// Prefix of bot API tokens.
pub const BOT_TOKEN_PREFIX: &str = "nxb_";

/// Random bytes per token: 256 bits, beyond any guessing.
const TOKEN_BYTES: usize = 32;
/// XChaCha20's nonce is 192 bits, so random nonces never collide in practice.
const NONCE_BYTES: usize = 24;

/// A freshly generated token: `raw` is shown once, `hash` is what gets stored.
pub struct NewToken {
    pub raw: String,
    pub hash: String,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").finish_non_exhaustive()
    }
}

/// A new random token `<prefix><43 base64url chars>` and its hash.
pub fn generate_token(prefix: &str) -> NewToken {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let raw = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash_token(&raw);
    NewToken { raw, hash }
}

/// Hex SHA-256 of a token. The tokens are 256 random bits, so a plain fast hash is the standard
/// choice (as for GitHub or Stripe keys): a slow password hash only helps low-entropy secrets,
/// and a deterministic hash lets a request find its key by index.
pub fn hash_token(raw: &str) -> String {
    format!("{:x}", Sha256::digest(raw.as_bytes()))
}

/// Whether a presented token matches a stored hash, in constant time.
pub fn token_matches(raw: &str, stored_hash: &str) -> bool {
    bool::from(hash_token(raw).as_bytes().ct_eq(stored_hash.as_bytes()))
}

/// The 32-byte key that encrypts bot credentials. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

impl EncryptionKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// 64 hex digits, or base64 (standard or URL-safe, padded or not) of 32 bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| e.to_string())?
        } else {
            [&STANDARD, &URL_SAFE]
                .iter()
                .find_map(|engine| engine.decode(text).ok())
                .or_else(|| URL_SAFE_NO_PAD.decode(text).ok())
                .or_else(|| {
                    base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(text)
                        .ok()
                })
                .ok_or_else(|| "is neither 64 hex digits nor base64".to_string())?
        };
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("must be 32 bytes, got {}", b.len()))?;
        Ok(Self(bytes))
    }

    /// The key in `path`, created (random, mode 0600) on first use: the `nexus dev` default.
    /// Written whole to a temporary file, then linked into place (which fails if a key is
    /// there): a crash or a second process starting at once never leaves a partial key. An
    /// empty file (a crash of a version that wrote in place) held no key anything was
    /// encrypted with, and is replaced.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        // The usual case: the key is there (nothing written, a read-only directory is fine).
        match std::fs::read_to_string(path) {
            Ok(text) if !text.is_empty() => return Self::read(path, &text),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let key = Self::generate();
        {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&tmp)?;
            let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
            file.write_all(hex.as_bytes())?;
            file.sync_all()?;
        }
        let mut linked = std::fs::hard_link(&tmp, path);
        if matches!(&linked, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists)
            && std::fs::metadata(path)?.len() == 0
        {
            std::fs::remove_file(path)?;
            linked = std::fs::hard_link(&tmp, path);
        }
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::read(path, &std::fs::read_to_string(path)?)
            }
            Err(e) => Err(e),
        }
    }

    fn read(path: &Path, text: &str) -> std::io::Result<Self> {
        Self::parse(text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("key file {}: {e}", path.display()),
            )
        })
    }
}

/// A stored ciphertext that cannot be opened: wrong key, wrong owner, or damaged.
#[derive(Debug, thiserror::Error)]
#[error("the stored credential cannot be decrypted (wrong key or damaged)")]
pub struct DecryptError;

/// Authenticated encryption of small secrets; `aad` binds a ciphertext to its owner so it
/// cannot be copied to another row.
#[derive(Clone)]
pub struct Cipher(XChaCha20Poly1305);

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(<redacted>)")
    }
}

impl Cipher {
    pub fn new(key: &EncryptionKey) -> Self {
        Self(XChaCha20Poly1305::new(&key.0.into()))
    }

    /// base64(nonce || ciphertext || tag).
    pub fn encrypt(&self, plaintext: &str, aad: &str) -> String {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plaintext.as_bytes(),
            aad: aad.as_bytes(),
        };
        // Encryption only fails for messages beyond 256 GiB; credentials are validated small.
        let sealed = self
            .0
            .encrypt(XNonce::from_slice(&nonce), payload)
            .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    pub fn decrypt(&self, stored: &str, aad: &str) -> Result<String, DecryptError> {
        let bytes = STANDARD.decode(stored).map_err(|_| DecryptError)?;
        if bytes.len() < NONCE_BYTES {
            return Err(DecryptError);
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let payload = Payload {
            msg: sealed,
            aad: aad.as_bytes(),
        };
        let plain = self
            .0
            .decrypt(XNonce::from_slice(nonce), payload)
            .map_err(|_| DecryptError)?;
        String::from_utf8(plain).map_err(|_| DecryptError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_verify_by_hash() {
        let a = generate_token(API_KEY_PREFIX);
        let b = generate_token(API_KEY_PREFIX);
        assert!(
            a.raw.starts_with("nxk_") && a.raw.len() == 4 + 43,
            "{}",
            a.raw
        );
        assert_ne!(a.raw, b.raw);
        assert_eq!(a.hash.len(), 64);
        assert!(!a.hash.contains(&a.raw[4..]));
        assert!(token_matches(&a.raw, &a.hash));
        assert!(!token_matches(&b.raw, &a.hash));
        assert!(!format!("{a:?}").contains(&a.raw));
    }

    #[test]
    fn encryption_round_trips_and_is_bound_to_its_owner() {
        let cipher = Cipher::new(&EncryptionKey::generate());
        let sealed = cipher.encrypt("s3cret-credential", "t1/b1");
        assert!(!sealed.contains("s3cret"));
        assert_ne!(sealed, cipher.encrypt("s3cret-credential", "t1/b1"));
        assert_eq!(
            cipher.decrypt(&sealed, "t1/b1").expect("decrypt"),
            "s3cret-credential"
        );
        assert!(cipher.decrypt(&sealed, "t2/b1").is_err());
        let other = Cipher::new(&EncryptionKey::generate());
        assert!(other.decrypt(&sealed, "t1/b1").is_err());
        let mut damaged = STANDARD.decode(&sealed).expect("b64");
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(cipher.decrypt(&STANDARD.encode(damaged), "t1/b1").is_err());
        assert!(cipher.decrypt("not base64!", "t1/b1").is_err());
    }

    #[test]
    fn keys_parse_from_hex_or_base64_and_reject_other_lengths() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let k = EncryptionKey::parse(hex).expect("hex");
        let b64 = STANDARD.encode(k.0);
        assert_eq!(EncryptionKey::parse(&b64).expect("b64").0, k.0);
        assert_eq!(
            EncryptionKey::parse(&URL_SAFE_NO_PAD.encode(k.0))
                .expect("b64url")
                .0,
            k.0
        );
        let short = EncryptionKey::parse(&STANDARD.encode([1u8; 16])).unwrap_err();
        assert!(short.contains("32 bytes"), "{short}");
        assert!(EncryptionKey::parse("not a key").is_err());
        assert!(!format!("{k:?}").contains("0011"));
    }

    #[test]
    fn key_file_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/provisioning.key");
        let first = EncryptionKey::load_or_create(&path).expect("create");
        let again = EncryptionKey::load_or_create(&path).expect("reuse");
        assert_eq!(first.0, again.0);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Nothing but the key is left beside it.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["provisioning.key"]);
    }

    /// An empty key file (an older version crashed between creating and writing it) held no
    /// key: it is replaced, where every start failed before.
    #[test]
    fn an_empty_key_file_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("provisioning.key");
        std::fs::write(&path, "").expect("empty");
        let key = EncryptionKey::load_or_create(&path).expect("replaced");
        assert_eq!(
            EncryptionKey::load_or_create(&path).expect("reuse").0,
            key.0
        );
    }

    /// Processes starting together end up with one key.
    #[test]
    fn racing_creators_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("provisioning.key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| EncryptionKey::load_or_create(&path).expect("key").0))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }
}
