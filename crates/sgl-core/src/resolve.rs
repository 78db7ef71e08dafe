use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};

use crate::fields::Fields;
use crate::input_size::size_from_inputs;
use crate::{
    declare_fields, FrameRule, GenerationRequest, GuidanceMode, ImageInput, OutputFormat, OutputKind, PipelineInfo,
    PipelineLimits, ValidationError, MAX_PROMPT_CHARS,
};

declare_fields! {
    /// A request with every default filled in from the pipeline and every value checked against it.
    /// This is what the scheduler batches and what the Python executor receives (its mirror,
    /// `runtime/request.py`, is built from [`crate::fields::Fields::FIELDS`]).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct ResolvedRequest {
        pub prompt: String,
        pub negative_prompt: Option<String>,
        pub width: u32,
        pub height: u32,
        pub num_frames: u32,
        pub num_inference_steps: u32,
        pub guidance_scale: f64,
        pub true_cfg_scale: f64,
        pub seed: u64,
        pub max_sequence_length: u32,
        /// Outputs of the request (its `num_outputs_per_prompt`).
        pub num_outputs: u32,
        pub flow_shift: Option<f64>,
        /// Guidance of the low-noise expert, for pipelines that have one.
        pub guidance_scale_2: Option<f64>,
        /// CFG renormalisation cap (0: none), for pipelines whose guidance takes it (Z-Image).
        pub cfg_normalization: Option<f64>,
        /// CFG truncation point in normalised time (1: none), for pipelines whose guidance takes it.
        pub cfg_truncation: Option<f64>,
        /// Frame rate of video outputs; `None` for images.
        pub fps: Option<u32>,
        /// Input image file for image-to-video: the first of `image_paths` (what one-image pipelines read).
        pub image_path: Option<String>,
        /// Every input image file, in order.
        pub image_paths: Vec<String>,
        /// Last-frame image file of first-last-frame image-to-video.
        pub last_image_path: Option<String>,
        /// Prior image tokens given with the request (empty: the pipeline samples its own).
        pub prior_token_ids: Vec<u32>,
        /// This request's own LoRA adapters, in order (empty: none beyond what is merged).
        pub lora: Vec<crate::lora::RequestLora>,
        /// Whether this request runs a second, unconditional branch (classifier-free guidance).
        pub cfg_enabled: bool,
        pub output_format: OutputFormat,
        pub output_quality: Option<u8>,
        /// Adjustments made while resolving (e.g. a frame count rounded down), for the user to see.
        pub notes: Vec<String>,
        /// The values (as JSON) of the request fields the pipeline adds to the batch key
        /// (`PipelineInfo::extra_batch_key_fields`); the scheduler's business, not the executor's.
        #[serde(skip)]
        pub batch_extra: Vec<String> [.skipped()],
    }
}

/// Requests with equal keys can share one batched forward pass: everything that changes tensor
/// shapes or the timestep schedule is in the key; prompt, negative prompt, seed and guidance scales
/// may differ inside a batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: u32,
    pub height: u32,
    pub num_frames: u32,
    pub num_inference_steps: u32,
    pub max_sequence_length: u32,
    pub cfg_enabled: bool,
    /// Bit pattern of the flow shift, so the key stays `Eq`/`Hash`.
    pub flow_shift_bits: Option<u64>,
    /// Image-conditioned requests carry extra latent channels.
    pub has_image: bool,
    /// The values of the fields the pipeline declares in `extra_batch_key_fields`, in its order.
    pub extra: Vec<String>,
}

/// What a request will cost: the denoiser's work in latent tokens over all its steps, outputs and
/// guidance branches, and the output pixels that decoding, encoding and the answer grow with. Text
/// encoding is left out: per output it is bounded by the pipeline's prompt limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestCost {
    pub outputs: u32,
    /// Latent tokens of one output (all its latent frames).
    pub tokens: u64,
    pub steps: u32,
    /// 2 with classifier-free guidance (a second forward per step), else 1.
    pub branches: u32,
    /// Width and height of one output, in pixels.
    pub size: (u32, u32),
    /// Frames of one output (1 for images).
    pub frames: u32,
}

impl RequestCost {
    /// The cost of `outputs` outputs of `width`×`height`×`frames` over `steps` steps, on a pipeline
    /// with these limits (which say how many pixels and frames one latent token covers).
    pub fn new(limits: &PipelineLimits, outputs: u32, size: (u32, u32), frames: u32, steps: u32, cfg: bool) -> Self {
        let token = u64::from(limits.token_size.max(1));
        let latent_frames = u64::from(frames.saturating_sub(1) / limits.frames_per_latent.max(1) + 1);
        let (width, height) = size;
        let tokens = u64::from(width).div_ceil(token) * u64::from(height).div_ceil(token) * latent_frames;
        Self { outputs, tokens, steps, branches: if cfg { 2 } else { 1 }, size, frames }
    }

    /// Token-steps: outputs × tokens × steps × branches.
    pub fn token_steps(&self) -> u64 {
        u64::from(self.outputs)
            .saturating_mul(self.tokens)
            .saturating_mul(u64::from(self.steps))
            .saturating_mul(u64::from(self.branches))
    }

    /// Output pixels: outputs × width × height × frames.
    pub fn pixels(&self) -> u64 {
        let (width, height) = self.size;
        u64::from(self.outputs)
            .saturating_mul(u64::from(width))
            .saturating_mul(u64::from(height))
            .saturating_mul(u64::from(self.frames))
    }

    /// The token-steps with their formula, for error messages.
    pub fn describe_token_steps(&self) -> String {
        format!(
            "{} token-steps ({} outputs × {} latent tokens × {} steps × {} guidance branches)",
            self.token_steps(),
            self.outputs,
            self.tokens,
            self.steps,
            self.branches
        )
    }

    /// The output pixels with their formula, for error messages.
    pub fn describe_pixels(&self) -> String {
        let (width, height) = self.size;
        format!(
            "{} output pixels ({} outputs × {width}×{height} pixels × {} frames)",
            self.pixels(),
            self.outputs,
            self.frames
        )
    }
}

impl ResolvedRequest {
    /// The work this request asks for: denoising in the pipeline's latent tokens, and output pixels.
    pub fn cost(&self, limits: &PipelineLimits) -> RequestCost {
        RequestCost::new(
            limits,
            self.num_outputs,
            (self.width, self.height),
            self.num_frames,
            self.num_inference_steps,
            self.cfg_enabled,
        )
    }
}

impl PipelineInfo {
    /// The cost of one output at the model's own defaults (the unit of the default budgets).
    pub fn default_request_cost(&self) -> RequestCost {
        let d = &self.defaults;
        let cfg = match self.guidance {
            GuidanceMode::ClassifierFree => d.guidance_scale > 1.0,
            GuidanceMode::ClassifierFreeAboveZero => d.guidance_scale > 0.0,
            GuidanceMode::EmbeddedWithTrueCfg | GuidanceMode::TrueCfg => {
                d.negative_prompt.is_some() && d.true_cfg_scale > 1.0
            }
        };
        RequestCost::new(&self.limits, 1, (d.width, d.height), d.num_frames, d.num_inference_steps, cfg)
    }
}

