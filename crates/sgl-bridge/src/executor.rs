use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use serde::Serialize;
use sgl_core::{EncodedOutput, GenerationOutput, OutputMetadata, PipelineInfo, ResolvedRequest};
use sgl_scheduler::{BatchExecutor, BatchItem, BatchProgress, ExecError, ExecErrorKind, ItemOutcome};

use std::collections::BTreeMap;
use std::path::PathBuf;

use sgl_core::lora::{LoraCommand, OneOrMany, SetLoraRequest};
use sgl_weights::lora::LoraRegistry;

use crate::config::ResolvedModelConfig;
use crate::progress::ProgressCallback;
use crate::warmup::{warmup_request, WarmupImage};
use crate::ModelConfig;

/// Python module and class the bridge drives; the only Python surface Rust calls.
const EXECUTOR_MODULE: &str = "sgl_diffusion.runtime.executor";
const EXECUTOR_CLASS: &str = "PipelineExecutor";

/// The loaded Python pipeline executor. Lives on the scheduler's worker thread.
pub struct PythonExecutor {
    executor: Py<PyAny>,
    /// The LoRA adapters by nickname; LoRA commands pass through it before Python sees them.
    loras: LoraRegistry,
}

/// A batch as the Python executor's `run_batch` takes it.
#[derive(Serialize)]
struct WireBatch<'a> {
    items: Vec<WireItem<'a>>,
    /// The file of each LoRA adapter the requests name in their own `lora`, by nickname.
    lora_files: BTreeMap<&'a str, String>,
    /// Adapters whose tensors to let go of before the batch (the registry's byte budget, least recently used
    /// first), unless a denoiser has them set; never one of this batch's.
    lora_drop: Vec<String>,
}

#[derive(Serialize)]
struct WireItem<'a> {
    id: u64,
    request: &'a ResolvedRequest,
}

impl PythonExecutor {
    /// Resolves the model folder, imports the executor module and loads the model. Must run on the
    /// worker thread.
    pub fn load(config: &ModelConfig) -> Result<(Self, PipelineInfo), ExecError> {
        let load_error = |message: String| ExecError::new(ExecErrorKind::Load, message);
        let name = match &config.model_path {
            Some(path) => path.clone(),
            None => builtin_model_path()?,
        };
        let model = sgl_weights::resolve_model(&name).map_err(|e| load_error(e.to_string()))?;
        let resolved = ResolvedModelConfig {
            model_path: model.dir.to_string_lossy().into_owned(),
            hf_id: model.hf_id,
            pipeline_class: model.pipeline_class,
            options: config,
        };
        let config_json =
            serde_json::to_string(&resolved).map_err(|e| load_error(format!("cannot encode the model config: {e}")))?;
        Python::attach(|py| {
            let load = || -> PyResult<(Py<PyAny>, String)> {
                let class = py.import(EXECUTOR_MODULE)?.getattr(EXECUTOR_CLASS)?;
                let executor = class.call1((config_json,))?;
                let info: String = executor.call_method0("info_json")?.extract()?;
                Ok((executor.unbind(), info))
            };
            let (executor, info_json) = load().map_err(|err| to_exec_error(py, &err, ExecErrorKind::Load))?;
            let info: PipelineInfo = serde_json::from_str(&info_json).map_err(|e| {
                ExecError::new(ExecErrorKind::Load, format!("the executor reported malformed pipeline info: {e}"))
            })?;
            let budget = (config.lora_cache_gb.unwrap_or(DEFAULT_LORA_CACHE_GB) * 1e9) as u64;
            let loras = LoraRegistry::new(config.lora_dir.as_ref().map(PathBuf::from), budget);
            let mut executor = Self { executor, loras };
            if let Some(command) = startup_lora(config)? {
                executor.control(&command).map_err(|err| load_error(format!("--lora-path: {}", err.message)))?;
            }
            let wants_warmup =
                executor.executor.bind(py).call_method0("wants_warmup").and_then(|wants| wants.extract());
            if wants_warmup.map_err(|err| to_exec_error(py, &err, ExecErrorKind::Load))? {
                executor.warm_up(py, &info)?;
            }
            Ok((executor, info))
        })
    }

