//! NATS JetStream bus (async-nats; NATS server 2.10 or newer, checked at connect).
//!
//! Layout:
//! - **One stream per topic** (`nexus.inbound.v1` → stream `nexus_inbound_v1`), file storage,
//!   limits retention with `max_age` = topic retention, replicas from `bus.nats.replicas` (set at
//!   creation). Its subjects are `<topic>.<partition>`, listed one by one rather than as a
//!   wildcard, so the stream config says how many partitions the topic has and `<topic>.dlq`
//!   never overlaps `<topic>`. The partition of a record is [`partition_for`] of its key, as on
//!   every backend; the key and the header order travel in headers (see `codec`).
//! - **Offsets are stream sequences minus one**: they increase within a partition but are
//!   sparse (the partitions share one sequence), so `count_between` counts the partition's
//!   records instead of subtracting. A partition's `low` is its first record's offset and
//!   `high` its last record's offset + 1; an empty partition has `low = high` = the stream's
//!   next offset, below anything appended later.
//! - **Groups**: one durable pull consumer per (group, partition) filtered to that partition's
//!   subject, explicit acks; its ack floor is the committed offset (it only moves over a
//!   contiguous acked prefix, as the contract wants). Acks are plain (`+ACK` without waiting
//!   for the server's confirmation, but flushed to the socket), so a returned ack is sent, not
//!   yet committed; one lost with a broken connection means a redelivery (at-least-once). Members share partitions through leases in a KV
//!   bucket; `group` explains why per-key order holds across members and the ack window.
//!   What must outlive every member lives in a second bucket without expiry,
//!   `nexus_groups_<stream>`: each group's join record (how many partitions the topic had when
//!   the group joined, so a partition added later is read from its beginning) and the restart
//!   marks that keep a partition's floor while its consumer is being replaced
//!   (`Inner::restart_consumer`).
//!
//! Why not JetStream's own partitioning (2.11 priority groups with pinned clients): a pinned
//! client is chosen per pull, not balanced across members, and its handover does not wait for
//! the previous client's unacked records; the lease protocol does both and runs on 2.10.

mod codec;
mod flush;
mod group;
mod tail;
#[cfg(test)]
mod tests;
mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::{self, kv, stream, Context, ErrorCode};
use async_nats::{ConnectErrorKind, ServerAddr};
use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::*;
use crate::config::{BusConfig, NatsConfig};

/// Timeout of each JetStream API request and publish acknowledgement.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of the initial connection; connecting is part of start-up, which should fail fast.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a health check's own connection attempt (which finds why the client is not
/// connected) may take: inside the 2 s `/readyz` gives the bus check (the other checks run
/// after it, so a disconnected bus adds up to this to the answer).
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long a probe's finding stands for later health checks.
const PROBE_REUSE: Duration = Duration::from_secs(10);
/// How long a publisher trusts its cached partition count. Another process may add partitions
/// (`nexus topology apply`); Kafka producers refresh metadata on a similar scale.
const PARTITIONS_TTL: Duration = Duration::from_secs(30);
/// Lease TTL minus ack wait must leave room for renewals, pull expiry and a safety gap (each a
/// quarter of it); below this the gaps are too small to outlast network latency.
const MIN_LEASE_MARGIN: Duration = Duration::from_millis(200);
/// Ephemeral consumers used for counting and reading vanish on their own after this if the
/// delete that follows their use is lost.
pub(super) const EPHEMERAL_INACTIVE: Duration = Duration::from_secs(30);
/// Tries of `restart_consumer` to leave the partition's consumer at its new start.
const RESTART_ATTEMPTS: usize = 3;
/// Records fetched per pull request by `read`.
const READ_BATCH: usize = 256;
/// Longest one fetch of `read` may take to answer; it answers at once unless the answer was
/// lost (then the read goes on with a new consumer).
const READ_FETCH_TIMEOUT: Duration = API_TIMEOUT;
/// Pauses of `read` between consumers that got none of the records pending (a fetch can come
/// back empty while some are): a few short tries, about 2 s in all, before
/// [`BusError::ReadIncomplete`], since a copy waits on each read.
const READ_RETRY_PAUSES: [Duration; 4] = [
    Duration::from_millis(25),
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1500),
];
/// Metadata key naming the topic a stream belongs to.
const TOPIC_METADATA: &str = "nexus.topic";
/// Oldest supported server: consumer create/update actions and stream metadata are 2.10.
const MIN_SERVER: (u64, u64) = (2, 10);

/// Lease and delivery timing, derived once from `bus.nats` (see `group` for why each holds).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Redelivery time of an unacked record.
    ack_wait: Duration,
    /// Lifetime of a lease or heartbeat not renewed.
    lease_ttl: Duration,
    /// How often leases and heartbeats are renewed.
    renew_every: Duration,
    /// Gap kept between the last moment a record could become redeliverable and lease expiry.
    safety: Duration,
    /// Expiry of each pull request.
    fetch_expires: Duration,
    /// How often handed-out records are kept alive with `+WPI`.
    progress_every: Duration,
    /// How long a partition being handed over waits for its handed-out records.
    drain_timeout: Duration,
    /// How often a member re-reads the topic's partition count.
    partitions_refresh: Duration,
}

impl Timing {
    fn from_config(c: &NatsConfig) -> Result<Self, BusError> {
        let ack_wait = Duration::from_millis(c.ack_wait_ms);
        let lease_ttl = Duration::from_millis(c.lease_ttl_ms);
        let margin = lease_ttl.saturating_sub(ack_wait);
        if margin < MIN_LEASE_MARGIN {
            return Err(BusError::Config(format!(
                "bus.nats.lease_ttl_ms must exceed bus.nats.ack_wait_ms by at least {} ms on JetStream",
                MIN_LEASE_MARGIN.as_millis()
            )));
        }
        let quarter = margin / 4;
        Ok(Timing {
            ack_wait,
            lease_ttl,
            renew_every: quarter.min(Duration::from_secs(5)),
            safety: quarter,
            fetch_expires: quarter.min(Duration::from_secs(1)),
            progress_every: ack_wait / 3,
            drain_timeout: (ack_wait * 2).max(Duration::from_secs(10)),
            partitions_refresh: Duration::from_millis(c.partitions_refresh_ms),
        })
    }

    /// Whether a pull request sent now cannot deliver a record that stays unredeliverable past
    /// the lease (deadline = lease renewal send time + TTL).
    fn can_fetch(&self, deadline: Instant) -> bool {
        Instant::now() + self.fetch_expires + self.ack_wait + self.safety <= deadline
    }

    /// Whether a `+WPI` sent now keeps a record unredeliverable only while the lease holds.
    fn can_progress(&self, deadline: Instant) -> bool {
        Instant::now() + self.ack_wait + self.safety <= deadline
    }
}

/// The JetStream bus. Cheap to share: one NATS connection, multiplexed.
pub struct JetStreamBus {
    inner: Arc<Inner>,
}