impl ResolvedRequest {
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            width: self.width,
            height: self.height,
            num_frames: self.num_frames,
            num_inference_steps: self.num_inference_steps,
            max_sequence_length: self.max_sequence_length,
            cfg_enabled: self.cfg_enabled,
            flow_shift_bits: self.flow_shift.map(f64::to_bits),
            has_image: self.image_path.is_some(),
            extra: self.batch_extra.clone(),
        }
    }

    /// Fills defaults from `info` and validates every field against the pipeline's limits.
    pub fn resolve(request: &GenerationRequest, info: &PipelineInfo) -> Result<Self, ValidationError> {
        let defaults = &info.defaults;
        let limits = &info.limits;

        check_text("prompt", &request.prompt)?;
        if request.prompt.trim().is_empty() {
            return Err(ValidationError::new("prompt", "must not be empty"));
        }
        let negative_prompt = request.negative_prompt.clone().or_else(|| defaults.negative_prompt.clone());
        if let Some(negative) = &negative_prompt {
            check_text("negative_prompt", negative)?;
        }

        let num_outputs = request.num_outputs_per_prompt.unwrap_or(1);
        declared_bounds("num_outputs_per_prompt", f64::from(num_outputs))?;
        let num_inference_steps = request.num_inference_steps.unwrap_or(defaults.num_inference_steps);
        in_range("num_inference_steps", num_inference_steps, 1, limits.max_steps)?;
        if let Some(timeout) = request.timeout_seconds {
            declared_bounds("timeout_seconds", timeout)?;
        }
        let guidance_scale = request.guidance_scale.unwrap_or(defaults.guidance_scale);
        non_negative("guidance_scale", guidance_scale)?;
        let true_cfg_scale = request.true_cfg_scale.unwrap_or(defaults.true_cfg_scale);
        non_negative("true_cfg_scale", true_cfg_scale)?;

        // Images first: where the pipeline sizes outputs from them, the default size is theirs.
        let image_paths = resolve_images(request, info)?;
        let last_image_path = resolve_last_image(request, info, &image_paths)?;
        let (width, height) = match (request.width, request.height) {
            (None, None) => match size_from_inputs(info, &image_paths)? {
                Some(size) => check_input_derived_size(size, info)?,
                None => (defaults.width, defaults.height),
            },
            (width, height) => (width.unwrap_or(defaults.width), height.unwrap_or(defaults.height)),
        };
        check_size("width", width, info)?;
        check_size("height", height, info)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > limits.max_pixels {
            return Err(ValidationError::new(
                "size",
                format!("{width}x{height} is {pixels} pixels; this model allows at most {}", limits.max_pixels),
            ));
        }

        let mut notes = Vec::new();
        let num_frames = resolve_frames(request.num_frames.unwrap_or(defaults.num_frames), info, &mut notes)?;

        let max_sequence_length = request.max_sequence_length.unwrap_or(defaults.max_sequence_length);
        in_range("max_sequence_length", max_sequence_length, 1, limits.max_sequence_length)?;

        let flow_shift = match request.flow_shift {
            Some(_) if !info.supports_flow_shift => {
                return Err(ValidationError::new(
                    "flow_shift",
                    format!(
                        "{} sets its own timestep shift (from the image size, or fixed by its training); \
                         flow_shift cannot be set",
                        info.pipeline_class
                    ),
                ))
            }
            Some(shift) if !(shift.is_finite() && shift > 0.0) => {
                return Err(ValidationError::new("flow_shift", format!("must be a finite number > 0, got {shift}")))
            }
            Some(shift) => Some(shift),
            None => defaults.flow_shift,
        };

        let cfg_enabled = match info.guidance {
            GuidanceMode::EmbeddedWithTrueCfg => {
                true_cfg(&negative_prompt, true_cfg_scale, "is guidance-distilled", info)?
            }
            GuidanceMode::TrueCfg => {
                if request.guidance_scale.is_some() {
                    return Err(ValidationError::new(
                        "guidance_scale",
                        format!(
                            "{} has no guidance embedding, so guidance_scale would do nothing; guide with \
                             true_cfg_scale and a negative_prompt",
                            info.pipeline_class
                        ),
                    ));
                }
                // The model's own negative prompt (Qwen-Image's " ") with true_cfg_scale <= 1 only
                // turns guidance off; one the request gives must act.
                let given = request.negative_prompt.as_ref().map(|_| &negative_prompt);
                match given {
                    Some(negative) => true_cfg(negative, true_cfg_scale, "guides only through true CFG", info)?,
                    None => negative_prompt.is_some() && true_cfg_scale > 1.0,
                }
            }
            GuidanceMode::ClassifierFree => guidance_scale > 1.0,
            GuidanceMode::ClassifierFreeAboveZero => guidance_scale > 0.0,
        };
        let (cfg_normalization, cfg_truncation) = resolve_cfg_shaping(request, info)?;

        if let Some(quality) = request.output_quality {
            declared_bounds("output_quality", f64::from(quality))?;
        }
        let guidance_scale_2 = match (request.guidance_scale_2, info.supports_guidance_scale_2) {
            (Some(_), false) => {
                return Err(ValidationError::new(
                    "guidance_scale_2",
                    format!("{} has no second expert; guidance_scale_2 cannot be set", info.pipeline_class),
                ))
            }
            (Some(scale), true) => {
                non_negative("guidance_scale_2", scale)?;
                Some(scale)
            }
            (None, true) => Some(defaults.guidance_scale_2.unwrap_or(guidance_scale)),
            (None, false) => None,
        };
        let fps = match (info.output, request.fps) {
            (OutputKind::Image, Some(_)) => {
                return Err(ValidationError::new(
                    "fps",
                    format!("{} makes images; fps applies to videos", info.pipeline_class),
                ))
            }
            (OutputKind::Image, None) => None,
            (OutputKind::Video, requested) => {
                let fps = requested.or(defaults.fps).unwrap_or(16);
                declared_bounds("fps", f64::from(fps))?;
                Some(fps)
            }
        };
        let output_format = resolve_output_format(request.output_format, info)?;

        Ok(Self {
            prompt: request.prompt.clone(),
            negative_prompt,
            width,
            height,
            num_frames,
            num_inference_steps,
            guidance_scale,
            true_cfg_scale,
            seed: request.seed.unwrap_or_else(random_seed),
            max_sequence_length,
            num_outputs,
            flow_shift,
            guidance_scale_2,
            cfg_normalization,
            cfg_truncation,
            fps,
            image_path: image_paths.first().cloned(),
            image_paths,
            last_image_path,
            prior_token_ids: request.prior_token_ids.clone().unwrap_or_default(),
            lora: crate::lora::check_request_loras(request.lora.as_deref().unwrap_or_default())?,
            cfg_enabled,
            output_format,
            output_quality: request.output_quality,
            notes,
            batch_extra: batch_extra_values(request, &info.extra_batch_key_fields),
        })
    }
}

