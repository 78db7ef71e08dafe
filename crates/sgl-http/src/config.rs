use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The server's own settings (`sgl-diffusion serve` flags); the model's are `sgl_bridge::ModelConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// When set, every route but `/health` needs `Authorization: Bearer <key>`, content downloads
    /// included (keys never travel in URLs, where logs and referrers would keep them).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Largest request body accepted, in MiB.
    #[serde(default = "default_max_body_mb")]
    pub max_body_mb: u64,
    /// Origins allowed by CORS; none means CORS is off.
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Base of absolute `url` outputs (e.g. `https://images.example.com`); default: the request's Host.
    #[serde(default)]
    pub public_url: Option<String>,
    /// Seconds an output stays downloadable; its files are deleted afterwards.
    #[serde(default = "default_output_ttl")]
    pub output_ttl_secs: u64,
    /// Where `url` outputs are stored; default: a folder under the system temp dir.
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Extra names the model answers to (e.g. `dall-e-3`).
    #[serde(default)]
    pub served_model_names: Vec<String>,
    /// The model path as the user gave it (a folder or a Hugging Face id), also a served name.
    #[serde(default)]
    pub model_path: Option<String>,
    /// How long a `/health_generate` result is reused, in seconds.
    #[serde(default = "default_health_generate_ttl")]
    pub health_generate_ttl_secs: u64,
    /// Most finished video jobs kept (with their files); beyond it those closest to expiring are
    /// deleted first, so that records and disk stay bounded however fast jobs are made.
    #[serde(default = "default_max_finished_jobs")]
    pub max_finished_jobs: usize,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

fn default_port() -> u16 {
    30000
}

fn default_max_body_mb() -> u64 {
    16
}

fn default_output_ttl() -> u64 {
    3600
}

fn default_health_generate_ttl() -> u64 {
    10
}

fn default_max_finished_jobs() -> usize {
    crate::jobs::DEFAULT_MAX_FINISHED
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            api_key: None,
            max_body_mb: default_max_body_mb(),
            cors_origins: Vec::new(),
            public_url: None,
            output_ttl_secs: default_output_ttl(),
            output_dir: None,
            served_model_names: Vec::new(),
            model_path: None,
            health_generate_ttl_secs: default_health_generate_ttl(),
            max_finished_jobs: default_max_finished_jobs(),
        }
    }
}

impl ServerConfig {
    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.max_body_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }
}
