//! The effect on SQLite against a tiny GWS in the test: tenants without GWS are skipped, other
//! events are ignored, a redelivered event is not called again, a 4xx is dead-lettered and a
//! replay of it tries again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::*;
use crate::bus::Message;
use crate::events::chat::{AgentAccepted, AgentState, AgentStateChanged, ConversationCompleted};
use crate::stores::provisioning::secrets::EncryptionKey;
use crate::stores::provisioning::Provisioning;

/// A GWS that counts POSTs and answers `status` (changeable) with a plain-text body, as a
/// proxy in front of it may; it knows no chat (GET is 404) and answers the agent's own user.
async fn gws(status: u16) -> (String, Arc<Mutex<u32>>, Arc<Mutex<u16>>) {
    gws_with_me(status, StatusCode::OK, StatusCode::OK).await
}

/// [`gws`], its agent's own user (`GET /api/v2/me`) answered with `me`.
/// A GWS whose chat POSTs answer `status` and whose agent's own user (`GET /api/v2/me`)
/// answers `me` when asked with an agent's id (`X-Agent-Id`), `me_anonymous` without.
async fn gws_with_me(
    status: u16,
    me: StatusCode,
    me_anonymous: StatusCode,
) -> (String, Arc<Mutex<u32>>, Arc<Mutex<u16>>) {
    let calls = Arc::new(Mutex::new(0u32));
    let status = Arc::new(Mutex::new(status));
    type S = State<(Arc<Mutex<u32>>, Arc<Mutex<u16>>)>;
    let app = Router::new()
        .route(
            "/api/v2/me",
            get(move |headers: axum::http::HeaderMap| async move {
                let code = if headers.contains_key(client::AGENT_HEADER) {
                    me
                } else {
                    me_anonymous
                };
                (code, r#"{"id": "a1"}"#)
            }),
        )
        .route(
            "/api/v2/me/chats/{id}",
            get(|| async { StatusCode::NOT_FOUND }).post(|State((calls, status)): S| async move {
                *calls.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                let code = *status.lock().unwrap_or_else(|p| p.into_inner());
                (StatusCode::from_u16(code).unwrap_or(StatusCode::OK), "OK")
            }),
        )
        .with_state((calls.clone(), status.clone()));
    let addr = serve(app).await;
    (addr, calls, status)
}

/// Serves `app` on a loopback port: its base URL.
async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn worker(url: &str, dir: &std::path::Path) -> (GwsWorker, Provisioning) {
    let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
    let db = Provisioning::connect(&dir.join("p.db").display().to_string(), &key)
        .await
        .expect("sqlite");
    let config = GwsConfig {
        url: url.to_string(),
        ..GwsConfig::default()
    };
    let http = crate::config::Config::defaults().http_client;
    let w =
        GwsWorker::new(&config, &http, db.pool().clone(), Duration::from_secs(30)).expect("worker");
    (w, db)
}

fn message() -> Message {
    Message {
        topic: "nexus.agent.v1".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: 0,
        key: "c1".into(),
        payload: Default::default(),
        headers: Default::default(),
    }
}

/// Agent a1 completes conversation c1 (a new event each call).
fn completion() -> Event {
    let body = ConversationCompleted {
        agent_id: "a1".into(),
        participant_id: "a1".into(),
        disposition: None,
        note: None,
        user_data: Default::default(),
        close_conversation: true,
    };
    Event::typed(&body, "t1", "c1", "edge/agent").expect("typed")
}

fn accepted() -> Event {
    let body = AgentAccepted {
        offer_id: "o1".into(),
        agent_id: "a1".into(),
        participant_id: "a1".into(),
        nickname: "Alice".into(),
    };
    Event::typed(&body, "t1", "c1", "edge/agent").expect("typed")
}

#[tokio::test]
async fn tenants_without_gws_and_other_events_make_no_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, calls, _) = gws(200).await;
    let (w, db) = worker("", dir.path()).await;
    w.apply(&accepted(), &message()).await.expect("skipped");
    let ready = AgentStateChanged {
        agent_id: "a1".into(),
        state: AgentState::Ready,
        reason_code: None,
        capacity: Default::default(),
    };
    let e = Event::typed(&ready, "t1", "a1", "edge/agent").expect("typed");
    w.apply(&e, &message()).await.expect("ignored");
    assert_eq!(*calls.lock().unwrap(), 0);
    db.close().await;
}

