//! Chat files in-process (embedded bus, embedded session store, SQLite provisioning): an upload
//! comes back byte for byte to the customer and to the agent holding the chat; every limit
//! answers its code (INVALID_FILE_TYPE, LIMIT_FILE_SIZE, LIMIT_FILE_COUNT, SESSION_CLOSED) and
//! publishes nothing; another session, agent or tenant never reaches the file. Files expire:
//! 410 FILE_EXPIRED, their place freed, the sweeper deletes them (here on SQLite, and in a real
//! `nexus dev` process on PostgreSQL).

use crate::common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::chat::{file_part, multipart, multipart_type, png, start_session};
use common::fixtures::{agent, assigned, start, tenant_with_key, Session};
use common::inproc::{call, published as published_on, send};
use http_body_util::BodyExt;
use nexus::bus::{StartFrom, SubscribeOptions};
use nexus::config::Config;
use nexus::edge::{self, AppState};
use nexus::stores::session::{Conversation, ConversationState, Routing};
use serde_json::{json, Value};

const INBOUND: &str = "nexus.inbound.v1";
const AGENT: &str = "nexus.agent.v1";
/// Below the file limit, so the upload route must lift it.
const MAX_BODY: usize = 256;
const MAX_FILE: usize = 1024;
const MAX_FILES: usize = 2;

struct Fx {
    state: AppState,
    _dir: tempfile::TempDir,
    a_key: String,
    b_key: String,
    /// A's sessions: s1 held by alice, s2 by bob, one closed; B's session.
    s1: Session,
    s2: Session,
    closed: Session,
    b1: Session,
    alice: String,
    bob: String,
    /// Tenant A's id, and its agents' ids.
    a_id: String,
    alice_id: String,
    bob_id: String,
}

async fn fixture() -> Fx {
    fixture_with(|_| {}).await
}

/// The fixture with `tweak` applied to its config.
async fn fixture_with(tweak: impl FnOnce(&mut Config)) -> Fx {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.http.max_body_bytes = MAX_BODY;
    config.chat.max_file_bytes = MAX_FILE;
    config.chat.max_files_per_session = MAX_FILES;
    tweak(&mut config);
    let state = common::edge::embedded_state(config, dir.path()).await;
    let p = state.provisioning.clone();
    let (a, a_key) = tenant_with_key(&p, "tenant-a").await;
    let (b, b_key) = tenant_with_key(&p, "tenant-b").await;
    let (s1, s2, closed, b1) = (
        start(&state, &a_key, "Ann").await,
        start(&state, &a_key, "Ann").await,
        start(&state, &a_key, "Ann").await,
        start(&state, &b_key, "Ann").await,
    );
    let (alice_id, alice) = agent(&p, &a, "alice").await;
    let (bob_id, bob) = agent(&p, &a, "bob").await;
    for c in [
        assigned(&a, &s1.id, ConversationState::Connected, &alice_id),
        assigned(&a, &s2.id, ConversationState::Connected, &bob_id),
        assigned(&a, &closed.id, ConversationState::Closed, &alice_id),
        // B's session held by an agent id equal to alice's: ids are per tenant.
        assigned(&b, &b1.id, ConversationState::Connected, &alice_id),
    ] {
        assert!(state
            .sessions()
            .expect("sessions")
            .put_conversation(&c)
            .await
            .expect("put"));
    }
    Fx {
        state,
        _dir: dir,
        a_key,
        b_key,
        s1,
        s2,
        closed,
        b1,
        alice,
        bob,
        a_id: a,
        alice_id,
        bob_id,
    }
}

/// Events published by customers and agents (the inbound and agent topics).
async fn published(state: &AppState) -> u64 {
    published_on(state, INBOUND).await + published_on(state, AGENT).await
}

/// The bodies of every event on the inbound topic, read by a fresh group.
async fn inbound_bodies(state: &AppState) -> Vec<Value> {
    bodies_on(state, INBOUND).await
}

/// The bodies of every event on `topic`, read by a fresh group.
async fn bodies_on(state: &AppState, topic: &str) -> Vec<Value> {
    let n = published_on(state, topic).await;
    let group = format!("read-{}", uuid::Uuid::now_v7());
    let options = SubscribeOptions {
        start: StartFrom::Earliest,
        max_in_flight: 1024,
    };
    let mut sub = state
        .bus
        .subscribe(&group, topic, options)
        .await
        .expect("subscribe");
    let mut bodies = Vec::new();
    while (bodies.len() as u64) < n {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a record within 10 s")
            .expect("subscription open")
            .expect("delivery");
        let event = nexus::events::decode(&d.message.payload).expect("decode");
        bodies.push(event.to_json()["body"].clone());
    }
    sub.close().await.expect("close");
    bodies
}

