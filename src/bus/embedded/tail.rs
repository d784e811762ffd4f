//! The embedded log's broadcast reader: every partition from its log end at the start, woken
//! by the topic's append tick, reading what became durable since.

use std::sync::Arc;

use tracing::Instrument;

use super::store::ReadMax;
use super::{storage, Inner};
use crate::bus::tail::{TailFeed, TailSubscription};
use crate::bus::BusError;

/// Records read per partition and pass at most.
const READ_BATCH: usize = 256;

pub(super) fn start(inner: Arc<Inner>, topic: &str) -> Result<TailSubscription, BusError> {
    let shared = inner.topic(topic)?;
    let appends = shared.tick.subscribe();
    // Positions are taken before returning: what is appended after the call is read.
    let next: Vec<u64> = shared.partitions.iter().map(|p| p.high()).collect();
    let (sub, feed) = TailSubscription::channel();
    let span = tracing::info_span!("embedded_tail", topic);
    tokio::spawn(read(inner, topic.to_string(), appends, next, feed).instrument(span));
    Ok(sub)
}

async fn read(
    inner: Arc<Inner>,
    topic: String,
    mut appends: tokio::sync::watch::Receiver<u64>,
    mut next: Vec<u64>,
    feed: TailFeed,
) {
    loop {
        // Marked seen before looking, so an append after the look wakes the wait.
        appends.borrow_and_update();
        let shared = match inner.topic(&topic) {
            Ok(s) => s,
            Err(e) => {
                feed.send(Err(e)).await;
                return;
            }
        };
        // Partitions added while reading are read from their start.
        while next.len() < shared.partitions.len() {
            next.push(0);
        }
        let mut progressed = false;
        for (p, part) in shared.partitions.iter().enumerate() {
            let high = part.high();
            if next[p] >= high {
                continue;
            }
            let open = match inner.store() {
                Ok(open) => open,
                Err(_) => return,
            };
            let (part, name, from) = (part.clone(), topic.clone(), next[p]);
            let records = tokio::task::spawn_blocking(move || {
                open.db.read(
                    &part.log,
                    &name,
                    p as u32,
                    from,
                    ReadMax::records(READ_BATCH),
                    high,
                )
            })
            .await
            .map_err(storage("tail read task"))
            .and_then(|r| r);
            match records {
                Ok(records) => {
                    for m in records {
                        next[p] = m.offset + 1;
                        progressed = true;
                        if !feed.send(Ok(m)).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if !feed.send(Err(e)).await {
                        return;
                    }
                }
            }
        }
        if progressed {
            continue;
        }
        tokio::select! {
            changed = appends.changed() => if changed.is_err() { return },
            () = feed.closed.cancelled() => return,
            () = inner.closed.fired() => return,
        }
    }
}
