//! The `history` role: writes each conversation of `nexus.interaction.v1` to UCS once and in
//! order — contact and interaction at the start, transcript, attachments and status at the close.
//!
//! Per conversation a row in the provisioning database ([`store`]) holds the UCS ids and the
//! last applied [`Step`]; messages and participant changes are kept by transcript position
//! until the close. Handling an event records what it says (idempotently: the start and the
//! close once, entries by position) and then runs the remaining steps in order, each one UCS
//! call followed by a compare-and-set of the step. A redelivered or replayed event finds its
//! steps done and makes no call. A conversation's start and close run one at a time (on the
//! consumer's lane, or in the backlog behind a failed one), so its calls never overlap or
//! reorder; entries are recorded at once, by position, whatever waits in the backlog.
//!
//! **The crash window.** A process can die after UCS applied a call and before the step was
//! recorded (or before the ack). The event then comes back and the step is called again. Every
//! call names its object with a deterministic id, so the repeat lands on the object the first
//! call created instead of making a second one:
//! - IdentifyContact finds the contact by email/phone; when it must create one it uses
//!   `Id` = UUIDv5(tenant, conversation, "contact"), which a repeat finds too;
//! - InsertInteraction has `Id` = the nexus conversation id;
//! - AddDocument has `Id` = UUIDv5(tenant, conversation, "transcript" | "attachment/<file id>");
//! - SetInteractionStatus sets the same status and end date again (idempotent by nature).
//!
//! UCS failing (5xx, timeout, refused) for one conversation puts its event in the role's
//! [`backlog`](crate::workers::backlog) and acks it; the conversation's later events queue
//! behind it and the backlog's scheduler runs them again in order, so other conversations go
//! on. While a UCS target keeps failing for everyone its [`Peer`] circuit refuses calls unsent
//! and their events wait in the backlog as well, so a tenant's failing UCS holds no other
//! tenant (`nexus_worker_paused{role="history",peer="ucs"}` = 1); so does a 401 or 407, UCS
//! refusing nexus's credential rather than the event, and a 404 that is the address's (a wrong
//! base path, a proxy with no such route: IdentifyContact answered 404, see [`ucs`]) rather than
//! an object the event names unknown. Another 4xx dead-letters the event with reason
//! `ucs_rejected`, the detail naming the call. An event whose tenant or
//! conversation id the state store cannot key (a control character, over [`MAX_ID_BYTES`]) is
//! dead-lettered at once as `history_bad_event`. Tenants without a UCS target are acked without
//! a call (`skipped`). At most [`ATTACHMENTS_AT_ONCE`] chat files go to UCS at once per process.
//!
//! A close's transcript waits `transcript_settle_ms` after this role recorded the close (the
//! event is deferred to the backlog): an entry published just after `ConversationClosed`, by
//! a handler that raced the close from the other input topic, is still recorded and written.
//! The document's positions are frozen at its first attempt; entries not in it are `late`.

pub mod config;
pub mod store;
pub mod ucs;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tracing::{debug, warn};

pub use config::HistoryConfig;
use store::{in_document, Closed, Entry, HistoryStore, Kept, Started, State, Step, StoreError};
use ucs::Ucs;

use crate::bus::consumer::HandleError;
use crate::bus::Message;
use crate::events::chat::{self as ev, Body};
use crate::events::Event;
use crate::stores::provisioning::{Provisioning, ProvisioningError};
use crate::telemetry::metrics as m;
use crate::workers::backlog::{self, Effect};
use crate::workers::peer::{Peer, PeerFailure, PeerTarget};

/// Dead-letter reason of an event UCS refused (4xx).
pub const REJECTED: &str = "ucs_rejected";
/// Dead-letter reason of a 2xx answer that lacks what the next step needs.
pub const BAD_ANSWER: &str = "ucs_bad_answer";
/// Dead-letter reason of a close for a conversation whose start this role never recorded.
pub const NOT_STARTED: &str = "history_not_started";
/// Dead-letter reason of an event whose tenant or conversation id the state store cannot key.
pub const BAD_EVENT: &str = "history_bad_event";

