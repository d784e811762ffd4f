//! `nexus topology plan|apply` and `nexus schemas check` as an operator uses them: what they
//! print, their exit codes, and what they refuse. The topology commands run against the real
//! brokers (NATS JetStream and a Kafka-protocol broker; addresses from `scripts/services.sh
//! env`, loopback defaults), some on the embedded log too, each test on topics of its own;
//! `NEXUS_TEST_BUS` picks one backend.

use std::path::Path;
use std::process::Command;

use nexus::events::{Event, Registry, SchemaError};
use serde_json::{json, Map, Value};

/// `nexus <args>` to completion: (exit code, stdout, stderr).
fn nexus(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nexus"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run nexus");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The brokers to run the bus-facing tests on: (backend, bus URL).
fn brokers() -> Vec<(&'static str, String)> {
    let only = std::env::var("NEXUS_TEST_BUS").unwrap_or_default();
    [
        (
            "jetstream",
            std::env::var("NEXUS_TEST_NATS_URL")
                .unwrap_or_else(|_| "nats://127.0.0.1:14222".into()),
        ),
        (
            "kafka",
            format!(
                "kafka://{}",
                std::env::var("NEXUS_TEST_KAFKA_BROKERS")
                    .unwrap_or_else(|_| "127.0.0.1:19092".into())
            ),
        ),
    ]
    .into_iter()
    .filter(|(backend, _)| only.is_empty() || only == *backend)
    .collect()
}

fn prefix(tag: &str) -> String {
    format!("{tag}{}", uuid::Uuid::new_v4().simple())
}

/// Two topics, the first with a dead-letter topic and read by a role.
fn topology(prefix: &str, a_partitions: u32, b_retention: &str) -> String {
    format!(
        "topics:\n  - name: {prefix}.a\n    partitions: {a_partitions}\n    retention: 7d\n    \
         dlq: true\n    events: [MessageReceived]\n  - name: {prefix}.b\n    partitions: 1\n    \
         retention: {b_retention}\n    events: [MessageSent]\nroles:\n  - name: history\n    \
         group: g-{prefix}\n    topics: [{prefix}.a]\n    concurrency: 2\n"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path.display().to_string()
}

/// `plan` is scriptable: `--detailed-exitcode` exits 2 while apply has work and 0 once the bus
/// matches (saying "No changes"), a conflict (fewer partitions declared than the bus has) exits
/// 1 with the topic named, and a second `apply` changes nothing.
#[test]
fn plan_exit_codes_follow_what_apply_would_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, bus) in brokers() {
        let p = prefix("pl");
        let file = write(dir.path(), &format!("{p}.yaml"), &topology(&p, 2, "24h"));
        let plan = |file: &str| {
            nexus(&[
                "topology",
                "plan",
                "--detailed-exitcode",
                "--bus",
                &bus,
                "--topology",
                file,
            ])
        };

        let (code, out, err) = plan(&file);
        assert_eq!(
            code, 2,
            "{backend}: a fresh bus has topics to create\n{out}{err}"
        );
        assert!(
            out.contains(&format!("+ create {p}.a.dlq (2 partitions, retention 14d)")),
            "{backend}: {out}"
        );
        // Without the flag a plan with changes is still a success.
        let (code, _, err) = nexus(&["topology", "plan", "--bus", &bus, "--topology", &file]);
        assert_eq!(code, 0, "{backend}: {err}");

        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &file]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert!(
            out.trim_end()
                .ends_with("Applied: 3 created, 0 updated, 0 unchanged."),
            "{backend}: {out}"
        );
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &file]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert!(
            out.trim_end()
                .ends_with("Applied: 0 created, 0 updated, 3 unchanged."),
            "{backend}: {out}"
        );

        let (code, out, err) = plan(&file);
        assert_eq!(code, 0, "{backend}: the bus matches\n{out}{err}");
        assert!(
            out.trim_end()
                .ends_with("No changes: the bus matches the topology."),
            "{backend}: {out}"
        );

        // Growing a topic or changing retention is work for apply (whether the broker can do
        // it is apply's business: Tansu 0.6 cannot).
        let grown = write(
            dir.path(),
            &format!("{p}-grown.yaml"),
            &topology(&p, 3, "3d"),
        );
        let (code, out, err) = plan(&grown);
        assert_eq!(code, 2, "{backend}: {out}{err}");
        assert!(
            out.contains(&format!("~ update {p}.a: partitions 2 → 3")),
            "{backend}: {out}"
        );
        assert!(
            out.contains(&format!("~ update {p}.b: retention 24h → 3d")),
            "{backend}: {out}"
        );

        // Fewer partitions than the bus has: plan says so and fails, apply refuses whole (the
        // retention change of the other topic is not made either).
        let shrunk = write(
            dir.path(),
            &format!("{p}-shrunk.yaml"),
            &topology(&p, 1, "3d"),
        );
        let (code, out, err) = plan(&shrunk);
        assert_eq!(code, 1, "{backend}: a conflict fails the plan\n{out}{err}");
        assert!(
            out.contains(&format!(
                "! conflict {p}.a: 2 partitions on the bus, 1 declared"
            )),
            "{backend}: {out}"
        );
        assert!(
            err.contains("2 topic(s) in conflict: apply would refuse"),
            "{backend}: {err}"
        );
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &shrunk]);
        assert_eq!(code, 1, "{backend}: {out}{err}");
        assert!(
            err.contains("apply refused, nothing changed")
                && err.contains(&format!("{p}.a has 2 partitions on the bus, 1 declared")),
            "{backend}: {err}"
        );
        let (code, out, err) = plan(&file);
        assert_eq!(
            code, 0,
            "{backend}: the refused apply changed nothing\n{out}{err}"
        );
    }
}

