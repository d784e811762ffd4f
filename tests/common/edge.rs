//! Edges in the test process for the in-process API tests: on the embedded bus, SQLite and the
//! embedded session store ([`embedded_state`]), or on the production shape, a NATS JetStream of
//! its own, a fresh PostgreSQL database and a Redis namespace ([`broker_edge`]).

use std::path::Path;
use std::sync::Arc;

use nexus::config::Config;
use nexus::edge::AppState;
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::Provisioning;
use nexus::stores::session::embedded::EmbeddedStore;
use nexus::stores::session::SessionStore;
use nexus::topology::{self, Topology};

/// The edge's state for `config` (its bus set to an embedded log under `dir`), every store
/// under `dir`.
pub async fn embedded_state(mut config: Config, dir: &Path) -> AppState {
    config.bus = super::bus_config("embedded", Some(dir));
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    let topology = Topology::builtin();
    topology::apply(bus.as_ref(), &topology)
        .await
        .expect("apply");
    let provisioning = Provisioning::connect(
        &dir.join("provisioning.db").display().to_string(),
        &EncryptionKey::generate(),
    )
    .await
    .expect("provisioning");
    let sessions: Arc<dyn SessionStore> = Arc::new(
        EmbeddedStore::open(&dir.join("sessions"))
            .await
            .expect("session store"),
    );
    AppState::new(
        Arc::new(config),
        bus,
        Arc::new(topology),
        nexus::telemetry::init_metrics(),
        Arc::new(provisioning),
        sessions,
    )
}

/// An edge in the test process on the production shape: a NATS JetStream server of its own, a
/// fresh PostgreSQL database for provisioning and Redis (a namespace of its own) for sessions,
/// with one tenant and its chat API key. The services live as long as it.
pub struct BrokerEdge {
    pub state: AppState,
    pub api_key: String,
    pub tenant: String,
    pub redis_url: String,
    pub namespace: String,
    pub nats: super::chat::OwnNats,
    pub db: super::chat::TestDb,
    pub dir: tempfile::TempDir,
}

/// A [`BrokerEdge`] for tenant `name`; `tweak` adjusts the config first (its bus is set here).
pub async fn broker_edge(name: &str, tweak: impl FnOnce(&mut Config)) -> BrokerEdge {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = super::chat::OwnNats::start(dir.path()).await;
    let db = super::chat::TestDb::create().await;
    let mut config = Config::defaults();
    config.chat.client_key_secret = format!("client-key-secret-of-{name}");
    tweak(&mut config);
    config.bus.url = nats.url.clone();
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    let topology = Topology::builtin();
    topology::apply(bus.as_ref(), &topology)
        .await
        .expect("topology");
    let provisioning = Provisioning::connect(&db.url, &EncryptionKey::generate())
        .await
        .expect("provisioning");
    let redis_url =
        std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let namespace = format!("nx{name}-{}", uuid::Uuid::new_v4().simple());
    let sessions: Arc<dyn SessionStore> = Arc::new(
        nexus::stores::session::redis::RedisStore::connect_in(&redis_url, &namespace)
            .await
            .expect("redis"),
    );
    let state = AppState::new(
        Arc::new(config),
        bus,
        Arc::new(topology),
        nexus::telemetry::init_metrics(),
        Arc::new(provisioning),
        sessions,
    );
    let (tenant, api_key) = super::fixtures::tenant_with_key(&state.provisioning, name).await;
    BrokerEdge {
        state,
        api_key,
        tenant,
        redis_url,
        namespace,
        nats,
        db,
        dir,
    }
}
