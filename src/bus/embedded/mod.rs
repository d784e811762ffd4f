//! Embedded bus: a durable log per topic partition with committed offsets per group, kept in
//! a fjall database in a directory (`<dir>/db`). One process; `nexus dev`, tests.
//!
//! Design:
//! - [`store`]: the database (records keyed by topic, partition and offset; topics; retention
//!   marks; group offsets) and the reads every caller shares.
//! - [`writer`]: the only writer, one OS thread. Publishes, offset commits, topic changes and
//!   retention go through its channel; it writes up to `bus.embedded.max_batch` publishes and
//!   the offsets acked meanwhile as one atomic batch (group commit: one journal write and one
//!   fdatasync) and answers each caller once its data is durable. Retention removes the records
//!   older than the topic's retention from the front of each partition.
//! - [`group`]: consumer groups in this process: partition assignment, per-partition delivery
//!   tracking with an epoch, the contiguous acked prefix that becomes the committed offset.
//! - [`subscription`]: a member's `next()` loop: reads batches of its partitions, wakes on
//!   appends (a watch per topic) and rebalances (a watch per group), bounded by `max_in_flight`.
//!
//! Ordering holds per partition only: the writer appends a partition's records in the order
//! publishes reach its channel, and a member reads a partition in offset order. Nothing is
//! ordered across partitions.
//!
//! Durability: `publish` and `seek_group` return after their batch is durable (fdatasync).
//! An ack returns once its commit is queued to the writer (written within one batch, a few
//! milliseconds); `Subscription::close` and dropping the bus wait until every commit queued
//! before them is durable (an ack racing the drop may return `Ok` unwritten). A crash, or such
//! a race, may therefore redeliver the last few milliseconds of acked records, which
//! at-least-once consumers tolerate.

mod group;
mod store;
mod subscription;
mod tail;
#[cfg(test)]
mod tests;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use super::halt::Halt;
use super::*;
use group::{GroupKey, GroupState};
use writer::Cmd;

/// Held (flock) by the process using the directory.
const LOCK_FILE: &str = "bus.lock";

/// Files of the bus formats before this one (one redb file; then a hand-made segment log),
/// refused rather than silently ignored.
const OLD_FILES: [&str; 3] = ["bus.redb", "topics.json", "offsets.log"];

/// How long `open` waits for a bus on the same directory that this process is dropping to let
/// go of the file (its writer finishes its last batch): a test "restart" drops and reopens.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Directories opened by an embedded bus of this process. The flock on the lock file also
/// refuses a second open from the same process, so this only tells "still closing here" from
/// "held elsewhere".
static OPEN_FILES: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Locks a mutex, ignoring poisoning: every critical section leaves the state consistent
/// before anything that can panic, so a panicked holder leaves nothing half-done.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A storage failure with what was being done.
fn storage<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> BusError {
    move |e| BusError::Storage(format!("{what}: {e}"))
}

/// Milliseconds since the epoch.
fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Removes the file from [`OPEN_FILES`] when dropped.
struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&OPEN_FILES).remove(&self.0);
    }
}

/// The open directory. Fields drop in order: the lock file is closed (and unlocked) before the
/// registration goes, so a reopen that sees the path free can lock it.
pub(super) struct StoreHandle {
    db: store::Db,
    /// The writer's last batch failed (see `health`).
    failing: AtomicBool,
    /// Durable committed offsets, what a group starts from when it forms in this process.
    offsets: Mutex<store::OffsetMap>,
    _lock: std::fs::File,
    _registration: Registration,
}

impl StoreHandle {
    /// The committed offsets of a group on a topic, by partition.
    fn load_offsets(&self, group: &str, topic: &str, partitions: u32) -> Vec<Option<u64>> {
        let map = lock(&self.offsets);
        let parts = map.get(&(group.to_string(), topic.to_string()));
        (0..partitions)
            .map(|p| parts.and_then(|m| m.get(&p).copied()))
            .collect()
    }
}

/// What readers share about one partition; the writer refreshes `low` and `high` after each
/// durable batch, so readers never see records that are not yet durable.
pub(super) struct PartShared {
    /// First offset still kept.
    low: AtomicU64,
    /// Next offset to be written.
    high: AtomicU64,
    log: store::PartLog,
}

impl PartShared {
    fn new(log: store::PartLog) -> Arc<Self> {
        Arc::new(Self {
            low: AtomicU64::new(log.low()),
            high: AtomicU64::new(log.high()),
            log,
        })
    }