    /// Runs the warm-up request, resolved by the core at the model's defaults (see [`crate::warmup`]).
    fn warm_up(&self, py: Python<'_>, info: &PipelineInfo) -> Result<(), ExecError> {
        let load_error = |message: String| ExecError::new(ExecErrorKind::Load, message);
        let image =
            WarmupImage::for_model(info).map_err(|e| load_error(format!("cannot write the warm-up image: {e}")))?;
        let request = warmup_request(info, image.as_ref().map(WarmupImage::path))
            .map_err(|e| load_error(format!("the model's defaults are not a valid request ({e}); use --no-warmup")))?;
        let request_json = serde_json::to_string(&request)
            .map_err(|e| load_error(format!("cannot encode the warm-up request: {e}")))?;
        self.executor
            .bind(py)
            .call_method1("warm_up", (request_json,))
            .map(drop)
            .map_err(|err| to_exec_error(py, &err, ExecErrorKind::Load))
    }
}

/// Gigabytes of LoRA tensors kept in memory by default (`--lora-cache-gb`).
const DEFAULT_LORA_CACHE_GB: f64 = 8.0;

/// `--lora-path` (with `--lora-nickname`, `--lora-scale`) as the set_lora command run once the model loaded.
fn startup_lora(config: &ModelConfig) -> Result<Option<String>, ExecError> {
    let Some(path) = &config.lora_path else {
        if config.lora_nickname.is_some() || config.lora_scale.is_some() {
            return Err(ExecError::new(
                ExecErrorKind::Load,
                "--lora-nickname and --lora-scale name and weigh the adapter of --lora-path, which is not given",
            ));
        }
        return Ok(None);
    };
    let request = SetLoraRequest {
        lora_nickname: OneOrMany::One(config.lora_nickname.clone().unwrap_or_else(|| "default".into())),
        lora_path: Some(OneOrMany::One(Some(path.clone()))),
        target: None,
        strength: config.lora_scale.map(OneOrMany::One),
        merge_mode: None,
    };
    let command = LoraCommand::set(&request)
        .map_err(|err| ExecError::new(ExecErrorKind::Load, format!("--lora-{}: {}", err.field, err.message)))?;
    serde_json::to_string(&command).map(Some).map_err(|e| ExecError::internal(e.to_string()))
}

impl BatchExecutor for PythonExecutor {
    fn control(&mut self, command: &str) -> Result<String, ExecError> {
        let python = crate::lora::python_command(&mut self.loras, command)?;
        let answer = Python::attach(|py| {
            self.executor
                .bind(py)
                .call_method1("lora_command", (python,))
                .and_then(|answer| answer.extract::<String>())
                .map_err(|err| to_exec_error(py, &err, ExecErrorKind::Internal))
        })?;
        crate::lora::reconcile(&mut self.loras, &answer)?;
        Ok(answer)
    }

