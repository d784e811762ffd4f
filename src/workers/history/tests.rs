//! Unit tests of the history role: step order and the UCS payload mapping.

use std::collections::BTreeMap;

use serde_json::json;

use super::store::{Closed, Entry, Kept, Started, State, Step};
use super::*;
use crate::events::chat::{CloseReason, Contact, ParticipantKind};

fn started() -> Started {
    Started {
        nickname: "Ann".into(),
        contact: Contact {
            first_name: Some("Ann".into()),
            last_name: Some("Lee".into()),
            email_address: Some("ann@example.com".into()),
            phone_number: None,
        },
        subject: Some("billing".into()),
        user_data: BTreeMap::from([("lang".into(), "fr".into())]),
        started_at_ms: 1_700_000_000_000,
        event_id: "e1".into(),
    }
}

fn state(step: Step, closed: bool) -> State {
    State {
        step,
        started: started(),
        contact_id: None,
        interaction_id: None,
        closed: closed.then_some(Closed {
            reason: CloseReason::AgentCompleted,
            closed_by_participant_id: None,
            closed_at_ms: 1_700_000_060_000,
            recorded_at_ms: 1_700_000_060_001,
            event_id: "e9".into(),
        }),
        attachments_done: 0,
        written: None,
    }
}

fn entry(position: i64, text: &str, media: &[&str]) -> Entry {
    Entry {
        position,
        kind: "Message".into(),
        at_ms: 1_700_000_000_000 + position,
        participant_id: "p".into(),
        participant_kind: ParticipantKind::Customer,
        nickname: Some("Ann".into()),
        text: Some(text.into()),
        media_ids: media.iter().map(|s| s.to_string()).collect(),
        agents_only: false,
    }
}

#[test]
fn steps_run_in_order_and_the_close_gates_the_documents() {
    assert_eq!(next(&state(Step::Recorded, false)), Next::IdentifyContact);
    assert_eq!(
        next(&state(Step::ContactIdentified, false)),
        Next::InsertInteraction
    );
    assert_eq!(
        next(&state(Step::InteractionInserted, false)),
        Next::WaitForClose
    );
    assert_eq!(
        next(&state(Step::InteractionInserted, true)),
        Next::AddTranscript
    );
    let mut s = state(Step::TranscriptAdded, true);
    s.attachments_done = 2;
    assert_eq!(next(&s), Next::AddAttachment(2));
    assert_eq!(next(&state(Step::AttachmentsAdded, true)), Next::SetStatus);
    assert_eq!(next(&state(Step::Done, true)), Next::Nothing);
    for v in 0..=5 {
        assert_eq!(Step::from_i64(v).map(|s| s as i64), Some(v));
    }
    assert_eq!(Step::from_i64(6), None);
}

/// A start run again while its UCS calls are still to do is its own retry; once they are
/// done, or under another event id, it is a redelivery.
#[test]
fn only_a_pending_start_of_its_own_is_not_a_duplicate() {
    assert!(own_start_pending(&state(Step::Recorded, false), "e1"));
    assert!(own_start_pending(
        &state(Step::ContactIdentified, false),
        "e1"
    ));
    assert!(!own_start_pending(
        &state(Step::InteractionInserted, false),
        "e1"
    ));
    assert!(!own_start_pending(&state(Step::Done, true), "e1"));
    assert!(!own_start_pending(&state(Step::Recorded, false), "e2"));
    let mut before = state(Step::Recorded, false);
    before.started.event_id = String::new();
    assert!(
        !own_start_pending(&before, "e1"),
        "rows from before carry no id"
    );
}

#[test]
fn ids_are_deterministic_per_tenant_and_conversation() {
    let a = ucs::object_id("t1", "c1", "transcript");
    assert_eq!(a, ucs::object_id("t1", "c1", "transcript"));
    assert_ne!(a, ucs::object_id("t2", "c1", "transcript"));
    assert_ne!(a, ucs::object_id("t1", "c1", "contact"));
    let c1 = ucs::identify_contact("t1", "c1", &started());
    assert_eq!(c1, ucs::identify_contact("t1", "c1", &started()));
}

