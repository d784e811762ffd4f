//! Tests of the JetStream backend. The codec tests need nothing; the others need a NATS server
//! 2.10+ with JetStream at `NEXUS_TEST_NATS_URL` (default `nats://127.0.0.1:14222`) and fail
//! if it is down, unless that variable is `skip`.

use std::time::{Duration, Instant};

use super::codec::*;
use super::*;
use crate::bus::partitioner::key_in;
use crate::config::Config;

const WAIT: Duration = Duration::from_secs(30);

fn test_config() -> Option<BusConfig> {
    let url =
        std::env::var("NEXUS_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:14222".into());
    if url == "skip" {
        eprintln!("NEXUS_TEST_NATS_URL=skip: JetStream test not run");
        return None;
    }
    let mut c = Config::defaults().bus;
    c.url = url;
    c.nats.ack_wait_ms = 1500;
    c.nats.lease_ttl_ms = 2500;
    // Tests grow topics under running members and should not wait half a minute for it.
    c.nats.partitions_refresh_ms = 2000;
    Some(c)
}

async fn connect(config: &BusConfig) -> JetStreamBus {
    let tls = config.url.starts_with("tls://");
    JetStreamBus::connect(&config.url, tls, config)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "NATS at {} (set NEXUS_TEST_NATS_URL=skip to skip): {e}",
                config.url
            )
        })
}

async fn fresh_topic(bus: &JetStreamBus, partitions: u32) -> String {
    let name = format!("nexus.test.t{}", uuid::Uuid::new_v4().simple());
    bus.apply_topic(&TopicSpec {
        name: name.clone(),
        partitions,
        retention: None,
    })
    .await
    .expect("create topic");
    name
}

async fn next(sub: &mut Box<dyn Subscription>, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(d))) => Some(d),
        Ok(Some(Err(e))) => panic!("subscription error: {e}"),
        Ok(None) | Err(_) => None,
    }
}

fn seq_of(m: &Message) -> u64 {
    std::str::from_utf8(&m.payload)
        .expect("utf8")
        .rsplit(':')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("seq")
}

#[test]
fn header_values_survive_nats_framing() {
    for v in [
        "plain",
        "",
        " lead",
        "trail\t",
        "a\r\nb",
        "100% done",
        "ünïcode ok",
        "%41",
        "x%",
    ] {
        assert_eq!(unescape_value(&escape_value(v)), v, "{v:?}");
        assert!(!escape_value(v).contains(['\r', '\n']));
        assert_eq!(escape_value(v).trim(), escape_value(v), "{v:?}");
    }
    assert_eq!(
        escape_value("traceparent-00-abc"),
        "traceparent-00-abc",
        "plain values are untouched"
    );
}

#[test]
fn headers_keep_key_and_order() {
    let record = OutRecord::new("conv 1\n", "x")
        .with_header("b", "2")
        .with_header("a", "multi\nline")
        .with_header("b", "3");
    let map = encode_headers(&record).expect("encode");
    let (key, headers) = decode_headers(Some(&map));
    assert_eq!(key, "conv 1\n");
    assert_eq!(
        headers,
        vec![
            ("b".into(), "2".into()),
            ("a".into(), "multi\nline".into()),
            ("b".into(), "3".into())
        ]
    );
    assert!(encode_headers(&OutRecord::new("k", "x").with_header("bad name", "v")).is_err());
    assert!(encode_headers(&OutRecord::new("k", "x").with_header(KEY_HEADER, "v")).is_err());
}

/// Names unique and ascending come back in order without the order header; any other set
/// (descending, repeated) carries it. NATS's own names are refused: the server acts on them.
#[test]
fn order_header_only_where_the_names_do_not_give_the_order() {
    let cases: [&[(&str, &str)]; 6] = [
        &[
            ("nexus-event-type", "MessageReceived"),
            ("traceparent", "00-ab-cd-01"),
        ],
        &[("a", " padded ")],
        &[("traceparent", "t"), ("nexus-event-type", "e")],
        &[("a", "1"), ("a", "2")],
        &[("a", "1"), ("B", "2")],
        &[],
    ];
    for (i, hs) in cases.into_iter().enumerate() {
        let mut record = OutRecord::new("k", "x");
        for (n, v) in hs {
            record = record.with_header(*n, *v);
        }
        let map = encode_headers(&record).expect("encode");
        let implied = i < 2 || hs.is_empty();
        assert_eq!(map.get(ORDER_HEADER).is_none(), implied, "case {i}: {hs:?}");
        let (key, headers) = decode_headers(Some(&map));
        assert_eq!(key, "k");
        let want: Vec<(String, String)> = hs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(headers, want, "case {i}");
    }
    for name in ["Nats-Msg-Id", "nats-expected-stream", ""] {
        let record = OutRecord::new("k", "x").with_header(name, "v");
        assert!(encode_headers(&record).is_err(), "{name:?}");
    }
}

/// Records of earlier versions carry the order header whatever their names; NATS's own
/// headers, which another tool (or an earlier version) may have set, never come back.
#[test]
fn earlier_records_and_nats_own_headers_decode() {
    let mut map = async_nats::HeaderMap::new();
    map.insert(KEY_HEADER, "k");
    map.insert("a", "1");
    map.insert("b", "2");
    map.insert("nats-foo", "3");
    map.insert(ORDER_HEADER, "a b nats-foo");
    let want = vec![("a".to_string(), "1".to_string()), ("b".into(), "2".into())];
    assert_eq!(decode_headers(Some(&map)), ("k".to_string(), want.clone()));
    let mut without = async_nats::HeaderMap::new();
    for (name, value) in [
        (KEY_HEADER, "k"),
        ("b", "2"),
        ("Nats-Msg-Id", "m"),
        ("a", "1"),
    ] {
        without.insert(name, value);
    }
    assert_eq!(decode_headers(Some(&without)), ("k".to_string(), want));
}

/// Another tool's record whose order header lists this codec's own names: they do not come
/// back as headers, so the record can be copied on (dead-lettered, replayed); before, its
/// dead letter was refused on every try and held its key's lane.
#[test]
fn reserved_names_in_the_order_header_do_not_come_back() {
    let mut map = async_nats::HeaderMap::new();
    map.insert(KEY_HEADER, "k");
    map.insert("a", "1");
    map.insert(ORDER_HEADER, "nexus-bus-key a nexus-bus-headers");
    let (key, headers) = decode_headers(Some(&map));
    assert_eq!(key, "k");
    assert_eq!(headers, vec![("a".to_string(), "1".to_string())]);
    let mut copy = OutRecord::new(key, "payload");
    copy.headers = headers;
    encode_headers(&copy).expect("the copy can be published");
}

#[test]
fn names_map_one_to_one() {
    assert_eq!(stream_name("nexus.inbound.v1"), "nexus_inbound_v1");
    assert_eq!(subject("nexus.inbound.v1", 3), "nexus.inbound.v1.3");
    assert_eq!(partition_of_subject("a.b", "a.b.12"), Some(12));
    assert_eq!(partition_of_subject("a.b", "a.b.dlq.0"), None);
    assert_eq!(partition_of_subject("a.b", "a.b.01"), None);
    assert_eq!(group_key("conversation").unwrap(), "conversation");
    assert_eq!(group_key("edge.pod 1").unwrap(), "edge=2Epod=201");
    assert_ne!(group_key("a.b").unwrap(), group_key("a_b").unwrap());
    assert!(group_key("").is_err());
    assert!(validate_topic("nexus.inbound.v1").is_ok());
    for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
        assert!(validate_topic(bad).is_err(), "{bad:?}");
    }
}

