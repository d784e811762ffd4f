//! The provisioned objects as stored and answered, the requests that create or change them,
//! and their validation. No object holds a secret; raw keys and tokens exist only at creation.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize};

use super::ProvisioningError;

/// Default page size of a list.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size: bounds the work and the answer of one request.
pub const MAX_LIMIT: u32 = 500;

/// Longest name of any object (characters).
const MAX_NAME: usize = 200;
/// Longest identifier-like value: channel, skill, media type, attribute key.
const MAX_IDENT: usize = 64;
/// Longest attribute value, URL and credential.
const MAX_VALUE: usize = 2048;
/// Most entries in one list or map field.
const MAX_ENTRIES: usize = 100;
/// Highest capacity of an agent for one media type.
const MAX_CAPACITY: u32 = 1000;

/// What an API key may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Permission {
    Chat,
    SecureMail,
    Messaging,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub created_at_ms: i64,
}

/// A tenant's API key, without the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub permissions: Vec<Permission>,
    pub enabled: bool,
    /// Unix milliseconds after which the key is refused; `None` = never.
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

/// What a valid API key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyGrant {
    pub tenant_id: String,
    pub key_id: String,
    pub permissions: Vec<Permission>,
}

impl ApiKeyGrant {
    pub fn allows(&self, permission: Permission) -> bool {
        self.permissions.contains(&permission)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queue {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub skills: Vec<String>,
    /// Concurrent interactions per media type (`chat`, `email`, ...).
    pub capacity: BTreeMap<String, u32>,
    pub created_at_ms: i64,
}

/// Where a conversation on `channel` whose attributes include all of `attributes` goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingRule {
    pub id: String,
    pub tenant_id: String,
    pub channel: String,
    /// Every entry must equal the conversation's attribute of that key.
    pub attributes: BTreeMap<String, String>,
    pub queue_id: String,
    pub required_skills: Vec<String>,
    /// Higher first; rules of equal priority in creation order.
    pub priority: i32,
    /// A bot that handles the conversation before the queue, if any.
    pub bot_id: Option<String>,
    pub created_at_ms: i64,
}

impl RoutingRule {
    /// Whether a conversation on `channel` with `attributes` matches this rule.
    pub fn matches(&self, channel: &str, attributes: &BTreeMap<String, String>) -> bool {
        self.channel == channel
            && self
                .attributes
                .iter()
                .all(|(k, v)| attributes.get(k) == Some(v))
    }
}

/// A bot endpoint; its credential is stored encrypted and never answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BotEndpoint {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// Whole, as the worker calls it; answered as [`shown_endpoint_url`] shows it.
    #[serde(serialize_with = "serialize_endpoint_url")]
    pub url: String,
    pub has_credential: bool,
    pub created_at_ms: i64,
}

/// An API key as answered once, at creation: the only time `key` is shown.
#[derive(Clone, Serialize)]
pub struct CreatedApiKey {
    #[serde(flatten)]
    pub api_key: ApiKey,
    pub key: String,
}

/// An agent as answered at creation, with its token shown once.
#[derive(Clone, Serialize)]
pub struct CreatedAgent {
    #[serde(flatten)]
    pub agent: Agent,
    pub token: String,
}

/// A bot endpoint as answered at creation: the only time its bot API `token` is shown.
#[derive(Clone, Serialize)]
pub struct CreatedBot {
    #[serde(flatten)]
    pub bot: BotEndpoint,
    pub token: String,
}

/// A rotated bot API token, shown once.
#[derive(Clone, Serialize)]
pub struct BotToken {
    pub bot_id: String,
    pub token: String,
}

/// A rotated agent token, shown once.
#[derive(Clone, Serialize)]
pub struct AgentToken {
    pub agent_id: String,
    pub token: String,
}

/// `Debug` for an answer that carries a secret shown once: every field but the secret, so a
/// log line of it cannot leak it.
macro_rules! debug_without_secret {
    ($ty:ident { $($field:ident),* } hides $secret:ident) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .field(stringify!($secret), &"<redacted>")
                    .finish()
            }
        }
    };
}

pub(super) use debug_without_secret;

debug_without_secret!(CreatedApiKey { api_key } hides key);
debug_without_secret!(CreatedAgent { agent } hides token);
debug_without_secret!(CreatedBot { bot } hides token);
debug_without_secret!(BotToken { bot_id } hides token);
debug_without_secret!(AgentToken { agent_id } hides token);

