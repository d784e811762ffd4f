//! The provisioning admin API (`/v1/admin`) and the store behind it, called in-process with
//! `oneshot`, every case on SQLite (a temp file) and on PostgreSQL (a fresh database per test;
//! `NEXUS_TEST_POSTGRES_URL` overrides `postgres://postgres@127.0.0.1:5432/test`).

use crate::common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use nexus::config::Config;
use nexus::edge::{self, AppState};
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::{AuthError, Permission, Provisioning};
use serde_json::{json, Value};
use sqlx::{AnyPool, Connection, Executor, Row};
use tower::ServiceExt;

const TOKEN: &str = "test-admin-token";
const BOT_SECRET: &str = "bot-s3cret-credential-value";

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Harness {
    state: AppState,
    /// A second connection to the same database, to look at what is stored.
    raw: AnyPool,
    /// The PostgreSQL database to drop at the end.
    database: Option<(String, String)>,
    /// Where the store is, for a second process's view of it.
    target: String,
    _dir: tempfile::TempDir,
}

fn postgres_base() -> String {
    std::env::var("NEXUS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `base` with its database name replaced.
fn with_database(base: &str, name: &str) -> String {
    let (url, query) = match base.split_once('?') {
        Some((u, q)) => (u, format!("?{q}")),
        None => (base, String::new()),
    };
    let (prefix, _) = url.rsplit_once('/').expect("a database URL has a path");
    format!("{prefix}/{name}{query}")
}

async fn harness(backend: Backend) -> Harness {
    sqlx::any::install_default_drivers();
    let dir = tempfile::tempdir().expect("tempdir");
    let (target, database) = match backend {
        Backend::Sqlite => (
            dir.path().join("provisioning.db").display().to_string(),
            None,
        ),
        Backend::Postgres => {
            let base = postgres_base();
            let name = format!("nexus_t_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&base)
                .await
                .expect("PostgreSQL reachable (NEXUS_TEST_POSTGRES_URL)");
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .expect("create database");
            admin.close().await.expect("close");
            (with_database(&base, &name), Some((base, name)))
        }
    };
    let provisioning = Provisioning::connect(&target, &EncryptionKey::generate())
        .await
        .expect("provisioning");
    let raw_url = match backend {
        Backend::Sqlite => format!("sqlite://{target}"),
        Backend::Postgres => target.clone(),
    };
    let raw = AnyPool::connect(&raw_url).await.expect("raw pool");
    let mut config = Config::defaults();
    config.bus = common::bus_config("embedded", Some(&dir.path().join("bus")));
    config.http.admin_token = TOKEN.into();
    let state = pod_state(config, dir.path(), provisioning).await;
    Harness {
        state,
        raw,
        database,
        target,
        _dir: dir,
    }
}

/// A pod's state on `provisioning`: `config`'s embedded bus with the built-in topics (some
/// admin writes publish: an agent's profile, its not-ready state on delete) and an embedded
/// session store, both under `dir`.
async fn pod_state(config: Config, dir: &std::path::Path, provisioning: Provisioning) -> AppState {
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    for spec in nexus::topology::Topology::builtin().topic_specs() {
        bus.apply_topic(&spec).await.expect("topic");
    }
    let sessions: Arc<dyn nexus::stores::session::SessionStore> = Arc::new(
        nexus::stores::session::embedded::EmbeddedStore::open(&dir.join("sessions"))
            .await
            .expect("session store"),
    );
    AppState::new(
        Arc::new(config),
        bus,
        Arc::new(nexus::topology::Topology::builtin()),
        nexus::telemetry::init_metrics(),
        Arc::new(provisioning),
        sessions,
    )
}

impl Harness {
    fn store(&self) -> &Provisioning {
        &self.state.provisioning
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Body>,
    ) -> (StatusCode, Value, String) {
        let mut r = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => r.header("content-type", "application/json").body(b),
            None => r.body(Body::empty()),
        }
        .expect("request");
        let resp = edge::app(self.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).to_string();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            text,
        )
    }

    /// An authorized call with a JSON body (or none).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let (status, value, _) = self
            .send(
                method,
                path,
                Some(TOKEN),
                body.map(|b| Body::from(b.to_string())),
            )
            .await;
        (status, value)
    }

    /// POST that must answer 201; the created object.
    async fn create(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.call(Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "POST {path}: {value}");
        value
    }

    async fn tenant(&self, name: &str) -> String {
        id(&self
            .create("/v1/admin/tenants", json!({"name": name}))
            .await)
    }

    /// Every row of `table`, as one text blob, to search for plaintext secrets.
    async fn table_text(&self, table: &str, columns: &[&str]) -> String {
        let rows = sqlx::query(&format!("SELECT {} FROM {table}", columns.join(", ")))
            .fetch_all(&self.raw)
            .await
            .expect("select");
        assert!(!rows.is_empty(), "{table} has rows");
        let mut out = String::new();
        for row in rows {
            for c in columns {
                let v: Option<String> = row.try_get(*c).expect("text column");
                out.push_str(&v.unwrap_or_default());
                out.push('|');
            }
        }
        out
    }

    async fn finish(mut self) {
        self.state.provisioning.close().await;
        self.raw.close().await;
        if let Some((base, name)) = self.database.take() {
            drop_database(&base, &name).await;
        }
    }
}

async fn drop_database(base: &str, name: &str) {
    let mut admin = sqlx::PgConnection::connect(base).await.expect("connect");
    admin
        .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .expect("drop database");
}

/// A failed test still drops its database (`finish` did not run).
impl Drop for Harness {
    fn drop(&mut self) {
        if let Some((base, name)) = self.database.take() {
            let _ = std::thread::spawn(move || {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(drop_database(&base, &name));
                }
            })
            .join();
        }
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

async fn crud_and_pagination(backend: Backend) {
    let h = harness(backend).await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(h.tenant(&format!("tenant-{i}")).await);
    }
    // Pages of 3: 3, 3, 1, no repeats, in creation order, the last without a cursor.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/v1/admin/tenants?limit=3".to_string();
    loop {
        let (status, page) = h.call(Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().expect("items");
        sizes.push(items.len());
        seen.extend(items.iter().map(id));
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/admin/tenants?limit=3&after={next}"),
            None => {
                assert!(page["next"].is_null());
                break;
            }
        }
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen, created);
    let (_, all) = h.call(Method::GET, "/v1/admin/tenants", None).await;
    assert_eq!(all["items"].as_array().expect("items").len(), 7);

    // Read, rename, delete.
    let t = &created[0];
    let (status, got) = h
        .call(Method::GET, &format!("/v1/admin/tenants/{t}"), None)
        .await;
    assert_eq!(
        (status, got["name"].as_str()),
        (StatusCode::OK, Some("tenant-0"))
    );
    let (status, renamed) = h
        .call(
            Method::PATCH,
            &format!("/v1/admin/tenants/{t}"),
            Some(json!({"name": "renamed"})),
        )
        .await;
    assert_eq!(
        (status, renamed["name"].as_str()),
        (StatusCode::OK, Some("renamed"))
    );
    let (_, got) = h
        .call(Method::GET, &format!("/v1/admin/tenants/{t}"), None)
        .await;
    assert_eq!(got["name"], "renamed");

    // Nested resources page the same way.
    let base = format!("/v1/admin/tenants/{t}/queues");
    let mut queues = HashSet::new();
    for i in 0..7 {
        queues.insert(id(&h.create(&base, json!({"name": format!("q{i}")})).await));
    }
    let (_, p1) = h.call(Method::GET, &format!("{base}?limit=3"), None).await;
    let next = p1["next"].as_str().expect("next");
    let (_, p2) = h
        .call(Method::GET, &format!("{base}?limit=3&after={next}"), None)
        .await;
    let next = p2["next"].as_str().expect("next");
    let (_, p3) = h
        .call(Method::GET, &format!("{base}?limit=3&after={next}"), None)
        .await;
    let listed: Vec<String> = [&p1, &p2, &p3]
        .iter()
        .flat_map(|p| p["items"].as_array().expect("items").iter().map(id))
        .collect();
    assert_eq!(listed.len(), 7);
    assert_eq!(listed.iter().cloned().collect::<HashSet<_>>(), queues);
    assert!(p3["next"].is_null());

