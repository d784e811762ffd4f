//! The body subscribers receive (both formats share it): `{"operationId", "data": {"entities":
//! [{"event", "entity": {"id", "mediaType", "interactionSubtype", "selfUri"}}]}}`.

use serde_json::json;
use uuid::Uuid;

use crate::stores::provisioning::{WebhookEvent, WebhookMedia};

/// Namespace of message ids (UUID v5 of subscription id and event id).
const MESSAGE_NAMESPACE: Uuid = Uuid::from_u128(0x6e65_7875_735f_7768_6b5f_6d73_675f_0001);

/// The message id of one event for one subscription: the Standard Webhooks `webhook-id`,
/// the same for every attempt, redelivery and replay.
pub fn message_id(webhook_id: &str, event_id: &Uuid) -> String {
    let name = format!("{webhook_id}/{event_id}");
    format!(
        "msg_{}",
        Uuid::new_v5(&MESSAGE_NAMESPACE, name.as_bytes()).simple()
    )
}

/// What an interaction event says, for the body.
#[derive(Debug, Clone)]
pub struct Interaction<'a> {
    pub event_id: &'a Uuid,
    pub event: WebhookEvent,
    pub conversation_id: &'a str,
    pub media: WebhookMedia,
    pub subtype: &'a str,
}

/// The JSON body, as sent on every attempt (stored once, so retries send the same bytes).
pub fn body(i: &Interaction<'_>) -> String {
    json!({
        "operationId": i.event_id.to_string(),
        "data": {
            "entities": [{
                "event": i.event.as_str(),
                "entity": {
                    "id": i.conversation_id,
                    "mediaType": i.media.as_str(),
                    "interactionSubtype": i.subtype,
                    "selfUri": format!("/nexus/v3/chat/sessions/{}", i.conversation_id),
                }
            }]
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_stable_and_distinct_per_subscription() {
        let e = Uuid::new_v4();
        assert_eq!(message_id("w1", &e), message_id("w1", &e));
        assert_ne!(message_id("w1", &e), message_id("w2", &e));
        assert!(message_id("w1", &e).starts_with("msg_"));
    }

    #[test]
    fn body_has_the_seed_shape() {
        let e = Uuid::new_v4();
        let b: serde_json::Value = serde_json::from_str(&body(&Interaction {
            event_id: &e,
            event: WebhookEvent::Finished,
            conversation_id: "c1",
            media: WebhookMedia::Chat,
            subtype: "webchat",
        }))
        .expect("json");
        let entity = &b["data"]["entities"][0];
        assert_eq!(entity["event"], "FINISHED");
        assert_eq!(entity["entity"]["id"], "c1");
        assert_eq!(entity["entity"]["mediaType"], "chat");
        assert_eq!(b["operationId"], e.to_string());
    }
}
