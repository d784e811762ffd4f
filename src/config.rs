//! Layered configuration: commented defaults built into the binary (`config.default.toml`) →
//! a file given with `--config` → `NEXUS_*` environment variables; validated once at start.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bus::BusUrl;

/// The built-in defaults, with a comment on every key.
pub const DEFAULT_CONFIG: &str = include_str!("config.default.toml");

/// A configuration error names the key at fault.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bus: BusConfig,
    pub consumer: ConsumerConfig,
    pub http: HttpConfig,
    pub http_client: HttpClientConfig,
    pub stores: StoresConfig,
    pub topology: TopologyConfig,
    pub telemetry: TelemetryConfig,
    pub workers: WorkersConfig,
    pub chat: ChatConfig,
}

/// The web chat APIs (v3 and legacy v2).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// Secret: signs client keys. Every edge pod needs the same one; "" = a random key per
    /// process (fine for `nexus dev`, not for several edge pods).
    pub client_key_secret: String,
    /// Longest message text (characters).
    pub max_message_chars: usize,
    /// Longest nickname (characters).
    pub max_nickname_chars: usize,
    /// Most user-data entries per session.
    pub max_user_data_entries: usize,
    /// MIME types a customer may upload (`type/subtype`, compared without parameters and
    /// case); anything else is `INVALID_FILE_TYPE`.
    pub file_types: Vec<String>,
    /// Largest uploaded file (bytes); larger is `LIMIT_FILE_SIZE`. Uploads may exceed
    /// `http.max_body_bytes` up to this (plus multipart framing).
    pub max_file_bytes: usize,
    /// Most files one session may upload; more is `LIMIT_FILE_COUNT`.
    pub max_files_per_session: usize,
    /// Uploads one edge process reads at once (each held in memory until stored); more wait
    /// a little, then get 503 `UPLOADS_BUSY`.
    pub max_uploads_in_flight: usize,
    /// Lifetime of a client key (s); an older key is `CLIENT_KEY_EXPIRED`.
    pub client_key_ttl_s: u64,
    /// How long an uploaded file is kept (s); then downloads are `FILE_EXPIRED` and the sweeper
    /// empties it.
    pub file_retention_s: u64,
    /// How often each edge pod empties expired files (ms).
    pub file_sweep_interval_ms: u64,
}

/// Settings of individual worker roles.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    pub tap: crate::workers::tap::TapConfig,
    pub conversation: crate::workers::conversation::ConversationConfig,
    #[serde(default)]
    pub history: crate::workers::history::HistoryConfig,
    pub gws: crate::workers::gws::GwsConfig,
    pub webhooks: crate::workers::webhooks::WebhooksConfig,
}

/// The bus: which one and how to talk to it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BusConfig {
    /// `embedded://<dir>`, `kafka://h:p[,h:p]`, `kafka+ssl://...`, `nats://h:p`, `tls://h:p`.
    pub url: String,
    /// Where a group without a committed offset starts.
    pub start_from: StartFromConfig,
    /// PEM CA bundle the bus's TLS trusts instead of the system roots ("" = the system roots).
    pub ca_file: String,
    /// Client certificate for mutual TLS.
    pub client_cert_file: String,
    /// Client key for mutual TLS.
    pub client_key_file: String,
    pub kafka: KafkaConfig,
    pub nats: NatsConfig,
    pub embedded: EmbeddedConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartFromConfig {
    Earliest,
    Latest,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Group session timeout (ms).
    pub session_timeout_ms: u64,
    /// `cooperative-sticky`, `range` or `roundrobin`.
    pub partition_assignment_strategy: String,
    /// Idempotent producer.
    pub enable_idempotence: bool,
    /// Publish timeout (ms).
    pub message_timeout_ms: u64,
    /// Records each consumer fetches ahead, at most, in KiB (one consumer per subscribed topic).
    pub prefetch_kbytes: u32,
    /// How long a revoke waits for the acks of records already handed out (ms).
    pub handover_wait_ms: u64,
    /// SASL mechanism, "" for none.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    /// Secret: redacted when printed.
    pub sasl_password: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Redelivery time of an unacked record (ms).
    pub ack_wait_ms: u64,
    /// Partition lease time (ms); must exceed `ack_wait_ms`.
    pub lease_ttl_ms: u64,
    /// How often a member re-reads its topic's partition count (ms).
    pub partitions_refresh_ms: u64,
    /// Stream replicas.
    pub replicas: usize,
    pub user: String,
    /// Secret: redacted when printed.
    pub password: String,
    /// Secret: redacted when printed.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Publishes per group-commit batch at most.
    pub max_batch: usize,
    /// Longest a partition moving to another member waits for the old member's deliveries
    /// of it (ms).
    pub handover_wait_ms: u64,
}

/// The consumer runtime shared by every worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// Key lanes per subscription.
    pub concurrency: usize,
    /// Unacked records per subscription.
    pub max_in_flight: usize,
    /// Handler timeout (ms).
    pub handler_timeout_ms: u64,
    /// First retry delay (ms).
    pub retry_initial_ms: u64,
    /// Largest retry delay (ms).
    pub retry_max_ms: u64,
    /// Lag measurement interval (ms).
    pub lag_interval_ms: u64,
    /// On shutdown, how long lanes keep handling events already taken from the bus (ms).
    pub drain_ms: u64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address.
    pub listen: String,
    /// PEM certificate chain; with the key, serve HTTPS.
    pub tls_cert_file: String,
    /// PEM private key.
    pub tls_key_file: String,
    /// Secret: bearer token of the admin and ingest endpoints.
    pub admin_token: String,
    /// Largest request body (bytes).
    pub max_body_bytes: usize,
    /// Drain time on shutdown (ms).
    pub shutdown_grace_ms: u64,
    /// How often WebSocket clients are pinged (ms); one silent for three of these is dropped.
    /// 0 = no pings.
    pub ws_ping_interval_ms: u64,
    /// Origins whose pages may call the customer and agent APIs (CORS); `*` alone = any.
    pub cors_allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpClientConfig {
    /// Timeout of each outbound call (ms).
    pub timeout_ms: u64,
    /// Extra CA bundle.
    pub ca_file: String,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresConfig {
    /// Secret (may carry a password): Redis URL, "" for the embedded store.
    pub redis_url: String,
    /// `redis_url` lists nodes of a Redis Cluster (comma-separated).
    pub redis_cluster: bool,
    /// PEM CA bundle trusted for `rediss://` instead of the system roots; "" = system roots.
    pub redis_ca_file: String,
    /// First segment of every Redis key; deployments sharing one Redis need their own.
    pub redis_namespace: String,
    /// Replicas that must have each session-store write before it counts as done (Redis
    /// `WAIT`); 0 = the master's acknowledgement alone.
    pub redis_min_replicas: u32,
    /// How long a write waits for those replicas before it fails, to be retried (ms).
    pub redis_replica_wait_ms: u64,
    /// Secret (may carry a password): PostgreSQL URL, "" for SQLite.
    pub postgres_url: String,
    /// Local data directory.
    pub data_dir: String,
    /// Secret: 32-byte key (hex or base64) encrypting bot credentials; "" = a key file
    /// generated once under `data_dir` (single-process `nexus dev` only).
    pub provisioning_key: String,
    /// Milliseconds an API-key lookup is reused by a process (0 = never).
    pub auth_cache_ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// Topology YAML file, "" for the built-in one.
    pub file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Default level filter when RUST_LOG is unset.
    pub log_level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

const REDACTED: &str = "<redacted>";

/// A secret as `Debug` shows it: [`REDACTED`] when set.
fn shown_secret(secret: &str) -> &'static str {
    if secret.is_empty() {
        ""
    } else {
        REDACTED
    }
}

/// `Debug` for a config section holding secrets (a `?config` in a log line, a failed
/// assertion): `secret` fields show as [`REDACTED`], `url` fields without their passwords. The
/// section is destructured whole, so a field added to it must be listed here to compile.
macro_rules! debug_redacted {
    ($t:ident { plain: [$($f:ident),* $(,)?], secret: [$($s:ident),* $(,)?], url: [$($u:ident),* $(,)?] $(,)? }) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let $t { $($f,)* $($s,)* $($u,)* } = self;
                f.debug_struct(stringify!($t))
                    $(.field(stringify!($f), $f))*
                    $(.field(stringify!($s), &shown_secret($s)))*
                    $(.field(stringify!($u), &redact_url_list($u)))*
                    .finish()
            }
        }
    };
}

debug_redacted!(ChatConfig {
    plain: [
        max_message_chars,
        max_nickname_chars,
        max_user_data_entries,
        file_types,
        max_file_bytes,
        max_files_per_session,
        max_uploads_in_flight,
        client_key_ttl_s,
        file_retention_s,
        file_sweep_interval_ms,
    ],
    secret: [client_key_secret],
    url: [],
});
debug_redacted!(BusConfig {
    plain: [
        start_from,
        ca_file,
        client_cert_file,
        client_key_file,
        kafka,
        nats,
        embedded
    ],
    secret: [],
    url: [url],
});
debug_redacted!(KafkaConfig {
    plain: [
        session_timeout_ms,
        partition_assignment_strategy,
        enable_idempotence,
        message_timeout_ms,
        prefetch_kbytes,
        handover_wait_ms,
        sasl_mechanism,
        sasl_username,
    ],
    secret: [sasl_password],
    url: [],
});
debug_redacted!(NatsConfig {
    plain: [
        ack_wait_ms,
        lease_ttl_ms,
        partitions_refresh_ms,
        replicas,
        user
    ],
    secret: [password, token],
    url: [],
});
debug_redacted!(HttpConfig {
    plain: [
        listen,
        tls_cert_file,
        tls_key_file,
        max_body_bytes,
        shutdown_grace_ms,
        ws_ping_interval_ms,
        cors_allowed_origins,
    ],
    secret: [admin_token],
    url: [],
});
debug_redacted!(StoresConfig {
    plain: [
        redis_cluster,
        redis_ca_file,
        redis_namespace,
        redis_min_replicas,
        redis_replica_wait_ms,
        data_dir,
        auth_cache_ttl_ms,
    ],
    secret: [provisioning_key],
    url: [redis_url, postgres_url],
});

