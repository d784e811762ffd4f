//! Consumer groups on JetStream: partition leases, per-partition fetch loops, and keeping
//! handed-out records alive.
//!
//! Each (group, partition) has one durable pull consumer. A member may pull from it only while
//! it holds the partition's **lease**, a key `<group>.p.<partition>` in the topic's KV bucket
//! `nexus_leases_<stream>`: taken with `create` (fails while another member holds it), renewed
//! with `update(revision)` (fails once someone else took it), released with a revision-checked
//! delete. The bucket's `max_age` is the longest `lease_ttl` any member asked for (it is only
//! raised; each member times its leases by its own, never longer), so a dead member's leases
//! and heartbeats (`<group>.m.<member>`) vanish by themselves. Every member reads the live heartbeats, sorts
//! them and takes the partitions `p` with `p % members == its index` (fair share); a member
//! holding a partition it should not drains it first: it stops pulling, waits until what it
//! handed out is acked (or `drain_timeout`), NAKs what is left, then deletes the lease.
//!
//! **Why per-key order holds across members.** JetStream delivers a consumer's pending
//! redeliveries before new records, and a NAK makes a record redeliverable at once; so a new
//! owner sees the old owner's unacked records first, in sequence order, provided they are
//! redeliverable by the time it pulls:
//! - clean handover: the old owner NAKs them in sequence order before deleting the lease;
//! - dead owner: its records become redeliverable `ack_wait` after their last delivery or
//!   `+WPI`, while its lease lasts `lease_ttl` after its last renewal (`lease_ttl > ack_wait`,
//!   enforced by config). The owner only sends a pull request (expiring after `fetch_expires`)
//!   or a `+WPI` while `now + fetch_expires + ack_wait + safety <= renewal_sent + lease_ttl`,
//!   so everything it ever received is redeliverable `safety` before the lease can expire,
//!   however it dies. Renewals every `(lease_ttl - ack_wait) / 4` keep that true while alive.
//!   A live owner whose renewals go unanswered starts no held record past that deadline and
//!   gives the partition up (`JetStreamAcker::revoked`), so its lanes do not work on beside
//!   the next owner.
//!
//! **Where a consumer starts.** The consumers of a group new on a topic start at its start
//! setting; those of partitions added later start at the partition's beginning (everything in
//! them came after the group's start; see [`joined_partitions`]); a consumer deleted by a
//! restart at the ack floor that could not create it again is created at the floor by whoever
//! needs it next (see `Inner::restart_consumer` for each point where a restart can stop).
//!
//! A slow handler is not overtaken by a redelivery to its own member: records handed out and
//! not acked are kept alive with `+WPI` every `ack_wait / 3` while the lease holds. A record
//! dropped without ack stays pending (and alive) until the partition is handed over, where it
//! is NAKed for the next owner, as the bus contract says.
//!
//! **Acks are plain, not confirmed.** `Delivery::ack` publishes `+ACK` to the record's reply
//! subject and returns without waiting for the server (no double ack): a returned ack is
//! *sent*, not yet *committed*: it returns once the connection flushed it to the socket, so a
//! process dying right after an ack does not lose it (a test kills a member's runtime right
//! after its acks). The server applies it on arrival; only a connection that breaks before
//! the server read it loses a returned ack. A lost ack only means the record is delivered again
//! (after `ack_wait`, or at once to a next owner that restarts at the ack floor): at-least-once,
//! handlers are idempotent. The bookkeeping stays exact on the member's side: a record leaves
//! the in-flight set only once its ack was handed to the connection, so a hand-over waits for
//! the acks of what it handed out, NAKs only what was not acked, and flushes the connection
//! before deleting the lease (acks and NAKs reach the server before the next owner can pull);
//! `+WPI` is sent only for records still in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, Consumer, DeliverPolicy, FromConsumer};
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, AckKind, Context, ErrorCode};
use async_nats::Subject;
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::flush::Flusher;
use super::{codec, consumer_error, timestamp_ms, Inner, Timing, TopicMeta};
use crate::bus::halt::Halt;
use crate::bus::{Acker, BusError, Delivery, StartFrom, SubscribeOptions, Subscription};

