//! The router at the HTTP edge (body limits, what is checked before a body is read, auth, CORS,
//! parsing, error bodies), driven in-process against a stand-in engine that answers at once.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use hyper::body::Frame;
use serde_json::{json, Value};
use sgl_core::{
    EncodedOutput, FrameRule, GenerationOutput, GuidanceMode, ImageInput, InputSizeRule, OutputKind, OutputMetadata,
    PerfMetrics, PipelineInfo, PipelineLimits, SamplingDefaults,
};
use sgl_scheduler::{BatchExecutor, BatchItem, BatchProgress, BatchingConfig, Engine, ExecError, ItemOutcome};
use tower::ServiceExt;

use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::outputs::OutputStore;
use crate::state::{AppState, EngineState, SharedState};
use crate::ServerConfig;

/// Longest a request that must not wait for its body may take.
const PROMPT: Duration = Duration::from_secs(5);
const KEY: &str = "secret";
const ORIGIN: &str = "http://app.example";

/// Completes every request at once with a few bytes of "output" per output asked for; a request with
/// input images gets, as each output, what it was given: its size, image paths and their contents.
struct Quick;

fn output_bytes(request: &sgl_core::ResolvedRequest) -> Vec<u8> {
    use base64::Engine as _;
    if request.image_paths.is_empty() {
        return b"output".to_vec();
    }
    let images: Vec<String> = request
        .image_paths
        .iter()
        .map(|path| base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap_or_default()))
        .collect();
    json!({"size": [request.width, request.height], "paths": request.image_paths, "images": images})
        .to_string()
        .into_bytes()
}

impl BatchExecutor for Quick {
    fn execute(&mut self, batch: &[BatchItem], _: &BatchProgress) -> Result<Vec<ItemOutcome>, ExecError> {
        Ok(batch
            .iter()
            .map(|item| {
                let output = EncodedOutput { format: item.request.output_format, bytes: output_bytes(&item.request) };
                ItemOutcome::Completed(GenerationOutput {
                    outputs: vec![output; item.request.num_outputs as usize],
                    metadata: OutputMetadata {
                        seed: item.request.seed,
                        batch_size: 1,
                        perf: PerfMetrics {
                            total_duration_ms: 0.0,
                            steps: vec![],
                            denoise_steps_ms: vec![],
                            memory_checkpoints: vec![],
                            peak_memory_mb: 0.0,
                            profile_trace_dir: None,
                        },
                        notes: vec![],
                    },
                })
            })
            .collect())
    }
}

fn image_model() -> PipelineInfo {
    PipelineInfo {
        model_path: "/models/tiny".into(),
        hf_id: None,
        pipeline_class: "FluxPipeline".into(),
        family: "flux1".into(),
        task: "text-to-image".into(),
        device: "cpu".into(),
        dit_precision: "fp32".into(),
        vae_precision: "fp32".into(),
        attention_backend: "torch_sdpa".into(),
        limits: PipelineLimits {
            size_multiple: 16,
            min_size: 16,
            max_side: 2048,
            max_pixels: 1 << 22,
            max_frames: 1,
            frame_rule: FrameRule::Single,
            max_sequence_length: 512,
            max_steps: 1000,
            token_size: 16,
            frames_per_latent: 1,
        },
        defaults: SamplingDefaults {
            width: 32,
            height: 32,
            num_frames: 1,
            num_inference_steps: 2,
            guidance_scale: 3.5,
            true_cfg_scale: 1.0,
            max_sequence_length: 32,
            negative_prompt: None,
            flow_shift: None,
            fps: None,
            guidance_scale_2: None,
            size_from_inputs: None,
        },
        guidance: GuidanceMode::EmbeddedWithTrueCfg,
        supports_flow_shift: false,
        supports_guidance_scale_2: false,
        output: OutputKind::Image,
        image_input: ImageInput::None,
        max_input_images: 1,
        last_image_input: ImageInput::None,
        extra_batch_key_fields: vec![],
        max_batch_requests: None,
    }
}

fn video_model(image_input: ImageInput) -> PipelineInfo {
    let mut info = image_model();
    info.pipeline_class = "WanPipeline".into();
    info.task = "text-to-video".into();
    info.limits.frame_rule = FrameRule::FourKPlusOne;
    info.limits.max_frames = 81;
    info.defaults.num_frames = 9;
    info.defaults.fps = Some(16);
    info.guidance = GuidanceMode::ClassifierFree;
    info.output = OutputKind::Video;
    info.image_input = image_input;
    info
}

