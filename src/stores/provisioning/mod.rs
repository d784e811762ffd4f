//! The provisioning store: tenants and, per tenant, API keys, queues, agents, routing rules,
//! bot endpoints, webhook subscriptions ([`webhooks`]) and the files customers upload into chats ([`files`]), in PostgreSQL
//! (production) or SQLite (`nexus dev`) through one SQL code path.
//!
//! Every object of a tenant is read and written by `(tenant_id, id)`, so one tenant's calls
//! never reach another's objects. Secrets are hashed or encrypted ([`secrets`]) and never
//! returned after creation. The rest of nexus calls [`Provisioning::authenticate_api_key`],
//! [`Provisioning::authenticate_agent`], [`Provisioning::routing_rules`],
//! [`Provisioning::bot_credential`], [`Provisioning::agent`] and [`Provisioning::queue`].

mod agents;
mod api_keys;
mod auth_cache;
mod bots;
pub mod files;
pub mod models;
mod queues;
mod routing;
pub mod secrets;
mod sql;
mod tenants;
pub mod webhooks;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use thiserror::Error;

use crate::config::StoresConfig;
pub use files::{ChatFile, NewChatFile};
pub use models::*;
use secrets::{Cipher, EncryptionKey};
pub use webhooks::{
    CreatedWebhook, NewWebhook, PendingDisable, SecretRotation, SigningSecrets, Webhook,
    WebhookEvent, WebhookFormat, WebhookMedia, WebhookPatch, WebhookSecret, WebhookTarget,
};

/// Connections per process: the admin API and the hot-path lookups are short queries.
const MAX_CONNECTIONS: u32 = 8;
/// How long a caller waits for a connection before the store counts as unavailable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// API-key lookups reused for this long unless `[stores] auth_cache_ttl_ms` says otherwise.
const AUTH_CACHE_TTL: Duration = Duration::from_secs(5);

/// The SQLite file under `stores.data_dir` when no PostgreSQL URL is configured.
pub const SQLITE_FILE: &str = "provisioning.db";
/// The generated encryption key file under `stores.data_dir` when no key is configured.
pub const KEY_FILE: &str = "provisioning.key";

/// The kinds of provisioned objects, for "not found" answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object {
    Tenant,
    ApiKey,
    Queue,
    Agent,
    RoutingRule,
    Bot,
    File,
    Webhook,
    WebhookMessage,
}

impl Object {
    /// The machine-readable code of "no such object" (`QUEUE_NOT_FOUND`, ...).
    pub fn not_found_code(self) -> &'static str {
        match self {
            Object::Tenant => "TENANT_NOT_FOUND",
            Object::ApiKey => "API_KEY_NOT_FOUND",
            Object::Queue => "QUEUE_NOT_FOUND",
            Object::Agent => "AGENT_NOT_FOUND",
            Object::RoutingRule => "ROUTING_RULE_NOT_FOUND",
            Object::Bot => "BOT_NOT_FOUND",
            Object::File => "FILE_NOT_FOUND",
            Object::Webhook => "WEBHOOK_NOT_FOUND",
            Object::WebhookMessage => "WEBHOOK_MESSAGE_NOT_FOUND",
        }
    }

    /// The machine-readable code of "this object expired" (only files expire).
    pub fn expired_code(self) -> &'static str {
        match self {
            Object::File => "FILE_EXPIRED",
            _ => "EXPIRED",
        }
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Object::Tenant => "tenant",
            Object::ApiKey => "API key",
            Object::Queue => "queue",
            Object::Agent => "agent",
            Object::RoutingRule => "routing rule",
            Object::Bot => "bot endpoint",
            Object::File => "file",
            Object::Webhook => "webhook",
            Object::WebhookMessage => "webhook message",
        })
    }
}

#[derive(Debug, Error)]
pub enum ProvisioningError {
    #[error("no such {0}")]
    NotFound(Object),
    /// The object exists but is past its expiry (a chat file past `chat.file_retention_s`).
    #[error("the {0} has expired")]
    Expired(Object),
    /// A duplicate name, or an object still referenced.
    #[error("{0}")]
    Conflict(String),
    #[error("`{field}` {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("provisioning store unavailable: {0}")]
    Unavailable(String),
}

/// Why a presented API key or agent token is refused.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("unknown credential")]
    Unknown,
    #[error("the API key is disabled")]
    Disabled,
    #[error("the API key has expired")]
    Expired,
    #[error("provisioning store unavailable: {0}")]
    Unavailable(String),
}

/// The provisioning store; cheap to share behind an `Arc`.
pub struct Provisioning {
    pool: AnyPool,
    cipher: Cipher,
    kind: &'static str,
    auth_cache: auth_cache::AuthCache,
    /// See [`Provisioning::unknown_migrations`].
    unknown_migrations: Vec<AppliedMigration>,
}

