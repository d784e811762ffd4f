//! A real bus with the faults a test injects where the services cannot be made to fail on
//! demand: every call goes to the inner bus unless the test's [`Faults`] refuse or alter it.

use std::sync::Arc;

use async_trait::async_trait;
use nexus::bus::{
    Bus, BusError, GroupPosition, Message, OutRecord, PartitionOffsets, Published,
    SubscribeOptions, Subscription, TopicInfo, TopicSpec,
};

/// What a test changes on the way to the real bus; each hook's default lets the call through.
#[async_trait]
pub trait Faults: Send + Sync + 'static {
    /// Before a publish to `topic` (it may wait): an error refuses the publish unsent.
    async fn publish(&self, _topic: &str) -> Result<(), BusError> {
        Ok(())
    }
    /// Before a read of `topic`'s `partition` from `from`: an error fails the read.
    fn read(&self, _topic: &str, _partition: u32, _from: u64) -> Result<(), BusError> {
        Ok(())
    }
    /// May change the offsets the bus reports for `topic`.
    fn offsets(&self, _topic: &str, _offsets: &mut [PartitionOffsets]) {}
}

/// The inner bus behind `faults`; the test reads what its faults counted through `faults`.
pub struct FaultyBus<F> {
    pub inner: Arc<dyn Bus>,
    pub faults: F,
}

impl<F: Faults> FaultyBus<F> {
    pub fn new(inner: Arc<dyn Bus>, faults: F) -> Self {
        FaultyBus { inner, faults }
    }
}

#[async_trait]
impl<F: Faults> Bus for FaultyBus<F> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError> {
        self.faults.publish(topic).await?;
        self.inner.publish(topic, record).await
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
        let mut offsets = self.inner.partition_offsets(topic).await?;
        self.faults.offsets(topic, &mut offsets);
        Ok(offsets)
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
        self.faults.read(topic, partition, from)?;
        self.inner.read(topic, partition, from, max).await
    }
    async fn health(&self) -> Result<(), BusError> {
        self.inner.health().await
    }
}
