//! Kafka's broadcast reader: a consumer that assigns itself every partition at the log end it
//! read before returning, on a thread of its own; it never joins a group and never commits.
//!
//! librdkafka keeps the fetch position across reconnects, so a broker outage neither skips nor
//! repeats. The partition count is re-read every [`PARTITIONS_REFRESH`]: a partition added
//! while the reader runs is assigned from its first record, since all of it came after the start.
//! Errors librdkafka reports and recovers from (a broker down, a fetch refused) are logged and
//! counted, as a group member does; only a fatal one ends the reader.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{info, warn};

use super::consumer::{stopping_error, to_message};
use super::{blocking, map_err, KafkaBus, REQUEST_TIMEOUT};
use crate::bus::tail::{TailFeed, TailSubscription};
use crate::bus::BusError;

/// librdkafka only allows `assign` with a group id; this reader never joins it or commits, so
/// it is only a local label.
const TAIL_GROUP: &str = "nexus-tail";
/// How long one poll waits, so a closed subscription stops the thread soon.
const POLL: Duration = Duration::from_millis(100);
/// How often the reader looks for partitions added to its topic (as group members do on
/// JetStream): a manual assignment never grows by itself, only a group subscription does.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(30);

pub(super) async fn start(bus: &KafkaBus, topic: &str) -> Result<TailSubscription, BusError> {
    start_with(bus, topic, PARTITIONS_REFRESH, None).await
}

/// [`start`] with the refresh interval given; `known` (tests only) pretends the topic had that
/// many partitions at the start, so the partitions past it are found by a refresh.
pub(super) async fn start_with(
    bus: &KafkaBus,
    topic: &str,
    refresh: Duration,
    known: Option<u32>,
) -> Result<TailSubscription, BusError> {
    let partitions = bus
        .fetch_partition_count(topic)
        .await?
        .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
    let partitions = known.map_or(partitions, |k| k.min(partitions));
    let cc = bus.settings.consumer_config(Some(TAIL_GROUP));
    let name = topic.to_string();
    // Positioned at the high watermarks before returning, so what is published after the call
    // is read (`Offset::End` would be resolved only at the first fetch).
    let reader = blocking(move || {
        let reader: BaseConsumer = cc.create().map_err(super::config_err)?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions as i32 {
            let (_, high) = reader
                .fetch_watermarks(&name, p, REQUEST_TIMEOUT)
                .map_err(map_err)?;
            tpl.add_partition_offset(&name, p, Offset::Offset(high))
                .map_err(map_err)?;
        }
        reader.assign(&tpl).map_err(map_err)?;
        Ok(reader)
    })
    .await?;
    let (sub, feed) = TailSubscription::channel();
    let reading = Reading {
        reader,
        topic: topic.to_string(),
        partitions,
        refresh,
    };
    std::thread::Builder::new()
        .name("nexus-kafka-tail".into())
        .spawn(move || reading.run(feed))
        .map_err(|e| BusError::Unavailable(format!("starting the tail reader: {e}")))?;
    Ok(sub)
}

struct Reading {
    reader: BaseConsumer,
    topic: String,
    /// Partitions assigned: `0..partitions`.
    partitions: u32,
    refresh: Duration,
}

impl Reading {
    fn run(mut self, feed: TailFeed) {
        let span = tracing::info_span!("kafka_tail", topic = %self.topic);
        let _entered = span.enter();
        let mut checked = Instant::now();
        while !feed.closed.is_cancelled() {
            if checked.elapsed() >= self.refresh {
                checked = Instant::now();
                if let Err(e) = self.take_new_partitions() {
                    warn!(error = %e, "reading the topic's partition count failed; trying again later");
                }
            }
            let item = match self.reader.poll(POLL) {
                None => continue,
                Some(Ok(m)) => {
                    let (Ok(partition), Ok(offset)) = (
                        u32::try_from(rdkafka::Message::partition(&m)),
                        u64::try_from(rdkafka::Message::offset(&m)),
                    ) else {
                        warn!("record with an invalid partition or offset skipped");
                        continue;
                    };
                    Ok(to_message(&m, partition, offset))
                }
                // Only a fatal error ends the tail (and with it the runtime reading it, which
                // stops the process); the rest librdkafka rides out, as a group member does.
                Some(Err(e)) => match stopping_error(&e, "tail") {
                    Some(fatal) => {
                        warn!(error = %fatal, "tail reader stopped");
                        let _ = feed.tx.blocking_send(Err(fatal));
                        return;
                    }
                    None => continue,
                },
            };
            if feed.tx.blocking_send(item).is_err() {
                return;
            }
        }
    }

    /// Assigns the partitions past the known count, from their start.
    fn take_new_partitions(&mut self) -> Result<(), BusError> {
        let md = self
            .reader
            .fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)
            .map_err(map_err)?;
        let now = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .map_or(0, |t| t.partitions().len() as u32);
        if now <= self.partitions {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in self.partitions..now {
            tpl.add_partition_offset(&self.topic, p as i32, Offset::Beginning)
                .map_err(map_err)?;
        }
        self.reader.incremental_assign(&tpl).map_err(map_err)?;
        info!(
            from = self.partitions,
            to = now,
            "partitions added to the topic; reading them from their start"
        );
        self.partitions = now;
        Ok(())
    }
}