impl std::ops::Deref for JetStreamBus {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// The bus state, shared with the tasks of its subscriptions.
pub struct Inner {
    client: async_nats::Client,
    js: Context,
    timing: Timing,
    replicas: usize,
    /// The server's `max_payload` (payload and headers of one message), read at connect.
    max_payload: usize,
    /// topic → (partitions, when read), for publishing.
    partitions: Mutex<HashMap<String, (u32, Instant)>>,
    /// How the client connected, for [`Inner::why_not_connected`].
    dial: Dial,
    /// The last answer of [`Inner::why_not_connected`] and when it was found: reused for
    /// [`PROBE_REUSE`], and one probe at a time, so readiness checks during an outage do not
    /// each open a connection to a recovering server.
    last_probe: tokio::sync::Mutex<Option<(Instant, Probed)>>,
}

/// What a probe connection found: a TLS refusal or another failure, worded.
#[derive(Clone)]
enum Probed {
    Tls(String),
    Unavailable(String),
}

/// The server list and settings a connection is made with.
struct Dial {
    url: String,
    tls: bool,
    config: BusConfig,
}

impl Dial {
    fn options(&self) -> async_nats::ConnectOptions {
        let config = &self.config;
        let mut options = async_nats::ConnectOptions::new()
            .name("nexus")
            .connection_timeout(CONNECT_TIMEOUT)
            .require_tls(self.tls);
        if !config.ca_file.is_empty() {
            options = options.add_root_certificates(config.ca_file.clone().into());
        }
        if !config.client_cert_file.is_empty() {
            options = options.add_client_certificate(
                config.client_cert_file.clone().into(),
                config.client_key_file.clone().into(),
            );
        }
        if !config.nats.user.is_empty() {
            options =
                options.user_and_password(config.nats.user.clone(), config.nats.password.clone());
        }
        if !config.nats.token.is_empty() {
            options = options.token(config.nats.token.clone());
        }
        options
    }
}

/// What the stream of a topic looks like.
struct TopicMeta {
    stream: String,
    partitions: u32,
    /// When the stream was created (the server's text): tells a stream from an earlier one
    /// of the same name in records that outlive streams (see [`RestartMark`]).
    created: String,
    config: stream::Config,
    state: StreamState,
}

/// The parts of `STREAM.INFO` nexus reads (the subjects map is private in async-nats).
#[derive(Debug, Deserialize)]
struct StreamInfo {
    config: stream::Config,
    state: StreamState,
    #[serde(default)]
    created: String,
}

#[derive(Debug, Deserialize)]
struct StreamState {
    #[serde(default)]
    last_seq: u64,
    #[serde(default)]
    subjects: Option<HashMap<String, u64>>,
}

#[derive(Debug, Deserialize)]
struct DeleteResponse {
    #[serde(default)]
    #[allow(dead_code)]
    success: bool,
}

/// Where an interrupted restart of a group's partition consumer was to start it: the value of
/// the partition's restart key in the group-state bucket (see `Inner::restart_consumer`).
#[derive(Debug, Serialize, Deserialize)]
struct RestartMark {
    /// Stream sequence of the first record to deliver.
    start: u64,
    /// [`TopicMeta::created`] of the stream the mark is about: sequences of a stream deleted
    /// and created again under the same name mean nothing for the new one.
    stream_created: String,
}

/// A JetStream API call failed either on the way or at the server.
enum ApiError {
    Request(jetstream::context::RequestError),
    Server(jetstream::Error),
}

impl ApiError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            ApiError::Server(e) => Some(e.error_code()),
            ApiError::Request(_) => None,
        }
    }

    fn into_bus(self, what: &str) -> BusError {
        match self {
            ApiError::Request(e) => request_error(what, &e),
            ApiError::Server(e) => server_error(what, &e),
        }
    }
}

fn request_error(what: &str, e: &jetstream::context::RequestError) -> BusError {
    use jetstream::context::RequestErrorKind as K;
    match e.kind() {
        K::TimedOut => BusError::Timeout(format!("{what}: {e}")),
        K::NoResponders => {
            BusError::Unavailable(format!("{what}: JetStream did not answer (is it enabled?)"))
        }
        K::Other => BusError::Unavailable(format!("{what}: {e}")),
    }
}

fn server_error(what: &str, e: &jetstream::Error) -> BusError {
    match e.error_code() {
        ErrorCode::STREAM_NAME_EXIST
        | ErrorCode::STREAM_SUBJECT_OVERLAP
        | ErrorCode::CONSUMER_NAME_EXIST => BusError::Conflict(format!("{what}: {e}")),
        ErrorCode::BAD_REQUEST | ErrorCode::STREAM_INVALID_CONFIG | ErrorCode::INVALID_JSON => {
            BusError::Config(format!("{what}: {e}"))
        }
        _ => BusError::Unavailable(format!("{what}: {e}")),
    }
}

fn consumer_error(what: &str, e: &jetstream::stream::ConsumerError) -> BusError {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::TimedOut => BusError::Timeout(format!("{what}: {e}")),
        K::JetStream(err) => server_error(what, &err),
        K::InvalidName | K::InvalidConsumerType => BusError::Config(format!("{what}: {e}")),
        K::Request | K::Other => BusError::Unavailable(format!("{what}: {e}")),
    }
}

/// A failed connection attempt. A handshake the TLS layer refused is [`BusError::Tls`] naming
/// the certificate problem and the `bus.*` setting to change (async-nats files it under `Io`).
fn connect_error(url: &str, e: &async_nats::ConnectError, config: &BusConfig) -> BusError {
    if let Some(tls) = tls::rustls_error(e) {
        return BusError::Tls(format!("NATS at {url}: {}", tls::explain(tls, config)));
    }
    match e.kind() {
        ConnectErrorKind::ServerParse
        | ConnectErrorKind::Tls
        | ConnectErrorKind::Authentication
        | ConnectErrorKind::AuthorizationViolation => {
            BusError::Config(format!("NATS at {url}: {e}"))
        }
        ConnectErrorKind::TimedOut => BusError::Timeout(format!("NATS at {url}: {e}")),
        _ => BusError::Unavailable(format!("NATS at {url}: {e}")),
    }
}

/// `nats://a:4222,b:4222` → one address per server, each with the scheme.
fn server_addrs(url: &str) -> Result<Vec<ServerAddr>, BusError> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    rest.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            format!("{scheme}://{s}")
                .parse::<ServerAddr>()
                .map_err(|e| BusError::Config(format!("NATS server `{s}` in `{url}`: {e}")))
        })
        .collect()
}

fn check_server_version(version: &str) -> Result<(), BusError> {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u64>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u64>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) if (major, minor) >= MIN_SERVER => Ok(()),
        (Some(_), Some(_)) => Err(BusError::Config(format!(
            "NATS server {version} is too old: nexus needs {}.{} or newer",
            MIN_SERVER.0, MIN_SERVER.1
        ))),
        // A server that does not say is given the benefit of the doubt.
        _ => Ok(()),
    }
}

impl JetStreamBus {
    /// Connects (`nats://` or `tls://`, comma-separated servers allowed) and checks the server
    /// is recent enough and has JetStream.
    pub async fn connect(url: &str, tls: bool, config: &BusConfig) -> Result<Self, BusError> {
        let timing = Timing::from_config(&config.nats)?;
        let dial = Dial {
            url: url.to_string(),
            tls,
            config: config.clone(),
        };
        let client = dial
            .options()
            .connect(server_addrs(url)?)
            .await
            .map_err(|e| connect_error(url, &e, config))?;
        let info = client.server_info();
        check_server_version(&info.version)?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(API_TIMEOUT);
        let bus = JetStreamBus {
            inner: Arc::new(Inner {
                client,
                js,
                timing,
                replicas: config.nats.replicas.max(1),
                max_payload: info.max_payload,
                partitions: Mutex::new(HashMap::new()),
                dial,
                last_probe: tokio::sync::Mutex::new(None),
            }),
        };
        bus.health().await?;
        Ok(bus)
    }
}

