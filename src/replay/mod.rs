//! Replay: move a consumer group back (or forward) on a topic, or copy a range of records to
//! another topic (a dead-letter topic back to its source, a `.v1` into a `.v2`).
//!
//! Modelled on `kafka-consumer-groups --reset-offsets`: [`plan`] is the dry run and shows per
//! partition the committed offset, the target and how many events will be processed again
//! (or skipped, when the target is ahead — the operator must see that); [`execute`] moves the
//! group, refusing while it has active members unless forced. [`copy()`] re-publishes a range,
//! the partitions merged by record time so that a key's records stay in order even where a
//! grown topic holds them in two partitions (see [`copy`](mod@copy)).
//!
//! Every consumer is idempotent per effect, so replaying changes no end state; it only costs
//! the work of processing again.
//!
//! Counts use [`Bus::count_between`], never offset subtraction: JetStream offsets (stream
//! sequences) are sparse within a partition.
//!
//! `to_time` is for copies only. A group move has no end: once moved, the group consumes to
//! the log end like always, so a bound would be a number that does not happen. [`plan`] and
//! [`execute`] refuse it with [`ReplayError::ToTimeNeedsCopy`].

pub mod copy;

use std::fmt;

use thiserror::Error;

pub use copy::{copied_record, copy, CopyProgress, CopyReport, CopyRequest, PartitionCopy, Resume};

use crate::bus::{Bus, BusError, PartitionOffsets};

/// Header a copied record carries: `<topic>/<partition>/<offset>` of the original.
pub const REPLAYED_FROM_HEADER: &str = "nexus-replayed-from";

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// An offset, the same for every partition; clamped to what the partition still has.
    Offset(u64),
    /// The first record appended at or after this time (ms since the epoch).
    Time(i64),
}

impl fmt::Display for ReplayFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayFrom::Offset(o) => write!(f, "offset {o}"),
            ReplayFrom::Time(ms) => write!(f, "time {}", format_time(*ms)),
        }
    }
}

/// Moving a group: which topic, which group, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    pub topic: String,
    pub group: String,
    pub from: ReplayFrom,
    /// Only for copies; a group move refuses it (see the module doc).
    pub to_time: Option<i64>,
    /// One partition, or all of them.
    pub partition: Option<u32>,
}

/// Errors of replay and copy; match the variant, never the text.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("topic `{0}` does not exist on the bus")]
    UnknownTopic(String),
    #[error("topic `{topic}` has no partition {partition} (it has {partitions})")]
    UnknownPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    /// The group is consuming; moving it now would race its commits.
    #[error(
        "group `{group}` has {members} active member(s) on `{topic}`: stop its workers first, \
         or pass --force"
    )]
    ActiveMembers {
        group: String,
        topic: String,
        members: usize,
    },
    #[error(
        "--to-time only bounds a copy (--copy-to); a moved group consumes to the log end anyway"
    )]
    ToTimeNeedsCopy,
    #[error("--to-time {to} is not after the start time {from}")]
    EmptyTimeRange { from: String, to: String },
    #[error("invalid time `{value}`: expected RFC 3339, e.g. 2024-05-01T12:00:00Z ({message})")]
    InvalidTime { value: String, message: String },
    #[error("copy source and destination are both `{0}`")]
    SameTopic(String),
    /// A copy failed part-way; what was copied stays copied. `progress` names per partition
    /// the next offset not yet copied and how to resume (its `Display` says it to the operator).
    /// A read that could not get records the bus still had is
    /// [`BusError::ReadIncomplete`]: a copy never takes a short read for the end.
    #[error("copy interrupted: {source}\n{progress}")]
    CopyInterrupted {
        progress: Box<CopyProgress>,
        source: BusError,
    },
    /// An `embedded://DIR` bus URL naming a directory without a bus: reading or moving
    /// offsets there would create an empty bus and report every topic missing.
    #[error(
        "`{0}` holds no embedded bus (no `db` in it); nothing was created there. Check the \
         directory: `nexus dev --data-dir X` keeps its bus in `X/bus`, so pass \
         `--bus embedded://X/bus` or set bus.url (NEXUS_BUS__URL) to it. Only \
         `nexus topology apply` and `nexus dev` create a bus"
    )]
    NoEmbeddedBus(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Connects to the bus of `config` for a command that only reads it or moves offsets on it
/// (`nexus replay`; `nexus topology plan`, which plans an absent bus as an empty one): an
/// `embedded://DIR` whose directory holds no bus is refused with
/// [`ReplayError::NoEmbeddedBus`] instead of being created empty.
pub async fn connect_existing(
    config: &crate::config::BusConfig,
) -> Result<std::sync::Arc<dyn Bus>, ReplayError> {
    if let crate::bus::url::BusUrl::Embedded { dir } = crate::bus::url::BusUrl::parse(&config.url)?
    {
        if !crate::bus::embedded::holds_bus(&dir) {
            return Err(ReplayError::NoEmbeddedBus(dir.display().to_string()));
        }
    }
    Ok(crate::bus::connect(config).await?)
}

/// Parses an RFC 3339 time (`--from-time`, `--to-time`) to milliseconds since the epoch.
pub fn parse_time(value: &str) -> Result<i64, ReplayError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.timestamp_millis())
        .map_err(|e| ReplayError::InvalidTime {
            value: value.to_owned(),
            message: e.to_string(),
        })
}

