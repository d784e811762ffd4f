//! The history worker's effect state in the provisioning database (PostgreSQL, SQLite in
//! `nexus dev`; one SQL text for both): per conversation its UCS ids and last applied step.
//!
//! Every transition is a compare-and-set on the step (`WHERE step = from`), so two members
//! handling one conversation during a rebalance apply each step once between them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, Row};

use crate::events::chat::{CloseReason, Contact, ParticipantKind};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("history state store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("history state of {conversation_id}: bad `{column}`: {message}")]
    Corrupt {
        conversation_id: String,
        column: &'static str,
        message: String,
    },
}

/// How far a conversation has been written to UCS; each step is one UCS call done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Recorded here, nothing at UCS yet.
    Recorded = 0,
    /// IdentifyContact answered; `contact_id` is set.
    ContactIdentified = 1,
    /// InsertInteraction done; `interaction_id` is set.
    InteractionInserted = 2,
    /// The transcript document is added (attachments follow, counted by `attachments_done`).
    TranscriptAdded = 3,
    /// Every attachment is added (or noted as missing).
    AttachmentsAdded = 4,
    /// SetInteractionStatus done: nothing left for this conversation.
    Done = 5,
}

impl Step {
    pub fn from_i64(v: i64) -> Option<Step> {
        Some(match v {
            0 => Step::Recorded,
            1 => Step::ContactIdentified,
            2 => Step::InteractionInserted,
            3 => Step::TranscriptAdded,
            4 => Step::AttachmentsAdded,
            5 => Step::Done,
            _ => return None,
        })
    }
}

/// What ConversationStarted said, as the UCS calls need it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub nickname: String,
    pub contact: Contact,
    pub subject: Option<String>,
    pub user_data: BTreeMap<String, String>,
    pub started_at_ms: i64,
    /// The start's event id ("" in rows from before): its own retry is no duplicate.
    #[serde(default)]
    pub event_id: String,
}

/// What ConversationClosed said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closed {
    pub reason: CloseReason,
    pub closed_by_participant_id: Option<String>,
    pub closed_at_ms: i64,
    /// When this role recorded the close, on its own clock (0 in rows from before): the
    /// transcript's settle wait counts from here, so neither the role's lag nor another pod's
    /// clock shortens it.
    #[serde(default)]
    pub recorded_at_ms: i64,
    /// The close's event id ("" in rows from before): its own deferred run is no duplicate.
    #[serde(default)]
    pub event_id: String,
}

/// One transcript entry kept until the close.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub position: i64,
    /// `Message`, `ParticipantJoined` or `ParticipantLeft`.
    pub kind: String,
    pub at_ms: i64,
    pub participant_id: String,
    pub participant_kind: ParticipantKind,
    pub nickname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media_ids: Vec<String>,
    /// A message for agents only (an internal note, a private consult).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agents_only: bool,
}

/// A conversation's row.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub step: Step,
    pub started: Started,
    pub contact_id: Option<String>,
    pub interaction_id: Option<String>,
    pub closed: Option<Closed>,
    pub attachments_done: i64,
    /// The positions the transcript document holds, frozen at its first attempt (migration
    /// 0013); `None` before, or for documents written before the migration.
    pub written: Option<Vec<i64>>,
}

/// The tables of migration 0005_history.
#[derive(Clone)]
pub struct HistoryStore {
    pool: AnyPool,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Plain structs of strings, numbers and enums always serialise.
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// What became of an entry given to [`HistoryStore::add_entry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    New,
    /// Kept before (a redelivery).
    Duplicate,
    /// The transcript was written without it (it came while or after the document was
    /// written).
    Late,
}

/// Whether the document whose positions are `written` (ascending, as [`HistoryStore::entries`]
/// reads them) holds the entry at `position`.
pub fn in_document(written: &[i64], position: i64) -> bool {
    written.binary_search(&position).is_ok()
}

