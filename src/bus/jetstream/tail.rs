//! JetStream's broadcast reader: one ordered consumer on the topic's stream (all partition
//! subjects), from the next record on.
//!
//! An ordered consumer is ephemeral, in memory and unacknowledged: the server sends, the client
//! checks the consumer sequence and recreates the consumer after the last stream sequence it saw
//! when a record went missing or heartbeats stopped. So a reconnect neither skips nor repeats,
//! and the server keeps no ack state per record (the point: every edge reads every record).

use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use tracing::{warn, Instrument};

use super::{codec, consumer_error, timestamp_ms, Inner};
use crate::bus::tail::{TailFeed, TailSubscription};
use crate::bus::BusError;

pub(super) async fn start(bus: &Arc<Inner>, topic: &str) -> Result<TailSubscription, BusError> {
    let meta = bus.require_topic(topic).await?;
    let config = pull::OrderedConfig {
        deliver_policy: DeliverPolicy::New,
        description: Some(format!("nexus bus: broadcast read of {topic}")),
        ..Default::default()
    };
    // Created before returning, so what is published after the call is read.
    let consumer = bus
        .js
        .create_consumer_on_stream(config, &meta.stream)
        .await
        .map_err(|e| consumer_error(&format!("tail consumer on {}", meta.stream), &e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| BusError::Unavailable(format!("tail consumer on {}: {e}", meta.stream)))?;
    let (sub, feed) = TailSubscription::channel();
    let span = tracing::info_span!("jetstream_tail", topic);
    tokio::spawn(read(topic.to_string(), messages, feed).instrument(span));
    Ok(sub)
}

async fn read(topic: String, mut messages: pull::Ordered, feed: TailFeed) {
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = feed.closed.cancelled() => return,
        };
        let item = match next {
            // The connection is gone for good (client closed).
            None => return,
            Some(Err(e)) => Err(BusError::Unavailable(format!("reading {topic}: {e}"))),
            Some(Ok(m)) => {
                let Some(partition) = codec::partition_of_subject(&topic, m.subject.as_str())
                else {
                    warn!(subject = %m.subject, "record outside the topic's partitions skipped");
                    continue;
                };
                let Ok(info) = m.info() else {
                    warn!("record without JetStream metadata skipped");
                    continue;
                };
                let (seq, ts) = (
                    info.stream_sequence,
                    timestamp_ms(info.published.unix_timestamp_nanos()),
                );
                Ok(codec::message(
                    &topic,
                    partition,
                    seq,
                    ts,
                    m.message.headers.as_ref(),
                    m.message.payload.clone(),
                ))
            }
        };
        if !feed.send(item).await {
            return;
        }
    }
}
