//! Customer event streams (WebSocket and SSE), resumable from a transcript position: the
//! backlog comes from the session store, then live pushes from the hub; positions already sent
//! are skipped, so a reconnect misses nothing and repeats nothing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::v3::closed_or_gone;
use super::{claims_for, Claims};
use crate::edge::hub::{Feed, Push};
use crate::edge::socket::{
    close_cleanly, finish_close, read_up_to_limit, refusal, send_text, Liveness, SEND_TIMEOUT,
};
use crate::edge::{ApiError, AppState};
use crate::events::chat::ClientEventKind;
use crate::stores::session::ConversationState;
use crate::telemetry::metrics::CHAT_STREAMS_LAGGED_TOTAL;
use crate::workers::conversation::notify::{closed_json, entry_json};

/// Backlog read per store call.
const PAGE: usize = 200;

#[derive(Debug, Deserialize)]
pub struct StreamQuery {
    /// First transcript position wanted (1-based); default 1 = everything.
    pub from: Option<u64>,
    /// Browsers cannot set headers on a WebSocket: the keys may come as parameters.
    pub api_key: Option<String>,
    pub client_key: Option<String>,
}

/// The session a stream is for, and the check of the API key it was opened with.
async fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    q: &StreamQuery,
    id: &str,
) -> Result<(Claims, KeyCheck), ApiError> {
    let mut h = headers.clone();
    for (name, value) in [
        ("x-api-key", &q.api_key),
        ("x-nexus-client-key", &q.client_key),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| v.parse().ok()) {
            h.entry(name).or_insert(v);
        }
    }
    let tenant = super::chat_tenant(state, &h).await?;
    let raw = h
        .get("x-nexus-client-key")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("send the session's client key"))?;
    let claims = claims_for(state, raw, &tenant, id)?;
    state.presence.seen(state, &claims);
    let mut api_key = HeaderMap::new();
    if let Some(v) = h.get("x-api-key") {
        api_key.insert("x-api-key", v.clone());
    }
    Ok((
        claims.clone(),
        KeyCheck::new(state, api_key, tenant, claims),
    ))
}

/// WebSocket close code when the API key a stream was opened with stops working (disabled,
/// expired, deleted, its chat permission taken away).
const API_KEY_REVOKED_CLOSE: u16 = 4003;

/// The tenant API key a stream was opened with, checked again every half
/// `stores.auth_cache_ttl_ms` (a second at least) against a lookup at most the rest of the TTL
/// old: an open stream ends with its key within the TTL of a change on any pod, as requests
/// do. Each check that passes is also the customer's sign of life (see `presence`), so checks
/// come at least as often as the sign of life needs.
struct KeyCheck {
    headers: HeaderMap,
    tenant: String,
    claims: Claims,
    lookups: Periodic<Result<String, ApiError>>,
    /// Oldest cached lookup of the key a check takes.
    max_age: Duration,
}

/// Shortest period of a stream's key check: bounds the checks of a short (or zero) TTL.
const MIN_KEY_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// A lookup started once per period whose run outlives a caller cut short: a stream's loop
/// drops the pending check at every push or client frame, and a lookup restarted each time
/// (a period later) would never finish while those come faster than it takes.
struct Periodic<T> {
    every: tokio::time::Interval,
    /// The run under way, kept across calls.
    running: Option<futures::future::BoxFuture<'static, T>>,
}

impl<T> Periodic<T> {
    fn new(every: Duration) -> Self {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            every,
            running: None,
        }
    }

    /// Waits for the next period, then for `start`'s run to end. Cancel-safe: the tick is,
    /// and a run cut short goes on at the next call (`start` is then not called).
    async fn next(&mut self, start: impl FnOnce() -> futures::future::BoxFuture<'static, T>) -> T {
        let run = match &mut self.running {
            Some(run) => run,
            None => {
                self.every.tick().await;
                self.running.insert(start())
            }
        };
        let out = run.await;
        self.running = None;
        out
    }
}

impl KeyCheck {
    fn new(state: &AppState, headers: HeaderMap, tenant: String, claims: Claims) -> Self {
        // A check a period after the last that takes a lookup up to `max_age` old sees a change
        // made on another pod at most `every + max_age` late: the TTL, as for requests. (Checks
        // a TTL apart taking a TTL-old lookup kept a stream up to twice that.) Streams of one key
        // share the lookup, so a pod asks the database about a key about twice per TTL, not
        // once per stream.
        let ttl = Duration::from_millis(state.config.stores.auth_cache_ttl_ms);
        let every = (ttl / 2).max(MIN_KEY_CHECK_PERIOD);
        let every = state.presence.every().map_or(every, |p| every.min(p));
        Self {
            headers,
            tenant,
            claims,
            lookups: Periodic::new(every),
            max_age: ttl.saturating_sub(every),
        }
    }

