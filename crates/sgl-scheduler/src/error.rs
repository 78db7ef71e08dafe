use std::time::Duration;

use sgl_core::{RequestCost, ValidationError};

use crate::RequestBudget;

/// Why a request was not accepted into the queue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("the request queue is full ({capacity} waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the engine is shutting down and accepts no new requests")]
    ShuttingDown,
    #[error("{}; ask for fewer outputs, steps, frames or pixels", budget.overruns(cost))]
    OverBudget { cost: RequestCost, budget: RequestBudget },
}

/// Why an accepted request produced no output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerationError {
    #[error("the request was cancelled")]
    Cancelled,
    #[error(transparent)]
    Execution(#[from] ExecError),
    #[error("the engine stopped before the request finished")]
    EngineStopped,
    #[error(
        "the request passed its deadline of {:.3} s (timeout_seconds / --request-timeout) and was stopped",
        timeout.as_secs_f64()
    )]
    DeadlineExceeded { timeout: Duration },
}

/// A failure reported by the executor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    pub kind: ExecErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecErrorKind {
    /// The request cannot run on this model (found by the pipeline, not the core's checks).
    InvalidInput {
        field: Option<String>,
    },
    /// The device ran out of memory.
    OutOfMemory,
    /// Loading the model failed.
    Load,
    /// The device is in a state no later request can recover from (a CUDA error that poisons the
    /// context): the process must be restarted.
    DeviceFailed,
    Internal,
}

impl ExecError {
    pub fn new(kind: ExecErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ExecErrorKind::Internal, message)
    }
}