/// Which streams `list_topics` takes for topics: the ones nexus's naming could have made.
#[test]
fn streams_are_topics_only_by_nexus_naming() {
    let subjects = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Created by nexus: the metadata names the topic.
    assert_eq!(
        topic_of_stream("a_b", &subjects(&["a.b.0"]), Some("a.b")).as_deref(),
        Some("a.b")
    );
    // Made by hand for a topic, partitions or a wildcard.
    assert_eq!(
        topic_of_stream("a_b", &subjects(&["a.b.0", "a.b.1"]), None).as_deref(),
        Some("a.b")
    );
    assert_eq!(
        topic_of_stream("a_b", &subjects(&["a.b.>"]), None).as_deref(),
        Some("a.b")
    );
    // Not a topic's stream: a key-value bucket, a name nexus would not give the subjects'
    // topic, subjects of two topics, none at all (a mirror).
    assert_eq!(topic_of_stream("KV_x", &subjects(&["$KV.x.>"]), None), None);
    assert_eq!(topic_of_stream("orders", &subjects(&["a.b.0"]), None), None);
    assert_eq!(
        topic_of_stream("a_b", &subjects(&["a.b.0", "a.c.0"]), None),
        None
    );
    assert_eq!(topic_of_stream("a_b", &[], None), None);
    assert_eq!(
        topic_of_stream("a_b", &subjects(&["a.b.0"]), Some("c.d")),
        None
    );
}

#[test]
fn timing_keeps_fetch_and_progress_inside_the_lease() {
    let mut c = Config::defaults().bus.nats;
    c.ack_wait_ms = 1500;
    c.lease_ttl_ms = 2500;
    let t = Timing::from_config(&c).expect("valid");
    // Right after a renewal, both are allowed; a renewal interval later (plus slack), too.
    let deadline = Instant::now() + t.lease_ttl;
    assert!(t.can_fetch(deadline) && t.can_progress(deadline));
    let later = deadline - t.renew_every - Duration::from_millis(20);
    assert!(t.can_fetch(later) && t.can_progress(later));
    // Once the lease is within ack wait of expiring, nothing may extend past it.
    assert!(!t.can_progress(Instant::now() + t.ack_wait));
    c.lease_ttl_ms = 1600;
    assert!(matches!(Timing::from_config(&c), Err(BusError::Config(_))));
}

#[tokio::test]
async fn topics_are_created_grown_and_never_shrunk() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    bus.health().await.expect("healthy");
    let topic = format!("nexus.test.t{}", uuid::Uuid::new_v4().simple());
    assert_eq!(bus.topic_info(&topic).await.expect("info"), None);
    let week = Duration::from_secs(7 * 86400);
    bus.apply_topic(&TopicSpec {
        name: topic.clone(),
        partitions: 2,
        retention: Some(week),
    })
    .await
    .expect("create");
    let info = bus.topic_info(&topic).await.expect("info").expect("exists");
    assert_eq!((info.partitions, info.retention), (2, Some(week)));
    bus.apply_topic(&TopicSpec {
        name: topic.clone(),
        partitions: 3,
        retention: None,
    })
    .await
    .expect("grow");
    let info = bus.topic_info(&topic).await.expect("info").expect("exists");
    assert_eq!((info.partitions, info.retention), (3, None));
    let shrink = bus
        .apply_topic(&TopicSpec {
            name: topic.clone(),
            partitions: 1,
            retention: None,
        })
        .await;
    assert!(matches!(shrink, Err(BusError::Conflict(_))), "{shrink:?}");
    // `a.b` and `a_b` share a stream name; the second one is refused, not merged.
    let twin = topic.replace('.', "_");
    let clash = bus
        .apply_topic(&TopicSpec {
            name: twin,
            partitions: 3,
            retention: None,
        })
        .await;
    assert!(matches!(clash, Err(BusError::Conflict(_))), "{clash:?}");
    let missing = bus
        .publish("nexus.test.missing", OutRecord::new("k", "x"))
        .await;
    assert!(
        matches!(missing, Err(BusError::UnknownTopic(_))),
        "{missing:?}"
    );
}

/// A stream made by hand that refuses a publish once a partition has a record (discard new per
/// subject, one record per subject): apply sets discard old and no per-subject limit, which the
/// server only takes with per-subject discard off, and the stream then has what nexus needs.
#[tokio::test]
async fn apply_lifts_per_subject_discard() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = format!("nexus.test.t{}", uuid::Uuid::new_v4().simple());
    bus.js
        .create_stream(jetstream::stream::Config {
            name: stream_name(&topic),
            subjects: vec![subject(&topic, 0)],
            discard: jetstream::stream::DiscardPolicy::New,
            discard_new_per_subject: true,
            max_messages_per_subject: 1,
            ..Default::default()
        })
        .await
        .expect("stream made by hand");
    let spec = TopicSpec {
        name: topic.clone(),
        partitions: 1,
        retention: None,
    };
    bus.apply_topic(&spec).await.expect("apply");
    let info = bus.topic_info(&topic).await.expect("info").expect("exists");
    assert!(
        info.settings.iter().all(TopicSetting::is_required),
        "{:?}",
        info.settings
    );
    let config = bus
        .js
        .get_stream(stream_name(&topic))
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .config
        .clone();
    assert!(!config.discard_new_per_subject, "{config:?}");
    for n in 0..2 {
        bus.publish(&topic, OutRecord::new("k", format!("k:{n}")))
            .await
            .expect("publish past the old per-subject limit");
    }
}

#[tokio::test]
async fn offsets_counts_reads_and_times_per_partition() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 3).await;
    for p in bus.partition_offsets(&topic).await.expect("offsets") {
        assert_eq!((p.low, p.high), (0, 0), "an empty topic starts at 0");
    }
    let k0 = key_in(0, 3, "a");
    let k2 = key_in(2, 3, "b");
    let mut placed = Vec::new();
    for n in 0..4u64 {
        let r = OutRecord::new(k0.clone(), format!("{k0}:{n}"))
            .with_header("nexus-event-type", "t")
            .with_header("x", "1");
        placed.push(bus.publish(&topic, r).await.expect("publish"));
        placed.push(
            bus.publish(&topic, OutRecord::new(k2.clone(), format!("{k2}:{n}")))
                .await
                .expect("publish"),
        );
    }
    // Apart by more than the millisecond resolution of the cut.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let late = bus
        .publish(&topic, OutRecord::new(k0.clone(), format!("{k0}:4")))
        .await
        .expect("publish");
    assert_eq!(
        placed[0],
        Published {
            partition: 0,
            offset: 0
        }
    );
    assert_eq!(
        placed[1],
        Published {
            partition: 2,
            offset: 1
        }
    );

    let offsets = bus.partition_offsets(&topic).await.expect("offsets");
    assert_eq!(
        offsets[0],
        PartitionOffsets {
            partition: 0,
            low: 0,
            high: late.offset + 1
        }
    );
    assert_eq!(
        offsets[2],
        PartitionOffsets {
            partition: 2,
            low: 1,
            high: 8
        }
    );
    assert_eq!(offsets[1].low, offsets[1].high, "empty partition");
    assert_eq!(
        bus.count_between(&topic, 0, offsets[0].low, offsets[0].high)
            .await
            .expect("count"),
        5
    );
    assert_eq!(
        bus.count_between(&topic, 2, 1, 5).await.expect("count"),
        2,
        "offsets 1 and 3 of partition 2"
    );
    assert_eq!(
        bus.count_between(&topic, 1, 0, 100).await.expect("count"),
        0
    );

    let read = bus.read(&topic, 0, 0, 100).await.expect("read");
    assert_eq!(
        read.iter().map(seq_of).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(read[0].key, k0);
    assert_eq!(
        read[0].headers,
        vec![
            ("nexus-event-type".into(), "t".into()),
            ("x".into(), "1".into())
        ]
    );
    assert!(read.windows(2).all(|w| w[0].offset < w[1].offset));
    let tail = bus
        .read(&topic, 0, read[2].offset, 2)
        .await
        .expect("read from");
    assert_eq!(tail.iter().map(seq_of).collect::<Vec<_>>(), vec![2, 3]);

    assert_eq!(
        bus.offset_for_time(&topic, 0, cut).await.expect("by time"),
        late.offset
    );
    assert_eq!(
        bus.offset_for_time(&topic, 2, cut).await.expect("by time"),
        offsets[2].high
    );
    assert_eq!(bus.offset_for_time(&topic, 0, 0).await.expect("by time"), 0);
    let bad = bus.read(&topic, 3, 0, 1).await;
    assert!(
        matches!(bad, Err(BusError::UnknownPartition { partition: 3, .. })),
        "{bad:?}"
    );
}