fn upload_req(api_key: &str, session: &Session, ck: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(format!("/nexus/v3/chat/sessions/{}/files", session.id))
        .header("x-api-key", api_key)
        .header("x-nexus-client-key", ck)
        .header("content-type", multipart_type())
        .body(Body::from(body))
        .expect("request")
}

/// An upload of `body` whose first half is sent now; the task answering it, and what sends
/// the rest.
fn slow_upload(
    state: &AppState,
    api_key: &str,
    s: &Session,
    body: Vec<u8>,
) -> (tokio::task::JoinHandle<(StatusCode, Value)>, impl FnOnce()) {
    let (head, tail) = body.split_at(body.len() / 2);
    let tail = bytes::Bytes::copy_from_slice(tail);
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<bytes::Bytes, std::io::Error>>();
    tx.unbounded_send(Ok(bytes::Bytes::copy_from_slice(head)))
        .expect("first half");
    let mut req = upload_req(api_key, s, &s.ck, Vec::new());
    *req.body_mut() = Body::from_stream(rx);
    let state = state.clone();
    let task = tokio::spawn(async move { call(&state, req).await });
    // The upload may have answered already (a refusal before the whole body): then nobody reads.
    let rest = move || {
        let _ = tx.unbounded_send(Ok(tail));
    };
    (task, rest)
}

fn customer_get(api_key: &str, session: &str, ck: &str, file_id: &str) -> Request<Body> {
    Request::get(format!("/nexus/v3/chat/sessions/{session}/files/{file_id}"))
        .header("x-api-key", api_key)
        .header("x-nexus-client-key", ck)
        .body(Body::empty())
        .expect("request")
}

