//! The session store of `nexus dev`: one redb file (`<data_dir>/sessions.redb`), so sessions
//! survive a restart; each operation is one redb write transaction, hence atomic.
//!
//! redb runs one write transaction at a time, which is what makes reserve, release, dequeue and
//! claim atomic; writers wait their turn on an async mutex, reads use snapshots. All redb work
//! runs on tokio's blocking pool. Writes are made durable (fsync) at most [`SYNC_EVERY`] after
//! they return, like Redis with `appendfsync everysec`: a crash of the process can lose that
//! much live state whose bus events were already acked (a restart alone loses nothing).
//!
//! Tables (keys lead with the tenant, so a tenant's rows are one range):
//! - `conversations`: (tenant, conversation) → [`Conversation`] JSON.
//! - `expiry`: (tenant, conversation) → expiry ms, and `expiry_by_time` (ms, tenant,
//!   conversation) for the sweep. An expired conversation (record, transcript, dedup ids) reads
//!   as absent and is purged by the next write that touches it (a put, an expire, an append,
//!   a reserve) or by the sweep those writes run. A transcript without a record expires
//!   [`super::ORPHAN_ENTRIES_TTL`] after its first entry unless the record is saved.
//! - `entries`: (tenant, conversation, position) → [`Entry`] JSON; `transcript_len`:
//!   (tenant, conversation) → last position; `entry_ids`: (tenant, conversation,
//!   `e:<event id>` | `m:<message id>`) → position.
//! - `agents`: (tenant, agent) → [`AgentPresence`] JSON; `slots`: (tenant, agent,
//!   conversation) → media; `holders`: (tenant, conversation, agent) (the reverse index).
//! - `queue`: (tenant, queue, rank, at ms, conversation), rank ascending = priority descending;
//!   `queue_index`: (tenant, queue, conversation) → (rank, at ms).
//! - `timers`: (kind, due ms, tenant, id); `timer_index`: (kind, tenant, id) → due ms.
//! - `seen`: key → expiry ms, and `seen_by_time` (ms, key) for the sweep.
//!
//! A deleted tenant's rows go in one transaction (`purge_tenant`): a range per table.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{
    Database, Durability, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction,
};

use super::{
    AgentPresence, Appended, Conversation, ConversationState, Entry, NewEntry, PresenceChange,
    PresenceUpdate, Reserve, SessionStore, StoreError, Timer,
};

/// File name of the store inside the data directory.
pub const FILE_NAME: &str = "sessions.redb";

/// Expired conversations or remembered keys one write purges at most besides what it touches:
/// enough to keep up with any realistic expiry rate, small enough not to slow the write.
const SWEEP_BATCH: usize = 16;

type Pair<'a> = (&'a str, &'a str);
type Triple<'a> = (&'a str, &'a str, &'a str);

const CONVERSATIONS: TableDefinition<Pair, &[u8]> = TableDefinition::new("conversations");
const EXPIRY: TableDefinition<Pair, i64> = TableDefinition::new("expiry");
const EXPIRY_BY_TIME: TableDefinition<(i64, &str, &str), ()> =
    TableDefinition::new("expiry_by_time");
const ENTRIES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("entries");
const TRANSCRIPT_LEN: TableDefinition<Pair, u64> = TableDefinition::new("transcript_len");
const ENTRY_IDS: TableDefinition<Triple, u64> = TableDefinition::new("entry_ids");
const AGENTS: TableDefinition<Pair, &[u8]> = TableDefinition::new("agents");
const SLOTS: TableDefinition<Triple, &str> = TableDefinition::new("slots");
const HOLDERS: TableDefinition<Triple, ()> = TableDefinition::new("holders");
const QUEUE: TableDefinition<(&str, &str, u64, i64, &str), ()> = TableDefinition::new("queue");
const QUEUE_INDEX: TableDefinition<Triple, (u64, i64)> = TableDefinition::new("queue_index");
const TIMERS: TableDefinition<(&str, i64, &str, &str), ()> = TableDefinition::new("timers");
const TIMER_INDEX: TableDefinition<Triple, i64> = TableDefinition::new("timer_index");
/// Timers under a claim's lease, with the lease's due time: a completion removes a timer only
/// while it is still the lease, not one a handler scheduled again since, even for the very
/// millisecond the lease ends (a due time alone cannot tell them apart).
const TIMER_LEASES: TableDefinition<Triple, i64> = TableDefinition::new("timer_leases");
const SEEN: TableDefinition<&str, i64> = TableDefinition::new("seen");
const SEEN_BY_TIME: TableDefinition<(i64, &str), ()> = TableDefinition::new("seen_by_time");
/// Values of [`SessionStore::claim`] keys; their lifetimes live in `seen` under
/// [`claim_seen_key`], so one sweep ends both.
const CLAIMS: TableDefinition<&str, &str> = TableDefinition::new("claims");

/// A claim's entry in `seen`: a prefix no `remember` key of nexus starts with.
fn claim_seen_key(key: &str) -> String {
    format!("\u{1}claim:{key}")
}

/// A storage failure with what was being done.
fn storage<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Unavailable(format!("{what}: {e}"))
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// An empty durable commit: persists every commit made without fsync before it.
fn sync_now(
    db: &Database,
    dirty: &AtomicBool,
    last_sync: &std::sync::Mutex<Instant>,
) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage("begin write"))?;
    txn.commit().map_err(storage("commit"))?;
    dirty.store(false, Ordering::Release);
    *last_sync.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    Ok(())
}

/// How long `open` waits for a store of this process on the same file to let go of it: a
/// dropped store's background flush may hold the file for the length of one sync.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Opens the file, waiting out a store of this process that is still closing it.
fn create_waiting(path: &Path) -> Result<Database, StoreError> {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.map_err(storage("open sessions")),
        }
    }
}

impl Drop for EmbeddedStore {
    /// A clean close persists what is still lagging.
    fn drop(&mut self) {
        if self.dirty.load(Ordering::Acquire) {
            if let Err(e) = sync_now(&self.db, &self.dirty, &self.last_sync) {
                tracing::warn!(error = %e, "session store: the last writes may not be durable");
            }
        }
    }
}

/// Order-preserving map of a priority to a rank that sorts highest priority first.
fn rank(priority: i64) -> u64 {
    !((priority as u64) ^ (1 << 63))
}

/// A [`SessionStore`] in one redb file; clone the `Arc` to share it, one per file.
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Writers queue here, asynchronously, rather than each parking a blocking-pool thread in
    /// `begin_write`; the guard moves into the blocking task, so it is held until the commit
    /// even if the caller stops waiting.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Commits since the last one made durable (see [`SYNC_EVERY`]).
    dirty: Arc<AtomicBool>,
    last_sync: Arc<std::sync::Mutex<Instant>>,
    /// See [`super::ORPHAN_ENTRIES_TTL`].
    orphan_ttl: Duration,
}

/// How far durability may lag: commits are made without fsync, and one in this interval (or
/// the background flush after it) is made durable, which persists every commit before it. Like
/// Redis with `appendfsync everysec`, a crash loses at most this much of the live state; an fsync
/// per commit capped chat throughput at a few hundred messages a second.
const SYNC_EVERY: Duration = Duration::from_millis(100);

