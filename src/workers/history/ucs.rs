//! The UCS calls of the history worker (`POST {ucs}/ucs/v1/{Service}/{Method}` with
//! `{"Parameters": ..., "UserData": ...}`), each built from stored state with a deterministic id.
//!
//! The builders are pure so the mapping is unit-tested; [`Ucs::call`] sends through the shared
//! [`Peer`] (outcome classification, metrics, pause circuit).
//!
//! **A 404.** UCS answers 404 for an object a call names that it does not know (an
//! interaction, a contact): that event's refusal. A wrong base path, or a proxy with no such
//! route, answers 404 to every call: nexus's address to fix. UCS has no identity endpoint to
//! ask (GWS's `/api/v2/me`), and no error body of its own to tell by (a proxy's or a
//! framework's default 404 is JSON too). What the protocol gives is IdentifyContact, which
//! finds or creates (`CreateContact`): at UCS's address it has no 404. So its own 404 is the
//! address's, and another call's 404 is told by sending the conversation's IdentifyContact
//! again, a repeat every conversation already makes safely (the crash window, in [`super`]): a
//! 404 there too is the address's; UCS taking it, or refusing it otherwise, makes the first 404
//! the event's; no answer, a retry.

use base64::Engine;
use serde_json::{json, Value};
use uuid::Uuid;

use super::store::{Closed, Entry, Started};
use crate::events::chat::CloseReason;
use crate::workers::peer::{NotFound, Peer, PeerFailure, PeerTarget};

/// Namespace of the UUIDv5 ids nexus gives UCS objects (contacts it creates, documents).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6e65_7875_732d_6869_7374_6f72_792d_7563);

/// A UUIDv5 of the tenant, the conversation and what it names: the same on every retry,
/// redelivery and replay, so a repeated call names the object the first one created.
pub fn object_id(tenant: &str, conversation: &str, what: &str) -> String {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("{tenant}/{conversation}/{what}").as_bytes(),
    )
    .to_string()
}

/// One UCS request: service, method and the two JSON objects.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub service: &'static str,
    pub method: &'static str,
    pub parameters: Value,
    pub user_data: Value,
}

impl Call {
    /// `Service/Method`, as errors name the call.
    pub fn name(&self) -> String {
        format!("{}/{}", self.service, self.method)
    }

    /// The path it is POSTed to.
    fn path(&self) -> String {
        format!("/ucs/v1/{}/{}", self.service, self.method)
    }

    /// Whether UCS can answer it 404 for a reason of the request's: only IdentifyContact
    /// cannot, as it creates what it does not find.
    fn may_miss(&self) -> bool {
        (self.service, self.method) != (CONTACTS, IDENTIFY_CONTACT)
    }
}

const CONTACTS: &str = "OMContacts";
const IDENTIFY_CONTACT: &str = "IdentifyContact";

/// The request body of a call.
fn body(parameters: Value, user_data: Value) -> Value {
    let mut body = serde_json::Map::with_capacity(2);
    body.insert("Parameters".into(), parameters);
    body.insert("UserData".into(), user_data);
    Value::Object(body)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn user_data(s: &Started) -> Value {
    json!(s.user_data)
}

/// Find or create the customer's contact by email, phone, name. `Id` is the contact UCS
/// creates when none matches, so a repeat after a crash finds that one instead of a second.
pub fn identify_contact(tenant: &str, conversation: &str, s: &Started) -> Call {
    let c = &s.contact;
    Call {
        service: CONTACTS,
        method: IDENTIFY_CONTACT,
        parameters: json!({
            "TenantId": tenant,
            "MediaType": "chat",
            "CreateContact": true,
            "Id": object_id(tenant, conversation, "contact"),
            "EmailAddress": c.email_address,
            "PhoneNumber": c.phone_number,
            "FirstName": c.first_name,
            "LastName": c.last_name,
            "Nickname": s.nickname,
        }),
        user_data: user_data(s),
    }
}

/// The interaction, with the nexus conversation id as its `Id`.
pub fn insert_interaction(tenant: &str, conversation: &str, contact_id: &str, s: &Started) -> Call {
    Call {
        service: "OMInteractions",
        method: "InsertInteraction",
        parameters: json!({
            "Id": conversation,
            "TenantId": tenant,
            "ContactId": contact_id,
            "MediaTypeId": "chat",
            "TypeId": "Inbound",
            "Subject": s.subject,
            "StartDate": rfc3339(s.started_at_ms),
            "Status": "InProcess",
        }),
        user_data: user_data(s),
    }
}

/// The transcript as one document; attachments are listed by file id.
pub fn transcript_document(
    tenant: &str,
    conversation: &str,
    interaction_id: &str,
    entries: &[Entry],
) -> Call {
    let messages: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "Position": e.position,
                "Type": e.kind,
                "Date": rfc3339(e.at_ms),
                "ParticipantId": e.participant_id,
                "ParticipantKind": e.participant_kind,
                "Nickname": e.nickname,
                "Text": e.text,
                "Attachments": e.media_ids,
                // `Agents`: an internal note or a private consult's message, never shown to
                // the customer.
                "Visibility": if e.agents_only { "Agents" } else { "All" },
            })
        })
        .collect();
    Call {
        service: "OMInteractions",
        method: "AddDocument",
        parameters: json!({
            "InteractionId": interaction_id,
            "TenantId": tenant,
            "Id": object_id(tenant, conversation, "transcript"),
            "Kind": "Transcript",
            "MimeType": "application/json",
            "Content": {"Messages": messages},
        }),
        user_data: json!({}),
    }
}

