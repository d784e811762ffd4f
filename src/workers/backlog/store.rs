//! The backlog table (`effect_backlog`, migration 0011) in the provisioning database: one SQL
//! text for PostgreSQL and SQLite. Rows are queued per role and conversation in `seq` order.
//!
//! Claims are compare-and-sets on `due_at_ms` (the time the claimer read is replaced by its
//! lease end), so two pods never drive one head at once while the lease runs; removing and
//! rescheduling check the lease too, so a pod whose lease ran out changes nothing.

use base64::Engine;
use bytes::Bytes;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::bus::{Headers, Message};

#[derive(Debug, thiserror::Error)]
pub enum BacklogError {
    #[error("effect backlog unavailable: {0}")]
    Database(#[from] sqlx::Error),
}

/// A queued event: its conversation, the record as delivered and its retry state.
#[derive(Debug, Clone)]
pub struct Item {
    pub tenant_id: String,
    pub conversation_id: String,
    pub event_id: String,
    pub message: Message,
    /// Failed tries so far that count against the limit.
    pub attempts: i64,
    /// This pod's lease end while it drives the item (the value its claim wrote).
    pub lease_until_ms: i64,
    /// The last try's error as stored (see [`Item::pending_dead_letter`]).
    pub last_error: Option<String>,
    /// A column of the row that could not be read (the rest of the record as well as it
    /// could be): the item is dead-lettered as it is instead of holding its conversation.
    pub unreadable: Option<&'static str>,
}

/// How `last_error` marks an item already settled as a dead letter whose publish failed:
/// `dead-letter pending [<reason>] <detail>`.
const PENDING_DEAD_LETTER: &str = "dead-letter pending [";

impl Item {
    /// The error to store for an item settled as a dead letter (`reason`, `detail`) that the
    /// dead-letter topic did not take yet.
    pub fn pending_dead_letter_error(reason: &str, detail: &str) -> String {
        format!("{PENDING_DEAD_LETTER}{reason}] {detail}")
    }

    /// `(reason, detail)` when the item was settled as a dead letter and only its publish is
    /// left: the effect is not run again (a refused GWS call is not made again every few
    /// seconds while the dead-letter topic is down).
    pub fn pending_dead_letter(&self) -> Option<(&str, &str)> {
        self.last_error
            .as_deref()?
            .strip_prefix(PENDING_DEAD_LETTER)?
            .split_once("] ")
    }
}

/// What identifies a queued event.
#[derive(Debug, Clone, Copy)]
pub struct Key<'a> {
    pub tenant_id: &'a str,
    pub conversation_id: &'a str,
    pub event_id: &'a str,
}

/// The backlog's size for a role: queued events and the oldest one's age.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Depth {
    pub events: i64,
    pub oldest_created_at_ms: Option<i64>,
}

const COLUMNS: &str = "role, tenant_id, conversation_id, seq, event_id, topic, source_partition, \
    source_offset, record_key, payload, headers_json, due_at_ms, attempts, last_error, created_at_ms";
const RETURNED: &str = "tenant_id, conversation_id, event_id, topic, source_partition, \
    source_offset, record_key, payload, headers_json, attempts, due_at_ms, created_at_ms, last_error";
const CONVERSATION: &str = "role = $1 AND tenant_id = $2 AND conversation_id = $3";
/// `due_at_ms` of an event queued behind its conversation's head: due only once it is the
/// head ([`Backlog::remove`] makes it due then, as of its arrival), so the scheduler's claim query, which walks
/// due rows, never walks the queued ones (a long outage queues tens of thousands).
const QUEUED_MS: i64 = i64::MAX;
/// The head of its conversation: no earlier row in the same queue.
const HEAD: &str = "NOT EXISTS (SELECT 1 FROM effect_backlog p WHERE p.role = b.role \
    AND p.tenant_id = b.tenant_id AND p.conversation_id = b.conversation_id AND p.seq < b.seq)";

