//! Grouped intake of new messages on PostgreSQL: concurrent events share one existence check
//! and one durable insert, and a first attempt that ends in time is written with its row.
//!
//! A new STARTED message leased at intake is sent before its row is written (the event is not
//! acked until then). If its first attempt ends within [`FIRST_ATTEMPT_WAIT`] (the default of `first_attempt_wait_ms`), the row is inserted in
//! its final state together with the attempt: one write instead of an insert, an update and a
//! release. Otherwise the row goes in pending and leased, and the outcome updates it later.
//! A crash before the insert leaves the event unacked: it is redelivered and the message sent
//! again under the same webhook-id, like a crash between an attempt and its log write.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::{AnyPool, Row as _};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::time::Instant;

use super::store::{first_schedule, outcome_state, seq, After, AttemptRecord, NewMessage};
use crate::telemetry::metrics as m;

/// Most message rows one grouped statement writes, so one statement stays short and a burst
/// still fills several.
const BATCH_ROWS: usize = 512;
/// How long a group's write waits by default for the first attempts of its messages sent
/// before it. Loopback and LAN receivers answer within this; a slower one's row goes in pending.
pub const FIRST_ATTEMPT_WAIT: Duration = Duration::from_millis(25);
/// Group writes in flight at once.
const WRITERS: usize = 2;

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// The first attempt of a message sent before its row is written: the attempt hands its
/// outcome here, and the intake writes it with the row if the row is not written yet.
#[derive(Debug)]
pub struct FirstAttempt {
    state: Mutex<FirstState>,
    /// The group's write waits on this for its first attempts.
    group: Arc<Notify>,
    /// Closed once the row's statement ended: an outcome that came while it ran is logged
    /// after it (the attempt row needs the message row).
    written: Semaphore,
}

#[derive(Debug)]
enum FirstState {
    Open,
    Settled(Settled),
    /// The row's statement runs (or ran) without the outcome.
    Written,
}

/// A first attempt's outcome waiting for its row's insert; `done` answers after the commit.
#[derive(Debug)]
struct Settled {
    record: AttemptRecord,
    after: After,
    done: Reply<()>,
}

