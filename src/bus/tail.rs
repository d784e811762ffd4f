//! Broadcast reading ([`crate::bus::Bus::tail`]): every record appended to a topic from now on,
//! all partitions, no consumer group, nothing acked or committed.
//!
//! Each backend feeds a channel from a task of its own; [`TailSubscription`] hands the records
//! out as deliveries whose ack does nothing, so the consumer runtime reads a tail like a group.
//! Order: per partition in offset order, as the backend delivers; nothing across partitions.

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Acker, BusError, Delivery, Message, Subscription};

/// Records buffered between a backend's reader task and the subscription.
pub(crate) const TAIL_BUFFER: usize = 1024;

/// The reader side a backend task writes to; `closed` fires when the subscription goes away.
pub(crate) struct TailFeed {
    pub tx: mpsc::Sender<Result<Message, BusError>>,
    pub closed: CancellationToken,
}

impl TailFeed {
    /// Hands a record (or an error) to the subscription; false once nobody reads any more.
    pub async fn send(&self, item: Result<Message, BusError>) -> bool {
        tokio::select! {
            sent = self.tx.send(item) => sent.is_ok(),
            () = self.closed.cancelled() => false,
        }
    }
}

/// A tail as a [`Subscription`]; dropping or closing it stops the backend's reader.
pub(crate) struct TailSubscription {
    rx: mpsc::Receiver<Result<Message, BusError>>,
    closed: CancellationToken,
}

impl TailSubscription {
    /// A subscription and the feed its backend task writes to.
    pub fn channel() -> (TailSubscription, TailFeed) {
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        let closed = CancellationToken::new();
        (
            TailSubscription {
                rx,
                closed: closed.clone(),
            },
            TailFeed { tx, closed },
        )
    }
}

impl Drop for TailSubscription {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

#[async_trait]
impl Subscription for TailSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        let item = self.rx.recv().await?;
        Some(item.map(|m| Delivery::new(m, Box::new(NoCommit))))
    }

    fn try_next(&mut self) -> Option<Result<Delivery, BusError>> {
        let item = self.rx.try_recv().ok()?;
        Some(item.map(|m| Delivery::new(m, Box::new(NoCommit))))
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        // Nothing to commit or hand over: a tail reader has no group.
        self.closed.cancel();
        Ok(())
    }
}

/// The ack of a tail delivery: there is no group position to move.
struct NoCommit;

#[async_trait]
impl Acker for NoCommit {
    async fn ack(self: Box<Self>) -> Result<(), BusError> {
        Ok(())
    }
}
