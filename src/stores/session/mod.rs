//! Live chat state shared by every edge and worker instance: conversations, transcripts, agent
//! presence and capacity, queues and timers. Redis in production, redb in `nexus dev`.
//!
//! Writers: a conversation's record and transcript are written only by the conversation worker
//! while it handles that conversation's events. Its events arrive on two topics (inbound and
//! agent), each ordered per conversation but not with each other, so the record is written by
//! compare-and-set on its version; transcript appends are atomic and idempotent. Agent capacity, queues and timers are shared by every worker
//! instance and change only through the atomic operations below (Redis: one Lua script each,
//! but `change_presence`: a read, then a compare-and-set retried a few times).
//! Edges only read (transcript, conversation) to serve reads and resume streams.

pub mod embedded;
pub mod redis;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::StoresConfig;

/// The session store the config names: Redis when `stores.redis_url` is set (a Redis Cluster
/// through the nodes it lists with `stores.redis_cluster`), else the embedded store in
/// `<stores.data_dir>/sessions.redb`.
pub async fn connect(config: &StoresConfig) -> Result<Arc<dyn SessionStore>, StoreError> {
    let (url, namespace) = (&config.redis_url, &config.redis_namespace);
    if url.is_empty() {
        return Ok(Arc::new(
            embedded::EmbeddedStore::open(Path::new(&config.data_dir)).await?,
        ));
    }
    let ca = if config.redis_ca_file.is_empty() {
        None
    } else {
        Some(
            crate::tls::read_pem(Path::new(&config.redis_ca_file))
                .map_err(|e| StoreError::Unavailable(format!("stores.redis_ca_file: {e}")))?,
        )
    };
    let store = if config.redis_cluster {
        let nodes = crate::config::redis_nodes(url);
        self::redis::RedisStore::connect_cluster_with_ca(&nodes, namespace, ca).await?
    } else {
        self::redis::RedisStore::connect_with_ca(url, namespace, ca).await?
    };
    let wait = self::redis::ReplicaWait {
        replicas: config.redis_min_replicas,
        timeout: Duration::from_millis(config.redis_replica_wait_ms),
    };
    Ok(Arc::new(store.with_replica_wait(Some(wait)).await?))
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The store cannot be reached or failed; worth a retry.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    /// Stored data this version cannot read (a bug or a foreign writer).
    #[error("session store data is corrupt: {0}")]
    Corrupt(String),
    /// An append to (or an agent reserved for) a conversation whose record was saved closed:
    /// nothing is added after a close, so a reader that finds the record closed has the whole
    /// transcript, and a close leaves no agent slot taken.
    #[error("conversation {0} is closed")]
    Closed(String),
}

/// Who said or did something in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartyKind {
    Customer,
    Agent,
    Bot,
    System,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub participant_id: String,
    pub nickname: String,
    pub kind: PartyKind,
}

/// Transcript entry kinds: the legacy v2 event types plus what v3 adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    ParticipantJoined,
    ParticipantLeft,
    Message,
    Notice,
    CustomNotice,
    TypingStarted,
    TypingStopped,
    FileUploaded,
    ReadReceipt,
    UserDataUpdated,
}

/// An entry to append; the store gives it its position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEntry {
    /// The event that produced the entry: appending the same event id twice is a no-op.
    pub event_id: String,
    pub kind: EntryKind,
    pub from: Party,
    pub text: Option<String>,
    /// Client-supplied message id: a second entry with the same one is a no-op too.
    pub message_id: Option<String>,
    /// User data, notice payload, file id/name, the read position of a receipt.
    pub data: BTreeMap<String, String>,
    pub at_ms: i64,
}

/// The `data` key marking an entry for agents only, and its value.
pub const VISIBILITY_KEY: &str = "visibility";
pub const AGENTS_ONLY: &str = "agents";

impl NewEntry {
    /// Whether only agents see the entry (an internal note, a private consult): customers'
    /// and bots' reads and pushes leave it out (its position stays taken).
    pub fn agents_only(&self) -> bool {
        self.data.get(VISIBILITY_KEY).map(String::as_str) == Some(AGENTS_ONLY)
    }