/// The record's columns as bound values.
struct Record {
    topic: String,
    partition: i64,
    offset: i64,
    key: String,
    payload: String,
    headers: String,
}

impl Record {
    fn of(m: &Message) -> Record {
        Record {
            topic: m.topic.clone(),
            partition: i64::from(m.partition),
            offset: i64::try_from(m.offset).unwrap_or(i64::MAX),
            key: m.key.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(&m.payload),
            // A list of string pairs always serialises.
            headers: serde_json::to_string(&m.headers).unwrap_or_else(|_| "[]".into()),
        }
    }
}

/// The backlog of one role.
#[derive(Clone)]
pub struct Backlog {
    pool: AnyPool,
    role: &'static str,
}

impl Backlog {
    pub fn new(pool: AnyPool, role: &'static str) -> Self {
        Self { pool, role }
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    /// Whether the conversation has events in the backlog: the cheap check before
    /// [`Self::queue_behind`], which carries the whole record.
    pub async fn holds(
        &self,
        tenant_id: &str,
        conversation_id: &str,
    ) -> Result<bool, BacklogError> {
        let row = sqlx::query(&format!(
            "SELECT 1 AS one FROM effect_backlog WHERE {CONVERSATION} LIMIT 1"
        ))
        .bind(self.role)
        .bind(tenant_id)
        .bind(conversation_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Queues the event behind its conversation's backlog if it has one (or already holds
    /// this event: a redelivery); `false` when the conversation has none, and nothing was
    /// written. Not due until it is the head (see [`QUEUED_MS`]).
    pub async fn queue_behind(
        &self,
        key: Key<'_>,
        message: &Message,
        now_ms: i64,
    ) -> Result<bool, BacklogError> {
        // `DO UPDATE` rather than `DO NOTHING` so a redelivery of a queued event counts as a
        // row: it is in the backlog and must not jump the queue.
        let sql = format!(
            "INSERT INTO effect_backlog ({COLUMNS}) \
             SELECT $1, $2, $3, MAX(seq) + 1, $4, $5, $6, $7, $8, $9, $10, {QUEUED_MS}, 0, NULL, $11 \
             FROM effect_backlog WHERE {CONVERSATION} HAVING COUNT(*) > 0 \
             ON CONFLICT (role, tenant_id, conversation_id, event_id) \
             DO UPDATE SET event_id = excluded.event_id"
        );
        let done = self
            .bind_record(sqlx::query(&sql), key, &Record::of(message))
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Adds an event whose effect failed `attempts` counted times, at the tail of its
    /// conversation (the head when the conversation had no backlog), due at `due_at_ms`. A
    /// redelivery already queued is kept.
    pub async fn push(
        &self,
        key: Key<'_>,
        message: &Message,
        due_at_ms: i64,
        error: &str,
        attempts: i64,
        now_ms: i64,
    ) -> Result<(), BacklogError> {
        let sql = format!(
            "INSERT INTO effect_backlog ({COLUMNS}) \
             SELECT $1, $2, $3, COALESCE(MAX(seq), 0) + 1, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 \
             FROM effect_backlog WHERE {CONVERSATION} \
             ON CONFLICT (role, tenant_id, conversation_id, event_id) DO NOTHING"
        );
        self.bind_record(sqlx::query(&sql), key, &Record::of(message))
            .bind(due_at_ms)
            .bind(attempts)
            .bind(error)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Binds `$1`–`$10` of an insert: the role, the key and the record.
    fn bind_record<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        key: Key<'q>,
        r: &Record,
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        query
            .bind(self.role)
            .bind(key.tenant_id)
            .bind(key.conversation_id)
            .bind(key.event_id)
            .bind(r.topic.clone())
            .bind(r.partition)
            .bind(r.offset)
            .bind(r.key.clone())
            .bind(r.payload.clone())
            .bind(r.headers.clone())
    }

    /// Claims up to `limit` conversation heads due at `now_ms`, each for `lease_ms` from its
    /// claim. A row that cannot be read is skipped (and reported); a failure after some claims
    /// returns those.
    pub async fn claim_due(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Item>, BacklogError> {
        let rows = sqlx::query(&format!(
            "SELECT tenant_id, conversation_id, event_id, due_at_ms FROM effect_backlog b \
             WHERE role = $1 AND due_at_ms <= $2 AND {HEAD} ORDER BY due_at_ms LIMIT $3"
        ))
        .bind(self.role)
        .bind(now_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let (tenant_id, conversation_id, event_id): (String, String, String) = (
                row.try_get("tenant_id")?,
                row.try_get("conversation_id")?,
                row.try_get("event_id")?,
            );
            let key = Key {
                tenant_id: &tenant_id,
                conversation_id: &conversation_id,
                event_id: &event_id,
            };
            let seen: i64 = row.try_get("due_at_ms")?;
            match self.claim(key, seen, lease_ms).await {
                Ok(Some(item)) => claimed.push(item),
                Ok(None) => {}
                Err(e) if claimed.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(role = self.role, error = %e, "backlog claim interrupted");
                    break;
                }
            }
        }
        Ok(claimed)
    }

    /// Claims the conversation's next head for `lease_ms`, if it has one and it is due at
    /// `now_ms`.
    pub async fn claim_next(
        &self,
        tenant_id: &str,
        conversation_id: &str,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Item>, BacklogError> {
        let row = sqlx::query(&format!(
            "SELECT event_id, due_at_ms FROM effect_backlog WHERE {CONVERSATION} \
             ORDER BY seq LIMIT 1"
        ))
        .bind(self.role)
        .bind(tenant_id)
        .bind(conversation_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let seen: i64 = row.try_get("due_at_ms")?;
        if seen > now_ms {
            return Ok(None);
        }
        let event_id: String = row.try_get("event_id")?;
        let key = Key {
            tenant_id,
            conversation_id,
            event_id: &event_id,
        };
        self.claim(key, seen, lease_ms).await
    }

    async fn claim(
        &self,
        key: Key<'_>,
        seen: i64,
        lease_ms: i64,
    ) -> Result<Option<Item>, BacklogError> {
        // From now, not from the start of a batch of claims.
        let lease_until_ms = chrono::Utc::now()
            .timestamp_millis()
            .saturating_add(lease_ms);
        let row = sqlx::query(&format!(
            "UPDATE effect_backlog SET due_at_ms = $5 \
             WHERE {CONVERSATION} AND event_id = $4 AND due_at_ms = $6 RETURNING {RETURNED}"
        ))
        .bind(self.role)
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.event_id)
        .bind(lease_until_ms)
        .bind(seen)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| item_of(&r)).transpose()
    }

    /// Takes a driven (or dead-lettered) event out; `false` if this pod's lease ran out and
    /// another pod may be driving it now (the caller then leaves the conversation alone).
    ///
    /// The conversation's next queued event becomes due in the same transaction.
    pub async fn remove(&self, item: &Item) -> Result<bool, BacklogError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(&format!(
            "DELETE FROM effect_backlog WHERE {CONVERSATION} AND event_id = $4 \
             AND due_at_ms = $5"
        ))
        .bind(self.role)
        .bind(&item.tenant_id)
        .bind(&item.conversation_id)
        .bind(&item.event_id)
        .bind(item.lease_until_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(&format!(
            "UPDATE effect_backlog SET due_at_ms = created_at_ms WHERE {CONVERSATION} \
             AND due_at_ms = {QUEUED_MS} \
             AND seq = (SELECT MIN(seq) FROM effect_backlog WHERE {CONVERSATION})"
        ))
        .bind(self.role)
        .bind(&item.tenant_id)
        .bind(&item.conversation_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Sets the head's next try (ending this pod's lease), counting the failure if `counted`.
    /// `false` if the lease was lost meanwhile (another pod drives it now).
    pub async fn reschedule(
        &self,
        item: &Item,
        due_at_ms: i64,
        error: &str,
        counted: bool,
    ) -> Result<bool, BacklogError> {
        let done = sqlx::query(&format!(
            "UPDATE effect_backlog SET due_at_ms = $5, attempts = attempts + $6, last_error = $7 \
             WHERE {CONVERSATION} AND event_id = $4 AND due_at_ms = $8"
        ))
        .bind(self.role)
        .bind(&item.tenant_id)
        .bind(&item.conversation_id)
        .bind(&item.event_id)
        .bind(due_at_ms)
        .bind(i64::from(counted))
        .bind(error)
        .bind(item.lease_until_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Makes due every queued event that is its conversation's head: one queued while its head
    /// was being removed by another transaction (PostgreSQL), which the removal's promotion
    /// did not see. Walks the queued rows, so it runs seldom (with the depth gauges).
    pub async fn promote_queued_heads(&self) -> Result<u64, BacklogError> {
        let done = sqlx::query(&format!(
            "UPDATE effect_backlog SET due_at_ms = created_at_ms WHERE role = $1 \
             AND due_at_ms = {QUEUED_MS} \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog p WHERE p.role = effect_backlog.role \
             AND p.tenant_id = effect_backlog.tenant_id \
             AND p.conversation_id = effect_backlog.conversation_id \
             AND p.seq < effect_backlog.seq)"
        ))
        .bind(self.role)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The role's queued events and the oldest one's creation time.
    pub async fn depth(&self) -> Result<Depth, BacklogError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS events, MIN(created_at_ms) AS oldest FROM effect_backlog \
             WHERE role = $1",
        )
        .bind(self.role)
        .fetch_one(&self.pool)
        .await?;
        Ok(Depth {
            events: row.try_get("events")?,
            oldest_created_at_ms: row.try_get("oldest")?,
        })
    }
}

/// The item of a claimed row. A column whose value cannot be read (nexus wrote none such;
/// an edit by hand, a bug) is named in `unreadable`, and the record kept as well as it can be
/// (the payload's stored text, no headers, position 0), for its dead letter.
fn item_of(row: &AnyRow) -> Result<Item, BacklogError> {
    let event_id: String = row.try_get("event_id")?;
    let mut unreadable = None;
    let mut bad = |column| {
        unreadable.get_or_insert(column);
    };
    let payload: String = row.try_get("payload")?;
    let payload = match base64::engine::general_purpose::STANDARD.decode(&payload) {
        Ok(p) => p,
        Err(_) => {
            bad("payload");
            payload.into_bytes()
        }
    };
    let headers: String = row.try_get("headers_json")?;
    let headers: Headers = serde_json::from_str(&headers).unwrap_or_else(|_| {
        bad("headers_json");
        Headers::new()
    });
    let partition: i64 = row.try_get("source_partition")?;
    let partition = u32::try_from(partition).unwrap_or_else(|_| {
        bad("source_partition");
        0
    });
    let offset: i64 = row.try_get("source_offset")?;
    let offset = u64::try_from(offset).unwrap_or_else(|_| {
        bad("source_offset");
        0
    });
    Ok(Item {
        tenant_id: row.try_get("tenant_id")?,
        conversation_id: row.try_get("conversation_id")?,
        unreadable,
        message: Message {
            topic: row.try_get("topic")?,
            partition,
            offset,
            timestamp_ms: row.try_get("created_at_ms")?,
            key: row.try_get("record_key")?,
            payload: Bytes::from(payload),
            headers,
        },
        attempts: row.try_get("attempts")?,
        lease_until_ms: row.try_get("due_at_ms")?,
        last_error: row.try_get("last_error")?,
        event_id,
    })
}
