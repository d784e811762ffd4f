//! The Helm chart `charts/nexus`: `helm lint --strict`, then `helm template` with each values file
//! of `charts/nexus/ci/` and checks on the rendered objects (one Deployment per role, the topology
//! hook Job, no secrets in ConfigMaps or literal env, startup/liveness/readiness probes, drain time,
//! pod settings on every pod the hook Job included, configs nexus loads, KEDA per values, requests
//! within limits, PDBs that let a drain go, names within 63 characters, the listen address, the
//! hook Job's image, hook objects deleted once the hooks succeed, values.schema.json refusing
//! misspelt keys and wrong types while taking every documented value).
//!
//! Helm comes from `scripts/helm.sh` (downloads it into target/tools when missing). Without it the
//! tests skip with a message, unless NEXUS_TEST_REQUIRE_TOOLS=1 (set by `.ci/run`) makes that a
//! failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

const RELEASE: &str = "t";
const WORKER_ROLES: [&str; 5] = ["conversation", "history", "gws", "webhooks", "delivery"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/nexus")
}

/// The helm binary, or None (after saying why) when it cannot be obtained and tools are optional.
fn helm() -> Option<PathBuf> {
    let out = Command::new("bash")
        .arg(root().join("scripts/helm.sh"))
        .output()
        .expect("run scripts/helm.sh");
    if out.status.success() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        return Some(PathBuf::from(path));
    }
    let why = String::from_utf8_lossy(&out.stderr);
    if std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("helm is required (NEXUS_TEST_REQUIRE_TOOLS=1) but scripts/helm.sh failed: {why}");
    }
    eprintln!("SKIPPED: helm cannot be obtained (scripts/helm.sh: {why}); chart not tested");
    None
}

fn run_helm(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm).args(args).output().expect("run helm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template` with these values files (and extra args); every rendered object.
fn render(helm: &Path, values: &[&str], extra: &[&str]) -> Vec<Value> {
    render_release(helm, RELEASE, values, extra)
}

/// `render` under another release name.
fn render_release(helm: &Path, release: &str, values: &[&str], extra: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        "chat",
    ];
    let files: Vec<String> = values
        .iter()
        .map(|v| chart.join("ci").join(v).display().to_string())
        .collect();
    for f in &files {
        args.push("-f");
        args.push(f);
    }
    args.extend_from_slice(extra);
    let (ok, out, err) = run_helm(helm, &args);
    assert!(ok, "helm template {values:?} failed: {err}");
    serde_yaml::Deserializer::from_str(&out)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or("")
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or("")
}

fn of_kind<'a>(objs: &'a [Value], k: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| kind(o) == k).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// (role, deployment) for each worker Deployment, from its `worker <role>` args.
fn worker_deployments(objs: &[Value]) -> Vec<(String, &Value)> {
    of_kind(objs, "Deployment")
        .into_iter()
        .filter_map(|d| {
            let args = strs(&d["spec"]["template"]["spec"]["containers"][0]["args"]);
            match args.as_slice() {
                [w, roles @ ..] if w == "worker" => {
                    assert_eq!(
                        roles.len(),
                        1,
                        "{}: one role per Deployment, got {roles:?}",
                        name(d)
                    );
                    Some((roles[0].clone(), d))
                }
                _ => None,
            }
        })
        .collect()
}

fn edge_deployment(objs: &[Value]) -> Option<&Value> {
    of_kind(objs, "Deployment").into_iter().find(|d| {
        strs(&d["spec"]["template"]["spec"]["containers"][0]["args"]) == vec!["edge".to_string()]
    })
}

/// Checks that hold for every render: probes, drain time, secrets only by reference, configs that
/// nexus itself accepts.
fn check_common(objs: &[Value], what: &str) {
    for d in of_kind(objs, "Deployment") {
        let spec = &d["spec"]["template"]["spec"];
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        // Edge drains requests for http.shutdown_grace_ms (20 s), workers finish a handler
        // (handler_timeout_ms, 30 s): the pod must get longer before SIGKILL.
        assert!(
            grace > 30,
            "{what}/{}: grace {grace}s too short to drain",
            name(d)
        );
        // Kubernetes' service-link variables of a release named nexus* are NEXUS_*.
        assert_eq!(spec["enableServiceLinks"], false, "{what}/{}", name(d));
        // Non-root under the runtime's syscall filter (Pod Security "restricted").
        let pod = &spec["securityContext"];
        assert_eq!(pod["runAsNonRoot"], true, "{what}/{}", name(d));
        assert_eq!(
            pod["seccompProfile"]["type"],
            "RuntimeDefault",
            "{what}/{}",
            name(d)
        );
        // nexus never calls the Kubernetes API: no token in its pods, whatever the account.
        assert_eq!(
            spec["automountServiceAccountToken"],
            false,
            "{what}/{}",
            name(d)
        );
        for c in spec["containers"].as_sequence().unwrap() {
            // A pod listens only after its migrations (minutes on a large table, or behind
            // another pod's lock): liveness alone killed it after ~25 s, rolling the migration
            // back each time. The startup probe waits minutes, then liveness takes over.
            let startup = &c["startupProbe"];
            assert_eq!(startup["httpGet"]["path"], "/healthz", "{what}/{}", name(d));
            let window = startup["periodSeconds"].as_u64().unwrap_or(10)
                * startup["failureThreshold"].as_u64().unwrap_or(3);
            assert!(
                window >= 300,
                "{what}/{}: startup probe gives {window}s to start",
                name(d)
            );
            assert_eq!(
                c["livenessProbe"]["httpGet"]["path"],
                "/healthz",
                "{what}/{}",
                name(d)
            );
            assert_eq!(
                c["readinessProbe"]["httpGet"]["path"],
                "/readyz",
                "{what}/{}",
                name(d)
            );
            check_env(c, &format!("{what}/{}", name(d)));
            check_resources(c, &format!("{what}/{}", name(d)));
        }
    }
    for j in of_kind(objs, "Job") {
        assert_eq!(
            j["spec"]["template"]["spec"]["enableServiceLinks"],
            false,
            "{what}/{}",
            name(j)
        );
        assert_eq!(
            j["spec"]["template"]["spec"]["automountServiceAccountToken"],
            false,
            "{what}/{}",
            name(j)
        );
        for c in j["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
        {
            check_env(c, &format!("{what}/{}", name(j)));
            check_resources(c, &format!("{what}/{}", name(j)));
        }
    }
    let maps = of_kind(objs, "ConfigMap");
    assert!(!maps.is_empty(), "{what}: no ConfigMap");
    for m in maps {
        let Some(toml_text) = m["data"]["config.toml"].as_str() else {
            continue;
        };
        let topology = m["data"]["topology.yaml"].as_str().expect("topology.yaml");
        check_config(toml_text, topology, &format!("{what}/{}", name(m)));
        nexus::topology::Topology::from_yaml(topology)
            .unwrap_or_else(|e| panic!("{what}/{}: topology does not load: {e}", name(m)));
    }
    let secrets: Vec<&str> = of_kind(objs, "Secret").into_iter().map(name).collect();
    assert!(
        secrets.is_empty(),
        "{what}: the chart must not create Secrets, found {secrets:?}"
    );
}

/// The literal value of env var `name` in `container`, if set.
fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

/// Every env var that carries a secret comes from a Secret, never a literal value.
fn check_env(container: &Value, what: &str) {
    let Some(env) = container["env"].as_sequence() else {
        return;
    };
    let secret_vars = [
        "NEXUS_STORES__POSTGRES_URL",
        "NEXUS_STORES__REDIS_URL",
        "NEXUS_STORES__PROVISIONING_KEY",
        "NEXUS_HTTP__ADMIN_TOKEN",
        "NEXUS_CHAT__CLIENT_KEY_SECRET",
        "NEXUS_BUS__KAFKA__SASL_PASSWORD",
        "NEXUS_BUS__NATS__PASSWORD",
        "NEXUS_BUS__NATS__TOKEN",
        "NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL",
        "NEXUS_WORKERS__GWS__CREDENTIAL",
    ];
    for e in env {
        let n = e["name"].as_str().unwrap_or("");
        if secret_vars.contains(&n) {
            assert!(e.get("value").is_none(), "{what}: {n} is inline");
            assert!(
                e["valueFrom"]["secretKeyRef"]["name"].as_str().is_some(),
                "{what}: {n} must come from a secretKeyRef"
            );
        }
    }
}

/// A Kubernetes quantity (`250m`, `2`, `1.5Gi`, `512M`) as a number of its unit.
fn quantity(q: &Value) -> f64 {
    let text = match q {
        Value::Number(n) => n.to_string(),
        _ => q.as_str().expect("a quantity").to_string(),
    };
    let at = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(at);
    let scale = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => panic!("quantity {text}: suffix unknown to this test"),
    };
    number.parse::<f64>().expect("quantity number") * scale
}