struct Harness {
    app: Router,
    state: SharedState,
    _dir: tempfile::TempDir,
}

/// The router on a server with `config`, serving `model` (`None`: still loading).
fn harness(config: ServerConfig, model: Option<PipelineInfo>) -> Harness {
    harness_with(config, BatchingConfig::default(), model)
}

/// [`harness`] with the engine's queue and admission limits.
fn harness_with(config: ServerConfig, batching: BatchingConfig, model: Option<PipelineInfo>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let outputs = OutputStore::open(dir.path().join("outputs"), Duration::from_secs(60)).unwrap();
    let (jobs, _) = JobStore::open(dir.path().join("videos"), Duration::from_secs(60), 100).unwrap();
    let state = Arc::new(AppState::new(config, outputs, Some(Arc::new(jobs)), Metrics::new().unwrap()));
    if let Some(info) = model {
        let engine = Engine::start(batching, move || Ok((Quick, info))).unwrap();
        state.set_engine(EngineState::Ready(Arc::new(engine)));
    }
    Harness { app: super::router(Arc::clone(&state)), state, _dir: dir }
}

/// Sends `first`, then nothing ever again: a handler that reads this body never finishes.
struct Stalled(Option<Bytes>);

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            None => Poll::Pending,
        }
    }
}

fn stalled(first: &[u8]) -> Body {
    Body::new(Stalled(Some(Bytes::copy_from_slice(first))))
}

/// The response's status and JSON body; fails if it does not come within `PROMPT`.
async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = tokio::time::timeout(PROMPT, app.clone().oneshot(request))
        .await
        .expect("no answer within 5 s: the server waited for the body")
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() && !bytes.is_empty() {
        assert!(headers.get(header::CONTENT_TYPE).is_some_and(|v| v == "application/json"), "{status}: {headers:?}");
    }
    (status, body)
}

fn post(path: &str, content_type: &str, body: Body) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, content_type).body(body).unwrap()
}

fn json_post(path: &str, body: &Value) -> Request<Body> {
    post(path, "application/json", Body::from(body.to_string()))
}

fn param(body: &Value) -> Option<&str> {
    body["error"]["param"].as_str()
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

const BOUNDARY: &str = "XyZ";

fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}

fn form_part(name: &str, filename: Option<&str>, value: &[u8]) -> Vec<u8> {
    let disposition = match filename {
        Some(file) => format!("form-data; name=\"{name}\"; filename=\"{file}\"\r\nContent-Type: image/png"),
        None => format!("form-data; name=\"{name}\""),
    };
    let mut part = format!("--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n").into_bytes();
    part.extend_from_slice(value);
    part.extend_from_slice(b"\r\n");
    part
}

fn form(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut body = parts.concat();
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The first bytes of a PNG that declares `width` x `height` pixels (all a header reader needs).
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend_from_slice(&width.to_be_bytes());
    png.extend_from_slice(&height.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
    png
}

// --- body limits, and what is checked before a body is read ---------------------------------------

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_it_is_read() {
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::Optional)));
    for (path, content_type) in
        [("/v1/images/generations", "application/json"), ("/v1/videos", "multipart/form-data; boundary=x")]
    {
        let request = Request::post(path)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::CONTENT_LENGTH, (100u64 << 30).to_string())
            .body(stalled(b""))
            .unwrap();
        let (status, body) = send(&h.app, request).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}: {body}");
        assert!(message(&body).contains("--max-body-mb"), "{body}");
    }
}