impl Inner {
    /// Why the client is not connected, as a connection attempt of its own finds it: the
    /// client's reconnect attempts report only an error's kind (`IO error`), which hides a
    /// server certificate the TLS layer refused (a certificate renewed by another CA, or
    /// expired) behind what reads as an outage.
    async fn why_not_connected(&self) -> BusError {
        let mut last = self.last_probe.lock().await;
        let probed = match &*last {
            Some((at, probed)) if at.elapsed() < PROBE_REUSE => probed.clone(),
            _ => {
                let probed = self.probe().await;
                *last = Some((Instant::now(), probed.clone()));
                probed
            }
        };
        match probed {
            Probed::Tls(m) => BusError::Tls(m),
            Probed::Unavailable(m) => BusError::Unavailable(m),
        }
    }

    /// One connection attempt of its own, and what it found.
    async fn probe(&self) -> Probed {
        let not_connected =
            |detail: String| Probed::Unavailable(format!("not connected to NATS{detail}"));
        let addrs = match server_addrs(&self.dial.url) {
            Ok(a) => a,
            Err(e) => return Probed::Unavailable(e.to_string()),
        };
        let attempt = tokio::time::timeout(
            PROBE_TIMEOUT,
            self.dial
                .options()
                .connection_timeout(PROBE_TIMEOUT)
                .connect(addrs),
        )
        .await;
        match attempt {
            // The server takes connections again: the client's reconnect is under way.
            Ok(Ok(_probe)) => not_connected(String::new()),
            Ok(Err(e)) => match connect_error(&self.dial.url, &e, &self.dial.config) {
                BusError::Tls(m) => Probed::Tls(m),
                _ => not_connected(format!(" (a new connection: {e})")),
            },
            Err(_) => not_connected(" (a new connection timed out too)".into()),
        }
    }

