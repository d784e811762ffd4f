//! The delivery log: webhook messages (one per subscription and event, deterministic id) and
//! their attempts, in the provisioning database. Due messages are claimed with a lease
//! (PostgreSQL `FOR UPDATE SKIP LOCKED`), so several worker pods never send one message at once.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::intake::{self, Admitted, FirstAttempt, Submission};
use crate::stores::provisioning::{scoped_cursor, Page, PageRequest, WebhookEvent};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("webhook delivery log unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
    #[error("`status` must be one of pending, delivered, failed, dead")]
    BadStatus,
    /// A page cursor of another list (another subscription's, another tenant's).
    #[error("`after` is not a cursor of this list")]
    BadCursor,
    /// A grouped message insert failed (the error is shared by the group's events).
    #[error("webhook delivery log unavailable: {0}")]
    Batched(String),
}

fn intake_stopped() -> StoreError {
    StoreError::Batched("message insert task stopped".into())
}

/// Which of an event's messages are new ([`MessageStore::admit`]), and the commit of its rows.
pub struct Admission {
    pub messages: Vec<Admitted>,
    written: std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Vec<String>, StoreError>> + Send>,
    >,
}

impl Admission {
    /// Waits for the commit of the event's rows; the ids that were new.
    pub async fn written(self) -> Result<Vec<String>, StoreError> {
        self.written.await
    }
}

/// How long an exhausted message is left to its sender before another claim may take it over:
/// the sender holds it for its dead-letter publish at once ([`MessageStore::hold_exhausted`],
/// renewed while the publish waits), so this only covers a sender that died first.
pub const EXHAUSTED_RECLAIM_MS: i64 = 5000;

/// Where a message is in its life.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const DELIVERED: &str = "delivered";
    /// The receiver answered `webhook-delivery: abort-message`.
    pub const FAILED: &str = "failed";
    /// Every attempt of the schedule failed.
    pub const DEAD: &str = "dead";

    pub fn parse(s: &str) -> Option<&'static str> {
        [PENDING, DELIVERED, FAILED, DEAD]
            .into_iter()
            .find(|known| *known == s)
    }
}

/// A message to queue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub tenant_id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event: WebhookEvent,
    pub body: String,
}

/// Makes due the waiting messages of one tenant whose `column` (a fixed column name, never
/// input) is `value` and whose earlier messages are done.
async fn unblock_where(
    pool: &AnyPool,
    column: &str,
    tenant_id: &str,
    value: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(&format!(
        "UPDATE webhook_messages SET next_attempt_at_ms = $3 WHERE tenant_id = $1 AND {column} = $2 AND {WAITING_AND_FREE}"
    ))
    .bind(tenant_id.to_string())
    .bind(value.to_string())
    .bind(now_ms)
    .execute(pool)
    .await?;
    Ok(())
}

/// A waiting message (NULL due time) whose earlier messages in its conversation are done.
const WAITING_AND_FREE: &str = "status = 'pending' AND next_attempt_at_ms IS NULL AND NOT EXISTS (SELECT 1 FROM webhook_messages p WHERE p.tenant_id = webhook_messages.tenant_id AND p.conversation_id = webhook_messages.conversation_id AND p.webhook_id = webhook_messages.webhook_id AND p.seq < webhook_messages.seq AND p.status = 'pending')";

/// When a new message is first due: STARTED at once; FINISHED waits (NULL) until its
/// STARTED is no longer pending (order per subscription and conversation), see
/// [`MessageStore::unblock`].
fn first_due(event: WebhookEvent, now_ms: i64) -> Option<i64> {
    (event == WebhookEvent::Started).then_some(now_ms)
}

pub(super) fn seq(event: WebhookEvent) -> i64 {
    match event {
        WebhookEvent::Started => 0,
        WebhookEvent::Finished => 1,
    }
}

/// A new message's next due time and lease: a due message leased at insert is next due when
/// its lease lapses, so the claim's range scan of due messages skips the ones a sender holds
/// (only a due message can be leased: a waiting FINISHED goes through the claim).
pub(super) fn first_schedule(
    event: WebhookEvent,
    lease: Option<i64>,
    now_ms: i64,
) -> (Option<i64>, Option<i64>) {
    let due = first_due(event, now_ms);
    let lease = due.and(lease);
    (lease.or(due), lease)
}

/// A message's status and next due time after an attempt, and the next attempt time the
/// attempt log shows.
pub(super) fn outcome_state(after: After, now_ms: i64) -> (&'static str, Option<i64>, Option<i64>) {
    let (status, next) = match after {
        After::Delivered => (status::DELIVERED, None),
        After::Aborted => (status::FAILED, None),
        After::Retry(at) => (status::PENDING, Some(at)),
        // Still pending: the sender dead-letters it now; should that not complete (crash,
        // bus down), a claim after this delay does it again.
        After::Exhausted => (status::PENDING, Some(now_ms + EXHAUSTED_RECLAIM_MS)),
    };
    (status, next, next.filter(|_| after != After::Exhausted))
}

/// How a sender left an exhausted message: its attempt counters and lease (none once its
/// last attempt was logged, the claim's own when it only finishes an earlier dead-lettering).
#[derive(Debug, Clone, Copy)]
pub struct Left {
    pub attempts: i64,
    pub round_attempts: i64,
    pub lease_until_ms: Option<i64>,
}

/// The row is still as [`Left`] says ($2 attempts, $3 round attempts, $4 lease).
const LEFT_AS_IS: &str = "status = 'pending' AND attempts = $2 AND round_attempts = $3 \
     AND (lease_until_ms = $4 OR (lease_until_ms IS NULL AND $4 IS NULL))";

/// A message claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub tenant_id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event: String,
    pub body: String,
    pub attempts: i64,
    pub round_attempts: i64,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    /// Set while the message was sent before its row was written (see [`intake`]).
    pub first: Option<Arc<FirstAttempt>>,
    /// The lease this sender holds the message under: what it writes back about the message
    /// applies only while the row still carries it (a sender whose lease lapsed and was taken
    /// over changes nothing).
    pub lease_until_ms: i64,
}

impl Claimed {
    /// A new message as its first attempt sees it (leased at insert, not claimed).
    pub fn first(m: NewMessage) -> Self {
        Self {
            id: m.id,
            tenant_id: m.tenant_id,
            webhook_id: m.webhook_id,
            event_id: m.event_id,
            conversation_id: m.conversation_id,
            event: m.event.as_str().to_string(),
            body: m.body,
            attempts: 0,
            round_attempts: 0,
            last_status_code: None,
            last_error: None,
            first: None,
            lease_until_ms: 0,
        }
    }

    /// The first attempt's outcome goes to the intake while the row is not written.
    pub fn unwritten(mut self, first: Arc<FirstAttempt>) -> Self {
        self.first = Some(first);
        self
    }
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Delivered,
    /// Try again at this time.
    Retry(i64),
    /// The receiver asked to stop.
    Aborted,
    /// The schedule is spent: dead-letter next.
    Exhausted,
}