#[tokio::test]
async fn commit_moves_over_the_acked_prefix_only() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let group = "g";
    for n in 0..3 {
        bus.publish(&topic, OutRecord::new("k", format!("k:{n}")))
            .await
            .expect("publish");
    }
    let before = bus.group_positions(group, &topic).await.expect("positions");
    assert_eq!(
        before,
        vec![GroupPosition {
            partition: 0,
            committed: None,
            high: 3,
            lag: 3
        }]
    );
    let mut sub = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let d0 = next(&mut sub, WAIT).await.expect("0");
    let d1 = next(&mut sub, WAIT).await.expect("1");
    let d2 = next(&mut sub, WAIT).await.expect("2");
    assert_eq!([&d0, &d1, &d2].map(|d| d.message.offset), [0, 1, 2]);
    d2.ack().await.expect("ack 2");
    d1.ack().await.expect("ack 1");
    let p = bus.group_positions(group, &topic).await.expect("positions")[0];
    assert_eq!(
        (p.committed.unwrap_or(0), p.lag),
        (0, 3),
        "a gap keeps the commit at the gap"
    );
    d0.ack().await.expect("ack 0");
    let p = bus.group_positions(group, &topic).await.expect("positions")[0];
    assert_eq!((p.committed, p.lag), (Some(3), 0));
    let seek = bus.seek_group(group, &topic, 0, 1).await;
    assert!(
        matches!(seek, Err(BusError::Conflict(_))),
        "no seek under a live member: {seek:?}"
    );
    sub.close().await.expect("close");
    assert_eq!(bus.active_members(group, &topic).await.expect("members"), 0);
    bus.seek_group(group, &topic, 0, 1).await.expect("seek");
    let p = bus.group_positions(group, &topic).await.expect("positions")[0];
    assert_eq!((p.committed, p.lag), (Some(1), 2));
    let mut sub = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let again = next(&mut sub, WAIT).await.expect("replayed");
    assert_eq!(again.message.offset, 1);
    again.ack().await.expect("ack");
    sub.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_not_overtaken_by_its_own_redelivery() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    bus.publish(&topic, OutRecord::new("k", "k:0"))
        .await
        .expect("publish");
    let mut sub = bus
        .subscribe("g", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let d = next(&mut sub, WAIT).await.expect("first");
    // Three ack waits without an ack: `+WPI` keeps the record ours.
    let again = next(&mut sub, Duration::from_millis(config.nats.ack_wait_ms * 3)).await;
    assert!(
        again.is_none(),
        "redelivered while in flight: {:?}",
        again.map(|d| d.message.offset)
    );
    d.ack().await.expect("ack");
    let p = bus.group_positions("g", &topic).await.expect("positions")[0];
    assert_eq!(p.lag, 0);
    sub.close().await.expect("close");
}

/// A member of `group` with an in-flight bound of two, holding k:0 and k:1 (published here):
/// no permit left, so it pulls nothing more meanwhile.
async fn member_holding_two(
    bus: &JetStreamBus,
    topic: &str,
    group: &str,
) -> (Box<dyn Subscription>, [Delivery; 2]) {
    let options = SubscribeOptions {
        max_in_flight: 2,
        ..SubscribeOptions::default()
    };
    let mut sub = bus
        .subscribe(group, topic, options)
        .await
        .expect("subscribe");
    for n in 0..2 {
        bus.publish(topic, OutRecord::new("k", format!("k:{n}")))
            .await
            .expect("publish");
    }
    let held = [
        next(&mut sub, WAIT).await.expect("k:0"),
        next(&mut sub, WAIT).await.expect("k:1"),
    ];
    assert_eq!(seq_of(&held[1].message), 1);
    (sub, held)
}

/// Deliveries lost in transit to the member of `group` that holds k:0 and k:1 (its whole
/// in-flight bound, so it pulls nothing meanwhile), simulated: once its last pull request has
/// expired (a second at most), another client pulls k:2 and k:3 from its consumer (widened
/// past the member's bound) and drops them. k:4 is published behind them.
async fn lose_two_in_transit(bus: &JetStreamBus, topic: &str, group: &str) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stream = stream_name(topic);
    let name = consumer_name(&group_key(group).expect("group key"), 0);
    let info = bus
        .consumer_info(&stream, &name)
        .await
        .expect("info")
        .expect("the member's consumer");
    use async_nats::jetstream::consumer::FromConsumer;
    let mut wider = pull::Config::try_from_consumer_config(info.config).expect("pull");
    wider.max_ack_pending = 100;
    bus.js
        .update_consumer_on_stream(wider, &stream)
        .await
        .expect("widen");
    for n in 2..5 {
        bus.publish(topic, OutRecord::new("k", format!("k:{n}")))
            .await
            .expect("publish");
    }
    let thief: jetstream::consumer::PullConsumer = bus
        .js
        .get_consumer_from_stream(&name, &stream)
        .await
        .expect("consumer");
    let mut stolen = thief
        .fetch()
        .max_messages(2)
        .messages()
        .await
        .expect("fetch");
    let mut lost = Vec::new();
    while let Some(m) = stolen.next().await {
        lost.push(String::from_utf8_lossy(&m.expect("message").payload).to_string());
    }
    assert_eq!(lost, ["k:2", "k:3"], "taken from the member and dropped");
}

/// The sequence numbers of the next `n` records, each acked.
async fn acked_seqs(sub: &mut Box<dyn Subscription>, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < n {
        let d = next(sub, WAIT)
            .await
            .unwrap_or_else(|| panic!("only {got:?} came"));
        got.push(seq_of(&d.message));
        d.ack().await.expect("ack");
    }
    got
}

/// Deliveries made to a member that never reached it (simulated: another client pulls two
/// records from the member's consumer and drops them) are noticed by the gap in the consumer
/// sequence: the member restarts the partition at its ack floor, so the lost records come
/// first, in order, instead of after the ack wait behind a later record of their key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_lost_in_transit_come_again_in_order() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let (mut sub, held) = member_holding_two(&bus, &topic, "gap").await;
    lose_two_in_transit(&bus, &topic, "gap").await;
    for d in held {
        d.ack().await.expect("ack");
    }
    // The lost records come first. Without the restart, k:4 would come at once and k:2 and
    // k:3 only after the ack wait; the order tells the two apart, so no time bound is asserted
    // (a loaded machine may take longer than the ack wait to restart the partition).
    assert_eq!(acked_seqs(&mut sub, 3).await, [2, 3, 4]);
    sub.close().await.expect("close");
}

