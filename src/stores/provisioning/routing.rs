//! Routing rules of a tenant: channel and attributes → queue, required skills, priority and an
//! optional bot first. A rule only ever points at a queue and bot of its own tenant.

use sqlx::any::AnyRow;

use super::models::{self, NewRoutingRule, Page, PageRequest, RoutingRule, RoutingRulePatch};
use super::sql::{self, get, get_json, Keyed, Set};
use super::{Object, Provisioning, ProvisioningError};

const SELECT: &str = "SELECT id, tenant_id, channel, attributes, queue_id, required_skills, priority, bot_id, created_at_ms FROM routing_rules";

impl Keyed for RoutingRule {
    fn key(&self) -> &str {
        &self.id
    }
}

fn from_row(row: &AnyRow) -> Result<RoutingRule, ProvisioningError> {
    let priority: i64 = get(row, "priority")?;
    Ok(RoutingRule {
        id: get(row, "id")?,
        tenant_id: get(row, "tenant_id")?,
        channel: get(row, "channel")?,
        attributes: get_json(row, "attributes")?,
        queue_id: get(row, "queue_id")?,
        required_skills: get_json(row, "required_skills")?,
        priority: i32::try_from(priority).map_err(|_| {
            ProvisioningError::Unavailable(format!("rule priority {priority} out of range"))
        })?,
        bot_id: get(row, "bot_id")?,
        created_at_ms: get(row, "created_at_ms")?,
    })
}

fn referenced() -> String {
    "the rule's queue or bot was deleted meanwhile".to_string()
}

impl Provisioning {
    pub async fn create_routing_rule(
        &self,
        tenant_id: &str,
        new: NewRoutingRule,
    ) -> Result<RoutingRule, ProvisioningError> {
        let rule = RoutingRule {
            id: sql::new_id(),
            tenant_id: self.tenant(tenant_id).await?.id,
            channel: models::ident("channel", &new.channel)?,
            attributes: models::attributes(&new.attributes)?,
            queue_id: new.queue_id,
            required_skills: models::skills("required_skills", &new.required_skills)?,
            priority: new.priority,
            bot_id: new.bot_id,
            created_at_ms: sql::now_ms(),
        };
        self.check_links(&rule).await?;
        let done = sqlx::query(
            "INSERT INTO routing_rules (id, tenant_id, channel, attributes, queue_id, required_skills, priority, bot_id, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(rule.id.clone())
        .bind(rule.tenant_id.clone())
        .bind(rule.channel.clone())
        .bind(sql::to_json(&rule.attributes))
        .bind(rule.queue_id.clone())
        .bind(sql::to_json(&rule.required_skills))
        .bind(i64::from(rule.priority))
        .bind(rule.bot_id.clone())
        .bind(rule.created_at_ms)
        .execute(&self.pool)
        .await;
        if let Err(e) = done {
            let e = sql::write_error(e, referenced, referenced);
            // The tenant itself deleted meanwhile is a 404, as for every other create.
            if matches!(e, ProvisioningError::Conflict(_)) {
                self.tenant(tenant_id).await?;
            }
            return Err(e);
        }
        Ok(rule)
    }

    /// The queue and bot must exist in the rule's own tenant: another tenant's id is as
    /// unknown as a missing one.
    async fn check_links(&self, rule: &RoutingRule) -> Result<(), ProvisioningError> {
        // No id holds a control character; PostgreSQL would refuse a NUL rather than find
        // nothing, as SQLite does.
        let unnamable = |id: &str| id.chars().any(char::is_control);
        if unnamable(&rule.queue_id) {
            return Err(ProvisioningError::NotFound(Object::Queue));
        }
        self.queue(&rule.tenant_id, &rule.queue_id).await?;
        if let Some(bot_id) = &rule.bot_id {
            if unnamable(bot_id) {
                return Err(ProvisioningError::NotFound(Object::Bot));
            }
            self.bot(&rule.tenant_id, bot_id).await?;
        }
        Ok(())
    }

    pub async fn routing_rule(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<RoutingRule, ProvisioningError> {
        self.one(SELECT, tenant_id, id, Object::RoutingRule, from_row)
            .await
    }

    /// Admin listing, by id.
    pub async fn list_routing_rules(
        &self,
        tenant_id: &str,
        page: &PageRequest,
    ) -> Result<Page<RoutingRule>, ProvisioningError> {
        self.tenant(tenant_id).await?;
        sql::page(
            &self.pool,
            "routing_rules",
            SELECT,
            Some(tenant_id),
            page,
            from_row,
        )
        .await
    }

    /// Every rule of the tenant in evaluation order: highest priority first, then oldest first.
    /// The router takes the first rule that [`RoutingRule::matches`].
    pub async fn routing_rules(
        &self,
        tenant_id: &str,
    ) -> Result<Vec<RoutingRule>, ProvisioningError> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE tenant_id = $1 ORDER BY priority DESC, id ASC"
        ))
        .bind(tenant_id.to_string())
        .fetch_all(&self.pool)
        .await
        .map_err(sql::unavailable)?;
        rows.iter().map(from_row).collect()
    }

    pub async fn update_routing_rule(
        &self,
        tenant_id: &str,
        id: &str,
        patch: RoutingRulePatch,
    ) -> Result<RoutingRule, ProvisioningError> {
        let mut rule = self.routing_rule(tenant_id, id).await?;
        // The rule as patched is validated whole (its links must exist); only the patched
        // columns are written, so two PATCHes of different fields that race both stay.
        let mut sets = Vec::new();
        if let Some(channel) = &patch.channel {
            rule.channel = models::ident("channel", channel)?;
            sets.push(("channel", Set::Text(Some(rule.channel.clone()))));
        }
        if let Some(attributes) = &patch.attributes {
            rule.attributes = models::attributes(attributes)?;
            sets.push((
                "attributes",
                Set::Text(Some(sql::to_json(&rule.attributes))),
            ));
        }
        if let Some(queue_id) = patch.queue_id {
            rule.queue_id = queue_id;
            sets.push(("queue_id", Set::Text(Some(rule.queue_id.clone()))));
        }
        if let Some(skills) = &patch.required_skills {
            rule.required_skills = models::skills("required_skills", skills)?;
            sets.push((
                "required_skills",
                Set::Text(Some(sql::to_json(&rule.required_skills))),
            ));
        }
        if let Some(priority) = patch.priority {
            rule.priority = priority;
            sets.push(("priority", Set::Int(Some(i64::from(priority)))));
        }
        if let Some(bot_id) = patch.bot_id {
            rule.bot_id = bot_id;
            sets.push(("bot_id", Set::Text(rule.bot_id.clone())));
        }
        self.check_links(&rule).await?;
        sql::patch(&self.pool, "routing_rules", tenant_id, id, sets, &[])
            .await
            .map_err(|e| sql::write_error(e, referenced, referenced))?;
        self.routing_rule(tenant_id, id).await
    }

    pub async fn delete_routing_rule(
        &self,
        tenant_id: &str,
        id: &str,
    ) -> Result<(), ProvisioningError> {
        self.delete_one(
            "routing_rules",
            tenant_id,
            id,
            Object::RoutingRule,
            sql::unavailable,
        )
        .await
    }
}
