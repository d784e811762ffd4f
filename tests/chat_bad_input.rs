//! Bad input on every chat v3, legacy v2 and agent endpoint, in-process (embedded bus, embedded
//! session store, SQLite provisioning): each rejected request answers a clear 4xx with a
//! machine-readable code and publishes nothing on the inbound or agent topic. Tenant A's keys
//! never reach tenant B's sessions or transcripts; a bot only its own conversations.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::chat::Ws;
use common::fixtures::{agent, api_key, assigned, start, tenant_with_key, Session};
use common::inproc::call;
use common::ws::close_frame;
use futures::{SinkExt, StreamExt};
use nexus::config::Config;
use nexus::edge::chat::{Claims, ClientKeys};
use nexus::edge::AppState;
use nexus::stores::provisioning::{NewApiKey, NewBot, NewQueue, Permission, Provisioning};
use nexus::stores::session::{
    Conversation, ConversationState, EntryKind, NewEntry, Party, PartyKind,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const INBOUND: &str = "nexus.inbound.v1";
const AGENT: &str = "nexus.agent.v1";
/// Small limits, so "too long" is cheap to send.
const MAX_TEXT: usize = 20;
const MAX_NICK: usize = 10;
const MAX_USER_DATA: usize = 3;
const MAX_BODY: usize = 4096;
/// The edge's client-key secret, so tests can sign keys of their own (expired ones).
const SECRET: &[u8] = b"client-key-secret-of-chat-bad-input";
/// Client-key lifetime (s).
const KEY_TTL_S: u64 = 3600;
const WS_HEADERS: [(&str, &str); 4] = [
    ("connection", "upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

struct TenantFx {
    id: String,
    key: String,
    /// Two open sessions and one whose record is Closed.
    s1: Session,
    s2: Session,
    closed: Session,
    /// `alice` holds s1; `bob` holds s2.
    alice: (String, String),
    bob: (String, String),
}

struct Fx {
    state: AppState,
    _dir: tempfile::TempDir,
    a: TenantFx,
    b: TenantFx,
    disabled_key: String,
    expired_key: String,
    no_chat_key: String,
    rotated_token: String,
    deleted_token: String,
    cases: usize,
}

async fn tenant(state: &AppState, name: &str) -> TenantFx {
    let p = &state.provisioning;
    let (id, key) = tenant_with_key(p, name).await;
    let (s1, s2, closed) = (
        start(state, &key, "Ann").await,
        start(state, &key, "Bo").await,
        start(state, &key, "Cy").await,
    );
    let alice = agent(p, &id, "alice").await;
    let bob = agent(p, &id, "bob").await;
    TenantFx {
        id,
        key,
        s1,
        s2,
        closed,
        alice,
        bob,
    }
}

async fn fixture() -> Fx {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.chat.max_message_chars = MAX_TEXT;
    config.chat.max_nickname_chars = MAX_NICK;
    config.chat.max_user_data_entries = MAX_USER_DATA;
    config.http.max_body_bytes = MAX_BODY;
    config.chat.client_key_secret = String::from_utf8_lossy(SECRET).into_owned();
    config.chat.client_key_ttl_s = KEY_TTL_S;
    let state = common::edge::embedded_state(config, dir.path()).await;
    let a = tenant(&state, "tenant-a").await;
    let b = tenant(&state, "tenant-b").await;
    let p = state.provisioning.clone();
    let disabled_key = api_key(&p, &a.id, vec![Permission::Chat], false, None).await;
    let expired_key = api_key(
        &p,
        &a.id,
        vec![Permission::Chat],
        true,
        Some(chrono::Utc::now().timestamp_millis() - 1_000),
    )
    .await;
    let no_chat_key = api_key(&p, &a.id, vec![Permission::Messaging], true, None).await;
    let (carol, rotated_token) = agent(&p, &a.id, "carol").await;
    p.rotate_agent_token(&a.id, &carol).await.expect("rotate");
    let (dave, deleted_token) = agent(&p, &a.id, "dave").await;
    p.delete_agent(&a.id, &dave).await.expect("delete");

    // Records as the conversation worker would write them: A's s1 with alice, s2 with bob, a
    // closed one; B's s1 held by an agent whose id is alice's (ids are per tenant).
    let s = state.sessions().expect("session store");
    for c in [
        assigned(&a.id, &a.s1.id, ConversationState::Connected, &a.alice.0),
        assigned(&a.id, &a.s2.id, ConversationState::Connected, &a.bob.0),
        assigned(&a.id, &a.closed.id, ConversationState::Closed, &a.alice.0),
        assigned(&b.id, &b.s1.id, ConversationState::Connected, &a.alice.0),
        assigned(&b.id, &b.closed.id, ConversationState::Closed, &b.alice.0),
    ] {
        assert!(s.put_conversation(&c).await.expect("put"));
    }
    Fx {
        state,
        _dir: dir,
        a,
        b,
        disabled_key,
        expired_key,
        no_chat_key,
        rotated_token,
        deleted_token,
        cases: 0,
    }
}

/// A chat of tenant A started through the API, its record Connected to alice as the worker
/// would write it, and entries of `kinds` from the agent at positions 1, 2, ….
async fn chat_with_entries(fx: &Fx, key: &str, kinds: &[EntryKind]) -> (Session, Conversation) {
    let c = start(&fx.state, key, "Lou").await;
    let s = fx.state.sessions().expect("session store");
    let record = assigned(&fx.a.id, &c.id, ConversationState::Connected, "alice");
    assert!(s.put_conversation(&record).await.expect("put"));
    for (i, kind) in kinds.iter().enumerate() {
        let entry = NewEntry {
            event_id: format!("e{i}"),
            kind: *kind,
            from: Party {
                participant_id: "agent".into(),
                nickname: "Alice".into(),
                kind: PartyKind::Agent,
            },
            text: Some("bye".into()),
            message_id: None,
            data: BTreeMap::new(),
            at_ms: 1,
        };
        s.append(&fx.a.id, &c.id, &entry).await.expect("append");
    }
    (c, record)
}

/// Records on the inbound and agent topics.
async fn published(state: &AppState) -> (u64, u64) {
    let on = |topic| common::inproc::published(state, topic);
    (on(INBOUND).await, on(AGENT).await)
}

/// The machine-readable code of a v3/agent (`error.code`) or v2 (`errors[0].code`) answer.
fn code_of(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .or(body["errors"][0]["code"].as_str())
        .unwrap_or("<no code>")
}

/// A request: `headers` are (name, value); a body is sent as given.
fn rq(method: &str, uri: &str, headers: &[(&str, &str)], body: Option<&str>) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
        .expect("request")
}

impl Fx {
    /// Sends `req`, expecting `status` and `code`, and that nothing was published.
    async fn rejected(&mut self, what: &str, req: Request<Body>, status: u16, code: &str) -> Value {
        let before = published(&self.state).await;
        let (got, body) = call(&self.state, req).await;
        assert_eq!(got.as_u16(), status, "{what}: {body}");
        assert_eq!(code_of(&body), code, "{what}: {body}");
        assert!(
            !body.to_string().contains(&self.b.s1.id) || what.contains("tenant B"),
            "{what}: leaks B's session: {body}"
        );
        assert_eq!(published(&self.state).await, before, "{what}: published");
        self.cases += 1;
        body
    }

    /// Sends `req`, expecting `status` and that exactly `(inbound, agent)` records were
    /// published.
    async fn accepted(
        &mut self,
        what: &str,
        req: Request<Body>,
        status: u16,
        n: (u64, u64),
    ) -> Value {
        let before = published(&self.state).await;
        let (got, body) = call(&self.state, req).await;
        assert_eq!(got.as_u16(), status, "{what}: {body}");
        let after = published(&self.state).await;
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            n,
            "{what}: published"
        );
        self.cases += 1;
        body
    }
}

// ---- chat v3 ---------------------------------------------------------------------------

/// The session endpoints of v3: (method, path suffix, a valid body).
const V3: [(&str, &str, Option<&str>); 10] = [
    ("POST", "messages", Some(r#"{"text":"hi"}"#)),
    ("POST", "client-key", None),
    ("GET", "messages", None),
    ("POST", "typing", Some(r#"{"state":"started"}"#)),
    ("POST", "user-data", Some(r#"{"user_data":{"k":"v"}}"#)),
    ("POST", "read-receipt", Some(r#"{"position":1}"#)),
    ("POST", "notices", Some(r#"{"text":"hi"}"#)),
    ("POST", "disconnect", None),
    ("GET", "stream", None),
    ("GET", "events", None),
];

fn v3_req(
    method: &str,
    suffix: &str,
    session: &str,
    api_key: Option<&str>,
    client_key: Option<&str>,
    body: Option<&str>,
) -> Request<Body> {
    let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    if let Some(k) = api_key {
        h.push(("x-api-key", k));
    }
    if let Some(k) = client_key {
        h.push(("x-nexus-client-key", k));
    }
    if suffix == "stream" {
        h.extend(WS_HEADERS);
    }
    rq(
        method,
        &format!("/nexus/v3/chat/sessions/{session}/{suffix}"),
        &h,
        body,
    )
}

fn forged_keys(fx: &Fx) -> Vec<(&'static str, String)> {
    let s1 = &fx.a.s1;
    let claims = Claims {
        tid: fx.a.id.clone(),
        sid: s1.id.clone(),
        pid: s1.pid.clone(),
        iat: 1,
        exp: None,
    };
    let other_secret = ClientKeys::new(b"not the edge's secret", 3600).issue(&claims);
    // s2's header and payload under s1's signature.
    let (s2_signing, _) = fx.a.s2.ck.rsplit_once('.').expect("jwt");
    let (_, s1_sig) = s1.ck.rsplit_once('.').expect("jwt");
    let spliced = format!("{s2_signing}.{s1_sig}");
    // s1's key with B's tenant id in the payload, signature unchanged.
    let (head, rest) = s1.ck.split_once('.').expect("jwt");
    let (_, sig) = rest.split_once('.').expect("jwt");
    use base64::Engine;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::to_vec(&Claims {
            tid: fx.b.id.clone(),
            ..claims.clone()
        })
        .expect("json"),
    );
    let retenanted = format!("{head}.{payload}.{sig}");
    vec![
        ("garbage", "garbage".into()),
        ("empty", String::new()),
        ("three dots", "a.b.c".into()),
        ("signed with another secret", other_secret),
        ("spliced signature", spliced),
        ("payload moved to tenant B", retenanted),
        ("alg none", format!("{head}.{payload}.")),
    ]
}

#[tokio::test]
async fn v3_session_endpoints_refuse_every_wrong_credential() {
    let mut fx = fixture().await;
    let a_key = fx.a.key.clone();
    let b_key = fx.b.key.clone();
    let (a1, a2, b1) = (fx.a.s1.clone(), fx.a.s2.clone(), fx.b.s1.clone());
    let forged = forged_keys(&fx);
    let unknown_session = uuid::Uuid::now_v7().to_string();
    for (method, suffix, body) in V3 {
        let ep = format!("{method} {suffix}");
        let keys: [(&str, Option<&str>, u16, &str); 7] = [
            ("no api key", None, 401, "AUTHENTICATION_REQUIRED"),
            (
                "garbage api key",
                Some("garbage"),
                401,
                "INVALID_CREDENTIALS",
            ),
            (
                "unknown api key",
                Some("nxk_0000000000000000000000000000"),
                401,
                "INVALID_CREDENTIALS",
            ),
            (
                "disabled api key",
                Some(fx.disabled_key.as_str()),
                403,
                "API_KEY_DISABLED",
            ),
            (
                "expired api key",
                Some(fx.expired_key.as_str()),
                403,
                "API_KEY_EXPIRED",
            ),
            (
                "api key without chat",
                Some(fx.no_chat_key.as_str()),
                403,
                "PERMISSION_DENIED",
            ),
            ("empty api key", Some(""), 401, "INVALID_CREDENTIALS"),
        ];
        let keys: Vec<_> = keys
            .iter()
            .map(|(w, k, s, c)| (*w, k.map(str::to_string), *s, *c))
            .collect();
        for (what, key, status, code) in keys {
            let req = v3_req(method, suffix, &a1.id, key.as_deref(), Some(&a1.ck), body);
            fx.rejected(&format!("{ep}: {what}"), req, status, code)
                .await;
        }
        let client: [(&str, &str, &str, Option<&str>); 6] = [
            ("no client key", a_key.as_str(), a1.id.as_str(), None),
            (
                "client key of another session",
                &a_key,
                &a1.id,
                Some(a2.ck.as_str()),
            ),
            (
                "unknown session",
                &a_key,
                &unknown_session,
                Some(a1.ck.as_str()),
            ),
            (
                "tenant B's client key on tenant B's session with A's api key",
                &a_key,
                &b1.id,
                Some(b1.ck.as_str()),
            ),
            (
                "A's client key with tenant B's api key",
                &b_key,
                &a1.id,
                Some(a1.ck.as_str()),
            ),
            (
                "tenant B's keys on A's session",
                &b_key,
                &a1.id,
                Some(b1.ck.as_str()),
            ),
        ];
        for (what, key, session, ck) in client {
            let (status, code) = if ck.is_none() {
                (401, "AUTHENTICATION_REQUIRED")
            } else {
                (403, "INVALID_CLIENT_KEY")
            };
            let req = v3_req(method, suffix, session, Some(key), ck, body);
            fx.rejected(&format!("{ep}: {what}"), req, status, code)
                .await;
        }
        for (what, ck) in &forged {
            let req = v3_req(method, suffix, &a1.id, Some(&a_key), Some(ck), body);
            fx.rejected(
                &format!("{ep}: forged client key ({what})"),
                req,
                403,
                "INVALID_CLIENT_KEY",
            )
            .await;
        }
    }

    // Streams take the keys as parameters too (browsers cannot set WebSocket headers).
    for suffix in ["stream", "events"] {
        let uri = |q: String| format!("/nexus/v3/chat/sessions/{}/{suffix}?{q}", a1.id);
        let ws: &[(&str, &str)] = if suffix == "stream" { &WS_HEADERS } else { &[] };
        let cases = [
            (
                "unknown api key",
                format!("api_key=nxk_x&client_key={}", a1.ck),
                401,
                "INVALID_CREDENTIALS",
            ),
            (
                "disabled api key",
                format!("api_key={}&client_key={}", fx.disabled_key, a1.ck),
                403,
                "API_KEY_DISABLED",
            ),
            (
                "other session's client key",
                format!("api_key={a_key}&client_key={}", a2.ck),
                403,
                "INVALID_CLIENT_KEY",
            ),
            (
                "tenant B's keys",
                format!("api_key={b_key}&client_key={}", b1.ck),
                403,
                "INVALID_CLIENT_KEY",
            ),
            (
                "no client key",
                format!("api_key={a_key}"),
                401,
                "AUTHENTICATION_REQUIRED",
            ),
            (
                "bad position",
                format!("api_key={a_key}&client_key={}&from=x", a1.ck),
                400,
                "INVALID_QUERY",
            ),
            (
                "negative position",
                format!("api_key={a_key}&client_key={}&from=-1", a1.ck),
                400,
                "INVALID_QUERY",
            ),
        ];
        for (what, q, status, code) in cases {
            let req = rq("GET", &uri(q), ws, None);
            fx.rejected(
                &format!("{suffix} by parameters: {what}"),
                req,
                status,
                code,
            )
            .await;
        }
    }
    // The right keys on a request that is no WebSocket handshake (oneshot cannot upgrade).
    let req = v3_req("GET", "stream", &a1.id, Some(&a_key), Some(&a1.ck), None);
    fx.rejected(
        "stream: not upgradable",
        req,
        426,
        "WEBSOCKET_UPGRADE_REQUIRED",
    )
    .await;
    let req = rq(
        "GET",
        &format!("/nexus/v3/chat/sessions/{}/stream", a1.id),
        &[("x-api-key", &a_key), ("x-nexus-client-key", &a1.ck)],
        None,
    );
    fx.rejected(
        "stream: no handshake headers",
        req,
        400,
        "WEBSOCKET_UPGRADE_REQUIRED",
    )
    .await;

    // An id no session can have (not UTF-8, a control character) answers in the error shape,
    // not the path extractor's plain text.
    for (method, suffix, body) in V3 {
        for id in ["%FF", "a%00b"] {
            let req = v3_req(method, suffix, id, Some(&a_key), Some(&a1.ck), body);
            fx.rejected(
                &format!("{method} {suffix}: session id {id}"),
                req,
                404,
                "NOT_FOUND",
            )
            .await;
        }
    }

    // The same keys work: the rejections above were about the keys.
    let req = v3_req("GET", "messages", &a1.id, Some(&a_key), Some(&a1.ck), None);
    fx.accepted("transcript with the right keys", req, 200, (0, 0))
        .await;
    let req = v3_req(
        "POST",
        "messages",
        &a1.id,
        Some(&a_key),
        Some(&a1.ck),
        Some(r#"{"text":"hi"}"#),
    );
    fx.accepted("send with the right keys", req, 202, (1, 0))
        .await;
    eprintln!("v3 session credentials: {} cases", fx.cases);
}

#[tokio::test]
async fn v3_bodies_are_validated_before_anything_is_published() {
    let mut fx = fixture().await;
    let key = fx.a.key.clone();
    let s = fx.a.s1.clone();
    let long_text = "x".repeat(MAX_TEXT + 1);
    let long_nick = "n".repeat(MAX_NICK + 1);
    let huge = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_BODY));
    let start = |body: &str| {
        rq(
            "POST",
            "/nexus/v3/chat/sessions",
            &[("x-api-key", &key), ("content-type", "application/json")],
            Some(body),
        )
    };
    let start_cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            r#"{"nickname":"#.into(),
            400,
            "INVALID_JSON",
        ),
        ("empty body", String::new(), 400, "INVALID_JSON"),
        ("not an object", "[1,2]".into(), 400, "INVALID_BODY"),
        (
            "unknown field",
            r#"{"nickname":"Ann","nick":"x"}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "wrong type",
            r#"{"nickname":7}"#.into(),
            400,
            "INVALID_BODY",
        ),
        ("no nickname", "{}".into(), 400, "INVALID_NICKNAME"),
        (
            "empty nickname",
            r#"{"nickname":""}"#.into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "blank nickname",
            r#"{"nickname":"   "}"#.into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "oversized nickname",
            json!({"nickname": long_nick}).to_string(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "oversized first+last name",
            json!({"first_name": "Annabel", "last_name": "Lee-Smith"}).to_string(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "control character in nickname",
            json!({"nickname": "An\u{7}n"}).to_string(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "empty first message",
            json!({"nickname": "Ann", "text": " "}).to_string(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "oversized first message",
            json!({"nickname": "Ann", "text": long_text}).to_string(),
            400,
            "MESSAGE_TOO_LONG",
        ),
        (
            "too much user data",
            json!({"nickname": "Ann", "user_data": {"a":"1","b":"2","c":"3","d":"4"}}).to_string(),
            400,
            "INVALID_USER_DATA",
        ),
        (
            "empty user-data key",
            json!({"nickname": "Ann", "user_data": {"":"1"}}).to_string(),
            400,
            "INVALID_USER_DATA",
        ),
        (
            "oversized subject",
            json!({"nickname": "Ann", "subject": "s".repeat(300)}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "oversized email",
            json!({"nickname": "Ann", "email_address": "e".repeat(300)}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "request id with a space",
            json!({"nickname": "Ann", "request_id": "r 1"}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "empty request id",
            json!({"nickname": "Ann", "request_id": ""}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "request id not a string",
            json!({"nickname": "Ann", "request_id": 7}).to_string(),
            400,
            "INVALID_BODY",
        ),
        (
            "async not a bool",
            json!({"nickname": "Ann", "async": "yes"}).to_string(),
            400,
            "INVALID_BODY",
        ),
        (
            "body over the limit",
            huge.clone(),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (what, body, status, code) in start_cases {
        fx.rejected(&format!("start: {what}"), start(&body), status, code)
            .await;
    }
    for (what, k, status, code) in [
        ("no api key", None, 401, "AUTHENTICATION_REQUIRED"),
        (
            "unknown api key",
            Some("nxk_nope"),
            401,
            "INVALID_CREDENTIALS",
        ),
        (
            "disabled api key",
            Some(fx.disabled_key.as_str()),
            403,
            "API_KEY_DISABLED",
        ),
        (
            "expired api key",
            Some(fx.expired_key.as_str()),
            403,
            "API_KEY_EXPIRED",
        ),
        (
            "api key without chat",
            Some(fx.no_chat_key.as_str()),
            403,
            "PERMISSION_DENIED",
        ),
    ]
    .map(|(w, k, s, c)| (w, k.map(str::to_string), s, c))
    {
        let mut h = vec![("content-type", "application/json")];
        if let Some(k) = &k {
            h.push(("x-api-key", k));
        }
        let req = rq(
            "POST",
            "/nexus/v3/chat/sessions",
            &h,
            Some(r#"{"nickname":"Ann"}"#),
        );
        fx.rejected(&format!("start: {what}"), req, status, code)
            .await;
    }
    // First and last name stand in for a nickname; exactly the limits is fine.
    let ok = json!({"first_name": "Ann", "last_name": "Lee", "text": "x".repeat(MAX_TEXT)});
    fx.accepted(
        "start with first+last name",
        start(&ok.to_string()),
        201,
        (1, 0),
    )
    .await;

    let send = |body: &str| {
        v3_req(
            "POST",
            "messages",
            &s.id,
            Some(&key),
            Some(&s.ck),
            Some(body),
        )
    };
    let send_cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            r#"{"text":"hi""#.into(),
            400,
            "INVALID_JSON",
        ),
        ("empty body", String::new(), 400, "INVALID_JSON"),
        (
            "unknown field",
            r#"{"text":"hi","html":"<b>"}"#.into(),
            400,
            "INVALID_BODY",
        ),
        ("no text", "{}".into(), 400, "INVALID_BODY"),
        (
            "text not a string",
            r#"{"text":["hi"]}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "empty text",
            r#"{"text":""}"#.into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "blank text",
            r#"{"text":" \n\t"}"#.into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "oversized text",
            json!({"text": long_text}).to_string(),
            400,
            "MESSAGE_TOO_LONG",
        ),
        (
            "empty message id",
            r#"{"text":"hi","message_id":""}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "oversized message id",
            json!({"text": "hi", "message_id": "m".repeat(129)}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "body over the limit",
            huge.clone(),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (what, body, status, code) in send_cases {
        fx.rejected(&format!("send: {what}"), send(&body), status, code)
            .await;
    }
    // Multi-byte characters count as characters, not bytes.
    let req = send(&json!({"text": "é".repeat(MAX_TEXT)}).to_string());
    fx.accepted("send of exactly the limit in characters", req, 202, (1, 0))
        .await;

    let typing = |body: &str| v3_req("POST", "typing", &s.id, Some(&key), Some(&s.ck), Some(body));
    for (what, body, status, code) in [
        ("bad state", r#"{"state":"busy"}"#, 400, "INVALID_FIELD"),
        ("empty state", r#"{"state":""}"#, 400, "INVALID_FIELD"),
        (
            "state not a string",
            r#"{"state":true}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "unknown field",
            r#"{"state":"started","preview":"x"}"#,
            400,
            "INVALID_BODY",
        ),
        ("malformed JSON", "{state:started}", 400, "INVALID_JSON"),
        ("no state", "{}", 400, "INVALID_BODY"),
    ] {
        fx.rejected(&format!("typing: {what}"), typing(body), status, code)
            .await;
    }

    let too_many_removed = json!({
        "remove": (0..=MAX_USER_DATA).map(|i| format!("k{i}")).collect::<Vec<_>>()
    })
    .to_string();
    for (suffix, what, body, status, code) in [
        (
            "user-data",
            "nothing to change",
            "{}",
            400,
            "INVALID_USER_DATA",
        ),
        (
            "user-data",
            "empty key",
            r#"{"user_data":{"":"v"}}"#,
            400,
            "INVALID_USER_DATA",
        ),
        (
            "user-data",
            "empty key to remove",
            r#"{"remove":[""]}"#,
            400,
            "INVALID_USER_DATA",
        ),
        (
            "user-data",
            "more keys to remove than entries a chat holds",
            &too_many_removed,
            400,
            "INVALID_USER_DATA",
        ),
        (
            "user-data",
            "unknown field",
            r#"{"data":{}}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "user-data",
            "malformed JSON",
            "{user_data",
            400,
            "INVALID_JSON",
        ),
        (
            "read-receipt",
            "position 0",
            r#"{"position":0}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "read-receipt",
            "negative position",
            r#"{"position":-1}"#,
            400,
            "INVALID_BODY",
        ),
        ("read-receipt", "no position", "{}", 400, "INVALID_BODY"),
        (
            "read-receipt",
            "a position past the transcript's end",
            r#"{"position":99999}"#,
            400,
            "INVALID_POSITION",
        ),
        (
            "notices",
            "empty text",
            r#"{"text":""}"#,
            400,
            "INVALID_MESSAGE",
        ),
        (
            "notices",
            "unknown field",
            r#"{"text":"x","kind":"y"}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "notices",
            "an empty message_id",
            r#"{"text":"x","message_id":""}"#,
            400,
            "INVALID_FIELD",
        ),
    ] {
        let req = v3_req("POST", suffix, &s.id, Some(&key), Some(&s.ck), Some(body));
        fx.rejected(&format!("{suffix}: {what}"), req, status, code)
            .await;
    }

    // A chat already carrying the most user-data entries: an update may replace or swap
    // entries, not add one (each request within the limit on its own is not enough).
    let (full, mut record) = chat_with_entries(&fx, &key, &[]).await;
    record.user_data = (0..MAX_USER_DATA)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    record.version += 1;
    let store = fx.state.sessions().expect("session store");
    assert!(store.put_conversation(&record).await.expect("put"));
    let update = |body: Value| {
        let body = body.to_string();
        v3_req(
            "POST",
            "user-data",
            &full.id,
            Some(&key),
            Some(&full.ck),
            Some(&body),
        )
    };
    fx.rejected(
        "user-data: one entry more than a chat carries",
        update(json!({"user_data": {"new": "v"}})),
        400,
        "INVALID_USER_DATA",
    )
    .await;
    fx.accepted(
        "user-data: an entry replaced and one swapped",
        update(json!({"user_data": {"k0": "w", "new": "v"}, "remove": ["k1"]})),
        202,
        (1, 0),
    )
    .await;

    let transcript = |q: &str| {
        rq(
            "GET",
            &format!("/nexus/v3/chat/sessions/{}/messages?{q}", s.id),
            &[("x-api-key", &key), ("x-nexus-client-key", &s.ck)],
            None,
        )
    };
    for (what, q) in [
        ("bad from", "from=abc"),
        ("negative limit", "limit=-1"),
        ("huge from", "from=99999999999999999999999"),
        ("bad wait", "wait_s=soon"),
        ("negative wait", "wait_s=-1"),
    ] {
        fx.rejected(
            &format!("transcript: {what}"),
            transcript(q),
            400,
            "INVALID_QUERY",
        )
        .await;
    }
    // A page from past the transcript's end (here the largest position, which must not
    // overflow) is refused, as a stream from there is below.
    fx.rejected(
        "transcript from the last position",
        transcript("from=18446744073709551615"),
        400,
        "INVALID_POSITION",
    )
    .await;

    // A stream from a position past the transcript's end (here the largest, which must not
    // overflow) is refused: it would skip the live entries up to it.
    let sse = |from: &str| {
        rq(
            "GET",
            &format!("/nexus/v3/chat/sessions/{}/events", s.id),
            &[
                ("x-api-key", &key),
                ("x-nexus-client-key", &s.ck),
                ("last-event-id", from),
            ],
            None,
        )
    };
    for from in ["18446744073709551615", "41"] {
        fx.rejected(
            &format!("events: resume after {from}"),
            sse(from),
            400,
            "INVALID_POSITION",
        )
        .await;
    }
    // From the position after the last entry (none yet: the first) is served.
    let resp = common::inproc::send(&fx.state, sse("0")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    eprintln!("v3 bodies: {} cases", fx.cases);
}

#[tokio::test]
async fn a_closed_conversation_refuses_customer_actions() {
    let mut fx = fixture().await;
    let key = fx.a.key.clone();
    let c = fx.a.closed.clone();
    for (suffix, body) in [
        ("messages", Some(r#"{"text":"hi"}"#)),
        ("typing", Some(r#"{"state":"started"}"#)),
        ("user-data", Some(r#"{"user_data":{"k":"v"}}"#)),
        ("read-receipt", Some(r#"{"position":1}"#)),
        ("notices", Some(r#"{"text":"hi"}"#)),
        ("disconnect", None),
    ] {
        let req = v3_req("POST", suffix, &c.id, Some(&key), Some(&c.ck), body);
        fx.rejected(
            &format!("v3 {suffix} on a closed chat"),
            req,
            409,
            "SESSION_CLOSED",
        )
        .await;
    }
    let req = v3_req("GET", "messages", &c.id, Some(&key), Some(&c.ck), None);
    let body = fx
        .accepted("v3 transcript of a closed chat", req, 200, (0, 0))
        .await;
    assert_eq!(body["chat_ended"], true);
    // A v2 chat that ended with entries its client has not read: the agent's last words, the
    // agent leaving.
    let (c, mut record) =
        chat_with_entries(&fx, &key, &[EntryKind::Message, EntryKind::ParticipantLeft]).await;
    let s = fx.state.sessions().expect("session store");
    record.state = ConversationState::Closed;
    record.version = 1;
    assert!(s.put_conversation(&record).await.expect("put closed"));
    let form = format!("secureKey={}&userId={}&alias=nexus", c.ck, c.pid);
    let refreshed = fx
        .accepted(
            "v2 refresh of a closed chat",
            v2_req(&c.id, "refresh", Some(&key), &form),
            200,
            (0, 0),
        )
        .await;
    assert_eq!(refreshed["chatEnded"], true);
    let entries = refreshed["messages"].as_array().expect("messages").len();
    assert!(entries > 0, "{refreshed}");
    for (op, extra) in [
        ("send", "&message=hi"),
        ("customNotice", "&message=hi"),
        ("startTyping", ""),
        ("stopTyping", ""),
        ("disconnect", ""),
    ] {
        // A client behind the end learns of the entries it lacks with the refusal, since it
        // stops polling once told `chatEnded`.
        let form = format!(
            "secureKey={}&userId={}&alias=nexus&transcriptPosition=1{extra}",
            c.ck, c.pid
        );
        let req = v2_req(&c.id, op, Some(&key), &form);
        let body = fx
            .rejected(
                &format!("v2 {op} on a closed chat"),
                req,
                409,
                "SESSION_CLOSED",
            )
            .await;
        assert_eq!(body["chatEnded"], true, "{body}");
        assert_eq!(body["statusCode"], 2, "{body}");
        assert_eq!(body["messages"], refreshed["messages"], "{body}");
        assert_eq!(body["nextPosition"], refreshed["nextPosition"], "{body}");
    }
    eprintln!("closed: {} cases", fx.cases);
}

// ---- chat v2 ---------------------------------------------------------------------------

const V2_OPS: [&str; 8] = [
    "send",
    "refresh",
    "startTyping",
    "stopTyping",
    "disconnect",
    "customNotice",
    "updateData",
    "readReceipt",
];

fn v2_req(chat: &str, op: &str, key: Option<&str>, form: &str) -> Request<Body> {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(k) = key {
        h.push(("apikey", k));
    }
    rq(
        "POST",
        &format!("/genesys/2/chat/svc/{chat}/{op}"),
        &h,
        Some(form),
    )
}

fn v2_form(s: &Session, extra: &str) -> String {
    format!(
        "secureKey={}&userId={}&alias=nexus&message=hi{extra}",
        s.ck, s.pid
    )
}

#[tokio::test]
async fn v2_refuses_wrong_keys_and_bad_fields() {
    let mut fx = fixture().await;
    let key = fx.a.key.clone();
    let b_key = fx.b.key.clone();
    let (a1, a2, b1) = (fx.a.s1.clone(), fx.a.s2.clone(), fx.b.s1.clone());
    // A chat id no chat can have answers in the v2 shape, not as plain text.
    for op in V2_OPS {
        let req = v2_req("%FF", op, Some(&key), &v2_form(&a1, ""));
        let body = fx
            .rejected(&format!("{op}: chat id %FF"), req, 404, "NOT_FOUND")
            .await;
        assert_eq!(body["statusCode"], 2, "{op}: {body}");
    }
    for op in V2_OPS {
        let ok = v2_form(&a1, "&transcriptPosition=7");
        let api: [(&str, Option<&str>, u16, &str); 6] = [
            ("no apikey", None, 401, "AUTHENTICATION_REQUIRED"),
            (
                "unknown apikey",
                Some("nxk_nope"),
                401,
                "INVALID_CREDENTIALS",
            ),
            (
                "disabled apikey",
                Some(fx.disabled_key.as_str()),
                403,
                "API_KEY_DISABLED",
            ),
            (
                "expired apikey",
                Some(fx.expired_key.as_str()),
                403,
                "API_KEY_EXPIRED",
            ),
            (
                "apikey without chat",
                Some(fx.no_chat_key.as_str()),
                403,
                "PERMISSION_DENIED",
            ),
            (
                "tenant B's apikey",
                Some(b_key.as_str()),
                403,
                "INVALID_SECURE_KEY",
            ),
        ];
        let api: Vec<_> = api
            .iter()
            .map(|(w, k, s, c)| (*w, k.map(str::to_string), *s, *c))
            .collect();
        for (what, k, status, code) in api {
            let body = fx
                .rejected(
                    &format!("v2 {op}: {what}"),
                    v2_req(&a1.id, op, k.as_deref(), &ok),
                    status,
                    code,
                )
                .await;
            assert_eq!(body["statusCode"], 2, "{body}");
            // The v2 shape on every answer, and never any chat's messages on an error.
            assert_eq!(body["messages"], json!([]), "{op}: {what}: {body}");
            // A refused key keeps a poller's place: the request's position comes back.
            assert_eq!(body["nextPosition"], 7, "{op}: {what}: {body}");
            assert!(body["chatEnded"].is_boolean(), "{op}: {what}: {body}");
        }
        let wrong: Vec<(&str, &str, String)> = vec![
            (
                "no secureKey",
                &a1.id,
                format!("userId={}&alias=nexus&message=hi", a1.pid),
            ),
            (
                "garbage secureKey",
                &a1.id,
                format!("secureKey=xyz&userId={}&alias=nexus&message=hi", a1.pid),
            ),
            (
                "another chat's secureKey and userId",
                &a1.id,
                v2_form(&a2, ""),
            ),
            (
                "another chat's secureKey",
                &a1.id,
                format!(
                    "secureKey={}&userId={}&alias=nexus&message=hi",
                    a2.ck, a1.pid
                ),
            ),
            (
                "wrong userId",
                &a1.id,
                format!(
                    "secureKey={}&userId={}&alias=nexus&message=hi",
                    a1.ck, a2.pid
                ),
            ),
            (
                "no userId",
                &a1.id,
                format!("secureKey={}&alias=nexus&message=hi", a1.ck),
            ),
            (
                "wrong alias",
                &a1.id,
                format!(
                    "secureKey={}&userId={}&alias=other&message=hi",
                    a1.ck, a1.pid
                ),
            ),
            ("tenant B's chat", &b1.id, v2_form(&b1, "")),
            (
                "unknown chatId",
                "0193a4b2-0000-7000-8000-000000000001",
                ok.clone(),
            ),
        ];
        for (what, chat, form) in wrong {
            let body = fx
                .rejected(
                    &format!("v2 {op}: {what}"),
                    v2_req(chat, op, Some(&key), &form),
                    403,
                    "INVALID_SECURE_KEY",
                )
                .await;
            assert_eq!(body["messages"], json!([]), "{op}: {what}: {body}");
        }
        // A's credentials with B's key on A's chat.
        fx.rejected(
            &format!("v2 {op}: A's chat with B's apikey"),
            v2_req(&a1.id, op, Some(&b_key), &v2_form(&a1, "")),
            403,
            "INVALID_SECURE_KEY",
        )
        .await;
        for bad in ["x", "-1", "1.5"] {
            let form = v2_form(&a1, &format!("&transcriptPosition={bad}"));
            fx.rejected(
                &format!("v2 {op}: transcriptPosition {bad}"),
                v2_req(&a1.id, op, Some(&key), &form),
                400,
                "INVALID_FIELD",
            )
            .await;
        }
        let huge = v2_form(&a1, &format!("&x={}", "x".repeat(MAX_BODY)));
        fx.rejected(
            &format!("v2 {op}: body over the limit"),
            v2_req(&a1.id, op, Some(&key), &huge),
            413,
            "PAYLOAD_TOO_LARGE",
        )
        .await;
    }
    let long = "x".repeat(MAX_TEXT + 1);
    for op in ["send", "customNotice"] {
        let base = format!("secureKey={}&userId={}&alias=nexus", a1.ck, a1.pid);
        for (what, extra, code) in [
            ("no message", String::new(), "INVALID_MESSAGE"),
            ("empty message", "&message=".to_string(), "INVALID_MESSAGE"),
            (
                "blank message",
                "&message=+++".to_string(),
                "INVALID_MESSAGE",
            ),
            (
                "oversized message",
                format!("&message={long}"),
                "MESSAGE_TOO_LONG",
            ),
        ] {
            let req = v2_req(&a1.id, op, Some(&key), &format!("{base}{extra}"));
            fx.rejected(&format!("v2 {op}: {what}"), req, 400, code)
                .await;
        }
    }
    let too_much = v2_form(
        &a1,
        "&userData[a]=1&userData[b]=2&userData[c]=3&userData[d]=4",
    );
    fx.rejected(
        "v2 updateData: too much user data",
        v2_req(&a1.id, "updateData", Some(&key), &too_much),
        400,
        "INVALID_USER_DATA",
    )
    .await;
    fx.rejected(
        "v2 readReceipt without the position read",
        v2_req(&a1.id, "readReceipt", Some(&key), &v2_form(&a1, "")),
        400,
        "INVALID_FIELD",
    )
    .await;
    fx.rejected(
        "v2 unknown op",
        v2_req(&a1.id, "hack", Some(&key), &v2_form(&a1, "")),
        404,
        "UNKNOWN_OPERATION",
    )
    .await;
    fx.rejected(
        "v2 unknown op, wrong key",
        v2_req(&a1.id, "hack", Some(&key), &v2_form(&a2, "")),
        403,
        "INVALID_SECURE_KEY",
    )
    .await;

    // Start.
    let start = |path: &str, k: Option<&str>, form: &str| {
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(k) = k {
            h.push(("apikey", k));
        }
        rq("POST", path, &h, Some(form))
    };
    let long_nick = "n".repeat(MAX_NICK + 1);
    let cases: Vec<(&str, Option<String>, String, u16, &str)> = vec![
        (
            "no apikey",
            None,
            "nickname=Ann".into(),
            401,
            "AUTHENTICATION_REQUIRED",
        ),
        (
            "unknown apikey",
            Some("nxk_nope".into()),
            "nickname=Ann".into(),
            401,
            "INVALID_CREDENTIALS",
        ),
        (
            "disabled apikey",
            Some(fx.disabled_key.clone()),
            "nickname=Ann".into(),
            403,
            "API_KEY_DISABLED",
        ),
        (
            "expired apikey",
            Some(fx.expired_key.clone()),
            "nickname=Ann".into(),
            403,
            "API_KEY_EXPIRED",
        ),
        (
            "apikey without chat",
            Some(fx.no_chat_key.clone()),
            "nickname=Ann".into(),
            403,
            "PERMISSION_DENIED",
        ),
        (
            "no nickname",
            Some(key.clone()),
            "subject=help".into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "empty nickname",
            Some(key.clone()),
            "nickname=".into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "blank nickname",
            Some(key.clone()),
            "nickname=++".into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "oversized nickname",
            Some(key.clone()),
            format!("nickname={long_nick}"),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "control character in nickname",
            Some(key.clone()),
            "nickname=A%00n".into(),
            400,
            "INVALID_NICKNAME",
        ),
        (
            "oversized first message",
            Some(key.clone()),
            format!("nickname=Ann&text={long}"),
            400,
            "MESSAGE_TOO_LONG",
        ),
        (
            "blank first message",
            Some(key.clone()),
            "nickname=Ann&text=+".into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "too much user data",
            Some(key.clone()),
            "nickname=Ann&userData[a]=1&userData[b]=2&userData[c]=3&userData[d]=4".into(),
            400,
            "INVALID_USER_DATA",
        ),
        (
            "oversized subject",
            Some(key.clone()),
            format!("nickname=Ann&subject={}", "s".repeat(300)),
            400,
            "INVALID_FIELD",
        ),
        (
            "body over the limit",
            Some(key.clone()),
            format!("nickname=Ann&x={}", "x".repeat(MAX_BODY)),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for path in ["/genesys/2/chat/svc", "/genesys/2/chat/svc/"] {
        for (what, k, form, status, code) in &cases {
            let body = fx
                .rejected(
                    &format!("v2 start {path}: {what}"),
                    start(path, k.as_deref(), form),
                    *status,
                    code,
                )
                .await;
            assert_eq!(body["statusCode"], 2, "{body}");
            assert!(body.get("chatId").is_none(), "{body}");
        }
    }
    let body = fx
        .accepted(
            "v2 start",
            start(
                "/genesys/2/chat/svc",
                Some(&key),
                "firstName=Ann&lastName=Lee&text=hello",
            ),
            200,
            (1, 0),
        )
        .await;
    assert_eq!(body["statusCode"], 0, "{body}");
    let body = fx
        .accepted(
            "v2 refresh with the right keys",
            v2_req(&a1.id, "refresh", Some(&key), &v2_form(&a1, "")),
            200,
            (0, 0),
        )
        .await;
    assert_eq!(body["statusCode"], 0, "{body}");
    eprintln!("v2: {} cases", fx.cases);
}

// ---- agent -----------------------------------------------------------------------------

#[tokio::test]
async fn agent_endpoints_refuse_bad_tokens_and_bodies() {
    let mut fx = fixture().await;
    let token = fx.a.alice.1.clone();
    let conv = fx.a.s1.id.clone();
    let offer = uuid::Uuid::new_v4().to_string();
    let offer_body = json!({ "offer_id": offer }).to_string();
    let endpoints: Vec<(&str, String, Option<String>)> = vec![
        ("GET", "/v1/agent/me".into(), None),
        (
            "POST",
            "/v1/agent/state".into(),
            Some(r#"{"state":"ready"}"#.into()),
        ),
        ("GET", "/v1/agent/conversations".into(), None),
        (
            "POST",
            format!("/v1/agent/conversations/{conv}/accept"),
            Some(offer_body.clone()),
        ),
        (
            "POST",
            format!("/v1/agent/conversations/{conv}/reject"),
            Some(offer_body.clone()),
        ),
        (
            "POST",
            format!("/v1/agent/conversations/{conv}/messages"),
            Some(r#"{"text":"hi"}"#.into()),
        ),
        (
            "GET",
            format!("/v1/agent/conversations/{conv}/messages"),
            None,
        ),
        (
            "POST",
            format!("/v1/agent/conversations/{conv}/typing"),
            Some(r#"{"state":"started"}"#.into()),
        ),
        (
            "POST",
            format!("/v1/agent/conversations/{conv}/complete"),
            Some("{}".into()),
        ),
        ("GET", "/v1/agent/ws".into(), None),
    ];
    let a_key = format!("Bearer {}", fx.a.key);
    let rotated = format!("Bearer {}", fx.rotated_token);
    let deleted = format!("Bearer {}", fx.deleted_token);
    let auths: Vec<(&str, Option<&str>, &str)> = vec![
        ("no token", None, "AUTHENTICATION_REQUIRED"),
        (
            "not a bearer",
            Some("Basic YWxpY2U6cHc="),
            "AUTHENTICATION_REQUIRED",
        ),
        (
            "garbage token",
            Some("Bearer garbage"),
            "INVALID_CREDENTIALS",
        ),
        ("empty token", Some("Bearer "), "INVALID_CREDENTIALS"),
        (
            "unknown token",
            Some("Bearer nxa_00000000000000000000"),
            "INVALID_CREDENTIALS",
        ),
        ("a tenant API key", Some(&a_key), "INVALID_CREDENTIALS"),
        (
            "a rotated-away token",
            Some(&rotated),
            "INVALID_CREDENTIALS",
        ),
        (
            "a deleted agent's token",
            Some(&deleted),
            "INVALID_CREDENTIALS",
        ),
    ];
    for (method, path, body) in &endpoints {
        for (what, auth, code) in &auths {
            let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                h.push(("authorization", a));
            }
            if path.ends_with("/ws") {
                h.extend(WS_HEADERS);
            }
            let req = rq(method, path, &h, body.as_deref());
            fx.rejected(&format!("{method} {path}: {what}"), req, 401, code)
                .await;
        }
    }
    for (what, q) in [
        ("garbage token parameter", "token=garbage".to_string()),
        (
            "rotated-away token parameter",
            format!("token={}", fx.rotated_token),
        ),
        ("API key as token parameter", format!("token={}", fx.a.key)),
    ] {
        let req = rq("GET", &format!("/v1/agent/ws?{q}"), &WS_HEADERS, None);
        fx.rejected(&format!("ws: {what}"), req, 401, "INVALID_CREDENTIALS")
            .await;
    }
    let req = rq(
        "GET",
        &format!("/v1/agent/ws?token={token}"),
        &WS_HEADERS,
        None,
    );
    fx.rejected("ws: not upgradable", req, 426, "WEBSOCKET_UPGRADE_REQUIRED")
        .await;

    let bearer = format!("Bearer {token}");
    // An id that is not UTF-8 or holds a control character names nothing: 404 in the API's
    // shape (not the path extractor's plain text), with a token or without.
    let files = format!("/v1/agent/conversations/{conv}/files/%FF");
    for (method, path) in [
        ("POST", "/v1/agent/conversations/%FF/accept"),
        ("GET", "/v1/agent/conversations/a%00b/messages"),
        ("GET", files.as_str()),
        ("POST", "/v1/agent/conversations/%FF/files"),
        ("POST", "/v1/bot/conversations/%C3/messages"),
    ] {
        for auth in [Some(bearer.as_str()), None] {
            let mut h: Vec<(&str, &str)> = vec![("content-type", "application/json")];
            if let Some(a) = auth {
                h.push(("authorization", a));
            }
            let req = rq(method, path, &h, Some(r#"{"offer_id":"x","text":"hi"}"#));
            fx.rejected(&format!("{method} {path}"), req, 404, "NOT_FOUND")
                .await;
        }
    }

    let post = |path: String, body: &str| {
        rq(
            "POST",
            &path,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
    };
    let c = |op: &str| format!("/v1/agent/conversations/{conv}/{op}");
    let long = "x".repeat(MAX_TEXT + 1);
    let huge = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_BODY));
    let bad_ids = ["a.b", "%20", &"a".repeat(65)];
    let mut cases: Vec<(String, String, String, u16, &str)> = vec![
        (
            "state: bad value".into(),
            "/v1/agent/state".into(),
            r#"{"state":"busy"}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: ready as bool".into(),
            "/v1/agent/state".into(),
            r#"{"state":true}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "state: capacity not a map".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","capacity":9}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "state: unknown field".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","mood":"fine"}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "state: reason code while ready".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","reason_code":"BREAK"}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: reason code with a space".into(),
            "/v1/agent/state".into(),
            r#"{"state":"not_ready","reason_code":"coffee break"}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: reason code too long".into(),
            "/v1/agent/state".into(),
            format!(
                r#"{{"state":"not_ready","reason_code":"{}"}}"#,
                "B".repeat(65)
            ),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: capacity above the provisioned one".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","capacity":{"chat":1000}}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: capacity of a media not provisioned".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","capacity":{"fax":1}}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "state: negative capacity".into(),
            "/v1/agent/state".into(),
            r#"{"state":"ready","capacity":{"chat":-1}}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "state: malformed".into(),
            "/v1/agent/state".into(),
            r#"{"state":"#.into(),
            400,
            "INVALID_JSON",
        ),
        (
            "state: empty body".into(),
            "/v1/agent/state".into(),
            String::new(),
            400,
            "INVALID_JSON",
        ),
        (
            "reply: empty text".into(),
            c("messages"),
            r#"{"text":""}"#.into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "reply: blank text".into(),
            c("messages"),
            r#"{"text":"  "}"#.into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "reply: oversized text".into(),
            c("messages"),
            json!({"text": long}).to_string(),
            400,
            "MESSAGE_TOO_LONG",
        ),
        (
            "reply: empty message id".into(),
            c("messages"),
            r#"{"text":"hi","message_id":""}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "reply: unknown field".into(),
            c("messages"),
            r#"{"text":"hi","to":"x"}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "reply: malformed".into(),
            c("messages"),
            "text=hi".into(),
            400,
            "INVALID_JSON",
        ),
        (
            "reply: body over the limit".into(),
            c("messages"),
            huge,
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "typing: bad state".into(),
            c("typing"),
            r#"{"state":"busy"}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "typing: unknown field".into(),
            c("typing"),
            r#"{"state":"started","x":1}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "complete: unknown field".into(),
            c("complete"),
            r#"{"disposition":"ok","close":true}"#.into(),
            400,
            "INVALID_BODY",
        ),
        (
            "complete: malformed".into(),
            c("complete"),
            "{".into(),
            400,
            "INVALID_JSON",
        ),
        (
            "complete: oversized note".into(),
            c("complete"),
            json!({"note": long}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "complete: oversized disposition".into(),
            c("complete"),
            json!({"disposition": "d".repeat(129)}).to_string(),
            400,
            "INVALID_FIELD",
        ),
        (
            "complete: empty disposition".into(),
            c("complete"),
            r#"{"disposition":""}"#.into(),
            400,
            "INVALID_FIELD",
        ),
        (
            "files: not multipart".into(),
            c("files"),
            r#"{"text":"hi"}"#.into(),
            400,
            "INVALID_BODY",
        ),
    ];
    for op in ["accept", "reject"] {
        cases.extend([
            (
                format!("{op}: offer id not a UUID"),
                c(op),
                r#"{"offer_id":"offer-1"}"#.into(),
                400,
                "INVALID_FIELD",
            ),
            (
                format!("{op}: empty offer id"),
                c(op),
                r#"{"offer_id":""}"#.into(),
                400,
                "INVALID_FIELD",
            ),
            (
                format!("{op}: no offer id"),
                c(op),
                "{}".into(),
                400,
                "INVALID_BODY",
            ),
            (
                format!("{op}: unknown field"),
                c(op),
                json!({"offer_id": offer, "agent_id": "x"}).to_string(),
                400,
                "INVALID_BODY",
            ),
            (
                format!("{op}: malformed"),
                c(op),
                "nope".into(),
                400,
                "INVALID_JSON",
            ),
        ]);
    }
    for id in bad_ids {
        for (op, body) in [
            ("accept", offer_body.as_str()),
            ("reject", offer_body.as_str()),
            ("messages", r#"{"text":"hi"}"#),
            ("typing", r#"{"state":"started"}"#),
            ("complete", "{}"),
        ] {
            cases.push((
                format!("{op}: conversation id {id:.8}"),
                format!("/v1/agent/conversations/{id}/{op}"),
                body.into(),
                400,
                "INVALID_FIELD",
            ));
        }
    }
    for (what, path, body, status, code) in cases {
        fx.rejected(&what, post(path, &body), status, code).await;
    }

    // Transcripts: only the agent's own conversations, only in its tenant.
    let get = |path: String, auth: &str| rq("GET", &path, &[("authorization", auth)], None);
    let t = |id: &str| format!("/v1/agent/conversations/{id}/messages");
    let bob = format!("Bearer {}", fx.a.bob.1);
    let b_alice = format!("Bearer {}", fx.b.alice.1);
    let reads = [
        (
            "another agent's conversation",
            t(&fx.a.s2.id),
            bearer.clone(),
        ),
        (
            "a conversation held by alice, read by bob",
            t(&conv),
            bob.clone(),
        ),
        (
            "tenant B's conversation held by an agent with alice's id",
            t(&fx.b.s1.id),
            bearer.clone(),
        ),
        (
            "tenant A's conversation read by tenant B's agent",
            t(&conv),
            b_alice.clone(),
        ),
        (
            "an unknown conversation",
            t(&uuid::Uuid::now_v7().to_string()),
            bearer.clone(),
        ),
    ];
    for (what, path, auth) in reads {
        fx.rejected(
            &format!("transcript: {what}"),
            get(path, &auth),
            404,
            "CONVERSATION_NOT_FOUND",
        )
        .await;
    }
    fx.rejected(
        "transcript: bad id",
        get(t("a.b"), &bearer),
        400,
        "INVALID_FIELD",
    )
    .await;
    fx.rejected(
        "transcript: bad from",
        get(format!("{}?from=x", t(&conv)), &bearer),
        400,
        "INVALID_QUERY",
    )
    .await;
    fx.accepted(
        "transcript: own conversation",
        get(t(&conv), &bearer),
        200,
        (0, 0),
    )
    .await;
    fx.accepted(
        "transcript: own closed conversation",
        get(t(&fx.a.closed.id), &bearer),
        200,
        (0, 0),
    )
    .await;

    // The right token with valid bodies is accepted, one event each.
    fx.accepted(
        "state",
        post("/v1/agent/state".into(), r#"{"state":"not_ready"}"#),
        202,
        (0, 1),
    )
    .await;
    fx.accepted(
        "state with a reason",
        post(
            "/v1/agent/state".into(),
            r#"{"state":"not_ready","reason_code":"BREAK"}"#,
        ),
        202,
        (0, 1),
    )
    .await;
    fx.accepted(
        "state with a lower capacity",
        post(
            "/v1/agent/state".into(),
            r#"{"state":"ready","capacity":{"chat":1}}"#,
        ),
        202,
        (0, 1),
    )
    .await;
    fx.accepted(
        "reply",
        post(
            c("messages"),
            &json!({"text": "x".repeat(MAX_TEXT)}).to_string(),
        ),
        202,
        (0, 1),
    )
    .await;
    fx.accepted(
        "complete with an empty body",
        post(c("complete"), ""),
        202,
        (0, 1),
    )
    .await;
    eprintln!("agent http: {} cases", fx.cases);
}

// ---- bot API ---------------------------------------------------------------------------

/// A bot of `tenant`; returns (id, bot API token).
async fn bot(p: &Provisioning, tenant: &str, name: &str) -> (String, String) {
    let b = p
        .create_bot(
            tenant,
            NewBot {
                name: name.into(),
                url: "http://127.0.0.1:9/bot".into(),
                credential: "bot-secret".into(),
            },
        )
        .await
        .expect("bot");
    (b.bot.id, b.token)
}

#[tokio::test]
async fn bot_api_refuses_wrong_tokens_conversations_and_bodies() {
    let mut fx = fixture().await;
    let p = fx.state.provisioning.clone();
    let (a, b) = (fx.a.id.clone(), fx.b.id.clone());
    let queue = |t: String| {
        let p = p.clone();
        async move {
            p.create_queue(&t, NewQueue { name: "q".into() })
                .await
                .expect("queue")
                .id
        }
    };
    let (a_queue, b_queue) = (queue(a.clone()).await, queue(b.clone()).await);
    let (bot1, token1) = bot(&p, &a, "bot1").await;
    let (_bot2, token2) = bot(&p, &a, "bot2").await;
    let (bot3, token3) = bot(&p, &b, "bot3").await;
    let (_, rotated) = bot(&p, &a, "rotated").await;
    let rotated_id = p
        .list_bots(
            &a,
            &nexus::stores::provisioning::PageRequest::new(Some(100), None).expect("page"),
        )
        .await
        .expect("bots")
        .items
        .into_iter()
        .find(|x| x.name == "rotated")
        .expect("rotated bot")
        .id;
    p.rotate_bot_token(&a, &rotated_id).await.expect("rotate");
    let (deleted_id, deleted) = bot(&p, &a, "deleted").await;
    p.delete_bot(&a, &deleted_id).await.expect("delete");

    // Records as the worker writes them: with bot1, handed off by bot1, closed; B's with bot3.
    let id = || uuid::Uuid::now_v7().to_string();
    let (with_bot, handed_off, closed, no_queue, b_conv) = (id(), id(), id(), id(), id());
    let record =
        |tenant: &str, cid: &str, state: ConversationState, bot: &str, queue: Option<&str>| {
            let mut c = assigned(tenant, cid, state, "nobody");
            c.agent_id = None;
            c.bot_id = Some(bot.into());
            c.queue_id = queue.map(str::to_string);
            c
        };
    let s = fx.state.sessions().expect("session store").clone();
    for c in [
        record(&a, &with_bot, ConversationState::Bot, &bot1, Some(&a_queue)),
        record(
            &a,
            &handed_off,
            ConversationState::Queued,
            &bot1,
            Some(&a_queue),
        ),
        record(
            &a,
            &closed,
            ConversationState::Closed,
            &bot1,
            Some(&a_queue),
        ),
        record(&a, &no_queue, ConversationState::Bot, &bot1, None),
        record(&b, &b_conv, ConversationState::Bot, &bot3, Some(&b_queue)),
    ] {
        assert!(s.put_conversation(&c).await.expect("put"));
    }

    let path = |cid: &str, op: &str| format!("/v1/bot/conversations/{cid}/{op}");
    let req = |method: &str, path: String, token: &str, body: Option<&str>| {
        let auth = format!("Bearer {token}");
        rq(
            method,
            &path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        )
    };
    let endpoints: [(&str, &str, Option<&str>); 3] = [
        ("POST", "messages", Some(r#"{"text":"hi"}"#)),
        ("POST", "handoff", Some("{}")),
        ("GET", "messages", None),
    ];

    // Credentials: none, garbage, another kind of token, rotated away, of a deleted bot.
    let agent_token = fx.a.alice.1.clone();
    let api_key = fx.a.key.clone();
    for (method, op, body) in endpoints {
        let p = path(&with_bot, op);
        let bare = rq(method, &p, &[("content-type", "application/json")], body);
        fx.rejected(
            &format!("{op}: no token"),
            bare,
            401,
            "AUTHENTICATION_REQUIRED",
        )
        .await;
        for (what, token) in [
            ("garbage token", "garbage"),
            ("unknown bot token", "nxb_00000000000000000000"),
            ("an agent token", agent_token.as_str()),
            ("a tenant API key", api_key.as_str()),
            ("a rotated-away token", rotated.as_str()),
            ("a deleted bot's token", deleted.as_str()),
        ] {
            let r = req(method, p.clone(), token, body);
            fx.rejected(
                &format!("{method} {op}: {what}"),
                r,
                401,
                "INVALID_CREDENTIALS",
            )
            .await;
        }
        // Conversations: unknown, another tenant's (either way), another bot's, handed off,
        // closed, not a conversation id.
        let unknown = id();
        for (what, cid, token, status, code) in [
            (
                "unknown conversation",
                unknown.as_str(),
                token1.as_str(),
                404,
                "CONVERSATION_NOT_FOUND",
            ),
            (
                "tenant B's conversation",
                b_conv.as_str(),
                token1.as_str(),
                404,
                "CONVERSATION_NOT_FOUND",
            ),
            (
                "tenant B's bot on A's",
                with_bot.as_str(),
                token3.as_str(),
                404,
                "CONVERSATION_NOT_FOUND",
            ),
            (
                "another bot's conversation",
                with_bot.as_str(),
                token2.as_str(),
                403,
                "NOT_YOUR_CONVERSATION",
            ),
            (
                "bad conversation id",
                "a.b",
                token1.as_str(),
                400,
                "INVALID_FIELD",
            ),
        ] {
            let r = req(method, path(cid, op), token, body);
            fx.rejected(&format!("{method} {op}: {what}"), r, status, code)
                .await;
        }
        if method == "POST" {
            for (what, cid, code) in [
                ("handed off", handed_off.as_str(), "HANDED_OFF"),
                ("closed", closed.as_str(), "SESSION_CLOSED"),
            ] {
                let r = req(method, path(cid, op), &token1, body);
                fx.rejected(&format!("{op}: {what}"), r, 409, code).await;
            }
        }
    }

    // Bodies.
    let long = json!({"text": "x".repeat(MAX_TEXT + 1)}).to_string();
    let many: BTreeMap<String, String> = (0..=MAX_USER_DATA)
        .map(|i| (format!("k{i}"), "v".into()))
        .collect();
    let many = json!({ "user_data": many }).to_string();
    let b_queue_body = json!({ "queue_id": b_queue }).to_string();
    let unknown_queue = json!({ "queue_id": id() }).to_string();
    for (what, op, cid, body, status, code) in [
        (
            "empty text",
            "messages",
            &with_bot,
            r#"{"text":""}"#,
            400,
            "INVALID_MESSAGE",
        ),
        (
            "oversized text",
            "messages",
            &with_bot,
            long.as_str(),
            400,
            "MESSAGE_TOO_LONG",
        ),
        (
            "empty message id",
            "messages",
            &with_bot,
            r#"{"text":"hi","message_id":""}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "unknown field",
            "messages",
            &with_bot,
            r#"{"text":"hi","agent_id":"x"}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "malformed",
            "messages",
            &with_bot,
            "text=hi",
            400,
            "INVALID_JSON",
        ),
        (
            "unknown queue",
            "handoff",
            &with_bot,
            unknown_queue.as_str(),
            404,
            "QUEUE_NOT_FOUND",
        ),
        (
            "tenant B's queue",
            "handoff",
            &with_bot,
            b_queue_body.as_str(),
            404,
            "QUEUE_NOT_FOUND",
        ),
        (
            "bad queue id",
            "handoff",
            &with_bot,
            r#"{"queue_id":"a.b"}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "too much user data",
            "handoff",
            &with_bot,
            many.as_str(),
            400,
            "INVALID_USER_DATA",
        ),
        (
            "user data not strings",
            "handoff",
            &with_bot,
            r#"{"user_data":{"k":1}}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "unknown field",
            "handoff",
            &with_bot,
            r#"{"queue":"x"}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "no queue anywhere",
            "handoff",
            &no_queue,
            "{}",
            400,
            "INVALID_FIELD",
        ),
    ] {
        let r = req("POST", path(cid, op), &token1, Some(body));
        fx.rejected(&format!("{op}: {what}"), r, status, code).await;
    }

    // The right bot: one event each; transcripts also after the handoff.
    let r = req(
        "POST",
        path(&with_bot, "messages"),
        &token1,
        Some(r#"{"text":"later"}"#),
    );
    fx.accepted("bot message", r, 202, (0, 1)).await;
    let body = json!({"queue_id": a_queue, "user_data": {"intent": "x"}}).to_string();
    let r = req("POST", path(&with_bot, "handoff"), &token1, Some(&body));
    fx.accepted("handoff", r, 202, (0, 1)).await;
    let r = req("POST", path(&with_bot, "handoff"), &token1, Some(""));
    fx.accepted("handoff with an empty body", r, 202, (0, 1))
        .await;
    for cid in [&with_bot, &handed_off] {
        let r = req("GET", path(cid, "messages"), &token1, None);
        fx.accepted("bot transcript", r, 200, (0, 0)).await;
    }
    eprintln!("bot api: {} cases", fx.cases);
}

#[tokio::test]
async fn consult_and_leave_refuse_bad_bodies() {
    let mut fx = fixture().await;
    let conv = fx.a.s1.id.clone();
    let bearer = format!("Bearer {}", fx.a.alice.1);
    let post = |path: String, body: &str| {
        rq(
            "POST",
            &path,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
    };
    let consult = format!("/v1/agent/conversations/{conv}/consult");
    for (what, path, body, status, code) in [
        ("no agent id", consult.clone(), "{}", 400, "INVALID_BODY"),
        (
            "bad agent id",
            consult.clone(),
            r#"{"agent_id":"a.b"}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "unknown field",
            consult.clone(),
            r#"{"agent_id":"x","queue_id":"y"}"#,
            400,
            "INVALID_BODY",
        ),
        ("malformed", consult.clone(), "{", 400, "INVALID_JSON"),
        (
            "unknown visibility",
            consult.clone(),
            r#"{"agent_id":"x","visibility":"customer"}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "visibility not a string",
            consult.clone(),
            r#"{"agent_id":"x","visibility":true}"#,
            400,
            "INVALID_BODY",
        ),
        (
            "reply: unknown visibility",
            format!("/v1/agent/conversations/{conv}/messages"),
            r#"{"text":"x","visibility":"ALL"}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "bad conversation id",
            "/v1/agent/conversations/a.b/consult".into(),
            r#"{"agent_id":"x"}"#,
            400,
            "INVALID_FIELD",
        ),
        (
            "leave: bad conversation id",
            "/v1/agent/conversations/a.b/leave".into(),
            "",
            400,
            "INVALID_FIELD",
        ),
    ] {
        fx.rejected(&format!("consult: {what}"), post(path, body), status, code)
            .await;
    }
    // A note is at most a message long, on a consult as on a transfer or a completion.
    let long = "x".repeat(MAX_TEXT + 1);
    let oversized = json!({"agent_id": fx.a.bob.0, "note": long}).to_string();
    fx.rejected(
        "consult: oversized note",
        post(consult.clone(), &oversized),
        400,
        "INVALID_FIELD",
    )
    .await;
    let oversized = json!({"agent_id": fx.a.bob.0, "note": long}).to_string();
    fx.rejected(
        "transfer: oversized note",
        post(
            format!("/v1/agent/conversations/{conv}/transfer"),
            &oversized,
        ),
        400,
        "INVALID_FIELD",
    )
    .await;
    let leave = format!("/v1/agent/conversations/{conv}/leave");
    let r = rq("POST", &leave, &[], None);
    fx.rejected("leave: no token", r, 401, "AUTHENTICATION_REQUIRED")
        .await;
    let body = json!({"agent_id": fx.a.bob.0}).to_string();
    fx.accepted("consult", post(consult, &body), 202, (0, 1))
        .await;
    fx.accepted("leave", post(leave, ""), 202, (0, 1)).await;
}

// ---- WebSockets over a real socket -----------------------------------------------------

async fn serve(state: AppState) -> String {
    format!("ws://{}", common::inproc::serve(state).await)
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("frame");
        if let WsMessage::Text(t) = frame {
            return serde_json::from_str(t.as_str()).expect("json frame");
        }
    }
}

/// The handshake is refused with `status`; returns the answer's body.
async fn refused(url: String, status: u16) -> Value {
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), status, "{url}");
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            assert!(code_of(&body) != "<no code>", "{url}: {body}");
            body
        }
        Err(e) => panic!("{url}: {e}"),
        Ok(_) => panic!("{url}: connected"),
    }
}

#[tokio::test]
async fn websocket_handshakes_and_agent_operations_refuse_bad_input() {
    let fx = fixture().await;
    let base = serve(fx.state.clone()).await;
    let (key, a1, a2, b1) = (&fx.a.key, &fx.a.s1, &fx.a.s2, &fx.b.s1);
    let stream = |sid: &str, k: &str, ck: &str| {
        format!("{base}/nexus/v3/chat/sessions/{sid}/stream?api_key={k}&client_key={ck}")
    };
    refused(stream(&a1.id, key, &a2.ck), 403).await;
    refused(stream(&a1.id, &fx.b.key, &b1.ck), 403).await;
    refused(stream(&a1.id, "nxk_nope", &a1.ck), 401).await;
    refused(stream(&a1.id, &fx.expired_key, &a1.ck), 403).await;
    refused(format!("{base}/v1/agent/ws?token=garbage"), 401).await;
    refused(format!("{base}/v1/agent/ws"), 401).await;
    let (mut customer, _) = tokio_tungstenite::connect_async(stream(&a1.id, key, &a1.ck))
        .await
        .expect("the right keys connect");
    customer.close(None).await.ok();

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("{base}/v1/agent/ws?token={}", fx.a.alice.1))
            .await
            .expect("agent ws");
    assert_eq!(next_json(&mut ws).await["type"], "hello");
    let conv = &a1.id;
    let long = "x".repeat(MAX_TEXT + 1);
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", "{\"op\":".into(), "INVALID_JSON"),
        ("not JSON", "hello".into(), "INVALID_JSON"),
        (
            "unknown field",
            json!({"op": "ready", "request_id": "1", "force": true}).to_string(),
            "INVALID_BODY",
        ),
        (
            "no op",
            json!({"request_id": "1"}).to_string(),
            "INVALID_BODY",
        ),
        (
            "a request id that is not a string",
            json!({"op": "ready", "request_id": 7}).to_string(),
            "INVALID_BODY",
        ),
        (
            "unknown op",
            json!({"op": "transfer_all", "request_id": "1"}).to_string(),
            "UNKNOWN_OPERATION",
        ),
        (
            "typing bad state",
            json!({"op": "typing", "conversation_id": conv, "state": "busy"}).to_string(),
            "INVALID_FIELD",
        ),
        (
            "typing no state",
            json!({"op": "typing", "conversation_id": conv}).to_string(),
            "INVALID_FIELD",
        ),
        (
            "accept non-UUID offer",
            json!({"op": "accept", "conversation_id": conv, "offer_id": "o-1"}).to_string(),
            "INVALID_FIELD",
        ),
        (
            "accept no conversation",
            json!({"op": "accept", "offer_id": uuid::Uuid::new_v4()}).to_string(),
            "INVALID_FIELD",
        ),
        (
            "reject bad conversation id",
            json!({"op": "reject", "conversation_id": "../x", "offer_id": uuid::Uuid::new_v4()})
                .to_string(),
            "INVALID_FIELD",
        ),
        (
            "reply empty",
            json!({"op": "reply", "conversation_id": conv, "text": ""}).to_string(),
            "INVALID_MESSAGE",
        ),
        (
            "reply oversized",
            json!({"op": "reply", "conversation_id": conv, "text": long}).to_string(),
            "MESSAGE_TOO_LONG",
        ),
        (
            "reply no text",
            json!({"op": "reply", "conversation_id": conv}).to_string(),
            "INVALID_FIELD",
        ),
        (
            "complete oversized note",
            json!({"op": "complete", "conversation_id": conv, "note": long}).to_string(),
            "INVALID_FIELD",
        ),
    ];
    let mut n = 0;
    for (what, text, code) in cases {
        let before = published(&fx.state).await;
        // Every request that has an id gets it back, also one that does not decode.
        let id = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("request_id").cloned())
            .unwrap_or(Value::Null);
        ws.send(WsMessage::Text(text.into())).await.expect("send");
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["type"], "error", "{what}: {answer}");
        assert_eq!(answer["code"], code, "{what}: {answer}");
        assert_eq!(answer["request_id"], id, "{what}: {answer}");
        assert_eq!(published(&fx.state).await, before, "{what}: published");
        n += 1;
    }
    // Still open and working after all that.
    ws.send(WsMessage::Text(
        json!({"op": "typing", "conversation_id": conv, "state": "stopped", "request_id": "ok"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    eprintln!("websockets: {} cases", n + 7);
}

// ---- client-key expiry and ended sessions ------------------------------------------------

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A key for `s` signed with the edge's secret, with the given `iat` and `exp`.
fn key_for(tenant: &str, s: &Session, iat: i64, exp: Option<i64>) -> String {
    ClientKeys::new(SECRET, KEY_TTL_S).issue(&Claims {
        tid: tenant.into(),
        sid: s.id.clone(),
        pid: s.pid.clone(),
        iat,
        exp,
    })
}

/// The claims inside a key (its middle part), unverified.
fn payload(key: &str) -> Value {
    use base64::Engine;
    let part = key.split('.').nth(1).expect("jwt payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64");
    serde_json::from_slice(&json).expect("json")
}

#[tokio::test]
async fn expired_client_keys_are_refused_with_their_code() {
    let mut fx = fixture().await;
    let (tenant, key) = (fx.a.id.clone(), fx.a.key.clone());
    let (s1, s2) = (fx.a.s1.clone(), fx.a.s2.clone());
    let skew = nexus::edge::chat::client_key::CLOCK_SKEW_S;
    let now = now_s();

    // Issued keys carry `exp` = `iat` + chat.client_key_ttl_s.
    let claims = payload(&s1.ck);
    let iat = claims["iat"].as_i64().expect("iat");
    assert!((now - iat).abs() < 60, "{claims}");
    assert_eq!(
        claims["exp"].as_i64(),
        Some(iat + KEY_TTL_S as i64),
        "{claims}"
    );

    let expired = key_for(&tenant, &s1, now - 7200, Some(now - 3600));
    // Keys issued before keys carried `exp` live `ttl` from `iat`.
    let old_legacy = key_for(&tenant, &s1, now - KEY_TTL_S as i64 - skew - 60, None);
    for (what, ck) in [
        ("expired", &expired),
        ("legacy, past iat + ttl", &old_legacy),
    ] {
        for (method, suffix, body) in V3 {
            let req = v3_req(method, suffix, &s1.id, Some(&key), Some(ck), body);
            fx.rejected(
                &format!("{what}: {method} {suffix}"),
                req,
                401,
                "CLIENT_KEY_EXPIRED",
            )
            .await;
        }
        let upload = rq(
            "POST",
            &format!("/nexus/v3/chat/sessions/{}/files", s1.id),
            &[("x-api-key", &key), ("x-nexus-client-key", ck)],
            None,
        );
        fx.rejected(
            &format!("{what}: upload"),
            upload,
            401,
            "CLIENT_KEY_EXPIRED",
        )
        .await;
        for op in V2_OPS {
            let form = format!("secureKey={ck}&userId={}&alias=nexus&message=hi", s1.pid);
            let body = fx
                .rejected(
                    &format!("{what}: v2 {op}"),
                    v2_req(&s1.id, op, Some(&key), &form),
                    401,
                    "CLIENT_KEY_EXPIRED",
                )
                .await;
            assert_eq!(body["statusCode"], 2, "{body}");
        }
    }
    // An expired key of another session is just a wrong key: nothing about s2 leaks.
    let s2_expired = key_for(&tenant, &s2, now - 7200, Some(now - 3600));
    fx.rejected(
        "s2's expired key on s1",
        v3_req(
            "POST",
            "messages",
            &s1.id,
            Some(&key),
            Some(&s2_expired),
            V3[0].2,
        ),
        403,
        "INVALID_CLIENT_KEY",
    )
    .await;
    let form = format!(
        "secureKey={s2_expired}&userId={}&alias=nexus&message=hi",
        s2.pid
    );
    fx.rejected(
        "v2: s2's expired key on s1",
        v2_req(&s1.id, "send", Some(&key), &form),
        403,
        "INVALID_SECURE_KEY",
    )
    .await;

    // Within the clock skew, and a legacy key younger than the ttl, still work.
    let skewed = key_for(&tenant, &s1, now - 600, Some(now - skew / 2));
    let young_legacy = key_for(&tenant, &s1, now - 60, None);
    for (what, ck) in [
        ("within the skew", skewed),
        ("young legacy key", young_legacy),
    ] {
        fx.accepted(
            what,
            v3_req("POST", "messages", &s1.id, Some(&key), Some(&ck), V3[0].2),
            202,
            (1, 0),
        )
        .await;
    }

    // The streams refuse an expired key at the handshake.
    let base = serve(fx.state.clone()).await;
    let ws = format!(
        "{base}/nexus/v3/chat/sessions/{}/stream?api_key={key}&client_key={expired}",
        s1.id
    );
    let body = refused(ws, 401).await;
    assert_eq!(code_of(&body), "CLIENT_KEY_EXPIRED", "{body}");
    let sse = format!(
        "{}/nexus/v3/chat/sessions/{}/events?api_key={key}&client_key={expired}",
        base.replacen("ws://", "http://", 1),
        s1.id
    );
    let resp = reqwest::get(&sse).await.expect("sse");
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(code_of(&body), "CLIENT_KEY_EXPIRED", "{body}");

    // A stream opened with a key about to expire ends when it does: the WebSocket with close
    // code 4001, SSE with a last `error` event.
    let skew = nexus::edge::chat::client_key::CLOCK_SKEW_S;
    let ending = key_for(&tenant, &s1, now_s() - 600, Some(now_s() - skew + 3));
    let url = format!(
        "{base}/nexus/v3/chat/sessions/{}/stream?api_key={key}&client_key={ending}",
        s1.id
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("a key still valid opens the stream");
    let closed = close_frame(&mut ws, "the socket closes when its key expires").await;
    assert_eq!(u16::from(closed.code), 4001, "{closed:?}");
    assert!(closed.reason.contains("CLIENT_KEY_EXPIRED"), "{closed:?}");

    let ending = key_for(&tenant, &s1, now_s() - 600, Some(now_s() - skew + 3));
    let sse = format!(
        "{}/nexus/v3/chat/sessions/{}/events?api_key={key}&client_key={ending}",
        base.replacen("ws://", "http://", 1),
        s1.id
    );
    let resp = reqwest::get(&sse).await.expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .expect("the event stream ends when its key expires")
        .expect("sse body");
    assert!(
        text.contains("event: error") && text.contains("CLIENT_KEY_EXPIRED"),
        "{text}"
    );
}

/// An open stream ends when the API key it was opened with stops working (here: disabled):
/// the WebSocket with close code 4003 and the key's error code, SSE with a last `error` event.
#[tokio::test]
async fn open_streams_end_when_their_api_key_is_disabled() {
    let fx = fixture().await;
    let p = &fx.state.provisioning;
    let created = p
        .create_api_key(
            &fx.a.id,
            NewApiKey {
                name: "to-disable".into(),
                permissions: vec![Permission::Chat],
                enabled: true,
                expires_at_ms: None,
            },
        )
        .await
        .expect("api key");
    let key = created.key.clone();
    let s = start(&fx.state, &key, "Ed").await;
    let base = serve(fx.state.clone()).await;
    let ws_url = format!(
        "{base}/nexus/v3/chat/sessions/{}/stream?api_key={key}&client_key={}",
        s.id, s.ck
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
        .await
        .expect("the stream opens");
    let sse_url = format!(
        "{}/nexus/v3/chat/sessions/{}/events?api_key={key}&client_key={}",
        base.replacen("ws://", "http://", 1),
        s.id,
        s.ck
    );
    let sse = reqwest::get(&sse_url).await.expect("sse");
    assert_eq!(sse.status().as_u16(), 200);
    // Both stay open while the key works.
    let early = tokio::time::timeout(Duration::from_millis(1500), ws.next()).await;
    assert!(
        early.is_err(),
        "the socket closed with a working key: {early:?}"
    );

    p.update_api_key(
        &fx.a.id,
        &created.api_key.id,
        nexus::stores::provisioning::ApiKeyPatch {
            enabled: Some(false),
            ..Default::default()
        },
    )
    .await
    .expect("disable");
    let closed = close_frame(&mut ws, "the socket closes once its API key is disabled").await;
    assert_eq!(u16::from(closed.code), 4003, "{closed:?}");
    assert!(closed.reason.contains("API_KEY_DISABLED"), "{closed:?}");
    let text = tokio::time::timeout(Duration::from_secs(10), sse.text())
        .await
        .expect("the event stream ends once its API key is disabled")
        .expect("sse body");
    assert!(
        text.contains("event: error") && text.contains("API_KEY_DISABLED"),
        "{text}"
    );
}

#[tokio::test]
async fn a_session_the_store_no_longer_has_refuses_customer_actions() {
    let mut fx = fixture().await;
    let (tenant, key) = (fx.a.id.clone(), fx.a.key.clone());
    let retention = fx.state.config.workers.conversation.closed_retention_s as i64;
    let skew = nexus::edge::chat::client_key::CLOCK_SKEW_S;
    let now = now_s();
    // A session with no record: closed and expired long ago (its key, issued with a long
    // ttl, is still valid)...
    let gone = Session {
        id: uuid::Uuid::now_v7().to_string(),
        pid: uuid::Uuid::now_v7().to_string(),
        ck: String::new(),
    };
    let gone = Session {
        ck: key_for(
            &tenant,
            &gone,
            now - retention - skew - 60,
            Some(now + 3600),
        ),
        ..gone
    };
    for (suffix, body) in [
        ("messages", Some(r#"{"text":"hi"}"#)),
        ("typing", Some(r#"{"state":"started"}"#)),
        ("user-data", Some(r#"{"user_data":{"k":"v"}}"#)),
        ("read-receipt", Some(r#"{"position":1}"#)),
        ("notices", Some(r#"{"text":"hi"}"#)),
        ("disconnect", None),
    ] {
        let req = v3_req("POST", suffix, &gone.id, Some(&key), Some(&gone.ck), body);
        fx.rejected(
            &format!("v3 {suffix}, record gone"),
            req,
            410,
            "SESSION_ENDED",
        )
        .await;
    }
    for op in ["send", "customNotice", "startTyping", "disconnect"] {
        let body = fx
            .rejected(
                &format!("v2 {op}, record gone"),
                v2_req(&gone.id, op, Some(&key), &v2_form(&gone, "")),
                410,
                "SESSION_ENDED",
            )
            .await;
        assert_eq!(body["chatEnded"], true, "{body}");
    }
    // ...and so does a session with a young key but neither record nor start mark: the store
    // lost it (a Redis restart without persistence), so a send would be dropped by the worker.
    let lost = Session {
        ck: key_for(&tenant, &gone, now, Some(now + 3600)),
        ..gone.clone()
    };
    let req = v3_req(
        "POST",
        "messages",
        &lost.id,
        Some(&key),
        Some(&lost.ck),
        V3[0].2,
    );
    fx.rejected("v3 send, session lost", req, 410, "SESSION_ENDED")
        .await;
    let body = fx
        .rejected(
            "v2 send, session lost",
            v2_req(&lost.id, "send", Some(&key), &v2_form(&lost, "")),
            410,
            "SESSION_ENDED",
        )
        .await;
    assert_eq!(body["chatEnded"], true, "{body}");
    // Reads of either say the chat ended, so a poller stops rather than polling a chat that
    // will never move again.
    for s in [&gone, &lost] {
        let req = v3_req("GET", "messages", &s.id, Some(&key), Some(&s.ck), None);
        let (status, body) = call(&fx.state, req).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["chat_ended"], true, "v3 read: {body}");
        let req = v2_req(&s.id, "refresh", Some(&key), &v2_form(s, ""));
        let (status, body) = call(&fx.state, req).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["chatEnded"], true, "v2 refresh: {body}");
    }
    // A session the edge started just now whose record the worker has not written yet is
    // accepted: the start is on its way (this fixture runs no worker).
    let fresh = start(&fx.state, &key, "Di").await;
    let req = v3_req(
        "GET",
        "messages",
        &fresh.id,
        Some(&key),
        Some(&fresh.ck),
        None,
    );
    let (status, body) = call(&fx.state, req).await;
    assert_eq!(
        (status.as_u16(), &body["chat_ended"]),
        (200, &json!(false)),
        "{body}"
    );
    fx.accepted(
        "a send before the worker applied the start",
        v3_req(
            "POST",
            "messages",
            &fresh.id,
            Some(&key),
            Some(&fresh.ck),
            V3[0].2,
        ),
        202,
        (1, 0),
    )
    .await;
}

#[tokio::test]
async fn an_open_session_renews_its_client_key_and_a_closed_one_does_not() {
    let mut fx = fixture().await;
    let (tenant, key) = (fx.a.id.clone(), fx.a.key.clone());
    let (s1, closed) = (fx.a.s1.clone(), fx.a.closed.clone());
    let now = now_s();
    // A key near its end renews into one that lives a full ttl from now.
    let old = key_for(&tenant, &s1, now - KEY_TTL_S as i64 + 30, Some(now + 30));
    let body = fx
        .accepted(
            "renew",
            v3_req("POST", "client-key", &s1.id, Some(&key), Some(&old), None),
            201,
            (0, 0),
        )
        .await;
    let renewed = body["client_key"].as_str().expect("client_key").to_string();
    let claims = payload(&renewed);
    let exp = claims["exp"].as_i64().expect("exp");
    assert_eq!(body["client_key_expires_at"], exp);
    assert!(exp >= now + KEY_TTL_S as i64, "{claims}");
    assert_eq!(
        (&claims["sid"], &claims["pid"]),
        (&json!(s1.id), &json!(s1.pid))
    );
    fx.accepted(
        "send with the renewed key",
        v3_req(
            "POST",
            "messages",
            &s1.id,
            Some(&key),
            Some(&renewed),
            V3[0].2,
        ),
        202,
        (1, 0),
    )
    .await;
    fx.rejected(
        "renew a closed chat's key",
        v3_req(
            "POST",
            "client-key",
            &closed.id,
            Some(&key),
            Some(&closed.ck),
            None,
        ),
        409,
        "SESSION_CLOSED",
    )
    .await;
}

/// An agent's conversation list holds what the records give the agent, not every conversation
/// holding one of its slots: a reservation whose offer was never applied (a worker stopped
/// between the two, or the conversation went to another agent) lists nothing.
#[tokio::test]
async fn the_agent_list_holds_only_conversations_given_to_the_agent() {
    let fx = fixture().await;
    let s = fx.state.sessions().expect("session store");
    let (alice, token) = (&fx.a.alice.0, &fx.a.alice.1);
    let capacity = BTreeMap::from([("chat".to_string(), 5)]);
    s.set_presence(&fx.a.id, alice, true, &[], &capacity, 1)
        .await
        .expect("presence");
    for conversation in [&fx.a.s1.id, &fx.a.s2.id] {
        let reserve = nexus::stores::session::Reserve {
            conversation_id: conversation.clone(),
            media: "chat".into(),
            skills: Vec::new(),
            exclude: Vec::new(),
            only: Some(alice.clone()),
            now_ms: 2,
        };
        let got = s.reserve_agent(&fx.a.id, &reserve).await.expect("reserve");
        assert_eq!(got.as_ref(), Some(alice));
    }
    let auth = format!("Bearer {token}");
    let (status, body) = call(
        &fx.state,
        rq(
            "GET",
            "/v1/agent/conversations",
            &[("authorization", &auth)],
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["conversation_id"].as_str())
        .collect();
    assert_eq!(listed, [fx.a.s1.id.as_str()], "{body}");
    assert_eq!(body["items"][0]["role"], "owner", "{body}");
}

/// A read receipt names an entry of the transcript: v3 refuses one past the end; v2 clients
/// send back the `nextPosition` they were given, which marks the last entry read.
#[tokio::test]
async fn a_read_receipt_past_the_end_is_refused_on_v3_and_read_all_on_v2() {
    let mut fx = fixture().await;
    let key = fx.a.key.clone();
    let (c, _) = chat_with_entries(&fx, &key, &[EntryKind::Message, EntryKind::Message]).await;
    fx.rejected(
        "v3 receipt one past the end",
        v3_req(
            "POST",
            "read-receipt",
            &c.id,
            Some(&key),
            Some(&c.ck),
            Some(r#"{"position":3}"#),
        ),
        400,
        "INVALID_POSITION",
    )
    .await;
    let form = format!(
        "secureKey={}&userId={}&alias=nexus&transcriptPosition=3",
        c.ck, c.pid
    );
    fx.accepted(
        "v2 receipt of the echoed nextPosition",
        v2_req(&c.id, "readReceipt", Some(&key), &form),
        200,
        (1, 0),
    )
    .await;
    // The receipt names the last entry.
    let mut positions = Vec::new();
    for p in fx
        .state
        .bus
        .partition_offsets(INBOUND)
        .await
        .expect("offsets")
    {
        for m in fx
            .state
            .bus
            .read(INBOUND, p.partition, 0, 1_000)
            .await
            .expect("read")
        {
            let e = nexus::events::decode(&m.payload).expect("decode");
            if e.envelope.conversation_id == c.id {
                if let Ok(r) = e.body_as::<nexus::events::chat::ReceiptReceived>() {
                    positions.push(r.transcript_position);
                }
            }
        }
    }
    assert_eq!(positions, [Some(2)]);
}

/// Reading a transcript from past its end: v3 (customer, as the agent and bot pages share it)
/// refuses it as its streams do; v2 answers the position after the last entry, so the next
/// refresh gets what lies before the position asked for.
#[tokio::test]
async fn a_transcript_read_past_the_end_is_refused_on_v3_and_moved_back_on_v2() {
    let mut fx = fixture().await;
    let key = fx.a.key.clone();
    let (c, _) = chat_with_entries(&fx, &key, &[EntryKind::Message, EntryKind::Message]).await;
    let get = |from: &str| {
        v3_req(
            "GET",
            &format!("messages?from={from}"),
            &c.id,
            Some(&key),
            Some(&c.ck),
            None,
        )
    };
    for from in ["4", "50", "18446744073709551615"] {
        fx.rejected(
            &format!("v3 messages from {from}"),
            get(from),
            400,
            "INVALID_POSITION",
        )
        .await;
    }
    // The position after the last entry is where a caught-up reader stands.
    let (status, body) = call(&fx.state, get("3")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["messages"].as_array().map(Vec::len),
            &body["next_position"]
        ),
        (Some(0), &json!(3))
    );
    let form = format!(
        "secureKey={}&userId={}&alias=nexus&transcriptPosition=50",
        c.ck, c.pid
    );
    let (status, body) = call(&fx.state, v2_req(&c.id, "refresh", Some(&key), &form)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["nextPosition"], 3, "{body}");
}

/// A wrong method or a path no route has answers in the API's own error shape: v2's under the
/// v2 prefix (a v2 client reads `statusCode`), the JSON error elsewhere.
#[tokio::test]
async fn wrong_methods_and_paths_answer_in_each_apis_shape() {
    let mut fx = fixture().await;
    let (key, s1) = (fx.a.key.clone(), fx.a.s1.clone());
    let v2 = |method: &str, suffix: &str| {
        rq(
            method,
            &format!("/genesys/2/chat/customer-support/{}/{suffix}", s1.id),
            &[
                ("x-api-key", &key),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            None,
        )
    };
    for (what, req, status, code) in [
        (
            "v2 GET of an operation",
            v2("GET", "send"),
            405,
            "METHOD_NOT_ALLOWED",
        ),
        (
            "v2 path with a tail",
            v2("POST", "send/more"),
            404,
            "NOT_FOUND",
        ),
    ] {
        let body = fx.rejected(what, req, status, code).await;
        assert_eq!(body["statusCode"], 2, "{what}: {body}");
        assert_eq!(body["chatEnded"], false, "{what}: {body}");
    }
    let v3 = rq(
        "PUT",
        &format!("/nexus/v3/chat/sessions/{}/messages", s1.id),
        &[("x-api-key", &key), ("x-nexus-client-key", &s1.ck)],
        None,
    );
    let body = fx
        .rejected("v3 PUT of messages", v3, 405, "METHOD_NOT_ALLOWED")
        .await;
    assert!(body.get("statusCode").is_none(), "{body}");
    let agent = rq("DELETE", "/v1/agent/me", &[], None);
    fx.rejected("agent DELETE of me", agent, 405, "METHOD_NOT_ALLOWED")
        .await;
}
