//! Review findings in the provisioning admin API (`/v1/admin`), each case on SQLite (a temp
//! file) and on PostgreSQL (a fresh database per test; `NEXUS_TEST_POSTGRES_URL` overrides
//! `postgres://postgres@127.0.0.1:5432/test`). The harness is the one of `admin_api.rs`.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use nexus::config::Config;
use nexus::edge::{self, AppState};
use nexus::stores::provisioning::secrets::EncryptionKey;
use nexus::stores::provisioning::Provisioning;
use serde_json::{json, Value};
use sqlx::{AnyPool, Connection, Executor};
use tower::ServiceExt;

const TOKEN: &str = "test-admin-token";

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
        Backend::Postgres => target,
    };
    let raw = AnyPool::connect(&raw_url).await.expect("raw pool");
    let mut config = Config::defaults();
    config.bus = common::bus_config("embedded", Some(&dir.path().join("bus")));
    config.http.admin_token = TOKEN.into();
    let bus = nexus::bus::connect(&config.bus).await.expect("bus");
    // Some admin writes publish (an agent's profile, its not-ready state on delete).
    for spec in nexus::topology::Topology::builtin().topic_specs() {
        bus.apply_topic(&spec).await.expect("topic");
    }
    let sessions: Arc<dyn nexus::stores::session::SessionStore> = Arc::new(
        nexus::stores::session::embedded::EmbeddedStore::open(&dir.path().join("sessions"))
            .await
            .expect("session store"),
    );
    let state = AppState::new(
        Arc::new(config),
        bus,
        Arc::new(nexus::topology::Topology::builtin()),
        nexus::telemetry::init_metrics(),
        Arc::new(provisioning),
        sessions,
    );
    Harness {
        state,
        raw,
        database,
        _dir: dir,
    }
}

impl Harness {
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
    error_messages_quote_at_most_64_characters,
    a_cursor_of_another_list_or_tenant_is_refused,
    a_url_with_a_password_is_refused,
);
