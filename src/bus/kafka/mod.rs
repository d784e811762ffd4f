//! Kafka bus via rdkafka (librdkafka): keyed partitions, consumer groups with cooperative
//! rebalancing, manual commit of the contiguous acked prefix, idempotent producer.
//!
//! Acks are cheap: an ack is recorded in memory and the acked prefix is committed in the
//! background (every 100 ms or every 1000 records, see `consumer`), and synchronously before a
//! revoke completes, when a member leaves and before this process reads the group's positions.
//! Durability window: what was acked but not yet committed when the process dies is delivered
//! again (at-least-once), at most one commit interval's worth of acks.
//!
//! - [`KafkaBus`] (this file): connection settings, the producer and the error mapping.
//! - `consumer`: one consumer-group member per subscription, its poll thread, ack tracking and
//!   the rebalance handling that keeps commits exact across partition moves.
//! - `admin`: topics, offsets, group positions, replay reads and health.
//!
//! A fatal producer error (librdkafka raises one when the idempotent producer's sequence
//! numbers cannot be brought back in step) leaves the producer refusing every record for good;
//! librdkafka's guidance is to create a new one. The publish that meets it (or the readiness
//! check that sees it) replaces the producer, logs librdkafka's reason at ERROR and counts
//! [`PRODUCER_RECREATED_TOTAL`]; that publish fails as `Unavailable` (retryable), the next ones
//! go through the new producer.
//!
//! Ordering: the producer picks the partition from the key with [`partition_for`], so one key's
//! records keep their publish order within one partition (librdkafka's idempotent producer keeps
//! order across retries). Nothing is ordered across partitions or across topics.

mod admin;
mod consumer;
mod tail;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::*;
use crate::config::BusConfig;

/// How long metadata, watermark and admin requests may take before they count as a timeout.
/// Long enough for a broker under load, short enough that readiness and tools answer promptly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Readiness must answer quickly: a broker that cannot give metadata in this time is not ready.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a cached partition count is trusted. Partitions only grow (by `topology apply`), and a
/// publisher that keeps using the old count only places new keys on the old partitions for this
/// long, so a short refresh keeps every process agreeing on key placement soon after a change.
const PARTITION_CACHE_TTL: Duration = Duration::from_secs(30);

/// How long a new member waits for a leave of the same group in this process to finish: a
/// leave commits and sends LeaveGroup, which takes milliseconds unless the broker is down.
const LEAVE_ORDER_WAIT: Duration = Duration::from_secs(10);

/// Producers replaced after a fatal error, by the error's code (see the module doc).
pub(crate) use crate::telemetry::metrics::BUS_PRODUCER_RECREATED_TOTAL as PRODUCER_RECREATED_TOTAL;

/// How long a replaced producer is kept for the publishes still holding it, beyond their own
/// `message.timeout.ms`: librdkafka answers each of them by then, and dropping the producer
/// (which purges and flushes for up to 500 ms, then joins its threads) is left to a thread of
/// its own instead of the async worker that happens to drop the last reference.
const RETIRE_MARGIN: Duration = Duration::from_secs(5);

/// The Kafka backend.
pub struct KafkaBus {
    producer: ProducerSlot,
    admin: AdminClient<DefaultClientContext>,
    /// Groupless consumer for watermarks and offset lookups (no group, never subscribes).
    meta: Arc<BaseConsumer>,
    /// Non-member consumers per group, for reading and setting committed offsets.
    group_clients: Mutex<HashMap<String, Arc<BaseConsumer>>>,
    /// Partition counts per topic, from metadata.
    partitions: Mutex<HashMap<String, (u32, Instant)>>,
    /// Members started by this bus, per group, so a join waits for a leave in progress.
    members: Mutex<HashMap<String, Vec<consumer::MemberHandle>>>,
    settings: Arc<Settings>,
}

