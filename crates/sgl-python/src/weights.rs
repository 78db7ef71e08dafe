use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use sgl_weights::WeightsError;

fn to_py(err: WeightsError) -> PyErr {
    match err {
        WeightsError::ModelNotFound { .. } | WeightsError::MissingShard { .. } | WeightsError::NoWeights { .. } => {
            PyFileNotFoundError::new_err(err.to_string())
        }
        _ => PyValueError::new_err(err.to_string()),
    }
}

/// `resolve_model(name) -> (folder, hf_id | None, pipeline_class)` without network access.
#[pyfunction]
fn resolve_model(py: Python<'_>, name: &str) -> PyResult<(String, Option<String>, String)> {
    let name = name.to_string();
    let resolved = py.detach(move || sgl_weights::resolve_model(&name)).map_err(to_py)?;
    Ok((resolved.dir.to_string_lossy().into_owned(), resolved.hf_id, resolved.pipeline_class))
}

/// The safetensors files of one component folder, shards in order.
#[pyfunction]
fn component_weight_files(py: Python<'_>, dir: &str) -> PyResult<Vec<String>> {
    let dir = std::path::PathBuf::from(dir);
    let files = py.detach(move || sgl_weights::component_weight_files(&dir)).map_err(to_py)?;
    Ok(files.into_iter().map(|p| p.to_string_lossy().into_owned()).collect())
}

/// The Hugging Face cache folder searched for model ids.
#[pyfunction]
fn hf_cache_dir() -> String {
    sgl_weights::hf_cache_dir().to_string_lossy().into_owned()
}

/// `{name: (dtype, shape)}` from a safetensors header, without reading tensor data.
#[pyfunction]
fn safetensors_tensors(py: Python<'_>, path: &str) -> PyResult<Vec<(String, String, Vec<u64>)>> {
    let path = std::path::PathBuf::from(path);
    let header = py.detach(move || sgl_weights::read_safetensors_header(&path)).map_err(to_py)?;
    Ok(header.tensors.into_iter().map(|(name, info)| (name, info.dtype, info.shape)).collect())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(resolve_model, m)?)?;
    m.add_function(wrap_pyfunction!(component_weight_files, m)?)?;
    m.add_function(wrap_pyfunction!(hf_cache_dir, m)?)?;
    m.add_function(wrap_pyfunction!(safetensors_tensors, m)?)?;
    Ok(())
}
