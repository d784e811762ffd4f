//! API keys of a tenant (permission, enabled flag, expiry) and their authentication. A key is
//! stored as its SHA-256 only; the raw key is answered once, at creation.

use std::time::Duration;

use sqlx::any::AnyRow;

use super::auth_cache::CachedKey;
use super::models::{
    self, ApiKey, ApiKeyGrant, ApiKeyPatch, CreatedApiKey, NewApiKey, Page, PageRequest,
};
use super::secrets::{self, API_KEY_PREFIX};
use super::sql::{self, get, get_json, Keyed, Set};
use super::{AuthError, Object, Provisioning, ProvisioningError};

const SELECT: &str =
    "SELECT id, tenant_id, name, permissions, enabled, expires_at_ms, created_at_ms FROM api_keys";

impl Keyed for ApiKey {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<ApiKey, ProvisioningError> {
    Ok(ApiKey {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        permissions: get_json(row, "permissions")?,
        enabled: get::<i64>(row, "enabled")? != 0,
        expires_at_ms: get(row, "expires_at_ms")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

fn never_conflicts() -> String {
    "the API key conflicts with another".to_string()
}

impl Provisioning {
    /// Creates a key; the answer holds the raw key, which is never available again.
    pub async fn create_api_key(
        &self,
        tenant_id: &str,
        new: NewApiKey,
    ) -> Result<CreatedApiKey, ProvisioningError> {
        let api_key = ApiKey {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            name: models::name("name", &new.name)?,
            permissions: models::permissions(&new.permissions)?,
            enabled: new.enabled,
            expires_at_ms: models::expiry(new.expires_at_ms)?,
            created_at_ms: sql::now_ms(),
        };
        let token = secrets::generate_token(API_KEY_PREFIX);
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, permissions, enabled, expires_at_ms, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(api_key.id.clone())
        .bind(api_key.tenant_id.clone())
        .bind(api_key.name.clone())
        .bind(token.hash.clone())
        .bind(sql::to_json(&api_key.permissions))
        .bind(sql::flag(api_key.enabled))
        .bind(api_key.expires_at_ms)
        .bind(api_key.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| sql::insert_error(e, never_conflicts))?;
        Ok(CreatedApiKey {
            api_key,
            key: token.raw,
        })
    }

    pub async fn api_key(&self, tenant_id: &str, id: &str) -> Result<ApiKey, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::ApiKey, from_row)
            .await
    }

    pub async fn list_api_keys(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<ApiKey>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(
            &self.pool,
            "api_keys",
            SELECT,
            Some(tenant_id),
            page,
            from_row,
        )
        .await
    }

    pub async fn update_api_key(
        &self,
        tenant_id: &str,
        id: &str,
        patch: ApiKeyPatch,
    ) -> Result<ApiKey, ProvisioningError> {
        self.api_key(tenant_id, id).await?;
        let mut sets = Vec::new();
        if let Some(name) = &patch.name {
            sets.push(("name", Set::Text(Some(models::name("name", name)?))));
        }
        if let Some(permissions) = &patch.permissions {
            let permissions = models::permissions(permissions)?;
            sets.push(("permissions", Set::Text(Some(sql::to_json(&permissions)))));
        }
        if let Some(enabled) = patch.enabled {
            sets.push(("enabled", Set::Int(Some(sql::flag(enabled)))));
        }
        if let Some(expires) = patch.expires_at_ms {
            sets.push(("expires_at_ms", Set::Int(models::expiry(expires)?)));
        }
        sql::patch(&self.pool, "api_keys", tenant_id, id, sets, &[])
            .await
            .map_err(sql::unavailable)?;
        // After the write; a lookup that read the old row before it caches nothing (its
        // ticket predates this clear).
        self.auth_cache.clear();
        self.api_key(tenant_id, id).await
    }

    pub async fn delete_api_key(&self, tenant_id: &str, id: &str) -> Result<(), ProvisioningError> {
        let done = self
            .delete_one("api_keys", tenant_id, id, Object::ApiKey, sql::unavailable)
            .await;
        self.auth_cache.clear();
        done
    }

    /// The grant of a raw API key (`x-api-key`): `Unknown`, `Disabled` or `Expired` otherwise,
    /// so the caller can answer 401 or 403 with a code. The key is never logged.
    pub async fn authenticate_api_key(&self, raw: &str) -> Result<ApiKeyGrant, AuthError> {
        self.authenticate_api_key_within(raw, Duration::MAX).await
    }

    /// [`Self::authenticate_api_key`] taking this process's cached lookup of the key only if it
    /// is younger than `max_age` (zero: the database is asked). For a check repeated every
    /// `period` (an open stream's): with `max_age` the TTL less the period, a key changed on
    /// another pod fails the check within the TTL, as it fails requests; a lookup up to a TTL
    /// old, checked a period apart, let it pass for up to a TTL plus the period.
    pub async fn authenticate_api_key_within(
        &self,
        raw: &str,
        max_age: Duration,
    ) -> Result<ApiKeyGrant, AuthError> {
        if !raw.starts_with(API_KEY_PREFIX) {
            return Err(AuthError::Unknown);
        }
        let hash = secrets::hash_token(raw);
        let key = match self.auth_cache.get(&hash, max_age) {
            Some(key) => key,
            None => {
                let ticket = self.auth_cache.ticket();
                let key = self.lookup_api_key(raw, &hash).await?;
                self.auth_cache.put(hash, key.clone(), ticket);
                key
            }
        };
        if !key.enabled {
            return Err(AuthError::Disabled);
        }
        if key.expires_at_ms.is_some_and(|at| at <= sql::now_ms()) {
            return Err(AuthError::Expired);
        }
        Ok(key.grant)
    }

    async fn lookup_api_key(&self, raw: &str, hash: &str) -> Result<CachedKey, AuthError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, key_hash, permissions, enabled, expires_at_ms FROM api_keys WHERE key_hash = $1",
        )
        .bind(hash.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let Some(row) = row else {
            return Err(AuthError::Unknown);
        };
        let unavailable = |e: ProvisioningError| AuthError::Unavailable(e.to_string());
        let stored: String = get(&row, "key_hash").map_err(unavailable)?;
        // The lookup was by hash; the constant-time comparison keeps the check itself free of
        // timing differences whatever the database's index does.
        if !secrets::token_matches(raw, &stored) {
            return Err(AuthError::Unknown);
        }
        Ok(CachedKey {
            grant: ApiKeyGrant {
                tenant_id: get(&row, "tenant_id").map_err(unavailable)?,
                key_id: get(&row, "id").map_err(unavailable)?,
                permissions: get_json(&row, "permissions").map_err(unavailable)?,
            },
            enabled: get::<i64>(&row, "enabled").map_err(unavailable)? != 0,
            expires_at_ms: get(&row, "expires_at_ms").map_err(unavailable)?,
        })
    }
}