impl HistoryStore {
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Records a started conversation; `false` if it was already recorded (a redelivery).
    pub async fn record_start(
        &self,
        tenant: &str,
        conversation: &str,
        started: &Started,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO history_conversations (tenant_id, conversation_id, step, started_json, \
             attachments_done, last_event_id, updated_at_ms) VALUES ($1, $2, 0, $3, 0, $4, $5) \
             ON CONFLICT (tenant_id, conversation_id) DO NOTHING",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(to_json(started))
        .bind(event_id.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Keeps an entry by position unless the transcript is already written.
    pub async fn add_entry(
        &self,
        tenant: &str,
        conversation: &str,
        entry: &Entry,
    ) -> Result<Kept, StoreError> {
        // SQLite needs the WHERE to tell the upsert's ON CONFLICT from a join clause.
        let done = sqlx::query(
            "INSERT INTO history_entries \
             (tenant_id, conversation_id, position, entry_json, stored_at_ms) \
             SELECT $1, $2, $3, $4, $5 WHERE NOT EXISTS (SELECT 1 FROM history_conversations \
             WHERE tenant_id = $1 AND conversation_id = $2 AND step >= 3) \
             ON CONFLICT (tenant_id, conversation_id, position) DO NOTHING",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(entry.position)
        .bind(to_json(entry))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(Kept::New);
        }
        // Not kept: a redelivery, or the transcript went without it (rare, so asked only then).
        let written: Option<Option<String>> = sqlx::query_scalar(
            "SELECT written_json FROM history_conversations WHERE tenant_id = $1 \
             AND conversation_id = $2 AND step >= 3",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .fetch_optional(&self.pool)
        .await?;
        // No written positions (a document from before migration 0013) tell nothing.
        let Some(json) = written.flatten() else {
            return Ok(Kept::Duplicate);
        };
        let written = positions_of(conversation, &json)?;
        Ok(if in_document(&written, entry.position) {
            Kept::Duplicate
        } else {
            Kept::Late
        })
    }

    /// Freezes the positions the transcript document holds, before its first attempt; `false`
    /// if they were frozen already (another member's attempt: the caller loads them again).
    pub async fn set_written(
        &self,
        tenant: &str,
        conversation: &str,
        positions: &[i64],
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE history_conversations SET written_json = $3 WHERE tenant_id = $1 \
             AND conversation_id = $2 AND step = 2 AND written_json IS NULL",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(to_json(&positions))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the close once; `false` if it was recorded before or the conversation is unknown.
    pub async fn record_close(
        &self,
        tenant: &str,
        conversation: &str,
        closed: &Closed,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE history_conversations SET closed_json = $3, last_event_id = $4, \
             updated_at_ms = $5 WHERE tenant_id = $1 AND conversation_id = $2 \
             AND closed_json IS NULL",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(to_json(closed))
        .bind(event_id.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn load(
        &self,
        tenant: &str,
        conversation: &str,
    ) -> Result<Option<State>, StoreError> {
        let row = sqlx::query(
            "SELECT step, started_json, contact_id, interaction_id, closed_json, \
             attachments_done, written_json FROM history_conversations \
             WHERE tenant_id = $1 AND conversation_id = $2",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| state_of(conversation, &r)).transpose()
    }

    /// The kept entries in transcript order.
    pub async fn entries(
        &self,
        tenant: &str,
        conversation: &str,
    ) -> Result<Vec<Entry>, StoreError> {
        let rows = sqlx::query(
            "SELECT entry_json FROM history_entries WHERE tenant_id = $1 \
             AND conversation_id = $2 ORDER BY position",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get("entry_json")?;
                serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                    conversation_id: conversation.to_string(),
                    column: "entry_json",
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Moves `from` → `to`, setting the UCS ids given; `false` if another member moved first.
    #[allow(clippy::too_many_arguments)]
    pub async fn advance(
        &self,
        tenant: &str,
        conversation: &str,
        from: Step,
        to: Step,
        contact_id: Option<&str>,
        interaction_id: Option<&str>,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE history_conversations SET step = $4, \
             contact_id = COALESCE($5, contact_id), interaction_id = COALESCE($6, interaction_id), \
             last_event_id = $7, updated_at_ms = $8 \
             WHERE tenant_id = $1 AND conversation_id = $2 AND step = $3",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(from as i64)
        .bind(to as i64)
        .bind(contact_id.map(str::to_string))
        .bind(interaction_id.map(str::to_string))
        .bind(event_id.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Counts attachment `done` (0-based) as added; `false` if another member counted it.
    pub async fn attachment_added(
        &self,
        tenant: &str,
        conversation: &str,
        done: i64,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE history_conversations SET attachments_done = $3 + 1, last_event_id = $4, \
             updated_at_ms = $5 WHERE tenant_id = $1 AND conversation_id = $2 AND step = 3 \
             AND attachments_done = $3",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .bind(done)
        .bind(event_id.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Deletes, with the entries they kept, conversations last changed before `before_ms` that
    /// are finished (status set at UCS), closed but never finished (their UCS writes were
    /// dead-lettered), or open with no entry kept since either (their close never reached the
    /// worker: config check keeps a chat's idle timeout and grace under the retention);
    /// answers how many conversations. A quiet async chat whose customer keeps coming back
    /// keeps getting entries and stays. Entries whose conversation is gone go too. Nothing of a
    /// conversation with events waiting in the retry backlog goes (its close may be among them).
    pub async fn prune_done(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM history_entries WHERE EXISTS (SELECT 1 FROM history_conversations c \
             WHERE c.tenant_id = history_entries.tenant_id \
             AND c.conversation_id = history_entries.conversation_id \
             AND c.closed_json IS NOT NULL AND c.updated_at_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog b WHERE b.role = 'history' \
             AND b.tenant_id = c.tenant_id AND b.conversation_id = c.conversation_id))",
        )
        .bind(before_ms)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "DELETE FROM history_conversations WHERE (step = $1 OR closed_json IS NOT NULL) \
             AND updated_at_ms < $2 \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog b WHERE b.role = 'history' \
             AND b.tenant_id = history_conversations.tenant_id \
             AND b.conversation_id = history_conversations.conversation_id)",
        )
        .bind(Step::Done as i64)
        .bind(before_ms)
        .execute(&mut *tx)
        .await?;
        // Entries kept before `stored_at_ms` existed read 0 (unknown) and keep theirs. A
        // conversation with events waiting in the retry backlog (its UCS down for weeks, its
        // close queued there) is waiting, not abandoned.
        let abandoned = sqlx::query(
            "DELETE FROM history_conversations WHERE closed_json IS NULL AND step <> $1 \
             AND updated_at_ms < $2 AND NOT EXISTS (SELECT 1 FROM history_entries e \
             WHERE e.tenant_id = history_conversations.tenant_id \
             AND e.conversation_id = history_conversations.conversation_id \
             AND (e.stored_at_ms >= $2 OR e.stored_at_ms = 0)) \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog b WHERE b.role = 'history' \
             AND b.tenant_id = history_conversations.tenant_id \
             AND b.conversation_id = history_conversations.conversation_id)",
        )
        .bind(Step::Done as i64)
        .bind(before_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM history_entries WHERE stored_at_ms <> 0 AND stored_at_ms < $1 \
             AND NOT EXISTS (SELECT 1 FROM history_conversations c \
             WHERE c.tenant_id = history_entries.tenant_id \
             AND c.conversation_id = history_entries.conversation_id) \
             AND NOT EXISTS (SELECT 1 FROM effect_backlog b WHERE b.role = 'history' \
             AND b.tenant_id = history_entries.tenant_id \
             AND b.conversation_id = history_entries.conversation_id)",
        )
        .bind(before_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        if abandoned.rows_affected() > 0 {
            tracing::warn!(
                conversations = abandoned.rows_affected(),
                "pruned open conversations nobody wrote to within the retention: their close \
                 never reached the history worker, so UCS has no transcript for them"
            );
        }
        Ok(done.rows_affected() + abandoned.rows_affected())
    }

    /// Drops the kept entries of a conversation whose transcript is written.
    pub async fn drop_entries(&self, tenant: &str, conversation: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM history_entries WHERE tenant_id = $1 AND conversation_id = $2")
            .bind(tenant.to_string())
            .bind(conversation.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn state_of(conversation: &str, r: &AnyRow) -> Result<State, StoreError> {
    let corrupt = |column: &'static str, message: String| StoreError::Corrupt {
        conversation_id: conversation.to_string(),
        column,
        message,
    };
    let step: i64 = r.try_get("step")?;
    let started: String = r.try_get("started_json")?;
    let closed: Option<String> = r.try_get("closed_json")?;
    Ok(State {
        step: Step::from_i64(step).ok_or_else(|| corrupt("step", step.to_string()))?,
        started: serde_json::from_str(&started)
            .map_err(|e| corrupt("started_json", e.to_string()))?,
        contact_id: r.try_get("contact_id")?,
        interaction_id: r.try_get("interaction_id")?,
        closed: closed
            .map(|c| serde_json::from_str(&c))
            .transpose()
            .map_err(|e| corrupt("closed_json", e.to_string()))?,
        attachments_done: r.try_get("attachments_done")?,
        written: r
            .try_get::<Option<String>, _>("written_json")?
            .map(|w| positions_of(conversation, &w))
            .transpose()?,
    })
}

fn positions_of(conversation: &str, json: &str) -> Result<Vec<i64>, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        conversation_id: conversation.to_string(),
        column: "written_json",
        message: e.to_string(),
    })
}