    /// Marks the entry for agents only.
    pub fn set_agents_only(&mut self) {
        self.data.insert(VISIBILITY_KEY.into(), AGENTS_ONLY.into());
    }
}

/// A transcript entry; positions start at 1 and have no gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub position: u64,
    #[serde(flatten)]
    pub entry: NewEntry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub position: u64,
    /// The event or message id was already in the transcript at `position`.
    pub duplicate: bool,
    /// Only the message id matched: another event appended this sender's message before (a
    /// client's retried send), so that event's effects are done or under way.
    pub retried: bool,
}

/// The key an entry's message id is remembered under: per sender, so one party's ids (a
/// customer's are chosen freely) never match another's, and apart for uploads and custom
/// notices, so a send, an upload and a notice given the same id by a client are three entries,
/// not retries of one (each was answered 202).
pub(crate) fn message_key(entry: &NewEntry) -> Option<String> {
    let space = match entry.kind {
        EntryKind::FileUploaded => "f",
        EntryKind::CustomNotice => "n",
        _ => "m",
    };
    entry
        .message_id
        .as_ref()
        .map(|m| format!("{space}:{}/{m}", entry.from.participant_id))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationState {
    /// With a bot.
    Bot,
    /// Waiting in a queue for an agent.
    Queued,
    /// Offered to `offered_to`, waiting for accept or reject.
    Offered,
    /// An agent is connected.
    Connected,
    Closed,
}

/// The live record of one conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    pub tenant_id: String,
    pub conversation_id: String,
    /// e.g. `WEB_CHAT`.
    pub channel: String,
    pub state: ConversationState,
    pub customer: Party,
    pub contact: BTreeMap<String, String>,
    pub user_data: BTreeMap<String, String>,
    pub subject: Option<String>,
    pub queue_id: Option<String>,
    pub bot_id: Option<String>,
    /// The connected agent.
    pub agent_id: Option<String>,
    /// The agent the conversation is offered to now.
    pub offered_to: Option<String>,
    /// Agents that rejected or let the offer time out, not offered again.
    pub declined_by: Vec<String>,
    /// Files the customer uploaded (the file store counts both sides' for the limit).
    pub files: u32,
    pub created_at_ms: i64,
    /// The customer's last action (async chat closes idle conversations).
    pub last_activity_ms: i64,
    pub closed_reason: Option<String>,
    /// The conversation worker's bookkeeping.
    #[serde(default)]
    pub routing: Routing,
    /// Write version for compare-and-set (see [`SessionStore::put_conversation`]).
    #[serde(default)]
    pub version: u64,
}

/// The version [`SessionStore::put_conversation`] stores `c` with. `c.version` comes from the
/// stored record, so one at the limit is a damaged record: reported, not an overflow (a panic
/// in debug builds, a wrap to 0 that would pass a compare-and-set against a fresh record).
pub(crate) fn next_version(c: &Conversation) -> Result<u64, StoreError> {
    c.version.checked_add(1).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "conversation {}: version {} has no successor",
            c.conversation_id, c.version
        ))
    })
}

