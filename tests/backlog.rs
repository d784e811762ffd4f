//! The retry backlog of the peer-calling roles, on SQLite and on PostgreSQL (a fresh database),
//! with the embedded bus for dead letters: a failed event is acked into the backlog, its
//! conversation's later events queue behind it and run in order, other conversations go on,
//! tries run out into the dead-letter topic (a dead letter whose row the database will not
//! remove is published again, never applied again), failures that say nothing about the event
//! do not count, a `RetryLater` time is kept, a deferred effect runs when it asked, two
//! schedulers share one backlog without running an event twice, and a pod whose lease ran out
//! changes nothing.
//!
//! The effect here is a recorder that fails on command; the history and gws tests run the same
//! backlog against real HTTP peers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use nexus::bus::consumer::{HandleError, Handler};
use nexus::bus::{headers, Bus, Message, TopicSpec};
use nexus::events::{encode, Event, Registry};
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::Provisioning;
use nexus::workers::backlog::{Backlog, Backlogged, Effect, Key, RetryPolicy, Scheduler};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "test.backlog.v1";
const WAIT: Duration = Duration::from_secs(20);

/// Records what it applied, in order; fails the events it is told to (by text).
#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, String)>>,
    /// Event text → how many more tries fail (`u32::MAX`: all of them).
    failing: Mutex<HashMap<String, u32>>,
    tries: Mutex<HashMap<String, u32>>,
    /// Failures say nothing about the event (as when the peer is down for everyone).
    paused: AtomicBool,
    /// Failures ask for no try before this time (ms since the epoch).
    not_before_ms: AtomicI64,
    /// Event text → how many more tries take [`SLOW`] before they succeed.
    slow: Mutex<HashMap<String, u32>>,
    /// Event text → times (ms since the epoch, ascending): a try before one of them is
    /// deferred to the first such time.
    deferred: Mutex<HashMap<String, Vec<i64>>>,
    /// Event texts whose tries after the first panic.
    panicking: Mutex<std::collections::HashSet<String>>,
}

/// How long a slow try takes: longer than the rig's handler may run before its event goes to
/// the backlog (two thirds of [`HANDLER_TIMEOUT`]).
const SLOW: Duration = Duration::from_millis(1500);
/// The consumer's handler timeout the rig's handler is built for.
const HANDLER_TIMEOUT: Duration = Duration::from_millis(900);

impl Recorder {
    fn fail(&self, text: &str, times: u32) {
        self.failing.lock().unwrap().insert(text.to_string(), times);
    }

    fn applied_to(&self, conv: &str) -> Vec<String> {
        let applied = self.applied.lock().unwrap();
        applied
            .iter()
            .filter(|(c, _)| c == conv)
            .map(|(_, text)| text.clone())
            .collect()
    }

    fn tries(&self, event_text: &str) -> u32 {
        *self.tries.lock().unwrap().get(event_text).unwrap_or(&0)
    }
}

#[async_trait]
impl Effect for Recorder {
    fn concerns(&self, _event: &Event) -> bool {
        true
    }

    async fn apply(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        let conv = event.envelope.conversation_id.clone();
        let text = event.envelope.producer.clone();
        let tries = {
            let mut all = self.tries.lock().unwrap();
            let n = all.entry(text.clone()).or_default();
            *n += 1;
            *n
        };
        if tries > 1 && self.panicking.lock().unwrap().contains(&text) {
            panic!("{text} met a bug");
        }
        let slow = {
            let mut slow = self.slow.lock().unwrap();
            slow.get_mut(&text)
                .filter(|left| **left > 0)
                .map(|left| *left -= 1)
                .is_some()
        };
        if slow {
            tokio::time::sleep(SLOW).await;
        }
        let now = chrono::Utc::now().timestamp_millis();
        let until_ms = self
            .deferred
            .lock()
            .unwrap()
            .get(&text)
            .and_then(|times| times.iter().copied().find(|u| now < *u));
        if let Some(until_ms) = until_ms {
            return Err(HandleError::Defer {
                reason: "test_deferral",
                until_ms,
            });
        }
        {
            let mut failing = self.failing.lock().unwrap();
            if let Some(left) = failing.get_mut(&text) {
                if *left > 0 {
                    *left = left.saturating_sub(u32::from(*left != u32::MAX));
                    let reason = format!("{text} is failing");
                    let not_before_ms = self.not_before_ms.load(Ordering::SeqCst);
                    let counts = !self.paused.load(Ordering::SeqCst);
                    if counts && not_before_ms == 0 {
                        return Err(HandleError::Retry(reason));
                    }
                    return Err(HandleError::RetryLater {
                        reason,
                        not_before_ms,
                        counts,
                    });
                }
            }
        }
        self.applied.lock().unwrap().push((conv, text));
        Ok(())
    }
}

