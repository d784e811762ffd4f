//! The handler of roles whose effects are not built yet: it acks every event (so lag and the
//! pipeline are real) and logs at debug level. Replaced role by role as the channel issues land.

use async_trait::async_trait;

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::Message;
use crate::events::Event;

pub struct Pending {
    role: String,
}

impl Pending {
    pub fn new(role: &str) -> Self {
        Self {
            role: role.to_string(),
        }
    }
}

#[async_trait]
impl Handler for Pending {
    async fn handle(&self, event: &Event, _message: &Message) -> Result<(), HandleError> {
        tracing::debug!(role = %self.role, event_type = %event.envelope.event_type, "role has no effects yet; event acked");
        Ok(())
    }
}