/// A member handing its partition over while the server delivered more than reached it
/// (simulated as above: another client takes two records from its consumer) does not release
/// it as clean: it restarts the partition at its ack floor first, so the next owner gets the
/// lost records first, in order, instead of the later record first and them after the ack
/// wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_after_lost_deliveries_restarts_at_the_ack_floor() {
    let Some(mut config) = test_config() else {
        return;
    };
    // An ack wait far beyond the hand-over: redelivered by it, the lost records could not be
    // told from records restarted at the floor.
    config.nats.ack_wait_ms = 20_000;
    config.nats.lease_ttl_ms = 30_000;
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let (a, held) = member_holding_two(&bus, &topic, "lost").await;
    lose_two_in_transit(&bus, &topic, "lost").await;
    // The leave drains first (no more pulls), then waits for the held records.
    let leaving = tokio::spawn(async move { a.close().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for d in held {
        d.ack().await.expect("ack");
    }
    leaving.await.expect("join").expect("close a");
    // With a wider in-flight bound than a's (the consumer takes it): k:4 is not held back by
    // the two records pending at the thief.
    let mut b = bus
        .subscribe("lost", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe b");
    assert_eq!(
        acked_seqs(&mut b, 3).await,
        [2, 3, 4],
        "the lost records first, in order"
    );
    b.close().await.expect("close b");
}

/// What a [`LossyLink`] does to the deliveries of one consumer.
#[derive(Default)]
struct LossPlan {
    /// Reply-subject prefix of the deliveries concerned (`$JS.ACK.<stream>.<consumer>.`);
    /// `None`: everything passes.
    target: Option<String>,
    /// Deliveries let through before any is lost.
    pass: usize,
    /// Deliveries lost after those.
    lose: usize,
    /// A status written to the inbox of the last lost delivery right after it: how its pull
    /// request ends for the member.
    status: Option<&'static str>,
    /// Write `status` after every lost delivery, not only the last.
    status_each: bool,
    /// Payloads of the deliveries lost so far.
    lost: Vec<String>,
}

/// A message the server sent (`MSG` or `HMSG`).
struct ServerMsg<'a> {
    subject: &'a str,
    sid: &'a str,
    reply: Option<&'a str>,
    payload: &'a [u8],
}

impl LossPlan {
    /// `None` to pass the message on; else what the member gets instead (maybe nothing).
    fn lose(&mut self, m: &ServerMsg) -> Option<Vec<u8>> {
        let concerned = match (&self.target, m.reply) {
            (Some(t), Some(r)) => r.starts_with(t.as_str()),
            _ => false,
        };
        if !concerned || self.lose == 0 {
            return None;
        }
        if self.pass > 0 {
            self.pass -= 1;
            return None;
        }
        self.lose -= 1;
        self.lost
            .push(String::from_utf8_lossy(m.payload).into_owned());
        let status = self
            .status
            .filter(|_| self.lose == 0 || self.status_each)
            .map(|s| {
                let head = format!("NATS/1.0 {s}\r\n\r\n");
                let n = head.len();
                format!("HMSG {} {} {n} {n}\r\n{head}\r\n", m.subject, m.sid).into_bytes()
            });
        Some(status.unwrap_or_default())
    }
}

/// The length of the first whole protocol operation the server sent in `buf`, with the message
/// if it is one; `None` while incomplete.
fn server_op(buf: &[u8]) -> Option<(usize, Option<ServerMsg<'_>>)> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&buf[..eol]).expect("protocol line");
    let args: Vec<&str> = line.split_ascii_whitespace().collect();
    // MSG <subject> <sid> [reply] <size>, HMSG <subject> <sid> [reply] <header size> <size>
    let fixed = match args.first().map(|op| op.to_ascii_uppercase()).as_deref() {
        Some("MSG") => 4,
        Some("HMSG") => 5,
        _ => return Some((eol + 2, None)),
    };
    let size: usize = args[args.len() - 1].parse().expect("message size");
    let end = eol + 2 + size + 2;
    if buf.len() < end {
        return None;
    }
    let header_size: usize = match fixed {
        5 => args[args.len() - 2].parse().expect("header size"),
        _ => 0,
    };
    Some((
        end,
        Some(ServerMsg {
            subject: args[1],
            sid: args[2],
            reply: (args.len() > fixed).then(|| args[3]),
            payload: &buf[eol + 2 + header_size..eol + 2 + size],
        }),
    ))
}

/// A loopback TCP proxy between a member's NATS connection and the server that loses chosen
/// deliveries on the way (see [`LossPlan`]): the server counts them delivered, the member never
/// reads them, the connection stays up. Stops when dropped.
struct LossyLink {
    url: String,
    plan: Arc<Mutex<LossPlan>>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyLink {
    /// A link to the server of `url`; `None` (test not run) unless it is plain `nats://`: the
    /// link reads the protocol.
    async fn start(url: &str) -> Option<Self> {
        let Some(server) = url.strip_prefix("nats://").map(str::to_string) else {
            eprintln!("{url}: the lossy link needs a plain nats:// server; test not run");
            return None;
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link");
        let url = format!("nats://{}", listener.local_addr().expect("link address"));
        let plan = Arc::new(Mutex::new(LossPlan::default()));
        let shared = plan.clone();
        let task = tokio::spawn(async move {
            // Dropped with the accept loop: the relays end with the link.
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(upstream) = tokio::net::TcpStream::connect(&server).await {
                    relays.spawn(relay(client, upstream, shared.clone()));
                }
            }
        });
        Some(LossyLink { url, plan, task })
    }

    /// From now on: lets `pass` deliveries whose reply subject starts with `target` through,
    /// loses the next `lose`, and writes `status` to the pull request's inbox in place of the
    /// last one lost.
    fn arm(&self, target: String, pass: usize, lose: usize, status: Option<&'static str>) {
        *plan_of(&self.plan) = LossPlan {
            target: Some(target),
            pass,
            lose,
            status,
            status_each: false,
            lost: Vec::new(),
        };
    }

    /// From now on: loses every delivery whose reply subject starts with `target`, each
    /// followed by `status` in its pull request's inbox.
    fn arm_every(&self, target: String, status: &'static str) {
        *plan_of(&self.plan) = LossPlan {
            target: Some(target),
            pass: 0,
            lose: usize::MAX,
            status: Some(status),
            status_each: true,
            lost: Vec::new(),
        };
    }

    /// The payloads lost, once `n` were (or after [`WAIT`]).
    async fn lost(&self, n: usize) -> Vec<String> {
        let until = Instant::now() + WAIT;
        loop {
            let lost = plan_of(&self.plan).lost.clone();
            if lost.len() >= n || Instant::now() > until {
                return lost;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn plan_of(plan: &Mutex<LossPlan>) -> std::sync::MutexGuard<'_, LossPlan> {
    plan.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies one connection both ways, the server's messages through the plan, until either side
/// closes.
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    plan: Arc<Mutex<LossPlan>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let upstream = tokio::io::copy(&mut client_rx, &mut server_tx);
    let downstream = async {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match server_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            let mut out = Vec::new();
            let mut taken = 0;
            while let Some((len, msg)) = server_op(&buf[taken..]) {
                match msg.and_then(|m| plan_of(&plan).lose(&m)) {
                    Some(instead) => out.extend(instead),
                    None => out.extend_from_slice(&buf[taken..taken + len]),
                }
                taken += len;
            }
            buf.drain(..taken);
            if client_tx.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// A topic of one partition, a direct connection (the test's) and a member's connection
/// through a [`LossyLink`], with an ack wait far beyond the test's waits: only a restart at
/// the ack floor brings a lost record back within them. `None` when the test is not run.
async fn lossy_setup() -> Option<(JetStreamBus, LossyLink, JetStreamBus, String)> {
    let mut config = test_config()?;
    config.nats.ack_wait_ms = 60_000;
    config.nats.lease_ttl_ms = 90_000;
    let bus = connect(&config).await;
    let link = LossyLink::start(&config.url).await?;
    let member = connect(&BusConfig {
        url: link.url.clone(),
        ..config
    })
    .await;
    let topic = fresh_topic(&bus, 1).await;
    Some((bus, link, member, topic))
}

/// Publishes record `n` of keys `a` (even) and `b` (odd), its payload `<key>:<n>`.
async fn publish_ab(bus: &JetStreamBus, topic: &str, n: u64) {
    let key = if n.is_multiple_of(2) { "a" } else { "b" };
    bus.publish(topic, OutRecord::new(key, format!("{key}:{n}")))
        .await
        .expect("publish");
}

/// The reply-subject prefix of the deliveries of `group`'s consumer on partition 0.
fn deliveries_of(topic: &str, group: &str) -> String {
    let name = consumer_name(&group_key(group).expect("group key"), 0);
    format!("$JS.ACK.{}.{name}.", stream_name(topic))
}

/// Takes the records from `sub` and acks them until `last` came: they must be the partition's
/// records in order from at most `lost` on (a restart at the ack floor starts there, or before
/// it when the server had not applied the last acks yet: acked records above the floor may
/// come again, at-least-once), so every record is handled and none of a key before an earlier
/// one of it. Then nothing more comes.
async fn handled_from_the_floor(sub: &mut Box<dyn Subscription>, lost: u64, last: u64) {
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let d = next(sub, WAIT).await.unwrap_or_else(|| {
            panic!("only {got:?} came: without a restart the lost record waits for the ack wait")
        });
        got.push(seq_of(&d.message));
        d.ack().await.expect("ack");
    }
    assert!(got[0] <= lost, "the lost record {lost} never came: {got:?}");
    assert_eq!(got, (got[0]..=last).collect::<Vec<_>>(), "in order, once");
    let more = next(sub, Duration::from_secs(1)).await;
    assert!(
        more.is_none(),
        "delivered again: {:?}",
        more.map(|d| seq_of(&d.message))
    );
}

/// Deliveries lost with a pull request that then failed (in a cluster: the consumer's leader
/// changes, deliveries the old one made never arrive, and the pending request ends with
/// `409 Leadership Change`): the member looks the consumer up again, sees that it delivered
/// past the last record read, and restarts the partition at its ack floor once what it handed
/// out is done. So the lost record comes at once and before the later records of its key,
/// not after the ack wait behind them. A link between member and server loses the delivery and
/// answers the request with that status in its place (a single server sends it on no event a
/// test can cause; a broken connection ends a pull request without error, and the next one
/// shows the gap, as in `deliveries_lost_in_transit_come_again_in_order`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_lost_with_a_failed_pull_come_again_in_order() {
    let Some((bus, link, member, topic)) = lossy_setup().await else {
        return;
    };
    let options = SubscribeOptions {
        max_in_flight: 2,
        ..SubscribeOptions::default()
    };
    let mut sub = member
        .subscribe("relookup", &topic, options)
        .await
        .expect("subscribe");
    for n in 0..2 {
        publish_ab(&bus, &topic, n).await;
    }
    let a0 = next(&mut sub, WAIT).await.expect("a:0");
    let b1 = next(&mut sub, WAIT).await.expect("b:1");
    assert_eq!([seq_of(&a0.message), seq_of(&b1.message)], [0, 1]);
    // Both slots taken: no pull request is out while the next records are published.
    let (stream, name) = (
        stream_name(&topic),
        consumer_name(&group_key("relookup").expect("group key"), 0),
    );
    let before = bus.consumer_info(&stream, &name).await.expect("info");
    let before = before.expect("the group's consumer");
    link.arm(
        deliveries_of(&topic, "relookup"),
        0,
        1,
        Some("409 Leadership Change"),
    );
    for n in 2..6 {
        publish_ab(&bus, &topic, n).await;
    }
    // One slot frees: the member asks for one record, a:2, which the link loses.
    b1.ack().await.expect("ack b:1");
    assert_eq!(link.lost(1).await, ["a:2"]);
    // Nothing while a:0 is handled: the restart waits for it (a restart before its ack would
    // bring b:1 again at once, and a:2, its key's next, beside it).
    let early = next(&mut sub, Duration::from_secs(2)).await;
    assert!(
        early.is_none(),
        "handed out while a:0 was handled and a:2 lost: {:?}",
        early.map(|d| seq_of(&d.message))
    );
    a0.ack().await.expect("ack a:0");
    handled_from_the_floor(&mut sub, 2, 5).await;
    let after = bus.consumer_info(&stream, &name).await.expect("info");
    let after = after.expect("the group's consumer");
    assert_ne!(after.created, before.created, "restarted at the ack floor");
    assert_eq!(
        (after.num_ack_pending, after.delivered.stream_sequence),
        (0, 6)
    );
    sub.close().await.expect("close");
}

/// A delivery lost inside a pull request that goes on (the link drops it and passes the next
/// ones; `deliveries_lost_in_transit_come_again_in_order` loses records between two requests):
/// the records after the gap in that request are not handed out, since they would overtake the
/// lost one; once what was handed out is done the partition restarts at its ack floor, and the
/// lost record comes first again, then those after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_inside_a_pull_request_comes_again_before_the_rest_of_it() {
    let Some((bus, link, member, topic)) = lossy_setup().await else {
        return;
    };
    let options = SubscribeOptions {
        max_in_flight: 4,
        ..SubscribeOptions::default()
    };
    let mut sub = member
        .subscribe("gap", &topic, options)
        .await
        .expect("subscribe");
    publish_ab(&bus, &topic, 0).await;
    let a0 = next(&mut sub, WAIT).await.expect("a:0");
    // Three slots free: one pull request takes b:1, a:2 and b:3 (published in a row while it is
    // out; should it expire in between, the gap shows in the next one, to the same effect).
    link.arm(deliveries_of(&topic, "gap"), 1, 1, None);
    for n in 1..4 {
        publish_ab(&bus, &topic, n).await;
    }
    let b1 = next(&mut sub, WAIT).await.expect("b:1");
    assert_eq!(seq_of(&b1.message), 1);
    assert_eq!(link.lost(1).await, ["a:2"]);
    let early = next(&mut sub, Duration::from_secs(2)).await;
    assert!(
        early.is_none(),
        "handed out past the lost a:2: {:?}",
        early.map(|d| seq_of(&d.message))
    );
    b1.ack().await.expect("ack b:1");
    a0.ack().await.expect("ack a:0");
    handled_from_the_floor(&mut sub, 2, 3).await;
    sub.close().await.expect("close");
}

/// The reply-subject prefix of every delivery from the topic's stream: a ranged read's
/// ephemeral consumers have names of the server's choosing.
fn deliveries_on(topic: &str) -> String {
    format!("$JS.ACK.{}.", stream_name(topic))
}

/// A ranged read whose first fetch comes back empty while records are pending (the link loses
/// the first delivery and ends the pull with `404 No Messages` in its place, so the read's
/// consumer has also moved past that record) reads on from a new consumer at the next record
/// not read: every record, in order, none skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_first_fetch_comes_back_empty_reads_on() {
    let Some((bus, link, reader, topic)) = lossy_setup().await else {
        return;
    };
    for n in 0..6 {
        publish_ab(&bus, &topic, n).await;
    }
    link.arm(deliveries_on(&topic), 0, 1, Some("404 No Messages"));
    let read = tokio::time::timeout(WAIT, reader.read(&topic, 0, 0, 100))
        .await
        .expect("the read ends")
        .expect("read");
    assert_eq!(link.lost(1).await, ["a:0"]);
    assert_eq!(
        read.iter().map(seq_of).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
}

/// A delivery lost inside a fetch (the server counts it delivered, the read never gets it):
/// the read sees the gap in the consumer's delivery numbers, stops taking that fetch's records
/// there, and reads on from the lost record, so it neither skips it nor waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_inside_a_read_is_fetched_again() {
    let Some((bus, link, reader, topic)) = lossy_setup().await else {
        return;
    };
    for n in 0..6 {
        publish_ab(&bus, &topic, n).await;
    }
    link.arm(deliveries_on(&topic), 2, 1, None);
    let read = tokio::time::timeout(WAIT, reader.read(&topic, 0, 0, 100))
        .await
        .expect("the read ends")
        .expect("read");
    assert_eq!(link.lost(1).await, ["a:2"]);
    assert_eq!(
        read.iter().map(seq_of).collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
}

/// Fetches that keep coming back empty while records are pending end the read with
/// `ReadIncomplete`, naming the partition, where the read stood and what was pending, rather
/// than an empty answer that would read as the end of the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_keeps_getting_nothing_fails_saying_what_is_pending() {
    let Some((bus, link, reader, topic)) = lossy_setup().await else {
        return;
    };
    for n in 0..4 {
        publish_ab(&bus, &topic, n).await;
    }
    let second = bus.read(&topic, 0, 0, 2).await.expect("read")[1].offset;
    link.arm_every(deliveries_on(&topic), "404 No Messages");
    let err = tokio::time::timeout(WAIT, reader.read(&topic, 0, second, 100))
        .await
        .expect("the read ends")
        .expect_err("nothing can be fetched");
    let BusError::ReadIncomplete {
        partition,
        offset,
        pending,
        ..
    } = &err
    else {
        panic!("{err}");
    };
    assert_eq!((*partition, *offset, *pending), (0, second, 3), "{err}");
    assert!(err.is_transient(), "{err}");
}

/// A lease renewal the server applied but whose reply was lost (simulated: the member's own id
/// written again behind its back) does not cost the member its partition: it takes the newer
/// revision as its own and goes on renewing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_reply_was_lost_keeps_the_lease() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    bus.publish(&topic, OutRecord::new("k", "k:0"))
        .await
        .expect("publish");
    let mut sub = bus
        .subscribe("g", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    next(&mut sub, WAIT)
        .await
        .expect("first")
        .ack()
        .await
        .expect("ack");
    let kv = bus
        .js
        .get_key_value(codec::lease_bucket(&codec::stream_name(&topic)))
        .await
        .expect("lease bucket");
    let key = codec::lease_key(&codec::group_key("g").expect("group key"), 0);
    let lease = kv.entry(&key).await.expect("read").expect("a lease");
    let written = kv.put(&key, lease.value.clone()).await.expect("put");
    // Two renewal periods: a member that kept the lease has renewed past our write.
    tokio::time::sleep(Duration::from_millis(config.nats.lease_ttl_ms * 3 / 5)).await;
    let now = kv.entry(&key).await.expect("read").expect("still leased");
    assert_eq!(now.value, lease.value, "another holder");
    assert!(
        now.revision > written,
        "the member stopped renewing (lease given up): revision {} after our {written}",
        now.revision
    );
    bus.publish(&topic, OutRecord::new("k", "k:1"))
        .await
        .expect("publish");
    assert!(next(&mut sub, WAIT).await.is_some(), "consumption goes on");
    sub.close().await.expect("close");
}

/// A member whose renewals go unanswered (here: its lease bucket is gone, so every renewal
/// fails) handles nothing it holds once the lease's deadline passed: the lease may have expired
/// and a next owner restarted at the ack floor, which gets the dropped records in order.
/// Before the deadline its records are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_held_past_an_unrenewed_lease_are_revoked() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    for i in 0..3 {
        bus.publish(&topic, OutRecord::new("k", format!("k:{i}")))
            .await
            .expect("publish");
    }
    let mut sub = bus
        .subscribe("g", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next(&mut sub, WAIT).await.expect("a record"));
    }
    assert!(held.iter().all(|d| !d.revoked()), "held under a live lease");
    bus.js
        .delete_key_value(codec::lease_bucket(&codec::stream_name(&topic)))
        .await
        .expect("delete the lease bucket");
    tokio::time::sleep(Duration::from_millis(config.nats.lease_ttl_ms + 500)).await;
    assert!(
        held.iter().all(|d| d.revoked()),
        "records handled past the lease's deadline"
    );
    // Dropped unhandled, they come to the next owner (this one's leases are gone with the
    // bucket, which the next member's join creates again) first and in order.
    drop(held);
    let _ = sub.close().await;
    let mut next_owner = bus
        .subscribe("g", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe again");
    for i in 0..3 {
        let d = next(&mut next_owner, WAIT).await.expect("a record again");
        assert_eq!(d.message.payload.as_ref(), format!("k:{i}").as_bytes());
        d.ack().await.expect("ack");
    }
    next_owner.close().await.expect("close");
}

/// A clean hand-over (the old member closes) gives the next member what was left unacked, and
/// nothing the old member acked: the restart at the ack floor is for a member that died.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_hand_over_redelivers_only_what_was_not_acked() {
    let Some(mut config) = test_config() else {
        return;
    };
    // The release's mark lives as long as a lease: long enough for the next member to join on
    // a loaded machine.
    config.nats.lease_ttl_ms = 15_000;
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let group = "clean";
    for n in 0..10u64 {
        bus.publish(&topic, OutRecord::new(format!("k{n}"), format!("{n}")))
            .await
            .expect("publish");
    }
    let mut a = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe a");
    let mut first = None;
    for _ in 0..10 {
        let d = next(&mut a, WAIT).await.expect("a receives");
        if d.message.offset == 0 {
            first = Some(d);
        } else {
            d.ack().await.expect("ack");
        }
    }
    drop(first.expect("offset 0"));
    a.close().await.expect("close a");
    let mut b = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe b");
    let again = next(&mut b, WAIT).await.expect("the unacked record");
    assert_eq!(again.message.offset, 0);
    again.ack().await.expect("ack");
    let more = next(&mut b, Duration::from_millis(1_500)).await;
    assert!(
        more.is_none(),
        "an acked record came again: {:?}",
        more.map(|d| d.message.offset)
    );
    b.close().await.expect("close b");
}