    /// One JetStream API request (`$JS.API.<subject>`), its error kept typed.
    async fn api<T: serde::de::DeserializeOwned>(
        &self,
        subject: String,
        payload: &serde_json::Value,
    ) -> Result<T, ApiError> {
        match self.js.request(subject, payload).await {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Err { error }) => Err(ApiError::Server(error)),
            Err(e) => Err(ApiError::Request(e)),
        }
    }

    async fn stream_info(
        &self,
        stream: &str,
        subjects_filter: Option<&str>,
    ) -> Result<Option<StreamInfo>, BusError> {
        let payload = match subjects_filter {
            Some(filter) => json!({ "subjects_filter": filter }),
            None => json!({}),
        };
        match self
            .api::<StreamInfo>(format!("STREAM.INFO.{stream}"), &payload)
            .await
        {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.code() == Some(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
            Err(e) => Err(e.into_bus(&format!("stream info of {stream}"))),
        }
    }

    /// The topic's stream, or `None`. A stream of that name holding other subjects belongs to
    /// another topic (the name mapping folds `.` into `_`): a conflict, never silently shared.
    async fn topic_meta(&self, topic: &str) -> Result<Option<TopicMeta>, BusError> {
        codec::validate_topic(topic)?;
        let stream = codec::stream_name(topic);
        let Some(info) = self
            .stream_info(&stream, Some(&format!("{topic}.*")))
            .await?
        else {
            return Ok(None);
        };
        let mut seen = Vec::with_capacity(info.config.subjects.len());
        for s in &info.config.subjects {
            match codec::partition_of_subject(topic, s) {
                Some(p) => seen.push(p),
                None => {
                    return Err(BusError::Conflict(format!(
                        "stream {stream} exists but does not hold topic `{topic}` (subject `{s}`)"
                    )))
                }
            }
        }
        seen.sort_unstable();
        let contiguous = seen.iter().enumerate().all(|(i, p)| i as u32 == *p);
        if seen.is_empty() || !contiguous {
            return Err(BusError::Conflict(format!(
                "stream {stream} has subjects {:?}, not partitions 0..n of `{topic}`",
                info.config.subjects
            )));
        }
        let partitions = seen.len() as u32;
        self.remember_partitions(topic, partitions);
        Ok(Some(TopicMeta {
            stream,
            partitions,
            created: info.created,
            config: info.config,
            state: info.state,
        }))
    }

    async fn require_topic(&self, topic: &str) -> Result<TopicMeta, BusError> {
        self.topic_meta(topic)
            .await?
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))
    }

    fn remember_partitions(&self, topic: &str, partitions: u32) {
        if let Ok(mut cache) = self.partitions.lock() {
            cache.insert(topic.to_string(), (partitions, Instant::now()));
        }
    }

    fn forget_partitions(&self, topic: &str) {
        if let Ok(mut cache) = self.partitions.lock() {
            cache.remove(topic);
        }
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, BusError> {
        let cached = self
            .partitions
            .lock()
            .ok()
            .and_then(|c| c.get(topic).copied())
            .filter(|(_, at)| at.elapsed() < PARTITIONS_TTL);
        match cached {
            Some((n, _)) => Ok(n),
            None => Ok(self.require_topic(topic).await?.partitions),
        }
    }

    /// `(low, high, records)` of one partition (offsets, see the module doc).
    async fn bounds(
        &self,
        meta: &TopicMeta,
        topic: &str,
        partition: u32,
    ) -> Result<(u64, u64, u64), BusError> {
        let subject = codec::subject(topic, partition);
        let count = meta
            .state
            .subjects
            .as_ref()
            .and_then(|s| s.get(&subject).copied())
            .unwrap_or(0);
        let empty = (meta.state.last_seq, meta.state.last_seq, 0);
        if count == 0 {
            return Ok(empty);
        }
        let first = self
            .message_seq(&meta.stream, json!({ "seq": 1, "next_by_subj": subject }))
            .await?;
        let last = self
            .message_seq(&meta.stream, json!({ "last_by_subj": subject }))
            .await?;
        match (first, last) {
            (Some(first), Some(last)) => Ok((first - 1, last, count)),
            // Expired between the stream info and these reads.
            _ => Ok(empty),
        }
    }

    /// The sequence of the message a `STREAM.MSG.GET` request selects, if any.
    async fn message_seq(
        &self,
        stream: &str,
        request: serde_json::Value,
    ) -> Result<Option<u64>, BusError> {
        #[derive(Deserialize)]
        struct Got {
            message: GotMessage,
        }
        #[derive(Deserialize)]
        struct GotMessage {
            seq: u64,
        }
        match self
            .api::<Got>(format!("STREAM.MSG.GET.{stream}"), &request)
            .await
        {
            Ok(got) => Ok(Some(got.message.seq.max(1))),
            Err(e) if e.code() == Some(ErrorCode::NO_MESSAGE_FOUND) => Ok(None),
            Err(e) => Err(e.into_bus(&format!("message get on {stream}"))),
        }
    }

    async fn consumer_info(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<Option<consumer::Info>, BusError> {
        match self
            .api::<consumer::Info>(format!("CONSUMER.INFO.{stream}.{name}"), &json!({}))
            .await
        {
            Ok(info) => Ok(Some(info)),
            Err(e) if e.code() == Some(ErrorCode::CONSUMER_NOT_FOUND) => Ok(None),
            Err(e) if e.code() == Some(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
            Err(e) => Err(e.into_bus(&format!("consumer info of {stream}/{name}"))),
        }
    }

    /// Replaces the group's durable consumer on a partition with one starting at stream
    /// sequence `start_sequence` (a durable consumer's start cannot be changed); its ack floor
    /// then sits just below the start, which is where the next member resumes.
    ///
    /// The start is written first as the partition's restart mark in the group-state bucket
    /// `marks`, and removed once the new consumer exists; whoever finds the consumer missing
    /// creates it at the mark (`group::ensure_consumer`), never at the group's start setting.
    /// Only a missing consumer makes anyone read a mark. Wherever the restart stops (the
    /// process dies, or a step fails for good):
    /// - before the mark is stored: nothing changed; the next owner restarts at the floor;
    /// - after the mark, before the delete: the consumer and its floor are still there; the
    ///   mark is stale but not wrong: it is the floor + 1 of then, and a floor only moves up
    ///   (every restart writes its own mark first), so were the consumer lost later, starting
    ///   there delivers records again and skips none;
    /// - after the delete, before a create took (every try failed): no consumer, the mark
    ///   says where it starts; the next `ensure_consumer` (this member's retry, the next
    ///   owner's, a member joining) creates it there, then removes the mark;
    /// - after the create, before the mark is removed: the consumer exists; the mark equals
    ///   its start, so it is stale as in the second case.
    ///
    /// The removal is revision-checked, so a newer restart's mark stays.
    #[allow(clippy::too_many_arguments)]
    async fn restart_consumer(
        &self,
        marks: &kv::Store,
        stream: &str,
        group: &str,
        group_key: &str,
        topic: &str,
        partition: u32,
        start_sequence: u64,
    ) -> Result<(), BusError> {
        let name = codec::consumer_name(group_key, partition);
        let subject = codec::subject(topic, partition);
        let max_ack_pending = match self.consumer_info(stream, &name).await? {
            Some(info) => info.config.max_ack_pending,
            None => SubscribeOptions::default().max_in_flight as i64,
        };
        let Some(stream_created) = self.stream_created(stream).await? else {
            return Err(BusError::UnknownTopic(topic.to_string()));
        };
        let key = codec::restart_key(group_key, partition);
        let mark = RestartMark {
            start: start_sequence,
            stream_created,
        };
        let value = serde_json::to_vec(&mark)
            .map_err(|e| BusError::Unavailable(format!("encoding restart mark {key}: {e}")))?;
        let revision = marks
            .put(&key, value.into())
            .await
            .map_err(|e| BusError::Unavailable(format!("storing restart mark {key}: {e}")))?;
        let deliver = DeliverPolicy::ByStartSequence { start_sequence };
        let config =
            self.durable_config(group, &name, &subject, partition, deliver, max_ack_pending);
        // Between the delete and the create the consumer does not exist, and another member's
        // `ensure_consumer` (at its start) may create it: at the mark, so with our start,
        // unless its config differs otherwise or it was created before the mark (an older
        // nexus). So the create is checked: a consumer that is not ours is replaced, a lost
        // answer is asked about.
        self.delete_consumer(stream, &name).await?;
        let mut last = None;
        for _ in 0..RESTART_ATTEMPTS {
            match self
                .js
                .create_consumer_on_stream(config.clone(), stream)
                .await
            {
                Ok(_) => {
                    self.clear_restart_mark(marks, &key, revision).await;
                    return Ok(());
                }
                Err(e) => last = Some(consumer_error(&format!("recreating consumer {name}"), &e)),
            }
            // Failed, or its answer was lost: after our delete, a consumer with our start is
            // ours; one with another start is someone else's and goes.
            match self.consumer_info(stream, &name).await? {
                Some(info) if info.config.deliver_policy == deliver => {
                    self.clear_restart_mark(marks, &key, revision).await;
                    return Ok(());
                }
                Some(_) => self.delete_consumer(stream, &name).await?,
                None => {}
            }
        }
        // The mark stays: the consumer is created at it by whoever needs it next.
        Err(last.unwrap_or_else(|| {
            BusError::Unavailable(format!("recreating consumer {name}: gave up"))
        }))
    }

    /// The group-state bucket of a stream (see [`codec::groups_bucket`]): restart marks and
    /// join records. No `max_age`: they must outlive every member.
    async fn groups_bucket(&self, stream: &str, topic: &str) -> Result<kv::Store, BusError> {
        let bucket = codec::groups_bucket(stream);
        self.js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                description: format!("nexus consumer-group state of topic `{topic}`"),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::Unavailable(format!("group-state bucket {bucket}: {e}")))
    }

    /// The creation time of a stream, `None` if there is no such stream.
    async fn stream_created(&self, stream: &str) -> Result<Option<String>, BusError> {
        Ok(self
            .stream_info(stream, None)
            .await?
            .map(|info| info.created))
    }

    /// The start sequence a group's partition consumer was being restarted at, and the mark's
    /// revision, if a restart left one for this stream (see `restart_consumer`). A mark that
    /// cannot be read is an error, never "no mark": starting from the group's start setting
    /// instead could skip records.
    async fn restart_mark(
        &self,
        marks: &kv::Store,
        stream: &str,
        group_key: &str,
        partition: u32,
    ) -> Result<Option<(u64, u64)>, BusError> {
        let key = codec::restart_key(group_key, partition);
        let entry = marks
            .entry(&key)
            .await
            .map_err(|e| BusError::Unavailable(format!("reading restart mark {key}: {e}")))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        let mark = serde_json::from_slice::<RestartMark>(&entry.value).map_err(|e| {
            let bucket = marks.name.as_str();
            BusError::Unavailable(format!(
                "unreadable restart mark {key} in bucket {bucket} ({e}): the partition's \
                 consumer is not created from a guess; delete the key to start it from the \
                 group's start setting"
            ))
        })?;
        if self.stream_created(stream).await?.as_deref() != Some(mark.stream_created.as_str()) {
            tracing::debug!(
                key,
                "restart mark of an earlier stream of this name ignored"
            );
            return Ok(None);
        }
        Ok(Some((mark.start, entry.revision)))
    }

    /// Removes a restart mark once its consumer exists; a mark left behind is stale but
    /// harmless (see `restart_consumer`).
    async fn clear_restart_mark(&self, marks: &kv::Store, key: &str, revision: u64) {
        if let Err(e) = marks.delete_expect_revision(key, Some(revision)).await {
            tracing::debug!(key, error = %e, "restart mark left in place");
        }
    }

    async fn delete_consumer(&self, stream: &str, name: &str) -> Result<(), BusError> {
        match self
            .api::<DeleteResponse>(format!("CONSUMER.DELETE.{stream}.{name}"), &json!({}))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::CONSUMER_NOT_FOUND) => Ok(()),
            Err(e) => Err(e.into_bus(&format!("deleting consumer {stream}/{name}"))),
        }
    }

    /// An ephemeral, unacknowledged consumer on one partition from `deliver` on (for counting
    /// and reading); the caller deletes it.
    async fn ephemeral(
        &self,
        stream: &str,
        subject: &str,
        deliver: DeliverPolicy,
    ) -> Result<consumer::Consumer<pull::Config>, BusError> {
        let config = pull::Config {
            filter_subject: subject.to_string(),
            deliver_policy: deliver,
            ack_policy: AckPolicy::None,
            inactive_threshold: EPHEMERAL_INACTIVE,
            memory_storage: true,
            description: Some("nexus bus: count/read".into()),
            ..Default::default()
        };
        self.js
            .create_consumer_on_stream(config, stream)
            .await
            .map_err(|e| consumer_error(&format!("ephemeral consumer on {stream}"), &e))
    }

    async fn drop_ephemeral(&self, stream: &str, consumer: &consumer::Consumer<pull::Config>) {
        let name = consumer.cached_info().name.clone();
        if let Err(e) = self.delete_consumer(stream, &name).await {
            tracing::debug!(stream, consumer = %name, error = %e, "ephemeral consumer left to expire");
        }
    }

    /// How many records of the partition have a stream sequence `>= seq`.
    async fn count_from_seq(&self, stream: &str, subject: &str, seq: u64) -> Result<u64, BusError> {
        let deliver = DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        };
        let consumer = self.ephemeral(stream, subject, deliver).await?;
        let pending = consumer.cached_info().num_pending;
        self.drop_ephemeral(stream, &consumer).await;
        Ok(pending)
    }

    /// The durable consumer config of a group on a partition.
    fn durable_config(
        &self,
        group: &str,
        name: &str,
        subject: &str,
        partition: u32,
        deliver: DeliverPolicy,
        max_ack_pending: i64,
    ) -> pull::Config {
        pull::Config {
            durable_name: Some(name.to_string()),
            description: Some(format!("nexus group `{group}`, partition {partition}")),
            filter_subject: subject.to_string(),
            deliver_policy: deliver,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.timing.ack_wait,
            max_ack_pending,
            metadata: HashMap::from([
                ("nexus.group".to_string(), group.to_string()),
                ("nexus.partition".to_string(), partition.to_string()),
            ]),
            ..Default::default()
        }
    }

    /// Live members of a group: heartbeat keys not yet expired, sorted.
    async fn members(&self, stream: &str, group_key: &str) -> Result<Vec<String>, BusError> {
        let bucket = codec::lease_bucket(stream);
        let filter = codec::members_filter(&bucket, group_key);
        let Some(info) = self
            .stream_info(&format!("KV_{bucket}"), Some(&filter))
            .await?
        else {
            return Ok(Vec::new());
        };
        let prefix = format!("$KV.{bucket}.{group_key}.m.");
        let mut members: Vec<String> = info
            .state
            .subjects
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(s, _)| s.strip_prefix(&prefix).map(str::to_string))
            .collect();
        members.sort();
        Ok(members)
    }

    fn stream_config(&self, spec: &TopicSpec, stream: &str) -> stream::Config {
        let max_age = spec.retention.unwrap_or_default();
        stream::Config {
            name: stream.to_string(),
            description: Some(format!("nexus topic `{}`", spec.name)),
            subjects: (0..spec.partitions)
                .map(|p| codec::subject(&spec.name, p))
                .collect(),
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            max_age,
            duplicate_window: duplicate_window(max_age),
            num_replicas: self.replicas,
            max_messages: -1,
            max_bytes: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            metadata: HashMap::from([(TOPIC_METADATA.to_string(), spec.name.clone())]),
            ..Default::default()
        }
    }
}

