//! Review of the agent desktop API and its WebSocket, in-process (embedded bus, embedded
//! session store, SQLite provisioning): what the socket answers to frames it cannot take, and
//! that it behaves as the HTTP routes do.

use crate::common;

use std::time::Duration;

use common::chat::Ws;
use common::fixtures::{agent, create_tenant};
use common::inproc::serve;
use futures::{SinkExt, StreamExt};
use nexus::config::Config;
use nexus::edge::AppState;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const AGENT_TOPIC: &str = "nexus.agent.v1";
const MAX_TEXT: usize = 20;
const MAX_BODY: usize = 4096;

struct Fx {
    state: AppState,
    base: String,
    /// (agent id, token)
    alice: (String, String),
    _dir: tempfile::TempDir,
}

async fn fixture(auth_recheck_ms: u64) -> Fx {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.chat.max_message_chars = MAX_TEXT;
    config.http.max_body_bytes = MAX_BODY;
    config.stores.auth_cache_ttl_ms = auth_recheck_ms;
    let state = common::edge::embedded_state(config, dir.path()).await;
    let tenant = create_tenant(&state.provisioning, "tenant-a").await;
    let alice = agent(&state.provisioning, &tenant, "alice").await;
    let base = serve(state.clone()).await;
    Fx {
        state,
        base,
        alice,
        _dir: dir,
    }
}

/// Records on the agent topic.
async fn published(state: &AppState) -> u64 {
    common::inproc::published(state, AGENT_TOPIC).await
}

async fn connect(fx: &Fx, token: &str) -> Ws {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/agent/ws?token={token}", fx.base))
            .await
            .expect("agent ws");
    let hello = next_frame(&mut ws).await;
    assert!(
        matches!(&hello, WsMessage::Text(t) if t.as_str().contains("\"hello\"")),
        "{hello:?}"
    );
    ws
}

/// The next frame that is not a ping or pong (a close included), within 10 s.
async fn next_frame(ws: &mut Ws) -> WsMessage {
    loop {
        let frame = common::ws::next_frame(ws)
            .await
            .expect("open")
            .expect("frame");
        if !matches!(frame, WsMessage::Pong(_)) {
            return frame;
        }
    }
}

fn json_of(frame: &WsMessage) -> Value {
    match frame {
        WsMessage::Text(t) => serde_json::from_str(t.as_str()).expect("json frame"),
        other => panic!("not a text frame: {other:?}"),
    }
}

/// Sends `frame` and answers the next text frame as JSON.
async fn ask(ws: &mut Ws, frame: WsMessage) -> Value {
    ws.send(frame).await.expect("send");
    json_of(&next_frame(ws).await)
}

fn text(v: Value) -> WsMessage {
    WsMessage::Text(v.to_string().into())
}

/// The socket still works: a valid request is acked.
async fn still_open(ws: &mut Ws, conv: &str) {
    let ok =
        json!({"op": "typing", "conversation_id": conv, "state": "stopped", "request_id": "ok"});
    let ack = ask(ws, text(ok)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["request_id"], "ok", "{ack}");
}

/// A POST of raw `body` to an agent route; (status, error code).
async fn http_post(fx: &Fx, path: &str, body: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("http://{}{path}", fx.base))
        .bearer_auth(&fx.alice.1)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("http");
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or("<none>").to_string();
    (status, code)
}