/// No request above its limit: the API server refuses such a pod.
fn check_resources(container: &Value, what: &str) {
    let r = &container["resources"];
    let Some(requests) = r["requests"].as_mapping() else {
        return;
    };
    for (k, req) in requests {
        let limit = &r["limits"][k];
        if !limit.is_null() {
            assert!(
                quantity(req) <= quantity(limit),
                "{what}: request {k:?} {req:?} above limit {limit:?}"
            );
        }
    }
}

/// The rendered config loads in nexus (real keys, valid values) and holds no secret.
fn check_config(toml_text: &str, topology: &str, what: &str) -> nexus::config::Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    // Files the pods mount under /etc/nexus/ (topology, TLS material) sit in the temp dir here:
    // nexus reads them at load.
    let pod_topology = "\"/etc/nexus/topology.yaml\"";
    assert!(
        toml_text.contains(pod_topology),
        "{what}: topology.file is not the mounted file"
    );
    let mut local = toml_text.to_string();
    // TLS material as the Secrets would hold it: nexus reads it at load.
    let made = rcgen::generate_simple_self_signed(vec!["nexus".to_string()]).unwrap();
    let (cert, key) = (made.cert.pem(), made.key_pair.serialize_pem());
    for line in toml_text.lines() {
        let Some((_, value)) = line.split_once(" = \"/etc/nexus/") else {
            continue;
        };
        let rel = value.trim_end_matches('"');
        let file = dir.path().join(rel);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let content = match rel {
            "topology.yaml" => topology,
            _ if rel.ends_with(".key") => key.as_str(),
            _ if rel.ends_with(".crt") || rel.ends_with(".pem") => cert.as_str(),
            _ => panic!("{what}: a mounted file nexus reads that this test does not know: {rel}"),
        };
        std::fs::write(&file, content).unwrap();
        local = local.replace(&format!("/etc/nexus/{rel}"), &file.display().to_string());
    }
    std::fs::write(&path, local).unwrap();
    let config = nexus::config::Config::load(Some(&path))
        .unwrap_or_else(|e| panic!("{what}: nexus refuses the chart's config: {e}\n{toml_text}"));
    for (key, value) in [
        ("http.admin_token", &config.http.admin_token),
        ("stores.postgres_url", &config.stores.postgres_url),
        ("stores.redis_url", &config.stores.redis_url),
        ("stores.provisioning_key", &config.stores.provisioning_key),
        ("chat.client_key_secret", &config.chat.client_key_secret),
        ("bus.kafka.sasl_password", &config.bus.kafka.sasl_password),
        ("bus.nats.password", &config.bus.nats.password),
        ("bus.nats.token", &config.bus.nats.token),
    ] {
        assert!(value.is_empty(), "{what}: secret {key} is in a ConfigMap");
    }
    assert!(
        !config.bus.url.contains('@'),
        "{what}: credentials in bus.url"
    );
    // The pods' ports, probes and Services are on 8080.
    let listen: std::net::SocketAddr = config.http.listen.parse().expect("http.listen");
    assert_eq!(listen.port(), 8080, "{what}: http.listen {listen}");
    config
}

fn hook_job(objs: &[Value]) -> Option<&Value> {
    of_kind(objs, "Job").into_iter().find(|j| {
        strs(&j["spec"]["template"]["spec"]["containers"][0]["args"])
            == vec!["topology".to_string(), "apply".to_string()]
    })
}

