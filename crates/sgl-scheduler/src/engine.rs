use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sgl_core::{GenerationOutput, GenerationRequest, PipelineInfo, ResolvedRequest};

use crate::executor::{BatchExecutor, BatchItem, BatchProgress, ItemOutcome};
use crate::queue::{ControlJob, Pending, RequestQueue, Work};
use crate::{CancelToken, ExecError, ExecErrorKind, GenerationError, RequestBudget, SchedulerStats, SubmitError};

/// Queue, batching and admission limits (`--max-queue-size`, `--max-batch-size`,
/// `--batch-delay-ms`, `--max-request-cost`, `--max-request-pixels`, `--request-timeout`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchingConfig {
    pub max_queue_size: usize,
    /// Most images (sum of `num_outputs` over requests) in one batch.
    pub max_batch_size: u32,
    /// How long the oldest request waits for compatible company before its batch starts.
    pub batch_delay: Duration,
    /// Most token-steps one request may cost; `None`: [`crate::DEFAULT_BUDGET_IN_DEFAULT_REQUESTS`]
    /// requests at the model's defaults.
    pub max_request_cost: Option<u64>,
    /// Most output pixels (outputs × width × height × frames) one request may ask for; `None`:
    /// [`crate::DEFAULT_BUDGET_IN_DEFAULT_REQUESTS`] requests at the model's defaults.
    pub max_request_pixels: Option<u64>,
    /// Deadline of every request (and the most a request's `timeout_seconds` may ask for).
    pub request_timeout: Option<Duration>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            max_queue_size: 256,
            max_batch_size: 1,
            batch_delay: Duration::ZERO,
            max_request_cost: None,
            max_request_pixels: None,
            request_timeout: None,
        }
    }
}

