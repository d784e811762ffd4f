//! Worker roles, one folder each. A role is a consumer group on the topics the topology gives
//! it; [`handler_for`] maps a role name to its effect.
//!
//! Built so far: `tap` (forwards events to an HTTP endpoint). The channel roles of the
//! topology (conversation, history, gws, webhooks, delivery) have no effects yet: they run
//! the consumer runtime with [`pending::Pending`], which acks and counts, until their issues
//! land (see README "Not built yet").

pub mod conversation;
pub mod pending;
pub mod tap;

use std::sync::Arc;

use thiserror::Error;

use crate::bus::consumer::Handler;
use crate::config::Config;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("role `{role}`: {message}")]
    Config { role: String, message: String },
}

/// The effect of `role`.
pub fn handler_for(role: &str, config: &Config) -> Result<Arc<dyn Handler>, WorkerError> {
    Ok(match role {
        "tap" => Arc::new(
            tap::Tap::new(&config.workers.tap, &config.http_client).map_err(|e| {
                WorkerError::Config {
                    role: role.to_string(),
                    message: e.to_string(),
                }
            })?,
        ),
        other => Arc::new(pending::Pending::new(other)),
    })
}
