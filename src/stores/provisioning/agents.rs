//! Agents of a tenant (skills, capacity per media type) and their tokens: stored as SHA-256,
//! shown once at creation or rotation.

use sqlx::any::AnyRow;

use super::models::{
    self, Agent, AgentPatch, AgentToken, CreatedAgent, NewAgent, Page, PageRequest,
};
use super::secrets::{self, AGENT_TOKEN_PREFIX};
use super::sql::{self, get, get_json, Keyed, Set};
use super::{AuthError, Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, tenant_id, name, skills, capacity, created_at_ms FROM agents";

impl Keyed for Agent {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<Agent, ProvisioningError> {
    Ok(Agent {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        name: get(row, "name")?,
        skills: get_json(row, "skills")?,
        capacity: get_json(row, "capacity")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

/// A name is quoted as errors quote values: at most 64 characters of it.
fn duplicate(name: &str) -> impl FnOnce() -> String + '_ {
    move || {
        format!(
            "an agent named `{}` already exists in this tenant",
            models::shown(name)
        )
    }
}

impl Provisioning {
    /// Creates an agent; the answer holds its token, which is never available again.
    pub async fn create_agent(
        &self,
        tenant_id: &str,
        new: NewAgent,
    ) -> Result<CreatedAgent, ProvisioningError> {
        let agent = Agent {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            name: models::name("name", &new.name)?,
            skills: models::skills("skills", &new.skills)?,
            capacity: models::capacity(&new.capacity)?,
            created_at_ms: sql::now_ms(),
        };
        let token = secrets::generate_token(AGENT_TOKEN_PREFIX);
        sqlx::query(
            "INSERT INTO agents (id, tenant_id, name, skills, capacity, token_hash, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(agent.id.clone())
        .bind(agent.tenant_id.clone())
        .bind(agent.name.clone())
        .bind(sql::to_json(&agent.skills))
        .bind(sql::to_json(&agent.capacity))
        .bind(token.hash.clone())
        .bind(agent.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(|e| sql::insert_error(e, duplicate(&agent.name)))?;
        Ok(CreatedAgent {
            agent,
            token: token.raw,
        })
    }

    /// The tenant's agent `id`.
    pub async fn agent(&self, tenant_id: &str, id: &str) -> Result<Agent, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::Agent, from_row)
            .await
    }

    pub async fn list_agents(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<Agent>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(
            &self.pool,
            "agents",
            SELECT,
            Some(tenant_id),
            page,
            from_row,
        )
        .await
    }

    pub async fn update_agent(
        &self,
        tenant_id: &str,
        id: &str,
        patch: AgentPatch,
    ) -> Result<Agent, ProvisioningError> {
        let agent = self.agent(tenant_id, id).await?;
        let mut sets = Vec::new();
        let mut name = agent.name;
        if let Some(new) = &patch.name {
            name = models::name("name", new)?;
            sets.push(("name", Set::Text(Some(name.clone()))));
        }
        if let Some(skills) = &patch.skills {
            let skills = models::skills("skills", skills)?;
            sets.push(("skills", Set::Text(Some(sql::to_json(&skills)))));
        }
        if let Some(capacity) = &patch.capacity {
            let capacity = models::capacity(capacity)?;
            sets.push(("capacity", Set::Text(Some(sql::to_json(&capacity)))));
        }
        sql::patch(&self.pool, "agents", tenant_id, id, sets, &[])
            .await
            .map_err(|e| sql::write_error(e, duplicate(&name), String::new))?;
        self.agent(tenant_id, id).await
    }

    pub async fn delete_agent(&self, tenant_id: &str, id: &str) -> Result<(), ProvisioningError> {
        self.delete_one("agents", tenant_id, id, Object::Agent, sql::unavailable)
            .await
    }

    /// Replaces the agent's token; the old one stops working at once.
    pub async fn rotate_agent_token(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<AgentToken, ProvisioningError> {
        match sql::rotate_token(&self.pool, "agents", tenant_id, id, AGENT_TOKEN_PREFIX).await? {
            Some(token) => Ok(AgentToken {
                agent_id: id.to_string(),
                token,
            }),
            None => Err(self.missing(tenant_id, Object::Agent).await),
        }
    }

    /// The agent a raw agent token belongs to; the token is never logged.
    pub async fn authenticate_agent(&self, raw_token: &str) -> Result<Agent, AuthError> {
        let row = sql::row_by_token(
            &self.pool,
            "SELECT id, tenant_id, name, skills, capacity, created_at_ms, token_hash FROM agents WHERE token_hash = $1",
            raw_token,
            AGENT_TOKEN_PREFIX,
        )
        .await?;
        from_row(&row).map_err(|e| AuthError::Unavailable(e.to_string()))
    }
}