/// Formats milliseconds since the epoch as RFC 3339 UTC.
pub fn format_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// One partition of a replay plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionReplay {
    pub partition: u32,
    /// First offset still kept.
    pub low: u64,
    /// Log end.
    pub high: u64,
    /// The group's committed offset (next to consume), `None` if it never committed.
    pub current: Option<u64>,
    /// Where the group will be.
    pub target: u64,
    /// Events the group will process from the target to the log end.
    pub to_process: u64,
    /// Of those, the events it had already processed (between the target and a current
    /// position past it): what the replay makes it process again.
    pub reprocess: u64,
    /// Events between the current position and a target ahead of it: never processed.
    pub skip: u64,
}

/// The replay of one group on one topic, per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayPlan {
    pub topic: String,
    pub group: String,
    pub from: ReplayFrom,
    pub partitions: Vec<PartitionReplay>,
    /// Whether the group was moved (`execute`) or this is a dry run (`plan`).
    pub executed: bool,
    /// Whether the move was forced past active members.
    pub forced: bool,
}

impl ReplayPlan {
    pub fn total_to_process(&self) -> u64 {
        self.partitions.iter().map(|p| p.to_process).sum()
    }

    pub fn total_reprocess(&self) -> u64 {
        self.partitions.iter().map(|p| p.reprocess).sum()
    }

    pub fn total_skip(&self) -> u64 {
        self.partitions.iter().map(|p| p.skip).sum()
    }

    pub fn partition(&self, partition: u32) -> Option<&PartitionReplay> {
        self.partitions.iter().find(|p| p.partition == partition)
    }
}

/// The partitions a request covers, with their offsets; checks topic and partition exist.
pub(crate) async fn partitions_of(
    bus: &dyn Bus,
    topic: &str,
    partition: Option<u32>,
) -> Result<Vec<PartitionOffsets>, ReplayError> {
    if bus.topic_info(topic).await?.is_none() {
        return Err(ReplayError::UnknownTopic(topic.to_owned()));
    }
    let all = bus.partition_offsets(topic).await?;
    match partition {
        None => Ok(all),
        Some(p) => match all.iter().find(|o| o.partition == p) {
            Some(o) => Ok(vec![*o]),
            None => Err(ReplayError::UnknownPartition {
                topic: topic.to_owned(),
                partition: p,
                partitions: all.len() as u32,
            }),
        },
    }
}

/// The first offset of a partition the replay starts at.
pub(crate) async fn target_offset(
    bus: &dyn Bus,
    topic: &str,
    offsets: &PartitionOffsets,
    from: ReplayFrom,
) -> Result<u64, ReplayError> {
    let offset = match from {
        ReplayFrom::Offset(o) => o,
        ReplayFrom::Time(ms) => bus.offset_for_time(topic, offsets.partition, ms).await?,
    };
    // Clamped like the Kafka tool's `--to-offset`: below the log start there is nothing left
    // to read, past the end there is nothing yet.
    Ok(offset.clamp(offsets.low, offsets.high.max(offsets.low)))
}

