//! LoRA management, as SGLang Diffusion serves it: `POST /v1/set_lora`, `/v1/merge_lora_weights`,
//! `/v1/unmerge_lora_weights`, `GET /v1/list_loras`. Each command runs on the engine's worker between two
//! batches (never inside one), behind the API key like every route but `/health`; a bad adapter is a 400
//! naming the field (and the key at fault), with the served model untouched.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sgl_core::lora::{LoraCommand, LoraState, MergeLoraRequest, SetLoraRequest, UnmergeLoraRequest};

use crate::error::ApiError;
use crate::routes::images::{has_media_type, parse_json, read_bytes};
use crate::state::SharedState;
use crate::wire::{ErrorBody, LoraResponse};

/// The body as `T`; an empty body is `{}` (merge and unmerge default to every target).
async fn read_body<T: DeserializeOwned>(state: &SharedState, headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    let bytes = read_bytes(state, body).await?;
    let value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Object(serde_json::Map::new())
    } else if !has_media_type(headers, "application/json") {
        return Err(ApiError::unsupported_media_type("application/json"));
    } else {
        parse_json(&bytes)?
    };
    serde_json::from_value(value).map_err(|err| ApiError::bad_request(format!("invalid LoRA request: {err}")))
}

/// Runs `command` on the engine's worker (a blocking wait, off the async workers).
async fn run(state: &SharedState, command: LoraCommand) -> Result<LoraState, ApiError> {
    let engine = state.engine()?;
    let json = serde_json::to_string(&command).map_err(|e| ApiError::internal(e.to_string()))?;
    let answer = tokio::task::spawn_blocking(move || engine.control(json))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::from_exec(&e))?;
    serde_json::from_str(&answer)
        .map_err(|e| ApiError::internal(format!("the engine answered malformed LoRA state: {e}")))
}

fn answered(message: String, state: LoraState) -> Json<LoraResponse> {
    Json(LoraResponse { status: "ok", message, state })
}

/// Loads LoRA adapters (or re-activates cached nicknames) and merges them in order, replacing what the
/// targets had merged.
#[utoipa::path(post, path = "/v1/set_lora", tag = "lora", request_body = SetLoraRequest,
    responses((status = 200, body = LoraResponse), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn set_lora(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LoraResponse>, ApiError> {
    state.engine()?;
    let request: SetLoraRequest = read_body(&state, &headers, body).await?;
    let adapters = request.assignments().map_err(|e| ApiError::from_validation(&e))?;
    let names: Vec<&str> = adapters.iter().map(|adapter| adapter.nickname.as_str()).collect();
    let message = format!("set LoRA adapter(s): {}", names.join(", "));
    Ok(answered(message, run(&state, LoraCommand::Set { adapters }).await?))
}

/// Merges the targets' adapters again after an unmerge.
#[utoipa::path(post, path = "/v1/merge_lora_weights", tag = "lora", request_body = MergeLoraRequest,
    responses((status = 200, body = LoraResponse), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn merge_lora_weights(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LoraResponse>, ApiError> {
    state.engine()?;
    let request: MergeLoraRequest = read_body(&state, &headers, body).await?;
    let command = LoraCommand::merge(&request).map_err(|e| ApiError::from_validation(&e))?;
    Ok(answered("merged the LoRA weights".into(), run(&state, command).await?))
}

/// Restores the targets' base weights exactly; their adapters stay set.
#[utoipa::path(post, path = "/v1/unmerge_lora_weights", tag = "lora", request_body = UnmergeLoraRequest,
    responses((status = 200, body = LoraResponse), (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn unmerge_lora_weights(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<LoraResponse>, ApiError> {
    state.engine()?;
    let request: UnmergeLoraRequest = read_body(&state, &headers, body).await?;
    let command = LoraCommand::unmerge(&request).map_err(|e| ApiError::from_validation(&e))?;
    Ok(answered("unmerged the LoRA weights".into(), run(&state, command).await?))
}

/// The adapters loaded, and those set on each denoiser (merged or not, at which strength).
#[utoipa::path(get, path = "/v1/list_loras", tag = "lora",
    responses((status = 200, body = LoraState), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn list_loras(State(state): State<SharedState>) -> Result<Json<LoraState>, ApiError> {
    Ok(Json(run(&state, LoraCommand::List).await?))
}