    // Deleting a tenant deletes what it owns, its conversations' worker state too (those
    // tables have no foreign key to it); another tenant's stays.
    let q = listed[0].clone();
    let other = created[1].clone();
    let worker_rows = [
        "INSERT INTO history_conversations (tenant_id, conversation_id, step, started_json, \
         last_event_id, updated_at_ms) VALUES ($1, 'c1', 0, '{}', 'e1', 0)",
        "INSERT INTO history_entries (tenant_id, conversation_id, position, entry_json) \
         VALUES ($1, 'c1', 1, '{\"text\": \"my card number\"}')",
        "INSERT INTO gws_effects (tenant_id, conversation_id, effect_key, event_id, operation, \
         status, attempts, created_at_ms, updated_at_ms) \
         VALUES ($1, 'c1', 'send:m1', 'e1', 'SendMessage', 'pending', 0, 0, 0)",
        "INSERT INTO effect_backlog (role, tenant_id, conversation_id, seq, event_id, topic, \
         source_partition, source_offset, record_key, payload, headers_json, due_at_ms, \
         attempts, created_at_ms) \
         VALUES ('history', $1, 'c1', 1, 'e1', 't', 0, 0, 'c1', '', '{}', 0, 0, 0)",
    ];
    for tenant in [t.clone(), other.clone()] {
        for insert in worker_rows {
            sqlx::query(insert)
                .bind(tenant.clone())
                .execute(&h.raw)
                .await
                .expect(insert);
        }
    }
    let (status, _) = h
        .call(Method::DELETE, &format!("/v1/admin/tenants/{t}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = h
        .call(Method::GET, &format!("/v1/admin/tenants/{t}"), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND")
    );
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM queues WHERE id = $1")
        .bind(q)
        .fetch_one(&h.raw)
        .await
        .expect("count")
        .try_get("n")
        .expect("n");
    assert_eq!(left, 0);
    for table in [
        "history_conversations",
        "history_entries",
        "gws_effects",
        "effect_backlog",
    ] {
        let count = |tenant: String| {
            let sql = format!("SELECT COUNT(*) AS n FROM {table} WHERE tenant_id = $1");
            let raw = &h.raw;
            async move {
                sqlx::query(&sql)
                    .bind(tenant)
                    .fetch_one(raw)
                    .await
                    .expect("count")
                    .try_get::<i64, _>("n")
                    .expect("n")
            }
        };
        assert_eq!(count(t.clone()).await, 0, "{table} of the deleted tenant");
        assert_eq!(count(other.clone()).await, 1, "{table} of another tenant");
    }
    let (_, all) = h.call(Method::GET, "/v1/admin/tenants", None).await;
    assert_eq!(all["items"].as_array().expect("items").len(), 6);

    // /readyz checks the provisioning database too.
    let (status, ready, _) = h.send(Method::GET, "/readyz", None, None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert!(ready["provisioning"].is_string(), "{ready}");
    h.finish().await;
}

async fn validation_errors(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let tp = format!("/v1/admin/tenants/{t}");
    let long = format!(r#"{{"name": "{}"}}"#, "x".repeat(201));
    let cases: Vec<(Method, String, &str, StatusCode, &str, &str)> = vec![
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            r#"{"name": "a", "colour": "red"}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "colour",
        ),
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            r#"{"name": "a""#,
            StatusCode::BAD_REQUEST,
            "INVALID_JSON",
            "",
        ),
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            r#"{}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "name",
        ),
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            r#"{"name": "  "}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`name`",
        ),
        (
            Method::POST,
            "/v1/admin/tenants".into(),
            &long,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`name`",
        ),
        (
            Method::PATCH,
            tp.clone(),
            r#"{"nom": "x"}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "nom",
        ),
        (
            Method::POST,
            format!("{tp}/api-keys"),
            r#"{"name": "k", "permissions": []}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`permissions`",
        ),
        (
            Method::POST,
            format!("{tp}/api-keys"),
            r#"{"name": "k", "permissions": ["root"]}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "root",
        ),
        (
            Method::POST,
            format!("{tp}/api-keys"),
            r#"{"name": "k", "permissions": ["chat"], "expires_at_ms": -5}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`expires_at_ms`",
        ),
        // Seconds where milliseconds are due: a key expired from birth, refused.
        (
            Method::POST,
            format!("{tp}/api-keys"),
            r#"{"name": "k", "permissions": ["chat"], "expires_at_ms": 1767225600}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "looks like seconds",
        ),
        (
            Method::POST,
            format!("{tp}/queues"),
            r#"{"name": ""}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`name`",
        ),
        (
            Method::POST,
            format!("{tp}/agents"),
            r#"{"name": "a", "skills": ["has space"]}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`skills`",
        ),
        (
            Method::POST,
            format!("{tp}/agents"),
            r#"{"name": "a", "capacity": {"chat": -1}}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "capacity",
        ),
        (
            Method::POST,
            format!("{tp}/agents"),
            r#"{"name": "a", "capacity": {"chat": 100000}}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`capacity`",
        ),
        (
            Method::POST,
            format!("{tp}/bots"),
            r#"{"name": "b", "url": "ftp://bot", "credential": "c"}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`url`",
        ),
        (
            Method::POST,
            format!("{tp}/bots"),
            r#"{"name": "b", "url": "http://169.254.169.254/latest", "credential": "c"}"#,
            StatusCode::BAD_REQUEST,
            "BOT_TARGET_PRIVATE",
            "`url`",
        ),
        (
            Method::POST,
            format!("{tp}/bots"),
            r#"{"name": "b", "url": "https://bot.example", "credential": ""}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`credential`",
        ),
        (
            Method::POST,
            format!("{tp}/routing-rules"),
            r#"{"channel": "web chat", "queue_id": "q"}"#,
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`channel`",
        ),
        (
            Method::GET,
            "/v1/admin/tenants?limit=0".into(),
            "",
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`limit`",
        ),
        (
            Method::GET,
            "/v1/admin/tenants?limit=501".into(),
            "",
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`limit`",
        ),
        (
            Method::GET,
            "/v1/admin/tenants?limit=many".into(),
            "",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
            "",
        ),
        (
            Method::GET,
            "/v1/admin/tenants?after=%21%21".into(),
            "",
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            "`after`",
        ),
        (
            Method::GET,
            format!("{tp}/queues?sort=name"),
            "",
            StatusCode::BAD_REQUEST,
            "INVALID_QUERY",
            "sort",
        ),
    ];
    for (method, path, body, status, want_code, mention) in cases {
        let body = (!body.is_empty()).then(|| Body::from(body.to_string()));
        let (got, value, text) = h.send(method.clone(), &path, Some(TOKEN), body).await;
        assert_eq!(got, status, "{method} {path}: {text}");
        assert_eq!(code(&value), want_code, "{method} {path}: {text}");
        let message = value["error"]["message"].as_str().expect("message");
        assert!(message.contains(mention), "{method} {path}: {message}");
    }
    // Nothing invalid was stored.
    let (_, all) = h.call(Method::GET, "/v1/admin/tenants", None).await;
    assert_eq!(all["items"].as_array().expect("items").len(), 1);
    for r in ["api-keys", "queues", "agents", "bots", "routing-rules"] {
        let (_, list) = h.call(Method::GET, &format!("{tp}/{r}"), None).await;
        assert_eq!(list["items"], json!([]), "{r}");
    }
    h.finish().await;
}

async fn conflicts_and_not_found(backend: Backend) {
    let h = harness(backend).await;
    let a = h.tenant("acme").await;
    let b = h.tenant("globex").await;
    let ap = format!("/v1/admin/tenants/{a}");
    let bp = format!("/v1/admin/tenants/{b}");

    let (status, body) = h
        .call(
            Method::POST,
            "/v1/admin/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "CONFLICT"));
    let (status, body) = h
        .call(Method::PATCH, &bp, Some(json!({"name": "acme"})))
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "CONFLICT"));

    let q = id(&h
        .create(&format!("{ap}/queues"), json!({"name": "sales"}))
        .await);
    let (status, body) = h
        .call(
            Method::POST,
            &format!("{ap}/queues"),
            Some(json!({"name": "sales"})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "CONFLICT"),
        "{body}"
    );
    // The same name in another tenant is fine.
    h.create(&format!("{bp}/queues"), json!({"name": "sales"}))
        .await;
    let q2 = id(&h
        .create(&format!("{ap}/queues"), json!({"name": "support"}))
        .await);
    let (status, _) = h
        .call(
            Method::PATCH,
            &format!("{ap}/queues/{q2}"),
            Some(json!({"name": "sales"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    h.create(&format!("{ap}/agents"), json!({"name": "ann"}))
        .await;
    let (status, body) = h
        .call(
            Method::POST,
            &format!("{ap}/agents"),
            Some(json!({"name": "ann"})),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "CONFLICT"));

    // A queue or bot in use by a rule cannot be deleted.
    let bot = id(&h
        .create(
            &format!("{ap}/bots"),
            json!({"name": "faq", "url": "https://bot.example/faq", "credential": BOT_SECRET}),
        )
        .await);
    let rule = id(&h
        .create(
            &format!("{ap}/routing-rules"),
            json!({"channel": "chat", "queue_id": q, "bot_id": bot}),
        )
        .await);
    let (status, body) = h
        .call(Method::DELETE, &format!("{ap}/queues/{q}"), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "CONFLICT"),
        "{body}"
    );
    let (status, _) = h
        .call(Method::DELETE, &format!("{ap}/bots/{bot}"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Unlinking the bot (null) lets it go.
    let (status, body) = h
        .call(
            Method::PATCH,
            &format!("{ap}/routing-rules/{rule}"),
            Some(json!({"bot_id": null})),
        )
        .await;
    assert_eq!((status, &body["bot_id"]), (StatusCode::OK, &Value::Null));
    let (status, _) = h
        .call(Method::DELETE, &format!("{ap}/bots/{bot}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    // Unknown ids.
    let missing = "0193a4b2-0000-7000-8000-000000000000";
    let cases = [
        (format!("/v1/admin/tenants/{missing}"), "TENANT_NOT_FOUND"),
        (
            format!("/v1/admin/tenants/{missing}/queues/{q}"),
            "TENANT_NOT_FOUND",
        ),
        (format!("{ap}/api-keys/{missing}"), "API_KEY_NOT_FOUND"),
        (format!("{ap}/queues/{missing}"), "QUEUE_NOT_FOUND"),
        (format!("{ap}/agents/{missing}"), "AGENT_NOT_FOUND"),
        (
            format!("{ap}/routing-rules/{missing}"),
            "ROUTING_RULE_NOT_FOUND",
        ),
        (format!("{ap}/bots/{missing}"), "BOT_NOT_FOUND"),
    ];
    for (path, want) in cases {
        for method in [Method::GET, Method::PATCH, Method::DELETE] {
            let body = (method == Method::PATCH).then(|| json!({}));
            let (status, body) = h.call(method.clone(), &path, body).await;
            assert_eq!(
                (status, code(&body)),
                (StatusCode::NOT_FOUND, want),
                "{method} {path}"
            );
        }
    }
    let (status, body) = h
        .call(
            Method::POST,
            &format!("/v1/admin/tenants/{missing}/queues"),
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND")
    );
    for kind in ["api-keys", "queues", "agents", "routing-rules", "bots"] {
        let (status, body) = h
            .call(
                Method::GET,
                &format!("/v1/admin/tenants/{missing}/{kind}"),
                None,
            )
            .await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::NOT_FOUND, "TENANT_NOT_FOUND"),
            "{kind}"
        );
    }
    let (status, body) = h
        .call(
            Method::POST,
            &format!("{ap}/routing-rules"),
            Some(json!({"channel": "chat", "queue_id": missing})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "QUEUE_NOT_FOUND")
    );
    let (status, body) = h
        .call(
            Method::POST,
            &format!("{ap}/routing-rules"),
            Some(json!({"channel": "chat", "queue_id": q, "bot_id": missing})),
        )
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "BOT_NOT_FOUND")
    );
    let (status, body) = h
        .call(Method::POST, &format!("{ap}/agents/{missing}/token"), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::NOT_FOUND, "AGENT_NOT_FOUND")
    );
    h.finish().await;
}

