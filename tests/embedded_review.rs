//! The embedded bus as a newcomer running `nexus dev` and an operator counting on "no acked
//! event lost" meet it, with real processes: a second `nexus dev` on the same data directory,
//! a first start cut short (a full disk, a kill), and a disk that fills while events are
//! published. File-size limits (`ulimit -f`) stand in for a full disk: past the limit a write
//! fails (`EFBIG`) when `SIGXFSZ` is ignored, and the process dies when it is not.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus::bus::embedded::EmbeddedBus;
use nexus::bus::{Bus, OutRecord, TopicSpec};
use nexus::config::Config;

/// The signal a process gets for writing past its file-size limit (Linux numbering).
const SIGXFSZ: i32 = 25;

/// A `nexus dev` child, SIGKILLed on drop so no test leaves one running.
struct Dev {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `nexus dev` command line on `data`, on a port the kernel picks.
fn dev_command(data: &Path) -> String {
    format!(
        "exec '{}' dev --data-dir '{}' --listen 127.0.0.1:0",
        env!("CARGO_BIN_EXE_nexus"),
        data.display()
    )
}

/// Runs `script` (a shell line ending in `exec nexus ...`) with its output in `log`.
fn spawn_shell(script: &str, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("RUST_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .env("NEXUS_TELEMETRY__LOG_FORMAT", "text")
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn sh")
}

/// Waits for `child` to exit, at most `within`; its status and log.
fn wait_exit(
    child: &mut Child,
    log: &Path,
    within: Duration,
) -> (std::process::ExitStatus, String) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, std::fs::read_to_string(log).unwrap_or_default());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!(
                "still running after {within:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Dev {
    fn start(dir: &Path, data: &Path, name: &str) -> Dev {
        let log = dir.join(format!("{name}.log"));
        let child = spawn_shell(&dev_command(data), &log);
        Dev { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address from the `listening` log line; panics with the log if it exits first.
    async fn wait_listening(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log_text();
            let whole = log.rsplit_once('\n').map_or("", |(whole, _)| whole);
            let addr = whole
                .lines()
                .filter(|l| l.contains(" listening "))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")));
            if let Some(addr) = addr {
                return addr.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nexus dev exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "not listening in time:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `/readyz` of a `nexus dev` at `addr` answers 200 within ten seconds.
async fn ready(addr: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = reqwest::get(format!("http://{addr}/readyz")).await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A second `nexus dev` on the same data directory is refused before it touches anything,
/// naming the process that holds it and the flag that gives it a directory of its own (its
/// message used to advise bus.url, which `nexus dev` overrides); the first goes on.
#[tokio::test]
async fn a_second_nexus_dev_on_the_same_data_dir_is_refused_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = Dev::start(dir.path(), &data, "first");
    let addr = first.wait_listening().await;
    let mut second = Dev::start(dir.path(), &data, "second");
    let (status, log) = wait_exit(&mut second.child, &second.log, Duration::from_secs(30));
    assert!(!status.success(), "{log}");
    let pid = first.child.id();
    assert!(
        log.contains("in use by another nexus process") && log.contains(&format!("(pid {pid})")),
        "names the holder:\n{log}"
    );
    assert!(log.contains("--data-dir"), "names the flag:\n{log}");
    assert!(!log.contains(" listening "), "{log}");
    assert!(
        ready(&addr).await,
        "the first goes on:\n{}",
        first.log_text()
    );
}

/// The first start of `nexus dev` cut short while fjall creates the bus's database (a full
/// disk: an error; a kill: nothing at all) left a directory fjall would neither open
/// (`InvalidVersion(None)`: an empty version marker) nor create again (`File exists`): every
/// later start failed until someone found and removed it. Now the database is created aside
/// and renamed into place whole, so the next start just works.
#[tokio::test]
async fn a_first_start_cut_short_leaves_a_data_dir_that_starts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // 10 MB files at most: fjall's first journal (64 MiB, sized up front) is past it.
    let limit = "ulimit -f 20000";

    let log = dir.path().join("full.log");
    let mut full = spawn_shell(
        &format!("trap '' XFSZ; {limit}; {}", dev_command(&data)),
        &log,
    );
    let (status, text) = wait_exit(&mut full, &log, Duration::from_secs(60));
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("opening the bus database") && text.contains("File too large"),
        "says what failed:\n{text}"
    );
    assert!(!text.contains("panicked"), "{text}");

    let log = dir.path().join("killed.log");
    let mut killed = spawn_shell(&format!("{limit}; {}", dev_command(&data)), &log);
    let (status, text) = wait_exit(&mut killed, &log, Duration::from_secs(60));
    assert_eq!(status.signal(), Some(SIGXFSZ), "killed:\n{text}");

    let mut dev = Dev::start(dir.path(), &data, "after");
    let addr = dev.wait_listening().await;
    assert!(ready(&addr).await, "{}", dev.log_text());
}

/// Env var naming the directory the child of [`a_full_disk_fails_publishes_clearly`] uses.
const FULL_CHILD_DIR: &str = "NEXUS_EMBEDDED_REVIEW_FULL_DIR";

/// Records acknowledged before the disk is "full".
const RECORD: usize = 1 << 20;

/// A record past the file-size limit of the child (150 000 blocks: 77 MB, or 154 MB where
/// `sh` counts KiB), so the journal write that takes it fails.
const TOO_BIG: usize = 200 << 20;

fn open(dir: &Path) -> EmbeddedBus {
    EmbeddedBus::open(dir, &Config::defaults().bus).expect("open bus")
}

/// `len` bytes that do not compress (fjall compresses large journal entries).
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The child's half: publishes until a publish fails, then says what the failure, readiness
/// and a small publish after it answered, and closes the bus.
async fn full_child(dir: &str) {
    let bus = open(Path::new(dir));
    bus.apply_topic(&TopicSpec {
        name: "t".into(),
        partitions: 1,
        retention: None,
    })
    .await
    .unwrap();
    for size in [RECORD, RECORD, RECORD, TOO_BIG] {
        let record = OutRecord::new("k", noise(size));
        match bus.publish("t", record).await {
            Ok(p) => println!("acked {}", p.offset),
            Err(e) => {
                println!("failed: {e}");
                println!(
                    "health: {:?}",
                    bus.health().await.err().map(|e| e.to_string())
                );
                let after = bus.publish("t", OutRecord::new("k", "small")).await;
                println!("after: {:?}", after.err().map(|e| e.to_string()));
                break;
            }
        }
    }
    drop(bus);
    println!("closed");
}

/// The disk fills under publishes: the publish that meets it fails with an error that says
/// what to do (it used to read "embedded log: embedded log: writing to the bus database:
/// FjallError: Poisoned"), readiness says the bus is down, nothing panics, and after a
/// restart every acknowledged record is there and the bus takes writes again.
#[tokio::test]
async fn a_full_disk_fails_publishes_clearly() {
    if let Ok(dir) = std::env::var(FULL_CHILD_DIR) {
        return full_child(&dir).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    // This test's name as libtest lists it: its module path below the crate root.
    let name = "a_full_disk_fails_publishes_clearly";
    let exact = match module_path!().split_once("::") {
        Some((_, module)) => format!("{module}::{name}"),
        None => name.to_string(),
    };
    let script = format!(
        "trap '' XFSZ; ulimit -f 150000; exec '{}' --exact {exact} --nocapture --test-threads=1",
        std::env::current_exe().unwrap().display()
    );
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env(FULL_CHILD_DIR, dir.path().join("bus"))
        .stdout(Stdio::from(out))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, text) = wait_exit(&mut child, &log, Duration::from_secs(120));
    assert!(status.success(), "no panic:\n{text}");
    let line = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{text}"))
            .to_string()
    };
    let failed = line("failed: ");
    assert!(
        failed.starts_with("embedded log: writing to the bus database: ")
            && failed.contains("restart nexus"),
        "{failed}"
    );
    assert!(line("health: ").starts_with("Some("), "not ready:\n{text}");
    assert!(line("after: ").contains("restart nexus"), "{text}");
    assert!(text.contains("closed"), "{text}");
    let acked: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("acked ")?.parse().ok())
        .collect();
    assert!(!acked.is_empty(), "{text}");

    let bus = open(&dir.path().join("bus"));
    for &offset in &acked {
        let got = bus.read("t", 0, offset, 1).await.unwrap();
        assert_eq!(
            got.first().map(|m| (m.offset, m.payload.len())),
            Some((offset, RECORD)),
            "acked record {offset} kept whole"
        );
    }
    let p = bus
        .publish("t", OutRecord::new("k", "after restart"))
        .await
        .expect("writes again after a restart");
    assert!(p.offset > *acked.last().unwrap());
    assert!(matches!(bus.health().await, Ok(())), "ready again");
}