/// A request in a binary frame whose bytes are not UTF-8 is refused as the same body over
/// HTTP is (400 INVALID_JSON), and nothing is published: it was decoded lossily, its bad bytes
/// turned into U+FFFD, and sent to the customer.
#[tokio::test]
async fn a_binary_frame_that_is_not_utf8_is_refused_as_over_http() {
    let fx = fixture(5000).await;
    let conv = uuid::Uuid::now_v7().to_string();
    let not_utf8 = |v: Value| {
        let mut bytes = v.to_string().into_bytes();
        let at = bytes.iter().position(|b| *b == b'#').expect("marker");
        bytes[at] = 0xff;
        bytes
    };
    let (status, code) = http_post(
        &fx,
        &format!("/v1/agent/conversations/{conv}/messages"),
        not_utf8(json!({"text": "h#llo"})),
    )
    .await;
    assert_eq!((status, code.as_str()), (400, "INVALID_JSON"));

    let mut ws = connect(&fx, &fx.alice.1).await;
    let before = published(&fx.state).await;
    let frame = not_utf8(
        json!({"op": "reply", "conversation_id": conv, "text": "h#llo", "request_id": "b"}),
    );
    let answer = ask(&mut ws, WsMessage::Binary(frame.into())).await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "INVALID_JSON", "{answer}");
    assert_eq!(published(&fx.state).await, before, "published");
    // A binary frame of UTF-8 JSON is still a request.
    let ok =
        json!({"op": "typing", "conversation_id": conv, "state": "stopped", "request_id": "bin"});
    let ack = ask(
        &mut ws,
        WsMessage::Binary(ok.to_string().into_bytes().into()),
    )
    .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    still_open(&mut ws, &conv).await;
}

/// A frame above `http.max_body_bytes` is answered with an error frame, as HTTP answers such
/// a body 413, and the socket goes on; it was reset (no answer, no close).
#[tokio::test]
async fn a_frame_over_the_body_limit_is_answered_and_the_socket_goes_on() {
    let fx = fixture(5000).await;
    let conv = uuid::Uuid::now_v7().to_string();
    let mut ws = connect(&fx, &fx.alice.1).await;
    let before = published(&fx.state).await;
    for len in [MAX_BODY + 1, MAX_BODY * 2] {
        let big = json!({"op": "reply", "conversation_id": conv, "text": "x".repeat(len)});
        let answer = ask(&mut ws, text(big)).await;
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["code"], "PAYLOAD_TOO_LARGE", "{answer}");
        still_open(&mut ws, &conv).await;
    }
    // The limit is the body limit: a frame just within it is read (and refused for its text).
    let pad = MAX_BODY
        - json!({"op": "reply", "conversation_id": conv, "text": ""})
            .to_string()
            .len();
    let within = json!({"op": "reply", "conversation_id": conv, "text": "x".repeat(pad)});
    assert_eq!(within.to_string().len(), MAX_BODY);
    let answer = ask(&mut ws, text(within)).await;
    assert_eq!(answer["code"], "MESSAGE_TOO_LONG", "{answer}");
    assert_eq!(
        published(&fx.state).await,
        before + 2,
        "only the two typings"
    );
}

