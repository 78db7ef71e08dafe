use serde::{Deserialize, Serialize};

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

/// One generation request as every entry point submits it. `None` means "the model's default".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub num_frames: Option<u32>,
    #[serde(default)]
    pub num_inference_steps: Option<u32>,
    #[serde(default)]
    pub guidance_scale: Option<f64>,
    #[serde(default)]
    pub true_cfg_scale: Option<f64>,
    /// Seed of this request's own noise generator; drawn at random when absent.
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub max_sequence_length: Option<u32>,
    #[serde(default)]
    pub num_outputs_per_prompt: Option<u32>,
    #[serde(default)]
    pub flow_shift: Option<f64>,
    /// Guidance of the low-noise expert (Wan2.2 A14B).
    #[serde(default)]
    pub guidance_scale_2: Option<f64>,
    /// Frames per second of a video output.
    #[serde(default)]
    pub fps: Option<u32>,
    /// Path of an input image file (image-to-video). Clients upload; the server stores the file.
    #[serde(default)]
    pub image_path: Option<String>,
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    /// Encoder quality for lossy formats, 1-100.
    #[serde(default)]
    pub output_quality: Option<u8>,
    /// Seconds from submission after which the request is cancelled (between two denoising steps
    /// if it runs) and fails with a deadline error; at most the engine's `--request-timeout`.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
}

/// How outputs are encoded before they leave Python.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    fn output_format_names() {
        let req = GenerationRequest::from_json(r#"{"prompt":"a","output_format":"npy"}"#).unwrap();
        assert_eq!(req.output_format, Some(OutputFormat::Npy));
        assert!(GenerationRequest::from_json(r#"{"prompt":"a","output_format":"gif"}"#).is_err());
    }
}
