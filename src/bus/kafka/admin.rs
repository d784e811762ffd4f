//! Topics, offsets, group positions and replay reads on Kafka.
//!
//! Watermark, metadata and offset lookups are blocking librdkafka calls and run on the blocking
//! pool; the admin requests (create, describe, alter) are futures of the admin client.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::consumer::to_message;
use super::{bad_data, blocking, map_code, map_err, KafkaBus, REQUEST_TIMEOUT};
use crate::bus::{
    BusError, GroupPosition, Message, PartitionOffsets, TopicInfo, TopicSetting, TopicSpec,
};

const RETENTION_MS: &str = "retention.ms";

/// A topic config nexus relies on besides partitions and `retention.ms`: what a topic is created
/// with, what `topology plan` compares and `apply` sets. Both kinds are dynamic topic configs, so
/// AlterConfigs changes them in place like retention and stops the topic deleting records
/// early. Lifting a `retention.bytes` limit deletes nothing; switching `cleanup.policy` from
/// `compact` to `delete` does: the broker then deletes at once every record older than
/// `retention.ms` that compaction had kept (a key's last record), so the plan says so.
pub(super) struct TopicConfig {
    name: &'static str,
    /// The broker's value as the plan shows it.
    read: fn(&str) -> String,
    /// What `read` gives for the value nexus needs.
    required: &'static str,
    /// The value `apply` writes.
    write: &'static str,
    why: &'static str,
}

const TOPIC_CONFIGS: [TopicConfig; 2] = [
    TopicConfig {
        name: "cleanup.policy",
        read: |v| v.trim().to_owned(),
        required: "delete",
        write: "delete",
        why: "compaction keeps only each key's last record: a conversation's earlier events \
              are deleted before the topic's retention; switching to delete deletes at once \
              every record older than the topic's retention that compaction had kept",
    },
    TopicConfig {
        name: "retention.bytes",
        read: |v| match v.trim().parse::<i64>() {
            Ok(n) if n < 0 => "unlimited".to_owned(),
            _ => v.trim().to_owned(),
        },
        required: "unlimited",
        write: "-1",
        why: "records are deleted before the topic's retention",
    },
];

/// The [`TOPIC_CONFIGS`] the broker describes; one it leaves out (Tansu 0.6 describes only
/// what the topic was created with) is not compared.
fn topic_settings(configs: &HashMap<String, (String, ConfigSource)>) -> Vec<TopicSetting> {
    TOPIC_CONFIGS
        .iter()
        .filter_map(|c| {
            let (value, _) = configs.get(c.name)?;
            Some(TopicSetting {
                name: c.name,
                value: (c.read)(value),
                required: c.required,
                in_place: true,
                why: c.why,
            })
        })
        .collect()
}

/// The [`TOPIC_CONFIGS`] the broker describes with a value other than nexus's.
pub(super) fn stale_configs(
    configs: &HashMap<String, (String, ConfigSource)>,
) -> Vec<&'static TopicConfig> {
    TOPIC_CONFIGS
        .iter()
        .filter(|c| {
            configs
                .get(c.name)
                .is_some_and(|(value, _)| (c.read)(value) != c.required)
        })
        .collect()
}

/// A new topic with `retention` (milliseconds, as [`retention_ms`] writes it) and every
/// [`TOPIC_CONFIGS`] entry set to nexus's value: left to the broker's defaults
/// (`log.cleanup.policy=compact`, a `log.retention.bytes`), the plan after the create would
/// see an update and apply would fail as not converged.
pub(super) fn new_topic<'a>(name: &'a str, partitions: i32, retention: &'a str) -> NewTopic<'a> {
    // Replication -1: the broker's default replication factor (KIP-464).
    let mut new =
        NewTopic::new(name, partitions, TopicReplication::Fixed(-1)).set(RETENTION_MS, retention);
    for c in &TOPIC_CONFIGS {
        new = new.set(c.name, c.write);
    }
    new
}