/// The dry run: where the group is, where it would be, and what that means. Reads only.
pub async fn plan(bus: &dyn Bus, req: &ReplayRequest) -> Result<ReplayPlan, ReplayError> {
    if req.to_time.is_some() {
        return Err(ReplayError::ToTimeNeedsCopy);
    }
    let offsets = partitions_of(bus, &req.topic, req.partition).await?;
    let positions = bus.group_positions(&req.group, &req.topic).await?;
    let mut partitions = Vec::with_capacity(offsets.len());
    for o in &offsets {
        let current = positions
            .iter()
            .find(|p| p.partition == o.partition)
            .and_then(|p| p.committed);
        let target = target_offset(bus, &req.topic, o, req.from).await?;
        let to_process = bus
            .count_between(&req.topic, o.partition, target, o.high)
            .await?;
        // Processed already: from the target up to where the group is (never past the end).
        let reprocess = match current.map(|c| c.min(o.high)) {
            Some(c) if c > target => {
                bus.count_between(&req.topic, o.partition, target, c)
                    .await?
            }
            _ => 0,
        };
        // A group that never committed starts at the log start (start_from = earliest) or end;
        // comparing with the log start shows the most it could skip, which is what an
        // operator must weigh before moving it.
        let from = current.unwrap_or(o.low).max(o.low);
        let skip = if target > from {
            bus.count_between(&req.topic, o.partition, from, target)
                .await?
        } else {
            0
        };
        partitions.push(PartitionReplay {
            partition: o.partition,
            low: o.low,
            high: o.high,
            current,
            target,
            to_process,
            reprocess,
            skip,
        });
    }
    Ok(ReplayPlan {
        topic: req.topic.clone(),
        group: req.group.clone(),
        from: req.from,
        partitions,
        executed: false,
        forced: false,
    })
}

/// Moves the group to the planned targets and returns the plan it carried out.
///
/// Refuses with [`ReplayError::ActiveMembers`] while members are subscribed, unless `force`:
/// a live member would overwrite the new position with its next commit. A partition already
/// at its target is moved all the same: records acked above its position (one left unacked,
/// the later ones acked) are what the plan counts too, and only a move makes them come again.
/// Running it twice moves the group to the same place.
pub async fn execute(
    bus: &dyn Bus,
    req: &ReplayRequest,
    force: bool,
) -> Result<ReplayPlan, ReplayError> {
    let mut plan = plan(bus, req).await?;
    let members = bus.active_members(&req.group, &req.topic).await?;
    if members > 0 && !force {
        return Err(ReplayError::ActiveMembers {
            group: req.group.clone(),
            topic: req.topic.clone(),
            members,
        });
    }
    for p in &plan.partitions {
        bus.seek_group(&req.group, &req.topic, p.partition, p.target)
            .await?;
    }
    tracing::warn!(
        topic = %req.topic,
        group = %req.group,
        from = %req.from,
        to_process = plan.total_to_process(),
        reprocess = plan.total_reprocess(),
        skip = plan.total_skip(),
        forced = force && members > 0,
        "consumer group moved by replay"
    );
    plan.executed = true;
    plan.forced = force && members > 0;
    Ok(plan)
}

impl fmt::Display for ReplayPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.executed { "Moved" } else { "Would move" };
        writeln!(
            f,
            "{verb} group {} on {} to {}{}",
            self.group,
            self.topic,
            self.from,
            if self.forced {
                " (forced past active members)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "{:>9}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            "PARTITION", "CURRENT", "TARGET", "TO-PROCESS", "REPROCESS", "SKIP"
        )?;
        for p in &self.partitions {
            let current = p.current.map_or_else(|| "-".to_owned(), |c| c.to_string());
            writeln!(
                f,
                "{:>9}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
                p.partition, current, p.target, p.to_process, p.reprocess, p.skip
            )?;
        }
        writeln!(
            f,
            "{:>9}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}",
            "TOTAL",
            "",
            "",
            self.total_to_process(),
            self.total_reprocess(),
            self.total_skip()
        )?;
        if self.total_skip() > 0 {
            writeln!(
                f,
                "warning: {} event(s) will be skipped: the target is ahead of the group",
                self.total_skip()
            )?;
        }
        if self.executed {
            write!(
                f,
                "Group moved; its workers process {} event(s) from the targets, {} of them again.",
                self.total_to_process(),
                self.total_reprocess()
            )
        } else {
            write!(
                f,
                "Dry run: nothing was changed (use --execute to move the group)."
            )
        }
    }
}

#[cfg(test)]
mod tests;
