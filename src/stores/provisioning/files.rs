//! Chat files: the bytes a customer uploads into a conversation. They are kept in this database,
//! not on an edge's disk, so every edge pod can serve them. A file is read and counted by
//! `(tenant, conversation, id)` only: no other session, and no other tenant, can reach it.
//! A file past `expires_at_ms` is refused and not counted; [`Provisioning::sweep_files`]
//! empties its bytes and, once no transcript can name it any more, removes its row.

use sqlx::any::AnyRow;

use super::sql::{self, get};
use super::{Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, tenant_id, conversation_id, name, content_type, size, data, \
    created_at_ms, expires_at_ms FROM chat_files";

/// A file to store; the edge has checked its type and size.
#[derive(Debug, Clone)]
pub struct NewChatFile {
    /// A stable id (a retried upload's, see the chat edge); `None`: a new UUID v7.
    pub id: Option<String>,
    pub tenant_id: String,
    pub conversation_id: String,
    pub name: String,
    pub content_type: String,
    pub data: Vec<u8>,
    /// `None`: kept until the tenant is deleted.
    pub expires_at_ms: Option<i64>,
}

/// A stored file with its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatFile {
    /// UUID v7.
    pub id: String,
    pub tenant_id: String,
    pub conversation_id: String,
    pub name: String,
    pub content_type: String,
    pub size: i64,
    pub data: Vec<u8>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

fn from_row(row: &AnyRow) -> Result<ChatFile, ProvisioningError> {
    Ok(ChatFile {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        conversation_id: get(row, "conversation_id")?,
        name: get(row, "name")?,
        content_type: get(row, "content_type")?,
        size: get(row, "size")?,
        data: get(row, "data")?,
        created_at_ms: get(row, "created_at_ms")?,
        expires_at_ms: get(row, "expires_at_ms")?,
    })
}

impl Provisioning {
    /// Stores a file unless its conversation already holds `max_files`: `None` then. The count
    /// and the insert are one statement: SQLite runs one write at a time, and on PostgreSQL
    /// (where a statement counts only what was committed before it began) the statement runs
    /// under a transaction lock on the conversation, so uploads racing for the last place take
    /// it once. The file answered carries no bytes (`data` empty; `size` says how many were
    /// stored).
    pub async fn put_file(
        &self,
        new: NewChatFile,
        max_files: usize,
    ) -> Result<Option<ChatFile>, ProvisioningError> {
        let mut file = ChatFile {
            id: new.id.unwrap_or_else(sql::new_id),
            size: i64::try_from(new.data.len()).unwrap_or(i64::MAX),
            tenant_id: new.tenant_id,
            conversation_id: new.conversation_id,
            name: new.name,
            content_type: new.content_type,
            data: new.data,
            created_at_ms: sql::now_ms(),
            expires_at_ms: new.expires_at_ms,
        };
        let mut tx = self.pool.begin().await.map_err(sql::unavailable)?;
        if self.kind == "postgres" {
            // The two-key form: a lock space apart from the one-key locks of migrations.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))")
                .bind(file.tenant_id.clone())
                .bind(file.conversation_id.clone())
                .execute(&mut *tx)
                .await
                .map_err(sql::unavailable)?;
        }
        let done = sqlx::query(
            "INSERT INTO chat_files (id, tenant_id, conversation_id, name, content_type, size, \
             data, created_at_ms, expires_at_ms) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9 \
             WHERE (SELECT COUNT(*) FROM chat_files WHERE tenant_id = $2 AND conversation_id = $3 \
             AND (expires_at_ms IS NULL OR expires_at_ms > $8)) < $10",
        )
        .bind(file.id.clone())
        .bind(file.tenant_id.clone())
        .bind(file.conversation_id.clone())
        .bind(file.name.clone())
        .bind(file.content_type.clone())
        .bind(file.size)
        // Moved, not copied: an upload's bytes are in memory once.
        .bind(std::mem::take(&mut file.data))
        .bind(file.created_at_ms)
        .bind(file.expires_at_ms)
        .bind(i64::try_from(max_files).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .map_err(|e| sql::write_error(e, String::new, || "no such tenant".into()))?;
        tx.commit().await.map_err(sql::unavailable)?;
        Ok((done.rows_affected() == 1).then_some(file))
    }

    /// A file of the conversation; `Expired(File)` once past its expiry (also as a tombstone,
    /// its bytes swept).
    pub async fn file(
        &self,
        tenant_id: &str,
        conversation_id: &str,
        id: &str,
    ) -> Result<ChatFile, ProvisioningError> {
        let row = sqlx::query(&format!(
            "{SELECT} WHERE tenant_id = $1 AND conversation_id = $2 AND id = $3"
        ))
        .bind(tenant_id.to_string())
        .bind(conversation_id.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        let file = match row {
            Some(row) => from_row(&row)?,
            None => return Err(ProvisioningError::NotFound(Object::File)),
        };
        if file.expires_at_ms.is_some_and(|at| at <= sql::now_ms()) {
            return Err(ProvisioningError::Expired(Object::File));
        }
        Ok(file)
    }

    /// Empties the bytes of up to `batch` files expired at `now_ms`, keeping their rows as
    /// tombstones (an id answers `Expired`, not `NotFound`); returns how many this call
    /// emptied. Idempotent: processes sweeping at once empty each file once between them.
    pub async fn sweep_files(&self, now_ms: i64, batch: usize) -> Result<u64, ProvisioningError> {
        let done = sqlx::query(
            // `swept = 0` again outside: a row another sweeper emptied between this one's
            // select and its update is not counted twice (PostgreSQL re-checks the outer WHERE).
            "UPDATE chat_files SET data = $3, swept = 1 WHERE swept = 0 AND id IN \
             (SELECT id FROM chat_files WHERE expires_at_ms <= $1 AND swept = 0 LIMIT $2)",
        )
        .bind(now_ms)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .bind(Vec::<u8>::new())
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(done.rows_affected())
    }

    /// Deletes up to `batch` tombstones of files that expired before `before_ms` (when no
    /// transcript names them any more); returns how many.
    pub async fn forget_swept_files(
        &self,
        before_ms: i64,
        batch: usize,
    ) -> Result<u64, ProvisioningError> {
        let done = sqlx::query(
            "DELETE FROM chat_files WHERE id IN \
             (SELECT id FROM chat_files WHERE swept = 1 AND expires_at_ms <= $1 LIMIT $2)",
        )
        .bind(before_ms)
        .bind(i64::try_from(batch).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(done.rows_affected())
    }

    /// Deletes a file (an upload whose message could not be published gives its place back).
    pub async fn delete_file(
        &self,
        tenant_id: &str,
        conversation_id: &str,
        id: &str,
    ) -> Result<(), ProvisioningError> {
        sqlx::query(
            "DELETE FROM chat_files WHERE tenant_id = $1 AND conversation_id = $2 AND id = $3",
        )
        .bind(tenant_id.to_string())
        .bind(conversation_id.to_string())
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(())
    }

    /// How many unexpired files the conversation holds (an expired one gives its place back
    /// before the sweeper empties it).
    pub async fn count_files(
        &self,
        tenant_id: &str,
        conversation_id: &str,
    ) -> Result<usize, ProvisioningError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM chat_files WHERE tenant_id = $1 AND conversation_id = $2 \
             AND (expires_at_ms IS NULL OR expires_at_ms > $3)",
        )
        .bind(tenant_id.to_string())
        .bind(conversation_id.to_string())
        .bind(sql::now_ms())
        .fetch_one(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::provisioning::models::NewTenant;

    async fn store(dir: &tempfile::TempDir) -> (Provisioning, String) {
        let p = Provisioning::temporary(dir.path()).await;
        let t = p
            .create_tenant(NewTenant { name: "t".into() })
            .await
            .expect("tenant");
        (p, t.id)
    }

    fn new(tenant: &str, conversation: &str, data: &[u8]) -> NewChatFile {
        NewChatFile {
            id: None,
            tenant_id: tenant.into(),
            conversation_id: conversation.into(),
            name: "a.png".into(),
            content_type: "image/png".into(),
            data: data.to_vec(),
            expires_at_ms: None,
        }
    }

    #[tokio::test]
    async fn files_round_trip_scoped_and_limited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, t) = store(&dir).await;
        let bytes = [0u8, 1, 2, 255, 0, 10];
        let f = p
            .put_file(new(&t, "c1", &bytes), 2)
            .await
            .expect("put")
            .expect("room");
        let got = p.file(&t, "c1", &f.id).await.expect("file");
        assert!(f.data.is_empty(), "the answer carries no bytes");
        assert_eq!(
            got,
            ChatFile {
                data: bytes.to_vec(),
                ..f.clone()
            }
        );
        assert_eq!(got.size, 6);
        for (tenant, conv) in [(t.as_str(), "c2"), ("other", "c1")] {
            assert!(matches!(
                p.file(tenant, conv, &f.id).await,
                Err(ProvisioningError::NotFound(Object::File))
            ));
        }
        p.put_file(new(&t, "c1", b"x"), 2)
            .await
            .expect("put")
            .expect("room");
        assert!(p
            .put_file(new(&t, "c1", b"y"), 2)
            .await
            .expect("put")
            .is_none());
        assert_eq!(p.count_files(&t, "c1").await.expect("count"), 2);
        assert_eq!(p.count_files(&t, "c2").await.expect("count"), 0);
        p.delete_file(&t, "c1", &f.id).await.expect("delete");
        assert_eq!(p.count_files(&t, "c1").await.expect("count"), 1);
        let expired = NewChatFile {
            id: None,
            expires_at_ms: Some(1),
            ..new(&t, "c3", b"z")
        };
        let e = p.put_file(expired, 2).await.expect("put").expect("room");
        assert!(matches!(
            p.file(&t, "c3", &e.id).await,
            Err(ProvisioningError::Expired(Object::File))
        ));
    }

    #[tokio::test]
    async fn expired_files_take_no_place_and_are_swept_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (p, t) = store(&dir).await;
        let expired = |conv: &str| NewChatFile {
            id: None,
            expires_at_ms: Some(1),
            ..new(&t, conv, b"old")
        };
        // An expired file does not count against the limit of 1.
        p.put_file(expired("c1"), 1)
            .await
            .expect("put")
            .expect("room");
        assert_eq!(p.count_files(&t, "c1").await.expect("count"), 0);
        let kept = NewChatFile {
            id: None,
            expires_at_ms: Some(i64::MAX),
            ..new(&t, "c1", b"new")
        };
        let kept = p.put_file(kept, 1).await.expect("put").expect("room");
        assert_eq!(p.count_files(&t, "c1").await.expect("count"), 1);
        for conv in ["c2", "c3", "c4"] {
            p.put_file(expired(conv), 1)
                .await
                .expect("put")
                .expect("room");
        }
        let forever = p
            .put_file(new(&t, "c5", b"x"), 1)
            .await
            .expect("put")
            .expect("room");
        // Batches of 3: 4 expired files take two calls; then nothing is left to empty.
        let now = sql::now_ms();
        assert_eq!(p.sweep_files(now, 3).await.expect("sweep"), 3);
        assert_eq!(p.sweep_files(now, 3).await.expect("sweep"), 1);
        assert_eq!(p.sweep_files(now, 3).await.expect("sweep"), 0);
        let with = |f: &ChatFile, data: &[u8]| ChatFile {
            data: data.to_vec(),
            ..f.clone()
        };
        assert_eq!(
            p.file(&t, "c1", &kept.id).await.expect("kept"),
            with(&kept, b"new")
        );
        assert_eq!(
            p.file(&t, "c5", &forever.id).await.expect("kept"),
            with(&forever, b"x")
        );
        // A swept file's row stays, without its bytes: its id is still known as expired.
        let bytes: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(LENGTH(data)), 0) FROM chat_files WHERE swept = 1",
        )
        .fetch_one(&p.pool)
        .await
        .expect("bytes");
        assert_eq!(bytes, 0);
        assert!(matches!(
            p.file(&t, "c2", &expired_id(&p, &t, "c2").await).await,
            Err(ProvisioningError::Expired(Object::File))
        ));
        // Forgotten once no transcript can name them: expired before the given time.
        assert_eq!(p.forget_swept_files(0, 10).await.expect("forget"), 0);
        assert_eq!(p.forget_swept_files(now, 3).await.expect("forget"), 3);
        assert_eq!(p.forget_swept_files(now, 3).await.expect("forget"), 1);
        assert_eq!(p.count_files(&t, "c1").await.expect("count"), 1);
        assert_eq!(
            p.file(&t, "c1", &kept.id).await.expect("kept"),
            with(&kept, b"new")
        );
    }

    /// The id of the conversation's one file.
    async fn expired_id(p: &Provisioning, tenant: &str, conversation: &str) -> String {
        sqlx::query_scalar(
            "SELECT id FROM chat_files WHERE tenant_id = $1 AND conversation_id = $2",
        )
        .bind(tenant.to_string())
        .bind(conversation.to_string())
        .fetch_one(&p.pool)
        .await
        .expect("id")
    }
}
