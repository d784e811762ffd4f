//! Legacy Chat API v2 under the protocol details a widget in the field relies on, in-process on
//! real services: a NATS JetStream of the test's own, a fresh PostgreSQL database for
//! provisioning and Redis (a namespace per test) for sessions.

use crate::common;

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use nexus::edge;
use nexus::events::chat::{ConversationRequested, MessageReceived, ReceiptReceived};
use nexus::stores::session::{EntryKind, NewEntry, Party, PartyKind};
use serde_json::{json, Value};
use tower::ServiceExt;

const INBOUND: &str = "nexus.inbound.v1";

/// An edge in this process with its tenant's API key; the services live as long as it.
type Fx = common::edge::BrokerEdge;

/// A chat started through v2.
struct Chat {
    id: String,
    user_id: String,
    secure_key: String,
}

impl Chat {
    /// The credentials every v2 operation carries, then `extra` (`&field=value…`).
    fn form(&self, extra: &str) -> String {
        format!(
            "secureKey={}&userId={}&alias=nexus{extra}",
            self.secure_key, self.user_id
        )
    }
}

async fn fixture() -> Fx {
    common::edge::broker_edge("v2-review", |_| {}).await
}

impl Fx {
    /// POSTs `body` to `path` with the tenant's `apikey` and `content_type`.
    async fn post_as(&self, path: &str, content_type: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::post(path)
            .header("apikey", &self.api_key)
            .header("content-type", content_type)
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = edge::app(self.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, json)
    }

    /// A form POST, as v2 widgets send them.
    async fn post(&self, path: &str, form: &str) -> (StatusCode, Value) {
        self.post_as(path, "application/x-www-form-urlencoded", form)
            .await
    }

    /// `op` on `chat` with its credentials and `extra` form fields.
    async fn op(&self, chat: &Chat, op: &str, extra: &str) -> (StatusCode, Value) {
        self.post(
            &format!("/genesys/2/chat/svc/{}/{op}", chat.id),
            &chat.form(extra),
        )
        .await
    }

    async fn start(&self, form: &str) -> Chat {
        let (status, body) = self.post("/genesys/2/chat/svc", form).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let s = |k: &str| body[k].as_str().expect(k).to_string();
        Chat {
            id: s("chatId"),
            user_id: s("userId"),
            secure_key: s("secureKey"),
        }
    }

    /// Appends an entry from `kind` of party to the chat's transcript, as the worker would.
    async fn append_as(&self, chat: &Chat, kind: EntryKind, from: PartyKind, text: &str) {
        let store = self.state.sessions().expect("session store");
        let entry = NewEntry {
            event_id: uuid::Uuid::new_v4().to_string(),
            kind,
            from: Party {
                participant_id: format!("{from:?}"),
                nickname: format!("{from:?}"),
                kind: from,
            },
            text: Some(text.into()),
            message_id: None,
            data: BTreeMap::new(),
            at_ms: 1,
        };
        store
            .append(&self.tenant, &chat.id, &entry)
            .await
            .expect("append");
    }

