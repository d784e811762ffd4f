//! JetStream's broadcast reader: an ephemeral, in-memory, unacknowledged pull consumer on the
//! topic's stream (every partition subject), from the first sequence after the call on.
//!
//! The server sends and keeps no ack state per record (the point: every edge reads every
//! record). The reader checks that consumer sequences follow each other; on a gap, a lost
//! consumer or missed heartbeats it recreates the consumer from the stream sequence after the
//! last record it handed out, so a reconnect neither skips nor repeats. (async-nats's ordered
//! consumer does the same, but one that fails before its first record restarts from the
//! beginning of the stream: a day of old client events pushed to sockets.)

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::MessagesErrorKind;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use tracing::{debug, warn, Instrument};

use super::{codec, consumer_error, timestamp_ms, Inner, EPHEMERAL_INACTIVE};
use crate::bus::tail::{TailFeed, TailSubscription};
use crate::bus::BusError;

/// Pause before recreating a consumer that could not be created.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

pub(super) async fn start(bus: &Arc<Inner>, topic: &str) -> Result<TailSubscription, BusError> {
    let meta = bus.require_topic(topic).await?;
    let reader = Reader {
        bus: bus.clone(),
        stream: meta.stream.clone(),
        topic: topic.to_string(),
        // Read from the stream's state now: what is published after the call is read.
        next_seq: meta.state.last_seq + 1,
    };
    // Created before returning, so a topic that cannot be read fails the call.
    let messages = reader.open().await?;
    let (sub, feed) = TailSubscription::channel();
    let span = tracing::info_span!("jetstream_tail", topic);
    tokio::spawn(reader.run(messages, feed).instrument(span));
    Ok(sub)
}

struct Reader {
    bus: Arc<Inner>,
    stream: String,
    topic: String,
    /// The stream sequence of the next record to hand out.
    next_seq: u64,
}

/// A consumer's name and its message stream.
type Open = (String, pull::Stream);

impl Reader {
    /// A new consumer from `next_seq` on.
    async fn open(&self) -> Result<Open, BusError> {
        let name = format!("nexus-tail-{}", uuid::Uuid::now_v7().simple());
        let config = pull::Config {
            name: Some(name.clone()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: self.next_seq,
            },
            ack_policy: AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: EPHEMERAL_INACTIVE,
            description: Some(format!("nexus bus: broadcast read of {}", self.topic)),
            ..Default::default()
        };
        let consumer = self
            .bus
            .js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| consumer_error(&format!("tail consumer on {}", self.stream), &e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::Unavailable(format!("tail consumer on {}: {e}", self.stream)))?;
        Ok((name, messages))
    }

    /// Deletes a consumer given up on; it would expire by itself after going idle.
    async fn close(&self, name: &str) {
        if let Err(e) = self
            .bus
            .js
            .delete_consumer_from_stream(name, &self.stream)
            .await
        {
            debug!(consumer = name, error = %e, "tail consumer left to expire");
        }
    }

    async fn run(mut self, first: Open, feed: TailFeed) {
        let mut open = Some(first);
        loop {
            let (name, messages) = match open.take() {
                Some(o) => o,
                None => match self.open().await {
                    Ok(o) => o,
                    Err(e) => {
                        if !feed.send(Err(e)).await {
                            return;
                        }
                        tokio::select! {
                            () = tokio::time::sleep(RETRY_PAUSE) => continue,
                            () = feed.closed.cancelled() => return,
                        }
                    }
                },
            };
            let ended = self.read(messages, &feed).await;
            self.close(&name).await;
            if ended {
                return;
            }
            debug!(next_seq = self.next_seq, "recreating the tail consumer");
        }
    }

    /// Hands records out until the consumer must be recreated (false) or reading ends (true).
    async fn read(&mut self, mut messages: pull::Stream, feed: &TailFeed) -> bool {
        let mut consumer_seq = 0;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                () = feed.closed.cancelled() => return true,
            };
            let item = match next {
                // The client is closed for good.
                None => return true,
                Some(Err(e)) => match e.kind() {
                    MessagesErrorKind::MissingHeartbeat
                    | MessagesErrorKind::ConsumerDeleted
                    | MessagesErrorKind::NoResponders => {
                        warn!(error = %e, "tail consumer lost; recreating it where it was");
                        return false;
                    }
                    _ => Err(BusError::Unavailable(format!(
                        "reading {}: {e}",
                        self.topic
                    ))),
                },
                Some(Ok(m)) => {
                    let Ok(info) = m.info() else {
                        warn!("record without JetStream metadata skipped");
                        continue;
                    };
                    if info.consumer_sequence != consumer_seq + 1 {
                        warn!(
                            expected = consumer_seq + 1,
                            got = info.consumer_sequence,
                            "tail consumer skipped records; recreating it where it was"
                        );
                        return false;
                    }
                    consumer_seq = info.consumer_sequence;
                    self.next_seq = info.stream_sequence + 1;
                    let (seq, ts) = (
                        info.stream_sequence,
                        timestamp_ms(info.published.unix_timestamp_nanos()),
                    );
                    let Some(partition) = codec::partition_of_subject(&self.topic, &m.subject)
                    else {
                        warn!(subject = %m.subject, "record outside the topic's partitions skipped");
                        continue;
                    };
                    Ok(codec::message(
                        &self.topic,
                        partition,
                        seq,
                        ts,
                        m.message.headers.as_ref(),
                        m.message.payload.clone(),
                    ))
                }
            };
            if !feed.send(item).await {
                return true;
            }
        }
    }
}