/// The media ids of the entries, in transcript order, each once.
pub fn attachments(entries: &[Entry]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in entries.iter().flat_map(|e| e.media_ids.iter()) {
        if !out.contains(id) {
            out.push(id.clone());
        }
    }
    out
}

/// One chat file as a document (`data` base64). Takes the file: its bytes are dropped once
/// encoded, and the encoding is moved into the call, not copied (a file may be 10 MB).
pub fn attachment_document(
    tenant: &str,
    conversation: &str,
    interaction_id: &str,
    file: crate::stores::provisioning::ChatFile,
) -> Call {
    let content = base64::engine::general_purpose::STANDARD.encode(&file.data);
    drop(file.data);
    let mut parameters = json!({
        "InteractionId": interaction_id,
        "TenantId": tenant,
        "Id": object_id(tenant, conversation, &format!("attachment/{}", file.id)),
        "Kind": "Attachment",
        "FileName": file.name,
        "MimeType": file.content_type,
        "Size": file.size,
    });
    if let Value::Object(p) = &mut parameters {
        p.insert("Content".into(), Value::String(content));
    }
    Call {
        service: "OMInteractions",
        method: "AddDocument",
        parameters,
        user_data: json!({}),
    }
}

fn reason_code(r: CloseReason) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

/// Stopped, with the end date and why.
pub fn set_interaction_status(tenant: &str, interaction_id: &str, closed: &Closed) -> Call {
    Call {
        service: "OMInteractions",
        method: "SetInteractionStatus",
        parameters: json!({
            "InteractionId": interaction_id,
            "TenantId": tenant,
            "Status": "Stopped",
            "EndDate": rfc3339(closed.closed_at_ms),
            "Reason": reason_code(closed.reason),
            "ClosedBy": closed.closed_by_participant_id,
        }),
        user_data: json!({}),
    }
}

/// `ContactId` of an IdentifyContact answer (top level or under `Result`).
pub fn contact_id_of(answer: &Value) -> Option<String> {
    answer
        .get("ContactId")
        .or_else(|| answer.get("Result").and_then(|r| r.get("ContactId")))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// The history role's UCS peer.
pub struct Ucs {
    peer: Peer,
}

impl Ucs {
    pub fn new(peer: Peer) -> Self {
        Self { peer }
    }

    /// Makes `call` for `conversation` (the circuit's subject); `contact` is the
    /// conversation's IdentifyContact, asked again if `call` is answered 404 (see the module
    /// doc). Takes the call: its objects are moved into the body, not copied (a transcript or
    /// a file may be megabytes).
    pub async fn call(
        &self,
        target: &PeerTarget,
        conversation: &str,
        call: Call,
        contact: &Call,
    ) -> Result<Value, PeerFailure> {
        let path = call.path();
        let (check_path, check_body);
        let not_found = if call.may_miss() {
            check_path = contact.path();
            check_body = body(contact.parameters.clone(), contact.user_data.clone());
            NotFound::Ask {
                path: &check_path,
                body: &check_body,
            }
        } else {
            NotFound::Address
        };
        let body = body(call.parameters, call.user_data);
        self.peer
            .post_json_with(target, conversation, &path, &[], &body, not_found)
            .await
    }
}
