use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sgl_core::{GenerationOutput, GenerationRequest, PipelineInfo, ResolvedRequest};

use crate::executor::{BatchExecutor, BatchItem, BatchProgress, ItemOutcome};
use crate::queue::{Pending, RequestQueue};
use crate::{CancelToken, ExecError, GenerationError, SchedulerStats, SubmitError};

/// Queue and batching limits (`--max-queue-size`, `--max-batch-size`, `--batch-delay-ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchingConfig {
    pub max_queue_size: usize,
    /// Most images (sum of `num_outputs` over requests) in one batch.
    pub max_batch_size: u32,
    /// How long the oldest request waits for compatible company before its batch starts.
    pub batch_delay: Duration,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self { max_queue_size: 256, max_batch_size: 1, batch_delay: Duration::ZERO }
    }
}

/// What a submitted request hears, in order: `Started`, any number of `Progress`, one `Finished`.
/// A request cancelled while queued hears only `Finished(Err(Cancelled))`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started { batch_size: usize },
    Progress { step: u32, total: u32 },
    Finished(Box<Result<GenerationOutput, GenerationError>>),
}

/// The scheduler: a bounded queue in front of one worker thread that owns the executor.
#[derive(Debug)]
pub struct Engine {
    queue: Arc<RequestQueue>,
    info: PipelineInfo,
    next_id: AtomicU64,
    worker: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<SchedulerStats>,
}

impl Engine {
    /// Starts the worker thread, builds the executor there with `load` (so thread-bound state such
    /// as the Python interpreter never leaves that thread) and waits until it is ready.
    pub fn start<E, F>(config: BatchingConfig, load: F) -> Result<Self, ExecError>
    where
        E: BatchExecutor,
        F: FnOnce() -> Result<(E, PipelineInfo), ExecError> + Send + 'static,
    {
        if config.max_batch_size == 0 || config.max_queue_size == 0 {
            return Err(ExecError::new(
                crate::ExecErrorKind::Load,
                "max_batch_size and max_queue_size must be at least 1",
            ));
        }
        let queue = Arc::new(RequestQueue::new(config.max_queue_size));
        let stats = Arc::new(SchedulerStats::new(config.max_batch_size));
        let (ready_tx, ready_rx) = flume::bounded(1);
        let worker_queue = Arc::clone(&queue);
        let worker_stats = Arc::clone(&stats);
        let worker = std::thread::Builder::new()
            .name("sgl-executor".into())
            .spawn(move || {
                let loaded = catch_unwind(AssertUnwindSafe(load))
                    .unwrap_or_else(|_| Err(ExecError::internal("the model loader panicked")));
                match loaded {
                    Ok((executor, info)) => {
                        let _ = ready_tx.send(Ok(info));
                        run_worker(executor, &worker_queue, &config, &worker_stats);
                    }
                    Err(err) => {
                        worker_queue.close();
                        let _ = ready_tx.send(Err(err));
                    }
                }
            })
            .map_err(|err| ExecError::internal(format!("cannot start the executor thread: {err}")))?;
        let info = ready_rx
            .recv()
            .map_err(|_| ExecError::internal("the executor thread ended before the model was loaded"))??;
        Ok(Self { queue, info, next_id: AtomicU64::new(1), worker: Mutex::new(Some(worker)), stats })
    }

    pub fn info(&self) -> &PipelineInfo {
        &self.info
    }

    pub fn queue(&self) -> &Arc<RequestQueue> {
        &self.queue
    }

    pub fn stats(&self) -> &SchedulerStats {
        &self.stats
    }