/// The producer in use and what replacing it needs. Publishes take the current producer with an
/// atomic load (no lock); only a replacement takes `replacing`.
struct ProducerSlot {
    current: ArcSwap<FutureProducer>,
    /// The producer's settings, to create its replacement.
    config: ClientConfig,
    /// Held while the producer is replaced, so publishes that meet the same fatal error at once
    /// replace it once (the later ones find it replaced already).
    replacing: Mutex<()>,
}

/// What every client of this bus shares: addresses, security and the Kafka settings.
/// No `Debug`: it holds the SASL password.
pub(crate) struct Settings {
    brokers: String,
    tls: bool,
    config: BusConfig,
}

/// See `consumer_config`.
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

impl Settings {
    /// Bootstrap servers and security, the part every client (producer, consumer, admin) needs.
    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "nexus")
            // Topics are created by `nexus topology apply` with their partitions and retention;
            // a typo must fail as UnknownTopic, not create a one-partition topic.
            .set("allow.auto.create.topics", "false")
            // Requests are small and pipelined: with Nagle one can wait for the ACK of the one
            // before it.
            .set("socket.nagle.disable", "true")
            // Partitions added by `topology apply` are seen within this (librdkafka's default
            // is 5 minutes), like JetStream's `partitions_refresh_ms`.
            .set("topic.metadata.refresh.interval.ms", "30000");
        let k = &self.config.kafka;
        let sasl = !k.sasl_mechanism.is_empty();
        let protocol = match (self.tls, sasl) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        if self.tls {
            if !self.config.ca_file.is_empty() {
                c.set("ssl.ca.location", &self.config.ca_file);
            }
            if !self.config.client_cert_file.is_empty() {
                c.set("ssl.certificate.location", &self.config.client_cert_file);
                c.set("ssl.key.location", &self.config.client_key_file);
            }
        }
        if sasl {
            c.set("sasl.mechanism", &k.sasl_mechanism)
                .set("sasl.username", &k.sasl_username)
                .set("sasl.password", &k.sasl_password);
        }
        c
    }

    /// A consumer that never commits by itself: offsets move only by explicit commits.
    fn consumer_config(&self, group: Option<&str>) -> ClientConfig {
        let mut c = self.client_config();
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // A backlog larger than the prefetch queue fills it whenever handlers are slower
            // than fetching; librdkafka then postpones that partition's next fetch by this
            // much (its default, 1 s, left the consumer idle for most of each second with a
            // backlog of 300 000 records: 210k instead of 400k records/s). 10 ms costs a few
            // wake-ups of the fetcher per second while the queue stays full.
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
            .set(
                "queued.max.messages.kbytes",
                self.config.kafka.prefetch_kbytes.to_string(),
            );
        if let Some(group) = group {
            c.set("group.id", group);
        }
        c
    }
}

impl KafkaBus {
    /// Creates the producer and admin clients and checks the brokers answer.
    pub async fn connect(brokers: &str, tls: bool, config: &BusConfig) -> Result<Self, BusError> {
        let settings = Arc::new(Settings {
            brokers: brokers.to_string(),
            tls,
            config: config.clone(),
        });
        let k = &config.kafka;
        let mut pc = settings.client_config();
        pc.set("acks", "all")
            .set(
                "enable.idempotence",
                if k.enable_idempotence {
                    "true"
                } else {
                    "false"
                },
            )
            .set("message.timeout.ms", k.message_timeout_ms.to_string())
            // Edges answer only after the broker acked, so publish latency is user latency;
            // under load records still batch while earlier requests are in flight.
            .set("linger.ms", "1");
        let producer: FutureProducer = pc.create().map_err(config_err)?;
        let producer = ProducerSlot {
            current: ArcSwap::from_pointee(producer),
            config: pc,
            replacing: Mutex::new(()),
        };
        let admin: AdminClient<DefaultClientContext> =
            settings.client_config().create().map_err(config_err)?;
        let meta: BaseConsumer = settings
            .consumer_config(None)
            .create()
            .map_err(config_err)?;
        let bus = KafkaBus {
            producer,
            admin,
            meta: Arc::new(meta),
            group_clients: Mutex::new(HashMap::new()),
            partitions: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            settings,
        };
        // A first request also opens the connections, which takes longer than a readiness
        // check allows on a busy node: the request timeout, not the health one.
        bus.brokers_answer(REQUEST_TIMEOUT).await?;
        Ok(bus)
    }