/// An event of `conv`, named by `text` (carried as the producer, which the recorder keeps).
fn event(conv: &str, text: &str) -> (Event, Message) {
    let mut e = Registry::builtin()
        .example("ConversationStarted")
        .expect("an example event");
    e.envelope.event_id = uuid::Uuid::now_v7();
    e.envelope.tenant_id = "t1".into();
    e.envelope.conversation_id = conv.into();
    e.envelope.producer = text.into();
    let payload = encode(&e).expect("encode");
    let m = Message {
        topic: TOPIC.into(),
        partition: 0,
        offset: 7,
        timestamp_ms: 0,
        key: conv.into(),
        payload: Bytes::from(payload),
        headers: vec![("traceparent".into(), "00-abc-def-01".into())],
    };
    (e, m)
}

struct Rig {
    recorder: Arc<Recorder>,
    policy: RetryPolicy,
    handler: Backlogged<Recorder>,
    backlog: Backlog,
    pool: sqlx::AnyPool,
    bus: Arc<dyn Bus>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// A rig on `db` ("" = SQLite), with its scheduler running if `scheduling`.
    async fn start(db: &str, max_attempts: u32, scheduling: bool) -> Rig {
        let rig = Rig::start_without_dlq(db, max_attempts, scheduling).await;
        rig.create_dlq().await;
        rig
    }

    async fn create_dlq(&self) {
        self.bus
            .apply_topic(&TopicSpec {
                name: format!("{TOPIC}.dlq"),
                partitions: 1,
                retention: None,
            })
            .await
            .expect("dlq topic");
    }