    /// False once the worker thread has ended (after a shutdown, or if it died).
    pub fn is_alive(&self) -> bool {
        self.worker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|worker| !worker.is_finished())
    }

    /// Validates `request` against the loaded pipeline and queues it.
    pub fn submit(&self, request: &GenerationRequest) -> Result<RequestHandle, SubmitError> {
        let resolved = ResolvedRequest::resolve(request, &self.info)?;
        self.submit_resolved(resolved)
    }

    pub fn submit_resolved(&self, request: ResolvedRequest) -> Result<RequestHandle, SubmitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancelToken::default();
        let (events_tx, events_rx) = flume::unbounded();
        let pending =
            Pending { id, key: request.batch_key(), request: request.clone(), token: token.clone(), events: events_tx };
        self.queue.push(pending)?;
        Ok(RequestHandle { id, request, events: events_rx, token, queue: Arc::clone(&self.queue) })
    }

    /// Stops accepting requests, lets queued and running ones finish, and joins the worker.
    pub fn shutdown(&self) {
        self.queue.close();
        let worker = self.worker.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
        if let Some(worker) = worker {
            if worker.join().is_err() {
                tracing::error!("the executor thread panicked during shutdown");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Never join here: the worker may need a lock (the GIL) the dropping thread holds.
        self.queue.close();
    }
}

/// The caller's side of a submitted request.
#[derive(Debug)]
pub struct RequestHandle {
    pub id: u64,
    /// The request as it will run, defaults filled in (e.g. the seed drawn for it).
    pub request: ResolvedRequest,
    events: flume::Receiver<Event>,
    token: CancelToken,
    queue: Arc<RequestQueue>,
}

impl RequestHandle {
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
    }

    /// Cancels the request: dropped at once if still queued, or between two denoising steps if
    /// running. Its `Finished` event then carries `Cancelled`.
    pub fn cancel(&self) {
        self.token.cancel();
        self.queue.cancel(self.id);
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Blocks until the request finishes, ignoring progress.
    pub fn wait(&self) -> Result<GenerationOutput, GenerationError> {
        loop {
            match self.events.recv() {
                Ok(Event::Finished(result)) => return *result,
                Ok(_) => continue,
                Err(_) => return Err(GenerationError::EngineStopped),
            }
        }
    }
}

fn run_worker<E: BatchExecutor>(
    mut executor: E,
    queue: &RequestQueue,
    config: &BatchingConfig,
    stats: &SchedulerStats,
) {
    while let Some(batch) = queue.next_batch(config.max_batch_size, config.batch_delay) {
        let live: Vec<Pending> = batch
            .into_iter()
            .filter(|pending| {
                let cancelled = pending.token.is_cancelled();
                if cancelled {
                    pending.finish(Err(GenerationError::Cancelled));
                }
                !cancelled
            })
            .collect();
        if live.is_empty() {
            continue;
        }
        stats.record_batch(live.len());
        match run_batch(&mut executor, &live) {
            Ok(outcomes) => deliver(&live, outcomes),
            Err(err) if live.len() == 1 => live[0].finish(Err(err.into())),
            Err(err) => {
                stats.record_failed_batch();
                tracing::warn!(batch_size = live.len(), error = %err, "batch failed; retrying its requests one by one");
                for pending in &live {
                    if pending.token.is_cancelled() {
                        pending.finish(Err(GenerationError::Cancelled));
                        continue;
                    }
                    let single = std::slice::from_ref(pending);
                    match run_batch(&mut executor, single) {
                        Ok(outcomes) => deliver(single, outcomes),
                        Err(err) => pending.finish(Err(err.into())),
                    }
                }
            }
        }
    }
}

fn run_batch<E: BatchExecutor>(executor: &mut E, batch: &[Pending]) -> Result<Vec<ItemOutcome>, ExecError> {
    for pending in batch {
        let _ = pending.events.send(Event::Started { batch_size: batch.len() });
    }
    let items: Vec<BatchItem> = batch.iter().map(|p| BatchItem { id: p.id, request: p.request.clone() }).collect();
    let progress = BatchProgress {
        senders: batch.iter().map(|p| p.events.clone()).collect(),
        tokens: batch.iter().map(|p| p.token.clone()).collect(),
    };
    let outcomes = catch_unwind(AssertUnwindSafe(|| executor.execute(&items, &progress)))
        .unwrap_or_else(|_| Err(ExecError::internal("the executor panicked")))?;
    if outcomes.len() != batch.len() {
        return Err(ExecError::internal(format!(
            "the executor returned {} results for a batch of {}",
            outcomes.len(),
            batch.len()
        )));
    }
    Ok(outcomes)
}

fn deliver(batch: &[Pending], outcomes: Vec<ItemOutcome>) {
    for (pending, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            ItemOutcome::Completed(output) => pending.finish(Ok(output)),
            ItemOutcome::Cancelled => pending.finish(Err(GenerationError::Cancelled)),
        }
    }
}
