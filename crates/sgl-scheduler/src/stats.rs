use std::sync::atomic::{AtomicU64, Ordering};

/// Counters the worker keeps about the batches it ran; read by the metrics endpoint.
#[derive(Debug)]
pub struct SchedulerStats {
    /// `batches_by_size[n - 1]` counts batches of `n` requests; the last slot also counts larger ones.
    batches_by_size: Vec<AtomicU64>,
    failed_batches: AtomicU64,
}

impl SchedulerStats {
    pub(crate) fn new(max_batch_size: u32) -> Self {
        let slots = usize::try_from(max_batch_size.max(1)).unwrap_or(1);
        Self { batches_by_size: (0..slots).map(|_| AtomicU64::new(0)).collect(), failed_batches: AtomicU64::new(0) }
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
}