fn check_hook_job(objs: &[Value], what: &str) {
    let job = hook_job(objs).unwrap_or_else(|| panic!("{what}: no `topology apply` Job"));
    let hooks = job["metadata"]["annotations"]["helm.sh/hook"]
        .as_str()
        .unwrap_or("");
    assert!(
        hooks.contains("pre-install") && hooks.contains("pre-upgrade"),
        "{what}: hook Job runs on {hooks:?}"
    );
    // Hooks run before the release's objects exist: the Job's config must be a hook too.
    let cm = job["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|v| v["configMap"]["name"].as_str())
        .expect("hook Job mounts a ConfigMap");
    let map = of_kind(objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == cm)
        .unwrap_or_else(|| panic!("{what}: hook Job's ConfigMap {cm} is not rendered"));
    let weight = |o: &Value| -> i64 {
        o["metadata"]["annotations"]["helm.sh/hook-weight"]
            .as_str()
            .and_then(|w| w.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        map["metadata"]["annotations"]["helm.sh/hook"]
            .as_str()
            .is_some()
            && weight(map) < weight(job),
        "{what}: the hook Job's ConfigMap must be a hook created before it"
    );
}

fn scaled_objects(objs: &[Value]) -> Vec<&Value> {
    of_kind(objs, "ScaledObject")
}

fn trigger_types(so: &Value) -> BTreeSet<String> {
    so["spec"]["triggers"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap().to_string())
        .collect()
}

fn roles_of(objs: &[Value]) -> Vec<String> {
    let mut roles: Vec<String> = worker_deployments(objs)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    roles.sort();
    roles
}

fn sorted(r: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = r.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn chart_lints_strictly_with_every_values_file() {
    let Some(helm) = helm() else { return };
    let chart = chart();
    let (ok, out, err) = run_helm(&helm, &["lint", "--strict", chart.to_str().unwrap()]);
    assert!(ok, "helm lint --strict: {out}{err}");
    for entry in std::fs::read_dir(chart.join("ci")).unwrap() {
        let file = entry.unwrap().path();
        let (ok, out, err) = run_helm(
            &helm,
            &[
                "lint",
                "--strict",
                chart.to_str().unwrap(),
                "-f",
                file.to_str().unwrap(),
            ],
        );
        assert!(ok, "helm lint --strict -f {}: {out}{err}", file.display());
    }
}

#[test]
fn default_values_deploy_every_worker_role_of_the_topology_apart() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &[], &[]);
    check_common(&objs, "default");
    check_hook_job(&objs, "default");
    assert_eq!(
        roles_of(&objs),
        sorted(&WORKER_ROLES),
        "one Deployment per role"
    );
    // The roles are those of the topology the binary has built in (non-broadcast).
    let builtin: Vec<String> = {
        let mut v: Vec<String> = nexus::topology::Topology::builtin()
            .roles
            .iter()
            .filter(|r| !r.broadcast)
            .map(|r| r.name.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(roles_of(&objs), builtin);
    for (role, d) in worker_deployments(&objs) {
        assert_eq!(d["spec"]["replicas"], 2, "{role}: replicas without KEDA");
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            env_value(c, "TOKIO_WORKER_THREADS").as_deref(),
            Some("2"),
            "{role}: async threads"
        );
        let pdb = of_kind(&objs, "PodDisruptionBudget")
            .into_iter()
            .find(|p| p["spec"]["selector"]["matchLabels"]["nexus.io/role"] == role.as_str());
        assert!(pdb.is_some(), "{role}: no PodDisruptionBudget");
    }
    let edge = edge_deployment(&objs).expect("edge Deployment");
    assert_eq!(edge["spec"]["replicas"], 2);
    // The edge keeps serving while its endpoint is removed, then drains on SIGTERM.
    let c = &edge["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(env_value(c, "TOKIO_WORKER_THREADS").as_deref(), Some("2"));
    assert!(of_kind(&objs, "Service")
        .iter()
        .any(|s| name(s) == "t-nexus-edge"));
    assert!(scaled_objects(&objs).is_empty(), "KEDA is off by default");
    for k in [
        "ServiceMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
        "Ingress",
    ] {
        assert!(of_kind(&objs, k).is_empty(), "{k} is off by default");
    }
}

#[test]
fn kafka_values_scale_on_lag_through_prometheus_with_monitoring() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &["kafka-values.yaml"], &[]);
    check_common(&objs, "kafka");
    check_hook_job(&objs, "kafka");
    // `redisCaSecret`: every pod mounts it where its config's stores.redis_ca_file points (the
    // config itself is loaded by nexus in `check_common`).
    for d in of_kind(&objs, "Deployment") {
        let spec = &d["spec"]["template"]["spec"];
        let volumes = spec["volumes"].as_sequence().expect("volumes");
        assert!(
            volumes
                .iter()
                .any(|v| v["name"] == "redis-ca" && v["secret"]["secretName"] == "redis-ca"),
            "{}: no redis-ca volume",
            name(d)
        );
        let mounts = spec["containers"][0]["volumeMounts"]
            .as_sequence()
            .expect("mounts");
        assert!(
            mounts
                .iter()
                .any(|m| m["name"] == "redis-ca" && m["mountPath"] == "/etc/nexus/redis-ca"),
            "{}: redis-ca not mounted",
            name(d)
        );
    }
    for m in of_kind(&objs, "ConfigMap") {
        if let Some(toml_text) = m["data"]["config.toml"].as_str() {
            assert!(
                toml_text.contains("redis_ca_file = \"/etc/nexus/redis-ca/ca.crt\""),
                "{}: stores.redis_ca_file not the mounted file",
                name(m)
            );
        }
    }
    // A peer's credential reaches only the pods of the role that calls it.
    let env_names = |d: &Value| -> Vec<String> {
        d["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_sequence()
            .map(|env| {
                env.iter()
                    .filter_map(|e| e["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let peers = [
        ("history", "NEXUS_WORKERS__HISTORY__UCS__CREDENTIAL"),
        ("gws", "NEXUS_WORKERS__GWS__CREDENTIAL"),
    ];
    let mut pods: Vec<(String, &Value)> = worker_deployments(&objs);
    pods.push(("edge".into(), edge_deployment(&objs).expect("edge")));
    pods.push(("hook".into(), hook_job(&objs).expect("hook job")));
    for (role, d) in pods {
        let names = env_names(d);
        for (owner, var) in peers {
            assert_eq!(
                names.iter().any(|n| n == var),
                role == owner,
                "{role}: {var} in {names:?}"
            );
        }
    }
    assert_eq!(roles_of(&objs), sorted(&WORKER_ROLES));
    let sos = scaled_objects(&objs);
    assert_eq!(sos.len(), WORKER_ROLES.len(), "one ScaledObject per role");
    for so in &sos {
        assert_eq!(
            trigger_types(so),
            BTreeSet::from(["prometheus".to_string()])
        );
        let query = so["spec"]["triggers"][0]["metadata"]["query"]
            .as_str()
            .unwrap();
        assert!(
            query.contains("nexus_consumer_lag{group=\"nexus-"),
            "{query}"
        );
        assert!(query.contains("namespace=\"chat\""), "{query}");
        let target = so["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(
            worker_deployments(&objs)
                .iter()
                .any(|(_, d)| name(d) == target),
            "{target} is not a worker Deployment"
        );
    }
    // KEDA owns the replica count.
    for (role, d) in worker_deployments(&objs) {
        assert!(
            d["spec"].get("replicas").is_none(),
            "{role}: replicas set beside KEDA"
        );
    }
    // TLS: HTTPS probes, kafka+ssl, SASL password from a Secret.
    let edge = edge_deployment(&objs).unwrap();
    let c = &edge["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert!(
        edge["spec"].get("replicas").is_none(),
        "the HPA owns the edge's replicas"
    );
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == "t-nexus-config")
        .unwrap();
    assert!(cm["data"]["config.toml"]
        .as_str()
        .unwrap()
        .contains("kafka+ssl://"));
    let sasl = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NEXUS_BUS__KAFKA__SASL_PASSWORD")
        .expect("SASL password env");
    assert_eq!(sasl["valueFrom"]["secretKeyRef"]["name"], "kafka-user");
    for k in [
        "ServiceMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
        "Ingress",
    ] {
        assert_eq!(of_kind(&objs, k).len(), 1, "{k}");
    }
    // The PrometheusRule carries files/alerts.yaml as is.
    let rule = of_kind(&objs, "PrometheusRule")[0];
    let file: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart().join("files/alerts.yaml")).unwrap())
            .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);
    assert!(!file["groups"].as_sequence().unwrap().is_empty());
    // The dashboard ConfigMap carries files/dashboard.json.
    let dash = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == "t-nexus-dashboard")
        .expect("dashboard ConfigMap");
    let json: serde_json::Value =
        serde_json::from_str(dash["data"]["nexus.json"].as_str().unwrap()).unwrap();
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
}

#[test]
fn native_scalers_get_one_trigger_per_topic_or_partition_consumer() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &["kafka-native-keda-values.yaml"], &[]);
    check_common(&objs, "kafka-native");
    let topology = nexus::topology::Topology::builtin();
    for so in scaled_objects(&objs) {
        let role = so["metadata"]["labels"]["nexus.io/role"].as_str().unwrap();
        let r = topology.roles.iter().find(|r| r.name == role).unwrap();
        let triggers = so["spec"]["triggers"].as_sequence().unwrap();
        let topics: Vec<&str> = triggers
            .iter()
            .map(|t| {
                assert_eq!(t["type"], "kafka");
                assert_eq!(t["metadata"]["consumerGroup"], r.group.as_str());
                t["metadata"]["topic"].as_str().unwrap()
            })
            .collect();
        assert_eq!(
            topics,
            r.topics.iter().map(String::as_str).collect::<Vec<_>>()
        );
    }

    let objs = render(&helm, &["nats-values.yaml"], &[]);
    check_common(&objs, "nats");
    check_hook_job(&objs, "nats");
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == "t-nexus-config")
        .unwrap();
    assert!(cm["data"]["config.toml"]
        .as_str()
        .unwrap()
        .contains("url = \"nats://nats.nats.svc:4222\""));
    let sos = scaled_objects(&objs);
    assert_eq!(sos.len(), WORKER_ROLES.len());
    for so in sos {
        let role = so["metadata"]["labels"]["nexus.io/role"].as_str().unwrap();
        let r = topology.roles.iter().find(|r| r.name == role).unwrap();
        let triggers = so["spec"]["triggers"].as_sequence().unwrap();
        // nexus keeps one durable consumer per (group, partition) on the topic's stream.
        let mut expected = BTreeSet::new();
        for t in &r.topics {
            let topic = topology.topics.iter().find(|x| &x.name == t).unwrap();
            for p in 0..topic.partitions {
                expected.insert((t.replace('.', "_"), format!("{}_{p}", r.group)));
            }
        }
        let got: BTreeSet<(String, String)> = triggers
            .iter()
            .map(|t| {
                assert_eq!(t["type"], "nats-jetstream");
                (
                    t["metadata"]["stream"].as_str().unwrap().to_string(),
                    t["metadata"]["consumer"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got, expected, "{role}");
    }
    // The token comes from its Secret, in the pods and the hook Job.
    let job = hook_job(&objs).unwrap();
    assert!(job["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "NEXUS_BUS__NATS__TOKEN"
            && e["valueFrom"]["secretKeyRef"]["name"] == "nats-auth"));
}

#[test]
fn keda_off_keeps_fixed_replicas_and_per_role_overrides() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &["keda-off-values.yaml"], &[]);
    check_common(&objs, "keda-off");
    check_hook_job(&objs, "keda-off");
    assert!(scaled_objects(&objs).is_empty());
    for (role, d) in worker_deployments(&objs) {
        let want = if role == "conversation" { 4 } else { 2 };
        assert_eq!(d["spec"]["replicas"], want, "{role}");
        // One role can run another image tag (consumers roll before producers).
        let image = d["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap();
        let tag = if role == "history" { "0.2.0" } else { "0.1.0" };
        assert!(image.ends_with(&format!(":{tag}")), "{role}: {image}");
        // "auto" leaves the pool to tokio (the CPU limit); a count overrides one role alone.
        let threads = env_value(
            &d["spec"]["template"]["spec"]["containers"][0],
            "TOKIO_WORKER_THREADS",
        );
        let want = match role.as_str() {
            "conversation" => None,
            "history" => Some("1"),
            _ => Some("2"),
        };
        assert_eq!(threads.as_deref(), want, "{role}: async threads");
    }
}

#[test]
fn one_role_only_renders_that_role_alone() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &["one-role-values.yaml"], &[]);
    check_common(&objs, "one-role");
    assert_eq!(roles_of(&objs), vec!["history".to_string()]);
    assert!(edge_deployment(&objs).is_none(), "edge disabled");
    assert!(hook_job(&objs).is_none(), "hook Job disabled");
    let sos = scaled_objects(&objs);
    assert_eq!(sos.len(), 1);
    assert_eq!(sos[0]["spec"]["scaleTargetRef"]["name"], "t-nexus-history");
}