    /// The events published on the inbound topic for `chat`, decoded.
    async fn published_events(&self, chat: &Chat) -> Vec<nexus::events::Event> {
        let bus = &self.state.bus;
        let mut out = Vec::new();
        for p in bus.partition_offsets(INBOUND).await.expect("offsets") {
            let records = bus
                .read(INBOUND, p.partition, p.low, 10_000)
                .await
                .expect("read");
            for m in records {
                let e = nexus::events::decode(&m.payload).expect("decode");
                if e.envelope.conversation_id == chat.id {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Appends to the chat's stored transcript an entry the store cannot read: every read of it
    /// fails, as on a store outage, while the chat's keys stay valid.
    async fn break_transcript(&self, chat: &Chat) {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*tx:{}", self.namespace, chat.id))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        assert_eq!(keys.len(), 1, "the chat's transcript key: {keys:?}");
        let _: () = redis::cmd("RPUSH")
            .arg(&keys[0])
            .arg("not an entry")
            .query_async(&mut conn)
            .await
            .expect("RPUSH");
    }

    /// The transcript positions of the read receipts published for `chat`.
    async fn receipts(&self, chat: &Chat) -> Vec<Option<i64>> {
        self.published_events(chat)
            .await
            .iter()
            .filter_map(|e| e.body_as::<ReceiptReceived>().ok())
            .map(|r| r.transcript_position)
            .collect()
    }

    /// The texts of the customer messages published for `chat`.
    async fn sent(&self, chat: &Chat) -> Vec<String> {
        self.published_events(chat)
            .await
            .iter()
            .filter_map(|e| e.body_as::<MessageReceived>().ok())
            .filter_map(|m| m.text)
            .collect()
    }
}

/// Genesys v2 clients end the chat session on `statusCode` 2 ("unrecoverable error; terminate
/// the session") and retry on 1 ("the request was unsuccessful; retry"). A passing outage of
/// the session store (a 5xx) must not end every polling customer's chat: it is 1, with the
/// poller's position, while a refused request stays 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_answers_retry_not_the_end_of_the_chat() {
    let fx = fixture().await;
    let chat = fx.start("nickname=Ann").await;
    fx.append_as(&chat, EntryKind::Message, PartyKind::Agent, "hello")
        .await;
    let (status, body) = fx.op(&chat, "refresh", "&transcriptPosition=1").await;
    assert_eq!((status, &body["statusCode"]), (StatusCode::OK, &json!(0)));

    fx.break_transcript(&chat).await;
    for op in ["refresh", "startTyping"] {
        let (status, body) = fx.op(&chat, op, "&transcriptPosition=2").await;
        if op == "startTyping" {
            // It published: its answer leaves the transcript for the next refresh.
            assert_eq!(status, StatusCode::OK, "{op}: {body}");
            assert_eq!(body["messages"], json!([]), "{op}: {body}");
            continue;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{op}: {body}");
        assert_eq!(body["statusCode"], 1, "{op}: a retry, not the end: {body}");
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{op}: {body}");
        assert_eq!(body["chatEnded"], false, "{op}: {body}");
        assert_eq!(body["nextPosition"], 2, "{op}: keeps its place: {body}");
        assert_eq!(body["messages"], json!([]), "{op}: {body}");
    }

    // A refused request is still the end for the client.
    let stranger = Chat {
        secure_key: "forged".into(),
        ..chat
    };
    let (status, body) = fx.op(&stranger, "refresh", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["statusCode"], 2, "{body}");
}

/// The service URL's trailing slash is accepted (INTERFACES §2), so a widget configured with
/// `…/chat/svc/` starts its chat there and then appends `/{chatId}/{op}`: its operations
/// arrive as `…/chat/svc//{chatId}/{op}` and must reach the chat, not a 404 (statusCode 2,
/// the widget ends a chat it just started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_url_with_a_trailing_slash_serves_the_whole_chat() {
    let fx = fixture().await;
    let base = "/genesys/2/chat/svc/";
    let (status, body) = fx.post(base, "nickname=Ann").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let chat = Chat {
        id: body["chatId"].as_str().expect("chatId").into(),
        user_id: body["userId"].as_str().expect("userId").into(),
        secure_key: body["secureKey"].as_str().expect("secureKey").into(),
    };
    let at = |op: &str| format!("{base}/{}/{op}", chat.id);
    let (status, body) = fx
        .post(
            &at("send"),
            &chat.form("&message=hello&transcriptPosition=1"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "send: {body}");
    assert_eq!(body["statusCode"], 0, "send: {body}");
    assert_eq!(fx.sent(&chat).await, ["hello"]);

    fx.append_as(&chat, EntryKind::Message, PartyKind::Agent, "hi Ann")
        .await;
    let (status, body) = fx
        .post(&at("refresh"), &chat.form("&transcriptPosition=1"))
        .await;
    assert_eq!(status, StatusCode::OK, "refresh: {body}");
    assert_eq!(body["messages"][0]["text"], "hi Ann", "refresh: {body}");
    assert_eq!(body["nextPosition"], 2, "refresh: {body}");

    // Still this chat's credentials only.
    let (status, body) = fx
        .post(&at("refresh"), "secureKey=forged&userId=x&alias=nexus")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["messages"], json!([]), "{body}");
}

/// A v2 read receipt past the transcript's end marks the last entry read (README): a position
/// beyond any a transcript can hold is past the end too, not a malformed field (a 400,
/// statusCode 2: the widget would end the chat over a read receipt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_beyond_any_position_marks_the_last_entry_read() {
    let fx = fixture().await;
    let chat = fx.start("nickname=Ann").await;
    for text in ["one", "two"] {
        fx.append_as(&chat, EntryKind::Message, PartyKind::Agent, text)
            .await;
    }
    for far in ["9223372036854775808", "18446744073709551615"] {
        let (status, body) = fx
            .op(&chat, "readReceipt", &format!("&transcriptPosition={far}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{far}: {body}");
        assert_eq!(body["statusCode"], 0, "{far}: {body}");
    }
    assert_eq!(fx.receipts(&chat).await, [Some(2), Some(2)]);
}

/// A read receipt before the transcript has any entry (a client echoing `nextPosition` 1 right
/// after start, before the worker applied it) is answered `statusCode` 0 and publishes nothing:
/// there is nothing to mark read. It was 400 `INVALID_POSITION`, `statusCode` 2: the widget
/// ended its chat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_before_any_entry_is_no_error() {
    let fx = fixture().await;
    let chat = fx.start("nickname=Ann").await;
    let (status, body) = fx.op(&chat, "readReceipt", "&transcriptPosition=1").await;
    assert_eq!(
        (status, &body["statusCode"]),
        (StatusCode::OK, &json!(0)),
        "{body}"
    );
    assert!(fx.receipts(&chat).await.is_empty());
    fx.append_as(&chat, EntryKind::Message, PartyKind::Agent, "hi")
        .await;
    let (status, body) = fx.op(&chat, "readReceipt", "&transcriptPosition=2").await;
    assert_eq!(
        (status, &body["statusCode"]),
        (StatusCode::OK, &json!(0)),
        "{body}"
    );
    assert_eq!(fx.receipts(&chat).await, [Some(1)]);
}

/// v2 positions are 1-based (refresh's `transcriptPosition` 0 reads from the start), so a read
/// receipt at position 0 names no message: nothing is read yet. It is answered `statusCode` 0
/// with the transcript from its start and marks nothing; it was taken as 1, marking the first
/// entry read though the customer had read none. (v3 refuses position 0 with 400 INVALID_FIELD;
/// a v2 refusal is statusCode 2, which ends the widget's chat.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_at_position_zero_marks_nothing() {
    let fx = fixture().await;
    let chat = fx.start("nickname=Ann").await;
    for text in ["one", "two"] {
        fx.append_as(&chat, EntryKind::Message, PartyKind::Agent, text)
            .await;
    }
    let (status, body) = fx.op(&chat, "readReceipt", "&transcriptPosition=0").await;
    assert_eq!(
        (status, &body["statusCode"]),
        (StatusCode::OK, &json!(0)),
        "{body}"
    );
    let texts: Vec<&Value> = body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| &m["text"])
        .collect();
    assert_eq!(texts, [&json!("one"), &json!("two")], "{body}");
    assert_eq!(body["nextPosition"], 3, "{body}");
    assert!(fx.receipts(&chat).await.is_empty(), "nothing marked read");

