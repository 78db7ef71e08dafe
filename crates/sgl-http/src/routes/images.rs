use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HOST};
use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use sgl_core::{GenerationRequest, OutputFormat};
use sgl_scheduler::{Engine, SubmitOptions};

use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery};
use crate::generation::await_result;
use crate::outputs::content_type;
use crate::routes::request_id;
use crate::state::{unix_now, SharedState};
use crate::wire::{ErrorBody, ImageData, ImageGenerationRequest, ImageGenerationResponse, ImageRouteResponses};

/// Whether the request's Content-Type is `expected` (its media type, parameters such as
/// `charset` aside): `application/jsonp` or `application/json-seq` is not JSON.
pub(crate) fn has_media_type(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.split(';').next().unwrap_or_default().trim())
        .is_some_and(|essence| essence.eq_ignore_ascii_case(expected))
}

/// Why a body could not be read: over the limit (413), a client that went away or sent broken
/// chunks (400). The limit shows up as `LengthLimitError` somewhere in the error's sources.
pub(crate) fn body_error(err: &(dyn std::error::Error + 'static), limit: usize) -> ApiError {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return ApiError::payload_too_large(limit);
        }
        cause = current.source();
    }
    ApiError::bad_request(format!("the request body could not be read: {err}"))
}

/// Reads a JSON body within the size limit and `--body-read-timeout`, answering 415 / 413 / 408 /
/// 400 in the OpenAI format. The whole body must be one JSON value (trailing bytes are a 400).
pub(crate) async fn read_json(state: &SharedState, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    if !has_media_type(headers, "application/json") {
        return Err(ApiError::unsupported_media_type("application/json"));
    }
    parse_json(&read_bytes(state, body).await?)
}

/// The whole body, within `--max-body-mb` and `--body-read-timeout`.
pub(crate) async fn read_bytes(state: &SharedState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.config.max_body_bytes();
    let timeout = state.config.body_read_timeout();
    tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::body_timeout(timeout))?
        .map_err(|err| body_error(&err, limit))
}

pub(crate) fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|err| ApiError::bad_request(format!("the body is not valid JSON: {err}")))
}

pub(crate) fn parse_size(size: &str) -> Result<Option<(u32, u32)>, ApiError> {
    if size == "auto" {
        return Ok(None);
    }
    let parsed = size.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
    match parsed {
        Some((w, h)) if w > 0 && h > 0 => Ok(Some((w, h))),
        _ => {
            Err(ApiError::invalid("size", format!("size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto, got {size:?}")))
        }
    }
}

fn parse_output_format(value: Option<&str>) -> Result<OutputFormat, ApiError> {
    match value.unwrap_or("png") {
        "png" => Ok(OutputFormat::Png),
        "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
        "webp" => Ok(OutputFormat::Webp),
        other => {
            Err(ApiError::invalid("output_format", format!("output_format must be png, jpeg or webp, got {other:?}")))
        }
    }
}

pub(crate) enum ResponseFormat {
    B64Json,
    Url,
}

/// OpenAI's image request → the engine's request: the engine's fields as sent, plus what OpenAI's own
/// fields ask for. OpenAI fields that mean nothing here are accepted only with their no-op values;
/// anything we cannot honour is a 400 naming the field.
fn to_generation_request(body: &ImageGenerationRequest) -> Result<(GenerationRequest, ResponseFormat), ApiError> {
    let own = &body.own;
    let response_format = match own.response_format.as_deref().unwrap_or("b64_json") {
        "b64_json" => ResponseFormat::B64Json,
        "url" => ResponseFormat::Url,
        other => {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format must be b64_json or url, got {other:?}"),
            ))
        }
    };
    match own.background.as_deref() {
        None | Some("auto") | Some("opaque") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "background",
                format!("background {other:?} cannot be produced by this model; use auto or opaque"),
            ))
        }
    }
    if let Some(quality) = own.quality.as_deref() {
        if !["auto", "standard", "hd", "low", "medium", "high"].contains(&quality) {
            return Err(ApiError::invalid(
                "quality",
                format!("quality must be auto, standard, hd, low, medium or high, got {quality:?}"),
            ));
        }
    }
    if let Some(style) = own.style.as_deref() {
        if !["vivid", "natural"].contains(&style) {
            return Err(ApiError::invalid("style", format!("style must be vivid or natural, got {style:?}")));
        }
    }
    let mut request = body.request.clone();
    if let Some(size) = own.size.as_deref() {
        if let Some((w, h)) = parse_size(size)? {
            if request.width.is_some_and(|v| v != w) || request.height.is_some_and(|v| v != h) {
                return Err(ApiError::invalid("size", "size disagrees with width/height; give one or the other"));
            }
            (request.width, request.height) = (Some(w), Some(h));
        }
    }
    request.num_outputs_per_prompt = Some(own.n.unwrap_or(1));
    request.output_format = Some(parse_output_format(own.output_format.as_deref())?);
    request.output_quality = request.output_quality.or(own.output_compression);
    Ok((request, response_format))
}

