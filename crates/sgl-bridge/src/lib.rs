//! The seam between the Rust scheduler and the Python/torch pipeline.
//!
//! [`PythonExecutor`] is the scheduler's [`sgl_scheduler::BatchExecutor`] in production. It is
//! created on, and only ever used from, the scheduler's worker thread: that thread is the one
//! thread that runs Python pipeline code. It hands Python plain data (JSON) and gets back encoded
//! bytes plus JSON metadata; tensors never cross into Rust.

mod config;
mod executor;
mod lora;
mod progress;
pub mod warmup;

pub use config::{ConfigError, EngineConfig, ModelConfig};
pub use executor::PythonExecutor;