impl EmbeddedStore {
    /// Opens (or creates) `<dir>/sessions.redb`. One store per file and process: a second open
    /// of the same file waits up to [`RELEASE_WAIT`] for the first store to be dropped, then fails.
    pub async fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir = dir.to_path_buf();
        let db = tokio::task::spawn_blocking(move || -> Result<Database, StoreError> {
            std::fs::create_dir_all(&dir).map_err(storage("create data dir"))?;
            let db = create_waiting(&dir.join(FILE_NAME))?;
            let txn = db.begin_write().map_err(storage("begin write"))?;
            {
                txn.open_table(CONVERSATIONS)
                    .map_err(storage("create table"))?;
                txn.open_table(EXPIRY).map_err(storage("create table"))?;
                txn.open_table(EXPIRY_BY_TIME)
                    .map_err(storage("create table"))?;
                txn.open_table(ENTRIES).map_err(storage("create table"))?;
                txn.open_table(TRANSCRIPT_LEN)
                    .map_err(storage("create table"))?;
                txn.open_table(ENTRY_IDS).map_err(storage("create table"))?;
                txn.open_table(AGENTS).map_err(storage("create table"))?;
                txn.open_table(SLOTS).map_err(storage("create table"))?;
                txn.open_table(HOLDERS).map_err(storage("create table"))?;
                txn.open_table(QUEUE).map_err(storage("create table"))?;
                txn.open_table(QUEUE_INDEX)
                    .map_err(storage("create table"))?;
                txn.open_table(TIMERS).map_err(storage("create table"))?;
                txn.open_table(TIMER_INDEX)
                    .map_err(storage("create table"))?;
                txn.open_table(TIMER_LEASES)
                    .map_err(storage("create table"))?;
                txn.open_table(SEEN).map_err(storage("create table"))?;
                txn.open_table(SEEN_BY_TIME)
                    .map_err(storage("create table"))?;
                txn.open_table(CLAIMS).map_err(storage("create table"))?;
            }
            txn.commit().map_err(storage("commit"))?;
            Ok(db)
        })
        .await
        .map_err(storage("open task"))??;
        let store = Self {
            db: Arc::new(db),
            writer: Arc::new(tokio::sync::Mutex::new(())),
            dirty: Arc::new(AtomicBool::new(false)),
            last_sync: Arc::new(std::sync::Mutex::new(Instant::now())),
            orphan_ttl: super::ORPHAN_ENTRIES_TTL,
        };
        store.spawn_flusher();
        Ok(store)
    }

    /// Keeps entries of a conversation without a record `ttl` instead of
    /// [`super::ORPHAN_ENTRIES_TTL`] (tests).
    pub fn with_orphan_ttl(mut self, ttl: Duration) -> Self {
        self.orphan_ttl = ttl;
        self
    }

    /// Makes lagging commits durable within [`SYNC_EVERY`] when no later write does; ends
    /// with the store.
    fn spawn_flusher(&self) {
        let (db, writer, dirty) = (
            Arc::downgrade(&self.db),
            self.writer.clone(),
            self.dirty.clone(),
        );
        let last_sync = self.last_sync.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            loop {
                tick.tick().await;
                let Some(db) = db.upgrade() else { return };
                if !dirty.load(Ordering::Acquire) {
                    continue;
                }
                let turn = writer.clone().lock_owned().await;
                let (dirty, last_sync) = (dirty.clone(), last_sync.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    sync_now(&db, &dirty, &last_sync)
                })
                .await;
            }
        });
    }

    /// Runs `f` in one write transaction on the blocking pool and commits if it succeeded.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        let turn = self.writer.clone().lock_owned().await;
        let (dirty, last_sync) = (self.dirty.clone(), self.last_sync.clone());
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut txn = db.begin_write().map_err(storage("begin write"))?;
            let durable = {
                let mut last = last_sync.lock().unwrap_or_else(PoisonError::into_inner);
                let due = last.elapsed() >= SYNC_EVERY;
                if due {
                    *last = Instant::now();
                }
                due
            };
            if !durable {
                txn.set_durability(Durability::None);
            }
            let out = f(&txn)?;
            txn.commit().map_err(storage("commit"))?;
            dirty.store(!durable, Ordering::Release);
            Ok(out)
        })
        .await
        .map_err(storage("write task"))?
    }

    /// Sets `key` seen until `ttl` from now; with `only_if_absent`, not if it is seen already
    /// (false then).
    async fn set_seen(
        &self,
        key: &str,
        ttl: Duration,
        only_if_absent: bool,
    ) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(move |txn| {
            let now = now_ms();
            sweep_seen(txn, now)?;
            if only_if_absent && seen_until(txn, &key)?.is_some_and(|at| at > now) {
                return Ok(false);
            }
            set_seen_in(txn, &key, now.saturating_add(ttl_ms(ttl).max(1)))?;
            Ok(true)
        })
        .await
    }

    /// Runs `f` on a read snapshot on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(storage("begin read"))?;
            f(&txn)
        })
        .await
        .map_err(storage("read task"))?
    }
}

/// Whether the conversation's expiry has passed (it then reads as absent).
fn expired_in<T: ReadableTable<Pair<'static>, i64>>(
    table: &T,
    tenant: &str,
    conversation: &str,
    now: i64,
) -> Result<bool, StoreError> {
    Ok(table
        .get((tenant, conversation))
        .map_err(storage("read expiry"))?
        .is_some_and(|at| at.value() <= now))
}

/// Removes the conversation's expiry, if it has one.
fn clear_expiry(
    txn: &WriteTransaction,
    tenant: &str,
    conversation: &str,
) -> Result<(), StoreError> {
    let mut expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
    if let Some(at) = expiry
        .remove((tenant, conversation))
        .map_err(storage("remove expiry"))?
    {
        let at = at.value();
        txn.open_table(EXPIRY_BY_TIME)
            .map_err(storage("open expiry"))?
            .remove((at, tenant, conversation))
            .map_err(storage("remove expiry"))?;
    }
    Ok(())
}

/// Sets (or moves) the conversation's expiry to `at`.
fn set_expiry(
    txn: &WriteTransaction,
    tenant: &str,
    conversation: &str,
    at: i64,
) -> Result<(), StoreError> {
    clear_expiry(txn, tenant, conversation)?;
    txn.open_table(EXPIRY)
        .map_err(storage("open expiry"))?
        .insert((tenant, conversation), at)
        .map_err(storage("write expiry"))?;
    txn.open_table(EXPIRY_BY_TIME)
        .map_err(storage("open expiry"))?
        .insert((at, tenant, conversation), ())
        .map_err(storage("write expiry"))?;
    Ok(())
}

/// Deletes everything of one conversation: record, transcript, dedup ids, expiry.
fn purge_conversation(
    txn: &WriteTransaction,
    tenant: &str,
    conversation: &str,
) -> Result<(), StoreError> {
    clear_expiry(txn, tenant, conversation)?;
    txn.open_table(CONVERSATIONS)
        .map_err(storage("open conversations"))?
        .remove((tenant, conversation))
        .map_err(storage("remove conversation"))?;
    txn.open_table(TRANSCRIPT_LEN)
        .map_err(storage("open transcripts"))?
        .remove((tenant, conversation))
        .map_err(storage("remove transcript"))?;
    txn.open_table(ENTRIES)
        .map_err(storage("open entries"))?
        .retain_in(
            (tenant, conversation, 0)..=(tenant, conversation, u64::MAX),
            |_, _| false,
        )
        .map_err(storage("remove entries"))?;
    let mut ids = txn
        .open_table(ENTRY_IDS)
        .map_err(storage("open entry ids"))?;
    let keys: Vec<String> = {
        let mut keys = Vec::new();
        for row in ids
            .range((tenant, conversation, "")..)
            .map_err(storage("scan entry ids"))?
        {
            let (k, _) = row.map_err(storage("read entry id"))?;
            let (t, c, id) = k.value();
            if t != tenant || c != conversation {
                break;
            }
            keys.push(id.to_string());
        }
        keys
    };
    for k in &keys {
        ids.remove((tenant, conversation, k.as_str()))
            .map_err(storage("remove entry id"))?;
    }
    Ok(())
}

