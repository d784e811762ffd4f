//! Long-polling the transcript (`GET …/messages?from=P&wait_s=N`): the fallback for customers
//! that can hold neither a WebSocket nor an SSE stream. The request waits for an entry at or
//! past P, up to N seconds, then answers the usual transcript page.

use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use super::{session_claims, transcript_page, Reader, TranscriptQuery};
use crate::edge::{ApiError, AppState};
use crate::events::chat::ClientEventKind;

/// Longest a poll waits (longer asks are cut to it): below the idle timeouts of common proxies.
pub const MAX_WAIT_S: u64 = 30;

#[derive(Debug, Deserialize)]
pub struct PollQuery {
    /// First position to return (1-based); default 1.
    pub from: Option<u64>,
    pub limit: Option<usize>,
    /// Seconds to wait for an entry at or past `from` when there is none yet; 0 or absent
    /// answers at once.
    pub wait_s: Option<u64>,
}

pub async fn transcript(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<PollQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let c = session_claims(&state, &headers, &id).await?;
    let Query(q) = query?;
    let page = TranscriptQuery {
        from: q.from,
        limit: q.limit,
    };
    let wait = Duration::from_secs(q.wait_s.unwrap_or(0).min(MAX_WAIT_S));
    if wait.is_zero() {
        return transcript_page(&state, &c.tid, &c.sid, &page, Reader::Customer).await;
    }
    // Subscribe before reading, so an entry appended after the read wakes the wait.
    let mut feed = state.hub.customer(&c.tid, &c.sid);
    let first = transcript_page(&state, &c.tid, &c.sid, &page, Reader::Customer).await?;
    // A page that only went past entries for agents only is news too: its `next_position`
    // moved (the next page may be stored already, and no push will come for it).
    let from = q.from.unwrap_or(1).max(1);
    let has_news = |p: &Json<Value>| {
        p.0["chat_ended"] == true
            || p.0["messages"].as_array().is_some_and(|m| !m.is_empty())
            || p.0["next_position"]
                .as_u64()
                .is_some_and(|next| next > from)
    };
    if has_news(&first) {
        return Ok(first);
    }
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            _ = state.shutdown.cancelled() => break,
            push = feed.rx.recv() => match push {
                // The worker appends an entry before it pushes it, and closes a chat with an
                // entry: the store has it now.
                Ok(p) if p.kind == ClientEventKind::Transcript
                    && p.position.is_some_and(|at| at >= from) => break,
                Ok(p) if p.kind == ClientEventKind::State => break,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => break,
            },
        }
    }
    transcript_page(&state, &c.tid, &c.sid, &page, Reader::Customer).await
}