/// A record of a partition being handed over reads as revoking from the start of the drain,
/// not only once the partition is gone: one not started yet, or waiting between tries, is
/// then dropped and NAKed back, and the hand-over does not wait the drain timeout for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_draining_partition_are_revoking_before_they_are_revoked() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 2).await;
    let group = "draining";
    for p in 0..2 {
        bus.publish(&topic, OutRecord::new(key_in(p, 2, "d"), format!("{p}")))
            .await
            .expect("publish");
    }
    let mut a = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe a");
    let mut held = vec![
        next(&mut a, WAIT).await.expect("a receives"),
        next(&mut a, WAIT).await.expect("a receives"),
    ];
    assert!(held.iter().all(|d| !d.revoking()));
    let mut b = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe b");
    // One partition goes to b: a drains it, its record held here (the drain timeout is 10 s).
    let until = Instant::now() + WAIT;
    let given = loop {
        if let Some(i) = held.iter().position(|d| d.revoking()) {
            break i;
        }
        assert!(Instant::now() < until, "no partition handed over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let d = held.swap_remove(given);
    assert!(
        !d.revoked(),
        "revoking only once the partition was released"
    );
    let partition = d.message.partition;
    drop(d);
    let again = next(&mut b, WAIT).await.expect("b gets the dropped record");
    assert_eq!(again.message.partition, partition);
    again.ack().await.expect("ack");
    for d in held {
        assert!(!d.revoking(), "a's other partition stays a's");
        d.ack().await.expect("ack");
    }
    b.close().await.expect("close b");
    a.close().await.expect("close a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_share_partitions_and_a_crashed_members_records_come_back_in_order() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 2).await;
    let group = "crash";
    let keys = [key_in(0, 2, "c"), key_in(1, 2, "c")];
    for n in 0..10u64 {
        for k in &keys {
            bus.publish(&topic, OutRecord::new(k.clone(), format!("{k}:{n}")))
                .await
                .expect("publish");
        }
    }
    // Member A runs on its own runtime and connection, takes records without acking, then the
    // runtime is torn down: a crash, no hand-over.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<(u32, u64)>>();
    let (topic_a, config_a) = (topic.clone(), config.clone());
    let crashed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let bus = connect(&config_a).await;
            let mut sub = bus
                .subscribe(group, &topic_a, SubscribeOptions::default())
                .await
                .expect("subscribe a");
            let mut got = Vec::new();
            let mut held = Vec::new();
            while got.len() < 6 {
                let d = next(&mut sub, WAIT).await.expect("a receives");
                got.push((d.message.partition, seq_of(&d.message)));
                // Ack the first two of each partition, hold the rest.
                if seq_of(&d.message) < 2 {
                    d.ack().await.expect("ack");
                } else {
                    held.push(d);
                }
            }
            tx.send(got).expect("report");
            std::mem::forget(held);
            std::mem::forget(sub);
        });
        rt.shutdown_background();
    });
    let a_got = rx.recv_timeout(WAIT).expect("member a ran");
    crashed.join().expect("member a thread");
    assert!(!a_got.is_empty());

    let mut b = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe b");
    let mut c = bus
        .subscribe(group, &topic, SubscribeOptions::default())
        .await
        .expect("subscribe c");
    let deadline = Instant::now() + WAIT;
    let mut seen: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut by_member = [0usize; 2];
    while seen.iter().any(|s| s.last() != Some(&9)) {
        assert!(
            Instant::now() < deadline,
            "not everything came back: {seen:?}"
        );
        for (i, sub) in [&mut b, &mut c].into_iter().enumerate() {
            if let Some(d) = next(sub, Duration::from_millis(100)).await {
                seen[d.message.partition as usize].push(seq_of(&d.message));
                by_member[i] += 1;
                d.ack().await.expect("ack");
            }
        }
    }
    for (p, s) in seen.iter().enumerate() {
        // Partition p resumes at the first record A did not ack, in order, nothing skipped.
        let acked = a_got
            .iter()
            .filter(|(ap, n)| *ap == p as u32 && *n < 2)
            .count() as u64;
        assert_eq!(s, &(acked..10).collect::<Vec<_>>(), "partition {p}");
    }
    // The two members share the partitions. One of them may have taken both and drained the
    // twenty records before the other's heartbeat showed (a loaded machine): fair share comes
    // a renewal period or two later, so records keep coming until both members had some.
    let mut n = 10u64;
    while by_member[0] == 0 || by_member[1] == 0 {
        assert!(
            Instant::now() < deadline + WAIT,
            "both members work: {by_member:?}"
        );
        for k in &keys {
            bus.publish(&topic, OutRecord::new(k.clone(), format!("{k}:{n}")))
                .await
                .expect("publish");
        }
        n += 1;
        for (i, sub) in [&mut b, &mut c].into_iter().enumerate() {
            while let Some(d) = next(sub, Duration::from_millis(100)).await {
                by_member[i] += 1;
                d.ack().await.expect("ack");
            }
        }
    }
    b.close().await.expect("close b");
    c.close().await.expect("close c");
}