    fn execute(&mut self, batch: &[BatchItem], progress: &BatchProgress) -> Result<Vec<ItemOutcome>, ExecError> {
        let mut lora_files = BTreeMap::new();
        for lora in batch.iter().flat_map(|item| &item.request.lora) {
            // An unknown nickname fails the batch; the scheduler then runs its requests one by one, so only the
            // request that named it fails.
            let registered = self.loras.get(&lora.nickname).map_err(|err| {
                ExecError::new(ExecErrorKind::InvalidInput { field: Some("lora".into()) }, err.to_string())
            })?;
            lora_files.insert(lora.nickname.as_str(), registered.lora.file.to_string_lossy().into_owned());
        }
        // Adapters read for requests count against the byte budget as set ones do.
        let lora_drop = if lora_files.is_empty() {
            Vec::new()
        } else {
            self.loras.plan_use(&lora_files.keys().copied().collect::<Vec<_>>())
        };
        let wire = WireBatch {
            items: batch.iter().map(|item| WireItem { id: item.id, request: &item.request }).collect(),
            lora_files,
            lora_drop,
        };
        let batch_json =
            serde_json::to_string(&wire).map_err(|e| ExecError::internal(format!("cannot encode the batch: {e}")))?;
        Python::attach(|py| {
            let callback = Py::new(py, ProgressCallback { progress: progress.clone() })
                .map_err(|err| to_exec_error(py, &err, ExecErrorKind::Internal))?;
            let results = self
                .executor
                .bind(py)
                .call_method1("run_batch", (batch_json, callback))
                .map_err(|err| to_exec_error(py, &err, ExecErrorKind::Internal))?;
            let results = results
                .cast_into::<PyList>()
                .map_err(|_| ExecError::internal("run_batch must return a list with one entry per request"))?;
            batch
                .iter()
                .zip(results.iter())
                .map(|(item, result)| decode_outcome(&item.request, &result))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|outcomes| {
                    if outcomes.len() == batch.len() {
                        Ok(outcomes)
                    } else {
                        Err(ExecError::internal(format!(
                            "run_batch returned {} results for {} requests",
                            outcomes.len(),
                            batch.len()
                        )))
                    }
                })
        })
    }
}

/// The built-in default model's folder; Python builds it on first use.
fn builtin_model_path() -> Result<String, ExecError> {
    Python::attach(|py| {
        py.import("sgl_diffusion.builtin")
            .and_then(|module| module.getattr("builtin_model_path")?.call0()?.str()?.extract::<String>())
            .map_err(|err| to_exec_error(py, &err, ExecErrorKind::Load))
    })
}

/// `None` for a request cancelled mid-batch, else `(list[bytes], metadata_json)`.
fn decode_outcome(request: &ResolvedRequest, result: &Bound<'_, PyAny>) -> Result<ItemOutcome, ExecError> {
    if result.is_none() {
        return Ok(ItemOutcome::Cancelled);
    }
    let malformed = |what: &str| ExecError::internal(format!("run_batch returned a malformed result: {what}"));
    let (outputs, metadata_json): (Vec<Bound<'_, PyBytes>>, String) =
        result.extract().map_err(|_| malformed("expected (list[bytes], str)"))?;
    let metadata: OutputMetadata =
        serde_json::from_str(&metadata_json).map_err(|e| malformed(&format!("metadata: {e}")))?;
    let outputs = outputs
        .iter()
        .map(|bytes| EncodedOutput { format: request.output_format, bytes: bytes.as_bytes().to_vec() })
        .collect();
    Ok(ItemOutcome::Completed(GenerationOutput { outputs, metadata }))
}

/// Maps a Python exception to the scheduler's error kinds, printing the traceback of unexpected
/// ones so that a failure in a pipeline is diagnosable from the server's log.
fn to_exec_error(py: Python<'_>, err: &PyErr, fallback: ExecErrorKind) -> ExecError {
    let value = err.value(py);
    let type_name = value.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "Exception".into());
    let message = value.str().map(|s| s.to_string()).unwrap_or_default();
    if type_name == "InvalidRequestError" {
        // Raised as InvalidRequestError(message) with `.field` (`sgl_diffusion.errors.invalid_request`).
        let field = value.getattr("field").ok().and_then(|f| f.extract::<String>().ok());
        return ExecError::new(ExecErrorKind::InvalidInput { field }, message);
    }
    if type_name == "OutOfMemoryError" {
        return ExecError::new(ExecErrorKind::OutOfMemory, message);
    }
    if type_name == "DeviceFailedError" {
        err.display(py);
        return ExecError::new(ExecErrorKind::DeviceFailed, message);
    }
    err.display(py);
    ExecError::new(fallback, format!("{type_name}: {message}"))
}
