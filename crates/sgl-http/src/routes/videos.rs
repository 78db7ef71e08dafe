//! The OpenAI videos API: asynchronous jobs on the shared scheduler, persisted by the job store.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use sgl_core::{GenerationRequest, ImageInput, OutputFormat, OutputKind, PipelineInfo, ResolvedRequest};
use sgl_scheduler::{Engine, Event, GenerationError, SubmitOptions};

use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::jobs::{is_finished, JobRecord, JobStore, NotFinished, Outcome};
use crate::routes::form::{read_form, ImageValue, PartRole};
use crate::routes::images::{has_media_type, new_id, parse_size, read_json};
use crate::routes::input_image::{decode_data_url, image_extension};
use crate::routes::request_id;
use crate::state::{unix_now, SharedState};
use crate::wire::{ErrorBody, VideoCreateRequest, VideoDeleted, VideoFields, VideoJob, VideoJobList, VideoStatus};

/// Largest id page a list request may ask for.
const MAX_LIST_LIMIT: usize = 100;

fn jobs(state: &SharedState) -> Result<&JobStore, ApiError> {
    state.jobs.as_deref().ok_or_else(|| ApiError::not_ready("the video job store is not available"))
}

/// The input frames a video request uploads, as bytes: the first (`input_reference`) and, for
/// first-last-frame models, the last (`last_frame`).
#[derive(Default)]
struct InputFrames {
    first: Option<Vec<u8>>,
    last: Option<Vec<u8>>,
}

/// Parses JSON or multipart within `--body-read-timeout`; returns the request and its input frames.
async fn read_create_request(
    state: &SharedState,
    info: &PipelineInfo,
    request: Request,
) -> Result<(VideoCreateRequest, InputFrames), ApiError> {
    if has_media_type(request.headers(), "application/json") {
        let (parts, body) = request.into_parts();
        let mut body = VideoCreateRequest::from_value(read_json(state, &parts.headers, body).await?)?;
        let first = body.own.input_reference.take().map(|url| decode_data_url(&url, INPUT_REFERENCE)).transpose()?;
        let last = body.own.last_frame.take().map(|url| decode_data_url(&url, LAST_FRAME)).transpose()?;
        return Ok((body, InputFrames { first, last }));
    }
    if !has_media_type(request.headers(), "multipart/form-data") {
        return Err(ApiError::unsupported_media_type("application/json or multipart/form-data"));
    }
    // An image for a model that takes none is refused before its bytes are read.
    let role = |name: &str| match name {
        INPUT_REFERENCE if info.image_input == ImageInput::None => Err(takes_no_image(info)),
        LAST_FRAME if info.last_image_input == ImageInput::None => Err(takes_no_last_frame(info)),
        INPUT_REFERENCE | LAST_FRAME => Ok(PartRole::Image),
        _ => Ok(PartRole::Field),
    };
    let (body, images) = read_form::<VideoFields>(state, request, role).await?;
    // The last part of each name wins, as when a JSON body names a field twice.
    let mut frames = InputFrames::default();
    for part in images {
        let bytes = match part.value {
            ImageValue::File(bytes) => bytes,
            ImageValue::Url(url) => decode_data_url(&url, &part.name)?,
        };
        if part.name == LAST_FRAME {
            frames.last = Some(bytes);
        } else {
            frames.first = Some(bytes);
        }
    }
    Ok((body, frames))
}

/// The field (JSON) or form part that carries the input image.
const INPUT_REFERENCE: &str = "input_reference";
/// The field (JSON) or form part that carries the last frame of first-last-frame models.
const LAST_FRAME: &str = "last_frame";

fn takes_no_image(info: &PipelineInfo) -> ApiError {
    ApiError::invalid(INPUT_REFERENCE, format!("{} takes no input image", info.pipeline_class))
}

fn takes_no_last_frame(info: &PipelineInfo) -> ApiError {
    ApiError::invalid(
        LAST_FRAME,
        format!("{} takes no last frame (first-last-frame checkpoints such as Wan2.1-FLF2V do)", info.pipeline_class),
    )
}

