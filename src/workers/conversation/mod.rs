//! The `conversation` role: live session state in the session store, the transcript, and
//! routing of conversations to queues and agents; it publishes the interaction stream and the
//! client-bound events the edges push to sockets.
//!
//! Ordering and idempotency: the role consumes the inbound and agent topics, both keyed by
//! conversation id, so one conversation's events of one topic are handled one at a time in
//! order; its events of the two topics run on separate lanes and may meet, which the record's
//! compare-and-set save settles (agent readiness is keyed by agent id and touches only that
//! agent's presence). Only this role writes
//! a conversation's record and transcript. Each handler does idempotent steps — transcript
//! appends dedup by event id, agent reservations are idempotent per conversation, derived
//! events get ids derived from their source — and saves the record last with the event's id in
//! `routing.applied`, so a redelivery after a crash anywhere redoes the same steps with the same
//! result and a redelivery after the save is skipped. Nothing is ordered across conversations.
//!
//! Changes that concern another conversation (an agent freed a slot, an offer timed out) are
//! never applied from here: the timer loop ([`timers`]) publishes an event keyed by that
//! conversation, whose handler applies it in order.

pub mod bot;
pub mod config;
pub mod directory;
pub mod event_time;
mod flow;
pub mod notify;
pub mod timers;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, warn};

pub use config::ConversationConfig;
pub use directory::{AgentProfile, Directory, DirectoryError, Rule};

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::{Bus, Message};
use crate::events::chat::{self, Body, BodyError};
use crate::events::publish::{publish, PublishError};
use crate::events::Event;
use crate::stores::session::{start_mark, SessionStore, StoreError};

/// Topics the role writes.
pub use crate::topology::topics::{
    AGENT as AGENT_TOPIC, DELIVERY as DELIVERY_TOPIC, INBOUND as INBOUND_TOPIC,
    INTERACTION as INTERACTION_TOPIC,
};

/// The media of web chat in agent capacities.
pub const CHAT_MEDIA: &str = "chat";

pub(crate) const PRODUCER: &str = "worker/conversation";

pub struct ConversationWorker {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) store: Arc<dyn SessionStore>,
    pub(crate) directory: Arc<dyn Directory>,
    pub(crate) config: ConversationConfig,
    /// Calls to bot endpoints.
    pub(crate) http: reqwest::Client,
    /// Most user-data entries a conversation carries (`chat.max_user_data_entries`): the
    /// edge refuses more, this holds when updates race past its check.
    pub(crate) max_user_data_entries: usize,
    /// Longest text a bot reply may carry (`chat.max_message_chars`), as the bot API.
    pub(crate) max_message_chars: usize,
    /// Bots seen down lately: not called again until their window ends.
    pub(crate) bots_down: bot::DownBots,
}

impl ConversationWorker {
    pub fn new(
        bus: Arc<dyn Bus>,
        store: Arc<dyn SessionStore>,
        directory: Arc<dyn Directory>,
        config: ConversationConfig,
        http: reqwest::Client,
    ) -> Self {
        Self {
            bus,
            store,
            directory,
            http,
            max_user_data_entries: crate::config::Config::defaults().chat.max_user_data_entries,
            max_message_chars: crate::config::Config::defaults().chat.max_message_chars,
            // Twice a call's timeout, at least 5 s: a bot down is called again about once a
            // window per pod (calls that began before the failure was noted still run).
            bots_down: bot::DownBots::new(
                Duration::from_millis(config.bot_timeout_ms.saturating_mul(2))
                    .max(Duration::from_secs(5)),
            ),
            config,
        }
    }

    /// Sets the chat limits (`chat.max_user_data_entries`, `chat.max_message_chars`) that
    /// hold where the edge's checks cannot: racing updates, bot answers.
    pub fn with_chat_limits(mut self, chat: &crate::config::ChatConfig) -> Self {
        self.max_user_data_entries = chat.max_user_data_entries;
        self.max_message_chars = chat.max_message_chars;
        self
    }

    pub(crate) fn offer_timeout(&self) -> Duration {
        Duration::from_millis(self.config.offer_timeout_ms)
    }

    /// Publishes `body` as an event derived from `source` (same tenant, conversation and trace,
    /// an id derived from the source's and `what`).
    pub(crate) async fn emit<B: Body>(
        &self,
        topic: &str,
        source: &Event,
        conversation_id: &str,
        what: &str,
        body: &B,
    ) -> Result<(), HandleError> {
        let mut event = Event::typed(body, &source.envelope.tenant_id, conversation_id, PRODUCER)
            .map_err(reject_body)?
            .with_derived_id(&source.envelope.event_id, what);
        event.envelope.traceparent = source.envelope.traceparent.clone();
        publish(self.bus.as_ref(), topic, &event)
            .await
            .map(|_| ())
            .map_err(publish_failed)
    }

