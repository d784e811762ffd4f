//! The edge's side of client-bound delivery: one broadcast subscription to the delivery topic
//! per edge process feeds the sockets this process holds, by conversation and by agent.
//!
//! Every edge process reads the whole topic (its own consumer group, from the tail), so a
//! customer on one pod and their agent on another both get every event. Order per
//! conversation is the topic's; a socket that falls behind its buffer catches up from the store
//! (a customer stream re-reads the transcript; an agent desk is sent `resync` and re-reads its
//! conversations): nothing is lost, positions dedup what is repeated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::bus::consumer::{HandleError, Handler};
use crate::bus::Message;
use crate::events::chat::{ClientEvent, ClientEventKind};
use crate::events::Event;

/// Pushes a socket may buffer before it is considered too slow.
const SOCKET_BUFFER: usize = 256;

/// One client-bound event as the sockets get it.
#[derive(Debug, Clone)]
pub struct Push {
    pub conversation_id: String,
    pub kind: ClientEventKind,
    /// Transcript position of a transcript push.
    pub position: Option<u64>,
    /// The JSON text sent to the socket.
    pub data: Arc<str>,
}

/// Per key: the channel and how many feeds hold it (counted under the lock, so two feeds
/// leaving at once cannot both leave the entry behind, as a receiver count read while the
/// leaving feed's own receiver still lives could).
type Channels = Mutex<HashMap<String, (broadcast::Sender<Arc<Push>>, usize)>>;

#[derive(Default)]
pub struct Hub {
    customers: Channels,
    agents: Channels,
}

/// A socket's feed; leaving drops the channel once nobody listens.
pub struct Feed {
    pub rx: broadcast::Receiver<Arc<Push>>,
    hub: Arc<Hub>,
    key: String,
    agent: bool,
}

impl Drop for Feed {
    fn drop(&mut self) {
        let map = if self.agent {
            &self.hub.agents
        } else {
            &self.hub.customers
        };
        let mut m = map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, feeds)) = m.get_mut(&self.key) {
            *feeds = feeds.saturating_sub(1);
            if *feeds == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn key(tenant: &str, id: &str) -> String {
    format!("{tenant}\u{1f}{id}")
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The feed of a conversation's customer sockets.
    pub fn customer(self: &Arc<Self>, tenant: &str, conversation_id: &str) -> Feed {
        self.feed(tenant, conversation_id, false)
    }

    /// The feed of an agent's sockets.
    pub fn agent(self: &Arc<Self>, tenant: &str, agent_id: &str) -> Feed {
        self.feed(tenant, agent_id, true)
    }

    fn feed(self: &Arc<Self>, tenant: &str, id: &str, agent: bool) -> Feed {
        let k = key(tenant, id);
        let map = if agent { &self.agents } else { &self.customers };
        let rx = {
            let mut m = map.lock().unwrap_or_else(PoisonError::into_inner);
            let (tx, feeds) = m
                .entry(k.clone())
                .or_insert_with(|| (broadcast::channel(SOCKET_BUFFER).0, 0));
            *feeds += 1;
            tx.subscribe()
        };
        Feed {
            rx,
            hub: self.clone(),
            key: k,
            agent,
        }
    }

    fn send(map: &Channels, k: &str, push: &Arc<Push>) {
        if let Some((tx, _)) = map.lock().unwrap_or_else(PoisonError::into_inner).get(k) {
            // No receiver left is fine: the socket just went away.
            let _ = tx.send(push.clone());
        }
    }

    /// Routes one client event to the sockets it is for.
    pub fn dispatch(&self, tenant: &str, conversation_id: &str, e: &ClientEvent) {
        let push = Arc::new(Push {
            conversation_id: conversation_id.to_string(),
            kind: e.kind,
            position: e.position.and_then(|p| u64::try_from(p).ok()),
            data: Arc::from(e.data.as_str()),
        });
        if e.to_customer {
            Self::send(&self.customers, &key(tenant, conversation_id), &push);
        }
        for agent in &e.to_agents {
            Self::send(&self.agents, &key(tenant, agent), &push);
        }
    }
}

/// The consumer-runtime handler that feeds the hub from the delivery topic.
pub struct HubFeeder(pub Arc<Hub>);

#[async_trait]
impl Handler for HubFeeder {
    async fn handle(&self, event: &Event, _m: &Message) -> Result<(), HandleError> {
        // The topic also carries delivery outcomes; only client events are for sockets.
        if let Ok(e) = event.body_as::<ClientEvent>() {
            self.0.dispatch(
                &event.envelope.tenant_id,
                &event.envelope.conversation_id,
                &e,
            );
        }
        Ok(())
    }
}
