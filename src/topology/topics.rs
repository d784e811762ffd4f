//! The names of the topics code publishes to, as `topology/nexus.yaml` declares them (a test
//! checks they are all there).

/// What customers do (chat, messaging, aggregators).
pub const INBOUND: &str = "nexus.inbound.v1";
/// What agents do, and offers to them.
pub const AGENT: &str = "nexus.agent.v1";
/// The conversation as the conversation worker decided it.
pub const INTERACTION: &str = "nexus.interaction.v1";
/// Messages to send out to channels.
pub const OUTBOUND: &str = "nexus.outbound.v1";
/// Client-bound events for sockets, read whole by every edge process.
pub const DELIVERY: &str = "nexus.delivery.v1";
/// The webhook dead-letter topic: messages that exhausted their retries.
pub const WEBHOOKS_DEAD: &str = "nexus.webhooks.dead.v1";
/// Webhook subscription events (an endpoint disabled).
pub const WEBHOOKS: &str = "nexus.webhooks.v1";

#[cfg(test)]
mod tests {
    #[test]
    fn every_named_topic_is_in_the_builtin_topology() {
        let t = super::super::Topology::builtin();
        for name in [
            super::INBOUND,
            super::AGENT,
            super::INTERACTION,
            super::OUTBOUND,
            super::DELIVERY,
            super::WEBHOOKS_DEAD,
            super::WEBHOOKS,
        ] {
            assert!(
                t.topic(name).is_some(),
                "{name} missing from topology/nexus.yaml"
            );
        }
    }
}