#[test]
fn payloads_carry_the_conversation() {
    let c = ucs::identify_contact("t1", "c1", &started());
    assert_eq!((c.service, c.method), ("OMContacts", "IdentifyContact"));
    assert_eq!(c.parameters["EmailAddress"], "ann@example.com");
    assert_eq!(c.parameters["FirstName"], "Ann");
    assert_eq!(c.parameters["TenantId"], "t1");
    assert_eq!(c.user_data, json!({"lang": "fr"}));

    let i = ucs::insert_interaction("t1", "c1", "contact-9", &started());
    assert_eq!(i.method, "InsertInteraction");
    assert_eq!(i.parameters["Id"], "c1");
    assert_eq!(i.parameters["ContactId"], "contact-9");
    assert_eq!(i.parameters["MediaTypeId"], "chat");
    assert_eq!(i.parameters["Subject"], "billing");
    assert_eq!(i.parameters["StartDate"], "2023-11-14T22:13:20.000Z");

    let entries = [
        entry(1, "hello", &[]),
        entry(2, "see file", &["f1", "f2"]),
        entry(3, "again", &["f1"]),
    ];
    let d = ucs::transcript_document("t1", "c1", "c1", &entries);
    assert_eq!(d.method, "AddDocument");
    assert_eq!(d.parameters["Id"], ucs::object_id("t1", "c1", "transcript"));
    let texts: Vec<&str> = d.parameters["Content"]["Messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["Text"].as_str())
        .collect();
    assert_eq!(texts, ["hello", "see file", "again"]);
    assert_eq!(ucs::attachments(&entries), ["f1", "f2"]);

    let s = ucs::set_interaction_status(
        "t1",
        "c1",
        state(Step::AttachmentsAdded, true)
            .closed
            .as_ref()
            .expect("closed"),
    );
    assert_eq!(s.parameters["Status"], "Stopped");
    assert_eq!(s.parameters["Reason"], "AGENT_COMPLETED");
    assert_eq!(s.parameters["InteractionId"], "c1");

    assert_eq!(
        ucs::contact_id_of(&json!({"ContactId": "x"})),
        Some("x".into())
    );
    assert_eq!(
        ucs::contact_id_of(&json!({"Result": {"ContactId": "y"}})),
        Some("y".into())
    );
    assert_eq!(ucs::contact_id_of(&json!({"ContactId": ""})), None);
}

#[test]
fn interaction_events_map_to_entries() {
    let body = json!({
        "message_id": "m1", "participant_id": "a1", "participant_kind": "AGENT",
        "nickname": "Bob", "agent_id": "a1", "kind": "TEXT", "text": "hi",
        "media_ids": [], "in_reply_to": null, "transcript_position": 4
    });
    let serde_json::Value::Object(body) = body else {
        unreachable!("object")
    };
    let e = Event::new("MessageSent", "t1", "c1", "test", body.clone());
    let got = entry_of(&e).expect("an entry event").expect("valid");
    assert_eq!(
        (got.position, got.text.as_deref(), got.nickname.as_deref()),
        (4, Some("hi"), Some("Bob"))
    );
    assert!(!got.agents_only, "a v1-shaped body is visible to all");
    let mut internal = body.clone();
    internal.insert("visibility".into(), json!("AGENTS"));
    let e = Event::new("MessageSent", "t1", "c1", "test", internal);
    let got = entry_of(&e).expect("an entry event").expect("valid");
    assert!(got.agents_only);
    let d = ucs::transcript_document("t1", "c1", "c1", &[got]);
    assert_eq!(
        d.parameters["Content"]["Messages"][0]["Visibility"], "Agents",
        "{}",
        d.parameters
    );
    let joined = json!({
        "participant_id": "a2", "participant_kind": "AGENT", "nickname": "Cy",
        "agent_id": "a2", "transcript_position": 5, "visibility": "AGENTS"
    });
    let serde_json::Value::Object(joined) = joined else {
        unreachable!("object")
    };
    let e = Event::new("ParticipantJoined", "t1", "c1", "test", joined);
    let got = entry_of(&e).expect("an entry event").expect("valid");
    assert_eq!(
        (got.kind.as_str(), got.agents_only),
        ("ParticipantJoined", true)
    );
    let other = Event::new(
        "ConversationRouted",
        "t1",
        "c1",
        "test",
        serde_json::Map::new(),
    );
    assert!(entry_of(&other).is_none());
}

/// The effect state on SQLite (`nexus dev`); PostgreSQL runs the same SQL in tests/history_ucs.rs.
#[tokio::test]
async fn the_state_store_applies_each_step_once() {
    use crate::stores::provisioning::Provisioning;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Provisioning::temporary(dir.path()).await;
    let s = HistoryStore::new(p.pool().clone());
    assert!(s
        .record_start("t", "c", &started(), "e1")
        .await
        .expect("start"));
    assert!(!s
        .record_start("t", "c", &started(), "e1")
        .await
        .expect("again"));
    for (position, text) in [(2, "b"), (1, "a")] {
        let kept = s.add_entry("t", "c", &entry(position, text, &[])).await;
        assert_eq!(kept.expect("entry"), Kept::New);
    }
    let again = s.add_entry("t", "c", &entry(1, "a", &[])).await;
    assert_eq!(again.expect("redelivered"), Kept::Duplicate);
    let texts: Vec<Option<String>> = s
        .entries("t", "c")
        .await
        .expect("entries")
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, [Some("a".into()), Some("b".into())]);

    let moved = s
        .advance(
            "t",
            "c",
            Step::Recorded,
            Step::ContactIdentified,
            Some("k1"),
            None,
            "e1",
        )
        .await
        .expect("advance");
    assert!(moved);
    let again = s
        .advance(
            "t",
            "c",
            Step::Recorded,
            Step::ContactIdentified,
            Some("k2"),
            None,
            "e1",
        )
        .await
        .expect("advance again");
    assert!(!again, "a step applies once");
    let st = s.load("t", "c").await.expect("load").expect("row");
    assert_eq!(
        (st.step, st.contact_id.as_deref()),
        (Step::ContactIdentified, Some("k1"))
    );
    assert_eq!(next(&st), Next::InsertInteraction);

    let closed = Closed {
        reason: CloseReason::CustomerLeft,
        closed_by_participant_id: None,
        closed_at_ms: 5,
        recorded_at_ms: 6,
        event_id: "e9".into(),
    };
    assert!(s
        .record_close("t", "c", &closed, "e9")
        .await
        .expect("close"));
    assert!(!s
        .record_close("t", "c", &closed, "e9")
        .await
        .expect("close again"));
    assert!(!s
        .record_close("t", "other", &closed, "e9")
        .await
        .expect("unknown"));
    for (from, to) in [
        (Step::ContactIdentified, Step::InteractionInserted),
        (Step::InteractionInserted, Step::TranscriptAdded),
    ] {
        if to == Step::TranscriptAdded {
            assert!(s.set_written("t", "c", &[1, 2]).await.expect("written"));
            assert!(
                !s.set_written("t", "c", &[1, 2, 3]).await.expect("again"),
                "frozen at the first attempt"
            );
        }
        assert!(s
            .advance("t", "c", from, to, None, Some("c"), "e9")
            .await
            .expect("advance"));
    }
    let late = s.add_entry("t", "c", &entry(3, "late", &[])).await;
    assert_eq!(
        late.expect("late"),
        Kept::Late,
        "entries after the transcript are not kept"
    );
    let again = s.add_entry("t", "c", &entry(2, "b", &[])).await;
    assert_eq!(
        again.expect("redelivered"),
        Kept::Duplicate,
        "an entry the document holds, delivered again, is not late"
    );
    let st = s.load("t", "c").await.expect("load").expect("row");
    assert_eq!(st.written, Some(vec![1, 2]));
    assert!(s
        .attachment_added("t", "c", 0, "e9")
        .await
        .expect("attachment"));
    assert!(!s.attachment_added("t", "c", 0, "e9").await.expect("twice"));
    let st = s.load("t", "c").await.expect("load").expect("row");
    assert_eq!(next(&st), Next::AddAttachment(1));
    s.drop_entries("t", "c").await.expect("drop");
    assert!(s.entries("t", "c").await.expect("entries").is_empty());

    // Pruning takes only finished conversations older than the cut, and open ones nobody
    // wrote to since it.
    for open in ["open", "quiet", "waiting"] {
        assert!(s
            .record_start("t", open, &started(), "e2")
            .await
            .expect("start open"));
    }
    // "waiting" has an event in the retry backlog (its UCS down): waiting, not abandoned.
    sqlx::query(
        "INSERT INTO effect_backlog (role, tenant_id, conversation_id, seq, event_id, topic, \
         source_partition, source_offset, record_key, payload, headers_json, due_at_ms, \
         attempts, created_at_ms) \
         VALUES ('history', 't', 'waiting', 1, 'e5', 'nexus.interaction.v1', 0, 0, 'waiting', \
         '', '[]', 0, 0, 0)",
    )
    .execute(p.pool())
    .await
    .expect("backlog row");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let quiet_cut = chrono::Utc::now().timestamp_millis();
    assert_eq!(
        s.add_entry("t", "quiet", &entry(0, "still here", &[]))
            .await
            .expect("quiet entry"),
        Kept::New
    );
    for (from, to) in [
        (Step::TranscriptAdded, Step::AttachmentsAdded),
        (Step::AttachmentsAdded, Step::Done),
    ] {
        assert!(s
            .advance("t", "c", from, to, None, None, "e9")
            .await
            .expect("advance"));
    }
    // Closed, but its UCS writes never finished (dead-lettered): pruned with its entries.
    assert!(s
        .record_start("t", "stuck", &started(), "e3")
        .await
        .expect("start stuck"));
    assert_eq!(
        s.add_entry("t", "stuck", &entry(0, "hi", &[]))
            .await
            .expect("stuck entry"),
        Kept::New
    );
    assert!(s
        .record_close("t", "stuck", &closed, "e4")
        .await
        .expect("close stuck"));
    // Closed, its close waiting in the retry backlog (its UCS down for weeks): kept whole, the
    // transcript is still to be written.
    assert!(s
        .record_start("t", "closing", &started(), "e6")
        .await
        .expect("start closing"));
    assert_eq!(
        s.add_entry("t", "closing", &entry(0, "bye", &[]))
            .await
            .expect("closing entry"),
        Kept::New
    );
    assert!(s
        .record_close("t", "closing", &closed, "e7")
        .await
        .expect("close closing"));
    sqlx::query(
        "INSERT INTO effect_backlog (role, tenant_id, conversation_id, seq, event_id, topic, \
         source_partition, source_offset, record_key, payload, headers_json, due_at_ms, \
         attempts, created_at_ms) \
         VALUES ('history', 't', 'closing', 1, 'e7', 'nexus.interaction.v1', 0, 0, 'closing', \
         '', '[]', 0, 0, 0)",
    )
    .execute(p.pool())
    .await
    .expect("backlog row");
    let cut = chrono::Utc::now().timestamp_millis() + 1_000;
    assert_eq!(
        s.prune_done(cut - 60_000).await.expect("prune"),
        0,
        "too new"
    );
    // At the quiet one's cut, "open" (no entry) is abandoned; "quiet" wrote after the cut.
    assert_eq!(s.prune_done(quiet_cut).await.expect("prune"), 1);
    assert!(s.load("t", "open").await.expect("load").is_none());
    assert!(s.load("t", "quiet").await.expect("load").is_some());
    assert_eq!(s.entries("t", "quiet").await.expect("entries").len(), 1);
    assert_eq!(s.prune_done(cut).await.expect("prune"), 3);
    assert!(s.load("t", "c").await.expect("load").is_none());
    assert!(s.load("t", "stuck").await.expect("load").is_none());
    assert!(s.entries("t", "stuck").await.expect("entries").is_empty());
    assert!(s.load("t", "quiet").await.expect("load").is_none());
    assert!(s.entries("t", "quiet").await.expect("entries").is_empty());
    assert!(s.load("t", "waiting").await.expect("load").is_some());
    assert!(s.load("t", "closing").await.expect("load").is_some());
    assert_eq!(s.entries("t", "closing").await.expect("entries").len(), 1);
    // Entries of a conversation whose start never came (dead-lettered) go once old.
    assert_eq!(
        s.add_entry("t", "orphan", &entry(0, "lost", &[]))
            .await
            .expect("orphan entry"),
        Kept::New
    );
    assert_eq!(s.prune_done(cut - 60_000).await.expect("prune"), 0);
    assert_eq!(s.entries("t", "orphan").await.expect("entries").len(), 1);
    assert_eq!(
        s.prune_done(chrono::Utc::now().timestamp_millis() + 1_000)
            .await
            .expect("prune"),
        0
    );
    assert!(s.entries("t", "orphan").await.expect("entries").is_empty());
}

