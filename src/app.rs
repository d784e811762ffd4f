//! Assembling roles into processes: `nexus dev` (edge and every worker role on one embedded
//! bus), `nexus edge` and `nexus worker <role>...` (the same code split into pods). One
//! cancellation token drains everything on SIGTERM / Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::bus::consumer::{Consumer, ConsumerOptions};
use crate::bus::{self, BusError};
use crate::config::Config;
use crate::edge::{self, server, AppState};
use crate::stores::provisioning::{Provisioning, ProvisioningError};
use crate::topology::{self, Topology, TopologyError};
use crate::workers::{self, WorkerError};

#[derive(Debug, Error)]
pub enum AppError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Provisioning(#[from] ProvisioningError),
    #[error(transparent)]
    Sessions(#[from] crate::stores::session::StoreError),
    #[error("{0}")]
    Roles(String),
    #[error(
        "`{0}` holds no embedded bus (no `db` in it); nothing was created there. \
         `nexus topology apply --bus embedded://{0}` creates one (`nexus dev --data-dir X` keeps \
         its bus in `X/bus`); a misspelt directory would otherwise get an empty bus of its own"
    )]
    NoEmbeddedBus(String),
}

/// Pods on a broker bus share their state through servers: a pod left on the embedded stores
/// would keep state of its own (sessions an edge never sees, API keys another edge does not
/// know, an effect log another pod repeats calls past, client keys another edge refuses).
/// Refused before anything starts, naming the key. `nexus dev` is one process; the tap role
/// keeps no state.
fn check_shared_state(config: &Config, mode: &Mode, needs_sessions: bool) -> Result<(), AppError> {
    if matches!(mode, Mode::Dev) || config.bus.url.starts_with("embedded://") {
        return Ok(());
    }
    let needs_database = match mode {
        Mode::Dev => false,
        Mode::Edge => true,
        Mode::Worker(roles) => roles.iter().any(|r| r != "tap"),
    };
    let missing = [
        (
            needs_sessions && config.stores.redis_url.is_empty(),
            "stores.redis_url is not set: edges and conversation workers on a broker bus share \
             live sessions through Redis (the embedded session store is one process's file)",
        ),
        (
            needs_database && config.stores.postgres_url.is_empty(),
            "stores.postgres_url is not set: pods on a broker bus share provisioning, effect logs \
             and retry backlogs through PostgreSQL (the SQLite file is one pod's)",
        ),
        (
            matches!(mode, Mode::Edge) && config.chat.client_key_secret.is_empty(),
            "chat.client_key_secret is not set: every edge must sign and check client keys with \
             the same secret (a random one per process refuses other edges' keys, and its own \
             after a restart)",
        ),
    ];
    match missing.iter().find(|(missing, _)| *missing) {
        Some((_, message)) => Err(AppError::Roles((*message).to_string())),
        None => Ok(()),
    }
}

/// What a process runs.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Edge and every role; the topology is applied to the (embedded) bus at start.
    Dev,
    /// The HTTP edge only.
    Edge,
    /// These worker roles (and `/metrics`, `/healthz`, `/readyz` on `http.listen`).
    Worker(Vec<String>),
}

/// The topology from `topology.file`, or the built-in one.
pub fn load_topology(config: &Config) -> Result<Topology, TopologyError> {
    if config.topology.file.is_empty() {
        Ok(Topology::builtin())
    } else {
        Topology::load(&config.topology.file)
    }
}