#[tokio::test]
async fn a_body_without_a_length_is_read_up_to_the_limit_only() {
    let config = ServerConfig { max_body_mb: 1, ..Default::default() };
    let h = harness(config.clone(), Some(image_model()));
    let over = json!({"prompt": "a".repeat(2 << 20)}).to_string();
    let request = post("/v1/images/generations", "application/json", chunks(over.into_bytes()));
    assert_eq!(send(&h.app, request).await.0, StatusCode::PAYLOAD_TOO_LARGE);

    // One multipart field over the limit, streamed: 413 however the limit is crossed.
    let h = harness(config, Some(video_model(ImageInput::Optional)));
    let big = form(&[form_part("prompt", None, b"a boat"), form_part("input_reference", Some("a.png"), &[0; 3 << 20])]);
    let (status, _) = send(&h.app, post("/v1/videos", &multipart_type(), chunks(big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

/// `bytes` in 64 KiB chunks and without a length, as a client streaming its upload sends them.
fn chunks(bytes: Vec<u8>) -> Body {
    Body::new(Chunks(bytes.chunks(64 << 10).map(Bytes::copy_from_slice).collect::<Vec<_>>().into_iter()))
}

struct Chunks(std::vec::IntoIter<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next().map(|chunk| Ok(Frame::data(chunk))))
    }
}

#[tokio::test]
async fn a_server_that_cannot_take_work_answers_503_without_reading_the_body() {
    let loading = harness(ServerConfig::default(), None);
    for path in ["/v1/images/generations", "/v1/videos"] {
        let (status, body) = send(&loading.app, post(path, "application/json", stalled(b"{\"prompt\":"))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(message(&body).contains("loading"), "{body}");
    }
    let stopping = harness(ServerConfig::default(), Some(image_model()));
    stopping.state.shutting_down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = send(&stopping.app, post("/v1/images/generations", "application/json", stalled(b"{"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(message(&body).contains("shutting down"), "{body}");
}

#[tokio::test]
async fn a_route_the_model_cannot_serve_is_refused_without_reading_the_body() {
    let images = harness(ServerConfig::default(), Some(image_model()));
    let (status, body) = send(&images.app, post("/v1/videos", &multipart_type(), stalled(b"--XyZ\r\n"))).await;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, Some("model")), "{body}");
    assert!(message(&body).contains("makes images"), "{body}");

    let videos = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    let (status, body) =
        send(&videos.app, post("/v1/images/generations", "application/json", stalled(b"{\"prompt\":"))).await;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, Some("model")), "{body}");
    // A text-to-video model refuses an image as soon as the part's headers arrive.
    let head = b"--XyZ\r\nContent-Disposition: form-data; name=\"input_reference\"; filename=\"a.png\"\r\n\r\n\x89PNG";
    let (status, body) = send(&videos.app, post("/v1/videos", &multipart_type(), stalled(head))).await;
    assert_eq!((status, param(&body)), (StatusCode::BAD_REQUEST, Some("input_reference")), "{body}");
}

/// The `Connection` header of the answer to `request`.
async fn connection_header(app: &Router, request: Request<Body>) -> Option<String> {
    let response = tokio::time::timeout(PROMPT, app.clone().oneshot(request)).await.expect("no answer").unwrap();
    response.headers().get(header::CONNECTION).map(|value| value.to_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn an_answer_before_the_body_was_read_closes_the_connection_and_says_so() {
    // The soak's keep-alive client once sent its next request on a connection hyper closed silently
    // after such an answer, and got none.
    let videos = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    let refused = post("/v1/images/generations", "application/json", stalled(b"{\"prompt\":"));
    assert_eq!(connection_header(&videos.app, refused).await.as_deref(), Some("close"));
    // Read to its end (even when refused afterwards), or no body at all: the connection stays.
    let read = json_post("/v1/videos", &json!({"prompt": "a", "num_inference_steps": -1}));
    assert_eq!(connection_header(&videos.app, read).await, None);
    let get = Request::get("/v1/models").body(Body::empty()).unwrap();
    assert_eq!(connection_header(&videos.app, get).await, None);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_408_after_the_body_read_timeout() {
    let config = ServerConfig { body_read_timeout_secs: 1, ..Default::default() };
    let h = harness(config, Some(video_model(ImageInput::Optional)));
    for (path, content_type) in [("/v1/videos", multipart_type()), ("/v1/videos", "application/json".into())] {
        let started = std::time::Instant::now();
        let (status, body) = send(&h.app, post(path, &content_type, stalled(b"--XyZ\r\n"))).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{content_type}: {body}");
        assert_eq!(body["error"]["code"], "request_timeout");
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
}

// --- input images ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_input_image_over_the_pixel_bound_is_refused_from_its_header() {
    let config = ServerConfig { max_input_pixels: 1_000_000, ..Default::default() };
    let h = harness(config, Some(video_model(ImageInput::Optional)));
    let huge = png_header(12_000, 12_000);
    let body = form(&[form_part("prompt", None, b"a boat"), form_part("input_reference", Some("a.png"), &huge)]);
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(body))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("input_reference")), "{error}");
    assert!(message(&error).contains("12000x12000 = 144000000 pixels"), "{error}");
    assert!(message(&error).contains("--max-input-pixels"), "{error}");
    // The same as a data URL in JSON.
    use base64::Engine as _;
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&huge));
    let (status, error) = send(&h.app, json_post("/v1/videos", &json!({"prompt": "a", "input_reference": url}))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("input_reference")), "{error}");
    // Within the bound, the header passes and the job is created.
    let small =
        form(&[form_part("prompt", None, b"a"), form_part("input_reference", Some("a.png"), &png_header(64, 64))]);
    let (status, job) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(small))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    // Bytes that are no image at all.
    let junk = form(&[form_part("prompt", None, b"a"), form_part("input_reference", Some("a.png"), b"GIF89a")]);
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(junk))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("input_reference")), "{error}");
}

