//! The field tables, for the Python faces that are derived from them: the CLI flags, the keywords of
//! `DiffGenerator`, the executor's request mirror and the `.pyi` stubs. Checks whose rules the
//! tables declare (bounds) run here too, so that both languages report them in the same words.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde::de::DeserializeOwned;
use sgl_bridge::{EngineConfig, ModelConfig};
use sgl_core::fields::{table_json, table_json_with_defaults, Fields};
use sgl_core::{GenerationRequest, ResolvedRequest};
use sgl_http::ServerConfig;

/// Every table by name: the request as submitted and as resolved, the model options, the engine's
/// (scheduler) options and the server's.
pub fn tables() -> serde_json::Value {
    serde_json::json!({
        "request": table_json(GenerationRequest::FIELDS, None),
        "resolved": table_json(ResolvedRequest::FIELDS, None),
        "model": table_json(ModelConfig::FIELDS, None),
        "engine": table_json_with_defaults::<EngineConfig>(),
        "server": table_json_with_defaults::<ServerConfig>(),
    })
}

/// `fields_json()`: [`tables`] as JSON.
#[pyfunction]
fn fields_json() -> String {
    tables().to_string()
}

fn parse<T: DeserializeOwned>(what: &str, config_json: &str) -> PyResult<T> {
    serde_json::from_str(config_json).map_err(|e| PyValueError::new_err(format!("invalid {what}: {e}")))
}

/// Raises `ValueError` naming the flag of the first setting of an engine config that is out of bounds.
#[pyfunction]
fn check_engine_config(config_json: &str) -> PyResult<()> {
    let config: EngineConfig = parse("engine config", config_json)?;
    config.batching().map(drop).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Raises `ValueError` naming the flag of the first server setting the server cannot start with.
#[pyfunction]
fn check_server_config(config_json: &str) -> PyResult<()> {
    let config: ServerConfig = parse("server config", config_json)?;
    config.validate().map_err(|e| PyValueError::new_err(e.to_string()))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fields_json, m)?)?;
    m.add_function(wrap_pyfunction!(check_engine_config, m)?)?;
    m.add_function(wrap_pyfunction!(check_server_config, m)?)?;
    Ok(())
}
