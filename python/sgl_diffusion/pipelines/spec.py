"""What a loaded pipeline tells the core about itself: one frozen `PipelineSpec`.

The Rust core reads it (as `sgl_core::PipelineInfo`, through the executor's `info_json`) to fill request
defaults, reject what the pipeline cannot run and key batches; the executor and warm-up read it too.
Each fact lives here once, instead of as loose class and instance attributes of every pipeline.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..runtime.request import Request


@dataclasses.dataclass(frozen=True)
class PipelineLimits:
    """Mirrors `sgl_core::PipelineLimits`: shapes this pipeline can run, read from the checkpoint where it
    says (RoPE table, tokenizer, scheduler), and how many pixels and frames one latent token covers (the unit
    of the request cost budget)."""

    size_multiple: int
    min_size: int
    max_side: int
    max_pixels: int
    max_frames: int
    frame_rule: str  # "single" | "four_k_plus_one"
    max_sequence_length: int
    max_steps: int
    token_size: int
    frames_per_latent: int = 1


def image_limits(
    *, token: int, max_side: int, max_pixels: int, max_sequence_length: int, max_steps: int, size_multiple: int = 0
) -> PipelineLimits:
    """The limits of a one-frame (image) pipeline whose latent token covers `token` pixels a side; sizes step by
    `size_multiple` (by default one token) and start there."""
    step = size_multiple or token
    return PipelineLimits(
        size_multiple=step,
        min_size=step,
        max_side=max_side,
        max_pixels=max_pixels,
        max_frames=1,
        frame_rule="single",
        max_sequence_length=max_sequence_length,
        max_steps=max_steps,
        token_size=token,
    )


def tokenizer_limit(tokenizer: Any, reference_limit: int) -> int:
    """The longest prompt a tokenizer's config allows, at most the reference pipeline's own bound. Tokenizers
    saved without `model_max_length` report a huge sentinel (transformers' VERY_LARGE_INTEGER)."""
    declared = getattr(tokenizer, "model_max_length", None)
    return min(reference_limit, int(declared)) if isinstance(declared, int) and declared > 0 else reference_limit


@dataclasses.dataclass(frozen=True)
class LastInputAspectAtArea:
    """`sgl_core::InputSizeRule`: the last input image's aspect ratio at `area` pixels (diffusers'
    `calculate_dimensions`: the Qwen-Image editing pipelines)."""

    area: int
    rule: str = dataclasses.field(default="last_input_aspect_at_area", init=False)


@dataclasses.dataclass(frozen=True)
class FirstInputWithinArea:
    """`sgl_core::InputSizeRule`: the first input image's own size, shrunk to at most `max_area` pixels where
    larger, floored to `size_multiple` (FLUX.2, GLM-Image)."""

    max_area: int
    rule: str = dataclasses.field(default="first_input_within_area", init=False)


@dataclasses.dataclass(frozen=True)
class SizeBucket:
    """One size of `FirstInputNearestBucket`, with the height / width ratio its reference compares (rounded as
    the reference rounds it, so the Rust core need not re-derive it)."""

    width: int
    height: int
    ratio: float


@dataclasses.dataclass(frozen=True)
class FirstInputNearestBucket:
    """`sgl_core::InputSizeRule`: the bucket whose ratio is nearest the first input image's height / width, from
    the side of it that keeps the output no more elongated than the image (HunyuanVideo-1.5 image-to-video)."""

    buckets: tuple[SizeBucket, ...]
    rule: str = dataclasses.field(default="first_input_nearest_bucket", init=False)


#: `sgl_core::InputSizeRule`.
InputSizeRule = LastInputAspectAtArea | FirstInputWithinArea | FirstInputNearestBucket


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Mirrors `sgl_core::SamplingDefaults`: the model's own sampling parameters."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    num_frames: int = 1
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    flow_shift: float | None = None
    fps: int | None = None
    guidance_scale_2: float | None = None
    #: How a request that carries input images but gives no size is sized (computed by the Rust core,
    #: `sgl_core::input_size`); None: `width` x `height` always.
    size_from_inputs: InputSizeRule | None = None


#: `sgl_core::GuidanceMode`: how a request turns on classifier-free guidance. "classifier_free":
#: `guidance_scale > 1`; "embedded_with_true_cfg": the model takes `guidance_scale` as an input
#: (guidance-distilled) and runs true CFG with `true_cfg_scale` against a negative prompt; "true_cfg": true CFG
#: the same way, with no guidance input (Qwen-Image); "classifier_free_above_zero": `guidance_scale > 0`, the
#: scale counted from the conditional prediction, with `cfg_normalization` and `cfg_truncation` (Z-Image).
GUIDANCE_MODES = ("classifier_free", "embedded_with_true_cfg", "true_cfg", "classifier_free_above_zero")
#: `sgl_core::OutputKind`: the stages leave `images` (B×H×W×3) or `videos` (B×T×H×W×3) in the state.
OUTPUT_KINDS = ("image", "video")
#: `sgl_core::ImageInput`: whether requests may, must or must not carry an input image.
IMAGE_INPUTS = ("none", "optional", "required")
REQUEST_FIELDS = frozenset(field.name for field in dataclasses.fields(Request))


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A loaded pipeline's description: its `sgl_core::PipelineInfo` fields (less the runtime's device,
    precisions and paths) and what the batcher must key batches by."""

    pipeline_class: str
    family: str
    task: str
    guidance_mode: str
    limits: PipelineLimits
    defaults: SamplingDefaults
    output: str = "image"
    image_input: str = "none"
    #: Most input images one request may carry where `image_input` allows any (several reference images
    #: for editing).
    max_input_images: int = 1
    #: Whether requests may, must or must not carry a last frame (`last_image_path`, first-last-frame
    #: image-to-video).
    last_image_input: str = "none"
    supports_flow_shift: bool = False
    supports_guidance_scale_2: bool = False
    #: Whether requests may bring `prior_token_ids` (image tokens of an autoregressive prior, GLM-Image); other
    #: pipelines refuse the field.
    takes_prior_token_ids: bool = False
    #: Request fields that requests of one batch must share besides those of `sgl_core::BatchKey` (a
    #: pipeline whose tensor shapes depend on another field names it here); the Rust core adds their values to
    #: the batch key.
    extra_batch_key_fields: tuple[str, ...] = ()
    #: Most requests one batch may hold (`sgl_core::PipelineInfo::max_batch_requests`): 1 for a pipeline that runs
    #: requests one at a time (the diffusers backend); None: as many as `--max-batch-size` allows.
    max_batch_requests: int | None = None

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("guidance_mode", self.guidance_mode, GUIDANCE_MODES),
            ("output", self.output, OUTPUT_KINDS),
            ("image_input", self.image_input, IMAGE_INPUTS),
            ("last_image_input", self.last_image_input, IMAGE_INPUTS),
        ):
            if value not in allowed:
                raise ValueError(f"PipelineSpec.{field} must be one of {', '.join(allowed)}, got {value!r}")
        if self.max_input_images < 1:
            raise ValueError(f"PipelineSpec.max_input_images must be at least 1, got {self.max_input_images}")
        if self.max_batch_requests is not None and self.max_batch_requests < 1:
            raise ValueError(f"PipelineSpec.max_batch_requests must be at least 1, got {self.max_batch_requests}")
        unknown = sorted(set(self.extra_batch_key_fields) - REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"PipelineSpec.extra_batch_key_fields names no request field: {unknown}")

    @property
    def output_key(self) -> str:
        """The batch-state entry the decoded outputs land in: `images` or `videos`."""
        return f"{self.output}s"

    def info_fields(self) -> dict[str, Any]:
        """This spec's `sgl_core::PipelineInfo` fields, by their Rust names."""
        return {
            "pipeline_class": self.pipeline_class,
            "family": self.family,
            "task": self.task,
            "limits": dataclasses.asdict(self.limits),
            "defaults": dataclasses.asdict(self.defaults),
            "guidance": self.guidance_mode,
            "supports_flow_shift": self.supports_flow_shift,
            "supports_guidance_scale_2": self.supports_guidance_scale_2,
            "output": self.output,
            "image_input": self.image_input,
            "max_input_images": self.max_input_images,
            "last_image_input": self.last_image_input,
            "extra_batch_key_fields": list(self.extra_batch_key_fields),
            "max_batch_requests": self.max_batch_requests,
        }
