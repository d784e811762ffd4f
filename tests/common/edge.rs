//! An edge in the test process: embedded bus with the built-in topology, SQLite provisioning
//! and the embedded session store, all under one directory. The in-process API tests share it.

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
