use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sgl_scheduler::Engine;

use crate::error::ApiError;
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::outputs::OutputStore;
use crate::ServerConfig;

/// Where the model is in its life; routes that need it answer 503 unless it is `Ready`.
pub enum EngineState {
    Loading,
    Ready(Arc<Engine>),
    Failed(String),
}

pub struct AppState {
    pub config: ServerConfig,
    pub engine: RwLock<EngineState>,
    pub outputs: OutputStore,
    /// Video jobs; `None` only if its folder could not be opened (video routes then answer 503).
    pub jobs: Option<Arc<JobStore>>,
    pub metrics: Metrics,
    pub shutting_down: AtomicBool,
    /// The last `/health_generate` outcome and when it was measured.
    pub health_probe: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
    pub started_at: u64,
    /// Background tasks that must finish before the process exits (one per video job): a graceful
    /// shutdown waits for them.
    pub tasks: tokio_util::task::TaskTracker,
}

impl AppState {
    pub fn new(config: ServerConfig, outputs: OutputStore, jobs: Option<Arc<JobStore>>, metrics: Metrics) -> Self {
        Self {
            config,
            engine: RwLock::new(EngineState::Loading),
            outputs,
            jobs,
            metrics,
            shutting_down: AtomicBool::new(false),
            health_probe: tokio::sync::Mutex::new(None),
            started_at: unix_now(),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    pub fn set_engine(&self, state: EngineState) {
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// The loaded engine, if any (also while shutting down, to drain it).
    pub fn loaded_engine(&self) -> Option<Arc<Engine>> {
        match &*self.engine.read().unwrap_or_else(|p| p.into_inner()) {
            EngineState::Ready(engine) => Some(Arc::clone(engine)),
            _ => None,
        }
    }

    /// The engine for a request that needs the model, or the 503 that explains why not.
    pub fn engine(&self) -> Result<Arc<Engine>, ApiError> {
        if self.is_shutting_down() {
            return Err(ApiError::not_ready("the server is shutting down"));
        }
        match &*self.engine.read().unwrap_or_else(|p| p.into_inner()) {
            EngineState::Ready(engine) if !engine.is_alive() => {
                Err(ApiError::not_ready("the model worker has stopped"))
            }
            // Every later request would fail the same way: say so at once, as /health does.
            EngineState::Ready(engine) => match engine.stats().device_failure() {
                Some(reason) => Err(ApiError::not_ready(format!("the device failed; restart the server: {reason}"))),
                None => Ok(Arc::clone(engine)),
            },
            EngineState::Loading => Err(ApiError::not_ready("the model is still loading")),
            EngineState::Failed(reason) => Err(ApiError::not_ready(format!("the model failed to load: {reason}"))),
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Every name the served model answers to: aliases, the Hugging Face id, the path as given and
    /// the resolved folder. The first is the model's id in `/v1/models`.
    pub fn model_names(&self, engine: &Engine) -> Vec<String> {
        let info = engine.info();
        let mut names: Vec<String> = self.config.served_model_names.clone();
        names.extend(info.hf_id.clone());
        names.extend(self.config.model_path.clone());
        names.push(info.model_path.clone());
        let mut unique = Vec::with_capacity(names.len());
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        unique
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub type SharedState = Arc<AppState>;