/// Records asked for per pull request, at most (bounded further by free in-flight slots, which
/// never exceed the consumer's `max_ack_pending`).
const BATCH_MAX: usize = 512;
/// With fewer free slots than this (bounded by a quarter of the in-flight limit), a pull waits
/// up to [`BATCH_LINGER`] for more: when the handlers are the bottleneck every ack frees one
/// slot, and pulling one record per round trip would cost more than it brings.
const BATCH_MIN: usize = 64;
const BATCH_LINGER: Duration = Duration::from_millis(2);
/// Pause after a failed pull or consumer lookup before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The topic's lease bucket, created or raised to this member's lease time. Only a bucket
/// that is not there is created with this member's value; an error is not taken for "none"
/// (that would lower it).
async fn keep_lease_bucket(
    bus: &Inner,
    bucket: &str,
    topic: &str,
    joining: bool,
) -> Result<kv::Store, BusError> {
    let existing = bus
        .stream_info(&format!("KV_{bucket}"), None)
        .await?
        .map(|info| info.config.max_age);
    let own = bus.timing.lease_ttl;
    if let Some(e) = existing.filter(|e| *e >= own) {
        if e > own && joining {
            warn!(
                bucket, bucket_ms = e.as_millis() as u64, config_ms = own.as_millis() as u64,
                "the lease bucket keeps leases longer than bus.nats.lease_ttl_ms; kept (a member may count on it)"
            );
        }
        return bus
            .js
            .get_key_value(bucket)
            .await
            .map_err(|e| BusError::Unavailable(format!("lease bucket {bucket}: {e}")));
    }
    bus.js
        .create_or_update_key_value(kv::Config {
            bucket: bucket.to_string(),
            description: format!("nexus partition leases of topic `{topic}`"),
            history: 1,
            max_age: own,
            storage: jetstream::stream::StorageType::File,
            num_replicas: bus.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| BusError::Unavailable(format!("lease bucket {bucket}: {e}")))
}

/// Joins `group` on `topic`; see the module doc.
pub(super) async fn subscribe(
    bus: &Arc<Inner>,
    group: &str,
    topic: &str,
    options: SubscribeOptions,
) -> Result<Box<dyn Subscription>, BusError> {
    let meta = bus.require_topic(topic).await?;
    let group_key = codec::group_key(group)?;
    let bucket = codec::lease_bucket(&meta.stream);
    // Leases live as long as the bucket's max age, while each member times its own from its
    // config: the bucket is only ever raised, so no member counts on a lease outliving it (a
    // member whose config says less gives its leases up early, which is safe). Lowering
    // `bus.nats.lease_ttl_ms` therefore takes effect once the bucket is deleted (it holds
    // nothing but leases) with every member stopped.
    // Two members writing at once (read, then write) can still leave the shorter value: each
    // member looks again with every partition-count refresh (`keep_lease_bucket`).
    let kv = keep_lease_bucket(bus, &bucket, topic, true).await?;
    let marks = bus.groups_bucket(&meta.stream, topic).await?;
    let joined = joined_partitions(bus, &marks, &meta, &group_key).await?;
    let max_in_flight = options.max_in_flight.max(1);
    let (tx, rx) = mpsc::channel(max_in_flight + 8);
    let g = Arc::new(Group {
        js: bus.js.clone(),
        client: bus.client.clone(),
        acks: Arc::new(AckPath {
            client: bus.client.clone(),
            flusher: Flusher::start(bus.client.clone()),
        }),
        bus_timing: bus.timing,
        topic: topic.to_string(),
        stream: meta.stream.clone(),
        group: group.to_string(),
        group_key,
        member: uuid::Uuid::now_v7().simple().to_string(),
        kv,
        bucket,
        marks,
        joined,
        start: options.start,
        max_ack_pending: max_in_flight as i64,
        permits: Arc::new(Semaphore::new(max_in_flight)),
        tx,
        leave: CancellationToken::new(),
        slots: Mutex::new(BTreeMap::new()),
        worker_done: Notify::new(),
    });
    // Consumers exist from the join on, so `Latest` means "from now" and positions show them.
    for partition in 0..meta.partitions {
        ensure_consumer(bus, &g, partition).await?;
    }
    let span = tracing::info_span!("jetstream_group", topic, group, member = %g.member);
    let coordinator =
        tokio::spawn(coordinate(bus.clone(), g.clone(), meta.partitions).instrument(span));
    info!(topic, group, member = %g.member, "joined consumer group");
    Ok(Box::new(JetStreamSubscription {
        rx,
        leave: g.leave.clone(),
        coordinator: Some(coordinator),
    }))
}

/// State shared by a subscription's tasks.
struct Group {
    js: Context,
    client: async_nats::Client,
    acks: Arc<AckPath>,
    bus_timing: Timing,
    topic: String,
    stream: String,
    group: String,
    group_key: String,
    member: String,
    kv: kv::Store,
    bucket: String,
    /// The group-state bucket: restart marks (see `Inner::restart_consumer`).
    marks: kv::Store,
    /// Partitions the topic had when the group joined it (see [`joined_partitions`]).
    joined: u32,
    start: StartFrom,
    max_ack_pending: i64,
    /// In-flight records of the subscription (backpressure): one permit per handed-out record.
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Result<Delivery, BusError>>,
    /// Cancelled when the subscription closes or is dropped.
    leave: CancellationToken,
    /// Partitions held now, for the progress keeper.
    slots: Mutex<BTreeMap<u32, Arc<Slot>>>,
    /// A partition worker finished (the coordinator releases its lease at once).
    worker_done: Notify,
}

impl Group {
    fn timing(&self) -> &Timing {
        &self.bus_timing
    }
}

/// What an ack needs, shared by every delivery: cloning an `async_nats::Client` per record
/// cost more than the ack's own work.
struct AckPath {
    client: async_nats::Client,
    /// Shared flushes of `client`.
    flusher: Flusher,
}

/// A partition this member holds.
struct Slot {
    partition: u32,
    lease: Mutex<Lease>,
    /// Set when the partition is to be handed over.
    draining: AtomicBool,
    /// Fired when the lease was lost: stop at once, release nothing (checked per record).
    lost: Halt,
    /// Set when the partition is given back after its drain: records still queued in the
    /// consumer's lanes are the next owner's (see `Delivery::revoked`).
    released: AtomicBool,
    /// Wakes the worker: draining started, or (while draining) a handed-out record was settled.
    wake: Notify,
    /// Handed-out records not acked yet, by stream sequence.
    inflight: Mutex<BTreeMap<u64, Inflight>>,
    /// The partition's consumer (its creation time, ns) and the last consumer sequence this
    /// member read from it: a release checks that the server delivered nothing more.
    read_upto: Mutex<Option<(i128, u64)>>,
    /// The previous owner released the partition (the lease key's last operation was its
    /// delete), after NAKing what it left, which the server redelivers first, in order.
    after_release: bool,
}

#[derive(Clone, Copy)]
struct Lease {
    revision: u64,
    /// Renewal send time + TTL: the lease cannot expire before this.
    deadline: Instant,
}

struct Inflight {
    reply: Subject,
    /// The delivery was dropped without ack: nobody works on it, it waits for the handover.
    abandoned: bool,
}

impl Slot {
    fn lease(&self) -> Lease {
        *lock(&self.lease)
    }

    fn settle(&self, seq: u64) {
        lock(&self.inflight).remove(&seq);
        self.settled();
    }

    fn abandon(&self, seq: u64) {
        if let Some(entry) = lock(&self.inflight).get_mut(&seq) {
            entry.abandoned = true;
        }
        self.settled();
    }

    /// Only a drain waits for settled records (the fetch loop waits for in-flight permits);
    /// waking the worker on every ack would cost a wake-up per record. A drain sets `draining`
    /// before it looks, and a notification with nobody waiting is kept for the next wait.
    fn settled(&self) {
        if self.draining.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.is_set()
    }

    /// Nothing handed out is still being worked on.
    fn idle(&self) -> bool {
        lock(&self.inflight).values().all(|e| e.abandoned)
    }
}

/// Locks a mutex, recovering from a poisoned one (the data stays consistent: every critical
/// section is a single map operation).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a partition worker stopped.
enum WorkerEnd {
    /// Handed over cleanly: release the lease.
    Drained,
    /// Could not go on (its take-over restart failed, or the worker panicked): what it handed
    /// out is NAKed, but the lease is left to expire, so the next owner sees no clean release
    /// and restarts at the ack floor itself.
    Failed,
    /// The lease is gone: release nothing.
    Lost,
    /// The topic cannot be consumed (deleted stream, bad config): end the subscription.
    Fatal(BusError),
}

struct Held {
    slot: Arc<Slot>,
    task: JoinHandle<WorkerEnd>,
}

/// The durable consumer of the group on a partition, its ack wait and in-flight bound brought
/// in line with this member's config. A missing one is created at, in this order:
/// - the partition's restart mark, if a restart stopped between deleting the consumer and
///   creating it again (see `Inner::restart_consumer`): where the group's floor was;
/// - the partition's beginning, if the partition was added after the group joined the topic
///   ([`joined_partitions`]): everything in it was published after the group's start;
/// - the group's start setting otherwise (a group new on the topic).
async fn ensure_consumer(
    bus: &Inner,
    g: &Group,
    partition: u32,
) -> Result<Consumer<pull::Config>, BusError> {
    let name = codec::consumer_name(&g.group_key, partition);
    let subject = codec::subject(&g.topic, partition);
    let what = format!("consumer {}/{name}", g.stream);
    let mut failed = None;
    // Twice: a create that failed because another member created the consumer meanwhile
    // (with another in-flight bound) finds that one on the second look.
    for _ in 0..2 {
        if let Some(info) = bus.consumer_info(&g.stream, &name).await? {
            return adopt_consumer(g, info, &what).await;
        }
        let mark = bus
            .restart_mark(&g.marks, &g.stream, &g.group_key, partition)
            .await?;
        let (deliver, why) = match mark {
            Some((start_sequence, _)) => (
                DeliverPolicy::ByStartSequence { start_sequence },
                Some("at the start an interrupted restart recorded"),
            ),
            None if partition >= g.joined => (
                DeliverPolicy::All,
                Some("from its beginning: the partition was added after the group joined"),
            ),
            None => match g.start {
                StartFrom::Earliest => (DeliverPolicy::All, None),
                StartFrom::Latest => (DeliverPolicy::New, None),
            },
        };
        let config = bus.durable_config(
            &g.group,
            &name,
            &subject,
            partition,
            deliver,
            g.max_ack_pending,
        );
        match g.js.create_consumer_on_stream(config, &g.stream).await {
            Ok(consumer) => {
                if let Some(why) = why {
                    info!(
                        partition,
                        joined_with = g.joined,
                        "partition consumer created {why}"
                    );
                }
                if let Some((_, revision)) = mark {
                    let key = codec::restart_key(&g.group_key, partition);
                    bus.clear_restart_mark(&g.marks, &key, revision).await;
                }
                return Ok(consumer);
            }
            Err(e) => match e.kind() {
                ConsumerErrorKind::JetStream(err)
                    if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    return Err(BusError::UnknownTopic(g.topic.clone()));
                }
                _ => failed = Some(consumer_error(&format!("creating {what}"), &e)),
            },
        }
    }
    Err(failed.unwrap_or_else(|| BusError::Unavailable(format!("creating {what}: gave up"))))
}