// ---- requests ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub name: String,
    pub permissions: Vec<Permission>,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyPatch {
    pub name: Option<String>,
    pub permissions: Option<Vec<Permission>>,
    pub enabled: Option<bool>,
    /// Absent: unchanged; `null`: never expires.
    #[serde(default, deserialize_with = "nullable")]
    pub expires_at_ms: Option<Option<i64>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewQueue {
    pub name: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuePatch {
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgent {
    pub name: String,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub capacity: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    pub name: Option<String>,
    pub skills: Option<Vec<String>>,
    pub capacity: Option<BTreeMap<String, u32>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRoutingRule {
    pub channel: String,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub queue_id: String,
    #[serde(default)]
    pub required_skills: Vec<String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub bot_id: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRulePatch {
    pub channel: Option<String>,
    pub attributes: Option<BTreeMap<String, String>>,
    pub queue_id: Option<String>,
    pub required_skills: Option<Vec<String>>,
    pub priority: Option<i32>,
    /// Absent: unchanged; `null`: no bot.
    #[serde(default, deserialize_with = "nullable")]
    pub bot_id: Option<Option<String>>,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewBot {
    pub name: String,
    pub url: String,
    pub credential: String,
}

#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotPatch {
    pub name: Option<String>,
    pub url: Option<String>,
    pub credential: Option<String>,
}

// The credential must never reach a log line through `{:?}`.
impl fmt::Debug for NewBot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewBot")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("credential", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for BotPatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BotPatch")
            .field("name", &self.name)
            .field("url", &self.url)
            .field(
                "credential",
                &self.credential.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// `Some(None)` for an explicit `null`, so PATCH can clear a field (absent = `None` via default).
fn nullable<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

// ---- pages ------------------------------------------------------------------------------

/// One page of a list; `next` is the opaque cursor of the following page, `None` at the end.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Which page to read: at most `limit` items with ids after the cursor's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: u32,
    /// The last id of the previous page (decoded from the cursor).
    pub after: Option<String>,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            after: None,
        }
    }
}

impl PageRequest {
    /// From the `limit` and `after` query parameters.
    pub fn new(limit: Option<u32>, after: Option<&str>) -> Result<Self, ProvisioningError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(invalid("limit", format!("must be 1 to {MAX_LIMIT}")));
        }
        let after = match after {
            None | Some("") => None,
            Some(cursor) => Some(decode_cursor(cursor)?),
        };
        Ok(Self { limit, after })
    }
}

/// The cursor after `id`: opaque to clients so the keyset can change.
pub fn encode_cursor(id: &str) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// Separates a cursor's list from its id. A control character: no id or list name holds one,
/// and pods of the version before scoped cursors refuse a cursor holding one (loudly), where
/// a printable separator would have them read the whole text as an id and answer an empty
/// page during a rolling upgrade.
const SCOPE_SEPARATOR: char = '\u{1f}';

/// The cursor after `id` in the list `scope` (its kind and, under a tenant, the tenant): a
/// cursor is a position in one list only, so one handed to another list or tenant is refused
/// rather than read as a position there, which would skip that list's items silently.
pub fn scoped_cursor(scope: &str, id: &str) -> String {
    encode_cursor(&format!("{scope}{SCOPE_SEPARATOR}{id}"))
}

/// Longest decoded cursor: a list name, a tenant id and an id.
const MAX_CURSOR: usize = 256;

fn decode_cursor(cursor: &str) -> Result<String, ProvisioningError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_CURSOR
                && !id.chars().any(|c| c.is_control() && c != SCOPE_SEPARATOR)
        })
        .ok_or_else(|| invalid("after", "is not a cursor this API returned"))
}

impl PageRequest {
    /// The id the page of list `scope` starts after: `None` for the first page; the cursor must
    /// be one that list returned ([`scoped_cursor`]).
    pub fn after_in(&self, scope: &str) -> Result<Option<&str>, ProvisioningError> {
        let Some(cursor) = &self.after else {
            return Ok(None);
        };
        // A bare id: a cursor of the version before scoped cursors, still in a client's hands
        // across a rolling upgrade. Taken as the position it was; its list cannot be checked.
        if !cursor.contains(SCOPE_SEPARATOR) {
            return Ok(Some(cursor.as_str()));
        }
        cursor
            .strip_prefix(scope)
            .and_then(|rest| rest.strip_prefix(SCOPE_SEPARATOR))
            .filter(|id| !id.is_empty())
            .map(Some)
            .ok_or_else(|| invalid("after", "is not a cursor of this list"))
    }
}