fn agent_upload(token: &str, session: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(format!("/v1/agent/conversations/{session}/files"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", multipart_type())
        .body(Body::from(body))
        .expect("request")
}

fn agent_get(token: &str, session: &str, file_id: &str) -> Request<Body> {
    Request::get(format!("/v1/agent/conversations/{session}/files/{file_id}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .expect("request")
}

/// The bytes and headers of a successful download.
async fn download(state: &AppState, req: Request<Body>) -> (Vec<u8>, String, String) {
    let resp = send(state, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (ct, cd) = (header("content-type"), header("content-disposition"));
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (bytes.to_vec(), ct, cd)
}

impl Fx {
    /// Expects `status` and `code`, and that nothing was published.
    async fn rejected(&self, what: &str, req: Request<Body>, status: u16, code: &str) {
        let before = published(&self.state).await;
        let (got, body) = call(&self.state, req).await;
        assert_eq!(got.as_u16(), status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert_eq!(published(&self.state).await, before, "{what}: published");
    }
}

#[tokio::test]
async fn an_upload_comes_back_to_the_customer_and_the_agent_only() {
    let fx = fixture().await;
    let s = &fx.state;
    // Larger than http.max_body_bytes, within chat.max_file_bytes.
    let data = png(MAX_FILE);
    let before = published(s).await;
    let body = multipart(&[
        ("message_id", None, None, b"m-file-1"),
        ("file", Some("dir/phötö 1.png"), Some("image/png"), &data),
    ]);
    let (status, up) = call(s, upload_req(&fx.a_key, &fx.s1, &fx.s1.ck, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    assert_eq!(published(s).await, before + 1, "one MessageReceived");
    let id = up["file_id"].as_str().expect("file_id").to_string();
    // The id a `message_id` gives is kept across versions: a retry after an upgrade must find
    // the first try's file.
    let stable = format!("{}/{}/file/m-file-1", fx.a_id, fx.s1.id);
    assert_eq!(
        id,
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, stable.as_bytes()).to_string()
    );
    assert_eq!(up["name"], "phötö 1.png");
    assert_eq!(up["content_type"], "image/png");
    assert_eq!(up["size"], MAX_FILE);
    assert_eq!(up["message_id"], "m-file-1");
    assert_eq!(
        up["url"],
        format!("/nexus/v3/chat/sessions/{}/files/{id}", fx.s1.id)
    );
    // The same upload retried (same message id): the same file, stored once. Its message is
    // published again (the first try may have failed or died before its publish was acked),
    // with the same client message id and file, which the worker appends once.
    let body = multipart(&[
        ("message_id", None, None, b"m-file-1"),
        ("file", Some("dir/phötö 1.png"), Some("image/png"), &data),
    ]);
    let (status, again) = call(s, upload_req(&fx.a_key, &fx.s1, &fx.s1.ck, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again, up, "a retried upload is answered as the first");
    let sent: Vec<Value> = inbound_bodies(s)
        .await
        .into_iter()
        .filter(|b| b["client_message_id"] == "m-file-1")
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for b in &sent {
        assert_eq!(b["media_ids"], json!([id]), "{b}");
    }

    let (bytes, ct, cd) = download(s, customer_get(&fx.a_key, &fx.s1.id, &fx.s1.ck, &id)).await;
    assert_eq!(bytes, data);
    assert_eq!(ct, "image/png");
    assert!(
        cd.starts_with("attachment; filename=\"ph_t_ 1.png\""),
        "{cd}"
    );
    let (bytes, ct, _) = download(s, agent_get(&fx.alice, &fx.s1.id, &id)).await;
    assert_eq!((bytes, ct.as_str()), (data.clone(), "image/png"));

    // Nobody else: another session's key, another session, another agent, another tenant.
    fx.rejected(
        "s2's client key on s1",
        customer_get(&fx.a_key, &fx.s1.id, &fx.s2.ck, &id),
        403,
        "INVALID_CLIENT_KEY",
    )
    .await;
    fx.rejected(
        "s1's file through s2",
        customer_get(&fx.a_key, &fx.s2.id, &fx.s2.ck, &id),
        404,
        "FILE_NOT_FOUND",
    )
    .await;
    fx.rejected(
        "tenant B's key with s1's client key",
        customer_get(&fx.b_key, &fx.s1.id, &fx.s1.ck, &id),
        403,
        "INVALID_CLIENT_KEY",
    )
    .await;
    fx.rejected(
        "s1's file through tenant B's session",
        customer_get(&fx.b_key, &fx.b1.id, &fx.b1.ck, &id),
        404,
        "FILE_NOT_FOUND",
    )
    .await;
    fx.rejected(
        "bob does not hold s1",
        agent_get(&fx.bob, &fx.s1.id, &id),
        404,
        "CONVERSATION_NOT_FOUND",
    )
    .await;
    fx.rejected(
        "alice's id holds B's session, but in tenant B",
        agent_get(&fx.alice, &fx.b1.id, &id),
        404,
        "CONVERSATION_NOT_FOUND",
    )
    .await;
    fx.rejected(
        "no such file",
        customer_get(&fx.a_key, &fx.s1.id, &fx.s1.ck, "nope"),
        404,
        "FILE_NOT_FOUND",
    )
    .await;
    fx.rejected(
        "uploading with s2's client key into s1",
        upload_req(
            &fx.a_key,
            &fx.s1,
            &fx.s2.ck,
            file_part("a.png", "image/png", &png(10)),
        ),
        403,
        "INVALID_CLIENT_KEY",
    )
    .await;
}

/// The agent holding a chat sends a file: checked and stored as a customer's upload, published
/// as the agent's message, downloaded by the customer; a retry is the same file and message.
/// The chat's file limit counts both sides' files; nobody else may send one into the chat.
#[tokio::test]
async fn an_agent_file_reaches_the_customer_and_nobody_else_may_send_one() {
    let fx = fixture().await;
    let s = &fx.state;
    // Refused before anything is stored or published.
    let png_part = |name: &str| file_part(name, "image/png", &png(10)).to_vec();
    for (what, req, status, code) in [
        (
            "a type not allowed",
            agent_upload(
                &fx.alice,
                &fx.s1.id,
                file_part("x.exe", "application/x-msdownload", b"MZ"),
            ),
            400,
            "INVALID_FILE_TYPE",
        ),
        (
            "too large",
            agent_upload(
                &fx.alice,
                &fx.s1.id,
                file_part("big.png", "image/png", &png(MAX_FILE + 1)),
            ),
            413,
            "LIMIT_FILE_SIZE",
        ),
        (
            "bob does not hold s1",
            agent_upload(&fx.bob, &fx.s1.id, png_part("a.png")),
            404,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "bob does not hold s1: refused before the body is read",
            agent_upload(
                &fx.bob,
                &fx.s1.id,
                file_part("big.png", "image/png", &png(MAX_FILE + 1)),
            ),
            404,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "a closed chat",
            agent_upload(&fx.alice, &fx.closed.id, png_part("a.png")),
            409,
            "CONVERSATION_CLOSED",
        ),
        (
            "alice's id holds B's session, but in tenant B",
            agent_upload(&fx.alice, &fx.b1.id, png_part("a.png")),
            404,
            "CONVERSATION_NOT_FOUND",
        ),
        (
            "no token",
            Request::post(format!("/v1/agent/conversations/{}/files", fx.s1.id))
                .body(Body::from(png_part("a.png")))
                .expect("request"),
            401,
            "AUTHENTICATION_REQUIRED",
        ),
    ] {
        fx.rejected(what, req, status, code).await;
    }

    let data = png(MAX_FILE);
    let body = multipart(&[
        ("message_id", None, None, b"m-1"),
        ("file", Some("plan.png"), Some("image/png"), &data),
    ]);
    let before = published_on(s, AGENT).await;
    let (status, up) = call(s, agent_upload(&fx.alice, &fx.s1.id, body.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    let id = up["file_id"].as_str().expect("file_id").to_string();
    assert_eq!(up["name"], "plan.png");
    assert_eq!(
        up["url"],
        format!("/v1/agent/conversations/{}/files/{id}", fx.s1.id)
    );
    let (status, again) = call(s, agent_upload(&fx.alice, &fx.s1.id, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!(again, up, "a retried upload is answered as the first");
    assert_eq!(published_on(s, AGENT).await, before + 2);
    let sent: Vec<Value> = bodies_on(s, AGENT)
        .await
        .into_iter()
        .filter(|b| b["media_ids"] == json!([id]))
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for b in &sent {
        assert_eq!(b["participant_kind"], "AGENT", "{b}");
        assert_eq!(b["text"], "plan.png", "{b}");
        assert_eq!(b["message_id"], up["message_id"], "{b}");
    }
    let (bytes, ct, _) = download(s, customer_get(&fx.a_key, &fx.s1.id, &fx.s1.ck, &id)).await;
    assert_eq!((bytes, ct.as_str()), (data.clone(), "image/png"));
    let (bytes, _, _) = download(s, agent_get(&fx.alice, &fx.s1.id, &id)).await;
    assert_eq!(bytes, data);

    // The customer's upload under the same client id is another file; then the chat is full
    // (two files), for the agent as for the customer.
    let body = multipart(&[
        ("message_id", None, None, b"m-1"),
        ("file", Some("mine.png"), Some("image/png"), &png(20)),
    ]);
    let (status, theirs) = call(s, upload_req(&fx.a_key, &fx.s1, &fx.s1.ck, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    assert_ne!(theirs["file_id"], up["file_id"]);
    fx.rejected(
        "the chat's files are taken",
        agent_upload(&fx.alice, &fx.s1.id, png_part("third.png")),
        400,
        "LIMIT_FILE_COUNT",
    )
    .await;

    // s2 is bob's. Alice may send into it as its joined consultant only: not while invited,
    // nor while offered it.
    let store = s.sessions().expect("sessions");
    let set = |change: fn(&mut Conversation, &str)| {
        let (store, tenant, s2, alice) = (store.clone(), &fx.a_id, &fx.s2.id, &fx.alice_id);
        async move {
            let mut c = store
                .conversation(tenant, s2)
                .await
                .expect("read")
                .expect("s2");
            c.routing = Routing::default();
            c.offered_to = None;
            change(&mut c, alice);
            assert!(store.put_conversation(&c).await.expect("put"), "saved");
        }
    };
    set(|c, alice| c.routing.consult_invited = Some(alice.into())).await;
    fx.rejected(
        "an invited consultant",
        agent_upload(&fx.alice, &fx.s2.id, png_part("a.png")),
        404,
        "CONVERSATION_NOT_FOUND",
    )
    .await;
    set(|c, alice| c.offered_to = Some(alice.into())).await;
    fx.rejected(
        "an offered agent",
        agent_upload(&fx.alice, &fx.s2.id, png_part("a.png")),
        404,
        "CONVERSATION_NOT_FOUND",
    )
    .await;
    set(|c, alice| c.routing.consultant = Some(alice.into())).await;
    let (status, joined) = call(s, agent_upload(&fx.alice, &fx.s2.id, png_part("c.png"))).await;
    assert_eq!(status, StatusCode::CREATED, "a joined consultant: {joined}");
    assert_eq!(
        fx.bob_id,
        store
            .conversation(&fx.a_id, &fx.s2.id)
            .await
            .expect("read")
            .and_then(|c| c.agent_id)
            .expect("owner"),
        "bob still holds s2"
    );
}

#[tokio::test]
async fn every_limit_has_its_code_and_publishes_nothing() {
    let fx = fixture().await;
    let (k, s1) = (&fx.a_key, &fx.s1);
    let up = |body: Vec<u8>| upload_req(k, s1, &s1.ck, body);
    let cases: Vec<(&str, Request<Body>, u16, &str)> = vec![
        (
            "type not allowed",
            up(file_part("a.zip", "application/zip", b"PK\x03\x04")),
            400,
            "INVALID_FILE_TYPE",
        ),
        (
            "no content type",
            up(multipart(&[("file", Some("a.png"), None, &png(10))])),
            400,
            "INVALID_FILE_TYPE",
        ),
        (
            "PNG declared, PDF sent",
            up(file_part("a.png", "image/png", b"%PDF-1.7 ...")),
            400,
            "INVALID_FILE_TYPE",
        ),
        (
            "text declared, PNG sent",
            up(file_part("a.txt", "text/plain", &png(10))),
            400,
            "INVALID_FILE_TYPE",
        ),
        (
            "one byte over the file limit",
            up(file_part("a.png", "image/png", &png(MAX_FILE + 1))),
            413,
            "LIMIT_FILE_SIZE",
        ),
        (
            "far over the route's body limit",
            up(file_part("a.png", "image/png", &png(200 * 1024))),
            413,
            "LIMIT_FILE_SIZE",
        ),
        (
            "not multipart",
            Request::post(format!("/nexus/v3/chat/sessions/{}/files", s1.id))
                .header("x-api-key", k)
                .header("x-nexus-client-key", &s1.ck)
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .expect("request"),
            400,
            "INVALID_BODY",
        ),
        (
            "no file part",
            up(multipart(&[("message_id", None, None, b"m1")])),
            400,
            "INVALID_BODY",
        ),
        (
            "an unknown part",
            up(multipart(&[
                ("file", Some("a.txt"), Some("text/plain"), b"hi"),
                ("other", None, None, b"x"),
            ])),
            400,
            "INVALID_BODY",
        ),
        (
            "empty file",
            up(file_part("a.txt", "text/plain", b"")),
            400,
            "INVALID_FIELD",
        ),
        (
            "closed session",
            upload_req(
                k,
                &fx.closed,
                &fx.closed.ck,
                file_part("a.txt", "text/plain", b"hi"),
            ),
            409,
            "SESSION_CLOSED",
        ),
        (
            "no client key",
            Request::post(format!("/nexus/v3/chat/sessions/{}/files", s1.id))
                .header("x-api-key", k)
                .body(Body::from(file_part("a.txt", "text/plain", b"hi")))
                .expect("request"),
            401,
            "AUTHENTICATION_REQUIRED",
        ),
        (
            "tenant B's API key",
            upload_req(
                &fx.b_key,
                s1,
                &s1.ck,
                file_part("a.txt", "text/plain", b"hi"),
            ),
            403,
            "INVALID_CLIENT_KEY",
        ),
    ];
    for (what, req, status, code) in cases {
        fx.rejected(what, req, status, code).await;
    }

    // The count: MAX_FILES uploads (parameters and case in the type are fine), then no more.
    for i in 0..MAX_FILES {
        let name = format!("note{i}.txt");
        let body = file_part(&name, "Text/Plain; charset=utf-8", b"hello");
        let (status, body) = call(&fx.state, up(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["content_type"], "text/plain");
    }
    fx.rejected(
        "one file too many",
        up(file_part("more.txt", "text/plain", b"hello")),
        400,
        "LIMIT_FILE_COUNT",
    )
    .await;
    // Another session of the tenant has its own count.
    let (status, body) = call(
        &fx.state,
        upload_req(
            k,
            &fx.s2,
            &fx.s2.ck,
            file_part("a.gif", "image/gif", b"GIF89a...."),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Retries of one upload racing each other for the session's last file place: one stores the
/// file, every other is answered with that file (not `LIMIT_FILE_COUNT`, which the twin's own
/// place would otherwise cause), and the place is taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_retries_of_an_upload_share_the_last_place() {
    let fx = fixture().await;
    let (k, s1) = (&fx.a_key, &fx.s1);
    for i in 0..MAX_FILES - 1 {
        let body = file_part(&format!("note{i}.txt"), "text/plain", b"hello");
        let (status, body) = call(&fx.state, upload_req(k, s1, &s1.ck, body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let twin = || {
        let body = multipart(&[
            ("message_id", None, None, b"m-twin"),
            (
                "file",
                Some("last.txt"),
                Some("text/plain"),
                b"the last one",
            ),
        ]);
        call(&fx.state, upload_req(k, s1, &s1.ck, body))
    };
    let answers = futures::future::join_all((0..6).map(|_| twin())).await;
    let (status, first) = answers[0].clone();
    assert_eq!(status, StatusCode::CREATED, "{first}");
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{body}");
        assert_eq!(body["file_id"], first["file_id"], "{answers:?}");
    }
    fx.rejected(
        "the places are taken",
        upload_req(k, s1, &s1.ck, file_part("more.txt", "text/plain", b"hello")),
        400,
        "LIMIT_FILE_COUNT",
    )
    .await;
    let id = first["file_id"].as_str().expect("file id");
    let (bytes, _, _) = download(&fx.state, customer_get(k, &s1.id, &s1.ck, id)).await;
    assert_eq!(bytes, b"the last one");
}

/// An upload whose chat closes while its body streams in is refused once the body is in: the
/// closed transcript would drop its message while the file took a place. The name sent keeps
/// only what the checked type allows to be shown.
#[tokio::test]
async fn a_chat_closed_during_an_upload_refuses_it() {
    let fx = fixture().await;
    let k = &fx.a_key;
    let tenant = fx
        .state
        .provisioning
        .authenticate_api_key(k)
        .await
        .expect("key")
        .tenant_id;
    let s = start(&fx.state, k, "Ann").await;
    let before = published(&fx.state).await;
    let body = file_part("slow.txt", "text/plain", &[b'a'; MAX_FILE / 2]);
    let (upload, rest) = slow_upload(&fx.state, k, &s, body);
    // The customer leaves (the worker saves the close) while the rest of the body is on its way.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut closed = assigned(&tenant, &s.id, ConversationState::Closed, "nobody");
    closed.agent_id = None;
    assert!(fx
        .state
        .sessions()
        .expect("sessions")
        .put_conversation(&closed)
        .await
        .expect("put"));
    // The upload must still be reading (an answer before the whole body would be a failure
    // of its own, which the assertion below shows).
    rest();
    let (status, answer) = upload.await.expect("upload task");
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("SESSION_CLOSED")),
        "{answer}"
    );
    let held = fx
        .state
        .provisioning
        .count_files(&tenant, &s.id)
        .await
        .expect("count");
    assert_eq!(held, 0, "no file kept for a closed chat");
    assert_eq!(published(&fx.state).await, before, "nothing published");

    // A name is kept as the checked type shows it: no bidi override, the type's extension.
    let body = file_part("inv\u{202e}txt.hta", "text/plain", b"hello");
    let (status, up) = call(&fx.state, upload_req(k, &fx.s1, &fx.s1.ck, body)).await;
    assert_eq!(status, StatusCode::CREATED, "{up}");
    assert_eq!(up["name"], "invtxt.hta.txt");
}

/// Uploads held in memory at once are bounded (`chat.max_uploads_in_flight`): with one place
/// and a slow upload in it, another upload waits, then gets 503 `UPLOADS_BUSY`; once the slow
/// one is stored, uploads go through again.
#[tokio::test]
async fn uploads_in_flight_are_bounded() {
    let fx = fixture_with(|c| c.chat.max_uploads_in_flight = 1).await;
    let k = &fx.a_key;
    let s = start(&fx.state, k, "Ann").await;
    let body = file_part("slow.txt", "text/plain", b"slow upload");
    let (slow, rest) = slow_upload(&fx.state, k, &s, body);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = file_part("b.txt", "text/plain", b"another");
    let (status, answer) = call(&fx.state, upload_req(k, &fx.s1, &fx.s1.ck, other.clone())).await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("UPLOADS_BUSY")),
        "{answer}"
    );
    rest();
    let (status, answer) = slow.await.expect("slow upload");
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let (status, answer) = call(&fx.state, upload_req(k, &fx.s1, &fx.s1.ck, other)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

/// `nexus_chat_files_expired_total` as the edge's /metrics renders it (0 before the first sweep).
fn files_expired_metric(state: &AppState) -> u64 {
    let rendered = state.metrics.render();
    common::process::metric_sum(&rendered, "nexus_chat_files_expired_total", &[]).unwrap_or(0.0)
        as u64
}

/// Rows of `chat_files` with this id and the bytes they hold, read from the SQLite file
/// behind the store.
async fn rows(db: &sqlx::SqlitePool, file_id: &str) -> (i64, i64) {
    sqlx::query_as("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM chat_files WHERE id = ?")
        .bind(file_id)
        .fetch_one(db)
        .await
        .expect("count")
}

#[tokio::test]
async fn expired_files_answer_410_free_their_place_and_are_swept() {
    const RETENTION_S: u64 = 2;
    let fx = fixture_with(|c| {
        c.chat.file_retention_s = RETENTION_S;
        c.chat.file_sweep_interval_ms = 50;
    })
    .await;
    let (s, k, s1) = (&fx.state, &fx.a_key, &fx.s1);
    let up = |name: &str| upload_req(k, s1, &s1.ck, file_part(name, "text/plain", b"hello"));
    let mut ids = Vec::new();
    for i in 0..MAX_FILES {
        let (status, body) = call(s, up(&format!("n{i}.txt"))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.push(body["file_id"].as_str().expect("file_id").to_string());
    }
    let first = ids[0].clone();
    let (bytes, _, _) = download(s, customer_get(k, &s1.id, &s1.ck, &first)).await;
    assert_eq!(bytes, b"hello");
    // An upload under a client message id, in the other session: retried after it expired.
    let s2 = &fx.s2;
    let named = || {
        let body = multipart(&[
            ("message_id", None, None, b"m-late"),
            ("file", Some("late.txt"), Some("text/plain"), b"late"),
        ]);
        upload_req(k, s2, &s2.ck, body)
    };
    let (status, body) = call(s, named()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let named_id = body["file_id"].as_str().expect("file_id").to_string();
    fx.rejected("full", up("more.txt"), 400, "LIMIT_FILE_COUNT")
        .await;

    // Past the retention: 410 to the customer and to the agent, and the places are free again.
    common::chat::eventually(Duration::from_secs(20), "the file expires", || async {
        let (status, _) = call(s, customer_get(k, &s1.id, &s1.ck, &first)).await;
        (status == StatusCode::GONE).then_some(())
    })
    .await;
    fx.rejected(
        "customer, expired",
        customer_get(k, &s1.id, &s1.ck, &first),
        410,
        "FILE_EXPIRED",
    )
    .await;
    fx.rejected(
        "agent, expired",
        agent_get(&fx.alice, &s1.id, &first),
        410,
        "FILE_EXPIRED",
    )
    .await;
    // Through another session the answer comes from the id's age alone: the same as for an
    // id of that age that never existed, so nothing about s1's file leaks.
    let an_hour_ago = chrono::Utc::now().timestamp() as u64 - 3600;
    let made_up = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, an_hour_ago, 0));
    for (what, id) in [
        ("s1's expired file", first.clone()),
        ("made up", made_up.to_string()),
    ] {
        fx.rejected(
            &format!("{what} through s2"),
            customer_get(k, &fx.s2.id, &fx.s2.ck, &id),
            410,
            "FILE_EXPIRED",
        )
        .await;
    }
    fx.rejected(
        "a new id that does not exist",
        customer_get(k, &s1.id, &s1.ck, &uuid::Uuid::now_v7().to_string()),
        404,
        "FILE_NOT_FOUND",
    )
    .await;
    let (status, body) = call(s, up("again.txt")).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "expired files take no place: {body}"
    );
    common::chat::eventually(
        Duration::from_secs(20),
        "the named upload expires",
        || async {
            let (status, _) = call(s, customer_get(k, &s2.id, &s2.ck, &named_id)).await;
            (status == StatusCode::GONE).then_some(())
        },
    )
    .await;
    // The retry of an expired upload is refused, swept or not: the transcript names its id
    // for the first bytes, and new ones must not take their place behind that entry.
    fx.rejected("retry of an expired upload", named(), 410, "FILE_EXPIRED")
        .await;

    // The sweeper empties the files (the rows stay while a transcript may name them); the
    // metric counts them; the ids still answer FILE_EXPIRED rather than FILE_NOT_FOUND, the
    // named one too (its id carries no time: its row tells).
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        fx._dir.path().join("provisioning.db").display()
    ))
    .await
    .expect("sqlite");
    for id in &ids {
        assert_eq!(rows(&db, id).await, (1, 5), "kept until swept");
    }
    let before = files_expired_metric(s);
    let stop = tokio_util::sync::CancellationToken::new();
    let sweeper = tokio::spawn(edge::chat::sweep_files(s.clone(), stop.clone()));
    common::chat::eventually(Duration::from_secs(20), "the sweeper empties", || async {
        let mut left = 0;
        for id in ids.iter().chain([&named_id]) {
            let (n, bytes) = rows(&db, id).await;
            assert_eq!(n, 1, "the row stays");
            left += bytes;
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(
        files_expired_metric(s) >= before + MAX_FILES as u64,
        "{}",
        s.metrics.render()
    );
    fx.rejected(
        "customer, swept",
        customer_get(k, &s1.id, &s1.ck, &first),
        410,
        "FILE_EXPIRED",
    )
    .await;
    fx.rejected(
        "named, swept",
        customer_get(k, &s2.id, &s2.ck, &named_id),
        410,
        "FILE_EXPIRED",
    )
    .await;
    fx.rejected("retry of a swept upload", named(), 410, "FILE_EXPIRED")
        .await;
    stop.cancel();
    sweeper.await.expect("sweeper stops");
}

/// The same life cycle in a real `nexus dev` process on PostgreSQL, configured through the
/// environment: the edge's own sweeper deletes the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_expire_and_are_swept_on_postgres() {
    use common::chat::{base_env, eventually, provision_tenant, start_node, Admin, TestDb};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = TestDb::create().await;
    let mut env = base_env(dir.path());
    env.extend([
        (
            "NEXUS_BUS__URL",
            format!("embedded://{}", dir.path().join("bus").display()),
        ),
        ("NEXUS_STORES__POSTGRES_URL", db.url.clone()),
        ("NEXUS_STORES__PROVISIONING_KEY", "44".repeat(32)),
        ("NEXUS_CHAT__FILE_RETENTION_S", "2".into()),
        ("NEXUS_CHAT__FILE_SWEEP_INTERVAL_MS", "200".into()),
        ("NEXUS_CHAT__MAX_FILES_PER_SESSION", "1".into()),
    ]);
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    let tenant = provision_tenant(&Admin::new(&node.url)).await;
    let http = reqwest::Client::new();
    let (sid, ck) = start_session(&node.url, &tenant.api_key, json!({"nickname": "Ann"})).await;
    let ck = ck.as_str();
    let session = format!("{}/nexus/v3/chat/sessions/{sid}", node.url);
    let image = png(100);
    let upload = |message_id: Option<&[u8]>| {
        let mut parts = vec![("file", Some("a.png"), Some("image/png"), image.as_slice())];
        parts.extend(message_id.map(|m| ("message_id", None, None, m)));
        http.post(format!("{session}/files"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", ck)
            .header("content-type", multipart_type())
            .body(multipart(&parts))
            .send()
    };
    // With a client message id, the file's id is derived from it (a retry is the same file)
    // and carries no upload time: its expiry comes from the upload in the transcript.
    let up = upload(Some(b"m-expiring")).await.expect("upload");
    assert_eq!(up.status(), 201);
    let file_id = up.json::<Value>().await.expect("json")["file_id"]
        .as_str()
        .expect("file_id")
        .to_string();
    let code = |r: Value| r["error"]["code"].as_str().unwrap_or_default().to_string();
    let full = upload(None).await.expect("upload");
    assert_eq!(full.status(), 400);
    assert_eq!(code(full.json().await.expect("json")), "LIMIT_FILE_COUNT");
    let get = || {
        http.get(format!("{session}/files/{file_id}"))
            .header("x-api-key", &tenant.api_key)
            .header("x-nexus-client-key", ck)
            .send()
    };
    assert_eq!(get().await.expect("download").status(), 200);

    let pg = sqlx::PgPool::connect(&db.url).await.expect("postgres");
    let bytes = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM chat_files WHERE id = $1",
        )
        .bind(&file_id)
        .fetch_one(&pg)
        .await
        .expect("bytes")
    };
    assert!(bytes().await > 0);
    eventually(
        Duration::from_secs(30),
        "the sweeper empties the file",
        || async { (bytes().await == 0).then_some(()) },
    )
    .await;
    let gone = get().await.expect("download");
    assert_eq!(gone.status(), 410);
    assert_eq!(code(gone.json().await.expect("json")), "FILE_EXPIRED");
    let metrics = http
        .get(format!("{}/metrics", node.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let swept = common::process::metric_sum(&metrics, "nexus_chat_files_expired_total", &[]);
    assert!(swept.is_some_and(|n| n >= 1.0), "{metrics}");
    assert_eq!(
        upload(None).await.expect("upload").status(),
        201,
        "the place is free"
    );
    pg.close().await;
    drop(node);
}