/// A ranged read under way (see [`Inner::read_range`]).
struct RangeRead<'a> {
    topic: &'a str,
    partition: u32,
    /// The first stream sequence not read yet.
    next_seq: u64,
    /// The stream's last sequence when the read began: the log end the read goes to.
    end_seq: u64,
    max: usize,
    out: Vec<Message>,
}

impl RangeRead<'_> {
    fn wants_more(&self) -> bool {
        self.out.len() < self.max && self.next_seq <= self.end_seq
    }

    /// Takes one delivery; `false` once it is past the log end the read goes to.
    fn take(&mut self, seq: u64, ts: i64, m: &async_nats::Message) -> bool {
        if seq > self.end_seq {
            return false;
        }
        // A delivery behind the read cannot come from a consumer started at `next_seq`; were
        // it to, taking it would put the answer out of order.
        if seq >= self.next_seq {
            self.out.push(codec::message(
                self.topic,
                self.partition,
                seq,
                ts,
                m.headers.as_ref(),
                m.payload.clone(),
            ));
            self.next_seq = seq + 1;
        }
        true
    }
}

/// How one consumer's part of a ranged read ended.
enum RoundEnd {
    /// Nothing is left to read: `max` records, the log end, or nothing pending any more.
    Done,
    /// Its fetches stopped giving records while some were pending (the text says how); a new
    /// consumer from the next sequence not read goes on.
    Stalled(String),
}

impl Inner {
    /// Reads `range` (see [`Bus::read`] for the contract): ephemeral consumers from the next
    /// sequence not read, fetching until the range is read. A fetch can come back empty while
    /// records are pending, and a delivery can be lost on the way (the consumer, acking
    /// nothing, counts it delivered and goes on), so either ends the consumer and a new one
    /// starts where the read stands; its pending count also says whether records were removed
    /// meanwhile. Gaps in the sequence are the subject filter's to skip: the read counts the
    /// records it gets and never assumes a sequence holds one.
    async fn read_range(&self, stream: &str, range: &mut RangeRead<'_>) -> Result<(), BusError> {
        let subject = codec::subject(range.topic, range.partition);
        let mut pauses = READ_RETRY_PAUSES.iter();
        while range.wants_more() {
            let deliver = DeliverPolicy::ByStartSequence {
                start_sequence: range.next_seq,
            };
            let consumer = self.ephemeral(stream, &subject, deliver).await?;
            let pending = consumer.cached_info().num_pending;
            let before = (range.out.len(), range.next_seq);
            let end = if pending == 0 {
                RoundEnd::Done
            } else {
                read_round(&consumer, range, pending).await
            };
            self.drop_ephemeral(stream, &consumer).await;
            let RoundEnd::Stalled(why) = end else {
                return Ok(());
            };
            if (range.out.len(), range.next_seq) != before {
                pauses = READ_RETRY_PAUSES.iter();
                continue;
            }
            let Some(pause) = pauses.next() else {
                return Err(BusError::ReadIncomplete {
                    topic: range.topic.to_string(),
                    partition: range.partition,
                    offset: range.next_seq.saturating_sub(1),
                    pending,
                    detail: format!(
                        "{} consumers in a row got none of them; the last: {why}",
                        READ_RETRY_PAUSES.len() + 1
                    ),
                });
            };
            tracing::debug!(
                topic = range.topic,
                partition = range.partition,
                pending,
                reason = %why,
                "a ranged read got nothing while records are pending; reading again"
            );
            tokio::time::sleep(*pause).await;
        }
        Ok(())
    }
}