// ---- validation -------------------------------------------------------------------------

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> ProvisioningError {
    ProvisioningError::Invalid {
        field,
        message: message.into(),
    }
}

/// A display name: trimmed, 1..=200 characters, no control characters.
pub(super) fn name(field: &'static str, value: &str) -> Result<String, ProvisioningError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if v.chars().count() > MAX_NAME {
        return Err(invalid(
            field,
            format!("must be at most {MAX_NAME} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(v.to_string())
}

/// An identifier: 1..=64 of `a-z A-Z 0-9 . _ -`.
pub(super) fn ident(field: &'static str, value: &str) -> Result<String, ProvisioningError> {
    if value.is_empty() || value.len() > MAX_IDENT {
        return Err(invalid(
            field,
            format!("`{}` must be 1 to {MAX_IDENT} characters", shown(value)),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            field,
            format!(
                "`{}` may only contain letters, digits, `.`, `_` and `-`",
                shown(value)
            ),
        ));
    }
    Ok(value.to_string())
}

/// A skill list: identifiers, deduplicated, sorted.
pub(super) fn skills(
    field: &'static str,
    values: &[String],
) -> Result<Vec<String>, ProvisioningError> {
    if values.len() > MAX_ENTRIES {
        return Err(invalid(field, format!("at most {MAX_ENTRIES} entries")));
    }
    let mut out = values
        .iter()
        .map(|s| ident(field, s))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

pub(super) fn capacity(
    values: &BTreeMap<String, u32>,
) -> Result<BTreeMap<String, u32>, ProvisioningError> {
    if values.len() > MAX_ENTRIES {
        return Err(invalid(
            "capacity",
            format!("at most {MAX_ENTRIES} entries"),
        ));
    }
    for (media, n) in values {
        ident("capacity", media)?;
        if *n > MAX_CAPACITY {
            return Err(invalid(
                "capacity",
                format!("`{media}`: at most {MAX_CAPACITY}"),
            ));
        }
    }
    Ok(values.clone())
}

pub(super) fn attributes(
    values: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ProvisioningError> {
    if values.len() > MAX_ENTRIES {
        return Err(invalid(
            "attributes",
            format!("at most {MAX_ENTRIES} entries"),
        ));
    }
    for (key, value) in values {
        ident("attributes", key)?;
        if value.len() > MAX_VALUE {
            return Err(invalid(
                "attributes",
                format!("`{key}`: at most {MAX_VALUE} bytes"),
            ));
        }
    }
    Ok(values.clone())
}

pub(super) fn permissions(values: &[Permission]) -> Result<Vec<Permission>, ProvisioningError> {
    let mut out = values.to_vec();
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err(invalid("permissions", "name at least one permission"));
    }
    Ok(out)
}

/// Below this an expiry is taken for seconds sent as milliseconds (it would be before
/// 2001-09-09): refused rather than answered with a key that is already expired.
const MIN_EXPIRY_MS: i64 = 1_000_000_000_000;

/// The last millisecond of year 9999 (9999-12-31T23:59:59.999Z): the latest time RFC 3339 and
/// JavaScript's `Date` write, and far inside the integers a JavaScript number holds exactly
/// (2^53), so a client reading the value back gets the one it stored rather than a rounding.
pub const MAX_EXPIRY_MS: i64 = 253_402_300_799_999;

pub(super) fn expiry(value: Option<i64>) -> Result<Option<i64>, ProvisioningError> {
    match value {
        Some(ms) if ms < MIN_EXPIRY_MS => Err(invalid(
            "expires_at_ms",
            format!(
                "must be a Unix time in milliseconds ({ms} looks like seconds or is not a time)"
            ),
        )),
        Some(ms) if ms > MAX_EXPIRY_MS => Err(invalid(
            "expires_at_ms",
            format!(
                "must be at most {MAX_EXPIRY_MS} (9999-12-31T23:59:59.999Z); {ms} is past it \
                 (omit it, or send null, for a key that never expires)"
            ),
        )),
        other => Ok(other),
    }
}

/// An input echoed in an error: at most 64 characters of it, so a huge value does not come
/// back whole.
pub fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_string(),
    }
}

/// An absolute `http` or `https` URL.
pub(super) fn url(value: &str) -> Result<String, ProvisioningError> {
    if value.len() > MAX_VALUE {
        return Err(invalid("url", format!("at most {MAX_VALUE} bytes")));
    }
    // The parser would drop them, and the raw value is what is stored and called.
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid(
            "url",
            "must not contain spaces or control characters",
        ));
    }
    let parsed = reqwest::Url::parse(value).map_err(|e| {
        let value = crate::config::redact_url_password(value);
        invalid("url", format!("`{}`: {e}", shown(&value)))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid(
            "url",
            "must be an http:// or https:// URL with a host",
        ));
    }
    // Logs may show the URL and answers mask its user info (`shown_endpoint_url`): a secret
    // has no place in it (a bot's goes in `credential`, encrypted; a webhook is signed with
    // its own secret).
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "url",
            "must not carry a user or password (a bot's secret goes in `credential`)",
        ));
    }
    Ok(value.to_string())
}