/// Whether the conversation's record is saved closed (appends then refuse).
fn closed_in(txn: &WriteTransaction, tenant: &str, id: &str) -> Result<bool, StoreError> {
    /// The one field this needs; serde skips the rest of the record.
    #[derive(serde::Deserialize)]
    struct State {
        state: ConversationState,
    }
    let table = txn
        .open_table(CONVERSATIONS)
        .map_err(storage("open conversations"))?;
    let Some(v) = table
        .get((tenant, id))
        .map_err(storage("read conversation"))?
    else {
        return Ok(false);
    };
    let record: State =
        serde_json::from_slice(v.value()).map_err(|e| corrupt("conversation", e))?;
    Ok(record.state == ConversationState::Closed)
}

/// Purges the conversation if it expired, then up to [`SWEEP_BATCH`] other expired ones.
fn purge_expired(
    txn: &WriteTransaction,
    tenant: &str,
    conversation: &str,
    now: i64,
) -> Result<(), StoreError> {
    let expired = {
        let expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
        expired_in(&expiry, tenant, conversation, now)?
    };
    if expired {
        purge_conversation(txn, tenant, conversation)?;
    }
    let due: Vec<(String, String)> = {
        let by_time = txn
            .open_table(EXPIRY_BY_TIME)
            .map_err(storage("open expiry"))?;
        let mut due = Vec::new();
        for row in by_time
            .range((i64::MIN, "", "")..(now.saturating_add(1), "", ""))
            .map_err(storage("scan expiry"))?
            .take(SWEEP_BATCH)
        {
            let (k, _) = row.map_err(storage("read expiry"))?;
            let (_, t, c) = k.value();
            due.push((t.to_string(), c.to_string()));
        }
        due
    };
    for (t, c) in due {
        purge_conversation(txn, &t, &c)?;
    }
    Ok(())
}

/// When `key` in `seen` runs out, if it is there (live or not yet swept).
fn seen_until(txn: &WriteTransaction, key: &str) -> Result<Option<i64>, StoreError> {
    let seen = txn.open_table(SEEN).map_err(storage("open seen"))?;
    let at = seen
        .get(key)
        .map_err(storage("read seen"))?
        .map(|v| v.value());
    Ok(at)
}

/// Sets `key` in `seen` to run out at `at`, moving its entry in the time index.
fn set_seen_in(txn: &WriteTransaction, key: &str, at: i64) -> Result<(), StoreError> {
    let old = seen_until(txn, key)?;
    txn.open_table(SEEN)
        .map_err(storage("open seen"))?
        .insert(key, at)
        .map_err(storage("write seen"))?;
    let mut by_time = txn.open_table(SEEN_BY_TIME).map_err(storage("open seen"))?;
    if let Some(old) = old {
        by_time.remove((old, key)).map_err(storage("remove seen"))?;
    }
    by_time
        .insert((at, key), ())
        .map_err(storage("write seen"))?;
    Ok(())
}

fn sweep_seen(txn: &WriteTransaction, now: i64) -> Result<(), StoreError> {
    let mut by_time = txn.open_table(SEEN_BY_TIME).map_err(storage("open seen"))?;
    let mut seen = txn.open_table(SEEN).map_err(storage("open seen"))?;
    let due: Vec<(i64, String)> = {
        let mut due = Vec::new();
        for row in by_time
            .range((i64::MIN, "")..(now.saturating_add(1), ""))
            .map_err(storage("scan seen"))?
            .take(SWEEP_BATCH)
        {
            let (k, _) = row.map_err(storage("read seen"))?;
            let (at, key) = k.value();
            due.push((at, key.to_string()));
        }
        due
    };
    for (at, key) in due {
        by_time
            .remove((at, key.as_str()))
            .map_err(storage("remove seen"))?;
        let current = seen
            .get(key.as_str())
            .map_err(storage("read seen"))?
            .map(|v| v.value());
        if current == Some(at) {
            seen.remove(key.as_str()).map_err(storage("remove seen"))?;
            if let Some(claim) = key.strip_prefix(&claim_seen_key("")) {
                txn.open_table(CLAIMS)
                    .map_err(storage("open claims"))?
                    .remove(claim)
                    .map_err(storage("remove claim"))?;
            }
        }
    }
    Ok(())
}

fn parse_agent(bytes: &[u8]) -> Result<AgentPresence, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("agent presence", e))
}

/// The agent's presence in `agents`, if it has one.
fn agent_in<T: ReadableTable<Pair<'static>, &'static [u8]>>(
    agents: &T,
    tenant: &str,
    agent_id: &str,
) -> Result<Option<AgentPresence>, StoreError> {
    agents
        .get((tenant, agent_id))
        .map_err(storage("read agent"))?
        .map(|v| parse_agent(v.value()))
        .transpose()
}

/// The agent's slots: (conversation, media) of each conversation it holds.
fn agent_slots<T: ReadableTable<Triple<'static>, &'static str>>(
    slots: &T,
    tenant: &str,
    agent_id: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let mut out = Vec::new();
    for row in slots
        .range((tenant, agent_id, "")..)
        .map_err(storage("scan slots"))?
    {
        let (k, media) = row.map_err(storage("read slot"))?;
        let (t, a, c) = k.value();
        if t != tenant || a != agent_id {
            break;
        }
        out.push((c.to_string(), media.value().to_string()));
    }
    Ok(out)
}

/// What the agent holds per media, counted from its slots.
fn active_from_slots(
    txn: &WriteTransaction,
    tenant: &str,
    agent_id: &str,
) -> Result<BTreeMap<String, u32>, StoreError> {
    let slots = txn.open_table(SLOTS).map_err(storage("open slots"))?;
    let mut active = BTreeMap::new();
    for (_, media) in agent_slots(&slots, tenant, agent_id)? {
        *active.entry(media).or_insert(0) += 1;
    }
    Ok(active)
}

fn write_agent(txn: &WriteTransaction, p: &AgentPresence) -> Result<(), StoreError> {
    let json = serde_json::to_vec(p).map_err(|e| corrupt("agent presence", e))?;
    txn.open_table(AGENTS)
        .map_err(storage("open agents"))?
        .insert((p.tenant_id.as_str(), p.agent_id.as_str()), json.as_slice())
        .map_err(storage("write agent"))?;
    Ok(())
}

