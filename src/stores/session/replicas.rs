//! Group commit of the Redis session store's replica waits (`stores.redis_min_replicas`): one
//! `WAIT` in flight per connection and slot answers every write finished before it was sent.
//!
//! `WAIT` blocks the connection it is sent on until the replicas have every write made through
//! that connection so far, and every caller of a process shares one connection per server. A
//! `WAIT` per write would queue each caller's commands behind the others' waits; one `WAIT`
//! for all writes done by the time it goes costs one replica round trip per batch instead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use super::StoreError;

/// The waits of one connection (and, on a cluster, one slot: a `WAIT` goes to its master).
#[derive(Default)]
struct Group {
    /// Tickets handed out: a writer takes one once its write is answered.
    issued: Mutex<u64>,
    /// Held while a `WAIT` is in flight; the last finished one's coverage and outcome.
    last: tokio::sync::Mutex<Finished>,
}

#[derive(Default)]
struct Finished {
    /// Every ticket up to this one was issued before that `WAIT` was sent.
    covered: u64,
    outcome: Option<Result<(), StoreError>>,
}

/// The groups of a store, by slot (0 for a single server).
#[derive(Default)]
pub(crate) struct ReplicaBarrier {
    groups: Mutex<HashMap<u16, Arc<Group>>>,
}

impl ReplicaBarrier {
    /// Returns once a `WAIT` sent after this call began (so after the caller's write) has
    /// answered, with its outcome; `send` sends one. Callers arriving while one is in flight
    /// queue, and the first of them sends the next for all of them.
    pub(crate) async fn wait<F, Fut>(&self, slot: u16, send: F) -> Result<(), StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), StoreError>>,
    {
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            groups.entry(slot).or_default().clone()
        };
        let ticket = group.take_ticket();
        let mut last = group.last.lock().await;
        if last.covered >= ticket {
            if let Some(outcome) = &last.outcome {
                return outcome.clone();
            }
        }
        // Every ticket issued by now belongs to a write already answered: this WAIT covers it.
        let covered = group.issued();
        let outcome = send().await;
        *last = Finished {
            covered,
            outcome: Some(outcome.clone()),
        };
        outcome
    }
}

impl Group {
    fn take_ticket(&self) -> u64 {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        *issued += 1;
        *issued
    }

    fn issued(&self) -> u64 {
        *self.issued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Many writers waiting at once share few `WAIT`s, and a failed one fails every writer it
    /// covered (each retries), not only the one that sent it.
    #[tokio::test]
    async fn concurrent_waits_share_one_wait_and_its_outcome() {
        let barrier = Arc::new(ReplicaBarrier::default());
        let sent = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for _ in 0..50 {
            let (barrier, sent) = (barrier.clone(), sent.clone());
            writers.push(tokio::spawn(async move {
                barrier
                    .wait(7, || async {
                        sent.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Err(StoreError::Unavailable("no replica".into()))
                    })
                    .await
            }));
        }
        for w in writers {
            let outcome = w.await.expect("writer");
            assert!(
                matches!(outcome, Err(StoreError::Unavailable(_))),
                "{outcome:?}"
            );
        }
        let waits = sent.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&waits),
            "{waits} WAITs for 50 writers waiting at once"
        );

        // A writer arriving after the last WAIT finished sends its own, which now succeeds.
        barrier
            .wait(7, || async { Ok(()) })
            .await
            .expect("a later write waits anew");
        // Another slot's group has its own WAITs.
        let other = Arc::new(AtomicUsize::new(0));
        let o = other.clone();
        barrier
            .wait(8, || async move {
                o.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
            .await
            .expect("other slot");
        assert_eq!(other.load(Ordering::SeqCst), 1);
    }

    /// A writer whose ticket came after a WAIT was sent is not answered by it.
    #[tokio::test]
    async fn a_wait_sent_before_a_write_does_not_answer_it() {
        let barrier = Arc::new(ReplicaBarrier::default());
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier
                    .wait(0, || async move {
                        let _ = started_tx.send(());
                        let _ = release_rx.await;
                        Err(StoreError::Unavailable("first WAIT timed out".into()))
                    })
                    .await
            })
        };
        started_rx.await.expect("first WAIT sent");
        // This write finished after the first WAIT went: it needs a WAIT of its own.
        let second = {
            let barrier = barrier.clone();
            tokio::spawn(async move { barrier.wait(0, || async { Ok(()) }).await })
        };
        tokio::task::yield_now().await;
        release_tx.send(()).expect("release");
        assert!(first.await.expect("first").is_err());
        second
            .await
            .expect("second")
            .expect("answered by its own WAIT, not the first's failure");
    }
}
