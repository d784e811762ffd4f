//! Plan and apply: compare the declared topics with the bus, then make the bus match.
//!
//! Like terraform: [`plan`] only reads; [`apply`] refuses the whole run when any topic
//! conflicts (so a half-applied topology never results from a mistake in the YAML), applies
//! creates and updates, then plans again to confirm nothing is left to do. A second apply is a
//! no-op because every step compares before it writes.

use std::fmt;
use std::time::Duration;

use super::duration::format_duration;
use super::{Topology, TopologyError};
use crate::bus::{Bus, TopicInfo, TopicSpec};

/// What applying would do to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The topic does not exist.
    Create,
    /// The topic exists and differs in what can be changed in place. A field is `Some((bus,
    /// declared))` when it changes.
    Update {
        partitions: Option<(u32, u32)>,
        retention: Option<(Option<Duration>, Option<Duration>)>,
    },
    /// The topic is as declared.
    Unchanged,
    /// The bus has more partitions than declared; partitions cannot shrink, apply refuses.
    /// `retention` is `Some((bus, declared))` when it differs too, so fixing the partitions
    /// does not hide a second change.
    Conflict {
        bus_partitions: u32,
        declared_partitions: u32,
        retention: Option<(Option<Duration>, Option<Duration>)>,
    },
}

/// One topic's line of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPlan {
    /// What the topology declares.
    pub spec: TopicSpec,
    /// What the bus has, `None` if the topic does not exist.
    pub current: Option<TopicInfo>,
    pub change: Change,
}

/// The plan for every declared topic (dead-letter topics included), in topology order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub topics: Vec<TopicPlan>,
    /// Whether this plan was applied (changes the summary line's wording).
    pub applied: bool,
}

impl Plan {
    fn count(&self, f: impl Fn(&Change) -> bool) -> usize {
        self.topics.iter().filter(|t| f(&t.change)).count()
    }

    pub fn creates(&self) -> usize {
        self.count(|c| matches!(c, Change::Create))
    }

    pub fn updates(&self) -> usize {
        self.count(|c| matches!(c, Change::Update { .. }))
    }

    pub fn unchanged(&self) -> usize {
        self.count(|c| matches!(c, Change::Unchanged))
    }

    pub fn conflicts(&self) -> usize {
        self.count(|c| matches!(c, Change::Conflict { .. }))
    }

    /// Nothing to create, update or refuse: the bus matches the topology.
    pub fn is_noop(&self) -> bool {
        self.unchanged() == self.topics.len()
    }

    /// Whether applying would create or update a topic (conflicts aside).
    pub fn has_changes(&self) -> bool {
        self.creates() + self.updates() > 0
    }

    /// The line of a topic, by name.
    pub fn topic(&self, name: &str) -> Option<&TopicPlan> {
        self.topics.iter().find(|t| t.spec.name == name)
    }
}

/// Compares a declared topic with what the bus has.
pub fn diff(spec: &TopicSpec, current: Option<&TopicInfo>) -> Change {
    let Some(current) = current else {
        return Change::Create;
    };
    // Compared in milliseconds: backends store retention as ms (Kafka) or ns (JetStream), and
    // a sub-millisecond difference is rounding, not a change to apply forever.
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
    // Unknown (the broker would not say) is neither compared nor changed: plan says so.
    let retention = (current.retention_known && ms(current.retention) != ms(spec.retention))
        .then_some((current.retention, spec.retention));
    if current.partitions > spec.partitions {
        return Change::Conflict {
            bus_partitions: current.partitions,
            declared_partitions: spec.partitions,
            retention,
        };
    }
    let partitions =
        (current.partitions < spec.partitions).then_some((current.partitions, spec.partitions));
    if partitions.is_none() && retention.is_none() {
        Change::Unchanged
    } else {
        Change::Update {
            partitions,
            retention,
        }
    }
}

/// What applying the topology to the bus would change. Reads only.
pub async fn plan(bus: &dyn Bus, topology: &Topology) -> Result<Plan, TopologyError> {
    let mut topics = Vec::new();
    for spec in topology.topic_specs() {
        let current = bus.topic_info(&spec.name).await?;
        let change = diff(&spec, current.as_ref());
        topics.push(TopicPlan {
            spec,
            current,
            change,
        });
    }
    Ok(Plan {
        topics,
        applied: false,
    })
}