/// An apply that fails part way says which topics it had already created or changed: the
/// output is printed only at the end, so without it the operator would not know the bus is
/// half way. Tansu 0.6 cannot add partitions, which makes the second topic fail after the
/// first was created; a broker that can simply converges.
#[test]
fn an_apply_that_fails_part_way_names_what_it_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, bus) in brokers() {
        let p = prefix("ap");
        let first = format!("topics:\n  - name: {p}.old\n    partitions: 1\n    retention: 1d\n");
        let first = write(dir.path(), &format!("{p}-1.yaml"), &first);
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &first]);
        assert_eq!(code, 0, "{backend}: {out}{err}");

        let second = format!(
            "topics:\n  - name: {p}.new\n    partitions: 1\n    retention: 1d\n  - name: {p}.old\n    \
             partitions: 2\n    retention: 1d\n"
        );
        let second = write(dir.path(), &format!("{p}-2.yaml"), &second);
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &second]);
        if code == 0 {
            assert!(
                out.contains("Applied: 1 created, 1 updated"),
                "{backend}: {out}"
            );
            continue;
        }
        assert!(
            err.contains(&format!("applying topic `{p}.old` failed"))
                && err.contains(&format!("applied before it: {p}.new")),
            "{backend}: {err}"
        );
        assert!(
            err.contains("CreatePartitions"),
            "{backend}: the cause is kept: {err}"
        );
    }
}

/// A topology mistake is reported with the file, once (no "Caused by" repeating it), before
/// any bus is contacted.
#[test]
fn topology_file_errors_name_the_file_and_the_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bus = format!("embedded://{}", dir.path().join("bus").display());
    let base = topology("t", 2, "24h");

    // The role reads a topic without a dead-letter topic: a bad event would hold its key.
    let file = write(
        dir.path(),
        "no-dlq.yaml",
        &base.replace("topics: [t.a]", "topics: [t.a, t.b]"),
    );
    let (code, _, err) = nexus(&["topology", "plan", "--bus", &bus, "--topology", &file]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{file}: role `history`: consumes topic `t.b`, which has no dead-letter topic"
        )),
        "{err}"
    );

    let file = write(
        dir.path(),
        "typo.yaml",
        &base.replace("retention: 24h", "retention: 24h\n    retenton: 2d"),
    );
    let (code, _, err) = nexus(&["topology", "plan", "--bus", &bus, "--topology", &file]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{file}: topology: topics[1]: unknown field `retenton`"
        )),
        "{err}"
    );
    assert_eq!(err.matches("unknown field").count(), 1, "said once: {err}");
    assert!(!err.contains("Caused by"), "{err}");

    let file = write(
        dir.path(),
        "dlq-of-dlq.yaml",
        &base.replace("name: t.b", "name: t.b.dlq\n    dlq: true"),
    );
    let (code, _, err) = nexus(&["topology", "asyncapi", "--topology", &file]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("topic `t.b.dlq`: names ending in `.dlq` are dead-letter topics"),
        "{err}"
    );
}