/// The AlterConfigs request that sets `retention` (milliseconds) and the `stale` settings to
/// nexus's values. AlterConfigs (rdkafka has no incremental variant) replaces the topic's whole
/// dynamic config, so the other dynamic topic entries (`configs` as the broker describes them,
/// an operator's `min.insync.replicas`, ...) are sent along unchanged; default and static
/// entries are not, or they would become the topic's own.
pub(super) fn alter_config<'a>(
    topic: &'a str,
    configs: &'a HashMap<String, (String, ConfigSource)>,
    retention: &'a str,
    stale: &[&'static TopicConfig],
) -> AlterConfig<'a> {
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (name, (value, source)) in configs {
        if *source == ConfigSource::DynamicTopic
            && name != RETENTION_MS
            && !stale.iter().any(|c| c.name == name)
        {
            alter = alter.set(name, value);
        }
    }
    alter = alter.set(RETENTION_MS, retention);
    for c in stale {
        alter = alter.set(c.name, c.write);
    }
    alter
}

/// Group id of replay readers (required by librdkafka's `assign`; never joined or committed).
const READER_GROUP: &str = "nexus-reader";

/// How long `apply_topic` waits for a new topic or partitions to show in metadata: brokers
/// create them asynchronously after acknowledging the request.
const PROPAGATION_WAIT: Duration = Duration::from_secs(10);

fn admin_options() -> AdminOptions {
    AdminOptions::new()
        .request_timeout(Some(REQUEST_TIMEOUT))
        .operation_timeout(Some(REQUEST_TIMEOUT))
}

/// Maps the error of an admin request about `topic`, naming the topic and the Kafka operation:
/// a broker without the API (Tansu 0.6: no CreatePartitions, no AlterConfigs) refuses the whole
/// request, and [`map_err`] alone would only say "admin operation".
fn admin_err<'a>(topic: &'a str, operation: &'a str) -> impl FnOnce(KafkaError) -> BusError + 'a {
    move |e| match e {
        KafkaError::AdminOp(code) => map_code(code, &admin_context(topic, operation)),
        other => map_err(other).into(),
    }
}

fn admin_context(topic: &str, operation: &str) -> String {
    format!("{operation} on topic `{topic}`")
}

const CREATE_TOPIC: &str = "create topic (CreateTopics)";

/// Retention as Kafka writes it: milliseconds, -1 for forever.
fn retention_ms(retention: Option<Duration>) -> String {
    match retention {
        Some(d) => d.as_millis().to_string(),
        None => "-1".to_string(),
    }
}

/// The topic's configuration as the broker describes it; `None` if the broker cannot describe
/// configs.
async fn describe_topic(
    bus: &KafkaBus,
    topic: &str,
) -> Result<Option<HashMap<String, (String, ConfigSource)>>, BusError> {
    let results = bus
        .admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &admin_options())
        .await
        .map_err(map_err)?;
    match results.into_iter().next() {
        Some(Ok(resource)) => Ok(Some(
            resource
                .entries
                .into_iter()
                .filter_map(|e| e.value.map(|v| (e.name, (v, e.source))))
                .collect(),
        )),
        Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
            Err(BusError::UnknownTopic(topic.into()))
        }
        // Brokers without DescribeConfigs (or that refuse it for topics) answer with an error
        // code here; retention is then unknown rather than a guess.
        Some(Err(code)) => {
            warn!(topic, error = %code, "broker cannot describe topic configs; retention unknown");
            Ok(None)
        }
        None => Ok(None),
    }
}

fn parse_retention(configs: &HashMap<String, (String, ConfigSource)>) -> Option<Duration> {
    let (value, _) = configs.get(RETENTION_MS)?;
    match value.parse::<i64>() {
        Ok(ms) if ms >= 0 => Some(Duration::from_millis(ms as u64)),
        // -1 (or any negative) keeps records forever.
        _ => None,
    }
}

pub(super) async fn topic_info(bus: &KafkaBus, topic: &str) -> Result<Option<TopicInfo>, BusError> {
    let Some(partitions) = bus.fetch_partition_count(topic).await? else {
        return Ok(None);
    };
    // A broker that cannot describe configs gives no retention: unknown, not "forever".
    let configs = describe_topic(bus, topic).await?;
    Ok(Some(TopicInfo {
        name: topic.to_string(),
        partitions,
        retention: configs.as_ref().and_then(parse_retention),
        retention_known: configs.is_some(),
        settings: configs.as_ref().map(topic_settings).unwrap_or_default(),
    }))
}

