use sgl_core::ValidationError;

/// Why a request was not accepted into the queue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("the request queue is full ({capacity} waiting); retry later")]
    QueueFull { capacity: usize },
    #[error("the engine is shutting down and accepts no new requests")]
    ShuttingDown,
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
