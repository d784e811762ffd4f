//! The session store on a Redis Cluster whose masters change under load: a cluster of its own
//! (three masters, one replica each, from the preinstalled `redis-server`), writers appending
//! to transcripts while the replicas take over, by hand (`CLUSTER FAILOVER`) and after a crash,
//! and while their slots move to other masters (`CLUSTER SETSLOT`, `MIGRATE` key by key, the
//! writes meeting the half-moved slot: TRYAGAIN, ASK); a reserve in a slot being moved, which
//! writes nothing on a node lacking the chosen agent's keys; every other multi-key operation
//! (and a timer claim, a `seen` refresh) in each state of a move of its keys; and
//! `stores.redis_min_replicas`, which acknowledges no write its replica does not have.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus::stores::session::redis::{RedisStore, ReplicaWait};
use nexus::stores::session::{timer_lease_until, StoreError};
use nexus::stores::session::{
    Conversation, ConversationState, EntryKind, NewEntry, Party, PartyKind, PresenceChange,
    PresenceUpdate, Reserve, Routing, SessionStore, Timer,
};
use tokio::process::{Child, Command};

/// Nodes of the test cluster: three masters, three replicas.
const NODES: usize = 6;
/// How long a node may not answer before the cluster fails it over (Redis's default is 15 s);
/// long enough that a loaded machine fails nothing over unasked.
const NODE_TIMEOUT_MS: u64 = 2_000;
/// Writers, each appending to a conversation of its own tenant (so of its own slot).
const WRITERS: usize = 12;
/// Entries per writer at least: they go on until the cluster's changes are over.
const ENTRIES: usize = 50;
/// Longest a writer keeps retrying one entry: far beyond a failover (about 2 node timeouts).
const RETRY_FOR: Duration = Duration::from_secs(90);

/// Every port this process handed to a node: the tests run side by side, and the system can
/// give two of them the same free port before either node binds it (a node then joins the
/// other test's cluster).
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Ports `p` free with `p + 10000` (each node's cluster bus) free too, all distinct, none
/// handed out before in this process.
fn node_ports(n: usize) -> Vec<u16> {
    let mut handed = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let taken = |p: u16| {
            ports
                .iter()
                .chain(handed.iter())
                .any(|q| *q == p || *q + 10_000 == p || p + 10_000 == *q)
        };
        if port < 55_000 && !taken(port) && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            ports.push(port);
        }
    }
    handed.extend(&ports);
    ports
}

/// `redis-server` and `redis-cli`, or `None` (the test skips) outside CI without them.
fn redis_tools() -> Option<()> {
    let found = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("redis-server") && found("redis-cli") {
        return Some(());
    }
    if std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("redis-server and redis-cli are required (NEXUS_TEST_REQUIRE_TOOLS=1)");
    }
    eprintln!("redis-server or redis-cli missing: the failover cases are not run");
    None
}

/// A cluster of its own; its nodes die with it.
struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = node_ports(NODES);
        let nodes = ports
            .iter()
            .map(|port| Some(spawn_node(dir.path(), *port)))
            .collect();
        let cluster = Self { ports, nodes, dir };
        for port in &cluster.ports {
            wait_for(&format!("node {port} up"), || async move {
                ping(*port).await.then_some(())
            })
            .await;
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cannot form the cluster: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        wait_for("the cluster formed, every replica in sync", || {
            let c = &cluster;
            async move { c.healthy().await.then_some(()) }
        })
        .await;
        cluster
    }

    /// The URL of a live node, to start from.
    fn url(&self) -> String {
        let live = self
            .ports
            .iter()
            .zip(&self.nodes)
            .find_map(|(port, node)| node.as_ref().map(|_| *port))
            .expect("a live node");
        format!("redis://127.0.0.1:{live}")
    }

    /// Every live node sees the cluster ok, and each master has a replica whose link is up.
    async fn healthy(&self) -> bool {
        let mut masters = 0;
        let mut linked = 0;
        for (i, port) in self.ports.iter().enumerate() {
            if self.nodes[i].is_none() {
                continue;
            }
            let Some(info) = command(*port, &["CLUSTER", "INFO"]).await else {
                return false;
            };
            if !info.contains("cluster_state:ok") {
                return false;
            }
            match role(*port).await.as_deref() {
                Some("master") => masters += 1,
                Some("slave") => {
                    let replication = command(*port, &["INFO", "replication"])
                        .await
                        .unwrap_or_default();
                    if replication.contains("master_link_status:up") {
                        linked += 1;
                    }
                }
                _ => return false,
            }
        }
        masters == 3 && linked == self.nodes.iter().flatten().count() - 3
    }

    /// The ports of the live nodes in `wanted` role (`master` or `slave`).
    async fn in_role(&self, wanted: &str) -> Vec<u16> {
        let mut found = Vec::new();
        for (i, port) in self.ports.iter().enumerate() {
            if self.nodes[i].is_some() && role(*port).await.as_deref() == Some(wanted) {
                found.push(*port);
            }
        }
        found
    }

    /// SIGKILL of the node on `port`.
    async fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        if let Some(mut child) = self.nodes[i].take() {
            child.kill().await.expect("kill");
        }
    }

    /// The node on `port` started again on its data (its node id kept), as a restarted pod.
    fn restart(&mut self, port: u16) {
        let i = self.ports.iter().position(|p| *p == port).expect("a node");
        assert!(self.nodes[i].is_none(), "{port} is running");
        self.nodes[i] = Some(spawn_node(self.dir.path(), port));
    }
}

fn spawn_node(dir: &Path, port: u16) -> Child {
    let node_dir = dir.join(port.to_string());
    std::fs::create_dir_all(&node_dir).expect("node dir");
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
        .arg("--dir")
        .arg(&node_dir)
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--enable-debug-command", "local"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn redis-server")
}

/// One command to one node (not through the cluster), its answer as text.
async fn command(port: u16, args: &[&str]) -> Option<String> {
    try_command(port, args).await.ok()
}

