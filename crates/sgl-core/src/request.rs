use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::declare_fields;
use crate::fields::{FieldValue, Route, ValueType, ALL_ROUTES};
use crate::lora::RequestLora;
use crate::ValidationError;

/// Longest prompt accepted, in characters. Text encoders truncate far earlier (512 T5 tokens);
/// the bound only keeps absurd payloads from reaching the tokenizer.
pub const MAX_PROMPT_CHARS: usize = 10_000;
/// Most outputs one request may ask for (OpenAI's `n` allows 1-10).
pub const MAX_OUTPUTS_PER_REQUEST: u32 = 10;
/// Longest `timeout_seconds` a request may ask for (a week); longer means "no deadline" in practice.
pub const MAX_TIMEOUT_SECONDS: f64 = 7.0 * 24.0 * 3600.0;
/// Highest frame rate a video output may have.
pub const MAX_FPS: u32 = 120;

declare_fields! {
    /// One generation request as every entry point submits it. `None` means "the model's default".
    ///
    /// This is the one declaration of a request field: its doc comment is its help everywhere, and
    /// the bracketed spec after its type says which HTTP routes take it (`routes`). Every field is a
    /// flag of `sgl-diffusion generate` and a keyword of `DiffGenerator.generate`, derived from
    /// [`crate::fields::Fields::FIELDS`]; [`crate::ResolvedRequest`] says what the pipeline receives.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct GenerationRequest {
        /// What to generate (at most 10 000 characters).
        pub prompt: String [.required().routes(ALL_ROUTES)],
        /// What to steer away from. Classifier-free models use it as the unconditional branch; on
        /// guidance-distilled models (FLUX.1) it acts only through true CFG, so it needs
        /// `true_cfg_scale` > 1.
        #[serde(default)]
        pub negative_prompt: Option<String> [.routes(ALL_ROUTES)],
        /// Width in pixels (a multiple of the model's size step); default: the model's.
        #[serde(default)]
        pub width: Option<u32> [.routes(&[Route::Images])],
        /// Height in pixels (a multiple of the model's size step); default: the model's.
        #[serde(default)]
        pub height: Option<u32> [.routes(&[Route::Images])],
        /// Frames of a video (rounded down to 4k+1 for Wan); image models take 1.
        #[serde(default)]
        pub num_frames: Option<u32> [.routes(&[Route::Videos])],
        /// Denoising steps; default: the model's.
        #[serde(default)]
        pub num_inference_steps: Option<u32> [.routes(ALL_ROUTES)],
        /// Guidance strength: the embedded guidance of distilled models (FLUX.1), classifier-free
        /// guidance of the others (on when > 1; Z-Image: on when > 0, adding this multiple of the
        /// conditional minus the unconditional prediction to the conditional one).
        #[serde(default)]
        pub guidance_scale: Option<f64> [.routes(ALL_ROUTES)],
        /// True classifier-free guidance of guidance-distilled models (FLUX.1): on when > 1, with a
        /// `negative_prompt` to guide against.
        #[serde(default)]
        pub true_cfg_scale: Option<f64> [.routes(&[Route::Images])],
        /// Seed of this request's own noise generator (0 to 2^64-1); drawn at random when absent.
        #[serde(default)]
        #[schema(format = "uint64")]
        pub seed: Option<u64> [.routes(ALL_ROUTES)],
        /// Most text-encoder tokens of the prompt; default: the model's.
        #[serde(default)]
        pub max_sequence_length: Option<u32> [.routes(&[Route::Images])],
        /// Outputs of this prompt, 1-10, each from its own noise (OpenAI's `n`).
        #[serde(default)]
        pub num_outputs_per_prompt: Option<u32> [.min(1).max(MAX_OUTPUTS_PER_REQUEST as i64)],
        /// Timestep shift of the sampler (video models); FLUX.1 derives its own from the size.
        #[serde(default)]
        pub flow_shift: Option<f64> [.routes(ALL_ROUTES)],
        /// Caps the norm of the guided prediction at this multiple of the conditional prediction's
        /// norm (Z-Image's CFG renormalisation); 0, the default, leaves it uncapped.
        #[serde(default)]
        pub cfg_normalization: Option<f64> [.routes(&[Route::Images]).min(0)],
        /// Turns classifier-free guidance off for the steps whose normalised time (1 - t/1000) is
        /// above this value (Z-Image's CFG truncation); the default 1 keeps it on for every step.
        #[serde(default)]
        pub cfg_truncation: Option<f64> [.routes(&[Route::Images]).min(0)],
        /// Guidance of the low-noise expert (Wan2.2 A14B); default: the model's, else `guidance_scale`.
        #[serde(default)]
        pub guidance_scale_2: Option<f64> [.routes(&[Route::Videos])],
        /// Frames per second of a video output (at most 120).
        #[serde(default)]
        pub fps: Option<u32> [.routes(&[Route::Videos]).min(1).max(MAX_FPS as i64)],
        /// Input image file for image-to-video (its first frame). HTTP clients upload the image
        /// (`input_reference`); the server stores the file. On the command line, `--image-path`.
        #[serde(default)]
        pub image_path: Option<String> [.no_flag()],
        /// Input image files, in order, for models that take several (reference images of image
        /// editing: Qwen-Image-Edit-Plus takes 1-3); `image_path` is the one-image form, give one or the
        /// other. On the command line, one `--image-path` per image.
        #[serde(default)]
        pub image_paths: Option<Vec<String>> [.flag("--image-path").repeat()],
        /// Last-frame image file of first-last-frame image-to-video (Wan2.1-FLF2V, Wan2.2 I2V-A14B):
        /// the video runs from the input image to this one. HTTP clients upload it (`last_frame`).
        #[serde(default)]
        pub last_image_path: Option<String>,
        /// The image tokens of an autoregressive prior, given instead of sampled (GLM-Image): one
        /// codebook id per 16x16 pixel patch of the output, row by row, as diffusers' `prior_token_ids`.
        #[serde(default)]
        pub prior_token_ids: Option<Vec<u32>> [.no_flag()],
        /// LoRA adapters for this request alone: `[{"nickname": ..., "strength": 1.0}]`, naming adapters
        /// registered with set_lora, applied in order on top of whatever is merged (at most 8). Requests
        /// with different adapters share batches.
        #[serde(default)]
        pub lora: Option<Vec<RequestLora>> [.no_flag().routes(ALL_ROUTES)],
        /// How outputs are encoded: png, jpeg, webp (images), mp4 (videos) or npy (exact float
        /// arrays); default: png for images, mp4 for videos.
        #[serde(default)]
        #[schema(inline)]
        pub output_format: Option<OutputFormat>,
        /// Encoder quality of lossy formats (jpeg, webp), 1-100.
        #[serde(default)]
        pub output_quality: Option<u8> [.routes(&[Route::Images]).min(1).max(100)],
        /// Seconds from submission after which the request is stopped (between two denoising steps
        /// if it runs) and fails with a deadline error (HTTP: 504 `deadline_exceeded`; a video job
        /// fails with `deadline_exceeded`); at most the engine's `--request-timeout`.
        #[serde(default)]
        pub timeout_seconds: Option<f64> [.routes(ALL_ROUTES).above(0).max(MAX_TIMEOUT_SECONDS as i64)],
    }
}

