//! The scheduler every entry point submits to.
//!
//! Requests wait in a bounded [`RequestQueue`]; one worker thread, which owns the executor (and so,
//! in production, the Python interpreter), asks the queue for the next batch of compatible requests,
//! runs it, and reports progress and results through each request's event channel. Nothing here
//! polls: the worker sleeps on a condition variable while the queue is empty.

mod budget;
mod cancel;
mod engine;
mod error;
mod executor;
mod queue;
mod stats;

pub use budget::{RequestBudget, DEFAULT_BUDGET_IN_DEFAULT_REQUESTS};
pub use cancel::{CancelToken, StopReason};
pub use engine::{BatchingConfig, Engine, Event, RequestHandle, SubmitOptions};
pub use error::{ExecError, ExecErrorKind, GenerationError, SubmitError};
pub use executor::{BatchExecutor, BatchItem, BatchProgress, ItemOutcome};
pub use queue::RequestQueue;
pub use stats::SchedulerStats;