/// [`command`], saying why it failed.
async fn try_command(port: u16, args: &[&str]) -> Result<String, String> {
    let client =
        ::redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(|e| e.to_string())?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("no connection to {port} within 2 s"))?
    .map_err(|e| e.to_string())?;
    let mut cmd = ::redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let value: ::redis::Value =
        tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
            .await
            .map_err(|_| format!("no answer from {port} within 2 s"))?
            .map_err(|e| e.to_string())?;
    Ok(text_of(&value))
}

fn text_of(v: &::redis::Value) -> String {
    match v {
        ::redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        ::redis::Value::SimpleString(s) => s.clone(),
        ::redis::Value::VerbatimString { text, .. } => text.clone(),
        ::redis::Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join("\n"),
        ::redis::Value::Int(n) => n.to_string(),
        ::redis::Value::Okay => "OK".into(),
        other => format!("{other:?}"),
    }
}

async fn ping(port: u16) -> bool {
    command(port, &["PING"]).await.as_deref() == Some("PONG")
}

/// `master` or `slave`, as the node says.
async fn role(port: u16) -> Option<String> {
    command(port, &["ROLE"])
        .await
        .and_then(|r| r.lines().next().map(str::to_string))
}

async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry(writer: usize, n: usize) -> NewEntry {
    NewEntry {
        event_id: format!("w{writer}-e{n}"),
        kind: EntryKind::Message,
        from: Party {
            participant_id: format!("customer-{writer}"),
            nickname: "c".into(),
            kind: PartyKind::Customer,
        },
        text: Some(format!("message {n}")),
        message_id: None,
        data: BTreeMap::new(),
        at_ms: 1_700_000_000_000,
    }
}

/// What a writer did: entries appended (0 to `appended - 1`), failed tries (retried).
struct Written {
    appended: usize,
    failures: usize,
}

