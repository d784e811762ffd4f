//! Worker roles, one folder each. A role is a consumer group on the topics the topology gives
//! it; [`handler_for`] maps a role name to its effect.
//!
//! Built so far: `conversation` (sessions, transcript, routing to agents), `history`
//! (conversations to UCS), `gws` (agent actions → GWS calls, once each), `webhooks` (signed
//! interaction webhooks with retries) and `tap` (forwards events to an HTTP endpoint). The
//! `delivery` role has no effects yet: it runs the consumer runtime with [`pending::Pending`],
//! which acks and counts, until its issue lands (see README "Not built yet").

pub mod backlog;
pub mod conversation;
pub mod gws;
pub mod history;
pub mod peer;
pub mod pending;
pub mod prune;
pub mod tap;
pub mod webhooks;

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::bus::consumer::Handler;
use crate::bus::Bus;
use crate::config::Config;
use crate::stores::provisioning::Provisioning;
use crate::stores::session::SessionStore;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("role `{role}`: {message}")]
    Config { role: String, message: String },
}

/// What worker roles are built from.
#[derive(Clone)]
pub struct Deps {
    pub bus: Arc<dyn Bus>,
    /// `None` in processes without a role that keeps sessions.
    pub sessions: Option<Arc<dyn SessionStore>>,
    pub provisioning: Arc<Provisioning>,
}

/// A loop a role runs beside its consumers (timers, retry schedulers) until the token fires.
pub type Background = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// A role's handler and the loops that run beside its consumers.
pub struct RoleHandler {
    pub handler: Arc<dyn Handler>,
    pub background: Vec<Background>,
}

impl RoleHandler {
    fn plain(handler: Arc<dyn Handler>) -> Self {
        Self {
            handler,
            background: Vec::new(),
        }
    }
}

/// The effect of `role`, whose consumer group is `group`.
pub fn handler_for(
    role: &str,
    group: &str,
    config: &Config,
    deps: &Deps,
) -> Result<RoleHandler, WorkerError> {
    let handler: Arc<dyn Handler> = match role {
        "tap" => Arc::new(
            tap::Tap::new(&config.workers.tap, &config.http_client).map_err(|e| {
                WorkerError::Config {
                    role: role.to_string(),
                    message: e.to_string(),
                }
            })?,
        ),
        "conversation" => {
            let sessions = deps.sessions.clone().ok_or_else(|| WorkerError::Config {
                role: role.to_string(),
                message: "the conversation role needs the session store".into(),
            })?;
            let worker = Arc::new(
                conversation::ConversationWorker::new(
                    deps.bus.clone(),
                    sessions,
                    deps.provisioning.clone(),
                    config.conversation(),
                    conversation::bot::client(
                        &config.http_client,
                        config.workers.conversation.allow_private_bots,
                    )
                    .map_err(|e| WorkerError::Config {
                        role: role.to_string(),
                        message: e.to_string(),
                    })?,
                )
                .with_chat_limits(&config.chat),
            );
            let timers = worker.clone();
            return Ok(RoleHandler {
                handler: worker,
                background: vec![Box::new(move |stop| {
                    conversation::timers::run(timers, stop).boxed()
                })],
            });
        }
        "history" => {
            let worker = history::HistoryWorker::new(
                config.workers.history.clone(),
                crate::http_client::build(&config.http_client).map_err(|e| {
                    WorkerError::Config {
                        role: role.to_string(),
                        message: e.to_string(),
                    }
                })?,
                deps.provisioning.clone(),
            );
            let pruner = worker.pruner();
            let mut handler = backlogged(
                "history",
                group,
                Arc::new(worker),
                &config.workers.history.ucs,
                config,
                deps,
            );
            handler.background.push(Box::new(pruner));
            return Ok(handler);
        }
        "gws" => {
            let worker = gws::GwsWorker::new(
                &config.workers.gws,
                &config.http_client,
                deps.provisioning.pool().clone(),
                config.consumer_handler_timeout(),
            )
            .map_err(|e| WorkerError::Config {
                role: role.to_string(),
                message: e.to_string(),
            })?;
            let pruner = worker.pruner();
            let mut handler = backlogged(
                "gws",
                group,
                Arc::new(worker),
                &config.workers.gws,
                config,
                deps,
            );
            handler.background.push(Box::new(pruner));
            return Ok(handler);
        }
        "webhooks" => {
            return webhooks::role(
                &config.workers.webhooks,
                &config.http_client,
                &config.stores,
                deps.bus.clone(),
                deps.provisioning.clone(),
            )
            .map_err(|e| WorkerError::Config {
                role: role.to_string(),
                message: e.to_string(),
            });
        }
        other => Arc::new(pending::Pending::new(other)),
    };
    Ok(RoleHandler::plain(handler))
}

/// A peer-calling role's effect behind its retry backlog, with the backlog's scheduler.
fn backlogged<E: backlog::Effect>(
    role: &'static str,
    group: &str,
    effect: Arc<E>,
    peer: &peer::PeerConfig,
    config: &Config,
    deps: &Deps,
) -> RoleHandler {
    let store = backlog::Backlog::new(deps.provisioning.pool().clone(), role);
    let policy = backlog::RetryPolicy::of(peer);
    let scheduler = Arc::new(backlog::Scheduler::new(
        store.clone(),
        effect.clone(),
        deps.bus.clone(),
        group,
        policy,
        config.consumer_handler_timeout(),
    ));
    RoleHandler {
        handler: Arc::new(backlog::Backlogged::new(
            effect,
            store,
            policy,
            config.consumer_handler_timeout(),
        )),
        background: vec![Box::new(move |stop| scheduler.run(stop).boxed())],
    }
}
