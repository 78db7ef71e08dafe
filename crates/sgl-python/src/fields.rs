//! The field tables, for the Python faces that are derived from them: the CLI flags, the keywords of
//! `DiffGenerator`, the executor's request mirror and the `.pyi` stubs. Checks whose rules the
//! tables declare (bounds) run here too, so that both languages report them in the same words.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use serde::de::DeserializeOwned;
use sgl_bridge::{EngineConfig, ModelConfig};
use sgl_core::fields::{check_json_bounds, table_json, table_json_with_defaults, Fields};
use sgl_core::{GenerationRequest, ResolvedRequest};
use sgl_http::ServerConfig;

/// Every table by name: the request as submitted and as resolved, the model options, the engine's
/// (scheduler) options and the server's; the name is also the `--help` heading of their flags.
pub fn tables() -> serde_json::Value {
    serde_json::json!({
        "request": table_json(GenerationRequest::FIELDS, "request", None),
        "resolved": table_json(ResolvedRequest::FIELDS, "resolved", None),
        "model": table_json(ModelConfig::FIELDS, "model", None),
        "engine": table_json_with_defaults::<EngineConfig>("scheduler"),
        "server": table_json_with_defaults::<ServerConfig>("server"),
    })
}

/// `fields_json()`: [`tables`] as JSON.
#[pyfunction]
fn fields_json() -> String {
    tables().to_string()
}

/// Parses a config, its declared bounds checked first (they name the flag, serde would name the type).
fn parse<T: DeserializeOwned + Fields>(what: &str, config_json: &str) -> PyResult<T> {
    let invalid = |message: String| PyValueError::new_err(format!("invalid {what}: {message}"));
    let json: serde_json::Value = serde_json::from_str(config_json).map_err(|e| invalid(e.to_string()))?;
    check_json_bounds(T::FIELDS, &json).map_err(|e| invalid(e.0))?;
    serde_json::from_value(json).map_err(|e| invalid(e.to_string()))
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
    config.validate().map_err(|e| PyValueError::new_err(format!("invalid server config: {e}")))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fields_json, m)?)?;
    m.add_function(wrap_pyfunction!(check_engine_config, m)?)?;
    m.add_function(wrap_pyfunction!(check_server_config, m)?)?;
    Ok(())
}