/// One topic, no roles.
fn one_topic(name: &str, partitions: u32, retention: &str) -> String {
    format!("topics:\n  - name: {name}\n    partitions: {partitions}\n    retention: {retention}\n")
}

/// [`brokers`] and the embedded log in `dir`.
fn buses(dir: &Path) -> Vec<(&'static str, String)> {
    let only = std::env::var("NEXUS_TEST_BUS").unwrap_or_default();
    let mut all = brokers();
    if only.is_empty() || only == "embedded" {
        all.push((
            "embedded",
            format!("embedded://{}", dir.join("bus").display()),
        ));
    }
    all
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// JetStream at the bus URL, to make streams by hand as an operator would.
async fn jetstream(bus: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(bus)
        .await
        .unwrap_or_else(|e| panic!("NATS at {bus}: {e}"));
    async_nats::jetstream::new(client)
}

/// A Kafka topic made by hand (not by nexus) with `configs`.
async fn kafka_topic(bus: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let brokers = bus.strip_prefix("kafka://").expect("kafka:// URL");
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let created = admin
        .create_topics(&[topic], &AdminOptions::new())
        .await
        .expect("create topic");
    assert!(matches!(created.as_slice(), [Ok(_)]), "{name}: {created:?}");
    // The broker creates it after answering; the CLI must see it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let meta: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    use rdkafka::consumer::Consumer;
    while meta
        .fetch_metadata(Some(name), std::time::Duration::from_secs(5))
        .map_or(true, |md| {
            md.topics()
                .iter()
                .all(|t| t.name() != name || t.partitions().is_empty())
        })
    {
        assert!(std::time::Instant::now() < deadline, "{name} not created");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Topics the bus has and the file does not declare (leftovers of an older topology, one made
/// by hand under a mistyped name) are listed in a section of their own; they are no change for
/// `--detailed-exitcode`, and apply leaves them alone. On JetStream only streams nexus's
/// naming could have made are topics (not another application's stream); on Kafka the
/// broker's `__` topics are left out.
#[test]
fn plan_lists_topics_the_file_does_not_declare_and_apply_leaves_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, bus) in buses(dir.path()) {
        let p = prefix("ud");
        let full = write(dir.path(), &format!("{p}.yaml"), &topology(&p, 2, "24h"));
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &full]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        // The same without topic b (nor its role, which reads only a).
        let without_b = topology(&p, 2, "24h");
        let without_b = without_b
            .split_once(&format!("  - name: {p}.b\n"))
            .map(|(head, tail)| format!("{head}{}", &tail[tail.find("roles:").expect("roles")..]))
            .expect("topic b");
        let only_a = write(dir.path(), &format!("{p}-a.yaml"), &without_b);

        // Made by hand: a topic under a mistyped name, and (where the backend has them)
        // things that are not topics.
        let typo = format!("{p}.typo");
        match backend {
            "jetstream" => block_on(async {
                let js = jetstream(&bus).await;
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: format!("{p}_typo"),
                    subjects: vec![format!("{typo}.0")],
                    ..Default::default()
                })
                .await
                .expect("typo stream");
                // Another application's stream: not named after its subjects' topic.
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: format!("{p}_foreign"),
                    subjects: vec![format!("{p}.elsewhere.>")],
                    ..Default::default()
                })
                .await
                .expect("foreign stream");
            }),
            "kafka" => block_on(async {
                kafka_topic(&bus, &typo, 1, &[]).await;
                kafka_topic(&bus, &format!("__{p}"), 1, &[]).await;
            }),
            _ => {
                let typo = write(
                    dir.path(),
                    &format!("{p}-typo.yaml"),
                    &one_topic(&typo, 1, "1d"),
                );
                let (code, out, err) =
                    nexus(&["topology", "apply", "--bus", &bus, "--topology", &typo]);
                assert_eq!(code, 0, "{backend}: {out}{err}");
            }
        }

        let (code, out, err) = nexus(&[
            "topology",
            "plan",
            "--detailed-exitcode",
            "--bus",
            &bus,
            "--topology",
            &only_a,
        ]);
        assert_eq!(
            code, 0,
            "{backend}: undeclared topics are not changes\n{out}{err}"
        );
        let lines: Vec<&str> = out.lines().collect();
        let section = lines
            .iter()
            .position(|l| l.starts_with("On the bus, not in the topology file ("))
            .unwrap_or_else(|| panic!("{backend}: no section of undeclared topics\n{out}"));
        assert!(
            lines[section].ends_with("apply leaves them alone):"),
            "{backend}: {out}"
        );
        let listed: Vec<&str> = lines[section + 1..]
            .iter()
            .take_while(|l| !l.is_empty())
            .map(|l| {
                l.strip_prefix("? ")
                    .unwrap_or_else(|| panic!("{backend}: {l}"))
            })
            .collect();
        for name in [format!("{p}.b"), typo.clone()] {
            assert!(listed.contains(&name.as_str()), "{backend}: {name}\n{out}");
        }
        for name in [
            format!("{p}.a"),
            format!("{p}.a.dlq"),
            format!("{p}.elsewhere"),
            format!("{p}_foreign"),
            format!("__{p}"),
        ] {
            assert!(!listed.contains(&name.as_str()), "{backend}: {name}\n{out}");
        }
        assert!(
            out.trim_end()
                .ends_with("No changes: the bus matches the topology."),
            "{backend}: {out}"
        );

        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &only_a]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert!(
            out.contains("apply left them alone):")
                && out.contains(&format!("\n? {p}.b\n"))
                && out
                    .trim_end()
                    .ends_with("Applied: 0 created, 0 updated, 2 unchanged."),
            "{backend}: {out}"
        );
        // Nothing was deleted: the full file still matches.
        let (code, out, err) = nexus(&[
            "topology",
            "plan",
            "--detailed-exitcode",
            "--bus",
            &bus,
            "--topology",
            &full,
        ]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert!(!out.contains(&format!("? {p}.b")), "{backend}: {out}");
    }
}