#[tokio::test]
async fn a_redelivered_event_is_not_called_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, calls, _) = gws(200).await;
    let (w, db) = worker(&url, dir.path()).await;
    let e = accepted();
    w.apply(&e, &message()).await.expect("called");
    w.apply(&e, &message()).await.expect("duplicate");
    assert_eq!(*calls.lock().unwrap(), 1);
    db.close().await;
}

#[tokio::test]
async fn a_refused_call_is_dead_lettered_and_a_replay_tries_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, calls, status) = gws(403).await;
    let (w, db) = worker(&url, dir.path()).await;
    let e = accepted();
    match w.apply(&e, &message()).await {
        Err(HandleError::Reject { reason, .. }) => assert_eq!(reason, REJECTED),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // The operator fixes what GWS refused and replays the dead letter.
    *status.lock().unwrap() = 200;
    w.apply(&e, &message()).await.expect("replayed");
    w.apply(&e, &message()).await.expect("duplicate");
    assert_eq!(*calls.lock().unwrap(), 2, "refused once, applied once");
    db.close().await;
}

/// GWS refusing nexus itself (a rotated credential: 401, 407; a 403 or a POST's 404 whose
/// agent's own user gets a 401 too; a wrong base URL, whose agent's own user is 404 with and
/// without the agent's id) is GWS down, not a refusal of the event: retried (the event waits
/// in the backlog), the effect still pending, nothing dead-lettered. A 403 or 404 while GWS
/// answers the agent's own user, or refuses it with a 403, or with a 404 only when asked for
/// that agent (that agent unknown to GWS now: pausing GWS for everyone over one agent would be
/// wrong), or another 4xx, is the event's refusal: dead-lettered at once. Before, every 4xx
/// dead-lettered its event, so a rotated key dead-lettered them all, and a wrong base URL did
/// too (its 404 to the agent's own user was taken for the agent's).
#[tokio::test]
async fn a_refusal_of_nexus_itself_is_retried_and_of_the_event_dead_lettered() {
    use StatusCode as S;
    let cases = [
        (401, S::OK, S::OK, false),
        (407, S::OK, S::OK, false),
        (403, S::FORBIDDEN, S::FORBIDDEN, true),
        (403, S::UNAUTHORIZED, S::UNAUTHORIZED, false),
        (404, S::NOT_FOUND, S::NOT_FOUND, false),
        (403, S::NOT_FOUND, S::NOT_FOUND, false),
        (404, S::NOT_FOUND, S::OK, true),
        (404, S::NOT_FOUND, S::UNAUTHORIZED, true),
        (404, S::UNAUTHORIZED, S::UNAUTHORIZED, false),
        (403, S::OK, S::OK, true),
        (404, S::OK, S::OK, true),
        (409, S::FORBIDDEN, S::FORBIDDEN, true),
    ];
    for (post, me, me_anonymous, rejected) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, calls, _) = gws_with_me(post, me, me_anonymous).await;
        let (w, db) = worker(&url, dir.path()).await;
        let got = w.apply(&accepted(), &message()).await;
        let status: String = sqlx::query_scalar("SELECT status FROM gws_effects")
            .fetch_one(db.pool())
            .await
            .expect("the effect's row");
        if rejected {
            assert!(
                matches!(&got, Err(HandleError::Reject { reason, .. }) if *reason == REJECTED),
                "{post} with {me}/{me_anonymous} to the agent's user: {got:?}"
            );
            assert_eq!(status, "rejected", "{post}/{me}/{me_anonymous}");
        } else {
            match &got {
                Err(HandleError::Retry(reason)) | Err(HandleError::RetryLater { reason, .. }) => {
                    assert!(
                        reason.contains(&post.to_string()) && reason.contains("credential"),
                        "{post}/{me}/{me_anonymous}: {reason}"
                    )
                }
                other => panic!("{post} with {me}/{me_anonymous} to the agent's user: {other:?}"),
            }
            assert_eq!(status, "pending", "{post}/{me}/{me_anonymous}");
        }
        assert_eq!(*calls.lock().unwrap(), 1, "{post}/{me}/{me_anonymous}");
        db.close().await;
    }
}

/// A 2xx whose body is not JSON is GWS's success: nothing retried, the peer never paused.
#[tokio::test]
async fn a_plain_text_success_is_success() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, calls, _) = gws(200).await;
    let (w, db) = worker(&url, dir.path()).await;
    for c in ["c1", "c2", "c3", "c4", "c5"] {
        let body = AgentAccepted {
            offer_id: format!("o-{c}"),
            agent_id: "a1".into(),
            participant_id: "a1".into(),
            nickname: "Alice".into(),
        };
        let e = Event::typed(&body, "t1", c, "edge/agent").expect("typed");
        w.apply(&e, &message()).await.expect("applied");
    }
    assert_eq!(
        *calls.lock().unwrap(),
        5,
        "one call each, none refused by a paused peer"
    );
    db.close().await;
}