    /// Takes `low` and `high` from the log.
    fn refresh(&self) {
        self.high.store(self.log.high(), Ordering::Release);
        self.low.store(self.log.low(), Ordering::Release);
    }

    pub(super) fn low(&self) -> u64 {
        self.low.load(Ordering::Acquire)
    }

    pub(super) fn high(&self) -> u64 {
        self.high.load(Ordering::Acquire)
    }
}

/// What readers share about one topic; replaced as a whole when the topic changes.
pub(super) struct TopicShared {
    pub(super) partitions: Vec<Arc<PartShared>>,
    pub(super) retention: Option<Duration>,
    /// Bumped after every commit that appended to (or trimmed) the topic: wakes its readers.
    pub(super) tick: Arc<watch::Sender<u64>>,
}

impl TopicShared {
    fn partition(&self, topic: &str, partition: u32) -> Result<&Arc<PartShared>, BusError> {
        self.partitions
            .get(partition as usize)
            .ok_or_else(|| BusError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })
    }
}

pub(super) type Topics = RwLock<HashMap<String, Arc<TopicShared>>>;

/// State shared by the bus handle, its subscriptions and their ackers.
pub(super) struct Inner {
    path: PathBuf,
    /// `None` once the bus is dropped.
    store: RwLock<Option<Arc<StoreHandle>>>,
    tx: mpsc::Sender<Cmd>,
    /// Committed offsets waiting for the writer (see [`writer::PendingCommits`]).
    commits: Arc<Mutex<writer::PendingCommits>>,
    topics: Arc<Topics>,
    groups: Mutex<HashMap<GroupKey, GroupState>>,
    closed: Halt,
    writer: Mutex<Option<JoinHandle<()>>>,
    next_member: AtomicU64,
    /// Longest a moved partition waits for its old owner's deliveries (see `group`).
    handover_wait: Duration,
}

impl Inner {
    fn store(&self) -> Result<Arc<StoreHandle>, BusError> {
        self.store
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(BusError::Closed)
    }

    fn topic(&self, topic: &str) -> Result<Arc<TopicShared>, BusError> {
        self.topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned()
            .ok_or_else(|| BusError::UnknownTopic(topic.to_string()))
    }

    fn send(&self, cmd: Cmd) -> Result<(), BusError> {
        if self.closed.is_set() {
            return Err(BusError::Closed);
        }
        self.tx.send(cmd).map_err(|_| self.writer_gone())
    }

    /// The writer gone while the bus is open died (health says so too): not a shutdown.
    fn writer_gone(&self) -> BusError {
        if self.closed.is_set() {
            BusError::Closed
        } else {
            BusError::Storage("the embedded bus writer stopped".into())
        }
    }