/// One attempt, as logged.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub started_at_ms: i64,
    pub outcome: &'static str,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
}

/// A message as the admin API answers it.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub id: String,
    pub webhook_id: String,
    pub event_id: String,
    pub conversation_id: String,
    pub event: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at_ms: Option<i64>,
    pub last_status_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptView {
    pub attempt: i64,
    pub started_at_ms: i64,
    pub outcome: String,
    pub status_code: Option<i64>,
    pub latency_ms: i64,
    pub error: Option<String>,
    pub next_attempt_at_ms: Option<i64>,
}

/// One message with its body and every attempt.
#[derive(Debug, Clone, Serialize)]
pub struct MessageDetail {
    #[serde(flatten)]
    pub message: MessageView,
    pub body: String,
    pub attempts_log: Vec<AttemptView>,
}

/// Pending work of one subscription, for the gauges.
#[derive(Debug, Clone)]
pub struct PendingStats {
    pub webhook_id: String,
    pub count: i64,
    pub oldest_created_at_ms: i64,
}

const VIEW: &str = "SELECT id, webhook_id, event_id, conversation_id, event, status, attempts, next_attempt_at_ms, last_status_code, last_error, created_at_ms, updated_at_ms, body FROM webhook_messages";

fn view(row: &AnyRow) -> Result<MessageView, sqlx::Error> {
    Ok(MessageView {
        id: row.try_get("id")?,
        webhook_id: row.try_get("webhook_id")?,
        event_id: row.try_get("event_id")?,
        conversation_id: row.try_get("conversation_id")?,
        event: row.try_get("event")?,
        status: row.try_get("status")?,
        attempts: row.try_get("attempts")?,
        next_attempt_at_ms: row.try_get("next_attempt_at_ms")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

fn claimed(row: &AnyRow) -> Result<Claimed, sqlx::Error> {
    Ok(Claimed {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        webhook_id: row.try_get("webhook_id")?,
        event_id: row.try_get("event_id")?,
        conversation_id: row.try_get("conversation_id")?,
        event: row.try_get("event")?,
        body: row.try_get("body")?,
        attempts: row.try_get("attempts")?,
        round_attempts: row.try_get("round_attempts")?,
        last_status_code: row.try_get("last_status_code")?,
        last_error: row.try_get("last_error")?,
        first: None,
        lease_until_ms: row
            .try_get::<Option<i64>, _>("lease_until_ms")?
            .unwrap_or(0),
    })
}

/// An attempt's outcome not written: the sender's lease lapsed and another sender holds the
/// message (it sends under the same webhook-id, so a receiver that dedupes sees one).
fn lease_lost(m: &Claimed) {
    tracing::warn!(message_id = %m.id, "webhook attempt not logged: its lease lapsed and another sender holds the message");
}

/// The delivery log over the provisioning database.
#[derive(Debug, Clone)]
pub struct MessageStore {
    /// Writes that gate an ack (message inserts) and the admin API's.
    pool: AnyPool,
    /// Claims and attempt outcomes: may use asynchronous commit (see [`MessageStore::relaxed`]).
    relaxed: AnyPool,
    postgres: bool,
    /// The grouped-insert task (PostgreSQL), started at the first insert.
    batcher: Arc<OnceLock<mpsc::UnboundedSender<Submission>>>,
    /// How long a group's write waits for first attempts sent before it.
    first_attempt_wait: Duration,
}

impl MessageStore {
    /// `kind` is the provisioning store's (`postgres` or `sqlite`).
    pub fn new(pool: AnyPool, kind: &str) -> Self {
        Self {
            relaxed: pool.clone(),
            pool,
            postgres: kind == "postgres",
            batcher: Arc::new(OnceLock::new()),
            first_attempt_wait: intake::FIRST_ATTEMPT_WAIT,
        }
    }

    /// How long a group's insert waits for the first attempts sent before it (see [`intake`]).
    pub fn first_attempt_wait(mut self, wait: Duration) -> Self {
        self.first_attempt_wait = wait;
        self
    }

    /// Claims, leases and attempt outcomes go through `pool`, which may commit
    /// asynchronously (PostgreSQL `synchronous_commit = off`): a database crash can then lose
    /// the last moments of outcomes, which only makes those messages go again under the same
    /// webhook-id. Message inserts stay on the durable pool: they gate the event's ack.
    pub fn relaxed(mut self, pool: AnyPool) -> Self {
        self.relaxed = pool;
        self
    }

    /// Queues a message unless one with its id exists (a redelivered or replayed event);
    /// whether it was new.
    pub async fn insert(&self, m: &NewMessage, now_ms: i64) -> Result<bool, StoreError> {
        let new = !insert_rows(&self.pool, &[(m, None, now_ms)])
            .await?
            .is_empty();
        self.unblock_after_insert(m, now_ms).await?;
        Ok(new)
    }

    /// Queues every message unless it exists, in one statement, each already leased until
    /// `leases[i]` when given (the caller sends those itself, without a claim: other senders
    /// skip them until the lease lapses); the ids that were new (only those are the caller's).
    pub async fn queue(
        &self,
        ms: &[NewMessage],
        leases: &[Option<i64>],
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        if ms.is_empty() {
            return Ok(Vec::new());
        }
        let new = if self.postgres {
            self.queue_grouped(ms, leases, now_ms).await?
        } else {
            let rows: Vec<_> = ms
                .iter()
                .enumerate()
                .map(|(i, m)| (m, leases.get(i).copied().flatten(), now_ms))
                .collect();
            insert_rows(&self.pool, &rows).await?
        };
        // Messages of one event share their event and conversation.
        if let Some(m) = ms.first() {
            self.unblock_after_insert(m, now_ms).await?;
        }
        Ok(new)
    }

    /// After a FINISHED is inserted: due at once if its STARTED is no longer pending.
    async fn unblock_after_insert(&self, m: &NewMessage, now_ms: i64) -> Result<(), StoreError> {
        if m.event == WebhookEvent::Started {
            return Ok(());
        }
        self.unblock(&self.pool, &m.tenant_id, &m.conversation_id, now_ms)
            .await
    }

    /// Hands the rows to the grouped-insert task and waits for the commit that holds them:
    /// concurrent events share one durable commit (one WAL flush) instead of one each.
    async fn queue_grouped(
        &self,
        ms: &[NewMessage],
        leases: &[Option<i64>],
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.submit(ms, leases, now_ms, None)?.await
    }

    /// Whether [`MessageStore::admit`] is available (PostgreSQL).
    pub fn sends_before_insert(&self) -> bool {
        self.postgres
    }

    /// Like [`MessageStore::queue`] for a STARTED event whose leased messages are sent before
    /// their rows are written (PostgreSQL, see [`intake`]): answers first which messages are
    /// new (those that exist, a redelivered or replayed event's, must not be sent again),
    /// with a [`FirstAttempt`] for each leased new one; the caller starts those, then awaits
    /// [`Admission::written`], the commit of the rows.
    pub async fn admit(
        &self,
        ms: &[NewMessage],
        leases: &[Option<i64>],
        now_ms: i64,
    ) -> Result<Admission, StoreError> {
        let (admitted, answer) = oneshot::channel();
        let written = self.submit(ms, leases, now_ms, Some(admitted))?;
        let messages = answer
            .await
            .map_err(|_| intake_stopped())?
            .map_err(StoreError::Batched)?;
        Ok(Admission {
            messages,
            written: Box::pin(written),
        })
    }

    /// Sends one event's rows to the intake task (started at the first call).
    fn submit(
        &self,
        ms: &[NewMessage],
        leases: &[Option<i64>],
        now_ms: i64,
        admitted: Option<oneshot::Sender<Result<Vec<Admitted>, String>>>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<String>, StoreError>>, StoreError>
    {
        let tx = self.batcher.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(
                intake::run(self.pool.clone(), rx, self.first_attempt_wait)
                    .instrument(tracing::info_span!("webhook_intake")),
            );
            tx
        });
        let (reply, answer) = oneshot::channel();
        let rows = ms
            .iter()
            .enumerate()
            .map(|(i, m)| (m.clone(), leases.get(i).copied().flatten()))
            .collect();
        tx.send(Submission {
            rows,
            now_ms,
            admitted,
            reply,
        })
        .map_err(|_| intake_stopped())?;
        Ok(async move {
            answer
                .await
                .map_err(|_| intake_stopped())?
                .map_err(StoreError::Batched)
        })
    }

    /// Makes due the waiting (FINISHED) messages of a conversation whose earlier message is no
    /// longer pending. Run after a FINISHED is inserted and after a STARTED leaves `pending`
    /// (each as its own statement after the other's commit, so one of the two sees the other);
    /// [`MessageStore::unblock_all`] sweeps up after crashes.
    async fn unblock(
        &self,
        pool: &AnyPool,
        tenant_id: &str,
        conversation_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        unblock_where(pool, "conversation_id", tenant_id, conversation_id, now_ms).await
    }

    /// [`MessageStore::unblock`] for every conversation of one subscription: after messages
    /// were queued again, which wait (NULL due time) like new ones while an earlier message of
    /// their conversation is pending, so a FINISHED never goes beside its STARTED.
    async fn unblock_webhook(
        &self,
        tenant_id: &str,
        webhook_id: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        unblock_where(&self.pool, "webhook_id", tenant_id, webhook_id, now_ms).await
    }

    /// [`MessageStore::unblock`] for every conversation: a sweep after crashes between a
    /// STARTED's outcome and its release; how many it made due.
    pub async fn unblock_all(&self, now_ms: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE webhook_messages SET next_attempt_at_ms = $1 WHERE {WAITING_AND_FREE}"
        ))
        .bind(now_ms)
        .execute(&self.relaxed)
        .await?;
        Ok(done.rows_affected())
    }

    /// The stored body of the STARTED message of a conversation, if any (FINISHED reuses its
    /// media type and subtype: the close event does not carry the channel).
    pub async fn started_body(
        &self,
        tenant_id: &str,
        conversation_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT body FROM webhook_messages WHERE tenant_id = $1 AND conversation_id = $2 AND seq = 0 LIMIT 1",
        )
        .bind(tenant_id.to_string())
        .bind(conversation_id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => Some(row.try_get("body")?),
            None => None,
        })
    }

    /// Claims up to `limit` due messages until `lease_until_ms`, skipping subscriptions in
    /// `exclude` (at their concurrency limit) and disabled subscriptions. A FINISHED whose
    /// STARTED is pending is not due (see [`MessageStore::unblock`]), so the query stays an
    /// index range scan in due order however long the backlog.
    pub async fn claim(
        &self,
        now_ms: i64,
        lease_until_ms: i64,
        limit: usize,
        exclude: &[String],
        exclude_tenants: &[String],
    ) -> Result<Vec<Claimed>, StoreError> {
        let marks = |from: usize, n: usize| -> String {
            let marks: Vec<String> = (from..from + n).map(|i| format!("${i}")).collect();
            marks.join(", ")
        };
        let mut excluded = String::new();
        if !exclude.is_empty() {
            excluded = format!("AND m.webhook_id NOT IN ({})", marks(5, exclude.len()));
        }
        if !exclude_tenants.is_empty() {
            let from = 5 + exclude.len();
            excluded.push_str(&format!(
                " AND m.tenant_id NOT IN ({})",
                marks(from, exclude_tenants.len())
            ));
        }
        let lock = if self.postgres {
            "FOR UPDATE OF m SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE webhook_messages SET lease_until_ms = $1, next_attempt_at_ms = $1 WHERE id IN (\
               SELECT m.id FROM webhook_messages m \
               WHERE m.status = 'pending' AND m.next_attempt_at_ms <= $2 \
                 AND (m.lease_until_ms IS NULL OR m.lease_until_ms < $3) {excluded} \
                 AND EXISTS (SELECT 1 FROM webhooks w WHERE w.id = m.webhook_id AND w.enabled = 1 \
                   AND (w.paused_until_ms IS NULL OR w.paused_until_ms <= $2)) \
                 AND NOT EXISTS (SELECT 1 FROM webhook_messages p WHERE p.tenant_id = m.tenant_id \
                   AND p.conversation_id = m.conversation_id AND p.webhook_id = m.webhook_id \
                   AND p.seq < m.seq AND p.status = 'pending') \
               ORDER BY m.next_attempt_at_ms LIMIT $4 {lock})  \
             RETURNING id, tenant_id, webhook_id, event_id, conversation_id, event, body, attempts, round_attempts, last_status_code, last_error, lease_until_ms"
        );
        let mut q = sqlx::query(&sql)
            .bind(lease_until_ms)
            .bind(now_ms)
            .bind(now_ms)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        for id in exclude.iter().chain(exclude_tenants) {
            q = q.bind(id.clone());
        }
        let rows = q.fetch_all(&self.relaxed).await?;
        Ok(rows.iter().map(claimed).collect::<Result<_, _>>()?)
    }

    /// Holds an endpoint until `until_ms` (its receiver's Retry-After): claims skip its
    /// messages until then, on every pod. A pause only ever grows.
    pub async fn pause_endpoint(&self, webhook_id: &str, until_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhooks SET paused_until_ms = $2 WHERE id = $1 AND (paused_until_ms IS NULL OR paused_until_ms < $2)",
        )
        .bind(webhook_id.to_string())
        .bind(until_ms)
        .execute(&self.relaxed)
        .await?;
        Ok(())
    }

    /// Gives claimed messages (id, lease) back without an attempt, due at `now_ms`, in one
    /// statement; a message whose lease another sender took is left to it.
    pub async fn release(&self, held: &[(String, i64)], now_ms: i64) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        let pairs: Vec<String> = (0..held.len())
            .map(|i| format!("(id = ${} AND lease_until_ms = ${})", 2 * i + 2, 2 * i + 3))
            .collect();
        let sql = format!(
            "UPDATE webhook_messages SET lease_until_ms = NULL, next_attempt_at_ms = $1 WHERE {}",
            pairs.join(" OR ")
        );
        let mut q = sqlx::query(&sql).bind(now_ms);
        for (id, lease) in held {
            q = q.bind(id.clone()).bind(*lease);
        }
        q.execute(&self.relaxed).await?;
        Ok(())
    }

    /// Extends a claim from `old` to `new`; false when the claim was lost (the lease lapsed
    /// and another sender took the message, or it is no longer pending).
    pub async fn renew(&self, id: &str, old: i64, new: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_messages SET lease_until_ms = $3, next_attempt_at_ms = $3 WHERE id = $1 AND lease_until_ms = $2 AND status = 'pending'",
        )
        .bind(id.to_string())
        .bind(old)
        .bind(new)
        .execute(&self.relaxed)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Gives a claimed message back, due again at `at_ms` (its subscription could not be read),
    /// unless another sender holds it now.
    pub async fn postpone(&self, m: &Claimed, at_ms: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE webhook_messages SET lease_until_ms = NULL, next_attempt_at_ms = $2 WHERE id = $1 AND (lease_until_ms IS NULL OR lease_until_ms = $3)",
        )
        .bind(m.id.clone())
        .bind(at_ms)
        .bind(m.lease_until_ms)
        .execute(&self.relaxed)
        .await?;
        Ok(())
    }

    /// Logs an attempt of a claimed message and moves the message on, in one transaction.
    pub async fn record(
        &self,
        m: &Claimed,
        a: &AttemptRecord,
        after: After,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let attempt = m.attempts + 1;
        let (status, next, attempt_next) = outcome_state(after, now_ms);
        if self.postgres {
            // One round trip: the attempt row and the message move together.
            let done = sqlx::query(
                "WITH logged AS (INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms) SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM webhook_messages WHERE id = $1 AND lease_until_ms = $13) ON CONFLICT (message_id, attempt) DO NOTHING) \
                 UPDATE webhook_messages SET status = $9, attempts = $2, round_attempts = $10, next_attempt_at_ms = $11, lease_until_ms = NULL, last_status_code = $5, last_error = $7, updated_at_ms = $12 WHERE id = $1 AND lease_until_ms = $13",
            )
            .bind(m.id.clone())
            .bind(attempt)
            .bind(a.started_at_ms)
            .bind(a.outcome)
            .bind(a.status_code)
            .bind(a.latency_ms)
            .bind(a.error.clone())
            .bind(attempt_next)
            .bind(status)
            .bind(m.round_attempts + 1)
            .bind(next)
            .bind(now_ms)
            .bind(m.lease_until_ms)
            .execute(&self.relaxed)
            .await?;
            if done.rows_affected() == 0 {
                lease_lost(m);
                return Ok(());
            }
            return self.released(m, status, now_ms).await;
        }
        let mut tx = self.relaxed.begin().await?;
        let moved = sqlx::query(
            "UPDATE webhook_messages SET status = $2, attempts = $3, round_attempts = $4, next_attempt_at_ms = $5, lease_until_ms = NULL, last_status_code = $6, last_error = $7, updated_at_ms = $8 WHERE id = $1 AND lease_until_ms = $9",
        )
        .bind(m.id.clone())
        .bind(status)
        .bind(attempt)
        .bind(m.round_attempts + 1)
        .bind(next)
        .bind(a.status_code)
        .bind(a.error.clone())
        .bind(now_ms)
        .bind(m.lease_until_ms)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            tx.rollback().await?;
            lease_lost(m);
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms) SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT 1 FROM webhook_messages WHERE id = $1) ON CONFLICT (message_id, attempt) DO NOTHING",
        )
        .bind(m.id.clone())
        .bind(attempt)
        .bind(a.started_at_ms)
        .bind(a.outcome)
        .bind(a.status_code)
        .bind(a.latency_ms)
        .bind(a.error.clone())
        .bind(attempt_next)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.released(m, status, now_ms).await
    }

    /// Logs the attempts of many claimed messages and moves each message on: on PostgreSQL
    /// one statement for the lot (attempt rows and message updates together), then one
    /// statement releasing the FINISHED messages waiting for the STARTED ones that left
    /// `pending` (after the first commits, so it or the FINISHED's insert sees the other).
    /// A failed release is left to the sweep ([`MessageStore::unblock_all`]).
    pub async fn record_batch(
        &self,
        items: &[(&Claimed, &AttemptRecord, After)],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        if !self.postgres {
            for (m, a, after) in items {
                self.record(m, a, *after, now_ms).await?;
            }
            return Ok(());
        }
        let mut rows = Vec::with_capacity(items.len());
        let mut released = Vec::new();
        for (m, a, after) in items {
            let (status, next, attempt_next) = outcome_state(*after, now_ms);
            rows.push(serde_json::json!({
                "message_id": m.id,
                "attempt": m.attempts + 1,
                "started_at_ms": a.started_at_ms,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "latency_ms": a.latency_ms,
                "error": a.error,
                "attempt_next": attempt_next,
                "status": status,
                "round_attempts": m.round_attempts + 1,
                "next": next,
                "lease": m.lease_until_ms,
            }));
            if status != status::PENDING && m.event == WebhookEvent::Started.as_str() {
                released.push(serde_json::json!({"t": m.tenant_id, "c": m.conversation_id}));
            }
        }
        sqlx::query(
            "WITH v AS (SELECT * FROM json_to_recordset($1::json) AS x(message_id text, attempt bigint, started_at_ms bigint, outcome text, status_code bigint, latency_ms bigint, error text, attempt_next bigint, status text, round_attempts bigint, next bigint, lease bigint)), \
             logged AS (INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms) SELECT message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, attempt_next FROM v JOIN webhook_messages w ON w.id = v.message_id AND w.lease_until_ms = v.lease ON CONFLICT (message_id, attempt) DO NOTHING) \
             UPDATE webhook_messages SET status = v.status, attempts = v.attempt, round_attempts = v.round_attempts, next_attempt_at_ms = v.next, lease_until_ms = NULL, last_status_code = v.status_code, last_error = v.error, updated_at_ms = $2 FROM v WHERE webhook_messages.id = v.message_id AND webhook_messages.lease_until_ms = v.lease",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .bind(now_ms)
        .execute(&self.relaxed)
        .await?;
        if !released.is_empty() {
            let done = sqlx::query(&format!(
                "UPDATE webhook_messages SET next_attempt_at_ms = $2 WHERE (tenant_id, conversation_id) IN (SELECT t, c FROM json_to_recordset($1::json) AS x(t text, c text)) AND {WAITING_AND_FREE}"
            ))
            .bind(serde_json::Value::Array(released).to_string())
            .bind(now_ms)
            .execute(&self.relaxed)
            .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "releasing waiting FINISHED messages failed; the sweep releases them");
            }
        }
        Ok(())
    }

    /// After a STARTED left `pending`: its conversation's FINISHED may go.
    async fn released(&self, m: &Claimed, status: &str, now_ms: i64) -> Result<(), StoreError> {
        if status != status::PENDING && m.event == WebhookEvent::Started.as_str() {
            self.unblock(&self.relaxed, &m.tenant_id, &m.conversation_id, now_ms)
                .await?;
        }
        Ok(())
    }

    /// Holds the exhausted message until `until_ms` for this sender's dead-letter publish, if it
    /// is still as the sender left it (`left`): pending, no attempt or resend since, no other
    /// sender's lease; whether it did. A sender whose lease lapsed mid-attempt must not
    /// dead-letter a message another sender is delivering or has delivered, and while the hold
    /// lasts no claim takes the message for a publish of its own (extend it with
    /// [`MessageStore::renew`]; a publisher that died leaves it to the claim after the hold).
    pub async fn hold_exhausted(
        &self,
        m: &Claimed,
        left: &Left,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE webhook_messages SET lease_until_ms = $5, next_attempt_at_ms = $5 WHERE id = $1 AND {LEFT_AS_IS}"
        ))
        .bind(m.id.clone())
        .bind(left.attempts)
        .bind(left.round_attempts)
        .bind(left.lease_until_ms)
        .bind(until_ms)
        .execute(&self.relaxed)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks an exhausted message dead (after its dead-letter record was published), if it is
    /// still as this sender left it; whether it did.
    pub async fn mark_dead(
        &self,
        m: &Claimed,
        left: &Left,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(&format!(
            "UPDATE webhook_messages SET status = 'dead', next_attempt_at_ms = NULL, lease_until_ms = NULL, updated_at_ms = $5 WHERE id = $1 AND {LEFT_AS_IS}"
        ))
        .bind(m.id.clone())
        .bind(left.attempts)
        .bind(left.round_attempts)
        .bind(left.lease_until_ms)
        .bind(now_ms)
        .execute(&self.relaxed)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        self.released(m, status::DEAD, now_ms).await?;
        Ok(true)
    }

    /// Messages of a subscription, by id, optionally of one status.
    pub async fn list(
        &self,
        tenant_id: &str,
        webhook_id: &str,
        status_filter: Option<&str>,
        page: &PageRequest,
    ) -> Result<Page<MessageView>, StoreError> {
        let status_filter = match status_filter {
            None | Some("") => None,
            Some(s) => Some(status::parse(s).ok_or(StoreError::BadStatus)?),
        };
        let fetch = i64::from(page.limit) + 1;
        // A cursor is a position in one subscription's list: one of another list would be read
        // as a position here and skip messages silently.
        let scope = format!("webhook-messages/{tenant_id}/{webhook_id}");
        let after = page
            .after_in(&scope)
            .map_err(|_| StoreError::BadCursor)?
            .unwrap_or_default()
            .to_string();
        let rows = match status_filter {
            Some(s) => {
                sqlx::query(&format!(
                    "{VIEW} WHERE tenant_id = $1 AND webhook_id = $2 AND id > $3 AND status = $4 ORDER BY id LIMIT $5"
                ))
                .bind(tenant_id.to_string())
                .bind(webhook_id.to_string())
                .bind(after)
                .bind(s)
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "{VIEW} WHERE tenant_id = $1 AND webhook_id = $2 AND id > $3 ORDER BY id LIMIT $4"
                ))
                .bind(tenant_id.to_string())
                .bind(webhook_id.to_string())
                .bind(after)
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            }
        };
        let mut items = rows.iter().map(view).collect::<Result<Vec<_>, _>>()?;
        let next = if items.len() > page.limit as usize {
            items.truncate(page.limit as usize);
            items.last().map(|m| scoped_cursor(&scope, &m.id))
        } else {
            None
        };
        Ok(Page { items, next })
    }

    /// One message of a subscription with its attempts.
    pub async fn get(
        &self,
        tenant_id: &str,
        webhook_id: &str,
        id: &str,
    ) -> Result<Option<MessageDetail>, StoreError> {
        let row = sqlx::query(&format!(
            "{VIEW} WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3"
        ))
        .bind(tenant_id.to_string())
        .bind(webhook_id.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let message = view(&row)?;
        let body: String = row.try_get("body")?;
        let rows = sqlx::query(
            "SELECT attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms FROM webhook_attempts WHERE message_id = $1 ORDER BY attempt",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let attempts_log = rows
            .iter()
            .map(|r| {
                Ok(AttemptView {
                    attempt: r.try_get("attempt")?,
                    started_at_ms: r.try_get("started_at_ms")?,
                    outcome: r.try_get("outcome")?,
                    status_code: r.try_get("status_code")?,
                    latency_ms: r.try_get("latency_ms")?,
                    error: r.try_get("error")?,
                    next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(MessageDetail {
            message,
            body,
            attempts_log,
        }))
    }

    /// Queues one message again for a fresh round of the schedule (same webhook-id); whether
    /// it exists. A sender holding it loses its lease: its outcome is not logged over the fresh
    /// round, nor can it dead-letter the message (the attempt it was making may still arrive).
    pub async fn resend(
        &self,
        tenant_id: &str,
        webhook_id: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_messages SET status = 'pending', round_attempts = 0, lease_until_ms = NULL, next_attempt_at_ms = CASE WHEN seq = 0 THEN CAST($4 AS BIGINT) END, updated_at_ms = $5 WHERE tenant_id = $1 AND webhook_id = $2 AND id = $3",
        )
        .bind(tenant_id.to_string())
        .bind(webhook_id.to_string())
        .bind(id.to_string())
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        self.unblock_webhook(tenant_id, webhook_id, now_ms).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Queues again every failed or dead message of a subscription created at or after
    /// `since_ms`; how many.
    pub async fn replay_since(
        &self,
        tenant_id: &str,
        webhook_id: &str,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_messages SET status = 'pending', round_attempts = 0, next_attempt_at_ms = CASE WHEN seq = 0 THEN CAST($4 AS BIGINT) END, updated_at_ms = $5 WHERE tenant_id = $1 AND webhook_id = $2 AND created_at_ms >= $3 AND status IN ('failed', 'dead')",
        )
        .bind(tenant_id.to_string())
        .bind(webhook_id.to_string())
        .bind(since_ms)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        self.unblock_webhook(tenant_id, webhook_id, now_ms).await?;
        Ok(done.rows_affected())
    }

    /// Queues again a message a dead-letter record describes: only while the message is still
    /// dead after exactly `attempts` attempts (so a record applies once), or re-created from
    /// the record when the log lost it. Whether anything was queued.
    pub async fn requeue_dead(
        &self,
        m: &NewMessage,
        attempts: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE webhook_messages SET status = 'pending', round_attempts = 0, next_attempt_at_ms = CASE WHEN seq = 0 THEN CAST($3 AS BIGINT) END, updated_at_ms = $4 WHERE id = $1 AND status = 'dead' AND attempts = $2",
        )
        .bind(m.id.clone())
        .bind(attempts)
        .bind(now_ms)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            self.unblock(&self.pool, &m.tenant_id, &m.conversation_id, now_ms)
                .await?;
            return Ok(true);
        }
        self.insert(m, now_ms).await
    }

    /// Deletes delivered, aborted and dead messages last changed before `before_ms`, with their
    /// attempts; answers the messages deleted. Pending ones stay however old.
    pub async fn prune_finished(&self, before_ms: i64) -> Result<u64, StoreError> {
        // Finished and old, or of a subscription that is gone: a delete that raced an insert
        // leaves such messages (the log has no foreign keys, see migration 0009).
        const OLD: &str = "(status <> 'pending' AND updated_at_ms < $1) \
            OR NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.id = webhook_messages.webhook_id)";
        // Attempts first: a crash in between leaves messages without attempts for the next run.
        sqlx::query(&format!(
            "DELETE FROM webhook_attempts WHERE message_id IN (SELECT id FROM webhook_messages WHERE {OLD})"
        ))
        .bind(before_ms)
        .execute(&self.relaxed)
        .await?;
        let done = sqlx::query(&format!("DELETE FROM webhook_messages WHERE {OLD}"))
            .bind(before_ms)
            .execute(&self.relaxed)
            .await?;
        Ok(done.rows_affected())
    }

    /// Refreshes the planner's statistics of the log (PostgreSQL): the claim reads pending
    /// messages in due order through an index only while the planner knows how many there
    /// are, and autovacuum reacts to a burst only after a minute or more. SQLite: nothing.
    pub async fn analyze(&self) -> Result<(), StoreError> {
        if self.postgres {
            sqlx::query("ANALYZE webhook_messages")
                .execute(&self.relaxed)
                .await?;
        }
        Ok(())
    }

    /// Pending messages per subscription, for the queue gauges.
    pub async fn pending_stats(&self) -> Result<Vec<PendingStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT webhook_id, COUNT(*) AS n, MIN(created_at_ms) AS oldest FROM webhook_messages WHERE status = 'pending' GROUP BY webhook_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingStats {
                    webhook_id: r.try_get("webhook_id")?,
                    count: r.try_get("n")?,
                    oldest_created_at_ms: r.try_get("oldest")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}

/// Inserts message rows `(message, lease, now)` unless their id exists, in one statement,
/// each leased until its lease when given and due; the ids that were new.
async fn insert_rows(
    pool: &AnyPool,
    ms: &[(&NewMessage, Option<i64>, i64)],
) -> Result<Vec<String>, sqlx::Error> {
    let mut values = Vec::with_capacity(ms.len());
    for i in 0..ms.len() {
        let b = i * 12;
        let p: Vec<String> = (1..=12).map(|k| format!("${}", b + k)).collect();
        values.push(format!(
            "({}, {}, {}, {}, {}, {}, {}, {}, 'pending', 0, 0, {}, {}, {}, {})",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11]
        ));
    }
    let sql = format!(
        "INSERT INTO webhook_messages (id, tenant_id, webhook_id, event_id, conversation_id, event, seq, body, status, attempts, round_attempts, next_attempt_at_ms, lease_until_ms, created_at_ms, updated_at_ms) VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id",
        values.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for (m, lease, now_ms) in ms {
        let (next, lease) = first_schedule(m.event, *lease, *now_ms);
        q = q
            .bind(m.id.clone())
            .bind(m.tenant_id.clone())
            .bind(m.webhook_id.clone())
            .bind(m.event_id.clone())
            .bind(m.conversation_id.clone())
            .bind(m.event.as_str())
            .bind(seq(m.event))
            .bind(m.body.clone())
            .bind(next)
            .bind(lease)
            .bind(*now_ms)
            .bind(*now_ms);
    }
    let rows = q.fetch_all(pool).await?;
    rows.iter().map(|r| r.try_get::<String, _>("id")).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::stores::provisioning::webhooks::{NewWebhook, WebhookFormat};
    use crate::stores::provisioning::{NewTenant, Provisioning};

    /// A Standard Webhooks subscription of `tenant` to `url`; its id.
    async fn standard_webhook(p: &Provisioning, tenant: &str, url: &str) -> String {
        p.create_webhook(
            tenant,
            NewWebhook {
                url: url.into(),
                events: None,
                media: None,
                format: WebhookFormat::Standard,
                enabled: None,
                secret: None,
            },
        )
        .await
        .expect("webhook")
        .webhook
        .id
    }

    /// A message of `event` (event id `e-<id>`, body `{}`).
    fn new_message(
        tenant: &str,
        hook: &str,
        id: &str,
        conversation: &str,
        event: WebhookEvent,
    ) -> NewMessage {
        NewMessage {
            id: id.into(),
            tenant_id: tenant.into(),
            webhook_id: hook.into(),
            event_id: format!("e-{id}"),
            conversation_id: conversation.into(),
            event,
            body: "{}".into(),
        }
    }

    /// A log on a fresh SQLite database with one tenant and one Standard Webhooks subscription
    /// (the directory lives as long as the first item).
    async fn one_subscription() -> (
        tempfile::TempDir,
        Provisioning,
        crate::stores::provisioning::Tenant,
        String,
        MessageStore,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let tenant = p
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        let hook = standard_webhook(&p, &tenant.id, "https://hooks.example.com/in").await;
        let store = MessageStore::new(p.pool().clone(), p.kind());
        (dir, p, tenant, hook, store)
    }

    /// A FINISHED inserted alone (dead-letter recovery that re-creates it) after its STARTED
    /// was delivered is due at once, not left waiting for a STARTED that will not change.
    #[tokio::test]
    async fn a_finished_inserted_after_its_started_is_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let store = MessageStore::new(p.pool().clone(), p.kind());
        let message = |id: &str, event| new_message("t", "wh", id, "c", event);
        assert!(store
            .insert(&message("msg_started", WebhookEvent::Started), 1_000)
            .await
            .expect("insert started"));
        sqlx::query("UPDATE webhook_messages SET status = 'delivered' WHERE id = 'msg_started'")
            .execute(p.pool())
            .await
            .expect("deliver");
        assert!(store
            .insert(&message("msg_finished", WebhookEvent::Finished), 2_000)
            .await
            .expect("insert finished"));
        let due: Option<i64> = sqlx::query_scalar(
            "SELECT next_attempt_at_ms FROM webhook_messages WHERE id = 'msg_finished'",
        )
        .fetch_one(p.pool())
        .await
        .expect("finished");
        assert_eq!(due, Some(2_000));
    }

    /// A paused endpoint's messages are not claimed (by any pod: the pause is in the database)
    /// until the pause ends; another endpoint's are; a shorter pause does not shorten it.
    #[tokio::test]
    async fn a_paused_endpoint_is_not_claimed_until_the_pause_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let tenant = p
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        let mut hooks = Vec::new();
        for host in ["paused", "open"] {
            hooks.push(
                standard_webhook(&p, &tenant.id, &format!("https://{host}.example.com/in")).await,
            );
        }
        let store = MessageStore::new(p.pool().clone(), p.kind());
        for (i, hook) in hooks.iter().enumerate() {
            let m = new_message(
                &tenant.id,
                hook,
                &format!("msg_{i}"),
                &format!("c{i}"),
                WebhookEvent::Started,
            );
            assert!(store.insert(&m, 1_000).await.expect("insert"));
        }
        store.pause_endpoint(&hooks[0], 5_000).await.expect("pause");
        store
            .pause_endpoint(&hooks[0], 3_000)
            .await
            .expect("shorter pause");
        let claimed = |now| claim_ids(&store, now, &[], &[]);
        assert_eq!(claimed(2_000).await, ["msg_1"], "only the open endpoint");
        assert_eq!(
            claimed(4_000).await,
            ["msg_1"],
            "the pause is not shortened"
        );
        assert_eq!(
            claimed(5_000).await,
            ["msg_0", "msg_1"],
            "both once the pause is over"
        );
    }

    /// Claims what is due at `now` (skipping `hooks` and `tenants`) and gives it back at
    /// once: the claimed ids, sorted.
    async fn claim_ids(
        store: &MessageStore,
        now: i64,
        hooks: &[String],
        tenants: &[String],
    ) -> Vec<String> {
        let got = store
            .claim(now, now + 10, 10, hooks, tenants)
            .await
            .expect("claim");
        let held: Vec<(String, i64)> = got
            .iter()
            .map(|c| (c.id.clone(), c.lease_until_ms))
            .collect();
        store.release(&held, now).await.expect("release");
        let mut ids: Vec<String> = held.into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }

    /// A claim skips the endpoints and tenants it is told to (what this process could not
    /// start now): their messages stay for later claims or other pods.
    #[tokio::test]
    async fn a_claim_skips_excluded_endpoints_and_tenants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let store = MessageStore::new(p.pool().clone(), p.kind());
        let (mut tenants, mut hooks) = (Vec::new(), HashMap::new());
        for t in ["a", "b"] {
            let tenant = p
                .create_tenant(NewTenant { name: t.into() })
                .await
                .expect("tenant");
            for i in 0..2 {
                let hook =
                    standard_webhook(&p, &tenant.id, &format!("https://{t}{i}.example.com/in"))
                        .await;
                let id = format!("msg_{t}{i}");
                let m = new_message(&tenant.id, &hook, &id, "c1", WebhookEvent::Started);
                assert!(store.insert(&m, 1_000).await.expect("insert"));
                hooks.insert(id, hook);
            }
            tenants.push(tenant.id);
        }
        let a = &tenants[..1];
        assert_eq!(claim_ids(&store, 2_000, &[], a).await, ["msg_b0", "msg_b1"]);
        assert_eq!(
            claim_ids(&store, 2_000, &[hooks["msg_b0"].clone()], a).await,
            ["msg_b1"],
            "endpoints and tenants together"
        );
        assert_eq!(
            claim_ids(&store, 2_000, &[hooks["msg_a0"].clone()], &[]).await,
            ["msg_a1", "msg_b0", "msg_b1"]
        );
    }

    /// A STARTED queued again (replayed, resent, recovered) goes before its conversation's
    /// FINISHED, even one that was already due when the STARTED came back.
    #[tokio::test]
    async fn a_finished_already_due_waits_for_its_started_queued_again() {
        let (_dir, p, tenant, hook, store) = one_subscription().await;
        for (id, event) in [
            ("msg_s", WebhookEvent::Started),
            ("msg_f", WebhookEvent::Finished),
        ] {
            let m = new_message(&tenant.id, &hook, id, "c1", event);
            assert!(store.insert(&m, 100).await.expect("insert"));
        }
        // The STARTED went dead, which released the FINISHED: due, waiting for a retry.
        sqlx::query("UPDATE webhook_messages SET status = 'dead', next_attempt_at_ms = NULL WHERE id = 'msg_s'")
            .execute(p.pool())
            .await
            .expect("dead");
        sqlx::query("UPDATE webhook_messages SET next_attempt_at_ms = 500 WHERE id = 'msg_f'")
            .execute(p.pool())
            .await
            .expect("due");
        assert_eq!(
            store
                .replay_since(&tenant.id, &hook, 0, 1_000)
                .await
                .expect("replay"),
            1
        );
        let got = store
            .claim(1_000, 2_000, 10, &[], &[])
            .await
            .expect("claim");
        assert_eq!(
            got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["msg_s"],
            "the FINISHED waits"
        );
        store
            .record(
                &got[0],
                &AttemptRecord {
                    started_at_ms: 1_000,
                    outcome: "ok",
                    status_code: Some(204),
                    latency_ms: 1,
                    error: None,
                },
                After::Delivered,
                1_100,
            )
            .await
            .expect("delivered");
        let got = store
            .claim(1_200, 2_000, 10, &[], &[])
            .await
            .expect("claim");
        assert_eq!(
            got.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["msg_f"],
            "then the FINISHED"
        );
    }

    /// A failure of the streak before a re-enable (an attempt still in flight when the
    /// operator enabled the endpoint again) does not disable it again; the new streak's does.
    #[tokio::test]
    async fn only_the_current_failing_streak_disables_an_endpoint() {
        let (_dir, p, tenant, hook, _store) = one_subscription().await;
        let since = p.webhook_failed(&hook, 1_000).await.expect("failed");
        assert_eq!(since, 1_000);
        assert!(p
            .disable_webhook(&hook, "first streak", since)
            .await
            .expect("disable"));
        let enable = crate::stores::provisioning::webhooks::WebhookPatch {
            enabled: Some(true),
            ..Default::default()
        };
        p.update_webhook(&tenant.id, &hook, enable)
            .await
            .expect("enable again");
        assert!(
            !p.disable_webhook(&hook, "stale", since)
                .await
                .expect("stale"),
            "a failure of the old streak"
        );
        let again = p.webhook_failed(&hook, 9_000).await.expect("failed");
        assert_eq!(again, 9_000, "a new streak");
        assert!(p
            .disable_webhook(&hook, "second streak", again)
            .await
            .expect("disable"));
    }

    /// A sender whose lease lapsed during its last attempt neither logs it nor dead-letters
    /// the message that another sender now holds and then delivers; a sender that still owns
    /// its exhausted message does.
    #[tokio::test]
    async fn a_late_sender_does_not_dead_letter_a_message_taken_over() {
        let (_dir, p, tenant, hook, store) = one_subscription().await;
        for (i, c) in ["c1", "c2"].iter().enumerate() {
            let m = new_message(
                &tenant.id,
                &hook,
                &format!("msg_{i}"),
                c,
                WebhookEvent::Started,
            );
            assert!(store.insert(&m, 1_000).await.expect("insert"));
        }
        let attempt = |outcome: &'static str, code: i64| AttemptRecord {
            started_at_ms: 1_000,
            outcome,
            status_code: Some(code),
            latency_ms: 1,
            error: None,
        };
        let status = |id: &'static str| {
            let pool = p.pool().clone();
            async move {
                sqlx::query_scalar::<_, String>("SELECT status FROM webhook_messages WHERE id = $1")
                    .bind(id)
                    .fetch_one(&pool)
                    .await
                    .expect("status")
            }
        };
        let mut a = store
            .claim(1_000, 2_000, 10, &[], &[])
            .await
            .expect("claim a");
        a.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(a.len(), 2);
        let left = |m: &Claimed| Left {
            attempts: m.attempts + 1,
            round_attempts: m.round_attempts + 1,
            lease_until_ms: None,
        };
        // msg_1: a logs its last attempt within its lease: exhausted, then dead.
        store
            .record(&a[1], &attempt("failed", 500), After::Exhausted, 1_500)
            .await
            .expect("exhausted");
        assert!(store
            .hold_exhausted(&a[1], &left(&a[1]), 9_000)
            .await
            .expect("hold"));
        assert!(!store
            .mark_dead(&a[1], &left(&a[1]), 1_600)
            .await
            .expect("mark without the hold"));
        let held = Left {
            lease_until_ms: Some(9_000),
            ..left(&a[1])
        };
        assert!(store.mark_dead(&a[1], &held, 1_600).await.expect("mark"));
        assert_eq!(status("msg_1").await, "dead");
        // msg_0: a's lease lapses mid-attempt and b takes it over.
        let b = store
            .claim(3_000, 5_000, 10, &[], &[])
            .await
            .expect("claim b");
        assert_eq!(
            b.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["msg_0"]
        );
        store
            .record(&a[0], &attempt("failed", 500), After::Exhausted, 3_500)
            .await
            .expect("a's late outcome");
        assert!(!store
            .hold_exhausted(&a[0], &left(&a[0]), 9_000)
            .await
            .expect("hold"));
        assert!(!store
            .mark_dead(&a[0], &left(&a[0]), 3_600)
            .await
            .expect("mark"));
        store
            .record(&b[0], &attempt("ok", 204), After::Delivered, 4_000)
            .await
            .expect("b's outcome");
        assert_eq!(status("msg_0").await, "delivered");
        // msg_0 resent while a sender is on its last attempt: that attempt's outcome neither
        // ends the fresh round nor dead-letters the message.
        assert!(store
            .resend(&tenant.id, &hook, "msg_0", 5_000)
            .await
            .expect("resend"));
        let c = store
            .claim(5_000, 6_000, 10, &[], &[])
            .await
            .expect("claim c");
        assert_eq!(c.len(), 1);
        assert!(store
            .resend(&tenant.id, &hook, "msg_0", 5_100)
            .await
            .expect("resend again"));
        store
            .record(&c[0], &attempt("failed", 500), After::Exhausted, 5_200)
            .await
            .expect("c's outcome");
        assert!(!store
            .mark_dead(&c[0], &left(&c[0]), 5_300)
            .await
            .expect("mark"));
        let (st, round): (String, i64) = sqlx::query_as(
            "SELECT status, round_attempts FROM webhook_messages WHERE id = 'msg_0'",
        )
        .fetch_one(p.pool())
        .await
        .expect("row");
        assert_eq!((st.as_str(), round), ("pending", 0), "a fresh round");
    }

    /// The log's retention on SQLite (`nexus dev`): finished messages and their attempts go,
    /// pending ones stay however old.
    #[tokio::test]
    async fn pruning_takes_finished_messages_and_their_attempts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let tenant = p
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        let hook_id = standard_webhook(&p, &tenant.id, "https://hooks.example.com/in").await;
        let store = MessageStore::new(p.pool().clone(), p.kind());
        // `msg_orphan`'s subscription is gone (a delete raced its insert): pruned however new.
        for (id, conversation, webhook) in [
            ("msg_done", "c1", hook_id.as_str()),
            ("msg_waiting", "c2", hook_id.as_str()),
            ("msg_orphan", "c3", "wh_deleted"),
        ] {
            let m = new_message(&tenant.id, webhook, id, conversation, WebhookEvent::Started);
            assert!(store.insert(&m, 1_000).await.expect("insert"));
        }
        sqlx::query("UPDATE webhook_messages SET status = 'delivered', updated_at_ms = 2000 WHERE id = 'msg_done'")
            .execute(p.pool())
            .await
            .expect("deliver");
        sqlx::query("INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, status_code, latency_ms) VALUES ('msg_done', 1, 1500, 'ok', 204, 3), ('msg_orphan', 1, 1500, 'failed', 500, 3)")
            .execute(p.pool())
            .await
            .expect("attempt");

        assert_eq!(
            store.prune_finished(2_000).await.expect("prune"),
            1,
            "only the orphan: the rest is not older than the cut"
        );
        assert_eq!(store.prune_finished(i64::MAX).await.expect("prune"), 1);
        let left: Vec<String> = sqlx::query_scalar("SELECT id FROM webhook_messages")
            .fetch_all(p.pool())
            .await
            .expect("messages");
        assert_eq!(left, ["msg_waiting"], "a pending message stays however old");
        let attempts: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_attempts")
            .fetch_one(p.pool())
            .await
            .expect("attempts");
        assert_eq!(attempts, 0);

        // Deleting the subscription deletes its log (no foreign-key cascade does it).
        store
            .record(
                &Claimed::first(new_message(
                    &tenant.id,
                    &hook_id,
                    "msg_waiting",
                    "c2",
                    WebhookEvent::Started,
                )),
                &AttemptRecord {
                    started_at_ms: 2_500,
                    outcome: "ok",
                    status_code: Some(204),
                    latency_ms: 3,
                    error: None,
                },
                After::Delivered,
                3_000,
            )
            .await
            .expect("log an attempt");
        p.delete_webhook(&tenant.id, &hook_id)
            .await
            .expect("delete webhook");
        let (messages, attempts): (i64, i64) = (
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_messages")
                .fetch_one(p.pool())
                .await
                .expect("messages"),
            sqlx::query_scalar("SELECT COUNT(*) FROM webhook_attempts")
                .fetch_one(p.pool())
                .await
                .expect("attempts"),
        );
        assert_eq!(
            (messages, attempts),
            (0, 0),
            "the subscription's log is gone"
        );

        // Deleting the tenant deletes its log too.
        assert!(store
            .insert(
                &new_message(
                    &tenant.id,
                    "wh_any",
                    "msg_tenant",
                    "c4",
                    WebhookEvent::Started,
                ),
                4_000,
            )
            .await
            .expect("insert"));
        p.delete_tenant(&tenant.id).await.expect("delete tenant");
        let messages: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_messages")
            .fetch_one(p.pool())
            .await
            .expect("messages");
        assert_eq!(messages, 0, "the tenant's log is gone");
    }
}