/// A stream made by hand whose settings nexus cannot rely on: a work-queue retention policy
/// (records deleted once consumed) and memory storage cannot be changed in place, so plan
/// reports a conflict and apply refuses; a discard policy and limits that refuse or drop
/// records early are updates apply makes. Before, both planned as unchanged.
#[test]
fn plan_reports_jetstream_stream_settings_nexus_relies_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, bus) in brokers() {
        if backend != "jetstream" {
            continue;
        }
        use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
        let p = prefix("js");
        let (wq, lim) = (format!("{p}.wq"), format!("{p}.lim"));
        block_on(async {
            let js = jetstream(&bus).await;
            js.create_stream(Config {
                name: format!("{p}_wq"),
                subjects: vec![format!("{wq}.0")],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::Memory,
                ..Default::default()
            })
            .await
            .expect("work-queue stream");
            js.create_stream(Config {
                name: format!("{p}_lim"),
                subjects: vec![format!("{lim}.0")],
                discard: DiscardPolicy::New,
                max_message_size: 1024,
                max_messages: 10,
                max_bytes: 1 << 20,
                max_messages_per_subject: 5,
                ..Default::default()
            })
            .await
            .expect("limited stream");
        });
        let plan = |file: &str| {
            nexus(&[
                "topology",
                "plan",
                "--detailed-exitcode",
                "--bus",
                &bus,
                "--topology",
                file,
            ])
        };

        let wq_file = write(
            dir.path(),
            &format!("{p}-wq.yaml"),
            &one_topic(&wq, 1, "forever"),
        );
        let (code, out, err) = plan(&wq_file);
        assert_eq!(code, 1, "{backend}: a conflict fails the plan\n{out}{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("! conflict {wq}: ")))
            .unwrap_or_else(|| panic!("{backend}: no conflict line\n{out}"));
        assert!(
            line.contains("retention policy workqueue on the bus, nexus needs limits (records are deleted once consumed")
                && line.contains("storage memory on the bus, nexus needs file (records are lost when the server restarts)")
                && line.contains(
                    "the backend cannot change it in place: recreate the topic (copy its records \
                     out first and back after, e.g. with `nexus replay --copy-to`)"
                ),
            "{backend}: {line}"
        );
        assert!(
            err.contains("1 topic(s) in conflict: apply would refuse"),
            "{backend}: {err}"
        );
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &wq_file]);
        assert_eq!(code, 1, "{backend}: {out}{err}");
        assert!(
            err.contains("apply refused, nothing changed")
                && err.contains(&format!(
                    "{wq} has retention policy workqueue on the bus, nexus needs limits: the \
                     backend cannot change it in place, recreate the topic"
                )),
            "{backend}: {err}"
        );

        let lim_file = write(
            dir.path(),
            &format!("{p}-lim.yaml"),
            &one_topic(&lim, 1, "forever"),
        );
        let (code, out, err) = plan(&lim_file);
        assert_eq!(code, 2, "{backend}: apply has work\n{out}{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("~ update {lim}: ")))
            .unwrap_or_else(|| panic!("{backend}: no update line\n{out}"));
        for part in [
            "discard policy new → old (a full stream refuses publishes)",
            "max message size 1024 → unlimited",
            "max messages 10 → unlimited",
            "max bytes 1048576 → unlimited",
            "max messages per subject 5 → unlimited",
        ] {
            assert!(line.contains(part), "{backend}: {part}\n{line}");
        }
        let (code, out, err) =
            nexus(&["topology", "apply", "--bus", &bus, "--topology", &lim_file]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert!(
            out.trim_end()
                .ends_with("Applied: 0 created, 1 updated, 0 unchanged."),
            "{backend}: {out}"
        );
        let (code, out, err) = plan(&lim_file);
        assert_eq!(code, 0, "{backend}: apply converged\n{out}{err}");
        let config = block_on(async {
            let js = jetstream(&bus).await;
            js.get_stream(format!("{p}_lim"))
                .await
                .expect("stream")
                .info()
                .await
                .expect("stream info")
                .config
                .clone()
        });
        assert_eq!(config.discard, DiscardPolicy::Old, "{backend}");
        assert!(
            config.max_message_size <= 0
                && config.max_messages <= 0
                && config.max_bytes <= 0
                && config.max_messages_per_subject <= 0,
            "{backend}: {config:?}"
        );
    }
}

