use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

const LIVE: u8 = 0;
const CANCELLED: u8 = 1;
const EXPIRED: u8 = 2;

/// Why a request stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Its caller cancelled it (or went away).
    Cancelled,
    /// It passed its deadline (`timeout_seconds` / `--request-timeout`).
    DeadlineExceeded,
}

/// Shared flag that asks a request to stop. A queued request is dropped before it runs; a running
/// one is dropped from its batch between two denoising steps. The first reason set wins, so a
/// request that expired is never reported as cancelled by a later client disconnect, or the reverse.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicU8>);

impl CancelToken {
    pub fn cancel(&self) {
        let _ = self.0.compare_exchange(LIVE, CANCELLED, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Marks the request as past its deadline.
    pub fn expire(&self) {
        let _ = self.0.compare_exchange(LIVE, EXPIRED, Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }

    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            LIVE => None,
            EXPIRED => Some(StopReason::DeadlineExceeded),
            _ => Some(StopReason::Cancelled),
        }
    }
}