/// A field the op's HTTP request has no place for: HTTP refuses it (400 INVALID_BODY). The
/// socket refuses a `visibility` the op has no place for (a transfer meant as private would go
/// as it is; it was dropped unread and acked), with its request id and nothing published; any
/// other field of another op it ignores, as it always has (desks send one envelope for every
/// op), and does the request.
#[tokio::test]
async fn a_visibility_the_op_has_no_place_for_is_refused_other_fields_ignored() {
    let fx = fixture(5000).await;
    let conv = uuid::Uuid::now_v7().to_string();
    let offer = uuid::Uuid::new_v4().to_string();
    let c = |op: &str| format!("/v1/agent/conversations/{conv}/{op}");
    // (op, path, the HTTP body with a field of another op)
    let cases: Vec<(&str, String, Value)> = vec![
        (
            "typing",
            c("typing"),
            json!({"state": "started", "text": "secret"}),
        ),
        (
            "transfer",
            c("transfer"),
            json!({"queue_id": "q1", "visibility": "agents"}),
        ),
        (
            "complete",
            c("complete"),
            json!({"disposition": "done", "text": "bye"}),
        ),
        ("reply", c("messages"), json!({"text": "hi", "note": "n"})),
        (
            "accept",
            c("accept"),
            json!({"offer_id": offer, "agent_id": "someone"}),
        ),
        (
            "consult",
            c("consult"),
            json!({"agent_id": "bob", "queue_id": "q1"}),
        ),
        (
            "not_ready",
            "/v1/agent/state".into(),
            json!({"state": "not_ready", "disposition": "x"}),
        ),
    ];
    let mut ws = connect(&fx, &fx.alice.1).await;
    for (op, path, body) in cases {
        let (status, code) = http_post(&fx, &path, body.to_string().into_bytes()).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "INVALID_BODY"),
            "HTTP {op}: {body}"
        );
        let mut frame = body.clone();
        frame["op"] = json!(op);
        frame["request_id"] = json!(op);
        if let Some(o) = frame.as_object_mut() {
            o.remove("state")
                .filter(|_| op == "typing")
                .map(|s| o.insert("state".into(), s));
        }
        if op != "not_ready" {
            frame["conversation_id"] = json!(conv);
        }
        let before = published(&fx.state).await;
        let answer = ask(&mut ws, text(frame.clone())).await;
        if body.get("visibility").is_some() {
            assert_eq!(answer["type"], "error", "WS {frame}: {answer}");
            assert_eq!(answer["code"], "INVALID_BODY", "WS {frame}: {answer}");
            assert_eq!(answer["request_id"], op, "WS {frame}: {answer}");
            assert_eq!(published(&fx.state).await, before, "WS {frame}: published");
        } else {
            assert_eq!(answer["type"], "ack", "WS {frame}: {answer}");
            assert_eq!(published(&fx.state).await, before + 1, "WS {frame}");
        }
    }
    // Every field an op has is still taken.
    let valid = [
        json!({"op": "not_ready", "reason_code": "BREAK", "capacity": {"chat": 1}}),
        json!({"op": "ready", "capacity": {"chat": 2}}),
        json!({"op": "reply", "conversation_id": conv, "text": "hi", "message_id": "m1", "visibility": "agents"}),
        json!({"op": "typing", "conversation_id": conv, "state": "started"}),
        json!({"op": "complete", "conversation_id": conv, "disposition": "done", "note": "n"}),
        json!({"op": "transfer", "conversation_id": conv, "agent_id": "bob", "note": "n"}),
        json!({"op": "consult", "conversation_id": conv, "agent_id": "bob", "note": "n", "visibility": "agents"}),
        json!({"op": "accept", "conversation_id": conv, "offer_id": offer}),
        json!({"op": "leave", "conversation_id": conv}),
    ];
    for mut frame in valid {
        frame["request_id"] = json!("v");
        let before = published(&fx.state).await;
        let answer = ask(&mut ws, text(frame.clone())).await;
        assert_eq!(answer["type"], "ack", "{frame}: {answer}");
        assert_eq!(published(&fx.state).await, before + 1, "{frame}");
    }
    // The op's own checks still come first for an unknown op.
    let answer = ask(&mut ws, text(json!({"op": "dance", "text": "x"}))).await;
    assert_eq!(answer["code"], "UNKNOWN_OPERATION", "{answer}");
}

/// The desk closing its socket gets the close answered (a closing handshake); it was reset.
#[tokio::test]
async fn a_close_from_the_desk_gets_the_closing_handshake() {
    let fx = fixture(5000).await;
    let mut ws = connect(&fx, &fx.alice.1).await;
    ws.close(None).await.expect("close");
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(reply, Some(Ok(WsMessage::Close(_)))),
        "the close is answered: {reply:?}"
    );
}

/// A frame the socket cannot read ends it with the close code that says why (RFC 6455), as on
/// the customer's stream: a text frame that is not UTF-8 → 1007, a control frame over 125
/// bytes → 1002. The desk was reset without a close.
#[tokio::test]
async fn an_unreadable_frame_is_closed_with_its_code() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let fx = fixture(5000).await;
    for (frame, want) in [
        (
            Frame::message(vec![b'h', 0xff, b'i'], OpCode::Data(Data::Text), true),
            1007u16,
        ),
        (Frame::ping(vec![1u8; 200]), 1002),
    ] {
        let mut ws = connect(&fx, &fx.alice.1).await;
        ws.send(WsMessage::Frame(frame)).await.expect("send");
        let code = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("an answer in time")
            {
                // The greeting and pushes sent before the frame was read.
                Some(Ok(WsMessage::Text(_))) => continue,
                Some(Ok(WsMessage::Close(Some(f)))) => break u16::from(f.code),
                other => panic!("a close frame with a code, got {other:?}"),
            }
        };
        assert_eq!(code, want);
    }
}
