//! SQL helpers shared by the object modules: ids, clocks, JSON columns, error mapping and the
//! keyset pagination every list uses.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::error::ErrorKind;
use sqlx::{AnyPool, Row};

use super::models::{scoped_cursor, Page, PageRequest};
use super::{secrets, AuthError, ProvisioningError};

/// A new time-ordered id, so keyset pages come out in creation order.
pub(super) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn unavailable(e: sqlx::Error) -> ProvisioningError {
    ProvisioningError::Unavailable(e.to_string())
}

/// A write's error: a unique violation is `Conflict(duplicate())`, a foreign-key violation is
/// `Conflict(referenced())`, anything else means the store is unavailable.
pub(super) fn write_error(
    e: sqlx::Error,
    duplicate: impl FnOnce() -> String,
    referenced: impl FnOnce() -> String,
) -> ProvisioningError {
    if let sqlx::Error::Database(db) = &e {
        match db.kind() {
            ErrorKind::UniqueViolation => return ProvisioningError::Conflict(duplicate()),
            ErrorKind::ForeignKeyViolation => return ProvisioningError::Conflict(referenced()),
            _ => {}
        }
    }
    unavailable(e)
}

/// [`write_error`] for an insert whose only foreign key is its tenant: a violation means the
/// tenant was deleted between its check and the insert (404, as if the check had seen it).
pub(super) fn insert_error(
    e: sqlx::Error,
    duplicate: impl FnOnce() -> String,
) -> ProvisioningError {
    if let sqlx::Error::Database(db) = &e {
        if db.kind() == ErrorKind::ForeignKeyViolation {
            return ProvisioningError::NotFound(super::Object::Tenant);
        }
    }
    write_error(e, duplicate, String::new)
}

pub(super) fn to_json<T: Serialize>(value: &T) -> String {
    // Maps of strings and lists of strings or enums always serialize.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_string())
}

pub(super) fn get<T>(row: &AnyRow, column: &str) -> Result<T, ProvisioningError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(column).map_err(unavailable)
}

pub(super) fn get_json<T: DeserializeOwned>(
    row: &AnyRow,
    column: &str,
) -> Result<T, ProvisioningError> {
    let text: String = get(row, column)?;
    serde_json::from_str(&text).map_err(|e| {
        ProvisioningError::Unavailable(format!("column `{column}` holds bad JSON: {e}"))
    })
}

pub(super) fn flag(value: bool) -> i64 {
    i64::from(value)
}

/// A new column value for [`patch`].
pub(super) enum Set {
    Text(Option<String>),
    Int(Option<i64>),
}

/// Writes only the given columns of one tenant's row (`fixed`: constant assignments such as
/// `"x = NULL"`, never input). Two patches of different fields that race both stay; writing
/// back a whole row read earlier would let the later one undo the other (re-enable a key
/// another admin just disabled). No columns: nothing is written.
pub(super) async fn patch(
    pool: &AnyPool,
    table: &str,
    tenant_id: &str,
    id: &str,
    sets: Vec<(&str, Set)>,
    fixed: &[&str],
) -> Result<(), sqlx::Error> {
    if sets.is_empty() && fixed.is_empty() {
        return Ok(());
    }
    let assignments: Vec<String> = sets
        .iter()
        .enumerate()
        .map(|(i, (column, _))| format!("{column} = ${}", i + 3))
        .chain(fixed.iter().map(|f| f.to_string()))
        .collect();
    let text = format!(
        "UPDATE {table} SET {} WHERE tenant_id = $1 AND id = $2",
        assignments.join(", ")
    );
    let mut query = sqlx::query(&text)
        .bind(tenant_id.to_string())
        .bind(id.to_string());
    for (_, value) in sets {
        query = match value {
            Set::Text(v) => query.bind(v),
            Set::Int(v) => query.bind(v),
        };
    }
    query.execute(pool).await.map(|_| ())
}

/// Something listed by id.
pub(super) trait Keyed {
    fn key(&self) -> &str;
}