#[test]
fn chart_refuses_inline_secrets_unknown_roles_and_short_grace() {
    let Some(helm) = helm() else { return };
    let chart = chart();
    let c = chart.to_str().unwrap();
    for (set, expect) in [
        ("config.http.admin_token=hunter2", "is a secret"),
        (
            "config.stores.postgres_url=postgres://u:p@db/x",
            "is a secret",
        ),
        ("config.bus.nats.password=p", "is a secret"),
        (
            "config.workers.gws.tenants.t1.credential=x",
            "tenants.t1.credential is a secret",
        ),
        (
            "config.workers.history.ucs.tenants.t2.credential=y",
            "tenants.t2.credential is a secret",
        ),
        ("workers.roles={nope}", "is not a worker role"),
        (
            "edge.terminationGracePeriodSeconds=10",
            "too short to drain",
        ),
        (
            "workers.defaults.terminationGracePeriodSeconds=20",
            "too short to drain",
        ),
        ("bus.kind=embedded", "bus.kind must be kafka or nats"),
        (
            "secrets.clientKeySecret.name=",
            "secrets.clientKeySecret.name is required",
        ),
        // A secret as a literal env value is as inline as under `config`.
        (
            "edge.env[0].name=NEXUS_STORES__POSTGRES_URL,edge.env[0].value=postgres://u:p@db/x",
            "NEXUS_STORES__POSTGRES_URL is a secret",
        ),
        (
            "workers.overrides.gws.env[0].name=NEXUS_WORKERS__GWS__TENANTS__acme__CREDENTIAL,\
             workers.overrides.gws.env[0].value=abc",
            "NEXUS_WORKERS__GWS__TENANTS__acme__CREDENTIAL is a secret",
        ),
        (
            "workers.defaults.env[0].name=NEXUS_BUS__KAFKA__SASL_PASSWORD,\
             workers.defaults.env[0].value=p",
            "NEXUS_BUS__KAFKA__SASL_PASSWORD is a secret",
        ),
        (
            "edge.asyncThreads=0",
            "asyncThreads must be a positive number",
        ),
        (
            "workers.defaults.asyncThreads=many",
            "asyncThreads must be a positive number",
        ),
    ] {
        let (ok, _, err) = run_helm(&helm, &["template", RELEASE, c, "--set", set]);
        assert!(!ok, "--set {set} rendered");
        assert!(err.contains(expect), "--set {set}: {err}");
    }
}

