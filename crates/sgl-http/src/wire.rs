//! The OpenAI-compatible wire types (request and response bodies), with their OpenAPI schemas.
//! Generation parameters are `sgl_core::GenerationRequest`'s fields, which does all validation; a
//! route declares only its own (OpenAI) fields here.

use serde::{Deserialize, Serialize};
use sgl_core::fields::Route;
use utoipa::ToSchema;

use crate::route_body::{RouteBody, RouteFields};

/// `POST /v1/images/generations`: OpenAI's fields plus the engine's sampling fields.
// OpenAI's own fields only: the engine's fields for the route come from `sgl_core::GenerationRequest`
// (see `route_body`), in the body and in this schema.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageFields {
    /// The served model's id, path, Hugging Face id or an alias; default: the served model.
    #[serde(default)]
    pub model: Option<String>,
    /// Number of images, 1-10.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT`, e.g. `1024x1024`; default: the model's. `auto` means the default.
    #[serde(default)]
    pub size: Option<String>,
    /// `b64_json` (default) or `url`.
    #[serde(default)]
    pub response_format: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<String>,
    /// Only `auto` and `opaque` can be honoured; `transparent` is rejected.
    #[serde(default)]
    pub background: Option<String>,
    /// Accepted for compatibility; `auto`, `standard`, `hd`, `low`, `medium`, `high` are no-ops.
    #[serde(default)]
    pub quality: Option<String>,
    /// Accepted for compatibility; `vivid` and `natural` are no-ops.
    #[serde(default)]
    pub style: Option<String>,
    /// End-user id for the caller's records; not used.
    #[serde(default)]
    pub user: Option<String>,
    /// Compression for jpeg/webp, 0-100 (OpenAI's name; `output_quality` is the same).
    #[serde(default)]
    pub output_compression: Option<u8>,
}

impl RouteFields for ImageFields {
    const ROUTE: Route = Route::Images;
    const SCHEMA_NAME: &'static str = "ImageGenerationRequest";
}

/// The body of `POST /v1/images/generations`.
pub type ImageGenerationRequest = RouteBody<ImageFields>;

/// The form of `POST /v1/images/edits` (multipart/form-data only): the fields of
/// `/v1/images/generations` as text parts, plus the input images. Only a schema: the route reads the
/// form into an [`ImageGenerationRequest`] and its image parts (see `routes::edits`).
pub struct ImageEditRequest;

/// One kind of image part of an edit form.
pub struct EditImagePart {
    /// The part's name as clients send it.
    pub name: &'static str,
    /// Whether the name is the list form (`image[]`) of the official client.
    pub list: bool,
    /// A file upload (else a URL in a text part).
    pub file: bool,
    pub doc: &'static str,
}

/// The image parts of an edit form; a request's images are used in the order its parts came.
pub const EDIT_IMAGE_PARTS: [EditImagePart; 4] = [
    EditImagePart {
        name: "image",
        list: false,
        file: true,
        doc: "An input image file (png, jpeg, webp, gif or bmp); repeat it for several.",
    },
    EditImagePart {
        name: "image[]",
        list: true,
        file: true,
        doc: "Input image files, as the official client sends a list.",
    },
    EditImagePart {
        name: "url",
        list: false,
        file: false,
        doc: "An input image as a data:image/...;base64, URL (http(s) with --allow-remote-urls).",
    },
    EditImagePart { name: "url[]", list: true, file: false, doc: "Input images as URLs, as `url`." },
];

impl utoipa::PartialSchema for ImageEditRequest {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};
        use utoipa::openapi::RefOr;
        let RefOr::T(Schema::Object(mut object)) = <ImageGenerationRequest as utoipa::PartialSchema>::schema() else {
            return <ImageGenerationRequest as utoipa::PartialSchema>::schema();
        };
        object.description = Some(
            "The fields of /v1/images/generations as form fields, plus one or more input images \
             (`image`/`image[]` files, `url`/`url[]` URLs, used in the order sent). Without `size`, a model \
             that sizes edits from its input takes the last image's aspect ratio. `mask` is refused: no served \
             model inpaints."
                .into(),
        );
        for EditImagePart { name, list, file, doc } in EDIT_IMAGE_PARTS {
            let item = ObjectBuilder::new()
                .schema_type(Type::String)
                .format(file.then_some(SchemaFormat::KnownFormat(KnownFormat::Binary)));
            let property: Schema = if list {
                ArrayBuilder::new().items(item).description(Some(doc)).into()
            } else {
                item.description(Some(doc)).into()
            };
            object.properties.insert(name.to_string(), property.into());
        }
        let mask = ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .description(Some("Inpainting mask: refused with a 400 (no served model inpaints)."));
        object.properties.insert("mask".into(), Schema::from(mask).into());
        RefOr::T(Schema::Object(object))
    }
}

impl ToSchema for ImageEditRequest {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("ImageEditRequest")
    }
}

/// What an image route (`/v1/images/generations`, `/v1/images/edits`) may answer: the images, or an
/// error body with one of these statuses.
pub struct ImageRouteResponses;

