//! Plan and apply: compare the declared topics with the bus, then make the bus match.
//!
//! Like terraform: [`plan`] only reads; [`apply`] refuses the whole run when any topic
//! conflicts (so a half-applied topology never results from a mistake in the YAML), applies
//! creates and updates, then plans again to confirm nothing is left to do. A second apply is a
//! no-op because every step compares before it writes.
//!
//! Besides partitions and retention a topic is compared on the backend settings nexus relies
//! on ([`TopicSetting`]: a JetStream stream's retention policy, a Kafka topic's
//! `cleanup.policy`, ...); the backend says which of them it can change in place. A plan also
//! lists the topics the bus has and the topology does not declare, which apply leaves alone.

use std::fmt;
use std::time::Duration;

use super::duration::format_duration;
use super::{Topology, TopologyError};
use crate::bus::{Bus, TopicInfo, TopicSetting, TopicSpec};

/// What apply changes in place on an existing topic. A field is `Some((bus, declared))`, or
/// the setting is listed, when it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Updates {
    pub partitions: Option<(u32, u32)>,
    pub retention: Option<(Option<Duration>, Option<Duration>)>,
    /// Settings the backend sets back to what nexus needs.
    pub settings: Vec<TopicSetting>,
}

impl Updates {
    pub fn is_empty(&self) -> bool {
        self.partitions.is_none() && self.retention.is_none() && self.settings.is_empty()
    }
}

/// What applying would do to one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The topic does not exist.
    Create,
    /// The topic exists and differs in what can be changed in place.
    Update(Updates),
    /// The topic is as declared.
    Unchanged,
    /// The topic differs in what apply cannot change, so apply refuses: more partitions on the
    /// bus than declared (partitions cannot shrink), or a setting the backend cannot change in
    /// place. What apply would change as well is in `then`, so resolving the conflict does not
    /// hide a second change.
    Conflict {
        /// `Some((bus, declared))` when the bus has more partitions than declared.
        partitions: Option<(u32, u32)>,
        /// Settings the backend cannot change in place: the operator must recreate the topic.
        settings: Vec<TopicSetting>,
        then: Updates,
    },
}

/// What to do about a setting the backend cannot change in place (a JetStream stream's
/// work-queue or interest retention, memory storage: the server refuses the edit), in the plan
/// and in apply's refusal.
const RECREATE: &str = "recreate the topic (copy its records out first and back after, e.g. \
                        with `nexus replay --copy-to`)";

/// One topic's line of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPlan {
    /// What the topology declares.
    pub spec: TopicSpec,
    /// What the bus has, `None` if the topic does not exist.
    pub current: Option<TopicInfo>,
    pub change: Change,
}