/// An agent may complete a conversation more than once (a consultant leaving the consultation,
/// then, given the chat by a transfer, completing it): each completion is its own call, a
/// redelivered one is not.
#[tokio::test]
async fn each_completion_of_an_agent_is_called_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, calls, _) = gws(200).await;
    let (w, db) = worker(&url, dir.path()).await;
    let complete = completion;
    let (first, second) = (complete(), complete());
    w.apply(&first, &message()).await.expect("first");
    w.apply(&second, &message()).await.expect("second");
    w.apply(&first, &message()).await.expect("redelivered");
    assert_eq!(*calls.lock().unwrap(), 2);
    db.close().await;
}

/// A completion GWS applied but whose answer was lost is reconciled by reading the chat; the
/// agent, out of it now, is refused that read (403): the completion is done, not dead-lettered
/// as refused and not called again.
#[tokio::test]
async fn a_completion_whose_read_is_refused_is_reconciled_as_done() {
    completion_with_a_refused_read(StatusCode::OK).await;
}

/// The same, but GWS refuses the credential on the agent's own user (`GET /api/v2/me`, 401):
/// the completion is not taken for done (before, any 403 to the read was), GWS is taken for
/// down.
#[tokio::test]
async fn a_refused_read_with_a_refused_credential_is_not_taken_for_done() {
    completion_with_a_refused_read(StatusCode::UNAUTHORIZED).await;
}

/// The same, but GWS refuses the agent itself (403 to its own user): the read says nothing of
/// the completion, which is called again for GWS's answer to decide. Before, the read's 403
/// was taken for GWS refusing nexus: the target paused for every tenant over one agent.
#[tokio::test]
async fn a_refused_read_for_a_refused_agent_calls_again() {
    completion_with_a_refused_read(StatusCode::FORBIDDEN).await;
}