/// Ids this role's state (and the backlog) cannot key: the backlog's check, which also covers
/// the entries this role records without the backlog.
pub use crate::workers::backlog::{unkeyable, MAX_ID_BYTES};

/// What comes next for a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    IdentifyContact,
    InsertInteraction,
    /// Open at UCS; the rest waits for ConversationClosed.
    WaitForClose,
    AddTranscript,
    /// The attachment at this index (in transcript order), or the step's end past the last.
    AddAttachment(i64),
    SetStatus,
    Nothing,
}

/// The next step of a conversation in `state`.
pub fn next(state: &State) -> Next {
    match state.step {
        Step::Recorded => Next::IdentifyContact,
        Step::ContactIdentified => Next::InsertInteraction,
        Step::InteractionInserted if state.closed.is_some() => Next::AddTranscript,
        Step::InteractionInserted => Next::WaitForClose,
        Step::TranscriptAdded => Next::AddAttachment(state.attachments_done),
        Step::AttachmentsAdded => Next::SetStatus,
        Step::Done => Next::Nothing,
    }
}

/// Whether `event_id` is the recorded start's own and its UCS calls are not all done yet: a
/// retry of its work, not a redelivery.
pub fn own_start_pending(state: &State, event_id: &str) -> bool {
    state.started.event_id == event_id && state.step < Step::InteractionInserted
}

/// A transcript entry of an interaction event, if it is one and carries its position.
pub fn entry_of(event: &Event) -> Option<Result<Entry, ev::BodyError>> {
    let at_ms = event.envelope.occurred_at_ms;
    let entry = match event.envelope.event_type.as_str() {
        ev::MessageReceived::TYPE => event.body_as::<ev::MessageReceived>().map(|b| {
            b.transcript_position.map(|position| Entry {
                position,
                kind: "Message".into(),
                at_ms,
                participant_id: b.participant_id,
                participant_kind: b.participant_kind,
                nickname: b.nickname,
                text: b.text,
                media_ids: b.media_ids,
                agents_only: false,
            })
        }),
        ev::MessageSent::TYPE => event.body_as::<ev::MessageSent>().map(|b| {
            b.transcript_position.map(|position| Entry {
                position,
                kind: "Message".into(),
                at_ms,
                participant_id: b.participant_id,
                participant_kind: b.participant_kind,
                nickname: Some(b.nickname),
                text: b.text,
                media_ids: b.media_ids,
                agents_only: b.visibility.agents_only(),
            })
        }),
        ev::ParticipantJoined::TYPE => event.body_as::<ev::ParticipantJoined>().map(|b| {
            b.transcript_position.map(|position| Entry {
                position,
                kind: "ParticipantJoined".into(),
                at_ms,
                participant_id: b.participant_id,
                participant_kind: b.participant_kind,
                nickname: Some(b.nickname),
                text: None,
                media_ids: Vec::new(),
                agents_only: b.visibility.agents_only(),
            })
        }),
        ev::ParticipantLeft::TYPE => event.body_as::<ev::ParticipantLeft>().map(|b| {
            b.transcript_position.map(|position| Entry {
                position,
                kind: "ParticipantLeft".into(),
                at_ms,
                participant_id: b.participant_id,
                participant_kind: b.participant_kind,
                nickname: b.nickname,
                text: None,
                media_ids: Vec::new(),
                agents_only: b.visibility.agents_only(),
            })
        }),
        _ => return None,
    };
    entry.transpose()
}

fn count(event: &'static str, outcome: &'static str) {
    metrics::counter!(m::HISTORY_EVENTS_TOTAL, "event" => event, "outcome" => outcome).increment(1);
}

fn store_failed(e: StoreError) -> HandleError {
    HandleError::Retry(e.to_string())
}