#[tokio::test]
async fn a_last_frame_goes_where_the_model_takes_one() {
    let png = png_header(64, 64);
    let both = || {
        form(&[
            form_part("prompt", None, b"a"),
            form_part("input_reference", Some("a.png"), &png),
            form_part("last_frame", Some("b.png"), &png),
        ])
    };
    // A model without a last frame refuses the part by its name, multipart and JSON alike.
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::Required)));
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(both()))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("last_frame")), "{error}");
    assert!(message(&error).contains("takes no last frame"), "{error}");
    use base64::Engine as _;
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    let body = json!({"prompt": "a", "input_reference": url, "last_frame": url});
    let (status, error) = send(&h.app, json_post("/v1/videos", &body)).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("last_frame")), "{error}");
    // A first-last-frame checkpoint needs it (the core's `last_image_path`, named as the API names it).
    let mut flf = video_model(ImageInput::Required);
    flf.last_image_input = ImageInput::Required;
    let h = harness(ServerConfig::default(), Some(flf));
    let first_only = form(&[form_part("prompt", None, b"a"), form_part("input_reference", Some("a.png"), &png)]);
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(first_only))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("last_frame")), "{error}");
    let (status, job) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(both()))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let (status, job) = send(&h.app, json_post("/v1/videos", &body)).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    // Bytes that are no image are refused naming the part they came in.
    let junk = form(&[
        form_part("prompt", None, b"a"),
        form_part("input_reference", Some("a.png"), &png),
        form_part("last_frame", Some("b.png"), b"GIF89a"),
    ]);
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(junk))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("last_frame")), "{error}");
}

// --- parsing ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn only_one_json_value_of_type_application_json_is_a_body() {
    let h = harness(ServerConfig::default(), Some(image_model()));
    let good = r#"{"prompt": "a fox"}"#;
    for (content_type, body, expected) in [
        ("application/json", format!("{good} trailing"), StatusCode::BAD_REQUEST),
        ("application/json", format!("{good}{good}"), StatusCode::BAD_REQUEST),
        ("application/jsonp", good.to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("application/json-seq", good.to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("text/plain", good.to_string(), StatusCode::UNSUPPORTED_MEDIA_TYPE),
        ("Application/JSON; charset=utf-8", format!("{good}\n "), StatusCode::OK),
    ] {
        let (status, response) = send(&h.app, post("/v1/images/generations", content_type, Body::from(body))).await;
        assert_eq!(status, expected, "{content_type}: {response}");
    }
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    let (status, _) = send(&h.app, post("/v1/videos", "application/jsonp", Body::from(good))).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test]
async fn errors_echo_at_most_a_short_piece_of_a_value() {
    let h = harness(ServerConfig::default(), Some(image_model()));
    let huge = "9".repeat(1 << 20);
    let long_path = "x".repeat(60_000);
    for body in [
        json!({"prompt": "a", "width": huge}),
        json!({"prompt": "a", "size": huge}),
        json!({"prompt": "a", huge.clone(): 1}),
        json!({"prompt": "a", "output_format": huge}),
    ] {
        let (status, error) = send(&h.app, json_post("/v1/images/generations", &body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error.to_string().len() < 1500, "{} bytes", error.to_string().len());
    }
    let (status, error) = send(&h.app, Request::get(format!("/{long_path}")).body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error.to_string().len() < 1500);
}

#[tokio::test]
async fn a_request_over_the_pixel_budget_is_a_400_request_over_budget() {
    // The stand-ins' defaults are 32x32 (9 frames for video): 10 240 pixels per image request and
    // 92 160 per video request by default.
    let h = harness(ServerConfig::default(), Some(image_model()));
    let many = json!({"prompt": "a", "n": 10, "size": "64x64", "num_inference_steps": 1});
    let (status, error) = send(&h.app, json_post("/v1/images/generations", &many)).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, None), "{error}");
    assert_eq!(error["error"]["code"], "request_over_budget", "{error}");
    assert!(message(&error).contains("40960 output pixels (10 outputs × 64×64 pixels × 1 frames)"), "{error}");
    assert!(
        message(&error).contains("budget of 10240 output pixels") && message(&error).contains("--max-request-pixels")
    );
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    let long = json!({"prompt": "a", "size": "64x64", "seconds": 5, "fps": 16});
    let (status, error) = send(&h.app, json_post("/v1/videos", &long)).await;
    assert_eq!((status, &error["error"]["code"]), (StatusCode::BAD_REQUEST, &json!("request_over_budget")), "{error}");
    assert!(message(&error).contains("331776 output pixels (1 outputs × 64×64 pixels × 81 frames)"), "{error}");
}