/// The plan for every declared topic (dead-letter topics included), in topology order, and
/// the topics on the bus the topology does not declare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub topics: Vec<TopicPlan>,
    /// Topics on the bus that the topology does not declare, sorted (leftovers of an older
    /// topology, a name mistyped when made by hand): shown, never changed. `Err` says why the
    /// bus would not list them; the plan of the declared topics stands without them.
    pub undeclared: Result<Vec<String>, String>,
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
    ///
    /// Undeclared topics do not count, here or in [`Plan::has_changes`]: apply never acts on
    /// them (deleting one would lose its records, and it may be on purpose: the previous
    /// version of a topic still being drained, another application's), so a plan that lists
    /// them still has nothing to do, and a second apply stays a no-op.
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
    let (in_place, by_hand): (Vec<TopicSetting>, Vec<TopicSetting>) = current
        .settings
        .iter()
        .filter(|s| !s.is_required())
        .cloned()
        .partition(|s| s.in_place);
    let updates = Updates {
        partitions: (current.partitions < spec.partitions)
            .then_some((current.partitions, spec.partitions)),
        retention,
        settings: in_place,
    };
    let shrink =
        (current.partitions > spec.partitions).then_some((current.partitions, spec.partitions));
    if shrink.is_some() || !by_hand.is_empty() {
        Change::Conflict {
            partitions: shrink,
            settings: by_hand,
            then: updates,
        }
    } else if updates.is_empty() {
        Change::Unchanged
    } else {
        Change::Update(updates)
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
    // A bus that describes topics but will not list them (a permission for one and not the
    // other) still gets the plan of what apply acts on; the listing only informs.
    let undeclared = match bus.list_topics().await {
        Ok(names) => Ok(names
            .into_iter()
            .filter(|name| !topics.iter().any(|t| t.spec.name == *name))
            .collect()),
        Err(e) => Err(e.to_string()),
    };
    Ok(Plan {
        topics,
        undeclared,
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
        .flat_map(|t| {
            let name = &t.spec.name;
            let Change::Conflict {
                partitions,
                settings,
                ..
            } = &t.change
            else {
                return Vec::new();
            };
            let partitions = partitions.map(|(bus, declared)| {
                format!(
                    "{name} has {bus} partitions on the bus, {declared} declared (partitions \
                     cannot shrink; declare at least what the bus has)"
                )
            });
            let settings = settings.iter().map(|s| {
                format!(
                    "{name} has {} {} on the bus, nexus needs {}: the backend cannot change it \
                     in place, {RECREATE}",
                    s.name, s.value, s.required
                )
            });
            partitions.into_iter().chain(settings).collect()
        })
        .collect();
    if !conflicts.is_empty() {
        return Err(TopologyError::Conflicts { conflicts });
    }
    let mut applied = Vec::new();
    for t in &planned.topics {
        if matches!(t.change, Change::Create | Change::Update(_)) {
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

impl fmt::Display for Updates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some((from, to)) = self.retention {
            parts.push(format!(
                "retention {} → {}",
                format_duration(from),
                format_duration(to)
            ));
        }
        if let Some((from, to)) = self.partitions {
            // The operator must know before saying yes: keys hash to new partitions.
            parts.push(format!(
                "partitions {from} → {to} (keys move to other partitions: order is broken for \
                 conversations in flight)"
            ));
        }
        for s in &self.settings {
            parts.push(format!(
                "{} {} → {} ({})",
                s.name, s.value, s.required, s.why
            ));
        }
        f.write_str(&parts.join(", "))
    }
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
            Change::Update(updates) => write!(f, "~ update {name}: {updates}"),
            Change::Conflict {
                partitions,
                settings,
                then,
            } => {
                let mut parts = Vec::new();
                if let Some((bus, declared)) = partitions {
                    parts.push(format!(
                        "{bus} partitions on the bus, {declared} declared; partitions cannot \
                         shrink"
                    ));
                }
                for s in settings {
                    parts.push(format!(
                        "{} {} on the bus, nexus needs {} ({}); the backend cannot change it \
                         in place: {RECREATE}",
                        s.name, s.value, s.required, s.why
                    ));
                }
                write!(f, "! conflict {name}: {} (apply refuses)", parts.join("; "))?;
                if !then.is_empty() {
                    write!(f, "; {then} once resolved")?;
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
        let left = if self.applied { "left" } else { "leaves" };
        match &self.undeclared {
            Ok(names) if names.is_empty() => {}
            Ok(names) => {
                writeln!(
                    f,
                    "\nOn the bus, not in the topology file ({} topic(s); apply {left} them \
                     alone):",
                    names.len()
                )?;
                for name in names {
                    writeln!(f, "? {name}")?;
                }
            }
            Err(e) => writeln!(
                f,
                "\nTopics on the bus that the topology file does not declare are not shown: \
                 the bus would not list them ({e})."
            )?,
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
            settings: Vec::new(),
        };
        assert_eq!(diff(&spec, None), Change::Create);
        assert_eq!(diff(&spec, Some(&info(4, Some(60)))), Change::Unchanged);
        assert_eq!(
            diff(&spec, Some(&info(2, None))),
            Change::Update(Updates {
                partitions: Some((2, 4)),
                retention: Some((None, Some(Duration::from_secs(60)))),
                settings: Vec::new(),
            })
        );
        assert_eq!(
            diff(&spec, Some(&info(8, Some(60)))),
            Change::Conflict {
                partitions: Some((8, 4)),
                settings: Vec::new(),
                then: Updates::default(),
            }
        );
        // A conflict does not hide a retention change on the same topic.
        let both = diff(&spec, Some(&info(8, Some(30))));
        assert_eq!(
            both,
            Change::Conflict {
                partitions: Some((8, 4)),
                settings: Vec::new(),
                then: Updates {
                    retention: Some((Some(Duration::from_secs(30)), Some(Duration::from_secs(60)))),
                    ..Updates::default()
                },
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
            Change::Update(Updates {
                partitions: Some((2, 5)),
                retention: Some((
                    Some(Duration::from_secs(86_400)),
                    Some(Duration::from_secs(3 * 86_400))
                )),
                settings: Vec::new(),
            })
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
                partitions: Some((3, 1)),
                settings: Vec::new(),
                then: Updates::default(),
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

    /// A setting the backend can set back is an update; one it cannot is a conflict that also
    /// says what apply would change once it is resolved.
    #[test]
    fn settings_are_updates_or_conflicts_as_the_backend_says() {
        let spec = TopicSpec {
            name: "t".into(),
            partitions: 2,
            retention: None,
        };
        let setting = |name, value: &str, required, in_place| TopicSetting {
            name,
            value: value.into(),
            required,
            in_place,
            why: "it matters",
        };
        let mut info = TopicInfo {
            name: "t".into(),
            partitions: 2,
            retention: None,
            retention_known: true,
            settings: vec![
                setting("policy", "limits", "limits", false),
                setting("discard", "old", "old", true),
            ],
        };
        assert_eq!(diff(&spec, Some(&info)), Change::Unchanged);

        info.settings[1].value = "new".into();
        let update = diff(&spec, Some(&info));
        assert_eq!(
            update,
            Change::Update(Updates {
                settings: vec![info.settings[1].clone()],
                ..Updates::default()
            })
        );
        let line = TopicPlan {
            spec: spec.clone(),
            current: Some(info.clone()),
            change: update,
        }
        .to_string();
        assert_eq!(line, "~ update t: discard new → old (it matters)");

        info.settings[0].value = "workqueue".into();
        info.partitions = 1;
        let conflict = diff(&spec, Some(&info));
        assert_eq!(
            conflict,
            Change::Conflict {
                partitions: None,
                settings: vec![info.settings[0].clone()],
                then: Updates {
                    partitions: Some((1, 2)),
                    settings: vec![info.settings[1].clone()],
                    ..Updates::default()
                },
            }
        );
        let line = TopicPlan {
            spec,
            current: Some(info),
            change: conflict,
        }
        .to_string();
        assert!(
            line.starts_with(
                "! conflict t: policy workqueue on the bus, nexus needs limits (it matters); \
                 the backend cannot change it in place: recreate the topic (copy its records \
                 out first and back after, e.g. with `nexus replay --copy-to`) (apply \
                 refuses); partitions 1 → 2"
            ) && line.ends_with("discard new → old (it matters) once resolved"),
            "{line}"
        );
    }

    /// Topics the bus has and the file does not declare are listed apart, and are no change.
    #[tokio::test]
    async fn undeclared_topics_are_listed_and_left_alone() {
        let (bus, _dir) = embedded_bus();
        apply(bus.as_ref(), &topology(TEST_YAML)).await.unwrap();
        bus.apply_topic(&TopicSpec {
            name: "t.old".into(),
            partitions: 1,
            retention: None,
        })
        .await
        .unwrap();
        let p = plan(bus.as_ref(), &topology(TEST_YAML)).await.unwrap();
        assert_eq!(p.undeclared, Ok(vec!["t.old".to_owned()]));
        assert!(p.is_noop() && !p.has_changes(), "{p}");
        let text = p.to_string();
        assert!(
            text.contains(
                "\nOn the bus, not in the topology file (1 topic(s); apply leaves them \
                 alone):\n? t.old\n\nPlan: 0 to create"
            ),
            "{text}"
        );
        let applied = apply(bus.as_ref(), &topology(TEST_YAML)).await.unwrap();
        assert!(applied.to_string().contains("apply left them alone"));
        assert!(bus.topic_info("t.old").await.unwrap().is_some());
    }
}
