//! The conversation's state machine: one method per event type. Each method is safe to run
//! again for the same event (see the module docs of the role for how).

use std::collections::BTreeMap;

use serde_json::json;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::event_time::{self, believable};
use super::{
    directory, directory_failed, notify, store_failed, ConversationWorker, AGENT_TOPIC, CHAT_MEDIA,
    DELIVERY_TOPIC, INTERACTION_TOPIC,
};
use crate::bus::consumer::HandleError;
use crate::events::chat::{self as ev, Channel, ClientEventKind, ParticipantKind};
use crate::events::Event;
use crate::stores::session::under_limits;
use crate::stores::session::{
    customer_mark, Appended, BotPending, Conversation, ConversationState, Entry, EntryKind,
    NewEntry, Party, PartyKind, PresenceChange, PresenceUpdate, Reserve, Routing, StoreError,
    Timer, AGENTS_ONLY,
};

pub(crate) const OFFER_TIMER: &str = "offer";
pub(crate) const QUEUED_TIMER: &str = "queued";
/// A consultant invitation not answered within the offer timeout is withdrawn.
pub(crate) const CONSULT_TIMER: &str = "consult";
/// Async chat: the customer has been idle for `idle_timeout_s` (a notice is sent).
pub(crate) const IDLE_TIMER: &str = "idle";
/// Async chat: the grace after the notice ran out (the conversation closes).
pub(crate) const IDLE_CLOSE_TIMER: &str = "idle_close";
/// Live chat: due `abandon_timeout_s` after the customer's last known activity; while edges
/// keep the customer's mark fresh it comes again, once the mark lapsed the chat closes.
pub(crate) const ABANDON_TIMER: &str = "abandon";
/// A bot turn that failed with the bot down (`bot_fallback = "retry"`) or throttled (a 429)
/// is due again.
pub(crate) const BOT_TIMER: &str = "bot";
/// The first wait before a down bot's turn is tried again; it doubles up to [`BOT_RETRY_MAX`].
const BOT_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const BOT_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest a throttled bot's `Retry-After` is waited for at once: it is the bot's estimate
/// while a customer waits, and a date far ahead (a clock off) must not park the turn for hours
/// when `bot_retry_max_s` is long. The turn's deadline caps it too.
const BOT_RETRY_AFTER_MAX: std::time::Duration = std::time::Duration::from_secs(300);
/// With `bot_fallback = "queue"`, how long (at most `bot_retry_max_s`) a bot answering 429 is
/// waited for before its conversation goes to the queue. A 429 is load shedding by a bot that
/// is up, typically for seconds: sending every chat that meets it to agents at once would
/// flood the queues at the peak that caused it, so the turn waits as asked; but `queue` says
/// the customer should not wait on a failing bot for long, so only this long.
const BOT_THROTTLED_QUEUE_MAX_S: u64 = 30;

/// When a pending bot turn is tried next (ms since the epoch): after the backoff, or after
/// what a throttling bot asked for (`asked`, 1 s to [`BOT_RETRY_AFTER_MAX`]), but never after
/// `deadline_ms`: the last try is at the deadline and the hand-over to the queue follows it,
/// not up to a backoff later. `None` once the deadline has come.
fn next_bot_try(
    now_ms: i64,
    deadline_ms: i64,
    attempt: u32,
    asked: Option<std::time::Duration>,
) -> Option<i64> {
    if now_ms >= deadline_ms {
        return None;
    }
    let wait = match asked {
        Some(asked) => asked.clamp(BOT_RETRY_FIRST, BOT_RETRY_AFTER_MAX),
        None => crate::bus::consumer::retry_delay(BOT_RETRY_FIRST, BOT_RETRY_MAX, attempt),
    };
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    Some(now_ms.saturating_add(wait_ms).min(deadline_ms))
}

/// The earliest a timer armed by a handler may fire, from now: handlers arm timers before they
/// save the record (so a crash between the two leaves a timer, never a record without one),
/// and a timer fired before that save would find the old record, act on nothing and be done.
/// Due times come from event times, which for an event handled late are already past.
const TIMER_FLOOR_MS: i64 = 1_000;

fn not_before_save(due_ms: i64) -> i64 {
    due_ms.max(chrono::Utc::now().timestamp_millis() + TIMER_FLOOR_MS)
}

/// The decision key of a refused transfer or consult request.
fn refused_key(e: &Event) -> String {
    format!("transfer-refused:{}", e.envelope.event_id)
}

/// Waiters a dispatch looks at, from the head of the queue.
const DISPATCH_WALK: usize = 16;

/// The reason code of the not-ready state an agent is put in when it lets an offer lapse.
pub(crate) const NOT_RESPONDING: &str = "NOT_RESPONDING";

/// Whether a waiter takes any free agent (no skills asked, none excluded).
fn fits_anyone(c: &Conversation) -> bool {
    c.routing.skills.is_empty() && c.routing.target_agent.is_none() && c.declined_by.is_empty()
}

/// How long an offer waits for its conversation's record before it is dropped.
const OFFER_WAITS_FOR_CONVERSATION_MS: i64 = 60_000;
/// How long an offer waits for a bot handoff's save (which follows its publish at once, or
/// after a retry of the handoff): shorter, since the waiting offer holds its lane.
const OFFER_WAITS_FOR_HANDOFF_MS: i64 = 15_000;
/// How soon an offer waiting for one of those saves looks again.
const WAIT_FOR_SAVE_MS: i64 = 50;

type Step = Result<(), HandleError>;

pub(crate) fn secs_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX / 4)
}

/// When an async chat idle since `last_activity_ms` closes: saturating, since a record may hold
/// any time and a wrapped sum would close a chat whose customer is still there.
pub(crate) fn idle_close_at(last_activity_ms: i64, idle_timeout_s: u64, grace_s: u64) -> i64 {
    last_activity_ms
        .saturating_add(secs_ms(idle_timeout_s))
        .saturating_add(secs_ms(grace_s))
}

/// The last activity of a chat whose customer acted at `at_ms`: the later of that and the
/// record's, each without a wrong clock's lead beyond the skew. Kept, that lead would put the
/// idle close off until its date; and a record saved before event times were checked may hold
/// any time, which this mends at the customer's next message.
fn latest_activity(last_ms: i64, at_ms: i64, now_ms: i64) -> i64 {
    believable(last_ms, now_ms).max(believable(at_ms, now_ms))
}

/// When an offer applied at `now_ms` lapses: the whole `timeout` from now, or the offer's own
/// `expires_at` if later (its maker's clock ahead by a little), but never more than the skew
/// allowance later: a forged or wrong `expires_at` would hold the chat offered to an agent who
/// never answers, in practice for good.
fn offer_expiry(expires_at: i64, now_ms: i64, timeout_ms: i64) -> i64 {
    let full = now_ms.saturating_add(timeout_ms);
    believable(expires_at, full).max(full)
}