    // The first message read is position 1, as before.
    let (status, body) = fx.op(&chat, "readReceipt", "&transcriptPosition=1").await;
    assert_eq!((status, &body["statusCode"]), (StatusCode::OK, &json!(0)));
    assert_eq!(fx.receipts(&chat).await, [Some(1)]);
}

/// A multipart form body of `fields` (GMS takes `multipart/form-data` as well as urlencoded: a
/// browser widget posting `FormData` sends it); `file` adds a file part.
fn multipart(fields: &[(&str, &str)], file: bool) -> (String, String) {
    let boundary = "----nexusformboundary7MA4YWxk";
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    if file {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A widget posting `FormData` (multipart) starts a chat with its fields and user data, and
/// sends; a file part is refused (v2 has no file operation) and publishes nothing. It was read
/// as a urlencoded form: 400 `INVALID_NICKNAME` for a start that named one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_form_is_read_as_its_fields() {
    let fx = fixture().await;
    let (content_type, body) = multipart(
        &[
            ("nickname", "Ann Smith"),
            ("emailAddress", "ann@example.com"),
            ("subject", "an order & a question"),
            ("userData[order]", "42"),
            ("text", "hello, with a + and a %20"),
        ],
        false,
    );
    let (status, started) = fx
        .post_as("/genesys/2/chat/svc", &content_type, &body)
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["statusCode"], 0, "{started}");
    let chat = Chat {
        id: started["chatId"].as_str().expect("chatId").into(),
        user_id: started["userId"].as_str().expect("userId").into(),
        secure_key: started["secureKey"].as_str().expect("secureKey").into(),
    };
    let published = fx.published_events(&chat).await;
    let request = published
        .iter()
        .find_map(|e| e.body_as::<ConversationRequested>().ok())
        .expect("the start is published");
    assert_eq!(request.nickname, "Ann Smith");
    assert_eq!(
        request.contact.email_address.as_deref(),
        Some("ann@example.com")
    );
    assert_eq!(request.subject.as_deref(), Some("an order & a question"));
    assert_eq!(
        request.user_data.get("order").map(String::as_str),
        Some("42")
    );
    assert_eq!(
        request.first_message.as_deref(),
        Some("hello, with a + and a %20")
    );

    let (content_type, body) = multipart(
        &[
            ("secureKey", &chat.secure_key),
            ("userId", &chat.user_id),
            ("alias", "nexus"),
            ("message", "sent as FormData"),
            ("transcriptPosition", "1"),
        ],
        false,
    );
    let at = format!("/genesys/2/chat/svc/{}/send", chat.id);
    let (status, sent) = fx.post_as(&at, &content_type, &body).await;
    assert_eq!(
        (status, &sent["statusCode"]),
        (StatusCode::OK, &json!(0)),
        "{sent}"
    );
    assert_eq!(fx.sent(&chat).await, ["sent as FormData"]);

    // A file part: refused, nothing more published.
    let before = fx.published_events(&chat).await.len();
    let (content_type, body) = multipart(
        &[
            ("secureKey", &chat.secure_key),
            ("userId", &chat.user_id),
            ("alias", "nexus"),
            ("message", "with a file"),
        ],
        true,
    );
    let (status, refused) = fx.post_as(&at, &content_type, &body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["errors"][0]["code"], "INVALID_BODY", "{refused}");
    assert_eq!(fx.published_events(&chat).await.len(), before);
}

/// A failed publish may have landed (a broker timeout): a `send` is answered `statusCode` 1 all
/// the same (a retried message shows twice at worst, the chat goes on), but a `start` is 2: its
/// retry would open a second chat beside one that may exist, left waiting for an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_may_have_landed_ends_a_start_but_not_a_send() {
    let mut fx = fixture().await;
    let chat = fx.start("nickname=Ann").await;
    fx.nats.kill();
    let (status, sent) = fx
        .op(&chat, "send", "&message=hello&transcriptPosition=1")
        .await;
    assert!(status.is_server_error(), "{status}: {sent}");
    assert_eq!(sent["statusCode"], 1, "send: {sent}");
    let (status, started) = fx.post("/genesys/2/chat/svc", "nickname=Bob").await;
    assert!(status.is_server_error(), "{status}: {started}");
    assert_eq!(started["statusCode"], 2, "start: {started}");
}
