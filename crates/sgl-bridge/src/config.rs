use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_scheduler::BatchingConfig;

/// Which model to load and how; handed to the Python executor as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Resolved diffusers folder.
    pub model_path: String,
    /// Hugging Face id the folder was resolved from, if any.
    #[serde(default)]
    pub hf_id: Option<String>,
    /// `_class_name` from model_index.json.
    pub pipeline_class: String,
    /// `cuda`, `cuda:N` or `cpu`.
    pub device: String,
    pub dit_precision: String,
    pub vae_precision: String,
    #[serde(default)]
    pub attention_backend: Option<String>,
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