    /// Sends a command and waits for the writer's answer (after its commit).
    async fn call<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<T, BusError>>) -> Cmd,
    ) -> Result<T, BusError> {
        let (reply, answer) = oneshot::channel();
        self.send(cmd(reply))?;
        answer.await.map_err(|_| self.writer_gone())?
    }

    /// Waits until every command queued before it is durable.
    async fn flush(&self) -> Result<(), BusError> {
        self.call(|reply| Cmd::Flush { reply }).await
    }

    /// Stops the writer after it wrote what was queued and closes the file.
    fn shutdown(&self) {
        self.closed.fire();
        let _ = self.tx.send(Cmd::Shutdown);
        if let Some(handle) = lock(&self.writer).take() {
            if handle.join().is_err() {
                tracing::error!(path = %self.path.display(), "embedded bus writer panicked");
            }
        }
        self.store
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// Whether `dir` holds an embedded bus: its database, or the files of an older format (which
/// [`EmbeddedBus::open`] refuses with its own message). [`EmbeddedBus::open`] creates a bus
/// where there is none; commands that only read a bus or move offsets on it (`nexus replay`,
/// `nexus topology plan`) ask this first, so a mistyped directory is not silently made an
/// empty bus whose topics "do not exist".
pub fn holds_bus(dir: &Path) -> bool {
    dir.join(store::DB_DIR).is_dir() || OLD_FILES.iter().any(|f| dir.join(f).exists())
}

/// The embedded bus. Dropping it stops the writer (after it wrote what was queued), ends
/// every subscription and closes the file, as a process exit would.
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl EmbeddedBus {
    /// Opens (or creates) the log in `dir`.
    pub fn open(
        dir: &std::path::Path,
        config: &crate::config::BusConfig,
    ) -> Result<Self, BusError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            BusError::Storage(format!("creating bus directory `{}`: {e}", dir.display()))
        })?;
        let path = dir.to_path_buf();
        if let Some(old) = OLD_FILES.iter().map(|f| dir.join(f)).find(|f| f.exists()) {
            return Err(BusError::Storage(format!(
                "`{}` holds an embedded bus of an older nexus (found `{}`); this version keeps \
                 its log in a fjall database and does not migrate older ones: move the directory \
                 aside (its events are lost to this version) or point bus.url at another one",
                dir.display(),
                old.display()
            )));
        }
        let key = std::fs::canonicalize(dir)
            .map_err(|e| BusError::Storage(format!("resolving `{}`: {e}", dir.display())))?;
        let registration = register(&key, &path)?;
        let lock_file = lock_dir(dir)?;
        let db = store::Db::open(&dir.join(store::DB_DIR))?;
        let committed = db.load_offsets()?;
        let files = db.load_topics()?;
        let mut metas = HashMap::new();
        for (name, file) in &files {
            let partitions = (0..file.partitions)
                .map(|p| Ok(PartShared::new(db.partition(file.id, p)?)))
                .collect::<Result<Vec<_>, BusError>>()?;
            let retention = file.retention_ms.map(Duration::from_millis);
            metas.insert(
                name.clone(),
                writer::TopicMeta {
                    partitions,
                    retention,
                },
            );
        }
        let handle = Arc::new(StoreHandle {
            db,
            failing: AtomicBool::new(false),
            offsets: Mutex::new(committed),
            _lock: lock_file,
            _registration: registration,
        });
        let topics: HashMap<String, Arc<TopicShared>> = metas
            .iter()
            .map(|(name, meta)| {
                let shared = TopicShared {
                    partitions: meta.partitions.clone(),
                    retention: meta.retention,
                    tick: Arc::new(watch::channel(0).0),
                };
                (name.clone(), Arc::new(shared))
            })
            .collect();
        let topics = Arc::new(RwLock::new(topics));
        let (tx, rx) = mpsc::channel();
        let commits = Arc::new(Mutex::new(writer::PendingCommits::default()));
        let writer = writer::Writer::new(
            handle.clone(),
            topics.clone(),
            rx,
            commits.clone(),
            config.embedded.max_batch.max(1),
            writer::Opened { metas, files },
            path.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("nexus-bus-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| BusError::Storage(format!("starting the writer thread: {e}")))?;
        tracing::info!(path = %path.display(), "embedded bus opened");
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                store: RwLock::new(Some(handle)),
                tx,
                commits,
                topics,
                groups: Mutex::new(HashMap::new()),
                closed: Halt::default(),
                writer: Mutex::new(Some(thread)),
                next_member: AtomicU64::new(1),
                handover_wait: Duration::from_millis(config.embedded.handover_wait_ms),
            }),
        })
    }

    /// Runs a retention pass now instead of waiting for the next one (tests and tools).
    pub async fn enforce_retention(&self) -> Result<(), BusError> {
        self.inner.call(|reply| Cmd::Retention { reply }).await
    }
}

/// Takes the directory's lock file: an advisory exclusive flock, released when the file closes
/// (also when the process dies).
fn lock_dir(dir: &Path) -> Result<std::fs::File, BusError> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| BusError::Storage(format!("opening `{}`: {e}", path.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            // Names the holder to a process refused below; the lock does not depend on it.
            use std::os::unix::fs::FileExt;
            let pid = format!("{}\n", std::process::id());
            if let Err(e) = file
                .set_len(0)
                .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
            {
                tracing::debug!(path = %path.display(), error = %e, "could not record the pid in the lock file");
            }
            Ok(file)
        }
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .map_or_else(String::new, |pid| format!(" (pid {pid})"));
            // `nexus dev` sets bus.url from its data directory: the flag is what it heeds.
            Err(BusError::Storage(format!(
                "`{}` is in use by another nexus process{holder}, such as `nexus dev`, which holds \
                 the embedded bus while it runs: stop it first (a replay or topology command \
                 too), or give this process a directory of its own (`nexus dev --data-dir`, \
                 or bus.url)",
                dir.display()
            )))
        }
        Err(e) => Err(BusError::Storage(format!(
            "locking `{}`: {e}",
            path.display()
        ))),
    }
}