    /// Resolves with the error the key now gets, once it gets one. Cancel-safe (see
    /// [`Periodic`]). The store being down is no reason to end a working stream.
    async fn revoked(&mut self, state: &AppState) -> ApiError {
        loop {
            let (headers, max_age) = (&self.headers, self.max_age);
            let found = self
                .lookups
                .next(|| {
                    let (state, headers) = (state.clone(), headers.clone());
                    Box::pin(
                        async move { super::chat_tenant_within(&state, &headers, max_age).await },
                    )
                })
                .await;
            match found {
                // The customer is still there either way: an unreachable store must not let
                // the abandon timer close a chat whose stream is open.
                Ok(tenant) if tenant == self.tenant => state.presence.seen(state, &self.claims),
                Err(e) if e.status.is_server_error() => state.presence.seen(state, &self.claims),
                Ok(_) => {
                    return ApiError::new(
                        axum::http::StatusCode::FORBIDDEN,
                        "INVALID_CREDENTIALS",
                        "the API key now belongs to another tenant",
                    )
                }
                Err(e) => return e,
            }
        }
    }
}

/// A customer's feed: backlog from the store, then live pushes, without gaps or repeats.
pub(crate) struct Resumable {
    state: AppState,
    claims: Claims,
    feed: Feed,
    /// Last transcript position sent.
    last: u64,
    queue: VecDeque<(Option<u64>, Arc<str>)>,
    /// The store has more to send first (a full page read, a gap in the live feed, or the feed
    /// lagged): it is read before the next live push. Kept in the feed rather than in `next`'s stack, because the socket loop drops a
    /// pending `next` whenever the client sends a frame.
    behind: bool,
    /// Whether the conversation closed is read from its record once the backlog is sent: the
    /// `closed` state is a live push only, which a stream opened after it, or lagging past it,
    /// would not get.
    recheck: bool,
    /// The `closed` state, sent once the store's entries up to the close are.
    close_pending: Option<Arc<str>>,
    closed_sent: bool,
}

impl Resumable {
    pub(crate) fn new(state: AppState, claims: Claims, from: u64) -> Self {
        // Subscribe before reading the backlog, so nothing falls between the two.
        let feed = state.hub.customer(&claims.tid, &claims.sid);
        Self {
            state,
            claims,
            feed,
            last: from.max(1) - 1,
            queue: VecDeque::new(),
            behind: false,
            recheck: true,
            close_pending: None,
            closed_sent: false,
        }
    }