/// Creates and updates topics until the bus matches the topology, and returns what was done.
///
/// Refuses with [`TopologyError::Conflicts`] before changing anything when a topic conflicts.
/// After applying it plans again and fails with [`TopologyError::NotConverged`] if the bus
/// still differs.
pub async fn apply(bus: &dyn Bus, topology: &Topology) -> Result<Plan, TopologyError> {
    let mut planned = plan(bus, topology).await?;
    let conflicts: Vec<String> = planned
        .topics
        .iter()
        .filter_map(|t| match t.change {
            Change::Conflict {
                bus_partitions,
                declared_partitions,
                ..
            } => Some(format!(
                "{} has {bus_partitions} partitions on the bus, {declared_partitions} declared",
                t.spec.name
            )),
            _ => None,
        })
        .collect();
    if !conflicts.is_empty() {
        return Err(TopologyError::Conflicts { conflicts });
    }
    let mut applied = Vec::new();
    for t in &planned.topics {
        if matches!(t.change, Change::Create | Change::Update { .. }) {
            tracing::info!(topic = %t.spec.name, change = ?t.change, "applying topic");
            // Say what was done before a failure: the output is printed only at the end, and
            // the operator must know the bus is now half way.
            bus.apply_topic(&t.spec)
                .await
                .map_err(|error| TopologyError::ApplyFailed {
                    topic: t.spec.name.clone(),
                    applied: applied.clone(),
                    error,
                })?;
            applied.push(t.spec.name.clone());
        }
    }
    let after = plan(bus, topology).await?;
    if !after.is_noop() {
        let topics = after
            .topics
            .into_iter()
            .filter(|t| t.change != Change::Unchanged)
            .map(|t| t.spec.name)
            .collect();
        return Err(TopologyError::NotConverged { topics });
    }
    planned.applied = true;
    Ok(planned)
}

fn describe(partitions: u32, retention: Option<Duration>) -> String {
    let unit = if partitions == 1 {
        "partition"
    } else {
        "partitions"
    };
    format!(
        "{partitions} {unit}, retention {}",
        format_duration(retention)
    )
}