/// A failed call (`name`: `Service/Method`) as the consumer takes it; a refusal names the call
/// (a dead letter's `ucs answered 400` alone does not tell the contact from the transcript).
fn ucs_failed(name: String) -> impl FnOnce(PeerFailure) -> HandleError {
    move |e| match e {
        PeerFailure::Rejected { .. } => HandleError::Reject {
            reason: REJECTED,
            detail: format!("{name}: {e}"),
        },
        retry => retry.into_handle_error(REJECTED),
    }
}

fn invalid(e: ev::BodyError) -> HandleError {
    HandleError::Reject {
        reason: "invalid_body",
        detail: e.to_string(),
    }
}

/// How long a finished conversation's row is kept: longer than `nexus.interaction.v1` (14 days)
/// and its dead-letter topic (14 days) keep events, so a replay still finds it done. Raise it
/// with those retentions.
pub const DONE_RETENTION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// How often each history pod prunes (pods may overlap: the delete is idempotent).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Chat files one history process sends to UCS at once. While one goes, its bytes and request
/// body are in memory, about three times its size (up to 10 MB at `chat.max_file_bytes`'
/// default): unbounded, the backlog's 16 drives and the consumer's lanes draining closes after a
/// UCS outage would hold over a gigabyte, and the pod (512 MiB in the chart) would be killed at
/// each restart. Four hold at most ~120 MB; attachments are a small part of the calls.
pub const ATTACHMENTS_AT_ONCE: usize = 4;

pub struct HistoryWorker {
    config: HistoryConfig,
    ucs: Ucs,
    store: HistoryStore,
    files: Arc<Provisioning>,
    attachments: tokio::sync::Semaphore,
}

impl HistoryWorker {
    pub fn new(config: HistoryConfig, client: reqwest::Client, files: Arc<Provisioning>) -> Self {
        let peer = Peer::new("history", "ucs", client, &config.ucs);
        Self {
            store: HistoryStore::new(files.pool().clone()),
            ucs: Ucs::new(peer),
            config,
            files,
            attachments: tokio::sync::Semaphore::new(ATTACHMENTS_AT_ONCE),
        }
    }

    /// The loop deleting finished conversations older than [`DONE_RETENTION`].
    pub fn pruner(
        &self,
    ) -> impl FnOnce(tokio_util::sync::CancellationToken) -> futures::future::BoxFuture<'static, ()>
    {
        let store = self.store.clone();
        move |stop| {
            Box::pin(async move {
                crate::workers::prune::run("history", PRUNE_EVERY, DONE_RETENTION, stop, |before| {
                    let store = store.clone();
                    async move { store.prune_done(before).await }
                })
                .await
            })
        }
    }

