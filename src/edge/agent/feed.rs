//! The agent socket's transcript view: per conversation, the span of positions it sent. A
//! repeat is dropped; a gap above the span (an entry pushed before this agent was in the
//! conversation's watcher list, in a race between the worker's input topics) is filled from the
//! session store first; a position below the span (pushes of one conversation from two worker
//! lanes arriving out of order) is sent and remembered, a neighbour by widening the span.
//!
//! A new offer for a conversation, or the agent leaving it, forgets it (the console reads the
//! transcript when it accepts); its close ends it: nothing of it is sent after.

use std::collections::{BTreeSet, HashMap};

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

/// Positions sent below a span (late pushes that are not its neighbour) kept per
/// conversation; past this, the lowest are forgotten (a redelivery of one is sent again).
const BELOW_KEPT: usize = 64;

/// Closed conversations one socket keeps their end mark for; past this, the marks go (a push
/// of one arriving that much later would be sent, a repeat the console shows once more).
const CLOSED_KEPT: usize = 1024;

/// The positions one socket has sent, by conversation: every position in `first..=last`, and
/// those in `below`.
#[derive(Debug, Default)]
pub struct Sent {
    spans: HashMap<String, Span>,
}

#[derive(Debug)]
struct Span {
    first: u64,
    last: u64,
    below: BTreeSet<u64>,
}

impl Span {
    fn new(first: u64, last: u64) -> Span {
        Span {
            first,
            last,
            below: BTreeSet::new(),
        }
    }
}

impl Span {
    /// The mark of a closed conversation: every position counts as sent.
    fn is_closed(&self) -> bool {
        self.first == 0 && self.last == u64::MAX
    }
}

impl Sent {
    pub fn step(&mut self, push: &Push) -> Step {
        // After its `closed` nothing of a conversation is sent (a redelivered close's second
        // `closed` included), unless a new offer opens it again.
        if !matches!(
            push.kind,
            ClientEventKind::Offer | ClientEventKind::OfferClosed
        ) && self
            .spans
            .get(&push.conversation_id)
            .is_some_and(Span::is_closed)
        {
            return Step::Skip;
        }
        match (push.kind, push.position) {
            (ClientEventKind::Offer, _) => {
                self.spans.remove(&push.conversation_id);
                Step::Send
            }
            (ClientEventKind::State, _) => {
                match state_of(push).as_deref() {
                    Some("transferred" | "left") => {
                        self.spans.remove(&push.conversation_id);
                    }
                    // Nothing of a closed conversation is sent after its `closed` state: its
                    // transcript is whole by then (the worker pushes its last entry before,
                    // so a gap was filled), and a push still on its way (an entry appended
                    // just before the close, published just after it) is a repeat.
                    Some("closed") => {
                        self.spans
                            .insert(push.conversation_id.clone(), Span::new(0, u64::MAX));
                        // A desk open a whole shift sees a conversation close after another:
                        // their marks are dropped in bulk, not kept for the socket's life.
                        if self.spans.len() > CLOSED_KEPT {
                            let this = push.conversation_id.as_str();
                            self.spans.retain(|id, s| id == this || !s.is_closed());
                        }
                    }
                    _ => {}
                }
                Step::Send
            }
            (ClientEventKind::Transcript, Some(p)) => {
                let Some(span) = self.spans.get_mut(&push.conversation_id) else {
                    self.spans
                        .insert(push.conversation_id.clone(), Span::new(p, p));
                    return Step::Send;
                };
                let (first, last) = (span.first, span.last);
                if (first..=last).contains(&p) || span.below.contains(&p) {
                    return Step::Skip;
                }
                if p < first {
                    // Below the span: never sent. A neighbour widens it (with the positions
                    // sent below that now join it); another is remembered apart, so a
                    // position between it and the span still counts as not sent, and a
                    // redelivery of it as sent.
                    if p + 1 == first {
                        span.first = p;
                        while span.first > 0 && span.below.remove(&(span.first - 1)) {
                            span.first -= 1;
                        }
                    } else {
                        span.below.insert(p);
                        if span.below.len() > BELOW_KEPT {
                            span.below.pop_first();
                        }
                    }
                    return Step::Send;
                }
                span.last = p;
                if p > last + 1 {
                    Step::Fill {
                        from: last + 1,
                        to: p - 1,
                    }
                } else {
                    Step::Send
                }
            }
            _ => Step::Send,
        }
    }

    /// Forgets every open conversation (after missed pushes, when the console re-reads); the
    /// closed ones stay closed.
    pub fn clear(&mut self) {
        self.spans.retain(|_, s| s.is_closed());
    }
}

/// Whether a state push says this agent is out of the conversation.
/// The `state` a state push names.
fn state_of(push: &Push) -> Option<String> {
    let v = serde_json::from_str::<serde_json::Value>(&push.data).ok()?;
    v.get("state")?.as_str().map(str::to_string)
}