/// Stores an uploaded frame in the job's folder as `{stem}.{ext}` after checking it is an image
/// within `--max-input-pixels`; returns its path. Fsynced: a queued job must still find its image
/// after a crash (the folder entry is made durable with the job's record).
async fn store_frame(
    state: &SharedState,
    store: &JobStore,
    id: &str,
    bytes: Vec<u8>,
    stem: &str,
    part: &str,
) -> Result<String, ApiError> {
    let extension = image_extension(&bytes, state.config.max_input_pixels, part)?;
    let dir = store.job_dir(id);
    let path = dir.join(format!("{stem}.{extension}"));
    let image_path = path.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        crate::durable::write_atomic(&image_path, &bytes)
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|written| written)
    .map_err(|e| ApiError::internal(format!("cannot store the image: {e}")))?;
    Ok(path.to_string_lossy().into_owned())
}

/// `seconds * fps + 1` frames, computed in floating point and checked against the model's longest
/// video before it becomes an integer (a cast would saturate or wrap: 1e10 s became 0 frames).
fn frames_for(seconds: f64, fps: u32, max_frames: u32) -> Result<u32, ApiError> {
    let frames = (seconds * f64::from(fps)).round() + 1.0;
    if frames > f64::from(max_frames) {
        let longest = f64::from(max_frames.saturating_sub(1)) / f64::from(fps.max(1));
        return Err(ApiError::invalid(
            "seconds",
            format!(
                "{seconds} seconds at {fps} fps is more than the {max_frames} frames this model makes; \
                 at most {longest:.2} seconds"
            ),
        ));
    }
    // In range: at most `max_frames` and at least 1 (seconds and fps are positive).
    Ok(frames as u32)
}

fn parse_seconds(value: &serde_json::Value) -> Result<f64, ApiError> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    seconds
        .filter(|s| s.is_finite() && *s > 0.0)
        .ok_or_else(|| ApiError::invalid("seconds", format!("seconds must be a positive number, got {value}")))
}

