//! The demo pages in a real browser: `nexus dev` runs as a process, `tests/browser/demo.py`
//! drives `/demo/agent` and `/demo/widget` in headless Debian Chromium through Playwright's
//! driver (customer starts and sends, agent accepts and replies, customer sees the reply, agent
//! completes, customer sees the end) and screenshots both pages into
//! `target/browser-artefacts/`. A second test calls the chat API from a page of another origin
//! (`tests/browser/cors.py`), allowed by `http.cors_allowed_origins`. Requires `/usr/bin/chromium` (or `NEXUS_TEST_CHROMIUM`) and
//! the Python module `playwright` (CI installs both): a missing one fails the test rather than
//! skipping it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::chat::{base_env, start_node};

/// Debian's browser; `NEXUS_TEST_CHROMIUM` names another (demo.py reads the same variable).
fn chromium() -> String {
    std::env::var("NEXUS_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}
/// The screenshots the script takes: seven moments, the three pages each.
const SHOTS: [&str; 21] = [
    "1-customer-waiting-agent.png",
    "1-customer-waiting-widget.png",
    "1-customer-waiting-second-agent.png",
    "2-reply-agent.png",
    "2-reply-widget.png",
    "2-reply-second-agent.png",
    "3-files-agent.png",
    "3-files-widget.png",
    "3-files-second-agent.png",
    "4-consult-agent.png",
    "4-consult-widget.png",
    "4-consult-second-agent.png",
    "5-private-consult-agent.png",
    "5-private-consult-widget.png",
    "5-private-consult-second-agent.png",
    "6-transferred-agent.png",
    "6-transferred-widget.png",
    "6-transferred-second-agent.png",
    "7-ended-agent.png",
    "7-ended-widget.png",
    "7-ended-second-agent.png",
];
/// Fourteen steps of at most 15 s each in the script, plus browser start; a hung browser
/// must still end the test.
const SCRIPT_LIMIT: Duration = Duration::from_secs(300);

/// `<target>/browser-artefacts`, kept after the run (CI can upload it).
fn artefact_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("browser-artefacts")
}

fn require_tools() {
    let chromium = chromium();
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's browser with \
         `apt-get install -y chromium` (.ci/run does)"
    );
    let module = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output()
        .expect("python3 must be installed for the browser test");
    assert!(
        module.status.success(),
        "the Python module `playwright` is missing: `python3 -m pip install playwright` \
         (its driver only, no `playwright install`; .ci/run does):\n{}",
        String::from_utf8_lossy(&module.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pages_chat_end_to_end_in_chromium() {
    require_tools();
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start_node(dir.path(), "dev", &["dev"], base_env(dir.path())).await;

    let out = artefact_dir();
    // Only this run's screenshots (and a failure's) are left to look at.
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/demo.py");
    let child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&node.url)
        .arg(&out)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed for the browser test");
    // On timeout the child is dropped, which kills it.
    let output = tokio::time::timeout(SCRIPT_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "demo.py did not finish in {SCRIPT_LIMIT:?}; nexus log (last lines):\n{}",
                tail(&node.nexus.log_text(), 40)
            )
        })
        .expect("wait for demo.py");
    let (status, stdout, stderr) = (
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    println!("{stdout}");
    assert!(
        status.success(),
        "demo.py failed ({status}):\n{stdout}\n{stderr}\nscreenshots in {}\nnexus log (last lines):\n{}",
        out.display(),
        tail(&node.nexus.log_text(), 40)
    );

    for shot in SHOTS {
        let path = out.join(shot);
        let len = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("screenshot {} missing: {e}", path.display()))
            .len();
        assert!(len > 0, "screenshot {} is empty", path.display());
    }
}

/// A widget on the company's own site calls nexus from another origin: allowed by
/// `http.cors_allowed_origins`, refused by the browser for an origin not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_an_allowed_origin_chats_across_origins_in_chromium() {
    require_tools();
    let dir = tempfile::tempdir().expect("temp dir");
    // The page's port, chosen before nexus starts so its origin can be allowed.
    let page_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut env = base_env(dir.path());
    env.push((
        "NEXUS_HTTP__CORS_ALLOWED_ORIGINS",
        format!(r#"["http://127.0.0.1:{page_port}"]"#),
    ));
    let node = start_node(dir.path(), "dev", &["dev"], env).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cors.py");
    let child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&node.url)
        .arg(page_port.to_string())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed for the browser test");
    let output = tokio::time::timeout(SCRIPT_LIMIT, child.wait_with_output())
        .await
        .expect("cors.py finishes")
        .expect("wait for cors.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    println!("{stdout}");
    assert!(
        output.status.success(),
        "cors.py failed ({}):\n{stdout}\n{stderr}\nnexus log (last lines):\n{}",
        output.status,
        tail(&node.nexus.log_text(), 40)
    );
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