/// An existing partition consumer, its ack wait and in-flight bound brought in line with this
/// member's config.
async fn adopt_consumer(
    g: &Group,
    info: jetstream::consumer::Info,
    what: &str,
) -> Result<Consumer<pull::Config>, BusError> {
    let cfg = &info.config;
    if cfg.ack_wait == g.timing().ack_wait && cfg.max_ack_pending == g.max_ack_pending {
        let config = pull::Config::try_from_consumer_config(info.config.clone())
            .map_err(|e| BusError::Conflict(format!("{what} is not a pull consumer: {e}")))?;
        return Ok(Consumer::new(config, info, g.js.clone()));
    }
    let mut config = pull::Config::try_from_consumer_config(info.config.clone())
        .map_err(|e| BusError::Conflict(format!("{what} is not a pull consumer: {e}")))?;
    config.ack_wait = g.timing().ack_wait;
    config.max_ack_pending = g.max_ack_pending;
    g.js.update_consumer_on_stream(config, &g.stream)
        .await
        .map_err(|e| BusError::Unavailable(format!("updating {what}: {e}")))
}

/// The value of a group's join record (see [`joined_partitions`]).
#[derive(Debug, Serialize, Deserialize)]
struct JoinRecord {
    /// Partitions of the topic when the group joined it.
    partitions: u32,
    /// `TopicMeta::created` of the stream joined: a record of an earlier stream of the same
    /// name is replaced.
    stream_created: String,
}

/// Tries to agree on a join record when members join at once.
const JOIN_RECORD_ATTEMPTS: usize = 3;

/// How many partitions the topic had when the group first joined it, from the group's join
/// record in the group-state bucket. A partition at or above that count was added to a topic
/// the group already consumed, so all it holds was published after the group's start: its
/// consumer starts at its beginning, also for a group starting at `latest`.
///
/// Without a record (the group's first join, or a group that ran before records existed) one
/// is made: a group without any consumer on the topic is new, and every partition it has now
/// starts at the start setting; a group with consumers was joined by an older nexus, which
/// created the consumers of all partitions at the join, so the first partition without one
/// was added later. The record is only created where there is none (or replaced where it
/// names an earlier stream), before the first consumer is created: members joining at once
/// agree on the first one written, and a member that finds a consumer of the group also finds
/// the record that preceded it.
pub(super) async fn joined_partitions(
    bus: &Inner,
    marks: &kv::Store,
    meta: &TopicMeta,
    group_key: &str,
) -> Result<u32, BusError> {
    let key = codec::joined_key(group_key);
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        BusError::Unavailable(format!("{what} join record {key}: {e}"))
    };
    for _ in 0..JOIN_RECORD_ATTEMPTS {
        let entry = marks
            .entry(&key)
            .await
            .map_err(|e| unavailable("reading", &e))?;
        let live = entry.filter(|e| e.operation == kv::Operation::Put);
        let record = live
            .as_ref()
            .and_then(|e| serde_json::from_slice::<JoinRecord>(&e.value).ok());
        if let Some(record) = record.filter(|r| r.stream_created == meta.created) {
            return Ok(record.partitions);
        }
        let mut with_consumer = false;
        let mut first_without = None;
        for partition in 0..meta.partitions {
            let name = codec::consumer_name(group_key, partition);
            if bus.consumer_info(&meta.stream, &name).await?.is_some() {
                with_consumer = true;
            } else {
                first_without.get_or_insert(partition);
            }
        }
        let partitions = if with_consumer {
            first_without.unwrap_or(meta.partitions)
        } else {
            meta.partitions
        };
        let value = serde_json::to_vec(&JoinRecord {
            partitions,
            stream_created: meta.created.clone(),
        })
        .map_err(|e| unavailable("encoding", &e))?;
        let written = match &live {
            // Stale (an earlier stream) or unreadable: replaced unless someone else did.
            Some(e) => match marks.update(&key, value.into(), e.revision).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(None),
                Err(e) => Err(Some(unavailable("replacing", &e))),
            },
            None => match marks.create(&key, value.into()).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(None),
                Err(e) => Err(Some(unavailable("writing", &e))),
            },
        };
        match written {
            Ok(()) => {
                info!(partitions, "group join recorded");
                return Ok(partitions);
            }
            // Another member wrote first: read theirs.
            Err(None) => continue,
            Err(Some(e)) => return Err(e),
        }
    }
    Err(BusError::Unavailable(format!(
        "join record {key} keeps changing"
    )))
}