async fn admin_token_is_required(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let paths = [
        (Method::POST, "/v1/admin/tenants".to_string()),
        (Method::GET, "/v1/admin/tenants".to_string()),
        (Method::GET, format!("/v1/admin/tenants/{t}")),
        (Method::DELETE, format!("/v1/admin/tenants/{t}")),
        (Method::POST, format!("/v1/admin/tenants/{t}/api-keys")),
        (Method::GET, format!("/v1/admin/tenants/{t}/queues")),
        (Method::POST, format!("/v1/admin/tenants/{t}/bots")),
    ];
    for (method, path) in paths {
        for (token, want) in [
            (None, "AUTHENTICATION_REQUIRED"),
            (Some("wrong"), "INVALID_TOKEN"),
        ] {
            let body = Some(Body::from(json!({"name": "x"}).to_string()));
            let (status, value, text) = h.send(method.clone(), &path, token, body).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {text}");
            assert_eq!(code(&value), want, "{method} {path}");
        }
    }
    // Nothing happened.
    let (_, all) = h.call(Method::GET, "/v1/admin/tenants", None).await;
    assert_eq!(all["items"].as_array().expect("items").len(), 1);
    // The scheme is case-insensitive (RFC 9110), the token is not.
    for (authorization, want) in [
        (format!("bearer {TOKEN}"), StatusCode::OK),
        (format!("BEARER  {TOKEN}"), StatusCode::OK),
        (
            format!("Bearer {}", TOKEN.to_uppercase()),
            StatusCode::UNAUTHORIZED,
        ),
        (format!("Basic {TOKEN}"), StatusCode::UNAUTHORIZED),
    ] {
        let req = Request::get("/v1/admin/tenants")
            .header("authorization", &authorization)
            .body(Body::empty())
            .expect("request");
        let resp = edge::app(h.state.clone())
            .oneshot(req)
            .await
            .expect("response");
        assert_eq!(resp.status(), want, "{authorization}");
    }
    // An error echoes at most a bounded part of a huge input.
    let (status, v) = h
        .call(
            Method::POST,
            &format!("/v1/admin/tenants/{t}/agents"),
            Some(json!({"name": "a", "skills": ["x".repeat(100_000)]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().len() < 400, "{} bytes", v.to_string().len());
    let (_, keys) = h
        .call(
            Method::GET,
            &format!("/v1/admin/tenants/{t}/api-keys"),
            None,
        )
        .await;
    assert_eq!(keys["items"], json!([]));
    h.finish().await;
}

async fn api_keys_are_shown_once_and_authenticate(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    // An answer with a secret shown once is kept by no cache on the way (nor is any other
    // admin answer, a refusal included).
    for token in [Some(TOKEN), None] {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/admin/tenants/{t}/api-keys"))
            .header("content-type", "application/json");
        let req = match token {
            Some(token) => req.header("authorization", format!("Bearer {token}")),
            None => req,
        };
        let body = json!({"name": "cached?", "permissions": ["chat"]}).to_string();
        let resp = edge::app(h.state.clone())
            .oneshot(req.body(Body::from(body)).expect("request"))
            .await
            .expect("response");
        let want = if token.is_some() {
            StatusCode::CREATED
        } else {
            StatusCode::UNAUTHORIZED
        };
        assert_eq!(resp.status(), want);
        assert_eq!(
            resp.headers()
                .get("cache-control")
                .and_then(|v| v.to_str().ok()),
            Some("no-store"),
            "{want}"
        );
    }
    // The answers that carry a secret once never print it in a log line.
    let created = h
        .store()
        .create_api_key(
            &t,
            serde_json::from_value(json!({"name": "debug", "permissions": ["chat"]}))
                .expect("new key"),
        )
        .await
        .expect("key");
    let printed = format!("{created:?}");
    assert!(
        !printed.contains(&created.key) && printed.contains("<redacted>"),
        "{printed}"
    );
    let base = format!("/v1/admin/tenants/{t}/api-keys");
    let created = h
        .create(
            &base,
            json!({"name": "widget", "permissions": ["chat", "messaging"]}),
        )
        .await;
    let raw = created["key"]
        .as_str()
        .expect("key shown at creation")
        .to_string();
    assert!(raw.starts_with("nxk_"), "{raw}");
    assert_eq!(created["enabled"], true);
    let key_id = id(&created);

    // Never again: not in GET, list or PATCH answers, not in the database.
    let (_, _, got) = h
        .send(Method::GET, &format!("{base}/{key_id}"), Some(TOKEN), None)
        .await;
    let (_, _, list) = h.send(Method::GET, &base, Some(TOKEN), None).await;
    let (_, _, patched) = h
        .send(
            Method::PATCH,
            &format!("{base}/{key_id}"),
            Some(TOKEN),
            Some(Body::from(json!({"name": "widget-2"}).to_string())),
        )
        .await;
    for text in [&got, &list, &patched] {
        assert!(!text.contains(&raw) && !text.contains("\"key\""), "{text}");
    }
    assert!(list.contains("widget"));
    let stored = h
        .table_text(
            "api_keys",
            &["id", "tenant_id", "name", "key_hash", "permissions"],
        )
        .await;
    assert!(
        !stored.contains(&raw) && !stored.contains(&raw[4..]),
        "{stored}"
    );

    // Authentication: valid, disabled, expired, unknown.
    let grant = h
        .store()
        .authenticate_api_key(&raw)
        .await
        .expect("valid key");
    assert_eq!(grant.tenant_id, t);
    assert_eq!(grant.key_id, key_id);
    assert!(grant.allows(Permission::Chat) && grant.allows(Permission::Messaging));
    assert!(!grant.allows(Permission::SecureMail));

    let patch = |body: Value| {
        let path = format!("{base}/{key_id}");
        let h = &h;
        async move {
            let (status, v) = h.call(Method::PATCH, &path, Some(body)).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            v
        }
    };
    assert_eq!(patch(json!({"enabled": false})).await["enabled"], false);
    assert!(matches!(
        h.store().authenticate_api_key(&raw).await,
        Err(AuthError::Disabled)
    ));
    let past = chrono::Utc::now().timestamp_millis() - 1_000;
    patch(json!({"enabled": true, "expires_at_ms": past})).await;
    assert!(matches!(
        h.store().authenticate_api_key(&raw).await,
        Err(AuthError::Expired)
    ));
    let future = chrono::Utc::now().timestamp_millis() + 3_600_000;
    patch(json!({"expires_at_ms": future})).await;
    assert!(h.store().authenticate_api_key(&raw).await.is_ok());
    assert!(patch(json!({"expires_at_ms": null})).await["expires_at_ms"].is_null());
    assert!(h.store().authenticate_api_key(&raw).await.is_ok());

    let other = format!("nxk_{}", "A".repeat(43));
    for unknown in [other.as_str(), "", "garbage", &raw[..raw.len() - 1]] {
        assert!(
            matches!(
                h.store().authenticate_api_key(unknown).await,
                Err(AuthError::Unknown)
            ),
            "{unknown}"
        );
    }
    let (status, _) = h
        .call(Method::DELETE, &format!("{base}/{key_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(matches!(
        h.store().authenticate_api_key(&raw).await,
        Err(AuthError::Unknown)
    ));
    h.finish().await;
}

/// Another pod caches an API-key lookup for its TTL: a key disabled through this pod keeps
/// working there until the TTL passes, then is refused; with a zero TTL at once.
async fn other_pods_see_key_changes_within_the_cache_ttl(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let base = format!("/v1/admin/tenants/{t}/api-keys");
    let created = h
        .create(&base, json!({"name": "widget", "permissions": ["chat"]}))
        .await;
    let raw = created["key"].as_str().expect("key").to_string();
    let key_id = id(&created);
    let ttl = Duration::from_millis(400);
    let other = Provisioning::connect(&h.target, &EncryptionKey::generate())
        .await
        .expect("second pod")
        .with_auth_cache_ttl(ttl);
    let uncached = Provisioning::connect(&h.target, &EncryptionKey::generate())
        .await
        .expect("third pod")
        .with_auth_cache_ttl(Duration::ZERO);
    assert!(other.authenticate_api_key(&raw).await.is_ok());
    assert!(uncached.authenticate_api_key(&raw).await.is_ok());
    let disabled_at = std::time::Instant::now();
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{base}/{key_id}"),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(matches!(
        uncached.authenticate_api_key(&raw).await,
        Err(AuthError::Disabled)
    ));
    if disabled_at.elapsed() < ttl / 2 {
        assert!(
            other.authenticate_api_key(&raw).await.is_ok(),
            "within the TTL the other pod still has the lookup"
        );
    }
    tokio::time::sleep(ttl).await;
    assert!(matches!(
        other.authenticate_api_key(&raw).await,
        Err(AuthError::Disabled)
    ));
    other.close().await;
    uncached.close().await;
    h.finish().await;
}

/// A chat stream open on another pod ends within that pod's cache TTL of its key being
/// disabled, as that pod's requests do (README, `stores.auth_cache_ttl_ms`), whenever the
/// stream's periodic checks fall against the pod's cached lookup of the key. Pod B (TTL 2 s)
/// reads the key again 2.4 s after the stream opened (its own write to another key emptied its
/// cache; a request of another customer does the same), then pod A disables the key: a check
/// that takes a lookup up to a TTL old, made a TTL apart, kept the stream 3.6 s.
async fn a_stream_on_another_pod_ends_within_the_cache_ttl(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let base = format!("/v1/admin/tenants/{t}/api-keys");
    let created = h
        .create(&base, json!({"name": "widget", "permissions": ["chat"]}))
        .await;
    let raw = created["key"].as_str().expect("key").to_string();
    let other = id(&h
        .create(&base, json!({"name": "other", "permissions": ["chat"]}))
        .await);
    let ttl = Duration::from_millis(2_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::defaults();
    config.bus = common::bus_config("embedded", Some(&dir.path().join("bus")));
    config.stores.auth_cache_ttl_ms = 2_000;
    let pod_b = pod_state(
        config,
        dir.path(),
        Provisioning::connect(&h.target, &EncryptionKey::generate())
            .await
            .expect("pod B's store")
            .with_auth_cache_ttl(ttl),
    )
    .await;
    let session = common::fixtures::start(&pod_b, &raw, "Ed").await;
    let opened = tokio::time::Instant::now();
    let request = Request::get(format!(
        "/nexus/v3/chat/sessions/{}/events?api_key={raw}&client_key={}",
        session.id, session.ck
    ))
    .body(Body::empty())
    .expect("request");
    let response = edge::app(pod_b.clone())
        .oneshot(request)
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::sleep_until(opened + Duration::from_millis(2_400)).await;
    pod_b
        .provisioning
        .update_api_key(
            &t,
            &other,
            serde_json::from_value(json!({"name": "other-2"})).expect("patch"),
        )
        .await
        .expect("a write on pod B");
    pod_b
        .provisioning
        .authenticate_api_key(&raw)
        .await
        .expect("pod B reads the key again");
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{base}/{}", id(&created)),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let disabled_at = tokio::time::Instant::now();
    let (ended, text) = stream_until(response, "API_KEY_DISABLED").await;
    assert!(ended, "the stream never ended: {text}");
    let after = disabled_at.elapsed();
    assert!(
        after <= ttl + Duration::from_millis(300),
        "the stream on pod B ended {after:?} after its key was disabled (TTL {ttl:?}): {text}"
    );
    pod_b.provisioning.close().await;
    h.finish().await;
}

async fn bot_credentials_are_encrypted_and_never_returned(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let base = format!("/v1/admin/tenants/{t}/bots");
    let body = json!({"name": "faq", "url": "https://bot.example/faq", "credential": BOT_SECRET});
    let (status, created, created_text) = h
        .send(
            Method::POST,
            &base,
            Some(TOKEN),
            Some(Body::from(body.to_string())),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created_text}");
    assert_eq!(created["has_credential"], true);
    let bot = id(&created);
    let (_, _, got) = h
        .send(Method::GET, &format!("{base}/{bot}"), Some(TOKEN), None)
        .await;
    let (_, _, list) = h.send(Method::GET, &base, Some(TOKEN), None).await;
    let (_, _, patched) = h
        .send(
            Method::PATCH,
            &format!("{base}/{bot}"),
            Some(TOKEN),
            Some(Body::from(
                json!({"url": "https://bot.example/v2"}).to_string(),
            )),
        )
        .await;
    // An internal address is refused on PATCH too.
    let (status, _, refused) = h
        .send(
            Method::PATCH,
            &format!("{base}/{bot}"),
            Some(TOKEN),
            Some(Body::from(
                json!({"url": "http://10.0.0.5:8500/v1/kv"}).to_string(),
            )),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused.contains("BOT_TARGET_PRIVATE"), "{refused}");
    for text in [&created_text, &got, &list, &patched] {
        assert!(
            !text.contains(BOT_SECRET) && !text.contains("\"credential\""),
            "{text}"
        );
        assert!(text.contains("has_credential"), "{text}");
    }
    // The bot API token: shown once at creation, stored as its SHA-256 only.
    let token = created["token"].as_str().expect("bot token");
    assert!(token.starts_with("nxb_"), "{created_text}");
    for text in [&got, &list, &patched] {
        assert!(!text.contains(token) && !text.contains("token"), "{text}");
    }
    let stored = h
        .table_text(
            "bots",
            &["id", "tenant_id", "name", "url", "credential", "token_hash"],
        )
        .await;
    assert!(!stored.contains(&token[4..]), "{stored}");
    assert!(stored.contains(&nexus::stores::provisioning::secrets::hash_token(token)));
    assert!(!stored.contains(BOT_SECRET), "{stored}");
    assert!(!stored.contains("s3cret"), "{stored}");

    let (endpoint, credential) = h.store().bot_credential(&t, &bot).await.expect("decrypts");
    assert_eq!(credential, BOT_SECRET);
    assert_eq!(endpoint.url, "https://bot.example/v2");

    // A new credential replaces the old one.
    let (status, patched) = h
        .call(
            Method::PATCH,
            &format!("{base}/{bot}"),
            Some(json!({"credential": "rotated-value"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!patched.to_string().contains("rotated-value"));
    let (_, credential) = h.store().bot_credential(&t, &bot).await.expect("decrypts");
    assert_eq!(credential, "rotated-value");

    // Another tenant cannot read it, and a ciphertext moved to another row does not decrypt.
    let other = h.tenant("globex").await;
    assert!(h.store().bot_credential(&other, &bot).await.is_err());
    let b2 = id(&h
        .create(
            &base,
            json!({"name": "other", "url": "https://bot.example/o", "credential": "x"}),
        )
        .await);
    sqlx::query(
        "UPDATE bots SET credential = (SELECT credential FROM bots WHERE id = $1) WHERE id = $2",
    )
    .bind(bot.clone())
    .bind(b2.clone())
    .execute(&h.raw)
    .await
    .expect("copy ciphertext");
    assert!(h.store().bot_credential(&t, &b2).await.is_err());
    h.finish().await;
}

async fn agent_tokens_authenticate_and_rotate(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let base = format!("/v1/admin/tenants/{t}/agents");
    let created = h
        .create(
            &base,
            json!({"name": "ann", "skills": ["french", "billing"], "capacity": {"chat": 3, "email": 5}}),
        )
        .await;
    let token = created["token"].as_str().expect("token once").to_string();
    assert!(token.starts_with("nxa_"));
    assert_eq!(created["skills"], json!(["billing", "french"]));
    assert_eq!(created["capacity"], json!({"chat": 3, "email": 5}));
    let agent = id(&created);
    let (_, _, got) = h
        .send(Method::GET, &format!("{base}/{agent}"), Some(TOKEN), None)
        .await;
    let (_, _, list) = h.send(Method::GET, &base, Some(TOKEN), None).await;
    for text in [&got, &list] {
        assert!(
            !text.contains(&token) && !text.contains("\"token\""),
            "{text}"
        );
    }
    let stored = h
        .table_text(
            "agents",
            &["id", "name", "skills", "capacity", "token_hash"],
        )
        .await;
    assert!(!stored.contains(&token[4..]), "{stored}");

    let authed = h
        .store()
        .authenticate_agent(&token)
        .await
        .expect("valid token");
    assert_eq!(
        (authed.id.as_str(), authed.tenant_id.as_str()),
        (agent.as_str(), t.as_str())
    );
    assert_eq!(authed.capacity.get("chat"), Some(&3));

    let (status, rotated) = h
        .call(Method::POST, &format!("{base}/{agent}/token"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_token = rotated["token"].as_str().expect("new token").to_string();
    assert_ne!(new_token, token);
    assert!(matches!(
        h.store().authenticate_agent(&token).await,
        Err(AuthError::Unknown)
    ));
    assert_eq!(
        h.store()
            .authenticate_agent(&new_token)
            .await
            .expect("new works")
            .id,
        agent
    );
    assert!(matches!(
        h.store().authenticate_agent("nxa_nope").await,
        Err(AuthError::Unknown)
    ));

    // PATCH changes skills and capacity; the store's lookup sees it.
    let (status, patched) = h
        .call(
            Method::PATCH,
            &format!("{base}/{agent}"),
            Some(json!({"capacity": {"chat": 1}})),
        )
        .await;
    assert_eq!(
        (status, &patched["capacity"]),
        (StatusCode::OK, &json!({"chat": 1}))
    );
    assert_eq!(patched["skills"], json!(["billing", "french"]));
    let stored = h.store().agent(&t, &agent).await.expect("agent");
    assert_eq!(stored.capacity.get("chat"), Some(&1));
    h.finish().await;
}

async fn routing_rules_in_priority_order(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let tp = format!("/v1/admin/tenants/{t}");
    let q = id(&h
        .create(&format!("{tp}/queues"), json!({"name": "sales"}))
        .await);
    let low = id(&h
        .create(
            &format!("{tp}/routing-rules"),
            json!({"channel": "chat", "queue_id": q, "priority": 1}),
        )
        .await);
    let high = h
        .create(
            &format!("{tp}/routing-rules"),
            json!({"channel": "chat", "queue_id": q, "priority": 10,
                   "attributes": {"lang": "fr"}, "required_skills": ["french"]}),
        )
        .await;
    assert_eq!(high["attributes"], json!({"lang": "fr"}));
    let high = id(&high);
    let mid = id(&h
        .create(
            &format!("{tp}/routing-rules"),
            json!({"channel": "sms", "queue_id": q, "priority": 5}),
        )
        .await);
    let rules = h.store().routing_rules(&t).await.expect("rules");
    let order: Vec<&str> = rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(order, vec![high.as_str(), mid.as_str(), low.as_str()]);
    let fr: BTreeMap<String, String> = [("lang".to_string(), "fr".to_string())].into();
    let first = rules
        .iter()
        .find(|r| r.matches("chat", &fr))
        .expect("a match");
    assert_eq!(first.id, high);
    let queue = h.store().queue(&t, &first.queue_id).await.expect("queue");
    assert_eq!(queue.name, "sales");
    h.finish().await;
}

/// With tenants A and B, every read, change or delete of B's objects through A's path is a 404
/// and changes nothing; lists and lookups of A never show B's objects; links across tenants
/// are refused.
async fn tenant_isolation_on_every_endpoint(backend: Backend) {
    let h = harness(backend).await;
    let a = h.tenant("tenant-a").await;
    let b = h.tenant("tenant-b").await;
    let ap = format!("/v1/admin/tenants/{a}");
    let bp = format!("/v1/admin/tenants/{b}");
    h.create(&format!("{ap}/queues"), json!({"name": "a-queue"}))
        .await;

    let b_queue = id(&h
        .create(&format!("{bp}/queues"), json!({"name": "b-queue"}))
        .await);
    let b_bot = id(&h
        .create(
            &format!("{bp}/bots"),
            json!({"name": "b-bot", "url": "https://bot.example/b", "credential": BOT_SECRET}),
        )
        .await);
    let b_key = h
        .create(
            &format!("{bp}/api-keys"),
            json!({"name": "b-key", "permissions": ["chat"]}),
        )
        .await;
    let b_raw = b_key["key"].as_str().expect("key").to_string();
    let b_agent = h
        .create(
            &format!("{bp}/agents"),
            json!({"name": "b-agent", "skills": ["x"]}),
        )
        .await;
    let b_token = b_agent["token"].as_str().expect("token").to_string();
    let b_rule = id(&h
        .create(
            &format!("{bp}/routing-rules"),
            json!({"channel": "chat", "queue_id": b_queue, "bot_id": b_bot}),
        )
        .await);
    let b_hook = id(&h
        .create(
            &format!("{bp}/webhooks"),
            json!({"url": "https://93.184.216.34/b", "format": "standard"}),
        )
        .await);
    let objects = [
        (
            "webhooks",
            b_hook.clone(),
            "WEBHOOK_NOT_FOUND",
            json!({"enabled": false, "url": "https://93.184.216.34/hijack"}),
        ),
        (
            "api-keys",
            id(&b_key),
            "API_KEY_NOT_FOUND",
            json!({"name": "hijack", "enabled": false}),
        ),
        (
            "queues",
            b_queue.clone(),
            "QUEUE_NOT_FOUND",
            json!({"name": "hijack"}),
        ),
        (
            "agents",
            id(&b_agent),
            "AGENT_NOT_FOUND",
            json!({"name": "hijack"}),
        ),
        (
            "routing-rules",
            b_rule.clone(),
            "ROUTING_RULE_NOT_FOUND",
            json!({"priority": 99}),
        ),
        (
            "bots",
            b_bot.clone(),
            "BOT_NOT_FOUND",
            json!({"name": "hijack", "credential": "stolen"}),
        ),
    ];
    let mut before = Vec::new();
    for (kind, oid, _, _) in &objects {
        let (status, v) = h
            .call(Method::GET, &format!("{bp}/{kind}/{oid}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        before.push(v);
    }
    for (kind, oid, not_found, patch) in &objects {
        let path = format!("{ap}/{kind}/{oid}");
        for (method, body) in [
            (Method::GET, None),
            (Method::PATCH, Some(patch.clone())),
            (Method::DELETE, None),
        ] {
            let (status, v) = h.call(method.clone(), &path, body).await;
            assert_eq!(
                (status, code(&v)),
                (StatusCode::NOT_FOUND, *not_found),
                "{method} {path}: {v}"
            );
            assert!(v.get("id").is_none(), "{method} {path} leaked {v}");
        }
        // A's lists never hold B's objects.
        let (status, list) = h.call(Method::GET, &format!("{ap}/{kind}"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!list.to_string().contains(oid.as_str()), "{kind}: {list}");
    }
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{ap}/agents/{}/token", id(&b_agent)),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "AGENT_NOT_FOUND")
    );
    for (method, path) in [
        (Method::POST, format!("{ap}/webhooks/{b_hook}/secret")),
        (Method::GET, format!("{ap}/webhooks/{b_hook}/messages")),
        (
            Method::GET,
            format!("{ap}/webhooks/{b_hook}/messages/msg_x"),
        ),
        (
            Method::POST,
            format!("{ap}/webhooks/{b_hook}/messages/msg_x/resend"),
        ),
    ] {
        let (status, v) = h.call(method.clone(), &path, None).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::NOT_FOUND, "WEBHOOK_NOT_FOUND"),
            "{method} {path}: {v}"
        );
        assert!(v.get("secret").is_none());
    }
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{ap}/webhooks/{b_hook}/replay"),
            Some(json!({"since_ms": 0})),
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "WEBHOOK_NOT_FOUND")
    );
    // Nothing of B changed, and B's secrets still work.
    for ((kind, oid, _, _), was) in objects.iter().zip(&before) {
        let (status, now) = h
            .call(Method::GET, &format!("{bp}/{kind}/{oid}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&now, was, "{kind} changed");
    }
    assert_eq!(
        h.store()
            .authenticate_api_key(&b_raw)
            .await
            .expect("key")
            .tenant_id,
        b
    );
    assert_eq!(
        h.store()
            .authenticate_agent(&b_token)
            .await
            .expect("token")
            .tenant_id,
        b
    );
    assert_eq!(
        h.store().bot_credential(&b, &b_bot).await.expect("bot").1,
        BOT_SECRET
    );

    // Links across tenants are refused, on create and on change.
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{ap}/routing-rules"),
            Some(json!({"channel": "chat", "queue_id": b_queue})),
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "QUEUE_NOT_FOUND")
    );
    let a_queue = id(&h
        .create(&format!("{ap}/queues"), json!({"name": "a-queue-2"}))
        .await);
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{ap}/routing-rules"),
            Some(json!({"channel": "chat", "queue_id": a_queue, "bot_id": b_bot})),
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::NOT_FOUND, "BOT_NOT_FOUND"));
    let a_rule = id(&h
        .create(
            &format!("{ap}/routing-rules"),
            json!({"channel": "chat", "queue_id": a_queue}),
        )
        .await);
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{ap}/routing-rules/{a_rule}"),
            Some(json!({"queue_id": b_queue})),
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "QUEUE_NOT_FOUND")
    );
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{ap}/routing-rules/{a_rule}"),
            Some(json!({"bot_id": b_bot})),
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::NOT_FOUND, "BOT_NOT_FOUND"));

    // The store's lookups are scoped the same way.
    let rules = h.store().routing_rules(&a).await.expect("rules");
    assert_eq!(
        rules.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![a_rule.as_str()]
    );
    assert_eq!(rules[0].queue_id, a_queue);
    assert!(h.store().queue(&a, &b_queue).await.is_err());
    assert!(h.store().agent(&a, &id(&b_agent)).await.is_err());
    assert!(h.store().bot_credential(&a, &b_bot).await.is_err());
    // Deleting A leaves B whole.
    let (status, _) = h.call(Method::DELETE, &ap, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for (kind, oid, _, _) in &objects {
        let (status, _) = h
            .call(Method::GET, &format!("{bp}/{kind}/{oid}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "{kind}");
    }
    h.finish().await;
}

async fn webhook_subscriptions_secrets_and_target_policy(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("hooks").await;
    let base = format!("/v1/admin/tenants/{t}/webhooks");
    let url = "https://93.184.216.34/hooks";

    // Created with a generated secret, shown once, stored encrypted.
    let std_hook = h
        .create(
            &base,
            json!({"url": url, "format": "standard", "events": ["FINISHED", "STARTED", "STARTED"]}),
        )
        .await;
    let secret = std_hook["secret"].as_str().expect("secret").to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert_eq!(std_hook["events"], json!(["STARTED", "FINISHED"]));
    assert_eq!(std_hook["media"], json!(["chat", "email"]));
    assert_eq!(std_hook["enabled"], true);
    let hook_id = id(&std_hook);
    let genesys = h
        .create(&base, json!({"url": url, "format": "genesys", "media": ["chat"], "secret": "a-given-genesys-secret"}))
        .await;
    assert_eq!(genesys["secret"], "a-given-genesys-secret");
    let (status, got) = h
        .call(Method::GET, &format!("{base}/{hook_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(got.get("secret").is_none(), "{got}");
    let (_, list) = h.call(Method::GET, &format!("{base}?limit=1"), None).await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    assert!(!list.to_string().contains("whsec_"));
    let next = list["next"].as_str().expect("a next page").to_string();
    let (_, rest) = h
        .call(Method::GET, &format!("{base}?limit=1&after={next}"), None)
        .await;
    assert_eq!(rest["items"][0]["id"], genesys["id"]);
    let stored = h.table_text("webhooks", &["secret"]).await;
    assert!(!stored.contains(&secret[6..]) && !stored.contains("a-given-genesys"));

    // Rotation: a new secret once; the previous one still signs during the overlap.
    let (status, rotated) = h
        .call(Method::POST, &format!("{base}/{hook_id}/secret"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().expect("new secret");
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    let target = h
        .store()
        .webhook_target(&hook_id, chrono::Utc::now().timestamp_millis())
        .await
        .expect("target")
        .expect("exists");
    assert_eq!(target.secrets.current, new_secret);
    assert_eq!(target.secrets.previous, std::slice::from_ref(&secret));
    // A second rotation within the overlap: the first secret keeps its promised time.
    let (status, third) = h
        .call(Method::POST, &format!("{base}/{hook_id}/secret"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{third}");
    let third_secret = third["secret"].as_str().expect("third secret");
    let now = chrono::Utc::now().timestamp_millis();
    let target = h
        .store()
        .webhook_target(&hook_id, now)
        .await
        .expect("target")
        .expect("exists");
    assert_eq!(target.secrets.current, third_secret);
    assert_eq!(
        target.secrets.previous,
        [new_secret.to_string(), secret.clone()],
        "newest first, the first rotation's still signing"
    );
    let first_until = rotated["previous_valid_until_ms"].as_i64().expect("until");
    let second_until = third["previous_valid_until_ms"].as_i64().expect("until");
    let at = |ms: i64| {
        let store = h.store();
        let hook_id = hook_id.clone();
        async move {
            store
                .webhook_target(&hook_id, ms)
                .await
                .expect("target")
                .expect("exists")
                .secrets
                .previous
        }
    };
    assert_eq!(
        at(first_until).await,
        [new_secret.to_string()],
        "the first ends at its time"
    );
    assert!(at(second_until).await.is_empty(), "then the second");
    let stored = h.table_text("webhooks", &["older_secrets"]).await;
    assert!(!stored.contains(&secret[6..]), "sealed at rest");
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{base}/{hook_id}/secret"),
            Some(json!({"secret": "whsec_short"})),
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
        "{v}"
    );
    // Its body's errors have the codes and shape of every other body's.
    let secret_path = format!("{base}/{hook_id}/secret");
    let too_large = format!(
        r#"{{"secret":"whsec_{}"}}"#,
        "a".repeat(nexus::config::Config::defaults().http.max_body_bytes)
    );
    for (body, want) in [
        (
            r#"{"secret":"#.to_string(),
            (StatusCode::BAD_REQUEST, "INVALID_JSON"),
        ),
        (
            too_large,
            (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
        ),
    ] {
        let (status, v, text) = h
            .send(
                Method::POST,
                &secret_path,
                Some(TOKEN),
                Some(Body::from(body)),
            )
            .await;
        assert_eq!((status, code(&v)), want, "{text}");
    }

    // Validation.
    for (body, want) in [
        (
            json!({"url": "ftp://x", "format": "standard"}),
            "INVALID_FIELD",
        ),
        (json!({"url": url, "format": "xml"}), "INVALID_BODY"),
        (
            json!({"url": url, "format": "standard", "events": []}),
            "INVALID_FIELD",
        ),
        (
            json!({"url": url, "format": "standard", "events": ["DELETED"]}),
            "INVALID_BODY",
        ),
        (
            json!({"url": url, "format": "standard", "secret": "not-whsec"}),
            "INVALID_FIELD",
        ),
        (
            json!({"url": url, "format": "genesys", "secret": "short"}),
            "INVALID_FIELD",
        ),
        (
            json!({"url": url, "format": "standard", "extra": 1}),
            "INVALID_BODY",
        ),
    ] {
        let (status, v) = h.call(Method::POST, &base, Some(body.clone())).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, want),
            "{body}: {v}"
        );
    }
    // Private, loopback and link-local targets are refused (the default policy).
    for bad in [
        "http://127.0.0.1:8080/x",
        "http://10.0.0.5/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://localhost/x",
    ] {
        let (status, v) = h
            .call(
                Method::POST,
                &base,
                Some(json!({"url": bad, "format": "genesys"})),
            )
            .await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "WEBHOOK_TARGET_PRIVATE"),
            "{bad}: {v}"
        );
        let (status, v) = h
            .call(
                Method::PATCH,
                &format!("{base}/{hook_id}"),
                Some(json!({"url": bad})),
            )
            .await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "WEBHOOK_TARGET_PRIVATE")
        );
    }

    // Change, the (empty) message log, delete.
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{base}/{hook_id}"),
            Some(json!({"enabled": false, "media": ["email"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (v["enabled"].clone(), v["media"].clone()),
        (json!(false), json!(["email"]))
    );
    let (status, v) = h
        .call(
            Method::GET,
            &format!("{base}/{hook_id}/messages?status=pending"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["items"], json!([]));
    let (status, v) = h
        .call(
            Method::GET,
            &format!("{base}/{hook_id}/messages?status=lost"),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "INVALID_FIELD")
    );
    let (status, v) = h
        .call(
            Method::GET,
            &format!("{base}/{hook_id}/messages/msg_nope"),
            None,
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "WEBHOOK_MESSAGE_NOT_FOUND")
    );
    let (status, _) = h
        .call(Method::DELETE, &format!("{base}/{hook_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, v) = h
        .call(Method::GET, &format!("{base}/{hook_id}"), None)
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "WEBHOOK_NOT_FOUND")
    );
    h.finish().await;
}

/// Two admins patching different fields of one object at once both keep their change: a key
/// disabled while someone renames it stays disabled, a webhook likewise.
async fn concurrent_patches_of_different_fields_both_stay(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let keys = format!("/v1/admin/tenants/{t}/api-keys");
    let key = id(&h
        .create(&keys, json!({"name": "widget", "permissions": ["chat"]}))
        .await);
    let hooks = format!("/v1/admin/tenants/{t}/webhooks");
    let hook = id(&h
        .create(
            &hooks,
            json!({"url": "https://hooks.example.com/a", "format": "standard"}),
        )
        .await);
    let patch = |path: String, body: Value| {
        let h = &h;
        async move {
            let (status, v, _) = h
                .send(
                    Method::PATCH,
                    &path,
                    Some(TOKEN),
                    Some(Body::from(body.to_string())),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{v}");
        }
    };
    // Routing rules have no `enabled`: a priority and a queue change race instead.
    let queues = format!("/v1/admin/tenants/{t}/queues");
    let q = [
        id(&h.create(&queues, json!({"name": "sales"})).await),
        id(&h.create(&queues, json!({"name": "support"})).await),
    ];
    let rules = format!("/v1/admin/tenants/{t}/routing-rules");
    let rule = format!(
        "{rules}/{}",
        id(&h
            .create(&rules, json!({"channel": "chat", "queue_id": q[0]}))
            .await)
    );
    for i in 0..10 {
        let (priority, queue) = (
            json!({"priority": i}),
            json!({"queue_id": q[(i % 2) as usize]}),
        );
        futures::join!(
            patch(rule.clone(), priority.clone()),
            patch(rule.clone(), queue.clone()),
        );
        let (_, now, _) = h.send(Method::GET, &rule, Some(TOKEN), None).await;
        assert_eq!(
            now["priority"], i,
            "round {i}: the priority was undone: {now}"
        );
        assert_eq!(
            now["queue_id"], queue["queue_id"],
            "round {i}: the queue was undone: {now}"
        );
    }
    for i in 0..10 {
        for (object, other) in [
            (
                format!("{keys}/{key}"),
                json!({"name": format!("widget {i}")}),
            ),
            (
                format!("{hooks}/{hook}"),
                json!({"url": format!("https://hooks.example.com/{i}")}),
            ),
        ] {
            patch(object.clone(), json!({"enabled": true})).await;
            futures::join!(
                patch(object.clone(), json!({"enabled": false})),
                patch(object.clone(), other.clone()),
            );
            let (_, now, _) = h.send(Method::GET, &object, Some(TOKEN), None).await;
            assert_eq!(
                now["enabled"], false,
                "round {i}: the disable was undone: {now}"
            );
            for (field, value) in other.as_object().expect("object") {
                assert_eq!(&now[field], value, "round {i}: {now}");
            }
        }
    }
    h.finish().await;
}

/// Ids, cursors and URLs holding a NUL (which PostgreSQL refuses in text, where SQLite would
/// store it or look it up), bytes that are not UTF-8 and a method a path does not take: the
/// same 4xx with a JSON code on both stores, nothing stored.
async fn odd_bytes_and_methods_answer_in_the_error_shape(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let tp = format!("/v1/admin/tenants/{t}");
    for path in [
        "/v1/admin/tenants/%00".to_string(),
        "/v1/admin/tenants/%FF".to_string(),
        format!("{tp}/queues/%00"),
        format!("{tp}/webhooks/a%0Ab/messages"),
    ] {
        let (status, v) = h.call(Method::GET, &path, None).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::NOT_FOUND, "NOT_FOUND"),
            "GET {path}: {v}"
        );
    }
    // `AA` is the cursor of the id "\0".
    let (status, v) = h
        .call(Method::GET, "/v1/admin/tenants?after=AA", None)
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
        "{v}"
    );
    let (status, v) = h
        .call(
            Method::POST,
            &format!("{tp}/routing-rules"),
            Some(json!({"channel": "chat", "queue_id": "\u{0}"})),
        )
        .await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::NOT_FOUND, "QUEUE_NOT_FOUND"),
        "{v}"
    );
    for (path, body) in [
        (
            format!("{tp}/bots"),
            json!({"name": "b", "url": "https://bot.example/a\u{0}b", "credential": "c"}),
        ),
        (
            format!("{tp}/webhooks"),
            json!({"url": "https://hooks.example.com/a b", "format": "standard"}),
        ),
    ] {
        let (status, v) = h.call(Method::POST, &path, Some(body)).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
            "POST {path}: {v}"
        );
    }
    for list in ["bots", "webhooks", "routing-rules"] {
        let (_, v) = h.call(Method::GET, &format!("{tp}/{list}"), None).await;
        assert_eq!(v["items"], json!([]), "{list}: nothing stored: {v}");
    }
    let (status, v) = h.call(Method::PUT, "/v1/admin/tenants", None).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
        "{v}"
    );
    // Without the token, neither a wrong method nor an odd path says anything about the API.
    for (method, path) in [
        (Method::PUT, "/v1/admin/tenants".to_string()),
        (Method::GET, "/v1/admin/tenants/%00".to_string()),
    ] {
        let (status, v, _) = h.send(method.clone(), &path, None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {v}");
    }
    h.finish().await;
}

