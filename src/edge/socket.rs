//! Writes to the edge's WebSockets (customer streams, agent desks) with a bound on how long a
//! client that does not read can hold its socket's task.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};

/// How long one frame may wait for a client that does not read: past it the socket is dropped
/// (the client reconnects and resumes), so a stalled reader holds no task, and every close is
/// sent or given up within it.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(15);

/// Sends `message` within [`SEND_TIMEOUT`]; false when the socket is gone or stalled.
pub(crate) async fn send(socket: &mut WebSocket, message: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await,
        Ok(Ok(()))
    )
}

/// Sends a text frame within [`SEND_TIMEOUT`].
pub(crate) async fn send_text(socket: &mut WebSocket, text: String) -> bool {
    send(socket, Message::Text(text.into())).await
}

/// Ends the socket with a close frame saying why (sent within [`SEND_TIMEOUT`], or not at all).
pub(crate) async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_string().into(),
    };
    send(socket, Message::Close(Some(frame))).await;
}
