//! The effect log (`gws_effects`): each GWS effect is recorded `pending` before its call and
//! `done` or `rejected` after it, in the provisioning database (PostgreSQL, SQLite in `nexus dev`).

use sqlx::{AnyPool, Row};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("gws effect log unavailable: {0}")]
    Store(#[from] sqlx::Error),
    #[error("gws effect log: unknown status `{0}`")]
    BadStatus(String),
}

/// Where an effect stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Asked for; `attempts` calls were made, none known to have succeeded.
    Pending,
    /// GWS took it (answered 2xx, or reconciliation found it).
    Done,
    /// GWS refused it (4xx); the event was dead-lettered.
    Rejected,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Done => "done",
            Status::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Result<Status, LogError> {
        match s {
            "pending" => Ok(Status::Pending),
            "done" => Ok(Status::Done),
            "rejected" => Ok(Status::Rejected),
            other => Err(LogError::BadStatus(other.to_string())),
        }
    }
}

/// One effect: tenant, conversation and the effect's key within it.
#[derive(Debug, Clone, Copy)]
pub struct EffectKey<'a> {
    pub tenant_id: &'a str,
    pub conversation_id: &'a str,
    pub effect: &'a str,
}

/// An effect's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub status: Status,
    /// Calls made so far.
    pub attempts: i64,
    /// When the latest call started (ms since the epoch).
    pub attempted_at_ms: Option<i64>,
    pub detail: Option<String>,
}

