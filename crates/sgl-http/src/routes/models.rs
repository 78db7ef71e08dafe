use axum::extract::State;
use axum::Json;
use sgl_scheduler::Engine;

use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::{AppState, SharedState};
use crate::wire::{ErrorBody, ModelCard, ModelList, ServedModelInfo};

fn card(state: &AppState, engine: &Engine, id: String) -> ModelCard {
    let info = engine.info();
    ModelCard {
        id,
        object: "model",
        created: state.started_at,
        owned_by: "sgl-diffusion",
        root: info.model_path.clone(),
        task_type: info.task.clone(),
        pipeline_class: info.pipeline_class.clone(),
        num_gpus: 1,
        dit_precision: info.dit_precision.clone(),
        vae_precision: info.vae_precision.clone(),
    }
}

/// The served model (one entry, under its primary name).
#[utoipa::path(get, path = "/v1/models", tag = "models",
    responses((status = 200, body = ModelList), (status = 503, body = ErrorBody)))]
pub(crate) async fn list_models(State(state): State<SharedState>) -> Result<Json<ModelList>, ApiError> {
    let engine = state.engine()?;
    let id = state.model_names(&engine).into_iter().next().unwrap_or_default();
    Ok(Json(ModelList { object: "list", data: vec![card(&state, &engine, id)] }))
}

/// The model card of `model`, which may be any name the model answers to (slashes allowed).
#[utoipa::path(get, path = "/v1/models/{model}", tag = "models",
    params(("model" = String, Path, description = "Model id, path, Hugging Face id or alias")),
    responses((status = 200, body = ModelCard), (status = 404, body = ErrorBody)))]
pub(crate) async fn get_model(
    State(state): State<SharedState>,
    ApiPath(model): ApiPath<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let engine = state.engine()?;
    let names = state.model_names(&engine);
    if !names.contains(&model) {
        return Err(ApiError::model_not_found(&model, &names));
    }
    Ok(Json(card(&state, &engine, model)))
}

/// The served model in the shape SGLang Diffusion documents.
#[utoipa::path(get, path = "/models", tag = "models",
    responses((status = 200, body = ServedModelInfo), (status = 503, body = ErrorBody)))]
pub(crate) async fn served_model(State(state): State<SharedState>) -> Result<Json<ServedModelInfo>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    Ok(Json(ServedModelInfo {
        model_path: state.config.model_path.clone().unwrap_or_else(|| info.model_path.clone()),
        task_type: info.task.clone(),
        pipeline_name: info.family.clone(),
        pipeline_class: info.pipeline_class.clone(),
        num_gpus: 1,
        dit_precision: info.dit_precision.clone(),
        vae_precision: info.vae_precision.clone(),
    }))
}