    /// A rig whose dead-letter topic is missing until [`Rig::create_dlq`].
    async fn start_without_dlq(db: &str, max_attempts: u32, scheduling: bool) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = if db.is_empty() {
            dir.path().join("p.db").display().to_string()
        } else {
            db.to_string()
        };
        let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
        let provisioning = Provisioning::connect(&target, &key)
            .await
            .expect("provisioning");
        let mut config = nexus::config::Config::defaults().bus;
        config.url = format!("embedded://{}", dir.path().join("bus").display());
        let bus = nexus::bus::connect(&config).await.expect("bus");
        let recorder = Arc::new(Recorder::default());
        let backlog = Backlog::new(provisioning.pool().clone(), "test");
        let policy = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(200),
            max_attempts,
        };
        let scheduler = Arc::new(Scheduler::new(
            backlog.clone(),
            recorder.clone(),
            bus.clone(),
            "test-group",
            policy,
            Duration::from_secs(5),
        ));
        let stop = CancellationToken::new();
        if scheduling {
            tokio::spawn(scheduler.run(stop.clone()));
        }
        Rig {
            handler: Backlogged::new(recorder.clone(), backlog.clone(), policy, HANDLER_TIMEOUT),
            policy,
            recorder,
            backlog,
            pool: provisioning.pool().clone(),
            bus,
            stop,
            _dir: dir,
        }
    }

    async fn handle(&self, conv: &str, text: &str) -> (Event, Message) {
        let (e, m) = event(conv, text);
        self.handler
            .handle(&e, &m)
            .await
            .unwrap_or_else(|err| panic!("{text} was not acked: {err}"));
        (e, m)
    }

    async fn queued(&self) -> i64 {
        self.backlog.depth().await.expect("depth").events
    }

    async fn dead_letters(&self) -> Vec<Message> {
        self.bus
            .read(&format!("{TOPIC}.dlq"), 0, 0, 100)
            .await
            .expect("read dlq")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < until, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_failed_event_holds_only_its_conversation(db: &str) {
    let rig = Rig::start(db, 0, true).await;
    let r = &rig.recorder;
    r.fail("x1", 3);
    // x's first event fails and is acked into the backlog; x's next events queue behind it.
    rig.handle("x", "x1").await;
    rig.handle("x", "x2").await;
    rig.handle("x", "x3").await;
    // Another conversation goes on at once, on the same handler.
    rig.handle("y", "y1").await;
    rig.handle("y", "y2").await;
    assert_eq!(r.applied_to("y"), ["y1", "y2"]);
    assert_eq!(r.tries("x2"), 0, "x2 ran while x1 was waiting");
    // The scheduler tries x1 again until it succeeds, then runs x2 and x3 in order.
    eventually("x applied from the backlog", || {
        r.applied_to("x").len() == 3
    })
    .await;
    assert_eq!(r.applied_to("x"), ["x1", "x2", "x3"]);
    assert_eq!(
        r.tries("x1"),
        4,
        "one try on the lane, three from the backlog"
    );
    assert_eq!((r.tries("x2"), r.tries("x3")), (1, 1));
    let until = tokio::time::Instant::now() + WAIT;
    while rig.queued().await > 0 {
        assert!(tokio::time::Instant::now() < until, "backlog not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Emptied, x runs on the lane again.
    rig.handle("x", "x4").await;
    assert_eq!(r.applied_to("x").last().map(String::as_str), Some("x4"));
}

/// An effect still running at two thirds of the handler timeout (several slow peer calls) goes
/// to the backlog and is acked, rather than left for the consumer to cut short and retry in
/// place with its partition held; the scheduler applies it, the conversation's next event
/// waits behind it.
async fn a_slow_effect_goes_to_the_backlog(db: &str) {
    let rig = Rig::start(db, 0, true).await;
    let r = &rig.recorder;
    r.slow.lock().unwrap().insert("s1".into(), 1);
    let started = tokio::time::Instant::now();
    rig.handle("s", "s1").await;
    assert!(
        started.elapsed() < HANDLER_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
    rig.handle("s", "s2").await;
    assert_eq!(r.tries("s2"), 0, "s2 waits behind s1");
    eventually("s applied from the backlog", || {
        r.applied_to("s").len() == 2
    })
    .await;
    assert_eq!(r.applied_to("s"), ["s1", "s2"]);
}

async fn redeliveries_keep_their_place(db: &str) {
    let rig = Rig::start(db, 0, true).await;
    let r = &rig.recorder;
    r.fail("x1", u32::MAX);
    let (e1, m1) = rig.handle("x", "x1").await;
    let (e2, m2) = rig.handle("x", "x2").await;
    // Redelivered (same event ids): acked, nothing run, nothing queued twice.
    rig.handler.handle(&e2, &m2).await.expect("x2 again");
    rig.handler.handle(&e1, &m1).await.expect("x1 again");
    assert_eq!(rig.queued().await, 2);
    assert_eq!(r.tries("x2"), 0);
    // Only the head is ever claimed: x2 waits however long x1 fails.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(r.tries("x1") >= 3, "x1 tried {} times", r.tries("x1"));
    assert_eq!(r.tries("x2"), 0);
    r.failing.lock().unwrap().clear();
    eventually("x1 and x2 applied in order", || {
        r.applied_to("x") == ["x1", "x2"]
    })
    .await;
}

/// Pods claiming at once share the due heads without overlap, and never claim a queued event.
async fn claims_are_exclusive_and_only_of_heads(db: &str) {
    // No scheduler: the claims below are the only ones.
    let rig = Rig::start(db, 0, false).await;
    let now = chrono::Utc::now().timestamp_millis();
    for n in 0..20 {
        let conv = format!("c{n}");
        let (e, m) = event(&conv, &format!("{conv}-head"));
        let event_id = e.envelope.event_id.to_string();
        let key = Key {
            tenant_id: "t1",
            conversation_id: &conv,
            event_id: &event_id,
        };
        rig.backlog
            .push(key, &m, now - 1, "failed", 1, now)
            .await
            .expect("push");
        let (e, m) = event(&conv, &format!("{conv}-queued"));
        let event_id = e.envelope.event_id.to_string();
        let key = Key {
            event_id: &event_id,
            ..key
        };
        assert!(rig.backlog.queue_behind(key, &m, now).await.expect("queue"));
    }
    let claims = (0..4).map(|_| rig.backlog.claim_due(now, 60_000, 20));
    let claimed: Vec<_> = futures::future::join_all(claims)
        .await
        .into_iter()
        .flat_map(|c| c.expect("claim"))
        .collect();
    let mut convs: Vec<_> = claimed.iter().map(|i| i.conversation_id.clone()).collect();
    convs.sort();
    convs.dedup();
    assert_eq!(claimed.len(), 20, "every head once");
    assert_eq!(convs.len(), 20, "one item per conversation");
    for item in &claimed {
        let back = nexus::events::decode(&item.message.payload).expect("payload");
        assert!(back.envelope.producer.ends_with("-head"));
        assert_eq!(item.attempts, 1);
        assert_eq!(item.message.offset, 7);
    }
    // Leased: nothing is due until the lease ends.
    let again = rig.backlog.claim_due(now, 60_000, 20).await.expect("claim");
    assert!(again.is_empty());
    // The next head is claimed only once the first is out.
    let first = &claimed[0];
    let blocked = rig
        .backlog
        .claim_next(&first.tenant_id, &first.conversation_id, now, 60_000)
        .await
        .expect("next");
    assert!(blocked.is_none(), "claimed past a leased head");
    assert!(rig.backlog.remove(first).await.expect("remove"));
    let next = rig
        .backlog
        .claim_next(&first.tenant_id, &first.conversation_id, now, 60_000)
        .await
        .expect("next")
        .expect("the queued event is the head now");
    let back = nexus::events::decode(&next.message.payload).expect("payload");
    assert!(back.envelope.producer.ends_with("-queued"));
}

/// An event queued behind a head is not due (the claim query does not walk it) until it is
/// the head; one whose head went without promoting it (removed by a transaction that did not
/// see it queued) is made due by the periodic promotion.
async fn queued_events_are_due_only_as_heads(db: &str) {
    let rig = Rig::start(db, 0, false).await;
    let now = chrono::Utc::now().timestamp_millis();
    let (head, m) = event("c1", "c1-head");
    let head_id = head.envelope.event_id.to_string();
    let key = Key {
        tenant_id: "t1",
        conversation_id: "c1",
        event_id: &head_id,
    };
    rig.backlog
        .push(key, &m, now - 1, "failed", 1, now)
        .await
        .expect("push");
    let (queued, m) = event("c1", "c1-queued");
    let queued_id = queued.envelope.event_id.to_string();
    let key = Key {
        event_id: &queued_id,
        ..key
    };
    assert!(rig.backlog.queue_behind(key, &m, now).await.expect("queue"));
    let due: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM effect_backlog WHERE role = 'test' AND due_at_ms <= $1",
    )
    .bind(i64::MAX - 1)
    .fetch_all(&rig.pool)
    .await
    .expect("due rows");
    assert_eq!(due, std::slice::from_ref(&head_id), "only the head is due");
    // The head goes behind the store's back: the queued event is the head, not due yet.
    sqlx::query("DELETE FROM effect_backlog WHERE event_id = $1")
        .bind(&head_id)
        .execute(&rig.pool)
        .await
        .expect("delete");
    assert!(rig
        .backlog
        .claim_due(now + 60_000, 60_000, 10)
        .await
        .expect("claim")
        .is_empty());
    assert_eq!(
        rig.backlog.promote_queued_heads().await.expect("promote"),
        1
    );
    let claimed = rig
        .backlog
        .claim_due(now + 60_000, 60_000, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].event_id, queued_id);
}

/// A pod whose lease ran out (another pod claimed the head since) neither removes nor
/// reschedules it.
async fn a_lost_lease_changes_nothing(db: &str) {
    let rig = Rig::start(db, 0, false).await;
    let now = chrono::Utc::now().timestamp_millis();
    let (e, m) = event("x", "x1");
    let event_id = e.envelope.event_id.to_string();
    let key = Key {
        tenant_id: "t1",
        conversation_id: "x",
        event_id: &event_id,
    };
    rig.backlog
        .push(key, &m, now - 1, "failed", 1, now)
        .await
        .expect("push");
    let mut a = rig.backlog.claim_due(now, 1, 10).await.expect("claim a");
    assert_eq!(a.len(), 1);
    let a = a.remove(0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = chrono::Utc::now().timestamp_millis();
    let b = rig
        .backlog
        .claim_due(later, 60_000, 10)
        .await
        .expect("claim b");
    assert_eq!(b.len(), 1, "the lapsed lease is claimable");
    assert!(
        !rig.backlog.remove(&a).await.expect("remove"),
        "a removed b's head"
    );
    assert!(
        !rig.backlog
            .reschedule(&a, later, "late", true)
            .await
            .expect("reschedule"),
        "a rescheduled b's head"
    );
    assert_eq!(rig.queued().await, 1);
    assert!(rig.backlog.remove(&b[0]).await.expect("remove"));
    assert_eq!(rig.queued().await, 0);
}

/// A failure asking for a later time is not tried before it, however short the policy's delay.
async fn a_retry_later_time_is_kept(db: &str) {
    let rig = Rig::start(db, 0, true).await;
    let r = &rig.recorder;
    let until = chrono::Utc::now().timestamp_millis() + 1_500;
    r.not_before_ms.store(until, Ordering::SeqCst);
    r.fail("x1", 1);
    rig.handle("x", "x1").await;
    eventually("x1 applied", || r.applied_to("x") == ["x1"]).await;
    let applied_at = chrono::Utc::now().timestamp_millis();
    assert!(
        applied_at >= until,
        "tried again {} ms early",
        until - applied_at
    );
    assert_eq!(r.tries("x1"), 2);
}

/// An effect that asks to run later (nothing failed) waits in the backlog, with its
/// conversation's next event behind it, and runs when it asked; asked again from the backlog,
/// it waits again. Never counted (one counted failure would dead-letter it here), and never
/// tried early: three tries in all (at arrival, at each time asked for).
async fn a_deferred_effect_runs_when_it_asked(db: &str) {
    let rig = Rig::start(db, 1, true).await;
    let r = &rig.recorder;
    let first = chrono::Utc::now().timestamp_millis() + 2_000;
    let second = first + 1_000;
    r.deferred
        .lock()
        .unwrap()
        .insert("x1".into(), vec![first, second]);
    rig.handle("x", "x1").await;
    rig.handle("x", "x2").await;
    rig.handle("y", "y1").await;
    assert_eq!(r.applied_to("y"), ["y1"], "another conversation goes on");
    if chrono::Utc::now().timestamp_millis() < first {
        assert!(r.applied_to("x").is_empty(), "x2 ran before x1");
    }
    eventually("x1 then x2 applied", || r.applied_to("x") == ["x1", "x2"]).await;
    assert_eq!(
        r.tries("x1"),
        3,
        "tried at arrival and once at each time asked"
    );
    assert!(rig.dead_letters().await.is_empty());
}

/// Two pods' schedulers on one backlog: every event once, in order per conversation.
async fn two_schedulers_share_a_backlog(db: &str) {
    let rig = Rig::start(db, 0, true).await;
    let second = Arc::new(Scheduler::new(
        rig.backlog.clone(),
        rig.recorder.clone(),
        rig.bus.clone(),
        "test-group",
        rig.policy,
        Duration::from_secs(5),
    ));
    tokio::spawn(second.run(rig.stop.clone()));
    let r = &rig.recorder;
    let convs: Vec<String> = (0..12).map(|n| format!("c{n}")).collect();
    for conv in &convs {
        r.fail(&format!("{conv}-0"), 2);
    }
    for n in 0..5 {
        for conv in &convs {
            rig.handle(conv, &format!("{conv}-{n}")).await;
        }
    }
    eventually("every event applied", || {
        convs.iter().all(|c| r.applied_to(c).len() >= 5)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for conv in &convs {
        let want: Vec<String> = (0..5).map(|n| format!("{conv}-{n}")).collect();
        assert_eq!(r.applied_to(conv), want, "{conv}: once each, in order");
    }
}

async fn tries_run_out_into_the_dead_letter_topic(db: &str) {
    let rig = Rig::start(db, 3, true).await;
    let r = &rig.recorder;
    r.fail("x1", u32::MAX);
    let (e1, _) = rig.handle("x", "x1").await;
    rig.handle("x", "x2").await;
    eventually("x2 runs once x1 is dead-lettered", || {
        r.applied_to("x") == ["x2"]
    })
    .await;
    assert_eq!(r.tries("x1"), 3, "three counted tries");
    let dead = rig.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.header(headers::DLQ_REASON), Some("retries_exhausted"));
    assert_eq!(d.header(headers::DLQ_GROUP), Some("test-group"));
    assert_eq!(d.header(headers::DLQ_SOURCE_TOPIC), Some(TOPIC));
    assert_eq!(d.header(headers::DLQ_SOURCE_OFFSET), Some("7"));
    assert_eq!(d.header("traceparent"), Some("00-abc-def-01"));
    assert!(
        d.header(headers::DLQ_ERROR)
            .is_some_and(|e| e.contains("x1 is failing")),
        "{:?}",
        d.headers
    );
    let back = nexus::events::decode(&d.payload).expect("the event as delivered");
    assert_eq!(back.envelope.event_id, e1.envelope.event_id);
}

/// A row that cannot be read (its payload edited by hand) no longer holds its conversation
/// forever: it is dead-lettered as stored, naming the column, and the next event runs.
async fn an_unreadable_row_is_dead_lettered_and_its_conversation_goes_on(db: &str) {
    let rig = Rig::start(db, 5, true).await;
    let r = &rig.recorder;
    // u1 waits in the backlog for a minute; u2 queues behind it.
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    r.not_before_ms.store(later, Ordering::SeqCst);
    r.fail("u1", 1);
    let (e1, _) = rig.handle("u", "u1").await;
    rig.handle("u", "u2").await;
    let changed = sqlx::query(
        "UPDATE effect_backlog SET payload = '!!not base64', due_at_ms = 0 WHERE event_id = $1",
    )
    .bind(e1.envelope.event_id.to_string())
    .execute(&rig.pool)
    .await
    .expect("corrupt the row");
    assert_eq!(changed.rows_affected(), 1);
    eventually("u2 runs once u1's row is set aside", || {
        r.applied_to("u") == ["u2"]
    })
    .await;
    let dead = rig.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("backlog_row_unreadable")
    );
    assert!(
        dead[0]
            .header(headers::DLQ_ERROR)
            .is_some_and(|e| e.contains("payload")),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(
        dead[0].payload.as_ref(),
        b"!!not base64",
        "the record as stored"
    );
    assert_eq!(r.tries("u1"), 1, "the unreadable row is not tried");
}

/// A dead letter the dead-letter topic does not take yet is published again later, without
/// running the effect again: the refused call (a GWS call GWS refused) is not made every few
/// seconds while the topic is down (before, each retry of the publish re-ran the effect).
async fn a_failed_dead_letter_publish_does_not_run_the_effect_again(db: &str) {
    let rig = Rig::start_without_dlq(db, 2, true).await;
    let r = &rig.recorder;
    r.fail("d1", u32::MAX);
    rig.handle("d", "d1").await;
    rig.handle("d", "d2").await;
    eventually("both tries of d1", || r.tries("d1") >= 2).await;
    // The publish fails (no topic) and is tried again 5 s later; the topic is there by then.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.create_dlq().await;
    eventually("d2 runs once d1 is dead-lettered", || {
        r.applied_to("d") == ["d2"]
    })
    .await;
    assert_eq!(r.tries("d1"), 2, "the effect ran only for its two tries");
    let dead = rig.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("retries_exhausted")
    );
    assert!(
        dead[0]
            .header(headers::DLQ_ERROR)
            .is_some_and(|e| e.contains("d1 is failing")),
        "{:?}",
        dead[0].headers
    );
}

/// A dead letter whose row removal fails after the publish (the store refuses the delete): the
/// row stays marked settled, so each claim after its lease only publishes the dead letter
/// again (the same event, so the dead-letter topic may hold it more than once) and never runs
/// the effect again; once the store takes the removal the row goes and the conversation's next
/// events run, in order.
async fn a_dead_letter_whose_removal_fails_is_not_applied_again(db: &str) {
    // The rig's scheduler is not started: this one's shorter try timeout makes the lease (the
    // time before a claim takes the head again) 6 s instead of 10 s.
    let rig = Rig::start(db, 2, false).await;
    tokio::spawn(
        Arc::new(Scheduler::new(
            rig.backlog.clone(),
            rig.recorder.clone(),
            rig.bus.clone(),
            "test-group",
            rig.policy,
            Duration::from_secs(1),
        ))
        .run(rig.stop.clone()),
    );
    let r = &rig.recorder;
    let (refuse, allow): (&[&str], &[&str]) = if db.is_empty() {
        (
            &[
                "CREATE TRIGGER refuse_removal BEFORE DELETE ON effect_backlog \
               BEGIN SELECT RAISE(ABORT, 'removal refused by the test'); END",
            ],
            &["DROP TRIGGER refuse_removal"],
        )
    } else {
        (
            &[
                "CREATE FUNCTION refuse_removal() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN RAISE EXCEPTION 'removal refused by the test'; END $$",
                "CREATE TRIGGER refuse_removal BEFORE DELETE ON effect_backlog \
                 FOR EACH ROW EXECUTE FUNCTION refuse_removal()",
            ],
            &[
                "DROP TRIGGER refuse_removal ON effect_backlog",
                "DROP FUNCTION refuse_removal()",
            ],
        )
    };
    for sql in refuse {
        sqlx::query(sql).execute(&rig.pool).await.expect(sql);
    }
    r.fail("d1", u32::MAX);
    let (e1, _) = rig.handle("d", "d1").await;
    rig.handle("d", "d2").await;
    let d1_id = e1.envelope.event_id.to_string();
    // d1's row's `last_error`; `None` once the row is gone.
    let last_error = || {
        let (pool, id) = (rig.pool.clone(), d1_id.clone());
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT last_error FROM effect_backlog WHERE event_id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .expect("d1's row")
        }
    };
    // The second try runs out: published, then the removal is refused.
    let until = tokio::time::Instant::now() + WAIT;
    while rig.dead_letters().await.is_empty() {
        assert!(tokio::time::Instant::now() < until, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.tries("d1"), 2);
    assert_eq!(r.tries("d2"), 0);
    // The next claim (after the lease) finds the row the refused removal left: it publishes
    // again, is refused again, and does not run the effect; d2 waits.
    let until = tokio::time::Instant::now() + WAIT;
    while rig.dead_letters().await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < until,
            "d1 not published again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.tries("d1"), 2, "d1's effect ran again");
    assert_eq!(r.tries("d2"), 0, "d2 ran while d1's row was there");
    let stored = last_error().await.flatten().unwrap_or_default();
    assert!(
        stored.starts_with("dead-letter pending [retries_exhausted]"),
        "d1's row: {stored:?}"
    );
    // The store takes removals again: the next claim publishes once more and removes the row;
    // d2 runs.
    for sql in allow {
        sqlx::query(sql).execute(&rig.pool).await.expect(sql);
    }
    eventually("d2 runs once d1's row is removed", || {
        r.applied_to("d") == ["d2"]
    })
    .await;
    assert!(last_error().await.is_none(), "d1's row is still there");
    assert_eq!(r.tries("d1"), 2, "d1's effect ran again");
    let until = tokio::time::Instant::now() + WAIT;
    while rig.queued().await > 0 {
        assert!(tokio::time::Instant::now() < until, "backlog not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dead = rig.dead_letters().await;
    assert!(dead.len() >= 2, "{dead:?}");
    for d in &dead {
        assert_eq!(d.header(headers::DLQ_REASON), Some("retries_exhausted"));
        let back = nexus::events::decode(&d.payload).expect("the event as delivered");
        assert_eq!(back.envelope.event_id, e1.envelope.event_id, "one event");
    }
    // Emptied, the conversation runs on the lane again.
    rig.handle("d", "d3").await;
    assert_eq!(r.applied_to("d"), ["d2", "d3"]);
    assert_eq!(r.tries("d1"), 2);
}

/// A panic in a backlogged try is a bug the event would meet on every try: it is
/// dead-lettered as on the consumer's lanes, and the conversation goes on.
async fn a_panicking_effect_is_dead_lettered(db: &str) {
    let rig = Rig::start(db, 5, true).await;
    let r = &rig.recorder;
    r.fail("p1", 1);
    r.panicking.lock().unwrap().insert("p1".into());
    rig.handle("p", "p1").await;
    rig.handle("p", "p2").await;
    eventually("p2 runs once p1 is dead-lettered", || {
        r.applied_to("p") == ["p2"]
    })
    .await;
    let dead = rig.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].header(headers::DLQ_REASON),
        Some("handler_panicked")
    );
    // p2's row goes just after its effect ran (the recorder saw it first).
    let until = tokio::time::Instant::now() + WAIT;
    while rig.queued().await != 0 {
        assert!(tokio::time::Instant::now() < until, "the backlog emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.tries("p1"), 2, "one try in place, one from the backlog");
}

async fn failures_that_say_nothing_about_the_event_do_not_count(db: &str) {
    let rig = Rig::start(db, 2, true).await;
    let r = &rig.recorder;
    r.paused.store(true, Ordering::SeqCst);
    r.fail("x1", 6);
    rig.handle("x", "x1").await;
    // Six failures that do not count (the peer down for everyone): two allowed tries are not
    // used up.
    eventually("six tries while paused", || r.tries("x1") >= 6).await;
    r.paused.store(false, Ordering::SeqCst);
    eventually("applied once the peer is back", || {
        r.applied_to("x") == ["x1"]
    })
    .await;
    assert!(rig.dead_letters().await.is_empty());
}

/// Each case as two tests: `sqlite_<case>` and `postgres_<case>` (a fresh database).
macro_rules! on_both_databases {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case("").await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let db = crate::common::chat::TestDb::create().await;
                    super::$case(&db.url).await;
                }
            )*
        }
    };
}

on_both_databases!(
    a_failed_event_holds_only_its_conversation,
    redeliveries_keep_their_place,
    claims_are_exclusive_and_only_of_heads,
    queued_events_are_due_only_as_heads,
    a_lost_lease_changes_nothing,
    tries_run_out_into_the_dead_letter_topic,
    a_panicking_effect_is_dead_lettered,
    a_failed_dead_letter_publish_does_not_run_the_effect_again,
    a_dead_letter_whose_removal_fails_is_not_applied_again,
    an_unreadable_row_is_dead_lettered_and_its_conversation_goes_on,
    failures_that_say_nothing_about_the_event_do_not_count,
    a_retry_later_time_is_kept,
    a_deferred_effect_runs_when_it_asked,
    two_schedulers_share_a_backlog,
    a_slow_effect_goes_to_the_backlog,
);