/// Every topic but the broker's internal ones (`__consumer_offsets`, `__transaction_state`:
/// Kafka reserves the `__` prefix for them).
pub(super) async fn list_topics(bus: &KafkaBus) -> Result<Vec<String>, BusError> {
    let meta = Arc::clone(&bus.meta);
    blocking(move || {
        let md = meta
            .fetch_metadata(None, REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let mut names: Vec<String> = md
            .topics()
            .iter()
            .filter(|t| !t.name().starts_with("__"))
            // A topic deleted while the metadata was gathered is answered with this error.
            .filter(|t| {
                !t.error().is_some_and(|e| {
                    matches!(
                        RDKafkaErrorCode::from(e),
                        RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic
                    )
                })
            })
            .map(|t| t.name().to_owned())
            .collect();
        names.sort_unstable();
        Ok(names)
    })
    .await
}

pub(super) async fn apply_topic(bus: &KafkaBus, spec: &TopicSpec) -> Result<(), BusError> {
    if spec.partitions == 0 {
        return Err(BusError::Config(format!(
            "topic `{}` needs at least one partition",
            spec.name
        )));
    }
    let partitions = i32::try_from(spec.partitions)
        .map_err(|_| BusError::Config(format!("topic `{}`: too many partitions", spec.name)))?;
    let retention = retention_ms(spec.retention);
    let current = match bus.fetch_partition_count(&spec.name).await? {
        Some(n) => n,
        None => {
            let new = new_topic(&spec.name, partitions, &retention);
            let results = bus
                .admin
                .create_topics(&[new], &admin_options())
                .await
                .map_err(admin_err(&spec.name, CREATE_TOPIC))?;
            match results.into_iter().next() {
                Some(Ok(_)) | None => {
                    info!(topic = %spec.name, partitions, retention = %retention, "topic created");
                    return wait_for_partitions(bus, &spec.name, spec.partitions).await;
                }
                // Another process created it meanwhile: converge like an existing topic.
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                    wait_for_partitions(bus, &spec.name, 1).await?;
                    bus.fetch_partition_count(&spec.name)
                        .await?
                        .ok_or_else(|| BusError::UnknownTopic(spec.name.clone()))?
                }
                Some(Err((_, code))) => {
                    return Err(map_code(code, &admin_context(&spec.name, CREATE_TOPIC)))
                }
            }
        }
    };
    if spec.partitions < current {
        return Err(BusError::Conflict(format!(
            "topic `{}` has {current} partitions and cannot shrink to {}: keys would move; create a new topic version instead",
            spec.name, spec.partitions
        )));
    }
    if spec.partitions > current {
        let grow = NewPartitions::new(&spec.name, spec.partitions as usize);
        const OPERATION: &str = "add partitions (CreatePartitions)";
        let results = bus
            .admin
            .create_partitions(&[grow], &admin_options())
            .await
            .map_err(admin_err(&spec.name, OPERATION))?;
        if let Some(Err((_, code))) = results.into_iter().next() {
            return Err(map_code(code, &admin_context(&spec.name, OPERATION)));
        }
        info!(topic = %spec.name, from = current, to = spec.partitions, "partitions added");
        wait_for_partitions(bus, &spec.name, spec.partitions).await?;
    }
    let Some(configs) = describe_topic(bus, &spec.name).await? else {
        // AlterConfigs replaces the whole dynamic config: sent without the entries it could
        // not read, it would wipe what an operator set (min.insync.replicas, ...).
        warn!(topic = %spec.name, "the broker cannot describe this topic's config; its retention is left as it is (set it by hand)");
        return Ok(());
    };
    let stale = stale_configs(&configs);
    if parse_retention(&configs) != spec.retention || !stale.is_empty() {
        let alter = alter_config(&spec.name, &configs, &retention, &stale);
        const OPERATION: &str = "set retention and settings (AlterConfigs)";
        let results = bus
            .admin
            .alter_configs([&alter], &admin_options())
            .await
            .map_err(admin_err(&spec.name, OPERATION))?;
        if let Some(Err((_, code))) = results.into_iter().next() {
            return Err(map_code(code, &admin_context(&spec.name, OPERATION)));
        }
        let settings: Vec<&str> = stale.iter().map(|c| c.name).collect();
        info!(topic = %spec.name, retention = %retention, ?settings, "retention and settings set");
    }
    Ok(())
}

