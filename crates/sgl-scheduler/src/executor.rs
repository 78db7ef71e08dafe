use std::sync::Arc;
use std::time::Instant;

use sgl_core::{GenerationOutput, ResolvedRequest};

use crate::{engine::Event, CancelToken, ExecError, ExecErrorKind, SchedulerStats};

/// The one thing that runs batches: in production the Python pipeline behind the PyO3 bridge.
///
/// It lives on the worker thread for its whole life, so an implementation may own thread-bound
/// state such as the Python executor object.
pub trait BatchExecutor {
    /// Runs `batch` (whose requests share a batch key) and returns one outcome per item, in order.
    /// An `Err` fails the whole batch; the worker then retries each request alone so one bad request
    /// cannot fail its neighbours.
    fn execute(&mut self, batch: &[BatchItem], progress: &BatchProgress) -> Result<Vec<ItemOutcome>, ExecError>;

    /// Runs a command between batches (JSON in, JSON out; e.g. a LoRA change). An executor that takes
    /// none refuses every command.
    fn control(&mut self, command: &str) -> Result<String, ExecError> {
        let _ = command;
        Err(ExecError::new(ExecErrorKind::InvalidInput { field: None }, "this engine takes no commands"))
    }
}

/// One request as the executor sees it.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub id: u64,
    pub request: ResolvedRequest,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Completed(GenerationOutput),
    /// Dropped from the batch between steps because its caller cancelled it.
    Cancelled,
}

/// Sends per-step progress to the batch's requests and tells the executor which of them were
/// cancelled or passed their deadline, so it can drop them from the running batch. Each report is
/// also the executor's sign of life for `/health`. Cheap to clone and `'static`, so it can be
/// handed to Python as a callback object.
#[derive(Debug, Clone)]
pub struct BatchProgress {
    pub(crate) senders: Vec<flume::Sender<Event>>,
    pub(crate) tokens: Vec<CancelToken>,
    pub(crate) deadlines: Vec<Option<Instant>>,
    pub(crate) stats: Arc<SchedulerStats>,
}

impl BatchProgress {
    /// Marks the requests whose deadline has passed.
    fn expire_overdue(&self) {
        let now = Instant::now();
        for (token, deadline) in self.tokens.iter().zip(&self.deadlines) {
            if deadline.is_some_and(|deadline| deadline <= now) {
                token.expire();
            }
        }
    }

    /// Reports that `step` of `total` denoising steps finished; returns the indices (into the
    /// batch) of items cancelled (or past their deadline) so far.
    pub fn report(&self, step: u32, total: u32) -> Vec<usize> {
        self.stats.record_progress();
        self.expire_overdue();
        let mut cancelled = Vec::new();
        for (index, (sender, token)) in self.senders.iter().zip(&self.tokens).enumerate() {
            if token.is_cancelled() {
                cancelled.push(index);
            } else {
                // A caller that stopped listening is not an error for the batch.
                let _ = sender.send(Event::Progress { step, total });
            }
        }
        cancelled
    }

    /// Indices of items cancelled (or past their deadline) so far, without reporting progress.
    pub fn cancelled(&self) -> Vec<usize> {
        self.expire_overdue();
        self.tokens.iter().enumerate().filter(|(_, t)| t.is_cancelled()).map(|(i, _)| i).collect()
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}