fn reserve_in(
    txn: &WriteTransaction,
    tenant: &str,
    r: &Reserve,
) -> Result<Option<String>, StoreError> {
    let conv = r.conversation_id.as_str();
    // An expired record reads as absent here too, as it does everywhere else.
    purge_expired(txn, tenant, conv, now_ms())?;
    if closed_in(txn, tenant, conv)? {
        return Err(StoreError::Closed(conv.to_string()));
    }
    let mut holders = txn.open_table(HOLDERS).map_err(storage("open holders"))?;
    for row in holders
        .range((tenant, conv, "")..)
        .map_err(storage("scan holders"))?
    {
        let (k, _) = row.map_err(storage("read holder"))?;
        let (t, c, agent) = k.value();
        if t != tenant || c != conv {
            break;
        }
        // A retried reserve gets the agent it took, if that one still fits what is asked.
        if !r.exclude.iter().any(|x| x == agent) && r.only.as_ref().is_none_or(|o| o == agent) {
            return Ok(Some(agent.to_string()));
        }
    }
    let mut candidates = Vec::new();
    {
        let agents = txn.open_table(AGENTS).map_err(storage("open agents"))?;
        for row in agents
            .range((tenant, "")..)
            .map_err(storage("scan agents"))?
        {
            let (k, v) = row.map_err(storage("read agent"))?;
            if k.value().0 != tenant {
                break;
            }
            // An unreadable agent takes no offers; it does not stop the tenant's routing.
            let Ok(p) = parse_agent(v.value()) else {
                continue;
            };
            let cap = p.capacity.get(&r.media).copied().unwrap_or(0);
            let active = p.active.get(&r.media).copied().unwrap_or(0);
            let fits = p.ready
                && active < cap
                && !r.exclude.contains(&p.agent_id)
                && r.only.as_ref().is_none_or(|o| *o == p.agent_id)
                && r.skills.iter().all(|s| p.skills.contains(s));
            if fits {
                candidates.push(p);
            }
        }
    }
    let Some(mut agent) = candidates
        .into_iter()
        .min_by(|a, b| (a.idle_since_ms, &a.agent_id).cmp(&(b.idle_since_ms, &b.agent_id)))
    else {
        return Ok(None);
    };
    *agent.active.entry(r.media.clone()).or_insert(0) += 1;
    // Busy from now: the next offer goes to another agent first (round robin among the idle).
    agent.idle_since_ms = r.now_ms;
    write_agent(txn, &agent)?;
    txn.open_table(SLOTS)
        .map_err(storage("open slots"))?
        .insert((tenant, agent.agent_id.as_str(), conv), r.media.as_str())
        .map_err(storage("write slot"))?;
    holders
        .insert((tenant, conv, agent.agent_id.as_str()), ())
        .map_err(storage("write holder"))?;
    Ok(Some(agent.agent_id))
}

fn release_in(
    txn: &WriteTransaction,
    tenant: &str,
    agent_id: &str,
    conversation_id: &str,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let media = txn
        .open_table(SLOTS)
        .map_err(storage("open slots"))?
        .remove((tenant, agent_id, conversation_id))
        .map_err(storage("remove slot"))?
        .map(|m| m.value().to_string());
    let Some(media) = media else {
        return Ok(false);
    };
    txn.open_table(HOLDERS)
        .map_err(storage("open holders"))?
        .remove((tenant, conversation_id, agent_id))
        .map_err(storage("remove holder"))?;
    // A damaged record loses no slot: its next state recounts them from `slots`.
    let agent = match agent_in(
        &txn.open_table(AGENTS).map_err(storage("open agents"))?,
        tenant,
        agent_id,
    ) {
        Err(StoreError::Corrupt(_)) => None,
        read => read?,
    };
    if let Some(mut agent) = agent {
        if let Some(n) = agent.active.get_mut(&media) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                agent.active.remove(&media);
            }
        }
        agent.idle_since_ms = now_ms;
        write_agent(txn, &agent)?;
    }
    Ok(true)
}

/// Removes every row of `def` in `range`; how many.
fn drain<'a, K, V, KR>(
    txn: &WriteTransaction,
    def: TableDefinition<K, V>,
    range: impl std::ops::RangeBounds<KR> + 'a,
) -> Result<u64, StoreError>
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
    KR: std::borrow::Borrow<K::SelfType<'a>> + 'a,
{
    let mut table = txn.open_table(def).map_err(storage("open table"))?;
    let mut n = 0;
    for row in table
        .extract_from_if(range, |_, _| true)
        .map_err(storage("purge"))?
    {
        row.map_err(storage("purge"))?;
        n += 1;
    }
    Ok(n)
}

/// The first string after every string that starts with `prefix` (not empty): the end of the
/// range of keys with that prefix.
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_string();
    // The mark prefixes end in `:`, so the last character always has a successor.
    if let Some(last) = end.pop() {
        end.push(char::from_u32(u32::from(last) + 1).unwrap_or(char::MAX));
    }
    end
}

/// Everything of `tenant` ([`SessionStore::purge_tenant`]), in one transaction. Tables lead
/// with the tenant (timers with their kind), so each is a range: `(tenant, ..)` up to the
/// first key of `tenant` + NUL, the string right after it.
fn purge_tenant_in(txn: &WriteTransaction, tenant: &str) -> Result<u64, StoreError> {
    let (t, next) = (tenant, format!("{tenant}\0"));
    let n = next.as_str();
    let mut removed = 0;
    // Expiries first: their time index is keyed by time, so each entry goes by its value.
    let expiries: Vec<(String, i64)> = {
        let mut expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
        let mut out = Vec::new();
        for row in expiry
            .extract_from_if((t, "")..(n, ""), |_, _| true)
            .map_err(storage("purge expiry"))?
        {
            let (k, at) = row.map_err(storage("purge expiry"))?;
            out.push((k.value().1.to_string(), at.value()));
        }
        out
    };
    let mut by_time = txn
        .open_table(EXPIRY_BY_TIME)
        .map_err(storage("open expiry"))?;
    for (conversation, at) in &expiries {
        by_time
            .remove((*at, t, conversation.as_str()))
            .map_err(storage("purge expiry"))?;
    }
    drop(by_time);
    removed += expiries.len() as u64;
    removed += drain(txn, CONVERSATIONS, (t, "")..(n, ""))?;
    removed += drain(txn, TRANSCRIPT_LEN, (t, "")..(n, ""))?;
    removed += drain(txn, ENTRIES, (t, "", 0)..(n, "", 0))?;
    removed += drain(txn, ENTRY_IDS, (t, "", "")..(n, "", ""))?;
    removed += drain(txn, AGENTS, (t, "")..(n, ""))?;
    removed += drain(txn, SLOTS, (t, "", "")..(n, "", ""))?;
    removed += drain(txn, HOLDERS, (t, "", "")..(n, "", ""))?;
    removed += drain(
        txn,
        QUEUE,
        (t, "", 0, i64::MIN, "")..(n, "", 0, i64::MIN, ""),
    )?;
    removed += drain(txn, QUEUE_INDEX, (t, "", "")..(n, "", ""))?;
    removed += purge_tenant_timers(txn, t)?;
    // Marks named after the tenant: chats started, customers' signs of life, start requests'
    // claims (the value, and its lifetime in `seen`).
    let claim_prefix = super::start_request_prefix(t);
    let claim_end = prefix_end(&claim_prefix);
    removed += drain(txn, CLAIMS, claim_prefix.as_str()..claim_end.as_str())?;
    for prefix in [
        super::start_mark(t, ""),
        super::customer_mark(t, ""),
        claim_seen_key(&claim_prefix),
    ] {
        let end = prefix_end(&prefix);
        let marks: Vec<(String, i64)> = {
            let mut seen = txn.open_table(SEEN).map_err(storage("open seen"))?;
            let mut out = Vec::new();
            for row in seen
                .extract_from_if(prefix.as_str()..end.as_str(), |_, _| true)
                .map_err(storage("purge seen"))?
            {
                let (k, at) = row.map_err(storage("purge seen"))?;
                out.push((k.value().to_string(), at.value()));
            }
            out
        };
        let mut by_time = txn.open_table(SEEN_BY_TIME).map_err(storage("open seen"))?;
        for (key, at) in &marks {
            by_time
                .remove((*at, key.as_str()))
                .map_err(storage("purge seen"))?;
        }
        removed += marks.len() as u64;
    }
    Ok(removed)
}