/// Whether true CFG runs: a negative prompt and `true_cfg_scale > 1` together, or neither; one
/// without the other would be silently ignored, so it is an error naming the missing half.
fn true_cfg(
    negative_prompt: &Option<String>,
    true_cfg_scale: f64,
    why: &str,
    info: &PipelineInfo,
) -> Result<bool, ValidationError> {
    match (negative_prompt, true_cfg_scale > 1.0) {
        (Some(_), true) => Ok(true),
        (None, false) => Ok(false),
        (Some(_), false) => Err(ValidationError::new(
            "negative_prompt",
            format!(
                "{} {why}: a negative prompt only acts through true CFG, so it needs true_cfg_scale > 1 \
                 (got {true_cfg_scale})",
                info.pipeline_class
            ),
        )),
        (None, true) => Err(ValidationError::new(
            "true_cfg_scale",
            format!("true_cfg_scale {true_cfg_scale} > 1 needs a negative_prompt to guide against"),
        )),
    }
}

/// `cfg_normalization` and `cfg_truncation` with their neutral defaults (0: no cap, 1: every step guided)
/// for pipelines whose guidance takes them, `None` for the others; asking another pipeline for either is an
/// error naming the field, as it would change nothing.
fn resolve_cfg_shaping(
    request: &GenerationRequest,
    info: &PipelineInfo,
) -> Result<(Option<f64>, Option<f64>), ValidationError> {
    let fields =
        [("cfg_normalization", request.cfg_normalization, 0.0), ("cfg_truncation", request.cfg_truncation, 1.0)];
    let takes_them = info.guidance == GuidanceMode::ClassifierFreeAboveZero;
    let mut resolved = [None, None];
    for (slot, (field, value, neutral)) in resolved.iter_mut().zip(fields) {
        match (value, takes_them) {
            (Some(_), false) => {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "{}'s guidance has no {field}; it applies to Z-Image's classifier-free guidance",
                        info.pipeline_class
                    ),
                ))
            }
            (Some(value), true) => {
                declared_bounds(field, value)?;
                *slot = Some(value);
            }
            (None, true) => *slot = Some(neutral),
            (None, false) => {}
        }
    }
    Ok((resolved[0], resolved[1]))
}

/// The JSON text of each named field of `request` (`null` for a field it leaves out or does not have),
/// so that any request field a pipeline declares can key batches.
fn batch_extra_values(request: &GenerationRequest, fields: &[String]) -> Vec<String> {
    if fields.is_empty() {
        return Vec::new();
    }
    let value = serde_json::to_value(request).unwrap_or_default();
    fields.iter().map(|field| value.get(field).cloned().unwrap_or_default().to_string()).collect()
}

fn check_text(field: &str, text: &str) -> Result<(), ValidationError> {
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ValidationError::new(
            field,
            format!("is {chars} characters; at most {MAX_PROMPT_CHARS} are allowed"),
        ));
    }
    Ok(())
}

fn in_range(field: &str, value: u32, min: u32, max: u32) -> Result<(), ValidationError> {
    if value < min || value > max {
        return Err(ValidationError::new(field, format!("must be between {min} and {max}, got {value}")));
    }
    Ok(())
}

/// Checks a value against the bounds its field declares in [`GenerationRequest`]'s table (the bounds
/// that do not depend on the pipeline).
fn declared_bounds(field: &str, value: f64) -> Result<(), ValidationError> {
    let Some(bounds) = GenerationRequest::field(field).map(|spec| spec.value) else {
        return Ok(());
    };
    let above_min = |min: f64| if bounds.min_exclusive { value > min } else { value >= min };
    if value.is_finite() && bounds.min.is_none_or(above_min) && bounds.max.is_none_or(|max| value <= max) {
        return Ok(());
    }
    let lower = match bounds.min {
        Some(min) if bounds.min_exclusive => format!("> {min}"),
        Some(min) => format!("at least {min}"),
        None => String::new(),
    };
    let message = match (bounds.min, bounds.max) {
        (Some(min), Some(max)) if !bounds.min_exclusive => format!("must be between {min} and {max}, got {value}"),
        (Some(_), Some(max)) => format!("must be {lower} and at most {max}, got {value}"),
        (Some(_), None) => format!("must be {lower}, got {value}"),
        (None, Some(max)) => format!("must be at most {max}, got {value}"),
        (None, None) => format!("must be a finite number, got {value}"),
    };
    Err(ValidationError::new(field, message))
}

fn non_negative(field: &str, value: f64) -> Result<(), ValidationError> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(ValidationError::new(field, format!("must be a finite number >= 0, got {value}")));
    }
    Ok(())
}

fn check_size(field: &str, value: u32, info: &PipelineInfo) -> Result<(), ValidationError> {
    let limits = &info.limits;
    if value < limits.min_size || value > limits.max_side || !value.is_multiple_of(limits.size_multiple) {
        return Err(ValidationError::new(
            field,
            format!(
                "must be a multiple of {} between {} and {} for {}, got {value}",
                limits.size_multiple, limits.min_size, limits.max_side, info.pipeline_class
            ),
        ));
    }
    Ok(())
}

/// A size taken from the input images: within the pipeline's limits, or an error that says where it
/// came from (the client gave no size, so naming `width` alone would puzzle it).
fn check_input_derived_size((width, height): (u32, u32), info: &PipelineInfo) -> Result<(u32, u32), ValidationError> {
    let checks = [check_size("width", width, info), check_size("height", height, info)];
    let pixels = u64::from(width) * u64::from(height);
    if checks.iter().all(Result::is_ok) && pixels <= info.limits.max_pixels {
        return Ok((width, height));
    }
    let limits = &info.limits;
    Err(ValidationError::new(
        "size",
        format!(
            "no size was given, and the input image's aspect ratio gives {width}x{height}, outside what {} \
             makes (sides multiples of {} between {} and {}, at most {} pixels); give a size",
            info.pipeline_class, limits.size_multiple, limits.min_size, limits.max_side, limits.max_pixels
        ),
    ))
}

fn resolve_frames(requested: u32, info: &PipelineInfo, notes: &mut Vec<String>) -> Result<u32, ValidationError> {
    let max = info.limits.max_frames;
    match info.limits.frame_rule {
        FrameRule::Single if requested == 1 => Ok(1),
        FrameRule::Single => Err(ValidationError::new(
            "num_frames",
            format!("{} makes images: num_frames must be 1, got {requested}", info.pipeline_class),
        )),
        FrameRule::FourKPlusOne => {
            in_range("num_frames", requested, 1, max)?;
            let used = (requested - 1) / 4 * 4 + 1;
            if used != requested {
                notes.push(format!("num_frames {requested} rounded down to {used} (this model takes 4k+1 frames)"));
            }
            Ok(used)
        }
    }
}

