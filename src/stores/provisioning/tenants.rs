//! Tenants: the root of every other object; deleting one deletes everything it owns.

use sqlx::any::AnyRow;

use super::models::{self, NewTenant, Page, PageRequest, Tenant, TenantPatch};
use super::sql::{self, get, Keyed};
use super::webhooks::{delete_log, LogOf};
use super::{Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, name, created_at_ms FROM tenants";

impl Keyed for Tenant {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<Tenant, ProvisioningError> {
    Ok(Tenant {
        id: get(row, "id")?,
        name: get(row, "name")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

/// A name is quoted as errors quote values: at most 64 characters of it.
fn duplicate(name: &str) -> impl FnOnce() -> String + '_ {
    move || format!("a tenant named `{}` already exists", models::shown(name))
}

impl Provisioning {
    pub async fn create_tenant(&self, new: NewTenant) -> Result<Tenant, ProvisioningError> {
        let tenant = Tenant {
            id: sql::new_id(),
            name: models::name("name", &new.name)?,
            created_at_ms: sql::now_ms(),
        };
        sqlx::query("INSERT INTO tenants (id, name, created_at_ms) VALUES ($1, $2, $3)")
            .bind(tenant.id.clone())
            .bind(tenant.name.clone())
            .bind(tenant.created_at_ms)
            .execute(&self.pool)
            .await
            .map_err(|e| sql::write_error(e, duplicate(&tenant.name), String::new))?;
        Ok(tenant)
    }

    pub async fn tenant(&self, id: &str) -> Result<Tenant, ProvisioningError> {
        let row = sqlx::query(&format!("{SELECT} WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql::unavailable)?;
        match row {
            Some(row) => from_row(&row),
            None => Err(ProvisioningError::NotFound(Object::Tenant)),
        }
    }

    pub async fn list_tenants(
        &self,
        page: &PageRequest,
    ) -> Result<Page<Tenant>, ProvisioningError> {
        sql::page(&self.pool, "tenants", SELECT, None, page, from_row).await
    }

    pub async fn update_tenant(
        &self,
        id: &str,
        patch: TenantPatch,
    ) -> Result<Tenant, ProvisioningError> {
        let mut tenant = self.tenant(id).await?;
        // Only a name to change is written: writing back the one read would undo a rename
        // made since by another request.
        let Some(name) = &patch.name else {
            return Ok(tenant);
        };
        tenant.name = models::name("name", name)?;
        let done = sqlx::query("UPDATE tenants SET name = $2 WHERE id = $1")
            .bind(tenant.id.clone())
            .bind(tenant.name.clone())
            .execute(&self.pool)
            .await
            .map_err(|e| sql::write_error(e, duplicate(&tenant.name), String::new))?;
        // Deleted since it was read: gone, not renamed.
        if done.rows_affected() == 0 {
            return Err(ProvisioningError::NotFound(Object::Tenant));
        }
        Ok(tenant)
    }

    /// Deletes the tenant with all its keys, queues, agents, rules, bots, files, webhook
    /// subscriptions and their delivery log, and the integration workers' state of its
    /// conversations (history transcripts, GWS effects, backlogs), in one transaction, which
    /// also records the tenant's live session data as owed a purge
    /// ([`Self::tenant_purge_pending`]) until [`Self::tenant_purged`].
    pub async fn delete_tenant(&self, id: &str) -> Result<(), ProvisioningError> {
        let mut tx = self.pool.begin().await.map_err(sql::unavailable)?;
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql::unavailable)?;
        if done.rows_affected() == 0 {
            return Err(ProvisioningError::NotFound(Object::Tenant));
        }
        delete_log(&mut tx, LogOf::Tenant, id).await?;
        // No foreign key to tenants (a late event of a deleted tenant must still be acked), so
        // they go here; such an event may write a little again, which their prune removes.
        for table in [
            "history_entries",
            "history_conversations",
            "gws_effects",
            "effect_backlog",
        ] {
            sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = $1"))
                .bind(id.to_string())
                .execute(&mut *tx)
                .await
                .map_err(sql::unavailable)?;
        }
        // A tenant deleted before (and created again with the same id, which only a restore
        // does) keeps one row.
        sqlx::query("DELETE FROM tenant_purges WHERE tenant_id = $1")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(sql::unavailable)?;
        sqlx::query("INSERT INTO tenant_purges (tenant_id, deleted_at_ms) VALUES ($1, $2)")
            .bind(id.to_string())
            .bind(sql::now_ms())
            .execute(&mut *tx)
            .await
            .map_err(sql::unavailable)?;
        tx.commit().await.map_err(sql::unavailable)?;
        self.auth_cache.clear();
        Ok(())
    }

    /// Whether the tenant was deleted and its live session data not purged since: a DELETE
    /// of it then purges again rather than answering 404.
    pub async fn tenant_purge_pending(&self, id: &str) -> Result<bool, ProvisioningError> {
        let row = sqlx::query("SELECT tenant_id FROM tenant_purges WHERE tenant_id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql::unavailable)?;
        Ok(row.is_some())
    }

    /// The deleted tenant's live session data is purged: nothing is owed any more.
    pub async fn tenant_purged(&self, id: &str) -> Result<(), ProvisioningError> {
        sqlx::query("DELETE FROM tenant_purges WHERE tenant_id = $1")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(sql::unavailable)?;
        Ok(())
    }
}
