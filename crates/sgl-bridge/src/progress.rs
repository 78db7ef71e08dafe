use pyo3::prelude::*;
use sgl_scheduler::BatchProgress;

/// Handed to the Python pipeline as its per-step callback: `callback(step, total)` reports
/// progress to every request of the batch and returns the batch indices cancelled so far.
#[pyclass(name = "BatchProgress", module = "sgl_diffusion._native", frozen)]
pub(crate) struct ProgressCallback {
    pub(crate) progress: BatchProgress,
}

#[pymethods]
impl ProgressCallback {
    fn __call__(&self, step: u32, total: u32) -> Vec<usize> {
        self.progress.report(step, total)
    }

    /// Indices of cancelled requests, without reporting a step (checked before the first step).
    fn cancelled(&self) -> Vec<usize> {
        self.progress.cancelled()
    }

    fn __len__(&self) -> usize {
        self.progress.len()
    }
}
