//! Bot endpoints of a tenant: URL and credential. The credential is encrypted at rest, bound to
//! its tenant and bot, never answered; only the worker that calls the bot decrypts it. Each bot
//! also has a bot API token (SHA-256 stored, shown once) with which it calls the bot API.

use sqlx::any::AnyRow;

use super::models::{self, BotEndpoint, BotPatch, BotToken, CreatedBot, NewBot, Page, PageRequest};
use super::secrets::{self, BOT_TOKEN_PREFIX};
use super::sql::{self, get, Keyed, Set};
use super::{AuthError, Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, tenant_id, name, url, created_at_ms FROM bots";

impl Keyed for BotEndpoint {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<BotEndpoint, ProvisioningError> {
    Ok(BotEndpoint {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        url: get(row, "url")?,
        // The column is NOT NULL: every bot has one.
        has_credential: true,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

/// Binds a ciphertext to its row, so a credential copied to another bot does not decrypt.
fn aad(tenant_id: &str, bot_id: &str) -> String {
    format!("nexus/bot/{tenant_id}/{bot_id}")
}

/// A name is quoted as errors quote values: at most 64 characters of it.
fn duplicate(name: &str) -> impl FnOnce() -> String + '_ {
    move || {
        format!(
            "a bot named `{}` already exists in this tenant",
            models::shown(name)
        )
    }
}

fn referenced() -> String {
    "the bot is used by routing rules; change or delete them first".to_string()
}

impl Provisioning {
    /// Creates a bot endpoint; the answer holds its bot API token, never available again.
    pub async fn create_bot(
        &self,
        tenant_id: &str,
        new: NewBot,
    ) -> Result<CreatedBot, ProvisioningError> {
        let bot = BotEndpoint {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            name: models::name("name", &new.name)?,
            url: models::url(&new.url)?,
            has_credential: true,
            created_at_ms: sql::now_ms(),
        };
        models::credential(&new.credential)?;
        let sealed = self
            .cipher
            .encrypt(&new.credential, &aad(&bot.tenant_id, &bot.id));
        let token = secrets::generate_token(BOT_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO bots (id, tenant_id, name, url, credential, token_hash, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(bot.id.clone())
        .bind(bot.tenant_id.clone())
        .bind(bot.name.clone())
        .bind(bot.url.clone())
        .bind(sealed)
        .bind(token.hash.clone())
        .bind(bot.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| sql::insert_error(e, duplicate(&bot.name)))?;
        Ok(CreatedBot {
            bot,
            token: token.raw,
        })
    }

    /// Replaces the bot's API token; the old one stops working at once.
    pub async fn rotate_bot_token(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<BotToken, ProvisioningError> {
        match sql::rotate_token(&self.pool, "bots", tenant_id, id, BOT_TOKEN_PREFIX).await? {
            Some(token) => Ok(BotToken {
                bot_id: id.to_string(),
                token,
            }),
            None => Err(self.missing(tenant_id, Object::Bot).await),
        }
    }

    /// The bot a raw bot API token belongs to; the token is never logged.
    pub async fn authenticate_bot(&self, raw_token: &str) -> Result<BotEndpoint, AuthError> {
        let row = sql::row_by_token(
            &self.pool,
            "SELECT id, tenant_id, name, url, created_at_ms, token_hash FROM bots WHERE token_hash = $1",
            raw_token,
            BOT_TOKEN_PREFIX,
        )
        .await?;
        from_row(&row).map_err(|e| AuthError::Unavailable(e.to_string()))
    }

    pub async fn bot(&self, tenant_id: &str, id: &str) -> Result<BotEndpoint, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::Bot, from_row).await
    }

    pub async fn list_bots(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<BotEndpoint>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(&self.pool, "bots", SELECT, Some(tenant_id), page, from_row).await
    }

    /// Changes name, URL or credential (a new credential replaces the old one).
    pub async fn update_bot(
        &self,
        tenant_id: &str,
        id: &str,
        patch: BotPatch,
    ) -> Result<BotEndpoint, ProvisioningError> {
        let bot = self.bot(tenant_id, id).await?;
        let mut sets = Vec::new();
        let mut name = bot.name;
        if let Some(new) = &patch.name {
            name = models::name("name", new)?;
            sets.push(("name", Set::Text(Some(name.clone()))));
        }
        if let Some(url) = &patch.url {
            sets.push(("url", Set::Text(Some(models::url(url)?))));
        }
        if let Some(credential) = &patch.credential {
            models::credential(credential)?;
            let sealed = self.cipher.encrypt(credential, &aad(tenant_id, id));
            sets.push(("credential", Set::Text(Some(sealed))));
        }
        sql::patch(&self.pool, "bots", tenant_id, id, sets, &[])
            .await
            .map_err(|e| sql::write_error(e, duplicate(&name), referenced))?;
        self.bot(tenant_id, id).await
    }

    /// Deletes the bot; refused (conflict) while a routing rule points at it.
    pub async fn delete_bot(&self, tenant_id: &str, id: &str) -> Result<(), ProvisioningError> {
        self.delete_one("bots", tenant_id, id, Object::Bot, |e| {
            sql::write_error(e, String::new, referenced)
        })
        .await
    }

    /// The bot endpoint and its decrypted credential, for the worker that calls the bot only.
    /// Never log or answer the credential.
    pub async fn bot_credential(
        &self,
        tenant_id: &str,
        bot_id: &str,
    ) -> Result<(BotEndpoint, String), ProvisioningError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, url, credential, created_at_ms FROM bots WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant_id.to_string())
        .bind(bot_id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        let Some(row) = row else {
            return Err(self.missing(tenant_id, Object::Bot).await);
        };
        let bot = from_row(&row)?;
        let sealed: String = get(&row, "credential")?;
        let credential = self
            .cipher
            .decrypt(&sealed, &aad(&bot.tenant_id, &bot.id))
            .map_err(|e| ProvisioningError::Unavailable(format!("bot {}: {e}", bot.id)))?;
        Ok((bot, credential))
    }
}
