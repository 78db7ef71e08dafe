//! The router: every route, the API-key check, per-route metrics and the 404 fallback.

mod edits;
mod form;
mod health;
mod images;
mod input_image;
mod lora;
mod models;
mod observability;
#[cfg(test)]
mod tests;
mod videos;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::http::{HeaderMap, HeaderName};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub(crate) use edits::__path_edit_image;
pub(crate) use health::__path_health;
pub(crate) use health::__path_health_generate;
pub(crate) use images::__path_create_image;
pub(crate) use images::__path_image_content;
pub(crate) use lora::{__path_list_loras, __path_merge_lora_weights, __path_set_lora, __path_unmerge_lora_weights};
pub(crate) use models::__path_get_model;
pub(crate) use models::__path_list_models;
pub(crate) use models::__path_served_model;
pub(crate) use observability::__path_metrics;
pub(crate) use videos::resubmit;
pub(crate) use videos::{
    __path_cancel_video, __path_create_video, __path_delete_video, __path_get_video, __path_list_videos,
    __path_video_content,
};

use crate::auth::{guard_options, require_api_key};
use crate::config::{cors_origin, CorsOrigin};
use crate::error::ApiError;
use crate::state::SharedState;

pub fn router(state: SharedState) -> Router {
    let limit = state.config.max_body_bytes();
    let mut app = Router::new()
        .route("/health", get(health::health))
        .route("/health_generate", get(health::health_generate))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*model}", get(models::get_model))
        .route("/models", get(models::served_model))
        .route("/v1/images/generations", post(images::create_image))
        .route("/v1/images/edits", post(edits::edit_image))
        .route("/v1/images/{id}/content", get(images::image_content))
        .route("/v1/videos", post(videos::create_video).get(videos::list_videos))
        .route("/v1/videos/{id}", get(videos::get_video).delete(videos::delete_video))
        .route("/v1/videos/{id}/content", get(videos::video_content))
        .route("/v1/videos/{id}/cancel", post(videos::cancel_video))
        .route("/v1/set_lora", post(lora::set_lora))
        .route("/v1/merge_lora_weights", post(lora::merge_lora_weights))
        .route("/v1/unmerge_lora_weights", post(lora::unmerge_lora_weights))
        .route("/v1/list_loras", get(lora::list_loras))
        .route("/openapi.json", get(observability::openapi))
        .route("/metrics", get(observability::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The body limit (--max-body-mb) for every route: a declared Content-Length over it is
        // refused before any of the body is read, and a body without one stops being read at the
        // limit. Axum's own extractors (multipart) get the same limit instead of their 2 MiB.
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyLimitLayer::new(limit))
        .layer(middleware::map_response(move |response: Response| async move { openai_413(response, limit) }))
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(middleware::from_fn_with_state(state.clone(), record_metrics));
    // Outside the key check, so that browsers' preflights (which carry no credentials) are
    // answered and 401s carry CORS headers a page can read; the guard outside it keeps OPTIONS
    // requests that are no such preflight behind the key.
    if let Some(cors) = cors_layer(&state.config.cors_origins) {
        app = app.layer(cors).layer(middleware::from_fn_with_state(state.clone(), guard_options));
    }
    // Request ids, outermost, so every response carries one (401s and CORS answers too): drop an
    // unusable client id, set one (a UUID) where none is, log the request's line (and every event
    // inside it) under it, echo it in the response.
    app = app
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                .on_failure(DefaultOnFailure::new().level(Level::ERROR)),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .layer(middleware::from_fn(drop_unusable_request_id))
        // Outermost: every answer given before its request's body was read (by any layer within)
        // closes the connection, and says so.
        .layer(middleware::from_fn(crate::unread_body::close_if_body_unread));
    app.with_state(state)
}

/// `--cors-origin`: `*` allows any origin; otherwise the listed ones. Origins were validated at
/// start (`ServerConfig::validate`); one that is not is left out rather than panicking here.
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let parsed: Vec<CorsOrigin> = origins.iter().filter_map(|origin| cors_origin(origin).ok()).collect();
    let allow = if parsed.contains(&CorsOrigin::Any) {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(parsed.into_iter().filter_map(|origin| match origin {
            CorsOrigin::Exact(value) => Some(value),
            CorsOrigin::Any => None,
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(tower_http::cors::Any)
            .allow_headers(tower_http::cors::Any)
            .expose_headers([REQUEST_ID.clone()]),
    )
}

/// tower-http answers an over-limit body with a plain-text 413; clients get the OpenAI error body.
fn openai_413(response: Response, limit: usize) -> Response {
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        ApiError::payload_too_large(limit).into_response()
    } else {
        response
    }
}

/// The header that carries a request's id, in and out.
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Longest client-given id kept; a longer one is replaced, so ids stay fit for log lines.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The request's id (set for every request by the layers above).
pub(crate) fn request_id(headers: &HeaderMap) -> Option<String> {
    headers.get(&REQUEST_ID).and_then(|value| value.to_str().ok()).map(str::to_string)
}

/// A client's `x-request-id` is echoed and logged only if it is short visible ASCII; otherwise it
/// is removed here and the next layer generates one.
async fn drop_unusable_request_id(mut request: Request, next: Next) -> Response {
    let usable = request.headers().get(&REQUEST_ID).is_none_or(|value| {
        let bytes = value.as_bytes();
        !bytes.is_empty() && bytes.len() <= MAX_REQUEST_ID_LEN && bytes.iter().all(|b| b.is_ascii_graphic())
    });
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    next.run(request).await
}

fn request_span(request: &Request) -> tracing::Span {
    let id = request_id(request.headers()).unwrap_or_default();
    tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(format!("{} is not allowed on {}", request.method(), request.uri().path()))
}

async fn record_metrics(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let start = Instant::now();
    let response = next.run(request).await.into_response();
    state.metrics.observe_request(&route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}