#[test]
fn chart_topology_is_the_repository_topology() {
    let repo = std::fs::read_to_string(root().join("topology/nexus.yaml")).unwrap();
    let chart = std::fs::read_to_string(chart().join("files/topology.yaml")).unwrap();
    assert!(
        repo == chart,
        "charts/nexus/files/topology.yaml differs from topology/nexus.yaml: \
         cp topology/nexus.yaml charts/nexus/files/topology.yaml"
    );
}

/// The pod template of a Deployment or Job.
fn pod_template(o: &Value) -> &Value {
    &o["spec"]["template"]
}

/// Every pod the release runs: the Deployments and the hook Job.
fn pods(objs: &[Value]) -> Vec<&Value> {
    let mut v = of_kind(objs, "Deployment");
    v.extend(of_kind(objs, "Job"));
    v
}

#[test]
fn pod_labels_annotations_and_scheduling_reach_every_pod_the_hook_job_too() {
    let Some(helm) = helm() else { return };
    // E.g. a NetworkPolicy letting labelled pods reach the bus, no mesh sidecar (a Job with one
    // never completes), dedicated tainted nodes: the hook Job needs them as much as the pods.
    let objs = render(
        &helm,
        &[],
        &[
            "--set-json",
            r#"podLabels={"team":"chat"}"#,
            "--set-json",
            r#"podAnnotations={"sidecar.istio.io/inject":"false"}"#,
            "--set-json",
            r#"nodeSelector={"pool":"nexus"}"#,
            "--set-json",
            r#"tolerations=[{"key":"dedicated","operator":"Equal","value":"nexus","effect":"NoSchedule"}]"#,
            "--set-json",
            r#"affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"zone","operator":"In","values":["a"]}]}]}}}"#,
            "--set-json",
            r#"serviceAccount={"create":false,"name":"nexus-sa"}"#,
        ],
    );
    check_common(&objs, "pod settings");
    let all = pods(&objs);
    assert!(hook_job(&objs).is_some() && all.len() == WORKER_ROLES.len() + 2);
    for o in all {
        let t = pod_template(o);
        let what = name(o);
        assert_eq!(t["metadata"]["labels"]["team"], "chat", "{what}");
        assert_eq!(
            t["metadata"]["annotations"]["sidecar.istio.io/inject"], "false",
            "{what}"
        );
        let spec = &t["spec"];
        assert_eq!(spec["nodeSelector"]["pool"], "nexus", "{what}");
        assert_eq!(spec["tolerations"][0]["key"], "dedicated", "{what}");
        assert!(spec["affinity"]["nodeAffinity"].is_mapping(), "{what}");
        // An account the chart does not create exists before the pre-install hook runs.
        assert_eq!(spec["serviceAccountName"], "nexus-sa", "{what}");
    }
    // The chart's own account is created with the release, after the pre-install hook.
    let objs = render(&helm, &[], &[]);
    let job = hook_job(&objs).unwrap();
    assert!(
        pod_template(job)["spec"]
            .get("serviceAccountName")
            .is_none(),
        "the hook Job cannot use a ServiceAccount created after it"
    );
}

#[test]
fn tenant_ids_with_dots_render_as_one_toml_key() {
    let Some(helm) = helm() else { return };
    // Tenant ids may hold `.` (provisioning identifiers: a-z A-Z 0-9 . _ -); a bare TOML key
    // `tenants.acme.eu` is a table `acme` with a key `eu`, which nexus refuses at load.
    let objs = render(
        &helm,
        &[],
        &[
            "--set-json",
            r#"config.workers={"gws":{"url":"https://gws.example.com","tenants":{"acme.eu":{"url":"https://gws-eu.example.com","timeout_ms":5000}}},"history":{"ucs":{"tenants":{"acme.eu":{"url":""}}}}}"#,
        ],
    );
    check_common(&objs, "tenant ids");
    let cm = of_kind(&objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == "t-nexus-config")
        .unwrap();
    let config = check_config(
        cm["data"]["config.toml"].as_str().unwrap(),
        cm["data"]["topology.yaml"].as_str().unwrap(),
        "tenant ids",
    );
    let gws = config
        .workers
        .gws
        .tenants
        .get("acme.eu")
        .expect("gws tenant acme.eu");
    assert!(
        gws.url.starts_with("https://gws-eu.example.com"),
        "{}",
        gws.url
    );
    assert!(config.workers.history.ucs.tenants.contains_key("acme.eu"));
}

#[test]
fn http_client_ca_secret_is_mounted_where_the_config_points() {
    let Some(helm) = helm() else { return };
    // UCS, GWS, webhook receivers or bots behind a private CA: http_client.ca_file must name a
    // file every pod has (nexus reads it at load), which only a mounted Secret gives.
    let objs = render(&helm, &[], &["--set", "httpClientCaSecret=corp-ca"]);
    check_common(&objs, "http client CA");
    for o in pods(&objs) {
        let spec = &pod_template(o)["spec"];
        assert!(
            spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|v| v["secret"]["secretName"] == "corp-ca"),
            "{}: no corp-ca volume",
            name(o)
        );
        assert!(
            spec["containers"][0]["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == "/etc/nexus/http-ca"),
            "{}: corp-ca not mounted",
            name(o)
        );
    }
    for m in of_kind(&objs, "ConfigMap") {
        if let Some(toml_text) = m["data"]["config.toml"].as_str() {
            assert!(
                toml_text.contains("ca_file = \"/etc/nexus/http-ca/ca.crt\""),
                "{}: http_client.ca_file is not the mounted file",
                name(m)
            );
        }
    }
}

/// `helm template` with `args` fails, saying `expect`.
fn assert_refused(helm: &Path, args: &[&str], expect: &str) {
    let chart = chart();
    let mut all = vec!["template", RELEASE, chart.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, _, err) = run_helm(helm, &all);
    assert!(!ok, "{args:?} rendered");
    assert!(err.contains(expect), "{args:?}: {err}");
}

/// The container of the Deployment of `component` (`edge` or a worker role).
fn container_of<'a>(objs: &'a [Value], component: &str) -> &'a Value {
    let d = if component == "edge" {
        edge_deployment(objs).expect("edge Deployment")
    } else {
        worker_deployments(objs)
            .into_iter()
            .find(|(r, _)| r == component)
            .unwrap_or_else(|| panic!("no {component} Deployment"))
            .1
    };
    &d["spec"]["template"]["spec"]["containers"][0]
}

