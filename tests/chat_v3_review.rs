//! Chat API v3 under review, in-process on real services: a NATS JetStream of the test's own,
//! a fresh PostgreSQL database for provisioning (and files) and Redis (a namespace per test)
//! for sessions.

use crate::common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::chat::{multipart, multipart_type, png, BOUNDARY};
use common::fixtures::{conversation, start, Session};
use http_body_util::BodyExt;
use nexus::config::Config;
use nexus::stores::session::{ConversationState, EntryKind, NewEntry, Party, PartyKind};
use serde_json::{json, Value};

const INBOUND: &str = "nexus.inbound.v1";

/// An edge in this process with its tenant's API key; the services live as long as it.
type Fx = common::edge::BrokerEdge;

/// An answer: status, headers and body (JSON, or the text when it is not JSON).
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn fixture() -> Fx {
    fixture_with(|_| {}).await
}

async fn fixture_with(tweak: impl FnOnce(&mut Config)) -> Fx {
    common::edge::broker_edge("v3-review", tweak).await
}

impl Fx {
    async fn call(&self, req: Request<Body>) -> Answer {
        let resp = common::inproc::send(&self.state, req).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status,
            headers,
            body,
        }
    }

    /// A request to `path` of `s` with the tenant's API key and the session's client key.
    fn req(&self, method: &str, path: &str, s: &Session) -> axum::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header("x-api-key", &self.api_key)
            .header("x-nexus-client-key", &s.ck)
    }

    async fn post_json(&self, s: &Session, op: &str, body: Value) -> Answer {
        let req = self
            .req("POST", &format!("/nexus/v3/chat/sessions/{}/{op}", s.id), s)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        self.call(req).await
    }

    async fn get(&self, s: &Session, path_and_query: &str) -> Answer {
        let req = self
            .req(
                "GET",
                &format!("/nexus/v3/chat/sessions/{}/{path_and_query}", s.id),
                s,
            )
            .body(Body::empty())
            .expect("request");
        self.call(req).await
    }

    async fn upload(&self, s: &Session, body: Vec<u8>) -> Answer {
        let req = self
            .req(
                "POST",
                &format!("/nexus/v3/chat/sessions/{}/files", s.id),
                s,
            )
            .header("content-type", multipart_type())
            .body(Body::from(body))
            .expect("request");
        self.call(req).await
    }

    /// Starts a chat and saves the record the worker would (open, connected).
    async fn open_chat(&self) -> Session {
        let s = start(&self.state, &self.api_key, "Ann").await;
        let c = conversation(&self.tenant, &s.id, ConversationState::Connected);
        assert!(self
            .state
            .sessions()
            .expect("sessions")
            .put_conversation(&c)
            .await
            .expect("put"));
        s
    }

    /// Appends an agent's message to the chat's transcript, as the worker would.
    async fn append(&self, s: &Session, text: &str) {
        let agent = Party {
            participant_id: "agent".into(),
            nickname: "Agent".into(),
            kind: PartyKind::Agent,
        };
        let entry = NewEntry {
            event_id: uuid::Uuid::new_v4().to_string(),
            kind: EntryKind::Message,
            from: agent,
            text: Some(text.into()),
            message_id: None,
            data: BTreeMap::new(),
            at_ms: 1,
        };
        self.state
            .sessions()
            .expect("session store")
            .append(&self.tenant, &s.id, &entry)
            .await
            .expect("append");
    }

    /// Uploads one `file` part with `headers` (its Content-Disposition and Content-Type
    /// lines, as raw bytes) and `data`.
    async fn upload_raw(&self, s: &Session, headers: &[u8], data: &[u8]) -> Answer {
        let mut body = format!("--{BOUNDARY}\r\n").into_bytes();
        body.extend_from_slice(headers);
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        self.upload(s, body).await
    }

    /// The `Content-Disposition` of a download of `file_id`.
    async fn disposition(&self, s: &Session, file_id: &str) -> String {
        let a = self.get(s, &format!("files/{file_id}")).await;
        assert_eq!(a.status, StatusCode::OK, "download: {}", a.body);
        a.headers
            .get("content-disposition")
            .and_then(|v| v.to_str().ok())
            .expect("content-disposition")
            .to_string()
    }

    /// How many events the inbound topic holds.
    async fn published(&self) -> u64 {
        common::inproc::published(&self.state, INBOUND).await
    }
}

/// README (files): names are "at most 255 characters; a name whose extension does not belong
/// to the checked type gets that type's", so that a saved download opens as what was checked.
/// A long name that carried the type's own extension was cut whole at 255 characters and kept
/// no extension at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_file_name_keeps_its_own_extension() {
    let fx = fixture().await;
    let s = fx.open_chat().await;
    let sent = format!("{}.png", "x".repeat(300));
    let a = fx
        .upload(
            &s,
            multipart(&[("file", Some(&sent), Some("image/png"), &png(64))]),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let name = a.body["name"].as_str().expect("name");
    assert_eq!(name.chars().count(), 255, "{name}");
    assert!(
        name.ends_with("xxx.png"),
        "the type's extension is kept: {name}"
    );
    let file_id = a.body["file_id"].as_str().expect("file_id");
    let cd = fx.disposition(&s, file_id).await;
    assert!(cd.ends_with(".png"), "{cd}");
}