    /// The record now speaks for the session; the edge's start mark would only take memory
    /// until it expires, which it also does if this fails.
    async fn drop_start_mark(&self, e: &Event) {
        let mark = start_mark(&e.envelope.tenant_id, &e.envelope.conversation_id);
        if let Err(err) = self.store.forget(&mark).await {
            warn!(conversation_id = %e.envelope.conversation_id, error = %err, "cannot drop the start mark; it expires");
        }
    }
}

#[async_trait]
impl Handler for ConversationWorker {
    async fn handle(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        let t = event.envelope.event_type.as_str();
        match t {
            chat::ConversationRequested::TYPE => {
                self.on_requested(event, body(event)?).await?;
                self.drop_start_mark(event).await;
                Ok(())
            }
            chat::MessageReceived::TYPE => self.on_customer_message(event, body(event)?).await,
            chat::TypingIndicated::TYPE => self.on_typing(event, body(event)?).await,
            chat::ParticipantLeft::TYPE => {
                let b: chat::ParticipantLeft = body(event)?;
                if b.participant_kind == chat::ParticipantKind::Agent {
                    self.on_agent_left(event, b).await
                } else {
                    self.on_customer_left(event, b).await
                }
            }
            chat::AgentStateChanged::TYPE => self.on_agent_state(event, body(event)?).await,
            chat::AgentProfileChanged::TYPE => self.on_agent_profile(event, body(event)?).await,
            chat::AgentOffered::TYPE => self.on_offered(event, body(event)?).await,
            chat::AgentAccepted::TYPE => self.on_accepted(event, body(event)?).await,
            chat::AgentRejected::TYPE => self.on_rejected(event, body(event)?).await,
            chat::MessageSent::TYPE => self.on_agent_message(event, body(event)?).await,
            chat::ConversationCompleted::TYPE => self.on_completed(event, body(event)?).await,
            chat::TransferRequested::TYPE => self.on_transfer(event, body(event)?).await,
            chat::ReceiptReceived::TYPE => self.on_receipt(event, body(event)?).await,
            chat::UserDataUpdated::TYPE => self.on_user_data(event, body(event)?).await,
            chat::BotTurnDue::TYPE => self.on_bot_turn_due(event, body(event)?).await,
            other => {
                debug!(event_type = other, "not a conversation event; skipped");
                Ok(())
            }
        }
    }
}

/// The body of an event the role applies, once its time is one the role takes: every handled
/// event passes here first, so nothing is derived from a time no clock gives.
fn body<B: Body>(event: &Event) -> Result<B, HandleError> {
    taken_time(event)?;
    event.body_as::<B>().map_err(reject_body)
}

/// An `occurred_at` outside [`event_time::check`]'s range is dead-lettered as `bad_time`: the
/// due times, waits and transcript times derived from it would be wrong (or overflow), and
/// retrying cannot mend it.
fn taken_time(event: &Event) -> Result<(), HandleError> {
    let now = chrono::Utc::now().timestamp_millis();
    event_time::check(event.envelope.occurred_at_ms, now).map_err(|e| HandleError::Reject {
        reason: "bad_time",
        detail: e.to_string(),
    })
}

fn reject_body(e: BodyError) -> HandleError {
    HandleError::Reject {
        reason: "invalid_body",
        detail: e.to_string(),
    }
}

pub(crate) fn store_failed(e: StoreError) -> HandleError {
    match e {
        StoreError::Unavailable(m) => HandleError::Retry(m),
        // Closed since this event read the record: applied again, it meets the close (dropped,
        // or announced again if this event was the close).
        e @ StoreError::Closed(_) => HandleError::Retry(e.to_string()),
        StoreError::Corrupt(m) => HandleError::Reject {
            reason: "corrupt_session",
            detail: m,
        },
    }
}

pub(crate) fn directory_failed(e: DirectoryError) -> HandleError {
    HandleError::Retry(e.to_string())
}

fn publish_failed(e: PublishError) -> HandleError {
    match e {
        PublishError::Encode(e) => HandleError::Reject {
            reason: "encode_failed",
            detail: e.to_string(),
        },
        PublishError::Bus {
            source: crate::bus::BusError::TooLarge(detail),
            ..
        } => HandleError::Reject {
            reason: "too_large",
            detail,
        },
        e => HandleError::Retry(e.to_string()),
    }
}