impl Config {
    /// Defaults → optional file → `NEXUS_*` env, then validated.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let vars = std::env::vars_os().map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        });
        Self::load_with_env(file, vars)
    }

    /// [`Config::load`] with the environment given as `(name, value)` pairs, so tests need not
    /// touch the process environment that other tests read.
    fn load_with_env(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        check_env_names(&vars)?;
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG));
        if let Some(path) = file {
            check_file(path)?;
            // `file_exact`: `Toml::file` reads a path that is no file (a directory) as an empty
            // file, and looks for a relative one in every parent directory.
            figment = figment.merge(Toml::file_exact(path));
        }
        Self::from_figment(with_env(figment, env_settings(vars)))
    }

    /// The built-in defaults only (tests and tools).
    pub fn defaults() -> Config {
        // The embedded defaults are part of the binary and covered by a test.
        Self::from_figment(Figment::from(Toml::string(DEFAULT_CONFIG)))
            .expect("built-in defaults are valid")
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract_lossy().map_err(load_error)?;
        config.validate()?;
        Ok(config)
    }

    /// How long an uploaded file is kept: `chat.file_retention_s`, at most a closed chat's
    /// transcript (`workers.conversation.closed_retention_s`), so a file uploaded just before
    /// its chat closed does not outlive the transcript that names it.
    pub fn file_retention_s(&self) -> u64 {
        self.chat
            .file_retention_s
            .min(self.workers.conversation.closed_retention_s)
    }

    /// On a Kafka bus, settings that would otherwise be dropped without a word: TLS files on
    /// a plaintext URL (a `kafka://` client never reads them), SASL credentials without a
    /// mechanism (the client would connect without SASL). Other buses never read the Kafka
    /// settings (one config serves pods of every kind).
    fn check_kafka_security(&self) -> Result<(), ConfigError> {
        let Ok(BusUrl::Kafka { tls, .. }) = BusUrl::parse(&self.bus.url) else {
            return Ok(());
        };
        if !tls {
            for (key, value) in [
                ("bus.ca_file", &self.bus.ca_file),
                ("bus.client_cert_file", &self.bus.client_cert_file),
            ] {
                if !value.is_empty() {
                    return Err(invalid(
                        key,
                        "is for TLS only: bus.url must be kafka+ssl:// for the Kafka client to use it",
                    ));
                }
            }
        }
        let k = &self.bus.kafka;
        if k.sasl_mechanism.is_empty()
            && !(k.sasl_username.is_empty() && k.sasl_password.is_empty())
        {
            return Err(invalid(
                "bus.kafka.sasl_mechanism",
                "is empty while bus.kafka.sasl_username or sasl_password is set: without a \
                 mechanism the client connects without SASL (set PLAIN, SCRAM-SHA-256 or \
                 SCRAM-SHA-512)",
            ));
        }
        Ok(())
    }

    /// Cross-field and format rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_bus_url(&self.bus.url)?;
        // A token read from a secret file often ends in a newline: no `Authorization` header
        // can carry it, so every admin call would answer 401 with nothing saying why.
        // Nor can a header read as text carry bytes beyond ASCII.
        let token = &self.http.admin_token;
        if token.trim() != token || token.chars().any(char::is_control) {
            return Err(invalid(
                "http.admin_token",
                "has whitespace at an end or a control character (a newline from a secret \
                 file?); no Authorization header can carry it",
            ));
        }
        if !token.is_ascii() {
            return Err(invalid(
                "http.admin_token",
                "has a character beyond ASCII; an Authorization header carries visible ASCII \
                 only (use a random hex or base64 token)",
            ));
        }
        match self.bus.kafka.partition_assignment_strategy.as_str() {
            "cooperative-sticky" | "range" | "roundrobin" => {}
            other => {
                return Err(invalid(
                    "bus.kafka.partition_assignment_strategy",
                    format!("`{other}` is not cooperative-sticky, range or roundrobin"),
                ))
            }
        }
        match self.bus.kafka.sasl_mechanism.as_str() {
            "" | "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512" => {}
            other => {
                return Err(invalid(
                    "bus.kafka.sasl_mechanism",
                    format!("`{other}` is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
                ))
            }
        }
        if self.bus.kafka.session_timeout_ms < 1000 {
            return Err(invalid(
                "bus.kafka.session_timeout_ms",
                "must be at least 1000",
            ));
        }
        if !(1..=2_097_151).contains(&self.bus.kafka.prefetch_kbytes) {
            return Err(invalid(
                "bus.kafka.prefetch_kbytes",
                "must be between 1 and 2097151 (KiB)",
            ));
        }
        if self.bus.nats.ack_wait_ms < 100 {
            return Err(invalid("bus.nats.ack_wait_ms", "must be at least 100"));
        }
        if self.bus.nats.lease_ttl_ms <= self.bus.nats.ack_wait_ms {
            return Err(invalid(
                "bus.nats.lease_ttl_ms",
                "must exceed bus.nats.ack_wait_ms so a new owner never overtakes a dead owner's records",
            ));
        }
        if self.bus.nats.partitions_refresh_ms < 100 {
            return Err(invalid(
                "bus.nats.partitions_refresh_ms",
                "must be at least 100",
            ));
        }
        if self.bus.nats.replicas == 0 {
            return Err(invalid("bus.nats.replicas", "must be at least 1"));
        }
        if self.bus.embedded.max_batch == 0 {
            return Err(invalid("bus.embedded.max_batch", "must be at least 1"));
        }
        if (self.bus.client_cert_file.is_empty()) != (self.bus.client_key_file.is_empty()) {
            return Err(invalid(
                "bus.client_key_file",
                "set both client_cert_file and client_key_file, or neither",
            ));
        }
        self.check_kafka_security()?;
        if self.consumer.concurrency == 0 {
            return Err(invalid("consumer.concurrency", "must be at least 1"));
        }
        if self.consumer.max_in_flight == 0 {
            return Err(invalid("consumer.max_in_flight", "must be at least 1"));
        }
        if self.consumer.retry_initial_ms == 0
            || self.consumer.retry_max_ms < self.consumer.retry_initial_ms
        {
            return Err(invalid(
                "consumer.retry_max_ms",
                "need 0 < retry_initial_ms <= retry_max_ms",
            ));
        }
        if self.consumer.handler_timeout_ms < 100 {
            return Err(invalid(
                "consumer.handler_timeout_ms",
                "must be at least 100",
            ));
        }
        // A member giving a partition up waits this long for its handlers; a shorter wait
        // lets a slow handler's key be handled by two members at once. Only the bus in use
        // (JetStream's wait is twice its ack wait, at least 10 s).
        let kind = crate::bus::url::BusUrl::parse(&self.bus.url)
            .map(|u| u.kind())
            .unwrap_or("");
        let handover = if kind == "kafka" {
            Some((
                "bus.kafka.handover_wait_ms",
                self.bus.kafka.handover_wait_ms,
                "",
            ))
        } else if kind == "embedded" {
            Some((
                "bus.embedded.handover_wait_ms",
                self.bus.embedded.handover_wait_ms,
                "",
            ))
        } else if kind == "jetstream" {
            // JetStream's hand-over wait follows the ack wait (`bus::jetstream::Timing`).
            let wait = self.bus.nats.ack_wait_ms.saturating_mul(2).max(10_000);
            Some((
                "bus.nats.ack_wait_ms",
                wait,
                "the hand-over wait, twice this and at least 10 s: ",
            ))
        } else {
            None
        };
        // librdkafka's `max.poll.interval.ms`, which must cover a Kafka member's wait, stops at
        // 24 h (see `bus::kafka::consumer::max_poll_interval_ms`).
        if kind == "kafka" && self.bus.kafka.handover_wait_ms > 82_800_000 {
            return Err(invalid(
                "bus.kafka.handover_wait_ms",
                "must be at most 82800000 (23 h): librdkafka takes a member out of its group \
                 after 24 h in a rebalance",
            ));
        }
        if let Some((key, wait, what)) = handover {
            if wait < self.consumer.handler_timeout_ms {
                return Err(invalid(
                    key,
                    format!(
                        "{what}{wait} ms is less than consumer.handler_timeout_ms ({} ms): a \
                         handler still running when its partition moves could run beside its \
                         successor",
                        self.consumer.handler_timeout_ms
                    ),
                ));
            }
        }
        if self.bus.kafka.message_timeout_ms == 0 {
            // librdkafka reads 0 as "never": a publish would wait forever for a broker.
            return Err(invalid(
                "bus.kafka.message_timeout_ms",
                "must be at least 1",
            ));
        }
        let conv = &self.workers.conversation;
        if conv.offer_timeout_ms < 100 {
            return Err(invalid(
                "workers.conversation.offer_timeout_ms",
                "must be at least 100",
            ));
        }
        if conv.requeue_interval_ms < 100 {
            // Every queued chat would be offered again on every timer tick.
            return Err(invalid(
                "workers.conversation.requeue_interval_ms",
                "must be at least 100",
            ));
        }
        if conv.bot_timeout_ms == 0 {
            return Err(invalid(
                "workers.conversation.bot_timeout_ms",
                "must be at least 1",
            ));
        }
        if conv.bot_retry_max_s == 0 {
            return Err(invalid(
                "workers.conversation.bot_retry_max_s",
                "must be at least 1",
            ));
        }
        if (1..100).contains(&self.http.ws_ping_interval_ms) {
            return Err(invalid(
                "http.ws_ping_interval_ms",
                "must be 0 (no pings) or at least 100",
            ));
        }
        if self.consumer.lag_interval_ms == 0 {
            return Err(invalid("consumer.lag_interval_ms", "must be at least 1"));
        }
        self.http
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("http.listen", format!("`{}`: {e}", self.http.listen)))?;
        if self.http.tls_cert_file.is_empty() != self.http.tls_key_file.is_empty() {
            return Err(invalid(
                "http.tls_key_file",
                "set both tls_cert_file and tls_key_file, or neither",
            ));
        }
        // Read now: a wrong file is refused naming its key, not when a listener or client
        // first uses it (after consumers started).
        for (key, path, is_key) in [
            ("http.tls_cert_file", &self.http.tls_cert_file, false),
            ("http.tls_key_file", &self.http.tls_key_file, true),
            ("http_client.ca_file", &self.http_client.ca_file, false),
            ("bus.ca_file", &self.bus.ca_file, false),
            ("bus.client_cert_file", &self.bus.client_cert_file, false),
            ("bus.client_key_file", &self.bus.client_key_file, true),
            ("stores.redis_ca_file", &self.stores.redis_ca_file, false),
        ] {
            if path.is_empty() {
                continue;
            }
            if !Path::new(path).is_file() {
                return Err(invalid(key, format!("file `{path}` does not exist")));
            }
            let read = if is_key {
                crate::tls::check_key(Path::new(path))
            } else {
                crate::tls::read_pem(Path::new(path)).map(|_| ())
            };
            read.map_err(|e| invalid(key, e.to_string()))?;
        }
        if self.http.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be at least 1"));
        }
        cors_origins(&self.http.cors_allowed_origins)
            .map_err(|e| invalid("http.cors_allowed_origins", e))?;
        if self.chat.max_uploads_in_flight == 0 {
            return Err(invalid("chat.max_uploads_in_flight", "must be at least 1"));
        }
        if self.chat.max_file_bytes == 0 {
            return Err(invalid("chat.max_file_bytes", "must be at least 1"));
        }
        for (key, value) in [
            (
                "workers.conversation.closed_retention_s",
                self.workers.conversation.closed_retention_s,
            ),
            ("chat.client_key_ttl_s", self.chat.client_key_ttl_s),
            ("chat.file_retention_s", self.chat.file_retention_s),
            (
                "chat.file_sweep_interval_ms",
                self.chat.file_sweep_interval_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if let Some(t) =
            self.chat.file_types.iter().find(
                |t| !matches!(t.split_once('/'), Some((a, b)) if !a.is_empty() && !b.is_empty()),
            )
        {
            return Err(invalid(
                "chat.file_types",
                format!("`{t}` is not a MIME type (type/subtype)"),
            ));
        }
        if self.http_client.timeout_ms == 0 {
            return Err(invalid("http_client.timeout_ms", "must be at least 1"));
        }
        let redis = &self.stores.redis_url;
        let nodes = if self.stores.redis_cluster {
            redis_nodes(redis)
        } else if redis.is_empty() {
            Vec::new()
        } else {
            vec![redis.as_str()]
        };
        if self.stores.redis_cluster && nodes.is_empty() {
            return Err(invalid(
                "stores.redis_url",
                "stores.redis_cluster needs the URL of at least one node",
            ));
        }
        for node in &nodes {
            if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                return Err(invalid(
                    "stores.redis_url",
                    "must start with redis:// or rediss:// (TLS); a cluster's nodes are \
                     separated by commas",
                ));
            }
            // Parsed only (no connection): a malformed URL is named here, not at first use.
            redis::Client::open(*node)
                .map_err(|e| invalid("stores.redis_url", format!("not a valid URL: {e}")))?;
        }
        if self.stores.redis_cluster {
            check_cluster_nodes(&redis_nodes(redis)).map_err(|m| invalid("stores.redis_url", m))?;
        }
        // Without Redis the setting is unused (one config serves every pod, some with no Redis).
        if !self.stores.redis_ca_file.is_empty()
            && !nodes.iter().all(|n| n.starts_with("rediss://"))
        {
            return Err(invalid(
                "stores.redis_ca_file",
                "is for TLS only: stores.redis_url must be rediss:// (every node of a cluster)",
            ));
        }
        let ns = &self.stores.redis_namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "stores.redis_namespace",
                "must be 1 to 64 of A-Z a-z 0-9 - _ .",
            ));
        }
        // Without Redis (the embedded store, or a role with no session store) it is unused:
        // one config serves every pod.
        if self.stores.redis_min_replicas > 0 {
            // Below the store's 5 s response timeout, so a slow replica fails the wait, not
            // the connection.
            if !(1..=MAX_REPLICA_WAIT_MS).contains(&self.stores.redis_replica_wait_ms) {
                return Err(invalid(
                    "stores.redis_replica_wait_ms",
                    format!("must be 1 to {MAX_REPLICA_WAIT_MS}"),
                ));
            }
        }
        let pg = &self.stores.postgres_url;
        if !(pg.is_empty() || pg.starts_with("postgres://") || pg.starts_with("postgresql://")) {
            return Err(invalid(
                "stores.postgres_url",
                "must start with postgres:// or postgresql:// (TLS: ?sslmode=require)",
            ));
        }
        if !pg.is_empty() {
            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(pg)
                .map_err(|e| invalid("stores.postgres_url", format!("not a valid URL: {e}")))?;
        }
        if !self.stores.provisioning_key.is_empty() {
            crate::stores::provisioning::secrets::EncryptionKey::parse(
                &self.stores.provisioning_key,
            )
            .map_err(|e| invalid("stores.provisioning_key", e))?;
        } else if !pg.is_empty() {
            return Err(invalid(
                "stores.provisioning_key",
                "required with stores.postgres_url: every process must encrypt bot credentials with the same key",
            ));
        }
        if !self.topology.file.is_empty() && !Path::new(&self.topology.file).is_file() {
            return Err(invalid(
                "topology.file",
                format!("file `{}` does not exist", self.topology.file),
            ));
        }
        // The history worker prunes an open conversation nobody wrote to for its retention
        // as one whose close it never got; a chat must close well before that.
        let conv = &self.workers.conversation;
        let open_for = conv.idle_timeout_s.saturating_add(conv.close_grace_s);
        let keep = crate::workers::history::DONE_RETENTION.as_secs();
        if open_for >= keep {
            return Err(invalid(
                "workers.conversation.idle_timeout_s",
                format!(
                    "idle_timeout_s + close_grace_s is {open_for} s; it must stay under {keep} s \
                     (30 days), the age at which the history worker takes a conversation nobody \
                     wrote to as one whose close it never got"
                ),
            ));
        }
        // Likewise a live chat its customer left (0 = kept until a party closes it).
        if conv.abandon_timeout_s >= keep {
            return Err(invalid(
                "workers.conversation.abandon_timeout_s",
                format!("must stay under {keep} s (30 days), as idle_timeout_s + close_grace_s"),
            ));
        }
        let settle = self.workers.history.transcript_settle_ms;
        let most = crate::workers::history::config::MAX_TRANSCRIPT_SETTLE_MS;
        if settle > most {
            return Err(invalid(
                "workers.history.transcript_settle_ms",
                format!("{settle} ms is more than {most} ms (10 minutes)"),
            ));
        }
        self.workers
            .history
            .ucs
            .validate("workers.history.ucs")
            .map_err(|e| invalid("workers.history.ucs", e))?;
        crate::workers::gws::config::validate(&self.workers.gws)
            .map_err(|m| invalid(crate::workers::gws::config::KEY, m))?;
        // A try (from the backlog) runs for the handler timeout at most: a UCS step, one call
        // and the IdentifyContact asked again after a 404 (`history::config::validate_try`);
        // a GWS try, up to two calls and two identity checks (`gws::config::validate_try`).
        let try_time = self.consumer_handler_timeout();
        crate::workers::history::config::validate_try(&self.workers.history.ucs, try_time)
            .map_err(|(key, e)| invalid(key, e))?;
        crate::workers::gws::config::validate_try(&self.workers.gws, try_time)
            .map_err(|e| invalid("workers.gws.timeout_ms", e))?;
        self.workers
            .webhooks
            .validate()
            .map_err(|(key, e)| invalid(key, e))?;
        self.workers
            .tap
            .endpoint()
            .map_err(|e| invalid("workers.tap.url", e.to_string()))?;
        if tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level).is_err() {
            return Err(invalid(
                "telemetry.log_level",
                format!("`{}` is not a level filter", self.telemetry.log_level),
            ));
        }
        Ok(())
    }

    /// The effective config as TOML with every secret replaced.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for secret in [
            &mut c.bus.kafka.sasl_password,
            &mut c.bus.nats.password,
            &mut c.chat.client_key_secret,
            &mut c.bus.nats.token,
            &mut c.http.admin_token,
            &mut c.stores.provisioning_key,
        ] {
            if !secret.is_empty() {
                *secret = REDACTED.to_string();
            }
        }
        c.workers.history.ucs.redact(REDACTED);
        c.workers.gws.redact(REDACTED);
        // An HTTP receiver's key often rides in its query (`api_key=`, `code=`): every value goes.
        c.workers.tap.url = crate::http_client::shown_url(&c.workers.tap.url);
        // Lists of servers, each with its own user info: NATS
        // (`nats://u:p@a:4222,nats://u:q@b:4222`) and the nodes of a Redis Cluster.
        c.bus.url = redact_url_list(&c.bus.url);
        c.stores.redis_url = redact_url_list(&c.stores.redis_url);
        c.stores.postgres_url = redact_url_password(&c.stores.postgres_url);
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }

    pub fn consumer_handler_timeout(&self) -> Duration {
        Duration::from_millis(self.consumer.handler_timeout_ms)
    }

    /// The conversation role's settings, its bot call bounded to half the handler timeout: a
    /// bot call the handler timeout cut short would be retried, never taken as the bot down
    /// (`bot_fallback` would not apply).
    pub fn conversation(&self) -> crate::workers::conversation::ConversationConfig {
        let mut c = self.workers.conversation.clone();
        c.bot_timeout_ms = c
            .bot_timeout_ms
            .min(self.consumer.handler_timeout_ms / 2)
            .max(1);
        c
    }

    /// The data directory for embedded stores.
    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.stores.data_dir)
    }
}