/// Routing details and idempotency bookkeeping of a conversation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    /// The current offer (to `offered_to`).
    pub offer_id: Option<String>,
    /// When the current offer lapses (ms since the epoch); an offer timer that fires earlier
    /// (one armed for an earlier offer) waits for it.
    #[serde(default)]
    pub offer_expires_at_ms: Option<i64>,
    /// Offers applied so far: numbers the next one, so no two offers of a conversation share
    /// an id (a lapsed offer's rejection is deduplicated by it), transfers or not.
    #[serde(default)]
    pub offers: u32,
    /// The connected agent's display name (shown when they leave).
    #[serde(default)]
    pub agent_nickname: Option<String>,
    /// A transfer to a named agent: only that agent is offered the conversation.
    #[serde(default)]
    pub target_agent: Option<String>,
    /// A second agent in conference with the connected one (see the agent API's consult).
    #[serde(default)]
    pub consultant: Option<String>,
    #[serde(default)]
    pub consultant_nickname: Option<String>,
    /// The agent invited as consultant, holding a slot until it accepts, declines or leaves.
    #[serde(default)]
    pub consult_invited: Option<String>,
    #[serde(default)]
    pub consult_offer_id: Option<String>,
    /// When the invitation lapses (the consult timer checks it: a timer armed for an earlier
    /// invitation waits for this one's time).
    #[serde(default)]
    pub consult_expires_at_ms: Option<i64>,
    /// The consult (invited or joined) is private: what the consultant writes, and its joining
    /// and leaving, reach agents only.
    #[serde(default)]
    pub consult_private: bool,
    pub skills: Vec<String>,
    pub priority: i64,
    /// The agent the conversation was offered to when it closed: a redelivered close tells
    /// it again (its desk holds the offer).
    #[serde(default)]
    pub closed_offer_to: Option<String>,
    /// Async chat: kept open while idle, closed after the idle time and grace.
    pub is_async: bool,
    /// A bot turn waiting for its bot to come back (`bot_fallback = "retry"`); the customer
    /// messages from it on are not answered yet.
    #[serde(default)]
    pub bot_pending: Option<BotPending>,
    /// Ids of the last events applied to this record (newest last): a redelivered one is
    /// skipped.
    pub applied: Vec<String>,
}

impl Routing {
    /// How many applied event ids a record remembers; redeliveries come soon after the
    /// original, and a replay of older events meets a closed conversation.
    pub const APPLIED_KEPT: usize = 64;

    pub fn was_applied(&self, event_id: &str) -> bool {
        self.applied.iter().any(|e| e == event_id)
    }

    pub fn mark_applied(&mut self, event_id: String) {
        if self.was_applied(&event_id) {
            return;
        }
        self.applied.push(event_id);
        if self.applied.len() > Self::APPLIED_KEPT {
            let extra = self.applied.len() - Self::APPLIED_KEPT;
            self.applied.drain(..extra);
        }
    }
}

/// How long transcript entries of a conversation whose record was never saved are kept (a
/// start appends its first entries before it saves the record; one dead-lettered in between
/// leaves them behind). Far longer than a start's retries; the record's save drops it.
pub const ORPHAN_ENTRIES_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// A bot-first conversation's turn that failed with the bot down, tried again by a timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BotPending {
    /// Transcript position of the first customer message the bot has not answered.
    pub position: u64,
    /// Tries of that message so far.
    pub attempt: u32,
    /// When its tries started (the conversation goes to its queue `bot_retry_max_s` later).
    pub since_ms: i64,
}

/// An agent's live presence; the durable agent (name, skills, capacity) is in provisioning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentPresence {
    pub tenant_id: String,
    pub agent_id: String,
    pub ready: bool,
    pub skills: Vec<String>,
    /// Conversations the agent may hold per media (e.g. `chat` → 3).
    pub capacity: BTreeMap<String, u32>,
    /// Conversations held (reserved by an offer or connected) per media; kept by the store.
    pub active: BTreeMap<String, u32>,
    /// Since when the agent is idle: set when it becomes ready, takes a slot or releases a
    /// conversation; the longest idle ready agent is offered first.
    pub idle_since_ms: i64,
    /// The caps per media the agent asked for in its last state (empty: none).
    #[serde(default)]
    pub limits: BTreeMap<String, u32>,
}

/// The provisioned capacity per media, each lowered to the agent's own cap where it set one:
/// a state may lower it, never raise it (edges check that; an event ingested by other means
/// is held to it here).
pub fn under_limits(
    provisioned: &BTreeMap<String, u32>,
    limits: &BTreeMap<String, u32>,
) -> BTreeMap<String, u32> {
    provisioned
        .iter()
        .map(|(media, max)| {
            let n = limits.get(media).map_or(*max, |cap| (*cap).min(*max));
            (media.clone(), n)
        })
        .collect()
}

