//! nexus as a TLS client of JetStream (`tls://`, mTLS), Redis (`rediss://`) and PostgreSQL
//! (`sslmode`) on servers of the test's own with a throwaway CA; refused without that CA.
//!
//! The servers are nats-server (`NEXUS_TEST_NATS_SERVER`, from `scripts/services.sh env`),
//! redis-server built with TLS, and PostgreSQL's initdb and postgres (as the `postgres` user
//! when run as root). A test whose tool is missing says so and passes, unless
//! `NEXUS_TEST_REQUIRE_TOOLS=1` (CI).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus::bus::{self, SubscribeOptions, TopicSpec};
use nexus::config::Config;
use nexus::stores::provisioning::{NewTenant, Provisioning};
use nexus::stores::session;

use common::process::free_port;

/// How long a server of the test's own has to start listening.
const START: Duration = Duration::from_secs(30);

/// A tool is missing: panics under `NEXUS_TEST_REQUIRE_TOOLS=1`, else says the test is skipped.
fn missing(what: &str) {
    if std::env::var("NEXUS_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{what} (required: NEXUS_TEST_REQUIRE_TOOLS=1)");
    }
    eprintln!("{what}: test not run");
}

/// A throwaway CA, a server certificate for `localhost` and 127.0.0.1 and a client
/// certificate, written as PEM files into a directory.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA of its own that signed nothing here: trusting it is trusting the wrong CA.
    other_ca: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("CA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    (params.self_signed(&key).expect("CA certificate"), key)
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let (ca, ca_key) = new_ca("nexus test CA");
        let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::new(names).expect("params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "nexus test");
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["nexus-client".into()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &new_ca("another CA").0.pem()),
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf8 path").to_string()
}

/// A child process stopped on drop: SIGTERM first (PostgreSQL's postmaster then stops its
/// backends and frees its shared memory), SIGKILL if it is still there after 5 s.
struct Server(Child);

impl Server {
    /// Whether it listens on `port` within [`START`]; false if it exited first (the port was
    /// taken meanwhile: the caller tries another).
    async fn listening(&mut self, port: u16, what: &str) -> bool {
        let deadline = Instant::now() + START;
        loop {
            if let Ok(Some(_)) = self.0.try_wait() {
                return false;
            }
            if common::process::listens_on(self.0.id(), port) {
                return true;
            }
            assert!(Instant::now() < deadline, "{what} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the ports file nats-server writes into `dir` once it listens; the port in it.
async fn nats_port(server: &mut Server, dir: &Path) -> u16 {
    let deadline = Instant::now() + START;
    loop {
        let ports: Option<serde_json::Value> = std::fs::read_dir(dir)
            .ok()
            .and_then(|mut d| d.find_map(|f| f.ok()))
            .and_then(|f| std::fs::read(f.path()).ok())
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(port) = ports
            .as_ref()
            .and_then(|p| p["nats"][0].as_str())
            .and_then(|url| url.rsplit(':').next()?.parse().ok())
        {
            return port;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("nats-server exited with {status}");
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A nats-server of the test's own with JetStream, serving TLS only, on a port it picks;
/// `verify`: it also demands a client certificate signed by the CA.
async fn tls_nats(dir: &Path, pki: &Pki, verify: bool) -> Option<(Server, u16)> {
    tls_nats_on(dir, pki, verify, None).await
}

/// [`tls_nats`] on `port` when given (a server taking over another's port).
async fn tls_nats_on(
    dir: &Path,
    pki: &Pki,
    verify: bool,
    port: Option<u16>,
) -> Option<(Server, u16)> {
    let Ok(bin) = std::env::var("NEXUS_TEST_NATS_SERVER") else {
        missing("NEXUS_TEST_NATS_SERVER unset (eval \"$(bash scripts/services.sh env)\")");
        return None;
    };
    let ports_dir = dir.join("nats-ports");
    std::fs::create_dir_all(&ports_dir).expect("ports dir");
    let conf = dir.join("nats.conf");
    // JSON strings are valid NATS config strings, and quote the paths whatever they hold.
    let q = |p: &Path| serde_json::to_string(&path_str(p)).expect("json");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{}\"\n\
             ports_file_dir: {}\n\
             jetstream {{ store_dir: {} }}\n\
             tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: {verify}\n  timeout: 5\n}}\n",
            port.map_or("-1".to_string(), |p| p.to_string()),
            q(&ports_dir),
            q(&dir.join("nats-store")),
            q(&pki.server_cert),
            q(&pki.server_key),
            q(&pki.ca),
        ),
    )
    .expect("write nats.conf");
    let mut server = Server(
        Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    let port = nats_port(&mut server, &ports_dir).await;
    Some((server, port))
}

/// A topic round trip: apply it, publish a record, consume and ack it in a group.
async fn round_trip(config: &nexus::config::BusConfig) {
    let bus = bus::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connect to {} over TLS: {e}", config.url));
    let topic = format!("t{}", uuid::Uuid::new_v4().simple());
    bus.apply_topic(&TopicSpec {
        name: topic.clone(),
        partitions: 1,
        retention: None,
    })
    .await
    .expect("create a topic over TLS");
    let sent = common::event_record("conv-tls", 1);
    bus.publish(&topic, sent.clone()).await.expect("publish");
    let mut sub = bus
        .subscribe("g-tls", &topic, SubscribeOptions::default())
        .await
        .expect("subscribe");
    let got = common::take(&mut sub, 1, Duration::from_secs(20), true).await;
    assert_eq!(got[0].key, "conv-tls");
    assert_eq!(got[0].payload, sent.payload);
    // Nothing left: the ack went through too.
    assert!(common::next_within(&mut sub, Duration::from_millis(500))
        .await
        .is_none());
    bus.health().await.expect("health over TLS");
}

/// The bus config of a `tls://` JetStream bus on `port` trusting `ca` ("" = system roots).
fn nats_config(port: u16, ca: &str) -> nexus::config::BusConfig {
    let mut c = common::bus_config("jetstream", None);
    c.url = format!("tls://127.0.0.1:{port}");
    c.ca_file = ca.to_string();
    c
}

/// Connecting must fail, promptly and with a TLS error naming the certificate problem and
/// each of `names` (the setting to change), not reading as an outage.
async fn refused(config: &nexus::config::BusConfig, why: &str, names: &[&str]) {
    let started = Instant::now();
    let e = match bus::connect(config).await {
        Ok(_) => panic!("{why}: connected to {} anyway", config.url),
        Err(e) => e,
    };
    eprintln!("{why}: refused: {e}");
    assert!(
        matches!(e, bus::BusError::Tls(_)),
        "{why}: not a TLS error: {e:?}"
    );
    let e = e.to_string();
    assert!(!e.contains("unavailable"), "{why}: reads as an outage: {e}");
    for name in names {
        assert!(e.contains(name), "{why}: `{name}` not named: {e}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{why}: took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_tls_with_the_bus_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let Some((_server, port)) = tls_nats(dir.path(), &pki, false).await else {
        return;
    };
    round_trip(&nats_config(port, &path_str(&pki.ca))).await;
    // The system roots do not know the test's CA, nor does another CA vouch for its server.
    let unknown_issuer = "certificate verification failed: unknown issuer";
    refused(
        &nats_config(port, ""),
        "no bus.ca_file",
        &[unknown_issuer, "bus.ca_file is not set"],
    )
    .await;
    let other_ca = path_str(&pki.other_ca);
    refused(
        &nats_config(port, &other_ca),
        "bus.ca_file of another CA",
        &[unknown_issuer, &format!("bus.ca_file ({other_ca})")],
    )
    .await;
}

/// A connected bus whose server comes back with a certificate of another CA (renewed by the
/// wrong CA): the client cannot reconnect, and its health check (what `/readyz` logs) names the
/// certificate problem and `bus.ca_file`, not only "not connected".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_health_names_a_server_certificate_it_cannot_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let Some((server, port)) = tls_nats(dir.path(), &pki, false).await else {
        return;
    };
    let config = nats_config(port, &path_str(&pki.ca));
    let bus = bus::connect(&config).await.expect("connect over TLS");
    bus.health().await.expect("healthy over TLS");
    drop(server);
    let other_dir = dir.path().join("renewed");
    std::fs::create_dir_all(&other_dir).expect("dir");
    let renewed = Pki::new(&other_dir);
    let Some((_server, _)) = tls_nats_on(&other_dir, &renewed, false, Some(port)).await else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let e = loop {
        match bus.health().await {
            Err(e @ bus::BusError::Tls(_)) => break e.to_string(),
            other => {
                assert!(
                    Instant::now() < deadline,
                    "health never named the certificate: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!("health: {e}");
    // The new CA has the old one's name: webpki finds it an issuer whose signature fails.
    assert!(e.contains("certificate verification failed"), "{e}");
    assert!(e.contains("bus.ca_file ("), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_mutual_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let Some((_server, port)) = tls_nats(dir.path(), &pki, true).await else {
        return;
    };
    let mut config = nats_config(port, &path_str(&pki.ca));
    config.client_cert_file = path_str(&pki.client_cert);
    config.client_key_file = path_str(&pki.client_key);
    round_trip(&config).await;
    refused(
        &nats_config(port, &path_str(&pki.ca)),
        "no client certificate",
        &[
            "requires a client certificate",
            "bus.client_cert_file and bus.client_key_file",
        ],
    )
    .await;
}

/// Whether `redis-server` was built with TLS (Debian's is).
fn redis_has_tls() -> bool {
    let Ok(out) = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", "1", "--loglevel", "warning"])
        .stdin(Stdio::null())
        .output()
    else {
        return false;
    };
    // Built with TLS it stops for want of a certificate; without, it rejects the option.
    String::from_utf8_lossy(&out.stdout).contains("Failed to configure TLS")
}

/// A redis-server of the test's own serving TLS only (clients need no certificate).
async fn tls_redis(dir: &Path, pki: &Pki) -> Option<(Server, u16)> {
    if !redis_has_tls() {
        missing("redis-server with TLS missing");
        return None;
    }
    // redis-server must be told its port: one picked here may be taken before it binds, so a
    // start that exits is tried again on another.
    for _ in 0..5 {
        let port = free_port();
        let mut server = Server(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&pki.server_cert)
                .arg("--tls-key-file")
                .arg(&pki.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&pki.ca)
                .arg("--dir")
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server"),
        );
        if server.listening(port, "redis-server").await {
            return Some((server, port));
        }
    }
    panic!("redis-server with TLS did not start in five tries");
}

fn redis_stores(port: u16, ca: &str) -> nexus::config::StoresConfig {
    let mut c = Config::defaults().stores;
    c.redis_url = format!("rediss://127.0.0.1:{port}");
    c.redis_ca_file = ca.to_string();
    c.redis_namespace = format!("tls{}", uuid::Uuid::new_v4().simple());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_with_the_redis_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let Some((_server, port)) = tls_redis(dir.path(), &pki).await else {
        return;
    };
    let mut config = Config::defaults();
    config.stores = redis_stores(port, &path_str(&pki.ca));
    config
        .validate()
        .expect("stores.redis_ca_file with rediss:// passes config check");
    let store = session::connect(&config.stores)
        .await
        .unwrap_or_else(|e| panic!("rediss:// with stores.redis_ca_file: {e}"));
    store.ping().await.expect("ping over TLS");
    let key = format!("k{}", uuid::Uuid::new_v4().simple());
    assert!(!store.seen(&key).await.expect("seen"));
    assert!(store
        .remember(&key, Duration::from_secs(60))
        .await
        .expect("remember over TLS"));
    assert!(
        store.seen(&key).await.expect("seen over TLS"),
        "written and read back"
    );

    for (ca, why) in [
        (String::new(), "no stores.redis_ca_file (system roots)"),
        (
            path_str(&pki.other_ca),
            "stores.redis_ca_file of another CA",
        ),
    ] {
        let started = Instant::now();
        let refused = match session::connect(&redis_stores(port, &ca)).await {
            Ok(store) => store.ping().await.err(),
            Err(e) => Some(e),
        };
        let e = refused
            .unwrap_or_else(|| panic!("{why}: connected anyway"))
            .to_string();
        eprintln!("{why}: refused after {:?}: {e}", started.elapsed());
        assert!(
            e.contains("certificate") || e.to_lowercase().contains("tls"),
            "{why}: an unclear error: {e}"
        );
        // Connect and its retries (redis-rs once waited a minute between them) stay short.
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{why}: refused after {:?}",
            started.elapsed()
        );
    }
}

/// PostgreSQL's server binaries: the directory of `initdb` on PATH, else Debian's.
fn pg_bindir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("initdb"))
            .find(|p| p.is_file())
            .and_then(|p| std::fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
    });
    let debian = || {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|d| d.join("initdb").is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    };
    on_path
        .or_else(debian)
        .filter(|d| d.join("postgres").is_file())
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// PostgreSQL refuses to run as root: as root, its commands run as the `postgres` user.
fn pg_command(bin: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A PostgreSQL of the test's own in `dir` with `ssl=on` and the test's server certificate
/// (trust authentication, user `postgres`).
async fn tls_postgres(dir: &Path, pki: &Pki) -> Option<(Server, u16)> {
    let Some(bindir) = pg_bindir() else {
        missing("PostgreSQL's initdb and postgres missing");
        return None;
    };
    let as_postgres = running_as_root();
    let data = dir.join("pg");
    let sockets = dir.join("pg-sockets");
    std::fs::create_dir_all(&sockets).expect("socket dir");
    let key = dir.join("pg-server.key");
    std::fs::copy(&pki.server_key, &key).expect("copy key");
    if as_postgres {
        // The postgres user must reach its files, and own a key no one else reads.
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            missing("running as root without a `postgres` user to run PostgreSQL as");
            return None;
        }
        let _ = Command::new("chmod").arg("o+x").arg(dir).status();
    }
    let _ = Command::new("chmod").arg("600").arg(&key).status();
    let out = pg_command(&bindir.join("initdb"), as_postgres)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
        .output()
        .expect("run initdb");
    if !out.status.success() {
        missing(&format!(
            "initdb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
        return None;
    }
    for _ in 0..5 {
        let port = free_port();
        let mut server = Server(
            pg_command(&bindir.join("postgres"), as_postgres)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-h", "127.0.0.1"])
                .arg("-k")
                .arg(&sockets)
                .args(["-c", "ssl=on", "-c", "fsync=off"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", path_str(&pki.server_cert)))
                .arg("-c")
                .arg(format!("ssl_key_file={}", path_str(&key)))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start postgres"),
        );
        if server.listening(port, "postgres").await {
            return Some((server, port));
        }
    }
    panic!("postgres did not start in five tries");
}

/// Opens the provisioning store at `url` as `nexus` does (from `[stores]`), writes a tenant,
/// reads it back, and checks the session is encrypted.
async fn provisioning_round_trip(url: &str) -> Result<(), String> {
    let mut stores = Config::defaults().stores;
    stores.postgres_url = url.to_string();
    stores.provisioning_key = "ab".repeat(32);
    let p = Provisioning::from_config(&stores)
        .await
        .map_err(|e| e.to_string())?;
    let made = p
        .create_tenant(NewTenant {
            name: format!("tls-{}", uuid::Uuid::new_v4().simple()),
        })
        .await
        .expect("create a tenant over TLS");
    let read = p.tenant(&made.id).await.expect("read it back");
    assert_eq!(read.name, made.name);
    let ssl: String =
        sqlx::query_scalar("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(p.pool())
            .await
            .expect("pg_stat_ssl");
    assert_eq!(ssl, "true", "the session to {url} is not TLS");
    p.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_sslmode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let Some((_server, port)) = tls_postgres(dir.path(), &pki).await else {
        return;
    };
    let base = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    provisioning_round_trip(&format!("{base}?sslmode=require"))
        .await
        .unwrap_or_else(|e| panic!("sslmode=require: {e}"));
    provisioning_round_trip(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        path_str(&pki.ca)
    ))
    .await
    .unwrap_or_else(|e| panic!("sslmode=verify-full with the CA: {e}"));
    for (query, why) in [
        ("sslmode=verify-full".to_string(), "no sslrootcert"),
        (
            format!(
                "sslmode=verify-full&sslrootcert={}",
                path_str(&pki.other_ca)
            ),
            "sslrootcert of another CA",
        ),
    ] {
        let e = provisioning_round_trip(&format!("{base}?{query}"))
            .await
            .err()
            .unwrap_or_else(|| panic!("{why}: connected anyway"));
        eprintln!("{why}: refused: {e}");
        assert!(
            e.contains("certificate") || e.to_lowercase().contains("tls"),
            "{why}: an unclear error: {e}"
        );
    }
}
