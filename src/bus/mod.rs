//! The event bus: one trait ([`Bus`]) with three backends (Kafka, NATS JetStream, embedded log)
//! picked from the bus URL in one place ([`connect`]), plus the consumer runtime built on it.
//!
//! Contract every backend keeps (the conformance suite in `tests/bus_conformance.rs` checks it):
//! - `publish` returns only after the broker acknowledged the record (durable for the backend).
//! - A topic has a fixed number of partitions; the partition is derived from the key with
//!   [`partition_for`], so every backend places a key in the same partition and one key's
//!   records are in publish order within it. Nothing is ordered across partitions.
//! - `subscribe` joins a consumer group; each partition is owned by one member at a time and
//!   yields its records in offset order. A delivery is committed only when acked; acks may come
//!   out of order, the committed position only moves over a contiguous acked prefix. What was
//!   not acked is delivered again after the member dies or leaves.
//! - Offsets are per partition, increase with each record and are what replay and lag speak.
//! - `tail` reads a topic without a group (broadcast): every record appended after the call,
//!   each partition in offset order, nothing acked or committed.

pub mod consumer;
pub mod embedded;
pub mod error;
mod halt;
mod instrumented;
pub mod jetstream;
pub mod kafka;
mod partitioner;
mod tail;
#[cfg(test)]
pub(crate) mod test_support;
pub mod url;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::BusError;
pub use partitioner::partition_for;
pub use url::BusUrl;

use crate::config::BusConfig;

/// Message headers, in order. Names are lower-case ASCII by convention (`nexus-...`), not
/// empty, and never begin with `nats-` (any case): NATS acts on those, so the JetStream bus
/// refuses them.
pub type Headers = Vec<(String, String)>;

/// A record to publish.
#[derive(Debug, Clone)]
pub struct OutRecord {
    /// Partition key: the conversation id for conversation events.
    pub key: String,
    pub payload: Bytes,
    pub headers: Headers,
}

impl OutRecord {
    pub fn new(key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            payload: payload.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Where a published record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub partition: u32,
    pub offset: u64,
}

/// A record read from the log.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    /// Record time, milliseconds since the epoch: the append time on JetStream and the
    /// embedded log, the producer's clock (CreateTime) on Kafka, so replays by time there are
    /// as good as the edges' clocks.
    pub timestamp_ms: i64,
    pub key: String,
    pub payload: Bytes,
    pub headers: Headers,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a topic should look like (from the topology).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    /// How long records are kept; `None` keeps them forever.
    pub retention: Option<Duration>,
}

/// What a topic looks like on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    /// `None` keeps records forever; meaningless when `retention_known` is false.
    pub retention: Option<Duration>,
    /// False when the broker would not describe the topic's config (a Kafka broker without
    /// DescribeConfigs, or an ACL refusing it): retention is then not compared or changed.
    pub retention_known: bool,
    /// The other settings of the topic that nexus relies on, as the backend reads them. One the
    /// broker does not describe is left out: not compared, rather than taken for a default.
    pub settings: Vec<TopicSetting>,
}

/// A setting of a topic on the bus, besides partitions and retention, that nexus relies on:
/// named and valued the backend's way (a JetStream stream's retention policy, a Kafka topic's
/// `cleanup.policy`), with the value nexus creates topics with. `topology plan` reports one
/// that differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSetting {
    /// The backend's name of the setting.
    pub name: &'static str,
    /// Its value on the bus.
    pub value: String,
    /// The value nexus creates the topic with and relies on.
    pub required: &'static str,
    /// Whether [`Bus::apply_topic`] sets it to `required` on an existing topic. When false the
    /// backend cannot change it in place (or not safely), so the operator must: `topology plan`
    /// reports a conflict and `apply` refuses.
    pub in_place: bool,
    /// What goes wrong while it differs, for the operator reading the plan.
    pub why: &'static str,
}

impl TopicSetting {
    /// Whether the bus has what nexus needs.
    pub fn is_required(&self) -> bool {
        self.value == self.required
    }
}

/// The offsets of one partition: `low` is the first offset still kept, `high` the next offset
/// to be written (the log end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: u32,
    pub low: u64,
    pub high: u64,
}