#[tokio::test]
async fn the_readiness_probe_of_a_video_model_asks_for_one_frame() {
    // A budget of one 16x16 frame: the probe (least size, 1 step) fits it only with one frame; with
    // the model's default clip it was refused, and /health_generate read a healthy server as 503.
    let budget = BatchingConfig { max_request_pixels: Some(16 * 16), ..BatchingConfig::default() };
    let h = harness_with(ServerConfig::default(), budget, Some(video_model(ImageInput::None)));
    let (status, body) = send(&h.app, Request::get("/health_generate").body(Body::empty()).unwrap()).await;
    assert_eq!((status, &body["status"]), (StatusCode::OK, &json!("ok")), "{body}");
}

#[tokio::test]
async fn seconds_too_long_for_the_model_name_seconds() {
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    for seconds in [json!(1e10), json!("1e10"), json!(1e300), json!(6)] {
        let (status, error) =
            send(&h.app, json_post("/v1/videos", &json!({"prompt": "a", "seconds": seconds, "fps": 16}))).await;
        assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("seconds")), "{seconds}: {error}");
        assert!(message(&error).contains("at most 5.00 seconds"), "{error}");
    }
    let (status, job) = send(&h.app, json_post("/v1/videos", &json!({"prompt": "a", "seconds": 5, "fps": 16}))).await;
    assert_eq!((status, &job["num_frames"]), (StatusCode::OK, &json!(81)), "{job}");
}

