use axum::extract::State;
use axum::Json;
use sgl_core::PipelineInfo;
use sgl_scheduler::Engine;

use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::{AppState, SharedState};
use crate::wire::{ErrorBody, ModelCard, ModelList, ServedModelInfo};

/// SGLang Diffusion's task code for a pipeline's task: the initials of the inputs, `2`, the initials of the
/// outputs (`text-to-image` → `T2I`, `text-image-to-video` → `TI2V`). A task without `-to-` is upper-cased.
fn sglang_task_type(task: &str) -> String {
    let initials = |words: &str| -> String {
        words.split('-').filter_map(|word| word.chars().next()).flat_map(char::to_uppercase).collect()
    };
    match task.split_once("-to-") {
        Some((inputs, outputs)) => format!("{}2{}", initials(inputs), initials(outputs)),
        None => task.to_uppercase(),
    }
}

/// SGLang Diffusion's pipeline name: the pipeline class in snake case (`FluxPipeline` → `flux_pipeline`,
/// `WanDMDPipeline` → `wan_dmd_pipeline`).
fn sglang_pipeline_name(pipeline_class: &str) -> String {
    let chars: Vec<char> = pipeline_class.chars().collect();
    let mut name = String::with_capacity(chars.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_uppercase() && i > 0 {
            let previous_lower = chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit();
            let next_lower = chars.get(i + 1).is_some_and(|next| next.is_lowercase());
            // A new word starts at `aB`, and at the last capital of a run followed by lower case (`DMDPipeline`).
            if previous_lower || (chars[i - 1].is_uppercase() && next_lower) {
                name.push('_');
            }
        }
        name.extend(c.to_lowercase());
    }
    name
}

fn card(state: &AppState, engine: &Engine, id: String) -> ModelCard {
    let info = engine.info();
    ModelCard {
        id,
        object: "model",
        created: state.started_at,
        owned_by: "sgl-diffusion",
        root: info.model_path.clone(),
        task_type: sglang_task_type(&info.task),
        pipeline_name: sglang_pipeline_name(&info.pipeline_class),
        pipeline_class: info.pipeline_class.clone(),
        task: info.task.clone(),
        family: info.family.clone(),
        num_gpus: 1,
        dit_precision: info.dit_precision.clone(),
        vae_precision: info.vae_precision.clone(),
    }
}

fn served_model_info(model_path: String, info: &PipelineInfo) -> ServedModelInfo {
    ServedModelInfo {
        model_path,
        task_type: sglang_task_type(&info.task),
        pipeline_name: sglang_pipeline_name(&info.pipeline_class),
        pipeline_class: info.pipeline_class.clone(),
        task: info.task.clone(),
        family: info.family.clone(),
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

/// The served model in the shape SGLang Diffusion documents (`task_type` like `T2V`, `pipeline_name` like
/// `wan_pipeline`), plus `task` and `family` in our own words.
#[utoipa::path(get, path = "/models", tag = "models",
    responses((status = 200, body = ServedModelInfo), (status = 503, body = ErrorBody)))]
pub(crate) async fn served_model(State(state): State<SharedState>) -> Result<Json<ServedModelInfo>, ApiError> {
    let engine = state.engine()?;
    let info = engine.info();
    let model_path = state.config.model_path.clone().unwrap_or_else(|| info.model_path.clone());
    Ok(Json(served_model_info(model_path, info)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_types_in_sglang_spelling() {
        let cases = [
            ("text-to-image", "T2I"),
            ("text-to-video", "T2V"),
            ("image-to-video", "I2V"),
            ("text-image-to-video", "TI2V"),
            ("image-to-image", "I2I"),
            ("upscale", "UPSCALE"),
        ];
        for (task, code) in cases {
            assert_eq!(sglang_task_type(task), code, "{task}");
        }
    }

    #[test]
    fn pipeline_names_in_sglang_spelling() {
        let cases = [
            ("FluxPipeline", "flux_pipeline"),
            ("WanPipeline", "wan_pipeline"),
            ("WanImageToVideoPipeline", "wan_image_to_video_pipeline"),
            ("WanDMDPipeline", "wan_dmd_pipeline"),
            ("Flux2Pipeline", "flux2_pipeline"),
            ("QwenImagePipeline", "qwen_image_pipeline"),
        ];
        for (class, name) in cases {
            assert_eq!(sglang_pipeline_name(class), name, "{class}");
        }
    }
}
