//! A [`Bus`] wrapper that counts and times every publish in one place, whatever the backend,
//! so `nexus_events_published_total` and `nexus_bus_publish_seconds` mean the same everywhere.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;

use super::*;
use crate::telemetry::metrics as m;

pub struct InstrumentedBus {
    inner: Arc<dyn Bus>,
    /// Handles per topic, resolved once: topics are few and fixed by the topology.
    per_topic: RwLock<HashMap<String, Arc<TopicMetrics>>>,
}

struct TopicMetrics {
    seconds: metrics::Histogram,
    published: metrics::Counter,
    errors: metrics::Counter,
}

impl InstrumentedBus {
    pub fn wrap(inner: Arc<dyn Bus>) -> Arc<dyn Bus> {
        Arc::new(Self {
            inner,
            per_topic: RwLock::new(HashMap::new()),
        })
    }

    fn metrics_of(&self, topic: &str) -> Arc<TopicMetrics> {
        let read = self.per_topic.read().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = read.get(topic) {
            return Arc::clone(t);
        }
        drop(read);
        let mut write = self.per_topic.write().unwrap_or_else(|e| e.into_inner());
        let t = write.entry(topic.to_string()).or_insert_with(|| {
            Arc::new(TopicMetrics {
                seconds: metrics::histogram!(m::BUS_PUBLISH_SECONDS, "topic" => topic.to_string()),
                published: metrics::counter!(m::EVENTS_PUBLISHED_TOTAL, "topic" => topic.to_string()),
                errors: metrics::counter!(m::BUS_PUBLISH_ERRORS_TOTAL, "topic" => topic.to_string()),
            })
        });
        Arc::clone(t)
    }
}

#[async_trait]
impl Bus for InstrumentedBus {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError> {
        let started = Instant::now();
        let result = self.inner.publish(topic, record).await;
        let t = self.metrics_of(topic);
        match &result {
            Ok(_) => {
                t.seconds.record(started.elapsed().as_secs_f64());
                t.published.increment(1);
            }
            Err(_) => t.errors.increment(1),
        }
        result
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        self.inner.subscribe(group, topic, options).await
    }

    async fn tail(&self, topic: &str) -> Result<Box<dyn Subscription>, BusError> {
        self.inner.tail(topic).await
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BusError> {
        self.inner.topic_info(topic).await
    }

    async fn list_topics(&self) -> Result<Vec<String>, BusError> {
        self.inner.list_topics().await
    }

    async fn apply_topic(&self, spec: &TopicSpec) -> Result<(), BusError> {
        self.inner.apply_topic(spec).await
    }

    async fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, BusError> {
        self.inner.partition_offsets(topic).await
    }

    async fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError> {
        self.inner.group_positions(group, topic).await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<u64, BusError> {
        self.inner.offset_for_time(topic, partition, ts_ms).await
    }

    async fn count_between(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<u64, BusError> {
        self.inner.count_between(topic, partition, from, to).await
    }

    async fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BusError> {
        self.inner.seek_group(group, topic, partition, offset).await
    }

    async fn active_members(&self, group: &str, topic: &str) -> Result<usize, BusError> {
        self.inner.active_members(group, topic).await
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Message>, BusError> {
        self.inner.read(topic, partition, from, max).await
    }

    async fn health(&self) -> Result<(), BusError> {
        self.inner.health().await
    }
}