/// The tenant's timers of every kind: the index leads with the kind, so it goes kind by kind,
/// skipping from one kind to the next.
fn purge_tenant_timers(txn: &WriteTransaction, tenant: &str) -> Result<u64, StoreError> {
    let next = format!("{tenant}\0");
    let mut index = txn
        .open_table(TIMER_INDEX)
        .map_err(storage("open timers"))?;
    let mut timers = txn.open_table(TIMERS).map_err(storage("open timers"))?;
    let mut removed = 0;
    let mut from = String::new();
    loop {
        let kind = match index
            .range((from.as_str(), "", "")..)
            .map_err(storage("scan timers"))?
            .next()
        {
            Some(row) => row.map_err(storage("read timer"))?.0.value().0.to_string(),
            None => break,
        };
        let k = kind.as_str();
        let due: Vec<(String, i64)> = {
            let mut out = Vec::new();
            for row in index
                .extract_from_if((k, tenant, "")..(k, next.as_str(), ""), |_, _| true)
                .map_err(storage("purge timers"))?
            {
                let (key, at) = row.map_err(storage("purge timers"))?;
                out.push((key.value().2.to_string(), at.value()));
            }
            out
        };
        let mut leases = txn
            .open_table(TIMER_LEASES)
            .map_err(storage("open timers"))?;
        for (id, at) in &due {
            timers
                .remove((k, *at, tenant, id.as_str()))
                .map_err(storage("purge timers"))?;
            leases
                .remove((k, tenant, id.as_str()))
                .map_err(storage("purge timers"))?;
        }
        removed += due.len() as u64;
        from = format!("{kind}\0");
    }
    Ok(removed)
}

#[async_trait]
impl SessionStore for EmbeddedStore {
    async fn put_conversation(&self, c: &Conversation) -> Result<bool, StoreError> {
        let expected = c.version;
        let stored = Conversation {
            version: super::next_version(c)?,
            ..c.clone()
        };
        let json = serde_json::to_vec(&stored).map_err(|e| corrupt("conversation", e))?;
        let (tenant, id) = (c.tenant_id.clone(), c.conversation_id.clone());
        self.write(move |txn| {
            // A replaced record keeps its expiry (as Redis `SET KEEPTTL`); an expired one is
            // gone first, so the new record starts without one.
            purge_expired(txn, &tenant, &id, now_ms())?;
            let mut table = txn
                .open_table(CONVERSATIONS)
                .map_err(storage("open conversations"))?;
            let current = match table
                .get((tenant.as_str(), id.as_str()))
                .map_err(storage("read conversation"))?
            {
                Some(v) => Some(
                    serde_json::from_slice::<Conversation>(v.value())
                        .map_err(|e| corrupt("conversation", e))?
                        .version,
                ),
                None => None,
            };
            if current.unwrap_or(0) != expected {
                return Ok(false);
            }
            let new = current.is_none();
            table
                .insert((tenant.as_str(), id.as_str()), json.as_slice())
                .map_err(storage("write conversation"))?;
            if new {
                // The transcript's expiry while it had no record (`append`) ends with it, a
                // closed record's too: that one expires when the close expires it.
                clear_expiry(txn, &tenant, &id)?;
            }
            Ok(true)
        })
        .await
    }

    async fn conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Option<Conversation>, StoreError> {
        let (tenant, id) = (tenant.to_string(), conversation_id.to_string());
        self.read(move |txn| {
            let expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
            if expired_in(&expiry, &tenant, &id, now_ms())? {
                return Ok(None);
            }
            let table = txn
                .open_table(CONVERSATIONS)
                .map_err(storage("open conversations"))?;
            let row = table
                .get((tenant.as_str(), id.as_str()))
                .map_err(storage("read conversation"))?;
            row.map(|v| serde_json::from_slice(v.value()).map_err(|e| corrupt("conversation", e)))
                .transpose()
        })
        .await
    }

    async fn expire_conversation(
        &self,
        tenant: &str,
        conversation_id: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (tenant, id) = (tenant.to_string(), conversation_id.to_string());
        self.write(move |txn| {
            let now = now_ms();
            purge_expired(txn, &tenant, &id, now)?;
            // Nothing to expire (as Redis, whose PEXPIRE of a missing key does nothing): an
            // expiry kept for a conversation saved later would make it vanish early.
            let key = (tenant.as_str(), id.as_str());
            let exists = txn
                .open_table(CONVERSATIONS)
                .map_err(storage("open conversations"))?
                .get(key)
                .map_err(storage("read conversation"))?
                .is_some()
                || txn
                    .open_table(TRANSCRIPT_LEN)
                    .map_err(storage("open transcript"))?
                    .get(key)
                    .map_err(storage("read transcript"))?
                    .is_some();
            if !exists {
                return Ok(());
            }
            set_expiry(txn, &tenant, &id, now.saturating_add(ttl_ms(ttl)))
        })
        .await
    }

    async fn append(
        &self,
        tenant: &str,
        conversation_id: &str,
        entry: &NewEntry,
    ) -> Result<Appended, StoreError> {
        let (tenant, id, entry) = (
            tenant.to_string(),
            conversation_id.to_string(),
            entry.clone(),
        );
        let orphan_ttl = self.orphan_ttl;
        self.write(move |txn| {
            purge_expired(txn, &tenant, &id, now_ms())?;
            let (t, c) = (tenant.as_str(), id.as_str());
            let mut ids = txn
                .open_table(ENTRY_IDS)
                .map_err(storage("open entry ids"))?;
            let event_key = format!("e:{}", entry.event_id);
            let message_key = super::message_key(&entry);
            for (i, k) in std::iter::once(&event_key)
                .chain(message_key.as_ref())
                .enumerate()
            {
                if let Some(p) = ids
                    .get((t, c, k.as_str()))
                    .map_err(storage("read entry id"))?
                {
                    return Ok(Appended {
                        position: p.value(),
                        duplicate: true,
                        retried: i == 1,
                    });
                }
            }
            if closed_in(txn, t, c)? {
                return Err(StoreError::Closed(c.to_string()));
            }
            let mut len = txn
                .open_table(TRANSCRIPT_LEN)
                .map_err(storage("open transcripts"))?;
            let position = len
                .get((t, c))
                .map_err(storage("read transcript length"))?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            let json =
                serde_json::to_vec(&Entry { position, entry }).map_err(|e| corrupt("entry", e))?;
            txn.open_table(ENTRIES)
                .map_err(storage("open entries"))?
                .insert((t, c, position), json.as_slice())
                .map_err(storage("write entry"))?;
            len.insert((t, c), position)
                .map_err(storage("write transcript length"))?;
            ids.insert((t, c, event_key.as_str()), position)
                .map_err(storage("write entry id"))?;
            if let Some(k) = &message_key {
                ids.insert((t, c, k.as_str()), position)
                    .map_err(storage("write entry id"))?;
            }
            drop((ids, len));
            let recorded = txn
                .open_table(CONVERSATIONS)
                .map_err(storage("open conversations"))?
                .get((t, c))
                .map_err(storage("read conversation"))?
                .is_some();
            let expiring = txn
                .open_table(EXPIRY)
                .map_err(storage("open expiry"))?
                .get((t, c))
                .map_err(storage("read expiry"))?
                .is_some();
            if !recorded && !expiring {
                // No record (yet): kept no longer than an orphan (see `put_conversation`).
                set_expiry(txn, t, c, now_ms().saturating_add(ttl_ms(orphan_ttl)))?;
            }
            Ok(Appended {
                position,
                duplicate: false,
                retried: false,
            })
        })
        .await
    }