#[test]
fn resources_given_replace_the_defaults_whole_and_a_request_above_its_limit_is_refused() {
    let Some(helm) = helm() else { return };
    // Raising only a request: merged with the default 512Mi limit, the API server refused the
    // Deployment (request > limit). Given resources replace the defaults whole.
    let objs = render(
        &helm,
        &[],
        &[
            "--set",
            "edge.resources.requests.memory=1Gi",
            "--set-json",
            r#"workers.overrides.history.resources={"requests":{"memory":"1Gi"}}"#,
            "--set-json",
            r#"workers.defaults.resources={"requests":{"cpu":"500m","memory":"1Gi"},"limits":{"memory":"2Gi"}}"#,
            "--set-json",
            r#"workers.overrides.gws.resources={"requests":{"cpu":"2"},"limits":{"cpu":"2"}}"#,
        ],
    );
    check_common(&objs, "resources");
    let res = |c: &str| container_of(&objs, c)["resources"].clone();
    let yaml = |s: &str| serde_yaml::from_str::<Value>(s).unwrap();
    assert_eq!(res("edge"), yaml("requests: {memory: 1Gi}"));
    assert_eq!(res("history"), yaml("requests: {memory: 1Gi}"));
    assert_eq!(
        res("gws"),
        yaml("{requests: {cpu: '2'}, limits: {cpu: '2'}}")
    );
    assert_eq!(
        res("delivery"),
        yaml("{requests: {cpu: 500m, memory: 1Gi}, limits: {memory: 2Gi}}")
    );
    // Not given: the chart's default.
    let objs = render(&helm, &[], &[]);
    assert_eq!(
        container_of(&objs, "edge")["resources"],
        yaml("{requests: {cpu: 250m, memory: 256Mi}, limits: {memory: 512Mi}}")
    );
    for (set, expect) in [
        (
            r#"edge.resources={"requests":{"memory":"1Gi"},"limits":{"memory":"512Mi"}}"#,
            "edge: resources.requests.memory 1Gi exceeds resources.limits.memory 512Mi",
        ),
        (
            r#"workers.overrides.history.resources={"requests":{"cpu":"1.5"},"limits":{"cpu":"1200m"}}"#,
            "worker history: resources.requests.cpu 1.5 exceeds resources.limits.cpu 1200m",
        ),
        (
            r#"workers.defaults.resources={"requests":{"memory":"1Gi"},"limits":{"memory":"1G"}}"#,
            "resources.requests.memory 1Gi exceeds resources.limits.memory 1G",
        ),
        (
            r#"topologyJob.resources={"limits":{"memory":"32Mi"}}"#,
            "topologyJob: resources.requests.memory 64Mi exceeds resources.limits.memory 32Mi",
        ),
    ] {
        assert_refused(&helm, &["--set-json", set], expect);
    }
}

/// Whether `pdb` lets a drain evict a pod of a Deployment running `replicas` pods.
fn pdb_lets_a_pod_go(pdb: &Value, replicas: u64) -> bool {
    let spec = &pdb["spec"];
    if let Some(min) = spec["minAvailable"].as_u64() {
        return min < replicas;
    }
    match &spec["maxUnavailable"] {
        Value::Number(n) => n.as_u64().is_some_and(|n| n >= 1),
        // A percentage rounds up to a whole pod.
        Value::String(p) => p
            .strip_suffix('%')
            .and_then(|p| p.parse::<u64>().ok())
            .is_some_and(|p| p > 0),
        _ => false,
    }
}

#[test]
fn pod_disruption_budgets_never_block_draining_a_single_replica() {
    let Some(helm) = helm() else { return };
    // minAvailable: 1 over one edge pod refused every eviction: node drains hung forever.
    for extra in [
        &[
            "--set",
            "edge.replicas=1",
            "--set",
            "workers.defaults.replicas=1",
        ][..],
        &[
            "--set-json",
            r#"edge.hpa={"enabled":true,"minReplicas":1,"maxReplicas":3}"#,
            "--set",
            "keda.enabled=true,keda.minReplicaCount=1",
        ][..],
        &[
            "--set",
            "edge.replicas=1",
            "--set-string",
            "workers.defaults.pdb.maxUnavailable=50%",
        ][..],
    ] {
        let objs = render(&helm, &[], extra);
        check_common(&objs, "one replica");
        let pdbs = of_kind(&objs, "PodDisruptionBudget");
        assert_eq!(pdbs.len(), WORKER_ROLES.len() + 1, "{extra:?}");
        for pdb in pdbs {
            assert!(
                pdb_lets_a_pod_go(pdb, 1),
                "{extra:?}: {} blocks draining one replica: {:?}",
                name(pdb),
                pdb["spec"]
            );
        }
    }
    for (set, expect) in [
        (
            "edge.pdb.minAvailable=1",
            "edge: pdb.minAvailable would block",
        ),
        (
            "edge.pdb.maxUnavailable=0",
            "edge: pdb.maxUnavailable must be at least 1",
        ),
        (
            "workers.overrides.gws.pdb.maxUnavailable=0%",
            "worker gws: pdb.maxUnavailable must be at least 1",
        ),
    ] {
        assert_refused(&helm, &["--set", set], expect);
    }
}

/// The nexus config of the release's ConfigMap, loaded by nexus.
fn release_config(objs: &[Value], what: &str) -> nexus::config::Config {
    let cm = of_kind(objs, "ConfigMap")
        .into_iter()
        .find(|m| name(m) == "t-nexus-config")
        .expect("config ConfigMap");
    check_config(
        cm["data"]["config.toml"].as_str().unwrap(),
        cm["data"]["topology.yaml"].as_str().unwrap(),
        what,
    )
}

#[test]
fn listen_address_takes_ipv6_for_ipv6_only_clusters() {
    let Some(helm) = helm() else { return };
    let objs = render(&helm, &[], &[]);
    assert_eq!(release_config(&objs, "default").http.listen, "0.0.0.0:8080");
    // On an IPv6-only cluster the pod has no IPv4 address: 0.0.0.0 serves nothing.
    for address in ["::", "[::]"] {
        let objs = render(&helm, &[], &["--set", &format!("listenAddress={address}")]);
        check_common(&objs, "ipv6");
        let config = release_config(&objs, "ipv6");
        assert_eq!(config.http.listen, "[::]:8080", "listenAddress={address}");
        for m in of_kind(&objs, "ConfigMap") {
            if let Some(toml_text) = m["data"]["config.toml"].as_str() {
                assert!(
                    toml_text.contains("listen = \"[::]:8080\""),
                    "{}: the hook's config too",
                    name(m)
                );
            }
        }
    }
    // What the chart owns (probes, ports and Services follow it) is not set around it.
    assert_refused(
        &helm,
        &["--set", "config.http.listen=[::]:9000"],
        "config.http.listen is set by the chart: use listenAddress",
    );
    assert_refused(
        &helm,
        &[
            "--set-json",
            r#"edge.env=[{"name":"NEXUS_HTTP__LISTEN","value":"[::]:9000"}]"#,
        ],
        "NEXUS_HTTP__LISTEN is set by the chart",
    );
}

