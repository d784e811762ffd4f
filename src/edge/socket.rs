//! Writes to the edge's WebSockets (customer streams, agent desks) with a bound on how long a
//! client that does not read can hold its socket's task, and pings that find clients gone
//! without a close.

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

    /// One ping time on `socket`: a ping, or the close of a silent client; false once the
    /// socket is done.
    pub(crate) async fn ping(socket: &mut WebSocket, alive: bool) -> bool {
        if alive {
            send(socket, Message::Ping(Default::default())).await
        } else {
            metrics::counter!(crate::telemetry::metrics::WS_SILENT_CLOSED_TOTAL).increment(1);
            close(socket, 1001, "no answer to pings").await;
            false
        }
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