/// The coordinator: heartbeat, lease renewal, fair-share rebalancing, releasing drained
/// partitions, and on leave the orderly hand-over of everything.
async fn coordinate(bus: Arc<Inner>, g: Arc<Group>, mut partitions: u32) -> Result<(), BusError> {
    let timing = *g.timing();
    let keeper_stop = CancellationToken::new();
    let keeper_span = tracing::info_span!("jetstream_progress", topic = %g.topic, group = %g.group);
    let keeper = tokio::spawn(keep_alive(g.clone(), keeper_stop.clone()).instrument(keeper_span));
    let member_key = codec::member_key(&g.group_key, &g.member);
    let mut held: HashMap<u32, Held> = HashMap::new();
    // Partitions whose worker failed, left alone for a lease time (another member may take
    // them once the lease expires; this one takes them back after, through its own lease if it
    // still stands): taking one back at once would retry a failing restart in a tight loop.
    let mut resting: HashMap<u32, Instant> = HashMap::new();
    let mut fatal: Option<BusError> = None;
    let mut partitions_read = Instant::now();
    loop {
        for (p, end) in reap(&bus, &g, &mut held).await {
            match end {
                WorkerEnd::Fatal(e) => {
                    warn!(error = %e, "partition cannot be consumed; leaving the group");
                    fatal.get_or_insert(e);
                }
                WorkerEnd::Failed => {
                    resting.insert(p, Instant::now() + timing.lease_ttl);
                }
                WorkerEnd::Drained | WorkerEnd::Lost => {}
            }
        }
        resting.retain(|_, until| *until > Instant::now());
        let leaving = g.leave.is_cancelled() || fatal.is_some();
        if leaving && held.is_empty() {
            break;
        }
        if !leaving {
            if let Err(e) = g.kv.put(&member_key, Bytes::new()).await {
                warn!(error = %e, "member heartbeat failed");
            }
        }
        renew(&g, &mut held).await;
        if leaving {
            for h in held.values() {
                start_drain(&h.slot);
            }
        } else {
            if partitions_read.elapsed() >= g.timing().partitions_refresh {
                match bus.topic_meta(&g.topic).await {
                    Ok(Some(meta)) => {
                        if meta.partitions > partitions {
                            info!(
                                from = partitions,
                                to = meta.partitions,
                                "topic gained partitions"
                            );
                        }
                        partitions = partitions.max(meta.partitions);
                        partitions_read = Instant::now();
                        if let Err(e) = keep_lease_bucket(&bus, &g.bucket, &g.topic, false).await {
                            warn!(error = %e, "checking the lease bucket's max age failed");
                        }
                    }
                    Ok(None) => {
                        fatal.get_or_insert(BusError::UnknownTopic(g.topic.clone()));
                        continue;
                    }
                    Err(e) => warn!(error = %e, "re-reading the partition count failed"),
                }
            }
            rebalance(&bus, &g, &mut held, partitions, &resting).await;
        }
        let pause = tokio::time::sleep(timing.renew_every);
        tokio::select! {
            _ = pause => {}
            _ = g.worker_done.notified() => {}
            _ = g.leave.cancelled(), if !leaving => {}
        }
    }
    // Leaving: the heartbeat goes without a trace, so the others rebalance at once.
    let subject = codec::kv_subject(&g.bucket, &member_key);
    let purge = bus
        .api::<serde_json::Value>(
            format!("STREAM.PURGE.KV_{}", g.bucket),
            &json!({ "filter": subject }),
        )
        .await;
    if let Err(e) = purge {
        debug!(error = %e.into_bus("purging heartbeat"), "heartbeat left to expire");
    }
    keeper_stop.cancel();
    let _ = keeper.await;
    info!("left consumer group");
    if let Some(e) = fatal {
        // The subscription yields the error, then ends.
        let _ = g.tx.try_send(Err(e));
    }
    Ok(())
}

/// Which partitions this member should hold, then acts on the difference.
async fn rebalance(
    bus: &Arc<Inner>,
    g: &Arc<Group>,
    held: &mut HashMap<u32, Held>,
    partitions: u32,
    resting: &HashMap<u32, Instant>,
) {
    let mut members = match bus.members(&g.stream, &g.group_key).await {
        Ok(m) => m,
        Err(e) => {
            warn!(error = %e, "listing group members failed; keeping the current partitions");
            return;
        }
    };
    if !members.contains(&g.member) {
        members.push(g.member.clone());
        members.sort();
    }
    let index = members.iter().position(|m| *m == g.member).unwrap_or(0) as u32;
    let count = members.len() as u32;
    let mine = |p: u32| p % count == index;
    for (p, h) in held.iter() {
        if !mine(*p) && !h.slot.draining.load(Ordering::SeqCst) {
            debug!(partition = p, members = count, "handing partition over");
            start_drain(&h.slot);
        }
    }
    let wanted: Vec<u32> = (0..partitions)
        .filter(|p| mine(*p) && !held.contains_key(p) && !resting.contains_key(p))
        .collect();
    for p in wanted {
        let key = codec::lease_key(&g.group_key, p);
        // Read before the create (which succeeds over a delete marker): a delete is a clean
        // release; a key that expired or never was leaves nothing.
        let after_release = matches!(
            g.kv.entry(&key).await,
            Ok(Some(e)) if e.operation == kv::Operation::Delete
        );
        let sent = Instant::now();
        let taken = match g.kv.create(&key, Bytes::from(g.member.clone())).await {
            Ok(revision) => Some((revision, sent + g.timing().lease_ttl)),
            // Ours already: a create whose reply was lost. Its age is unknown, so the lease
            // covers no pull until the next renewal.
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match own_revision(g, &key).await {
                    Ok(r) => r.map(|r| (r, Instant::now())),
                    Err(e) => {
                        warn!(partition = p, error = %e, "reading partition lease failed");
                        None
                    }
                }
            }
            Err(e) => {
                warn!(partition = p, error = %e, "taking partition lease failed");
                None
            }
        };
        let Some((revision, deadline)) = taken else {
            continue;
        };
        let slot = Arc::new(Slot {
            partition: p,
            lease: Mutex::new(Lease { revision, deadline }),
            draining: AtomicBool::new(false),
            lost: Halt::default(),
            released: AtomicBool::new(false),
            wake: Notify::new(),
            inflight: Mutex::new(BTreeMap::new()),
            read_upto: Mutex::new(None),
            after_release,
        });
        lock(&g.slots).insert(p, slot.clone());
        let span = tracing::info_span!("jetstream_partition", topic = %g.topic, group = %g.group, partition = p);
        let task =
            tokio::spawn(run_partition(bus.clone(), g.clone(), slot.clone()).instrument(span));
        info!(partition = p, "partition acquired");
        held.insert(p, Held { slot, task });
    }
}