/// README (files): INVALID_FILE_TYPE "when the part's type (without parameters, any case) is
/// not in `chat.file_types`". A part whose type is allowed but carries a parameter the
/// multipart parser cannot read (`; x`, a quoted non-ASCII file name) was refused as type ``.
/// A type not allowed is still refused whatever its parameters, and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_type_is_read_without_its_parameters_whatever_they_are() {
    let fx = fixture().await;
    let s = fx.open_chat().await;
    for content_type in [
        b"text/plain; x".as_slice(),
        b"Text/Plain;;",
        b"text/plain; name=\"r\xc3\xa9sum\xc3\xa9.txt\"",
    ] {
        let mut headers =
            b"Content-Disposition: form-data; name=\"file\"; filename=\"notes.txt\"\r\nContent-Type: "
                .to_vec();
        headers.extend_from_slice(content_type);
        let a = fx.upload_raw(&s, &headers, b"hello").await;
        let shown = String::from_utf8_lossy(content_type);
        assert_eq!(a.status, StatusCode::CREATED, "{shown}: {}", a.body);
        assert_eq!(a.body["content_type"], "text/plain", "{shown}: {}", a.body);
    }
    let before = fx.published().await;
    let a = fx
        .upload_raw(
            &s,
            b"Content-Disposition: form-data; name=\"file\"; filename=\"run.exe\"\r\n\
              Content-Type: application/x-msdownload; x",
            b"MZ",
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert_eq!(a.body["error"]["code"], "INVALID_FILE_TYPE", "{}", a.body);
    let message = a.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("application/x-msdownload"), "{message}");
    assert_eq!(
        fx.published().await,
        before,
        "a refused upload publishes nothing"
    );
}

/// README: a read receipt answers "400 `INVALID_POSITION` for a position past the
/// transcript's end". A position above `i64::MAX` (still a JSON integer the field takes) was
/// refused as `INVALID_FIELD` instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_beyond_every_position_is_past_the_end() {
    let fx = fixture().await;
    let s = fx.open_chat().await;
    fx.append(&s, "hello").await;
    let before = fx.published().await;
    for position in [2, 1u64 << 63, u64::MAX] {
        let a = fx
            .post_json(&s, "read-receipt", json!({ "position": position }))
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{position}: {}", a.body);
        assert_eq!(
            a.body["error"]["code"], "INVALID_POSITION",
            "{position}: {}",
            a.body
        );
    }
    assert_eq!(fx.published().await, before, "nothing published");
    let a = fx
        .post_json(&s, "read-receipt", json!({ "position": 0 }))
        .await;
    assert_eq!(a.body["error"]["code"], "INVALID_FIELD", "{}", a.body);
    let a = fx
        .post_json(&s, "read-receipt", json!({ "position": 1 }))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(fx.published().await, before + 1);
}

/// README (files): names are kept "without control characters or invisible formatting ones".
/// The deprecated shaping controls (U+206A–U+206F), interlinear annotations (U+FFF9–U+FFFB),
/// musical format controls and the Hangul fillers other than U+3164 stayed in the name, so a
/// name could still hide characters between what the agent sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_format_characters_leave_file_names() {
    let fx = fixture().await;
    let s = fx.open_chat().await;
    let sent = "in\u{206e}v\u{115f}\u{1160}\u{ffa0}o\u{fff9}ice\u{1d173}\u{34f}.txt";
    let a = fx
        .upload(
            &s,
            multipart(&[("file", Some(sent), Some("text/plain"), b"total: 10")]),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["name"], "invoice.txt", "{}", a.body);
    let file_id = a.body["file_id"].as_str().expect("file_id");
    let cd = fx.disposition(&s, file_id).await;
    assert!(cd.contains("filename*=UTF-8''invoice.txt"), "{cd}");
}

/// The start's answer carries the session's client key, a transcript the conversation: no
/// browser or proxy cache on the way may keep either (nor a refusal); a file download keeps its
/// own `private, no-store`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_are_not_cached() {
    let fx = fixture().await;
    let start = Request::builder()
        .method("POST")
        .uri("/nexus/v3/chat/sessions")
        .header("x-api-key", &fx.api_key)
        .header("content-type", "application/json")
        .body(Body::from(json!({"nickname": "Ann"}).to_string()))
        .expect("request");
    let started = fx.call(start).await;
    assert!(started.status.is_success(), "{}", started.body);
    assert!(
        started.body.to_string().contains("client"),
        "{}",
        started.body
    );
    let s = fx.open_chat().await;
    let read = fx.get(&s, "messages").await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let refused = fx
        .call(
            Request::builder()
                .method("GET")
                .uri(format!("/nexus/v3/chat/sessions/{}/messages", s.id))
                .header("x-api-key", &fx.api_key)
                .header("x-nexus-client-key", "not-the-key")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    assert!(refused.status.is_client_error(), "{}", refused.body);
    for (what, a) in [
        ("start", &started),
        ("transcript", &read),
        ("refusal", &refused),
    ] {
        assert_eq!(
            a.headers.get("cache-control").and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "{what}: {}",
            a.body
        );
    }
}
