//! Queues of a tenant: where routing rules send conversations.

use sqlx::any::AnyRow;

use super::models::{self, NewQueue, Page, PageRequest, Queue, QueuePatch};
use super::sql::{self, get, Keyed};
use super::{Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, tenant_id, name, created_at_ms FROM queues";

impl Keyed for Queue {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<Queue, ProvisioningError> {
    Ok(Queue {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

/// A name is quoted as errors quote values: at most 64 characters of it.
fn duplicate(name: &str) -> impl FnOnce() -> String + '_ {
    move || {
        format!(
            "a queue named `{}` already exists in this tenant",
            models::shown(name)
        )
    }
}

fn referenced() -> String {
    "the queue is used by routing rules; change or delete them first".to_string()
}

impl Provisioning {
    pub async fn create_queue(
        &self,
        tenant_id: &str,
        new: NewQueue,
    ) -> Result<Queue, ProvisioningError> {
        let queue = Queue {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            name: models::name("name", &new.name)?,
            created_at_ms: sql::now_ms(),
        };
        sqlx::query(
            "INSERT INTO queues (id, tenant_id, name, created_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(queue.id.clone())
        .bind(queue.tenant_id.clone())
        .bind(queue.name.clone())
        .bind(queue.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| sql::insert_error(e, duplicate(&queue.name)))?;
        Ok(queue)
    }

    /// The tenant's queue `id`.
    pub async fn queue(&self, tenant_id: &str, id: &str) -> Result<Queue, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::Queue, from_row)
            .await
    }

    pub async fn list_queues(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<Queue>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(
            &self.pool,
            "queues",
            SELECT,
            Some(tenant_id),
            page,
            from_row,
        )
        .await
    }

    pub async fn update_queue(
        &self,
        tenant_id: &str,
        id: &str,
        patch: QueuePatch,
    ) -> Result<Queue, ProvisioningError> {
        let mut queue = self.queue(tenant_id, id).await?;
        // Only a name to change is written: writing back the one read would undo a rename
        // made since by another request.
        let Some(name) = &patch.name else {
            return Ok(queue);
        };
        queue.name = models::name("name", name)?;
        let done = sqlx::query("UPDATE queues SET name = $3 WHERE tenant_id = $1 AND id = $2")
            .bind(queue.tenant_id.clone())
            .bind(queue.id.clone())
            .bind(queue.name.clone())
            .execute(&self.pool)
            .await
            .map_err(|e| sql::write_error(e, duplicate(&queue.name), referenced))?;
        // Deleted since it was read: gone, not renamed.
        if done.rows_affected() == 0 {
            return Err(self.missing(tenant_id, Object::Queue).await);
        }
        Ok(queue)
    }

    /// Deletes the queue; refused (conflict) while a routing rule points at it.
    pub async fn delete_queue(&self, tenant_id: &str, id: &str) -> Result<(), ProvisioningError> {
        self.delete_one("queues", tenant_id, id, Object::Queue, |e| {
            sql::write_error(e, String::new, referenced)
        })
        .await
    }
}