/// A migration recorded in the database's `_sqlx_migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: i64,
    pub description: String,
}

/// Applies this binary's pending migrations and answers those the database applied that it
/// does not know. A binary rolled back after a newer one migrated the database starts on that
/// schema (which is why every migration must stay readable by the release before it: add
/// tables and columns with defaults, never drop, rename or retype what that release uses),
/// with a warning naming what it does not know. A known migration whose file changed since it
/// was applied is still refused.
async fn migrate(pool: &AnyPool, kind: &str) -> Result<Vec<AppliedMigration>, ProvisioningError> {
    let failed =
        |e: &dyn fmt::Display| ProvisioningError::Unavailable(format!("migrations ({kind}): {e}"));
    let mut migrator = sqlx::migrate!("src/stores/provisioning/migrations");
    migrator.set_ignore_missing(true);
    migrator.run(pool).await.map_err(|e| failed(&e))?;
    let rows = sqlx::query("SELECT version, description FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .map_err(|e| failed(&e))?;
    let mut unknown = Vec::new();
    for row in rows {
        use sqlx::Row as _;
        let version: i64 = row.try_get("version").map_err(|e| failed(&e))?;
        if !migrator.version_exists(version) {
            unknown.push(AppliedMigration {
                version,
                description: row.try_get("description").map_err(|e| failed(&e))?,
            });
        }
    }
    if !unknown.is_empty() {
        let names: Vec<String> = unknown
            .iter()
            .map(|m| format!("{} {}", m.version, m.description))
            .collect();
        tracing::warn!(
            unknown = %names.join(", "),
            "the provisioning database applied migrations this binary does not know (a newer release ran on it); starting on its schema"
        );
    }
    Ok(unknown)
}

impl fmt::Debug for Provisioning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioning")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The `sqlite:` URL of the file at `path`, created if missing. The path is made absolute and
/// percent-encoded: written bare, a relative path's first component is read as a host (a space
/// is "an invalid domain character") and a `?` or `#` ends the path (`--data-dir "my data"`).
fn sqlite_url(path: &Path) -> Result<String, ProvisioningError> {
    use std::fmt::Write as _;
    let path = std::path::absolute(path)
        .map_err(|e| ProvisioningError::Unavailable(format!("{}: {e}", path.display())))?;
    let mut url = String::from("sqlite://");
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            url.push(char::from(b));
        } else {
            let _ = write!(url, "%{b:02X}");
        }
    }
    url.push_str("?mode=rwc");
    Ok(url)
}

impl Provisioning {
    /// A SQLite store in `dir` with a fresh key, migrated (unit tests).
    #[cfg(test)]
    pub(crate) async fn temporary(dir: &std::path::Path) -> Self {
        let key = EncryptionKey::generate();
        Self::connect(&dir.join("p.db").display().to_string(), &key)
            .await
            .expect("a temporary provisioning store")
    }

