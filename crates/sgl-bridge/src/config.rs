use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_core::declare_fields;
use sgl_core::fields::check_bounds;
use sgl_scheduler::BatchingConfig;

/// Precisions a model's parts may run in.
const PRECISIONS: &[&str] = &["fp32", "fp16", "bf16"];
/// Which implementation runs the model; `sglang` is SGLang's name for `native`.
const BACKENDS: &[&str] = &["auto", "native", "sglang", "diffusers"];
/// The `--help` heading of the diffusers backend's options.
const DIFFUSERS: &str = "diffusers backend";
/// A speed option's three settings.
const AUTO_ON_OFF: &[&str] = &["auto", "on", "off"];
/// The `--help` heading of the speed and profiling options.
const SPEED: &str = "speed and profiling";
/// The `--help` heading of the LoRA options.
const LORA: &str = "LoRA adapters";

declare_fields! {
    /// Which model to load and how, as every entry point states it (`--model-path`, `--device`, ...).
    /// `None` means the default: the built-in tiny model, CUDA when present, bf16 on CUDA / fp32 on CPU.
    ///
    /// The one declaration of each model option: the flags of both CLIs and the native binary,
    /// `--config` keys and `DiffGenerator.from_pretrained` keywords are derived from its table; the
    /// Python side turns the options into `RuntimeOptions`.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ModelConfig {
        /// Diffusers folder or Hugging Face id (looked up in the local cache); default: the built-in
        /// tiny model.
        #[serde(default)]
        pub model_path: Option<String>,
        /// cuda (default when present), cuda:N or cpu.
        #[serde(default)]
        pub device: Option<String>,
        /// A VAE to use instead of the model's own: a VAE folder (config.json + safetensors) or a
        /// model folder (its vae/), a Hugging Face id in the local cache, or one .safetensors file
        /// loaded into the model's own VAE architecture. It must fit the model's latents.
        #[serde(default)]
        pub vae_path: Option<String>,
        /// Which implementation runs the model: auto (default: the native pipeline when the model's
        /// class has one, else diffusers), native (or its alias sglang: native only, an error when
        /// there is none) or diffusers (diffusers' own pipeline, any model).
        #[serde(default)]
        pub backend: Option<String> [.choices(BACKENDS).group(DIFFUSERS)],
        /// Run pipeline code shipped in the model folder (custom diffusers pipelines); off by
        /// default.
        #[serde(default)]
        pub trust_remote_code: Option<bool> [.group(DIFFUSERS)],
        /// Attention of a diffusers pipeline's transformer, by diffusers' dispatcher names (native,
        /// flash, sage, xformers, ...); default: diffusers' own.
        #[serde(default)]
        pub diffusers_attention_backend: Option<String> [.group(DIFFUSERS)],
        /// Keyword arguments of a diffusers pipeline (a `--config` mapping): names of its
        /// `__call__`'s parameters go to every call, the others to `from_pretrained`.
        #[serde(default)]
        pub diffusers_kwargs: Option<serde_json::Map<String, serde_json::Value>> [.group(DIFFUSERS)],
        /// Precision of the DiT; default: bf16 on cuda, fp32 on cpu.
        #[serde(default)]
        pub dit_precision: Option<String> [.choices(PRECISIONS).aliases(&["--precision"])],
        /// Precision of the VAE; default: bf16 on cuda, fp32 on cpu.
        #[serde(default)]
        pub vae_precision: Option<String> [.choices(PRECISIONS)],
        /// One precision per text encoder, in model_index.json order (FLUX.1: CLIP T5; Wan: UMT5);
        /// default: the DiT's.
        #[serde(default)]
        pub text_encoder_precisions: Option<Vec<String>> [.choices(PRECISIONS)],
        /// Attention kernels: torch_sdpa (default), fa (fa3 means fa), fa4, sage_attn or auto; for
        /// video models also the sparse sliding_tile_attn and video_sparse_attn.
        #[serde(default)]
        pub attention_backend: Option<String>,
        /// Sliding tile attention's mask strategy: a JSON file of "step_layer_head": [t, h, w]
        /// windows in tiles (default: $SGLANG_DIFFUSION_ATTENTION_CONFIG).
        #[serde(default)]
        pub mask_strategy_file_path: Option<String>,
        /// Settings of the attention backend (a `--config` mapping): video_sparse_attn takes
        /// VSA_sparsity (or sparsity), from 0 (default) up to but not including 1.
        #[serde(default)]
        pub attention_backend_config: Option<serde_json::Map<String, serde_json::Value>>,
        /// Compile the denoiser's repeated blocks with torch.compile (CUDA; the first run of a shape
        /// is slow).
        #[serde(default)]
        pub enable_torch_compile: Option<bool> [.group(SPEED)],
        /// Run one short generation at the default size before serving (default: on with
        /// torch.compile).
        #[serde(default)]
        pub warmup: Option<bool> [.group(SPEED).negatable()],
        /// Run conditional and unconditional branches in one forward: auto (by shape, default), on,
        /// off.
        #[serde(default)]
        pub cfg_batching: Option<String> [.group(SPEED).choices(AUTO_ON_OFF)],
        /// Replay the denoiser's forward as a CUDA graph: auto (small shapes, default), on (every
        /// shape), off.
        #[serde(default)]
        pub cuda_graphs: Option<String> [.group(SPEED).choices(AUTO_ON_OFF)],
        /// Decode in spatial tiles (less memory).
        #[serde(default)]
        pub vae_tiling: Option<bool> [.group(SPEED)],
        /// Decode one output at a time (less memory).
        #[serde(default)]
        pub vae_slicing: Option<bool> [.group(SPEED)],
        /// Write torch profiler traces of each batch.
        #[serde(default)]
        pub profile: Option<bool> [.group(SPEED)],
        /// Denoising steps traced per batch when profiling (default 2).
        #[serde(default)]
        pub num_profiled_timesteps: Option<u32> [.group(SPEED).min(1)],
        /// Trace every stage (text encoding, decoding), not only denoising steps.
        #[serde(default)]
        pub profile_all_stages: Option<bool> [.group(SPEED)],
        /// Folder for profiler traces (default ./profiles).
        #[serde(default)]
        pub profile_dir: Option<String> [.group(SPEED)],
        /// A LoRA adapter merged at start: a .safetensors file, a folder holding one, or a Hugging
        /// Face id in the local cache.
        #[serde(default)]
        pub lora_path: Option<String> [.group(LORA)],
        /// The nickname of --lora-path's adapter (default: default).
        #[serde(default)]
        pub lora_nickname: Option<String> [.group(LORA)],
        /// The strength --lora-path's adapter is merged at (default 1.0).
        #[serde(default)]
        pub lora_scale: Option<f64> [.group(LORA)],
        /// The folder every LoRA path must lie in (set_lora's included); unset: any path the
        /// process can read. A server taking LoRA paths from clients should set it.
        #[serde(default)]
        pub lora_dir: Option<String> [.group(LORA)],
        /// Most gigabytes of LoRA weights kept in memory (CPU) across nicknames (default 8); past it the
        /// least recently used leave and are read from their file when used again.
        #[serde(default)]
        pub lora_cache_gb: Option<f64> [.group(LORA).above(0)],
    }
}