pub(crate) fn new_id(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut id = String::from(prefix);
    for _ in 0..2 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher
            .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        id.push_str(&format!("{:016x}", hasher.finish()));
    }
    id
}

/// Text-to-image generation (OpenAI Images API).
#[utoipa::path(post, path = "/v1/images/generations", tag = "images",
    request_body = ImageGenerationRequest,
    responses(ImageRouteResponses),
    security(("bearer" = [])))]
pub(crate) async fn create_image(
    State(state): State<SharedState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImageGenerationResponse>, ApiError> {
    let started = Instant::now();
    // What needs no body first: a server that cannot take the request does not read it.
    let engine = state.engine()?;
    if engine.info().output != sgl_core::OutputKind::Image {
        return Err(makes_videos(engine.info()));
    }
    let body = ImageGenerationRequest::from_value(read_json(&state, &headers, body).await?)?;
    let (request, response_format) = prepare(&state, &engine, &body)?;
    generate(
        &state,
        &engine,
        ImageCall { headers: &headers, uri: &uri, body: &body, started },
        request,
        response_format,
    )
    .await
}

pub(crate) fn makes_videos(info: &sgl_core::PipelineInfo) -> ApiError {
    ApiError::invalid("model", format!("the served model ({}) makes videos; use /v1/videos", info.pipeline_class))
}

/// The engine's request for an image body, once the model it names is the served one.
pub(crate) fn prepare(
    state: &SharedState,
    engine: &Engine,
    body: &ImageGenerationRequest,
) -> Result<(GenerationRequest, ResponseFormat), ApiError> {
    if let Some(model) = body.own.model.as_deref() {
        let names = state.model_names(engine);
        if !names.iter().any(|n| n == model) {
            return Err(ApiError::model_not_found(model, &names));
        }
    }
    to_generation_request(body)
}

/// What an image route's answer is built from, beside the engine's request.
pub(crate) struct ImageCall<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub body: &'a ImageGenerationRequest,
    /// When the route began (the answer's `inference_time_s`).
    pub started: Instant,
}

/// Submits an image request, awaits it and answers it as OpenAI's Images API does (inline base64 or
/// urls); every image route ends here.
pub(crate) async fn generate(
    state: &SharedState,
    engine: &Engine,
    call: ImageCall<'_>,
    request: GenerationRequest,
    response_format: ResponseFormat,
) -> Result<Json<ImageGenerationResponse>, ApiError> {
    let ImageCall { headers, uri, body, started } = call;
    // Before the generation, so that a request whose url could not be built costs nothing.
    let base = match response_format {
        ResponseFormat::Url => Some(public_base(state, headers, uri)?),
        ResponseFormat::B64Json => None,
    };
    let options = SubmitOptions { request_id: request_id(headers), ..Default::default() };
    let handle =
        engine.submit_with(&request, options).map_err(|err| rename_param(ApiError::from_submit(&err), body))?;
    let output = await_result(&handle).await.map_err(|err| rename_param(err, body))?;
    state.metrics.observe_perf(&output.metadata.perf);
    let id = new_id("img_");
    let data = match response_format {
        ResponseFormat::B64Json => output
            .outputs
            .iter()
            .map(|o| ImageData {
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(&o.bytes)),
                url: None,
                revised_prompt: body.request.prompt.clone(),
            })
            .collect(),
        ResponseFormat::Url => {
            let files: Vec<_> = output.outputs.iter().map(|o| (o.bytes.clone(), o.format)).collect();
            let count = files.len();
            state
                .outputs
                .put(&id, files)
                .await
                .map_err(|e| ApiError::internal(format!("cannot store the output: {e}")))?;
            let base = base.unwrap_or_default();
            (0..count)
                .map(|variant| ImageData {
                    b64_json: None,
                    url: Some(format!("{base}/v1/images/{id}/content?variant={variant}")),
                    revised_prompt: body.request.prompt.clone(),
                })
                .collect()
        }
    };
    Ok(Json(ImageGenerationResponse {
        id,
        created: unix_now(),
        data,
        inference_time_s: started.elapsed().as_secs_f64(),
        peak_memory_mb: output.metadata.perf.peak_memory_mb,
        seed: output.metadata.seed,
    }))
}