    /// Connects to `target` (a `postgres://` URL, a `sqlite:` URL or a SQLite file path, created
    /// if missing) and applies the migrations. `key` encrypts bot credentials.
    pub async fn connect(target: &str, key: &EncryptionKey) -> Result<Self, ProvisioningError> {
        sqlx::any::install_default_drivers();
        let (url, kind) =
            if target.starts_with("postgres://") || target.starts_with("postgresql://") {
                (target.to_string(), "postgres")
            } else if target.starts_with("sqlite:") {
                (target.to_string(), "sqlite")
            } else {
                if let Some(dir) = Path::new(target).parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        ProvisioningError::Unavailable(format!("{}: {e}", dir.display()))
                    })?;
                }
                (sqlite_url(Path::new(target))?, "sqlite")
            };
        let pool = AnyPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(&url)
            .await
            .map_err(|e| ProvisioningError::Unavailable(format!("connect ({kind}): {e}")))?;
        let unknown_migrations = migrate(&pool, kind).await?;
        Ok(Self {
            pool,
            cipher: Cipher::new(key),
            kind,
            auth_cache: auth_cache::AuthCache::new(AUTH_CACHE_TTL),
            unknown_migrations,
        })
    }

    /// Migrations the database applied that this binary does not know (a newer release ran
    /// on it); empty unless the schema is ahead. Logged at start.
    pub fn unknown_migrations(&self) -> &[AppliedMigration] {
        &self.unknown_migrations
    }

    /// How long an API-key lookup is reused (zero: every request asks the database).
    pub fn with_auth_cache_ttl(mut self, ttl: Duration) -> Self {
        self.auth_cache = auth_cache::AuthCache::new(ttl);
        self
    }

    /// From `[stores]`: `postgres_url`, or SQLite under `data_dir`; `provisioning_key`, or a
    /// key file generated once under `data_dir`.
    pub async fn from_config(stores: &StoresConfig) -> Result<Self, ProvisioningError> {
        let data_dir = Path::new(&stores.data_dir);
        let key = if stores.provisioning_key.is_empty() {
            EncryptionKey::load_or_create(&data_dir.join(KEY_FILE)).map_err(|e| {
                ProvisioningError::Unavailable(format!("provisioning key file: {e}"))
            })?
        } else {
            EncryptionKey::parse(&stores.provisioning_key).map_err(|e| {
                ProvisioningError::Invalid {
                    field: "stores.provisioning_key",
                    message: e,
                }
            })?
        };
        let target = if stores.postgres_url.is_empty() {
            data_dir.join(SQLITE_FILE).display().to_string()
        } else {
            stores.postgres_url.clone()
        };
        Ok(Self::connect(&target, &key)
            .await?
            .with_auth_cache_ttl(Duration::from_millis(stores.auth_cache_ttl_ms)))
    }

    /// The connection pool, for workers that keep their effect state in this database (history,
    /// gws); they use the same SQL on PostgreSQL and SQLite.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// `postgres` or `sqlite`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn health(&self) -> Result<(), ProvisioningError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(sql::unavailable)
    }

    /// Closes the connections (tests drop their database afterwards).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The tenant's object `id`, read by `select` (`SELECT ... FROM table`) and `map`.
    async fn one<T>(
        &self,
        select: &str,
        tenant_id: &str,
        id: &str,
        object: Object,
        map: impl Fn(&sqlx::any::AnyRow) -> Result<T, ProvisioningError>,
    ) -> Result<T, ProvisioningError> {
        let row = sqlx::query(&format!("{select} WHERE tenant_id = $1 AND id = $2"))
            .bind(tenant_id.to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql::unavailable)?;
        match row {
            Some(row) => map(&row),
            None => Err(self.missing(tenant_id, object).await),
        }
    }

    /// Deletes the tenant's object `id` from `table`; `failed` maps a refused delete (e.g. a
    /// conflict with a row pointing at it).
    async fn delete_one(
        &self,
        table: &str,
        tenant_id: &str,
        id: &str,
        object: Object,
        failed: impl FnOnce(sqlx::Error) -> ProvisioningError,
    ) -> Result<(), ProvisioningError> {
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant_id.to_string())
        .bind(id.to_string())
        .execute(&self.pool)
        .await
        .map_err(failed)?;
        if done.rows_affected() == 0 {
            return Err(self.missing(tenant_id, object).await);
        }
        Ok(())
    }

    /// `NotFound(object)`, or `NotFound(Tenant)` when the tenant itself is missing, so callers
    /// learn which part of the path is wrong.
    async fn missing(&self, tenant_id: &str, object: Object) -> ProvisioningError {
        match self.tenant(tenant_id).await {
            Ok(_) => ProvisioningError::NotFound(object),
            Err(e) => e,
        }
    }
}

#[cfg(test)]
mod migration_lock {
    use sha2::{Digest, Sha256};

    /// Every migration file matches its line in `migrations.lock`, and every line its file: a
    /// database that applied a migration refuses to start once the file changes (sqlx checks
    /// it), so a released one is never edited; a new one gets a line.
    #[test]
    fn released_migrations_are_never_edited() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/stores/provisioning");
        let lock = std::fs::read_to_string(root.join("migrations.lock")).expect("lock");
        let mut locked: Vec<(String, String)> = lock
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| l.split_once(' '))
            .map(|(f, h)| (f.to_string(), h.trim().to_string()))
            .collect();
        locked.sort();
        let mut found: Vec<(String, String)> = std::fs::read_dir(root.join("migrations"))
            .expect("migrations")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .map(|p| {
                let digest = Sha256::digest(std::fs::read(&p).expect("read"));
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, hex)
            })
            .collect();
        found.sort();
        assert_eq!(
            found, locked,
            "a migration changed, vanished or is new: add a new migration instead of editing one; \
             a new file gets its line in migrations.lock (`sha256sum`, first 16 hex digits)"
        );
    }
}

#[cfg(test)]
mod sqlite_paths {
    use super::*;

    /// `nexus dev --data-dir "my data"` (relative, with a space) and paths holding URL
    /// characters open the file named, not another or none.
    #[tokio::test]
    async fn a_sqlite_path_with_url_characters_opens_that_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a b?c#d%20e").join("p.db");
        let relative = format!("target/provisioning test {}/p.db", uuid::Uuid::new_v4());
        for path in [odd.display().to_string(), relative.clone()] {
            let key = EncryptionKey::generate();
            let store = Provisioning::connect(&path, &key)
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            drop(store);
            assert!(Path::new(&path).is_file(), "{path} was not created");
        }
        if let Some(parent) = Path::new(&relative).parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}