    async fn transcript_len(&self, tenant: &str, conversation_id: &str) -> Result<u64, StoreError> {
        let (tenant, id) = (tenant.to_string(), conversation_id.to_string());
        self.read(move |txn| {
            let (t, c) = (tenant.as_str(), id.as_str());
            let expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
            if expired_in(&expiry, t, c, now_ms())? {
                return Ok(0);
            }
            // The length `append` keeps beside the entries.
            let len = txn
                .open_table(TRANSCRIPT_LEN)
                .map_err(storage("open transcripts"))?
                .get((t, c))
                .map_err(storage("read transcript length"))?
                .map_or(0, |v| v.value());
            Ok(len)
        })
        .await
    }

    async fn transcript(
        &self,
        tenant: &str,
        conversation_id: &str,
        from: u64,
        max: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let (tenant, id) = (tenant.to_string(), conversation_id.to_string());
        self.read(move |txn| {
            let (t, c) = (tenant.as_str(), id.as_str());
            let expiry = txn.open_table(EXPIRY).map_err(storage("open expiry"))?;
            if max == 0 || expired_in(&expiry, t, c, now_ms())? {
                return Ok(Vec::new());
            }
            let entries = txn.open_table(ENTRIES).map_err(storage("open entries"))?;
            let mut out = Vec::new();
            for row in entries
                .range((t, c, from.max(1))..=(t, c, u64::MAX))
                .map_err(storage("scan entries"))?
                .take(max)
            {
                let (k, v) = row.map_err(storage("read entry"))?;
                let entry: Entry =
                    serde_json::from_slice(v.value()).map_err(|e| corrupt("entry", e))?;
                if entry.position != k.value().2 {
                    return Err(StoreError::Corrupt(format!(
                        "transcript of {c}: entry at {} says position {}",
                        k.value().2,
                        entry.position
                    )));
                }
                out.push(entry);
            }
            Ok(out)
        })
        .await
    }