/// Creates a video job and queues it at once; poll `GET /v1/videos/{id}` for its progress.
#[utoipa::path(post, path = "/v1/videos", tag = "videos", request_body = VideoCreateRequest,
    responses((status = 200, body = VideoJob), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 408, body = ErrorBody), (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
        (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn create_video(
    State(state): State<SharedState>,
    request: Request,
) -> Result<Json<VideoJob>, ApiError> {
    let request_id = request_id(request.headers());
    // What needs no body first: a server that cannot take the request does not read it.
    let engine = state.engine()?;
    let store = jobs(&state)?;
    let info = engine.info();
    if info.output != OutputKind::Video {
        return Err(ApiError::invalid(
            "model",
            format!("the served model ({}) makes images; use /v1/images/generations", info.pipeline_class),
        ));
    }
    let (body, frames) = read_create_request(&state, info, request).await?;
    let names = state.model_names(&engine);
    if let Some(model) = body.own.model.as_deref() {
        if !names.iter().any(|n| n == model) {
            return Err(ApiError::model_not_found(model, &names));
        }
    }
    if body.own.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "each video job makes one video: n must be 1"));
    }
    // Creation time first, so the job store's id order is creation order.
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let id = new_id(&format!("video_{millis:012x}"));
    let mut request = GenerationRequest { output_format: Some(OutputFormat::Mp4), ..body.request.clone() };
    if let Some(size) = body.own.size.as_deref() {
        if let Some((w, h)) = parse_size(size)? {
            (request.width, request.height) = (Some(w), Some(h));
        }
    }
    if let Some(seconds) = body.own.seconds.as_ref().map(parse_seconds).transpose()? {
        let fps = request.fps.or(info.defaults.fps).unwrap_or(16);
        let frames = frames_for(seconds, fps, info.limits.max_frames)?;
        if request.num_frames.is_some_and(|n| n != frames) {
            return Err(ApiError::invalid(
                "seconds",
                format!(
                    "seconds {seconds} at {fps} fps means {frames} frames, but num_frames is {:?}",
                    request.num_frames
                ),
            ));
        }
        request.num_frames = Some(frames);
    }
    // The images must be files before the request can be resolved (the core checks they exist).
    let InputFrames { first, last } = frames;
    match (&first, info.image_input) {
        (Some(_), ImageInput::None) => return Err(takes_no_image(info)),
        (None, ImageInput::Required) => {
            return Err(ApiError::invalid(INPUT_REFERENCE, format!("{} needs an input image", info.pipeline_class)))
        }
        _ => {}
    }
    if last.is_some() && info.last_image_input == ImageInput::None {
        return Err(takes_no_last_frame(info));
    }
    for (bytes, stem, part) in [(first, "input", INPUT_REFERENCE), (last, "last_frame", LAST_FRAME)] {
        let Some(bytes) = bytes else { continue };
        let path = match store_frame(&state, store, &id, bytes, stem, part).await {
            Ok(path) => path,
            Err(err) => {
                discard_job_dir(store, &id).await;
                return Err(err);
            }
        };
        if part == LAST_FRAME {
            request.last_image_path = Some(path);
        } else {
            request.image_path = Some(path);
        }
    }
    // Validate before the job exists; the resolved request fixes the seed and frame count.
    let resolved = match ResolvedRequest::resolve(&request, info) {
        Ok(resolved) => resolved,
        Err(err) => {
            discard_job_dir(store, &id).await;
            return Err(video_param(ApiError::from_validation(&err)));
        }
    };
    request.seed = Some(resolved.seed);
    request.num_frames = Some(resolved.num_frames);
    let fps = resolved.fps.unwrap_or(16);
    let job = VideoJob {
        id: id.clone(),
        object: "video".into(),
        model: body.own.model.clone().unwrap_or_else(|| names.first().cloned().unwrap_or_default()),
        status: VideoStatus::Queued,
        progress: 0,
        created_at: unix_now(),
        completed_at: None,
        expires_at: None,
        size: format!("{}x{}", resolved.width, resolved.height),
        seconds: format_seconds(resolved.num_frames, fps),
        num_frames: resolved.num_frames,
        fps,
        prompt: body.request.prompt,
        seed: resolved.seed,
        error: None,
    };
    // Submitted first: a full queue (429) then costs no disk write.
    let handle = match engine.submit_with(&request, SubmitOptions { request_id, ..Default::default() }) {
        Ok(handle) => handle,
        Err(err) => {
            discard_job_dir(store, &id).await;
            return Err(video_param(ApiError::from_submit(&err)));
        }
    };
    // The client hears of the job only once its record is durable: a job it was told about
    // survives a crash.
    if let Err(err) = store.insert(JobRecord { job: job.clone(), request }).await {
        handle.cancel();
        return Err(ApiError::internal(format!("cannot store the job: {err}")));
    }
    drive(&state, id, handle);
    Ok(Json(job))
}

fn status_name(status: VideoStatus) -> &'static str {
    match status {
        VideoStatus::Queued => "queued",
        VideoStatus::InProgress => "in_progress",
        VideoStatus::Completed => "completed",
        VideoStatus::Failed => "failed",
        VideoStatus::Cancelled => "cancelled",
    }
}

/// Removes the folder of a job that was refused before it was stored.
async fn discard_job_dir(store: &JobStore, id: &str) {
    let _ = tokio::fs::remove_dir_all(store.job_dir(id)).await;
}