/// The revision of a lease key whose live value is this member's: a write of ours whose reply
/// was lost (the server applied it). Nobody else writes our id, so it is still ours.
/// `Err` when the key could not be read: that tells nothing about who holds it.
async fn own_revision(g: &Group, key: &str) -> Result<Option<u64>, kv::EntryError> {
    Ok(match g.kv.entry(key).await? {
        Some(e) if e.operation == kv::Operation::Put && e.value == g.member.as_bytes() => {
            Some(e.revision)
        }
        _ => None,
    })
}

fn start_drain(slot: &Slot) {
    if !slot.draining.swap(true, Ordering::SeqCst) {
        slot.wake.notify_one();
    }
}

/// Renews every held lease; a lease someone else took (or that expired) is lost at once.
async fn renew(g: &Group, held: &mut HashMap<u32, Held>) {
    let renewals = held.values().filter(|h| !h.slot.is_lost()).map(|h| {
        let slot = h.slot.clone();
        async move {
            let key = codec::lease_key(&g.group_key, slot.partition);
            let current = slot.lease();
            let sent = Instant::now();
            match g
                .kv
                .update(&key, Bytes::from(g.member.clone()), current.revision)
                .await
            {
                Ok(revision) => {
                    let mut lease = lock(&slot.lease);
                    // Given up meanwhile (see `JetStreamAcker::revoked`): stays given up.
                    if !slot.is_lost() {
                        *lease = Lease {
                            revision,
                            deadline: sent + g.timing().lease_ttl,
                        };
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match own_revision(g, &key).await {
                        // An earlier renewal applied without its reply reaching us; the
                        // deadline stays the old one until the next renewal answers.
                        Ok(Some(revision)) => lock(&slot.lease).revision = revision,
                        Ok(None) => {
                            warn!(partition = slot.partition, "partition lease lost");
                            slot.lost.fire();
                        }
                        // Unknown: kept, and tried again at the next renewal. The lease's
                        // deadline (see `JetStreamAcker::revoked`) still bounds how long.
                        Err(e) => warn!(
                            partition = slot.partition, error = %e,
                            "reading partition lease after a conflicting renewal failed"
                        ),
                    }
                }
                Err(e) => {
                    warn!(partition = slot.partition, error = %e, "renewing partition lease failed")
                }
            }
        }
    });
    futures::future::join_all(renewals).await;
}

/// Collects finished partition workers, handing drained partitions over.
async fn reap(bus: &Inner, g: &Group, held: &mut HashMap<u32, Held>) -> Vec<(u32, WorkerEnd)> {
    let finished: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.task.is_finished())
        .map(|(p, _)| *p)
        .collect();
    let mut ends = Vec::new();
    for p in finished {
        let Some(h) = held.remove(&p) else { continue };
        lock(&g.slots).remove(&p);
        let end = match h.task.await {
            Ok(end) => end,
            Err(e) => {
                warn!(partition = p, error = %e, "partition worker failed");
                WorkerEnd::Failed
            }
        };
        match &end {
            WorkerEnd::Lost => {}
            WorkerEnd::Failed => release(bus, g, &h.slot, false).await,
            WorkerEnd::Drained | WorkerEnd::Fatal(_) => release(bus, g, &h.slot, true).await,
        }
        ends.push((p, end));
    }
    ends
}

/// Hands a partition over: NAKs what was handed out and not acked, in sequence order, so the
/// next owner gets those first and in order; then, when `clean`, deletes the lease
/// (revision-checked, so a lease that was taken over meanwhile stays). The delete tells the
/// next owner the release was clean (no restart at the ack floor).
async fn release(bus: &Inner, g: &Group, slot: &Slot, clean: bool) {
    slot.released.store(true, Ordering::Release);
    let left: Vec<(u64, Inflight)> = std::mem::take(&mut *lock(&slot.inflight))
        .into_iter()
        .collect();
    // Confirmed: a NAK lost on a reconnect would leave its record to come back after the ack
    // wait, behind later records of its key. The flush in it also pushes out the acks (sent
    // without confirmation) before the lease goes, so the next owner finds them applied.
    let naked = nak_in_order(g, &left).await;
    // Only while the lease surely holds: past its deadline another member may own the
    // partition's consumer already, and a restart here would delete it under that member.
    let fresh = Instant::now() + g.timing().safety <= slot.lease().deadline;
    if slot.is_lost() || !clean || !fresh {
        return;
    }
    if !(naked && handed_over_as_seen(bus, g, slot, left.len()).await) {
        // The server's view is not what this member settled (a delivery, an ack or a NAK lost
        // on a reconnect): the partition restarts at its ack floor before the lease goes, so
        // the next owner gets every unacked record first, in order.
        warn!(
            partition = slot.partition,
            "the partition's consumer differs from what this member settled; restarting it at \
             its ack floor before the hand-over"
        );
        if let Err(e) = start_at_ack_floor(bus, g, slot.partition).await {
            // The lease expires instead, and its next owner restarts at the floor.
            warn!(partition = slot.partition, error = %e, "cannot reset the partition to its ack floor; lease left to expire");
            return;
        }
    }
    let key = codec::lease_key(&g.group_key, slot.partition);
    match g
        .kv
        .delete_expect_revision(&key, Some(slot.lease().revision))
        .await
    {
        Ok(()) => info!(
            partition = slot.partition,
            requeued = left.len(),
            "partition released"
        ),
        Err(e) => debug!(partition = slot.partition, error = %e, "lease left to expire"),
    }
}

