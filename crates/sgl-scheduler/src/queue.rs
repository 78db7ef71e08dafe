use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sgl_core::{BatchKey, ResolvedRequest};

use crate::{engine::Event, CancelToken, GenerationError, StopReason, SubmitError};

/// A request waiting in the queue, with the means to answer its caller.
#[derive(Debug)]
pub(crate) struct Pending {
    pub id: u64,
    /// Names the request in log lines: the caller's id (HTTP `x-request-id`), else the engine's.
    pub label: String,
    pub request: ResolvedRequest,
    pub key: BatchKey,
    pub token: CancelToken,
    pub events: flume::Sender<Event>,
    /// When the request is stopped, and the timeout that set it (for the error message).
    pub deadline: Option<(Instant, Duration)>,
}

impl Pending {
    fn images(&self) -> u32 {
        self.request.num_outputs
    }

    pub fn finish(&self, result: Result<sgl_core::GenerationOutput, GenerationError>) {
        // The caller may have gone away; its result then has nowhere to go.
        let _ = self.events.send(Event::Finished(Box::new(result)));
    }

    /// Marks the request expired if its deadline is at or before `now`; returns whether it is.
    pub fn expire_if_overdue(&self, now: Instant) -> bool {
        if self.deadline.is_some_and(|(deadline, _)| deadline <= now) {
            self.token.expire();
        }
        self.token.reason() == Some(StopReason::DeadlineExceeded)
    }

    /// Answers a request that was stopped early, with the reason its token holds.
    pub fn finish_stopped(&self) {
        let error = match (self.token.reason(), self.deadline) {
            (Some(StopReason::DeadlineExceeded), Some((_, timeout))) => {
                tracing::warn!(request_id = %self.label, timeout_s = timeout.as_secs_f64(), "request passed its deadline; stopped");
                GenerationError::DeadlineExceeded { timeout }
            }
            _ => GenerationError::Cancelled,
        };
        self.finish(Err(error));
    }
}

/// A command for the executor (e.g. a LoRA change), run between two batches: JSON in, JSON out.
#[derive(Debug)]
pub(crate) struct ControlJob {
    pub command: String,
    pub reply: flume::Sender<Result<String, crate::ExecError>>,
}

/// What the worker does next.
#[derive(Debug)]
pub(crate) enum Work {
    Batch(Vec<Pending>),
    Control(ControlJob),
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: VecDeque<Pending>,
    /// Run before the next batch forms, in order; never refused for a full queue.
    controls: VecDeque<ControlJob>,
    closed: bool,
}

/// Bounded FIFO of requests. Batches are formed in arrival order: the oldest request picks the
/// batch key, and later requests with the same key join it up to the batch's image budget.
#[derive(Debug)]
pub struct RequestQueue {
    state: Mutex<QueueState>,
    changed: Condvar,
    capacity: usize,
}

impl RequestQueue {
    pub fn new(capacity: usize) -> Self {
        Self { state: Mutex::new(QueueState::default()), changed: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the deque half-updated (every mutation is a
        // single push/remove), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn push(&self, pending: Pending) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::ShuttingDown);
        }
        if state.waiting.len() >= self.capacity {
            return Err(SubmitError::QueueFull { capacity: self.capacity });
        }
        state.waiting.push_back(pending);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Queues `pending` ahead of everything waiting and beyond the capacity: for the tiny health
    /// probe, which must not be refused, or wait, because users filled the queue.
    pub(crate) fn push_front(&self, pending: Pending) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::ShuttingDown);
        }
        state.waiting.push_front(pending);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Answers every queued request whose deadline passed, then sleeps until the next deadline or
    /// a change of the queue; returns once the queue is closed (the worker then drains what is
    /// left, checking deadlines as it forms batches). Runs on a thread of its own, so a request
    /// behind a long batch hears of its deadline on time.
    pub(crate) fn reap_expired(&self) {
        let mut state = self.lock();
        loop {
            if state.closed {
                return;
            }
            let now = Instant::now();
            if state.waiting.iter().any(|p| p.deadline.is_some_and(|(deadline, _)| deadline <= now)) {
                let (expired, kept): (VecDeque<Pending>, VecDeque<Pending>) =
                    std::mem::take(&mut state.waiting).into_iter().partition(|p| p.expire_if_overdue(now));
                state.waiting = kept;
                drop(state);
                for pending in expired {
                    pending.finish_stopped();
                }
                state = self.lock();
                continue;
            }
            let next = state.waiting.iter().filter_map(|p| p.deadline.map(|(deadline, _)| deadline)).min();
            state = match next {
                Some(deadline) => self
                    .changed
                    .wait_timeout(state, deadline.saturating_duration_since(now))
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0),
                None => self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
    }

    /// Removes a queued request and answers it `Cancelled`. Returns false when the request is not
    /// queued (already running or finished).
    pub(crate) fn cancel(&self, id: u64) -> bool {
        let mut state = self.lock();
        let Some(position) = state.waiting.iter().position(|p| p.id == id) else {
            return false;
        };
        if let Some(pending) = state.waiting.remove(position) {
            drop(state);
            pending.token.cancel();
            pending.finish_stopped();
        }
        true
    }

    /// Stops accepting requests; the worker drains what is queued and then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Requests waiting (not running).
    pub fn depth(&self) -> usize {
        self.lock().waiting.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues a command for the worker, ahead of every request; it runs once the running batch (if
    /// any) ends.
    pub(crate) fn push_control(&self, job: ControlJob) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::ShuttingDown);
        }
        state.controls.push_back(job);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Blocks until a command or a request is queued. A command comes first; otherwise gathers
    /// requests compatible with the oldest for up to `delay` or until `max_images` images (or
    /// `max_requests` requests) are collected. Returns `None` once the queue is closed and empty.
    pub(crate) fn next_work(&self, max_images: u32, max_requests: usize, delay: Duration) -> Option<Work> {
        let mut state = self.lock();
        let head = loop {
            if let Some(job) = state.controls.pop_front() {
                return Some(Work::Control(job));
            }
            if let Some(head) = state.waiting.pop_front() {
                break head;
            }
            if state.closed {
                return None;
            }
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        };
        let key = head.key.clone();
        let mut images = head.images();
        let mut batch = vec![head];
        let deadline = Instant::now() + delay;
        loop {
            let mut index = 0;
            while index < state.waiting.len() && images < max_images && batch.len() < max_requests {
                let fits = state.waiting.get(index).is_some_and(|p| p.key == key && images + p.images() <= max_images);
                if fits {
                    if let Some(pending) = state.waiting.remove(index) {
                        images += pending.images();
                        batch.push(pending);
                    }
                } else {
                    index += 1;
                }
            }
            let now = Instant::now();
            // A full batch (by images or by requests) waits for no more company; nor does one that a
            // command waits behind (the command would otherwise wait out the batch's delay too).
            let full = images >= max_images || batch.len() >= max_requests;
            if full || now >= deadline || state.closed || !state.controls.is_empty() {
                return Some(Work::Batch(batch));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
    }
}