/// Uploads racing for a conversation's last file places take each place once: on PostgreSQL a
/// statement counts only what was committed before it began, so without the conversation's lock
/// every racer saw room.
async fn racing_uploads_never_pass_the_file_limit(backend: Backend) {
    const MAX: usize = 3;
    const RACERS: usize = 24;
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let p = h.state.provisioning.clone();
    let put = |conversation: &'static str, n: usize| {
        let (p, t) = (p.clone(), t.clone());
        async move {
            p.put_file(
                nexus::stores::provisioning::NewChatFile {
                    id: None,
                    tenant_id: t,
                    conversation_id: conversation.into(),
                    name: format!("{n}.txt"),
                    content_type: "text/plain".into(),
                    data: vec![b'x'; 64 * 1024],
                    expires_at_ms: None,
                },
                MAX,
            )
            .await
            .expect("put")
        }
    };
    // Two conversations at once: one's lock does not hold the other's places.
    let stored = futures::future::join_all(
        (0..RACERS).map(|n| put(if n % 2 == 0 { "c1" } else { "c2" }, n)),
    )
    .await;
    for conversation in ["c1", "c2"] {
        let won = stored
            .iter()
            .flatten()
            .filter(|f| f.conversation_id == conversation)
            .count();
        assert_eq!(won, MAX, "{conversation}: uploads answered as stored");
        assert_eq!(p.count_files(&t, conversation).await.expect("count"), MAX);
    }
    h.finish().await;
}