/// How outputs are encoded before they leave Python.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
    /// float32 H×W×3 (image) or T×H×W×3 (video) array in [0, 1] as a `.npy` file, for
    /// `output_type="np"` in the Python API.
    Npy,
    /// H.264 video in yuv420p.
    Mp4,
}

impl FieldValue for OutputFormat {
    const TYPE: ValueType = ValueType::choice(&["png", "jpeg", "webp", "npy", "mp4"]);
}

impl OutputFormat {
    pub fn is_image_file(self) -> bool {
        matches!(self, Self::Png | Self::Jpeg | Self::Webp)
    }
}

impl GenerationRequest {
    /// Parses a JSON request, naming the offending field when a value has the wrong type.
    pub fn from_json(text: &str) -> Result<Self, ValidationError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            let field = if path == "." { "body".to_string() } else { path };
            ValidationError::new(field, err.into_inner().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::Fields;

    #[test]
    fn parse_error_names_the_field() {
        let err = GenerationRequest::from_json(r#"{"prompt":"a","seed":-1}"#).unwrap_err();
        assert_eq!(err.field, "seed");
        let err = GenerationRequest::from_json(r#"{"prompt":"a","width":"wide"}"#).unwrap_err();
        assert_eq!(err.field, "width");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = GenerationRequest::from_json(r#"{"prompt":"a","stepz":3}"#).unwrap_err();
        assert!(err.message.contains("stepz"), "{}", err.message);
    }

    #[test]
    fn full_u64_seed_range_parses() {
        let req = GenerationRequest::from_json(r#"{"prompt":"a","seed":18446744073709551615}"#).unwrap();
        assert_eq!(req.seed, Some(u64::MAX));
    }

    #[test]
    fn output_format_choices_are_its_serde_names() {
        let names = [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp, OutputFormat::Npy, OutputFormat::Mp4]
            .map(|format| match format {
                // A new format must be listed here and in `FieldValue::TYPE`.
                OutputFormat::Png | OutputFormat::Jpeg | OutputFormat::Webp | OutputFormat::Npy | OutputFormat::Mp4 => {
                    serde_json::to_value(format).unwrap()
                }
            });
        assert_eq!(serde_json::to_value(OutputFormat::TYPE.choices).unwrap(), serde_json::json!(names));
    }

    /// `required` in the table is what serde requires: the one field without a default.
    #[test]
    fn required_fields_are_those_serde_requires() {
        let full = serde_json::to_value(GenerationRequest::default()).unwrap();
        for field in GenerationRequest::FIELDS {
            let mut without = full.clone();
            without.as_object_mut().unwrap().remove(field.name);
            let missing = serde_json::from_value::<GenerationRequest>(without).is_err();
            assert_eq!(missing, field.required, "{}", field.name);
        }
    }

    #[test]
    fn output_format_names() {
        let req = GenerationRequest::from_json(r#"{"prompt":"a","output_format":"npy"}"#).unwrap();
        assert_eq!(req.output_format, Some(OutputFormat::Npy));
        assert!(GenerationRequest::from_json(r#"{"prompt":"a","output_format":"gif"}"#).is_err());
    }
}