    /// The partition count of `topic`, from the cache or metadata.
    async fn partition_count(&self, topic: &str) -> Result<u32, BusError> {
        if let Some((n, at)) = lock(&self.partitions).get(topic) {
            if at.elapsed() < PARTITION_CACHE_TTL {
                return Ok(*n);
            }
        }
        let n = self
            .fetch_partition_count(topic)
            .await?
            .ok_or_else(|| BusError::UnknownTopic(topic.into()))?;
        lock(&self.partitions).insert(topic.to_string(), (n, Instant::now()));
        Ok(n)
    }

    /// The producer to publish with: one atomic load and a reference count, no lock. Held by
    /// the caller until its record is answered, so a replacement never drops it under a send.
    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.current.load_full()
    }

    /// Replaces `failed`, which reported the fatal error `fatal` (librdkafka's code and reason),
    /// with a new producer, unless another caller already did; true if replaced here. Logs,
    /// counts [`PRODUCER_RECREATED_TOTAL`] and retires `failed` once the publishes still holding
    /// it are answered.
    pub(crate) fn recreate_producer(
        &self,
        failed: &Arc<FutureProducer>,
        fatal: &(RDKafkaErrorCode, String),
    ) -> Result<bool, BusError> {
        let (code, reason) = fatal;
        let _replacing = lock(&self.producer.replacing);
        if !Arc::ptr_eq(&self.producer.current.load(), failed) {
            return Ok(false);
        }
        let fresh: FutureProducer = self.producer.config.create().map_err(|e| {
            tracing::error!(code = ?code, reason = %reason, error = %e, "the Kafka producer failed fatally and creating a new one failed; publishes fail until one is created");
            BusError::Unavailable(format!("creating a new Kafka producer: {e}"))
        })?;
        let old = self.producer.current.swap(Arc::new(fresh));
        tracing::error!(code = ?code, reason = %reason, "the Kafka producer failed fatally (librdkafka refuses every record after that); replaced it with a new one, records it had not delivered are retried by their publishers");
        metrics::counter!(PRODUCER_RECREATED_TOTAL, "code" => format!("{code:?}")).increment(1);
        let keep =
            Duration::from_millis(self.settings.config.kafka.message_timeout_ms) + RETIRE_MARGIN;
        retire(old, keep);
        Ok(true)
    }

    /// Replaces `producer` if it has a fatal error (after a publish on it failed with `code`);
    /// the error for the caller if so.
    fn check_fatal(
        &self,
        producer: &Arc<FutureProducer>,
        code: Option<RDKafkaErrorCode>,
    ) -> Option<BusError> {
        let fatal = fatal_error_of(code, producer.client().fatal_error())?;
        if let Err(e) = self.recreate_producer(producer, &fatal) {
            return Some(e);
        }
        Some(BusError::Unavailable(format!(
            "the Kafka producer failed fatally ({:?}: {}); a new one takes the next publishes",
            fatal.0, fatal.1
        )))
    }

    fn forget_partitions(&self, topic: &str) {
        lock(&self.partitions).remove(topic);
    }

    /// Partitions of `topic` from fresh metadata; `None` if the topic does not exist. Asked
    /// through the producer's client: the answer updates that client's view too, so a key
    /// placed on a partition just added is one the producer knows (it refuses a partition past
    /// its own count, and on its own looks again only every metadata refresh interval).
    async fn fetch_partition_count(&self, topic: &str) -> Result<Option<u32>, BusError> {
        let producer = self.producer();
        let name = topic.to_string();
        blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&name), REQUEST_TIMEOUT)
                .map_err(map_err)?;
            let Some(t) = md.topics().iter().find(|t| t.name() == name) else {
                return Ok(None);
            };
            match t.error() {
                None if !t.partitions().is_empty() => Ok(Some(t.partitions().len() as u32)),
                None => Ok(None),
                Some(e) => match RDKafkaErrorCode::from(e) {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        Ok(None)
                    }
                    code => Err(map_code(code, "topic metadata")),
                },
            }
        })
        .await
    }

    /// The non-member consumer of `group` (cached: creating a client costs threads and sockets).
    fn group_client(&self, group: &str) -> Result<Arc<BaseConsumer>, BusError> {
        let mut clients = lock(&self.group_clients);
        if let Some(c) = clients.get(group) {
            return Ok(Arc::clone(c));
        }
        let c: BaseConsumer = self
            .settings
            .consumer_config(Some(group))
            .create()
            .map_err(config_err)?;
        let c = Arc::new(c);
        clients.insert(group.to_string(), Arc::clone(&c));
        Ok(c)
    }

    /// Waits (bounded) until members of `group` that were closed or dropped have left.
    ///
    /// A join racing a leave is legal Kafka, but a coordinator may then pick the leaving member
    /// as the group leader: Tansu 0.6 keeps such a departed leader and never completes the
    /// rebalance. Joining after the leave avoids that, and costs nothing on any broker.
    async fn wait_for_leaves(&self, group: &str) {
        let deadline = Instant::now() + LEAVE_ORDER_WAIT;
        loop {
            let leaving = {
                let mut members = lock(&self.members);
                let list = members.entry(group.to_string()).or_default();
                list.retain(|m| !m.done());
                list.iter().any(consumer::MemberHandle::leaving)
            };
            if !leaving || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Commits what this process's members of `group` on `topic` acked and have not committed
    /// yet, so the positions read next include every ack made here (acks are committed in the
    /// background otherwise). A failure only leaves the positions behind by the uncommitted acks.
    async fn flush_local_acks(&self, group: &str, topic: &str) {
        let members: Vec<consumer::MemberHandle> = lock(&self.members)
            .get(group)
            .map(|list| {
                list.iter()
                    .filter(|m| m.is_of(topic) && m.active(None))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if members.is_empty() {
            return;
        }
        let result = blocking(move || {
            for m in &members {
                m.flush()?;
            }
            Ok(())
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(group, topic, error = %e, "cannot commit acked offsets before reading positions");
        }
    }

    /// Members of `group` this process runs (of `topic`, or of any topic).
    pub(crate) fn local_members(&self, group: &str, topic: Option<&str>) -> usize {
        lock(&self.members)
            .get(group)
            .map_or(0, |list| list.iter().filter(|m| m.active(topic)).count())
    }

    async fn check_partition(&self, topic: &str, partition: u32) -> Result<u32, BusError> {
        let n = match self.fetch_partition_count(topic).await? {
            Some(n) => n,
            None => return Err(BusError::UnknownTopic(topic.into())),
        };
        if partition >= n {
            return Err(BusError::UnknownPartition {
                topic: topic.into(),
                partition,
            });
        }
        Ok(n)
    }
}

#[async_trait]
impl Bus for KafkaBus {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError> {
        let partitions = self.partition_count(topic).await?;
        let partition = partition_for(&record.key, partitions);
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (name, value) in &record.headers {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let fr = FutureRecord::to(topic)
            .partition(partition as i32)
            .key(record.key.as_bytes())
            .payload(record.payload.as_ref())
            .headers(headers);
        let timeout = Duration::from_millis(self.settings.config.kafka.message_timeout_ms);
        let producer = self.producer();
        match producer.send(fr, timeout).await {
            Ok(d) => Ok(Published {
                partition: u32::try_from(d.partition).map_err(|_| bad_data("partition"))?,
                offset: u64::try_from(d.offset).map_err(|_| bad_data("offset"))?,
            }),
            Err((e, _)) => {
                let m = map_err(e);
                if let Some(e) = self.check_fatal(&producer, m.code) {
                    return Err(e);
                }
                match m.code {
                    Some(
                        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic,
                    ) => {
                        self.forget_partitions(topic);
                        Err(BusError::UnknownTopic(topic.into()))
                    }
                    // Partitions changed under the cached count: refresh on the next publish.
                    Some(RDKafkaErrorCode::UnknownPartition) => {
                        self.forget_partitions(topic);
                        Err(m.error)
                    }
                    _ => Err(m.error),
                }
            }
        }
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        if self.fetch_partition_count(topic).await?.is_none() {
            return Err(BusError::UnknownTopic(topic.into()));
        }
        self.wait_for_leaves(group).await;
        let (sub, handle) =
            consumer::KafkaSubscription::start(&self.settings, group, topic, options)?;
        lock(&self.members)
            .entry(group.to_string())
            .or_default()
            .push(handle);
        Ok(Box::new(sub))
    }

    async fn tail(&self, topic: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(tail::start(self, topic).await?))
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BusError> {
        admin::topic_info(self, topic).await
    }

    async fn list_topics(&self) -> Result<Vec<String>, BusError> {
        admin::list_topics(self).await
    }

    async fn apply_topic(&self, spec: &TopicSpec) -> Result<(), BusError> {
        let r = admin::apply_topic(self, spec).await;
        self.forget_partitions(&spec.name);
        r
    }

    async fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, BusError> {
        admin::partition_offsets(self, topic).await
    }

    async fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError> {
        self.flush_local_acks(group, topic).await;
        admin::group_positions(self, group, topic).await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<u64, BusError> {
        admin::offset_for_time(self, topic, partition, ts_ms).await
    }

    async fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BusError> {
        admin::seek_group(self, group, topic, partition, offset).await
    }

    async fn active_members(&self, group: &str, topic: &str) -> Result<usize, BusError> {
        admin::active_members(self, group, topic).await
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Message>, BusError> {
        admin::read(self, topic, partition, from, max).await
    }

    async fn health(&self) -> Result<(), BusError> {
        // A producer with a fatal error refuses every publish: not ready. It is replaced here
        // too, so a pod that gets no publishes while unready does not stay so.
        if let Some(e) = self.check_fatal(&self.producer(), None) {
            return Err(e);
        }
        self.brokers_answer(HEALTH_TIMEOUT).await
    }
}

impl KafkaBus {
    /// Whether the cluster answers a metadata request within `timeout` with some brokers.
    async fn brokers_answer(&self, timeout: Duration) -> Result<(), BusError> {
        let meta = Arc::clone(&self.meta);
        blocking(move || {
            let md = meta
                .client()
                .fetch_metadata(None, timeout)
                .map_err(map_err)?;
            if md.brokers().is_empty() {
                return Err(BusError::Unavailable(
                    "the cluster reported no brokers".into(),
                ));
            }
            Ok(())
        })
        .await
    }
}

/// Runs a blocking rdkafka call (metadata, watermarks, commits) off the async workers.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, BusError>
where
    F: FnOnce() -> Result<T, BusError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BusError::Unavailable(format!("kafka client task failed: {e}")))?
}

/// Locks a mutex; a poisoned lock only means another thread panicked while holding plain
/// bookkeeping data, which stays consistent between statements, so it is used as is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The fatal error a publish that failed with `code` met, from the producer's own fatal error
/// (`rd_kafka_fatal_error`), if the producer must be replaced: once librdkafka raised one it
/// refuses every record with `_FATAL`, fails those queued at that moment with `_PURGE_QUEUE`
/// and those in flight with the broker's code (`OUT_OF_ORDER_SEQUENCE_NUMBER`, ...). The same
/// broker codes without a fatal error are ones librdkafka recovers from by itself (it bumps the
/// idempotent producer's epoch), so the producer stays.
fn fatal_error_of(
    code: Option<RDKafkaErrorCode>,
    client_fatal: Option<(RDKafkaErrorCode, String)>,
) -> Option<(RDKafkaErrorCode, String)> {
    match (code, client_fatal) {
        (_, Some(fatal)) => Some(fatal),
        (Some(RDKafkaErrorCode::Fatal), None) => Some((
            RDKafkaErrorCode::Fatal,
            "librdkafka refused the record as fatal without saying why".into(),
        )),
        _ => None,
    }
}

/// Drops a replaced producer on a thread of its own once nobody else holds it (the publishes
/// in flight on it are answered) or after `keep`, whichever comes first.
fn retire(old: Arc<FutureProducer>, keep: Duration) {
    let spawned = std::thread::Builder::new()
        .name("kafka-retire".into())
        .spawn(move || {
            let deadline = Instant::now() + keep;
            while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(old);
        });
    if let Err(e) = spawned {
        // The producer is then dropped by whoever holds it last.
        tracing::warn!(error = %e, "cannot start the thread retiring a replaced Kafka producer");
    }
}

fn config_err(e: KafkaError) -> BusError {
    BusError::Config(format!("kafka client: {e}"))
}

pub(crate) fn bad_data(what: &str) -> BusError {
    BusError::Unavailable(format!("kafka broker returned an invalid {what}"))
}

/// A [`BusError`] with the librdkafka code it came from, for callers that refine it.
pub(crate) struct MappedError {
    pub(crate) code: Option<RDKafkaErrorCode>,
    pub(crate) error: BusError,
}

impl From<MappedError> for BusError {
    fn from(m: MappedError) -> BusError {
        m.error
    }
}

/// Maps an rdkafka error; transient conditions become `Unavailable` or `Timeout`.
pub(crate) fn map_err(e: KafkaError) -> MappedError {
    match &e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => MappedError {
            code: None,
            error: BusError::Config(e.to_string()),
        },
        KafkaError::Canceled => MappedError {
            code: None,
            error: BusError::Unavailable("kafka client shut down".into()),
        },
        // Admin results carry the broker's code but `rdkafka_error_code` does not expose it.
        KafkaError::AdminOp(code) => MappedError {
            code: Some(*code),
            error: map_code(*code, "admin operation"),
        },
        _ => match e.rdkafka_error_code() {
            Some(code) => MappedError {
                code: Some(code),
                error: map_code(code, &e.to_string()),
            },
            None => MappedError {
                code: None,
                error: BusError::Unavailable(e.to_string()),
            },
        },
    }
}

/// Maps a librdkafka/Kafka error code to a [`BusError`] kind.
pub(crate) fn map_code(code: RDKafkaErrorCode, context: &str) -> BusError {
    use RDKafkaErrorCode as C;
    let msg = format!("{context}: {code}");
    match code {
        C::MessageTimedOut | C::OperationTimedOut | C::RequestTimedOut | C::TimedOutQueue => {
            BusError::Timeout(msg)
        }
        // The client's own `message.max.bytes` check and the broker's answer share the code.
        C::MessageSizeTooLarge => BusError::TooLarge(msg),
        C::InvalidPartitions | C::InvalidReplicationFactor | C::PolicyViolation => {
            BusError::Conflict(msg)
        }
        C::RebalanceInProgress | C::IllegalGeneration | C::UnknownMemberId => {
            BusError::Conflict(msg)
        }
        // The broker lacks the API (Tansu 0.6 has no CreatePartitions or AlterConfigs): retrying
        // does not help, an operator has to act.
        C::UnsupportedFeature | C::UnsupportedVersion => BusError::Conflict(format!(
            "{msg} (the broker does not implement this operation)"
        )),
        C::SaslAuthenticationFailed
        | C::Authentication
        | C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::SSL
        | C::InvalidConfig => BusError::Config(msg),
        // Everything else (transport, coordinator moves, leader elections, full queues, unknown
        // topics seen by a client whose metadata is stale) may pass on retry.
        _ => BusError::Unavailable(msg),
    }
}