/// How long a release waits for the server to confirm its NAKs.
const NAK_CONFIRM_WAIT: Duration = Duration::from_secs(5);

/// NAKs what was left, in sequence order (the server redelivers in the order it takes NAKs),
/// pipelined on one reply inbox; whether the server confirmed every one within
/// [`NAK_CONFIRM_WAIT`].
async fn nak_in_order(g: &Group, left: &[(u64, Inflight)]) -> bool {
    let confirmed = async {
        let inbox = g.client.new_inbox();
        let mut replies = g.client.subscribe(inbox.clone()).await.ok()?;
        for (_, entry) in left {
            let nak = Bytes::from(AckKind::Nak(None));
            g.client
                .publish_with_reply(entry.reply.clone(), inbox.clone(), nak)
                .await
                .ok()?;
        }
        g.client.flush().await.ok()?;
        for _ in left {
            replies.next().await?;
        }
        Some(())
    };
    match tokio::time::timeout(NAK_CONFIRM_WAIT, confirmed).await {
        Ok(Some(())) => true,
        _ => {
            debug!(records = left.len(), "NAKs at hand-over unconfirmed");
            false
        }
    }
}

/// Whether the partition's consumer holds what this member left pending: it delivered nothing
/// past the last record read, and every record is acked but the `left` NAKed ones (pending
/// until redelivered). The server applies acks asynchronously: a short lag is waited out.
async fn handed_over_as_seen(bus: &Inner, g: &Group, slot: &Slot, left: usize) -> bool {
    let Some((created, upto)) = *lock(&slot.read_upto) else {
        return true;
    };
    let name = codec::consumer_name(&g.group_key, slot.partition);
    for wait_ms in [0, 20, 50, 100, 200] {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        match bus.consumer_info(&g.stream, &name).await {
            Ok(Some(info)) => {
                if info.created.unix_timestamp_nanos() != created
                    || info.delivered.consumer_sequence != upto
                {
                    return false;
                }
                if info.num_ack_pending == left {
                    return true;
                }
            }
            // Gone with its topic: nothing to restart.
            Ok(None) => return true,
            Err(e) => {
                debug!(partition = slot.partition, error = %e, "consumer info at hand-over");
                return false;
            }
        }
    }
    false
}

/// One partition's fetch loop: pulls while the lease allows, hands records out in order,
/// drains on hand-over.
async fn run_partition(bus: Arc<Inner>, g: Arc<Group>, slot: Arc<Slot>) -> WorkerEnd {
    let restart = if slot.after_release {
        Ok(())
    } else {
        start_at_ack_floor(&bus, &g, slot.partition).await
    };
    if let Err(e) = restart {
        warn!(partition = slot.partition, error = %e, "cannot reset the partition to its ack floor");
        g.worker_done.notify_one();
        // The lease expires, and whoever takes it next (this member or another) restarts.
        return WorkerEnd::Failed;
    }
    let end = fetch_loop(&bus, &g, &slot).await;
    let end = match end {
        Some(end) => end,
        None => drain(&g, &slot).await,
    };
    g.worker_done.notify_one();
    end
}

/// A new owner starts exactly after the ack floor when the previous owner died with records
/// unacked. Their redelivery would otherwise wait for the server's ack-wait timer, which may
/// fire after this owner's first pull and let newer records of a key overtake older ones (seen
/// after a SIGKILL). Records acked above the floor come again: at-least-once, as on Kafka.
/// Not after a clean release: the records it left were NAKed, so they come first anyway, and
/// what it acked above the floor must not come again.
async fn start_at_ack_floor(bus: &Inner, g: &Group, partition: u32) -> Result<(), BusError> {
    let name = codec::consumer_name(&g.group_key, partition);
    let Some(info) = bus.consumer_info(&g.stream, &name).await? else {
        return Ok(());
    };
    if info.num_ack_pending == 0 {
        return Ok(());
    }
    let start = info.ack_floor.stream_sequence + 1;
    info!(
        partition,
        pending = info.num_ack_pending,
        start,
        "records left unacked (a previous owner, or deliveries lost); restarting at the ack floor"
    );
    bus.restart_consumer(
        &g.marks,
        &g.stream,
        &g.group,
        &g.group_key,
        &g.topic,
        partition,
        start,
    )
    .await
}

