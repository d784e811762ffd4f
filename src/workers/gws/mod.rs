//! The `gws` role: agent actions on `nexus.agent.v1` become GWS interaction-management calls
//! (`POST {gws}/api/v2/me/chats/{conversation id}`), each made once, also across crashes.
//!
//! Mapping ([`ops`]): `AgentAccepted` → Accept; `MessageSent` by an agent → SendMessage (text
//! and nexus's message id); `TransferRequested` (mode transfer, by an agent) → Transfer (target
//! kind and id); `ConversationCompleted` → Complete (disposition). Other events are acked
//! untouched; tenants without a GWS target ([`config`]) are acked and counted as `skipped`.
//!
//! Exactly once, although GWS calls are not idempotent: the effect log ([`log`]) has a row per
//! effect (keyed by conversation and an effect key derived from the event: the event id, or the
//! message id / offer id, so a desktop retry of the same reply is the same effect).
//! 1. The row is written `pending` (the intent) before any call; a `done` row makes a
//!    redelivered event a no-op. A `rejected` one (GWS said 4xx: nothing took effect) is tried
//!    again when its event comes back, e.g. replayed from the dead-letter topic.
//! 2. Before each call the row's `attempts` is raised (a compare-and-set, so two workers
//!    handed the same event do not both call), then GWS is called, then the row is set `done`,
//!    and only then is the event acked.
//! 3. The crash window is between the call reaching GWS and the `done` write (a SIGKILL, a
//!    timeout after GWS applied it, a lost answer, a failed write). Whoever handles the event
//!    next finds `pending` with attempts > 0 and reconciles before calling again: it reads the
//!    chat (`GET` the same path) and, if the effect shows (the agent is connected, the message
//!    id is in the transcript, the agent left by transfer, the chat is completed), marks the row
//!    `done` without calling. A previous call younger than the GWS timeout may still be in
//!    flight, so reconciliation waits until it is older (from the backlog). A call whose
//!    outcome is known to be nothing is not waited for: one GWS refused (any 4xx, GWS refusing
//!    nexus itself included) or one never sent (a paused target) has its claim released
//!    ([`EffectLog::release`]), and the next try reads the chat at once (for the calls before
//!    it). A timeout, a connection lost after sending or a 5xx leave the outcome unknown.
//! 4. What stays open: GWS applying a request later than the client's timeout after it was
//!    sent (the read before the repeat does not see it yet), and clocks of worker hosts that
//!    disagree by more than the timeout. Both need GWS to be slower than `timeout_ms`.
//!
//! Order: a conversation's events run one at a time, in the order the agent acted: on the
//! consumer's lane, or, once a call failed (5xx, timeout, a previous call possibly in flight),
//! in the role's [`backlog`](crate::workers::backlog), where the event waits for its next try
//! and the conversation's later events queue behind it. Other conversations go on; while a GWS
//! target keeps failing for everyone its [`Peer`](crate::workers::peer::Peer) circuit refuses
//! calls unsent, so its events wait in the backlog too, without holding other tenants
//! (`nexus_worker_paused{role="gws",peer="gws"}` is 1). A 4xx marks the row `rejected` and
//! dead-letters the event (`gws_rejected`), unless GWS refuses nexus itself rather than the
//! event (401, 407; a 403, or a POST's 404, whose agent's own user GWS answers 401 or 407: a
//! rotated credential): then GWS is taken for down, as for a 5xx, and the events wait in the
//! backlog until it takes nexus again. A 403 or 404 for the agent's own user too is that
//! agent's refusal (GWS no longer knows it), not nexus's: one agent pauses nobody.

pub mod client;
pub mod config;
pub mod log;
pub mod ops;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use config::GwsConfig;

use crate::bus::consumer::HandleError;
use crate::bus::Message;
use crate::config::HttpClientConfig;
use crate::events::{Envelope, Event};
use crate::telemetry::metrics as m;
use crate::workers::backlog::Effect;
use crate::workers::peer::{PeerFailure, PeerTarget};

use client::GwsClient;
use log::{EffectKey, EffectLog, LogError, Status};
use ops::Operation;

/// Dead-letter reason of an event GWS refused.
pub const REJECTED: &str = "gws_rejected";
/// Dead-letter reason of an event whose body or conversation id cannot make a call.
pub const BAD_EVENT: &str = "gws_bad_event";
/// How long effect-log rows are kept: longer than `nexus.agent.v1` keeps events (7 days) and
/// its dead-letter topic (14 days, `nexus replay` copies back), so no event that can still be
/// delivered outlives its row. Raise it with those retentions.
pub const EFFECT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often each gws pod prunes the log (pods may overlap: the delete is idempotent).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum GwsError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Client(#[from] crate::http_client::ClientError),
}