#[tokio::test]
async fn an_unknown_after_cursor_is_a_400_naming_after() {
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::None)));
    let (status, job) = send(&h.app, json_post("/v1/videos", &json!({"prompt": "a"}))).await;
    assert_eq!(status, StatusCode::OK);
    let get = |query: String| Request::get(format!("/v1/videos{query}")).body(Body::empty()).unwrap();
    let (status, error) = send(&h.app, get("?after=video_unknown".into())).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("after")), "{error}");
    let (status, page) = send(&h.app, get(format!("?after={}", job["id"].as_str().unwrap()))).await;
    assert_eq!((status, &page["data"]), (StatusCode::OK, &json!([])), "{page}");
    let (status, page) = send(&h.app, get(String::new())).await;
    assert_eq!((status, page["data"].as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
}

// --- url outputs -------------------------------------------------------------------------------------

#[tokio::test]
async fn url_outputs_are_built_from_a_valid_host_only() {
    let config = ServerConfig { host: "127.0.0.1".into(), port: 4321, ..Default::default() };
    let h = harness(config, Some(image_model()));
    let body = json!({"prompt": "a", "response_format": "url"}).to_string();
    let with_host = |host: Option<&str>| {
        let mut request = Request::post("/v1/images/generations").header(header::CONTENT_TYPE, "application/json");
        if let Some(host) = host {
            request = request.header(header::HOST, host);
        }
        request.body(Body::from(body.clone())).unwrap()
    };
    for (host, base) in [
        (Some("images.example:8080"), "http://images.example:8080/"),
        (Some("[::1]:30000"), "http://[::1]:30000/"),
        (None, "http://127.0.0.1:4321/"),
    ] {
        let (status, response) = send(&h.app, with_host(host)).await;
        assert_eq!(status, StatusCode::OK, "{host:?}: {response}");
        let url = response["data"][0]["url"].as_str().unwrap();
        assert!(url.starts_with(base), "{host:?}: {url}");
    }
    for host in ["evil.example/phish?", "user@evil.example", "a b", "host:port", "", "evil.example#x"] {
        let (status, error) = send(&h.app, with_host(Some(host))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{host:?}: {error}");
        assert!(message(&error).contains("--public-url"), "{error}");
    }
}

// --- auth and CORS ------------------------------------------------------------------------------------

fn with_key(origins: &[&str]) -> Harness {
    let config = ServerConfig {
        api_key: Some(KEY.into()),
        cors_origins: origins.iter().map(|o| o.to_string()).collect(),
        ..Default::default()
    };
    harness(config, Some(image_model()))
}

fn get_models(authorization: Option<&str>) -> Request<Body> {
    let mut request = Request::get("/v1/models");
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_case_insensitively() {
    let h = with_key(&[]);
    for value in ["Bearer secret", "bearer secret", "BEARER secret"] {
        assert_eq!(send(&h.app, get_models(Some(value))).await.0, StatusCode::OK, "{value}");
    }
    for value in [None, Some("secret"), Some("Basic secret"), Some("Bearer Secret"), Some("Bearersecret")] {
        assert_eq!(send(&h.app, get_models(value)).await.0, StatusCode::UNAUTHORIZED, "{value:?}");
    }
}

fn options(path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::builder().method(Method::OPTIONS).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn options_needs_the_key_except_as_a_cors_preflight() {
    // Without a key, OPTIONS must not tell an existing route (405) from a missing one (404).
    for h in [with_key(&[]), with_key(&[ORIGIN])] {
        for path in ["/v1/videos", "/v1/no-such-route"] {
            for headers in [&[][..], &[("origin", "http://evil.example"), ("access-control-request-method", "GET")]] {
                let (status, error) = send(&h.app, options(path, headers)).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {headers:?}: {error}");
            }
        }
    }
    let h = with_key(&[ORIGIN]);
    let preflight = [("origin", ORIGIN), ("access-control-request-method", "POST")];
    let response = h.app.clone().oneshot(options("/v1/images/generations", &preflight)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], ORIGIN);
}

#[tokio::test]
async fn cors_origin_star_allows_any_origin() {
    let h = with_key(&["*"]);
    let preflight = [("origin", "http://anywhere.example"), ("access-control-request-method", "POST")];
    let response = h.app.clone().oneshot(options("/v1/images/generations", &preflight)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let request = Request::get("/v1/models")
        .header("origin", "http://anywhere.example")
        .header(header::AUTHORIZATION, "Bearer secret")
        .body(Body::empty())
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
}

// --- image edits ---------------------------------------------------------------------------------------

/// An editing model: 1 to 3 input images, outputs sized from the last one at 96x96 pixels of area.
fn edit_model() -> PipelineInfo {
    let mut info = image_model();
    info.pipeline_class = "EditPipeline".into();
    info.task = "image-to-image".into();
    info.image_input = ImageInput::Required;
    info.max_input_images = 3;
    info.defaults.width = 64;
    info.defaults.height = 64;
    info.defaults.size_from_inputs = Some(InputSizeRule::LastInputAspectAtArea { area: 96 * 96 });
    info
}

/// A PNG header of `width` x `height` with a marker after it, so that each image can be told apart.
fn marked_png(width: u32, height: u32, marker: &[u8]) -> Vec<u8> {
    let mut png = png_header(width, height);
    png.extend_from_slice(marker);
    png
}

fn data_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn edit(parts: &[Vec<u8>]) -> Request<Body> {
    post("/v1/images/edits", &multipart_type(), Body::from(form(parts)))
}

/// What the stand-in engine was given for each output of an edit answer: (size, images).
fn edit_inputs(answer: &Value) -> Vec<(Value, Vec<Vec<u8>>)> {
    use base64::Engine as _;
    let decode = |text: &str| base64::engine::general_purpose::STANDARD.decode(text).unwrap();
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            let given: Value = serde_json::from_slice(&decode(item["b64_json"].as_str().unwrap())).unwrap();
            let images = given["images"].as_array().unwrap().iter().map(|i| decode(i.as_str().unwrap())).collect();
            (given["size"].clone(), images)
        })
        .collect()
}

#[tokio::test]
async fn an_edit_takes_one_image_and_answers_as_generations_does() {
    let h = harness(ServerConfig::default(), Some(edit_model()));
    let image = marked_png(32, 32, b"one");
    let (status, answer) =
        send(&h.app, edit(&[form_part("prompt", None, b"a hat"), form_part("image", Some("a.png"), &image)])).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // No size: the (square) image's aspect ratio at the model's area.
    assert_eq!(edit_inputs(&answer), vec![(json!([96, 96]), vec![image])]);
    assert_eq!(answer["data"][0]["revised_prompt"], "a hat");
    assert!(answer["id"].as_str().unwrap().starts_with("img_") && answer["seed"].is_u64(), "{answer}");
}

#[tokio::test]
async fn several_images_reach_the_engine_in_the_order_sent_and_are_removed_after() {
    let h = harness(ServerConfig::default(), Some(edit_model()));
    let (a, b, c) = (marked_png(32, 32, b"a"), marked_png(64, 64, b"b"), marked_png(192, 64, b"c"));
    let parts = [
        form_part("image", Some("a.png"), &a),
        form_part("prompt", None, b"merge them"),
        form_part("url", None, data_url(&b).as_bytes()),
        form_part("image[]", Some("c.png"), &c),
        form_part("seed", None, b"7"),
        form_part("num_inference_steps", None, b"3"),
    ];
    let (status, answer) = send(&h.app, edit(&parts)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // The last image (3:1) sizes the output: diffusers' rounding of 96x96 pixels at 3:1.
    assert_eq!(edit_inputs(&answer), vec![(json!([160, 64]), vec![a, b, c])]);
    assert_eq!(answer["seed"], 7, "numbers parse from form text");
    // The request's copies of the images are gone once it was answered.
    let given: Value = {
        use base64::Engine as _;
        let text = answer["data"][0]["b64_json"].as_str().unwrap();
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(text).unwrap()).unwrap()
    };
    let paths = given["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 3);
    let folder = std::path::Path::new(paths[0].as_str().unwrap()).parent().unwrap().to_path_buf();
    assert!(!folder.exists(), "{folder:?} was left behind");
}

#[tokio::test]
async fn an_edit_takes_the_fields_of_generations() {
    let h = harness(ServerConfig::default(), Some(edit_model()));
    let image = marked_png(32, 32, b"x");
    let parts = [
        form_part("prompt", None, b"a hat"),
        form_part("image", Some("a.png"), &image),
        form_part("size", None, b"64x32"),
        form_part("n", None, b"2"),
        form_part("response_format", None, b"url"),
        form_part("output_format", None, b"jpeg"),
    ];
    let (status, answer) = send(&h.app, edit(&parts)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let url = data[1]["url"].as_str().unwrap();
    assert!(url.contains("/v1/images/img_") && url.ends_with("/content?variant=1"), "{url}");
    let path = url.split_once("/v1/").map(|(_, rest)| format!("/v1/{rest}")).unwrap();
    let response = h.app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "image/jpeg");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let given: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(given["size"], json!([64, 32]), "a given size wins over the image's");
    // Unknown fields are refused by name, as on generations.
    let (status, error) = send(
        &h.app,
        edit(&[
            form_part("prompt", None, b"a"),
            form_part("image", Some("a.png"), &image),
            form_part("fps", None, b"8"),
        ]),
    )
    .await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("fps")), "{error}");
}

#[tokio::test]
async fn edits_refuse_what_they_cannot_honour_naming_the_part() {
    let h = harness(ServerConfig { max_input_pixels: 1_000_000, ..Default::default() }, Some(edit_model()));
    let image = marked_png(32, 32, b"x");
    let prompt = || form_part("prompt", None, b"a hat");
    let cases = [
        (
            vec![prompt(), form_part("image", Some("a.png"), &image), form_part("mask", Some("m.png"), &image)],
            "mask",
            "does not inpaint",
        ),
        (vec![prompt()], "image", "an input image is required"),
        (vec![prompt(), form_part("image", Some("a.png"), b"GIF89a")], "image", "not a readable image"),
        (vec![prompt(), form_part("image", Some("a.png"), &image[..12])], "image", "not a readable image"),
        (vec![prompt(), form_part("image[]", Some("a.png"), &png_header(2000, 2000))], "image", "--max-input-pixels"),
        (vec![prompt(), form_part("url", None, b"data:image/png;base64,!!")], "url", "base64"),
        (vec![prompt(), form_part("url[]", None, b"https://example.com/a.png")], "url", "--allow-remote-urls"),
        (
            vec![
                prompt(),
                form_part("image", Some("a.png"), &image),
                form_part("image", Some("b.png"), &image),
                form_part("image", Some("c.png"), &image),
                form_part("image", Some("d.png"), &image),
            ],
            "image",
            "at most 3 input images, got 4",
        ),
        (vec![form_part("image", Some("a.png"), &image)], "prompt", "required"),
    ];
    for (parts, field, says) in cases {
        let (status, error) = send(&h.app, edit(&parts)).await;
        assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some(field)), "{error}");
        assert!(message(&error).contains(says), "{says}: {error}");
    }
    // Multipart only.
    let (status, error) = send(&h.app, json_post("/v1/images/edits", &json!({"prompt": "a"}))).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{error}");
    assert!(message(&error).contains("multipart/form-data"), "{error}");
}