/// How a request is submitted, beside the request itself.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Names the request in log lines (the HTTP `x-request-id`); default: the engine's own id.
    pub request_id: Option<String>,
    /// Runs next, ahead of queued work and beyond the queue's capacity: for health probes only.
    pub priority: bool,
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
    /// Most one request may cost.
    budget: RequestBudget,
    request_timeout: Option<Duration>,
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
        let request_timeout = config.request_timeout;
        // `config` moves to the worker thread; the budget needs the model's defaults, known once it loaded.
        let budget_config = config.clone();
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
                        // The pipeline's own bound (one request at a time for the diffusers backend).
                        let max_requests = info.max_batch_requests.map_or(usize::MAX, |most| most.max(1) as usize);
                        let _ = ready_tx.send(Ok(info));
                        run_worker(executor, &worker_queue, &config, max_requests, &worker_stats);
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
        let reaper_queue = Arc::clone(&queue);
        std::thread::Builder::new().name("sgl-deadlines".into()).spawn(move || reaper_queue.reap_expired()).map_err(
            |err| {
                queue.close();
                ExecError::internal(format!("cannot start the deadline thread: {err}"))
            },
        )?;
        let budget = RequestBudget::new(&budget_config, &info);
        tracing::info!(
            max_request_cost = budget.token_steps,
            max_request_pixels = budget.pixels,
            request_timeout_s = request_timeout.map(|t| t.as_secs_f64()),
            "admission: at most {} token-steps and {} output pixels per request",
            budget.token_steps,
            budget.pixels
        );
        Ok(Self {
            queue,
            info,
            next_id: AtomicU64::new(1),
            worker: Mutex::new(Some(worker)),
            stats,
            budget,
            request_timeout,
        })
    }

    /// Most one request may cost (`--max-request-cost`, `--max-request-pixels`).
    pub fn budget(&self) -> RequestBudget {
        self.budget
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

    /// Validates `request` against the loaded pipeline and its cost against the budget, and queues it.
    pub fn submit(&self, request: &GenerationRequest) -> Result<RequestHandle, SubmitError> {
        self.submit_with(request, SubmitOptions::default())
    }

    /// [`Engine::submit`] with a request id for the logs, or as a priority probe. Every entry point
    /// (HTTP images and videos, the Python API and CLI) queues through here, so the budget and the
    /// deadline hold for all of them.
    pub fn submit_with(
        &self,
        request: &GenerationRequest,
        options: SubmitOptions,
    ) -> Result<RequestHandle, SubmitError> {
        let resolved = ResolvedRequest::resolve(request, &self.info)?;
        self.budget.admit(resolved.cost(&self.info.limits))?;
        // `resolve` checked the value; `try_` keeps a bad one from panicking all the same.
        let asked = request.timeout_seconds.and_then(|secs| Duration::try_from_secs_f64(secs).ok());
        let timeout = match (asked, self.request_timeout) {
            (Some(asked), Some(most)) => Some(asked.min(most)),
            (asked, most) => asked.or(most),
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancelToken::default();
        let (events_tx, events_rx) = flume::unbounded();
        let pending = Pending {
            id,
            label: options.request_id.unwrap_or_else(|| format!("engine-{id}")),
            key: resolved.batch_key(),
            request: resolved.clone(),
            token: token.clone(),
            events: events_tx,
            deadline: timeout.map(|timeout| (Instant::now() + timeout, timeout)),
        };
        if options.priority {
            self.queue.push_front(pending)?;
        } else {
            self.queue.push(pending)?;
        }
        Ok(RequestHandle { id, request: resolved, events: events_rx, token, queue: Arc::clone(&self.queue) })
    }

    /// Runs `command` (JSON) on the executor between two batches, ahead of queued requests, and returns
    /// its answer (JSON). Blocks until then: call it off async workers.
    pub fn control(&self, command: String) -> Result<String, ExecError> {
        let (reply, answer) = flume::bounded(1);
        self.queue
            .push_control(ControlJob { command, reply })
            .map_err(|_| ExecError::internal("the engine is shutting down"))?;
        answer.recv().map_err(|_| ExecError::internal("the engine stopped before it answered"))?
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
    max_requests: usize,
    stats: &Arc<SchedulerStats>,
) {
    while let Some(work) = queue.next_work(config.max_batch_size, max_requests, config.batch_delay) {
        let batch = match work {
            Work::Batch(batch) => batch,
            Work::Control(job) => {
                let answer = catch_unwind(AssertUnwindSafe(|| executor.control(&job.command)))
                    .unwrap_or_else(|_| Err(ExecError::internal("the executor panicked")));
                let _ = job.reply.send(answer);
                continue;
            }
        };
        let now = Instant::now();
        let live: Vec<Pending> = batch
            .into_iter()
            .filter(|pending| {
                let stopped = pending.expire_if_overdue(now) || pending.token.is_cancelled();
                if stopped {
                    pending.finish_stopped();
                }
                !stopped
            })
            .collect();
        if live.is_empty() {
            continue;
        }
        stats.record_batch(live.len());
        match run_counted(&mut executor, &live, stats) {
            Ok(outcomes) => deliver(&live, outcomes, stats),
            Err(err) if live.len() == 1 => fail(&live[0], err, stats),
            Err(err) => {
                stats.record_failed_batch();
                let ids: Vec<&str> = live.iter().map(|p| p.label.as_str()).collect();
                tracing::warn!(request_ids = ?ids, error = %err, "batch failed; retrying its requests one by one");
                for pending in &live {
                    if pending.token.is_cancelled() {
                        pending.finish_stopped();
                        continue;
                    }
                    let single = std::slice::from_ref(pending);
                    match run_counted(&mut executor, single, stats) {
                        Ok(outcomes) => deliver(single, outcomes, stats),
                        Err(err) => fail(pending, err, stats),
                    }
                }
            }
        }
    }
}

/// Runs a batch between `begin_batch` and `end_batch`. The batch is marked over before any of its
/// requests is answered, so a client holding its answer never sees the engine still busy with it.
fn run_counted<E: BatchExecutor>(
    executor: &mut E,
    batch: &[Pending],
    stats: &Arc<SchedulerStats>,
) -> Result<Vec<ItemOutcome>, ExecError> {
    stats.begin_batch();
    let result = run_batch(executor, batch, stats);
    stats.end_batch();
    result
}

/// Answers a request whose batch failed, and keeps a device failure for `/health`.
fn fail(pending: &Pending, err: ExecError, stats: &SchedulerStats) {
    match err.kind {
        ExecErrorKind::InvalidInput { .. } => {
            tracing::info!(request_id = %pending.label, error = %err, "the pipeline refused the request")
        }
        ExecErrorKind::DeviceFailed => {
            stats.record_device_failure(&err.message);
            tracing::error!(request_id = %pending.label, error = %err, "the device failed; restart the process");
        }
        ExecErrorKind::OutOfMemory | ExecErrorKind::Load | ExecErrorKind::Internal => {
            tracing::error!(request_id = %pending.label, error = %err, "request failed")
        }
    }
    pending.finish(Err(err.into()));
}

fn run_batch<E: BatchExecutor>(
    executor: &mut E,
    batch: &[Pending],
    stats: &Arc<SchedulerStats>,
) -> Result<Vec<ItemOutcome>, ExecError> {
    for pending in batch {
        let _ = pending.events.send(Event::Started { batch_size: batch.len() });
    }
    let ids: Vec<&str> = batch.iter().map(|p| p.label.as_str()).collect();
    tracing::debug!(request_ids = ?ids, "batch started");
    let items: Vec<BatchItem> = batch.iter().map(|p| BatchItem { id: p.id, request: p.request.clone() }).collect();
    let progress = BatchProgress {
        senders: batch.iter().map(|p| p.events.clone()).collect(),
        tokens: batch.iter().map(|p| p.token.clone()).collect(),
        deadlines: batch.iter().map(|p| p.deadline.map(|(deadline, _)| deadline)).collect(),
        stats: Arc::clone(stats),
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

fn deliver(batch: &[Pending], outcomes: Vec<ItemOutcome>, stats: &SchedulerStats) {
    for (pending, outcome) in batch.iter().zip(outcomes) {
        match outcome {
            ItemOutcome::Completed(output) => {
                stats.record_success();
                pending.finish(Ok(output));
            }
            ItemOutcome::Cancelled => pending.finish_stopped(),
        }
    }
}