pub struct GwsWorker {
    config: GwsConfig,
    client: GwsClient,
    log: Arc<EffectLog>,
    attempt_timeout: Duration,
}

impl GwsWorker {
    /// The worker with its effect log in `pool` (the provisioning database).
    /// `attempt_timeout` bounds one handling of an event (the consumer's handler timeout, which
    /// the backlog's tries share).
    pub fn new(
        config: &GwsConfig,
        http: &HttpClientConfig,
        pool: sqlx::AnyPool,
        attempt_timeout: Duration,
    ) -> Result<Self, GwsError> {
        config::validate(config).map_err(GwsError::Config)?;
        Ok(Self {
            config: config.clone(),
            client: GwsClient::new(crate::http_client::build(http)?, config),
            log: Arc::new(EffectLog::new(pool)),
            attempt_timeout,
        })
    }

    /// The loop that prunes old effect-log rows, to run beside the consumers.
    pub fn pruner(
        &self,
    ) -> impl FnOnce(CancellationToken) -> futures::future::BoxFuture<'static, ()> {
        let log = self.log.clone();
        move |stop| {
            Box::pin(async move {
                crate::workers::prune::run("gws", PRUNE_EVERY, EFFECT_RETENTION, stop, |before| {
                    let log = log.clone();
                    async move { log.prune(before).await }
                })
                .await
            })
        }
    }

    async fn effect(
        &self,
        e: &Envelope,
        op: &Operation,
        target: &PeerTarget,
        path: &str,
    ) -> Result<(), HandleError> {
        let key = EffectKey {
            tenant_id: &e.tenant_id,
            conversation_id: &e.conversation_id,
            effect: &op.effect_key,
        };
        let mut entry = self
            .log
            .open(key, &e.event_id.to_string(), op.kind.name())
            .await
            .map_err(store_failed)?;
        match entry.status {
            Status::Done => {
                emit(op, "duplicate");
                return Ok(());
            }
            // Refused before and delivered again (a replay from the dead-letter topic, or a
            // crash before the dead-letter was written): a 4xx took no effect, so try again; a
            // GWS that still refuses dead-letters it again.
            Status::Rejected => {
                self.log.reopen(key).await.map_err(store_failed)?;
                entry.attempted_at_ms = None;
            }
            Status::Pending => {}
        }
        // A previous call may have reached GWS only if one was claimed and not released since:
        // a call GWS refused (4xx) or that never left is released (`attempted_at_ms` cleared,
        // a replayed refusal too), and the read before it had found every earlier call over
        // and without effect. Only then: look before calling again.
        if let Some(attempted_at) = entry.attempted_at_ms.filter(|_| entry.attempts > 0) {
            let age = chrono::Utc::now()
                .timestamp_millis()
                .saturating_sub(attempted_at);
            // A claimed call leaves at once and takes up to the call timeout; the handler
            // timeout on top covers a handling that stalled between the claim and the send.
            // Only past both is it surely over. (A call refused or never sent was released:
            // no time, no wait.)
            let attempt = u64::try_from(self.attempt_timeout.as_millis()).unwrap_or(u64::MAX);
            let in_flight = target.timeout_ms.saturating_add(attempt);
            let in_flight = i64::try_from(in_flight).unwrap_or(i64::MAX);
            if age < in_flight {
                // Not a failure of this effect: look again once that call is surely over.
                return Err(HandleError::RetryLater {
                    reason: format!("the previous call ({age} ms ago) may still be in flight"),
                    not_before_ms: chrono::Utc::now()
                        .timestamp_millis()
                        .saturating_add(in_flight.saturating_sub(age)),
                    counts: false,
                });
            }
            let applied = match self.client.chat(target, path, &op.agent_id).await {
                Ok(chat) => ops::applied(op, chat.as_ref()),
                // The read forbidden (403) to the agent after a transfer or completion whose
                // answer was lost: the agent is out of the chat, which is what those calls do.
                // The peer asked GWS for the agent's own user first: had GWS refused the
                // credential (401, 407) or the address (404 with or without the agent), this
                // comes as a retryable failure, the target taken for down; had it refused the
                // agent itself (403), the read says nothing of the call. Then, as for any other
                // 4xx, the call goes again, and GWS's answer to it is the verdict.
                Err(PeerFailure::Rejected {
                    status: 403,
                    identity_refused: false,
                    ..
                }) if ops::leaves(op) => true,
                Err(PeerFailure::Rejected { .. }) => false,
                // No call of this try to release: the one before is older than its window.
                Err(f) => return Err(self.refused(key, op, f, None).await),
            };
            if applied {
                self.log
                    .finish(key, Status::Done, "reconciled")
                    .await
                    .map_err(store_failed)?;
                emit(op, "reconciled");
                return Ok(());
            }
            debug!(
                attempts = entry.attempts,
                "the previous call did not take effect; calling again"
            );
        }
        // A paused target would refuse the call unsent: claiming it first would make the next
        // try wait for a call that never left, then read the chat for nothing.
        if let Some(wait) = self.client.refuses(target) {
            return Err(PeerFailure::Retry {
                detail: format!(
                    "not called: GWS at {} is paused",
                    crate::config::redact_url_password(&target.url)
                ),
                counts: false,
                wait: Some(wait),
                not_applied: true,
            }
            .into_handle_error(REJECTED));
        }
        if !self
            .log
            .claim(key, entry.attempts)
            .await
            .map_err(store_failed)?
        {
            return Err(HandleError::RetryLater {
                reason: "another worker is calling GWS for this effect".into(),
                not_before_ms: 0,
                counts: false,
            });
        }
        let claimed = entry.attempts.saturating_add(1);
        match self.client.operate(target, path, op, e).await {
            Ok(()) => {
                emit(op, "applied");
                // If this write fails, the retry reconciles and finds the effect.
                self.log
                    .finish(key, Status::Done, "called")
                    .await
                    .map_err(store_failed)
            }
            Err(f) => Err(self.refused(key, op, f, Some(claimed)).await),
        }
    }

    /// A failed GWS call: tried again (from the backlog), or (4xx) settled as rejected and
    /// dead-lettered. `claimed`: the attempt this try claimed for it, if it made the call.
    async fn refused(
        &self,
        key: EffectKey<'_>,
        op: &Operation,
        f: PeerFailure,
        claimed: Option<i64>,
    ) -> HandleError {
        if matches!(f, PeerFailure::Retry { .. }) {
            if let (Some(attempt), true) = (claimed, f.not_applied()) {
                // Refused (GWS refusing nexus itself, a 429, a refusal nobody could yet tell
                // whose) or never sent: no call is in flight, so the next try need not wait
                // for one; it still reads the chat first, for the calls before this one.
                // Not released (the store down): it waits, as for a call that may be running.
                if let Err(e) = self.log.release(key, attempt).await {
                    warn!(error = %e, "the refused GWS call could not be released; the next try waits as if it were in flight");
                }
            }
            return f.into_handle_error(REJECTED);
        }
        let detail = f.to_string();
        if let Err(e) = self.log.finish(key, Status::Rejected, &detail).await {
            return store_failed(e);
        }
        emit(op, "rejected");
        f.into_handle_error(REJECTED)
    }
}