impl utoipa::IntoResponses for ImageRouteResponses {
    fn responses() -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::Response>> {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::{Ref, ResponseBuilder};
        let json = |schema: &str| {
            ResponseBuilder::new()
                .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build())
                .build()
                .into()
        };
        let mut responses = std::collections::BTreeMap::from([("200".to_string(), json("ImageGenerationResponse"))]);
        for status in [400, 401, 404, 408, 413, 415, 429, 500, 503, 507] {
            responses.insert(status.to_string(), json("ErrorBody"));
        }
        responses
    }
}

/// One generated image: inline base64, or a URL to fetch it from.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub revised_prompt: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageGenerationResponse {
    pub id: String,
    pub created: u64,
    pub data: Vec<ImageData>,
    /// Seconds from submission to the last output.
    pub inference_time_s: f64,
    pub peak_memory_mb: f64,
    /// The seed used (the request's, or the one drawn for it).
    #[schema(format = "uint64")]
    pub seed: u64,
}

/// The OpenAI error body every failure uses.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The folder the model was loaded from.
    pub root: String,
    /// SGLang Diffusion's task code: `T2I`, `T2V`, `I2V`, `TI2V`, `I2I`.
    pub task_type: String,
    /// SGLang Diffusion's pipeline name: the pipeline class in snake case (`flux_pipeline`, `wan_pipeline`).
    pub pipeline_name: String,
    /// diffusers pipeline class the model runs as (`FluxPipeline`, `WanPipeline`, `WanDMDPipeline`, ...).
    pub pipeline_class: String,
    /// The task in words: `text-to-image`, `text-to-video`, `image-to-video`, `text-image-to-video`.
    pub task: String,
    /// Model family of the native implementation: `flux1`, `wan`.
    pub family: String,
    pub num_gpus: u32,
    pub dit_precision: String,
    pub vae_precision: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// `GET /models`: the shape SGLang Diffusion documents, plus `task` and `family` in our own words.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServedModelInfo {
    pub model_path: String,
    /// SGLang Diffusion's task code: `T2I`, `T2V`, `I2V`, `TI2V`, `I2I`.
    pub task_type: String,
    /// SGLang Diffusion's pipeline name: the pipeline class in snake case (`flux_pipeline`, `wan_pipeline`).
    pub pipeline_name: String,
    pub pipeline_class: String,
    /// The task in words: `text-to-image`, `text-to-video`, `image-to-video`, `text-image-to-video`.
    pub task: String,
    /// Model family of the native implementation: `flux1`, `wan`.
    pub family: String,
    pub num_gpus: u32,
    pub dit_precision: String,
    pub vae_precision: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HealthStatus {
    /// `ok`, `loading`, `shutting_down` or `unhealthy`.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `POST /v1/videos` (JSON, or multipart/form-data where every field is a string and
/// `input_reference` and `last_frame` may be files).
// OpenAI's own fields only, as for images.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VideoFields {
    #[serde(default)]
    pub model: Option<String>,
    /// Duration; with `fps` it decides the frame count (`seconds * fps + 1`).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub seconds: Option<serde_json::Value>,
    /// `WIDTHxHEIGHT`; default: the model's.
    #[serde(default)]
    pub size: Option<String>,
    /// Videos are generated one per job: only 1 is accepted.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1)]
    pub n: Option<u32>,
    /// Image for image-to-video: a `data:image/...;base64,` URL in JSON, or a file in multipart.
    #[serde(default)]
    pub input_reference: Option<String>,
    /// Last frame for first-last-frame image-to-video (with `input_reference` as the first): a
    /// `data:image/...;base64,` URL in JSON, or a file in multipart.
    #[serde(default)]
    pub last_frame: Option<String>,
}

impl RouteFields for VideoFields {
    const ROUTE: Route = Route::Videos;
    const SCHEMA_NAME: &'static str = "VideoCreateRequest";
}

/// The body of `POST /v1/videos`.
pub type VideoCreateRequest = RouteBody<VideoFields>;

/// `queued → in_progress → completed | failed | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VideoStatus {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VideoError {
    pub code: String,
    pub message: String,
}

/// A video job as the OpenAI videos API describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VideoJob {
    pub id: String,
    pub object: String,
    pub model: String,
    pub status: VideoStatus,
    /// Percent of denoising steps done.
    pub progress: u32,
    pub created_at: u64,
    pub completed_at: Option<u64>,
    pub expires_at: Option<u64>,
    /// `WIDTHxHEIGHT` used.
    pub size: String,
    /// Duration of the video used, `(num_frames - 1) / fps`.
    pub seconds: String,
    pub num_frames: u32,
    pub fps: u32,
    pub prompt: String,
    #[schema(format = "uint64")]
    pub seed: u64,
    pub error: Option<VideoError>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VideoJobList {
    pub object: &'static str,
    pub data: Vec<VideoJob>,
    /// Ids of the page's first and last jobs (what clients pass as `after` to page on).
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct VideoDeleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// What the LoRA commands answer: SGLang's `status` and `message`, and the adapters after the command.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoraResponse {
    /// Always `ok` (errors answer with an error body).
    pub status: &'static str,
    pub message: String,
    #[serde(flatten)]
    pub state: sgl_core::lora::LoraState,
}
