use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sgl_core::GenerationRequest;

use crate::generation::run_to_completion;
use crate::state::SharedState;
use crate::wire::HealthStatus;

fn status(code: StatusCode, status: &str, detail: Option<String>) -> (StatusCode, Json<HealthStatus>) {
    (code, Json(HealthStatus { status: status.into(), detail }))
}

/// 200 once the model is loaded and its worker alive; 503 while loading, after the worker died,
/// or while shutting down.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = HealthStatus), (status = 503, body = HealthStatus)))]
pub(crate) async fn health(State(state): State<SharedState>) -> (StatusCode, Json<HealthStatus>) {
    if state.is_shutting_down() {
        return status(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None);
    }
    match state.engine() {
        Ok(_) => status(StatusCode::OK, "ok", None),
        Err(err) => status(StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(err.message)),
    }
}

/// Runs a tiny real generation (smallest size, one step) and answers 200 only if the pipeline
/// produced an output. The outcome is reused for `--health-generate-ttl` seconds.
#[utoipa::path(get, path = "/health_generate", tag = "health",
    responses((status = 200, body = HealthStatus), (status = 503, body = HealthStatus)))]
pub(crate) async fn health_generate(State(state): State<SharedState>) -> (StatusCode, Json<HealthStatus>) {
    let engine = match state.engine() {
        Ok(engine) => engine,
        Err(err) => return status(StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(err.message)),
    };
    let ttl = Duration::from_secs(state.config.health_generate_ttl_secs);
    let mut probe = state.health_probe.lock().await;
    let fresh = probe.as_ref().filter(|(at, _)| at.elapsed() < ttl).map(|(_, outcome)| outcome.clone());
    let outcome = match fresh {
        Some(outcome) => outcome,
        None => {
            let limits = &engine.info().limits;
            let request = GenerationRequest {
                prompt: "health check".into(),
                width: Some(limits.min_size),
                height: Some(limits.min_size),
                num_inference_steps: Some(1),
                seed: Some(0),
                max_sequence_length: Some(limits.max_sequence_length.min(16)),
                ..Default::default()
            };
            let outcome = match run_to_completion(&engine, &request).await {
                Ok(output) if output.outputs.iter().any(|o| !o.bytes.is_empty()) => Ok(()),
                Ok(_) => Err("the pipeline returned no output".to_string()),
                Err(err) => Err(err.message),
            };
            *probe = Some((Instant::now(), outcome.clone()));
            outcome
        }
    };
    match outcome {
        Ok(()) => status(StatusCode::OK, "ok", None),
        Err(reason) => status(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", Some(reason)),
    }
}