impl AgentPresence {
    /// [`PresenceChange::apply`] to this presence.
    pub fn change(&mut self, change: &PresenceChange) {
        let mut part = PresenceUpdate {
            ready: self.ready,
            skills: std::mem::take(&mut self.skills),
            capacity: std::mem::take(&mut self.capacity),
            limits: std::mem::take(&mut self.limits),
        };
        change.apply(&mut part);
        (self.ready, self.skills, self.capacity, self.limits) =
            (part.ready, part.skills, part.capacity, part.limits);
    }
}

/// A change of part of an agent's presence ([`SessionStore::change_presence`]).
#[derive(Debug, Clone, PartialEq)]
pub enum PresenceChange {
    /// Not ready, all else kept (the agent let an offer lapse).
    NotReady,
    /// A changed profile: these skills, and the provisioned capacity under the agent's own
    /// limits; readiness kept.
    Profile {
        skills: Vec<String>,
        provisioned: BTreeMap<String, u32>,
    },
}

impl PresenceChange {
    pub fn apply(&self, p: &mut PresenceUpdate) {
        match self {
            PresenceChange::NotReady => p.ready = false,
            PresenceChange::Profile {
                skills,
                provisioned,
            } => {
                p.skills = skills.clone();
                p.capacity = under_limits(provisioned, &p.limits);
            }
        }
    }
}

/// What an agent's state sets in its presence (the part of it a state and a profile decide;
/// the Redis store keeps it as the agent's `profile` JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    pub ready: bool,
    pub skills: Vec<String>,
    /// What the agent may hold per media: its provisioned capacity under `limits`.
    pub capacity: BTreeMap<String, u32>,
    /// The caps the agent asked for itself, kept so that a changed profile is applied under
    /// them without waiting for the agent's next state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, u32>,
}

/// What to look for when reserving an agent for a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserve {
    pub conversation_id: String,
    pub media: String,
    /// The agent must have every one of these.
    pub skills: Vec<String>,
    /// Never these agents (they declined).
    pub exclude: Vec<String>,
    /// Only this agent (a transfer to a named agent).
    pub only: Option<String>,
    pub now_ms: i64,
}

/// A timer: `kind` is what happens when it fires (`offer`, `idle`, `close`), `id` what it
/// fires for (a conversation id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Timer {
    pub kind: String,
    pub tenant_id: String,
    pub id: String,
}

/// How long a claimed timer stays away before it is due again: a worker that dies between
/// claiming a timer and acting on it loses nothing, another fires it after this lease.
pub const TIMER_LEASE_MS: i64 = 30_000;

/// When a timer claimed at `now_ms` is due again unless completed.
pub fn timer_lease_until(now_ms: i64) -> i64 {
    now_ms.saturating_add(TIMER_LEASE_MS)
}

/// The [`SessionStore::remember`] key marking a chat the edge started. It tells a start the
/// worker has not applied yet from a session the store lost; the worker drops it once the
/// record exists, which then speaks for the session.
pub fn start_mark(tenant: &str, conversation_id: &str) -> String {
    format!("chat-started:{tenant}:{conversation_id}")
}

/// What user data may hold, whoever writes it (the chat APIs, the bot API, a bot's answer):
/// at most `max_entries` entries, keys of 1 to 256 bytes, values of at most 4096; the reason
/// when not.
pub fn check_user_data(data: &BTreeMap<String, String>, max_entries: usize) -> Result<(), String> {
    if data.len() > max_entries {
        return Err(format!("at most {max_entries} user-data entries"));
    }
    if data.keys().any(|k| k.is_empty() || k.len() > 256) || data.values().any(|v| v.len() > 4096) {
        return Err("user-data keys are 1 to 256 bytes, values at most 4096".into());
    }
    Ok(())
}

