use serde::{Deserialize, Serialize};

/// What a loaded pipeline tells the core about itself.
///
/// The Python side builds this when it loads a model; the core uses it to fill request defaults and
/// to reject requests the pipeline cannot run before they reach the GPU. Unknown fields are errors,
/// so the Python mirror (`pipelines/base.py`) cannot drift from this definition unnoticed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineInfo {
    /// The path the model was loaded from.
    pub model_path: String,
    /// The Hugging Face id, when the model was named by one or is a known checkpoint.
    pub hf_id: Option<String>,
    /// diffusers pipeline class the checkpoint declares (`model_index.json` `_class_name`).
    pub pipeline_class: String,
    /// Model family of the native implementation, e.g. `flux1`.
    pub family: String,
    /// `text-to-image`, `text-to-video`, ...
    pub task: String,
    pub device: String,
    pub dit_precision: String,
    pub vae_precision: String,
    pub attention_backend: String,
    pub limits: PipelineLimits,
    pub defaults: SamplingDefaults,
    pub guidance: GuidanceMode,
    /// Whether `flow_shift` may be set per request (FLUX derives its shift from the image size).
    pub supports_flow_shift: bool,
    /// Whether the pipeline has a second (low-noise) expert guided by `guidance_scale_2`.
    pub supports_guidance_scale_2: bool,
    /// Images or videos.
    pub output: OutputKind,
    /// Whether requests may, must or must not carry an input image (image-to-video).
    pub image_input: ImageInput,
    /// Most input images one request may carry (where `image_input` allows any): 1 for
    /// image-to-video, more for editing with several reference images.
    #[serde(default = "one")]
    pub max_input_images: u32,
    /// Whether requests may, must or must not carry a last frame (`last_image_path`): first-last-frame
    /// checkpoints require one, image-to-video checkpoints that can take one (Wan2.2 I2V-A14B) allow it.
    #[serde(default = "no_image")]
    pub last_image_input: ImageInput,
    /// Request fields (by their `GenerationRequest` name) that must also be equal for two requests
    /// to share a batch, beyond the shape fields every pipeline batches by: what a pipeline adds
    /// (e.g. an adapter list) keys batches without a change here.
    #[serde(default)]
    pub extra_batch_key_fields: Vec<String>,
    /// Most requests one batch may hold, whatever `--max-batch-size` allows: 1 for a pipeline that
    /// runs requests one at a time (the diffusers backend). `None`: no bound of its own.
    #[serde(default)]
    pub max_batch_requests: Option<u32>,
}

fn one() -> u32 {
    1
}

fn no_image() -> ImageInput {
    ImageInput::None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    Image,
    Video,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageInput {
    /// Text-to-image / text-to-video only.
    None,
    /// Text-to-video, or image-to-video when an image is given (Wan2.2 TI2V-5B).
    Optional,
    /// Image-to-video only.
    Required,
}

/// Shape limits of a pipeline; requests beyond them are rejected before they run.
///
/// Each is what the loaded checkpoint can run (its RoPE table, its tokenizer, its scheduler's
/// training timesteps), at most the family's memory bound; the product of the fields is bounded
/// separately, by the cost budget (see [`crate::ResolvedRequest::cost`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineLimits {
    /// Width and height must be multiples of this (16 for FLUX.1, 32 for Wan2.2 TI2V-5B).
    pub size_multiple: u32,
    pub min_size: u32,
    /// Largest width or height (Wan: the RoPE table's positions per axis times the pixels per position).
    pub max_side: u32,
    pub max_pixels: u64,
    pub max_frames: u32,
    pub frame_rule: FrameRule,
    pub max_sequence_length: u32,
    /// Most denoising steps (the scheduler's training timesteps).
    pub max_steps: u32,
    /// Side in pixels of the square one latent token covers (VAE compression × patch size).
    pub token_size: u32,
    /// Frames one latent frame covers (the VAE's temporal compression; 1 for image models).
    pub frames_per_latent: u32,
}

/// How many frames a pipeline can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameRule {
    /// An image model: exactly one frame.
    Single,
    /// Video VAEs with 4x temporal compression take 4k+1 frames; other counts are rounded down.
    FourKPlusOne,
}

/// How a pipeline applies guidance, which decides whether a request needs a second (CFG) branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuidanceMode {
    /// Guidance-distilled (FLUX.1): `guidance_scale` feeds an embedding; classifier-free guidance
    /// only through `true_cfg_scale > 1` with a negative prompt.
    EmbeddedWithTrueCfg,
    /// Classic classifier-free guidance: on when `guidance_scale > 1`.
    ClassifierFree,
    /// No guidance embedding; classifier-free guidance through `true_cfg_scale > 1` with a negative
    /// prompt (Qwen-Image). `guidance_scale` feeds nothing.
    TrueCfg,
    /// Classifier-free guidance counted from the conditional prediction (Z-Image): on when
    /// `guidance_scale > 0`, the prediction is `cond + guidance_scale * (cond - uncond)`; takes
    /// `cfg_normalization` and `cfg_truncation`.
    ClassifierFreeAboveZero,
}

/// The model's own sampling defaults; a request overrides any of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
    pub num_inference_steps: u32,
    pub guidance_scale: f64,
    pub true_cfg_scale: f64,
    pub max_sequence_length: u32,
    pub negative_prompt: Option<String>,
    pub flow_shift: Option<f64>,
    /// Frames per second of video outputs; `None` for image models.
    pub fps: Option<u32>,
    /// Guidance of the low-noise expert (Wan2.2 A14B); `None` where there is none.
    pub guidance_scale_2: Option<f64>,
    /// How a request that carries input images but gives no size is sized, where the pipeline sizes
    /// outputs from its inputs (see [`crate::input_size`]); `None`: `width` x `height` always.
    #[serde(default)]
    pub size_from_inputs: Option<InputSizeRule>,
}

/// A pipeline's rule for the output size of a request with input images and no size of its own: the
/// size its reference pipeline picks for the same images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputSizeRule {
    /// The last input image's aspect ratio at `area` pixels (the Qwen-Image editing pipelines).
    LastInputAspectAtArea { area: u64 },
    /// The first input image's own size, shrunk to at most `max_area` pixels at its aspect ratio,
    /// floored to `size_multiple` (FLUX.2, GLM-Image).
    FirstInputWithinArea { max_area: u64 },
    /// The bucket whose height / width ratio is nearest the first input image's (HunyuanVideo-1.5
    /// image-to-video).
    FirstInputNearestBucket { buckets: Vec<SizeBucket> },
}

/// One output size of [`InputSizeRule::FirstInputNearestBucket`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeBucket {
    pub width: u32,
    pub height: u32,
    /// height / width as the reference compares it (it rounds the ratio, so it is given, not derived).
    pub ratio: f64,
}
