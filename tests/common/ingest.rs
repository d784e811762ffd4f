//! The ingest endpoint's fixtures: an edge in the test process (embedded bus) with a known admin
//! token, and a valid `MessageReceived` event to post to it.

use nexus::config::Config;
use nexus::edge::AppState;
use serde_json::{json, Value};

/// The admin token of [`admin_state`]'s edge.
pub const TOKEN: &str = "test-admin-token";

/// An embedded edge whose admin token is [`TOKEN`]; its state and the directory that must
/// live as long as it.
pub async fn admin_state() -> (AppState, tempfile::TempDir) {
    admin_state_with(|_| {}).await
}

/// [`admin_state`] with `tweak` applied to its config.
pub async fn admin_state_with(tweak: impl FnOnce(&mut Config)) -> (AppState, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.http.admin_token = TOKEN.into();
    tweak(&mut config);
    let state = super::edge::embedded_state(config, dir.path()).await;
    (state, dir)
}

/// A valid customer message of tenant A's conversation, with no `occurred_at`.
pub fn valid_event() -> Value {
    json!({
        "event_type": "MessageReceived",
        "tenant_id": "tenant-a",
        "conversation_id": "0193a4b2-0000-7000-8000-000000000001",
        "body": {
            "message_id": "0193a4b2-0000-7000-8000-0000000000aa",
            "channel": "WEB_CHAT",
            "participant_id": "customer-1",
            "participant_kind": "CUSTOMER",
            "kind": "TEXT",
            "text": "hello"
        }
    })
}