/// Layers `(dotted key, text)` settings over `figment`. A value is kept as the text given unless
/// it is a list or a table: parsed as figment's own env provider does, a secret of digits would
/// lose its leading zeros or fail to load as a string (and the load error would print it).
/// Numbers and booleans are read from the text when extracted (`extract_lossy`).
fn with_env(mut figment: Figment, vars: impl Iterator<Item = (String, String)>) -> Figment {
    for (key, raw) in vars {
        let value = match raw.parse::<Value>() {
            Ok(v @ (Value::Array(..) | Value::Dict(..))) => v,
            _ => Value::from(raw),
        };
        figment = figment.merge(Serialized::default(&key, value));
    }
    figment
}

/// The `--config` file is readable TOML. A syntax error is reported by line and column only:
/// the TOML parser's own message quotes the line, which may hold a secret (`admin_token = abc`,
/// the quotes forgotten).
fn check_file(path: &Path) -> Result<(), ConfigError> {
    let shown = path.display();
    if !path.is_file() {
        let why = if path.exists() {
            "is not a file"
        } else {
            "does not exist"
        };
        return Err(ConfigError::Load(format!("file {shown} {why}")));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Load(format!("cannot read file {shown}: {e}")))?;
    let Err(e) = text.parse::<toml::Table>() else {
        return Ok(());
    };
    let at = e.span().map_or(0, |span| span.start).min(text.len());
    let before = text.get(..at).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Err(ConfigError::Load(format!(
        "file {shown}: TOML syntax error at line {line}, column {column}: {}",
        e.message().trim()
    )))
}