/// What a user or password of a stored endpoint URL is answered as.
const MASKED_USERINFO: &str = "***";

/// A stored bot or webhook URL as answers show it: a user or password masked. Writes refuse
/// them (see [`url`]), but rows written before 2026-12-05 may hold one. Those rows keep their
/// URL as stored, since the worker's calls still send it (as Basic auth); only what is
/// answered hides it. A lone user is masked too: it may be the secret (`https://token@host`).
pub fn shown_endpoint_url(value: &str) -> std::borrow::Cow<'_, str> {
    let Ok(mut parsed) = reqwest::Url::parse(value) else {
        // Every stored URL parsed when it was written; one that no longer does is masked
        // in every way it could be read.
        return crate::config::redact_url_password(value).into();
    };
    let masked = if parsed.password().is_some() {
        parsed.set_password(Some(MASKED_USERINFO))
    } else if !parsed.username().is_empty() {
        parsed.set_username(MASKED_USERINFO)
    } else {
        // Answered as written, not as the parser would normalize it.
        return value.into();
    };
    match masked {
        Ok(()) => parsed.to_string().into(),
        Err(()) => crate::config::redact_url_password(value).into(),
    }
}

/// Serde's view of [`shown_endpoint_url`]: every serialized bot or webhook hides user info.
pub(super) fn serialize_endpoint_url<S: serde::Serializer>(
    value: &str,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&shown_endpoint_url(value))
}

/// Checks a URL as the store will (`INVALID_FIELD`, naming the field), for a caller that must
/// judge its target afterwards: only a URL that passes is worth resolving.
pub fn validate_url(value: &str) -> Result<(), ProvisioningError> {
    url(value).map(|_| ())
}