/// A Kafka topic made by hand with `cleanup.policy=compact` (compaction keeps only each key's
/// last record, so a conversation's earlier events go) and a `retention.bytes` limit: plan
/// shows both as updates for apply, which sets them back, or (a broker without AlterConfigs,
/// Tansu 0.6) fails naming the operation. Before, the topic planned as unchanged. The plan warns
/// that switching to delete deletes the old records compaction kept. What AlterConfigs writes
/// is checked without a broker (`bus::kafka` unit tests).
#[test]
fn plan_reports_a_compacted_kafka_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (backend, bus) in brokers() {
        if backend != "kafka" {
            continue;
        }
        let topic = format!("{}.c", prefix("kc"));
        block_on(kafka_topic(
            &bus,
            &topic,
            1,
            &[
                ("cleanup.policy", "compact"),
                ("retention.ms", "604800000"),
                ("retention.bytes", "1048576"),
            ],
        ));
        let file = write(
            dir.path(),
            &format!("{topic}.yaml"),
            &one_topic(&topic, 1, "7d"),
        );
        let plan = || {
            nexus(&[
                "topology",
                "plan",
                "--detailed-exitcode",
                "--bus",
                &bus,
                "--topology",
                &file,
            ])
        };
        let (code, out, err) = plan();
        assert_eq!(code, 2, "{backend}: apply has work\n{out}{err}");
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("~ update {topic}: ")))
            .unwrap_or_else(|| panic!("{backend}: no update line\n{out}"));
        assert!(
            line.contains(
                "cleanup.policy compact → delete (compaction keeps only each key's last record"
            ) && line.contains(
                "switching to delete deletes at once every record older than the topic's \
                 retention that compaction had kept"
            ) && line.contains("retention.bytes 1048576 → unlimited"),
            "{backend}: {line}"
        );
        let (code, out, err) = nexus(&["topology", "apply", "--bus", &bus, "--topology", &file]);
        if code == 0 {
            let (code, out, err) = plan();
            assert_eq!(code, 0, "{backend}: apply converged\n{out}{err}");
        } else {
            assert!(
                err.contains(&format!("applying topic `{topic}` failed"))
                    && err.contains("AlterConfigs"),
                "{backend}: {out}{err}"
            );
        }
    }
}