    async fn on_event(&self, event: &Event, target: &PeerTarget) -> Result<(), HandleError> {
        let e = &event.envelope;
        let (tenant, conv) = (e.tenant_id.as_str(), e.conversation_id.as_str());
        let event_id = e.event_id.to_string();
        match e.event_type.as_str() {
            ev::ConversationStarted::TYPE => {
                let b: ev::ConversationStarted = event.body_as().map_err(invalid)?;
                let started = Started {
                    nickname: b.customer_nickname,
                    contact: b.contact,
                    subject: b.subject,
                    user_data: b.user_data,
                    started_at_ms: e.occurred_at_ms,
                    event_id: event_id.clone(),
                };
                let new = self
                    .store
                    .record_start(tenant, conv, &started, &event_id)
                    .await
                    .map_err(store_failed)?;
                if new {
                    count("started", "applied");
                } else {
                    let state = self.store.load(tenant, conv).await.map_err(store_failed)?;
                    // This start run again from the backlog (its UCS calls still to do) is not
                    // a redelivery.
                    if !state.is_some_and(|s| own_start_pending(&s, &event_id)) {
                        count("started", "duplicate");
                    }
                }
                self.advance(target, tenant, conv, &event_id).await
            }
            ev::ConversationClosed::TYPE => {
                let b: ev::ConversationClosed = event.body_as().map_err(invalid)?;
                let closed = Closed {
                    reason: b.reason,
                    closed_by_participant_id: b.closed_by_participant_id,
                    closed_at_ms: e.occurred_at_ms,
                    recorded_at_ms: backlog::now_ms(),
                    event_id: event_id.clone(),
                };
                let new = self
                    .store
                    .record_close(tenant, conv, &closed, &event_id)
                    .await
                    .map_err(store_failed)?;
                if new {
                    count("closed", "applied");
                } else {
                    let Some(state) = self.store.load(tenant, conv).await.map_err(store_failed)?
                    else {
                        return Err(HandleError::Reject {
                            reason: NOT_STARTED,
                            detail: format!("no recorded start for conversation {conv}"),
                        });
                    };
                    // This close run again after its settle wait (its work still to do) is not
                    // a redelivery.
                    let own = state.closed.is_some_and(|c| c.event_id == event_id);
                    if !own || state.step == Step::Done {
                        count("closed", "duplicate");
                    }
                }
                self.advance(target, tenant, conv, &event_id).await
            }
            _ => match entry_of(event) {
                None => {
                    count("other", "ignored");
                    Ok(())
                }
                Some(entry) => {
                    let entry = entry.map_err(invalid)?;
                    let kept = self
                        .store
                        .add_entry(tenant, conv, &entry)
                        .await
                        .map_err(store_failed)?;
                    count(
                        "entry",
                        match kept {
                            Kept::New => "applied",
                            Kept::Duplicate => "duplicate",
                            Kept::Late => {
                                warn!(
                                    conversation_id = conv,
                                    position = entry.position,
                                    "an entry came after its transcript was written; not in UCS"
                                );
                                "late"
                            }
                        },
                    );
                    Ok(())
                }
            },
        }
    }

