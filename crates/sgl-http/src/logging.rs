//! The process's log subscriber: every `tracing` event of the server, the scheduler and the
//! bridge goes to stderr, filtered by `SGL_DIFFUSION_LOG` (else `RUST_LOG`, else `info`), as text
//! or as one JSON object per line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The environment variables read for the filter, first found wins.
pub const LOG_ENV_VARS: [&str; 2] = ["SGL_DIFFUSION_LOG", "RUST_LOG"];
const DEFAULT_FILTER: &str = "info";

/// Installs the subscriber. A second call (a second server in one process) keeps the first.
pub fn init_logging(format: LogFormat) {
    let (filter, problem) = filter_from_env();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        // Span fields (the request id) flattened into each line's `span`/`spans` objects.
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).try_init(),
    };
    if installed.is_ok() {
        if let Some(problem) = problem {
            tracing::warn!("{problem}; logging at `{DEFAULT_FILTER}`");
        }
    }
}

/// The filter from the first variable set, or the default (and why, if a variable was unusable).
fn filter_from_env() -> (EnvFilter, Option<String>) {
    for name in LOG_ENV_VARS {
        if let Ok(value) = std::env::var(name) {
            return match EnvFilter::try_new(&value) {
                Ok(filter) => (filter, None),
                Err(err) => {
                    (EnvFilter::new(DEFAULT_FILTER), Some(format!("{name}={value:?} is not a valid filter: {err}")))
                }
            };
        }
    }
    (EnvFilter::new(DEFAULT_FILTER), None)
}
