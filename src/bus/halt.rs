//! A one-way stop signal whose check is a plain load: `CancellationToken` takes a lock for every
//! check and every poll of `cancelled()`, which per event on the consumer paths adds up.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

/// Fired once, checked often, awaited where a task waits anyway.
#[derive(Default)]
pub(crate) struct Halt {
    set: AtomicBool,
    token: CancellationToken,
}

impl Halt {
    pub(crate) fn fire(&self) {
        self.set.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once fired.
    pub(crate) async fn fired(&self) {
        self.token.cancelled().await
    }
}