/// Keys whose values are secrets (the last segment of the key, or its suffix `_url`: URLs may
/// carry credentials), so a load error names them without quoting the value.
fn is_secret_key(path: &[String]) -> bool {
    let last = path.last().map_or("", String::as_str);
    matches!(
        last,
        "sasl_password"
            | "password"
            | "token"
            | "admin_token"
            | "client_key_secret"
            | "provisioning_key"
            | "credential"
            | "url"
    ) || last.ends_with("_url")
}

/// A figment error as the key at fault (without figment's `default.` profile) and what is
/// wrong, the value left out for a secret's key (figment quotes it: `found signed int
/// `123456789``).
fn load_error(errors: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let messages: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let what = match &e.kind {
                Kind::InvalidType(_, expected) if is_secret_key(&e.path) => {
                    format!("invalid type: expected {expected}")
                }
                Kind::InvalidValue(_, expected) if is_secret_key(&e.path) => {
                    format!("invalid value: expected {expected}")
                }
                kind => kind.to_string(),
            };
            // Only a file is worth naming: the other sources are the built-in defaults and env.
            let file = (e.metadata.as_ref())
                .and_then(|m| m.source.as_ref())
                .and_then(figment::Source::file_path)
                .map(|p| format!(" (in {})", p.display()))
                .unwrap_or_default();
            if e.path.is_empty() {
                format!("{what}{file}")
            } else {
                format!("key `{}`: {what}{file}", e.path.join("."))
            }
        })
        .collect();
    ConfigError::Load(messages.join("; "))
}

const ENV_PREFIX: &str = "NEXUS_";

/// The config settings among environment variables, as `(dotted key, text)`: the `NEXUS_*`
/// ones (prefix in any case), prefix taken off, `__` read as `.`, lower case (figment's
/// `Env::prefixed("NEXUS_").split("__")`, which reads only the process environment).
///
/// NEXUS_CONFIG names the file (a CLI flag's env); NEXUS_TEST_*, NEXUS_BENCH_* and
/// NEXUS_SERVICES_* belong to the test tooling; Kubernetes sets service links for a Service
/// named nexus* (NEXUS_EDGE_SERVICE_HOST=10.0.0.7, ...). Every other NEXUS_* must be a config
/// key, so that a typo is reported as an unknown key rather than silently ignored.
fn env_settings(
    vars: impl IntoIterator<Item = (String, String)>,
) -> impl Iterator<Item = (String, String)> {
    vars.into_iter().filter_map(|(name, value)| {
        let name = name.trim();
        let rest = name
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .and_then(|_| name.get(ENV_PREFIX.len()..))?;
        let key = rest.replace("__", ".").trim().to_ascii_lowercase();
        if key.split('.').any(str::is_empty) {
            return None;
        }
        let tooling = key == "config"
            || ["test_", "bench_", "services_"]
                .iter()
                .any(|p| key.starts_with(p));
        (!tooling && !is_service_link(&key, &value)).then_some((key, value))
    })
}

/// Refuses a `NEXUS_*` variable whose key has an empty part (`NEXUS_HTTP____LISTEN`,
/// `NEXUS_HTTP__LISTEN__`, a templating slip): [`env_settings`] could only leave it out, and
/// the setting it was meant for would silently keep its value.
fn check_env_names(vars: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, _) in vars {
        let name = name.trim();
        let Some(rest) = name
            .get(..ENV_PREFIX.len())
            .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
            .and_then(|_| name.get(ENV_PREFIX.len()..))
        else {
            continue;
        };
        if !rest.trim().is_empty() && rest.replace("__", ".").split('.').any(str::is_empty) {
            return Err(ConfigError::Load(format!(
                "environment variable {name} has an empty key part (`____`, or `__` at an \
                 end): write NEXUS_<SECTION>__<KEY>, e.g. NEXUS_HTTP__LISTEN"
            )));
        }
    }
    Ok(())
}

/// What Kubernetes puts in a service-link variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkValue {
    /// The cluster IP, v4 or v6.
    Ip,
    /// A port number.
    Port,
    /// `<proto>://<ip>:<port>` (IPv6 in brackets).
    Url,
    /// `tcp`, `udp` or `sctp`.
    Proto,
}

impl LinkValue {
    fn fits(self, value: &str) -> bool {
        match self {
            LinkValue::Ip => value.parse::<IpAddr>().is_ok(),
            LinkValue::Port => is_port(value),
            LinkValue::Url => value.split_once("://").is_some_and(|(proto, addr)| {
                LinkValue::Proto.fits(proto) && addr.parse::<SocketAddr>().is_ok()
            }),
            LinkValue::Proto => matches!(value, "tcp" | "udp" | "sctp"),
        }
    }
}

/// A port number as Kubernetes writes it: decimal digits only, 1 to 65535.
fn is_port(value: &str) -> bool {
    !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_digit())
        && value.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Whether `key` (lower case, the `NEXUS_` prefix taken off) and `value` are a variable
/// Kubernetes sets for a Service. Config keys never have the name's shape (every top-level key
/// is a table, set with `__`), but a typo can: `NEXUS_HTTP_PORT=8080` (for `NEXUS_HTTP__PORT`)
/// is named like `<svc>_PORT`, so the value must have the shape Kubernetes gives it too.
fn is_service_link(key: &str, value: &str) -> bool {
    link_values(key).into_iter().any(|kind| kind.fits(value))
}

/// The values Kubernetes may give a variable named `key`: `<svc>_SERVICE_HOST` (IP),
/// `<svc>_SERVICE_PORT[_<name>]` (port), `<svc>_PORT` (URL), `<svc>_PORT_<n>_<proto>` (URL) and
/// its `_PROTO`, `_PORT`, `_ADDR` companions. A Service name may itself contain `port` or
/// `service`, so a name can have several readings: all of them are returned.
fn link_values(key: &str) -> Vec<LinkValue> {
    let mut kinds = Vec::new();
    if key.contains('.') || key.contains("__") {
        return kinds;
    }
    let parts: Vec<&str> = key.split('_').collect();
    let n = parts.len();
    if parts.last() == Some(&"port") && (n == 1 || parts[n - 2] != "service") {
        kinds.push(LinkValue::Url);
    }
    if n >= 2 && parts[n - 2..] == ["service", "host"] {
        kinds.push(LinkValue::Ip);
    }
    if parts.windows(2).any(|w| w == ["service", "port"]) {
        kinds.push(LinkValue::Port);
    }
    // `port_<n>_<proto>` and its companions.
    for (i, w) in parts.windows(3).enumerate() {
        let port_proto = w[0] == "port"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "tcp" | "udp" | "sctp");
        if !port_proto {
            continue;
        }
        match &parts[i + 3..] {
            [] => kinds.push(LinkValue::Url),
            ["proto"] => kinds.push(LinkValue::Proto),
            ["port"] => kinds.push(LinkValue::Port),
            ["addr"] => kinds.push(LinkValue::Ip),
            _ => {}
        }
    }
    kinds
}