impl fmt::Display for TopicPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = &self.spec.name;
        match &self.change {
            Change::Create => write!(
                f,
                "+ create {name} ({})",
                describe(self.spec.partitions, self.spec.retention)
            ),
            Change::Unchanged if self.current.as_ref().is_some_and(|c| !c.retention_known) => {
                write!(
                    f,
                    "  unchanged {name} ({} partitions; retention unknown: the broker cannot \
                     describe its config, check it is {})",
                    self.spec.partitions,
                    format_duration(self.spec.retention)
                )
            }
            Change::Unchanged => write!(
                f,
                "  unchanged {name} ({})",
                describe(self.spec.partitions, self.spec.retention)
            ),
            Change::Update {
                partitions,
                retention,
            } => {
                let mut parts = Vec::new();
                if let Some((from, to)) = retention {
                    parts.push(format!(
                        "retention {} → {}",
                        format_duration(*from),
                        format_duration(*to)
                    ));
                }
                if let Some((from, to)) = partitions {
                    // The operator must know before saying yes: keys hash to new partitions.
                    parts.push(format!(
                        "partitions {from} → {to} (keys move to other partitions: order is \
                         broken for conversations in flight)"
                    ));
                }
                write!(f, "~ update {name}: {}", parts.join(", "))
            }
            Change::Conflict {
                bus_partitions,
                declared_partitions,
                retention,
            } => {
                write!(
                    f,
                    "! conflict {name}: {bus_partitions} partitions on the bus, \
                     {declared_partitions} declared; partitions cannot shrink (apply refuses)"
                )?;
                if let Some((from, to)) = retention {
                    write!(
                        f,
                        "; retention {} → {} once resolved",
                        format_duration(*from),
                        format_duration(*to)
                    )?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.topics {
            writeln!(f, "{t}")?;
        }
        writeln!(f)?;
        if self.applied {
            write!(
                f,
                "Applied: {} created, {} updated, {} unchanged.",
                self.creates(),
                self.updates(),
                self.unchanged()
            )
        } else {
            write!(
                f,
                "Plan: {} to create, {} to update, {} unchanged",
                self.creates(),
                self.updates(),
                self.unchanged()
            )?;
            match self.conflicts() {
                0 if self.is_noop() => {
                    write!(f, ". No changes: the bus matches the topology.")
                }
                0 => write!(f, "."),
                n => write!(f, ", {n} in conflict (apply refuses until resolved)."),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_support::{embedded_bus, TEST_YAML};

    fn topology(yaml: &str) -> Topology {
        Topology::from_yaml_with(yaml, None).unwrap()
    }

    #[test]
    fn diff_rules() {
        let spec = TopicSpec {
            name: "t".into(),
            partitions: 4,
            retention: Some(Duration::from_secs(60)),
        };
        let info = |partitions: u32, secs: Option<u64>| TopicInfo {
            name: "t".into(),
            partitions,
            retention: secs.map(Duration::from_secs),
            retention_known: true,
        };
        assert_eq!(diff(&spec, None), Change::Create);
        assert_eq!(diff(&spec, Some(&info(4, Some(60)))), Change::Unchanged);
        assert_eq!(
            diff(&spec, Some(&info(2, None))),
            Change::Update {
                partitions: Some((2, 4)),
                retention: Some((None, Some(Duration::from_secs(60))))
            }
        );
        assert_eq!(
            diff(&spec, Some(&info(8, Some(60)))),
            Change::Conflict {
                bus_partitions: 8,
                declared_partitions: 4,
                retention: None,
            }
        );
        // A conflict does not hide a retention change on the same topic.
        let both = diff(&spec, Some(&info(8, Some(30))));
        assert_eq!(
            both,
            Change::Conflict {
                bus_partitions: 8,
                declared_partitions: 4,
                retention: Some((Some(Duration::from_secs(30)), Some(Duration::from_secs(60)))),
            }
        );
        let line = TopicPlan {
            spec: spec.clone(),
            current: Some(info(8, Some(30))),
            change: both,
        }
        .to_string();
        assert!(
            line.ends_with("; retention 30s → 1m once resolved"),
            "{line}"
        );
        // Sub-millisecond differences are backend rounding.
        let mut close = info(4, Some(60));
        close.retention = Some(Duration::from_nanos(60_000_000_400));
        assert_eq!(diff(&spec, Some(&close)), Change::Unchanged);
        // A retention the broker would not describe is not taken for "forever".
        let mut unknown = info(4, None);
        unknown.retention_known = false;
        assert_eq!(diff(&spec, Some(&unknown)), Change::Unchanged);
        let line = TopicPlan {
            spec: spec.clone(),
            current: Some(unknown),
            change: Change::Unchanged,
        }
        .to_string();
        assert!(line.contains("retention unknown"), "{line}");
    }

    #[tokio::test]
    async fn fresh_bus_creates_everything_and_second_apply_changes_nothing() {
        let (bus, _dir) = embedded_bus();
        let t = topology(TEST_YAML);
        let p = plan(bus.as_ref(), &t).await.unwrap();
        assert_eq!(p.topics.len(), 3);
        assert_eq!(p.creates(), 3);
        let text = p.to_string();
        assert!(
            text.contains("+ create t.a (3 partitions, retention 7d)"),
            "{text}"
        );
        assert!(
            text.contains("+ create t.a.dlq (3 partitions, retention 14d)"),
            "{text}"
        );
        assert!(
            text.ends_with("Plan: 3 to create, 0 to update, 0 unchanged."),
            "{text}"
        );

        let applied = apply(bus.as_ref(), &t).await.unwrap();
        assert!(applied.applied);
        assert_eq!(applied.creates(), 3);
        assert!(applied
            .to_string()
            .ends_with("Applied: 3 created, 0 updated, 0 unchanged."));

        let info = bus.topic_info("t.a").await.unwrap().unwrap();
        assert_eq!(info.partitions, 3);
        assert_eq!(info.retention, Some(Duration::from_secs(7 * 86_400)));

        let second = apply(bus.as_ref(), &t).await.unwrap();
        assert!(second.is_noop(), "{second}");
        assert_eq!(second.unchanged(), 3);
        let again = plan(bus.as_ref(), &t).await.unwrap();
        assert!(again.is_noop() && !again.has_changes());
        // A script (or a person) reading the plan sees plainly that there is nothing to do.
        assert!(
            again.to_string().ends_with(
                "Plan: 0 to create, 0 to update, 3 unchanged. No changes: the bus matches the \
                 topology."
            ),
            "{again}"
        );
    }

    #[tokio::test]
    async fn builtin_topology_applies_every_topic() {
        let (bus, _dir) = embedded_bus();
        let t = Topology::builtin();
        let p = plan(bus.as_ref(), &t).await.unwrap();
        assert_eq!(p.creates(), t.topic_specs().len());
        for name in [
            "nexus.inbound.v1",
            "nexus.delivery.v1",
            "nexus.outbound.v1.dlq",
        ] {
            assert_eq!(p.topic(name).unwrap().change, Change::Create, "{name}");
        }
        assert!(p.topic("nexus.delivery.v1.dlq").is_none());
        apply(bus.as_ref(), &t).await.unwrap();
        assert!(plan(bus.as_ref(), &t).await.unwrap().is_noop());
    }

    #[tokio::test]
    async fn retention_and_partition_growth_are_updates() {
        let (bus, _dir) = embedded_bus();
        apply(bus.as_ref(), &topology(TEST_YAML)).await.unwrap();
        let changed = topology(
            &TEST_YAML
                .replace("retention: 24h", "retention: 3d")
                .replace("partitions: 2", "partitions: 5"),
        );
        let p = plan(bus.as_ref(), &changed).await.unwrap();
        let b = p.topic("t.b").unwrap();
        assert_eq!(
            b.change,
            Change::Update {
                partitions: Some((2, 5)),
                retention: Some((
                    Some(Duration::from_secs(86_400)),
                    Some(Duration::from_secs(3 * 86_400))
                )),
            }
        );
        let line = b.to_string();
        assert!(
            line.starts_with("~ update t.b: retention 24h → 3d, partitions 2 → 5"),
            "{line}"
        );
        assert!(p
            .to_string()
            .ends_with("Plan: 0 to create, 1 to update, 2 unchanged."));

        apply(bus.as_ref(), &changed).await.unwrap();
        let info = bus.topic_info("t.b").await.unwrap().unwrap();
        assert_eq!(
            (info.partitions, info.retention),
            (5, Some(Duration::from_secs(3 * 86_400)))
        );
    }

    #[tokio::test]
    async fn fewer_partitions_declared_is_a_conflict_apply_refuses() {
        let (bus, _dir) = embedded_bus();
        apply(bus.as_ref(), &topology(TEST_YAML)).await.unwrap();
        let shrunk = topology(
            &TEST_YAML
                .replace("partitions: 3", "partitions: 1")
                .replace("retention: 24h", "retention: 2d"),
        );
        let p = plan(bus.as_ref(), &shrunk).await.unwrap();
        assert_eq!(
            p.topic("t.a").unwrap().change,
            Change::Conflict {
                bus_partitions: 3,
                declared_partitions: 1,
                retention: None,
            }
        );
        assert!(p
            .to_string()
            .contains("! conflict t.a: 3 partitions on the bus, 1 declared"));
        assert!(
            p.to_string()
                .ends_with("in conflict (apply refuses until resolved)."),
            "{p}"
        );

        let e = apply(bus.as_ref(), &shrunk).await.unwrap_err();
        assert!(
            matches!(&e, TopologyError::Conflicts { conflicts } if conflicts.len() == 2),
            "{e}"
        );
        // Refused as a whole: the retention change of t.b was not applied either.
        let info = bus.topic_info("t.b").await.unwrap().unwrap();
        assert_eq!(info.retention, Some(Duration::from_secs(86_400)));
    }
}