/// The core names fields as the engine does; a client should see the name it sent.
fn rename_param(mut err: ApiError, body: &ImageGenerationRequest) -> ApiError {
    let renamed = match err.param.as_deref() {
        Some("num_outputs_per_prompt") => Some("n"),
        Some("width" | "height" | "size") if body.own.size.is_some() => Some("size"),
        Some("output_quality") if body.request.output_quality.is_none() => Some("output_compression"),
        // Edits: the core's list of input images is the form's `image` parts.
        Some("image_paths") => Some("image"),
        _ => None,
    };
    if let Some(name) = renamed {
        err.param = Some(name.to_string());
    }
    err
}

/// `--public-url`, else the host the client addressed (its `Host` header, or the request target's
/// authority), else the address the server listens on. A host that is not a plain `host[:port]`
/// (a path, a user, spaces) is refused rather than written into the url.
fn public_base(state: &SharedState, headers: &HeaderMap, uri: &Uri) -> Result<String, ApiError> {
    if let Some(url) = &state.config.public_url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    let host = match headers.get(HOST) {
        Some(value) => value.to_str().ok().and_then(valid_host).ok_or_else(|| {
            ApiError::bad_request(
                "the Host header is not a valid host[:port], so no url can be built; \
                 send a valid Host or start the server with --public-url",
            )
        })?,
        None => match uri.authority() {
            Some(authority) => authority.as_str().to_string(),
            None => format!("{}:{}", state.config.host, state.config.port),
        },
    };
    Ok(format!("http://{host}"))
}

/// `host[:port]` as a url may contain it: an authority without user info, with a numeric port if any.
fn valid_host(host: &str) -> Option<String> {
    let authority: axum::http::uri::Authority = host.parse().ok()?;
    let has_port = authority.as_str().len() > authority.host().len();
    let valid = !host.contains('@') && !authority.host().is_empty() && (!has_port || authority.port_u16().is_some());
    valid.then(|| host.to_string())
}

#[derive(Deserialize)]
pub(crate) struct VariantQuery {
    #[serde(default)]
    variant: usize,
}

/// Downloads output `variant` of a `url` response until it expires (`--output-ttl`).
#[utoipa::path(get, path = "/v1/images/{id}/content", tag = "images",
    params(("id" = String, Path), ("variant" = Option<usize>, Query, description = "Index of the image in the response")),
    responses((status = 200, description = "The image file", content_type = "image/png"),
        (status = 400, body = ErrorBody, description = "variant is not a non-negative integer"),
        (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn image_content(
    State(state): State<SharedState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<VariantQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let not_found = || ApiError::not_found(format!("no image {id} (variant {}); it may have expired", query.variant));
    let (path, format) = state.outputs.get(&id, query.variant).ok_or_else(not_found)?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| not_found())?;
    Ok(([(CONTENT_TYPE, content_type(format))], bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_strictly() {
        assert_eq!(parse_size("1024x768").unwrap(), Some((1024, 768)));
        assert_eq!(parse_size("auto").unwrap(), None);
        for bad in ["abc", "1024", "x", "0x10", "-5x10", "10x10x10", "1024X768"] {
            assert_eq!(parse_size(bad).unwrap_err().param.as_deref(), Some("size"), "{bad}");
        }
    }

    #[test]
    fn openai_fields_we_cannot_honour_are_rejected() {
        let cases = [
            (serde_json::json!({"background": "transparent"}), "background"),
            (serde_json::json!({"response_format": "gif"}), "response_format"),
            (serde_json::json!({"output_format": "bmp"}), "output_format"),
            (serde_json::json!({"quality": "ultra"}), "quality"),
            (serde_json::json!({"style": "cartoon"}), "style"),
        ];
        for (mut fields, field) in cases {
            fields["prompt"] = "a".into();
            let body = ImageGenerationRequest::from_value(fields).unwrap();
            assert_eq!(to_generation_request(&body).err().and_then(|e| e.param).as_deref(), Some(field));
        }
        let ok = serde_json::json!({"prompt": "a", "quality": "standard", "style": "vivid", "size": "64x32", "n": 2});
        let (request, _) = to_generation_request(&ImageGenerationRequest::from_value(ok).unwrap()).ok().unwrap();
        assert_eq!((request.width, request.height, request.num_outputs_per_prompt), (Some(64), Some(32), Some(2)));
    }
}
