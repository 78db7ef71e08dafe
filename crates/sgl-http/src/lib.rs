//! The OpenAI-compatible HTTP server (axum) in front of the scheduler.
//!
//! The server binds its port first and answers `/health` with 503 while the model loads on the
//! engine's own thread. Handlers validate requests, submit them to the scheduler and await its
//! events; they never call Python. On SIGINT/SIGTERM it stops taking work (503), lets queued and
//! running requests finish, waits for every video job to store its outcome, and returns.

mod auth;
mod config;
mod connections;
mod durable;
mod error;
mod extract;
mod generation;
mod jobs;
mod logging;
mod metrics;
mod openapi;
mod outputs;
mod route_body;
mod routes;
mod state;
mod unread_body;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use sgl_scheduler::Engine;
use tokio::net::TcpListener;

pub use config::{LogFormat, ServerConfig};
pub use error::ApiError;
pub use logging::{init_logging, LOG_ENV_VARS};
pub use openapi::openapi_json;
pub use route_body::{RouteBody, RouteFields};
pub use wire::*;

use crate::jobs::JobStore;
use crate::outputs::OutputStore;
use crate::state::{AppState, EngineState};

/// How often expired outputs are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid server setting: {0}")]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("cannot create the output folder {dir}: {source}")]
    OutputDir { dir: String, source: std::io::Error },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the model failed to load: {0}")]
    Load(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// Loads the model (blocking; run on a thread of its own) and returns the engine.
pub type EngineLoader = Box<dyn FnOnce() -> Result<Engine, String> + Send + 'static>;

/// Runs the server until SIGINT/SIGTERM, then drains the engine and returns. Builds its own tokio
/// runtime, so callers need none (the Python binding calls this with the GIL released).
pub fn run(config: ServerConfig, load: EngineLoader) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("sgl-http").build()?;
    runtime.block_on(serve(config, load))
}

pub async fn serve(config: ServerConfig, load: EngineLoader) -> Result<(), ServeError> {
    config.validate()?;
    let address = format!("{}:{}", config.host, config.port);
    let listener =
        TcpListener::bind(&address).await.map_err(|source| ServeError::Bind { address: address.clone(), source })?;
    // One server per output folder (each takes over and expires what the folder holds), so the
    // default folder is per port: two servers on one machine never share it.
    let output_dir = config
        .output_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("sgl-diffusion-outputs-{}", config.port)));
    let ttl = Duration::from_secs(config.output_ttl_secs);
    let max_finished = config.max_finished_jobs;
    // Both stores read (and repair) what an earlier run left: blocking I/O, off the async workers.
    let opened = tokio::task::spawn_blocking(move || {
        let outputs = OutputStore::open(output_dir.clone(), ttl)
            .map_err(|source| ServeError::OutputDir { dir: output_dir.display().to_string(), source })?;
        let jobs = JobStore::open(output_dir.join("videos"), ttl, max_finished);
        Ok::<_, ServeError>((outputs, jobs))
    })
    .await
    .map_err(|err| ServeError::Io(std::io::Error::other(err)))?;
    let (outputs, jobs) = opened?;
    let (jobs, queued) = match jobs {
        Ok((store, queued)) => (Some(Arc::new(store)), queued),
        Err(err) => {
            tracing::error!("the video job store is unavailable: {err}");
            (None, Vec::new())
        }
    };
    let state = Arc::new(AppState::new(config, outputs, jobs, metrics::Metrics::new()?));
    let app = routes::router(Arc::clone(&state));
    tracing::info!("listening on http://{address} (model loading)");

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<String>();
    let loader_state = Arc::clone(&state);
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || match load() {
        Ok(engine) => {
            tracing::info!("model ready ({})", engine.info().pipeline_class);
            let engine = Arc::new(engine);
            loader_state.set_engine(EngineState::Ready(Arc::clone(&engine)));
            // Jobs that were queued when the server last stopped run now, in their order (or at
            // the next start, if this one is already stopping).
            let _guard = runtime.enter();
            if !loader_state.is_shutting_down() {
                for id in &queued {
                    routes::resubmit(&loader_state, &engine, id);
                }
            }
        }
        Err(reason) => {
            tracing::error!("the model failed to load: {reason}");
            loader_state.set_engine(EngineState::Failed(reason.clone()));
            let _ = load_failed_tx.send(reason);
        }
    });

    let purge_state = Arc::clone(&state);
    let purger = tokio::spawn(async move {
        let mut ticker =
            tokio::time::interval(PURGE_INTERVAL.min(purge_state.outputs.ttl().max(Duration::from_secs(1))));
        loop {
            ticker.tick().await;
            purge_state.outputs.purge_expired().await;
            if let Some(jobs) = &purge_state.jobs {
                jobs.purge_expired().await;
            }
        }
    });

    let load_error = Arc::new(std::sync::Mutex::new(None));
    let shutdown_state = Arc::clone(&state);
    let shutdown_error = Arc::clone(&load_error);
    let shutdown = async move {
        tokio::select! {
            () = termination_signal() => tracing::info!("shutting down; finishing running requests"),
            Ok(reason) = load_failed_rx => {
                *shutdown_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
            }
        }
        shutdown_state.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(engine) = shutdown_state.loaded_engine() {
            // Closes the queue (new work gets 503) and waits for queued and running requests.
            let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        }
    };
    let limits = connections::ConnectionLimits {
        max_connections: state.config.max_connections,
        header_read_timeout: state.config.header_read_timeout(),
    };
    connections::serve_connections(listener, app, limits, shutdown).await;
    // The engine has drained: every job task has heard its request's end. Wait for them to store
    // their videos and records, then for the job store to write what is pending.
    state.tasks.close();
    state.tasks.wait().await;
    purger.abort();
    if let Some(jobs) = &state.jobs {
        jobs.close().await;
    }
    let failed = load_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    match failed {
        Some(reason) => Err(ServeError::Load(reason)),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

async fn termination_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
