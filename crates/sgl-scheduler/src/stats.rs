use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Marks "never" in the millisecond timestamps below.
const NEVER: u64 = u64::MAX;

/// Counters the worker keeps about the batches it ran, and the signs of life that `/health`
/// (liveness) and `/health_generate` (readiness) read without going through the queue.
#[derive(Debug)]
pub struct SchedulerStats {
    /// `batches_by_size[n - 1]` counts batches of `n` requests; the last slot also counts larger ones.
    batches_by_size: Vec<AtomicU64>,
    failed_batches: AtomicU64,
    /// Origin of the millisecond timestamps below.
    origin: Instant,
    /// Whether the executor is inside a batch (work is pending on it).
    in_batch: AtomicBool,
    /// Last sign of progress: a batch started or ended, or a denoising step finished.
    last_progress_ms: AtomicU64,
    /// Last time a request completed with its outputs.
    last_success_ms: AtomicU64,
    /// Set once the device failed beyond recovery; never cleared.
    device_failure: Mutex<Option<String>>,
}

impl SchedulerStats {
    pub(crate) fn new(max_batch_size: u32) -> Self {
        let slots = usize::try_from(max_batch_size.max(1)).unwrap_or(1);
        Self {
            batches_by_size: (0..slots).map(|_| AtomicU64::new(0)).collect(),
            failed_batches: AtomicU64::new(0),
            origin: Instant::now(),
            in_batch: AtomicBool::new(false),
            last_progress_ms: AtomicU64::new(0),
            last_success_ms: AtomicU64::new(NEVER),
            device_failure: Mutex::new(None),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn since(&self, stamp: &AtomicU64) -> Option<Duration> {
        match stamp.load(Ordering::SeqCst) {
            NEVER => None,
            ms => Some(Duration::from_millis(self.now_ms().saturating_sub(ms))),
        }
    }

    pub(crate) fn record_batch(&self, size: usize) {
        let last = self.batches_by_size.len() - 1;
        if let Some(slot) = self.batches_by_size.get(size.saturating_sub(1).min(last)) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn record_failed_batch(&self) {
        self.failed_batches.fetch_add(1, Ordering::Relaxed);
    }

    /// The executor made progress (a denoising step finished).
    pub(crate) fn record_progress(&self) {
        self.last_progress_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    pub(crate) fn begin_batch(&self) {
        // Progress first: a reader that sees `in_batch` must not see the idle time before it.
        self.record_progress();
        self.in_batch.store(true, Ordering::SeqCst);
    }

    pub(crate) fn end_batch(&self) {
        self.in_batch.store(false, Ordering::SeqCst);
        self.record_progress();
    }

    pub(crate) fn record_success(&self) {
        self.last_success_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    pub(crate) fn record_device_failure(&self, reason: &str) {
        let mut failure = self.device_failure.lock().unwrap_or_else(|p| p.into_inner());
        if failure.is_none() {
            *failure = Some(reason.to_string());
        }
    }

    /// `(batch size, batches run)` for every size seen so far.
    pub fn batch_sizes(&self) -> Vec<(usize, u64)> {
        self.batches_by_size
            .iter()
            .enumerate()
            .map(|(index, count)| (index + 1, count.load(Ordering::Relaxed)))
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    pub fn failed_batches(&self) -> u64 {
        self.failed_batches.load(Ordering::Relaxed)
    }

    /// Whether the executor is running a batch now.
    pub fn is_busy(&self) -> bool {
        self.in_batch.load(Ordering::SeqCst)
    }

    /// While a batch runs: how long since its last sign of progress. `None` when idle.
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.is_busy() {
            self.since(&self.last_progress_ms)
        } else {
            None
        }
    }

    /// How long ago a request last completed; `None` if none has yet.
    pub fn since_last_success(&self) -> Option<Duration> {
        self.since(&self.last_success_ms)
    }

    /// Why the device can no longer be used, once an unrecoverable error happened.
    pub fn device_failure(&self) -> Option<String> {
        self.device_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
