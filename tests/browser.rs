//! The demo pages in a real browser: `nexus dev` runs as a process, `tests/browser/demo.py`
//! drives `/demo/agent` and `/demo/widget` in headless Debian Chromium through Playwright's
//! driver (customer starts and sends, agent accepts and replies, customer sees the reply, agent
//! completes, customer sees the end) and screenshots both pages into
//! `target/browser-artefacts/`. A second test calls the chat API from a page of another origin
//! (`tests/browser/cors.py`), allowed by `http.cors_allowed_origins`. The other tests each run
//! one case of `tests/browser/cases.py` against a `nexus dev` of their own: a page in a situation
//! a contact centre meets (behind a path prefix, a network drop, a customer leaving while the
//! offer rings, a refusal, a long transcript, a double click, an expiring client key, a reload,
//! a key or token revoked under an open socket, several chats at once, typing). Requires
//! `/usr/bin/chromium` (or `NEXUS_TEST_CHROMIUM`) and the Python module `playwright` (CI
//! installs both): a missing one fails the test rather than skipping it.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::chat::{base_env, start_node, ADMIN};

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
    let _turn = BROWSERS
        .acquire()
        .await
        .expect("the semaphore is never closed");
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
    let _turn = BROWSERS
        .acquire()
        .await
        .expect("the semaphore is never closed");
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

/// Browsers at once: each case runs a nexus and a Chromium, and a 2-core CI machine running
/// them all together would stretch steps past their limit.
static BROWSERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs one case of `tests/browser/cases.py` against a `nexus dev` of its own, with `env`
/// added to the test defaults.
async fn case(name: &str, env: &[(&'static str, &str)]) {
    require_tools();
    let _turn = BROWSERS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut all = base_env(dir.path());
    all.extend(env.iter().map(|(k, v)| (*k, v.to_string())));
    let node = start_node(dir.path(), "dev", &["dev"], all).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/cases.py");
    let child = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&node.url)
        .arg(name)
        .env("NEXUS_TEST_ADMIN_TOKEN", ADMIN)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 must be installed for the browser test");
    let output = tokio::time::timeout(SCRIPT_LIMIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "cases.py {name} did not finish in {SCRIPT_LIMIT:?}; nexus log (last lines):\n{}",
                tail(&node.nexus.log_text(), 40)
            )
        })
        .expect("wait for cases.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    println!("{stdout}");
    assert!(
        output.status.success(),
        "cases.py {name} failed ({}):\n{stdout}\n{stderr}\nnexus log (last lines):\n{}",
        output.status,
        tail(&node.nexus.log_text(), 40)
    );
}

/// Behind a reverse proxy that serves nexus under `/support/`, both pages load their config,
/// call the APIs, open their sockets and download files under that prefix; a nickname of
/// markup is shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pages_work_behind_a_path_prefix() {
    case("path_prefix", &[]).await;
}

/// A customer leaving while the offer rings takes the offer off the console, which lists no
/// chat for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_drops_an_offer_whose_customer_left() {
    case("offer_withdrawn", &[]).await;
}

/// After a network drop the console shows what changed meanwhile: its chat ended, an offer
/// still pending (and withdrawn later), the agent's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_resyncs_after_its_socket_drops() {
    case("agent_reconnect_resyncs", &[]).await;
}

/// A reply typed while the console's socket is down stays in the box and is sent once back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_keeps_a_reply_typed_offline() {
    case("agent_reply_while_down", &[]).await;
}

/// The widget's network drops: a failed send keeps its text and goes once when back; the
/// stream resumes from its position, the agent's reply meanwhile shown once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_resumes_and_resends_after_a_drop() {
    case("widget_send_while_down", &[]).await;
}

/// A double click on Start is one chat with one socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_double_click_on_start_opens_one_socket() {
    case("start_double_click", &[]).await;
}

/// The same text sent twice quickly, the first still unacknowledged, is two messages: in the
/// widget (its sends held) and in the console; only a failed send keeps its id when sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_text_sent_twice_quickly_is_two_messages() {
    case("same_text_twice", &[]).await;
}

/// `transfer_failed` (the second agent is not ready) is shown with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_a_refused_transfer_and_consult() {
    case("transfer_refused", &[]).await;
}

/// A transcript longer than one page (100 entries) is read whole on accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_reads_a_long_transcript_whole() {
    case("long_transcript", &[]).await;
}

/// The widget's "is typing" goes when the chat ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_clears_typing_when_the_chat_ends() {
    case("typing_cleared", &[]).await;
}

/// A chat outlives its client key: the widget renews the key (here of 1 s, taken until 60 s
/// later) and reconnects its stream with the new one when the old ends it (4001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_renews_its_client_key() {
    case("key_renewal", &[("NEXUS_CHAT__CLIENT_KEY_TTL_S", "1")]).await;
}

/// Refusals show their code (`MESSAGE_TOO_LONG`, `FILE_EXPIRED`) and keep what was typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_pages_show_refusals_and_keep_the_text() {
    case(
        "refusals_shown",
        &[
            ("NEXUS_CHAT__MAX_MESSAGE_CHARS", "20"),
            ("NEXUS_CHAT__FILE_RETENTION_S", "1"),
        ],
    )
    .await;
}

/// A reload, or leaving the page and coming back in the same tab, resumes the chat from the
/// session the widget keeps (sessionStorage): the transcript again, what came meanwhile once, the
/// chat going on both ways; a kept session whose key is refused is dropped for the start form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_resumes_its_chat_after_a_reload() {
    case("widget_reload_resumes", &[]).await;
}

/// After a chat ends the widget offers "Start a new chat" (a new session, no reload); a
/// reload after the end shows the start form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_starts_a_new_chat_after_one_ended() {
    case("widget_new_chat", &[]).await;
}

/// The site's API key disabled under an open stream (close code 4003): the widget says the
/// chat can't continue and stops reconnecting (key checks every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_stops_when_its_api_key_is_disabled() {
    case(
        "widget_api_key_disabled",
        &[("NEXUS_STORES__AUTH_CACHE_TTL_MS", "1000")],
    )
    .await;
}

/// The agent's token rotated under an open console (close code 4001), or refused at the
/// handshake: the console says to sign in again and stops reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_signs_out_when_its_token_is_rotated() {
    case(
        "agent_token_rotated",
        &[("NEXUS_STORES__AUTH_CACHE_TTL_MS", "1000")],
    )
    .await;
}

/// Each chat of the console keeps its own draft across switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_keeps_a_draft_per_chat() {
    case("agent_drafts", &[]).await;
}

/// An offer counts down its seconds; at 0 by the page's clock it stays until the server
/// closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_counts_an_offer_down() {
    case("offer_countdown", &[]).await;
}

/// The console sends typing (one start per burst, a stop after a pause) and shows the
/// customer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sends_and_shows_typing() {
    case("typing_both_ways", &[]).await;
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
