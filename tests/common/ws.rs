//! WebSocket readers for tests: the next frame that is not the server's ping, and the close
//! frame (or its code) a socket ends with.

use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error, Message as WsMessage};

/// The next frame that is not the server's ping, within 10 s: `None` when the connection
/// ended, `Some(Err)` when it ended without a close (a reset).
pub async fn next_frame<S>(ws: &mut S) -> Option<Result<WsMessage, Error>>
where
    S: Stream<Item = Result<WsMessage, Error>> + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time");
        if !matches!(frame, Some(Ok(WsMessage::Ping(_)))) {
            return frame;
        }
    }
}

/// The code of the close frame the server sent next (panics on anything else).
pub async fn close_code<S>(ws: &mut S) -> u16
where
    S: Stream<Item = Result<WsMessage, Error>> + Unpin,
{
    match next_frame(ws).await {
        Some(Ok(WsMessage::Close(Some(frame)))) => u16::from(frame.code),
        other => panic!("a close frame with a code, got {other:?}"),
    }
}

/// The close frame `ws` ends with, every other frame passed over: `Err` when none came within
/// `within`, `Ok(None)` when the socket ended without one.
pub async fn close_within<S>(
    ws: &mut S,
    within: Duration,
) -> Result<Option<CloseFrame>, tokio::time::error::Elapsed>
where
    S: Stream<Item = Result<WsMessage, Error>> + Unpin,
{
    tokio::time::timeout(within, async {
        while let Some(frame) = ws.next().await {
            if let Ok(WsMessage::Close(close)) = frame {
                return close;
            }
        }
        None
    })
    .await
}

/// The close frame a socket ends with, within 10 s; `what` says what was awaited.
pub async fn close_frame<S>(ws: &mut S, what: &str) -> CloseFrame
where
    S: Stream<Item = Result<WsMessage, Error>> + Unpin,
{
    close_within(ws, Duration::from_secs(10))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("a close frame")
}