fn format_seconds(frames: u32, fps: u32) -> String {
    let seconds = f64::from(frames.saturating_sub(1)) / f64::from(fps.max(1));
    let text = format!("{seconds:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Core field names → the videos API's.
fn video_param(mut err: ApiError) -> ApiError {
    if matches!(err.param.as_deref(), Some("width" | "height")) {
        err.param = Some("size".into());
    } else if err.param.as_deref() == Some("image") {
        err.param = Some(INPUT_REFERENCE.into());
    } else if err.param.as_deref() == Some("last_image_path") {
        err.param = Some(LAST_FRAME.into());
    }
    err
}

/// Submits a stored job again (after a restart).
pub(crate) fn resubmit(state: &SharedState, engine: &Engine, id: &str) {
    let Some(store) = state.jobs.clone() else { return };
    let Some(request) = store.request(id) else { return };
    match engine.submit(&request) {
        Ok(handle) => drive(state, id.to_string(), handle),
        Err(err) => {
            let outcome = Outcome::Failed { code: "resubmit_failed".into(), message: err.to_string() };
            let id = id.to_string();
            state.tasks.spawn(async move {
                let _ = store.finish(&id, outcome).await;
            });
        }
    }
}

/// Follows a job's events: progress from real denoising steps, the MP4 stored on completion. The
/// task is tracked: a graceful shutdown waits for it, so a job the engine finished while draining
/// has its video and record on disk before the process exits.
fn drive(state: &SharedState, id: String, handle: sgl_scheduler::RequestHandle) {
    let handle = Arc::new(handle);
    let Some(store) = state.jobs.clone() else { return };
    store.set_live(&id, Arc::clone(&handle));
    let tasks = state.tasks.clone();
    let state = Arc::clone(state);
    tasks.spawn(async move {
        let outcome = loop {
            match handle.events().recv_async().await {
                Ok(Event::Started { .. }) => store.mark_started(&id),
                Ok(Event::Progress { step, total }) => store.set_progress(&id, (step * 100 / total.max(1)).min(99)),
                Ok(Event::Finished(result)) => break *result,
                Err(_) => break Err(GenerationError::EngineStopped),
            }
        };
        store.take_live(&id);
        match outcome {
            Ok(output) => {
                state.metrics.observe_perf(&output.metadata.perf);
                // Cancelled or deleted while it was decoded: nothing to store (the store's
                // compare-and-set also settles a cancel that arrives while the video is written).
                if store.get(&id).is_none_or(|job| is_finished(job.status)) {
                    return;
                }
                match output.outputs.into_iter().next() {
                    // A video that cannot be stored fails the job (and is logged by the store).
                    Some(video) => {
                        store.complete(&id, video.bytes).await;
                    }
                    None => {
                        let message = "the pipeline returned no video".to_string();
                        let _ = store.finish(&id, Outcome::Failed { code: "generation_failed".into(), message }).await;
                    }
                }
            }
            // Only a cancel (or a delete) stops a request: the store already says so.
            Err(GenerationError::Cancelled) => {
                let _ = store.finish(&id, Outcome::Cancelled).await;
            }
            Err(err) => {
                let api = video_param(ApiError::from_generation(&err));
                // A request the pipeline found invalid (an unreadable input image) is the
                // client's to fix, not a failed generation: say so, and name the field.
                let (code, message) = match (api.status, api.param.as_deref()) {
                    (axum::http::StatusCode::BAD_REQUEST, Some(param)) => {
                        ("invalid_request", format!("{param}: {}", api.message))
                    }
                    (axum::http::StatusCode::BAD_REQUEST, None) => ("invalid_request", api.message.clone()),
                    _ => (api.code.unwrap_or("generation_failed"), api.message.clone()),
                };
                let _ = store.finish(&id, Outcome::Failed { code: code.to_string(), message }).await;
            }
        }
    });
}

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

/// Video jobs, newest first by default.
#[utoipa::path(get, path = "/v1/videos", tag = "videos",
    params(("after" = Option<String>, Query, description = "Id of a listed job to page on from; an unknown id is a 400"), ("limit" = Option<usize>, Query, description = "1-100, default 20"),
        ("order" = Option<String>, Query, description = "asc or desc (default)")),
    responses((status = 200, body = VideoJobList), (status = 400, body = ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn list_videos(
    State(state): State<SharedState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<VideoJobList>, ApiError> {
    let limit = query.limit.unwrap_or(20);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(ApiError::invalid("limit", format!("limit must be between 1 and {MAX_LIST_LIMIT}")));
    }
    let newest_first = match query.order.as_deref().unwrap_or("desc") {
        "desc" => true,
        "asc" => false,
        other => return Err(ApiError::invalid("order", format!("order must be asc or desc, got {other:?}"))),
    };
    let store = jobs(&state)?;
    // An unknown cursor is an error, not the first page again: a client paging through jobs would
    // otherwise loop, or silently see jobs twice, when the job it paged from expired or was deleted.
    if let Some(after) = query.after.as_deref() {
        if store.get(after).is_none() {
            return Err(ApiError::invalid(
                "after",
                format!("no video job {after}: it may have expired or been deleted; list again without `after`"),
            ));
        }
    }
    let (data, has_more) = store.list(query.after.as_deref(), limit, newest_first);
    let first_id = data.first().map(|job| job.id.clone());
    let last_id = data.last().map(|job| job.id.clone());
    Ok(Json(VideoJobList { object: "list", data, first_id, last_id, has_more }))
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("no video job {id}"))
}

#[utoipa::path(get, path = "/v1/videos/{id}", tag = "videos", params(("id" = String, Path)),
    responses((status = 200, body = VideoJob), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn get_video(
    State(state): State<SharedState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VideoJob>, ApiError> {
    jobs(&state)?.get(&id).map(Json).ok_or_else(|| job_not_found(&id))
}

/// The MP4 of a completed job.
#[utoipa::path(get, path = "/v1/videos/{id}/content", tag = "videos", params(("id" = String, Path)),
    responses((status = 200, description = "The video", content_type = "video/mp4"), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn video_content(
    State(state): State<SharedState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let store = jobs(&state)?;
    let job = store.get(&id).ok_or_else(|| job_not_found(&id))?;
    if job.status != VideoStatus::Completed {
        return Err(ApiError::not_found(format!("video job {id} is {}, not completed", status_name(job.status))));
    }
    let bytes = tokio::fs::read(store.video_path(&id)).await.map_err(|_| job_not_found(&id))?;
    Ok(([(CONTENT_TYPE, "video/mp4")], Body::from(bytes)))
}

/// Cancels a queued or running job: a running one stops between two denoising steps.
#[utoipa::path(post, path = "/v1/videos/{id}/cancel", tag = "videos", params(("id" = String, Path)),
    responses((status = 200, body = VideoJob), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn cancel_video(
    State(state): State<SharedState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VideoJob>, ApiError> {
    // One compare-and-set: a job that completes at the same moment is either cancelled (and its
    // video not kept) or stays completed (409), never both.
    match jobs(&state)?.cancel(&id).await {
        Ok(job) => Ok(Json(job)),
        Err(NotFinished::NotFound) => Err(job_not_found(&id)),
        Err(NotFinished::AlreadyFinished(job)) if job.status == VideoStatus::Cancelled => Ok(Json(*job)),
        Err(NotFinished::AlreadyFinished(job)) => Err(ApiError::conflict(format!(
            "video job {id} is already {} and cannot be cancelled",
            status_name(job.status)
        ))),
    }
}

/// Deletes a job (cancelling it if it runs) and its files.
#[utoipa::path(delete, path = "/v1/videos/{id}", tag = "videos", params(("id" = String, Path)),
    responses((status = 200, body = VideoDeleted), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
pub(crate) async fn delete_video(
    State(state): State<SharedState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<VideoDeleted>, ApiError> {
    jobs(&state)?.remove(&id).await.ok_or_else(|| job_not_found(&id))?;
    Ok(Json(VideoDeleted { id, object: "video.deleted", deleted: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_reported_from_frames() {
        assert_eq!(format_seconds(81, 16), "5");
        assert_eq!(format_seconds(9, 16), "0.5");
    }
}