/// One page of `select` (`SELECT ... FROM table`), by id after the cursor, within `tenant_id`
/// when given. `list` names the list (its table): with the tenant it scopes the cursors, so a
/// cursor of another list or tenant is refused instead of starting this page somewhere else.
pub(super) async fn page<T: Keyed>(
    pool: &AnyPool,
    list: &str,
    select: &str,
    tenant_id: Option<&str>,
    request: &PageRequest,
    map: impl Fn(&AnyRow) -> Result<T, ProvisioningError>,
) -> Result<Page<T>, ProvisioningError> {
    let scope = match tenant_id {
        Some(tenant) => format!("{list}/{tenant}"),
        None => list.to_string(),
    };
    let after = request.after_in(&scope)?.unwrap_or_default().to_string();
    // One more than asked tells whether a next page exists.
    let fetch = i64::from(request.limit) + 1;
    let rows = match tenant_id {
        Some(tenant) => {
            sqlx::query(&format!(
                "{select} WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
            ))
            .bind(tenant.to_string())
            .bind(after)
            .bind(fetch)
            .fetch_all(pool)
            .await
        }
        None => {
            sqlx::query(&format!("{select} WHERE id > $1 ORDER BY id LIMIT $2"))
                .bind(after)
                .bind(fetch)
                .fetch_all(pool)
                .await
        }
    }
    .map_err(unavailable)?;
    let mut items = rows.iter().map(map).collect::<Result<Vec<T>, _>>()?;
    let next = if items.len() > request.limit as usize {
        items.truncate(request.limit as usize);
        items.last().map(|last| scoped_cursor(&scope, last.key()))
    } else {
        None
    };
    Ok(Page { items, next })
}

/// Gives the object `id` of `table` a new bearer token (stored as its hash); the raw token, or
/// `None` when there is no such object in the tenant.
pub(super) async fn rotate_token(
    pool: &AnyPool,
    table: &'static str,
    tenant_id: &str,
    id: &str,
    prefix: &str,
) -> Result<Option<String>, ProvisioningError> {
    let token = secrets::generate_token(prefix);
    let done = sqlx::query(&format!(
        "UPDATE {table} SET token_hash = $3 WHERE tenant_id = $1 AND id = $2"
    ))
    .bind(tenant_id.to_string())
    .bind(id.to_string())
    .bind(token.hash)
    .execute(pool)
    .await
    .map_err(unavailable)?;
    Ok((done.rows_affected() > 0).then_some(token.raw))
}

/// The row `select` (which must name `token_hash`, filtered by `token_hash = $1`) finds for a
/// raw bearer token, compared in constant time; the token is never logged.
pub(super) async fn row_by_token(
    pool: &AnyPool,
    select: &str,
    raw: &str,
    prefix: &str,
) -> Result<AnyRow, AuthError> {
    if !raw.starts_with(prefix) {
        return Err(AuthError::Unknown);
    }
    let row = sqlx::query(select)
        .bind(secrets::hash_token(raw))
        .fetch_optional(pool)
        .await
        .map_err(|e| AuthError::Unavailable(e.to_string()))?
        .ok_or(AuthError::Unknown)?;
    let stored: String =
        get(&row, "token_hash").map_err(|e| AuthError::Unavailable(e.to_string()))?;
    // The lookup was by hash; the constant-time comparison keeps the check itself free of
    // timing differences whatever the database's index does.
    if !secrets::token_matches(raw, &stored) {
        return Err(AuthError::Unknown);
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stores::provisioning::{Object, Provisioning};

    /// A queue inserted for a tenant that is gone (deleted between the create's check and its
    /// insert) is a 404 for the tenant, not a conflict.
    #[tokio::test]
    async fn an_insert_for_a_tenant_gone_is_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Provisioning::temporary(dir.path()).await;
        let e = sqlx::query(
            "INSERT INTO queues (id, tenant_id, name, created_at_ms) VALUES ('q', 'gone', 'n', 0)",
        )
        .execute(p.pool())
        .await
        .expect_err("no such tenant");
        let mapped = insert_error(e, || "duplicate".into());
        assert!(
            matches!(mapped, ProvisioningError::NotFound(Object::Tenant)),
            "{mapped:?}"
        );
    }
}