/// Claims `key` for this process, waiting a little for a bus of this process that is still
/// closing the same file.
fn register(key: &Path, path: &Path) -> Result<Registration, BusError> {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        if lock(&OPEN_FILES).insert(key.to_path_buf()) {
            return Ok(Registration(key.to_path_buf()));
        }
        if Instant::now() >= deadline {
            return Err(BusError::Storage(format!(
                "`{}` is already open by another embedded bus in this process",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for EmbeddedBus {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn publish(&self, topic: &str, record: OutRecord) -> Result<Published, BusError> {
        let topic = topic.to_string();
        self.inner
            .call(|reply| Cmd::Publish {
                topic,
                record,
                reply,
            })
            .await
    }

    async fn subscribe(
        &self,
        group: &str,
        topic: &str,
        options: SubscribeOptions,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let sub =
            subscription::EmbeddedSubscription::join(self.inner.clone(), group, topic, options)?;
        Ok(Box::new(sub))
    }

    async fn tail(&self, topic: &str) -> Result<Box<dyn Subscription>, BusError> {
        Ok(Box::new(tail::start(self.inner.clone(), topic)?))
    }

    async fn topic_info(&self, topic: &str) -> Result<Option<TopicInfo>, BusError> {
        match self.inner.topic(topic) {
            Ok(t) => Ok(Some(TopicInfo {
                name: topic.to_string(),
                partitions: t.partitions.len() as u32,
                retention: t.retention,
                retention_known: true,
                // A topic here has nothing but partitions and retention.
                settings: Vec::new(),
            })),
            Err(BusError::UnknownTopic(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_topics(&self) -> Result<Vec<String>, BusError> {
        let mut names: Vec<String> = self
            .inner
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.sort_unstable();
        Ok(names)
    }

    async fn apply_topic(&self, spec: &TopicSpec) -> Result<(), BusError> {
        store::check_topic_name(&spec.name)?;
        if spec.partitions == 0 {
            return Err(BusError::Config(format!(
                "topic `{}` needs at least one partition",
                spec.name
            )));
        }
        let spec = spec.clone();
        let name = spec.name.clone();
        self.inner
            .call(|reply| Cmd::ApplyTopic { spec, reply })
            .await?;
        // New partitions need owners in the groups already consuming the topic.
        self.inner.rebalance_topic(&name);
        Ok(())
    }

    async fn partition_offsets(&self, topic: &str) -> Result<Vec<PartitionOffsets>, BusError> {
        let t = self.inner.topic(topic)?;
        Ok(t.partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                // `high` first: a trim between the loads can then only make `low` newer.
                let high = p.high();
                PartitionOffsets {
                    partition: i as u32,
                    low: p.low().min(high),
                    high,
                }
            })
            .collect())
    }

    async fn group_positions(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<GroupPosition>, BusError> {
        self.inner.group_positions(group, topic)
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        ts_ms: i64,
    ) -> Result<u64, BusError> {
        let part = self
            .inner
            .topic(topic)?
            .partition(topic, partition)?
            .clone();
        let open = self.inner.store()?;
        tokio::task::spawn_blocking(move || open.db.offset_for_time(&part.log, ts_ms, part.high()))
            .await
            .map_err(storage("offset lookup task"))?
    }

    async fn count_between(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        to: u64,
    ) -> Result<u64, BusError> {
        // Offsets are dense; only retention removes records, from the low end.
        let t = self.inner.topic(topic)?;
        let p = t.partition(topic, partition)?;
        let (low, high) = (p.low(), p.high());
        Ok(to.min(high).saturating_sub(from.max(low)))
    }

    async fn seek_group(
        &self,
        group: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), BusError> {
        let durable = self.inner.seek_group(group, topic, partition, offset)?;
        durable.await.map_err(|_| BusError::Closed)?
    }

    async fn active_members(&self, group: &str, topic: &str) -> Result<usize, BusError> {
        self.inner.topic(topic)?;
        Ok(self.inner.active_members(group, topic))
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<Vec<Message>, BusError> {
        let part = self
            .inner
            .topic(topic)?
            .partition(topic, partition)?
            .clone();
        let open = self.inner.store()?;
        let topic = topic.to_string();
        tokio::task::spawn_blocking(move || {
            open.db.read(
                &part.log,
                &topic,
                partition,
                from,
                store::ReadMax::records(max),
                part.high(),
            )
        })
        .await
        .map_err(storage("read task"))?
    }

    async fn health(&self) -> Result<(), BusError> {
        let store = self.inner.store()?;
        if !self.inner.writer_alive() {
            return Err(BusError::Storage("the embedded bus writer stopped".into()));
        }
        if store.failing.load(Ordering::Relaxed) {
            return Err(BusError::Storage(
                "the embedded bus's last write failed (see the error log)".into(),
            ));
        }
        Ok(())
    }
}

impl Inner {
    fn writer_alive(&self) -> bool {
        lock(&self.writer)
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }
}