// ---- schemas check ----

fn probe_schema(fields: Value) -> String {
    let mut all =
        vec![json!({"name": "envelope", "type": "nexus.Envelope", "doc": "Common envelope."})];
    all.extend(fields.as_array().expect("fields").iter().cloned());
    json!({
        "type": "record",
        "name": "SchemaProbe",
        "namespace": "nexus.events",
        "doc": "A test event.",
        "fields": all,
    })
    .to_string()
}

/// A field `f` of `field_type`, plus an optional field so that versions differ in their wire
/// schema even when only a logical type changed.
fn probe(field_type: Value, version: u32) -> String {
    let mut fields = vec![json!({"name": "f", "type": field_type, "doc": "The probed field."})];
    if version > 1 {
        fields.push(
            json!({"name": "added", "type": ["null", "string"], "default": null, "doc": "Added."}),
        );
    }
    probe_schema(Value::Array(fields))
}

fn registry(versions: &[String]) -> Registry {
    let files: Vec<(String, &str)> = versions
        .iter()
        .enumerate()
        .map(|(i, text)| {
            (
                format!("events/schema_probe/v{}.avsc", i + 1),
                text.as_str(),
            )
        })
        .collect();
    Registry::from_sources(
        Registry::builtin_files()
            .iter()
            .copied()
            .chain(files.iter().map(|(p, t)| (p.as_str(), *t))),
    )
    .unwrap_or_else(|e| panic!("{e:?}"))
}

/// The check's complaints about the probe type, besides "not locked yet".
fn problems(versions: &[String]) -> Vec<String> {
    match registry(versions).check() {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .filter(|e| !matches!(e, SchemaError::NotLocked { .. }))
            .map(|e| e.to_string())
            .collect(),
    }
}

fn body(f: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("f".into(), f);
    m
}

/// Avro resolves string → uuid and bytes → string (same encoding), but nexus's reader refuses
/// a string that is not a UUID and bytes that are not UTF-8: a v2 that did this would have
/// every such v1 event dead-lettered once readers moved to it. The check refuses both; the
/// safe directions (uuid → string, string → bytes) still pass.
#[test]
fn the_check_refuses_what_the_new_reader_cannot_decode_from_old_data() {
    let cases = [
        (
            json!("string"),
            json!({"type": "string", "logicalType": "uuid"}),
            json!("order-17"),
            "was a string and is now a `uuid`",
        ),
        (
            json!("bytes"),
            json!("string"),
            json!("/w=="),
            "was bytes and is now a string",
        ),
    ];
    for (old, new, value, complaint) in cases {
        let (v1, v2) = (probe(old.clone(), 1), probe(new.clone(), 2));
        // What goes wrong at run time: v1 data the v2 reader cannot decode.
        let written = registry(std::slice::from_ref(&v1))
            .encode(&Event::new("SchemaProbe", "t", "c", "test", body(value)))
            .expect("v1 encodes");
        assert!(
            registry(&[v1.clone(), v2.clone()])
                .decode(&written)
                .is_err(),
            "{old} → {new}"
        );

        let found = problems(&[v1.clone(), v2.clone()]);
        assert!(
            matches!(found.as_slice(), [m] if m.starts_with("SchemaProbe v2 cannot read v1: field `f` ") && m.contains(complaint)),
            "{old} → {new}: {found:?}"
        );
        // Inside a union too.
        let found = problems(&[
            probe(json!(["null", old.clone()]), 1),
            probe(json!(["null", new.clone()]), 2),
        ]);
        assert!(
            matches!(found.as_slice(), [m] if m.contains(complaint)),
            "{found:?}"
        );
        // The other direction reads every old value.
        assert_eq!(
            problems(&[probe(new.clone(), 1), probe(old.clone(), 2)]),
            Vec::<String>::new(),
            "{new} → {old}"
        );
    }
}