async fn completion_with_a_refused_read(me: StatusCode) {
    let posts = Arc::new(Mutex::new(0u32));
    let counted = posts.clone();
    let app = Router::new()
        .route(
            "/api/v2/me",
            get(move || async move { (me, r#"{"id": "a1"}"#) }),
        )
        .route(
            "/api/v2/me/chats/{id}",
            get(|| async { StatusCode::FORBIDDEN }).post(move || {
                let counted = counted.clone();
                async move {
                    *counted.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    // Applied, then the answer is lost on the way (a gateway's 503).
                    StatusCode::SERVICE_UNAVAILABLE
                }
            }),
        );
    let url = serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
    let db = Provisioning::connect(&dir.path().join("p.db").display().to_string(), &key)
        .await
        .expect("sqlite");
    let config = GwsConfig {
        url,
        timeout_ms: 100,
        ..GwsConfig::default()
    };
    let http = crate::config::Config::defaults().http_client;
    let w = GwsWorker::new(
        &config,
        &http,
        db.pool().clone(),
        Duration::from_millis(100),
    )
    .expect("worker");
    let e = completion();
    assert!(
        w.apply(&e, &message()).await.is_err(),
        "the answer was a 503"
    );
    // Past the call's time in flight: the next try reads the chat first.
    tokio::time::sleep(Duration::from_millis(400)).await;
    if me.is_success() {
        w.apply(&e, &message()).await.expect("reconciled");
        assert_eq!(*posts.lock().unwrap(), 1, "not called again");
        w.apply(&e, &message()).await.expect("done");
    } else if me == StatusCode::FORBIDDEN {
        let again = w.apply(&e, &message()).await;
        assert!(
            matches!(&again, Err(HandleError::Retry(reason)) | Err(HandleError::RetryLater { reason, .. }) if reason.contains("503")),
            "{again:?}"
        );
        assert_eq!(*posts.lock().unwrap(), 2, "called again");
    } else {
        // GWS taken for down (it refuses nexus's credential): retried, not counted against
        // the event while GWS answers nobody.
        let again = w.apply(&e, &message()).await;
        assert!(
            matches!(&again, Err(HandleError::RetryLater { reason, counts: false, .. }) if reason.contains("credential")),
            "{again:?}"
        );
        assert!(w.apply(&e, &message()).await.is_err(), "still not done");
    }
    db.close().await;
}

/// A refused completion replayed from the dead-letter topic is called again, never taken for
/// done by a read: the refused call took no effect (nor did any before it), so there is nothing
/// to look for. Before, the replay's first try read the chat; when that try failed (GWS's 503
/// to the read), the next one took the read's 403 for the agent having left by that call, and
/// marked done a completion GWS never applied.
#[tokio::test]
async fn a_replayed_refusal_is_called_again_not_reconciled() {
    let (posts, reads) = (Arc::new(Mutex::new(0u32)), Arc::new(Mutex::new(0u32)));
    let (counted_posts, counted_reads) = (posts.clone(), reads.clone());
    let app = Router::new()
        .route(
            "/api/v2/me",
            get(|| async { (StatusCode::OK, r#"{"id": "a1"}"#) }),
        )
        .route(
            "/api/v2/me/chats/{id}",
            get(move || {
                let reads = counted_reads.clone();
                async move {
                    let mut n = reads.lock().unwrap_or_else(|p| p.into_inner());
                    *n += 1;
                    // The first read fails, the next ones are forbidden to the agent.
                    if *n == 1 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::FORBIDDEN
                    }
                }
            })
            .post(move || {
                let posts = counted_posts.clone();
                async move {
                    *posts.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    StatusCode::FORBIDDEN
                }
            }),
        );
    let url = serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, db) = worker(&url, dir.path()).await;
    let e = completion();
    for round in ["first", "replayed", "replayed again"] {
        let got = w.apply(&e, &message()).await;
        assert!(
            matches!(&got, Err(HandleError::Reject { reason, .. }) if *reason == REJECTED),
            "{round}: {got:?}"
        );
    }
    assert_eq!(*posts.lock().unwrap(), 3, "called each time");
    assert_eq!(*reads.lock().unwrap(), 0, "nothing to look for");
    let status: String = sqlx::query_scalar("SELECT status FROM gws_effects")
        .fetch_one(db.pool())
        .await
        .expect("the effect's row");
    assert_eq!(status, "rejected");
    db.close().await;
}

/// An agent id that cannot travel as the `X-Agent-Id` header (a control character, as a
/// foreign producer may publish through ingest) is a bad event: dead-lettered at once, with no
/// call and no effect-log row. Before, the request could not be built, which was taken for
/// GWS failing: retried from the backlog (forever while nothing else answered, since such a
/// failure does not count) and counted against the target's circuit.
#[tokio::test]
async fn an_agent_id_that_cannot_be_a_header_is_a_bad_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url, calls, _) = gws(200).await;
    let (w, db) = worker(&url, dir.path()).await;
    for agent in ["a1\n", "a1\r\nX-Injected: 1", "a\u{7f}1"] {
        let body = AgentAccepted {
            offer_id: "o1".into(),
            agent_id: agent.into(),
            participant_id: agent.into(),
            nickname: "Alice".into(),
        };
        let e = Event::typed(&body, "t1", "c1", "edge/agent").expect("typed");
        match w.apply(&e, &message()).await {
            Err(HandleError::Reject { reason, detail }) => {
                assert_eq!(reason, BAD_EVENT, "{detail}");
                assert!(!detail.contains(agent), "{detail}");
            }
            other => panic!("{agent:?}: expected a bad event, got {other:?}"),
        }
    }
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gws_effects")
        .fetch_one(db.pool())
        .await
        .expect("count");
    assert_eq!(
        rows, 0,
        "no effect logged for a call that can never be made"
    );
    assert_eq!(*calls.lock().unwrap(), 0);
    // A printable id (any visible character) still goes.
    w.apply(&accepted(), &message()).await.expect("called");
    assert_eq!(*calls.lock().unwrap(), 1);
    db.close().await;
}

/// What a [`recording_gws`] refuses: the POST's status and the agent's own user's, while set.
type Refusing = Arc<Mutex<Option<(u16, u16)>>>;

/// A GWS that records each request (`POST 401`, `GET /me 200`, `GET chat 404`), refuses as
/// [`Refusing`] says (its chat read answered as its POST while that is 401 or 407: the
/// credential refused everywhere) and otherwise takes every call; it knows no chat.
async fn recording_gws() -> (String, Arc<Mutex<Vec<String>>>, Refusing) {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let refusing: Refusing = Arc::new(Mutex::new(None));
    type S = State<(Arc<Mutex<Vec<String>>>, Refusing)>;
    fn record(seen: &Mutex<Vec<String>>, what: &str, status: u16) -> StatusCode {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("{what} {status}"));
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
    let app = Router::new()
        .route(
            "/api/v2/me",
            get(|State((seen, refusing)): S| async move {
                let me = refusing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map_or(200, |r| r.1);
                (record(&seen, "GET /me", me), r#"{"id": "a1"}"#)
            }),
        )
        .route(
            "/api/v2/me/chats/{id}",
            get(|State((seen, refusing)): S| async move {
                let read = match *refusing.lock().unwrap_or_else(|p| p.into_inner()) {
                    Some((post @ (401 | 407), _)) => post,
                    _ => 404,
                };
                record(&seen, "GET chat", read)
            })
            .post(|State((seen, refusing)): S| async move {
                let post = refusing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .map_or(200, |r| r.0);
                (record(&seen, "POST", post), "{}")
            }),
        )
        .with_state((seen.clone(), refusing.clone()));
    let addr = serve(app).await;
    (addr, seen, refusing)
}

/// A worker whose in-flight window is ten minutes (the 10 s GWS timeout plus a handler
/// timeout of that length): a try that waits for the previous call never comes in a test.
async fn patient_worker(url: &str, dir: &std::path::Path) -> (GwsWorker, Provisioning) {
    let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
    let db = Provisioning::connect(&dir.join("p.db").display().to_string(), &key)
        .await
        .expect("sqlite");
    let config = GwsConfig {
        url: url.to_string(),
        ..GwsConfig::default()
    };
    let http = crate::config::Config::defaults().http_client;
    let w = GwsWorker::new(&config, &http, db.pool().clone(), Duration::from_secs(600))
        .expect("worker");
    (w, db)
}

/// GWS refusing nexus itself (401, 407; a 403 or a POST's 404 whose agent's own user is
/// answered 401) proves the call took no effect: once the credential is taken again, the next
/// try calls at once, with no read of the chat (no earlier call can have taken effect). Before,
/// it waited the whole in-flight window (here ten minutes: the try was refused "may still be in
/// flight") for a call GWS had refused.
#[tokio::test]
async fn a_call_gws_refused_as_misconfigured_is_not_waited_for() {
    for (post, me) in [(401, 200), (407, 200), (403, 401), (404, 401)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, seen, refusing) = recording_gws().await;
        let (w, db) = patient_worker(&url, dir.path()).await;
        *refusing.lock().unwrap() = Some((post, me));
        let e = accepted();
        match w.apply(&e, &message()).await {
            Err(HandleError::Retry(reason)) | Err(HandleError::RetryLater { reason, .. }) => {
                assert!(reason.contains("credential"), "{post}/{me}: {reason}")
            }
            other => panic!("{post}/{me}: expected GWS taken for down, got {other:?}"),
        }
        // The credential is taken again.
        *refusing.lock().unwrap() = None;
        w.apply(&e, &message())
            .await
            .unwrap_or_else(|e| panic!("{post}/{me}: the next try did not call: {e:?}"));
        let mut want = vec![format!("POST {post}")];
        if me != 200 {
            want.push(format!("GET /me {me}"));
        }
        want.push("POST 200".to_string());
        assert_eq!(*seen.lock().unwrap(), want, "{post}/{me}");
        let status: String = sqlx::query_scalar("SELECT status FROM gws_effects")
            .fetch_one(db.pool())
            .await
            .expect("the effect's row");
        assert_eq!(status, "done", "{post}/{me}");
        db.close().await;
    }
}

/// A call whose outcome is unknown (it timed out: GWS may be applying it) is still waited for:
/// the next try makes no request before the in-flight window is over.
#[tokio::test]
async fn a_call_that_timed_out_is_still_waited_for() {
    let app = Router::new().route(
        "/api/v2/me/chats/{id}",
        get(|| async { StatusCode::NOT_FOUND }).post(|| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK
        }),
    );
    let url = serve(app).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = EncryptionKey::parse(&"00".repeat(32)).expect("key");
    let db = Provisioning::connect(&dir.path().join("p.db").display().to_string(), &key)
        .await
        .expect("sqlite");
    let config = GwsConfig {
        url,
        timeout_ms: 100,
        ..GwsConfig::default()
    };
    let http = crate::config::Config::defaults().http_client;
    let w = GwsWorker::new(&config, &http, db.pool().clone(), Duration::from_secs(600))
        .expect("worker");
    let e = accepted();
    match w.apply(&e, &message()).await {
        Err(HandleError::Retry(reason)) | Err(HandleError::RetryLater { reason, .. }) => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    match w.apply(&e, &message()).await {
        Err(HandleError::RetryLater { reason, counts, .. }) => {
            assert!(reason.contains("may still be in flight"), "{reason}");
            assert!(!counts, "waiting is no failure of the event");
        }
        other => panic!("expected a wait for the call in flight, got {other:?}"),
    }
    db.close().await;
}