/// `WRITERS` tasks, each appending entries in order to a conversation of its own tenant until
/// `stop` is set (and at least `ENTRIES`), retrying a failed append as the worker would on
/// redelivery (same event id). Writer `w` writes through `stores[w % stores.len()]`.
fn start_writers(
    stores: &[Arc<RedisStore>],
    tenants: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Written>> {
    tenants
        .into_iter()
        .enumerate()
        .map(|(w, tenant)| {
            let (store, stop) = (stores[w % stores.len()].clone(), stop.clone());
            tokio::spawn(async move {
                let mut failures = 0;
                let mut n = 0;
                while n < ENTRIES || !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    loop {
                        match store.append(&tenant, "chat", &entry(w, n)).await {
                            Ok(_) => break,
                            Err(e) => {
                                failures += 1;
                                assert!(
                                    started.elapsed() < RETRY_FOR,
                                    "writer {w} entry {n} still failing: {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                    n += 1;
                    // Spread the writes over the failovers.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Written {
                    appended: n,
                    failures,
                }
            })
        })
        .collect()
}

/// Lets the writers go on a little past the last change, then stops them: what each appended,
/// and the failed tries of all.
async fn stop_writers(
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<Written>>,
) -> (Vec<usize>, usize) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = 0;
    let mut appended = Vec::new();
    for w in writers {
        let written = w.await.expect("writer");
        failures += written.failures;
        appended.push(written.appended);
    }
    (appended, failures)
}

/// The event ids of a writer's transcript in position order, checking positions have no gap.
async fn transcript_of(store: &RedisStore, tenant: &str) -> Vec<String> {
    let all = store
        .transcript(tenant, "chat", 1, 100_000)
        .await
        .expect("read the transcript");
    for (i, e) in all.iter().enumerate() {
        assert_eq!(
            e.position,
            i as u64 + 1,
            "positions without a gap in {tenant}"
        );
    }
    all.into_iter().map(|e| e.entry.event_id).collect()
}

fn tenants() -> Vec<String> {
    (0..WRITERS)
        .map(|_| format!("tenant-{}", uuid::Uuid::new_v4().simple()))
        .collect()
}

async fn connect(cluster: &Cluster, wait: Option<ReplicaWait>) -> Arc<RedisStore> {
    let url = cluster.url();
    Arc::new(
        RedisStore::connect_cluster_in(&[url.as_str()], "nx")
            .await
            .expect("connect to the test cluster")
            .with_replica_wait(wait)
            .await
            .expect("the writers' connection"),
    )
}

/// One replica per write, as `stores.redis_min_replicas = 1` asks.
fn one_replica(timeout_ms: u64) -> Option<ReplicaWait> {
    Some(ReplicaWait {
        replicas: 1,
        timeout: Duration::from_millis(timeout_ms),
    })
}

/// The key of `tenant`'s transcript of the writers' conversation, as the store names it
/// (`nx:{t:<tenant>}:tx:<conversation>`, see `stores::session::redis`): every key of the
/// tenant has its hash tag, so its slot is the tenant's.
fn transcript_key(tenant: &str) -> String {
    format!("nx:{{t:{tenant}}}:tx:chat")
}

/// The master holding `tenant`'s slot once it has keys there, and that slot.
async fn master_of(cluster: &Cluster, tenant: &str) -> (u16, String) {
    master_of_key(cluster, &transcript_key(tenant)).await
}

/// The master holding the slot of `key` once that slot has keys, and the slot.
async fn master_of_key(cluster: &Cluster, key: &str) -> (u16, String) {
    let slot = command(cluster.ports[0], &["CLUSTER", "KEYSLOT", key])
        .await
        .expect("the key's slot");
    let master = wait_for("the tenant's keys on a master", || {
        let slot = slot.clone();
        async move {
            for port in cluster.in_role("master").await {
                let keys = command(port, &["CLUSTER", "COUNTKEYSINSLOT", &slot]).await;
                if keys.is_some_and(|k| k != "0") {
                    return Some(port);
                }
            }
            None
        }
    })
    .await;
    (master, slot)
}

/// The replica of the master on `master`.
async fn replica_of(cluster: &Cluster, master: u16) -> u16 {
    for port in cluster.in_role("slave").await {
        let info = command(port, &["INFO", "replication"])
            .await
            .unwrap_or_default();
        if info.contains(&format!("master_port:{master}")) {
            return port;
        }
    }
    panic!("no replica of {master}")
}

/// Every replica takes over from its master by hand, one after another, while the writers
/// append: no write fails for good, and every transcript holds each entry once, in order (a
/// manual failover loses nothing: the replica catches up before it takes the slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_failovers_under_load_lose_and_repeat_nothing() {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let store = connect(&cluster, None).await;
    let tenants = tenants();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(std::slice::from_ref(&store), tenants.clone(), stop.clone());

    let replicas = cluster.in_role("slave").await;
    assert_eq!(replicas.len(), 3);
    for replica in replicas {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let answer = command(replica, &["CLUSTER", "FAILOVER"]).await;
        assert_eq!(
            answer.as_deref(),
            Some("OK"),
            "CLUSTER FAILOVER on {replica}"
        );
        wait_for(&format!("{replica} promoted"), || async move {
            (role(replica).await.as_deref() == Some("master")).then_some(())
        })
        .await;
    }
    let (appended, failures) = stop_writers(&stop, writers).await;
    let masters = cluster.in_role("master").await;
    assert_eq!(masters.len(), 3, "three masters after the failovers");

    for (w, tenant) in tenants.iter().enumerate() {
        let expected: Vec<String> = (0..appended[w]).map(|n| format!("w{w}-e{n}")).collect();
        assert_eq!(
            transcript_of(&store, tenant).await,
            expected,
            "writer {w}'s transcript after three failovers ({failures} failed tries retried)"
        );
    }
}

/// A master SIGKILLed mid-load, writes waiting for a replica: its replica takes its slots
/// after the node timeout; the shard's writes are refused until it has a replica again (the
/// dead node, restarted, rejoins as one), then the writers' retries get through, and every
/// transcript holds each entry once, in order, none lost with the master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_master_is_replaced_and_no_acknowledged_write_is_lost() {
    if redis_tools().is_none() {
        return;
    }
    let mut cluster = Cluster::start().await;
    let store = connect(&cluster, one_replica(1_000)).await;
    let tenants = tenants();
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(std::slice::from_ref(&store), tenants.clone(), stop.clone());

    // The victim is the master holding the first writer's conversation, once it has some.
    let (victim, _) = master_of(&cluster, &tenants[0]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.kill(victim).await;
    wait_for("a replica promoted in the dead master's place", || {
        let c = &cluster;
        async move { (c.in_role("master").await.len() == 3).then_some(()) }
    })
    .await;
    cluster.restart(victim);
    wait_for("the dead master back as a replica", || {
        let c = &cluster;
        async move { c.healthy().await.then_some(()) }
    })
    .await;

    let (appended, failures) = stop_writers(&stop, writers).await;
    for (w, tenant) in tenants.iter().enumerate() {
        let expected: Vec<String> = (0..appended[w]).map(|n| format!("w{w}-e{n}")).collect();
        assert_eq!(
            transcript_of(&store, tenant).await,
            expected,
            "writer {w}'s transcript after its master's crash ({failures} failed tries retried)"
        );
    }
    // The store works on the new masters, through a fresh connection too.
    let fresh = connect(&cluster, one_replica(1_000)).await;
    let probe = format!("tenant-{}", uuid::Uuid::new_v4().simple());
    fresh
        .append(&probe, "chat", &entry(0, 0))
        .await
        .expect("an append after the failover");
}

/// With a replica wait, a write its master has but its replica does not (the replica stalled)
/// is not acknowledged: the append fails, to be retried, and its retry, once the replica is
/// back, is the same entry at the same place. Without the wait it would be acknowledged at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_no_replica_has_is_not_acknowledged() {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let waiting = connect(&cluster, one_replica(300)).await;
    let other_waiting = connect(&cluster, one_replica(300)).await;
    let plain = connect(&cluster, None).await;
    let tenant = format!("tenant-{}", uuid::Uuid::new_v4().simple());
    // A replica just synced may take a moment to answer its first WAIT: retried, as a
    // worker's redelivery would.
    let first = wait_for("an append its replica takes", || {
        let (waiting, tenant) = (waiting.clone(), tenant.clone());
        async move { waiting.append(&tenant, "chat", &entry(0, 0)).await.ok() }
    })
    .await;
    // The other waiting connection's last write, before the stall, is one its replica has.
    wait_for("the other connection's write its replica takes", || {
        let (other_waiting, tenant) = (other_waiting.clone(), tenant.clone());
        async move {
            other_waiting
                .append(&tenant, "warm", &entry(1, 0))
                .await
                .ok()
        }
    })
    .await;
    let (master, _) = master_of(&cluster, &tenant).await;
    let replica = replica_of(&cluster, master).await;

    // The replica stalls for 3 s (it reads nothing meanwhile).
    let sleeper = tokio::spawn(async move { command(replica, &["DEBUG", "SLEEP", "3"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    match waiting.append(&tenant, "chat", &entry(0, 1)).await {
        Err(StoreError::Unavailable(detail)) => assert!(
            detail.contains("stores.redis_min_replicas"),
            "the failure names the setting: {detail}"
        ),
        other => panic!("a write no replica has was acknowledged: {other:?}"),
    }
    let unwaited = plain
        .append(&tenant, "chat", &entry(0, 2))
        .await
        .expect("without the wait the master's word is enough");
    // The same entry retried through another waiting connection (another pod, a reconnect) is
    // answered "duplicate" without a write of its own: not acknowledged either while the
    // replica lacks the entry. Before, its `WAIT` covered only its own connection's writes
    // (none) and vouched at once for an entry a failover would have lost.
    match other_waiting.append(&tenant, "chat", &entry(0, 2)).await {
        Err(StoreError::Unavailable(detail)) => assert!(
            detail.contains("stores.redis_min_replicas"),
            "the failure names the setting: {detail}"
        ),
        other => panic!("a duplicate no replica has was acknowledged: {other:?}"),
    }
    sleeper.await.expect("sleeper");

    let retried = wait_for("the retry acknowledged once the replica is back", || {
        let waiting = waiting.clone();
        let tenant = tenant.clone();
        async move { waiting.append(&tenant, "chat", &entry(0, 1)).await.ok() }
    })
    .await;
    assert!(retried.duplicate, "the retry is the first try's entry");
    assert_eq!(retried.position, first.position + 1);
    assert_eq!(unwaited.position, first.position + 2);
    assert_eq!(
        transcript_of(&plain, &tenant).await,
        ["w0-e0", "w0-e1", "w0-e2"]
    );
}

/// The node id of the node on `port`.
async fn node_id(port: u16) -> String {
    command(port, &["CLUSTER", "MYID"])
        .await
        .expect("CLUSTER MYID")
}

/// ASK and TRYAGAIN answers the node on `port` gave so far (`INFO errorstats`): requests
/// that met a slot being moved.
async fn redirections(port: u16) -> u64 {
    let stats = command(port, &["INFO", "errorstats"])
        .await
        .unwrap_or_default();
    stats
        .lines()
        .filter_map(|line| {
            let (name, count) = line.split_once(":count=")?;
            let counted = matches!(name, "errorstat_ASK" | "errorstat_TRYAGAIN");
            counted.then(|| count.trim().parse::<u64>().ok()).flatten()
        })
        .sum()
}

/// The first step of moving `slot` from the master on `from` to the one on `to`: the target
/// importing it, then the source migrating it (the order `redis-cli --cluster reshard` uses).
async fn open_slot(slot: &str, from: u16, to: u16) {
    let (from_id, to_id) = (node_id(from).await, node_id(to).await);
    let importing = command(to, &["CLUSTER", "SETSLOT", slot, "IMPORTING", &from_id]).await;
    assert_eq!(importing.as_deref(), Some("OK"), "{to} importing {slot}");
    let migrating = command(from, &["CLUSTER", "SETSLOT", slot, "MIGRATING", &to_id]).await;
    assert_eq!(migrating.as_deref(), Some("OK"), "{from} migrating {slot}");
}

/// One key of a slot being moved, from the node on `from` to the node on `to`.
async fn migrate(from: u16, to: u16, key: &str) {
    let to_port = to.to_string();
    let args = [
        "MIGRATE",
        "127.0.0.1",
        &to_port,
        "",
        "0",
        "5000",
        "KEYS",
        key,
    ];
    let answer = try_command(from, &args).await;
    assert_eq!(answer.as_deref(), Ok("OK"), "MIGRATE of {key} to {to}");
}

/// The last step: the slot is the target's, on the target, the source, then the other masters.
async fn close_slot(cluster: &Cluster, slot: &str, from: u16, to: u16) {
    let to_id = node_id(to).await;
    let mut order = vec![to, from];
    order.extend(
        cluster
            .in_role("master")
            .await
            .into_iter()
            .filter(|p| *p != to && *p != from),
    );
    for port in order {
        let answer = command(port, &["CLUSTER", "SETSLOT", slot, "NODE", &to_id]).await;
        assert_eq!(
            answer.as_deref(),
            Some("OK"),
            "{slot} given to {to} on {port}"
        );
    }
}

/// Moves `slot` from the master on `from` to the one on `to`, one key at a time. After each
/// key the slot stays half-moved until a request met it (an ASK or TRYAGAIN answered by either
/// node; only this slot is moving), so the writers run into every state of the move: keys on
/// both nodes (a script on several of them: TRYAGAIN), then on the target alone (ASK).
async fn move_slot(cluster: &Cluster, slot: &str, from: u16, to: u16) {
    open_slot(slot, from, to).await;
    loop {
        let key = command(from, &["CLUSTER", "GETKEYSINSLOT", slot, "1"])
            .await
            .expect("CLUSTER GETKEYSINSLOT");
        if key.is_empty() {
            break;
        }
        let before = redirections(from).await + redirections(to).await;
        migrate(from, to, &key).await;
        wait_for(&format!("a request meeting slot {slot} half-moved"), || async move {
            (redirections(from).await + redirections(to).await > before).then_some(())
        })
        .await;
    }
    close_slot(cluster, slot, from, to).await;
}

/// A conversation record, so that the writer's appends (a script on the record, the transcript
/// and its ids) find all their keys on one node or another, not some on none.
fn record(tenant: &str) -> Conversation {
    Conversation {
        tenant_id: tenant.into(),
        conversation_id: "chat".into(),
        channel: "WEB_CHAT".into(),
        state: ConversationState::Connected,
        customer: Party {
            participant_id: "customer".into(),
            nickname: "c".into(),
            kind: PartyKind::Customer,
        },
        contact: BTreeMap::new(),
        user_data: BTreeMap::new(),
        subject: None,
        queue_id: None,
        bot_id: None,
        agent_id: None,
        offered_to: None,
        declined_by: Vec::new(),
        files: 0,
        created_at_ms: 1_700_000_000_000,
        last_activity_ms: 1_700_000_000_000,
        closed_reason: None,
        routing: Routing::default(),
        version: 0,
    }
}

/// Every writer's slot moves to another master while the writers append, key by key, each
/// state of the move held until a write met it (TRYAGAIN while the keys are split, ASK once
/// they are all on the target); then two of them move back. Half the writers write through a
/// replica-waiting connection (a script and its `WAIT` in one pipeline), half of the
/// conversations have a record (an append touches three keys, else two and a missing one). No
/// write fails for good, and every transcript holds each entry once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_migrated_under_load_lose_and_repeat_nothing() {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let plain = connect(&cluster, None).await;
    let waiting = connect(&cluster, one_replica(1_000)).await;
    let tenants = tenants();
    for tenant in tenants.iter().step_by(2) {
        let written = plain
            .put_conversation(&record(tenant))
            .await
            .expect("a record");
        assert!(written, "the record of {tenant} is new");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers = start_writers(
        &[plain.clone(), waiting.clone()],
        tenants.clone(),
        stop.clone(),
    );

    // Each writer's slot and its master, once it has keys; a slot two tenants share moves once.
    let mut owners: BTreeMap<String, u16> = BTreeMap::new();
    let mut slots_of = Vec::new();
    for tenant in &tenants {
        let (master, slot) = master_of(&cluster, tenant).await;
        owners.insert(slot.clone(), master);
        slots_of.push(slot);
    }
    let mut masters = cluster.in_role("master").await;
    masters.sort_unstable();
    assert_eq!(masters.len(), 3);
    let next = |port: u16| {
        let i = masters.iter().position(|m| *m == port).expect("a master");
        masters[(i + 1) % masters.len()]
    };
    for (slot, from) in &owners {
        move_slot(&cluster, slot, *from, next(*from)).await;
    }
    // Back again: the first two writers' slots (one conversation with a record, one without).
    let mut back = slots_of[..2].to_vec();
    back.dedup();
    for slot in &back {
        let from = next(owners[slot]);
        move_slot(&cluster, slot, from, owners[slot]).await;
    }

    let (appended, failures) = stop_writers(&stop, writers).await;
    for (w, tenant) in tenants.iter().enumerate() {
        let expected: Vec<String> = (0..appended[w]).map(|n| format!("w{w}-e{n}")).collect();
        assert_eq!(
            transcript_of(&plain, tenant).await,
            expected,
            "writer {w}'s transcript after its slot moved ({failures} failed tries retried)"
        );
    }
    // Each writer's keys are on the master its slot was moved to last.
    for (w, tenant) in tenants.iter().enumerate() {
        let (master, slot) = master_of(&cluster, tenant).await;
        let expected = if back.contains(&slot) {
            owners[&slot]
        } else {
            next(owners[&slot])
        };
        assert_eq!(master, expected, "writer {w}'s keys after the moves");
    }
}

/// A reserve that runs on the node importing the tenant's slot (every key it declares has
/// arrived) while the chosen agent's slots hash is still on the source: it writes nothing
/// there (a write would make a second hash, and the move would then stop on it, BUSYKEY); it
/// is answered TRYAGAIN, retried by the client, and takes the agent once the move is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reserve_in_a_slot_being_moved_writes_no_key_left_behind() {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let store = connect(&cluster, None).await;
    let tenant = format!("tenant-{}", uuid::Uuid::new_v4().simple());
    let profile = PresenceUpdate {
        ready: true,
        skills: Vec::new(),
        capacity: BTreeMap::from([("chat".to_string(), 2)]),
        limits: BTreeMap::new(),
    };
    let reserve = |conversation: &str, only: Option<&str>, exclude: &[&str]| Reserve {
        conversation_id: conversation.into(),
        media: "chat".into(),
        skills: Vec::new(),
        exclude: exclude.iter().map(|a| a.to_string()).collect(),
        only: only.map(str::to_string),
        now_ms: 1_700_000_000_000,
    };
    for agent in ["a", "b"] {
        store
            .update_presence(&tenant, agent, &profile, 1_700_000_000_000)
            .await
            .expect("presence");
    }
    // c1 holds a slot of a (a transfer from a is a reserve excluding a, with c1's holder set);
    // b holds c2, so b has a slots hash.
    for (conversation, agent) in [("c1", "a"), ("c2", "b")] {
        let got = store
            .reserve_agent(&tenant, &reserve(conversation, Some(agent), &[]))
            .await
            .expect("reserve");
        assert_eq!(got.as_deref(), Some(agent));
    }
    store
        .append(&tenant, "c1", &entry(0, 0))
        .await
        .expect("an entry of c1");

    // Every key of the slot moves but b's slots hash.
    let (from, slot) = master_of(&cluster, &tenant).await;
    let to = *cluster
        .in_role("master")
        .await
        .iter()
        .find(|p| **p != from)
        .expect("another master");
    let left = format!("nx:{{t:{tenant}}}:slots:b");
    open_slot(&slot, from, to).await;
    let keys = command(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
        .await
        .expect("the slot's keys");
    for key in keys.lines().filter(|k| *k != left) {
        migrate(from, to, key).await;
    }

    // The transfer's reserve: redirected (ASK) to the target, which has all it declares.
    let before = redirections(to).await;
    let transfer = tokio::spawn({
        let (store, tenant) = (store.clone(), tenant.clone());
        let r = reserve("c1", None, &["a"]);
        async move { store.reserve_agent(&tenant, &r).await }
    });
    wait_for("the reserve run on the target, or refused there", || {
        let transfer = &transfer;
        async move { (transfer.is_finished() || redirections(to).await > before).then_some(()) }
    })
    .await;
    if transfer.is_finished() {
        let early = transfer.await.expect("reserve task");
        panic!("the reserve answered while b's slots hash was still on the source: {early:?}");
    }
    // b's slots hash moves: the target made none of its own meanwhile.
    migrate(from, to, &left).await;
    close_slot(&cluster, &slot, from, to).await;

    let got = transfer
        .await
        .expect("reserve task")
        .expect("the reserve, retried");
    assert_eq!(got.as_deref(), Some("b"), "the transfer takes b");
    assert_eq!(
        store
            .agent_conversations(&tenant, "b")
            .await
            .expect("b's conversations"),
        ["c1", "c2"],
        "b's slots hash holds both conversations"
    );
    let b = store
        .presence(&tenant, "b")
        .await
        .expect("b's presence")
        .expect("b");
    assert_eq!(
        b.active.get("chat"),
        Some(&2),
        "b's count matches its slots"
    );
    assert_eq!(
        store.slot_holders(&tenant, "c1").await.expect("holders"),
        ["a", "b"]
    );
}

/// A time the operations below run at; `LATER` is a second one, after it.
const NOW: i64 = 1_700_000_000_000;
const LATER: i64 = NOW + 60_000;

/// A store operation run in a slot being moved, with the state it starts from, the keys it
/// reads and writes (those the setup made, moved one by one) and the state it must leave.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `release_agent` (RELEASE): agent `a` holds `c1` and `c2`; `c1` is released.
    Release,
    /// `enqueue` (ENQUEUE): `c1` joins queue `q` behind `c0`.
    Enqueue,
    /// `dequeue` (DEQUEUE): `c0` leaves queue `q`, `c1` stays.
    Dequeue,
    /// `update_presence` (SET_PRESENCE): agent `a`, not ready, becomes ready.
    SetPresence,
    /// `change_presence` (a read of the profile, then SWAP_PROFILE, which answers the
    /// presence): agent `a`, ready, is made not ready.
    SwapProfile,
    /// `put_conversation` (PUT_CONVERSATION) of a record saved closed over version 1.
    PutConversation,
    /// `put_conversation` of the first record of a conversation that has entries (no `conv`
    /// key yet: the transcript's keys lose the orphan TTL).
    PutNewConversation,
    /// `expire_conversation` (EXPIRE) of a record with a transcript.
    Expire,
    /// `claim_due` (CLAIM_DUE) of a due timer, in a timers key (a global key: the tenant
    /// names its kind, so each run has a slot of its own).
    ClaimDue,
    /// `refresh` of a remembered key (`seen`, global too), to a longer TTL.
    Refresh,
}

/// The timer of [`Op::ClaimDue`].
fn due_timer(tenant: &str) -> Timer {
    Timer {
        kind: tenant.into(),
        tenant_id: tenant.into(),
        id: "c1".into(),
    }
}

fn agent_profile(ready: bool) -> PresenceUpdate {
    PresenceUpdate {
        ready,
        skills: Vec::new(),
        capacity: BTreeMap::from([("chat".to_string(), 2)]),
        limits: BTreeMap::new(),
    }
}

fn reserve_of(conversation: &str, agent: &str) -> Reserve {
    Reserve {
        conversation_id: conversation.into(),
        media: "chat".into(),
        skills: Vec::new(),
        exclude: Vec::new(),
        only: Some(agent.into()),
        now_ms: NOW,
    }
}

impl Op {
    /// The keys the operation touches, in the order they are moved (the store's names).
    fn keys(self, tenant: &str) -> Vec<String> {
        let key = |kind: &str| format!("nx:{{t:{tenant}}}:{kind}");
        let names: &[&str] = match self {
            Op::Release => &["agents", "agent:a", "slots:a", "holder:c1"],
            Op::Enqueue | Op::Dequeue => &["queue:q", "qidx:q"],
            Op::SetPresence => &["agents", "agent:a"],
            Op::SwapProfile => &["agent:a", "agents"],
            Op::PutConversation | Op::Expire => &["conv:chat", "txids:chat", "tx:chat"],
            Op::PutNewConversation => &["txids:chat", "tx:chat"],
            Op::ClaimDue => return vec![format!("nx:timers:{tenant}")],
            Op::Refresh => return vec![format!("nx:seen:{tenant}")],
        };
        names.iter().map(|n| key(n)).collect()
    }

    /// Whether every key the operation's script declares exists before it (else Redis
    /// refuses the script, TRYAGAIN, the whole move long).
    fn keys_exist(self) -> bool {
        !matches!(self, Op::PutNewConversation)
    }

    /// Makes the state the operation starts from (every key of [`Op::keys`]).
    async fn setup(self, store: &RedisStore, tenant: &str) {
        match self {
            Op::Release => {
                store
                    .update_presence(tenant, "a", &agent_profile(true), NOW)
                    .await
                    .expect("presence");
                for c in ["c1", "c2"] {
                    let got = store
                        .reserve_agent(tenant, &reserve_of(c, "a"))
                        .await
                        .expect("reserve");
                    assert_eq!(got.as_deref(), Some("a"), "{c} takes a");
                }
            }
            Op::Enqueue => store
                .enqueue(tenant, "q", "c0", 0, NOW)
                .await
                .expect("enqueue"),
            Op::Dequeue => {
                for (i, c) in ["c0", "c1"].into_iter().enumerate() {
                    store
                        .enqueue(tenant, "q", c, 0, NOW + i as i64)
                        .await
                        .expect("enqueue");
                }
            }
            Op::SetPresence => {
                store
                    .update_presence(tenant, "a", &agent_profile(false), NOW)
                    .await
                    .expect("presence");
            }
            Op::SwapProfile => {
                store
                    .update_presence(tenant, "a", &agent_profile(true), NOW)
                    .await
                    .expect("presence");
            }
            Op::PutConversation | Op::Expire => {
                let written = store
                    .put_conversation(&record(tenant))
                    .await
                    .expect("a record");
                assert!(written, "the record is new");
                store
                    .append(tenant, "chat", &entry(0, 0))
                    .await
                    .expect("an entry");
            }
            Op::PutNewConversation => {
                store
                    .append(tenant, "chat", &entry(0, 0))
                    .await
                    .expect("an entry");
            }
            Op::ClaimDue => store
                .schedule(&due_timer(tenant), NOW)
                .await
                .expect("schedule"),
            Op::Refresh => {
                let new = store
                    .remember(tenant, Duration::from_secs(60))
                    .await
                    .expect("remember");
                assert!(new, "remembered");
            }
        }
    }

    /// Runs the operation once (the cluster client retrying TRYAGAIN and following ASK): what
    /// it answered, as text.
    async fn run(self, store: &RedisStore, tenant: &str) -> Result<String, StoreError> {
        Ok(match self {
            Op::Release => store
                .release_agent(tenant, "a", "chat", "c1", LATER)
                .await?
                .to_string(),
            Op::Enqueue => {
                store.enqueue(tenant, "q", "c1", 0, LATER).await?;
                "enqueued".into()
            }
            Op::Dequeue => store.dequeue(tenant, "q", "c0").await?.to_string(),
            Op::SetPresence => {
                let p = store
                    .update_presence(tenant, "a", &agent_profile(true), LATER)
                    .await?;
                format!("ready {} since {}", p.ready, p.idle_since_ms)
            }
            Op::SwapProfile => {
                let p = store
                    .change_presence(tenant, "a", &PresenceChange::NotReady)
                    .await?
                    .map(|p| format!("ready {} since {}", p.ready, p.idle_since_ms));
                format!("{p:?}")
            }
            Op::PutConversation => {
                let closed = Conversation {
                    state: ConversationState::Closed,
                    version: 1,
                    ..record(tenant)
                };
                store.put_conversation(&closed).await?.to_string()
            }
            Op::PutNewConversation => store.put_conversation(&record(tenant)).await?.to_string(),
            Op::Expire => {
                store
                    .expire_conversation(tenant, "chat", Duration::from_secs(3_600))
                    .await?;
                "expiring".into()
            }
            Op::ClaimDue => {
                let due = store.claim_due(tenant, LATER, 10).await?;
                format!("{:?}", due.iter().map(|t| &t.id).collect::<Vec<_>>())
            }
            Op::Refresh => {
                store.refresh(tenant, Duration::from_secs(3_600)).await?;
                "refreshed".into()
            }
        })
    }

    /// What [`Op::run`] answers when the operation took effect once.
    fn answer(self) -> String {
        match self {
            Op::Release | Op::Dequeue | Op::PutConversation | Op::PutNewConversation => {
                "true".into()
            }
            Op::Enqueue => "enqueued".into(),
            Op::SetPresence => format!("ready true since {LATER}"),
            Op::SwapProfile => format!("Some(\"ready false since {NOW}\")"),
            Op::Expire => "expiring".into(),
            Op::ClaimDue => "[\"c1\"]".into(),
            Op::Refresh => "refreshed".into(),
        }
    }

    /// The state after the move is that of the operation run once; `owner` is the master the
    /// slot ended on.
    async fn check(self, store: &RedisStore, tenant: &str, owner: u16, state: &str) {
        match self {
            Op::Release => {
                let a = store.presence(tenant, "a").await.expect("read").expect("a");
                assert_eq!(a.active.get("chat"), Some(&1), "{state}: a's count");
                assert_eq!(a.idle_since_ms, LATER, "{state}: a idle since the release");
                let held = store.agent_conversations(tenant, "a").await.expect("read");
                assert_eq!(held, ["c2"], "{state}: a's slots");
                let holders = store.slot_holders(tenant, "c1").await.expect("read");
                assert!(holders.is_empty(), "{state}: c1 holds no slot: {holders:?}");
            }
            Op::Enqueue => {
                let waiting = store.waiting(tenant, "q", 10).await.expect("read");
                assert_eq!(waiting, ["c0", "c1"], "{state}: the queue");
                store
                    .enqueue(tenant, "q", "c1", 9, NOW)
                    .await
                    .expect("again");
                let waiting = store.waiting(tenant, "q", 10).await.expect("read");
                assert_eq!(waiting, ["c0", "c1"], "{state}: the index has c1");
            }
            Op::Dequeue => {
                let waiting = store.waiting(tenant, "q", 10).await.expect("read");
                assert_eq!(waiting, ["c1"], "{state}: the queue");
                let again = store.dequeue(tenant, "q", "c0").await.expect("again");
                assert!(!again, "{state}: c0 left the index too");
            }
            Op::SetPresence | Op::SwapProfile => {
                let a = store.presence(tenant, "a").await.expect("read").expect("a");
                let ready = matches!(self, Op::SetPresence);
                let since = if ready { LATER } else { NOW };
                assert_eq!(
                    (a.ready, a.idle_since_ms),
                    (ready, since),
                    "{state}: a's presence"
                );
            }
            Op::PutConversation => {
                let c = store.conversation(tenant, "chat").await.expect("read");
                let c = c.expect("the record");
                assert_eq!(
                    (c.version, c.state),
                    (2, ConversationState::Closed),
                    "{state}: the record"
                );
                let refused = store.append(tenant, "chat", &entry(0, 1)).await;
                assert!(
                    matches!(refused, Err(StoreError::Closed(_))),
                    "{state}: the transcript is marked closed: {refused:?}"
                );
            }
            Op::PutNewConversation => {
                let c = store.conversation(tenant, "chat").await.expect("read");
                assert_eq!(c.map(|c| c.version), Some(1), "{state}: the record");
                for key in &self.keys(tenant) {
                    let ttl = command(owner, &["PTTL", key]).await;
                    assert_eq!(ttl.as_deref(), Some("-1"), "{state}: {key} kept for good");
                }
            }
            Op::Expire => {
                for key in &Op::Expire.keys(tenant) {
                    let ttl: i64 = command(owner, &["PTTL", key])
                        .await
                        .and_then(|t| t.parse().ok())
                        .expect("PTTL");
                    assert!(ttl > 0, "{state}: {key} expiring ({ttl})");
                }
            }
            Op::ClaimDue => {
                let again = store.claim_due(tenant, LATER, 10).await.expect("claim");
                assert!(again.is_empty(), "{state}: leased once: {again:?}");
                let lapsed = timer_lease_until(LATER);
                let due = store.claim_due(tenant, lapsed, 10).await.expect("claim");
                assert_eq!(
                    due,
                    [due_timer(tenant)],
                    "{state}: due again once the lease ends"
                );
            }
            Op::Refresh => {
                assert!(store.seen(tenant).await.expect("seen"), "{state}: seen");
                let key = &self.keys(tenant)[0];
                let ttl: i64 = command(owner, &["PTTL", key])
                    .await
                    .and_then(|t| t.parse().ok())
                    .expect("PTTL");
                assert!(ttl > 60_000, "{state}: {key} kept for the new TTL ({ttl})");
            }
        }
        let entries = store.transcript(tenant, "chat", 1, 10).await.expect("read");
        assert!(entries.len() <= 1, "{state}: the transcript");
    }
}

/// How many errors named `name` (`TRYAGAIN`, `ASK`) the node on `port` answered so far.
async fn errors_answered(port: u16, name: &str) -> u64 {
    let stats = command(port, &["INFO", "errorstats"])
        .await
        .unwrap_or_default();
    let prefix = format!("errorstat_{name}:count=");
    stats
        .lines()
        .find_map(|line| {
            line.strip_prefix(&prefix)?
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The keys of `slot` the node on `port` holds: each one's `DUMP` and whether it expires.
async fn slot_contents(port: u16, slot: &str) -> BTreeMap<String, (Vec<u8>, bool)> {
    let keys = command(port, &["CLUSTER", "GETKEYSINSLOT", slot, "1000"])
        .await
        .expect("CLUSTER GETKEYSINSLOT");
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");
    let mut contents = BTreeMap::new();
    for key in keys.lines() {
        // ASKING: the node importing the slot answers for its keys only after it.
        let (dump, ttl): (Vec<u8>, i64) = ::redis::pipe()
            .cmd("ASKING")
            .ignore()
            .cmd("DUMP")
            .arg(key)
            .cmd("ASKING")
            .ignore()
            .cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("DUMP");
        contents.insert(key.to_string(), (dump, ttl > 0));
    }
    contents
}

/// The states of a move an operation on `n` keys is run in, as the indexes of its keys moved
/// before it: none, each alone, all but each, all (the slot still the source's: ASK).
fn move_states(n: usize) -> Vec<Vec<usize>> {
    let mut states = vec![Vec::new()];
    for i in 0..n {
        for moved in [vec![i], (0..n).filter(|j| *j != i).collect()] {
            if !moved.is_empty() && moved.len() < n && !states.contains(&moved) {
                states.push(moved);
            }
        }
    }
    states.push((0..n).collect());
    states
}

/// Runs `op` in each state of [`move_states`], a tenant (a slot) of its own each time: the
/// slot opened, some of the operation's keys moved to the importing master, the operation
/// started. It either answers at once, only where Redis can run it whole (nothing moved, or
/// everything moved: an ASK to the target), or it is refused (TRYAGAIN, retried by the
/// client) with nothing written on either node. Then the rest of the slot moves (MIGRATE
/// refuses a key the target made meanwhile: BUSYKEY), the slot is the target's, and the
/// operation answers and leaves the state of one run.
async fn run_in_a_moving_slot(op: Op) {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let store = connect(&cluster, None).await;
    let masters = cluster.in_role("master").await;
    let n = op.keys("t").len();
    for moved in move_states(n) {
        let tenant = format!("tenant-{}", uuid::Uuid::new_v4().simple());
        op.setup(&store, &tenant).await;
        let keys = op.keys(&tenant);
        let (from, slot) = master_of_key(&cluster, &keys[0]).await;
        let to = *masters
            .iter()
            .find(|p| **p != from)
            .expect("another master");
        let names: Vec<&str> = moved
            .iter()
            .map(|i| {
                keys[*i]
                    .rsplit_once("}:")
                    .map_or(keys[*i].as_str(), |(_, k)| k)
            })
            .collect();
        let state = format!("{op:?} with {names:?} moved of {n} keys");
        open_slot(&slot, from, to).await;
        for i in &moved {
            migrate(from, to, &keys[*i]).await;
        }
        let (source, target) = (
            slot_contents(from, &slot).await,
            slot_contents(to, &slot).await,
        );
        let refused =
            errors_answered(from, "TRYAGAIN").await + errors_answered(to, "TRYAGAIN").await;
        let asked = errors_answered(from, "ASK").await;
        let task = tokio::spawn({
            let (store, tenant) = (store.clone(), tenant.clone());
            async move { op.run(&store, &tenant).await }
        });
        wait_for(&format!("{state}: an answer or a TRYAGAIN"), || {
            let task = &task;
            async move {
                let tried =
                    errors_answered(from, "TRYAGAIN").await + errors_answered(to, "TRYAGAIN").await;
                (task.is_finished() || tried > refused).then_some(())
            }
        })
        .await;
        // Redis runs a script only on a node holding every key it declares.
        let whole = op.keys_exist() && (moved.is_empty() || moved.len() == n);
        if task.is_finished() {
            assert!(
                whole,
                "{state}: answered while its keys were not all on one node: {:?}",
                task.await
            );
            if !moved.is_empty() {
                assert!(
                    errors_answered(from, "ASK").await > asked,
                    "{state}: run on the target after an ASK"
                );
            }
        } else {
            assert!(!whole, "{state}: refused with all its keys on one node");
            assert!(
                slot_contents(from, &slot).await == source,
                "{state}: refused, and nothing written on the source"
            );
            assert!(
                slot_contents(to, &slot).await == target,
                "{state}: refused, and nothing written on the target"
            );
        }
        // The rest of the slot: a key the target made meanwhile would stop it (BUSYKEY).
        loop {
            let left = command(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
                .await
                .expect("CLUSTER GETKEYSINSLOT");
            if left.is_empty() {
                break;
            }
            for key in left.lines() {
                migrate(from, to, key).await;
            }
        }
        close_slot(&cluster, &slot, from, to).await;
        let answer = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| panic!("{state}: no answer within 20 s"))
            .expect("the operation's task");
        match answer {
            Ok(answer) => assert_eq!(answer, op.answer(), "{state}: the answer"),
            Err(e) => panic!("{state}: failed for good: {e}"),
        }
        op.check(&store, &tenant, to, &state).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::Release).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_enqueue_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::Enqueue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dequeue_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::Dequeue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_presence_update_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::SetPresence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_presence_change_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::SwapProfile).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_saved_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::PutConversation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_record_saved_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::PutNewConversation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiry_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::Expire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timer_claimed_in_a_slot_being_moved_is_leased_once() {
    run_in_a_moving_slot(Op::ClaimDue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seen_mark_refreshed_in_a_slot_being_moved_takes_effect_once() {
    run_in_a_moving_slot(Op::Refresh).await;
}

/// A tenant's purge after its slot moved to another master, sent by a store whose slot map
/// still names the old one (it touched the tenant before the move), removes the tenant's keys
/// where they are now. Before, `SCAN` (which names no key, so no node answers it MOVED) walked
/// the old master, found nothing, and the purge passed for done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_after_a_reshard_finds_the_tenants_keys() {
    if redis_tools().is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let store = connect(&cluster, None).await;
    let tenant = format!("tenant-{}", uuid::Uuid::new_v4().simple());
    for n in 0..3 {
        store
            .append(&tenant, "chat", &entry(0, n))
            .await
            .expect("append");
    }
    let (from, slot) = master_of(&cluster, &tenant).await;
    let to = cluster
        .in_role("master")
        .await
        .into_iter()
        .find(|p| *p != from)
        .expect("another master");
    // Moved by hand, with no request of the store in between: its map stays stale.
    open_slot(&slot, from, to).await;
    loop {
        let key = command(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "1"])
            .await
            .expect("CLUSTER GETKEYSINSLOT");
        if key.is_empty() {
            break;
        }
        migrate(from, to, &key).await;
    }
    close_slot(&cluster, &slot, from, to).await;

    let removed = store.purge_tenant(&tenant).await.expect("purge");
    assert!(removed >= 2, "the tenant's keys found: {removed} removed");
    let left = command(to, &["CLUSTER", "COUNTKEYSINSLOT", &slot])
        .await
        .expect("CLUSTER COUNTKEYSINSLOT");
    assert_eq!(left, "0", "the tenant's keys left on its new master");
}