/// Ids PostgreSQL cannot key (a NUL, too long for an index) or that hold a control character
/// are told before any store call; nexus's own (UUIDs) pass.
#[test]
fn ids_the_store_cannot_key_are_told() {
    let event = |tenant: &str, conv: &str| {
        Event::new(
            "ConversationStarted",
            tenant,
            conv,
            "test",
            serde_json::Map::new(),
        )
    };
    let uuid = "0193a4b2-0000-7000-8000-000000000001";
    assert_eq!(unkeyable(&event(uuid, uuid)), None);
    assert_eq!(unkeyable(&event(uuid, &"c".repeat(MAX_ID_BYTES))), None);
    let long = unkeyable(&event(uuid, &"c".repeat(MAX_ID_BYTES + 1)));
    assert!(long.is_some_and(|w| w.starts_with("conversation id of 513 bytes")));
    let nul = unkeyable(&event("t\u{0}1", uuid));
    assert!(nul.is_some_and(|w| w.starts_with("tenant id holds a control")));
    assert!(unkeyable(&event(uuid, "line\nbreak")).is_some());
}

/// A refusal names the UCS call it refused; a retryable failure is unchanged.
#[test]
fn a_refusal_names_its_call() {
    let call = ucs::identify_contact("t1", "c1", &started());
    match ucs_failed(call.name())(PeerFailure::Rejected {
        peer: "ucs",
        status: 400,
        detail: "no".into(),
        identity_refused: false,
    }) {
        HandleError::Reject { reason, detail } => {
            assert_eq!(reason, REJECTED);
            assert_eq!(detail, "OMContacts/IdentifyContact: ucs answered 400: no");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ucs_failed(call.name())(PeerFailure::retry("down".into())),
        HandleError::Retry(_)
    ));
}