/// Pulls until draining (`None`) or the lease is lost / the topic is gone.
async fn fetch_loop(bus: &Arc<Inner>, g: &Arc<Group>, slot: &Arc<Slot>) -> Option<WorkerEnd> {
    let timing = *g.timing();
    // Looked up again after a failed pull: the consumer may have been replaced or lost.
    let mut current: Option<Consumer<pull::Config>> = None;
    // The consumer sequence of the last delivery read: the server numbers every delivery of
    // the consumer, and this member is its only puller, so a jump means deliveries made to it
    // never arrived (a reconnect mid-batch). The server counts those as delivered and sends
    // them again only after the ack wait, behind later records of their keys.
    let mut delivered: Option<u64> = None;
    // When the consumer `delivered` counts for was created: looked up again (after a failed
    // pull), the same consumer must not have delivered past it.
    let mut created = None;
    loop {
        if slot.is_lost() {
            return Some(WorkerEnd::Lost);
        }
        if slot.draining.load(Ordering::SeqCst) {
            return None;
        }
        let consumer = match current.take() {
            Some(c) => c,
            None => match ensure_consumer(bus, g, slot.partition).await {
                Ok(c) => {
                    let info = c.cached_info();
                    let server = info.delivered.consumer_sequence;
                    if created == Some(info.created) && delivered.is_some_and(|d| server > d) {
                        // Deliveries the same consumer made after the last one read, lost
                        // with the request that failed: the gap check would not see them.
                        warn!(
                            partition = slot.partition,
                            read = delivered,
                            delivered = server,
                            "deliveries lost in transit; restarting the partition at its ack floor"
                        );
                        if let Err(end) = restart_after_gap(bus, g, slot).await {
                            return Some(end);
                        }
                        (created, delivered) = (None, None);
                        continue;
                    }
                    (created, delivered) = (Some(info.created), Some(server));
                    *lock(&slot.read_upto) = Some((info.created.unix_timestamp_nanos(), server));
                    c
                }
                Err(BusError::UnknownTopic(t)) => {
                    return Some(WorkerEnd::Fatal(BusError::UnknownTopic(t)))
                }
                Err(e) => {
                    warn!(error = %e, "partition consumer unavailable; retrying");
                    pause(slot, RETRY_PAUSE).await;
                    continue;
                }
            },
        };
        let consumer = &*current.insert(consumer);
        if !timing.can_fetch(slot.lease().deadline) {
            // The lease is not fresh enough to cover a pull; the coordinator renews it.
            pause(slot, timing.renew_every / 2).await;
            continue;
        }
        let mut permits = tokio::select! {
            permit = g.permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return Some(WorkerEnd::Lost),
            },
            _ = slot.wake.notified() => continue,
            _ = slot.lost.fired() => return Some(WorkerEnd::Lost),
        };
        // Whatever else is free, up to a batch, in one go; a small batch waits a little.
        take_free(g, &mut permits);
        let min_batch = BATCH_MIN.min(g.max_ack_pending as usize / 4).max(1);
        if permits.num_permits() < min_batch {
            let short = (min_batch - permits.num_permits()) as u32;
            let more =
                tokio::time::timeout(BATCH_LINGER, g.permits.clone().acquire_many_owned(short));
            tokio::select! {
                more = more => {
                    if let Ok(Ok(p)) = more {
                        permits.merge(p);
                    }
                }
                _ = slot.lost.fired() => return Some(WorkerEnd::Lost),
            }
            take_free(g, &mut permits);
        }
        if !timing.can_fetch(slot.lease().deadline) || slot.draining.load(Ordering::SeqCst) {
            continue;
        }
        let batch = consumer
            .batch()
            .max_messages(permits.num_permits())
            .expires(timing.fetch_expires)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "pull request failed; retrying");
                drop(permits);
                current = None;
                pause(slot, RETRY_PAUSE).await;
                continue;
            }
        };
        let mut stale = false;
        let mut gap = false;
        // A pull request is read to its end: records it brings after an early stop would sit
        // unacked until ack wait and could overtake records the next owner gets. Except after
        // a gap: the partition then restarts at its ack floor on a new consumer, which makes the
        // old one's deliveries moot, and a request the server filled would only end at the
        // client's own timeout (fetch expiry + 5 s), the lost record waiting for it.
        while let Some(item) = batch.next().await {
            match item {
                Ok(m) => {
                    // Read once per record: the reply subject is parsed for it.
                    let info = match m.info() {
                        Ok(i) => Delivered {
                            consumer_seq: i.consumer_sequence,
                            stream_seq: i.stream_sequence,
                            ts: timestamp_ms(i.published.unix_timestamp_nanos()),
                        },
                        Err(e) => {
                            warn!(error = %e, "record without JetStream metadata left for redelivery");
                            continue;
                        }
                    };
                    let seq = info.consumer_seq;
                    if let Some(last) = delivered {
                        if seq != last + 1 {
                            warn!(
                                partition = slot.partition, expected = last + 1, got = seq,
                                "deliveries lost in transit; restarting the partition at its ack floor"
                            );
                            gap = true;
                            break;
                        }
                    }
                    delivered = Some(seq);
                    if let Some((_, upto)) = lock(&slot.read_upto).as_mut() {
                        *upto = seq;
                    }
                    let permit = permits.split(1);
                    hand_out(g, slot, m, info, permit).await;
                }
                Err(e) => {
                    // Status replies (e.g. 409 while the consumer is being replaced) end the
                    // request; the next one tells whether it persists.
                    debug!(error = %e, "pull request ended with a status");
                    drop(permits.split(permits.num_permits()));
                    stale = true;
                    pause(slot, RETRY_PAUSE).await;
                }
            }
        }
        if gap {
            // The request's subscription ends here: what the server still sends it is moot.
            drop(batch);
            drop(permits);
            if let Err(end) = restart_after_gap(bus, g, slot).await {
                return Some(end);
            }
            stale = true;
        }
        if stale {
            current = None;
        }
    }
}

/// Deliveries made to this member never reached it: the partition restarts at its ack floor,
/// so the lost records come first again, in order. The records under way are let finish
/// first: acked ones above the floor come again too, and handed out behind a later record of
/// their key still running, they would be handled after it.
async fn restart_after_gap(
    bus: &Arc<Inner>,
    g: &Arc<Group>,
    slot: &Arc<Slot>,
) -> Result<(), WorkerEnd> {
    let until = Instant::now() + g.timing().drain_timeout;
    while !lock(&slot.inflight).values().all(|e| e.abandoned)
        && Instant::now() < until
        && !slot.is_lost()
    {
        pause(slot, Duration::from_millis(50)).await;
    }
    if slot.is_lost() {
        return Err(WorkerEnd::Lost);
    }
    if let Err(e) = start_at_ack_floor(bus, g, slot.partition).await {
        warn!(partition = slot.partition, error = %e, "cannot reset the partition to its ack floor");
        return Err(WorkerEnd::Failed);
    }
    Ok(())
}

/// Adds free in-flight slots to `permits`, up to a batch.
fn take_free(g: &Group, permits: &mut OwnedSemaphorePermit) {
    let more = g
        .permits
        .available_permits()
        .min(BATCH_MAX.saturating_sub(permits.num_permits()));
    if more > 0 {
        if let Ok(p) = g.permits.clone().try_acquire_many_owned(more as u32) {
            permits.merge(p);
        }
    }
}

/// Sleeps, cut short by a lost lease or a wake-up.
async fn pause(slot: &Slot, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = slot.wake.notified() => {}
        _ = slot.lost.fired() => {}
    }
}

/// Registers a record as handed out and passes it to the subscription.
/// What a delivery's metadata says, read once.
struct Delivered {
    consumer_seq: u64,
    stream_seq: u64,
    ts: i64,
}