impl FirstAttempt {
    fn new(group: Arc<Notify>) -> Self {
        Self {
            state: Mutex::new(FirstState::Open),
            group,
            written: Semaphore::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FirstState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the outcome over while the row is not written: the answer comes once the row is
    /// committed with it. `None` (after the row's statement ended): log the outcome as usual.
    pub async fn settle(
        &self,
        record: &AttemptRecord,
        after: After,
    ) -> Option<oneshot::Receiver<Result<(), String>>> {
        let answer = {
            let mut state = self.lock();
            if matches!(*state, FirstState::Open) {
                let (done, answer) = oneshot::channel();
                *state = FirstState::Settled(Settled {
                    record: record.clone(),
                    after,
                    done,
                });
                Some(answer)
            } else {
                None
            }
        };
        let Some(answer) = answer else {
            // Closed when the statement ends; an error is that close.
            let _ = self.written.acquire().await;
            return None;
        };
        self.group.notify_one();
        Some(answer)
    }

    fn is_settled(&self) -> bool {
        matches!(*self.lock(), FirstState::Settled(_))
    }

    /// The row's statement ended (committed or not).
    fn ended(&self) {
        self.written.close();
    }

    /// Marks the row written; the outcome, if one came, goes into the row.
    fn take(&self) -> Option<Settled> {
        match std::mem::replace(&mut *self.lock(), FirstState::Written) {
            FirstState::Settled(s) => Some(s),
            _ => None,
        }
    }
}

/// One event's rows for the intake.
#[derive(Debug)]
pub struct Submission {
    pub rows: Vec<(NewMessage, Option<i64>)>,
    pub now_ms: i64,
    /// Asked for by events whose leased messages are sent before the insert: which messages
    /// are new (a [`FirstAttempt`] for each leased one), answered before the insert.
    pub admitted: Option<Reply<Vec<Admitted>>>,
    /// The ids that were new, answered after the commit.
    pub reply: Reply<Vec<String>>,
}

/// A message as the existence check found it.
#[derive(Debug, Clone)]
pub enum Admitted {
    /// Its id is in the log already (a redelivered or replayed event): nothing to do.
    Exists,
    /// New; send it now when leased.
    New(Option<Arc<FirstAttempt>>),
}

/// A row as the grouped statement writes it.
struct Row {
    msg: NewMessage,
    lease: Option<i64>,
    first: Option<Arc<FirstAttempt>>,
}

/// A submission past its existence check.
struct Admission {
    rows: Vec<Row>,
    now_ms: i64,
    reply: Reply<Vec<String>>,
}

/// The intake loop: takes what arrived while the previous group was checked (up to
/// [`BATCH_ROWS`]), checks which messages exist in one statement, answers the events that
/// send before the insert, then writes the group ([`write`]) while the next one gathers.
/// Ends when every store handle is gone.
pub async fn run(pool: AnyPool, mut rx: mpsc::UnboundedReceiver<Submission>, wait: Duration) {
    let writers = Arc::new(Semaphore::new(WRITERS));
    let mut held: Option<Submission> = None;
    loop {
        let first = match held.take() {
            Some(s) => s,
            None => match rx.recv().await {
                Some(s) => s,
                None => return,
            },
        };
        let mut rows = first.rows.len();
        let mut group = vec![first];
        while rows < BATCH_ROWS {
            match rx.try_recv() {
                Ok(s) if rows + s.rows.len() <= BATCH_ROWS => {
                    rows += s.rows.len();
                    group.push(s);
                }
                Ok(s) => {
                    held = Some(s);
                    break;
                }
                Err(_) => break,
            }
        }
        let notify = Arc::new(Notify::new());
        let admitted = admit(&pool, group, &notify).await;
        if admitted.is_empty() {
            continue;
        }
        let (pool, writers) = (pool.clone(), writers.clone());
        tokio::spawn(async move {
            settle(&admitted, &notify, wait).await;
            let Ok(_slot) = writers.acquire_owned().await else {
                return;
            };
            write(&pool, admitted).await;
        });
    }
}

/// The existence check of the rows whose events asked for it; answers those events. Rows that
/// exist are dropped from the write (their events learn it here).
async fn admit(pool: &AnyPool, group: Vec<Submission>, notify: &Arc<Notify>) -> Vec<Admission> {
    let ids: Vec<&str> = group
        .iter()
        .filter(|s| s.admitted.is_some())
        .flat_map(|s| s.rows.iter().map(|(m, _)| m.id.as_str()))
        .collect();
    let existing = if ids.is_empty() {
        Ok(HashSet::new())
    } else {
        existing(pool, &ids).await.map_err(|e| e.to_string())
    };
    let mut out = Vec::with_capacity(group.len());
    for s in group {
        let Some(admitted) = s.admitted else {
            let rows = s
                .rows
                .into_iter()
                .map(|(msg, lease)| Row {
                    msg,
                    lease,
                    first: None,
                })
                .collect();
            out.push(Admission {
                rows,
                now_ms: s.now_ms,
                reply: s.reply,
            });
            continue;
        };
        let existing = match &existing {
            Ok(e) => e,
            Err(e) => {
                let _ = admitted.send(Err(e.clone()));
                let _ = s.reply.send(Err(e.clone()));
                continue;
            }
        };
        let mut answer = Vec::with_capacity(s.rows.len());
        let mut rows = Vec::with_capacity(s.rows.len());
        for (msg, lease) in s.rows {
            if existing.contains(&msg.id) {
                answer.push(Admitted::Exists);
                continue;
            }
            let first = lease.map(|_| Arc::new(FirstAttempt::new(notify.clone())));
            answer.push(Admitted::New(first.clone()));
            rows.push(Row { msg, lease, first });
        }
        let _ = admitted.send(Ok(answer));
        out.push(Admission {
            rows,
            now_ms: s.now_ms,
            reply: s.reply,
        });
    }
    out
}

/// Which of `ids` the log holds.
async fn existing(pool: &AnyPool, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
    let rows = sqlx::query(
        // `= ANY(ARRAY(...))`: a primary-key probe per id whatever the plan cache guesses (an
        // `IN (SELECT ...)` semi-join turned into a scan of the whole log under a generic plan).
        "SELECT id FROM webhook_messages WHERE id = ANY(ARRAY(SELECT json_array_elements_text($1::json)))",
    )
    .bind(serde_json::json!(ids).to_string())
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get::<String, _>("id")).collect()
}

/// Waits until every first attempt of the group has its outcome, at most `wait`.
async fn settle(group: &[Admission], notify: &Notify, wait: Duration) {
    let deadline = Instant::now() + wait;
    let firsts: Vec<&Arc<FirstAttempt>> = group
        .iter()
        .flat_map(|a| a.rows.iter().filter_map(|r| r.first.as_ref()))
        .collect();
    // `notify_one` keeps a permit when nobody waits, so no outcome is missed between the
    // check and the wait.
    while !firsts.iter().all(|f| f.is_settled()) {
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// A row's state for the statement, and the attempt's waiter when its outcome goes with it.
struct Prepared {
    json: serde_json::Value,
    done: Option<Reply<()>>,
}

fn prepare(row: &Row, now_ms: i64, written_ms: i64) -> Prepared {
    let m = &row.msg;
    let settled = row.first.as_ref().and_then(|f| f.take());
    let mut json = serde_json::json!({
        "id": m.id, "tenant_id": m.tenant_id, "webhook_id": m.webhook_id,
        "event_id": m.event_id, "conversation_id": m.conversation_id,
        "event": m.event.as_str(), "seq": seq(m.event), "body": m.body,
        "created": now_ms, "updated": written_ms,
    });
    let Some(s) = settled else {
        let (next, lease) = first_schedule(m.event, row.lease, now_ms);
        json["status"] = "pending".into();
        json["attempts"] = 0.into();
        json["next"] = next.into();
        json["lease"] = lease.into();
        return Prepared { json, done: None };
    };
    let (status, next, attempt_next) = outcome_state(s.after, written_ms);
    let a = &s.record;
    json["status"] = status.into();
    json["attempts"] = 1.into();
    json["next"] = next.into();
    json["code"] = a.status_code.into();
    json["error"] = a.error.clone().into();
    json["a_started"] = a.started_at_ms.into();
    json["a_outcome"] = a.outcome.into();
    json["a_latency"] = a.latency_ms.into();
    json["a_next"] = attempt_next.into();
    Prepared {
        json,
        done: Some(s.done),
    }
}

/// Writes the group in one durable statement and answers each event (new ids) and each
/// settled attempt after the commit. If the statement fails, each event's rows go alone, so
/// one bad event cannot fail the others.
async fn write(pool: &AnyPool, group: Vec<Admission>) {
    let written_ms = chrono::Utc::now().timestamp_millis();
    let prepared: Vec<Vec<Prepared>> = group
        .iter()
        .map(|a| {
            a.rows
                .iter()
                .map(|r| prepare(r, a.now_ms, written_ms))
                .collect()
        })
        .collect();
    let rows: usize = prepared.iter().map(Vec::len).sum();
    metrics::histogram!(m::WEBHOOK_INSERT_BATCH_SIZE).record(rows as f64);
    let settled = prepared
        .iter()
        .flatten()
        .filter(|p| p.done.is_some())
        .count();
    let all: Vec<&serde_json::Value> = prepared.iter().flatten().map(|p| &p.json).collect();
    let result = if rows == 0 {
        Ok(Vec::new())
    } else {
        insert(pool, &all).await
    };
    drop(all);
    // Outcomes that came while the statement ran wait until the fallback below has written
    // their rows too: an attempt logged before its message row would be an orphan.
    let firsts: Vec<Arc<FirstAttempt>> = group
        .iter()
        .flat_map(|a| a.rows.iter().filter_map(|r| r.first.clone()))
        .collect();
    match result {
        Ok(new) => {
            metrics::counter!(m::WEBHOOK_SETTLED_AT_INSERT_TOTAL).increment(settled as u64);
            let mut new: HashSet<String> = new.into_iter().collect();
            for (a, p) in group.into_iter().zip(prepared) {
                // An id two events share (a replay racing its original) is the first one's.
                let mine = a
                    .rows
                    .iter()
                    .filter(|r| new.remove(&r.msg.id))
                    .map(|r| r.msg.id.clone())
                    .collect();
                answer(a.reply, p, Ok(mine));
            }
        }
        Err(err) if group.len() > 1 => {
            tracing::warn!(error = %err, events = group.len(), "grouped webhook message insert failed; inserting one event at a time");
            for (a, p) in group.into_iter().zip(prepared) {
                let json: Vec<&serde_json::Value> = p.iter().map(|p| &p.json).collect();
                let result = insert(pool, &json).await.map_err(|e| e.to_string());
                drop(json);
                if result.is_ok() {
                    let n = p.iter().filter(|p| p.done.is_some()).count();
                    metrics::counter!(m::WEBHOOK_SETTLED_AT_INSERT_TOTAL).increment(n as u64);
                }
                answer(a.reply, p, result);
            }
        }
        Err(err) => {
            for (a, p) in group.into_iter().zip(prepared) {
                answer(a.reply, p, Err(err.to_string()));
            }
        }
    }
    for f in firsts {
        f.ended();
    }
}

fn answer(reply: Reply<Vec<String>>, rows: Vec<Prepared>, result: Result<Vec<String>, String>) {
    let written = result.as_ref().map(|_| ()).map_err(Clone::clone);
    for done in rows.into_iter().filter_map(|p| p.done) {
        let _ = done.send(written.clone());
    }
    let _ = reply.send(result);
}

/// One statement: the message rows (insert-if-absent) and, for rows that carry their first
/// attempt and were new, the attempt rows; the ids that were new.
async fn insert(pool: &AnyPool, rows: &[&serde_json::Value]) -> Result<Vec<String>, String> {
    let found = sqlx::query(
        "WITH v AS (SELECT * FROM json_to_recordset($1::json) AS x(id text, tenant_id text, webhook_id text, event_id text, conversation_id text, event text, seq bigint, body text, status text, attempts bigint, next bigint, lease bigint, code bigint, error text, created bigint, updated bigint, a_started bigint, a_outcome text, a_latency bigint, a_next bigint)), \
         ins AS (INSERT INTO webhook_messages (id, tenant_id, webhook_id, event_id, conversation_id, event, seq, body, status, attempts, round_attempts, next_attempt_at_ms, lease_until_ms, last_status_code, last_error, created_at_ms, updated_at_ms) \
                 SELECT id, tenant_id, webhook_id, event_id, conversation_id, event, seq, body, status, attempts, attempts, next, lease, code, error, created, updated FROM v ON CONFLICT (id) DO NOTHING RETURNING id), \
         logged AS (INSERT INTO webhook_attempts (message_id, attempt, started_at_ms, outcome, status_code, latency_ms, error, next_attempt_at_ms) \
                 SELECT v.id, 1, v.a_started, v.a_outcome, v.code, v.a_latency, v.error, v.a_next FROM v JOIN ins ON ins.id = v.id WHERE v.a_outcome IS NOT NULL ON CONFLICT (message_id, attempt) DO NOTHING) \
         SELECT id FROM ins",
    )
    .bind(serde_json::json!(rows).to_string())
    .fetch_all(pool)
    .await
    .map_err(|e| e.to_string())?;
    found
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AttemptRecord {
        AttemptRecord {
            started_at_ms: 1,
            outcome: "ok",
            status_code: Some(204),
            latency_ms: 2,
            error: None,
        }
    }

    /// An outcome before the write goes into the row and is answered after it.
    #[tokio::test]
    async fn an_outcome_before_the_write_goes_with_the_row() {
        let group = Arc::new(Notify::new());
        let first = FirstAttempt::new(group.clone());
        assert!(!first.is_settled());
        let answer = first
            .settle(&record(), After::Delivered)
            .await
            .expect("open: the intake takes it");
        assert!(first.is_settled());
        // The group's wait was woken (the permit is kept for a later waiter).
        tokio::time::timeout(Duration::from_secs(1), group.notified())
            .await
            .expect("group notified");
        let taken = first.take().expect("the outcome");
        assert_eq!(taken.after, After::Delivered);
        assert_eq!(taken.record.status_code, Some(204));
        let _ = taken.done.send(Ok(()));
        assert_eq!(answer.await.expect("answered"), Ok(()));
    }

    /// An outcome after the row went in without it waits for the statement to end, then is
    /// logged as usual (its attempt row needs the message row).
    #[tokio::test]
    async fn an_outcome_after_the_write_waits_for_its_statement() {
        let first = Arc::new(FirstAttempt::new(Arc::new(Notify::new())));
        assert!(first.take().is_none(), "nothing settled yet");
        let late = {
            let first = first.clone();
            tokio::spawn(async move { first.settle(&record(), After::Delivered).await.is_none() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!late.is_finished(), "must wait while the statement runs");
        first.ended();
        let logged = tokio::time::timeout(Duration::from_secs(1), late)
            .await
            .expect("released when the statement ends")
            .expect("task");
        assert!(
            logged,
            "after the write the outcome is logged, not handed over"
        );
        assert!(!first.is_settled());
    }
}
