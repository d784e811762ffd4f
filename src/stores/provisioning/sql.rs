//! SQL helpers shared by the object modules: ids, clocks, JSON columns, error mapping and the
//! keyset pagination every list uses.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::error::ErrorKind;
use sqlx::{AnyPool, Row};

use super::models::{encode_cursor, Page, PageRequest};
use super::ProvisioningError;

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

/// Something listed by id.
pub(super) trait Keyed {
    fn key(&self) -> &str;
}

/// One page of `select` (`SELECT ... FROM table`), by id after the cursor, within `tenant_id`
/// when given.
pub(super) async fn page<T: Keyed>(
    pool: &AnyPool,
    select: &str,
    tenant_id: Option<&str>,
    request: &PageRequest,
    map: impl Fn(&AnyRow) -> Result<T, ProvisioningError>,
) -> Result<Page<T>, ProvisioningError> {
    let after = request.after.clone().unwrap_or_default();
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
        items.last().map(|last| encode_cursor(last.key()))
    } else {
        None
    };
    Ok(Page { items, next })
}