/// Runs `mode` until `shutdown`, then drains: the edge stops accepting and finishes in-flight
/// requests, consumers finish and ack their current events and leave their groups.
pub async fn run(
    config: Arc<Config>,
    mode: Mode,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    // First: metric handles resolved before the recorder exists would count nowhere.
    let metrics = crate::telemetry::init_metrics();
    // Live sessions serve the chat APIs and the conversation role; other worker pods have none
    // (the embedded store is one process's file, so they must not open it).
    let needs_sessions = match &mode {
        Mode::Dev | Mode::Edge => true,
        Mode::Worker(roles) => roles.iter().any(|r| r == "conversation"),
    };
    check_shared_state(&config, &mode, needs_sessions)?;
    let topology = Arc::new(load_topology(&config)?);
    // Only `nexus dev` (and `topology apply`) create an embedded bus.
    if let Ok(bus::BusUrl::Embedded { dir }) = bus::BusUrl::parse(&config.bus.url) {
        if !matches!(mode, Mode::Dev) && !bus::embedded::holds_bus(&dir) {
            return Err(AppError::NoEmbeddedBus(dir.display().to_string()));
        }
    }
    let bus = bus::connect(&config.bus).await?;
    let provisioning = Arc::new(Provisioning::from_config(&config.stores).await?);
    let sessions = if needs_sessions {
        Some(crate::stores::session::connect(&config.stores).await?)
    } else {
        None
    };
    info!(
        bus = bus.kind(),
        provisioning = provisioning.kind(),
        ?mode,
        "starting"
    );
    let deps = workers::Deps {
        bus: bus.clone(),
        sessions: sessions.clone(),
        provisioning: provisioning.clone(),
    };

    let roles: Vec<String> = match &mode {
        Mode::Dev => {
            let applied = topology::apply(bus.as_ref(), &topology).await?;
            info!(
                created = applied.creates(),
                updated = applied.updates(),
                unchanged = applied.unchanged(),
                "topology applied"
            );
            topology
                .roles
                .iter()
                .filter(|r| !r.broadcast)
                .map(|r| r.name.clone())
                .collect()
        }
        Mode::Edge => {
            let topics: Vec<String> = topology.topics.iter().map(|t| t.name.clone()).collect();
            topology::ensure_topics(bus.as_ref(), &topics).await?;
            Vec::new()
        }
        Mode::Worker(roles) => {
            if roles.is_empty() {
                return Err(AppError::Roles(format!(
                    "name at least one role; the topology has: {}",
                    topology
                        .roles
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            // A broadcast role (the edges' read of the delivery topic) is `nexus edge`'s: as a
            // worker it would join a consumer group that acks every event and feeds no socket.
            if let Some(r) = topology
                .roles
                .iter()
                .find(|r| r.broadcast && roles.contains(&r.name))
            {
                return Err(AppError::Roles(format!(
                    "`{}` is read by every `nexus edge` process (a broadcast role), not by a worker",
                    r.name
                )));
            }
            for role in roles {
                topology::ensure_role_topics(bus.as_ref(), &topology, role).await?;
            }
            roles.clone()
        }
    };

    // Bound before any consumer joins its group: a port already taken then fails the start
    // before a rebalance hands this process partitions it would leave stalled.
    let bound = server::bind(&config.http).await?;
    let demo = if matches!(mode, Mode::Dev) {
        let dir = std::path::Path::new(&config.stores.data_dir);
        Some(Arc::new(edge::demo::ensure(&provisioning, dir).await?))
    } else {
        None
    };
    let mut tasks: JoinSet<Result<(), AppError>> = JoinSet::new();
    for role in &roles {
        spawn_role(
            &mut tasks,
            &config,
            &topology,
            &deps,
            role,
            shutdown.clone(),
        )?;
    }

    let mut state = AppState::new(
        config.clone(),
        bus.clone(),
        topology.clone(),
        metrics,
        provisioning.clone(),
        sessions,
    );
    state.shutdown = shutdown.clone();
    state.demo = demo;
    if matches!(mode, Mode::Dev | Mode::Edge) {
        spawn_socket_feed(&mut tasks, &config, &topology, &state, shutdown.clone())?;
        let (sweeper, stop) = (state.clone(), shutdown.clone());
        tasks.spawn(async move {
            edge::chat::sweep_files(sweeper, stop).await;
            Ok(())
        });
    }
    info!(addr = %bound.addr, tls = bound.is_tls(), "listening");
    let grace = Duration::from_millis(config.http.shutdown_grace_ms);
    let http_shutdown = shutdown.clone();
    let sockets = state.sockets.clone();
    // When shutdown began: sockets get what is left of the grace, not a second one.
    let stopping = Arc::new(std::sync::OnceLock::new());
    {
        let (stopping, shutdown) = (stopping.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = stopping.set(tokio::time::Instant::now());
        });
    }
    let router = match mode {
        Mode::Dev | Mode::Edge => edge::app(state),
        Mode::Worker(_) => edge::ops_app(state),
    };
    tasks.spawn(async move { Ok(bound.serve(router, http_shutdown, grace).await?) });

    // The first task to fail takes the process down (after draining the rest): a pod with a
    // dead consumer must restart rather than look healthy.
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = match joined {
            Ok(r) => r,
            Err(e) => Err(AppError::Roles(format!("task panicked: {e}"))),
        };
        if let Err(e) = outcome {
            if result.is_ok() {
                error!(error = %e, "a component failed; shutting down");
                result = Err(e);
            }
            shutdown.cancel();
        }
    }
    // Upgraded sockets run past the HTTP server: their close frames (1012) go before exit.
    let since = stopping
        .get()
        .map_or(Duration::ZERO, |at: &tokio::time::Instant| at.elapsed());
    let left = sockets.wait_closed(grace.saturating_sub(since)).await;
    if left > 0 {
        warn!(sockets = left, "WebSockets still open at exit");
    }
    info!("stopped");
    result
}

fn spawn_role(
    tasks: &mut JoinSet<Result<(), AppError>>,
    config: &Config,
    topology: &Topology,
    deps: &workers::Deps,
    role_name: &str,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let role = topology
        .role(role_name)
        .ok_or_else(|| TopologyError::UnknownRole(role_name.to_string()))?;
    let handler = workers::handler_for(&role.name, &role.group, config, deps)?;
    for background in handler.background {
        let run = background(shutdown.clone());
        tasks.spawn(async move {
            run.await;
            Ok(())
        });
    }
    let mut options = ConsumerOptions::from_config(&config.consumer, config.bus.start_from);
    options.concurrency = role.concurrency.max(1) as usize;
    for topic in &role.topics {
        let consumer = Consumer::new(deps.bus.clone(), &role.group, topic, options.clone())
            .drain_for(Duration::from_millis(config.consumer.drain_ms));
        let handler = handler.handler.clone();
        let shutdown = shutdown.clone();
        info!(role = %role.name, group = %role.group, topic = %topic, "starting consumer");
        tasks.spawn(async move { Ok(consumer.run(handler, shutdown).await?) });
    }
    Ok(())
}

/// The broadcast read of the delivery topic that feeds this process's sockets: the topic's
/// tail, no group, so every edge process sees every client event (labelled in metrics with the
/// edge role's group plus a process id).
fn spawn_socket_feed(
    tasks: &mut JoinSet<Result<(), AppError>>,
    config: &Config,
    topology: &Topology,
    state: &AppState,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let Some(role) = topology.roles.iter().find(|r| r.broadcast) else {
        return Ok(());
    };
    let group = format!("{}-{}", role.group, uuid::Uuid::now_v7().simple());
    let mut options = ConsumerOptions::from_config(&config.consumer, config.bus.start_from);
    options.concurrency = role.concurrency.max(1) as usize;
    options.start = crate::bus::StartFrom::Latest;
    let feeder: Arc<dyn crate::bus::consumer::Handler> =
        Arc::new(edge::hub::HubFeeder(state.hub.clone()));
    for topic in &role.topics {
        let consumer = Consumer::new(state.bus.clone(), &group, topic, options.clone()).broadcast();
        let (feeder, shutdown) = (feeder.clone(), shutdown.clone());
        info!(group = %group, topic = %topic, "starting the socket feed");
        tasks.spawn(async move { Ok(consumer.run(feeder, shutdown).await?) });
    }
    Ok(())
}

/// Exit status of a process that a second signal stopped without draining: 128 + the signal's
/// number, as a shell reports a process the signal killed.
const EXIT_SIGINT: i32 = 130;
#[cfg(unix)]
const EXIT_SIGTERM: i32 = 143;

/// Cancels `token` on SIGTERM or Ctrl-C (SIGINT): the process drains. A second SIGTERM or SIGINT
/// while it drains exits at once, skipping the drain: someone pressing Ctrl-C again wants the
/// process gone, not a wait of `consumer.drain_ms` + `consumer.handler_timeout_ms` that looks
/// like a hang. Nothing acknowledged is lost by it: a publish is answered only once its record is
/// durable, and the events not yet acked are redelivered to the group's next consumer
/// (at-least-once; effects are idempotent), as after a crash.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (mut term, mut int) = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => (term, int),
                (Err(e), _) | (_, Err(e)) => {
                    error!(error = %e, "cannot listen for SIGTERM and SIGINT");
                    let _ = tokio::signal::ctrl_c().await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: draining (a second SIGTERM or Ctrl-C exits at once)"),
                _ = int.recv() => info!("interrupt: draining (press Ctrl-C again to exit at once)"),
            }
            token.cancel();
            let (signal, code) = tokio::select! {
                _ = term.recv() => ("SIGTERM", EXIT_SIGTERM),
                _ = int.recv() => ("SIGINT", EXIT_SIGINT),
            };
            warn!(
                signal,
                "second signal: exiting now, skipping the drain (published events are durable; \
                 events not yet acked are redelivered to the next consumer)"
            );
            std::process::exit(code);
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            info!("interrupt: draining (press Ctrl-C again to exit at once)");
            token.cancel();
            let _ = tokio::signal::ctrl_c().await;
            warn!("second interrupt: exiting now, skipping the drain");
            std::process::exit(EXIT_SIGINT);
        }
    });
}