/// The model with its folder resolved, plus the options as given; what the Python executor receives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ResolvedModelConfig<'a> {
    pub model_path: String,
    pub hf_id: Option<String>,
    pub pipeline_class: String,
    pub options: &'a ModelConfig,
}

declare_fields! {
    /// Everything needed to start an engine: the model plus the scheduler's limits (each a flag of
    /// both commands but `--max-queue-size`, which only a server has use for).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct EngineConfig {
        pub model: ModelConfig,
        /// Most images per batched forward.
        pub max_batch_size: u32 [.min(1)],
        /// How long a request waits for batch company, in milliseconds.
        pub batch_delay_ms: u64,
        /// Requests waiting before 429.
        pub max_queue_size: usize [.min(1).serve_only()],
        /// Most token-steps (outputs x latent tokens x steps x guidance branches) one request may
        /// cost; default: 10 requests at the model's defaults.
        pub max_request_cost: Option<u64> [.min(1)],
        /// Most output pixels (outputs x width x height x frames) one request may ask for; default:
        /// 10 requests at the model's defaults.
        pub max_request_pixels: Option<u64> [.min(1)],
        /// Seconds after which a request is stopped between two steps (default: none); a request's
        /// timeout_seconds may ask for less.
        pub request_timeout_secs: Option<f64> [.flag("--request-timeout").above(0)],
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            max_batch_size: 1,
            batch_delay_ms: 0,
            max_queue_size: 256,
            max_request_cost: None,
            max_request_pixels: None,
            request_timeout_secs: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid engine config: {0}")]
pub struct ConfigError(String);

impl EngineConfig {
    /// The scheduler's settings, each checked against the bounds its field declares.
    pub fn batching(&self) -> Result<BatchingConfig, ConfigError> {
        check_bounds(self).map_err(|err| ConfigError(err.0))?;
        let request_timeout = self
            .request_timeout_secs
            .map(|secs| {
                Duration::try_from_secs_f64(secs).map_err(|err| ConfigError(format!("--request-timeout {secs}: {err}")))
            })
            .transpose()?;
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
        for (bad, flag) in [
            (r#""request_timeout_secs": 0"#, "--request-timeout must be > 0"),
            (r#""request_timeout_secs": -1"#, "--request-timeout must be > 0"),
            (r#""request_timeout_secs": 1e300"#, "--request-timeout"),
            (r#""max_request_cost": 0"#, "--max-request-cost must be at least 1"),
            (r#""max_request_pixels": 0"#, "--max-request-pixels must be at least 1"),
            (r#""max_batch_size": 0"#, "--max-batch-size must be at least 1"),
        ] {
            let config: EngineConfig = serde_json::from_str(&format!(r#"{{"model": {{}}, {bad}}}"#)).unwrap();
            assert!(config.batching().unwrap_err().to_string().contains(flag), "{bad}");
        }
    }
}