/// A conversation's user data after an update: `set` merged in, then `removed` taken out (a
/// key both set and removed is gone). The edge checks the limit on it, the worker applies it.
pub fn merge_user_data(
    current: &BTreeMap<String, String>,
    set: &BTreeMap<String, String>,
    removed: &[String],
) -> BTreeMap<String, String> {
    let mut merged = current.clone();
    merged.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
    for k in removed {
        merged.remove(k);
    }
    merged
}

/// The [`SessionStore::claim`] key of a start request's client id: a retried start finds the
/// session the first one chose. The id is a secret (it answers with the session's key), so
/// the store holds its hash.
pub fn start_request_key(tenant: &str, request_id: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(request_id.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}{hex}", start_request_prefix(tenant))
}

/// What every [`start_request_key`] of `tenant` starts with.
pub(crate) fn start_request_prefix(tenant: &str) -> String {
    format!("chat-start-request:{tenant}:")
}

/// The [`SessionStore::refresh`] key of a live chat's customer: edges refresh it while the
/// customer makes requests or holds a stream open; the conversation worker closes the chat once
/// it lapsed (`workers.conversation.abandon_timeout_s`).
pub fn customer_mark(tenant: &str, conversation_id: &str) -> String {
    format!("chat-customer:{tenant}:{conversation_id}")
}