    /// Runs the conversation's remaining steps in order, each a UCS call then its record.
    #[tracing::instrument(name = "history_advance", skip_all)]
    async fn advance(
        &self,
        target: &PeerTarget,
        tenant: &str,
        conv: &str,
        event_id: &str,
    ) -> Result<(), HandleError> {
        loop {
            let Some(state) = self.store.load(tenant, conv).await.map_err(store_failed)? else {
                return Ok(());
            };
            let step = next(&state);
            let moved = match step {
                Next::WaitForClose | Next::Nothing => return Ok(()),
                Next::IdentifyContact => {
                    let call = ucs::identify_contact(tenant, conv, &state.started);
                    let answer = self
                        .call_ucs(target, tenant, conv, &state.started, call)
                        .await?;
                    let contact =
                        ucs::contact_id_of(&answer).ok_or_else(|| HandleError::Reject {
                            reason: BAD_ANSWER,
                            detail: "IdentifyContact answered without a ContactId".into(),
                        })?;
                    self.store
                        .advance(
                            tenant,
                            conv,
                            Step::Recorded,
                            Step::ContactIdentified,
                            Some(&contact),
                            None,
                            event_id,
                        )
                        .await
                }
                Next::InsertInteraction => {
                    let contact = state.contact_id.clone().unwrap_or_default();
                    let call = ucs::insert_interaction(tenant, conv, &contact, &state.started);
                    let answer = self
                        .call_ucs(target, tenant, conv, &state.started, call)
                        .await?;
                    // UCS keeps the Id it was given; an answer naming another one wins.
                    let id = answer
                        .get("Id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .unwrap_or(conv)
                        .to_string();
                    self.store
                        .advance(
                            tenant,
                            conv,
                            Step::ContactIdentified,
                            Step::InteractionInserted,
                            None,
                            Some(&id),
                            event_id,
                        )
                        .await
                }
                Next::AddTranscript => {
                    // Entries the conversation worker published just after the close (a reply
                    // racing it from the other input topic) come in meanwhile; they need no
                    // place in the backlog (see `concerns`).
                    if let Some(until_ms) = self.settling(&state) {
                        return Err(HandleError::Defer {
                            reason: "transcript_settling",
                            until_ms,
                        });
                    }
                    let mut entries = self
                        .store
                        .entries(tenant, conv)
                        .await
                        .map_err(store_failed)?;
                    // The document's positions are frozen at its first attempt, so a retry
                    // (UCS may have kept the first one) sends the same document, and an entry
                    // coming after it is told apart from a redelivery of one in it.
                    let written = match &state.written {
                        Some(written) => {
                            entries.retain(|e| in_document(written, e.position));
                            written.clone()
                        }
                        None => {
                            let written: Vec<i64> = entries.iter().map(|e| e.position).collect();
                            let frozen = self
                                .store
                                .set_written(tenant, conv, &written)
                                .await
                                .map_err(store_failed)?;
                            if !frozen {
                                // Another member's attempt froze them first: load them.
                                continue;
                            }
                            written
                        }
                    };
                    let call =
                        ucs::transcript_document(tenant, conv, interaction(&state, conv), &entries);
                    self.call_ucs(target, tenant, conv, &state.started, call)
                        .await?;
                    let moved = self
                        .store
                        .advance(
                            tenant,
                            conv,
                            Step::InteractionInserted,
                            Step::TranscriptAdded,
                            None,
                            None,
                            event_id,
                        )
                        .await;
                    if matches!(moved, Ok(true)) {
                        self.count_unwritten(tenant, conv, &written).await;
                    }
                    moved
                }
                Next::AddAttachment(done) => {
                    let mut entries = self
                        .store
                        .entries(tenant, conv)
                        .await
                        .map_err(store_failed)?;
                    // Only the files of messages the document holds.
                    if let Some(written) = &state.written {
                        entries.retain(|e| in_document(written, e.position));
                    }
                    let files = ucs::attachments(&entries);
                    match usize::try_from(done).ok().and_then(|i| files.get(i)) {
                        None => {
                            self.store
                                .advance(
                                    tenant,
                                    conv,
                                    Step::TranscriptAdded,
                                    Step::AttachmentsAdded,
                                    None,
                                    None,
                                    event_id,
                                )
                                .await
                        }
                        Some(file_id) => {
                            self.add_attachment(target, tenant, conv, &state, file_id)
                                .await?;
                            self.store
                                .attachment_added(tenant, conv, done, event_id)
                                .await
                        }
                    }
                }
                Next::SetStatus => {
                    let closed = state.closed.as_ref().ok_or_else(|| {
                        HandleError::Retry("status step without a recorded close".into())
                    })?;
                    let call =
                        ucs::set_interaction_status(tenant, interaction(&state, conv), closed);
                    self.call_ucs(target, tenant, conv, &state.started, call)
                        .await?;
                    let moved = self
                        .store
                        .advance(
                            tenant,
                            conv,
                            Step::AttachmentsAdded,
                            Step::Done,
                            None,
                            None,
                            event_id,
                        )
                        .await;
                    if matches!(moved, Ok(true)) {
                        self.store
                            .drop_entries(tenant, conv)
                            .await
                            .map_err(store_failed)?;
                    }
                    moved
                }
            }
            .map_err(store_failed)?;
            if moved {
                debug!(?step, "UCS step applied");
            } else {
                debug!(?step, "another member applied this step first");
            }
        }
    }

    /// Makes `call` for the conversation started as `started`, a refusal naming the call. The
    /// conversation's IdentifyContact goes along to tell a 404's meaning (see [`ucs`]).
    async fn call_ucs(
        &self,
        target: &PeerTarget,
        tenant: &str,
        conv: &str,
        started: &Started,
        call: ucs::Call,
    ) -> Result<Value, HandleError> {
        let failed = ucs_failed(call.name());
        let contact = ucs::identify_contact(tenant, conv, started);
        self.ucs
            .call(target, conv, call, &contact)
            .await
            .map_err(failed)
    }

    /// Entries recorded while the document was being written (after its entries were read)
    /// are not in it: late, as those that come afterwards.
    async fn count_unwritten(&self, tenant: &str, conv: &str, written: &[i64]) {
        match self.store.entries(tenant, conv).await {
            Ok(entries) => {
                for e in entries.iter().filter(|e| !in_document(written, e.position)) {
                    count("entry", "late");
                    warn!(
                        conversation_id = conv,
                        position = e.position,
                        "an entry came as the transcript was written; not in UCS"
                    );
                }
            }
            Err(e) => {
                warn!(conversation_id = conv, error = %e, "cannot look for entries the transcript missed")
            }
        }
    }

    /// When the transcript of a conversation closed in `state` may be written, if not yet.
    /// The wait counts from when this role recorded the close (after any lag it had: a reply
    /// racing the close is right behind it on the lane).
    fn settling(&self, state: &State) -> Option<i64> {
        let closed = state.closed.as_ref()?;
        if self.config.transcript_settle_ms == 0 {
            return None;
        }
        let from = match closed.recorded_at_ms {
            0 => closed.closed_at_ms, // recorded before the field existed
            at => at,
        };
        let settle = i64::try_from(self.config.transcript_settle_ms).unwrap_or(i64::MAX);
        let until = from.saturating_add(settle);
        (backlog::now_ms() < until).then_some(until)
    }

    /// Adds one chat file as a document; a file that expired or is gone is noted, not fatal.
    async fn add_attachment(
        &self,
        target: &PeerTarget,
        tenant: &str,
        conv: &str,
        state: &State,
        file_id: &str,
    ) -> Result<(), HandleError> {
        // Held from the load to the answer: the file's bytes and its request body are in
        // memory meanwhile (see ATTACHMENTS_AT_ONCE).
        let _slot = self
            .attachments
            .acquire()
            .await
            .map_err(|_| HandleError::Retry("attachment slots closed".into()))?;
        match self.files.file(tenant, conv, file_id).await {
            Ok(file) => {
                let call = ucs::attachment_document(tenant, conv, interaction(state, conv), file);
                self.call_ucs(target, tenant, conv, &state.started, call)
                    .await?;
                metrics::counter!(m::HISTORY_ATTACHMENTS_TOTAL, "outcome" => "added").increment(1);
                Ok(())
            }
            Err(ProvisioningError::NotFound(_) | ProvisioningError::Expired(_)) => {
                warn!(
                    file_id,
                    "attachment expired or deleted before the close; not written to UCS"
                );
                metrics::counter!(m::HISTORY_ATTACHMENTS_TOTAL, "outcome" => "missing")
                    .increment(1);
                Ok(())
            }
            Err(e) => Err(HandleError::Retry(e.to_string())),
        }
    }
}

/// The UCS interaction id (recorded at InsertInteraction; the conversation id by default).
fn interaction<'a>(state: &'a State, conv: &'a str) -> &'a str {
    state.interaction_id.as_deref().unwrap_or(conv)
}

#[async_trait]
impl Effect for HistoryWorker {
    // Only the start and the close call UCS. Entries are only recorded (by position, in any
    // order), so they need no place in the backlog: recorded at once, they are there when a
    // backlogged close writes the transcript. (An event whose ids no store can key is
    // dead-lettered by the backlog, as `bad_event_reason`, before it looks; `apply` does the
    // same for entries.)
    fn concerns(&self, event: &Event) -> bool {
        let e = &event.envelope;
        matches!(
            e.event_type.as_str(),
            ev::ConversationStarted::TYPE | ev::ConversationClosed::TYPE
        ) && self.config.ucs.has_target(&e.tenant_id)
    }

    fn bad_event_reason(&self) -> &'static str {
        BAD_EVENT
    }

    async fn apply(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        let Some(target) = self.config.ucs.target(&event.envelope.tenant_id) else {
            count("any", "skipped");
            return Ok(());
        };
        if let Some(why) = unkeyable(event) {
            return Err(HandleError::Reject {
                reason: BAD_EVENT,
                detail: why,
            });
        }
        self.on_event(event, &target).await
    }
}
