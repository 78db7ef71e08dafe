use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use sgl_core::ValidationError;
use sgl_scheduler::{ExecError, ExecErrorKind, GenerationError, SubmitError};

create_exception!(_native, InvalidRequestError, PyValueError, "A request field is invalid; `.field` names it.");
create_exception!(_native, QueueFullError, PyException, "The request queue is full; retry later.");
create_exception!(_native, EngineShutdownError, PyException, "The engine is shutting down.");
create_exception!(_native, RequestCancelledError, PyException, "The request was cancelled.");
create_exception!(_native, GenerationFailedError, PyRuntimeError, "The pipeline failed to produce output.");
create_exception!(_native, DeviceOutOfMemoryError, GenerationFailedError, "The request did not fit in device memory.");
create_exception!(
    _native,
    DeviceFailedError,
    GenerationFailedError,
    "The device failed beyond recovery (e.g. an illegal memory access); restart the process."
);
create_exception!(
    _native,
    DeadlineExceededError,
    PyTimeoutError,
    "The request passed its deadline (timeout_seconds / request_timeout) and was stopped."
);
create_exception!(_native, ModelLoadError, PyRuntimeError, "The model could not be loaded.");

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InvalidRequestError", py.get_type::<InvalidRequestError>())?;
    m.add("QueueFullError", py.get_type::<QueueFullError>())?;
    m.add("EngineShutdownError", py.get_type::<EngineShutdownError>())?;
    m.add("RequestCancelledError", py.get_type::<RequestCancelledError>())?;
    m.add("GenerationFailedError", py.get_type::<GenerationFailedError>())?;
    m.add("DeviceOutOfMemoryError", py.get_type::<DeviceOutOfMemoryError>())?;
    m.add("DeviceFailedError", py.get_type::<DeviceFailedError>())?;
    m.add("DeadlineExceededError", py.get_type::<DeadlineExceededError>())?;
    m.add("ModelLoadError", py.get_type::<ModelLoadError>())?;
    Ok(())
}

/// `InvalidRequestError(message)` with `.field`: `str(err)` is the message alone (the CLI prints it as is).
pub(crate) fn invalid(py: Python<'_>, field: Option<&str>, message: &str) -> PyErr {
    let err = InvalidRequestError::new_err(message.to_string());
    // Attach `.field` for callers (the HTTP layer maps it to OpenAI's `param`).
    let _ = err.value(py).setattr("field", field);
    err
}

pub(crate) fn from_validation(py: Python<'_>, err: &ValidationError) -> PyErr {
    invalid(py, Some(&err.field), &err.to_string())
}

pub(crate) fn from_submit(py: Python<'_>, err: &SubmitError) -> PyErr {
    match err {
        SubmitError::Invalid(v) => from_validation(py, v),
        SubmitError::QueueFull { .. } => QueueFullError::new_err(err.to_string()),
        SubmitError::ShuttingDown => EngineShutdownError::new_err(err.to_string()),
        // No one field is at fault: the product of several is over the budget.
        SubmitError::OverBudget { .. } => invalid(py, None, &err.to_string()),
    }
}

pub(crate) fn from_exec(py: Python<'_>, err: &ExecError) -> PyErr {
    match &err.kind {
        ExecErrorKind::InvalidInput { field } => invalid(py, field.as_deref(), &err.message),
        ExecErrorKind::OutOfMemory => DeviceOutOfMemoryError::new_err(err.message.clone()),
        ExecErrorKind::DeviceFailed => DeviceFailedError::new_err(err.message.clone()),
        ExecErrorKind::Load => ModelLoadError::new_err(err.message.clone()),
        ExecErrorKind::Internal => GenerationFailedError::new_err(err.message.clone()),
    }
}

pub(crate) fn from_generation(py: Python<'_>, err: &GenerationError) -> PyErr {
    match err {
        GenerationError::Cancelled => RequestCancelledError::new_err(err.to_string()),
        GenerationError::Execution(exec) => from_exec(py, exec),
        GenerationError::EngineStopped => EngineShutdownError::new_err(err.to_string()),
        GenerationError::DeadlineExceeded { .. } => DeadlineExceededError::new_err(err.to_string()),
    }
}