/// The input images, from `image_path` or `image_paths`, checked against what the pipeline takes.
fn resolve_images(request: &GenerationRequest, info: &PipelineInfo) -> Result<Vec<String>, ValidationError> {
    let given: Vec<&String> = match (&request.image_path, &request.image_paths) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::new("image_paths", "give image_path or image_paths, not both"))
        }
        (Some(path), None) => vec![path],
        (None, paths) => paths.iter().flatten().collect(),
    };
    let most = match info.image_input {
        ImageInput::None => 0,
        ImageInput::Optional | ImageInput::Required => info.max_input_images as usize,
    };
    match (info.image_input, given.len()) {
        (ImageInput::None, 1..) => Err(ValidationError::new(
            "image",
            format!("{} is {} and takes no input image", info.pipeline_class, info.task),
        )),
        (ImageInput::Required, 0) => Err(ValidationError::new(
            "image",
            format!("{} generates from an image: an input image is required", info.pipeline_class),
        )),
        (_, count) if count > most => Err(ValidationError::new(
            "image_paths",
            format!(
                "{} takes at most {most} input image{}, got {count}",
                info.pipeline_class,
                if most == 1 { "" } else { "s" }
            ),
        )),
        _ => given.into_iter().map(|path| absolute_file(path)).collect(),
    }
}

/// The last frame of first-last-frame image-to-video, checked against what the pipeline takes: it
/// ends a video that starts from the input image, so it needs one.
fn resolve_last_image(
    request: &GenerationRequest,
    info: &PipelineInfo,
    image_paths: &[String],
) -> Result<Option<String>, ValidationError> {
    const FIELD: &str = "last_image_path";
    match (info.last_image_input, request.last_image_path.as_deref()) {
        (ImageInput::None, Some(_)) => Err(ValidationError::new(
            FIELD,
            format!(
                "{} ({}) takes no last frame; first-last-frame checkpoints (Wan2.1-FLF2V, Wan2.2 I2V-A14B) do",
                info.pipeline_class, info.task
            ),
        )),
        (ImageInput::Required, None) => Err(ValidationError::new(
            FIELD,
            format!(
                "this {} checkpoint generates between a first and a last frame: a last frame is required",
                info.pipeline_class
            ),
        )),
        (_, Some(_)) if image_paths.is_empty() => {
            Err(ValidationError::new("image", "a last frame needs an input image (the first frame) too"))
        }
        (_, Some(path)) => absolute_file(path).map(Some).map_err(|err| ValidationError::new(FIELD, err.message)),
        (_, None) => Ok(None),
    }
}

/// An input file by its canonical path: the request names it the same wherever it runs and is
/// recorded (a relative path means the submitter's working directory, which the engine shares).
fn absolute_file(path: &str) -> Result<String, ValidationError> {
    match std::fs::canonicalize(path) {
        Ok(absolute) if absolute.is_file() => Ok(absolute.to_string_lossy().into_owned()),
        _ => Err(ValidationError::new("image", format!("input image file {path:?} does not exist"))),
    }
}

fn resolve_output_format(
    requested: Option<OutputFormat>,
    info: &PipelineInfo,
) -> Result<OutputFormat, ValidationError> {
    match (info.output, requested) {
        (OutputKind::Image, None) => Ok(OutputFormat::Png),
        (OutputKind::Video, None) => Ok(OutputFormat::Mp4),
        (_, Some(OutputFormat::Npy)) => Ok(OutputFormat::Npy),
        (OutputKind::Image, Some(format)) if format.is_image_file() => Ok(format),
        (OutputKind::Video, Some(OutputFormat::Mp4)) => Ok(OutputFormat::Mp4),
        (OutputKind::Image, Some(_)) => {
            Err(ValidationError::new("output_format", "image models write png, jpeg, webp or npy"))
        }
        (OutputKind::Video, Some(_)) => Err(ValidationError::new("output_format", "video models write mp4 or npy")),
    }
}

