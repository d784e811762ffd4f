//! The topology model: topics and worker roles as declared in YAML, and their validation.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::{format_duration, parse_duration, DurationError};
use super::TopologyError;
use crate::bus::{dlq_topic, TopicSpec};
use crate::events::Registry;

/// The topology built into the binary.
pub const BUILTIN_YAML: &str = include_str!("../../topology/nexus.yaml");

/// How long a dead-letter topic keeps records when the YAML does not say: two weeks, so a
/// dead letter from a Friday is still there after a week of holiday and a week of triage.
pub const DEFAULT_DLQ_RETENTION: Duration = Duration::from_secs(14 * 86_400);

/// Kafka's limit on topic names; the other backends map names to what they accept.
const MAX_TOPIC_NAME: usize = 249;

/// Most partitions a topic may declare. Kafka's practical limits are in the thousands per
/// broker (each partition is files, a replica fetcher and leader election work; Confluent
/// advises at most about 4 000 per broker and 200 000 per cluster), and every backend here
/// builds per-partition state at start (a log and watch per partition on the embedded bus, a
/// consumer and lease per partition on JetStream): a typo such as `partitions: 4000000000`
/// must be refused at load, not make `nexus dev` hang building partitions.
pub const MAX_PARTITIONS: u32 = 10_000;

/// What [`dlq_topic`] appends to a topic's name.
const DLQ_SUFFIX: &str = ".dlq";

/// Retention of a topic: a humane duration in YAML (`7d`), `None` is `forever`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Retention(pub Option<Duration>);

impl TryFrom<String> for Retention {
    type Error = DurationError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        parse_duration(&value).map(Retention)
    }
}

impl From<Retention> for String {
    fn from(value: Retention) -> Self {
        format_duration(value.0)
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

/// The whole topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub topics: Vec<Topic>,
    #[serde(default)]
    pub roles: Vec<Role>,
}

/// One topic (and, with `dlq: true`, its dead-letter topic).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topic {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// What the partition key is, for readers of the topology and the AsyncAPI document.
    #[serde(default = "default_key")]
    pub key: String,
    pub partitions: u32,
    pub retention: Retention,
    /// Whether the topic has a dead-letter topic, [`dlq_topic`] of its name.
    #[serde(default)]
    pub dlq: bool,
    /// Retention of the dead-letter topic; [`DEFAULT_DLQ_RETENTION`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_retention: Option<Retention>,
    /// Components that publish to the topic (`edge`, a role name, `campaigns`, ...).
    #[serde(default)]
    pub producers: Vec<String>,
    /// Event types (registry short names) the topic carries.
    #[serde(default)]
    pub events: Vec<String>,
}

fn default_key() -> String {
    "conversation id".to_owned()
}

/// One worker role: a consumer group reading some topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    pub name: String,
    /// The consumer group; for a broadcast role, the prefix each pod adds its id to.
    pub group: String,
    #[serde(default)]
    pub description: String,
    pub topics: Vec<String>,
    /// Key lanes per pod.
    pub concurrency: u32,
    /// Every pod reads everything from the tail and never commits (the edge's delivery feed).
    #[serde(default)]
    pub broadcast: bool,
}

impl Topic {
    /// What the topic itself should look like on the bus.
    pub fn spec(&self) -> TopicSpec {
        TopicSpec {
            name: self.name.clone(),
            partitions: self.partitions,
            retention: self.retention.0,
        }
    }

    /// Name of the dead-letter topic, if the topic has one.
    pub fn dlq_name(&self) -> Option<String> {
        self.dlq.then(|| dlq_topic(&self.name))
    }

    /// What the dead-letter topic should look like. It has the source's partition count so a
    /// dead letter keeps its key's partition and copying it back lands where it came from.
    pub fn dlq_spec(&self) -> Option<TopicSpec> {
        self.dlq_name().map(|name| TopicSpec {
            name,
            partitions: self.partitions,
            retention: self.dlq_retention().0,
        })
    }

    /// Retention of the dead-letter topic, defaulted.
    pub fn dlq_retention(&self) -> Retention {
        self.dlq_retention
            .unwrap_or(Retention(Some(DEFAULT_DLQ_RETENTION)))
    }
}