/// The error's message, which must quote at most 64 characters of any value it refuses
/// (README, "Errors"): no run of 65 `A`s (or `y`s), and a bounded length.
fn assert_quotes_little(what: &str, v: &Value) {
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: an error message: {v}");
    for c in ['A', 'y'] {
        assert!(
            !message.contains(&c.to_string().repeat(65)),
            "{what}: the message quotes more than 64 characters: {message}"
        );
    }
    assert!(message.chars().count() < 600, "{what}: {message}");
}

/// Every refusal of a long value (a duplicate name, a URL that is not http(s), a field name,
/// variant or value serde refuses, a map key in a JSON path) quotes at most 64 characters of it.
async fn error_messages_quote_at_most_64_characters(backend: Backend) {
    let h = harness(backend).await;
    let long_name = "y".repeat(200);
    let t = id(&h
        .create("/v1/admin/tenants", json!({"name": long_name}))
        .await);
    let tp = format!("/v1/admin/tenants/{t}");
    let big = "A".repeat(3000);
    // Duplicate names: 409 naming the name.
    for (path, body) in [
        ("/v1/admin/tenants".to_string(), json!({"name": long_name})),
        (format!("{tp}/queues"), json!({"name": long_name})),
        (format!("{tp}/agents"), json!({"name": long_name})),
        (
            format!("{tp}/bots"),
            json!({"name": long_name, "url": "https://93.184.216.34/b", "credential": "c"}),
        ),
    ] {
        if path != "/v1/admin/tenants" {
            h.create(&path, body.clone()).await;
        }
        let (status, v) = h.call(Method::POST, &path, Some(body)).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::CONFLICT, "CONFLICT"),
            "{path}: {v}"
        );
        assert_quotes_little(&format!("duplicate at {path}"), &v);
    }
    let rename = h
        .create(&format!("{tp}/queues"), json!({"name": "short"}))
        .await;
    let (status, v) = h
        .call(
            Method::PATCH,
            &format!("{tp}/queues/{}", id(&rename)),
            Some(json!({"name": long_name})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert_quotes_little("rename to a duplicate", &v);
    // Values the target check saw before the field check: URLs without a host.
    let hook = h
        .create(
            &format!("{tp}/webhooks"),
            json!({"url": "https://93.184.216.34/h", "format": "standard"}),
        )
        .await;
    let bot = h
        .create(
            &format!("{tp}/bots"),
            json!({"name": "b", "url": "https://93.184.216.34/b", "credential": "c"}),
        )
        .await;
    for url in [format!("data:,{big}"), format!("unix:/{big}")] {
        for (method, path, body) in [
            (
                Method::POST,
                format!("{tp}/bots"),
                json!({"name": "b2", "url": url, "credential": "c"}),
            ),
            (
                Method::PATCH,
                format!("{tp}/bots/{}", id(&bot)),
                json!({"url": url}),
            ),
            (
                Method::POST,
                format!("{tp}/webhooks"),
                json!({"url": url, "format": "standard"}),
            ),
            (
                Method::PATCH,
                format!("{tp}/webhooks/{}", id(&hook)),
                json!({"url": url}),
            ),
        ] {
            let (status, v) = h.call(method.clone(), &path, Some(body)).await;
            assert_eq!(
                (status, code(&v)),
                (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
                "{method} {path}: {v}"
            );
            assert_quotes_little(&format!("{method} {path} url"), &v);
        }
    }
    // serde's messages: an unknown field, an unknown variant, a value of the wrong type, a
    // map key in the path of a refused value.
    for (path, body) in [
        (
            format!("{tp}/api-keys"),
            json!({"name": "k", "permissions": ["chat"], big.clone(): 1}),
        ),
        (
            format!("{tp}/api-keys"),
            json!({"name": "k", "permissions": [big.clone()]}),
        ),
        (
            format!("{tp}/api-keys"),
            json!({"name": "k", "permissions": ["chat"], "enabled": big.clone()}),
        ),
        (
            format!("{tp}/agents"),
            json!({"name": "a", "capacity": {big.clone(): -1}}),
        ),
        (
            format!("{tp}/webhooks"),
            json!({"url": "https://93.184.216.34/h", "format": format!("x\"{big}")}),
        ),
    ] {
        let (status, v) = h.call(Method::POST, &path, Some(body)).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "INVALID_BODY"),
            "{path}: {v}"
        );
        assert_quotes_little(&format!("serde at {path}"), &v);
    }
    // A list's query: serde names an unknown parameter, which the URL may carry at any length.
    for path in [
        format!("{tp}/queues?{big}=1"),
        format!("/v1/admin/tenants?limit=2&{big}"),
    ] {
        let (status, v) = h.call(Method::GET, &path, None).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "INVALID_QUERY"),
            "{v}"
        );
        assert_quotes_little("an unknown query parameter", &v);
    }
    h.finish().await;
}

