//! Submitting a request and awaiting its result from async code. Tokio tasks never call Python:
//! they only queue plain requests and await the scheduler's events.

use sgl_core::GenerationOutput;
use sgl_scheduler::{Event, GenerationError, RequestHandle};

use crate::error::ApiError;

/// Cancels the request if the awaiting future is dropped (the client went away) before the
/// result arrived.
struct CancelOnDrop<'a> {
    handle: &'a RequestHandle,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            tracing::info!(request = self.handle.id, "client disconnected; cancelling its request");
            self.handle.cancel();
        }
    }
}

/// Awaits a submitted request's result.
pub async fn await_result(handle: &RequestHandle) -> Result<GenerationOutput, ApiError> {
    let mut guard = CancelOnDrop { handle, armed: true };
    let result = loop {
        match handle.events().recv_async().await {
            Ok(Event::Finished(result)) => break *result,
            Ok(_) => continue,
            Err(_) => break Err(GenerationError::EngineStopped),
        }
    };
    guard.armed = false;
    result.map_err(|err| ApiError::from_generation(&err))
}