/// The offer id of the `attempt`-th offer of a conversation to an agent: the same for a
/// retried dispatch, so a duplicate offer is recognised, and never the id of an earlier offer
/// (attempts count every offer applied, [`Routing::offers`]).
pub(crate) fn offer_id(conversation_id: &str, agent_id: &str, attempt: usize) -> String {
    let name = format!("{conversation_id}/offer/{agent_id}/{attempt}");
    Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// Whether the conversation id is a UUID v7 (as the edges make them) minted before `at_ms`;
/// false for any other id, whose age cannot be told.
fn created_before(conversation_id: &str, at_ms: i64) -> bool {
    Uuid::parse_str(conversation_id)
        .ok()
        .filter(|u| u.get_version_num() == 7)
        .and_then(|u| u.get_timestamp())
        .is_some_and(|t| {
            let (secs, nanos) = t.to_unix();
            let ms = i64::try_from(secs)
                .unwrap_or(i64::MAX / 1_000)
                .saturating_mul(1_000)
                .saturating_add(i64::from(nanos / 1_000_000));
            ms < at_ms
        })
}

fn party_kind(k: ParticipantKind) -> PartyKind {
    match k {
        ParticipantKind::Agent => PartyKind::Agent,
        ParticipantKind::Bot => PartyKind::Bot,
        ParticipantKind::System => PartyKind::System,
        ParticipantKind::Customer | ParticipantKind::Unknown => PartyKind::Customer,
    }
}

fn system() -> Party {
    Party {
        participant_id: "system".into(),
        nickname: "system".into(),
        kind: PartyKind::System,
    }
}

/// Whether `offer_id` is the open consultant invitation of `agent`.
fn is_consult_offer(c: &Conversation, agent: &str, offer_id: &str) -> bool {
    c.state == ConversationState::Connected
        && c.routing.consult_invited.as_deref() == Some(agent)
        && c.routing.consult_offer_id.as_deref() == Some(offer_id)
}

fn entry(source: &Event, kind: EntryKind, from: Party, text: Option<String>) -> NewEntry {
    NewEntry {
        event_id: source.envelope.event_id.to_string(),
        kind,
        from,
        text,
        message_id: None,
        data: BTreeMap::new(),
        at_ms: source.envelope.occurred_at_ms,
    }
}

/// A message's transcript entries: the message itself, or for a file message (customer upload
/// or agent file) one `FileUploaded` entry per file, its text the file name.
fn message_entries(
    e: &Event,
    kind: EntryKind,
    from: &Party,
    text: Option<&String>,
    media_ids: &[String],
) -> Vec<(String, NewEntry)> {
    if media_ids.is_empty() {
        return vec![(
            "message".into(),
            entry(e, kind, from.clone(), text.cloned()),
        )];
    }
    media_ids
        .iter()
        .enumerate()
        .map(|(i, file_id)| {
            let mut new = entry(e, EntryKind::FileUploaded, from.clone(), text.cloned());
            new.data.insert("file_id".into(), file_id.clone());
            if let Some(name) = text {
                new.data.insert("name".into(), name.clone());
            }
            (format!("file/{i}"), new)
        })
        .collect()
}

/// The party whose action closes a conversation, whose `ParticipantLeft` the close appends.
enum Leaving {
    Nobody,
    Customer,
    Agent {
        participant_id: String,
        agent_id: String,
    },
}

/// Whether `e` is the event that closed `c`: the last one applied to it (nothing is applied to
/// a closed record after its close).
fn closed_by(c: &Conversation, e: &Event) -> bool {
    c.state == ConversationState::Closed
        && c.routing.applied.last().map(String::as_str)
            == Some(e.envelope.event_id.to_string().as_str())
}

/// Whether `id` has the shape of an object id (1 to 64 of `A-Z a-z 0-9 -`), as the bot API
/// checks a handoff's `queue_id`.
fn plain_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The event a retried bot turn acts as, named by the customer message's entry: every try of
/// that message derives the same ids (the bot's idempotency key, its replies), in `due`'s trace.
fn bot_turn_source(due: &Event, m: &Entry) -> Event {
    let mut source = Event::new(
        "BotTurn",
        due.envelope.tenant_id.clone(),
        due.envelope.conversation_id.clone(),
        super::PRODUCER,
        Default::default(),
    )
    .with_derived_id(
        &Uuid::NAMESPACE_OID,
        &format!("bot-turn/{}/{}", m.entry.event_id, m.position),
    );
    source.envelope.traceparent = due.envelope.traceparent.clone();
    source
}

/// Who the events of a stored entry say see it.
fn visibility_of(e: &Entry) -> ev::Visibility {
    if e.entry.agents_only() {
        ev::Visibility::Agents
    } else {
        ev::Visibility::All
    }
}

/// Whether `sender` is the joined consultant of a private consult.
fn private_consultant(c: &Conversation, sender: Option<&str>) -> bool {
    c.routing.consult_private && sender.is_some() && c.routing.consultant.as_deref() == sender
}

/// Agents who see the conversation's transcript: the connected one and its consultant.
fn watchers(c: &Conversation) -> Vec<String> {
    c.agent_id
        .iter()
        .chain(c.routing.consultant.iter())
        .cloned()
        .collect()
}

impl ConversationWorker {
    async fn load(&self, source: &Event) -> Result<Option<Conversation>, HandleError> {
        self.store
            .conversation(&source.envelope.tenant_id, &source.envelope.conversation_id)
            .await
            .map_err(store_failed)
    }

    /// Saves the record by compare-and-set; on a conflict the event is retried on the fresh
    /// record (every step before the save is idempotent).
    async fn save(&self, c: &mut Conversation, source: &Event) -> Step {
        c.routing.mark_applied(source.envelope.event_id.to_string());
        if self.store.put_conversation(c).await.map_err(store_failed)? {
            c.version += 1;
            Ok(())
        } else {
            Err(HandleError::Retry(format!(
                "conversation {} changed concurrently; applying again",
                c.conversation_id
            )))
        }
    }

    /// Appends an entry (its event id derived from `source` and `what`, so one source can
    /// append several) and tells the customer and the watching agents.
    async fn append(
        &self,
        c: &Conversation,
        source: &Event,
        what: &str,
        new: NewEntry,
    ) -> Result<Entry, HandleError> {
        let stored = self.store_entry(c, source, what, new).await?;
        self.notify_entry(c, source, what, &stored).await?;
        Ok(stored)
    }

    /// The store half of [`Self::append`]: the entry gets its transcript position.
    async fn store_entry(
        &self,
        c: &Conversation,
        source: &Event,
        what: &str,
        new: NewEntry,
    ) -> Result<Entry, HandleError> {
        Ok(self
            .store_send(c, source, what, new)
            .await
            .map_err(store_failed)?
            .0)
    }

    /// [`Self::store_entry`] with the store's answer: whether the entry was there before (see
    /// [`Self::send_entry`]).
    async fn store_send(
        &self,
        c: &Conversation,
        source: &Event,
        what: &str,
        mut new: NewEntry,
    ) -> Result<(Entry, Appended), StoreError> {
        new.event_id = crate::events::chat::derived_id(&source.envelope.event_id, what).to_string();
        let appended = self
            .store
            .append(&c.tenant_id, &c.conversation_id, &new)
            .await?;
        let stored = Entry {
            position: appended.position,
            entry: new,
        };
        Ok((stored, appended))
    }

    /// Stores a sent message's entry on a conversation from [`Self::sending_to`]; `None` when
    /// publishing its events is not this event's job:
    /// - another event appended that message before (a client's retried send, under a new
    ///   event id): that event's effects (pushes, interaction event, bot turn) are its own. A
    ///   redelivery of the same event is not such a case: it repeats them under the same ids,
    ///   which is how an effect cut short by a crash is completed;
    /// - `c` is closed and this event stored nothing before the close.
    ///
    /// On a closed `c` the store answers only an entry this very event stored before the close
    /// (ids are checked before a closed record refuses): a send that raced the other party's
    /// leaving and whose publishes then failed. Its events are published again, so the
    /// interaction stream (history, webhooks) gets the message the transcript holds, just
    /// after `ConversationClosed`.
    async fn send_entry(
        &self,
        c: &Conversation,
        source: &Event,
        what: &str,
        new: NewEntry,
    ) -> Result<Option<Entry>, HandleError> {
        let closed = c.state == ConversationState::Closed;
        match self.store_send(c, source, what, new).await {
            Ok((_, appended)) if appended.retried => {
                debug!(conversation_id = %c.conversation_id, "a retried send; applied before");
                Ok(None)
            }
            Ok((m, appended)) if closed && !appended.duplicate => {
                // Only a Redis record closed before closes marked its ids takes an entry now.
                warn!(conversation_id = %c.conversation_id, position = m.position, "a send stored after the close (a record closed by an older nexus); not published");
                Ok(None)
            }
            Ok((m, _)) => {
                if closed {
                    info!(conversation_id = %c.conversation_id, position = m.position, "a send stored before the close; publishing its events again");
                }
                Ok(Some(m))
            }
            Err(StoreError::Closed(_)) if closed => {
                debug!(conversation_id = %c.conversation_id, "conversation closed; send dropped");
                Ok(None)
            }
            Err(err) => Err(store_failed(err)),
        }
    }

    /// The notify half of [`Self::append`]: the client event for the customer and watchers.
    async fn notify_entry(
        &self,
        c: &Conversation,
        source: &Event,
        what: &str,
        stored: &Entry,
    ) -> Step {
        let client = notify::transcript(&c.conversation_id, stored, watchers(c));
        self.emit(
            DELIVERY_TOPIC,
            source,
            &c.conversation_id,
            &format!("client/{what}"),
            &client,
        )
        .await
    }

    pub(super) async fn on_requested(&self, e: &Event, b: ev::ConversationRequested) -> Step {
        if let Some(existing) = self.load(e).await? {
            if !existing
                .routing
                .was_applied(&e.envelope.event_id.to_string())
            {
                // A retried start (same request id) publishes again while it finds no record.
                info!(conversation_id = %e.envelope.conversation_id, "a second request for an existing conversation; ignored");
                return Ok(());
            }
            if closed_by(&existing, e) {
                // Closed at once (no route) and redelivered: the close may not have been told.
                return self
                    .announce_close(
                        &existing,
                        e,
                        ev::CloseReason::System,
                        None,
                        Vec::new(),
                        None,
                    )
                    .await;
            }
            return self.rearm_queued(&existing, e).await;
        }
        let at = e.envelope.occurred_at_ms;
        let now = chrono::Utc::now().timestamp_millis();
        if at < now.saturating_sub(self.closed_retention_ms()) {
            // No record, and any this start made would have expired by now: a replay reaching
            // back past the retention, for a customer long gone. Starting it again would offer
            // an agent a chat nobody is in (the dedup ids went with the record).
            info!(conversation_id = %e.envelope.conversation_id, "a start older than closed_retention_s with no record; ignored");
            return Ok(());
        }
        let customer = Party {
            participant_id: b.participant_id.clone(),
            nickname: b.nickname.clone(),
            kind: PartyKind::Customer,
        };
        let channel = "WEB_CHAT";
        let mut c = Conversation {
            tenant_id: e.envelope.tenant_id.clone(),
            conversation_id: e.envelope.conversation_id.clone(),
            channel: channel.into(),
            state: ConversationState::Queued,
            customer: customer.clone(),
            contact: b.contact.to_map(),
            user_data: b.user_data.clone(),
            subject: b.subject.clone(),
            queue_id: None,
            bot_id: None,
            agent_id: None,
            offered_to: None,
            declined_by: Vec::new(),
            files: 0,
            created_at_ms: at,
            // The idle and abandon timers count from it: a wrong clock's lead is not kept.
            last_activity_ms: believable(at, now),
            closed_reason: None,
            routing: Routing {
                is_async: b.is_async,
                ..Routing::default()
            },
            version: 0,
        };
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "started",
            &ev::ConversationStarted {
                channel: Channel::WebChat,
                channel_id: b.channel_id.clone(),
                customer_participant_id: b.participant_id.clone(),
                customer_nickname: b.nickname.clone(),
                contact: b.contact.clone(),
                contact_id: None,
                subject: b.subject.clone(),
                user_data: b.user_data.clone(),
                is_async: b.is_async,
            },
        )
        .await?;
        let joined = self
            .append(
                &c,
                e,
                "joined",
                entry(e, EntryKind::ParticipantJoined, customer.clone(), None),
            )
            .await?;
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "joined",
            &ev::ParticipantJoined {
                participant_id: customer.participant_id.clone(),
                participant_kind: ParticipantKind::Customer,
                nickname: customer.nickname.clone(),
                agent_id: None,
                transcript_position: i64::try_from(joined.position).ok(),
                visibility: ev::Visibility::All,
            },
        )
        .await?;
        let mut first = None;
        if let Some(text) = b.first_message.clone().filter(|t| !t.is_empty()) {
            let m = self
                .append(
                    &c,
                    e,
                    "first",
                    entry(e, EntryKind::Message, customer.clone(), Some(text.clone())),
                )
                .await?;
            self.emit_customer_message(e, &c, &m, None).await?;
            first = Some(m);
        }

        let rules = self
            .directory
            .routing_rules(&c.tenant_id)
            .await
            .map_err(directory_failed)?;
        let Some(rule) = directory::route(&rules, channel, &c.user_data).cloned() else {
            info!(conversation_id = %c.conversation_id, "no routing rule matches; closing");
            let notice = NewEntry {
                data: BTreeMap::from([("code".into(), "NO_ROUTE".into())]),
                ..entry(
                    e,
                    EntryKind::Notice,
                    system(),
                    Some("No one is available to take this chat.".into()),
                )
            };
            self.append(&c, e, "no-route", notice).await?;
            return self
                .close(&mut c, e, ev::CloseReason::System, None, &Leaving::Nobody)
                .await;
        };
        c.queue_id = Some(rule.queue_id.clone());
        c.routing.skills = rule.skills.clone();
        c.routing.priority = rule.priority;
        let (target_kind, target_id) = match &rule.bot_id {
            Some(bot) => (ev::TargetKind::Bot, bot.clone()),
            None => (ev::TargetKind::Queue, rule.queue_id.clone()),
        };
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "routed",
            &ev::ConversationRouted {
                target_kind,
                target_id,
                queue_id: Some(rule.queue_id.clone()),
                skills: rule.skills.clone(),
                priority: i32::try_from(rule.priority).unwrap_or(i32::MAX),
                rule_id: Some(rule.id.clone()),
            },
        )
        .await?;
        if let Some(bot) = &rule.bot_id {
            // Bot first: the rule's queue takes over when the bot hands off (or is down).
            c.state = ConversationState::Bot;
            c.bot_id = Some(bot.clone());
            if let Some(m) = &first {
                self.bot_turn(&mut c, e, m).await?;
            }
            self.arm_idle(&c).await?;
            // Queued if the bot handed off at once.
            return self.save_queued(&mut c, e).await;
        }
        self.wait_in_queue(&c, e).await?;
        self.arm_idle(&c).await?;
        self.save_queued(&mut c, e).await
    }

    /// (Re)sets the timer that ends a chat whose customer went away, from the customer's last
    /// activity: async chats' idle timer, live chats' abandon timer.
    async fn arm_idle(&self, c: &Conversation) -> Step {
        let (kind, timeout) = match (c.routing.is_async, self.config.abandon_timeout_s) {
            (true, _) => (IDLE_TIMER, self.config.idle_timeout_s),
            (false, 0) => return Ok(()),
            (false, abandon) => (ABANDON_TIMER, abandon),
        };
        // Saturating: a record may hold any time (saved before times were checked), and a
        // wrapped sum would be due at once, closing a live chat as abandoned or idle.
        let due = c.last_activity_ms.saturating_add(secs_ms(timeout));
        self.store
            .schedule(&self.timer(kind, c), not_before_save(due))
            .await
            .map_err(store_failed)
    }

    /// Puts a queued conversation in its queue and offers free agents to the queue's waiters
    /// ([`Self::dispatch`]); a timer tries again later while it waits.
    async fn wait_in_queue(&self, c: &Conversation, source: &Event) -> Step {
        let Some(queue) = &c.queue_id else {
            return Ok(());
        };
        self.store
            .enqueue(
                &c.tenant_id,
                queue,
                &c.conversation_id,
                c.routing.priority,
                c.created_at_ms,
            )
            .await
            .map_err(store_failed)?;
        self.dispatch(c, source, source.envelope.occurred_at_ms)
            .await?;
        // Also after an offer: if it never applies (lost with a crash, or the agent's slot was
        // released meanwhile), the timer offers again while the conversation still waits.
        self.arm_queued(c, source).await
    }

    async fn arm_queued(&self, c: &Conversation, source: &Event) -> Step {
        // A source dated ahead (a wrong clock) must not put the waiter's next try off until
        // its date; the sum saturates rather than wrap into a time long past.
        let now = chrono::Utc::now().timestamp_millis();
        let due = believable(source.envelope.occurred_at_ms, now)
            .saturating_add(i64::try_from(self.config.requeue_interval_ms).unwrap_or(i64::MAX / 4));
        self.store
            .schedule(&self.timer(QUEUED_TIMER, c), not_before_save(due))
            .await
            .map_err(store_failed)
    }

    /// A redelivered event that was applied: if it queued the conversation, the timer armed
    /// after its save may have been cut short (and the one armed before it may have fired
    /// and ended in between), so it is armed again. Harmless otherwise: the timer offers
    /// only while the conversation waits.
    async fn rearm_queued(&self, c: &Conversation, e: &Event) -> Step {
        if c.state == ConversationState::Queued && c.queue_id.is_some() {
            self.arm_queued(c, e).await?;
        }
        Ok(())
    }

    /// Saves a conversation this step put in its queue, then arms its queued timer once more.
    /// Armed before the save too (a crash between the two must not leave the waiter without
    /// one), a timer that fired in between found no record or one not Queued yet (a new chat,
    /// a transfer, a bot's handoff) and ended.
    async fn save_queued(&self, c: &mut Conversation, e: &Event) -> Step {
        self.save(c, e).await?;
        if c.state == ConversationState::Queued {
            self.arm_queued(c, e).await?;
        }
        Ok(())
    }

    /// Offers free agents to the first waiters of `me`'s queue in queue order (priority, then
    /// age), then to `me` if the walk did not reach it: a freed slot goes to the customer who
    /// has waited longest and fits, not to whoever happened to ask (a new arrival, a waiter's
    /// timer). Several dispatches may run at once on several workers; the reservation is
    /// atomic per slot, and an offer that reaches a waiter already offered is stale and frees
    /// its slot when applied.
    pub(crate) async fn dispatch(&self, me: &Conversation, source: &Event, now_ms: i64) -> Step {
        let Some(queue) = me.queue_id.as_deref() else {
            return Ok(());
        };
        let waiting = self
            .store
            .waiting(&me.tenant_id, queue, DISPATCH_WALK)
            .await
            .map_err(store_failed)?;
        let mut reached_me = false;
        for id in waiting {
            let loaded;
            let waiter = if id == me.conversation_id {
                // Not saved yet for a new arrival: the caller's copy is the one.
                reached_me = true;
                me
            } else {
                loaded = match self.store.conversation(&me.tenant_id, &id).await {
                    Ok(c) => c,
                    // Another conversation's unreadable record is no reason to fail this
                    // event: the walk goes on without it (its own events report it).
                    Err(crate::stores::session::StoreError::Corrupt(detail)) => {
                        warn!(conversation_id = %id, detail = %detail, "an unreadable waiter skipped");
                        continue;
                    }
                    Err(e) => return Err(store_failed(e)),
                };
                match &loaded {
                    Some(c)
                        if c.state == ConversationState::Queued
                            && c.queue_id.as_deref() == Some(queue) =>
                    {
                        c
                    }
                    // Closed for good: an entry left by a re-queue that lost its save to the
                    // close would otherwise stay at the head of the queue forever. (Other
                    // states may be on their way back into this queue: left alone.)
                    Some(c) if c.state == ConversationState::Closed => {
                        self.store
                            .dequeue(&me.tenant_id, queue, &id)
                            .await
                            .map_err(store_failed)?;
                        continue;
                    }
                    // Such an entry whose closed record expired since: only one created longer
                    // ago than a closed record is kept can be that (an arrival is queued just
                    // before its record is saved, and an open record does not expire).
                    None if created_before(
                        &id,
                        now_ms.saturating_sub(self.closed_retention_ms()),
                    ) =>
                    {
                        info!(conversation_id = %id, "a queue entry of an expired conversation removed");
                        self.store
                            .dequeue(&me.tenant_id, queue, &id)
                            .await
                            .map_err(store_failed)?;
                        continue;
                    }
                    _ => continue,
                }
            };
            if !self.try_offer(waiter, source, now_ms).await? && fits_anyone(waiter) {
                // Nobody is free even for a waiter that takes any agent: nor for the rest. The
                // conversation this runs for is still tried: it may hold a reservation whose
                // offer was never published (which only it can turn into one).
                break;
            }
        }
        if !reached_me {
            self.try_offer(me, source, now_ms).await?;
        }
        Ok(())
    }

    /// Reserves the longest idle fitting agent and publishes the offer (applied by
    /// [`Self::on_offered`] in the conversation's order). False if nobody fits now.
    pub(crate) async fn try_offer(
        &self,
        c: &Conversation,
        source: &Event,
        now_ms: i64,
    ) -> Result<bool, HandleError> {
        let only = self.named_target(c).await?;
        let reserve = Reserve {
            conversation_id: c.conversation_id.clone(),
            media: CHAT_MEDIA.into(),
            // A transfer to a named agent goes to that agent whatever the rule's skills: the
            // agent handing over chose the colleague.
            skills: if only.is_some() {
                Vec::new()
            } else {
                c.routing.skills.clone()
            },
            exclude: c.declined_by.clone(),
            now_ms,
            only,
        };
        // `c` may be an older copy of a record closed meanwhile: the store refuses then, in the
        // reserve's own atomic step, and a close frees what was reserved before its save.
        let agent = match self.store.reserve_agent(&c.tenant_id, &reserve).await {
            Ok(Some(agent)) => agent,
            Ok(None) => return Ok(false),
            Err(StoreError::Closed(_)) => {
                debug!(conversation_id = %c.conversation_id, "closed meanwhile; no offer");
                return Ok(true);
            }
            Err(e) => return Err(store_failed(e)),
        };
        let attempt = c.routing.offers as usize + 1;
        let offer = ev::AgentOffered {
            offer_id: offer_id(&c.conversation_id, &agent, attempt),
            agent_id: agent.clone(),
            queue_id: c.queue_id.clone(),
            channel: Channel::WebChat,
            channel_id: None,
            customer_nickname: c.customer.nickname.clone(),
            // `now_ms` may be an event's time: saturating, an absurd one cannot wrap into an
            // offer that expired long ago (`on_offered` bounds it from above).
            expires_at: now_ms.saturating_add(
                i64::try_from(self.offer_timeout().as_millis()).unwrap_or(i64::MAX / 4),
            ),
            attempt: i32::try_from(attempt).unwrap_or(i32::MAX),
        };
        // One source may offer several conversations (a dispatch): the id names this one.
        let what = format!("offer/{}/{agent}/{attempt}", c.conversation_id);
        // A failed publish keeps the reservation: the retry (or the queued timer) reserves the
        // same agent again without taking more, and a close frees whatever the conversation
        // holds. Releasing here could free a slot another delivery reserved and offered.
        self.emit(AGENT_TOPIC, source, &c.conversation_id, &what, &offer)
            .await?;
        debug!(conversation_id = %c.conversation_id, agent = %agent, "offer published");
        Ok(true)
    }

    /// The agent a transfer named, while that agent takes chats: one who went not ready (or
    /// signed out, was deleted, or set no chat capacity) after the transfer was accepted
    /// would leave the chat waiting for nobody, so it falls back to the conversation's queue,
    /// as on a decline.
    async fn named_target(&self, c: &Conversation) -> Result<Option<String>, HandleError> {
        let Some(target) = &c.routing.target_agent else {
            return Ok(None);
        };
        let ready = self.takes_chats(&c.tenant_id, target).await?;
        if !ready {
            debug!(conversation_id = %c.conversation_id, agent = %target, "the named agent is not ready; offering the queue");
        }
        Ok(ready.then(|| target.clone()))
    }

    /// The agent's provisioned profile; `None` once it is deleted.
    async fn profile(
        &self,
        tenant: &str,
        agent: &str,
    ) -> Result<Option<directory::AgentProfile>, HandleError> {
        self.directory
            .agent(tenant, agent)
            .await
            .map_err(directory_failed)
    }

    /// Whether the agent is still provisioned.
    async fn agent_exists(&self, tenant: &str, agent: &str) -> Result<bool, HandleError> {
        Ok(self.profile(tenant, agent).await?.is_some())
    }

    /// Whether the agent is ready with a chat capacity above zero (full or not).
    async fn takes_chats(&self, tenant: &str, agent: &str) -> Result<bool, HandleError> {
        Ok(self
            .store
            .presence(tenant, agent)
            .await
            .map_err(store_failed)?
            .is_some_and(|p| p.ready && p.capacity.get(CHAT_MEDIA).is_some_and(|n| *n > 0)))
    }

    /// Sends one customer message to the conversation's bot and applies its answer: replies
    /// into the transcript, a handoff to a queue. A bot that is down hands the conversation to
    /// its queue, or, with `bot_fallback = "retry"`, leaves the message pending in the record
    /// and arms the bot timer ([`Self::on_bot_turn_due`] tries it again); a bot answering 429
    /// has its turn pending so in either mode, for as long as it asks (within the turn's
    /// deadline). The caller saves.
    ///
    /// Every try of one message, first or retried, from whichever event, acts as the same
    /// source ([`bot_turn_source`]): one idempotency key for the bot, one set of reply ids, so
    /// a turn repeated (a redelivered message whose retry already ran) adds nothing twice.
    async fn bot_turn(&self, c: &mut Conversation, e: &Event, m: &Entry) -> Step {
        let Some(bot_id) = c.bot_id.clone() else {
            return Ok(());
        };
        let source = bot_turn_source(e, m);
        let e = &source;
        let target = self
            .directory
            .bot(&c.tenant_id, &bot_id)
            .await
            .map_err(directory_failed)?;
        let Some(target) = target else {
            warn!(conversation_id = %c.conversation_id, bot = %bot_id, "the rule's bot does not exist; handing off");
            return self.hand_off(c, e, None, BTreeMap::new()).await;
        };
        let request = json!({
            "event": "message",
            "tenant_id": c.tenant_id,
            "conversation_id": c.conversation_id,
            "customer": {"participant_id": c.customer.participant_id, "nickname": c.customer.nickname},
            "user_data": c.user_data,
            "message": {"position": m.position, "message_id": m.entry.message_id, "text": m.entry.text},
        });
        let key = crate::events::chat::derived_id(&e.envelope.event_id, "bot").to_string();
        let timeout = std::time::Duration::from_millis(self.config.bot_timeout_ms);
        // Decided once: a redelivery of a turn that fell back to the queue (and told the
        // customer so) falls back again, even if the bot answers now.
        let fell_back = format!("bot-down:{}", e.envelope.event_id);
        let call = if self.decided(&fell_back).await? {
            None
        } else {
            let limits = super::bot::Limits {
                max_chars: self.max_message_chars,
                max_user_data_entries: self.max_user_data_entries,
                private_refused: !self.config.allow_private_bots,
            };
            let down = (c.tenant_id.clone(), bot_id.clone());
            let retrying = self.config.bot_fallback == super::config::BotFallback::Retry;
            if let Some(err) = self.bots_down.recently(&down).filter(|_| retrying) {
                // With `retry`, seen down a moment ago (by this pod): not called again until
                // the window ends, so a bot that times out holds few lanes, not one per chat
                // waiting on it. (With `queue`, every chat tries the bot once.)
                Some(Err(err))
            } else {
                let answer =
                    super::bot::call(&self.http, &target, &request, &key, timeout, limits).await;
                self.bots_down.note(&down, &answer);
                Some(answer)
            }
        };
        let turn = match call {
            Some(Ok(turn)) => turn,
            failed => {
                // The bot may have handed off through its API while its call hung: the queue
                // notice and hand-off below would act on a record no longer the bot's (a
                // notice pushed mid-conversation with an agent, an entry in another queue).
                if !self.still_with_bot(c, &bot_id).await? {
                    return Err(HandleError::Retry(format!(
                        "conversation {} left the bot while its call failed; applying again",
                        c.conversation_id
                    )));
                }
                if let Some(Err(err)) = &failed {
                    let retrying = self.config.bot_fallback == super::config::BotFallback::Retry;
                    // How long the turn may be tried again for, and the wait the bot asked.
                    let again = match err {
                        // Up but shedding load: waited for in either mode (see
                        // BOT_THROTTLED_QUEUE_MAX_S), and not a bot down.
                        super::bot::BotError::Throttled { retry_after, .. } => {
                            let budget_s = if retrying {
                                self.config.bot_retry_max_s
                            } else {
                                self.config.bot_retry_max_s.min(BOT_THROTTLED_QUEUE_MAX_S)
                            };
                            Some((budget_s, *retry_after))
                        }
                        super::bot::BotError::Down(_) if retrying => {
                            Some((self.config.bot_retry_max_s, None))
                        }
                        _ => None,
                    };
                    let outcome = match err {
                        super::bot::BotError::Throttled { .. } => "throttled",
                        _ => "failed",
                    };
                    metrics::counter!(crate::telemetry::metrics::BOT_CALLS_TOTAL, "outcome" => outcome)
                        .increment(1);
                    if let Some((budget_s, asked)) = again {
                        if self
                            .bot_pending(c, m, &err.to_string(), budget_s, asked)
                            .await?
                        {
                            return Ok(());
                        }
                    }
                    c.routing.bot_pending = None;
                    warn!(conversation_id = %c.conversation_id, error = %err, "bot unavailable; handing off to the queue");
                    self.decide(&fell_back).await?;
                }
                let notice = entry(
                    e,
                    EntryKind::Notice,
                    system(),
                    Some("Connecting you to an agent.".into()),
                );
                self.append(c, e, "bot-down", notice).await?;
                return self.hand_off(c, e, None, BTreeMap::new()).await;
            }
        };
        metrics::counter!(crate::telemetry::metrics::BOT_CALLS_TOTAL, "outcome" => "ok")
            .increment(1);
        if !self.still_with_bot(c, &bot_id).await? {
            // Applied again on the fresh record, where the message no longer goes to the bot.
            return Err(HandleError::Retry(format!(
                "conversation {} left the bot while it answered; applying again",
                c.conversation_id
            )));
        }
        if c.routing.bot_pending.as_ref().map(|p| p.position) == Some(m.position) {
            c.routing.bot_pending = None;
        }
        let bot = Party {
            participant_id: bot_id.clone(),
            nickname: target.name.clone(),
            kind: PartyKind::Bot,
        };
        for (i, reply) in turn.replies.iter().enumerate() {
            let what = format!("bot/{}/{i}", m.position);
            let mut new = entry(e, EntryKind::Message, bot.clone(), Some(reply.text.clone()));
            new.message_id =
                Some(crate::events::chat::derived_id(&e.envelope.event_id, &what).to_string());
            let r = self.append(c, e, &what, new).await?;
            let sent = ev::MessageSent {
                message_id: r.entry.message_id.clone().unwrap_or_default(),
                participant_id: bot_id.clone(),
                participant_kind: ParticipantKind::Bot,
                nickname: target.name.clone(),
                agent_id: None,
                kind: ev::MessageKind::Text,
                text: Some(reply.text.clone()),
                media_ids: Vec::new(),
                in_reply_to: m.entry.message_id.clone(),
                transcript_position: i64::try_from(r.position).ok(),
                visibility: ev::Visibility::All,
            };
            self.emit(
                INTERACTION_TOPIC,
                e,
                &c.conversation_id,
                &format!("message/{}", r.position),
                &sent,
            )
            .await?;
        }
        match turn.handoff {
            Some(h) => self.hand_off(c, e, h.queue_id, h.user_data).await,
            None => Ok(()),
        }
    }

    /// Whether the saved record is still with `bot_id`. A customer message's turn runs on the
    /// inbound lane while a handoff through the bot API (or a close) applies on the agent
    /// lane: a bot that hands off while its turn's call is out (before answering it) must not
    /// have that answer written after the handoff, for the customer and the agent to see. The
    /// caller's save would notice the change, but only after the replies went out. No record
    /// (a start not saved yet) is with nobody else.
    async fn still_with_bot(&self, c: &Conversation, bot_id: &str) -> Result<bool, HandleError> {
        let fresh = self
            .store
            .conversation(&c.tenant_id, &c.conversation_id)
            .await
            .map_err(store_failed)?;
        Ok(fresh.is_none_or(|f| {
            f.state == ConversationState::Bot && f.bot_id.as_deref() == Some(bot_id)
        }))
    }

    /// Keeps the customer message `m`, which the bot did not answer (down, or throttled:
    /// `asked` is its `Retry-After`), pending in `c` and arms the bot timer for its next try,
    /// at the latest `budget_s` after its first failed try; false once that has come (the
    /// conversation goes to its queue).
    async fn bot_pending(
        &self,
        c: &mut Conversation,
        m: &Entry,
        error: &str,
        budget_s: u64,
        asked: Option<std::time::Duration>,
    ) -> Result<bool, HandleError> {
        let now = chrono::Utc::now().timestamp_millis();
        let pending = match &mut c.routing.bot_pending {
            Some(p) if p.position == m.position => p,
            slot => slot.insert(BotPending {
                position: m.position,
                attempt: 0,
                since_ms: now,
            }),
        };
        pending.attempt = pending.attempt.saturating_add(1);
        let deadline = pending.since_ms.saturating_add(secs_ms(budget_s));
        let Some(due) = next_bot_try(now, deadline, pending.attempt, asked) else {
            return Ok(false);
        };
        warn!(conversation_id = %c.conversation_id, error, attempt = pending.attempt, retry_in_ms = due.saturating_sub(now), "bot did not answer; its turn is tried again later");
        self.store
            .schedule(&self.timer(BOT_TIMER, c), not_before_save(due))
            .await
            .map_err(store_failed)?;
        Ok(true)
    }

    /// A down bot's turn is due again ([`Self::bot_pending`]): the pending customer message goes
    /// to the bot; once answered, the next customer message that came meanwhile (if any) is
    /// pending in turn, due at once, so the bot gets them one at a time in transcript order.
    /// A turn due for another message or try (a timer fired twice, a turn applied since) is
    /// stale and ignored.
    pub(super) async fn on_bot_turn_due(&self, e: &Event, b: ev::BotTurnDue) -> Step {
        let Some(mut c) = self.load(e).await? else {
            return Ok(());
        };
        let due = c.routing.bot_pending.clone();
        let current = due.as_ref().is_some_and(|p| {
            i64::try_from(p.position).ok() == Some(b.position)
                && i64::from(p.attempt) == i64::from(b.attempt)
        });
        if c.routing.was_applied(&e.envelope.event_id.to_string())
            || c.state != ConversationState::Bot
            || c.bot_id.as_deref() != Some(b.bot_id.as_str())
            || !current
        {
            debug!(conversation_id = %c.conversation_id, position = b.position, attempt = b.attempt, "stale bot turn ignored");
            return Ok(());
        }
        let Some(pending) = due else {
            return Ok(());
        };
        let message = self
            .store
            .transcript(&c.tenant_id, &c.conversation_id, pending.position, 1)
            .await
            .map_err(store_failed)?
            .into_iter()
            .find(|m| m.position == pending.position);
        match message {
            Some(m) => self.bot_turn(&mut c, e, &m).await?,
            // Gone (the store dropped the transcript): nothing left to answer.
            None => c.routing.bot_pending = None,
        }
        if c.state == ConversationState::Bot && c.routing.bot_pending.is_none() {
            if let Some(next) = self.next_customer_message(&c, pending.position).await? {
                c.routing.bot_pending = Some(BotPending {
                    position: next,
                    attempt: 0,
                    since_ms: chrono::Utc::now().timestamp_millis(),
                });
                self.store
                    .schedule(&self.timer(BOT_TIMER, &c), not_before_save(0))
                    .await
                    .map_err(store_failed)?;
            }
        }
        self.save_queued(&mut c, e).await
    }

    /// The position of the first customer message after `after`, if any.
    async fn next_customer_message(
        &self,
        c: &Conversation,
        after: u64,
    ) -> Result<Option<u64>, HandleError> {
        const PAGE: usize = 100;
        let mut from = after.saturating_add(1);
        loop {
            let page = self
                .store
                .transcript(&c.tenant_id, &c.conversation_id, from, PAGE)
                .await
                .map_err(store_failed)?;
            if let Some(m) = page.iter().find(|m| {
                m.entry.kind == EntryKind::Message && m.entry.from.kind == PartyKind::Customer
            }) {
                return Ok(Some(m.position));
            }
            match page.last() {
                Some(last) if page.len() == PAGE => from = last.position.saturating_add(1),
                _ => return Ok(None),
            }
        }
    }

    /// From the bot to a queue (the one given, if it exists, else the rule's), with the bot's
    /// context added to the user data.
    async fn hand_off(
        &self,
        c: &mut Conversation,
        e: &Event,
        queue: Option<String>,
        context: BTreeMap<String, String>,
    ) -> Step {
        if let Some(q) = queue {
            // A bot's answer names any string: one no queue can have (a NUL, which PostgreSQL
            // refuses in a query, failing the lookup on every retry) is unknown without asking.
            if plain_id(&q)
                && self
                    .directory
                    .queue_exists(&c.tenant_id, &q)
                    .await
                    .map_err(directory_failed)?
            {
                c.queue_id = Some(q);
            } else {
                warn!(conversation_id = %c.conversation_id, queue = %q, "bot handoff to an unknown queue; using the rule's");
            }
        }
        let merged = crate::stores::session::merge_user_data(&c.user_data, &context, &[]);
        if merged.len() > self.max_user_data_entries.max(c.user_data.len()) {
            // The record stays bounded, as for the customer's updates; the handoff goes on.
            warn!(conversation_id = %c.conversation_id, entries = merged.len(), "a bot's handoff context would take the user data past its limit; not added");
        } else {
            c.user_data = merged;
        }
        c.state = ConversationState::Queued;
        c.routing.bot_pending = None;
        info!(conversation_id = %c.conversation_id, queue = ?c.queue_id, "bot handed off");
        self.wait_in_queue(c, e).await
    }

    pub(super) async fn on_offered(&self, e: &Event, b: ev::AgentOffered) -> Step {
        let tenant = &e.envelope.tenant_id;
        // The agent topic is not ordered with the inbound one: the request that created the
        // conversation, or the bot handoff that queued it (it publishes its offer before it
        // saves the record Queued), may still be in flight. Wait for it a while, then give up.
        // An offer dated further ahead than clocks disagree has no age to wait on: waited
        // for, it would hold the conversation's lane until its date (a retry that does not
        // count as a failure never dead-letters it); given up at once, its slot is freed and
        // the waiter's queued timer offers again.
        let young = |wait: i64| {
            let now = chrono::Utc::now().timestamp_millis();
            event_time::age(e.envelope.occurred_at_ms, now).is_some_and(|age| age < wait)
        };
        // Waiting for another topic's write, which usually lands within milliseconds: tried
        // again soon, not after the doubling backoff of a failure (up to `retry_max_ms` while
        // the lane waits), and not counted as the event's failure.
        let wait_for = |what: &str| HandleError::RetryLater {
            reason: format!("offer of a {what} not saved yet"),
            not_before_ms: chrono::Utc::now().timestamp_millis() + WAIT_FOR_SAVE_MS,
            counts: false,
        };
        let Some(mut c) = self.load(e).await? else {
            if young(OFFER_WAITS_FOR_CONVERSATION_MS) {
                return Err(wait_for("conversation"));
            }
            return self.release(tenant, &b.agent_id, e).await;
        };
        if c.state == ConversationState::Bot && young(OFFER_WAITS_FOR_HANDOFF_MS) {
            // Taken for stale, its slot would be freed while the handoff's offer (or a
            // dispatch's, reusing that slot) goes on to apply: an agent over capacity.
            return Err(wait_for("bot handoff"));
        }
        if c.routing.was_applied(&e.envelope.event_id.to_string())
            || c.routing.offer_id.as_deref() == Some(b.offer_id.as_str())
        {
            return Ok(());
        }
        // An offer of an earlier attempt (a duplicate arriving after its agent rejected or let
        // it lapse) is stale; its slot was freed then, and a close frees anything left.
        let attempt = u32::try_from(b.attempt).unwrap_or(0);
        if c.state == ConversationState::Queued {
            let declined = c.declined_by.iter().any(|a| a == &b.agent_id);
            if declined || attempt != c.routing.offers.saturating_add(1) {
                debug!(conversation_id = %c.conversation_id, agent = %b.agent_id, attempt, "stale offer ignored");
                if declined {
                    // Reserved again from an older copy of the record: no offer to an agent
                    // who declined is ever applied, so nothing else would free the slot. (An
                    // agent not declined may be reserved for the next offer: kept.)
                    self.release(tenant, &b.agent_id, e).await?;
                }
                return Ok(());
            }
        }
        if c.state != ConversationState::Queued {
            // Stale: the conversation moved on since the agent was reserved for it. A closed
            // one holds no slot (its close freed the ones it knew of; releasing is idempotent).
            let me = Some(b.agent_id.as_str());
            let holds = c.state != ConversationState::Closed
                && (c.agent_id.as_deref() == me
                    || c.offered_to.as_deref() == me
                    || c.routing.consultant.as_deref() == me
                    || c.routing.consult_invited.as_deref() == me);
            if !holds {
                self.release(tenant, &b.agent_id, e).await?;
            }
            if c.state == ConversationState::Closed
                && attempt == c.routing.offers.saturating_add(1)
                && c.routing.closed_offer_to.as_deref() != me
            {
                // The offer the chat was waiting for when it closed: its push may have
                // reached the desk before its save lost to the close, which named no offered
                // agent. Withdrawn by its id: a desk that never got it ignores this.
                let client = notify::offer_closed(
                    &b.agent_id,
                    &c.conversation_id,
                    Some(&b.offer_id),
                    "closed",
                );
                // Not "client": the id of the offer's own push, which this event's first
                // try may have made.
                self.emit(
                    DELIVERY_TOPIC,
                    e,
                    &c.conversation_id,
                    "client/offer-closed",
                    &client,
                )
                .await?;
            }
            return Ok(());
        }
        // The offer's slot: normally taken by the reserve the offer was made from. A handler
        // that gave the offer up as stale (waiting too long for the record) frees it while a
        // retry of the offer's maker, reusing that reservation, may still publish this offer:
        // taken again here, or, with the agent full by now, the offer is not applied (the
        // conversation stays queued; its timer offers it again).
        let holders = self
            .store
            .slot_holders(tenant, &c.conversation_id)
            .await
            .map_err(store_failed)?;
        if !holders.contains(&b.agent_id) {
            let reserve = Reserve {
                conversation_id: c.conversation_id.clone(),
                media: CHAT_MEDIA.into(),
                skills: Vec::new(),
                exclude: Vec::new(),
                only: Some(b.agent_id.clone()),
                now_ms: e.envelope.occurred_at_ms,
            };
            match self.store.reserve_agent(tenant, &reserve).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(StoreError::Closed(_)) => {
                    debug!(conversation_id = %c.conversation_id, agent = %b.agent_id, "the offer's slot is gone and the agent is full; not applied");
                    return Ok(());
                }
                Err(e) => return Err(store_failed(e)),
            }
        }
        // The agent gets the whole timeout from when the offer reaches it: an offer made from
        // an event that waited in a backlog would otherwise lapse at once (and, with
        // `not_ready_on_lapse`, set an agent who never had a chance not ready).
        let now = chrono::Utc::now().timestamp_millis();
        let timeout = i64::try_from(self.offer_timeout().as_millis()).unwrap_or(i64::MAX / 4);
        let expires_at = offer_expiry(b.expires_at, now, timeout);
        c.state = ConversationState::Offered;
        c.offered_to = Some(b.agent_id.clone());
        c.routing.offer_id = Some(b.offer_id.clone());
        c.routing.offer_expires_at_ms = Some(expires_at);
        c.routing.offers = c.routing.offers.saturating_add(1);
        if c.routing.target_agent.as_deref() != Some(b.agent_id.as_str()) {
            // The named agent went not ready and the queue's agent took over.
            c.routing.target_agent = None;
        }
        if let Some(queue) = &c.queue_id {
            self.store
                .dequeue(tenant, queue, &c.conversation_id)
                .await
                .map_err(store_failed)?;
        }
        self.store
            .schedule(&self.timer(OFFER_TIMER, &c), not_before_save(expires_at))
            .await
            .map_err(store_failed)?;
        let offer = json!({
            "type": "offer",
            "conversation_id": c.conversation_id,
            "offer_id": b.offer_id,
            "queue_id": c.queue_id,
            "nickname": c.customer.nickname,
            "subject": c.subject,
            "user_data": c.user_data,
            "expires_at": expires_at,
        });
        // A queued conversation has nobody in it: any other agent holding a slot for it was
        // reserved for an offer never made (a publish that failed, then a transfer named
        // someone else), and would keep that slot until the conversation closes. Freed before
        // the save, so a redelivery, which stops at the saved offer, has nothing left to free;
        // a dispatch that reserves one after the read above makes a stale offer, whose handler
        // frees it.
        for holder in holders {
            if holder != b.agent_id {
                self.release(tenant, &holder, e).await?;
            }
        }
        let client = notify::to_agent(&b.agent_id, ClientEventKind::Offer, offer);
        self.emit(DELIVERY_TOPIC, e, &c.conversation_id, "client", &client)
            .await?;
        self.save(&mut c, e).await
    }

    pub(super) async fn on_accepted(&self, e: &Event, b: ev::AgentAccepted) -> Step {
        let Some(mut c) = self.load(e).await? else {
            return Ok(());
        };
        if c.routing.was_applied(&e.envelope.event_id.to_string()) {
            // Saved before it was told (see below): a redelivery tells it again, under the
            // same ids, while the agent is still there and the chat live (a closed one takes
            // no entry, the store refuses it, and its desks were told it closed).
            let role = if c.state != ConversationState::Connected {
                return Ok(());
            } else if c.routing.consultant.as_deref() == Some(b.agent_id.as_str()) {
                Some("consultant")
            } else if c.agent_id.as_deref() == Some(b.agent_id.as_str()) {
                None
            } else {
                return Ok(());
            };
            return self.agent_joins(&c, e, &b, role).await;
        }
        let consult = is_consult_offer(&c, &b.agent_id, &b.offer_id);
        let current = c.state == ConversationState::Offered
            && c.offered_to.as_deref() == Some(b.agent_id.as_str())
            && c.routing.offer_id.as_deref() == Some(b.offer_id.as_str());
        if (consult || current) && !self.agent_exists(&c.tenant_id, &b.agent_id).await? {
            // Deleted, accepting with a token an edge still had cached: the chat does not go
            // to a desk nobody will answer again; the offer lapses to the next agent.
            info!(conversation_id = %c.conversation_id, agent = %b.agent_id, "an accept by a deleted agent; the offer lapses");
            let client = notify::offer_closed(
                &b.agent_id,
                &c.conversation_id,
                Some(&b.offer_id),
                "agent_deleted",
            );
            return self
                .emit(DELIVERY_TOPIC, e, &c.conversation_id, "client", &client)
                .await;
        }
        if consult {
            return self.join_consultant(c, e, b).await;
        }
        let me = Some(b.agent_id.as_str());
        if !current
            && c.state == ConversationState::Connected
            && (c.agent_id.as_deref() == me || c.routing.consultant.as_deref() == me)
        {
            // The agent is in already: a retried accept (a new event id each time, say after a
            // lost 202). An `offer_closed` now would tell its desk to drop a chat it holds.
            debug!(conversation_id = %c.conversation_id, "an accept from an agent already in the conversation; nothing to do");
            return Ok(());
        }
        if !current {
            let client = notify::offer_closed(
                &b.agent_id,
                &c.conversation_id,
                Some(&b.offer_id),
                "not_current",
            );
            return self
                .emit(DELIVERY_TOPIC, e, &c.conversation_id, "client", &client)
                .await;
        }
        c.state = ConversationState::Connected;
        c.agent_id = Some(b.agent_id.clone());
        c.routing.agent_nickname = Some(b.nickname.clone());
        c.offered_to = None;
        self.store
            .cancel(&self.timer(OFFER_TIMER, &c))
            .await
            .map_err(store_failed)?;
        // Saved before anyone is told: a customer who sees the agent join and writes at once
        // has that message handled on a record that names the agent, so the agent gets it.
        self.save(&mut c, e).await?;
        self.agent_joins(&c, e, &b, None).await
    }

    pub(super) async fn on_rejected(&self, e: &Event, b: ev::AgentRejected) -> Step {
        let Some(mut c) = self.load(e).await? else {
            return Ok(());
        };
        if c.routing.was_applied(&e.envelope.event_id.to_string()) {
            return Ok(());
        }
        if is_consult_offer(&c, &b.agent_id, &b.offer_id) {
            let reason = if b.reason == ev::RejectReason::Timeout {
                "TIMEOUT"
            } else {
                "DECLINED"
            };
            return self.drop_consultant(c, e, &b.agent_id, Some(reason)).await;
        }
        let current = c.state == ConversationState::Offered
            && c.offered_to.as_deref() == Some(b.agent_id.as_str())
            && c.routing.offer_id.as_deref() == Some(b.offer_id.as_str());
        if !current {
            return Ok(());
        }
        info!(conversation_id = %c.conversation_id, agent = %b.agent_id, reason = ?b.reason, "offer declined; next agent");
        let not_responding =
            b.reason == ev::RejectReason::Timeout && self.config.not_ready_on_lapse;
        // Decided once per lapse: a retry of this event (its save lost to another write, or
        // the worker died after telling the desk) must not set not ready again an agent who,
        // told of the lapse, said ready meanwhile.
        let lapse = format!("not-responding:{}", e.envelope.event_id);
        let set_not_ready = not_responding && !self.decided(&lapse).await?;
        if set_not_ready {
            // Not ready before its slot frees, so no dispatch (this one, or another worker's)
            // offers the next chat to the desk nobody answers.
            self.set_not_ready(&c.tenant_id, &b.agent_id).await?;
        }
        self.release(&c.tenant_id, &b.agent_id, e).await?;
        c.state = ConversationState::Queued;
        c.offered_to = None;
        c.routing.offer_id = None;
        // A transfer to a named agent who declined falls back to the conversation's queue.
        c.routing.target_agent = None;
        if !c.declined_by.contains(&b.agent_id) {
            c.declined_by.push(b.agent_id.clone());
        }
        self.store
            .cancel(&self.timer(OFFER_TIMER, &c))
            .await
            .map_err(store_failed)?;
        let client =
            notify::offer_closed(&b.agent_id, &c.conversation_id, Some(&b.offer_id), b.reason);
        self.emit(DELIVERY_TOPIC, e, &c.conversation_id, "client", &client)
            .await?;
        if set_not_ready {
            // Redirect on no answer: the agent takes no more offers until it says ready. The
            // agent event (keyed by the agent, ordered with its own ready / not ready) tells
            // its desks and every other consumer of agent states.
            let not_ready = ev::AgentStateChanged {
                agent_id: b.agent_id.clone(),
                state: ev::AgentState::NotReady,
                reason_code: Some(NOT_RESPONDING.into()),
                capacity: BTreeMap::new(),
            };
            self.emit(AGENT_TOPIC, e, &b.agent_id, "not-responding", &not_ready)
                .await?;
            // Recorded once the desks are told: a retry before this point does it all again.
            self.decide(&lapse).await?;
        }
        self.wait_in_queue(&c, e).await?;
        self.save(&mut c, e).await
    }

    /// Sets a ready agent not ready in the routing state, keeping its skills and capacity.
    async fn set_not_ready(&self, tenant: &str, agent: &str) -> Step {
        // Only readiness: a profile applied meanwhile (keyed by the agent, not ordered with
        // this conversation's events) stays.
        self.store
            .change_presence(tenant, agent, &PresenceChange::NotReady)
            .await
            .map(|_| ())
            .map_err(store_failed)
    }

    pub(super) async fn on_customer_message(&self, e: &Event, b: ev::MessageReceived) -> Step {
        let Some(mut c) = self.sending_to(e).await? else {
            return Ok(());
        };
        let closed = c.state == ConversationState::Closed;
        let from = Party {
            participant_id: b.participant_id.clone(),
            nickname: b
                .nickname
                .clone()
                .unwrap_or_else(|| c.customer.nickname.clone()),
            kind: party_kind(b.participant_kind),
        };
        let kind = match b.kind {
            ev::MessageKind::CustomNotice => EntryKind::CustomNotice,
            ev::MessageKind::Notice => EntryKind::Notice,
            _ => EntryKind::Message,
        };
        let message_id = b
            .client_message_id
            .clone()
            .unwrap_or_else(|| b.message_id.clone());
        let entries = message_entries(e, kind, &from, b.text.as_ref(), &b.media_ids);
        let with_bot = c.state == ConversationState::Bot;
        let Some(appended) = self.append_message(&c, e, entries, &message_id).await? else {
            return Ok(());
        };
        let mut first = None;
        for (i, (what, m)) in appended.into_iter().enumerate() {
            if i == 0 {
                // The sockets and the interaction stream are separate topics: published at
                // once, each keeps its own per-conversation order.
                futures::try_join!(
                    self.notify_entry(&c, e, &what, &m),
                    self.emit_customer_message(e, &c, &m, Some(&b)),
                )?;
                first = Some(m);
            } else {
                self.notify_entry(&c, e, &what, &m).await?;
            }
        }
        if closed {
            // Only the events of what was stored before the close were published again.
            return Ok(());
        }
        if let Some(m) = first {
            // With a turn pending (the bot down), this message waits its turn behind it.
            if with_bot && m.entry.kind == EntryKind::Message && c.routing.bot_pending.is_none() {
                self.bot_turn(&mut c, e, &m).await?;
            }
        }
        // A text message changes a live chat's record only through a bot turn, so outside one
        // nothing is saved: a redelivery appends nothing twice (appends dedup by event id) and
        // republishes the same event ids. Async chats save their last activity (idle timer).
        if !c.routing.is_async && b.media_ids.is_empty() && !with_bot {
            return Ok(());
        }
        let files = u32::try_from(b.media_ids.len()).unwrap_or(u32::MAX);
        c.files = c.files.saturating_add(files);
        let now = chrono::Utc::now().timestamp_millis();
        c.last_activity_ms = latest_activity(c.last_activity_ms, e.envelope.occurred_at_ms, now);
        self.arm_idle(&c).await?;
        if with_bot {
            // Queued if the bot handed off (only then: a waiter's messages must not keep
            // moving its queued timer on).
            return self.save_queued(&mut c, e).await;
        }
        self.save(&mut c, e).await
    }

    async fn emit_customer_message(
        &self,
        e: &Event,
        c: &Conversation,
        m: &Entry,
        original: Option<&ev::MessageReceived>,
    ) -> Step {
        let body = ev::MessageReceived {
            // The edge's id, a UUID as the schema wants; the entry's may be the client's own
            // (any string), which travels as `client_message_id`.
            message_id: original
                .map(|o| o.message_id.clone())
                .unwrap_or_else(|| m.entry.event_id.clone()),
            client_message_id: original.and_then(|o| o.client_message_id.clone()),
            channel: Channel::WebChat,
            channel_id: None,
            participant_id: m.entry.from.participant_id.clone(),
            participant_kind: ParticipantKind::Customer,
            nickname: Some(m.entry.from.nickname.clone()),
            contact: original.map(|o| o.contact.clone()).unwrap_or_default(),
            kind: ev::MessageKind::Text,
            text: m.entry.text.clone(),
            media_ids: original.map(|o| o.media_ids.clone()).unwrap_or_default(),
            sent_at: Some(m.entry.at_ms),
            transcript_position: i64::try_from(m.position).ok(),
        };
        let what = format!("message/{}", m.position);
        self.emit(INTERACTION_TOPIC, e, &c.conversation_id, &what, &body)
            .await
    }

    pub(super) async fn on_agent_message(&self, e: &Event, b: ev::MessageSent) -> Step {
        let Some(c) = self.sending_to(e).await? else {
            return Ok(());
        };
        // On a closed conversation the store decides (see `send_entry`): an entry this event
        // stored passed these checks when it did.
        let open = c.state != ConversationState::Closed;
        let sender = b.agent_id.as_deref();
        if open
            && b.participant_kind == ParticipantKind::Agent
            && (sender.is_none()
                || (c.agent_id.as_deref() != sender && c.routing.consultant.as_deref() != sender))
        {
            warn!(conversation_id = %c.conversation_id, "a message from an agent not connected; dropped");
            return Ok(());
        }
        // The bot API: only the bot the conversation is with, and only until it hands off.
        if open
            && b.participant_kind == ParticipantKind::Bot
            && (c.state != ConversationState::Bot
                || c.bot_id.as_deref() != Some(b.participant_id.as_str()))
        {
            warn!(conversation_id = %c.conversation_id, "a message from a bot the conversation is not with; dropped");
            return Ok(());
        }
        let from = Party {
            participant_id: b.participant_id.clone(),
            nickname: b.nickname.clone(),
            kind: party_kind(b.participant_kind),
        };
        let kind = match b.kind {
            ev::MessageKind::Notice => EntryKind::Notice,
            ev::MessageKind::CustomNotice => EntryKind::CustomNotice,
            _ => EntryKind::Message,
        };
        // A private consultant writes to agents only, whatever its request said.
        let agents_only = b.visibility.agents_only()
            || (b.participant_kind == ParticipantKind::Agent && private_consultant(&c, sender));
        if agents_only && !b.media_ids.is_empty() {
            // A file is downloadable by the customer (the edge refuses such uploads).
            warn!(conversation_id = %c.conversation_id, "a file for agents only; dropped");
            return Ok(());
        }
        let mut entries = message_entries(e, kind, &from, b.text.as_ref(), &b.media_ids);
        if agents_only {
            for (_, new) in &mut entries {
                new.set_agents_only();
            }
        }
        let Some(appended) = self.append_message(&c, e, entries, &b.message_id).await? else {
            return Ok(());
        };
        let mut appended = appended.into_iter();
        let Some((what, m)) = appended.next() else {
            return Ok(());
        };
        let body = ev::MessageSent {
            transcript_position: i64::try_from(m.position).ok(),
            visibility: visibility_of(&m),
            ..b
        };
        let emitted = format!("message/{}", m.position);
        // Separate topics, each ordered per conversation on its own: published at once.
        futures::try_join!(
            self.notify_entry(&c, e, &what, &m),
            self.emit(INTERACTION_TOPIC, e, &c.conversation_id, &emitted, &body),
        )?;
        for (what, m) in appended {
            self.notify_entry(&c, e, &what, &m).await?;
        }
        Ok(())
    }

    /// Appends a message's entries, each under its own message id (appends dedup on it): the
    /// message's, then `{id}/1`, `{id}/2`… `None` when its first entry was there already (a
    /// retry): all of it was applied before. A later entry whose derived id was taken (a
    /// client's own id such as `x/1`) is left out; the message's other files still go in.
    async fn append_message(
        &self,
        c: &Conversation,
        e: &Event,
        entries: Vec<(String, NewEntry)>,
        message_id: &str,
    ) -> Result<Option<Vec<(String, Entry)>>, HandleError> {
        let mut appended = Vec::with_capacity(entries.len());
        for (i, (what, mut new)) in entries.into_iter().enumerate() {
            new.message_id = Some(if i == 0 {
                message_id.to_string()
            } else {
                format!("{message_id}/{i}")
            });
            match self.send_entry(c, e, &what, new).await? {
                Some(m) => appended.push((what, m)),
                None if i == 0 => return Ok(None),
                None => {}
            }
        }
        Ok(Some(appended))
    }

    pub(super) async fn on_typing(&self, e: &Event, b: ev::TypingIndicated) -> Step {
        let Some(c) = self.open_conversation(e).await? else {
            return Ok(());
        };
        let kind = match b.state {
            ev::TypingState::Stopped => EntryKind::TypingStopped,
            _ => EntryKind::TypingStarted,
        };
        let sender = Some(b.participant_id.as_str());
        let nickname = match b.participant_kind {
            // Only the agents in the conversation type into it (as for their messages).
            ParticipantKind::Agent if c.agent_id.as_deref() == sender => c
                .routing
                .agent_nickname
                .clone()
                .unwrap_or_else(|| b.participant_id.clone()),
            ParticipantKind::Agent if c.routing.consultant.as_deref() == sender => c
                .routing
                .consultant_nickname
                .clone()
                .unwrap_or_else(|| b.participant_id.clone()),
            ParticipantKind::Bot
                if c.state == ConversationState::Bot && c.bot_id.as_deref() == sender =>
            {
                b.participant_id.clone()
            }
            ParticipantKind::Customer | ParticipantKind::Unknown => c.customer.nickname.clone(),
            _ => {
                warn!(conversation_id = %c.conversation_id, "typing from a participant not in the conversation; dropped");
                return Ok(());
            }
        };
        let from = Party {
            participant_id: b.participant_id.clone(),
            nickname,
            kind: party_kind(b.participant_kind),
        };
        let mut new = entry(e, kind, from, None);
        if b.participant_kind == ParticipantKind::Agent && private_consultant(&c, sender) {
            new.set_agents_only();
        }
        self.append(&c, e, "typing", new).await.map(|_| ())
    }

    /// A read receipt: an entry with the position read, for the agent to see.
    pub(super) async fn on_receipt(&self, e: &Event, b: ev::ReceiptReceived) -> Step {
        let Some(c) = self.open_conversation(e).await? else {
            return Ok(());
        };
        let from = Party {
            participant_id: b.participant_id.clone(),
            nickname: c.customer.nickname.clone(),
            kind: party_kind(b.participant_kind),
        };
        let mut new = entry(e, EntryKind::ReadReceipt, from, None);
        if let Some(p) = b.transcript_position {
            new.data.insert("position".into(), p.to_string());
        }
        if let Some(m) = &b.message_id {
            new.data.insert("message_id".into(), m.clone());
        }
        self.append(&c, e, "receipt", new).await.map(|_| ())
    }

    /// User data set or removed by the customer: merged into the conversation and recorded.
    pub(super) async fn on_user_data(&self, e: &Event, b: ev::UserDataUpdated) -> Step {
        let Some(mut c) = self.open_conversation(e).await? else {
            return Ok(());
        };
        let merged =
            crate::stores::session::merge_user_data(&c.user_data, &b.user_data, &b.removed_keys);
        if merged.len() > self.max_user_data_entries.max(c.user_data.len()) {
            // Concurrent updates that each passed the edge's check: the record stays bounded.
            warn!(conversation_id = %c.conversation_id, entries = merged.len(), "a user-data update past the limit; dropped");
            return Ok(());
        }
        let from = Party {
            participant_id: b.participant_id.clone(),
            nickname: c.customer.nickname.clone(),
            kind: party_kind(b.participant_kind),
        };
        let mut new = entry(e, EntryKind::UserDataUpdated, from, None);
        new.data = b.user_data.clone();
        self.append(&c, e, "user-data", new).await?;
        c.user_data = merged;
        self.save(&mut c, e).await
    }

    pub(super) async fn on_customer_left(&self, e: &Event, b: ev::ParticipantLeft) -> Step {
        let reason = if b.reason == ev::LeftReason::Timeout {
            ev::CloseReason::IdleTimeout
        } else {
            ev::CloseReason::CustomerLeft
        };
        let Some(mut c) = self
            .closing(e, reason, Some(&b.participant_id), &Leaving::Customer)
            .await?
        else {
            return Ok(());
        };
        // Checked on a still-open conversation only, so a redelivered close the worker saved
        // but did not announce is announced (by `closing`) whatever the customer does since;
        // and decided once, so a retry (a lost compare-and-set) of a close that already freed
        // the agent cannot turn back.
        if b.reason == ev::LeftReason::Disconnected && self.customer_is_back(e).await? {
            info!(conversation_id = %c.conversation_id, "the customer came back before the abandoned chat closed; kept open");
            // The timer that published this close is done: watch the customer again.
            let again = chrono::Utc::now().timestamp_millis()
                + (secs_ms(self.config.abandon_timeout_s) / 4).max(1_000);
            return self
                .store
                .schedule(&self.timer(ABANDON_TIMER, &c), again)
                .await
                .map_err(store_failed);
        }
        if reason == ev::CloseReason::IdleTimeout {
            // The idle timer read the record before it published this; a message the customer
            // sent meanwhile is ahead of it on the same topic and has been applied by now.
            let close_at = idle_close_at(
                c.last_activity_ms,
                self.config.idle_timeout_s,
                self.config.close_grace_s,
            );
            if e.envelope.occurred_at_ms < close_at {
                info!(conversation_id = %c.conversation_id, "the customer came back before the idle close; kept open");
                return Ok(());
            }
        }
        let by = Some(b.participant_id);
        self.close(&mut c, e, reason, by, &Leaving::Customer).await
    }

    /// Whether the customer of `e`'s live chat showed a sign of life since the abandon timer
    /// found none (edges refreshed its mark in between). Once answered no for `e`, always no.
    async fn customer_is_back(&self, e: &Event) -> Result<bool, HandleError> {
        let decided = format!("abandoned:{}", e.envelope.event_id);
        if self.decided(&decided).await? {
            return Ok(false);
        }
        let mark = customer_mark(&e.envelope.tenant_id, &e.envelope.conversation_id);
        if self.store.seen(&mark).await.map_err(store_failed)? {
            return Ok(true);
        }
        self.decide(&decided).await?;
        Ok(false)
    }

    pub(super) async fn on_completed(&self, e: &Event, b: ev::ConversationCompleted) -> Step {
        // Ours: a deleted agent's conversation that no queue takes back (see `hand_back`), a
        // system close that no participant made.
        let (completed, by) = if e.envelope.producer == super::PRODUCER {
            (ev::CloseReason::System, None)
        } else {
            (
                ev::CloseReason::AgentCompleted,
                Some(b.participant_id.as_str()),
            )
        };
        let leaving = Leaving::Agent {
            participant_id: b.participant_id.clone(),
            agent_id: b.agent_id.clone(),
        };
        let Some(mut c) = self.closing(e, completed, by, &leaving).await? else {
            return Ok(());
        };
        if c.routing.consultant.as_deref() == Some(b.agent_id.as_str()) {
            // A consultant's completion ends its part only.
            return self.drop_consultant(c, e, &b.agent_id, None).await;
        }
        if c.agent_id.as_deref() != Some(b.agent_id.as_str()) {
            warn!(conversation_id = %c.conversation_id, agent = %b.agent_id, "completion by an agent not connected; ignored");
            return Ok(());
        }
        // The disposition (a wrap-up code) stays off the transcript the customer reads; GWS
        // gets it from the completion event.
        c.user_data.extend(b.user_data.clone());
        self.close(&mut c, e, completed, by.map(str::to_string), &leaving)
            .await
    }

    /// A connected agent hands the conversation to a queue or a named agent: the agent leaves,
    /// the conversation waits again and is offered (to that agent only, for a named one).
    pub(super) async fn on_transfer(&self, e: &Event, b: ev::TransferRequested) -> Step {
        // None: closed, gone, or this request applied before (see `withdraw_consult`).
        let Some(mut c) = self.open_conversation(e).await? else {
            return self.withdraw_consult(e, &b).await;
        };
        if c.state == ConversationState::Bot {
            // A handoff through the bot API: the requester is the bot.
            if c.bot_id.as_deref() != Some(b.agent_id.as_str()) {
                warn!(conversation_id = %c.conversation_id, "handoff by a bot the conversation is not with; ignored");
                return Ok(());
            }
            self.hand_off(&mut c, e, Some(b.target_id), b.user_data)
                .await?;
            return self.save_queued(&mut c, e).await;
        }
        if c.state != ConversationState::Connected || c.agent_id.as_deref() != Some(&b.agent_id) {
            if e.envelope.producer == super::PRODUCER {
                // A deleted agent's hand-back of a chat it was only offered: nothing to do.
                debug!(conversation_id = %c.conversation_id, agent = %b.agent_id, "hand-back of a chat not connected to the agent; nothing to do");
            } else {
                warn!(conversation_id = %c.conversation_id, agent = %b.agent_id, "transfer by an agent not connected; ignored");
            }
            return Ok(());
        }
        if self.decided(&refused_key(e)).await? {
            // Refused and told so: a redelivery must not go ahead because the target is
            // available by now.
            return Ok(());
        }
        if matches!(
            b.mode,
            ev::TransferMode::Conference | ev::TransferMode::Consult
        ) {
            return self.invite_consultant(c, e, b).await;
        }
        let tenant = c.tenant_id.clone();
        let in_consult = c.routing.consultant.is_some() || c.routing.consult_invited.is_some();
        let refused = match b.target_kind {
            // The consultant would be left holding a conversation nobody owns.
            _ if in_consult => Some("CONSULT_IN_PROGRESS"),
            ev::TargetKind::Queue => {
                if self
                    .directory
                    .queue_exists(&tenant, &b.target_id)
                    .await
                    .map_err(directory_failed)?
                {
                    c.queue_id = Some(b.target_id.clone());
                    c.routing.target_agent = None;
                    None
                } else {
                    Some("QUEUE_NOT_FOUND")
                }
            }
            ev::TargetKind::Agent if b.target_id == b.agent_id => Some("SAME_AGENT"),
            ev::TargetKind::Agent => {
                let known = self
                    .directory
                    .agent(&tenant, &b.target_id)
                    .await
                    .map_err(directory_failed)?
                    .is_some();
                // Only that agent is offered the conversation: one who takes no chats (not
                // ready, signed out) would leave it waiting for nobody, so the agent keeps it.
                let ready = known && self.takes_chats(&tenant, &b.target_id).await?;
                if !known {
                    Some("AGENT_NOT_FOUND")
                } else if !ready {
                    Some("AGENT_NOT_AVAILABLE")
                } else {
                    c.routing.target_agent = Some(b.target_id.clone());
                    None
                }
            }
            _ => Some("UNSUPPORTED_TARGET"),
        };
        // Decided once: a retry (a lost compare-and-set, a crash before the save) of a
        // transfer that already freed the agent's slot and told everyone cannot turn back
        // because the target changed since; a named agent who stopped taking chats falls back
        // to the queue (`named_target`), as after any accepted transfer.
        let decided = format!("transfer:{}", e.envelope.event_id);
        let refused = match refused {
            Some(_) if self.decided(&decided).await? => {
                c.routing.target_agent =
                    (b.target_kind == ev::TargetKind::Agent).then(|| b.target_id.clone());
                // Refused now for another reason (a consult started meanwhile) the queue is
                // still the one announced; a queue deleted since keeps the current one.
                if b.target_kind == ev::TargetKind::Queue
                    && self
                        .directory
                        .queue_exists(&tenant, &b.target_id)
                        .await
                        .map_err(directory_failed)?
                {
                    c.queue_id = Some(b.target_id.clone());
                }
                None
            }
            other => other,
        };
        if let Some(reason) = refused {
            return self.refuse_transfer(&c, e, &b, reason, None).await;
        }
        self.decide(&decided).await?;
        self.release(&tenant, &b.agent_id, e).await?;
        let agent = Party {
            participant_id: b.participant_id.clone(),
            nickname: c
                .routing
                .agent_nickname
                .clone()
                .unwrap_or_else(|| b.agent_id.clone()),
            kind: PartyKind::Agent,
        };
        let mut left = entry(e, EntryKind::ParticipantLeft, agent, None);
        left.data.insert("reason".into(), "transferred".into());
        let appended = self.append(&c, e, "left", left).await?;
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "left",
            &ev::ParticipantLeft {
                participant_id: b.participant_id.clone(),
                participant_kind: ParticipantKind::Agent,
                nickname: c.routing.agent_nickname.clone(),
                reason: ev::LeftReason::Transferred,
                transcript_position: i64::try_from(appended.position).ok(),
                visibility: ev::Visibility::All,
            },
        )
        .await?;
        let state = json!({"type": "state", "conversation_id": c.conversation_id,
            "state": "transferred", "target_id": b.target_id});
        let client = notify::state(false, vec![b.agent_id.clone()], state);
        self.emit(
            DELIVERY_TOPIC,
            e,
            &c.conversation_id,
            "client/transferred",
            &client,
        )
        .await?;
        c.state = ConversationState::Queued;
        c.agent_id = None;
        c.routing.agent_nickname = None;
        c.routing.offer_id = None;
        // Not offered back to the agent who handed it over.
        c.declined_by = vec![b.agent_id.clone()];
        c.user_data.extend(b.user_data.clone());
        self.wait_in_queue(&c, e).await?;
        self.save_queued(&mut c, e).await
    }

    /// An agent who accepted joins: the `ParticipantJoined` entry and event, and `connected` to
    /// the agent; `role` marks a consultant.
    async fn agent_joins(
        &self,
        c: &Conversation,
        e: &Event,
        b: &ev::AgentAccepted,
        role: Option<&str>,
    ) -> Step {
        let agent = Party {
            participant_id: b.participant_id.clone(),
            nickname: b.nickname.clone(),
            kind: PartyKind::Agent,
        };
        let mut joined = entry(e, EntryKind::ParticipantJoined, agent, None);
        if let Some(role) = role {
            joined.data.insert("role".into(), role.into());
            if c.routing.consult_private {
                joined.set_agents_only();
            }
        }
        let joined = self.append(c, e, "joined", joined).await?;
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "joined",
            &ev::ParticipantJoined {
                participant_id: b.participant_id.clone(),
                participant_kind: ParticipantKind::Agent,
                nickname: b.nickname.clone(),
                agent_id: Some(b.agent_id.clone()),
                transcript_position: i64::try_from(joined.position).ok(),
                visibility: visibility_of(&joined),
            },
        )
        .await?;
        let mut state = json!({"type": "state", "conversation_id": c.conversation_id,
            "state": "connected", "agent_id": b.agent_id, "nickname": c.customer.nickname});
        if let Some(role) = role {
            state["role"] = json!(role);
        }
        let client = notify::state(false, vec![b.agent_id.clone()], state);
        self.emit(
            DELIVERY_TOPIC,
            e,
            &c.conversation_id,
            "client/state",
            &client,
        )
        .await
    }

    /// A consult request met a closed (or gone) conversation. Its first try may have pushed the
    /// invitation and then lost its save to the close, which, reading the holders before,
    /// named no invitee: the invitation is withdrawn by its id (a desk that never got it
    /// ignores this). A request that finds the conversation open was applied before (a
    /// redelivery): its invitation stands, or was answered since, and is left alone.
    async fn withdraw_consult(&self, e: &Event, b: &ev::TransferRequested) -> Step {
        let consult = matches!(
            b.mode,
            ev::TransferMode::Conference | ev::TransferMode::Consult
        );
        if !consult || b.target_kind != ev::TargetKind::Agent {
            return Ok(());
        }
        // Closed after this read: the close tells the invitee it named (`closed`).
        let open = self
            .load(e)
            .await?
            .is_some_and(|c| c.state != ConversationState::Closed);
        if open {
            debug!(conversation_id = %e.envelope.conversation_id, "a consult request applied before; skipped");
            return Ok(());
        }
        let offer_id = crate::events::chat::derived_id(&e.envelope.event_id, "consult").to_string();
        let conversation = &e.envelope.conversation_id;
        let client = notify::offer_closed(&b.target_id, conversation, Some(&offer_id), "closed");
        self.emit(
            DELIVERY_TOPIC,
            e,
            conversation,
            "client/consult-closed",
            &client,
        )
        .await
    }

    /// The connected agent invites another agent as consultant: the consultant's slot is taken
    /// now (consulting counts against its capacity) and it gets an offer marked `consult`.
    async fn invite_consultant(
        &self,
        mut c: Conversation,
        e: &Event,
        b: ev::TransferRequested,
    ) -> Step {
        let tenant = c.tenant_id.clone();
        let target = b.target_id.clone();
        let refused = if b.target_kind != ev::TargetKind::Agent {
            Some("UNSUPPORTED_TARGET")
        } else if target == b.agent_id {
            Some("SAME_AGENT")
        } else if c.routing.consultant.as_deref() == Some(target.as_str())
            || c.routing.consult_invited.as_deref() == Some(target.as_str())
        {
            // A retried request (a new event id each time): that agent is invited or in already,
            // which is what the owner asked for.
            debug!(conversation_id = %c.conversation_id, "a consult of the agent already invited or consulting; nothing to do");
            return Ok(());
        } else if c.routing.consultant.is_some() || c.routing.consult_invited.is_some() {
            Some("CONSULT_IN_PROGRESS")
        } else if self
            .directory
            .agent(&tenant, &target)
            .await
            .map_err(directory_failed)?
            .is_none()
        {
            Some("AGENT_NOT_FOUND")
        } else {
            let reserve = Reserve {
                conversation_id: c.conversation_id.clone(),
                media: CHAT_MEDIA.into(),
                skills: Vec::new(),
                // The owner's own slot of this conversation is not the consultant's.
                exclude: vec![b.agent_id.clone()],
                only: Some(target.clone()),
                now_ms: e.envelope.occurred_at_ms,
            };
            let reserved = self
                .store
                .reserve_agent(&tenant, &reserve)
                .await
                .map_err(store_failed)?;
            (reserved.as_deref() != Some(target.as_str())).then_some("AGENT_NOT_AVAILABLE")
        };
        if let Some(reason) = refused {
            return self
                .refuse_transfer(&c, e, &b, reason, Some("consult"))
                .await;
        }
        let offer_id = crate::events::chat::derived_id(&e.envelope.event_id, "consult").to_string();
        // The whole timeout from now, as `on_offered` gives an offer: a request handled late
        // (a backlog, a hand-over) must not invite with a time already past.
        let now = chrono::Utc::now().timestamp_millis();
        // A request dated ahead counts only as far ahead as clocks disagree: a wrong clock
        // must not keep the invitation (and the consultant's slot) open until its date.
        let expires_at = believable(e.envelope.occurred_at_ms, now)
            .max(now)
            .saturating_add(
                i64::try_from(self.offer_timeout().as_millis()).unwrap_or(i64::MAX / 4),
            );
        self.store
            .schedule(&self.timer(CONSULT_TIMER, &c), not_before_save(expires_at))
            .await
            .map_err(store_failed)?;
        let private = b.mode == ev::TransferMode::Consult;
        let offer = json!({
            "type": "offer",
            "consult": true,
            "visibility": if private { AGENTS_ONLY } else { "all" },
            "conversation_id": c.conversation_id,
            "offer_id": offer_id,
            "invited_by": b.agent_id,
            "note": b.note,
            "queue_id": c.queue_id,
            "nickname": c.customer.nickname,
            "subject": c.subject,
            "user_data": c.user_data,
            "expires_at": expires_at,
        });
        let client = notify::to_agent(&target, ClientEventKind::Offer, offer);
        self.emit(
            DELIVERY_TOPIC,
            e,
            &c.conversation_id,
            "client/consult",
            &client,
        )
        .await?;
        c.routing.consult_invited = Some(target);
        c.routing.consult_offer_id = Some(offer_id);
        c.routing.consult_expires_at_ms = Some(expires_at);
        c.routing.consult_private = private;
        self.save(&mut c, e).await
    }

    /// The invited consultant accepts: it joins as a second agent and sees what follows.
    async fn join_consultant(&self, mut c: Conversation, e: &Event, b: ev::AgentAccepted) -> Step {
        self.store
            .cancel(&self.timer(CONSULT_TIMER, &c))
            .await
            .map_err(store_failed)?;
        c.routing.consultant = Some(b.agent_id.clone());
        c.routing.consultant_nickname = Some(b.nickname.clone());
        c.routing.consult_invited = None;
        c.routing.consult_offer_id = None;
        c.routing.consult_expires_at_ms = None;
        // Saved first, as in `on_accepted`.
        self.save(&mut c, e).await?;
        self.agent_joins(&c, e, &b, Some("consultant")).await
    }

    /// An agent leaves a conversation it is consultant of (or declines or withdraws from the
    /// invitation); the conversation goes on with its owner.
    pub(super) async fn on_agent_left(&self, e: &Event, b: ev::ParticipantLeft) -> Step {
        let Some(c) = self.open_conversation(e).await? else {
            return Ok(());
        };
        let agent = b.participant_id.clone();
        if c.routing.consultant.as_deref() == Some(agent.as_str())
            || c.routing.consult_invited.as_deref() == Some(agent.as_str())
        {
            return self.drop_consultant(c, e, &agent, None).await;
        }
        warn!(conversation_id = %c.conversation_id, agent = %agent, "leave by an agent not consulting; ignored (owners complete or transfer)");
        Ok(())
    }

    /// Frees the consultant (or the invited one) and tells the owner; `declined` for an
    /// invitation refused or lapsed (`None`: withdrawn, or a consultant's leave).
    async fn drop_consultant(
        &self,
        mut c: Conversation,
        e: &Event,
        agent: &str,
        declined: Option<&str>,
    ) -> Step {
        self.release(&c.tenant_id, agent, e).await?;
        self.store
            .cancel(&self.timer(CONSULT_TIMER, &c))
            .await
            .map_err(store_failed)?;
        if c.routing.consultant.as_deref() == Some(agent) {
            let party = Party {
                participant_id: agent.to_string(),
                nickname: c
                    .routing
                    .consultant_nickname
                    .clone()
                    .unwrap_or_else(|| agent.to_string()),
                kind: PartyKind::Agent,
            };
            let mut left = entry(e, EntryKind::ParticipantLeft, party, None);
            left.data.insert("role".into(), "consultant".into());
            if c.routing.consult_private {
                left.set_agents_only();
            }
            let appended = self.append(&c, e, "left", left).await?;
            self.emit(
                INTERACTION_TOPIC,
                e,
                &c.conversation_id,
                "left",
                &ev::ParticipantLeft {
                    participant_id: agent.to_string(),
                    participant_kind: ParticipantKind::Agent,
                    nickname: c.routing.consultant_nickname.clone(),
                    reason: ev::LeftReason::Left,
                    transcript_position: i64::try_from(appended.position).ok(),
                    visibility: visibility_of(&appended),
                },
            )
            .await?;
            let state = json!({"type": "state", "conversation_id": c.conversation_id,
                "state": "left", "role": "consultant"});
            let client = notify::state(false, vec![agent.to_string()], state);
            // Not "client/left": that is the transcript push of the entry above.
            self.emit(
                DELIVERY_TOPIC,
                e,
                &c.conversation_id,
                "client/left-state",
                &client,
            )
            .await?;
        } else {
            let client = notify::offer_closed(
                agent,
                &c.conversation_id,
                c.routing.consult_offer_id.as_deref(),
                declined.unwrap_or("withdrawn"),
            );
            self.emit(
                DELIVERY_TOPIC,
                e,
                &c.conversation_id,
                "client/offer",
                &client,
            )
            .await?;
            // Withdrawn (the invited agent's `leave`) is a decline to the owner, whose desk
            // otherwise shows the invitation pending for good.
            if let Some(owner) = c.agent_id.clone() {
                let reason = declined.unwrap_or("DECLINED");
                let failed = json!({"type": "transfer_failed", "conversation_id": c.conversation_id,
                    "target_id": agent, "reason": reason, "mode": "consult"});
                let client = notify::state(false, vec![owner], failed);
                self.emit(
                    DELIVERY_TOPIC,
                    e,
                    &c.conversation_id,
                    "client/consult",
                    &client,
                )
                .await?;
            }
        }
        c.routing.consultant = None;
        c.routing.consultant_nickname = None;
        c.routing.consult_invited = None;
        c.routing.consult_offer_id = None;
        c.routing.consult_expires_at_ms = None;
        c.routing.consult_private = false;
        self.save(&mut c, e).await
    }

    pub(super) async fn on_agent_state(&self, e: &Event, b: ev::AgentStateChanged) -> Step {
        let tenant = &e.envelope.tenant_id;
        let profile = self.profile(tenant, &b.agent_id).await?;
        let Some(profile) = profile else {
            // Deleted (or never provisioned): whatever its last state said, it takes no
            // offers now, else a deleted agent left ready would be offered chats it never sees.
            warn!(agent = %b.agent_id, "state of an unknown agent; kept not ready");
            self.store
                .set_presence(
                    tenant,
                    &b.agent_id,
                    false,
                    &[],
                    &BTreeMap::new(),
                    e.envelope.occurred_at_ms,
                )
                .await
                .map_err(store_failed)?;
            self.hand_back(e, &b.agent_id).await?;
            return self
                .push_agent_state(e, &b.agent_id, false, None, &BTreeMap::new())
                .await;
        };
        let limits: BTreeMap<String, u32> = b
            .capacity
            .iter()
            .map(|(media, n)| (media.clone(), u32::try_from(*n).unwrap_or(0)))
            .collect();
        let update = PresenceUpdate {
            ready: b.state == ev::AgentState::Ready,
            capacity: under_limits(&profile.capacity, &limits),
            skills: profile.skills,
            limits,
        };
        self.store
            .update_presence(tenant, &b.agent_id, &update, e.envelope.occurred_at_ms)
            .await
            .map_err(store_failed)?;
        info!(agent = %b.agent_id, ready = update.ready, reason = ?b.reason_code, "agent state");
        self.push_agent_state(
            e,
            &b.agent_id,
            update.ready,
            b.reason_code.as_deref(),
            &update.capacity,
        )
        .await
    }

    /// An admin changed the agent's skills or capacity: applied to its presence at once,
    /// readiness untouched (ordered with the agent's states by the agent key). The profile is
    /// read now, so of several changes the last one saved wins whatever order they came in.
    pub(super) async fn on_agent_profile(&self, e: &Event, b: ev::AgentProfileChanged) -> Step {
        let tenant = &e.envelope.tenant_id;
        let profile = self.profile(tenant, &b.agent_id).await?;
        let Some(profile) = profile else {
            // Deleted since: the delete's own not-ready state takes care of it.
            return Ok(());
        };
        let applied = self
            .store
            .change_presence(
                tenant,
                &b.agent_id,
                &PresenceChange::Profile {
                    skills: profile.skills,
                    provisioned: profile.capacity,
                },
            )
            .await
            .map_err(store_failed)?;
        let Some(p) = applied else {
            // Never signed in: its first state reads the profile.
            return Ok(());
        };
        info!(agent = %b.agent_id, "agent profile applied");
        if !p.ready {
            // Its desk keeps showing the not-ready reason (which presence does not keep); the
            // capacity comes with the agent's next ready.
            return Ok(());
        }
        // A larger capacity is offered queued chats by the queue's next dispatch, as after
        // the agent's own ready.
        self.push_agent_state(e, &b.agent_id, true, None, &p.capacity)
            .await
    }

    /// What a deleted agent still holds goes back: a conversation it owns to its queue (as if
    /// the agent transferred it there), a consult of its ends. No desk of its can answer any
    /// more. Published to the agent topic under ids derived from `e` (a redelivery publishes
    /// the same events), each judged in its conversation's order like the agent's own request.
    pub(super) async fn hand_back(&self, e: &Event, agent: &str) -> Step {
        let tenant = &e.envelope.tenant_id;
        let held = self
            .store
            .agent_conversations(tenant, agent)
            .await
            .map_err(store_failed)?;
        for id in held {
            let Some(c) = self
                .store
                .conversation(tenant, &id)
                .await
                .map_err(store_failed)?
            else {
                continue;
            };
            let me = Some(agent);
            // Offered to it: the offer lapses to the next agent, as any unanswered offer. But
            // an accept it sent before the delete committed may be applied yet (after this
            // read): the transfer, ordered after that accept on the conversation's partition,
            // then takes the chat back; if the chat is not connected to it, it is ignored.
            let offered = c.state == ConversationState::Offered && c.offered_to.as_deref() == me;
            if c.state != ConversationState::Connected && !offered {
                continue;
            }
            // One source, several conversations: each one's events get ids of their own.
            let what = format!("hand-back/{id}");
            if c.agent_id.as_deref() == me || offered {
                let Some(queue) = self.hand_back_queue(&c).await? else {
                    if c.agent_id.as_deref() == me {
                        // No queue to go back to (its own deleted, no rule matching): the
                        // chat ends rather than wait for an agent who is gone. Completed on
                        // the agent's behalf, in the conversation's order (a system close).
                        info!(conversation_id = %id, agent, "the agent was deleted and no queue takes its conversation; closing");
                        let done = ev::ConversationCompleted {
                            agent_id: agent.to_string(),
                            participant_id: agent.to_string(),
                            disposition: None,
                            note: None,
                            user_data: BTreeMap::new(),
                            close_conversation: true,
                        };
                        self.emit(AGENT_TOPIC, e, &id, &what, &done).await?;
                    }
                    // Only offered: the offer lapses as any unanswered one.
                    continue;
                };
                // A consult in progress would refuse the transfer: its consultant leaves
                // first (the same order on the conversation's partition).
                let consultant = c
                    .routing
                    .consultant
                    .clone()
                    .or_else(|| c.routing.consult_invited.clone());
                if let Some(consultant) = consultant {
                    let left = ev::ParticipantLeft {
                        participant_id: consultant,
                        participant_kind: ParticipantKind::Agent,
                        nickname: None,
                        reason: ev::LeftReason::Left,
                        transcript_position: None,
                        visibility: ev::Visibility::All,
                    };
                    let what = format!("{what}/consultant");
                    self.emit(AGENT_TOPIC, e, &id, &what, &left).await?;
                }
                info!(conversation_id = %id, agent, "the agent was deleted; its conversation goes back to its queue");
                let back = ev::TransferRequested {
                    agent_id: agent.to_string(),
                    participant_id: agent.to_string(),
                    target_kind: ev::TargetKind::Queue,
                    target_id: queue,
                    mode: ev::TransferMode::Transfer,
                    note: None,
                    user_data: BTreeMap::new(),
                };
                self.emit(AGENT_TOPIC, e, &id, &what, &back).await?;
            } else if c.routing.consultant.as_deref() == me
                || c.routing.consult_invited.as_deref() == me
            {
                let left = ev::ParticipantLeft {
                    participant_id: agent.to_string(),
                    participant_kind: ParticipantKind::Agent,
                    nickname: None,
                    reason: ev::LeftReason::Left,
                    transcript_position: None,
                    visibility: ev::Visibility::All,
                };
                self.emit(AGENT_TOPIC, e, &id, &what, &left).await?;
            }
        }
        Ok(())
    }

    /// Where a deleted agent's conversation goes back to: its queue or, if that queue was
    /// deleted since, the queue its routing rule gives it now (a rule never names a deleted
    /// queue); with no rule either, none (the conversation closes).
    async fn hand_back_queue(&self, c: &Conversation) -> Result<Option<String>, HandleError> {
        let tenant = &c.tenant_id;
        if let Some(queue) = &c.queue_id {
            let exists = self
                .directory
                .queue_exists(tenant, queue)
                .await
                .map_err(directory_failed)?;
            if exists {
                return Ok(Some(queue.clone()));
            }
        }
        let rules = self
            .directory
            .routing_rules(tenant)
            .await
            .map_err(directory_failed)?;
        Ok(directory::route(&rules, &c.channel, &c.user_data).map(|r| r.queue_id.clone()))
    }

    /// Tells an agent's desks the state applied (another tab's change, or one the system set).
    async fn push_agent_state(
        &self,
        e: &Event,
        agent: &str,
        ready: bool,
        reason_code: Option<&str>,
        capacity: &BTreeMap<String, u32>,
    ) -> Step {
        let state = if ready { "ready" } else { "not_ready" };
        let pushed = json!({"type": "agent_state", "state": state, "reason_code": reason_code,
            "capacity": capacity});
        let client = notify::to_agent(agent, ClientEventKind::State, pushed);
        self.emit(DELIVERY_TOPIC, e, agent, "client", &client).await
    }

    /// Closes: frees the agent, leaves the queue, tells everyone, lets the record expire.
    async fn close(
        &self,
        c: &mut Conversation,
        e: &Event,
        reason: ev::CloseReason,
        by: Option<String>,
        leaving: &Leaving,
    ) -> Step {
        let tenant = c.tenant_id.clone();
        // The agents the record names, and any holding a reservation it does not know of.
        let mut agents: Vec<String> = c
            .agent_id
            .iter()
            .chain(c.offered_to.iter())
            .chain(c.routing.consultant.iter())
            .chain(c.routing.consult_invited.iter())
            .cloned()
            .collect();
        agents.extend(
            self.store
                .slot_holders(&tenant, &c.conversation_id)
                .await
                .map_err(store_failed)?,
        );
        agents.sort();
        agents.dedup();
        for agent in &agents {
            self.release(&tenant, agent, e).await?;
        }
        if let Some(queue) = &c.queue_id {
            self.store
                .dequeue(&tenant, queue, &c.conversation_id)
                .await
                .map_err(store_failed)?;
        }
        for kind in [
            OFFER_TIMER,
            IDLE_TIMER,
            IDLE_CLOSE_TIMER,
            CONSULT_TIMER,
            ABANDON_TIMER,
        ] {
            self.store
                .cancel(&self.timer(kind, c))
                .await
                .map_err(store_failed)?;
        }
        // The party's entry before the save, so a reader that finds the record closed has
        // the whole transcript; the store refuses appends once it is saved closed, so of two
        // closes racing (a customer leaving while the agent completes) the one that lost adds
        // nothing after the close. Saved before it is announced: only the close whose save
        // wins tells anyone, its party's leaving included, so a conversation has one
        // ConversationClosed and nothing of a close follows it. A close cut short after its
        // save is announced on redelivery (see `closing`).
        let left = self.leave(c, e, leaving).await?;
        let reason_text = serde_json::to_value(reason).unwrap_or_default();
        c.state = ConversationState::Closed;
        c.closed_reason = reason_text.as_str().map(str::to_string);
        c.routing.closed_offer_to = c.offered_to.take();
        self.save(c, e).await?;
        self.release_holders(c, e).await?;
        self.announce_close(c, e, reason, by, agents, left).await
    }

    /// Whether a once-only decision `key` (an event's) was taken before: a retry of that event
    /// must not decide otherwise on a changed world.
    async fn decided(&self, key: &str) -> Result<bool, HandleError> {
        self.store.seen(key).await.map_err(store_failed)
    }

    /// Tells the agent its transfer (`mode` None) or consult was refused, then records the
    /// refusal: a redelivery of the request stays refused (see `on_transfer`). One that comes
    /// between the push and the record decides again.
    async fn refuse_transfer(
        &self,
        c: &Conversation,
        e: &Event,
        b: &ev::TransferRequested,
        reason: &str,
        mode: Option<&str>,
    ) -> Step {
        let mut failed = json!({"type": "transfer_failed", "conversation_id": c.conversation_id,
            "target_id": b.target_id, "reason": reason});
        let what = match mode {
            Some(mode) => {
                failed["mode"] = json!(mode);
                "client/consult"
            }
            None => "client/transfer",
        };
        let client = notify::state(false, vec![b.agent_id.clone()], failed);
        self.emit(DELIVERY_TOPIC, e, &c.conversation_id, what, &client)
            .await?;
        self.decide(&refused_key(e)).await
    }

    fn closed_retention_ms(&self) -> i64 {
        secs_ms(self.config.closed_retention_s)
    }

    /// Records the decision `key`, kept as long as a closed conversation (redeliveries and
    /// retries come well within that).
    async fn decide(&self, key: &str) -> Step {
        let keep = std::time::Duration::from_secs(self.config.closed_retention_s.max(3_600));
        self.store
            .remember(key, keep)
            .await
            .map(|_| ())
            .map_err(store_failed)
    }

    /// Gives back every slot still held for the closed `c`: one reserved after the close read
    /// the holders and before its save (a dispatch holding an older copy of the record; see
    /// `try_offer`), or taken while it closed. Idempotent.
    async fn release_holders(&self, c: &Conversation, e: &Event) -> Step {
        let holders = self
            .store
            .slot_holders(&c.tenant_id, &c.conversation_id)
            .await
            .map_err(store_failed)?;
        for agent in &holders {
            warn!(conversation_id = %c.conversation_id, agent = %agent, "a closed conversation held a slot; released");
            self.release(&c.tenant_id, agent, e).await?;
        }
        Ok(())
    }

    /// Stores the `ParticipantLeft` entry of the party whose action closes `c`; told by
    /// [`Self::announce_close`] once the close won. Its id derives from `e`: a repeat appends
    /// nothing new.
    async fn leave(
        &self,
        c: &Conversation,
        e: &Event,
        leaving: &Leaving,
    ) -> Result<Option<Entry>, HandleError> {
        let party = match leaving {
            Leaving::Nobody => return Ok(None),
            Leaving::Customer => c.customer.clone(),
            Leaving::Agent {
                participant_id,
                agent_id,
            } => Party {
                participant_id: participant_id.clone(),
                nickname: c
                    .routing
                    .agent_nickname
                    .clone()
                    .unwrap_or_else(|| agent_id.clone()),
                kind: PartyKind::Agent,
            },
        };
        let left = entry(e, EntryKind::ParticipantLeft, party, None);
        Ok(Some(self.store_entry(c, e, "left", left).await?))
    }

    /// Tells the interaction stream and the sockets that `c` closed, and lets its record
    /// expire; `left` is the closing party's entry, if any. Ids derive from `e`: a repeat
    /// publishes the same events.
    async fn announce_close(
        &self,
        c: &Conversation,
        e: &Event,
        reason: ev::CloseReason,
        by: Option<String>,
        agents: Vec<String>,
        left: Option<Entry>,
    ) -> Step {
        let length = self
            .store
            .transcript_len(&c.tenant_id, &c.conversation_id)
            .await
            .map_err(store_failed)?;
        if let Some(left) = &left {
            self.notify_entry(c, e, "left", left).await?;
            if left.entry.from.kind == PartyKind::Agent {
                self.emit(
                    INTERACTION_TOPIC,
                    e,
                    &c.conversation_id,
                    "left",
                    &ev::ParticipantLeft {
                        participant_id: left.entry.from.participant_id.clone(),
                        participant_kind: ParticipantKind::Agent,
                        nickname: None,
                        reason: ev::LeftReason::Left,
                        transcript_position: i64::try_from(left.position).ok(),
                        visibility: visibility_of(left),
                    },
                )
                .await?;
            }
        }
        if length > 0 && left.as_ref().is_none_or(|l| l.position != length) {
            // The last entry is another's (a racing close that lost stored its party's entry
            // and tells nothing): pushed so that every socket, finding a gap, reads what it
            // lacks from the store before `closed`.
            let last = self
                .store
                .transcript(&c.tenant_id, &c.conversation_id, length, 1)
                .await
                .map_err(store_failed)?;
            if let Some(last) = last.first() {
                self.notify_entry(c, e, "closed/last", last).await?;
            }
        }
        self.emit(
            INTERACTION_TOPIC,
            e,
            &c.conversation_id,
            "closed",
            &ev::ConversationClosed {
                reason,
                closed_by_participant_id: by,
                transcript_length: i64::try_from(length).unwrap_or(i64::MAX),
                channel: serde_json::from_value(json!(c.channel)).ok(),
            },
        )
        .await?;
        let reason_text = serde_json::to_value(reason).unwrap_or_default();
        let state = notify::closed_json(&c.conversation_id, reason_text.as_str());
        let client = notify::state(true, agents, state);
        self.emit(
            DELIVERY_TOPIC,
            e,
            &c.conversation_id,
            "client/closed",
            &client,
        )
        .await?;
        self.store
            .expire_conversation(
                &c.tenant_id,
                &c.conversation_id,
                std::time::Duration::from_secs(self.config.closed_retention_s),
            )
            .await
            .map_err(store_failed)
    }

    /// The open conversation a closing event applies to, like [`Self::open_conversation`];
    /// when this same event already closed it (a redelivery after the save), the close is
    /// announced again instead, in case the first delivery was cut short before that.
    async fn closing(
        &self,
        e: &Event,
        reason: ev::CloseReason,
        by: Option<&str>,
        leaving: &Leaving,
    ) -> Result<Option<Conversation>, HandleError> {
        let id = e.envelope.event_id.to_string();
        match self.load(e).await? {
            Some(c) if closed_by(&c, e) => {
                let mut agents: Vec<String> = watchers(&c)
                    .into_iter()
                    .chain(c.routing.consult_invited.iter().cloned())
                    .chain(c.routing.closed_offer_to.iter().cloned())
                    .collect();
                agents.sort();
                agents.dedup();
                // A first delivery cut short after its save may not have released them.
                self.release_holders(&c, e).await?;
                // Stored before the save: appending it again answers its position (the store
                // checks an entry's id before it refuses a closed record).
                let left = self.leave(&c, e, leaving).await?;
                self.announce_close(&c, e, reason, by.map(str::to_string), agents, left)
                    .await?;
                Ok(None)
            }
            Some(c) if c.state == ConversationState::Closed || c.routing.was_applied(&id) => {
                debug!(conversation_id = %c.conversation_id, event_type = %e.envelope.event_type, "conversation closed or event applied; dropped");
                Ok(None)
            }
            other => Ok(other),
        }
    }

    async fn release(&self, tenant: &str, agent: &str, e: &Event) -> Step {
        self.store
            .release_agent(
                tenant,
                agent,
                CHAT_MEDIA,
                &e.envelope.conversation_id,
                e.envelope.occurred_at_ms,
            )
            .await
            .map(|_| ())
            .map_err(store_failed)
    }

    /// The conversation if it exists, is not closed and the event was not applied yet.
    async fn open_conversation(&self, e: &Event) -> Result<Option<Conversation>, HandleError> {
        match self.sending_to(e).await? {
            Some(c) if c.state == ConversationState::Closed => {
                debug!(conversation_id = %c.conversation_id, event_type = %e.envelope.event_type, "conversation closed; event dropped");
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// [`Self::open_conversation`] for a send, which also gets a closed conversation: the send
    /// may have stored its entry before the close (see [`Self::send_entry`]).
    async fn sending_to(&self, e: &Event) -> Result<Option<Conversation>, HandleError> {
        match self.load(e).await? {
            Some(c) if c.state == ConversationState::Closed => {
                // A closed conversation holds no agent: a slot taken while it closed (a
                // consultant invited as the customer left, whose save then met the close) is
                // given back here too.
                self.release_holders(&c, e).await?;
                Ok(Some(c))
            }
            Some(c) if c.routing.was_applied(&e.envelope.event_id.to_string()) => {
                self.rearm_queued(&c, e).await?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    pub(crate) fn timer(&self, kind: &str, c: &Conversation) -> Timer {
        Timer {
            kind: kind.into(),
            tenant_id: c.tenant_id.clone(),
            id: c.conversation_id.clone(),
        }
    }
}