/// Publishes that waited for a shared flush are on the socket: tearing the runtime down right
/// after loses none of them (what acks rely on).
#[tokio::test]
async fn shared_flushes_cover_every_publish_queued_before_them() {
    let Some(config) = test_config() else { return };
    const N: usize = 500;
    let subject = format!("nexus.test.flush.{}", uuid::Uuid::new_v4().simple());
    let reader = async_nats::connect(&config.url).await.expect("connect");
    let mut sub = reader.subscribe(subject.clone()).await.expect("subscribe");
    reader.flush().await.expect("flush subscription");
    let (url, subj) = (config.url.clone(), subject.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let client = async_nats::connect(&url).await.expect("connect");
            let flusher = super::flush::Flusher::start(client.clone());
            let sends = (0..N).map(|i| {
                let (client, flusher, subj) = (client.clone(), flusher.clone(), subj.clone());
                async move {
                    client
                        .publish(subj, i.to_string().into())
                        .await
                        .expect("publish");
                    flusher.flush().await.expect("flush");
                }
            });
            futures::future::join_all(sends).await;
        });
        // A crash right after the last flush returned.
        rt.shutdown_background();
    })
    .join()
    .expect("publisher thread");
    let mut got = std::collections::HashSet::new();
    while got.len() < N {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(m)) => {
                got.insert(String::from_utf8_lossy(&m.payload).to_string());
            }
            _ => break,
        }
    }
    assert_eq!(got.len(), N, "publishes lost after their flush returned");
}