/// Reads every page of `path` (which has no query) with `limit`; the ids in order.
async fn every_page(h: &Harness, path: &str, limit: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut url = format!("{path}?limit={limit}");
    loop {
        let (status, page) = h.call(Method::GET, &url, None).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        seen.extend(page["items"].as_array().expect("items").iter().map(id));
        match page["next"].as_str() {
            Some(next) => url = format!("{path}?limit={limit}&after={next}"),
            None => return seen,
        }
    }
}

/// A cursor is a position in the list that returned it: handed to another tenant's list or to
/// another kind of list it is refused (400 `INVALID_FIELD` naming `after`), not read as a
/// position there, which skipped items silently (every item of the list older than the
/// foreign cursor's id).
async fn a_cursor_of_another_list_or_tenant_is_refused(backend: Backend) {
    let h = harness(backend).await;
    let a = h.tenant("tenant-a").await;
    let b = h.tenant("tenant-b").await;
    let ap = format!("/v1/admin/tenants/{a}");
    let bp = format!("/v1/admin/tenants/{b}");
    let mut a_queues = Vec::new();
    for i in 0..3 {
        a_queues.push(id(&h
            .create(&format!("{ap}/queues"), json!({"name": format!("a{i}")}))
            .await));
    }
    for i in 0..3 {
        h.create(&format!("{bp}/queues"), json!({"name": format!("b{i}")}))
            .await;
        h.create(
            &format!("{ap}/agents"),
            json!({"name": format!("agent{i}")}),
        )
        .await;
    }
    let cursor_of = |path: String| {
        let h = &h;
        async move {
            let (status, page) = h.call(Method::GET, &format!("{path}?limit=1"), None).await;
            assert_eq!(status, StatusCode::OK, "{path}: {page}");
            page["next"].as_str().expect("a next page").to_string()
        }
    };
    let foreign = [
        ("tenant B's queues", cursor_of(format!("{bp}/queues")).await),
        ("tenant A's agents", cursor_of(format!("{ap}/agents")).await),
        (
            "the tenants",
            cursor_of("/v1/admin/tenants".to_string()).await,
        ),
    ];
    for (whose, cursor) in foreign {
        let (status, v) = h
            .call(Method::GET, &format!("{ap}/queues?after={cursor}"), None)
            .await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
            "a cursor of {whose} in tenant A's queues: {v}"
        );
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("`after`"), "{message}");
    }
    // The list's own cursors page it whole, in creation order, on every list.
    assert_eq!(every_page(&h, &format!("{ap}/queues"), 1).await, a_queues);
    assert_eq!(every_page(&h, &format!("{ap}/agents"), 2).await.len(), 3);
    assert_eq!(every_page(&h, &format!("{bp}/queues"), 2).await.len(), 3);
    assert_eq!(every_page(&h, "/v1/admin/tenants", 1).await, vec![a, b]);
    h.finish().await;
}

