use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_scheduler::BatchingConfig;

/// Which model to load and how, as every entry point states it (`--model-path`, `--device`, ...).
/// `None` means the default: the built-in tiny model, CUDA when present, bf16 on CUDA / fp32 on CPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A diffusers folder or a Hugging Face id (looked up in the local cache).
    #[serde(default)]
    pub model_path: Option<String>,
    /// `cuda`, `cuda:N` or `cpu`.
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub dit_precision: Option<String>,
    #[serde(default)]
    pub vae_precision: Option<String>,
    #[serde(default)]
    pub attention_backend: Option<String>,
}

/// The model config with its folder resolved; what the Python executor receives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ResolvedModelConfig<'a> {
    pub model_path: String,
    pub hf_id: Option<String>,
    pub pipeline_class: String,
    pub device: Option<&'a str>,
    pub dit_precision: Option<&'a str>,
    pub vae_precision: Option<&'a str>,
    pub attention_backend: Option<&'a str>,
}

/// Everything needed to start an engine: the model plus the scheduler's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub model: ModelConfig,
    #[serde(default = "default_max_batch_size")]
    pub max_batch_size: u32,
    #[serde(default)]
    pub batch_delay_ms: u64,
    #[serde(default = "default_max_queue_size")]
    pub max_queue_size: usize,
}

fn default_max_batch_size() -> u32 {
    1
}

fn default_max_queue_size() -> usize {
    256
}

impl EngineConfig {
    pub fn batching(&self) -> BatchingConfig {
        BatchingConfig {
            max_queue_size: self.max_queue_size,
            max_batch_size: self.max_batch_size,
            batch_delay: Duration::from_millis(self.batch_delay_ms),
        }
    }
}
