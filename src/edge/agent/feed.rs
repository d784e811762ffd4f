//! The agent socket's transcript view: per conversation, the last position it sent. A repeat is
//! dropped; a gap (an entry pushed before this agent was in the conversation's watcher list,
//! in a race between the worker's input topics) is filled from the session store first.
//!
//! Order per conversation on the socket is then the transcript's. A new offer for a
//! conversation starts it afresh (the console reads the transcript when it accepts).

use std::collections::HashMap;

use crate::edge::hub::Push;
use crate::events::chat::ClientEventKind;
use crate::stores::session::{Entry, SessionStore, StoreError};

/// The most entries one gap is filled with; a larger gap asks the client to re-read.
pub const MAX_FILL: u64 = 200;

/// What to do with a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Send,
    /// Sent before (a redelivery or the real push of an entry a fill already sent).
    Skip,
    /// Send the entries `from..=to` first, then the push.
    Fill {
        from: u64,
        to: u64,
    },
}

/// The positions one socket has sent, by conversation.
#[derive(Debug, Default)]
pub struct Sent {
    last: HashMap<String, u64>,
}

impl Sent {
    pub fn step(&mut self, push: &Push) -> Step {
        match (push.kind, push.position) {
            (ClientEventKind::Offer, _) => {
                self.last.remove(&push.conversation_id);
                Step::Send
            }
            (ClientEventKind::Transcript, Some(position)) => {
                let step = match self.last.get(&push.conversation_id) {
                    Some(&last) if position <= last => return Step::Skip,
                    Some(&last) if position > last + 1 => Step::Fill {
                        from: last + 1,
                        to: position - 1,
                    },
                    _ => Step::Send,
                };
                self.last.insert(push.conversation_id.clone(), position);
                step
            }
            _ => Step::Send,
        }
    }
}

/// The entries `from..=to` of a conversation, for a [`Step::Fill`]; `None` when the gap is
/// larger than [`MAX_FILL`].
pub async fn fill(
    store: &dyn SessionStore,
    tenant: &str,
    conversation_id: &str,
    from: u64,
    to: u64,
) -> Result<Option<Vec<Entry>>, StoreError> {
    let wanted = to.saturating_sub(from).saturating_add(1);
    if wanted > MAX_FILL {
        return Ok(None);
    }
    let max = usize::try_from(wanted).unwrap_or(usize::MAX);
    let mut entries = store.transcript(tenant, conversation_id, from, max).await?;
    entries.retain(|e| e.position <= to);
    Ok(Some(entries))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::stores::session::embedded::EmbeddedStore;
    use crate::stores::session::{EntryKind, NewEntry, Party, PartyKind};

    fn push(conv: &str, kind: ClientEventKind, position: Option<u64>) -> Push {
        Push {
            conversation_id: conv.into(),
            kind,
            position,
            data: Arc::from("{}"),
        }
    }

    fn entry(n: u64) -> Push {
        push("c1", ClientEventKind::Transcript, Some(n))
    }

    #[test]
    fn repeats_are_dropped_and_gaps_named() {
        let mut sent = Sent::default();
        assert_eq!(
            sent.step(&entry(3)),
            Step::Send,
            "the first sets the baseline"
        );
        assert_eq!(sent.step(&entry(4)), Step::Send);
        assert_eq!(sent.step(&entry(4)), Step::Skip);
        assert_eq!(sent.step(&entry(7)), Step::Fill { from: 5, to: 6 });
        assert_eq!(sent.step(&entry(6)), Step::Skip, "filled already");
        assert_eq!(
            sent.step(&push("c2", ClientEventKind::Transcript, Some(9))),
            Step::Send,
            "conversations are apart"
        );
        assert_eq!(
            sent.step(&push("c1", ClientEventKind::State, None)),
            Step::Send
        );
        // A new offer starts the conversation afresh.
        assert_eq!(
            sent.step(&push("c1", ClientEventKind::Offer, None)),
            Step::Send
        );
        assert_eq!(sent.step(&entry(12)), Step::Send);
    }

    #[tokio::test]
    async fn a_gap_is_filled_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(dir.path()).await.expect("store");
        for n in 1..=6 {
            let e = NewEntry {
                event_id: format!("e{n}"),
                kind: EntryKind::Message,
                from: Party {
                    participant_id: "customer".into(),
                    nickname: "Ann".into(),
                    kind: PartyKind::Customer,
                },
                text: Some(format!("m{n}")),
                message_id: None,
                data: BTreeMap::new(),
                at_ms: 0,
            };
            store.append("t", "c1", &e).await.expect("append");
        }
        let got = fill(&store, "t", "c1", 3, 5).await.expect("fill");
        let texts: Vec<_> = got
            .expect("within the limit")
            .into_iter()
            .map(|e| (e.position, e.entry.text.unwrap_or_default()))
            .collect();
        assert_eq!(
            texts,
            [(3, "m3".to_string()), (4, "m4".into()), (5, "m5".into())]
        );
        assert!(fill(&store, "t", "c1", 1, MAX_FILL + 1)
            .await
            .expect("fill")
            .is_none());
        assert!(fill(&store, "other", "c1", 3, 5)
            .await
            .expect("fill")
            .is_some_and(|e| e.is_empty()));
    }
}