/// Fetches from one consumer into `range` until the range is read or the consumer stalls.
/// `pending` is what the consumer counted when it was created.
async fn read_round(
    consumer: &consumer::Consumer<pull::Config>,
    range: &mut RangeRead<'_>,
    pending: u64,
) -> RoundEnd {
    // Consumer sequence of the last delivery: they come numbered 1, 2, … with no redelivery
    // (nothing is acked), so a skipped number is a delivery lost on the way.
    let mut delivered = 0u64;
    loop {
        let left = usize::try_from(pending.saturating_sub(delivered)).unwrap_or(usize::MAX);
        if !range.wants_more() || left == 0 {
            return RoundEnd::Done;
        }
        let want = (range.max - range.out.len()).min(READ_BATCH).min(left);
        let before = delivered;
        // A fetch answers at once (no-wait), but one whose answer was lost would wait forever.
        let fetched = tokio::time::timeout(
            READ_FETCH_TIMEOUT,
            fetch_into(consumer, range, want, &mut delivered),
        )
        .await;
        match fetched {
            Ok(Ok(true)) => return RoundEnd::Done,
            Ok(Ok(false)) if delivered == before => {
                return RoundEnd::Stalled("a fetch came back empty".into())
            }
            Ok(Ok(false)) => {}
            Ok(Err(why)) => return RoundEnd::Stalled(why),
            Err(_) => {
                return RoundEnd::Stalled(format!(
                    "a fetch did not end within {READ_FETCH_TIMEOUT:?}"
                ))
            }
        }
    }
}

/// The stream sequence of the first record `consumer` delivers (one no-wait fetch); `None`
/// when the fetch comes back empty.
async fn first_sequence(
    consumer: &consumer::Consumer<pull::Config>,
    what: &str,
) -> Result<Option<u64>, String> {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    match batch.next().await {
        Some(Ok(m)) => m
            .info()
            .map(|i| Some(i.stream_sequence))
            .map_err(|e| format!("{what}: a delivery without JetStream metadata ({e})")),
        Some(Err(e)) => Err(format!("{what}: {e}")),
        None => Ok(None),
    }
}

/// One fetch of up to `want` records into `range`, each taken as it comes; `true` once
/// nothing is left to read. A delivery that shows an earlier one was lost ends the fetch
/// (`Err`): taking it would skip the lost record.
async fn fetch_into(
    consumer: &consumer::Consumer<pull::Config>,
    range: &mut RangeRead<'_>,
    want: usize,
    delivered: &mut u64,
) -> Result<bool, String> {
    let what = format!("reading {}/{}", range.topic, range.partition);
    let mut batch = consumer
        .fetch()
        .max_messages(want)
        .messages()
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    while let Some(item) = batch.next().await {
        let m = item.map_err(|e| format!("{what}: {e}"))?;
        let info = m
            .info()
            .map_err(|e| format!("{what}: a delivery without JetStream metadata ({e})"))?;
        if info.consumer_sequence != *delivered + 1 {
            return Err(format!(
                "{what}: delivery {} came after {delivered}, the ones between were lost",
                info.consumer_sequence
            ));
        }
        *delivered = info.consumer_sequence;
        let ts = timestamp_ms(info.published.unix_timestamp_nanos());
        if !range.take(info.stream_sequence, ts, &m.message) || info.pending == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The server refuses a duplicate window longer than `max_age`; nexus sets no message ids, so
/// the window only needs to be valid.
fn duplicate_window(max_age: Duration) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(120);
    if max_age.is_zero() {
        DEFAULT
    } else {
        DEFAULT.min(max_age)
    }
}

/// A stream setting nexus relies on besides subjects (partitions) and `max_age` (retention):
/// what [`Inner::stream_config`] creates and `topology plan` compares.
struct StreamSetting {
    name: &'static str,
    read: fn(&stream::Config) -> String,
    required: &'static str,
    /// Sets it to `required` in a stream update; `None` when the server refuses to change it
    /// on an existing stream, so the operator must (by making the stream again).
    set: Option<fn(&mut stream::Config)>,
    why: &'static str,
}

/// A limit as the server reports it: zero or below is none.
fn limit(value: i64) -> String {
    if value <= 0 {
        UNLIMITED.to_owned()
    } else {
        value.to_string()
    }
}

const UNLIMITED: &str = "unlimited";

/// The stream settings nexus relies on. Retention policy and storage cannot be changed in
/// place (the server refuses retention to or from work-queue and any storage change, and
/// records an interest stream already dropped are gone anyway), so a stream that differs is a
/// conflict for the operator. Discard policy and the limits are set back by `apply`: an update
/// that deletes nothing and only stops the stream from refusing or dropping records early.
const STREAM_SETTINGS: [StreamSetting; 7] = [
    StreamSetting {
        name: "retention policy",
        read: |c| {
            match c.retention {
                stream::RetentionPolicy::Limits => "limits",
                stream::RetentionPolicy::Interest => "interest",
                stream::RetentionPolicy::WorkQueue => "workqueue",
            }
            .to_owned()
        },
        required: "limits",
        set: None,
        why: "records are deleted once consumed: other groups, replay and dead-letter copies \
              lose them",
    },
    StreamSetting {
        name: "storage",
        read: |c| {
            match c.storage {
                stream::StorageType::File => "file",
                stream::StorageType::Memory => "memory",
            }
            .to_owned()
        },
        required: "file",
        set: None,
        why: "records are lost when the server restarts",
    },
    StreamSetting {
        name: "discard policy",
        read: |c| {
            match c.discard {
                stream::DiscardPolicy::Old => "old",
                stream::DiscardPolicy::New => "new",
            }
            .to_owned()
        },
        required: "old",
        // Per-subject discard needs discard new (and a per-subject limit): the server refuses
        // an update that keeps it.
        set: Some(|c| {
            c.discard = stream::DiscardPolicy::Old;
            c.discard_new_per_subject = false;
        }),
        why: "a full stream refuses publishes",
    },
    StreamSetting {
        name: "max message size",
        read: |c| limit(i64::from(c.max_message_size)),
        required: UNLIMITED,
        // Zero is left out of the request: the server's default, no limit.
        set: Some(|c| c.max_message_size = 0),
        why: "the stream refuses events the server would take",
    },
    StreamSetting {
        name: "max messages",
        read: |c| limit(c.max_messages),
        required: UNLIMITED,
        set: Some(|c| c.max_messages = -1),
        why: "records are deleted before the topic's retention",
    },
    StreamSetting {
        name: "max bytes",
        read: |c| limit(c.max_bytes),
        required: UNLIMITED,
        set: Some(|c| c.max_bytes = -1),
        why: "records are deleted before the topic's retention",
    },
    StreamSetting {
        name: "max messages per subject",
        read: |c| limit(c.max_messages_per_subject),
        required: UNLIMITED,
        set: Some(|c| {
            c.max_messages_per_subject = -1;
            c.discard_new_per_subject = false;
        }),
        why: "a partition's records are deleted before the topic's retention",
    },
];

/// The stream's [`STREAM_SETTINGS`] as `topic_info` reports them.
fn stream_settings(config: &stream::Config) -> Vec<TopicSetting> {
    STREAM_SETTINGS
        .iter()
        .map(|s| TopicSetting {
            name: s.name,
            value: (s.read)(config),
            required: s.required,
            in_place: s.set.is_some(),
            why: s.why,
        })
        .collect()
}

/// Sets the [`STREAM_SETTINGS`] an update may change to what nexus needs; whether any changed.
fn set_stream_settings(config: &mut stream::Config) -> bool {
    let mut changed = false;
    for s in &STREAM_SETTINGS {
        if let Some(set) = s.set {
            if (s.read)(config) != s.required {
                set(config);
                changed = true;
            }
        }
    }
    changed
}

fn publish_error(topic: &str, e: &jetstream::context::PublishError) -> BusError {
    use jetstream::context::PublishErrorKind as K;
    match e.kind() {
        K::StreamNotFound => BusError::UnknownTopic(topic.to_string()),
        K::TimedOut => BusError::Timeout(format!("publish to {topic}: {e}")),
        K::WrongLastMessageId | K::WrongLastSequence => {
            BusError::Conflict(format!("publish to {topic}: {e}"))
        }
        K::BrokenPipe | K::Other => BusError::Unavailable(format!("publish to {topic}: {e}")),
    }
}

fn check_partition(meta: &TopicMeta, topic: &str, partition: u32) -> Result<(), BusError> {
    if partition < meta.partitions {
        Ok(())
    } else {
        Err(BusError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        })
    }
}

