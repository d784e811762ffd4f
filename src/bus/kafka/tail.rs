//! Kafka's broadcast reader: a consumer that assigns itself every partition at the log end it
//! read before returning, on a thread of its own; it never joins a group and never commits.
//!
//! librdkafka keeps the fetch position across reconnects, so a broker outage neither skips nor
//! repeats. Partitions added to the topic later are read by the next process, not this one.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use super::consumer::to_message;
use super::{blocking, map_err, KafkaBus, REQUEST_TIMEOUT};
use crate::bus::tail::{TailFeed, TailSubscription};
use crate::bus::BusError;

/// librdkafka only allows `assign` with a group id; this reader never joins it or commits, so
/// it is only a local label.
const TAIL_GROUP: &str = "nexus-tail";
/// How long one poll waits, so a closed subscription stops the thread soon.
const POLL: Duration = Duration::from_millis(100);

pub(super) async fn start(bus: &KafkaBus, topic: &str) -> Result<TailSubscription, BusError> {
    let partitions = bus
        .fetch_partition_count(topic)
        .await?
        .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))?;
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
    let name = topic.to_string();
    std::thread::Builder::new()
        .name("nexus-kafka-tail".into())
        .spawn(move || read(reader, name, feed))
        .map_err(|e| BusError::Unavailable(format!("starting the tail reader: {e}")))?;
    Ok(sub)
}

fn read(reader: BaseConsumer, topic: String, feed: TailFeed) {
    let span = tracing::info_span!("kafka_tail", topic = %topic);
    let _entered = span.enter();
    while !feed.closed.is_cancelled() {
        let item = match reader.poll(POLL) {
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
            Some(Err(e)) => Err(BusError::from(map_err(e))),
        };
        if feed.tx.blocking_send(item).is_err() {
            return;
        }
    }
}