/// Avro matches named types by their unqualified name, so a nested record moved to another
/// namespace is the same record: dropping its field without a default must still be refused.
#[test]
fn a_record_moved_to_another_namespace_cannot_drop_a_required_field() {
    let item = |namespace: &str, fields: Value| json!({"type": "record", "name": "Item", "namespace": namespace, "doc": "An item.", "fields": fields});
    let sku = json!({"name": "sku", "type": "string", "doc": "Stock-keeping unit."});
    let qty = json!({"name": "qty", "type": "int", "default": 1, "doc": "Quantity."});
    let v1 = probe(item("nexus.events", json!([sku, qty])), 1);
    for v2_type in [
        item("nexus.catalog", json!([qty])),
        json!(["null", item("nexus.catalog", json!([qty]))]),
    ] {
        let found = problems(&[v1.clone(), probe(v2_type.clone(), 2)]);
        assert!(
            matches!(found.as_slice(), [m] if m.contains("field `Item.sku` is removed but has no default in v1")),
            "{v2_type}: {found:?}"
        );
    }
    // Moving it alone, or dropping only the field with a default, is fine.
    assert_eq!(
        problems(&[
            v1.clone(),
            probe(item("nexus.catalog", json!([sku, qty])), 2)
        ]),
        Vec::<String>::new()
    );
    assert_eq!(
        problems(&[v1, probe(item("nexus.catalog", json!([sku])), 2)]),
        Vec::<String>::new()
    );
}

/// An incompatibility names the field path and what is wrong, not only the outermost field
/// ("Field 'contact' in reader schema does not match the type in the writer schema").
#[test]
fn incompatibilities_name_the_field_and_the_reason() {
    let kind = |symbols: Value| json!({"type": "enum", "name": "Kind", "doc": "A kind.", "symbols": symbols, "default": "UNKNOWN"});
    let contact = |symbols: Value| {
        json!({"type": "record", "name": "Contact", "doc": "A contact.", "fields": [
            {"name": "kind", "type": kind(symbols), "default": "UNKNOWN", "doc": "Kind."}
        ]})
    };
    let found = problems(&[
        probe(contact(json!(["UNKNOWN", "EMAIL", "SMS"])), 1),
        probe(contact(json!(["UNKNOWN", "EMAIL"])), 2),
    ]);
    assert!(
        matches!(found.as_slice(), [m] if m.contains("field `f.kind`: enum nexus.events.Kind lost the symbols SMS")),
        "{found:?}"
    );

    let found = problems(&[
        probe(json!(["null", "string"]), 1),
        probe(json!("string"), 2),
    ]);
    assert_eq!(
        found,
        ["SchemaProbe v2 cannot read v1: field `f`: null cannot be read as string"]
    );

    let found = problems(&[probe(json!("long"), 1), probe(json!("int"), 2)]);
    assert_eq!(
        found,
        ["SchemaProbe v2 cannot read v1: field `f`: long cannot be read as int"]
    );
}

/// `nexus schemas check --dir` on a copy of the schemas with a v2 that turns a string into a
/// uuid: exit 1, the type, versions and field named.
#[test]
fn schemas_check_cli_refuses_a_string_turned_uuid() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (path, text) in Registry::builtin_files() {
        let file = dir.path().join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(&file, text).expect("write");
    }
    let (code, out, err) = nexus(&[
        "schemas",
        "check",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(code, 0, "the copy passes as it is\n{out}{err}");

    let v1: Value = serde_json::from_str(
        Registry::builtin_files()
            .iter()
            .find(|(p, _)| *p == "events/typing_indicated/v1.avsc")
            .expect("TypingIndicated v1")
            .1,
    )
    .expect("JSON");
    let mut v2 = v1.clone();
    for f in v2["fields"].as_array_mut().expect("fields") {
        if f["name"] == "participant_id" {
            f["type"] = json!({"type": "string", "logicalType": "uuid"});
        }
    }
    v2["fields"].as_array_mut().expect("fields").push(
        json!({"name": "device", "type": ["null", "string"], "default": null, "doc": "Device."}),
    );
    std::fs::write(
        dir.path().join("events/typing_indicated/v2.avsc"),
        v2.to_string(),
    )
    .expect("write v2");
    let (code, out, err) = nexus(&[
        "schemas",
        "check",
        "--dir",
        &dir.path().display().to_string(),
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("error: TypingIndicated v2 cannot read v1: field `participant_id` was a string and is now a `uuid`"),
        "{err}"
    );
}