#[tokio::test]
async fn an_edit_body_over_the_limit_is_a_413() {
    let h = harness(ServerConfig { max_body_mb: 1, ..Default::default() }, Some(edit_model()));
    let big = form(&[form_part("prompt", None, b"a"), form_part("image", Some("a.png"), &[0; 2 << 20])]);
    let (status, _) = send(&h.app, post("/v1/images/edits", &multipart_type(), chunks(big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn models_that_do_not_edit_refuse_edits_without_reading_the_body() {
    for (model, says) in [(image_model(), "does not edit images"), (video_model(ImageInput::Optional), "makes videos")]
    {
        let h = harness(ServerConfig::default(), Some(model));
        let (status, error) = send(&h.app, post("/v1/images/edits", &multipart_type(), stalled(b"--XyZ\r\n"))).await;
        assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("model")), "{error}");
        assert!(message(&error).contains(says), "{error}");
    }
}

/// A local HTTP server answering `/a.png` with `body` and anything else with 404; its base URL.
async fn image_server(body: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = Router::new().route("/a.png", axum::routing::get(move || async move { body.clone() }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test]
async fn remote_urls_are_fetched_only_with_allow_remote_urls() {
    let image = marked_png(64, 64, b"remote");
    let base = image_server(image.clone()).await;
    let parts = |url: String| [form_part("prompt", None, b"a hat"), form_part("url", None, url.as_bytes())];
    let closed = harness(ServerConfig::default(), Some(edit_model()));
    let (status, error) = send(&closed.app, edit(&parts(format!("{base}/a.png")))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("url")), "{error}");
    assert!(message(&error).contains("--allow-remote-urls"), "{error}");

    let open = harness(ServerConfig { allow_remote_urls: true, ..Default::default() }, Some(edit_model()));
    let (status, answer) = send(&open.app, edit(&parts(format!("{base}/a.png")))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(edit_inputs(&answer), vec![(json!([96, 96]), vec![image])]);
    let (status, error) = send(&open.app, edit(&parts(format!("{base}/missing.png")))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("url")), "{error}");
    assert!(message(&error).contains("404"), "{error}");
    // Over the size bound (--max-body-mb, per fetched image): 413 naming url.
    let big = image_server(vec![0; (1 << 20) + 1]).await;
    let small =
        harness(ServerConfig { allow_remote_urls: true, max_body_mb: 1, ..Default::default() }, Some(edit_model()));
    let (status, error) = send(&small.app, edit(&parts(format!("{big}/a.png")))).await;
    assert_eq!((status, param(&error)), (StatusCode::PAYLOAD_TOO_LARGE, Some("url")), "{error}");
}

#[tokio::test]
async fn a_remote_image_that_does_not_arrive_is_a_400_after_the_remote_url_timeout() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = ServerConfig { allow_remote_urls: true, remote_url_timeout_secs: 1, ..Default::default() };
    let h = harness(config, Some(edit_model()));
    let url = format!("http://{address}/a.png");
    let (status, error) =
        send(&h.app, edit(&[form_part("prompt", None, b"a"), form_part("url", None, url.as_bytes())])).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("url")), "{error}");
    assert!(message(&error).contains("--remote-url-timeout"), "{error}");
}

#[tokio::test]
async fn a_form_carries_a_requests_lora_as_json_text() {
    let h = harness(ServerConfig::default(), Some(video_model(ImageInput::Optional)));
    let lora = |value: &[u8]| form(&[form_part("prompt", None, b"a boat"), form_part("lora", None, value)]);
    let twice = lora(br#"[{"nickname": "a"}, {"nickname": "a", "strength": 0.5}]"#);
    let (status, error) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(twice))).await;
    assert_eq!((status, param(&error)), (StatusCode::BAD_REQUEST, Some("lora")), "{error}");
    assert!(message(&error).contains("twice"), "{error}");
    let good = lora(br#"[{"nickname": "a", "strength": 0.5}]"#);
    let (status, job) = send(&h.app, post("/v1/videos", &multipart_type(), Body::from(good))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
}
