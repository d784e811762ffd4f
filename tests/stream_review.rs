//! Review of the customer event stream's WebSocket (`GET …/sessions/{id}/stream`), in-process
//! (embedded bus, embedded session store, SQLite provisioning): what it does with the frames a
//! customer may send (data frames, oversized or bad ones, pings, a close) and its idle rule.

use crate::common;

use std::time::Duration;

use common::chat::{start_session, Ws};
use common::fixtures::tenant_with_key;
use common::inproc::serve;
use common::ws::{close_code, next_frame};
use futures::{SinkExt, StreamExt};
use nexus::config::Config;
use nexus::edge::AppState;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const MAX_BODY: usize = 4096;

struct Fx {
    state: AppState,
    /// The stream URL of a started session, keys in its query.
    stream: String,
    _dir: tempfile::TempDir,
}

/// An edge with a started chat session; `ping_ms` is `http.ws_ping_interval_ms` (0: no pings).
async fn fixture(ping_ms: u64) -> Fx {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.http.max_body_bytes = MAX_BODY;
    config.http.ws_ping_interval_ms = ping_ms;
    config.chat.client_key_secret = "client-key-secret-of-stream-review".into();
    let state = common::edge::embedded_state(config, dir.path()).await;
    let (_, api_key) = tenant_with_key(&state.provisioning, "tenant-a").await;
    let base = serve(state.clone()).await;
    let (sid, ck) = start_session(
        &format!("http://{base}"),
        &api_key,
        json!({"nickname": "Ann"}),
    )
    .await;
    let stream = format!(
        "ws://{base}/nexus/v3/chat/sessions/{sid}/stream?api_key={api_key}&client_key={ck}"
    );
    Fx {
        state,
        stream,
        _dir: dir,
    }
}

async fn connect(fx: &Fx) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(&fx.stream)
        .await
        .expect("customer ws");
    ws
}

/// The stream still reads and answers: a ping gets its pong.
async fn still_open(ws: &mut Ws, tag: &str) {
    ws.send(WsMessage::Ping(tag.as_bytes().to_vec().into()))
        .await
        .expect("ping");
    let pong = next_frame(ws).await;
    assert!(
        matches!(&pong, Some(Ok(WsMessage::Pong(p))) if p.as_ref() == tag.as_bytes()),
        "{tag}: the stream answers a ping: {pong:?}"
    );
}

/// The customer closing its stream gets the close answered (a closing handshake); the server
/// returned without sending it, so the client saw a reset (a browser: 1006, not clean).
#[tokio::test]
async fn a_close_from_the_customer_gets_the_closing_handshake() {
    let fx = fixture(0).await;
    let mut ws = connect(&fx).await;
    still_open(&mut ws, "before").await;
    ws.close(None).await.expect("close");
    let reply = next_frame(&mut ws).await;
    assert!(
        matches!(reply, Some(Ok(WsMessage::Close(_)))),
        "the close is answered: {reply:?}"
    );
}

/// Customers act over HTTP: a data frame on the stream is not a request. One above
/// `http.max_body_bytes` (a browser can send any size) is read and dropped like a small one,
/// and the stream goes on; it ended the stream with a reset (no close, no code).
#[tokio::test]
async fn a_data_frame_over_the_body_limit_does_not_end_the_stream() {
    let fx = fixture(0).await;
    let mut ws = connect(&fx).await;
    ws.send(WsMessage::Text("hello".into()))
        .await
        .expect("send");
    still_open(&mut ws, "small").await;
    for len in [MAX_BODY + 1, MAX_BODY * 2] {
        ws.send(WsMessage::Text("x".repeat(len).into()))
            .await
            .expect("send");
        still_open(&mut ws, &format!("text {len}")).await;
    }
    ws.send(WsMessage::Binary(vec![7u8; MAX_BODY * 3].into()))
        .await
        .expect("send");
    still_open(&mut ws, "binary").await;
}

/// A frame past what the stream reads at all ends it with 1009 (message too big, RFC 6455),
/// so the client learns why; it was reset without a close.
#[tokio::test]
async fn a_frame_past_the_read_limit_is_closed_with_1009() {
    let fx = fixture(0).await;
    let mut ws = connect(&fx).await;
    ws.send(WsMessage::Binary(vec![7u8; MAX_BODY * 5].into()))
        .await
        .expect("send");
    assert_eq!(close_code(&mut ws).await, 1009);
}

/// A text frame that is not UTF-8 (no browser sends one, a broken client may) ends the stream
/// with 1007 (RFC 6455: invalid frame payload data); it was reset without a close. The
/// closing handshake is completed when the client answers.
#[tokio::test]
async fn a_text_frame_that_is_not_utf8_is_closed_with_1007() {
    let fx = fixture(0).await;
    let mut ws = connect(&fx).await;
    let bad = Frame::message(vec![b'h', 0xff, b'i'], OpCode::Data(Data::Text), true);
    ws.send(WsMessage::Frame(bad)).await.expect("send");
    assert_eq!(close_code(&mut ws).await, 1007);
}

/// A frame that breaks the protocol (a control frame over 125 bytes) ends the stream with 1002;
/// it was reset without a close.
#[tokio::test]
async fn a_frame_that_breaks_the_protocol_is_closed_with_1002() {
    let fx = fixture(0).await;
    let mut ws = connect(&fx).await;
    let bad = Frame::ping(vec![1u8; 200]);
    ws.send(WsMessage::Frame(bad)).await.expect("send");
    assert_eq!(close_code(&mut ws).await, 1002);
}

/// The README's idle rule: a client that sends nothing (not even pongs: this one does not
/// read, so it answers no ping) for three ping intervals is dropped with 1001.
#[tokio::test]
async fn a_silent_customer_is_dropped_with_1001() {
    let fx = fixture(200).await;
    let mut ws = connect(&fx).await;
    // Pings at 200 and 400 ms, the close at 600 ms: all read (and pongs sent) after it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(close_code(&mut ws).await, 1001);
}

/// "Sends nothing" means any frame: a client that answers no ping but sends data frames (an
/// application heartbeat) is kept, and so is one that answers the pings.
#[tokio::test]
async fn data_frames_and_pongs_keep_a_customer_alive() {
    let fx = fixture(200).await;
    let mut ws = connect(&fx).await;
    // Not reading, so no pong goes out: only the heartbeats say the client is there.
    for _ in 0..12 {
        ws.send(WsMessage::Text("heartbeat".into()))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    still_open(&mut ws, "after heartbeats").await;
    // Reading answers the pings (tungstenite sends the pongs): the client stays.
    let until = tokio::time::Instant::now() + Duration::from_millis(1_200);
    while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
        assert!(
            matches!(frame, Some(Ok(WsMessage::Ping(_)))),
            "only pings while the client answers them: {frame:?}"
        );
    }
    still_open(&mut ws, "after pongs").await;
}

/// A close the server starts (here 1012, an edge shutting down; 4001, 4003 and 1013 go the
/// same way) reaches a client whose frames are still in flight: the server waits for the
/// client's answer rather than drop the connection at once, which answered those frames with
/// a reset that lost the close, and its code, to the client. This client's pongs to two
/// pings are in flight when the close comes.
#[tokio::test]
async fn a_close_from_the_server_reaches_a_client_with_frames_in_flight() {
    let fx = fixture(200).await;
    let mut ws = connect(&fx).await;
    // Two pings come unread (at 200 and 400 ms); reading them sends their pongs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fx.state.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(close_code(&mut ws).await, 1012);
}