/// Waits until metadata shows at least `partitions` partitions of the topic.
async fn wait_for_partitions(bus: &KafkaBus, topic: &str, partitions: u32) -> Result<(), BusError> {
    let deadline = Instant::now() + PROPAGATION_WAIT;
    loop {
        if bus
            .fetch_partition_count(topic)
            .await?
            .is_some_and(|n| n >= partitions)
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BusError::Timeout(format!(
                "topic `{topic}` did not show {partitions} partitions within {PROPAGATION_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn watermarks(
    meta: &BaseConsumer,
    topic: &str,
    partitions: u32,
) -> Result<Vec<PartitionOffsets>, BusError> {
    (0..partitions)
        .map(|p| {
            let (low, high) = meta
                .fetch_watermarks(topic, p as i32, REQUEST_TIMEOUT)
                .map_err(map_err)?;
            Ok(PartitionOffsets {
                partition: p,
                low: u64::try_from(low).map_err(|_| bad_data("low watermark"))?,
                high: u64::try_from(high).map_err(|_| bad_data("high watermark"))?,
            })
        })
        .collect()
}

pub(super) async fn partition_offsets(
    bus: &KafkaBus,
    topic: &str,
) -> Result<Vec<PartitionOffsets>, BusError> {
    let n = bus
        .fetch_partition_count(topic)
        .await?
        .ok_or_else(|| BusError::UnknownTopic(topic.into()))?;
    let meta = Arc::clone(&bus.meta);
    let topic = topic.to_string();
    blocking(move || watermarks(&meta, &topic, n)).await
}

pub(super) async fn group_positions(
    bus: &KafkaBus,
    group: &str,
    topic: &str,
) -> Result<Vec<GroupPosition>, BusError> {
    let offsets = partition_offsets(bus, topic).await?;
    let client = bus.group_client(group)?;
    let topic = topic.to_string();
    blocking(move || {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for o in &offsets {
            tpl.add_partition(&topic, o.partition as i32);
        }
        let committed = client
            .committed_offsets(tpl, REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let committed: HashMap<i32, Offset> =
            committed_of(&committed, &topic)?.into_iter().collect();
        Ok(offsets
            .iter()
            .map(|o| {
                let c = committed
                    .get(&(o.partition as i32))
                    .and_then(|offset| match offset {
                        Offset::Offset(c) => u64::try_from(*c).ok(),
                        _ => None,
                    });
                // Never committed: everything still kept is ahead of the group. Records below
                // the log start are gone (retention) and are not lag, as on the other backends.
                let lag = o.high.saturating_sub(c.unwrap_or(o.low).max(o.low));
                GroupPosition {
                    partition: o.partition,
                    committed: c,
                    high: o.high,
                    lag,
                }
            })
            .collect())
    })
    .await
}

/// The group's commit on each partition of `topic` in a committed-offsets answer
/// (`Offset::Invalid` where it never committed); see [`commits_of`].
pub(super) fn committed_of(
    committed: &TopicPartitionList,
    topic: &str,
) -> Result<Vec<(i32, Offset)>, BusError> {
    commits_of(
        committed
            .elements_for_topic(topic)
            .iter()
            .map(|e| (e.partition(), e.offset(), e.error())),
    )
}

/// The commits of (partition, offset, partition error) entries. librdkafka answers a partition
/// the broker could not answer with `Offset::Invalid`, that is "never committed", and the
/// partition's error, while the whole request succeeds: such a partition fails the whole answer
/// with its error, or it would be taken for one without a commit (a `latest` group's member
/// would place it, lag would count from the log start).
pub(super) fn commits_of(
    entries: impl IntoIterator<Item = (i32, Offset, Result<(), KafkaError>)>,
) -> Result<Vec<(i32, Offset)>, BusError> {
    entries
        .into_iter()
        .map(|(p, offset, error)| match error {
            Ok(()) => Ok((p, offset)),
            Err(e) => Err(match e.rdkafka_error_code() {
                Some(code) => map_code(code, &format!("partition {p}'s committed offset")),
                None => BusError::Unavailable(format!("partition {p}'s committed offset: {e}")),
            }),
        })
        .collect()
}

pub(super) async fn offset_for_time(
    bus: &KafkaBus,
    topic: &str,
    partition: u32,
    ts_ms: i64,
) -> Result<u64, BusError> {
    bus.check_partition(topic, partition).await?;
    let meta = Arc::clone(&bus.meta);
    let name = topic.to_string();
    let (offset, high) = blocking(move || {
        let mut tpl = TopicPartitionList::new();
        // Before 1970 is the log start, as on the other backends (librdkafka takes no
        // negative time).
        tpl.add_partition_offset(&name, partition as i32, Offset::Offset(ts_ms.max(0)))
            .map_err(map_err)?;
        let found = meta
            .offsets_for_times(tpl, REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let offset = found
            .find_partition(&name, partition as i32)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => u64::try_from(o).ok(),
                // No record at or after the time: Kafka answers -1 (End).
                _ => None,
            });
        let (_, high) = meta
            .fetch_watermarks(&name, partition as i32, REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let high = u64::try_from(high).map_err(|_| bad_data("high watermark"))?;
        Ok((offset, high))
    })
    .await?;
    let Some(offset) = offset.filter(|o| *o < high) else {
        return Ok(high);
    };
    // Kafka's answer is the first record with a timestamp at or after `ts_ms`, so the record
    // there is never older. Some Kafka-protocol brokers (Tansu 0.6) answer the last offset or 0
    // for a time after the last record instead; such an answer is caught here and replaced by a
    // scan, which a correct broker never triggers.
    let mut at = offset;
    loop {
        let batch = read(bus, topic, partition, at, SCAN_BATCH).await?;
        let Some(last) = batch.last() else {
            return Ok(high);
        };
        if let Some(m) = batch.iter().find(|m| m.timestamp_ms >= ts_ms) {
            if m.offset != offset {
                warn!(
                    topic,
                    partition,
                    broker = offset,
                    scanned = m.offset,
                    "broker answered a wrong offset for a time; used a scan"
                );
            }
            return Ok(m.offset);
        }
        at = last.offset + 1;
        if at >= high {
            return Ok(high);
        }
    }
}

/// Records per read while scanning for a time on a broker that answered wrongly.
const SCAN_BATCH: usize = 500;

pub(super) async fn seek_group(
    bus: &KafkaBus,
    group: &str,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<(), BusError> {
    bus.check_partition(topic, partition).await?;
    // Kafka only takes commits from outside the group while it has no members; say so plainly
    // instead of passing on the broker's UNKNOWN_MEMBER_ID.
    let members = group_members(bus, group)
        .await?
        .len()
        .max(bus.local_members(group, None));
    if members > 0 {
        return Err(BusError::Conflict(format!(
            "group `{group}` has {members} active member(s); stop its consumers before moving its offsets"
        )));
    }
    let offset = i64::try_from(offset)
        .map_err(|_| BusError::Config(format!("offset {offset} is out of range")))?;
    let client = bus.group_client(group)?;
    let topic = topic.to_string();
    blocking(move || {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(offset))
            .map_err(map_err)?;
        client.commit(&tpl, CommitMode::Sync).map_err(map_err)?;
        Ok(())
    })
    .await
}

/// The topics each current member of `group` subscribes to (`None`: metadata not readable).
async fn group_members(bus: &KafkaBus, group: &str) -> Result<Vec<Option<Vec<String>>>, BusError> {
    let meta = Arc::clone(&bus.meta);
    let group = group.to_string();
    blocking(move || {
        let list = meta
            .client()
            .fetch_group_list(Some(&group), REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let Some(info) = list.groups().iter().find(|g| g.name() == group) else {
            return Ok(Vec::new());
        };
        if matches!(info.state(), "Dead" | "Empty") {
            return Ok(Vec::new());
        }
        Ok(info
            .members()
            .iter()
            .map(|m| m.metadata().and_then(subscribed_topics))
            .collect())
    })
    .await
}

pub(super) async fn active_members(
    bus: &KafkaBus,
    group: &str,
    topic: &str,
) -> Result<usize, BusError> {
    let members = group_members(bus, group).await?;
    // Tansu 0.6 lists (ListGroups) only groups that have committed offsets, so a group that
    // joined but never committed looks empty there; the members this process runs are counted
    // too. On Kafka the broker's figure already includes them.
    let local = bus.local_members(group, Some(topic));
    // One group may consume several topics (one member per subscription); count the members of
    // this topic. A member whose metadata cannot be read is counted: better to refuse a seek
    // than to move offsets under a live consumer.
    let listed = members
        .iter()
        .filter(|m| {
            m.as_ref()
                .is_none_or(|topics| topics.iter().any(|t| t == topic))
        })
        .count();
    Ok(listed.max(local))
}

/// The topics of a consumer-protocol subscription (member metadata): version i16, then an
/// array (i32 count) of strings (i16 length + bytes); later fields are not needed.
pub(super) fn subscribed_topics(data: &[u8]) -> Option<Vec<String>> {
    let mut rest = data.get(2..)?;
    let count = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    rest = &rest[4..];
    let mut topics = Vec::with_capacity(usize::try_from(count).ok()?.min(1024));
    for _ in 0..count {
        let len = usize::try_from(i16::from_be_bytes(rest.get(..2)?.try_into().ok()?)).ok()?;
        let name = rest.get(2..2 + len)?;
        topics.push(String::from_utf8_lossy(name).into_owned());
        rest = &rest[2 + len..];
    }
    Some(topics)
}

pub(super) async fn read(
    bus: &KafkaBus,
    topic: &str,
    partition: u32,
    from: u64,
    max: usize,
) -> Result<Vec<Message>, BusError> {
    bus.check_partition(topic, partition).await?;
    if max == 0 {
        return Ok(Vec::new());
    }
    // librdkafka only allows `assign` with a group id; this reader assigns one partition by
    // hand and never joins the group or commits, so the id is only a local label.
    let mut cc = bus.settings.consumer_config(Some(READER_GROUP));
    // A `from` below the log start reads from the first record still kept.
    cc.set("auto.offset.reset", "earliest");
    let topic = topic.to_string();
    blocking(move || {
        let reader: BaseConsumer = cc.create().map_err(super::config_err)?;
        let (low, high) = reader
            .fetch_watermarks(&topic, partition as i32, REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let high = u64::try_from(high).map_err(|_| bad_data("high watermark"))?;
        let low = u64::try_from(low).map_err(|_| bad_data("low watermark"))?;
        let start = from.max(low);
        if start >= high {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition as i32, Offset::Offset(start as i64))
            .map_err(map_err)?;
        reader.assign(&tpl).map_err(map_err)?;
        // Measured from the last record: a long read that keeps getting records goes on; one
        // that stalls fails rather than hand out a short answer, which would read as the end.
        let mut deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut out: Vec<Message> = Vec::with_capacity(max.min(1024));
        // Records of one partition arrive in offset order; stop at the high watermark read
        // above, so a busy partition does not keep the read going.
        while out.len() < max {
            if Instant::now() >= deadline {
                let offset = out.last().map_or(start, |m| m.offset + 1);
                return Err(BusError::ReadIncomplete {
                    topic: topic.clone(),
                    partition,
                    offset,
                    pending: high.saturating_sub(offset),
                    detail: format!(
                        "no record for {REQUEST_TIMEOUT:?} before the high watermark {high}, \
                         {} read before",
                        out.len()
                    ),
                });
            }
            match reader.poll(Duration::from_millis(100)) {
                // The offsets below the high watermark need not all be records (a transaction
                // marker, a compacted gap): the reader's position past them ends the read too.
                None => {
                    let at = reader.position().ok().and_then(|tpl| {
                        tpl.find_partition(&topic, partition as i32).and_then(|e| {
                            match e.offset() {
                                Offset::Offset(o) => u64::try_from(o).ok(),
                                _ => None,
                            }
                        })
                    });
                    if at.is_some_and(|o| o >= high) {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    let Ok(offset) = u64::try_from(rdkafka::Message::offset(&m)) else {
                        continue;
                    };
                    if offset < from {
                        continue;
                    }
                    out.push(to_message(&m, partition, offset));
                    deadline = Instant::now() + REQUEST_TIMEOUT;
                    if offset + 1 >= high {
                        break;
                    }
                }
                Some(Err(e)) => return Err(map_err(e).into()),
            }
        }
        Ok(out)
    })
    .await
}
