//! `POST /v1/images/edits` (OpenAI Images API): the generations route with input images. The form's
//! text parts are exactly the generations body; its images are stored in a folder of the request's
//! own, passed to the engine as `image_paths` in the order sent, and removed when the request ends.

use std::path::{Path, PathBuf};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::Uri;
use axum::Json;
use sgl_core::{ImageInput, OutputKind, PipelineInfo};

use crate::error::ApiError;
use crate::routes::form::{read_form, ImagePart, ImageValue, PartRole};
use crate::routes::images::{generate, has_media_type, makes_videos, prepare, ImageCall};
use crate::routes::input_image::{decode_data_url, fetch_remote, image_extension, is_remote_url};
use crate::state::SharedState;
use crate::wire::{ImageEditRequest, ImageFields, ImageGenerationResponse, ImageRouteResponses, EDIT_IMAGE_PARTS};

/// The field errors about input images name (however many parts carried them).
const IMAGE: &str = "image";
/// OpenAI's inpainting mask.
const MASK: &str = "mask";

/// Edits a model cannot serve are refused before the body is read: a video model, or an image model
/// that takes no input image (text-to-image).
fn check_model(info: &PipelineInfo) -> Result<(), ApiError> {
    if info.output != OutputKind::Image {
        return Err(makes_videos(info));
    }
    if info.image_input == ImageInput::None {
        return Err(ApiError::invalid(
            "model",
            format!(
                "the served model ({}) is {} and does not edit images; use /v1/images/generations",
                info.pipeline_class, info.task
            ),
        ));
    }
    Ok(())
}

/// A part's role by its name; a mask is refused as soon as its headers arrive, never ignored.
fn part_role(name: &str, info: &PipelineInfo) -> Result<PartRole, ApiError> {
    if EDIT_IMAGE_PARTS.iter().any(|part| part.name == name) {
        return Ok(PartRole::Image);
    }
    if name.trim_end_matches("[]") == MASK {
        return Err(ApiError::invalid(
            MASK,
            format!(
                "the served model ({}) does not inpaint, so a mask cannot be honoured; send the image(s) and \
                 a prompt without a mask",
                info.pipeline_class
            ),
        ));
    }
    Ok(PartRole::Field)
}

/// Edits images (OpenAI Images API): one or more input images and a prompt. The answer is that of
/// `/v1/images/generations`.
#[utoipa::path(post, path = "/v1/images/edits", tag = "images",
    request_body(content = ImageEditRequest, content_type = "multipart/form-data"),
    responses(ImageRouteResponses),
    security(("bearer" = [])))]
pub(crate) async fn edit_image(
    State(state): State<SharedState>,
    uri: Uri,
    request: Request,
) -> Result<Json<ImageGenerationResponse>, ApiError> {
    let started = Instant::now();
    // What needs no body first: a server that cannot take the request does not read it.
    let engine = state.engine()?;
    let info = engine.info();
    check_model(info)?;
    if !has_media_type(request.headers(), "multipart/form-data") {
        return Err(ApiError::unsupported_media_type("multipart/form-data"));
    }
    let headers = request.headers().clone();
    let (body, parts) = read_form::<ImageFields>(&state, request, |name| part_role(name, info)).await?;
    let (mut generation, response_format) = prepare(&state, &engine, &body)?;
    // Removed when this request ends, answered or failed (or its client gone).
    let dir = tempfile::Builder::new()
        .prefix("sgl-edit-")
        .tempdir()
        .map_err(|e| ApiError::internal(format!("cannot make a folder for the input images: {e}")))?;
    generation.image_paths = Some(store_images(&state, info, parts, dir.path()).await?);
    let call = ImageCall { headers: &headers, uri: &uri, body: &body, started };
    let answer = generate(&state, &engine, call, generation, response_format).await;
    remove_dir(dir).await;
    answer
}

/// Removes the request's folder off the async threads (its images may be large).
async fn remove_dir(dir: tempfile::TempDir) {
    let _ = tokio::task::spawn_blocking(move || dir.close()).await;
}

/// Checks each image (its count, its header), fetches remote ones, and writes them to `dir` in the
/// order sent; returns their paths.
async fn store_images(
    state: &SharedState,
    info: &PipelineInfo,
    parts: Vec<ImagePart>,
    dir: &Path,
) -> Result<Vec<String>, ApiError> {
    let most = info.max_input_images as usize;
    match parts.len() {
        0 => {
            return Err(ApiError::invalid(
                IMAGE,
                "an input image is required: send `image` (a file) or `url` (a data: URL)",
            ))
        }
        count if count > most => {
            return Err(ApiError::invalid(
                IMAGE,
                format!(
                    "{} takes at most {most} input image{}, got {count}",
                    info.pipeline_class,
                    if most == 1 { "" } else { "s" }
                ),
            ))
        }
        _ => {}
    }
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::with_capacity(parts.len());
    for (index, part) in parts.into_iter().enumerate() {
        let field = part.name.trim_end_matches("[]").to_string();
        let bytes = image_bytes(state, &field, part.value).await?;
        let extension = image_extension(&bytes, state.config.max_input_pixels, &field)?;
        files.push((dir.join(format!("{index}.{extension}")), bytes));
    }
    let paths = files.iter().map(|(path, _)| path.to_string_lossy().into_owned()).collect();
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        for (path, bytes) in &files {
            crate::durable::write_atomic(path, bytes)?;
        }
        crate::durable::sync_dir(&dir)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|written| written)
    .map_err(|e| ApiError::internal(format!("cannot store the input images: {e}")))?;
    Ok(paths)
}

/// An image part's bytes: the file, the decoded data URL, or (with `--allow-remote-urls`) the
/// fetched http(s) URL.
async fn image_bytes(state: &SharedState, field: &str, value: ImageValue) -> Result<Vec<u8>, ApiError> {
    match value {
        ImageValue::File(bytes) => Ok(bytes),
        ImageValue::Url(url) if is_remote_url(&url) => {
            if !state.config.allow_remote_urls {
                return Err(ApiError::invalid(
                    field,
                    "remote URLs are not fetched by this server (--allow-remote-urls enables it); upload the \
                     image as a file or send a data: URL",
                ));
            }
            fetch_remote(url.trim(), field, state.config.max_body_bytes(), state.config.remote_url_timeout()).await
        }
        ImageValue::Url(url) => decode_data_url(url.trim(), field),
    }
}