fn timestamp_ms(nanos: i128) -> i64 {
    i64::try_from(nanos / 1_000_000).unwrap_or(i64::MAX)
}

#[async_trait]
impl Bus for JetStreamBus {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError> {
        let partitions = self.partition_count(topic).await?;
        let partition = partition_for(&record.key, partitions);
        let headers = codec::encode_headers(&record)?;
        // The server answers an oversized message by closing the connection, failing every
        // publish and fetch in flight on it: refused here instead.
        let size = record.payload.len() + codec::headers_wire_len(&headers);
        if size > self.max_payload {
            return Err(BusError::TooLarge(format!(
                "{topic}: {size} bytes with headers, over the server's max_payload of {}",
                self.max_payload
            )));
        }
        let ack = async {
            self.js
                .publish_with_headers(codec::subject(topic, partition), headers, record.payload)
                .await?
                .await
        }
        .await
        .map_err(|e| {
            if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                self.forget_partitions(topic);
            }
            publish_error(topic, &e)
        })?;
        let stream = codec::stream_name(topic);
        if ack.stream != stream {
            self.forget_partitions(topic);
            return Err(BusError::Conflict(format!(
                "{topic} partition {partition} was stored by stream {} instead of {stream}",
                ack.stream
            )));
        }
        Ok(Published {
            partition,
            offset: ack.sequence.saturating_sub(1),
        })
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        group::subscribe(&self.inner, group, topic, options).await
    }

    async fn tail(&self, topic: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(tail::start(&self.inner, topic).await?))
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BusError> {
        Ok(self.topic_meta(topic).await?.map(|meta| TopicInfo {
            name: topic.to_string(),
            partitions: meta.partitions,
            retention: (!meta.config.max_age.is_zero()).then_some(meta.config.max_age),
            retention_known: true,
            settings: stream_settings(&meta.config),
        }))
    }

    /// Only streams nexus's naming could have made (see [`codec::topic_of_stream`]): an
    /// account is often shared, and its key-value buckets (nexus's own lease and group-state
    /// buckets among them) and other applications' streams are not topics nexus could read or
    /// would create; listed too, they would bury the leftovers an operator looks for.
    async fn list_topics(&self) -> Result<Vec<String>, BusError> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            total: usize,
            #[serde(default)]
            streams: Vec<Listed>,
        }
        #[derive(Deserialize)]
        struct Listed {
            config: ListedConfig,
        }
        #[derive(Deserialize)]
        struct ListedConfig {
            name: String,
            #[serde(default)]
            subjects: Vec<String>,
            #[serde(default)]
            metadata: HashMap<String, String>,
        }
        let mut topics = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .api::<Page>("STREAM.LIST".into(), &json!({ "offset": offset }))
                .await
                .map_err(|e| e.into_bus("listing streams"))?;
            // An empty page ends the listing even if `total` says more: streams deleted
            // meanwhile must not make it ask forever.
            if page.streams.is_empty() {
                break;
            }
            offset += page.streams.len();
            topics.extend(page.streams.into_iter().filter_map(|s| {
                let c = s.config;
                let named = c.metadata.get(TOPIC_METADATA).map(String::as_str);
                codec::topic_of_stream(&c.name, &c.subjects, named)
            }));
            if offset >= page.total {
                break;
            }
        }
        topics.sort_unstable();
        topics.dedup();
        Ok(topics)
    }

    async fn apply_topic(&self, spec: &TopicSpec) -> Result<(), BusError> {
        codec::validate_topic(&spec.name)?;
        if spec.partitions == 0 {
            return Err(BusError::Config(format!(
                "topic `{}` needs at least one partition",
                spec.name
            )));
        }
        let stream = codec::stream_name(&spec.name);
        // Twice at most: a concurrent `apply` may create the stream between look and create.
        for _ in 0..2 {
            let Some(meta) = self.topic_meta(&spec.name).await? else {
                let config = self.stream_config(spec, &stream);
                let created = self
                    .api::<StreamInfo>(format!("STREAM.CREATE.{stream}"), &json!(config))
                    .await;
                match created {
                    Ok(_) => {
                        tracing::info!(topic = %spec.name, stream, partitions = spec.partitions, "stream created");
                        self.remember_partitions(&spec.name, spec.partitions);
                        return Ok(());
                    }
                    Err(e) if e.code() == Some(ErrorCode::STREAM_NAME_EXIST) => continue,
                    Err(e) => return Err(e.into_bus(&format!("creating stream {stream}"))),
                }
            };
            if spec.partitions < meta.partitions {
                return Err(BusError::Conflict(format!(
                    "topic `{}` has {} partitions; partitions cannot be removed (asked for {})",
                    spec.name, meta.partitions, spec.partitions
                )));
            }
            let max_age = spec.retention.unwrap_or_default();
            let mut config = meta.config.clone();
            // What cannot change in place (retention policy, storage) is left for the
            // operator: `topology plan` reports it and `topology apply` refuses.
            let settings_changed = set_stream_settings(&mut config);
            if spec.partitions == meta.partitions
                && meta.config.max_age == max_age
                && !settings_changed
            {
                return Ok(());
            }
            config.subjects = (0..spec.partitions)
                .map(|p| codec::subject(&spec.name, p))
                .collect();
            config.max_age = max_age;
            config.duplicate_window = config.duplicate_window.min(duplicate_window(max_age));
            self.api::<StreamInfo>(format!("STREAM.UPDATE.{stream}"), &json!(config))
                .await
                .map_err(|e| e.into_bus(&format!("updating stream {stream}")))?;
            tracing::info!(topic = %spec.name, stream, partitions = spec.partitions, "stream updated");
            self.remember_partitions(&spec.name, spec.partitions);
            return Ok(());
        }
        Err(BusError::Conflict(format!(
            "stream {stream} keeps changing while being applied"
        )))
    }

    async fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, BusError> {
        let meta = self.require_topic(topic).await?;
        let mut out = Vec::with_capacity(meta.partitions as usize);
        for partition in 0..meta.partitions {
            let (low, high, _) = self.bounds(&meta, topic, partition).await?;
            out.push(PartitionOffsets {
                partition,
                low,
                high,
            });
        }
        Ok(out)
    }

    async fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError> {
        let meta = self.require_topic(topic).await?;
        let gkey = codec::group_key(group)?;
        let mut out = Vec::with_capacity(meta.partitions as usize);
        for partition in 0..meta.partitions {
            let (_, high, records) = self.bounds(&meta, topic, partition).await?;
            let name = codec::consumer_name(&gkey, partition);
            let position = match self.consumer_info(&meta.stream, &name).await? {
                // No consumer yet: nothing committed, every record is behind.
                None => GroupPosition {
                    partition,
                    committed: None,
                    high,
                    lag: records,
                },
                Some(info) => {
                    // The ack floor is the last stream sequence of the contiguous acked
                    // prefix, so the next offset to consume is that sequence (offset = seq - 1).
                    // A fresh consumer's floor only means something if it was placed by a seek.
                    let placed = matches!(
                        info.config.deliver_policy,
                        DeliverPolicy::ByStartSequence { .. }
                    );
                    let committed = (info.ack_floor.consumer_sequence > 0 || placed)
                        .then(|| info.ack_floor.stream_sequence.min(high));
                    let all_acked = info.num_ack_pending == 0
                        && info.delivered.stream_sequence <= info.ack_floor.stream_sequence;
                    let lag = if all_acked {
                        info.num_pending
                    } else {
                        // Acks above the floor do not count (as on Kafka): count from it.
                        let subject = codec::subject(topic, partition);
                        self.count_from_seq(
                            &meta.stream,
                            &subject,
                            info.ack_floor.stream_sequence + 1,
                        )
                        .await?
                    };
                    GroupPosition {
                        partition,
                        committed,
                        high,
                        lag,
                    }
                }
            };
            out.push(position);
        }
        Ok(out)
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<u64, BusError> {
        let meta = self.require_topic(topic).await?;
        check_partition(&meta, topic, partition)?;
        let at = chrono::DateTime::from_timestamp_millis(ts_ms)
            .ok_or_else(|| BusError::Config(format!("timestamp {ts_ms} ms is out of range")))?
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        // async-nats wants a `time::OffsetDateTime`; going through its serde form avoids a
        // direct dependency on `time`.
        let deliver: DeliverPolicy = serde_json::from_value(
            json!({ "deliver_policy": "by_start_time", "opt_start_time": at }),
        )
        .map_err(|e| BusError::Config(format!("start time {at}: {e}")))?;
        let subject = codec::subject(topic, partition);
        let what = format!("offset for time on {topic}/{partition}");
        // As in `read_range`: a fetch can come back empty, or its answer be lost, while the
        // consumer counts records pending; taking that for "none at or after the time" would
        // answer the log end and a replay would move a group past its backlog. So a new
        // consumer tries again, and after the last try the answer is an error.
        let mut pauses = READ_RETRY_PAUSES.iter();
        loop {
            let consumer = self.ephemeral(&meta.stream, &subject, deliver).await?;
            let pending = consumer.cached_info().num_pending;
            if pending == 0 {
                self.drop_ephemeral(&meta.stream, &consumer).await;
                return Ok(self.bounds(&meta, topic, partition).await?.1);
            }
            let first = tokio::time::timeout(READ_FETCH_TIMEOUT, first_sequence(&consumer, &what))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{what}: a fetch did not end within {READ_FETCH_TIMEOUT:?}"
                    ))
                });
            self.drop_ephemeral(&meta.stream, &consumer).await;
            let why = match first {
                Ok(Some(seq)) => return Ok(seq - 1),
                Ok(None) => format!("{what}: a fetch came back empty"),
                Err(why) => why,
            };
            let Some(pause) = pauses.next() else {
                return Err(BusError::Unavailable(format!(
                    "{why} while {pending} record(s) at or after the time are pending ({} \
                     consumers in a row)",
                    READ_RETRY_PAUSES.len() + 1
                )));
            };
            tracing::debug!(topic, partition, pending, reason = %why, "looking up an offset by time again");
            tokio::time::sleep(*pause).await;
        }
    }

    async fn count_between(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<u64, BusError> {
        if to <= from {
            return Ok(0);
        }
        let meta = self.require_topic(topic).await?;
        check_partition(&meta, topic, partition)?;
        let subject = codec::subject(topic, partition);
        // Offsets [from, to) are sequences [from + 1, to + 1).
        let from_on = self
            .count_from_seq(&meta.stream, &subject, from + 1)
            .await?;
        let to_on = if to >= meta.state.last_seq {
            0
        } else {
            self.count_from_seq(&meta.stream, &subject, to + 1).await?
        };
        Ok(from_on.saturating_sub(to_on))
    }

    async fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BusError> {
        let meta = self.require_topic(topic).await?;
        check_partition(&meta, topic, partition)?;
        let gkey = codec::group_key(group)?;
        let members = self.members(&meta.stream, &gkey).await?;
        if !members.is_empty() {
            return Err(BusError::Conflict(format!(
                "group `{group}` has {} active member(s) on `{topic}`; stop them before moving its offsets",
                members.len()
            )));
        }
        let marks = self.groups_bucket(&meta.stream, topic).await?;
        // Recorded before the group's first consumer exists, as a join would (see
        // `group::joined_partitions`), so a seek on a group that never ran does not make its
        // other partitions look added later.
        group::joined_partitions(&self.inner, &marks, &meta, &gkey).await?;
        self.inner
            .restart_consumer(
                &marks,
                &meta.stream,
                group,
                &gkey,
                topic,
                partition,
                offset + 1,
            )
            .await?;
        tracing::info!(group, topic, partition, offset, "group offset moved");
        Ok(())
    }

    async fn active_members(&self, group: &str, topic: &str) -> Result<usize, BusError> {
        codec::validate_topic(topic)?;
        let gkey = codec::group_key(group)?;
        Ok(self.members(&codec::stream_name(topic), &gkey).await?.len())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Message>, BusError> {
        let meta = self.require_topic(topic).await?;
        check_partition(&meta, topic, partition)?;
        let mut range = RangeRead {
            topic,
            partition,
            // Offsets are sequences minus one.
            next_seq: from.saturating_add(1),
            end_seq: meta.state.last_seq,
            max,
            out: Vec::new(),
        };
        self.inner.read_range(&meta.stream, &mut range).await?;
        Ok(range.out)
    }

    async fn health(&self) -> Result<(), BusError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(self.why_not_connected().await);
        }
        self.js.query_account().await.map_err(|e| {
            use jetstream::context::AccountErrorKind as K;
            match e.kind() {
                K::TimedOut => BusError::Timeout(format!("JetStream account info: {e}")),
                K::JetStreamUnavailable => {
                    BusError::Unavailable("JetStream is not enabled on the NATS server".into())
                }
                K::JetStream(err) => server_error("JetStream account info", &err),
                K::Other => BusError::Unavailable(format!("JetStream account info: {e}")),
            }
        })?;
        Ok(())
    }
}
