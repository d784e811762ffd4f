//! What the conversation worker reads from provisioning: routing rules, queues and agent
//! profiles of a tenant. A trait so the worker does not depend on how provisioning is stored.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::bot::BotTarget;
use crate::stores::provisioning::{Provisioning, ProvisioningError};

#[derive(Debug, thiserror::Error)]
#[error("provisioning unavailable: {0}")]
pub struct DirectoryError(pub String);

/// A routing rule: a conversation on `channel` whose user data has every `attributes` pair
/// goes to `queue_id`, needing `skills`; the highest `priority` matching rule wins.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub channel: String,
    pub attributes: BTreeMap<String, String>,
    pub queue_id: String,
    pub skills: Vec<String>,
    pub priority: i64,
    pub bot_id: Option<String>,
}

impl Rule {
    pub fn matches(&self, channel: &str, user_data: &BTreeMap<String, String>) -> bool {
        self.channel.eq_ignore_ascii_case(channel)
            && self
                .attributes
                .iter()
                .all(|(k, v)| user_data.get(k) == Some(v))
    }
}

/// The first matching rule by priority (ties: the order given, i.e. oldest first).
pub fn route<'a>(
    rules: &'a [Rule],
    channel: &str,
    user_data: &BTreeMap<String, String>,
) -> Option<&'a Rule> {
    rules
        .iter()
        .filter(|r| r.matches(channel, user_data))
        .fold(None, |best: Option<&Rule>, r| match best {
            Some(b) if b.priority >= r.priority => Some(b),
            _ => Some(r),
        })
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentProfile {
    pub skills: Vec<String>,
    pub capacity: BTreeMap<String, u32>,
}

#[async_trait]
pub trait Directory: Send + Sync + 'static {
    async fn routing_rules(&self, tenant: &str) -> Result<Vec<Rule>, DirectoryError>;
    async fn queue_exists(&self, tenant: &str, queue_id: &str) -> Result<bool, DirectoryError>;
    /// The bot's endpoint with its credential decrypted; `None` if the tenant has no such bot.
    async fn bot(&self, tenant: &str, bot_id: &str) -> Result<Option<BotTarget>, DirectoryError>;
    async fn agent(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentProfile>, DirectoryError>;
}

/// Provisioning (PostgreSQL or SQLite) is the directory of a running nexus.
#[async_trait]
impl Directory for Provisioning {
    async fn routing_rules(&self, tenant: &str) -> Result<Vec<Rule>, DirectoryError> {
        let rules = Provisioning::routing_rules(self, tenant)
            .await
            .map_err(|e| DirectoryError(e.to_string()))?;
        Ok(rules
            .into_iter()
            .map(|r| Rule {
                id: r.id,
                channel: r.channel,
                attributes: r.attributes,
                queue_id: r.queue_id,
                skills: r.required_skills,
                priority: i64::from(r.priority),
                bot_id: r.bot_id,
            })
            .collect())
    }

    async fn bot(&self, tenant: &str, bot_id: &str) -> Result<Option<BotTarget>, DirectoryError> {
        match Provisioning::bot_credential(self, tenant, bot_id).await {
            Ok((endpoint, credential)) => Ok(Some(BotTarget {
                name: endpoint.name,
                url: endpoint.url,
                credential,
            })),
            Err(ProvisioningError::NotFound(_)) => Ok(None),
            Err(e) => Err(DirectoryError(e.to_string())),
        }
    }

    async fn queue_exists(&self, tenant: &str, queue_id: &str) -> Result<bool, DirectoryError> {
        match Provisioning::queue(self, tenant, queue_id).await {
            Ok(_) => Ok(true),
            Err(ProvisioningError::NotFound(_)) => Ok(false),
            Err(e) => Err(DirectoryError(e.to_string())),
        }
    }

    async fn agent(
        &self,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Option<AgentProfile>, DirectoryError> {
        match Provisioning::agent(self, tenant, agent_id).await {
            Ok(a) => Ok(Some(AgentProfile {
                skills: a.skills,
                capacity: a.capacity,
            })),
            Err(ProvisioningError::NotFound(_)) => Ok(None),
            Err(e) => Err(DirectoryError(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(id: &str, channel: &str, attrs: &[(&str, &str)], priority: i64) -> Rule {
        Rule {
            id: id.into(),
            channel: channel.into(),
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            queue_id: format!("q-{id}"),
            skills: vec![],
            priority,
            bot_id: None,
        }
    }

    #[test]
    fn highest_priority_matching_rule_wins() {
        let rules = vec![
            rule("any", "web_chat", &[], 1),
            rule("vip", "WEB_CHAT", &[("tier", "gold")], 10),
            rule("sms", "SMS", &[], 100),
        ];
        let gold = BTreeMap::from([("tier".to_string(), "gold".to_string())]);
        assert_eq!(
            route(&rules, "WEB_CHAT", &gold).map(|r| r.id.as_str()),
            Some("vip")
        );
        assert_eq!(
            route(&rules, "WEB_CHAT", &BTreeMap::new()).map(|r| r.id.as_str()),
            Some("any")
        );
        assert_eq!(route(&rules, "EMAIL", &gold), None);
    }
}