#[test]
fn long_release_names_keep_every_name_within_63_characters_and_apart() {
    let Some(helm) = helm() else { return };
    // Helm takes release names of up to 53 characters; fullnameOverride up to 63.
    let release = format!("nexus-{}", "a".repeat(47));
    let long = "b".repeat(60);
    let full = "c".repeat(63);
    let everything = [
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.dashboard.enabled=true,keda.enabled=true",
        "--set",
        "edge.hpa.enabled=true,edge.ingress.enabled=true",
    ];
    for (rel, extra) in [
        (release.as_str(), vec![]),
        (
            "t",
            vec!["--set".to_string(), format!("fullnameOverride={long}")],
        ),
        (
            "t",
            vec!["--set".to_string(), format!("fullnameOverride={full}")],
        ),
        (
            "t",
            vec!["--set".to_string(), format!("nameOverride={long}")],
        ),
    ] {
        let mut args: Vec<&str> = everything.to_vec();
        args.extend(extra.iter().map(String::as_str));
        let objs = render_release(&helm, rel, &[], &args);
        let what = format!("{rel} {extra:?}");
        check_common(&objs, &what);
        let mut seen = BTreeSet::new();
        for o in &objs {
            let n = name(o);
            assert!(
                !n.is_empty() && n.len() <= 63,
                "{what}: {} {n} ({} chars)",
                kind(o),
                n.len()
            );
            assert!(!n.ends_with('-'), "{what}: {n}");
            assert!(
                seen.insert((kind(o), n)),
                "{what}: two {} named {n}",
                kind(o)
            );
        }
        // References name what is rendered.
        let has = |k: &str, n: &str| seen.contains(&(k, n));
        for so in scaled_objects(&objs) {
            let target = so["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            assert!(has("Deployment", target), "{what}: ScaledObject → {target}");
        }
        for hpa in of_kind(&objs, "HorizontalPodAutoscaler") {
            let target = hpa["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
            assert!(has("Deployment", target), "{what}: HPA → {target}");
        }
        let ingress = of_kind(&objs, "Ingress")[0];
        let backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]
            .as_str()
            .unwrap();
        assert!(has("Service", backend), "{what}: Ingress → {backend}");
        for o in pods(&objs) {
            for v in pod_template(o)["spec"]["volumes"].as_sequence().unwrap() {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    assert!(has("ConfigMap", cm), "{what}: {} mounts {cm}", name(o));
                }
            }
        }
    }
}