pub struct EffectLog {
    pool: AnyPool,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl EffectLog {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Records the intent (`pending`, no call yet) unless the effect is known, and returns the
    /// effect's entry as it stands.
    pub async fn open(
        &self,
        key: EffectKey<'_>,
        event_id: &str,
        operation: &str,
    ) -> Result<Entry, LogError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO gws_effects (tenant_id, conversation_id, effect_key, event_id, operation, \
             status, attempts, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $6) \
             ON CONFLICT (tenant_id, conversation_id, effect_key) DO NOTHING",
        )
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .bind(event_id)
        .bind(operation)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(
            "SELECT status, attempts, attempted_at_ms, detail FROM gws_effects \
             WHERE tenant_id = $1 AND conversation_id = $2 AND effect_key = $3",
        )
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .fetch_one(&self.pool)
        .await?;
        let status: String = row.try_get("status")?;
        Ok(Entry {
            status: Status::parse(&status)?,
            attempts: row.try_get("attempts")?,
            attempted_at_ms: row.try_get("attempted_at_ms")?,
            detail: row.try_get("detail")?,
        })
    }

    /// Takes the next call of a pending effect, if nobody took one since the caller read
    /// `seen` attempts: `false` when another worker got there first.
    pub async fn claim(&self, key: EffectKey<'_>, seen: i64) -> Result<bool, LogError> {
        let now = now_ms();
        let done = sqlx::query(
            "UPDATE gws_effects SET attempts = attempts + 1, attempted_at_ms = $1, updated_at_ms = $1 \
             WHERE tenant_id = $2 AND conversation_id = $3 AND effect_key = $4 \
             AND status = 'pending' AND attempts = $5",
        )
        .bind(now)
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .bind(seen)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the call of `attempt` (the attempts count its claim set) as over without effect
    /// (GWS refused it, or it was never sent): `attempted_at_ms` is cleared, so the next try
    /// does not wait for it to leave the in-flight window. A no-op if another claim came since.
    pub async fn release(&self, key: EffectKey<'_>, attempt: i64) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE gws_effects SET attempted_at_ms = NULL, updated_at_ms = $1 \
             WHERE tenant_id = $2 AND conversation_id = $3 AND effect_key = $4 \
             AND status = 'pending' AND attempts = $5",
        )
        .bind(now_ms())
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .bind(attempt)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Settles a pending effect as `done` or `rejected`.
    pub async fn finish(
        &self,
        key: EffectKey<'_>,
        status: Status,
        detail: &str,
    ) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE gws_effects SET status = $1, detail = $2, updated_at_ms = $3 \
             WHERE tenant_id = $4 AND conversation_id = $5 AND effect_key = $6 AND status = 'pending'",
        )
        .bind(status.as_str())
        .bind(detail)
        .bind(now_ms())
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Makes a rejected effect pending again, for a redelivered event (a replay from the
    /// dead-letter topic): GWS refused it, so nothing took effect and it may be tried again. The
    /// refused call answered, so none is in flight (`attempted_at_ms` cleared).
    pub async fn reopen(&self, key: EffectKey<'_>) -> Result<(), LogError> {
        sqlx::query(
            "UPDATE gws_effects SET status = 'pending', attempted_at_ms = NULL, updated_at_ms = $1 \
             WHERE tenant_id = $2 AND conversation_id = $3 AND effect_key = $4 AND status = 'rejected'",
        )
        .bind(now_ms())
        .bind(key.tenant_id)
        .bind(key.conversation_id)
        .bind(key.effect)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the rows last touched before `before_ms` (any status) of conversations with
    /// nothing waiting in the retry backlog (a pending row there still tells its retry that an
    /// earlier call may have reached GWS); returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, LogError> {
        let done = sqlx::query(
            "DELETE FROM gws_effects WHERE updated_at_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog b WHERE b.role = 'gws' \
             AND b.tenant_id = gws_effects.tenant_id \
             AND b.conversation_id = gws_effects.conversation_id)",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::provisioning::secrets::EncryptionKey;
    use crate::stores::provisioning::Provisioning;

    /// An effect log on a fresh SQLite database (the directory lives as long as the first item).
    async fn sqlite_log() -> (tempfile::TempDir, Provisioning, EffectLog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
        let db = Provisioning::connect(&dir.path().join("p.db").display().to_string(), &key)
            .await
            .expect("sqlite");
        let log = EffectLog::new(db.pool().clone());
        (dir, db, log)
    }

    /// The same SQL on SQLite (`nexus dev`); the integration tests run it on PostgreSQL.
    #[tokio::test]
    async fn intent_claim_and_outcome_on_sqlite() {
        let (_dir, db, log) = sqlite_log().await;
        let k = EffectKey {
            tenant_id: "t1",
            conversation_id: "c1",
            effect: "send:m-1",
        };
        let first = log.open(k, "e1", "SendMessage").await.expect("open");
        assert_eq!((first.status, first.attempts), (Status::Pending, 0));
        assert!(log.claim(k, 0).await.expect("claim"));
        assert!(
            !log.claim(k, 0).await.expect("claim"),
            "a second claimant of the same attempt loses"
        );
        // A redelivery (another event id for the same effect) sees the attempt.
        let again = log.open(k, "e2", "SendMessage").await.expect("reopen");
        assert_eq!((again.status, again.attempts), (Status::Pending, 1));
        assert!(again.attempted_at_ms.is_some());
        log.finish(k, Status::Done, "called").await.expect("finish");
        let done = log.open(k, "e3", "SendMessage").await.expect("reopen");
        assert_eq!(
            (done.status, done.detail.as_deref()),
            (Status::Done, Some("called"))
        );
        // Settled effects stay settled.
        log.finish(k, Status::Rejected, "late")
            .await
            .expect("finish");
        assert_eq!(
            log.open(k, "e4", "SendMessage").await.expect("open").status,
            Status::Done
        );
        assert!(!log.claim(k, 1).await.expect("claim"));
        // Other tenants' effects are other rows.
        let other = EffectKey {
            tenant_id: "t2",
            ..k
        };
        assert_eq!(
            log.open(other, "e5", "SendMessage")
                .await
                .expect("open")
                .status,
            Status::Pending
        );
        db.close().await;
    }

    /// A refused call's claim is released (no call in flight) only while it is the latest:
    /// another worker's newer claim keeps its time.
    #[tokio::test]
    async fn a_release_clears_only_its_own_claim() {
        let (_dir, db, log) = sqlite_log().await;
        let k = EffectKey {
            tenant_id: "t1",
            conversation_id: "c1",
            effect: "accept:a1:o1",
        };
        log.open(k, "e1", "Accept").await.expect("open");
        assert!(log.claim(k, 0).await.expect("claim"));
        log.release(k, 1).await.expect("release");
        let released = log.open(k, "e1", "Accept").await.expect("open");
        assert_eq!(
            (released.attempts, released.attempted_at_ms),
            (1, None),
            "the attempt still counts, its time is gone"
        );
        assert!(log.claim(k, 1).await.expect("claim"));
        log.release(k, 1).await.expect("a stale release");
        let claimed = log.open(k, "e1", "Accept").await.expect("open");
        assert_eq!(claimed.attempts, 2);
        assert!(
            claimed.attempted_at_ms.is_some(),
            "a newer claim was released"
        );
        db.close().await;
    }

    /// Old rows go, but not those of a conversation with events waiting in the retry backlog:
    /// its retry must still see the pending row (an earlier call may have reached GWS).
    #[tokio::test]
    async fn prune_keeps_what_the_backlog_still_needs() {
        let (_dir, db, log) = sqlite_log().await;
        for c in ["c1", "c2"] {
            let k = EffectKey {
                tenant_id: "t1",
                conversation_id: c,
                effect: "send:m-1",
            };
            log.open(k, "e1", "SendMessage").await.expect("open");
            assert!(log.claim(k, 0).await.expect("claim"));
        }
        sqlx::query(
            "INSERT INTO effect_backlog (role, tenant_id, conversation_id, seq, event_id, topic, \
             source_partition, source_offset, record_key, payload, headers_json, due_at_ms, \
             attempts, created_at_ms) \
             VALUES ('gws', 't1', 'c2', 1, 'e1', 'nexus.agent.v1', 0, 0, 'c2', '', '[]', 0, 0, 0)",
        )
        .execute(db.pool())
        .await
        .expect("backlog row");
        let later = now_ms() + 1_000;
        assert_eq!(log.prune(later).await.expect("prune"), 1, "c1's row only");
        let kept = EffectKey {
            tenant_id: "t1",
            conversation_id: "c2",
            effect: "send:m-1",
        };
        let row = log.open(kept, "e2", "SendMessage").await.expect("open");
        assert_eq!(
            (row.status, row.attempts),
            (Status::Pending, 1),
            "still attempted"
        );
        db.close().await;
    }
}