/// By method: the status the loopback UCS answers, and the calls it got.
type Methods = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u16, usize)>>>;

/// A UCS on loopback: `POST /ucs/v1/{Service}/{Method}` answers the status set for the method
/// (200 with a ContactId by default) and counts the calls by method; any other path is axum's
/// 404, as a wrong base path meets.
/// The status that makes [`ucs_server`] answer a method only after a minute.
const HANG: u16 = 1;

async fn ucs_server() -> (String, Methods) {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    async fn answer(
        State(methods): State<Methods>,
        Path((_, method)): Path<(String, String)>,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let status = {
            let mut m = methods.lock().unwrap_or_else(|p| p.into_inner());
            let entry = m.entry(method).or_insert((200, 0));
            entry.1 += 1;
            entry.0
        };
        if status == HANG {
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
        }
        let body = match status {
            200 => json!({"ContactId": "contact-1", "Id": "c1"}),
            404 => json!({"error": "unknown InteractionId"}),
            _ => json!({"error": "refused"}),
        };
        (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(body),
        )
    }
    let methods: Methods = Default::default();
    let app = axum::Router::new()
        .route("/ucs/v1/{service}/{method}", axum::routing::post(answer))
        .with_state(methods.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), methods)
}

/// `nexus_peer_calls_total` of a role with `outcome`, as /metrics renders it.
fn peer_calls(role: &str, outcome: &str) -> f64 {
    crate::telemetry::init_metrics()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with(m::PEER_CALLS_TOTAL)
                && l.contains(&format!("role=\"{role}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A 404 from UCS is told apart: IdentifyContact's (find or create: nothing to miss) and
/// another call's whose IdentifyContact, asked again, gets a 404 too are the address's (a
/// wrong base path, or something else than UCS answering): a retryable failure counted
/// `misconfigured`, the target taken for down, nothing dead-lettered. A 404 while UCS answers
/// the conversation's IdentifyContact (or refuses it for its own reasons) is the event's: an
/// object it names unknown, rejected as before. IdentifyContact failing tells nothing: retried.
/// Before, every 404 was the event's, and a wrong path dead-lettered every event.
#[tokio::test]
async fn a_404_is_the_events_only_where_ucs_answers_its_identify_contact() {
    use crate::workers::peer::{Peer, PeerConfig, PeerTarget};
    crate::telemetry::init_metrics();
    const ROLE: &str = "history-404-test";
    let (url, methods) = ucs_server().await;
    let ucs = || {
        ucs::Ucs::new(Peer::new(
            ROLE,
            "ucs",
            reqwest::Client::new(),
            &PeerConfig::default(),
        ))
    };
    let at = |url: String| PeerTarget {
        url,
        credential: "k".into(),
        timeout_ms: 2_000,
    };
    let contact = ucs::identify_contact("t1", "c1", &started());
    let transcript = || ucs::transcript_document("t1", "c1", "c1", &[entry(1, "hi", &[])]);
    let set = |method: &str, status: u16| {
        methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(method.to_string())
            .or_insert((200, 0))
            .0 = status;
    };
    let asked = |method: &str| {
        methods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(method)
            .map_or(0, |m| m.1)
    };
    let misconfigured = || peer_calls(ROLE, "misconfigured");

    // A wrong base path: axum's own 404 to every path.
    let wrong = at(format!("{url}/ucs-typo"));
    let before = misconfigured();
    for call in [contact.clone(), transcript()] {
        let name = call.name();
        match ucs().call(&wrong, "c1", call, &contact).await {
            Err(PeerFailure::Retry { detail, .. }) => {
                assert!(detail.contains("refuses nexus itself"), "{name}: {detail}")
            }
            other => panic!("{name} at a wrong path: {other:?}"),
        }
    }
    assert_eq!(misconfigured() - before, 2.0, "both counted misconfigured");

    // UCS's own route answering 404 to every call (another service behind the path).
    let right = at(url.clone());
    set("IdentifyContact", 404);
    set("AddDocument", 404);
    match ucs().call(&right, "c1", transcript(), &contact).await {
        Err(PeerFailure::Retry { detail, .. }) => assert!(
            detail.contains("and POST /ucs/v1/OMContacts/IdentifyContact 404"),
            "{detail}"
        ),
        other => panic!("404 to everything: {other:?}"),
    }
    assert_eq!(misconfigured() - before, 3.0);

    // One interaction UCS does not know: the event's refusal, after asking.
    for (identify, what) in [(200, "answered"), (400, "refused for its own reasons")] {
        set("IdentifyContact", identify);
        let identified = asked("IdentifyContact");
        match ucs().call(&right, "c1", transcript(), &contact).await {
            Err(PeerFailure::Rejected { status: 404, .. }) => {}
            other => panic!("IdentifyContact {what}: {other:?}"),
        }
        assert_eq!(
            asked("IdentifyContact"),
            identified + 1,
            "IdentifyContact {what}: asked once whose 404 it was"
        );
    }
    // A SetInteractionStatus's 404 is told the same way.
    set("IdentifyContact", 200);
    set("SetInteractionStatus", 404);
    let closed = state(Step::AttachmentsAdded, true).closed.expect("closed");
    assert!(matches!(
        ucs()
            .call(
                &right,
                "c1",
                ucs::set_interaction_status("t1", "c1", &closed),
                &contact
            )
            .await,
        Err(PeerFailure::Rejected { status: 404, .. })
    ));
    // IdentifyContact failing: nobody's refusal yet, retried, not taken for misconfigured.
    set("IdentifyContact", 503);
    assert!(matches!(
        ucs().call(&right, "c1", transcript(), &contact).await,
        Err(PeerFailure::Retry { .. })
    ));
    assert_eq!(misconfigured() - before, 3.0);

    // IdentifyContact hanging: the check gives up after `identity_timeout_ms`, not the call's
    // own timeout, so the call and its check fit in a try (the config check counts both).
    set("IdentifyContact", HANG);
    let quick_check = ucs::Ucs::new(Peer::new(
        ROLE,
        "ucs",
        reqwest::Client::new(),
        &PeerConfig {
            identity_timeout_ms: Some(300),
            ..PeerConfig::default()
        },
    ));
    let slow = PeerTarget {
        timeout_ms: 30_000,
        ..at(url.clone())
    };
    let started_at = std::time::Instant::now();
    assert!(matches!(
        quick_check.call(&slow, "c1", transcript(), &contact).await,
        Err(PeerFailure::Retry { .. })
    ));
    assert!(
        started_at.elapsed() < std::time::Duration::from_secs(15),
        "the check waited {:?}, as long as the call may",
        started_at.elapsed()
    );
    assert_eq!(misconfigured() - before, 3.0);
}
