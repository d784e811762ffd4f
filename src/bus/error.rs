//! Errors of the bus and its backends; callers decide by [`BusError`] variant, never by text.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BusError {
    /// The bus URL or a bus setting is wrong.
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// The topic does not exist; `nexus topology apply` creates it.
    #[error("topic `{0}` does not exist on the bus (run `nexus topology apply`)")]
    UnknownTopic(String),
    /// The partition is out of the topic's range.
    #[error("topic `{topic}` has no partition {partition}")]
    UnknownPartition { topic: String, partition: u32 },
    /// The broker could not be reached or refused the request; retrying may help.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The TLS handshake with the broker failed: its certificate is not trusted (`bus.ca_file`),
    /// or it refused ours (`bus.client_cert_file`). The text says which and what to set;
    /// retrying does not help until the certificates or the settings change.
    #[error("bus TLS handshake failed: {0}")]
    Tls(String),
    /// The broker did not answer in time; retrying may help.
    #[error("bus operation timed out: {0}")]
    Timeout(String),
    /// The embedded store failed (disk, corruption).
    #[error("embedded log: {0}")]
    Storage(String),
    /// The subscription was closed.
    #[error("subscription closed")]
    Closed,
    /// The operation is not possible in the current state (e.g. a group with active members).
    #[error("{0}")]
    Conflict(String),
    /// The record (payload, key and headers) is larger than the broker takes; retrying the same
    /// record never helps.
    #[error("record too large: {0}")]
    TooLarge(String),
    /// A ranged read ([`Bus::read`](super::Bus::read)) stopped short of what it was asked for
    /// while the broker still had records pending before the log end: returning what was read
    /// would look like the end of the partition. Retrying may help.
    #[error(
        "reading {topic} partition {partition}: {pending} record(s) pending at or after offset \
         {offset} could not be fetched ({detail})"
    )]
    ReadIncomplete {
        topic: String,
        partition: u32,
        /// The first offset not read.
        offset: u64,
        /// What the broker counted as left from `offset` to its log end (on Kafka an offset
        /// span, transaction markers included).
        pending: u64,
        /// How many tries or how long, and the last thing seen.
        detail: String,
    },
}

impl BusError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BusError::Unavailable(_) | BusError::Timeout(_) | BusError::ReadIncomplete { .. }
        )
    }
}
