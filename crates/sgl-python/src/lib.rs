//! `sgl_diffusion._native`: the Rust engine as seen from Python.
//!
//! The Python API and CLI build an [`engine::PyEngine`], which starts the scheduler and its worker
//! thread (the thread that runs the pipeline) and submits requests to it in-process. Every call that
//! waits releases the GIL so the worker can run Python, and checks for Ctrl-C while it waits.

mod engine;
mod errors;
pub mod fields;
pub mod serve;
mod weights;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyRequestHandle>()?;
    errors::register(m)?;
    fields::register(m)?;
    weights::register(m)?;
    serve::register(m)?;
    Ok(())
}
