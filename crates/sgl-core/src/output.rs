use serde::{Deserialize, Serialize};

use crate::OutputFormat;

/// One encoded output (an image file, later a video file). Tensors never cross into Rust: Python
/// encodes, Rust only moves bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedOutput {
    pub format: OutputFormat,
    pub bytes: Vec<u8>,
}

/// Everything a finished request returns.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub outputs: Vec<EncodedOutput>,
    pub metadata: OutputMetadata,
}

/// What the executor reports next to the outputs, serialised as JSON by the Python side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputMetadata {
    pub seed: u64,
    /// How many requests shared the forward passes that produced this output.
    pub batch_size: u32,
    pub perf: PerfMetrics,
    #[serde(default)]
    pub notes: Vec<String>,
}

/// Timings and memory of one run; also the schema of `--perf-dump-path` files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerfMetrics {
    pub total_duration_ms: f64,
    /// Pipeline stages in the order they ran.
    pub steps: Vec<StageTiming>,
    pub denoise_steps_ms: Vec<StepTiming>,
    pub memory_checkpoints: Vec<MemoryCheckpoint>,
    pub peak_memory_mb: f64,
    /// `--profile`: the folder holding this batch's torch profiler trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_trace_dir: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageTiming {
    pub name: String,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTiming {
    pub step: u32,
    pub duration_ms: f64,
}

/// Device memory after a stage (CUDA allocator statistics; process RSS on CPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryCheckpoint {
    pub name: String,
    pub allocated_mb: f64,
    pub peak_allocated_mb: f64,
}
