//! Pieces the backends' unit tests share: a valid event keyed onto a partition, consumer
//! options sized for tests, and a handler that always asks to be tried again later.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::consumer::{ConsumerOptions, HandleError, Handler};
use super::{Message, OutRecord, StartFrom};
use crate::events::{encode, Event};

/// A valid (decodable) event record whose key lands on `partition` of `partitions`.
pub(crate) fn event_on(partition: u32, partitions: u32) -> OutRecord {
    let key = super::partitioner::key_in(partition, partitions, "k");
    let body = crate::events::chat::TypingIndicated {
        participant_id: "p".into(),
        participant_kind: crate::events::chat::ParticipantKind::Customer,
        state: crate::events::chat::TypingState::Started,
        preview: None,
        transcript_position: None,
    };
    let event = Event::typed(&body, "t1", &key, "test").expect("event");
    OutRecord::new(key, encode(&event).expect("encode"))
}

/// Consumer options with short retries and `concurrency` lanes.
pub(crate) fn options(concurrency: usize) -> ConsumerOptions {
    ConsumerOptions {
        concurrency,
        max_in_flight: 16,
        handler_timeout: Duration::from_secs(30),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(100),
        lag_interval: Duration::from_secs(5),
        start: StartFrom::Earliest,
    }
}

/// Asks for every record to be tried again a minute later (a peer's `Retry-After`), counting
/// the tries.
#[derive(Default)]
pub(crate) struct Later(pub AtomicUsize);

impl Later {
    pub(crate) fn tries(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Handler for Later {
    async fn handle(&self, _e: &Event, _m: &Message) -> Result<(), HandleError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Err(HandleError::RetryLater {
            reason: "the peer asked for a minute".into(),
            not_before_ms: chrono::Utc::now().timestamp_millis() + 60_000,
            counts: false,
        })
    }
}