/// A consumer group's position on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupPosition {
    pub partition: u32,
    /// The next offset the group will consume (committed offset); `None` if never committed.
    pub committed: Option<u64>,
    /// Log end of the partition.
    pub high: u64,
    /// Events behind the log end.
    pub lag: u64,
}

/// Options of a subscription.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Where a group with no committed offset starts.
    pub start: StartFrom,
    /// Records handed out and not yet acked, per subscription (backpressure).
    pub max_in_flight: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            start: StartFrom::Earliest,
            max_in_flight: 1024,
        }
    }
}

/// Where a new consumer group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Earliest,
    Latest,
}

/// One delivered record; ack it after its effect.
pub struct Delivery {
    pub message: Message,
    acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .finish()
    }
}

impl Delivery {
    pub fn new(message: Message, acker: Box<dyn Acker>) -> Self {
        Self { message, acker }
    }

    /// Marks the record done. The group's committed offset moves past it once every earlier
    /// record of its partition is acked too; the commit reaches the broker shortly after
    /// (Kafka: within the commit interval; JetStream: with the next flush; embedded: the next
    /// write batch), and at once on a clean leave. A member that dies in that window has its
    /// acked records delivered again (at-least-once). Dropping a delivery without ack leaves
    /// it for redelivery after this member dies or leaves the group.
    pub async fn ack(self) -> Result<(), BusError> {
        self.acker.ack().await
    }

    /// Whether this member no longer owns the record's partition (a rebalance gave it away
    /// after any hand-over wait): its next owner delivers the record again, so handling it
    /// here as well would run its effect twice, beside later records of its key. A record
    /// not yet handled when revoked is dropped unacked.
    pub fn revoked(&self) -> bool {
        self.acker.revoked()
    }

    /// Whether the record's partition is being given away, or was ([`Delivery::revoked`]):
    /// a record not started yet, or waiting between tries, is then dropped unacked, so the
    /// hand-over (which waits for records under way) need not wait for it. Kafka tells it from
    /// the start of a revoke, JetStream from the start of a drain, the embedded log when the
    /// partition moved.
    pub fn revoking(&self) -> bool {
        self.acker.revoking()
    }
}

/// Backend side of [`Delivery::ack`] and [`Delivery::revoked`].
#[async_trait]
pub trait Acker: Send + Sync {
    async fn ack(self: Box<Self>) -> Result<(), BusError>;

    /// See [`Delivery::revoked`]; a tail's records are never revoked.
    fn revoked(&self) -> bool {
        false
    }

    /// See [`Delivery::revoking`].
    fn revoking(&self) -> bool {
        self.revoked()
    }
}

/// A consumer group membership yielding deliveries.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription is closed.
    async fn next(&mut self) -> Option<Result<Delivery, BusError>>;
    /// A delivery (or error) already at hand, without waiting or starting any I/O; `None` when
    /// there is none (an end is left to `next`). Lets the runtime take what is ready in one go.
    fn try_next(&mut self) -> Option<Result<Delivery, BusError>> {
        None
    }
    /// Leaves the group cleanly: commits what was acked and hands the partitions over.
    async fn close(self: Box<Self>) -> Result<(), BusError>;
}

