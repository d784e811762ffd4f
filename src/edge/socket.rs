//! Writes to the edge's WebSockets (customer streams, agent desks) with a bound on how long a
//! client that does not read can hold its socket's task, and pings that find clients gone
//! without a close.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};

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
        reason: close_reason(reason).to_string().into(),
    };
    send(socket, Message::Close(Some(frame))).await;
}

/// The most of a close reason a close frame carries (RFC 6455: a control frame's payload is at
/// most 125 bytes, two of them the code).
const MAX_CLOSE_REASON: usize = 123;

/// `reason` cut to [`MAX_CLOSE_REASON`] bytes on a character boundary: a longer one is sent
/// as is by tungstenite, and the client refuses the whole frame (code included) as a protocol
/// error.
fn close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// How long a close the server starts waits for the client's close in answer.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Ends the socket as [`close`] does, then completes the closing handshake: what the client
/// still sends is read (and dropped) until its close answers ours, for at most
/// [`CLOSE_LINGER`]. A socket dropped at once leaves the client's frames in flight (a pong, a
/// heartbeat) to a closed connection, which answers them with a reset: the client then
/// loses the close frame, and its code, unless it had read it already.
pub(crate) async fn close_cleanly(socket: &mut WebSocket, code: u16, reason: &str) {
    close(socket, code, reason).await;
    let answered = async { while let Some(Ok(_)) = socket.recv().await {} };
    let _ = tokio::time::timeout(CLOSE_LINGER, answered).await;
}

/// Sends the close reply tungstenite queued when the client's close was read: dropped unsent,
/// the client sees the connection reset instead of a closing handshake (a browser: 1006, not
/// clean).
pub(crate) async fn finish_close(socket: &mut WebSocket) {
    use futures::SinkExt;
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.flush()).await;
}

/// How many times `http.max_body_bytes` a socket reads of one frame: a frame the client may
/// send (a browser sends any size) up to this is read and answered as the socket's protocol
/// says; past it the frame cannot be read and the socket ends (close 1009).
const READ_LIMIT_FACTOR: usize = 4;

/// `ws` reading frames up to [`READ_LIMIT_FACTOR`] × `max_body_bytes`.
pub(crate) fn read_up_to_limit(ws: WebSocketUpgrade, max_body_bytes: usize) -> WebSocketUpgrade {
    let limit = max_body_bytes.saturating_mul(READ_LIMIT_FACTOR);
    ws.max_message_size(limit).max_frame_size(limit)
}

/// Why a frame the client sent could not be read, as a close code and reason (RFC 6455
/// 7.4.1); `None` when the connection itself failed (nothing can be sent on it then).
pub(crate) fn refusal(e: &axum::Error) -> Option<(u16, &'static str)> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return None;
        }
        cause = c.source();
    }
    refusal_of(&e.to_string())
}

/// The refusal of a read error by its text: the error is tungstenite's, of the version axum
/// uses, which this crate cannot name. A text not known here is no refusal (the socket just
/// ends, as before).
fn refusal_of(error: &str) -> Option<(u16, &'static str)> {
    const KNOWN: [(&str, u16, &str); 3] = [
        ("Space limit exceeded", 1009, "frame too large"),
        (
            "UTF-8 encoding error",
            1007,
            "a text frame that is not UTF-8",
        ),
        ("WebSocket protocol error", 1002, "protocol error"),
    ];
    KNOWN
        .iter()
        .find(|(prefix, _, _)| error.starts_with(prefix))
        .map(|&(_, code, reason)| (code, reason))
}

/// The reason of the 1001 close of a client silent for three ping intervals.
const SILENT_REASON: &str = "no answer to pings";

/// Pings a client and notices when it stopped answering: a connection lost without a close (a
/// laptop asleep, a phone out of coverage) is otherwise found only when TCP gives up.
pub(crate) struct Liveness {
    tick: Option<tokio::time::Interval>,
    heard: tokio::time::Instant,
    silent_for: Duration,
}

impl Liveness {
    /// Pings every `every` (`http.ws_ping_interval_ms`; zero: never).
    pub(crate) fn new(every: Duration) -> Self {
        let tick = (!every.is_zero()).then(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        Self {
            tick,
            heard: tokio::time::Instant::now(),
            silent_for: every.saturating_mul(3),
        }
    }

    /// The client sent something (any frame, a pong included).
    pub(crate) fn heard(&mut self) {
        self.heard = tokio::time::Instant::now();
    }

    /// Resolves at each ping time: true to ping, false once the client has been silent for
    /// three intervals. Cancel-safe; never resolves without pings.
    pub(crate) async fn due(&mut self) -> bool {
        match &mut self.tick {
            Some(t) => {
                t.tick().await;
                self.heard.elapsed() < self.silent_for
            }
            None => std::future::pending().await,
        }
    }

    /// One ping time on `socket`: a ping, or the close of a silent client, waiting for its
    /// answer (see [`close_cleanly`]); false once the socket is done.
    pub(crate) async fn ping(socket: &mut WebSocket, alive: bool) -> bool {
        if alive {
            return send(socket, Message::Ping(Default::default())).await;
        }
        metrics::counter!(crate::telemetry::metrics::WS_SILENT_CLOSED_TOTAL).increment(1);
        close_cleanly(socket, 1001, SILENT_REASON).await;
        false
    }
}

/// The WebSocket tasks of this process still running: axum runs each upgraded socket in a task
/// of its own, past the HTTP server's graceful shutdown, so the process waits for them to
/// send their close (1012) before it exits.
#[derive(Clone, Default)]
pub struct OpenSockets {
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<tokio::sync::Notify>,
}

/// Held by a running socket task; its drop counts the socket closed.
pub(crate) struct SocketGuard(OpenSockets);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.closed.notify_waiters();
    }
}

impl OpenSockets {
    /// Counts a socket open until the guard drops.
    pub(crate) fn enter(&self) -> SocketGuard {
        self.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        SocketGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until every socket closed, at most `within`; how many were left.
    pub async fn wait_closed(&self, within: Duration) -> usize {
        let until = tokio::time::Instant::now() + within;
        loop {
            let closed = self.closed.notified();
            if self.count() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, closed).await.is_err() {
                return self.count();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_fits_a_close_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(
            cut.len() <= MAX_CLOSE_REASON && long.starts_with(cut),
            "{cut}"
        );
        assert_eq!(cut.len(), 122);
    }

    #[test]
    fn read_errors_map_to_their_close_codes() {
        let code = |text: &str| refusal_of(text).map(|(c, _)| c);
        assert_eq!(
            code("Space limit exceeded: Message too long: 9 > 8"),
            Some(1009)
        );
        assert_eq!(code("UTF-8 encoding error: invalid utf-8"), Some(1007));
        assert_eq!(
            code("WebSocket protocol error: Reserved bits are non-zero"),
            Some(1002)
        );
        assert_eq!(code("Connection closed normally"), None);
        let io = axum::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(refusal(&io), None);
    }

    #[tokio::test]
    async fn shutdown_waits_for_open_sockets_within_its_grace() {
        let sockets = OpenSockets::default();
        let (a, b) = (sockets.enter(), sockets.enter());
        assert_eq!(sockets.count(), 2);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop((a, b));
        });
        assert_eq!(sockets.wait_closed(Duration::from_secs(5)).await, 0);
        let _stuck = sockets.enter();
        assert_eq!(sockets.wait_closed(Duration::from_millis(50)).await, 1);
    }
}