/// The cluster client takes TLS, user and password from the first node for every node, and
/// uses database 0: nodes that differ would be reached otherwise than written.
fn check_cluster_nodes(nodes: &[&str]) -> Result<(), String> {
    let mut first = None;
    for node in nodes {
        let u = reqwest::Url::parse(node).map_err(|e| format!("not a valid URL: {e}"))?;
        if !matches!(u.path(), "" | "/" | "/0") {
            return Err(
                "a cluster has database 0 only: give no database in its nodes' URLs".into(),
            );
        }
        let how = (
            u.scheme().to_string(),
            u.username().to_string(),
            u.password().map(str::to_string),
        );
        match &first {
            None => first = Some(how),
            Some(f) if *f != how => {
                return Err(
                    "every node of a cluster needs the same scheme (redis:// or rediss://), user \
                     and password"
                        .into(),
                )
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Which other origins' pages may call the customer and agent APIs (`http.cors_allowed_origins`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    /// Only the edge's own pages (no CORS headers).
    None,
    /// Any page (`*`).
    Any,
    /// These origins, as browsers send them in `Origin` (lower-case scheme and host, no
    /// default port, no trailing slash).
    List(Vec<String>),
}

/// `http.cors_allowed_origins` checked and written as browsers send origins, so an entry with
/// a trailing slash, capitals or a default port still matches; a path, query or user is refused
/// (an origin has none, so such an entry would never match).
pub fn cors_origins(entries: &[String]) -> Result<CorsOrigins, String> {
    if entries.is_empty() {
        return Ok(CorsOrigins::None);
    }
    if entries.iter().any(|e| e == "*") {
        return if entries.len() == 1 {
            Ok(CorsOrigins::Any)
        } else {
            Err("`*` allows every origin: give it alone".into())
        };
    }
    let mut origins = Vec::with_capacity(entries.len());
    for entry in entries {
        let shown: String = entry.chars().take(64).collect();
        let url = reqwest::Url::parse(entry)
            .map_err(|e| format!("`{shown}` is not an origin (scheme://host[:port]): {e}"))?;
        let bare = matches!(url.path(), "" | "/")
            && url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.password().is_none();
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() || !bare {
            return Err(format!(
                "`{shown}` is not an origin: write scheme://host[:port] (http or https), \
                 without path, query or user"
            ));
        }
        let origin = url.origin().ascii_serialization();
        if !origins.contains(&origin) {
            origins.push(origin);
        }
    }
    Ok(CorsOrigins::List(origins))
}

/// The longest `stores.redis_replica_wait_ms`.
const MAX_REPLICA_WAIT_MS: u64 = 4_000;

/// The node URLs of a Redis Cluster's `stores.redis_url`: comma-separated, blanks ignored.
pub(crate) fn redis_nodes(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect()
}

/// `bus.url` parses. The bus's message quotes the part at fault as written, so a password
/// beside it (after a comma in a NATS password, a Kafka broker written `user:pass@host`) would
/// be printed: the message is made from the URL with its passwords redacted.
fn check_bus_url(url: &str) -> Result<(), ConfigError> {
    if BusUrl::parse(url).is_ok() {
        return Ok(());
    }
    let shown = redact_url_list(url);
    let message = match BusUrl::parse(&shown) {
        Err(e) => e.to_string(),
        Ok(_) => format!("`{shown}` is not a valid bus URL"),
    };
    Err(invalid("bus.url", message))
}

/// [`redact_url_password`] over a comma-separated list of servers, each of which may carry
/// its own user info (`nats://u:p@a:4222,nats://u:q@b:4222`, `kafka://a:9092,u:p@b:9092`,
/// Redis Cluster nodes). The whole is redacted first, so a single URL whose password holds a
/// comma is hidden whole, then each server.
pub(crate) fn redact_url_list(url: &str) -> String {
    let whole = redact_url_password(url);
    let scheme = whole.split_once("://").map_or("", |(s, _)| s);
    let servers: Vec<String> = whole
        .split(',')
        .enumerate()
        .map(|(i, server)| {
            if i == 0 || server.contains("://") {
                return redact_url_password(server);
            }
            // A bare `user:pass@host:port` after the first: redacted as a URL of the list's scheme.
            let prefix = format!("{scheme}://");
            let shown = redact_url_password(&format!("{prefix}{server}"));
            shown.strip_prefix(&prefix).unwrap_or(&shown).to_string()
        })
        .collect();
    servers.join(",")
}

/// Replaces the password of `scheme://user:password@host` URLs, and the value of a query
/// parameter that carries one (`?password=`, as PostgreSQL and Redis URLs accept). Where the
/// user info ends is ambiguous in a URL written unencoded (a password may hold `?`, `/` or `@`,
/// a query `@`), so every reading is redacted: the query as if the first `?` began it, both
/// before and after the user info goes. It errs on the side of hiding too much.
pub(crate) fn redact_url_password(url: &str) -> String {
    redact_query_password(&redact_userinfo(&redact_query_password(url)))
}

/// The user info ends at the last `@` before the path or the query, whichever starts later.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = |c: char| rest.find(c).unwrap_or(rest.len());
    let scope = &rest[..end('/').max(end('?'))];
    let Some((userinfo, _)) = scope.rsplit_once('@') else {
        return url.to_string();
    };
    let after = &rest[userinfo.len()..];
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:{REDACTED}{after}"),
        None => format!("{scheme}://{REDACTED}{after}"),
    }
}

/// Masks the values of the query parameters that carry a password, the query taken to start
/// at the first `?`.
fn redact_query_password(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let params: Vec<String> = query
        .split('&')
        .map(|param| match param.split_once('=') {
            Some((k, v))
                if !v.is_empty()
                    && matches!(
                        k.to_ascii_lowercase().as_str(),
                        "password" | "pass" | "passwd" | "sslpassword" | "token"
                    ) =>
            {
                format!("{k}={REDACTED}")
            }
            _ => param.to_string(),
        })
        .collect();
    format!("{base}?{}", params.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert!(c.bus.url.starts_with("embedded://"));
    }

    /// The conversation role's bot calls wait at most half the handler timeout, so a slow bot
    /// is a bot down (its fallback applies), not a handler timeout retried in place.
    #[test]
    fn bot_calls_end_before_the_handler_timeout() {
        let mut c = Config::defaults();
        c.workers.conversation.bot_timeout_ms = 5_000;
        c.consumer.handler_timeout_ms = 4_000;
        assert_eq!(c.conversation().bot_timeout_ms, 2_000);
        c.consumer.handler_timeout_ms = 30_000;
        assert_eq!(c.conversation().bot_timeout_ms, 5_000);
    }

    #[test]
    fn cors_origins_are_written_as_browsers_send_them() {
        let list = |v: &[&str]| cors_origins(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(list(&[]), Ok(CorsOrigins::None));
        assert_eq!(list(&["*"]), Ok(CorsOrigins::Any));
        assert_eq!(
            list(&[
                "https://Shop.Example.com/",
                "https://shop.example.com:443",
                "http://localhost:3000"
            ]),
            Ok(CorsOrigins::List(vec![
                "https://shop.example.com".into(),
                "http://localhost:3000".into()
            ]))
        );
        for bad in [
            &["*", "https://a.example"][..],
            &["https://a.example/widget"],
            &["https://a.example?x=1"],
            &["https://user@a.example"],
            &["ftp://a.example"],
            &["a.example"],
            &["null"],
        ] {
            assert!(list(bad).is_err(), "{bad:?} must be refused");
        }
        // From the environment, as a list; refused naming the key.
        let env = |v: &str| {
            Config::load_with_env(
                None,
                [(
                    "NEXUS_HTTP__CORS_ALLOWED_ORIGINS".to_string(),
                    v.to_string(),
                )],
            )
        };
        let c = env(r#"["https://a.example", "https://b.example"]"#).expect("a list from env");
        assert_eq!(
            c.http.cors_allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        let e = env(r#"["https://a.example/path"]"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("http.cors_allowed_origins"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut c = Config::defaults();
        c.bus.url = "carrier-pigeon://x:1".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("bus.url"), "{e}");

        // Values that load and then misbehave: refused, naming the key.
        // A file that is not what its key wants: refused at load, naming the key.
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = write("cert.pem", &made.cert.pem());
        let key = write("key.pem", &made.key_pair.serialize_pem());
        let junk = write("junk.pem", "hello");
        let mut c = Config::defaults();
        (c.http.tls_cert_file, c.http.tls_key_file) = (cert.clone(), key.clone());
        c.validate().expect("a certificate and its key");
        for (want, cert_file, key_file) in [
            ("http.tls_cert_file", &junk, &key),
            ("http.tls_cert_file", &key, &key),
            ("http.tls_key_file", &cert, &cert),
            ("http.tls_key_file", &cert, &junk),
        ] {
            let mut c = Config::defaults();
            (c.http.tls_cert_file, c.http.tls_key_file) = (cert_file.clone(), key_file.clone());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
        let mut c = Config::defaults();
        c.bus.ca_file = junk.clone();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bus.ca_file"));
        let mut c = Config::defaults();
        c.stores.redis_url = "rediss://r1:6380".into();
        c.stores.redis_ca_file = cert.clone();
        c.validate().expect("a CA bundle for rediss://");
        c.stores.redis_url = String::new();
        c.validate()
            .expect("unused without Redis: one config for every pod");
        for (url, ca) in [("rediss://r1:6380", &junk), ("redis://r1:6379", &cert)] {
            let mut c = Config::defaults();
            (c.stores.redis_url, c.stores.redis_ca_file) = (url.into(), ca.clone());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("stores.redis_ca_file"), "{url}: {e}");
        }

        type Set = fn(&mut Config);
        let mut c = Config::defaults();
        c.stores.redis_cluster = true;
        c.stores.redis_url = "rediss://:pw@r1:7000, rediss://:pw@r2:7000/0".into();
        c.validate().expect("a cluster's nodes");
        let cases: [(&str, Set); 17] = [
            ("stores.redis_url", |c| {
                c.stores.redis_cluster = true;
                c.stores.redis_url = "redis://r1:7000,rediss://:s3cret@r2:7000".into()
            }),
            ("stores.redis_url", |c| {
                c.stores.redis_cluster = true;
                c.stores.redis_url = "redis://:s3cret@r1:7000/2".into()
            }),
            ("stores.redis_url", |c| {
                c.stores.redis_cluster = true;
                c.stores.redis_url = "redis://r1:7000,http://:s3cret@r2".into()
            }),
            ("stores.redis_url", |c| {
                c.stores.redis_cluster = true;
                c.stores.redis_url = " , ".into()
            }),
            ("workers.conversation.requeue_interval_ms", |c| {
                c.workers.conversation.requeue_interval_ms = 0
            }),
            ("stores.redis_url", |c| {
                c.stores.redis_url = "redis://:s3cret@bad host:6379".into()
            }),
            ("stores.postgres_url", |c| {
                c.stores.postgres_url = "postgres://u:s3cret@db:notaport/n".into()
            }),
            ("consumer.handler_timeout_ms", |c| {
                c.consumer.handler_timeout_ms = 0
            }),
            ("bus.kafka.handover_wait_ms", |c| {
                c.bus.url = "kafka://127.0.0.1:9092".into();
                c.bus.kafka.handover_wait_ms = 1000;
            }),
            ("bus.kafka.handover_wait_ms", |c| {
                c.bus.url = "kafka://127.0.0.1:9092".into();
                c.bus.kafka.handover_wait_ms = 82_800_001;
            }),
            ("bus.embedded.handover_wait_ms", |c| {
                c.consumer.handler_timeout_ms = 60_000;
            }),
            ("bus.nats.ack_wait_ms", |c| {
                c.bus.url = "nats://127.0.0.1:4222".into();
                c.consumer.handler_timeout_ms = 61_000;
            }),
            ("bus.nats.ack_wait_ms", |c| {
                c.bus.url = "tls://127.0.0.1:4222".into();
                c.consumer.handler_timeout_ms = 61_000;
            }),
            ("bus.kafka.message_timeout_ms", |c| {
                c.bus.kafka.message_timeout_ms = 0
            }),
            ("workers.conversation.bot_timeout_ms", |c| {
                c.workers.conversation.bot_timeout_ms = 0
            }),
            ("workers.conversation.bot_retry_max_s", |c| {
                c.workers.conversation.bot_retry_max_s = 0
            }),
            ("workers.tap.url", |c| {
                c.workers.tap.url = "ftp://u:s3cret@x/in".into()
            }),
        ];
        for (key, set) in cases {
            let mut c = Config::defaults();
            set(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key) && !e.contains("s3cret"), "{key}: {e}");
        }

        let mut c = Config::defaults();
        c.bus.nats.lease_ttl_ms = c.bus.nats.ack_wait_ms;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bus.nats.lease_ttl_ms"));

        let mut c = Config::defaults();
        c.chat.file_retention_s = c.workers.conversation.closed_retention_s + 1;
        assert_eq!(
            c.file_retention_s(),
            c.workers.conversation.closed_retention_s,
            "files are kept no longer than the transcript that names them"
        );

        let mut c = Config::defaults();
        c.bus.nats.partitions_refresh_ms = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bus.nats.partitions_refresh_ms"));

        let mut c = Config::defaults();
        c.stores.provisioning_key = "too-short".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("stores.provisioning_key"));

        let mut c = Config::defaults();
        c.stores.postgres_url = "postgres://db/nexus".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("stores.provisioning_key"));

        for ns in ["", "a{b}", "with space", &"n".repeat(65)] {
            let mut c = Config::defaults();
            c.stores.redis_namespace = ns.to_string();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("stores.redis_namespace"), "{ns:?}: {e}");
        }
        let mut c = Config::defaults();
        c.stores.redis_namespace = "prod-eu.1".into();
        c.validate().expect("a valid namespace");

        // A replica wait needs a wait the store's response timeout leaves room for.
        let mut c = Config::defaults();
        c.stores.redis_min_replicas = 1;
        c.validate().expect("one replica, the default wait");
        for ms in [0, MAX_REPLICA_WAIT_MS + 1] {
            c.stores.redis_replica_wait_ms = ms;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("stores.redis_replica_wait_ms"), "{ms}: {e}");
        }
        c.stores.redis_min_replicas = 0;
        c.validate().expect("no wait: its timeout is not used");

        // A peer call that cannot finish within a try (the 30 s handler timeout, with UCS's
        // 2 s address check after it; for GWS, all the calls of a try: see
        // `gws_timeouts_leave_room_for_every_call_of_a_try`), or one with no time at all.
        for (ucs_ms, tenant_ms, ok) in [
            (0, 0, false),
            (30_000, 0, false),
            (10_000, 31_000, false),
            (10_000, 28_000, false),
            (10_000, 27_999, true),
        ] {
            let mut c = Config::defaults();
            c.workers.history.ucs.url = "http://ucs.example.com".into();
            c.workers.history.ucs.timeout_ms = ucs_ms;
            c.workers.history.ucs.tenants.insert(
                "t1".into(),
                crate::workers::peer::PeerTarget {
                    url: "http://ucs-t1.example.com".into(),
                    credential: String::new(),
                    timeout_ms: tenant_ms,
                },
            );
            match c.validate() {
                Ok(()) => assert!(ok, "{ucs_ms}/{tenant_ms} passed"),
                Err(e) => {
                    assert!(!ok, "{ucs_ms}/{tenant_ms}: {e}");
                    assert!(e.to_string().contains("workers.history.ucs"), "{e}");
                }
            }
        }
        let mut c = Config::defaults();
        c.workers.gws.url = "http://gws.example.com".into();
        c.workers.gws.timeout_ms = 15_000;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("workers.gws.timeout_ms"));

        let mut c = Config::defaults();
        c.workers.gws.url = "gws.example.com".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("workers.gws.url"));

        for kbytes in [0, 2_097_152] {
            let mut c = Config::defaults();
            c.bus.kafka.prefetch_kbytes = kbytes;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("bus.kafka.prefetch_kbytes"), "{kbytes}: {e}");
        }

        // A chat must close before the history worker would take it as abandoned (30 days).
        let mut c = Config::defaults();
        c.workers.conversation.idle_timeout_s = 29 * 86_400;
        c.workers.conversation.close_grace_s = 86_400;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("workers.conversation.idle_timeout_s"), "{e}");
        c.workers.conversation.close_grace_s = 86_399;
        c.validate().expect("just under 30 days");
        c.workers.conversation.abandon_timeout_s = u64::MAX;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("workers.conversation.abandon_timeout_s"), "{e}");

        // The transcript's settle wait: 10 s by default, 10 minutes at most.
        let mut c = Config::defaults();
        assert_eq!(c.workers.history.transcript_settle_ms, 10_000);
        c.workers.history.transcript_settle_ms = 600_001;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("workers.history.transcript_settle_ms"), "{e}");
        c.workers.history.transcript_settle_ms = 600_000;
        c.validate().expect("10 minutes");

        let mut c = Config::defaults();
        c.http.listen = "nowhere".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("http.listen"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let figment = Figment::from(Toml::string(DEFAULT_CONFIG))
            .merge(Toml::string("[bus]\nurll = \"x\"\n"));
        let e = Config::from_figment(figment).unwrap_err().to_string();
        assert!(e.contains("urll"), "{e}");
    }

    #[test]
    fn env_values_are_text_unless_lists() {
        let vars = [
            ("http.admin_token", "0123456789"),
            ("bus.nats.token", "[not-a-list"),
            ("chat.client_key_secret", "true"),
            ("consumer.concurrency", "7"),
            ("workers.webhooks.retry_schedule_ms", "[0, 300, 600]"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let figment = with_env(
            Figment::from(Toml::string(DEFAULT_CONFIG)),
            vars.into_iter(),
        );
        let c = Config::from_figment(figment).expect("loads");
        assert_eq!(c.http.admin_token, "0123456789");
        assert_eq!(c.bus.nats.token, "[not-a-list");
        assert_eq!(c.chat.client_key_secret, "true");
        assert_eq!(c.consumer.concurrency, 7);
        assert_eq!(c.workers.webhooks.retry_schedule_ms, vec![0, 300, 600]);
    }

    /// The variables Kubernetes sets for Services `nexus` and `nexus-edge` (cluster IPs
    /// 10.0.0.7 and fd00::7, ports 8080 `http` and 9090/UDP), without the `NEXUS_` prefix.
    const SERVICE_LINKS: [(&str, &str); 13] = [
        ("service_host", "10.0.0.7"),
        ("service_port", "8080"),
        ("port", "tcp://10.0.0.7:8080"),
        ("edge_service_host", "fd00::7"),
        ("edge_service_port", "8080"),
        ("edge_service_port_http", "8080"),
        ("edge_port", "tcp://[fd00::7]:8080"),
        ("edge_port_8080_tcp", "tcp://[fd00::7]:8080"),
        ("edge_port_8080_tcp_proto", "tcp"),
        ("edge_port_8080_tcp_port", "8080"),
        ("edge_port_8080_tcp_addr", "fd00::7"),
        ("edge_port_9090_udp", "udp://[fd00::7]:9090"),
        ("edge_port_9090_udp_proto", "udp"),
    ];

    #[test]
    fn kubernetes_service_links_are_not_config_keys() {
        for (k, v) in SERVICE_LINKS {
            assert!(is_service_link(k, v), "{k}={v}");
        }
        // A link's name with a value Kubernetes would not give it: an operator's typo.
        for (k, v) in [
            ("port", "8080"),
            ("http_port", "8080"),
            ("edge_service_host", "edge.example"),
            ("edge_service_port", "http"),
            ("edge_service_port", "0"),
            ("edge_service_port_http", "+8080"),
            ("edge_port", "10.0.0.7:8080"),
            ("edge_port", "http://10.0.0.7:8080"),
            ("edge_port", "tcp://edge:8080"),
            ("edge_port_8080_tcp", "tcp://10.0.0.7"),
            ("edge_port_8080_tcp_proto", "TCP"),
            ("edge_port_8080_tcp_port", "65536"),
            ("edge_port_8080_tcp_addr", "10.0.0.256"),
        ] {
            assert!(!is_service_link(k, v), "{k}={v}");
        }
        // Not a link's name, whatever the value.
        for (k, v) in [
            ("http.listen", "10.0.0.7"),
            ("http__port", "8080"),
            ("bus", "tcp://10.0.0.7:8080"),
            ("edge", "10.0.0.7"),
            ("edge_port_x_tcp", "tcp://10.0.0.7:8080"),
            ("edge_port_8080_tcp_other", "tcp"),
            ("consumer.concurency", "8080"),
        ] {
            assert!(!is_service_link(k, v), "{k}={v}");
        }
    }

    #[test]
    fn env_variables_load_and_others_are_left_out() {
        let vars = SERVICE_LINKS
            .iter()
            .map(|(k, v)| (format!("NEXUS_{}", k.to_ascii_uppercase()), v.to_string()))
            .chain(
                [
                    ("NEXUS_HTTP__LISTEN", "0.0.0.0:9000"),
                    ("nexus_consumer__concurrency", "3"),
                    ("NEXUS_CONFIG", "/etc/nexus/config.toml"),
                    ("NEXUS_TEST_BUS", "nats"),
                    ("NEXUS_SERVICES_PG", "postgres://x"),
                    ("NEXUS_", "x"),
                    ("HTTP__LISTEN", "nowhere"),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            );
        let c = Config::load_with_env(None, vars).expect("loads");
        assert_eq!(c.http.listen, "0.0.0.0:9000");
        assert_eq!(c.consumer.concurrency, 3);
    }

    /// A variable whose key has an empty part is refused naming it, not left out while the
    /// setting it meant keeps its value.
    #[test]
    fn env_variables_with_an_empty_key_part_are_refused() {
        for name in ["NEXUS_HTTP____LISTEN", "NEXUS_HTTP__LISTEN__"] {
            let vars = [(name.to_string(), "0.0.0.0:9000".to_string())];
            let err = Config::load_with_env(None, vars).expect_err(name);
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }

    /// Kafka security settings the client would drop without a word are refused naming the
    /// key: TLS files on a plaintext `kafka://` URL, SASL credentials without a mechanism (the
    /// chart sets only the password from its Secret). Other buses never read them.
    #[test]
    fn kafka_security_settings_the_client_would_drop_are_refused() {
        let load = |vars: &[(&str, &str)]| {
            Config::load_with_env(
                None,
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        for (vars, key, why) in [
            (
                &[
                    ("NEXUS_BUS__URL", "kafka://k:9092"),
                    ("NEXUS_BUS__CA_FILE", "/ca.pem"),
                ][..],
                "bus.ca_file",
                "TLS only",
            ),
            (
                &[
                    ("NEXUS_BUS__URL", "kafka://k:9092"),
                    ("NEXUS_BUS__CLIENT_CERT_FILE", "/c.pem"),
                    ("NEXUS_BUS__CLIENT_KEY_FILE", "/k.pem"),
                ][..],
                "bus.client_cert_file",
                "TLS only",
            ),
            (
                &[
                    ("NEXUS_BUS__URL", "kafka+ssl://k:9093"),
                    ("NEXUS_BUS__KAFKA__SASL_PASSWORD", "p"),
                ][..],
                "bus.kafka.sasl_mechanism",
                "without SASL",
            ),
        ] {
            // Not `expect_err`: its message would print the loaded config.
            let Err(err) = load(vars) else {
                panic!("{key}: accepted");
            };
            let err = err.to_string();
            assert!(err.contains(key) && err.contains(why), "{key}: {err}");
        }
        load(&[
            ("NEXUS_BUS__URL", "kafka+ssl://k:9093"),
            ("NEXUS_BUS__CA_FILE", ""),
            ("NEXUS_BUS__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("NEXUS_BUS__KAFKA__SASL_USERNAME", "u"),
            ("NEXUS_BUS__KAFKA__SASL_PASSWORD", "p"),
        ])
        .expect("SASL with its mechanism");
        load(&[
            ("NEXUS_BUS__URL", "nats://n:4222"),
            ("NEXUS_BUS__KAFKA__SASL_PASSWORD", "p"),
        ])
        .expect("Kafka settings on another bus are not read");
    }

    /// `Debug` of the config (a `?config` in a log line, a failed assertion) shows no secret:
    /// before, every section derived it and printed tokens, keys and URL passwords whole.
    #[test]
    fn debug_shows_no_secret() {
        let secrets = [
            (
                "NEXUS_BUS__URL",
                "nats://nuser:natsurlpw@n:4222",
                "natsurlpw",
            ),
            ("NEXUS_BUS__NATS__PASSWORD", "natspw1", "natspw1"),
            ("NEXUS_BUS__NATS__TOKEN", "natstok1", "natstok1"),
            ("NEXUS_BUS__KAFKA__SASL_PASSWORD", "saslpw1", "saslpw1"),
            ("NEXUS_HTTP__ADMIN_TOKEN", "admintok1", "admintok1"),
            (
                "NEXUS_CHAT__CLIENT_KEY_SECRET",
                "ckeysecret1",
                "ckeysecret1",
            ),
            (
                "NEXUS_STORES__PROVISIONING_KEY",
                "00".repeat(32).leak(),
                "0000000000000000",
            ),
            (
                "NEXUS_STORES__POSTGRES_URL",
                "postgres://u:pgpw1@db/n",
                "pgpw1",
            ),
            (
                "NEXUS_STORES__REDIS_URL",
                "redis://:redispw1@r:6379",
                "redispw1",
            ),
            (
                "NEXUS_WORKERS__TAP__URL",
                "https://tap.example/in?api_key=tapkey1",
                "tapkey1",
            ),
            ("NEXUS_WORKERS__GWS__CREDENTIAL", "gwscred1", "gwscred1"),
        ];
        let vars = secrets
            .iter()
            .map(|(k, v, _)| (k.to_string(), v.to_string()))
            .chain([(
                "NEXUS_WORKERS__GWS__URL".to_string(),
                "https://gws.example".to_string(),
            )]);
        let Ok(c) = Config::load_with_env(None, vars) else {
            panic!("the config loads");
        };
        let shown = format!("{c:?}");
        for (key, _, secret) in secrets {
            assert!(!shown.contains(secret), "{key} shown by Debug");
        }
        assert!(
            shown.contains("nats://nuser:"),
            "the rest is shown: {shown}"
        );
    }

    /// An admin token beyond ASCII cannot come in an Authorization header that is read as
    /// text: refused at load, not a 401 on every call.
    #[test]
    fn an_admin_token_beyond_ascii_is_refused() {
        let vars = [(
            "NEXUS_HTTP__ADMIN_TOKEN".to_string(),
            "pässwörd".to_string(),
        )];
        let err = Config::load_with_env(None, vars).expect_err("refused");
        assert!(err.to_string().contains("http.admin_token"), "{err}");
    }

    /// A GWS try may make two calls and two identity checks (`GET /api/v2/me`) one after
    /// another: all of them must fit in the handler timeout, or a try that takes them is cut
    /// short (not counted) on every try. Before, only two calls were counted: `timeout_ms`
    /// under half the handler timeout passed.
    #[test]
    fn gws_timeouts_leave_room_for_every_call_of_a_try() {
        let load = |timeout: &str, identity: Option<&str>| {
            let mut vars = vec![
                ("NEXUS_WORKERS__GWS__URL", "http://gws.example.com"),
                ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "30000"),
                ("NEXUS_WORKERS__GWS__TIMEOUT_MS", timeout),
            ];
            if let Some(identity) = identity {
                vars.push(("NEXUS_WORKERS__GWS__IDENTITY_TIMEOUT_MS", identity));
            }
            Config::load_with_env(
                None,
                vars.into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        // 2 × (12 s + the default 2 s check) fits in 30 s; 2 × (13 s + 2 s) does not, though
        // 13 s is under half of it.
        load("12000", None).expect("fits");
        let e = load("13000", None).unwrap_err().to_string();
        assert!(
            e.contains("workers.gws.timeout_ms") && e.contains("workers.gws.identity_timeout_ms"),
            "{e}"
        );
        // A shorter check leaves the calls more: 2 × (14.5 s + 0.4 s).
        load("14500", Some("400")).expect("fits");
        let e = load("1000", Some("0")).unwrap_err().to_string();
        assert!(e.contains("workers.gws.identity_timeout_ms"), "{e}");
    }

    /// A UCS step may make its call and then, after a 404, IdentifyContact again (is UCS at
    /// that address?): both must fit in the handler timeout, or a step that takes them is cut
    /// short (not counted) on every try. Before, only the call was counted.
    #[test]
    fn ucs_timeouts_leave_room_for_the_address_check() {
        let load = |timeout: &str, check: Option<&str>| {
            let mut vars = vec![
                ("NEXUS_WORKERS__HISTORY__UCS__URL", "http://ucs.example.com"),
                ("NEXUS_CONSUMER__HANDLER_TIMEOUT_MS", "30000"),
                ("NEXUS_WORKERS__HISTORY__UCS__TIMEOUT_MS", timeout),
            ];
            if let Some(check) = check {
                vars.push(("NEXUS_WORKERS__HISTORY__UCS__IDENTITY_TIMEOUT_MS", check));
            }
            Config::load_with_env(
                None,
                vars.into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())),
            )
        };
        // 27.9 s + the default 2 s check fits in 30 s; 28.5 s + 2 s does not, though 28.5 s
        // alone is under it.
        load("27900", None).expect("fits");
        let e = load("28500", None).unwrap_err().to_string();
        assert!(
            e.contains("workers.history.ucs.timeout_ms")
                && e.contains("workers.history.ucs.identity_timeout_ms"),
            "{e}"
        );
        load("28500", Some("1000")).expect("a shorter check fits");
        let e = load("1000", Some("0")).unwrap_err().to_string();
        assert!(e.contains("workers.history.ucs.identity_timeout_ms"), "{e}");
    }

    /// An admin token no header can carry is refused at load, naming the key and not the
    /// token; it made every admin call answer 401.
    #[test]
    fn an_admin_token_with_a_newline_is_refused() {
        for token in ["s3cret-token\n", " s3cret-token", "s3cret\u{7}token"] {
            let vars = [("NEXUS_HTTP__ADMIN_TOKEN".to_string(), token.to_string())];
            let e = Config::load_with_env(None, vars).unwrap_err().to_string();
            assert!(e.contains("http.admin_token"), "{e}");
            assert!(!e.contains("s3cret"), "the token is not quoted: {e}");
        }
        let vars = [(
            "NEXUS_HTTP__ADMIN_TOKEN".to_string(),
            "s3cret-token".to_string(),
        )];
        Config::load_with_env(None, vars).expect("a plain token loads");
    }

    #[test]
    fn a_typo_shaped_like_a_service_link_is_an_unknown_key() {
        let vars = [("NEXUS_HTTP_PORT".to_string(), "8080".to_string())];
        let e = Config::load_with_env(None, vars).unwrap_err().to_string();
        assert!(e.contains("http_port"), "{e}");
    }

    /// A `--config` path that is a directory was read as an empty file: the defaults ran, and
    /// `nexus config check` said "config ok".
    #[test]
    fn a_config_path_that_is_no_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Config::load_with_env(Some(dir.path()), Vec::new())
            .expect_err("a directory is no config file")
            .to_string();
        assert!(e.contains("is not a file"), "{e}");
        let missing = dir.path().join("missing.toml");
        let e = Config::load_with_env(Some(&missing), Vec::new())
            .expect_err("no such file")
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    /// Load errors name the key but never quote a secret's value (a token of digits written
    /// without quotes, a syntax error on a secret's line).
    #[test]
    fn load_errors_do_not_quote_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, key) in [
            (
                "[http]\nadmin_token = 4242424242\n",
                Some("http.admin_token"),
            ),
            (
                "[workers.gws.tenants.t1]\ncredential = 4242424242\n",
                Some("workers.gws.tenants.t1.credential"),
            ),
            (
                "[stores]\nredis_url = [\"redis://:4242424242@r:6379\"]\n",
                Some("stores.redis_url"),
            ),
            ("[http]\nadmin_token = 4242424242abc\n", None),
            ("[bus.kafka]\nsasl_password = \"4242424242\n", None),
        ] {
            let path = dir.path().join("nexus.toml");
            std::fs::write(&path, text).expect("write");
            let e = Config::load_with_env(Some(&path), Vec::new())
                .expect_err(text)
                .to_string();
            assert!(!e.contains("4242424242"), "{text}: {e}");
            match key {
                Some(key) => assert!(e.contains(&format!("`{key}`")), "{text}: {e}"),
                None => assert!(e.contains("line 2"), "{text}: {e}"),
            }
        }
        // A non-secret value is still quoted, with its key.
        let vars = [(
            "NEXUS_CONSUMER__CONCURRENCY".to_string(),
            "lots".to_string(),
        )];
        let e = Config::load_with_env(None, vars).unwrap_err().to_string();
        assert!(
            e.contains("`consumer.concurrency`") && e.contains("lots"),
            "{e}"
        );
    }

    /// Every server of a list carries its own user info: each one's password is hidden, by
    /// `config check` and in the error of a URL that does not parse.
    #[test]
    fn secrets_in_server_lists_are_redacted() {
        let mut c = Config::defaults();
        c.bus.url = "nats://u:f1rst@n1:4222,nats://v:s3cond@n2:4222".into();
        c.validate().expect("two NATS servers");
        let out = c.redacted_toml();
        assert!(!out.contains("f1rst") && !out.contains("s3cond"), "{out}");
        c.stores.redis_cluster = true;
        for (nodes, secrets) in [
            // Not a list: one password with a comma.
            ("redis://:pa,ss@r1:7000", &["pa,ss", "\"redis://:pa"][..]),
            // A database in the first node's URL ends its user info early.
            (
                "redis://:f1rst@r1:7000/0,redis://:s3cond@r2:7000",
                &["f1rst", "s3cond"],
            ),
        ] {
            c.stores.redis_url = nodes.into();
            let out = c.redacted_toml();
            assert!(secrets.iter().all(|s| !out.contains(s)), "{nodes}: {out}");
        }
        for url in [
            "kafka://k1:9092,u:s3cond@k2",
            "nats://u:f1rst,s3cond@n1:4222",
            "nats://u:f1rst@n1:4222,nats://v:s3cond@n2",
        ] {
            let mut c = Config::defaults();
            c.bus.url = url.into();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("bus.url"), "{url}: {e}");
            assert!(!e.contains("f1rst") && !e.contains("s3cond"), "{url}: {e}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let mut c = Config::defaults();
        c.http.admin_token = "hunter2".into();
        c.stores.redis_url = "rediss://user:s3cret@redis:6380".into();
        // A single node's password may hold a comma.
        let mut single = c.clone();
        single.stores.redis_url = "redis://:pa,ss@h:6379".into();
        assert!(!single.redacted_toml().contains("pa,ss"));
        let mut cluster = c.clone();
        cluster.stores.redis_cluster = true;
        cluster.stores.redis_url = "redis://:n0de1@r1:7000, redis://:n0de2@r2:7000".into();
        let out = cluster.redacted_toml();
        assert!(!out.contains("n0de1") && !out.contains("n0de2"), "{out}");
        c.bus.kafka.sasl_password = "kpass".into();
        c.workers.gws.credential = "gws-global-secret".into();
        c.workers.gws.tenants.insert(
            "t1".into(),
            crate::workers::peer::PeerTarget {
                url: "http://gws".into(),
                credential: "gws-tenant-secret".into(),
                timeout_ms: 0,
            },
        );
        c.stores.provisioning_key =
            "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into();
        let out = c.redacted_toml();
        assert!(
            !out.contains("hunter2")
                && !out.contains("s3cret")
                && !out.contains("kpass")
                && !out.contains("0011223344")
                && !out.contains("gws-global-secret")
                && !out.contains("gws-tenant-secret"),
            "{out}"
        );
        assert!(out.contains("rediss://user:<redacted>@redis:6380"));
        // Credentials written into peer URLs.
        c.workers.tap.url = "https://tap:t4psecret@tap.example/in".into();
        c.workers.history.ucs.url = "https://ucs.example/?token=uc5secret".into();
        c.workers.gws.tenants.get_mut("t1").expect("t1").url = "http://u:gw5secret@gws".into();
        let out = c.redacted_toml();
        for s in ["t4psecret", "uc5secret", "gw5secret"] {
            assert!(!out.contains(s), "{s}: {out}");
        }
        // Keys in any query parameter of an HTTP receiver's URL.
        c.workers.tap.url = "https://tap.example/in?api_key=t4pkey&code=t4pcode".into();
        c.workers.history.ucs.url = "https://ucs.example/?apikey=uc5key".into();
        let out = c.redacted_toml();
        for s in ["t4pkey", "t4pcode", "uc5key"] {
            assert!(!out.contains(s), "{s}: {out}");
        }
        assert!(
            out.contains("https://tap.example/in?api_key=redacted&code=redacted"),
            "{out}"
        );
        // A password holding an unencoded `?` or `@` is not taken for a query or a host.
        for (url, secret) in [
            ("redis://:pa?ss@redis:6379/0", "pa?ss"),
            ("redis://u:p@ss@redis:6379", "p@ss"),
            ("nats://u:se?cret@nats:4222", "se?cret"),
            ("https://u:pa/ss@ucs.example/", "pa/ss"),
            ("postgres://db?user=a@b&password=s3cret", "s3cret"),
        ] {
            let shown = redact_url_password(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
        }
        assert_eq!(
            redact_url_password("redis://:pa?ss@redis:6379/0?password=x"),
            "redis://:<redacted>@redis:6379/0?password=<redacted>"
        );
        assert_eq!(
            redact_url_password("postgres://db/n?user=a@b"),
            "postgres://db/n?user=a@b",
            "an `@` after the path is not user info"
        );
        // A password given as a query parameter.
        c.stores.postgres_url =
            "postgres://db/nexus?user=nexus&password=s3cret&sslmode=require".into();
        let out = c.redacted_toml();
        assert!(!out.contains("s3cret"), "{out}");
        assert!(
            out.contains("postgres://db/nexus?user=nexus&password=<redacted>&sslmode=require"),
            "{out}"
        );
    }
}
