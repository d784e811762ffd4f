//! Publishing an [`Event`]: Avro encode, the event type and trace context as record headers,
//! keyed by the conversation id (per-conversation order), returning after the bus ack.

use thiserror::Error;

use super::codec::{encode, EncodeError, Event};
use crate::bus::{headers, Bus, BusError, OutRecord, Published};

#[derive(Debug, Error)]
pub enum PublishError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("publish to {topic}: {source}")]
    Bus { topic: String, source: BusError },
}

/// Encodes and publishes `event` to `topic`.
pub async fn publish(bus: &dyn Bus, topic: &str, event: &Event) -> Result<Published, PublishError> {
    let payload = encode(event)?;
    let mut record = OutRecord::new(event.envelope.conversation_id.clone(), payload)
        .with_header(headers::EVENT_TYPE, event.envelope.event_type.clone());
    if let Some(tp) = &event.envelope.traceparent {
        record = record.with_header(headers::TRACEPARENT, tp.clone());
    }
    bus.publish(topic, record)
        .await
        .map_err(|source| PublishError::Bus {
            topic: topic.to_string(),
            source,
        })
}