async fn hand_out(
    g: &Arc<Group>,
    slot: &Arc<Slot>,
    m: jetstream::Message,
    info: Delivered,
    permit: Option<OwnedSemaphorePermit>,
) {
    let (seq, ts) = (info.stream_seq, info.ts);
    let Some(reply) = m.message.reply.clone() else {
        warn!(seq, "record without ack subject left for redelivery");
        return;
    };
    {
        let mut inflight = lock(&slot.inflight);
        match inflight.get_mut(&seq) {
            // Redelivered while its first delivery is still being handled (a missed `+WPI`):
            // handing it out again would let it overtake later records of its key.
            Some(entry) if !entry.abandoned => {
                entry.reply = reply;
                return;
            }
            _ => {
                inflight.insert(
                    seq,
                    Inflight {
                        reply: reply.clone(),
                        abandoned: false,
                    },
                );
            }
        }
    }
    let message = codec::message(
        &g.topic,
        slot.partition,
        seq,
        ts,
        m.message.headers.as_ref(),
        m.message.payload.clone(),
    );
    let acker = JetStreamAcker {
        path: g.acks.clone(),
        slot: slot.clone(),
        seq,
        reply,
        _permit: permit,
        acked: false,
    };
    // A closed subscription hands the delivery back; dropping it marks it abandoned.
    let _ = g.tx.send(Ok(Delivery::new(message, Box::new(acker)))).await;
}

/// Waits until what was handed out is acked or dropped (or the drain timeout), then ends.
async fn drain(g: &Group, slot: &Slot) -> WorkerEnd {
    let until = Instant::now() + g.timing().drain_timeout;
    loop {
        if slot.is_lost() {
            return WorkerEnd::Lost;
        }
        if slot.idle() {
            return WorkerEnd::Drained;
        }
        let now = Instant::now();
        if now >= until {
            warn!(
                partition = slot.partition,
                "records still being handled at hand-over; they are requeued"
            );
            return WorkerEnd::Drained;
        }
        pause(slot, until - now).await;
    }
}

/// Keeps handed-out records from being redelivered while this member works on them.
async fn keep_alive(g: Arc<Group>, stop: CancellationToken) {
    let timing = *g.timing();
    let mut tick = tokio::time::interval(timing.progress_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let slots: Vec<Arc<Slot>> = lock(&g.slots).values().cloned().collect();
        let mut sent = 0usize;
        for slot in slots {
            // Past this point a `+WPI` could keep a record unredeliverable after the lease
            // may have expired; the record is then left to redeliver.
            if slot.is_lost() || !timing.can_progress(slot.lease().deadline) {
                continue;
            }
            let replies: Vec<Subject> = lock(&slot.inflight)
                .values()
                .map(|e| e.reply.clone())
                .collect();
            for reply in replies {
                if let Err(e) = g
                    .client
                    .publish(reply, Bytes::from(AckKind::Progress))
                    .await
                {
                    debug!(error = %e, "progress signal failed");
                }
                sent += 1;
            }
        }
        if sent > 0 {
            debug!(records = sent, "kept in-flight records alive");
        }
    }
}

/// Acks one record with a plain `+ACK` (no confirmation; see the module doc for the window in
/// which a returned ack can still be lost).
struct JetStreamAcker {
    path: Arc<AckPath>,
    slot: Arc<Slot>,
    seq: u64,
    reply: Subject,
    _permit: Option<OwnedSemaphorePermit>,
    acked: bool,
}

#[async_trait]
impl Acker for JetStreamAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.path
            .client
            .publish(self.reply.clone(), Bytes::from_static(b"+ACK"))
            .await
            .map_err(|e| BusError::Unavailable(format!("ack of sequence {}: {e}", self.seq)))?;
        // Settled only once the ack is queued on the connection, ahead of any NAK a hand-over
        // sends afterwards.
        self.acked = true;
        self.slot.settle(self.seq);
        // Written to the socket before returning, so an ack that returned survives the process
        // dying right after (only a broken connection can still lose it). Concurrent acks share
        // one flush (see `flush`), so this costs a hop to the connection task, not a round trip.
        self.path.flusher.flush().await.map_err(|e| {
            BusError::Unavailable(format!("flushing ack of sequence {}: {e}", self.seq))
        })
    }

    fn revoked(&self) -> bool {
        if self.slot.is_lost() || self.slot.released.load(Ordering::Acquire) {
            return true;
        }
        // Renewals unanswered up to the lease's deadline: it may have expired, and its next
        // owner restarts at the ack floor, so nothing more is handled here. The partition is
        // given up for good (as a lost lease): going on after records dropped here would
        // handle later records before them. Fired under the lease's lock, under which a
        // renewal stores its deadline only while not given up: no lane starts a record after.
        let lease = lock(&self.slot.lease);
        if Instant::now() < lease.deadline {
            return false;
        }
        if !self.slot.is_lost() {
            warn!(
                partition = self.slot.partition,
                "partition lease past its deadline without a renewal; given up"
            );
        }
        self.slot.lost.fire();
        true
    }

    fn revoking(&self) -> bool {
        // From the start of a drain: a record not started yet, or waiting between tries, is
        // dropped and NAKed back at the release, so the hand-over (and the next owner) does
        // not wait the drain timeout for it. `revoked` first: it gives up a lease past its
        // deadline, which a draining partition must notice too.
        let revoked = self.revoked();
        revoked || self.slot.draining.load(Ordering::SeqCst)
    }
}

impl Drop for JetStreamAcker {
    fn drop(&mut self) {
        if !self.acked {
            self.slot.abandon(self.seq);
        }
    }
}

/// A member of a consumer group.
struct JetStreamSubscription {
    rx: mpsc::Receiver<Result<Delivery, BusError>>,
    leave: CancellationToken,
    coordinator: Option<JoinHandle<Result<(), BusError>>>,
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        self.rx.recv().await
    }

    fn try_next(&mut self) -> Option<Result<Delivery, BusError>> {
        self.rx.try_recv().ok()
    }

    async fn close(mut self: Box<Self>) -> Result<(), BusError> {
        self.leave.cancel();
        // Undelivered records are dropped, so they count as abandoned and are requeued.
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        match self.coordinator.take() {
            Some(task) => task
                .await
                .map_err(|e| BusError::Unavailable(format!("group coordinator: {e}")))?,
            None => Ok(()),
        }
    }
}

impl Drop for JetStreamSubscription {
    fn drop(&mut self) {
        // Without `close` the member still leaves in the background; if the process dies
        // instead, its leases expire.
        self.leave.cancel();
    }
}