/// The entries `from..=to` of a conversation, for a [`Step::Fill`]; `None` when the gap is
/// larger than [`MAX_FILL`] or the store no longer has all of it.
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
    Ok((entries.len() == max).then_some(entries))
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

    fn state(state: &str) -> Push {
        let mut p = push("c1", ClientEventKind::State, None);
        p.data = Arc::from(format!(
            r#"{{"type":"state","conversation_id":"c1","state":"{state}"}}"#
        ));
        p
    }

    /// After `closed`, nothing of the conversation is sent: not a redelivered close's second
    /// `closed`, not a late entry after a resync (which forgets only open conversations); a new
    /// offer opens it again.
    #[test]
    fn a_closed_conversation_stays_closed_until_offered_again() {
        let mut sent = Sent::default();
        assert_eq!(sent.step(&entry(1)), Step::Send);
        assert_eq!(sent.step(&state("closed")), Step::Send);
        assert_eq!(
            sent.step(&state("closed")),
            Step::Skip,
            "a redelivered close"
        );
        sent.clear();
        assert_eq!(sent.step(&entry(2)), Step::Skip, "closed across a resync");
        assert_eq!(
            sent.step(&push("c1", ClientEventKind::OfferClosed, None)),
            Step::Send
        );
        assert_eq!(
            sent.step(&push("c1", ClientEventKind::Offer, None)),
            Step::Send
        );
        assert_eq!(sent.step(&entry(3)), Step::Send, "offered again");
    }

    #[test]
    fn a_long_shift_of_closed_conversations_is_not_kept_whole() {
        let mut sent = Sent::default();
        for n in 0..10_000 {
            let conv = format!("c{n}");
            let mut closed = push(&conv, ClientEventKind::State, None);
            closed.data = Arc::from(format!(
                r#"{{"type":"state","conversation_id":"{conv}","state":"closed"}}"#
            ));
            assert_eq!(
                sent.step(&push(&conv, ClientEventKind::Transcript, Some(1))),
                Step::Send
            );
            assert_eq!(sent.step(&closed), Step::Send);
            // Right after its close, a late push of it is still a repeat.
            assert_eq!(
                sent.step(&push(&conv, ClientEventKind::Transcript, Some(2))),
                Step::Skip
            );
        }
        assert!(sent.spans.len() <= CLOSED_KEPT + 1, "{}", sent.spans.len());
    }

    #[test]
    fn repeats_are_dropped_gaps_named_and_late_lower_positions_sent() {
        let mut sent = Sent::default();
        assert_eq!(sent.step(&entry(3)), Step::Send, "the first sets the span");
        assert_eq!(sent.step(&entry(4)), Step::Send);
        assert_eq!(sent.step(&entry(4)), Step::Skip);
        assert_eq!(sent.step(&entry(7)), Step::Fill { from: 5, to: 6 });
        assert_eq!(sent.step(&entry(6)), Step::Skip, "filled already");
        // Pushes from two worker lanes out of order: the lower one was never sent.
        assert_eq!(sent.step(&entry(2)), Step::Send);
        assert_eq!(sent.step(&entry(2)), Step::Skip, "the span widened to it");
        assert_eq!(sent.step(&entry(0)), Step::Send, "not a neighbour");
        assert_eq!(sent.step(&entry(0)), Step::Skip, "sent below the span");
        assert_eq!(sent.step(&entry(1)), Step::Send, "between it and the span");
        assert_eq!(sent.step(&entry(1)), Step::Skip, "the span widened to it");
        assert_eq!(sent.step(&entry(0)), Step::Skip, "joined the span");
        assert_eq!(
            sent.step(&push("c2", ClientEventKind::Transcript, Some(9))),
            Step::Send,
            "conversations are apart"
        );
        // A new offer starts the conversation afresh.
        assert_eq!(
            sent.step(&push("c1", ClientEventKind::Offer, None)),
            Step::Send
        );
        assert_eq!(sent.step(&entry(12)), Step::Send);
        assert_eq!(sent.step(&entry(13)), Step::Send);
        // Being connected keeps it; leaving forgets it, so nothing from meanwhile is filled.
        assert_eq!(sent.step(&state("connected")), Step::Send);
        assert_eq!(sent.step(&entry(13)), Step::Skip);
        assert_eq!(sent.step(&state("transferred")), Step::Send);
        assert_eq!(sent.step(&entry(40)), Step::Send, "no fill after leaving");
        // Closed: nothing of it after, until a new offer (never, in practice).
        assert_eq!(sent.step(&state("closed")), Step::Send);
        assert_eq!(sent.step(&entry(41)), Step::Skip, "after the close");
        assert_eq!(sent.step(&entry(3)), Step::Skip);
        sent.clear();
        assert_eq!(
            sent.step(&entry(40)),
            Step::Skip,
            "a close outlasts a resync"
        );
        assert_eq!(
            sent.step(&push("c2", ClientEventKind::Transcript, Some(9))),
            Step::Send,
            "open conversations are forgotten"
        );
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
        assert!(
            fill(&store, "t", "c1", 5, 8).await.expect("fill").is_none(),
            "the store has only up to 6: a short fill is no fill"
        );
        assert!(
            fill(&store, "other", "c1", 3, 5)
                .await
                .expect("fill")
                .is_none(),
            "another tenant's conversation is not read"
        );
    }
}