/// A fresh seed for requests that did not fix one. `RandomState` is keyed from the OS's randomness
/// once per process and mixed per call, which is all an unseeded request needs.
fn random_seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InputSizeRule, PipelineLimits, SamplingDefaults, SizeBucket, MAX_TIMEOUT_SECONDS};

    fn flux_info() -> PipelineInfo {
        PipelineInfo {
            model_path: "/m".into(),
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
                max_side: 4096,
                max_pixels: 2048 * 2048,
                max_frames: 1,
                frame_rule: FrameRule::Single,
                max_sequence_length: 512,
                max_steps: 1000,
                token_size: 16,
                frames_per_latent: 1,
            },
            defaults: SamplingDefaults {
                width: 1024,
                height: 1024,
                num_frames: 1,
                num_inference_steps: 28,
                guidance_scale: 3.5,
                true_cfg_scale: 1.0,
                max_sequence_length: 512,
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

    fn video_info() -> PipelineInfo {
        let mut info = flux_info();
        info.pipeline_class = "WanPipeline".into();
        info.limits.frame_rule = FrameRule::FourKPlusOne;
        info.limits.max_frames = 129;
        info.limits.frames_per_latent = 4;
        info.guidance = GuidanceMode::ClassifierFree;
        info.supports_flow_shift = true;
        info.output = OutputKind::Video;
        info.defaults.fps = Some(16);
        info
    }

    fn req(prompt: &str) -> GenerationRequest {
        GenerationRequest { prompt: prompt.into(), ..Default::default() }
    }

    fn field_of(request: GenerationRequest, info: &PipelineInfo) -> String {
        ResolvedRequest::resolve(&request, info).unwrap_err().field
    }

    #[test]
    fn defaults_come_from_the_pipeline() {
        let r = ResolvedRequest::resolve(&GenerationRequest { seed: Some(7), ..req("a cat") }, &flux_info()).unwrap();
        assert_eq!((r.width, r.height, r.num_inference_steps, r.max_sequence_length), (1024, 1024, 28, 512));
        assert_eq!(r.guidance_scale, 3.5);
        assert_eq!(r.seed, 7);
        assert!(!r.cfg_enabled);
        assert_eq!(r.num_outputs, 1);
    }

    #[test]
    fn prompt_must_be_non_empty_and_bounded() {
        let info = flux_info();
        assert_eq!(field_of(req(""), &info), "prompt");
        assert_eq!(field_of(req("   "), &info), "prompt");
        assert_eq!(field_of(req(&"x".repeat(MAX_PROMPT_CHARS + 1)), &info), "prompt");
        assert!(ResolvedRequest::resolve(&req(&"x".repeat(MAX_PROMPT_CHARS)), &info).is_ok());
    }

    #[test]
    fn numeric_ranges_name_their_field() {
        let info = flux_info();
        for (n, ok) in [(0, false), (1, true), (10, true), (11, false)] {
            let r = ResolvedRequest::resolve(&GenerationRequest { num_outputs_per_prompt: Some(n), ..req("a") }, &info);
            assert_eq!(r.is_ok(), ok, "n={n}");
        }
        for (steps, ok) in [(0, false), (1, true), (1000, true), (1001, false)] {
            let r =
                ResolvedRequest::resolve(&GenerationRequest { num_inference_steps: Some(steps), ..req("a") }, &info);
            assert_eq!(r.is_ok(), ok, "steps={steps}");
        }
        let err = ResolvedRequest::resolve(&GenerationRequest { num_inference_steps: Some(0), ..req("a") }, &info)
            .unwrap_err();
        assert_eq!(err.field, "num_inference_steps");
        assert!(err.message.contains("between 1 and 1000"), "{}", err.message);
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(field_of(GenerationRequest { guidance_scale: Some(bad), ..req("a") }, &info), "guidance_scale");
            assert_eq!(field_of(GenerationRequest { true_cfg_scale: Some(bad), ..req("a") }, &info), "true_cfg_scale");
        }
        assert_eq!(
            field_of(GenerationRequest { max_sequence_length: Some(513), ..req("a") }, &info),
            "max_sequence_length"
        );
        assert_eq!(field_of(GenerationRequest { output_quality: Some(0), ..req("a") }, &info), "output_quality");
    }

    #[test]
    fn steps_and_sides_follow_the_checkpoint_limits() {
        let mut info = flux_info();
        info.limits.max_steps = 3;
        assert!(
            ResolvedRequest::resolve(&GenerationRequest { num_inference_steps: Some(3), ..req("a") }, &info).is_ok()
        );
        let err = ResolvedRequest::resolve(&GenerationRequest { num_inference_steps: Some(4), ..req("a") }, &info)
            .unwrap_err();
        assert_eq!(err.field, "num_inference_steps");
        assert!(err.message.contains("between 1 and 3"), "{}", err.message);
        info.limits.max_side = 512;
        let wide = GenerationRequest { width: Some(528), height: Some(64), num_inference_steps: Some(1), ..req("a") };
        let err = ResolvedRequest::resolve(&wide, &info).unwrap_err();
        assert_eq!(err.field, "width");
        assert!(err.message.contains("between 16 and 512"), "{}", err.message);
    }

    #[test]
    fn cost_is_outputs_tokens_steps_and_branches() {
        let flux = flux_info();
        let r = ResolvedRequest::resolve(
            &GenerationRequest {
                num_outputs_per_prompt: Some(10),
                width: Some(2048),
                height: Some(2048),
                num_inference_steps: Some(1000),
                ..req("a")
            },
            &flux,
        )
        .unwrap();
        let cost = r.cost(&flux.limits);
        assert_eq!((cost.outputs, cost.tokens, cost.steps, cost.branches), (10, 128 * 128, 1000, 1));
        assert_eq!(cost.token_steps(), 163_840_000);
        assert!(cost.describe_token_steps().starts_with("163840000 token-steps (10 outputs × 16384 latent tokens"));
        // Wan: 81 frames are 21 latent frames; guidance on doubles the forwards.
        let wan = video_info();
        let r = ResolvedRequest::resolve(
            &GenerationRequest {
                width: Some(832),
                height: Some(480),
                num_frames: Some(81),
                num_inference_steps: Some(50),
                guidance_scale: Some(5.0),
                ..req("a")
            },
            &wan,
        )
        .unwrap();
        assert_eq!(r.cost(&wan.limits).token_steps(), 52 * 30 * 21 * 50 * 2);
        // FLUX.1-dev's defaults: 1024², 28 steps, no CFG.
        assert_eq!(flux.default_request_cost().token_steps(), 64 * 64 * 28);
    }

    #[test]
    fn pixels_are_outputs_width_height_and_frames() {
        // The audit's request: 10 images of 2048² in 1 step is little denoising but 42 megapixels
        // to decode, encode and send.
        let flux = flux_info();
        let audit = GenerationRequest {
            num_outputs_per_prompt: Some(10),
            width: Some(2048),
            height: Some(2048),
            num_inference_steps: Some(1),
            ..req("a")
        };
        let cost = ResolvedRequest::resolve(&audit, &flux).unwrap().cost(&flux.limits);
        assert_eq!((cost.size, cost.frames), ((2048, 2048), 1));
        assert_eq!(cost.pixels(), 41_943_040);
        assert_eq!(cost.describe_pixels(), "41943040 output pixels (10 outputs × 2048×2048 pixels × 1 frames)");
        assert_eq!(flux.default_request_cost().pixels(), 1024 * 1024);
        // Video: every frame counts, not the latent frames.
        let wan = video_info();
        let clip = GenerationRequest { width: Some(832), height: Some(480), num_frames: Some(81), ..req("a") };
        assert_eq!(ResolvedRequest::resolve(&clip, &wan).unwrap().cost(&wan.limits).pixels(), 832 * 480 * 81);
        // Saturates instead of overflowing.
        let huge = RequestCost { outputs: u32::MAX, size: (u32::MAX, u32::MAX), frames: u32::MAX, ..cost };
        assert_eq!(huge.pixels(), u64::MAX);
    }

    #[test]
    fn timeouts_must_be_positive_and_bounded() {
        let info = flux_info();
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_TIMEOUT_SECONDS * 2.0] {
            assert_eq!(
                field_of(GenerationRequest { timeout_seconds: Some(bad), ..req("a") }, &info),
                "timeout_seconds"
            );
        }
        assert!(ResolvedRequest::resolve(&GenerationRequest { timeout_seconds: Some(0.5), ..req("a") }, &info).is_ok());
    }

    #[test]
    fn sizes_follow_the_pipeline_limits() {
        let info = flux_info();
        assert_eq!(field_of(GenerationRequest { width: Some(1000), ..req("a") }, &info), "width");
        assert_eq!(field_of(GenerationRequest { height: Some(8), ..req("a") }, &info), "height");
        assert_eq!(field_of(GenerationRequest { width: Some(4096), height: Some(4096), ..req("a") }, &info), "size");
        let mut wan = video_info();
        wan.limits.size_multiple = 32;
        let err = ResolvedRequest::resolve(&GenerationRequest { width: Some(848), ..req("a") }, &wan).unwrap_err();
        assert!(err.message.contains("multiple of 32"), "{}", err.message);
    }

    #[test]
    fn frames_follow_the_frame_rule() {
        assert_eq!(field_of(GenerationRequest { num_frames: Some(9), ..req("a") }, &flux_info()), "num_frames");
        let wan = video_info();
        let r = ResolvedRequest::resolve(&GenerationRequest { num_frames: Some(83), ..req("a") }, &wan).unwrap();
        assert_eq!(r.num_frames, 81);
        assert_eq!(r.notes.len(), 1);
        assert_eq!(field_of(GenerationRequest { num_frames: Some(0), ..req("a") }, &wan), "num_frames");
        assert_eq!(field_of(GenerationRequest { num_frames: Some(130), ..req("a") }, &wan), "num_frames");
    }

    #[test]
    fn true_cfg_rules_for_guidance_distilled_models() {
        let info = flux_info();
        let neg = GenerationRequest { negative_prompt: Some("blurry".into()), ..req("a") };
        assert_eq!(field_of(neg.clone(), &info), "negative_prompt");
        assert_eq!(field_of(GenerationRequest { true_cfg_scale: Some(4.0), ..req("a") }, &info), "true_cfg_scale");
        let r = ResolvedRequest::resolve(&GenerationRequest { true_cfg_scale: Some(4.0), ..neg }, &info).unwrap();
        assert!(r.cfg_enabled);
    }

    #[test]
    fn true_cfg_without_a_guidance_embedding() {
        // Qwen-Image: true CFG 4 against the model's own negative prompt " " by default.
        let mut info = flux_info();
        info.guidance = GuidanceMode::TrueCfg;
        info.defaults.negative_prompt = Some(" ".into());
        info.defaults.true_cfg_scale = 4.0;
        assert!(ResolvedRequest::resolve(&req("a"), &info).unwrap().cfg_enabled);
        assert_eq!(info.default_request_cost().branches, 2);
        // true_cfg_scale 1 turns it off; the default negative prompt then does nothing and is no error.
        let off = GenerationRequest { true_cfg_scale: Some(1.0), ..req("a") };
        assert!(!ResolvedRequest::resolve(&off, &info).unwrap().cfg_enabled);
        // A negative prompt the request gives must act.
        let neg = GenerationRequest { negative_prompt: Some("blurry".into()), ..off };
        let err = ResolvedRequest::resolve(&neg, &info).unwrap_err();
        assert_eq!(err.field, "negative_prompt");
        assert!(err.message.contains("guides only through true CFG"), "{}", err.message);
        // guidance_scale feeds nothing here: refused, naming what to use.
        let err =
            ResolvedRequest::resolve(&GenerationRequest { guidance_scale: Some(5.0), ..req("a") }, &info).unwrap_err();
        assert_eq!(err.field, "guidance_scale");
        assert!(err.message.contains("true_cfg_scale"), "{}", err.message);
    }

    #[test]
    fn fields_a_pipeline_declares_key_batches_too() {
        let mut info = flux_info();
        let a = ResolvedRequest::resolve(&GenerationRequest { seed: Some(1), ..req("a") }, &info).unwrap();
        let b = ResolvedRequest::resolve(&GenerationRequest { seed: Some(2), ..req("b") }, &info).unwrap();
        assert_eq!(a.batch_key(), b.batch_key());
        info.extra_batch_key_fields = vec!["seed".into(), "no_such_field".into()];
        let a = ResolvedRequest::resolve(&GenerationRequest { seed: Some(1), ..req("a") }, &info).unwrap();
        let b = ResolvedRequest::resolve(&GenerationRequest { seed: Some(2), ..req("b") }, &info).unwrap();
        let c = ResolvedRequest::resolve(&GenerationRequest { seed: Some(1), ..req("c") }, &info).unwrap();
        assert_ne!(a.batch_key(), b.batch_key());
        assert_eq!(a.batch_key(), c.batch_key());
        assert_eq!(a.batch_key().extra, vec!["1".to_string(), "null".to_string()]);
    }

    #[test]
    fn classifier_free_guidance_switches_on_scale() {
        let wan = video_info();
        let on = ResolvedRequest::resolve(&GenerationRequest { guidance_scale: Some(5.0), ..req("a") }, &wan).unwrap();
        let off = ResolvedRequest::resolve(&GenerationRequest { guidance_scale: Some(1.0), ..req("a") }, &wan).unwrap();
        assert!(on.cfg_enabled && !off.cfg_enabled);
    }

    #[test]
    fn guidance_above_zero_switches_on_any_positive_scale() {
        // Z-Image: cond + s * (cond - uncond) runs for every s > 0 (diffusers' ZImagePipeline rule).
        let mut info = flux_info();
        info.guidance = GuidanceMode::ClassifierFreeAboveZero;
        info.defaults.guidance_scale = 0.0;
        let off = ResolvedRequest::resolve(&req("a"), &info).unwrap();
        assert!(!off.cfg_enabled);
        assert_eq!((off.cfg_normalization, off.cfg_truncation), (Some(0.0), Some(1.0)));
        assert_eq!(info.default_request_cost().branches, 1);
        let on = GenerationRequest { guidance_scale: Some(0.5), cfg_truncation: Some(0.6), ..req("a") };
        let on = ResolvedRequest::resolve(&on, &info).unwrap();
        assert!(on.cfg_enabled);
        assert_eq!(on.cfg_truncation, Some(0.6));
        info.defaults.guidance_scale = 4.0;
        assert_eq!(info.default_request_cost().branches, 2);
        let negative = GenerationRequest { cfg_normalization: Some(-1.0), ..req("a") };
        assert_eq!(field_of(negative, &info), "cfg_normalization");
    }

    #[test]
    fn cfg_shaping_only_where_the_guidance_takes_it() {
        for info in [flux_info(), video_info()] {
            let r = ResolvedRequest::resolve(&req("a"), &info).unwrap();
            assert_eq!((r.cfg_normalization, r.cfg_truncation), (None, None));
            let err = ResolvedRequest::resolve(&GenerationRequest { cfg_truncation: Some(0.5), ..req("a") }, &info)
                .unwrap_err();
            assert_eq!(err.field, "cfg_truncation");
            assert!(err.message.contains("Z-Image"), "{}", err.message);
            assert_eq!(
                field_of(GenerationRequest { cfg_normalization: Some(1.0), ..req("a") }, &info),
                "cfg_normalization"
            );
        }
    }

    #[test]
    fn flow_shift_only_where_supported() {
        assert_eq!(field_of(GenerationRequest { flow_shift: Some(3.0), ..req("a") }, &flux_info()), "flow_shift");
        let wan = video_info();
        assert_eq!(field_of(GenerationRequest { flow_shift: Some(0.0), ..req("a") }, &wan), "flow_shift");
        assert!(ResolvedRequest::resolve(&GenerationRequest { flow_shift: Some(3.0), ..req("a") }, &wan).is_ok());
    }

    #[test]
    fn batch_keys_separate_shapes_but_not_prompts_seeds_or_guidance() {
        let info = flux_info();
        let base = ResolvedRequest::resolve(&GenerationRequest { seed: Some(1), ..req("a") }, &info).unwrap();
        let same = ResolvedRequest::resolve(
            &GenerationRequest { seed: Some(2), guidance_scale: Some(7.0), ..req("another prompt") },
            &info,
        )
        .unwrap();
        assert_eq!(base.batch_key(), same.batch_key());
        for other in [
            GenerationRequest { width: Some(512), ..req("a") },
            GenerationRequest { num_inference_steps: Some(4), ..req("a") },
            GenerationRequest { max_sequence_length: Some(256), ..req("a") },
            GenerationRequest { negative_prompt: Some("x".into()), true_cfg_scale: Some(2.0), ..req("a") },
        ] {
            let r = ResolvedRequest::resolve(&other, &info).unwrap();
            assert_ne!(base.batch_key(), r.batch_key(), "{other:?}");
        }
    }

    #[test]
    fn video_fields_follow_the_pipeline() {
        let flux = flux_info();
        assert_eq!(field_of(GenerationRequest { fps: Some(24), ..req("a") }, &flux), "fps");
        assert_eq!(field_of(GenerationRequest { guidance_scale_2: Some(3.0), ..req("a") }, &flux), "guidance_scale_2");
        assert_eq!(
            field_of(GenerationRequest { output_format: Some(OutputFormat::Mp4), ..req("a") }, &flux),
            "output_format"
        );
        let mut wan = video_info();
        let r = ResolvedRequest::resolve(&req("a"), &wan).unwrap();
        assert_eq!((r.fps, r.output_format, r.guidance_scale_2), (Some(16), OutputFormat::Mp4, None));
        assert_eq!(field_of(GenerationRequest { fps: Some(0), ..req("a") }, &wan), "fps");
        assert_eq!(
            field_of(GenerationRequest { output_format: Some(OutputFormat::Png), ..req("a") }, &wan),
            "output_format"
        );
        wan.supports_guidance_scale_2 = true;
        wan.defaults.guidance_scale_2 = Some(3.0);
        assert_eq!(ResolvedRequest::resolve(&req("a"), &wan).unwrap().guidance_scale_2, Some(3.0));
    }

    #[test]
    fn input_images_follow_the_pipeline() {
        let image = tempfile_path();
        let with_image = GenerationRequest { image_path: Some(image.clone()), ..req("a") };
        assert_eq!(field_of(with_image.clone(), &flux_info()), "image");
        let mut i2v = video_info();
        i2v.image_input = ImageInput::Required;
        assert_eq!(field_of(req("a"), &i2v), "image");
        let resolved = ResolvedRequest::resolve(&with_image, &i2v).unwrap();
        assert!(resolved.batch_key().has_image);
        let missing = GenerationRequest { image_path: Some("/no/such/image.png".into()), ..req("a") };
        assert_eq!(field_of(missing, &i2v), "image");
        // A relative path is the working directory's; the request carries the canonical path.
        let canonical = std::fs::canonicalize(&image).unwrap().to_string_lossy().into_owned();
        let up = "../".repeat(std::env::current_dir().unwrap().components().count() - 1);
        for given in [format!("{up}{}", image.trim_start_matches('/')), image.clone()] {
            let request = GenerationRequest { image_path: Some(given), ..req("a") };
            assert_eq!(ResolvedRequest::resolve(&request, &i2v).unwrap().image_path, Some(canonical.clone()));
        }
        // `image_paths` is the list form; one image fills both resolved fields.
        let listed = GenerationRequest { image_paths: Some(vec![image.clone()]), ..req("a") };
        let resolved = ResolvedRequest::resolve(&listed, &i2v).unwrap();
        assert_eq!((resolved.image_path.clone(), resolved.image_paths), (Some(canonical.clone()), vec![canonical]));
        let both = GenerationRequest { image_path: Some(image.clone()), ..listed.clone() };
        assert_eq!(field_of(both, &i2v), "image_paths");
        let two = GenerationRequest { image_paths: Some(vec![image.clone(), image.clone()]), ..req("a") };
        let err = ResolvedRequest::resolve(&two, &i2v).unwrap_err();
        assert_eq!((err.field.as_str(), err.message.contains("at most 1 input image, got 2")), ("image_paths", true));
        assert_eq!(field_of(GenerationRequest { image_paths: Some(vec![]), ..req("a") }, &i2v), "image");
        assert_eq!(field_of(listed, &flux_info()), "image");
        let _ = std::fs::remove_file(image);
    }

    #[test]
    fn a_last_frame_follows_the_pipeline() {
        let first = png_file("first", 64, 64);
        let last = png_file("last", 64, 64);
        let mut i2v = video_info();
        i2v.image_input = ImageInput::Required;
        let flf =
            GenerationRequest { image_path: Some(first.clone()), last_image_path: Some(last.clone()), ..req("a") };
        // A checkpoint that takes no last frame says so, naming the field.
        let err = ResolvedRequest::resolve(&flf, &i2v).unwrap_err();
        assert_eq!((err.field.as_str(), err.message.contains("takes no last frame")), ("last_image_path", true));
        i2v.last_image_input = ImageInput::Optional;
        let canonical = std::fs::canonicalize(&last).unwrap().to_string_lossy().into_owned();
        assert_eq!(ResolvedRequest::resolve(&flf, &i2v).unwrap().last_image_path, Some(canonical));
        let first_only = GenerationRequest { image_path: Some(first.clone()), ..req("a") };
        assert_eq!(ResolvedRequest::resolve(&first_only, &i2v).unwrap().last_image_path, None);
        // A last frame ends a video that starts from the input image.
        let mut optional_first = i2v.clone();
        optional_first.image_input = ImageInput::Optional;
        let alone = GenerationRequest { last_image_path: Some(last.clone()), ..req("a") };
        assert_eq!(field_of(alone, &optional_first), "image");
        let missing = GenerationRequest { last_image_path: Some("/no/such/last.png".into()), ..first_only.clone() };
        assert_eq!(field_of(missing, &i2v), "last_image_path");
        i2v.last_image_input = ImageInput::Required;
        assert_eq!(field_of(first_only, &i2v), "last_image_path");
        for path in [first, last] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn a_pipeline_says_how_many_input_images_it_takes() {
        let image = png_file("count", 64, 64);
        let mut edit = flux_info();
        edit.image_input = ImageInput::Required;
        edit.max_input_images = 3;
        let three = GenerationRequest { image_paths: Some(vec![image.clone(); 3]), ..req("a") };
        assert_eq!(ResolvedRequest::resolve(&three, &edit).unwrap().image_paths.len(), 3);
        let four = GenerationRequest { image_paths: Some(vec![image.clone(); 4]), ..req("a") };
        let err = ResolvedRequest::resolve(&four, &edit).unwrap_err();
        assert_eq!(err.field, "image_paths");
        assert!(err.message.contains("at most 3 input images, got 4"), "{}", err.message);
        // A model that takes no image takes none, whatever its count says.
        let mut t2i = flux_info();
        t2i.max_input_images = 3;
        assert_eq!(field_of(GenerationRequest { image_paths: Some(vec![image.clone()]), ..req("a") }, &t2i), "image");
        let _ = std::fs::remove_file(image);
    }

    #[test]
    fn outputs_take_the_first_input_images_size_where_the_pipeline_says_so() {
        let (wide, large, tall) =
            (png_file("first-wide", 120, 80), png_file("first-large", 4000, 3000), png_file("first-tall", 72, 100));
        let mut flux2 = flux_info();
        flux2.image_input = ImageInput::Optional;
        flux2.max_input_images = 4;
        flux2.defaults.size_from_inputs = Some(InputSizeRule::FirstInputWithinArea { max_area: 1024 * 1024 });
        let size = |paths: &[&String], width: Option<u32>| {
            let paths = paths.iter().map(|path| path.to_string()).collect();
            let request = GenerationRequest { image_paths: Some(paths), width, ..req("a") };
            let resolved = ResolvedRequest::resolve(&request, &flux2).unwrap();
            (resolved.width, resolved.height)
        };
        // The first image's size on the 16-pixel grid, shrunk to 1 MP where larger; later images do not count.
        assert_eq!(size(&[&wide, &large], None), (112, 80));
        assert_eq!(size(&[&large, &tall], None), (1168, 880));
        assert_eq!(size(&[&tall], None), (64, 96));
        // A size the request gives wins; text-to-image keeps the default.
        assert_eq!(size(&[&wide], Some(512)), (512, 1024));
        let r = ResolvedRequest::resolve(&req("a"), &flux2).unwrap();
        assert_eq!((r.width, r.height), (1024, 1024));
        for path in [wide, large, tall] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn outputs_take_the_bucket_nearest_the_first_images_aspect_where_the_pipeline_says_so() {
        let (wide, tall) = (png_file("bucket-wide", 1280, 720), png_file("bucket-tall", 40, 90));
        let mut i2v = flux_info();
        i2v.image_input = ImageInput::Required;
        let bucket =
            |width: u32, height: u32| SizeBucket { width, height, ratio: f64::from(height) / f64::from(width) };
        let buckets = vec![bucket(1024, 512), bucket(512, 512), bucket(512, 1024)];
        i2v.defaults.size_from_inputs = Some(InputSizeRule::FirstInputNearestBucket { buckets });
        let size = |path: &String| {
            let request = GenerationRequest { image_paths: Some(vec![path.clone()]), ..req("a") };
            let resolved = ResolvedRequest::resolve(&request, &i2v).unwrap();
            (resolved.width, resolved.height)
        };
        // 16:9 (0.5625): at or over it, 1.0 is the only bucket (0.5 is under); 40x90 (2.25): 2.0.
        assert_eq!(size(&wide), (512, 512));
        assert_eq!(size(&tall), (512, 1024));
        for path in [wide, tall] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn pipelines_that_do_not_say_take_one_image_and_the_default_size() {
        let mut json = serde_json::to_value(flux_info()).unwrap();
        json.as_object_mut().unwrap().remove("max_input_images");
        json["defaults"].as_object_mut().unwrap().remove("size_from_inputs");
        let info: PipelineInfo = serde_json::from_value(json).unwrap();
        assert_eq!((info.max_input_images, info.defaults.size_from_inputs), (1, None));
    }

    /// A PNG header declaring `width` x `height`, in a file of its own.
    fn png_file(name: &str, width: u32, height: u32) -> String {
        let path = std::env::temp_dir().join(format!("sgl-core-test-{}-{name}.png", std::process::id()));
        let mut header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        header.extend_from_slice(&width.to_be_bytes());
        header.extend_from_slice(&height.to_be_bytes());
        header.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        std::fs::write(&path, header).unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn outputs_take_the_last_input_images_aspect_ratio_when_no_size_is_given() {
        let (square, wide, tall) =
            (png_file("square", 500, 500), png_file("wide", 1536, 1024), png_file("tall", 720, 1280));
        let mut edit = flux_info();
        edit.image_input = ImageInput::Required;
        edit.max_input_images = 3;
        edit.defaults.size_from_inputs = Some(InputSizeRule::LastInputAspectAtArea { area: 1024 * 1024 });
        let size = |edit: &PipelineInfo, paths: &[&String], width: Option<u32>, height: Option<u32>| {
            let paths = paths.iter().map(|path| path.to_string()).collect();
            let request = GenerationRequest { image_paths: Some(paths), width, height, ..req("a") };
            let resolved = ResolvedRequest::resolve(&request, edit).unwrap();
            (resolved.width, resolved.height)
        };
        assert_eq!(size(&edit, &[&square], None, None), (1024, 1024));
        assert_eq!(size(&edit, &[&square, &wide], None, None), (1248, 832));
        assert_eq!(size(&edit, &[&wide, &tall], None, None), (768, 1376));
        // A size the request gives wins; half a size keeps the model's default for the other half.
        assert_eq!(size(&edit, &[&wide], Some(512), Some(256)), (512, 256));
        assert_eq!(size(&edit, &[&wide], Some(512), None), (512, 1024));
        // Without the rule, or without an image, the default size.
        edit.image_input = ImageInput::Optional;
        let r = ResolvedRequest::resolve(&req("a"), &edit).unwrap();
        assert_eq!((r.width, r.height), (1024, 1024));
        edit.defaults.size_from_inputs = None;
        assert_eq!(size(&edit, &[&wide], None, None), (1024, 1024));
        // A ratio whose size the model cannot make says so, naming size.
        let sliver = png_file("sliver", 4000, 10);
        edit.defaults.size_from_inputs = Some(InputSizeRule::LastInputAspectAtArea { area: 1024 * 1024 });
        let request = GenerationRequest { image_paths: Some(vec![sliver.clone()]), ..req("a") };
        let err = ResolvedRequest::resolve(&request, &edit).unwrap_err();
        assert_eq!(err.field, "size");
        assert!(err.message.contains("aspect ratio"), "{}", err.message);
        // An unreadable image cannot give its size.
        let junk = png_file("junk", 64, 64);
        std::fs::write(&junk, b"not really a png").unwrap();
        let request = GenerationRequest { image_paths: Some(vec![junk.clone()]), ..req("a") };
        assert_eq!(field_of(request, &edit), "image");
        for path in [square, wide, tall, sliver, junk] {
            let _ = std::fs::remove_file(path);
        }
    }

    fn tempfile_path() -> String {
        let path = std::env::temp_dir().join(format!("sgl-core-test-{}.png", std::process::id()));
        std::fs::write(&path, b"not really a png").unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn unseeded_requests_get_distinct_seeds() {
        let info = flux_info();
        let a = ResolvedRequest::resolve(&req("a"), &info).unwrap().seed;
        let b = ResolvedRequest::resolve(&req("a"), &info).unwrap().seed;
        assert_ne!(a, b);
    }
}