/// A URL carrying a user or password would keep a secret where reads answer it whole (bots'
/// and webhooks' `url` is returned by every GET): refused, without echoing the password.
async fn a_url_with_a_password_is_refused(backend: Backend) {
    let h = harness(backend).await;
    let t = id(&h.create("/v1/admin/tenants", json!({"name": "t"})).await);
    let tp = format!("/v1/admin/tenants/{t}");
    let bot = h
        .create(
            &format!("{tp}/bots"),
            json!({"name": "b", "url": "https://93.184.216.34/b", "credential": "c"}),
        )
        .await;
    let hook = h
        .create(
            &format!("{tp}/webhooks"),
            json!({"url": "https://93.184.216.34/h", "format": "standard"}),
        )
        .await;
    for url in [
        "https://ops:s3cret-pass@93.184.216.34/b",
        "https://ops@93.184.216.34/b",
    ] {
        for (method, path, body) in [
            (
                Method::POST,
                format!("{tp}/bots"),
                json!({"name": "b2", "url": url, "credential": "c"}),
            ),
            (
                Method::PATCH,
                format!("{tp}/bots/{}", id(&bot)),
                json!({"url": url}),
            ),
            (
                Method::POST,
                format!("{tp}/webhooks"),
                json!({"url": url, "format": "standard"}),
            ),
            (
                Method::PATCH,
                format!("{tp}/webhooks/{}", id(&hook)),
                json!({"url": url}),
            ),
        ] {
            let (status, v) = h.call(method, &path, Some(body)).await;
            assert_eq!(
                (status, code(&v)),
                (StatusCode::BAD_REQUEST, "INVALID_FIELD"),
                "{path} with {url}: {v}"
            );
            assert!(!v.to_string().contains("s3cret"), "{path}: {v}");
        }
    }
    // Nothing was changed: the stored URLs are the ones created.
    let (_, b) = h
        .call(Method::GET, &format!("{tp}/bots/{}", id(&bot)), None)
        .await;
    assert_eq!(b["url"], "https://93.184.216.34/b");
    let (_, w) = h
        .call(Method::GET, &format!("{tp}/webhooks/{}", id(&hook)), None)
        .await;
    assert_eq!(w["url"], "https://93.184.216.34/h");
    h.finish().await;
}