fn store_failed(e: LogError) -> HandleError {
    HandleError::Retry(e.to_string())
}

/// Counts an operation's outcome, with its log line.
fn emit(op: &Operation, outcome: &'static str) {
    match outcome {
        "rejected" => {
            warn!(operation = op.kind.name(), agent = %op.agent_id, "GWS refused the call; dead-lettering")
        }
        "reconciled" => {
            info!(operation = op.kind.name(), agent = %op.agent_id, "the previous call had taken effect at GWS; not repeated")
        }
        _ => debug!(operation = op.kind.name(), agent = %op.agent_id, outcome, "gws operation"),
    }
    metrics::counter!(m::GWS_OPERATIONS_TOTAL, "operation" => op.kind.name(), "outcome" => outcome)
        .increment(1);
}

#[async_trait]
impl Effect for GwsWorker {
    fn concerns(&self, event: &Event) -> bool {
        let e = &event.envelope;
        ops::may_operate(&e.event_type) && self.config.has_target(&e.tenant_id)
    }

    // A tenant or conversation id the backlog (and the effect log) cannot key: dead-lettered
    // by the backlog at once, before it looks.
    fn bad_event_reason(&self) -> &'static str {
        BAD_EVENT
    }

    // Runs one event of a conversation at a time, in the order the agent acted: on the
    // conversation's consumer lane, or in the backlog behind a failed call (see module docs).
    async fn apply(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        let op = match ops::operation_of(event) {
            Ok(Some(op)) => op,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(HandleError::Reject {
                    reason: BAD_EVENT,
                    detail: e.to_string(),
                })
            }
        };
        let e = &event.envelope;
        let Some(target) = self.config.target(&e.tenant_id) else {
            emit(&op, "skipped");
            return Ok(());
        };
        let Some(path) = client::chat_path(&e.conversation_id) else {
            return Err(HandleError::Reject {
                reason: BAD_EVENT,
                detail: format!(
                    "conversation id `{}` is not a GWS chat id",
                    e.conversation_id
                ),
            });
        };
        let span = tracing::info_span!("gws", operation = op.kind.name(), agent = %op.agent_id);
        self.effect(e, &op, &target, &path).instrument(span).await
    }
}

#[cfg(test)]
mod tests;