#[test]
fn hook_job_runs_the_workers_image() {
    let Some(helm) = helm() else { return };
    let job_image = |extra: &[&str]| -> String {
        let objs = render(&helm, &[], extra);
        let job = hook_job(&objs).expect("hook Job");
        pod_template(job)["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(job_image(&[]), "ghcr.io/nexus-hub/nexus:0.1.0");
    // A staged upgrade (charts/operations.md): new workers, old edge and image.tag. The Job
    // creates the topics the new workers need and reads the config they run with: their image.
    assert_eq!(
        job_image(&[
            "--set",
            "image.tag=0.1.0,workers.defaults.imageTag=0.2.0,edge.imageTag=0.1.0"
        ]),
        "ghcr.io/nexus-hub/nexus:0.2.0"
    );
    assert_eq!(
        job_image(&[
            "--set",
            "workers.defaults.imageTag=0.2.0,topologyJob.imageTag=0.3.0"
        ]),
        "ghcr.io/nexus-hub/nexus:0.3.0"
    );
    assert_eq!(
        job_image(&["--set", "image.tag=0.4.0"]),
        "ghcr.io/nexus-hub/nexus:0.4.0"
    );
}

#[test]
fn grace_checks_see_drain_times_set_in_env() {
    let Some(helm) = helm() else { return };
    // Env overrides the config: a longer drain set there outlasted the checked grace (SIGKILL
    // mid-drain).
    for (set, expect) in [
        (
            r#"workers.defaults.env=[{"name":"NEXUS_CONSUMER__DRAIN_MS","value":"60000"}]"#,
            "worker conversation: terminationGracePeriodSeconds 60 is too short to drain",
        ),
        (
            r#"workers.overrides.history.env=[{"name":"nexus_consumer__handler_timeout_ms","value":"50000"}]"#,
            "worker history: terminationGracePeriodSeconds 60 is too short to drain",
        ),
        (
            r#"edge.env=[{"name":"NEXUS_HTTP__SHUTDOWN_GRACE_MS","value":"60000"}]"#,
            "edge: terminationGracePeriodSeconds 40 is too short to drain",
        ),
        // The webhook dispatcher's attempts under way finish within the same grace.
        (
            r#"workers.overrides.webhooks.env=[{"name":"NEXUS_WORKERS__WEBHOOKS__TIMEOUT_MS","value":"56000"}]"#,
            "worker webhooks: terminationGracePeriodSeconds 60 is too short to drain (workers.webhooks.timeout_ms + 5 s = 61000ms",
        ),
        (
            r#"config={"workers":{"webhooks":{"timeout_ms":56000}}}"#,
            "worker webhooks: terminationGracePeriodSeconds 60 is too short to drain",
        ),
        // A value the chart cannot read is refused rather than assumed.
        (
            r#"edge.env=[{"name":"NEXUS_HTTP__SHUTDOWN_GRACE_MS","valueFrom":{"configMapKeyRef":{"name":"x","key":"y"}}}]"#,
            "edge: env NEXUS_HTTP__SHUTDOWN_GRACE_MS must be a literal number of ms",
        ),
    ] {
        assert_refused(&helm, &["--set-json", set], expect);
    }
    // With the grace raised to match, it renders, and the pods get the variable.
    let objs = render(
        &helm,
        &[],
        &[
            "--set-json",
            r#"workers.defaults.env=[{"name":"NEXUS_CONSUMER__DRAIN_MS","value":"60000"}]"#,
            "--set",
            "workers.defaults.terminationGracePeriodSeconds=95",
        ],
    );
    check_common(&objs, "drain in env");
    // A webhook timeout within the grace renders (50 s + 5 s + 5 s to exit = 60 s).
    render(
        &helm,
        &[],
        &["--set", "config.workers.webhooks.timeout_ms=50000"],
    );
    assert_eq!(
        env_value(container_of(&objs, "gws"), "NEXUS_CONSUMER__DRAIN_MS").as_deref(),
        Some("60000")
    );
}

/// Whether helm's output names the value at `path` (helm 3.19+ and 4 write `'/edge/replicas'`,
/// older helm `edge.replicas`).
fn names_value(out: &str, path: &[&str]) -> bool {
    out.contains(&format!("'/{}'", path.join("/"))) || out.contains(&path.join("."))
}

#[test]
fn values_schema_refuses_typos_and_wrong_types_and_takes_every_documented_value() {
    let Some(helm) = helm() else { return };
    let chart = chart();
    let c = chart.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |file: &str, yaml: &str| -> String {
        let path = dir.path().join(file);
        std::fs::write(&path, yaml).unwrap();
        path.display().to_string()
    };
    // Without a schema a misspelt key was ignored (the default silently stayed) and a wrong type
    // rendered into a manifest the API server refused at install. values.schema.json refuses
    // both at template and lint time, naming the key.
    for (yaml, unknown) in [
        ("replicaCont: 3\n", "replicaCont"),
        ("nodeSelektor: {pool: nexus}\n", "nodeSelektor"),
        ("edge:\n  replicaCont: 3\n", "replicaCont"),
        (
            "workers:\n  overrides:\n    history:\n      replica: 3\n",
            "replica",
        ),
        ("edge:\n  pdb:\n    maxUnavaliable: 1\n", "maxUnavaliable"),
    ] {
        let file = write("typo.yaml", yaml);
        for args in [
            &["template", RELEASE, c, "-f", &file][..],
            &["lint", "--strict", c, "-f", &file][..],
        ] {
            let (ok, out, err) = run_helm(&helm, args);
            let all = format!("{out}{err}");
            assert!(!ok, "{} took {yaml:?}", args[0]);
            assert!(
                all.contains("don't meet the specifications of the schema")
                    && all.contains(unknown)
                    && all.contains("not allowed"),
                "{} {yaml:?}: {all}",
                args[0]
            );
        }
    }
    for (yaml, path) in [
        ("edge:\n  replicas: two\n", &["edge", "replicas"][..]),
        (
            "edge:\n  service:\n    port: 70000\n",
            &["edge", "service", "port"],
        ),
        (
            "edge:\n  service:\n    port: 0\n",
            &["edge", "service", "port"],
        ),
        (
            "edge:\n  service:\n    type: Loadbalancer\n",
            &["edge", "service", "type"],
        ),
        (
            "workers:\n  defaults:\n    replicas: -1\n",
            &["workers", "defaults", "replicas"],
        ),
        (
            "workers:\n  overrides:\n    gws:\n      terminationGracePeriodSeconds: 90s\n",
            &[
                "workers",
                "overrides",
                "gws",
                "terminationGracePeriodSeconds",
            ],
        ),
        (
            "metrics:\n  serviceMonitor:\n    interval: 15 seconds\n",
            &["metrics", "serviceMonitor", "interval"],
        ),
        ("podLabels:\n  tier: 1\n", &["podLabels", "tier"]),
        ("bus:\n  tls: \"yes\"\n", &["bus", "tls"]),
        (
            "image:\n  pullPolicy: IfNotPresnt\n",
            &["image", "pullPolicy"],
        ),
    ] {
        let file = write("type.yaml", yaml);
        for args in [
            &["template", RELEASE, c, "-f", &file][..],
            &["lint", "--strict", c, "-f", &file][..],
        ] {
            let (ok, out, err) = run_helm(&helm, args);
            let all = format!("{out}{err}");
            assert!(!ok, "{} took {yaml:?}", args[0]);
            assert!(
                all.contains("don't meet the specifications of the schema")
                    && names_value(&all, path),
                "{} {yaml:?}: no schema error naming {path:?}: {all}",
                args[0]
            );
        }
    }
    // What values.yaml, README and charts/operations.md show still renders and lints.
    let documented = write(
        "documented.yaml",
        r#"
listenAddress: "::"
tls: {secretName: nexus-tls}
probes:
  startup: {failureThreshold: 240}
edge:
  asyncThreads: auto
  preStopSleepSeconds: 0
  pdb: {enabled: true, maxUnavailable: "50%"}
  ingress:
    enabled: true
    tls: [{secretName: nexus-ingress-tls, hosts: [nexus.example.com]}]
workers:
  roles: []
  overrides:
    conversation:
      replicas: 4
      resources: {requests: {cpu: "1", memory: 512Mi}}
      asyncThreads: auto
metrics:
  serviceMonitor:
    enabled: true
    tlsConfig: {ca: {secret: {name: nexus-ca, key: ca.crt}}, serverName: nexus}
"#,
    );
    let (ok, out, err) = run_helm(&helm, &["lint", "--strict", c, "-f", &documented]);
    assert!(ok, "helm lint --strict -f documented values: {out}{err}");
    check_common(&render(&helm, &[&documented], &[]), "documented values");
    // charts/operations.md: a staged upgrade, and dropping a minAvailable that --reuse-values
    // carried over from an older chart.
    let old = write("old.yaml", "edge:\n  pdb:\n    minAvailable: 1\n");
    for extra in [
        &[
            "--set",
            "workers.defaults.imageTag=NEW",
            "--set",
            "edge.imageTag=OLD",
        ][..],
        &[
            "--set",
            "image.tag=NEW",
            "--set",
            "workers.defaults.imageTag=",
            "--set",
            "edge.imageTag=",
            "--set",
            "workers.overrides.conversation.imageTag=",
        ],
    ] {
        render(&helm, &[], extra);
    }
    render(&helm, &[&old], &["--set", "edge.pdb.minAvailable=null"]);
}

#[test]
fn hook_objects_are_deleted_once_the_hooks_succeed() {
    let Some(helm) = helm() else { return };
    // The hook ConfigMap had before-hook-creation only: hook objects are no part of the release,
    // so `helm uninstall` left it behind. Every hook object now goes when the hooks succeed;
    // helm deletes those only after the last hook of the event (the Job) completed, so the
    // ConfigMap, created first, is there for each of the Job's pods.
    for values in [&[][..], &["kafka-values.yaml"], &["nats-values.yaml"]] {
        let objs = render(&helm, values, &[]);
        check_hook_job(&objs, "hook cleanup");
        let hooks: Vec<&Value> = objs
            .iter()
            .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_string())
            .collect();
        let hook_kinds: BTreeSet<&str> = hooks.iter().map(|o| kind(o)).collect();
        assert_eq!(
            hook_kinds,
            BTreeSet::from(["ConfigMap", "Job"]),
            "{values:?}"
        );
        for o in hooks {
            let policies: BTreeSet<&str> = o["metadata"]["annotations"]
                ["helm.sh/hook-delete-policy"]
                .as_str()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .collect();
            assert!(
                policies.contains("hook-succeeded") && policies.contains("before-hook-creation"),
                "{values:?}: {} {} is left after success or blocks the next run: {policies:?}",
                kind(o),
                name(o)
            );
            // A failed Job stays for `kubectl logs` (charts/operations.md, "Deploy").
            if kind(o) == "Job" {
                assert!(!policies.contains("hook-failed"), "{values:?}: {}", name(o));
            }
            assert!(
                o["metadata"]["annotations"]["helm.sh/resource-policy"].is_null(),
                "{values:?}: {} kept",
                name(o)
            );
        }
    }
}
