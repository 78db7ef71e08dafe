//! Types shared by every entry point of sgl-diffusion (CLI, Python API, HTTP server).
//!
//! A request arrives as a [`GenerationRequest`] with optional fields, is resolved against the
//! [`PipelineInfo`] that the loaded pipeline exports (its defaults and limits), and becomes a
//! [`ResolvedRequest`] in which every value is concrete and has been validated. Size and frame rules
//! are never hard-coded here: they come from the pipeline.
//!
//! Each request field is declared once, on [`GenerationRequest`]; [`fields`] holds the table that every
//! other face (HTTP wire and OpenAPI, both CLIs, the Python API and mirror) is derived from.

mod error;
pub mod fields;
pub mod input_size;
pub mod lora;
mod output;
mod pipeline;
mod request;
mod resolve;

pub use error::ValidationError;
pub use fields::{FieldSpec, Fields};
pub use output::{
    EncodedOutput, GenerationOutput, MemoryCheckpoint, OutputMetadata, PerfMetrics, StageTiming, StepTiming,
};
pub use pipeline::{
    FrameRule, GuidanceMode, ImageInput, InputSizeRule, OutputKind, PipelineInfo, PipelineLimits, SamplingDefaults,
    SizeBucket,
};
pub use request::{
    GenerationRequest, OutputFormat, MAX_FPS, MAX_OUTPUTS_PER_REQUEST, MAX_PROMPT_CHARS, MAX_TIMEOUT_SECONDS,
};
pub use resolve::{BatchKey, RequestCost, ResolvedRequest};