pub(super) fn credential(value: &str) -> Result<(), ProvisioningError> {
    if value.is_empty() {
        return Err(invalid("credential", "must not be empty"));
    }
    if value.len() > MAX_VALUE {
        return Err(invalid("credential", format!("at most {MAX_VALUE} bytes")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_requests_check_limit_and_cursor() {
        assert_eq!(PageRequest::new(None, None).expect("default").limit, 50);
        assert!(PageRequest::new(Some(0), None).is_err());
        assert!(PageRequest::new(Some(501), None).is_err());
        let cursor = encode_cursor("0193a4b2-0000-7000-8000-000000000001");
        let p = PageRequest::new(Some(500), Some(&cursor)).expect("cursor");
        assert_eq!(
            p.after.as_deref(),
            Some("0193a4b2-0000-7000-8000-000000000001")
        );
        assert!(matches!(
            PageRequest::new(None, Some("!!")),
            Err(ProvisioningError::Invalid { field: "after", .. })
        ));
    }

    #[test]
    fn a_cursor_belongs_to_its_list() {
        let cursor = scoped_cursor("queues/t1", "0193a4b2-0000-7000-8000-000000000001");
        let p = PageRequest::new(None, Some(&cursor)).expect("cursor");
        assert_eq!(
            p.after_in("queues/t1").expect("its list"),
            Some("0193a4b2-0000-7000-8000-000000000001")
        );
        for other in ["queues/t2", "queues/t", "agents/t1", "tenants"] {
            assert!(
                matches!(
                    p.after_in(other),
                    Err(ProvisioningError::Invalid { field: "after", .. })
                ),
                "{other}"
            );
        }
        assert_eq!(
            PageRequest::default().after_in("tenants").expect("first"),
            None
        );
        // A cursor of the previous version (a bare id) still pages across a rolling upgrade.
        let old = encode_cursor("0193a4b2-0000-7000-8000-000000000001");
        let p = PageRequest::new(None, Some(&old)).expect("an old cursor");
        assert_eq!(
            p.after_in("tenants").expect("taken"),
            Some("0193a4b2-0000-7000-8000-000000000001")
        );
        // A new cursor holds a control character, which the previous version's decoder
        // refused: an old pod answers it 400 instead of reading it as an id (an empty page).
        let decoded =
            String::from_utf8(URL_SAFE_NO_PAD.decode(&cursor).expect("b64")).expect("utf8");
        assert!(decoded.chars().any(char::is_control), "{decoded:?}");
    }

    #[test]
    fn validation_names_the_field() {
        assert!(matches!(
            name("name", "  "),
            Err(ProvisioningError::Invalid { field: "name", .. })
        ));
        assert!(name("name", &"x".repeat(201)).is_err());
        assert_eq!(name("name", " ok ").expect("ok"), "ok");
        assert!(ident("channel", "web chat").is_err());
        assert_eq!(
            skills("skills", &["b".into(), "a".into(), "b".into()]).expect("skills"),
            vec!["a", "b"]
        );
        assert!(url("ftp://x").is_err());
        assert!(url("https://bot.example/hook").is_ok());
        assert!(permissions(&[]).is_err());
        assert!(expiry(Some(-1)).is_err());
        assert_eq!(expiry(Some(MAX_EXPIRY_MS)).ok(), Some(Some(MAX_EXPIRY_MS)));
        for past in [MAX_EXPIRY_MS + 1, i64::MAX] {
            assert!(
                matches!(
                    expiry(Some(past)),
                    Err(ProvisioningError::Invalid {
                        field: "expires_at_ms",
                        ..
                    })
                ),
                "{past}"
            );
        }
    }

    #[test]
    fn a_rule_matches_its_channel_and_all_its_attributes() {
        let rule = RoutingRule {
            id: "r".into(),
            tenant_id: "t".into(),
            channel: "chat".into(),
            attributes: BTreeMap::from([("lang".into(), "fr".into())]),
            queue_id: "q".into(),
            required_skills: vec![],
            priority: 0,
            bot_id: None,
            created_at_ms: 0,
        };
        let fr = BTreeMap::from([
            ("lang".to_string(), "fr".to_string()),
            ("x".into(), "y".into()),
        ]);
        assert!(rule.matches("chat", &fr));
        assert!(!rule.matches("sms", &fr));
        assert!(!rule.matches("chat", &BTreeMap::new()));
    }

    #[test]
    fn patches_tell_null_from_absent() {
        let p: ApiKeyPatch = serde_json::from_str(r#"{"expires_at_ms": null}"#).expect("json");
        assert_eq!(p.expires_at_ms, Some(None));
        let p: ApiKeyPatch = serde_json::from_str("{}").expect("json");
        assert_eq!(p.expires_at_ms, None);
        assert!(serde_json::from_str::<ApiKeyPatch>(r#"{"bogus": 1}"#).is_err());
        let bot = NewBot {
            name: "b".into(),
            url: "https://x".into(),
            credential: "hunter2".into(),
        };
        assert!(!format!("{bot:?}").contains("hunter2"));
    }

    #[test]
    fn stored_endpoint_urls_are_answered_without_user_info() {
        for (stored, shown) in [
            (
                "https://ops:s3cret@example.com/b?x=1",
                "https://ops:***@example.com/b?x=1",
            ),
            ("https://tok3n@example.com/b", "https://***@example.com/b"),
            (
                "https://:s3cret@example.com/b",
                "https://:***@example.com/b",
            ),
            (
                "https://ops:s3%40cret@example.com/b",
                "https://ops:***@example.com/b",
            ),
            // Without user info: as written, not normalized.
            ("https://EXAMPLE.com", "https://EXAMPLE.com"),
        ] {
            assert_eq!(shown_endpoint_url(stored), shown, "{stored}");
        }
        let bot = BotEndpoint {
            id: "b".into(),
            tenant_id: "t".into(),
            name: "n".into(),
            url: "https://ops:s3cret@example.com/b".into(),
            has_credential: true,
            created_at_ms: 0,
        };
        let answered = serde_json::to_value(&bot).expect("json");
        assert_eq!(answered["url"], "https://ops:***@example.com/b");
    }
}
