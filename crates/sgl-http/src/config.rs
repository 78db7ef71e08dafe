use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sgl_core::declare_fields;
use sgl_core::fields::{check_bounds, FieldValue, ValueType};

declare_fields! {
    /// The server's own settings (flags of `sgl-diffusion serve` and the native binary, which both
    /// derive them from this table); the model's are `sgl_bridge::ModelConfig`. A setting left out
    /// takes its value from `Default`, which is also the default `--help` shows.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct ServerConfig {
        /// Address to bind.
        pub host: String,
        /// Port to listen on (0: any free port).
        pub port: u16,
        /// Require `Authorization: Bearer <key>` on every route but /health, content downloads
        /// included (keys never travel in URLs, where logs and referrers would keep them).
        pub api_key: Option<String>,
        /// Largest request body accepted, in MiB.
        pub max_body_mb: u64 [.min(1)],
        /// Allow this browser origin (scheme://host[:port]), or * for any; repeatable; default: CORS
        /// off.
        pub cors_origins: Vec<String> [.flag("--cors-origin").repeat()],
        /// Base of absolute url outputs (e.g. https://images.example.com); default: the request's
        /// Host.
        pub public_url: Option<String>,
        /// Seconds url outputs stay downloadable; their files are deleted afterwards.
        pub output_ttl_secs: u64 [.flag("--output-ttl")],
        /// Where url outputs and video jobs are stored; default: `sgl-diffusion-outputs-<port>`
        /// under the system temp dir.
        pub output_dir: Option<PathBuf>,
        /// Extra name the model answers to, e.g. dall-e-3 (repeatable); it also answers to its path
        /// and Hugging Face id.
        pub served_model_names: Vec<String> [.flag("--served-model-name").repeat()],
        /// The model path as the user gave it (a folder or a Hugging Face id), also a served name;
        /// taken from `--model-path`.
        pub model_path: Option<String> [.no_flag()],
        /// Seconds a /health_generate result is reused; also how recent a completed request must be
        /// for /health_generate to answer from it without a probe.
        pub health_generate_ttl_secs: u64 [.flag("--health-generate-ttl")],
        /// Connections served at once; further ones wait in the listen backlog until one closes.
        pub max_connections: usize [.min(1)],
        /// Seconds a client has to send a request's headers (also how long an idle keep-alive
        /// connection stays open); then the connection is closed.
        pub header_read_timeout_secs: u64 [.flag("--header-read-timeout").min(1).max(MAX_TIMEOUT_SECS as i64)],
        /// Seconds a client has to send a request's body once its headers arrived (408 after).
        pub body_read_timeout_secs: u64 [.flag("--body-read-timeout").min(1).max(MAX_TIMEOUT_SECS as i64)],
        /// Largest input image (input_reference, image edits' images), in pixels, read from its header
        /// before it is decoded.
        pub max_input_pixels: u64 [.min(1)],
        /// Fetch http(s) image URLs sent as `url` to /v1/images/edits (GET, each at most --max-body-mb,
        /// within --remote-url-timeout); off: images come as uploads or data: URLs only, and the server
        /// never reaches out to the network for a client.
        pub allow_remote_urls: bool,
        /// Seconds one remote image fetch (--allow-remote-urls) may take, connecting to last byte.
        pub remote_url_timeout_secs: u64 [.flag("--remote-url-timeout").min(1).max(MAX_TIMEOUT_SECS as i64)],
        /// /health answers 503 once a running batch has shown no progress (no denoising step, no
        /// start or end) for this many seconds.
        pub stall_timeout_secs: u64 [.flag("--stall-timeout").min(1)],
        /// Log lines as text or one JSON object per line; the filter is SGL_DIFFUSION_LOG or RUST_LOG
        /// (default info).
        pub log_format: LogFormat,
        /// Finished video jobs kept with their files; beyond it those closest to expiring are deleted
        /// first, so that records and disk stay bounded however fast jobs are made.
        pub max_finished_jobs: usize [.min(1)],
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FieldValue for LogFormat {
    const TYPE: ValueType = ValueType::choice(&["text", "json"]);
}

/// Longest header or body read timeout accepted (a day). Deadlines are added to the clock: a day is
/// longer than any client should take, and far from where the addition would overflow.
const MAX_TIMEOUT_SECS: u64 = 86_400;

/// 50 megapixels: more than any phone camera's photo, and ~150 MB once decoded to RGB.
const DEFAULT_MAX_INPUT_PIXELS: u64 = 50_000_000;

/// Ten minutes: longer than any single denoising step, VAE decode or first-shape torch.compile
/// measured (a Wan2.1-14B 720p step with CFG takes well under a minute on an H100), so only a hang
/// trips it.
const DEFAULT_STALL_TIMEOUT_SECS: u64 = 600;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 30000,
            api_key: None,
            max_body_mb: 16,
            cors_origins: Vec::new(),
            public_url: None,
            output_ttl_secs: 3600,
            output_dir: None,
            served_model_names: Vec::new(),
            model_path: None,
            health_generate_ttl_secs: 10,
            max_connections: 512,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 60,
            max_input_pixels: DEFAULT_MAX_INPUT_PIXELS,
            allow_remote_urls: false,
            remote_url_timeout_secs: 30,
            stall_timeout_secs: DEFAULT_STALL_TIMEOUT_SECS,
            log_format: LogFormat::default(),
            max_finished_jobs: crate::jobs::DEFAULT_MAX_FINISHED,
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

    pub fn remote_url_timeout(&self) -> Duration {
        Duration::from_secs(self.remote_url_timeout_secs)
    }

    /// Refuses settings the server cannot start with, naming the flag: the bounds each field
    /// declares, then what no bound can say.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_bounds(self).map_err(|err| ConfigError(err.0))?;
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
            (ServerConfig { remote_url_timeout_secs: 0, ..Default::default() }, "--remote-url-timeout"),
            (ServerConfig { cors_origins: vec!["example.com".into()], ..Default::default() }, "--cors-origin"),
            (ServerConfig { public_url: Some("images.example".into()), ..Default::default() }, "--public-url"),
        ];
        for (config, flag) in cases {
            assert!(config.validate().unwrap_err().0.contains(flag), "{flag}");
        }
    }
}