    /// The first read: the backlog from the stream's first position, which must not be past the
    /// transcript's end. Positions there were never sent, and a stream from one would skip
    /// the live entries up to it; a client resumes from the position after the last it got.
    async fn open(&mut self) -> Result<(), ApiError> {
        let from = self.last + 1;
        self.catch_up().await?;
        if from > 1 && self.queue.is_empty() {
            let previous = self
                .state
                .sessions()?
                .transcript(&self.claims.tid, &self.claims.sid, from - 1, 1)
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))?;
            // A chat the store no longer keeps has no transcript to resume in: the stream
            // tells it closed (see `next`).
            if previous.is_empty()
                && !closed_or_gone(&self.state, &self.claims.tid, &self.claims.sid).await?
            {
                return Err(ApiError::bad_request(
                    "INVALID_POSITION",
                    format!(
                        "position {from} is past the end of the transcript; resume from the \
                         position after the last one received"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Reads one page of what the store has after `last`; a full page may have more behind
    /// it, read once this page is sent (so a stream holds one page at a time, however long the
    /// transcript).
    async fn catch_up(&mut self) -> Result<(), ApiError> {
        let entries = self
            .state
            .sessions()?
            .transcript(&self.claims.tid, &self.claims.sid, self.last + 1, PAGE)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let n = entries.len();
        for e in entries {
            // Skipped, not sent: an entry for agents only (a private consult).
            self.last = e.position;
            if e.entry.agents_only() {
                continue;
            }
            let json = entry_json(&self.claims.sid, &e).to_string();
            self.queue.push_back((Some(e.position), Arc::from(json)));
        }
        self.behind = n == PAGE;
        Ok(())
    }

    /// The next thing to send: (transcript position if any, JSON text). `None` once the hub
    /// is gone (shutdown) or the store cannot be read. Cancel-safe: dropped while pending,
    /// it loses nothing (the socket loop does that whenever the client sends a frame).
    pub(crate) async fn next(&mut self) -> Option<(Option<u64>, Arc<str>)> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            if self.behind {
                // A page moves `last` and the queue together, so a catch-up cut short resumes
                // where it stopped.
                if self.catch_up().await.is_err() {
                    return None;
                }
                continue;
            }
            if let Some(closed) = self.close_pending.take() {
                self.closed_sent = true;
                return Some((None, closed));
            }
            if self.recheck {
                let closed = self.closed_state().await.ok()?;
                self.recheck = false;
                if let Some(closed) = closed.filter(|_| !self.closed_sent) {
                    // The close's own entries were stored before its record: read them first.
                    self.close_pending = Some(closed);
                    self.behind = true;
                }
                continue;
            }
            match self.feed.rx.recv().await {
                Ok(push) => {
                    if let Some(item) = self.accept(&push) {
                        return Some(item);
                    }
                }
                // Fell behind the live buffer: the store has every entry; the record says
                // whether a `closed` push was among those missed.
                Err(RecvError::Lagged(_)) => {
                    metrics::counter!(CHAT_STREAMS_LAGGED_TOTAL).increment(1);
                    self.behind = true;
                    self.recheck = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// The `closed` state of the conversation if its record says it closed, or is gone (see
    /// [`closed_or_gone`]: expired after its close, or lost by the store; no reason then).
    async fn closed_state(&self) -> Result<Option<Arc<str>>, ApiError> {
        let (tid, sid) = (&self.claims.tid, &self.claims.sid);
        let record = self
            .state
            .sessions()?
            .conversation(tid, sid)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
        let reason = match record {
            Some(c) if c.state == ConversationState::Closed => c.closed_reason,
            Some(_) => return Ok(None),
            None if closed_or_gone(&self.state, tid, sid).await? => None,
            None => return Ok(None),
        };
        let json = closed_json(sid, reason.as_deref()).to_string();
        Ok(Some(Arc::from(json)))
    }

    fn accept(&mut self, push: &Push) -> Option<(Option<u64>, Arc<str>)> {
        if push.kind == ClientEventKind::State && is_closed(&push.data) {
            // Once: it may have been read from the record already.
            if std::mem::replace(&mut self.closed_sent, true) {
                return None;
            }
            self.close_pending = None;
        }
        if push.kind != ClientEventKind::Transcript {
            return Some((None, push.data.clone()));
        }
        let position = push.position?;
        if position <= self.last {
            return None; // already sent from the backlog or a duplicate delivery
        }
        if position > self.last + 1 {
            // A gap (a push lost or arriving before an earlier one): the store fills it, this
            // entry included (the worker appends an entry before it pushes it).
            self.behind = true;
            return None;
        }
        self.last = position;
        Some((Some(position), push.data.clone()))
    }
}

fn is_closed(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data).is_ok_and(|v| v["state"] == "closed")
}

pub async fn websocket(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (claims, check) = authorize(&state, &headers, &q, &id).await?;
    // Customers act over HTTP: a frame they send is no request, yet any size may come (a
    // browser sends what its page gives it). It is read up to the agent socket's limit and
    // dropped, rather than ending the stream unanswered.
    let limit = state.config.http.max_body_bytes;
    let ws = read_up_to_limit(state.socket(ws?), limit);
    let mut feed = Resumable::new(state, claims, q.from.unwrap_or(1));
    feed.open().await?;
    let open = feed.state.sockets.enter();
    Ok(ws.on_upgrade(move |socket| async move {
        let _open = open;
        serve_socket(socket, feed, check).await
    }))
}

/// WebSocket close code when the client key expires on an open socket: renew the key
/// (`POST …/client-key`) and reconnect from the last position.
const KEY_EXPIRED_CLOSE: u16 = 4001;

/// When the key of `feed` stops being valid: an open stream ends with its key.
fn key_deadline(feed: &Resumable) -> tokio::time::Instant {
    let until = feed.state.client_keys.valid_until(&feed.claims);
    let left = until
        .saturating_add(1)
        .saturating_sub(chrono::Utc::now().timestamp());
    tokio::time::Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
}

async fn serve_socket(mut socket: WebSocket, mut feed: Resumable, mut check: KeyCheck) {
    let shutdown = feed.state.shutdown.clone();
    let state = feed.state.clone();
    let expiry = tokio::time::sleep_until(key_deadline(&feed));
    tokio::pin!(expiry);
    let mut live = Liveness::new(Duration::from_millis(state.config.http.ws_ping_interval_ms));
    loop {
        tokio::select! {
            alive = live.due() => {
                if !Liveness::ping(&mut socket, alive).await {
                    return;
                }
            }
            e = check.revoked(&state) => {
                close_cleanly(&mut socket, API_KEY_REVOKED_CLOSE, &format!("{}: {}", e.code, e.message)).await;
                return;
            }
            _ = &mut expiry => {
                let reason = "CLIENT_KEY_EXPIRED: renew the client key and reconnect";
                close_cleanly(&mut socket, KEY_EXPIRED_CLOSE, reason).await;
                return;
            }
            _ = shutdown.cancelled() => {
                // 1012, service restart: reconnect, resuming from the last position.
                close_cleanly(&mut socket, 1012, "edge restarting; reconnect").await;
                return;
            }
            item = feed.next() => {
                let Some((_, json)) = item else {
                    // The store could not be read (or the edge is stopping): the client is told
                    // to come back, not left to guess from a dropped connection.
                    let (code, reason) = if shutdown.is_cancelled() {
                        (1012, "edge restarting; reconnect")
                    } else {
                        (1013, "UNAVAILABLE: the session store could not be read; reconnect from the last position")
                    };
                    close_cleanly(&mut socket, code, reason).await;
                    return;
                };
                if !send_text(&mut socket, json.to_string()).await {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Close(_))) => {
                    finish_close(&mut socket).await;
                    return;
                }
                // A frame that could not be read (past the read limit, a text frame that is
                // not UTF-8, a protocol violation) is refused with its close code.
                Some(Err(e)) => {
                    if let Some((code, reason)) = refusal(&e) {
                        close_cleanly(&mut socket, code, reason).await;
                    }
                    return;
                }
                None => return,
                // Customers act through the HTTP API; pings are answered by axum, pongs and
                // data frames (an application heartbeat) only say the client is there.
                Some(Ok(_)) => live.heard(),
            },
        }
    }
}

pub async fn sse(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<StreamQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let (claims, check) = authorize(&state, &headers, &q, &id).await?;
    // An EventSource reconnecting sends the id of the last event it got.
    let from = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|p| p.saturating_add(1))
        .or(q.from)
        .unwrap_or(1);
    let mut feed = Resumable::new(state, claims, from);
    feed.open().await?;
    Ok(Sse::new(sse_stream(feed, check))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The SSE body: the events made by a task of their own, handed over one at a time. A client
/// that stops reading (hyper then stops polling the body) holds the task no longer than
/// [`SEND_TIMEOUT`], as a stalled WebSocket: the task ends, and with it the stream's hub
/// subscription, queue and key checks (the connection ends when hyper next polls the body).
fn sse_stream(
    feed: Resumable,
    check: KeyCheck,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(sse_events(feed, check));
        loop {
            // The client gone (hyper dropped the body) ends the task at once, not at its next
            // event: its key checks would keep the customer's sign of life fresh meanwhile.
            let event = tokio::select! {
                biased;
                _ = tx.closed() => return,
                event = futures::StreamExt::next(&mut events) => event,
            };
            let Some(event) = event else { return };
            if tx.send_timeout(event, SEND_TIMEOUT).await.is_err() {
                // Gone, or not reading.
                return;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((event, rx))
    })
}

fn sse_events(
    feed: Resumable,
    check: KeyCheck,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold(Some((feed, check)), |open| async move {
        let (mut feed, mut check) = open?;
        let (shutdown, state) = (feed.state.shutdown.clone(), feed.state.clone());
        let deadline = key_deadline(&feed);
        let item = tokio::select! {
            _ = shutdown.cancelled() => None,
            e = check.revoked(&state) => {
                let gone = serde_json::json!({"type": "error", "code": e.code, "message": e.message});
                return Some((Ok(SseEvent::default().event("error").data(gone.to_string())), None));
            }
            _ = tokio::time::sleep_until(deadline) => {
                // The last event says why the stream ends; the client renews and reconnects.
                let gone = serde_json::json!({"type": "error", "code": "CLIENT_KEY_EXPIRED",
                    "message": "renew the client key and reconnect"});
                return Some((Ok(SseEvent::default().event("error").data(gone.to_string())), None));
            }
            item = feed.next() => item,
        };
        let (position, json) = item?;
        let mut event = SseEvent::default().data(json.as_ref());
        if let Some(p) = position {
            event = event.id(p.to_string());
        }
        Some((Ok(event), Some((feed, check))))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A lookup slower than the pushes that keep cutting its caller short still finishes, and
    /// is started once: the key check of a busy stream runs (the README's 4003 close).
    #[tokio::test]
    async fn a_lookup_cut_short_goes_on_at_the_next_call() {
        let mut lookups = Periodic::new(Duration::from_millis(50));
        let started = Arc::new(AtomicUsize::new(0));
        let begun = tokio::time::Instant::now();
        let found = loop {
            let start = || {
                started.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "revoked"
                }) as futures::future::BoxFuture<'static, &'static str>
            };
            // A push every 20 ms wakes the stream's loop, which drops the pending check.
            tokio::select! {
                found = lookups.next(start) => break found,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            assert!(
                begun.elapsed() < Duration::from_secs(5),
                "the lookup never finished ({} started)",
                started.load(Ordering::SeqCst)
            );
        };
        assert_eq!(found, "revoked");
        assert_eq!(started.load(Ordering::SeqCst), 1, "one run, resumed");
    }
}
