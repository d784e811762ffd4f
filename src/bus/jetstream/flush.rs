//! Shared connection flushes for acks: an ack returns once its `+ACK` is on the socket, and the
//! acks that wait at the same time share one flush instead of one connection round trip each.
//!
//! Why it is exact: an ack queues its `+ACK` on the connection, then registers here. The task
//! takes every registration at once and only then asks the connection to flush; commands reach
//! the connection in order, so that flush covers every `+ACK` registered before it.

use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::telemetry::metrics as m;

type Waiter = oneshot::Sender<Result<(), String>>;

/// A flush task on one NATS connection; it ends when the last handle is dropped.
#[derive(Clone)]
pub(super) struct Flusher(Arc<Handle>);

/// What the handles share; the task holds only `shared`, so dropping this stops it.
struct Handle {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Shared {
    waiting: Mutex<Vec<Waiter>>,
    wake: Notify,
}

impl Flusher {
    /// Starts the flush task (inside a Tokio runtime).
    pub(super) fn start(client: async_nats::Client) -> Self {
        let shared = Arc::new(Shared {
            waiting: Mutex::new(Vec::new()),
            wake: Notify::new(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(
            run(client, shared.clone(), stop.clone())
                .instrument(tracing::debug_span!("jetstream_ack_flusher")),
        );
        Self(Arc::new(Handle { shared, stop }))
    }

    /// Returns once everything queued on the connection before this call is written to the
    /// socket.
    pub(super) async fn flush(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let shared = &self.0.shared;
        lock(&shared.waiting).push(tx);
        // `notify_one` keeps a permit when the task is busy flushing: it runs again after.
        shared.wake.notify_one();
        rx.await
            .unwrap_or_else(|_| Err("the connection's flush task stopped".into()))
    }
}

async fn run(client: async_nats::Client, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = shared.wake.notified() => {}
        }
        let batch = std::mem::take(&mut *lock(&shared.waiting));
        if batch.is_empty() {
            continue;
        }
        let result = client.flush().await.map_err(|e| e.to_string());
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!(m::BUS_ACK_FLUSHES_TOTAL, "outcome" => outcome).increment(1);
        for w in batch {
            let _ = w.send(result.clone());
        }
    }
    // Stopped: no handle is left, so nobody can be waiting.
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves a plain Vec behind: still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
