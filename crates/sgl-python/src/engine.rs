use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sgl_bridge::{EngineConfig, PythonExecutor};
use sgl_core::lora::{LoraCommand, MergeLoraRequest, SetLoraRequest, UnmergeLoraRequest};
use sgl_core::{GenerationOutput, GenerationRequest};
use sgl_scheduler::{Engine, Event, GenerationError, RequestHandle};

use crate::errors;

/// How often a waiting caller wakes to check for Ctrl-C. Waiting itself blocks on a channel.
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A loaded model behind the scheduler. `Engine(config_json)` loads the model on the engine's own
/// worker thread and returns when it is ready.
#[pyclass(name = "Engine", module = "sgl_diffusion._native", frozen)]
pub(crate) struct PyEngine {
    engine: Engine,
    info_json: String,
}

#[pymethods]
impl PyEngine {
    #[new]
    fn new(py: Python<'_>, config_json: &str) -> PyResult<Self> {
        let config: EngineConfig = serde_json::from_str(config_json)
            .map_err(|e| errors::invalid(py, None, &format!("invalid engine config: {e}")))?;
        let model = config.model.clone();
        let batching = config.batching().map_err(|e| errors::invalid(py, None, &e.to_string()))?;
        let engine = py
            .detach(move || Engine::start(batching, move || PythonExecutor::load(&model)))
            .map_err(|e| errors::from_exec(py, &e))?;
        let info_json = serde_json::to_string(engine.info())
            .map_err(|e| errors::GenerationFailedError::new_err(format!("cannot encode pipeline info: {e}")))?;
        Ok(Self { engine, info_json })
    }

    /// The pipeline's description (class, limits, defaults) as JSON.
    fn info_json(&self) -> &str {
        &self.info_json
    }

    /// Requests waiting in the queue (not running).
    fn queue_depth(&self) -> usize {
        self.engine.queue().depth()
    }

    /// Validates and queues a request (JSON with `GenerationRequest`'s fields); returns at once.
    fn submit(&self, py: Python<'_>, request_json: &str) -> PyResult<PyRequestHandle> {
        let request = GenerationRequest::from_json(request_json).map_err(|e| errors::from_validation(py, &e))?;
        let handle = self.engine.submit(&request).map_err(|e| errors::from_submit(py, &e))?;
        let request_json = serde_json::to_string(&handle.request)
            .map_err(|e| errors::GenerationFailedError::new_err(format!("cannot encode the request: {e}")))?;
        Ok(PyRequestHandle { handle, request_json })
    }

    /// `set_lora` (JSON with `SetLoraRequest`'s fields): loads and merges adapters between batches; returns
    /// the LoRA state after it (JSON).
    fn set_lora(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let request: SetLoraRequest = parse(py, request_json)?;
        let command = LoraCommand::set(&request).map_err(|e| errors::from_validation(py, &e))?;
        self.lora(py, &command)
    }

    /// Merges the targets' adapters again (JSON with `MergeLoraRequest`'s fields).
    fn merge_lora(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let request: MergeLoraRequest = parse(py, request_json)?;
        let command = LoraCommand::merge(&request).map_err(|e| errors::from_validation(py, &e))?;
        self.lora(py, &command)
    }

    /// Restores the targets' base weights (JSON with `UnmergeLoraRequest`'s fields).
    fn unmerge_lora(&self, py: Python<'_>, request_json: &str) -> PyResult<String> {
        let request: UnmergeLoraRequest = parse(py, request_json)?;
        let command = LoraCommand::unmerge(&request).map_err(|e| errors::from_validation(py, &e))?;
        self.lora(py, &command)
    }

    /// The adapters loaded and merged (JSON `LoraState`).
    fn list_loras(&self, py: Python<'_>) -> PyResult<String> {
        self.lora(py, &LoraCommand::List)
    }

    /// Stops accepting requests, finishes queued and running ones, and stops the worker.
    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.engine.shutdown());
    }
}

impl PyEngine {
    /// Runs a LoRA command on the engine's worker (between batches) without holding the GIL.
    fn lora(&self, py: Python<'_>, command: &LoraCommand) -> PyResult<String> {
        let command = serde_json::to_string(command)
            .map_err(|e| errors::GenerationFailedError::new_err(format!("cannot encode the LoRA command: {e}")))?;
        py.detach(|| self.engine.control(command)).map_err(|e| errors::from_exec(py, &e))
    }
}

/// A request body of one of the LoRA calls; an unknown or mistyped field is an error naming it.
fn parse<T: serde::de::DeserializeOwned>(py: Python<'_>, json: &str) -> PyResult<T> {
    serde_json::from_str(json).map_err(|e| errors::invalid(py, None, &format!("invalid LoRA request: {e}")))
}

/// A submitted request: wait for it, or cancel it.
#[pyclass(name = "RequestHandle", module = "sgl_diffusion._native", frozen)]
pub(crate) struct PyRequestHandle {
    handle: RequestHandle,
    request_json: String,
}

#[pymethods]
impl PyRequestHandle {
    #[getter]
    fn id(&self) -> u64 {
        self.handle.id
    }

    /// The request as it runs, every default filled in (JSON).
    #[getter]
    fn request_json(&self) -> &str {
        &self.request_json
    }

    /// Stops the request: dropped if queued, or between two denoising steps if running.
    fn cancel(&self) {
        self.handle.cancel();
    }

    /// Blocks (without the GIL) until the request finishes. Returns `(outputs, metadata_json)`.
    /// `on_progress(step, total)` is called after each denoising step. Ctrl-C cancels the request.
    #[pyo3(signature = (on_progress=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        on_progress: Option<Bound<'py, PyAny>>,
    ) -> PyResult<(Vec<Bound<'py, PyBytes>>, String)> {
        let output = wait_for(py, &self.handle, on_progress.as_ref())?;
        let metadata = serde_json::to_string(&output.metadata)
            .map_err(|e| errors::GenerationFailedError::new_err(format!("cannot encode metadata: {e}")))?;
        let outputs = output.outputs.iter().map(|o| PyBytes::new(py, &o.bytes)).collect();
        Ok((outputs, metadata))
    }
}

fn wait_for(
    py: Python<'_>,
    handle: &RequestHandle,
    on_progress: Option<&Bound<'_, PyAny>>,
) -> PyResult<GenerationOutput> {
    loop {
        let event = py.detach(|| handle.events().recv_timeout(SIGNAL_CHECK_INTERVAL));
        match event {
            Ok(Event::Finished(result)) => return (*result).map_err(|e| errors::from_generation(py, &e)),
            Ok(Event::Progress { step, total }) => {
                if let Some(callback) = on_progress {
                    if let Err(err) = callback.call1((step, total)) {
                        handle.cancel();
                        return Err(err);
                    }
                }
            }
            Ok(Event::Started { .. }) | Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => {
                return Err(errors::from_generation(py, &GenerationError::EngineStopped));
            }
        }
        // After every event, not only after a quiet interval: steps that arrive faster than the
        // interval would otherwise hold off Ctrl-C until the request ends.
        if let Err(interrupt) = py.check_signals() {
            handle.cancel();
            return Err(interrupt);
        }
    }
}