/// Deletes every consumer of a stream (in a fresh topic: only the tail's).
async fn delete_consumers(bus: &JetStreamBus, stream: &str) -> usize {
    let s = bus.js.get_stream(stream).await.expect("stream");
    let names: Vec<String> = s
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(|n| n.expect("consumer name"))
        .collect();
    for n in &names {
        bus.js
            .delete_consumer_from_stream(n, stream)
            .await
            .expect("delete consumer");
    }
    names.len()
}

/// A tail whose consumer disappears (server restart, expiry) goes on where it was: before its
/// first record it does not start over from the stream's beginning, after it nothing repeats.
#[tokio::test]
async fn a_tail_whose_consumer_is_lost_goes_on_where_it_was() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 2).await;
    let stream = stream_name(&topic);
    let publish = |seq: u64| {
        let (bus, topic) = (&bus, &topic);
        async move {
            bus.publish(
                topic,
                OutRecord::new(format!("k{}", seq % 3), seq.to_string()),
            )
            .await
            .expect("publish");
        }
    };
    for seq in 0..5 {
        publish(seq).await;
    }
    let mut tail = bus.tail(&topic).await.expect("tail");
    // Round 1 loses the consumer before its first record, round 2 after records went out.
    for (round, (consumer, what)) in [
        ("the tail's consumer", "nothing from before the tail"),
        (
            "the recreated consumer",
            "nothing repeated, nothing skipped",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(delete_consumers(&bus, &stream).await, 1, "{consumer}");
        let from = 5 * (round as u64 + 1);
        for seq in from..from + 5 {
            publish(seq).await;
        }
        let mut got = Vec::new();
        while got.len() < 5 {
            let d = next(&mut tail, Duration::from_secs(60))
                .await
                .expect("a record");
            got.push(seq_of(&d.message));
        }
        got.sort_unstable();
        assert_eq!(got, (from..from + 5).collect::<Vec<_>>(), "{what}");
    }
    assert!(next(&mut tail, Duration::from_millis(500)).await.is_none());
    tail.close().await.expect("close");
}

fn latest() -> SubscribeOptions {
    SubscribeOptions {
        start: StartFrom::Latest,
        ..SubscribeOptions::default()
    }
}

/// Sets the stream's consumer limit (the server accepts one below the current count: existing
/// consumers stay, new ones are refused).
async fn set_max_consumers(bus: &JetStreamBus, stream: &str, max: i64) {
    let info = bus
        .api::<serde_json::Value>(format!("STREAM.INFO.{stream}"), &json!({}))
        .await
        .ok()
        .expect("stream info");
    let mut config = info["config"].clone();
    config["max_consumers"] = json!(max);
    bus.api::<serde_json::Value>(format!("STREAM.UPDATE.{stream}"), &config)
        .await
        .ok()
        .expect("stream update");
}

