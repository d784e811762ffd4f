//! Embedded bus: a durable log per topic partition with committed offsets per group, in one
//! redb file under the data dir. One process; used by `nexus dev` and tests.

use async_trait::async_trait;

use super::*;

/// Not built yet: being written.
pub struct EmbeddedBus;

impl EmbeddedBus {
    pub fn open(_dir: &std::path::Path, _config: &crate::config::BusConfig) -> Result<Self, BusError> {
        Err(BusError::Config("embedded backend not built yet".into()))
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn kind(&self) -> &'static str { "embedded" }
    async fn publish(&self, _t: &str, _r: OutRecord) -> Result<Published, BusError> { Err(BusError::Closed) }
    async fn subscribe(&self, _g: &str, _t: &str, _o: SubscribeOptions) -> Result<Box<dyn Subscription>, BusError> { Err(BusError::Closed) }
    async fn topic_info(&self, _t: &str) -> Result<Option<TopicInfo>, BusError> { Err(BusError::Closed) }
    async fn apply_topic(&self, _s: &TopicSpec) -> Result<(), BusError> { Err(BusError::Closed) }
    async fn partition_offsets(&self, _t: &str) -> Result<Vec<PartitionOffsets>, BusError> { Err(BusError::Closed) }
    async fn group_positions(&self, _g: &str, _t: &str) -> Result<Vec<GroupPosition>, BusError> { Err(BusError::Closed) }
    async fn offset_for_time(&self, _t: &str, _p: u32, _ts: i64) -> Result<u64, BusError> { Err(BusError::Closed) }
    async fn seek_group(&self, _g: &str, _t: &str, _p: u32, _o: u64) -> Result<(), BusError> { Err(BusError::Closed) }
    async fn active_members(&self, _g: &str, _t: &str) -> Result<usize, BusError> { Err(BusError::Closed) }
    async fn read(&self, _t: &str, _p: u32, _f: u64, _m: usize) -> Result<Vec<Message>, BusError> { Err(BusError::Closed) }
    async fn health(&self) -> Result<(), BusError> { Err(BusError::Closed) }
}
