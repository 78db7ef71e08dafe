use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use sgl_core::GenerationRequest;
use sgl_scheduler::{Engine, SubmitOptions};

use crate::generation::await_result;
use crate::state::SharedState;
use crate::wire::HealthStatus;

fn status(code: StatusCode, status: &str, detail: Option<String>) -> (StatusCode, Json<HealthStatus>) {
    (code, Json(HealthStatus { status: status.into(), detail }))
}

/// Why the executor counts as hung: a batch running with no progress for `--stall-timeout`.
fn stall(state: &SharedState, engine: &Engine) -> Option<String> {
    let limit = Duration::from_secs(state.config.stall_timeout_secs);
    let stalled = engine.stats().stalled_for().filter(|stalled| *stalled >= limit)?;
    let reason = format!(
        "the executor has made no progress for {} s while running a batch (--stall-timeout {} s)",
        stalled.as_secs(),
        limit.as_secs()
    );
    tracing::error!(stalled_s = stalled.as_secs(), "{reason}");
    Some(reason)
}

/// Liveness: 200 while the model is loaded and its executor alive and making progress; 503 while
/// loading, after the worker died or the device failed beyond recovery, when a running batch has
/// made no progress for `--stall-timeout` seconds, and while shutting down. Never queues.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = HealthStatus), (status = 503, body = HealthStatus)))]
pub(crate) async fn health(State(state): State<SharedState>) -> (StatusCode, Json<HealthStatus>) {
    if state.is_shutting_down() {
        return status(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None);
    }
    match state.engine() {
        Ok(engine) => match stall(&state, &engine) {
            Some(reason) => status(StatusCode::SERVICE_UNAVAILABLE, "stalled", Some(reason)),
            None => status(StatusCode::OK, "ok", None),
        },
        Err(err) => status(StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(err.message)),
    }
}

/// Readiness, without waiting behind user work: 200 when a request completed within
/// `--health-generate-ttl` seconds, or while the executor is busy and making progress (a full
/// queue is a busy server, not a sick one); otherwise (idle, nothing completed lately) a tiny real
/// generation (smallest size, one step) that runs ahead of the queue, reused for the same TTL.
/// 503 when not live (see `/health`) or when the probe fails.
#[utoipa::path(get, path = "/health_generate", tag = "health",
    responses((status = 200, body = HealthStatus), (status = 503, body = HealthStatus)))]
pub(crate) async fn health_generate(State(state): State<SharedState>) -> (StatusCode, Json<HealthStatus>) {
    let engine = match state.engine() {
        Ok(engine) => engine,
        Err(err) => return status(StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(err.message)),
    };
    if let Some(reason) = stall(&state, &engine) {
        return status(StatusCode::SERVICE_UNAVAILABLE, "stalled", Some(reason));
    }
    let ttl = Duration::from_secs(state.config.health_generate_ttl_secs);
    if let Some(ago) = engine.stats().since_last_success().filter(|ago| *ago < ttl) {
        let detail = format!("a request completed {:.1} s ago", ago.as_secs_f64());
        return status(StatusCode::OK, "ok", Some(detail));
    }
    let queued = engine.queue().depth();
    if engine.stats().is_busy() || queued > 0 {
        let detail = format!("the executor is running a batch and making progress; {queued} requests queued");
        return status(StatusCode::OK, "busy", Some(detail));
    }
    let mut probe = state.health_probe.lock().await;
    let fresh = probe.as_ref().filter(|(at, _)| at.elapsed() < ttl).map(|(_, outcome)| outcome.clone());
    let outcome = match fresh {
        Some(outcome) => outcome,
        None => {
            let outcome = run_probe(&engine, Duration::from_secs(state.config.stall_timeout_secs)).await;
            *probe = Some((Instant::now(), outcome.clone()));
            outcome
        }
    };
    match outcome {
        Ok(()) => status(StatusCode::OK, "ok", None),
        Err(reason) => status(StatusCode::SERVICE_UNAVAILABLE, "unhealthy", Some(reason)),
    }
}

/// One tiny generation, ahead of any queued work and beyond the queue's capacity.
async fn run_probe(engine: &Engine, limit: Duration) -> Result<(), String> {
    if engine.info().image_input == sgl_core::ImageInput::Required {
        // Nothing to generate from without an input image: liveness is all that can be checked.
        return Ok(());
    }
    let limits = &engine.info().limits;
    // The smallest request the model takes: its least size, one frame (a video model's default
    // clip would decode 81 frames), one step.
    let request = GenerationRequest {
        prompt: "health check".into(),
        width: Some(limits.min_size),
        height: Some(limits.min_size),
        num_frames: Some(1),
        num_inference_steps: Some(1),
        seed: Some(0),
        max_sequence_length: Some(limits.max_sequence_length.min(16)),
        ..Default::default()
    };
    let options = SubmitOptions { request_id: Some("health-probe".into()), priority: true };
    let handle = engine.submit_with(&request, options).map_err(|err| err.to_string())?;
    // Dropping the wait on timeout cancels the probe.
    match tokio::time::timeout(limit, await_result(&handle)).await {
        Ok(Ok(output)) if output.outputs.iter().any(|o| !o.bytes.is_empty()) => Ok(()),
        Ok(Ok(_)) => Err("the pipeline returned no output".to_string()),
        Ok(Err(err)) => Err(err.message),
        Err(_) => Err(format!("the probe did not finish within {} s", limit.as_secs())),
    }
}
