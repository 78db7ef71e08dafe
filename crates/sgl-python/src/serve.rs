use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use serde::Deserialize;
use sgl_bridge::{EngineConfig, PythonExecutor};
use sgl_http::{ServeError, ServerConfig};
use sgl_scheduler::Engine;

/// What `sgl-diffusion serve` hands over: the engine (model + scheduler limits) and the server.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub server: ServerConfig,
}

impl ServeConfig {
    /// Runs the server until SIGINT/SIGTERM. Used by the Python command and the native binary,
    /// so both log through the same subscriber (`--log-format`, `SGL_DIFFUSION_LOG` / `RUST_LOG`).
    pub fn run(self) -> Result<(), ServeError> {
        sgl_http::init_logging(self.server.log_format);
        let batching = self.engine.batching().map_err(|e| ServeError::Load(e.to_string()))?;
        let model = self.engine.model;
        let load =
            Box::new(move || Engine::start(batching, move || PythonExecutor::load(&model)).map_err(|e| e.message));
        sgl_http::run(self.server, load)
    }
}

/// `serve(config_json)`: runs the HTTP server in this process until SIGINT/SIGTERM, with the GIL
/// released so the engine's worker thread can run the pipeline.
#[pyfunction]
fn serve(py: Python<'_>, config_json: &str) -> PyResult<()> {
    let config: ServeConfig =
        serde_json::from_str(config_json).map_err(|e| PyValueError::new_err(format!("invalid server config: {e}")))?;
    let result = py.detach(move || config.run());
    // The signal that stopped the server is ours, not Python's: drop the KeyboardInterrupt it left.
    let _ = py.check_signals();
    result.map_err(|err| match err {
        ServeError::Load(reason) => crate::errors::ModelLoadError::new_err(reason),
        other => PyOSError::new_err(other.to_string()),
    })
}

/// The OpenAPI spec the server serves (for docs and drift checks).
#[pyfunction]
fn openapi_json() -> String {
    sgl_http::openapi_json()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(openapi_json, m)?)?;
    Ok(())
}