#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Writes the record if the stored one still has `c.version` (0: none stored yet) and
    /// stores it with `version + 1`; false (nothing written) on a conflict. Handlers of one
    /// conversation can run concurrently (its events come on two topics), so every write is a
    /// compare-and-set and the loser redoes its (idempotent) work on the fresh record.
    async fn put_conversation(&self, c: &Conversation) -> Result<bool, StoreError>;

    async fn conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>, StoreError>;

    /// Lets a closed conversation (record, transcript, dedup ids) expire after `ttl`.
    async fn expire_conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Appends at the next position, atomically; idempotent by `event_id` and `message_id`.
    /// Refused ([`StoreError::Closed`]) once the record is saved closed, after the id checks:
    /// a repeat of an entry appended before the close still answers its position.
    async fn append(
        &self,
        tenant: &str,
        conversation_id: &str,
        entry: &NewEntry,
    ) -> Result<Appended, StoreError>;

    /// Entries from position `from` (inclusive, 1-based) on, at most `max`, in order.
    async fn transcript(
        &self,
        tenant: &str,
        conversation_id: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError>;

    /// How many entries the transcript holds (its last position), without reading them.
    async fn transcript_len(&self, tenant: &str, conversation_id: &str) -> Result<u64, StoreError>;

    /// Sets readiness, skills, capacity and limits; keeps `active`. Becoming ready (or first
    /// seen) sets `idle_since_ms` to `now_ms`.
    async fn update_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        update: &PresenceUpdate,
        now_ms: i64,
    ) -> Result<AgentPresence, StoreError>;

    /// [`Self::update_presence`] for an agent that asked for no caps of its own.
    async fn set_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        ready: bool,
        skills: &[String],
        capacity: &BTreeMap<String, u32>,
        now_ms: i64,
    ) -> Result<AgentPresence, StoreError> {
        let update = PresenceUpdate {
            ready,
            skills: skills.to_vec(),
            capacity: capacity.clone(),
            limits: BTreeMap::new(),
        };
        self.update_presence(tenant, agent_id, &update, now_ms)
            .await
    }

    async fn presence(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentPresence>, StoreError>;

    /// Makes `change` to a present agent in one atomic step that leaves everything else as it
    /// is (idle time included): a change made meanwhile by another handler, keyed otherwise,
    /// stays. `None` (nothing written) if the agent has no presence.
    async fn change_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        change: &PresenceChange,
    ) -> Result<Option<AgentPresence>, StoreError>;

    /// Atomically picks the longest idle ready agent with the skills and a free slot for the
    /// media, takes the slot for the conversation (its idle time restarts at `now_ms`, so offers
    /// go round the idle agents) and returns the agent. Concurrent calls from
    /// any number of instances never take an agent over its capacity. If the conversation
    /// already holds a slot with an agent not excluded, returns that agent (a retried reserve
    /// takes nothing more). Refused ([`StoreError::Closed`]) once the conversation's record is
    /// saved closed, in the same atomic step: a close frees the holders it reads after its save,
    /// so no slot is ever left taken for a closed conversation (a reserve for a conversation
    /// with no record yet, about to be saved, goes ahead).
    async fn reserve_agent(&self, tenant: &str, r: &Reserve) -> Result<Option<String>, StoreError>;

    /// Gives the conversation's slot back (offer rejected or timed out, conversation ended);
    /// `idle_since_ms` becomes `now_ms`. Idempotent: false if it held none.
    async fn release_agent(
        &self,
        tenant: &str,
        agent_id: &str,
        media: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Agents holding a slot for the conversation, including reservations no offer was applied
    /// for (a handler stopped between the reserve and the offer's publish): a close frees them.
    async fn slot_holders(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// Conversations holding a slot of the agent.
    async fn agent_conversations(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Vec<String>, StoreError>;

    /// Puts the conversation in the queue (idempotent: keeps its first place).
    async fn enqueue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
        priority: i64,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Takes it out; false if it was not there. One caller wins when several race. The answer
    /// only informs: a retry after a lost answer (the take landed) is answered false, so no
    /// caller may skip an effect on it.
    async fn dequeue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
    ) -> Result<bool, StoreError>;

    /// The first `max` waiting: highest priority first, then longest waiting.
    async fn waiting(
        &self,
        tenant: &str,
        queue_id: &str,
        max: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// Sets (or moves) the timer to fire at `due_ms`.
    async fn schedule(&self, timer: &Timer, due_ms: i64) -> Result<(), StoreError>;

    async fn cancel(&self, timer: &Timer) -> Result<(), StoreError>;

    /// Returns up to `max` timers of `kind` due at `now_ms` and leases them: each is moved to
    /// [`timer_lease_until`]`(now_ms)`, so it is returned to exactly one caller however many
    /// instances poll, and comes back after the lease unless [`Self::complete_timer`] ends it.
    async fn claim_due(
        &self,
        kind: &str,
        now_ms: i64,
        max: usize,
    ) -> Result<Vec<Timer>, StoreError>;

    /// Ends a timer claimed at `now_ms` once its action is done: removed only if it is still at
    /// its lease (an action or a handler that moved it meanwhile keeps the new due time).
    async fn complete_timer(&self, timer: &Timer, now_ms: i64) -> Result<(), StoreError>;

    /// True the first time `key` is seen within `ttl`. Callers record a decision or an effect
    /// already made (mark after effect), so a retry after a lost answer, answered false, skips
    /// nothing: it finds the decision made and follows it.
    async fn remember(&self, key: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Stores `value` under `key` for `ttl` unless a live value is there, and returns that
    /// value (`None` when this call stored it): the first of racing callers wins, the others
    /// learn what it chose (an idempotency key).
    async fn claim(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError>;

    /// Remembers `key` for `ttl` from now, whether or not it was there (a sign of life that each
    /// call extends, where [`Self::remember`] keeps the first).
    async fn refresh(&self, key: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Whether `key` was remembered and its `ttl` has not run out.
    async fn seen(&self, key: &str) -> Result<bool, StoreError>;

    /// Drops a remembered `key` before its `ttl` (nothing if it is not there).
    async fn forget(&self, key: &str) -> Result<(), StoreError>;

    /// Deletes what the store holds of `tenant` (a deleted tenant's): its conversations'
    /// records, transcripts and dedup ids, agent presence and slots, queues, timers, and the
    /// start and customer marks of its conversations; nothing of another tenant. Idempotent:
    /// a purge cut short is finished by the next. Answers how many stored items it removed
    /// (keys on Redis, rows in redb), for the log. Writes of the tenant racing it (an event in
    /// flight) may store a little again; a start request's claim lapses with its ttl.
    async fn purge_tenant(&self, tenant: &str) -> Result<u64, StoreError>;

    /// Reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}
