use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared flag that asks a request to stop. A queued request is dropped before it runs; a running
/// one is dropped from its batch between two denoising steps.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}