    async fn update_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        update: &PresenceUpdate,
        now_ms: i64,
    ) -> Result<AgentPresence, StoreError> {
        let (tenant, agent_id) = (tenant.to_string(), agent_id.to_string());
        let PresenceUpdate {
            ready,
            skills,
            capacity,
            limits,
        } = update.clone();
        self.write(move |txn| {
            let old = agent_in(
                &txn.open_table(AGENTS).map_err(storage("open agents"))?,
                &tenant,
                &agent_id,
            );
            let (active, idle_since_ms) = match old {
                Ok(Some(old)) if old.ready || !ready => (old.active, old.idle_since_ms),
                Ok(Some(old)) => (old.active, now_ms),
                Ok(None) => (BTreeMap::new(), now_ms),
                // An unreadable record is overwritten (the agent's next state repairs it, as
                // on Redis), its counts taken from the slots it holds.
                Err(StoreError::Corrupt(e)) => {
                    tracing::warn!(agent = %agent_id, error = %e, "an unreadable agent record replaced");
                    (active_from_slots(txn, &tenant, &agent_id)?, now_ms)
                }
                Err(e) => return Err(e),
            };
            let p = AgentPresence {
                tenant_id: tenant,
                agent_id,
                ready,
                skills,
                capacity,
                active,
                idle_since_ms,
                limits,
            };
            write_agent(txn, &p)?;
            Ok(p)
        })
        .await
    }

    async fn presence(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentPresence>, StoreError> {
        let (tenant, agent_id) = (tenant.to_string(), agent_id.to_string());
        self.read(move |txn| {
            agent_in(
                &txn.open_table(AGENTS).map_err(storage("open agents"))?,
                &tenant,
                &agent_id,
            )
        })
        .await
    }

    async fn change_presence(
        &self,
        tenant: &str,
        agent_id: &str,
        change: &PresenceChange,
    ) -> Result<Option<AgentPresence>, StoreError> {
        let (tenant, agent_id, change) = (tenant.to_string(), agent_id.to_string(), change.clone());
        self.write(move |txn| {
            let old = agent_in(
                &txn.open_table(AGENTS).map_err(storage("open agents"))?,
                &tenant,
                &agent_id,
            )?;
            let Some(mut p) = old else {
                return Ok(None);
            };
            p.change(&change);
            write_agent(txn, &p)?;
            Ok(Some(p))
        })
        .await
    }

    async fn reserve_agent(&self, tenant: &str, r: &Reserve) -> Result<Option<String>, StoreError> {
        let (tenant, r) = (tenant.to_string(), r.clone());
        self.write(move |txn| reserve_in(txn, &tenant, &r)).await
    }

    async fn release_agent(
        &self,
        tenant: &str,
        agent_id: &str,
        _media: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let (tenant, agent_id, conv) = (
            tenant.to_string(),
            agent_id.to_string(),
            conversation_id.to_string(),
        );
        self.write(move |txn| release_in(txn, &tenant, &agent_id, &conv, now_ms))
            .await
    }

    async fn slot_holders(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let (tenant, conv) = (tenant.to_string(), conversation_id.to_string());
        self.read(move |txn| {
            let holders = txn.open_table(HOLDERS).map_err(storage("open holders"))?;
            let mut out = Vec::new();
            for row in holders
                .range((tenant.as_str(), conv.as_str(), "")..)
                .map_err(storage("scan holders"))?
            {
                let (k, _) = row.map_err(storage("read holder"))?;
                let (t, c, agent) = k.value();
                if t != tenant || c != conv {
                    break;
                }
                out.push(agent.to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn agent_conversations(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Vec<String>, StoreError> {
        let (tenant, agent_id) = (tenant.to_string(), agent_id.to_string());
        self.read(move |txn| {
            let slots = txn.open_table(SLOTS).map_err(storage("open slots"))?;
            let held = agent_slots(&slots, &tenant, &agent_id)?;
            Ok(held.into_iter().map(|(c, _)| c).collect())
        })
        .await
    }

    async fn enqueue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
        priority: i64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let (tenant, queue, conv) = (
            tenant.to_string(),
            queue_id.to_string(),
            conversation_id.to_string(),
        );
        self.write(move |txn| {
            let (t, q, c) = (tenant.as_str(), queue.as_str(), conv.as_str());
            let mut index = txn.open_table(QUEUE_INDEX).map_err(storage("open queue"))?;
            if index
                .get((t, q, c))
                .map_err(storage("read queue"))?
                .is_some()
            {
                return Ok(());
            }
            let rank = rank(priority);
            index
                .insert((t, q, c), (rank, at_ms))
                .map_err(storage("write queue"))?;
            txn.open_table(QUEUE)
                .map_err(storage("open queue"))?
                .insert((t, q, rank, at_ms, c), ())
                .map_err(storage("write queue"))?;
            Ok(())
        })
        .await
    }

    async fn dequeue(
        &self,
        tenant: &str,
        queue_id: &str,
        conversation_id: &str,
    ) -> Result<bool, StoreError> {
        let (tenant, queue, conv) = (
            tenant.to_string(),
            queue_id.to_string(),
            conversation_id.to_string(),
        );
        self.write(move |txn| {
            let (t, q, c) = (tenant.as_str(), queue.as_str(), conv.as_str());
            let place = txn
                .open_table(QUEUE_INDEX)
                .map_err(storage("open queue"))?
                .remove((t, q, c))
                .map_err(storage("remove from queue"))?
                .map(|v| v.value());
            let Some((rank, at)) = place else {
                return Ok(false);
            };
            txn.open_table(QUEUE)
                .map_err(storage("open queue"))?
                .remove((t, q, rank, at, c))
                .map_err(storage("remove from queue"))?;
            Ok(true)
        })
        .await
    }

    async fn waiting(
        &self,
        tenant: &str,
        queue_id: &str,
        max: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (tenant, queue) = (tenant.to_string(), queue_id.to_string());
        self.read(move |txn| {
            let (t, q) = (tenant.as_str(), queue.as_str());
            let table = txn.open_table(QUEUE).map_err(storage("open queue"))?;
            let mut out = Vec::new();
            for row in table
                .range((t, q, 0, i64::MIN, "")..)
                .map_err(storage("scan queue"))?
            {
                if out.len() >= max {
                    break;
                }
                let (k, _) = row.map_err(storage("read queue"))?;
                let (kt, kq, _, _, c) = k.value();
                if kt != t || kq != q {
                    break;
                }
                out.push(c.to_string());
            }
            Ok(out)
        })
        .await
    }

    async fn schedule(&self, timer: &Timer, due_ms: i64) -> Result<(), StoreError> {
        let timer = timer.clone();
        self.write(move |txn| {
            let (k, t, id) = (timer.kind.as_str(), timer.tenant_id.as_str(), &*timer.id);
            let old = txn
                .open_table(TIMER_INDEX)
                .map_err(storage("open timers"))?
                .insert((k, t, id), due_ms)
                .map_err(storage("write timer"))?
                .map(|v| v.value());
            let mut timers = txn.open_table(TIMERS).map_err(storage("open timers"))?;
            if let Some(old) = old {
                timers
                    .remove((k, old, t, id))
                    .map_err(storage("remove timer"))?;
            }
            timers
                .insert((k, due_ms, t, id), ())
                .map_err(storage("write timer"))?;
            txn.open_table(TIMER_LEASES)
                .map_err(storage("open timers"))?
                .remove((k, t, id))
                .map_err(storage("write timer"))?;
            Ok(())
        })
        .await
    }

    async fn cancel(&self, timer: &Timer) -> Result<(), StoreError> {
        let timer = timer.clone();
        self.write(move |txn| {
            let (k, t, id) = (timer.kind.as_str(), timer.tenant_id.as_str(), &*timer.id);
            let old = txn
                .open_table(TIMER_INDEX)
                .map_err(storage("open timers"))?
                .remove((k, t, id))
                .map_err(storage("remove timer"))?
                .map(|v| v.value());
            if let Some(old) = old {
                txn.open_table(TIMERS)
                    .map_err(storage("open timers"))?
                    .remove((k, old, t, id))
                    .map_err(storage("remove timer"))?;
            }
            txn.open_table(TIMER_LEASES)
                .map_err(storage("open timers"))?
                .remove((k, t, id))
                .map_err(storage("remove timer"))?;
            Ok(())
        })
        .await
    }

    async fn claim_due(
        &self,
        kind: &str,
        now_ms: i64,
        max: usize,
    ) -> Result<Vec<Timer>, StoreError> {
        let kind = kind.to_string();
        self.write(move |txn| {
            let mut timers = txn.open_table(TIMERS).map_err(storage("open timers"))?;
            let mut due = Vec::new();
            for row in timers
                .range((kind.as_str(), i64::MIN, "", "")..)
                .map_err(storage("scan timers"))?
            {
                if due.len() >= max {
                    break;
                }
                let (k, _) = row.map_err(storage("read timer"))?;
                let (k, at, t, id) = k.value();
                if k != kind || at > now_ms {
                    break;
                }
                due.push((at, t.to_string(), id.to_string()));
            }
            let mut index = txn
                .open_table(TIMER_INDEX)
                .map_err(storage("open timers"))?;
            let mut leases = txn
                .open_table(TIMER_LEASES)
                .map_err(storage("open timers"))?;
            let lease = super::timer_lease_until(now_ms);
            let mut out = Vec::with_capacity(due.len());
            for (at, tenant_id, id) in due {
                let (k, t, i) = (kind.as_str(), tenant_id.as_str(), id.as_str());
                timers
                    .remove((k, at, t, i))
                    .map_err(storage("remove timer"))?;
                timers
                    .insert((k, lease, t, i), ())
                    .map_err(storage("lease timer"))?;
                index
                    .insert((k, t, i), lease)
                    .map_err(storage("lease timer"))?;
                leases
                    .insert((k, t, i), lease)
                    .map_err(storage("lease timer"))?;
                out.push(Timer {
                    kind: kind.clone(),
                    tenant_id,
                    id,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn complete_timer(&self, timer: &Timer, now_ms: i64) -> Result<(), StoreError> {
        let timer = timer.clone();
        let lease = super::timer_lease_until(now_ms);
        self.write(move |txn| {
            let (k, t, id) = (timer.kind.as_str(), timer.tenant_id.as_str(), &*timer.id);
            let mut index = txn
                .open_table(TIMER_INDEX)
                .map_err(storage("open timers"))?;
            let at = index
                .get((k, t, id))
                .map_err(storage("read timer"))?
                .map(|v| v.value());
            let mut leases = txn
                .open_table(TIMER_LEASES)
                .map_err(storage("open timers"))?;
            let leased = leases
                .get((k, t, id))
                .map_err(storage("read timer"))?
                .map(|v| v.value());
            if at == Some(lease) && leased == Some(lease) {
                index.remove((k, t, id)).map_err(storage("remove timer"))?;
                txn.open_table(TIMERS)
                    .map_err(storage("open timers"))?
                    .remove((k, lease, t, id))
                    .map_err(storage("remove timer"))?;
                leases.remove((k, t, id)).map_err(storage("remove timer"))?;
            }
            Ok(())
        })
        .await
    }

    async fn remember(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.set_seen(key, ttl, true).await
    }

    async fn claim(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |txn| {
            let now = now_ms();
            sweep_seen(txn, now)?;
            let lifetime = claim_seen_key(&key);
            let mut claims = txn.open_table(CLAIMS).map_err(storage("open claims"))?;
            let live = seen_until(txn, &lifetime)?.is_some_and(|at| at > now);
            if live {
                if let Some(held) = claims.get(key.as_str()).map_err(storage("read claim"))? {
                    return Ok(Some(held.value().to_string()));
                }
            }
            claims
                .insert(key.as_str(), value.as_str())
                .map_err(storage("write claim"))?;
            set_seen_in(txn, &lifetime, now.saturating_add(ttl_ms(ttl).max(1)))?;
            Ok(None)
        })
        .await
    }

    async fn refresh(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        self.set_seen(key, ttl, false).await.map(|_| ())
    }

    async fn seen(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.read(move |txn| {
            let seen = txn.open_table(SEEN).map_err(storage("open seen"))?;
            let until = seen
                .get(key.as_str())
                .map_err(storage("read seen"))?
                .map(|v| v.value());
            Ok(until.is_some_and(|at| at > now_ms()))
        })
        .await
    }

    async fn forget(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_string();
        self.write(move |txn| {
            let mut seen = txn.open_table(SEEN).map_err(storage("open seen"))?;
            let at = seen
                .remove(key.as_str())
                .map_err(storage("remove seen"))?
                .map(|v| v.value());
            if let Some(at) = at {
                txn.open_table(SEEN_BY_TIME)
                    .map_err(storage("open seen"))?
                    .remove((at, key.as_str()))
                    .map_err(storage("remove seen"))?;
            }
            Ok(())
        })
        .await
    }

    async fn purge_tenant(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_string();
        self.write(move |txn| purge_tenant_in(txn, &tenant)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|_| Ok(())).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_sorts_highest_priority_first() {
        let priorities = [i64::MIN, -5, -1, 0, 1, 7, i64::MAX];
        let mut ranked: Vec<(u64, i64)> = priorities.iter().map(|&p| (rank(p), p)).collect();
        ranked.sort();
        let order: Vec<i64> = ranked.into_iter().map(|(_, p)| p).collect();
        assert_eq!(order, [i64::MAX, 7, 1, 0, -1, -5, i64::MIN]);
    }

    #[tokio::test]
    async fn corrupt_rows_are_reported_not_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        store
            .write(|txn| {
                txn.open_table(CONVERSATIONS)
                    .map_err(storage("open"))?
                    .insert(("t", "c"), b"{not json".as_slice())
                    .map_err(storage("insert"))?;
                txn.open_table(AGENTS)
                    .map_err(storage("open"))?
                    .insert(("t", "a"), b"[]".as_slice())
                    .map_err(storage("insert"))?;
                Ok(())
            })
            .await
            .expect("write");
        assert!(matches!(
            store.conversation("t", "c").await,
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            store.presence("t", "a").await,
            Err(StoreError::Corrupt(_))
        ));
        let r = Reserve {
            conversation_id: "c".into(),
            media: "chat".into(),
            skills: vec![],
            exclude: vec![],
            now_ms: 0,
            only: None,
        };
        assert!(matches!(
            store.reserve_agent("t", &r).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    /// A stored record whose version is at the limit is reported by the save that would go
    /// past it, not an overflow (a panic in debug builds).
    #[tokio::test]
    async fn a_version_at_its_limit_is_corrupt_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(dir.path()).await.expect("open"));
        let record = serde_json::json!({
            "tenant_id": "t", "conversation_id": "c", "channel": "WEB_CHAT", "state": "queued",
            "customer": {"participant_id": "p", "nickname": "P", "kind": "customer"},
            "contact": {}, "user_data": {}, "subject": null, "queue_id": null, "bot_id": null,
            "agent_id": null, "offered_to": null, "declined_by": [], "files": 0,
            "created_at_ms": 1, "last_activity_ms": 1, "closed_reason": null,
            "routing": {"skills": [], "priority": 0, "is_async": false, "applied": []},
            "version": u64::MAX,
        });
        let bytes = serde_json::to_vec(&record).expect("json");
        store
            .write(move |txn| {
                txn.open_table(CONVERSATIONS)
                    .map_err(storage("open"))?
                    .insert(("t", "c"), bytes.as_slice())
                    .map_err(storage("insert"))?;
                Ok(())
            })
            .await
            .expect("write");
        let read = store
            .conversation("t", "c")
            .await
            .expect("get")
            .expect("some");
        assert_eq!(read.version, u64::MAX);
        let saved = tokio::spawn(async move { store.put_conversation(&read).await })
            .await
            .expect("put_conversation panicked");
        assert!(matches!(saved, Err(StoreError::Corrupt(_))), "{saved:?}");
    }

    /// A claim whose lifetime ran out is swept with its `seen` entry: no row is left behind.
    #[tokio::test]
    async fn expired_claims_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        let ttl = Duration::from_millis(1);
        assert_eq!(store.claim("k1", "v1", ttl).await.expect("claim"), None);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Any write sweeps what ran out.
        assert_eq!(
            store
                .claim("k2", "v2", Duration::from_secs(60))
                .await
                .expect("claim"),
            None
        );
        let left = store
            .read(|txn| {
                let claims = txn.open_table(CLAIMS).map_err(storage("open"))?;
                let mut keys = Vec::new();
                for row in claims.iter().map_err(storage("iter"))? {
                    keys.push(row.map_err(storage("row"))?.0.value().to_string());
                }
                Ok(keys)
            })
            .await
            .expect("read");
        assert_eq!(left, ["k2"]);
    }

    /// One agent's damaged record does not stop the tenant's routing: a reserve passes over
    /// it to an agent that fits. The agent's next state repairs it, counting the slots it
    /// holds; a release while it is damaged frees its slot all the same.
    #[tokio::test]
    async fn a_reserve_passes_over_a_damaged_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("open");
        let chat = |n: u32| BTreeMap::from([("chat".to_string(), n)]);
        let reserve = |conversation: &str, only: Option<&str>| Reserve {
            conversation_id: conversation.into(),
            media: "chat".into(),
            skills: vec![],
            exclude: vec![],
            now_ms: 10,
            only: only.map(str::to_string),
        };
        let damage = || {
            store.write(|txn| {
                txn.open_table(AGENTS)
                    .map_err(storage("open"))?
                    .insert(("t", "a1"), b"{broken".as_slice())
                    .map_err(storage("insert"))?;
                Ok(())
            })
        };
        store
            .set_presence("t", "a1", true, &[], &chat(2), 1)
            .await
            .expect("a1");
        let held = store
            .reserve_agent("t", &reserve("c0", Some("a1")))
            .await
            .expect("reserve");
        assert_eq!(held.as_deref(), Some("a1"));
        store
            .set_presence("t", "a2", true, &[], &chat(1), 5)
            .await
            .expect("a2");
        // The reserve made a1 busy from 10; not ready and ready again, it is the longest idle
        // (since 3), with room for one more, when it is damaged.
        store
            .set_presence("t", "a1", false, &[], &chat(2), 2)
            .await
            .expect("a1");
        store
            .set_presence("t", "a1", true, &[], &chat(2), 3)
            .await
            .expect("a1");
        // The agent's next state repairs the record; what it reads then.
        let repair = |at: i64| {
            let store = &store;
            async move {
                store
                    .set_presence("t", "a1", true, &[], &chat(2), at)
                    .await
                    .expect("repair");
                store
                    .presence("t", "a1")
                    .await
                    .expect("readable")
                    .expect("a1")
            }
        };
        damage().await.expect("damage");
        let got = store
            .reserve_agent("t", &reserve("c1", None))
            .await
            .expect("reserve");
        assert_eq!(got.as_deref(), Some("a2"));

        assert_eq!(repair(6).await.active.get("chat"), Some(&1), "c0 counted");
        let got = store
            .reserve_agent("t", &reserve("c2", None))
            .await
            .expect("reserve");
        assert_eq!(got.as_deref(), Some("a1"));
        let got = store
            .reserve_agent("t", &reserve("c3", None))
            .await
            .expect("reserve");
        assert_eq!(got, None, "a1 is full at two");

        damage().await.expect("damage");
        assert!(store
            .release_agent("t", "a1", "chat", "c0", 11)
            .await
            .expect("release"));
        assert_eq!(
            repair(12).await.active.get("chat"),
            Some(&1),
            "only c2 held"
        );
    }
}
