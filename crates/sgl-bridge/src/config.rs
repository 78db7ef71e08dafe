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
    /// `torch_sdpa`, `fa`, `sage_attn` or `auto`.
    #[serde(default)]
    pub attention_backend: Option<String>,
    /// Compile the denoiser's repeated blocks with torch.compile.
    #[serde(default)]
    pub enable_torch_compile: Option<bool>,
    /// Run one small generation before serving (default: on with torch.compile).
    #[serde(default)]
    pub warmup: Option<bool>,
    /// `auto` (by shape), `on` or `off`: conditional and unconditional branches in one forward.
    #[serde(default)]
    pub cfg_batching: Option<String>,
    /// `auto` (small shapes, default), `on` or `off`: replay the denoiser's forward as a CUDA graph.
    #[serde(default)]
    pub cuda_graphs: Option<String>,
    /// Decode in spatial tiles to bound VAE memory.
    #[serde(default)]
    pub vae_tiling: Option<bool>,
    /// Decode one output at a time to bound VAE memory.
    #[serde(default)]
    pub vae_slicing: Option<bool>,
    /// Write torch profiler traces of each batch.
    #[serde(default)]
    pub profile: Option<bool>,
    /// Denoising steps traced per batch when profiling (default 2).
    #[serde(default)]
    pub num_profiled_timesteps: Option<u32>,
    /// Trace every stage (text encoding, decoding...), not only denoising steps.
    #[serde(default)]
    pub profile_all_stages: Option<bool>,
    /// Folder for profiler traces (default `./profiles`).
    #[serde(default)]
    pub profile_dir: Option<String>,
    /// Precision of each text encoder, in `model_index.json` order (default: the DiT's precision).
    #[serde(default)]
    pub text_encoder_precisions: Option<Vec<String>>,
}

/// The model with its folder resolved, plus the options as given; what the Python executor receives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ResolvedModelConfig<'a> {
    pub model_path: String,
    pub hf_id: Option<String>,
    pub pipeline_class: String,
    pub options: &'a ModelConfig,
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
    /// Most token-steps (outputs × latent tokens × steps × guidance branches) one request may
    /// cost; default: 10 requests at the model's own defaults.
    #[serde(default)]
    pub max_request_cost: Option<u64>,
    /// Most output pixels (outputs × width × height × frames) one request may ask for; default: 10
    /// requests at the model's own defaults.
    #[serde(default)]
    pub max_request_pixels: Option<u64>,
    /// Seconds after submission at which every request is stopped; a request's `timeout_seconds`
    /// may ask for less. Default: no deadline.
    #[serde(default)]
    pub request_timeout_secs: Option<f64>,
}

fn default_max_batch_size() -> u32 {
    1
}

fn default_max_queue_size() -> usize {
    256
}

#[derive(Debug, thiserror::Error)]
#[error("invalid engine config: {0}")]
pub struct ConfigError(String);

impl EngineConfig {
    pub fn batching(&self) -> Result<BatchingConfig, ConfigError> {
        let request_timeout =
            self.request_timeout_secs
                .map(|secs| {
                    Duration::try_from_secs_f64(secs).ok().filter(|timeout| !timeout.is_zero()).ok_or_else(|| {
                        ConfigError(format!("request_timeout must be a number of seconds > 0, got {secs}"))
                    })
                })
                .transpose()?;
        for (name, limit) in
            [("max_request_cost", self.max_request_cost), ("max_request_pixels", self.max_request_pixels)]
        {
            if limit == Some(0) {
                return Err(ConfigError(format!("{name} must be at least 1")));
            }
        }
        Ok(BatchingConfig {
            max_queue_size: self.max_queue_size,
            max_batch_size: self.max_batch_size,
            batch_delay: Duration::from_millis(self.batch_delay_ms),
            max_request_cost: self.max_request_cost,
            max_request_pixels: self.max_request_pixels,
            request_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_options_reach_the_scheduler() {
        let config: EngineConfig = serde_json::from_str(
            r#"{"model": {}, "max_request_cost": 5000, "max_request_pixels": 70000, "request_timeout_secs": 1.5}"#,
        )
        .unwrap();
        let batching = config.batching().unwrap();
        assert_eq!(batching.max_request_cost, Some(5000));
        assert_eq!(batching.max_request_pixels, Some(70000));
        assert_eq!(batching.request_timeout, Some(Duration::from_millis(1500)));
        for bad in [
            r#""request_timeout_secs": 0"#,
            r#""request_timeout_secs": -1"#,
            r#""max_request_cost": 0"#,
            r#""max_request_pixels": 0"#,
        ] {
            let config: EngineConfig = serde_json::from_str(&format!(r#"{{"model": {{}}, {bad}}}"#)).unwrap();
            assert!(config.batching().is_err(), "{bad}");
        }
    }
}