/// Rows written before URLs with user info were refused may still hold a password (or a token
/// as the user): every answer masks it, while the worker still reads the URL whole, so calls that
/// sent the credential (reqwest's Basic auth) keep sending it. The legacy rows are made as an
/// older version left them: the URL column set directly.
async fn a_stored_url_with_a_password_is_never_answered(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("t").await;
    let tp = format!("/v1/admin/tenants/{t}");
    let bot = id(&h
        .create(
            &format!("{tp}/bots"),
            json!({"name": "b", "url": "https://93.184.216.34/b", "credential": "c"}),
        )
        .await);
    let hook = id(&h
        .create(
            &format!("{tp}/webhooks"),
            json!({"url": "https://93.184.216.34/h", "format": "standard"}),
        )
        .await);
    let legacy_bot = "https://ops:s3cret-pass@93.184.216.34/b";
    let legacy_hook = "https://s3cret-tok3n@93.184.216.34/h";
    for (table, row, url) in [("bots", &bot, legacy_bot), ("webhooks", &hook, legacy_hook)] {
        sqlx::query(&format!("UPDATE {table} SET url = $1 WHERE id = $2"))
            .bind(url)
            .bind(row.clone())
            .execute(&h.raw)
            .await
            .expect("legacy url");
    }

    let bot_path = format!("{tp}/bots/{bot}");
    let hook_path = format!("{tp}/webhooks/{hook}");
    for (method, path, body) in [
        (Method::GET, bot_path.clone(), None),
        (Method::GET, format!("{tp}/bots"), None),
        (Method::PATCH, bot_path.clone(), Some(json!({"name": "b2"}))),
        (Method::GET, hook_path.clone(), None),
        (Method::GET, format!("{tp}/webhooks"), None),
        (
            Method::PATCH,
            hook_path.clone(),
            Some(json!({"enabled": true})),
        ),
    ] {
        let (status, v) = h.call(method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {v}");
        assert!(!v.to_string().contains("s3cret"), "{method} {path}: {v}");
        let shown = v.get("items").map_or(&v, |items| &items[0]);
        let masked = if path.contains("/bots") {
            "https://ops:***@93.184.216.34/b"
        } else {
            "https://***@93.184.216.34/h"
        };
        assert_eq!(shown["url"], masked, "{method} {path}: {v}");
    }

    // What the worker calls is the URL as stored, credentials included.
    let (endpoint, _) = h.store().bot_credential(&t, &bot).await.expect("bot");
    assert_eq!(endpoint.url, legacy_bot);
    let target = h
        .store()
        .webhook_target(&hook, chrono::Utc::now().timestamp_millis())
        .await
        .expect("target")
        .expect("exists");
    assert_eq!(target.webhook.url, legacy_hook);
    let stored = h.table_text("bots", &["url"]).await + &h.table_text("webhooks", &["url"]).await;
    assert!(
        stored.contains(legacy_bot) && stored.contains(legacy_hook),
        "{stored}"
    );
    h.finish().await;
}

/// `expires_at_ms` holds at most 9999-12-31T23:59:59.999Z: a JavaScript client reads a larger
/// number rounded (past 2^53), so it would never see the expiry it set. Refused on create and
/// on change, naming the field; the last millisecond of 9999 is taken.
async fn an_expiry_past_the_year_9999_is_refused(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let base = format!("/v1/admin/tenants/{t}/api-keys");
    const LAST: i64 = 253_402_300_799_999;
    for past in [LAST + 1, 9_007_199_254_740_993, i64::MAX] {
        let (status, v) = h
            .call(
                Method::POST,
                &base,
                Some(json!({"name": "k", "permissions": ["chat"], "expires_at_ms": past})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{past}: {v}");
        assert_eq!(code(&v), "INVALID_FIELD", "{past}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("`expires_at_ms`"), "{message}");
        assert!(message.contains("253402300799999"), "{message}");
    }
    let created = h
        .create(
            &base,
            json!({"name": "k", "permissions": ["chat"], "expires_at_ms": LAST}),
        )
        .await;
    assert_eq!(created["expires_at_ms"], LAST);
    let path = format!("{base}/{}", id(&created));
    let (status, v) = h
        .call(
            Method::PATCH,
            &path,
            Some(json!({"expires_at_ms": LAST + 1})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(code(&v), "INVALID_FIELD", "{v}");
    let (_, v) = h.call(Method::GET, &path, None).await;
    assert_eq!(v["expires_at_ms"], LAST, "a refused change changed nothing");
    h.finish().await;
}

/// A binary rolled back after a newer release migrated the database still opens it (no crash
/// loop): the migration it does not know is reported, not refused. A migration it knows whose
/// file changed since it was applied (its checksum) is still refused.
async fn a_database_a_newer_release_migrated_still_opens(backend: Backend) {
    let h = harness(backend).await;
    let t = h.tenant("acme").await;
    let later = 9_999_000_001_i64;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, $2, TRUE, $3, 0)",
    )
    .bind(later)
    .bind("from a newer release")
    .bind(vec![7u8; 48])
    .execute(&h.raw)
    .await
    .expect("a later migration");
    let rolled_back = Provisioning::connect(&h.target, &EncryptionKey::generate())
        .await
        .expect("the older binary opens a database migrated further");
    let unknown: Vec<(i64, &str)> = rolled_back
        .unknown_migrations()
        .iter()
        .map(|m| (m.version, m.description.as_str()))
        .collect();
    assert_eq!(unknown, [(later, "from a newer release")]);
    assert_eq!(rolled_back.tenant(&t).await.expect("tenant").name, "acme");
    rolled_back.close().await;
    assert!(h.store().unknown_migrations().is_empty());

    sqlx::query("UPDATE _sqlx_migrations SET checksum = $1 WHERE version = 1")
        .bind(vec![0u8; 48])
        .execute(&h.raw)
        .await
        .expect("a changed checksum");
    match Provisioning::connect(&h.target, &EncryptionKey::generate()).await {
        Ok(_) => panic!("a changed migration was accepted"),
        Err(e) => assert!(
            e.to_string()
                .contains("previously applied but has been modified"),
            "{e}"
        ),
    }
    h.finish().await;
}

fn redis_url() -> String {
    std::env::var("NEXUS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One tenant's live session data, as the edge and the conversation worker would have stored
/// it, and the credentials that reach it.
struct Live {
    tenant: String,
    key: String,
    agent: String,
    token: String,
    session: common::fixtures::Session,
}

/// A tenant with a chat key and an agent, a chat started through the API, and what the worker
/// stores for it: record, transcript, the agent's presence and slot, a queue place, a timer of
/// `kind`, the customer's sign of life.
async fn live_tenant(h: &Harness, name: &str, kind: &str) -> Live {
    use nexus::stores::session::{
        customer_mark, ConversationState, EntryKind, NewEntry, Party, PartyKind, Reserve, Timer,
    };
    let tenant = h.tenant(name).await;
    let tp = format!("/v1/admin/tenants/{tenant}");
    let key = h
        .create(
            &format!("{tp}/api-keys"),
            json!({"name": "widget", "permissions": ["chat"]}),
        )
        .await["key"]
        .as_str()
        .expect("key")
        .to_string();
    let agent = h
        .create(
            &format!("{tp}/agents"),
            json!({"name": "ada", "capacity": {"chat": 2}}),
        )
        .await;
    let (agent, token) = (
        id(&agent),
        agent["token"].as_str().expect("token").to_string(),
    );
    let session = common::fixtures::start(&h.state, &key, "Ann").await;
    let s = h.state.sessions.clone().expect("a session store");
    let mut c = common::fixtures::conversation(&tenant, &session.id, ConversationState::Queued);
    c.customer.participant_id = session.pid.clone();
    assert!(s.put_conversation(&c).await.expect("record"));
    let entry = NewEntry {
        event_id: uuid::Uuid::new_v4().to_string(),
        kind: EntryKind::Message,
        from: Party {
            participant_id: session.pid.clone(),
            nickname: "Ann".into(),
            kind: PartyKind::Customer,
        },
        text: Some(format!("hello from {name}")),
        message_id: Some("m1".into()),
        data: BTreeMap::new(),
        at_ms: 1_700_000_000_000,
    };
    s.append(&tenant, &session.id, &entry)
        .await
        .expect("transcript");
    let capacity = BTreeMap::from([("chat".to_string(), 2)]);
    s.set_presence(&tenant, &agent, true, &[], &capacity, 1)
        .await
        .expect("presence");
    let reserve = Reserve {
        conversation_id: session.id.clone(),
        media: "chat".into(),
        skills: vec![],
        exclude: vec![],
        only: None,
        now_ms: 2,
    };
    assert_eq!(
        s.reserve_agent(&tenant, &reserve).await.expect("reserve"),
        Some(agent.clone())
    );
    s.enqueue(&tenant, "q", &session.id, 0, 1)
        .await
        .expect("enqueue");
    let timer = Timer {
        kind: kind.into(),
        tenant_id: tenant.clone(),
        id: session.id.clone(),
    };
    s.schedule(&timer, 1).await.expect("timer");
    s.refresh(
        &customer_mark(&tenant, &session.id),
        Duration::from_secs(300),
    )
    .await
    .expect("customer mark");
    Live {
        tenant,
        key,
        agent,
        token,
        session,
    }
}

/// How much of `live`'s session data the store still holds, item by item.
async fn live_left(h: &Harness, live: &Live) -> Vec<&'static str> {
    use nexus::stores::session::{customer_mark, start_mark};
    let s = h.state.sessions.clone().expect("a session store");
    let (t, c) = (live.tenant.as_str(), live.session.id.as_str());
    let mut left = Vec::new();
    if s.conversation(t, c).await.expect("record").is_some() {
        left.push("record");
    }
    if s.transcript_len(t, c).await.expect("transcript") > 0 {
        left.push("transcript");
    }
    if s.presence(t, &live.agent)
        .await
        .expect("presence")
        .is_some()
    {
        left.push("presence");
    }
    if !s.slot_holders(t, c).await.expect("holders").is_empty() {
        left.push("slot holder");
    }
    if !s
        .agent_conversations(t, &live.agent)
        .await
        .expect("slots")
        .is_empty()
    {
        left.push("agent slot");
    }
    if !s.waiting(t, "q", 10).await.expect("queue").is_empty() {
        left.push("queue place");
    }
    if s.seen(&start_mark(t, c)).await.expect("start mark") {
        left.push("start mark");
    }
    if s.seen(&customer_mark(t, c)).await.expect("customer mark") {
        left.push("customer mark");
    }
    left
}

const ALL_LIVE: [&str; 8] = [
    "record",
    "transcript",
    "presence",
    "slot holder",
    "agent slot",
    "queue place",
    "start mark",
    "customer mark",
];

/// Deleting a tenant purges its live session data (the embedded store beside SQLite, Redis
/// beside PostgreSQL, as deployed) and ends its open customer stream and agent socket at their
/// next credential check; another tenant's sessions, socket and timers stay as they were.
/// A purge that fails leaves the delete to be repeated: 503 `TENANT_PURGE_PENDING`, the tenant
/// already gone, and the same DELETE then purges and answers 204 (not 404).
async fn deleting_a_tenant_purges_its_live_sessions_only(backend: Backend) {
    use nexus::stores::session::Timer;
    let mut h = harness(backend).await;
    let namespace = format!("nx-admin-{}", uuid::Uuid::new_v4().simple());
    if let Backend::Postgres = backend {
        let redis = nexus::stores::session::redis::RedisStore::connect_in(&redis_url(), &namespace)
            .await
            .expect("Redis reachable (NEXUS_TEST_REDIS_URL)");
        h.state.sessions = Some(Arc::new(redis));
    }
    let mut config = (*h.state.config).clone();
    config.stores.auth_cache_ttl_ms = 1_000;
    h.state.config = Arc::new(config);
    let kind = format!("purge-{}", uuid::Uuid::new_v4().simple());
    let (a, b) = (
        live_tenant(&h, "acme", &kind).await,
        live_tenant(&h, "globex", &kind).await,
    );
    assert_eq!(live_left(&h, &a).await, ALL_LIVE);

    // A's customer stream and both agents' sockets, open before the delete.
    let addr = common::inproc::serve(h.state.clone()).await;
    let socket = |token: String| {
        let addr = addr.clone();
        async move {
            let (mut ws, _) =
                tokio_tungstenite::connect_async(format!("ws://{addr}/v1/agent/ws?token={token}"))
                    .await
                    .expect("agent socket");
            let hello = common::ws::next_frame(&mut ws).await;
            assert!(
                matches!(&hello, Some(Ok(m)) if m.to_string().contains("hello")),
                "{hello:?}"
            );
            ws
        }
    };
    let (mut ws_a, mut ws_b) = (socket(a.token.clone()).await, socket(b.token.clone()).await);
    let stream = Request::get(format!(
        "/nexus/v3/chat/sessions/{}/events?api_key={}&client_key={}",
        a.session.id, a.key, a.session.ck
    ))
    .body(Body::empty())
    .expect("request");
    let stream = edge::app(h.state.clone())
        .oneshot(stream)
        .await
        .expect("response");
    assert_eq!(stream.status(), StatusCode::OK);

    let (status, v) = h
        .call(
            Method::DELETE,
            &format!("/v1/admin/tenants/{}", a.tenant),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(live_left(&h, &a).await, Vec::<&str>::new());
    assert_eq!(live_left(&h, &b).await, ALL_LIVE, "the other tenant's data");
    let s = h.state.sessions.clone().expect("a session store");
    let due = s.claim_due(&kind, 10, 100).await.expect("timers");
    let b_timer = Timer {
        kind: kind.clone(),
        tenant_id: b.tenant.clone(),
        id: b.session.id.clone(),
    };
    assert_eq!(
        due,
        std::slice::from_ref(&b_timer),
        "only the other tenant's timer is left"
    );
    s.complete_timer(&b_timer, 10).await.expect("complete");

    // The deleted tenant's stream and socket end; the other agent's socket stays.
    let (ended, text) = stream_until(stream, "INVALID_CREDENTIALS").await;
    assert!(ended, "the deleted tenant's stream goes on: {text}");
    let closed = common::ws::close_within(&mut ws_a, Duration::from_secs(10))
        .await
        .expect("the deleted tenant's agent socket stays open");
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(4001));
    assert!(
        common::ws::close_within(&mut ws_b, Duration::from_millis(2_500))
            .await
            .is_err(),
        "the other tenant's agent socket closed"
    );

    let (status, v) = h
        .call(
            Method::DELETE,
            &format!("/v1/admin/tenants/{}", a.tenant),
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a purged tenant is gone: {v}"
    );
    assert_eq!(code(&v), "TENANT_NOT_FOUND");

    // A purge that fails: the tenant is deleted, its data still there, and the DELETE again
    // finishes it.
    let c = live_tenant(&h, "initech", &kind).await;
    let working = h.state.sessions.clone();
    let acl_user = format!("nexus-purge-{}", uuid::Uuid::new_v4().simple());
    let mut raw_redis = None;
    match backend {
        // A process without a session store cannot purge.
        Backend::Sqlite => h.state.sessions = None,
        // A Redis user that may not delete keys.
        Backend::Postgres => {
            let mut raw = ::redis::Client::open(redis_url())
                .expect("redis url")
                .get_multiplexed_async_connection()
                .await
                .expect("redis");
            ::redis::cmd("ACL")
                .arg(vec![
                    "SETUSER",
                    acl_user.as_str(),
                    "on",
                    "nopass",
                    "~*",
                    "&*",
                    "+@all",
                    "-unlink",
                ])
                .query_async::<()>(&mut raw)
                .await
                .expect("acl user");
            let url = redis_url().replacen("redis://", &format!("redis://{acl_user}:x@"), 1);
            let limited = nexus::stores::session::redis::RedisStore::connect_in(&url, &namespace)
                .await
                .expect("the limited user connects");
            h.state.sessions = Some(Arc::new(limited));
            raw_redis = Some(raw);
        }
    }
    let path = format!("/v1/admin/tenants/{}", c.tenant);
    let (status, v) = h.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(code(&v), "TENANT_PURGE_PENDING", "{v}");
    h.state.sessions = working;
    let (status, _) = h.call(Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the tenant is deleted");
    assert_eq!(live_left(&h, &c).await, ALL_LIVE, "nothing purged yet");
    let (status, v) = h.call(Method::DELETE, &path, None).await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "the repeated DELETE purges: {v}"
    );
    assert_eq!(live_left(&h, &c).await, Vec::<&str>::new());
    let (status, _) = h.call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(live_left(&h, &b).await, ALL_LIVE, "the other tenant's data");

    if let Some(mut raw) = raw_redis {
        ::redis::cmd("ACL")
            .arg(vec!["DELUSER", acl_user.as_str()])
            .query_async::<()>(&mut raw)
            .await
            .expect("acl deluser");
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{namespace}:*"))
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut raw)
                .await
                .expect("scan");
            if !keys.is_empty() {
                ::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async::<()>(&mut raw)
                    .await
                    .expect("cleanup");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    h.finish().await;
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $case() { super::$case(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $case() { super::$case(super::Backend::Postgres).await })*
        }
    };
}

on_both_backends!(
    crud_and_pagination,
    validation_errors,
    conflicts_and_not_found,
    admin_token_is_required,
    api_keys_are_shown_once_and_authenticate,
    other_pods_see_key_changes_within_the_cache_ttl,
    a_stream_on_another_pod_ends_within_the_cache_ttl,
    bot_credentials_are_encrypted_and_never_returned,
    webhook_subscriptions_secrets_and_target_policy,
    agent_tokens_authenticate_and_rotate,
    routing_rules_in_priority_order,
    tenant_isolation_on_every_endpoint,
    concurrent_patches_of_different_fields_both_stay,
    racing_uploads_never_pass_the_file_limit,
    odd_bytes_and_methods_answer_in_the_error_shape,
    error_messages_quote_at_most_64_characters,
    a_cursor_of_another_list_or_tenant_is_refused,
    a_url_with_a_password_is_refused,
    a_stored_url_with_a_password_is_never_answered,
    an_expiry_past_the_year_9999_is_refused,
    a_database_a_newer_release_migrated_still_opens,
    deleting_a_tenant_purges_its_live_sessions_only,
);

/// Reads a streamed answer (SSE) until its text holds `needle`, for up to 10 s: whether it did,
/// and the text read.
async fn stream_until(response: axum::response::Response, needle: &str) -> (bool, String) {
    let mut body = response.into_body();
    let mut text = String::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
                if text.contains(needle) {
                    return;
                }
            }
        }
    })
    .await;
    (found.is_ok(), text)
}