/// The one event-bus interface.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// `embedded`, `kafka` or `jetstream`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Publishes one record and returns after the broker acknowledged it.
    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError>;

    /// Joins `group` on `topic`.
    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// Reads every record appended to `topic` after this call returns, from every partition,
    /// without a consumer group: acks do nothing and nothing is committed (a broadcast reader
    /// such as an edge's socket feed, where every process must see everything). Each
    /// partition's records come in offset order. A reader that lost its connection resumes
    /// after the last record it handed out, so while the process lives nothing retained is
    /// skipped or repeated; a new process starts at the log end again.
    async fn tail(&self, topic: &str) -> Result<Box<dyn Subscription>, BusError>;

    /// The topic as the bus has it, or `None` if it does not exist.
    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BusError>;

    /// The names of the bus's topics, sorted: what `topology plan` compares with the declared
    /// ones to show leftovers. The broker's own topics (Kafka's `__consumer_offsets`) are left
    /// out, and on JetStream every stream that is not a topic's by nexus's naming (key-value
    /// buckets, other applications' streams).
    async fn list_topics(&self) -> Result<Vec<String>, BusError>;

    /// Creates the topic, or updates what can be updated (retention, more partitions).
    async fn apply_topic(&self, spec: &TopicSpec) -> Result<(), BusError>;

    /// Low and high offsets of every partition.
    async fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, BusError>;

    /// The group's position and lag on every partition of the topic.
    async fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError>;

    /// The first offset in `partition` whose append time is at or after `ts_ms`, or the log end.
    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<u64, BusError>;

    /// How many records lie in `[from, to)` of a partition.
    async fn count_between(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<u64, BusError> {
        let _ = (topic, partition);
        Ok(to.saturating_sub(from))
    }

    /// Sets the group's committed offset (the next offset to consume) on a partition.
    async fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BusError>;

    /// How many members are subscribed in the group right now.
    async fn active_members(&self, group: &str, topic: &str) -> Result<usize, BusError>;

    /// Reads a range of a partition (for copying and tools): its records at or after offset
    /// `from`, in offset order, up to `max` of them, up to the partition's log end as it was when
    /// the call began (records appended during the call may come too, never in place of older
    /// ones). Every backend keeps this contract, and callers rely on it alone:
    ///
    /// - **Offsets have gaps.** JetStream offsets are stream sequences shared by the partitions,
    ///   with holes where records were deleted, purged or expired; Kafka has transaction markers;
    ///   retention moves every log's start. A read from an offset without a record starts at the
    ///   next record. Go on from the last record's offset + 1, never from `from + len`, and count
    ///   with [`Bus::count_between`], never by subtracting offsets.
    /// - **Short means the end.** The answer holds `max` records, or fewer only because no more
    ///   were left before that log end; an empty answer means there are none at or after `from`.
    ///   A fetch from the broker that comes back empty or short while records are pending is the
    ///   backend's to repeat, not the caller's; records that retention or a delete removed
    ///   meanwhile are not waited for.
    /// - **Otherwise an error.** Records still pending that cannot be fetched within the
    ///   backend's bound are [`BusError::ReadIncomplete`] (saying how many were pending from
    ///   where), never a short answer that would read as the end.
    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Message>, BusError>;

    /// Checks the bus is reachable (readiness).
    async fn health(&self) -> Result<(), BusError>;
}

/// Connects to the bus named by the URL; the only place backends are picked. The bus comes
/// wrapped so publishes are measured the same way on every backend.
pub async fn connect(config: &BusConfig) -> Result<Arc<dyn Bus>, BusError> {
    let url = BusUrl::parse(&config.url)?;
    let bus: Arc<dyn Bus> = match url {
        BusUrl::Embedded { dir } => Arc::new(embedded::EmbeddedBus::open(&dir, config)?),
        BusUrl::Kafka { brokers, tls } => {
            Arc::new(kafka::KafkaBus::connect(&brokers, tls, config).await?)
        }
        BusUrl::Nats { url, tls } => {
            Arc::new(jetstream::JetStreamBus::connect(&url, tls, config).await?)
        }
    };
    Ok(instrumented::InstrumentedBus::wrap(bus))
}

/// Dead-letter topic of a topic.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Header names nexus sets.
pub mod headers {
    /// Why a record was dead-lettered (machine-readable code).
    pub const DLQ_REASON: &str = "nexus-dlq-reason";
    /// Human-readable detail of the failure.
    pub const DLQ_ERROR: &str = "nexus-dlq-error";
    pub const DLQ_SOURCE_TOPIC: &str = "nexus-dlq-source-topic";
    pub const DLQ_SOURCE_PARTITION: &str = "nexus-dlq-source-partition";
    pub const DLQ_SOURCE_OFFSET: &str = "nexus-dlq-source-offset";
    pub const DLQ_GROUP: &str = "nexus-dlq-group";
    /// Set (to the payload's size in bytes) on a dead-letter record whose copy with its payload
    /// was larger than the bus takes: the payload stays in the source topic at the source offset.
    pub const DLQ_PAYLOAD_OMITTED: &str = "nexus-dlq-payload-omitted";
    /// The event type, set by publishers so tools can filter without decoding.
    pub const EVENT_TYPE: &str = "nexus-event-type";
    /// W3C trace context, copied from the envelope for tools that do not decode Avro.
    pub const TRACEPARENT: &str = "traceparent";
}