impl Topology {
    /// The topology built into the binary (`topology/nexus.yaml`), checked against the built-in
    /// schema registry.
    ///
    /// # Panics
    /// If the built-in YAML is invalid; the test `builtin_topology_is_valid` keeps it valid, so
    /// this is an invariant of the build, not a runtime condition.
    pub fn builtin() -> Topology {
        Self::from_yaml(BUILTIN_YAML).expect("built-in topology is valid")
    }

    /// Reads and validates a topology file.
    pub fn load(path: impl AsRef<Path>) -> Result<Topology, TopologyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        // An operator with several topology files must see which one is wrong.
        Self::from_yaml(&text).map_err(|error| TopologyError::InFile {
            path: path.to_owned(),
            error: Box::new(error),
        })
    }

    /// Parses and validates a topology, checking event types against the built-in registry
    /// (skipped while that registry is empty, e.g. before `schemas/` exists).
    pub fn from_yaml(yaml: &str) -> Result<Topology, TopologyError> {
        Self::from_yaml_with(yaml, Some(Registry::builtin()))
    }

    /// Parses and validates a topology; event types are checked against `registry` when it is
    /// given and not empty.
    pub fn from_yaml_with(
        yaml: &str,
        registry: Option<&Registry>,
    ) -> Result<Topology, TopologyError> {
        let topology: Topology = serde_yaml::from_str(yaml).map_err(TopologyError::Parse)?;
        topology.validate(registry)?;
        Ok(topology)
    }

    /// Checks the rules serde cannot: unique names (also once `.` and `_` are alike, as
    /// JetStream stream names and Kafka make them), partitions ≥ 1, `.dlq` names left to
    /// dead-letter topics, roles reading declared topics that have a dead-letter topic, known
    /// event types.
    pub fn validate(&self, registry: Option<&Registry>) -> Result<(), TopologyError> {
        // Every name a topic occupies on the bus, DLQs included, so `x.dlq` declared by hand
        // next to `x` with `dlq: true` is caught as the clash it is.
        let mut names = HashSet::new();
        // The same names with `.` as `_`: JetStream's stream of `a.b` is `a_b`, the stream of
        // topic `a_b` too, and Kafka refuses a topic that differs from another only so.
        let mut streams: BTreeMap<String, String> = BTreeMap::new();
        for topic in &self.topics {
            check_topic_name(&topic.name)?;
            if topic.partitions == 0 {
                return Err(TopologyError::InvalidTopic {
                    topic: topic.name.clone(),
                    message: "partitions must be at least 1".into(),
                });
            }
            if topic.partitions > MAX_PARTITIONS {
                return Err(TopologyError::InvalidTopic {
                    topic: topic.name.clone(),
                    message: format!(
                        "partitions {} is more than the {MAX_PARTITIONS} a topic may have \
                         (Kafka brokers carry a few thousand partitions each; a topic needs \
                         only as many as consumers should share its load)",
                        topic.partitions
                    ),
                });
            }
            if !topic.dlq && topic.dlq_retention.is_some() {
                return Err(TopologyError::InvalidTopic {
                    topic: topic.name.clone(),
                    message: "`dlq_retention` is set but `dlq` is false".into(),
                });
            }
            // Checked here, not at apply, where Kafka would refuse it after the topic itself
            // was created.
            if topic.dlq && dlq_topic(&topic.name).len() > MAX_TOPIC_NAME {
                return Err(TopologyError::InvalidTopic {
                    topic: topic.name.clone(),
                    message: format!(
                        "with `dlq: true` the name has at most {} characters, so that its \
                         dead-letter topic `<name>{DLQ_SUFFIX}` has at most {MAX_TOPIC_NAME}",
                        MAX_TOPIC_NAME - DLQ_SUFFIX.len()
                    ),
                });
            }
            for name in std::iter::once(topic.name.clone()).chain(topic.dlq_name()) {
                if !names.insert(name.clone()) {
                    return Err(TopologyError::DuplicateTopic(name));
                }
                if let Some(other) = streams.insert(name.replace('.', "_"), name.clone()) {
                    return Err(TopologyError::InvalidTopic {
                        topic: name,
                        message: format!(
                            "collides with topic `{other}`: names that differ only in `.` and \
                             `_` are one JetStream stream, and Kafka refuses the second"
                        ),
                    });
                }
            }
            // A dead-letter topic is declared by `dlq: true` on its source, never by hand: a
            // `.dlq` topic of its own would get a `.dlq.dlq`, or be a DLQ nothing writes to.
            if let Some(source) = topic.name.strip_suffix(DLQ_SUFFIX) {
                return Err(TopologyError::InvalidTopic {
                    topic: topic.name.clone(),
                    message: format!(
                        "names ending in `{DLQ_SUFFIX}` are dead-letter topics; declare \
                         `dlq: true` on `{source}` instead"
                    ),
                });
            }
            let mut events = HashSet::new();
            for event in &topic.events {
                if !events.insert(event) {
                    return Err(TopologyError::InvalidTopic {
                        topic: topic.name.clone(),
                        message: format!("event type `{event}` is listed twice"),
                    });
                }
                if let Some(registry) = registry.filter(|r| !r.all().is_empty()) {
                    if registry.latest(event).is_none() {
                        return Err(TopologyError::UnknownEventType {
                            topic: topic.name.clone(),
                            event_type: event.clone(),
                        });
                    }
                }
            }
        }

        let mut roles = HashSet::new();
        let mut groups: BTreeMap<&str, &str> = BTreeMap::new();
        let mut broadcast: Option<&str> = None;
        for role in &self.roles {
            let invalid = |message: String| TopologyError::InvalidRole {
                role: role.name.clone(),
                message,
            };
            if role.name.trim().is_empty() {
                return Err(TopologyError::InvalidRole {
                    role: role.name.clone(),
                    message: "name is empty".into(),
                });
            }
            if !roles.insert(role.name.as_str()) {
                return Err(TopologyError::DuplicateRole(role.name.clone()));
            }
            if role.group.trim().is_empty() {
                return Err(invalid("group is empty".into()));
            }
            // Two roles in one group would split each other's partitions and each see half.
            if let Some(other) = groups.insert(&role.group, &role.name) {
                return Err(invalid(format!(
                    "consumer group `{}` is already used by role `{other}`",
                    role.group
                )));
            }
            if role.concurrency == 0 {
                return Err(invalid("concurrency must be at least 1".into()));
            }
            if role.topics.is_empty() {
                return Err(invalid("consumes no topic".into()));
            }
            // The edge runs the first broadcast role only: a second would be ignored.
            if role.broadcast {
                if let Some(first) = broadcast.replace(&role.name) {
                    return Err(invalid(format!(
                        "only one role can be broadcast, and `{first}` is already (the edge \
                         reads the topics of one broadcast role; list them all there)"
                    )));
                }
            }
            let mut seen = HashSet::new();
            for name in &role.topics {
                if !seen.insert(name) {
                    return Err(invalid(format!("lists topic `{name}` twice")));
                }
                let Some(topic) = self.topic(name) else {
                    if let Some(source) = name
                        .strip_suffix(DLQ_SUFFIX)
                        .and_then(|s| self.topic(s))
                        .filter(|t| t.dlq)
                    {
                        return Err(invalid(format!(
                            "`{name}` is the dead-letter topic of `{}`; a role does not \
                             consume dead letters (`nexus replay --copy-to` moves them back)",
                            source.name
                        )));
                    }
                    return Err(TopologyError::UnknownTopicInRole {
                        role: role.name.clone(),
                        topic: name.clone(),
                    });
                };
                // A group member dead-letters what it cannot handle to `<topic>.dlq` and
                // retries that until the bus takes it: without the DLQ the key is held for
                // good. A broadcast reader skips instead.
                if !topic.dlq && !role.broadcast {
                    return Err(invalid(format!(
                        "consumes topic `{name}`, which has no dead-letter topic: an event the \
                         role cannot handle would hold its key for good; set `dlq: true` on \
                         `{name}`"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A declared topic by name.
    pub fn topic(&self, name: &str) -> Option<&Topic> {
        self.topics.iter().find(|t| t.name == name)
    }

    /// A declared role by name.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles.iter().find(|r| r.name == name)
    }

    /// Every topic the bus must have, each followed by its dead-letter topic.
    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        self.topics
            .iter()
            .flat_map(|t| std::iter::once(t.spec()).chain(t.dlq_spec()))
            .collect()
    }

    /// The topics a role needs on the bus before it starts: the ones it reads, the
    /// dead-letter topics it writes failures to, and the topics that name it a producer
    /// (without them every event it handles would fail at its publish).
    pub fn role_topics(&self, role: &str) -> Result<Vec<String>, TopologyError> {
        let role = self
            .role(role)
            .ok_or_else(|| TopologyError::UnknownRole(role.to_owned()))?;
        let read = role
            .topics
            .iter()
            .filter_map(|name| self.topic(name))
            .flat_map(|t| std::iter::once(t.name.clone()).chain(t.dlq_name()));
        let written = self
            .topics
            .iter()
            .filter(|t| t.producers.contains(&role.name))
            .map(|t| t.name.clone());
        let mut topics: Vec<String> = Vec::new();
        for t in read.chain(written) {
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
        Ok(topics)
    }

    /// The roles that read a topic.
    pub fn consumers_of<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a Role> + 'a {
        self.roles
            .iter()
            .filter(move |r| r.topics.iter().any(|t| t == topic))
    }
}

fn check_topic_name(name: &str) -> Result<(), TopologyError> {
    let invalid = |message: &str| TopologyError::InvalidTopic {
        topic: name.to_owned(),
        message: message.to_owned(),
    };
    if name.is_empty() {
        return Err(invalid("name is empty"));
    }
    if name.len() > MAX_TOPIC_NAME {
        return Err(invalid("name is longer than 249 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(invalid(
            "name may only contain ASCII letters, digits, `.`, `_` and `-`",
        ));
    }
    if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return Err(invalid("name has an empty `.`-separated part"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_support::TEST_YAML;

    fn parse(yaml: &str) -> Result<Topology, TopologyError> {
        Topology::from_yaml_with(yaml, None)
    }

    #[test]
    fn builtin_topology_is_valid() {
        let t = Topology::from_yaml(BUILTIN_YAML).unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "nexus.inbound.v1",
            "nexus.agent.v1",
            "nexus.interaction.v1",
            "nexus.outbound.v1",
            "nexus.delivery.v1",
        ] {
            assert!(t.topic(name).is_some(), "{name} missing");
        }
        for role in ["conversation", "history", "gws", "webhooks", "delivery"] {
            let r = t.role(role).unwrap();
            assert_eq!(r.group, format!("nexus-{role}"));
        }
        assert_eq!(
            t.role("conversation").unwrap().topics,
            ["nexus.inbound.v1", "nexus.agent.v1"]
        );
        // A role needs the topics it writes too: the conversation worker's publishes.
        let needs = t.role_topics("conversation").unwrap();
        for name in [
            "nexus.inbound.v1",
            "nexus.inbound.v1.dlq",
            "nexus.interaction.v1",
            "nexus.delivery.v1",
        ] {
            assert!(needs.iter().any(|n| n == name), "{name} not in {needs:?}");
        }
        let inbound = t.topic("nexus.inbound.v1").unwrap();
        assert_eq!(inbound.dlq_spec().unwrap().name, "nexus.inbound.v1.dlq");
        assert_eq!(
            inbound.dlq_spec().unwrap().retention,
            Some(DEFAULT_DLQ_RETENTION)
        );
        assert!(t.topic("nexus.delivery.v1").unwrap().partitions < inbound.partitions);
    }

    #[test]
    fn specs_and_role_topics_include_dlqs() {
        let t = parse(TEST_YAML).unwrap();
        let names: Vec<_> = t.topic_specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["t.a", "t.a.dlq", "t.b"]);
        assert_eq!(t.role_topics("r").unwrap(), ["t.a", "t.a.dlq", "t.b"]);
        assert!(matches!(t.role_topics("nope"), Err(TopologyError::UnknownRole(r)) if r == "nope"));
        assert_eq!(
            t.topic_specs()[2].retention,
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn errors_name_the_offending_item() {
        let dup = TEST_YAML.replace("name: t.b", "name: t.a");
        assert!(matches!(parse(&dup), Err(TopologyError::DuplicateTopic(t)) if t == "t.a"));

        let dlq_clash = TEST_YAML.replace("name: t.b", "name: t.a.dlq");
        assert!(
            matches!(parse(&dlq_clash), Err(TopologyError::DuplicateTopic(t)) if t == "t.a.dlq")
        );

        let zero = TEST_YAML.replace("partitions: 2", "partitions: 0");
        let e = parse(&zero).unwrap_err();
        assert!(
            matches!(&e, TopologyError::InvalidTopic { topic, .. } if topic == "t.b"),
            "{e}"
        );

        let unknown = TEST_YAML.replace("topics: [t.a]", "topics: [t.a, t.c]");
        let e = parse(&unknown).unwrap_err();
        assert!(
            matches!(&e, TopologyError::UnknownTopicInRole { role, topic } if role == "r" && topic == "t.c"),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "role `r` consumes topic `t.c`, which is not declared"
        );

        let field = TEST_YAML.replace("retention: 24h", "retention: 24h\n    colour: red");
        let e = parse(&field).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");

        let duration = TEST_YAML.replace("retention: 24h", "retention: 24hours");
        let e = parse(&duration).unwrap_err();
        assert!(e.to_string().contains("24hours"), "{e}");

        let no_conc = TEST_YAML.replace("concurrency: 4", "concurrency: 0");
        assert!(
            matches!(parse(&no_conc), Err(TopologyError::InvalidRole { role, .. }) if role == "r")
        );

        let bad_name = TEST_YAML.replace("name: t.b", "name: t/b");
        assert!(
            matches!(parse(&bad_name), Err(TopologyError::InvalidTopic { topic, .. }) if topic == "t/b")
        );

        let dup_role = format!(
            "{TEST_YAML}  - name: r\n    group: g2\n    topics: [t.a]\n    concurrency: 1\n"
        );
        assert!(matches!(parse(&dup_role), Err(TopologyError::DuplicateRole(r)) if r == "r"));
    }

    /// Mistakes an operator makes in a topology file: each is refused with the topic or role
    /// at fault, before anything reaches a bus.
    #[test]
    fn operator_mistakes_are_refused_naming_the_place() {
        let role_error = |yaml: &str| match parse(yaml) {
            Err(TopologyError::InvalidRole { role, message }) => (role, message),
            other => panic!("expected an invalid role, got {other:?}"),
        };
        let topic_error = |yaml: &str| match parse(yaml) {
            Err(TopologyError::InvalidTopic { topic, message }) => (topic, message),
            other => panic!("expected an invalid topic, got {other:?}"),
        };

        // A group member dead-letters to `<topic>.dlq`; without it a bad event holds its key.
        let no_dlq = TEST_YAML.replace("topics: [t.a]", "topics: [t.a, t.b]");
        let (role, message) = role_error(&no_dlq);
        assert_eq!(role, "r");
        assert!(
            message.contains("`t.b`") && message.contains("dlq: true"),
            "{message}"
        );
        // A broadcast reader skips what it cannot handle: no DLQ needed.
        let broadcast = format!("{no_dlq}    broadcast: true\n");
        parse(&broadcast).unwrap();
        // ...but the edge reads one broadcast role only.
        let two = format!(
            "{broadcast}  - name: r2\n    group: g-r2\n    broadcast: true\n    topics: [t.b]\n    concurrency: 1\n"
        );
        let (role, message) = role_error(&two);
        assert_eq!(role, "r2");
        assert!(message.contains("`r`"), "{message}");

        // A DLQ of a DLQ, and a dead-letter topic declared by hand.
        let dlq_of_dlq = TEST_YAML.replace("name: t.b", "name: t.b.dlq\n    dlq: true");
        let (topic, message) = topic_error(&dlq_of_dlq);
        assert_eq!(topic, "t.b.dlq");
        assert!(message.contains("`dlq: true` on `t.b`"), "{message}");
        let by_hand = TEST_YAML.replace("name: t.b", "name: t.c.dlq");
        assert_eq!(topic_error(&by_hand).0, "t.c.dlq");

        // A role reading a dead-letter topic: declared (by `dlq: true`), but not for roles.
        let reads_dlq = TEST_YAML.replace("topics: [t.a]", "topics: [t.a.dlq]");
        let (_, message) = role_error(&reads_dlq);
        assert!(message.contains("dead-letter topic of `t.a`"), "{message}");

        // Names that are one stream on JetStream (and that Kafka refuses side by side),
        // dead-letter topics included.
        let (topic, message) = topic_error(&TEST_YAML.replace("name: t.b", "name: t_a"));
        assert_eq!(topic, "t_a");
        assert!(message.contains("`t.a`"), "{message}");
        let (topic, message) = topic_error(&TEST_YAML.replace("name: t.b", "name: t.a_dlq"));
        assert_eq!(topic, "t.a_dlq");
        assert!(message.contains("`t.a.dlq`"), "{message}");

        // The dead-letter topic's name must fit Kafka's limit too.
        let long = "x".repeat(246);
        let (topic, message) =
            topic_error(&TEST_YAML.replace("name: t.a", &format!("name: {long}")));
        assert_eq!(topic, long);
        assert!(message.contains("at most 245 characters"), "{message}");
        let fits = "x".repeat(245);
        parse(
            &TEST_YAML
                .replace("name: t.a", &format!("name: {fits}"))
                .replace("[t.a]", &format!("[{fits}]")),
        )
        .unwrap();

        // A topic listed twice by one role would be two members of one group in one pod.
        let twice = TEST_YAML.replace("topics: [t.a]", "topics: [t.a, t.a]");
        assert!(role_error(&twice).1.contains("`t.a` twice"));
    }

    #[test]
    fn partitions_are_capped_and_the_error_names_file_and_topic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.yaml");
        let yaml = TEST_YAML.replace("[A]", "[MessageReceived]");
        let at_cap = yaml.replace("partitions: 2", &format!("partitions: {MAX_PARTITIONS}"));
        std::fs::write(&path, &at_cap).unwrap();
        assert!(Topology::load(&path).is_ok());
        std::fs::write(
            &path,
            yaml.replace("partitions: 2", "partitions: 4000000000"),
        )
        .unwrap();
        let e = Topology::load(&path).unwrap_err();
        assert!(
            matches!(e.kind(), TopologyError::InvalidTopic { topic, .. } if topic == "t.b"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: topic `t.b`", path.display()))
                && text.contains("4000000000")
                && text.contains("10000"),
            "{text}"
        );
    }

    #[test]
    fn a_file_error_names_the_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prod-topology.yaml");
        let yaml = TEST_YAML.replace("[A]", "[MessageReceived]");
        std::fs::write(&path, yaml.replace("partitions: 2", "partitions: 0")).unwrap();
        let e = Topology::load(&path).unwrap_err();
        assert!(
            matches!(e.kind(), TopologyError::InvalidTopic { topic, .. } if topic == "t.b"),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("{}: topic `t.b`", path.display())),
            "{text}"
        );

        // A YAML error is said once: in the message, not again as its source.
        std::fs::write(
            &path,
            yaml.replace("retention: 24h", "retention: 24h\n    colour: red"),
        )
        .unwrap();
        let e = Topology::load(&path).unwrap_err();
        assert!(matches!(e.kind(), TopologyError::Parse(_)), "{e:?}");
        assert!(
            e.to_string()
                .contains("prod-topology.yaml: topology: topics[1]: unknown field `colour`"),
            "{e}"
        );
        assert!(std::error::Error::source(e.kind()).is_none());
    }

    #[test]
    fn unknown_event_types_are_refused_when_the_registry_has_schemas() {
        let registry = Registry::builtin();
        let t = TEST_YAML.replace("events: [A]", "events: [NoSuchEventType]");
        let result = Topology::from_yaml_with(&t, Some(registry));
        if registry.all().is_empty() {
            // Nothing to check against yet.
            assert!(result.is_ok());
        } else {
            assert!(matches!(
                result,
                Err(TopologyError::UnknownEventType { topic, event_type })
                    if topic == "t.a" && event_type == "NoSuchEventType"
            ));
        }
    }

    #[test]
    fn load_reads_a_file_and_names_it_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.yaml");
        std::fs::write(&path, TEST_YAML).unwrap();
        let t = Topology::load(&path);
        // The test YAML's event `A` is unknown to a filled registry; either way it was read.
        assert!(!matches!(t, Err(TopologyError::Read { .. })));
        let e = Topology::load(dir.path().join("missing.yaml")).unwrap_err();
        assert!(e.to_string().contains("missing.yaml"), "{e}");
    }
}
