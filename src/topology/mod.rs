//! Topology as data: the topics on the bus and the worker roles that consume them, declared in
//! `topology/nexus.yaml` (built in) or a file of the same shape.
//!
//! - [`model`]: the YAML model ([`Topology`], [`Topic`], [`Role`]) and its validation.
//! - [`plan`](mod@plan): comparing the topology with a bus ([`plan()`]) and making the bus match
//!   ([`apply()`]), terraform-style and idempotent.
//! - [`asyncapi`]: the AsyncAPI 3.0 document of topics, event schemas and roles.
//! - [`ensure_topics`]: the start-up check of workers and edges, which refuse to run on a bus
//!   the topology was not applied to.
//!
//! Nothing here prints; every function returns data with a `Display` for the CLI.

pub mod asyncapi;
pub mod duration;
pub mod model;
pub mod plan;
pub mod topics;

use std::path::PathBuf;

use thiserror::Error;

pub use duration::{format_duration, parse_duration, DurationError};
pub use model::{Retention, Role, Topic, Topology, BUILTIN_YAML, DEFAULT_DLQ_RETENTION};
pub use plan::{apply, plan, Change, Plan, TopicPlan, Updates};

use crate::bus::{Bus, BusError};

/// Errors of loading, checking and applying a topology; each names the item at fault.
#[derive(Debug, Error)]
pub enum TopologyError {
    #[error("cannot read topology file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax, an unknown field, a wrong type or a bad duration (serde names the place).
    /// The YAML error is part of the message, not a `source`, so it is printed once.
    #[error("topology: {0}")]
    Parse(serde_yaml::Error),
    /// Any other error of a topology read from a file, with the file's path in front.
    #[error("{}: {error}", path.display())]
    InFile {
        path: PathBuf,
        error: Box<TopologyError>,
    },
    #[error("topic `{0}` is declared twice (a `.dlq` topic counts as declared by `dlq: true`)")]
    DuplicateTopic(String),
    #[error("topic `{topic}`: {message}")]
    InvalidTopic { topic: String, message: String },
    #[error("topic `{topic}` carries event type `{event_type}`, which the schema registry does not know")]
    UnknownEventType { topic: String, event_type: String },
    #[error("role `{0}` is declared twice")]
    DuplicateRole(String),
    #[error("role `{role}`: {message}")]
    InvalidRole { role: String, message: String },
    #[error("role `{role}` consumes topic `{topic}`, which is not declared")]
    UnknownTopicInRole { role: String, topic: String },
    #[error("no role `{0}` in the topology")]
    UnknownRole(String),
    /// A worker's topics are not on the bus.
    #[error(
        "topics missing on the bus: {} — run `nexus topology apply --bus <url>`",
        topics.join(", ")
    )]
    MissingTopics { topics: Vec<String> },
    /// `apply` refuses to run while any topic conflicts; nothing was changed. Each conflict
    /// says what to do about it.
    #[error("apply refused, nothing changed: {}", conflicts.join("; "))]
    Conflicts { conflicts: Vec<String> },
    /// After applying, the bus still differs (a backend that ignored part of the spec).
    #[error("applied, but the bus still differs for: {}", topics.join(", "))]
    NotConverged { topics: Vec<String> },
    /// Applying one topic failed; the topics before it were applied.
    #[error(
        "applying topic `{topic}` failed: {error}{}",
        if applied.is_empty() {
            "; nothing was changed before it".to_owned()
        } else {
            format!(
                "; applied before it: {} (run `nexus topology plan` to see what is left)",
                applied.join(", ")
            )
        }
    )]
    ApplyFailed {
        topic: String,
        /// The topics created or updated before the failure, in order.
        applied: Vec<String>,
        error: BusError,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl TopologyError {
    /// The error itself, without the file it was found in ([`TopologyError::InFile`]): what
    /// callers match on.
    pub fn kind(&self) -> &TopologyError {
        match self {
            TopologyError::InFile { error, .. } => error.kind(),
            other => other,
        }
    }
}

/// Checks that every topic exists on the bus; the error lists all missing ones at once.
pub async fn ensure_topics<S: AsRef<str>>(
    bus: &dyn Bus,
    topics: &[S],
) -> Result<(), TopologyError> {
    let mut missing = Vec::new();
    for topic in topics {
        if bus.topic_info(topic.as_ref()).await?.is_none() {
            missing.push(topic.as_ref().to_owned());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(TopologyError::MissingTopics { topics: missing })
    }
}

/// [`ensure_topics`] for a role: the topics it reads and their dead-letter topics.
pub async fn ensure_role_topics(
    bus: &dyn Bus,
    topology: &Topology,
    role: &str,
) -> Result<(), TopologyError> {
    ensure_topics(bus, &topology.role_topics(role)?).await
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::bus::Bus;
    use crate::config::Config;

    /// A small topology with made-up event types, valid whatever the registry holds when
    /// parsed with `Topology::from_yaml_with(.., None)`.
    pub(crate) const TEST_YAML: &str = r#"
topics:
  - name: t.a
    partitions: 3
    retention: 7d
    dlq: true
    events: [A]
  - name: t.b
    partitions: 2
    retention: 24h
    producers: [r]
roles:
  - name: r
    group: g-r
    topics: [t.a]
    concurrency: 4
"#;

    /// A fresh embedded bus in a temporary directory (kept alive by the returned guard).
    pub(crate) fn embedded_bus() -> (Arc<dyn Bus>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = crate::bus::embedded::EmbeddedBus::open(dir.path(), &Config::defaults().bus)
            .expect("embedded bus opens");
        (Arc::new(bus), dir)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::bus::TopicSpec;

    #[tokio::test]
    async fn ensure_topics_lists_every_missing_topic() {
        let (bus, _dir) = embedded_bus();
        bus.apply_topic(&TopicSpec {
            name: "t.a".into(),
            partitions: 1,
            retention: None,
        })
        .await
        .unwrap();
        ensure_topics(bus.as_ref(), &["t.a"]).await.unwrap();
        let e = ensure_topics(bus.as_ref(), &["t.a", "t.b", "t.c"])
            .await
            .unwrap_err();
        assert!(matches!(&e, TopologyError::MissingTopics { topics } if topics == &["t.b", "t.c"]));
        assert_eq!(
            e.to_string(),
            "topics missing on the bus: t.b, t.c — run `nexus topology apply --bus <url>`"
        );

        let topology = Topology::from_yaml_with(TEST_YAML, None).unwrap();
        let e = ensure_role_topics(bus.as_ref(), &topology, "r")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, TopologyError::MissingTopics { topics } if topics == &["t.a.dlq", "t.b"]),
            "{e}"
        );
    }
}
