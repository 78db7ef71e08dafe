use std::path::PathBuf;
use std::time::Duration;

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
    /// How long a `/health_generate` result is reused, in seconds; also how recent a completed
    /// request must be for `/health_generate` to answer from it without a probe.
    #[serde(default = "default_health_generate_ttl")]
    pub health_generate_ttl_secs: u64,
    /// Open connections served at once; further ones wait in the listen backlog until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open); then the connection is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request's body once its headers arrived (408 after).
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_secs: u64,
    /// Largest input image (`input_reference`), in pixels, read from its header before it is decoded.
    #[serde(default = "default_max_input_pixels")]
    pub max_input_pixels: u64,
    /// `/health` answers 503 once a running batch has shown no progress (no denoising step, no
    /// start or end) for this many seconds.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_secs: u64,
    /// Log lines as text (default) or one JSON object per line.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Most finished video jobs kept (with their files); beyond it those closest to expiring are
    /// deleted first, so that records and disk stay bounded however fast jobs are made.
    #[serde(default = "default_max_finished_jobs")]
    pub max_finished_jobs: usize,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Longest header or body read timeout accepted (a day).
const MAX_TIMEOUT_SECS: u64 = 86_400;

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

fn default_max_connections() -> usize {
    512
}

fn default_header_read_timeout() -> u64 {
    10
}

fn default_body_read_timeout() -> u64 {
    60
}

/// 50 megapixels: more than any phone camera's photo, and ~150 MB once decoded to RGB.
fn default_max_input_pixels() -> u64 {
    50_000_000
}

/// Ten minutes: longer than any single denoising step, VAE decode or first-shape torch.compile
/// measured (a Wan2.1-14B 720p step with CFG takes well under a minute on an H100), so only a hang
/// trips it.
fn default_stall_timeout() -> u64 {
    600
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
            max_connections: default_max_connections(),
            header_read_timeout_secs: default_header_read_timeout(),
            body_read_timeout_secs: default_body_read_timeout(),
            max_input_pixels: default_max_input_pixels(),
            stall_timeout_secs: default_stall_timeout(),
            log_format: LogFormat::default(),
            max_finished_jobs: default_max_finished_jobs(),
        }
    }
}

impl ServerConfig {
    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.max_body_mb.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_secs)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_secs)
    }

    /// Refuses settings the server cannot start with, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--max-body-mb", self.max_body_mb),
            ("--max-connections", self.max_connections as u64),
            ("--header-read-timeout", self.header_read_timeout_secs),
            ("--body-read-timeout", self.body_read_timeout_secs),
            ("--max-input-pixels", self.max_input_pixels),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError(format!("{flag} must be at least 1")));
        }
        // Deadlines are added to the clock: a day is longer than any client should take, and far
        // from where the addition would overflow.
        for (flag, secs) in [
            ("--header-read-timeout", self.header_read_timeout_secs),
            ("--body-read-timeout", self.body_read_timeout_secs),
        ] {
            if secs > MAX_TIMEOUT_SECS {
                return Err(ConfigError(format!("{flag} must be at most {MAX_TIMEOUT_SECS} seconds, got {secs}")));
            }
        }
        for origin in &self.cors_origins {
            cors_origin(origin)?;
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError(format!("--public-url must start with http:// or https://, got {url:?}")));
            }
        }
        Ok(())
    }
}

/// A server setting the server cannot start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One `--cors-origin`: `*` (any origin) or a `scheme://host[:port]` origin as browsers send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigin {
    Any,
    Exact(axum::http::HeaderValue),
}

pub fn cors_origin(origin: &str) -> Result<CorsOrigin, ConfigError> {
    if origin == "*" {
        return Ok(CorsOrigin::Any);
    }
    let invalid = || {
        ConfigError(format!(
            "--cors-origin {origin:?} is not an origin: expected * or scheme://host[:port] (e.g. https://app.example.com), \
             without a path"
        ))
    };
    let uri: axum::http::Uri = origin.parse().map_err(|_| invalid())?;
    let bare = uri.scheme().is_some()
        && uri.authority().is_some_and(|a| !a.as_str().contains('@'))
        && uri.path_and_query().is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/")
        && !origin.ends_with('/');
    if !bare {
        return Err(invalid());
    }
    origin.parse().map(CorsOrigin::Exact).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cors_origins_are_star_or_bare_origins() {
        assert_eq!(cors_origin("*"), Ok(CorsOrigin::Any));
        for good in ["http://example.com", "https://app.example.com:8443", "http://[::1]:3000"] {
            assert!(matches!(cors_origin(good), Ok(CorsOrigin::Exact(_))), "{good}");
        }
        for bad in ["", "example.com", "http://example.com/", "http://example.com/app", "http://u@example.com", "a b"] {
            let err = cors_origin(bad).unwrap_err();
            assert!(err.0.contains("--cors-origin"), "{bad}: {err}");
        }
    }

    #[test]
    fn settings_the_server_cannot_run_with_are_refused_by_flag() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let star = ServerConfig { cors_origins: vec!["*".into(), "https://a.example".into()], ..Default::default() };
        assert_eq!(star.validate(), Ok(()));
        let cases = [
            (ServerConfig { max_connections: 0, ..Default::default() }, "--max-connections"),
            (ServerConfig { header_read_timeout_secs: 0, ..Default::default() }, "--header-read-timeout"),
            (ServerConfig { body_read_timeout_secs: 0, ..Default::default() }, "--body-read-timeout"),
            (ServerConfig { header_read_timeout_secs: u64::MAX, ..Default::default() }, "--header-read-timeout"),
            (ServerConfig { max_input_pixels: 0, ..Default::default() }, "--max-input-pixels"),
            (ServerConfig { cors_origins: vec!["example.com".into()], ..Default::default() }, "--cors-origin"),
            (ServerConfig { public_url: Some("images.example".into()), ..Default::default() }, "--public-url"),
        ];
        for (config, flag) in cases {
            assert!(config.validate().unwrap_err().0.contains(flag), "{flag}");
        }
    }
}