/// A restart at the ack floor whose delete went through but whose creates all failed (here the
/// stream's consumer limit, lowered meanwhile, is reached) leaves the floor behind: once the
/// consumer can be created again it starts there, not at the group's start, which for a group
/// at `latest` would skip everything the dead member left unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_creates_all_fail_keeps_the_floor() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let stream = stream_name(&topic);
    let group = "floor";
    // Member A joins at `latest`, gets k:0..9, acks k:0..2 and dies holding the rest.
    let (topic_a, config_a) = (topic.clone(), config.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let bus = connect(&config_a).await;
            let mut sub = bus
                .subscribe(group, &topic_a, latest())
                .await
                .expect("subscribe a");
            for n in 0..10u64 {
                bus.publish(&topic_a, OutRecord::new("k", format!("k:{n}")))
                    .await
                    .expect("publish");
            }
            let mut held = Vec::new();
            for n in 0..10u64 {
                let d = next(&mut sub, WAIT).await.expect("a receives");
                assert_eq!(seq_of(&d.message), n);
                if n < 3 {
                    d.ack().await.expect("ack");
                } else {
                    held.push(d);
                }
            }
            std::mem::forget(held);
            std::mem::forget(sub);
        });
        rt.shutdown_background();
    })
    .join()
    .expect("member a");
    // A consumer that is not the group's takes the one slot the stream is lowered to: the
    // group's consumer, once deleted, cannot be created again.
    bus.js
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("blocker".into()),
                filter_subject: subject(&topic, 0),
                ..Default::default()
            },
            &stream,
        )
        .await
        .expect("blocker");
    set_max_consumers(&bus, &stream, 1).await;
    let mut b = bus
        .subscribe(group, &topic, latest())
        .await
        .expect("subscribe b");
    // B takes the partition once A's lease expired and restarts its consumer at the floor:
    // the delete goes through, every create is refused.
    let name = consumer_name(&group_key(group).expect("group key"), 0);
    let deadline = Instant::now() + WAIT;
    while bus
        .consumer_info(&stream, &name)
        .await
        .expect("info")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the restart never deleted the consumer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each refusal is answered at once: the restart has long given up (its worker ended, the
    // lease is left to expire) when the limit goes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        bus.consumer_info(&stream, &name)
            .await
            .expect("info")
            .is_none(),
        "created despite the limit"
    );
    set_max_consumers(&bus, &stream, -1).await;
    let mut got = Vec::new();
    while got.len() < 7 {
        let d = next(&mut b, WAIT)
            .await
            .unwrap_or_else(|| panic!("what A left unacked never came, got {got:?}"));
        got.push(seq_of(&d.message));
        d.ack().await.expect("ack");
    }
    assert_eq!(got, (3..10).collect::<Vec<_>>(), "from the floor, in order");
    let more = next(&mut b, Duration::from_millis(1_500)).await;
    assert!(
        more.is_none(),
        "more came: {:?}",
        more.map(|d| d.message.offset)
    );
    let marks = bus
        .js
        .get_key_value(groups_bucket(&stream))
        .await
        .expect("group-state bucket");
    let mark = marks
        .entry(restart_key(&group_key(group).expect("group key"), 0))
        .await
        .expect("read mark");
    assert!(
        mark.is_none_or(|e| e.operation != kv::Operation::Put),
        "the mark outlived its consumer's creation"
    );
    b.close().await.expect("close b");
    bus.js
        .delete_consumer_from_stream("blocker", &stream)
        .await
        .expect("delete blocker");
}

/// Records published to a partition added while a group at `latest` runs, before the group
/// has a consumer on it, are delivered: all of them came after the group's start. The same
/// holds for a partition added while the group had no member, whose consumer the next member
/// creates at its join; a group new on the grown topic still starts at its end on every
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_added_under_a_group_are_read_from_their_beginning() {
    let Some(config) = test_config() else { return };
    let bus = connect(&config).await;
    let topic = fresh_topic(&bus, 1).await;
    let stream = stream_name(&topic);
    let group = "grow";
    let gkey = group_key(group).expect("group key");
    let grow = |partitions: u32| {
        let (bus, topic) = (&bus, &topic);
        async move {
            bus.apply_topic(&TopicSpec {
                name: topic.clone(),
                partitions,
                retention: None,
            })
            .await
            .expect("grow");
        }
    };
    let publish = |key: String, n: u64| {
        let (bus, topic) = (&bus, &topic);
        async move {
            bus.publish(topic, OutRecord::new(key.clone(), format!("{key}:{n}")))
                .await
                .expect("publish");
        }
    };
    publish("before".into(), 0).await;
    let mut a = bus
        .subscribe(group, &topic, latest())
        .await
        .expect("subscribe a");
    publish("k".into(), 0).await;
    let d = next(&mut a, WAIT).await.expect("a record after the join");
    assert_eq!(d.message.key, "k", "latest skipped what came before");
    d.ack().await.expect("ack");

    // Grown under the running member; partition 1 gets records before the group takes it up.
    grow(2).await;
    let k1 = key_in(1, 2, "added");
    for n in 0..3 {
        publish(k1.clone(), n).await;
    }
    let early = bus
        .consumer_info(&stream, &consumer_name(&gkey, 1))
        .await
        .expect("info");
    if early.is_some() {
        // The member re-read the partition count between the grow and the publishes (a
        // window of milliseconds in its refresh period): this round proves less.
        eprintln!("partition 1 was taken up before its records were published");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let d = next(&mut a, WAIT)
            .await
            .unwrap_or_else(|| panic!("partition 1's records never came, got {got:?}"));
        assert_eq!(d.message.partition, 1, "{:?}", d.message.key);
        got.push(seq_of(&d.message));
        d.ack().await.expect("ack");
    }
    assert_eq!(got, vec![0, 1, 2]);

    // Grown again while no member runs: the member joining next creates the new partition's
    // consumer at its join.
    a.close().await.expect("close a");
    grow(3).await;
    let k2 = key_in(2, 3, "added");
    for n in 0..3 {
        publish(k2.clone(), n).await;
    }
    assert!(bus
        .consumer_info(&stream, &consumer_name(&gkey, 2))
        .await
        .expect("info")
        .is_none());
    let mut b = bus
        .subscribe(group, &topic, latest())
        .await
        .expect("subscribe b");
    let mut got = Vec::new();
    while got.len() < 3 {
        let d = next(&mut b, WAIT)
            .await
            .unwrap_or_else(|| panic!("partition 2's records never came, got {got:?}"));
        assert_eq!(d.message.partition, 2, "{:?}", d.message.key);
        got.push(seq_of(&d.message));
        d.ack().await.expect("ack");
    }
    assert_eq!(got, vec![0, 1, 2]);

    // A group new on the grown topic starts at the end of every partition.
    let mut fresh = bus
        .subscribe("fresh", &topic, latest())
        .await
        .expect("subscribe fresh");
    let old = next(&mut fresh, Duration::from_millis(1_500)).await;
    assert!(
        old.is_none(),
        "a new group at latest got {:?}",
        old.map(|d| d.message.key)
    );
    let k = key_in(2, 3, "late");
    publish(k.clone(), 0).await;
    let d = next(&mut fresh, WAIT)
        .await
        .expect("a record after its join");
    assert_eq!(d.message.key, k);
    d.ack().await.expect("ack");
    fresh.close().await.expect("close fresh");
    b.close().await.expect("close b");
}

/// Members whose configs differ (a rolling change of `bus.nats.lease_ttl_ms`) never shorten
/// the lease bucket's max age under a member that counts on the longer one: the bucket only
/// grows, so no lease expires before its holder's own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_bucket_is_never_shortened_under_a_member() {
    let Some(config) = test_config() else { return };
    let mut longer = config.clone();
    longer.nats.lease_ttl_ms = 5000;
    let a = connect(&longer).await;
    let b = connect(&config).await;
    let topic = fresh_topic(&a, 1).await;
    let bucket = lease_bucket(&stream_name(&topic));
    let max_age = |bus: &JetStreamBus| {
        let (js, bucket) = (bus.js.clone(), bucket.clone());
        async move {
            js.get_key_value(&bucket)
                .await
                .expect("bucket")
                .status()
                .await
                .expect("status")
                .max_age()
        }
    };
    let sub_a = a
        .subscribe("ttl", &topic, SubscribeOptions::default())
        .await
        .expect("a");
    assert_eq!(max_age(&a).await, Duration::from_millis(5000));
    let sub_b = b
        .subscribe("ttl", &topic, SubscribeOptions::default())
        .await
        .expect("b");
    assert_eq!(
        max_age(&b).await,
        Duration::from_millis(5000),
        "a member with a shorter lease keeps the longer bucket"
    );
    // Lowered behind the members' backs (as a racing join could): raised back at the next
    // partition-count refresh (2 s in these tests).
    b.js.create_or_update_key_value(async_nats::jetstream::kv::Config {
        bucket: bucket.clone(),
        history: 1,
        max_age: Duration::from_millis(2500),
        ..Default::default()
    })
    .await
    .expect("lower");
    let until = Instant::now() + Duration::from_secs(10);
    while max_age(&a).await < Duration::from_millis(5000) {
        assert!(Instant::now() < until, "the bucket was raised back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sub_b.close().await.expect("close b");
    sub_a.close().await.expect("close a");
}
