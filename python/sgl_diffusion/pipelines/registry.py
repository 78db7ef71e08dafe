"""Which native pipeline serves a checkpoint, and the sampling defaults of known checkpoints.

A folder is matched by its `model_index.json` `_class_name`; a known Hugging Face id also brings
the model card's defaults (models.md), and for FastWan its DMD sampler (`PIPELINES_BY_ID`). Folders that are no known id take their pipeline's
diffusers defaults.
"""

from __future__ import annotations

from pathlib import Path

from ..loading import track_vae_path
from ..runtime.options import RuntimeOptions
from .base import StagedPipeline
from .family import FamilyPipeline
from .fastwan import FASTWAN21_DEFAULTS, FASTWAN22_TI2V_5B_DEFAULTS, FastWanPipeline
from .flux import FluxPipeline
from .flux2 import FLUX2_DEV_DEFAULTS, FLUX2_KLEIN_DEFAULTS, Flux2KleinPipeline, Flux2Pipeline
from .glm_image import GLM_IMAGE_DEFAULTS, GlmImagePipeline
from .hunyuan_video import FAST_HUNYUAN_DEFAULTS, HUNYUAN_VIDEO_DEFAULTS, HunyuanVideoPipeline
from .hunyuan_video15 import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline
from .qwen_image import QWEN_IMAGE_DEFAULTS, QwenImagePipeline
from .qwen_image_21 import QwenImage21Pipeline
from .qwen_image_edit import (
    QWEN_IMAGE_EDIT_DEFAULTS,
    QWEN_IMAGE_EDIT_PLUS_DEFAULTS,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
)
from .spec import SamplingDefaults
from .wan import WanImageToVideoPipeline, WanPipeline
from .z_image import Z_IMAGE_TURBO_DEFAULTS, ZImagePipeline

#: Native pipelines by diffusers pipeline class.
PIPELINES: dict[str, type[FamilyPipeline]] = {
    FluxPipeline.pipeline_class: FluxPipeline,
    Flux2Pipeline.pipeline_class: Flux2Pipeline,
    Flux2KleinPipeline.pipeline_class: Flux2KleinPipeline,
    WanPipeline.pipeline_class: WanPipeline,
    WanImageToVideoPipeline.pipeline_class: WanImageToVideoPipeline,
    # FastVideo's FastWan folders name their (DMD) pipeline `WanDMDPipeline`.
    FastWanPipeline.pipeline_class: FastWanPipeline,
    QwenImagePipeline.pipeline_class: QwenImagePipeline,
    QwenImageEditPipeline.pipeline_class: QwenImageEditPipeline,
    QwenImageEditPlusPipeline.pipeline_class: QwenImageEditPlusPipeline,
    # Qwen/Qwen-Image-2.1: no card defaults beyond diffusers' `__call__` ones, which depend on the folder's
    # `sample_sigmas` (their count is the step count), so the id takes its folder's (qwen_image_21.py).
    QwenImage21Pipeline.pipeline_class: QwenImage21Pipeline,
    GlmImagePipeline.pipeline_class: GlmImagePipeline,
    # HunyuanVideo and FastHunyuan (same architecture; FastHunyuan's id brings its few-step defaults).
    HunyuanVideoPipeline.pipeline_class: HunyuanVideoPipeline,
    # HunyuanVideo-1.5 text-to-video (hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v, -720p_t2v): no
    # KNOWN_MODELS entry, because its sampling defaults live in the folder itself (the guider's scale, the
    # scheduler's shift, the transformer's target_size for the default size), which hunyuan_video15.py reads.
    HunyuanVideo15Pipeline.pipeline_class: HunyuanVideo15Pipeline,
    # Its image-to-video (-480p_i2v, -720p_i2v): the first frame through the VAE and SigLIP.
    HunyuanVideo15ImageToVideoPipeline.pipeline_class: HunyuanVideo15ImageToVideoPipeline,
    ZImagePipeline.pipeline_class: ZImagePipeline,
}

#: Known checkpoints whose sampler the folder's `_class_name` may not tell (e.g. a FastWan copy saved
#: as a plain `WanPipeline`): the id picks the native pipeline.
PIPELINES_BY_ID: dict[str, type[FamilyPipeline]] = {
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": FastWanPipeline,
    # The 14B student FastVideo registers (480p), and the id its model card links the preview under.
    "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers": FastWanPipeline,
    "FastVideo/FastWan2.1-T2V-14B-Diffusers": FastWanPipeline,
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": FastWanPipeline,
    # Trained with video sparse attention (VSA), like FastWan2.1: dense attention approximates it.
    "FastVideo/FastWan2.2-TI2V-5B-Diffusers": FastWanPipeline,
}

#: Known checkpoints' own sampling defaults, by Hugging Face id.
KNOWN_MODELS: dict[str, SamplingDefaults] = {
    "black-forest-labs/FLUX.1-dev": SamplingDefaults(
        width=1024, height=1024, num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512
    ),
    # schnell is timestep-distilled without a guidance embedding: 4 steps, no guidance, 256 T5 tokens.
    "black-forest-labs/FLUX.1-schnell": SamplingDefaults(
        width=1024, height=1024, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256
    ),
    # FLUX.2: see flux2.py. klein-9B shares klein-4B's pipeline, layout and card settings (a larger Qwen3).
    "black-forest-labs/FLUX.2-dev": FLUX2_DEV_DEFAULTS,
    "black-forest-labs/FLUX.2-klein-4B": FLUX2_KLEIN_DEFAULTS,
    "black-forest-labs/FLUX.2-klein-9B": FLUX2_KLEIN_DEFAULTS,
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": SamplingDefaults(
        width=832, height=480, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0,
        max_sequence_length=512, negative_prompt="", flow_shift=3.0,
    ),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": SamplingDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0,
        max_sequence_length=512, negative_prompt="", flow_shift=5.0,
    ),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": SamplingDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=40, guidance_scale=4.0,
        guidance_scale_2=3.0, max_sequence_length=512, negative_prompt="", flow_shift=12.0,
    ),
    "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers": SamplingDefaults(
        width=832, height=480, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0,
        max_sequence_length=512, negative_prompt="", flow_shift=3.0,
    ),
    "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers": SamplingDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0,
        max_sequence_length=512, negative_prompt="", flow_shift=5.0,
    ),
    # First-last-frame (`last_image_path` required): Wan's own FLF2V sampling shift (16) and the guidance of
    # diffusers' FLF2V example (5.5). The Hub spells this id with a lower-case "diffusers".
    "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers": SamplingDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.5,
        max_sequence_length=512, negative_prompt="", flow_shift=16.0,
    ),
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": SamplingDefaults(
        width=1280, height=720, num_frames=81, fps=16, num_inference_steps=40, guidance_scale=3.5,
        guidance_scale_2=3.5, max_sequence_length=512, negative_prompt="", flow_shift=5.0,
    ),
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": SamplingDefaults(
        width=1280, height=704, num_frames=121, fps=24, num_inference_steps=50, guidance_scale=5.0,
        max_sequence_length=512, negative_prompt="", flow_shift=5.0,
    ),
    # DMD-distilled: 3 fixed timesteps (1000, 757, 522), no CFG (see fastwan.py).
    "FastVideo/FastWan2.1-T2V-1.3B-Diffusers": FASTWAN21_DEFAULTS,
    "FastVideo/FastWan2.1-T2V-14B-480P-Diffusers": FASTWAN21_DEFAULTS,
    "FastVideo/FastWan2.1-T2V-14B-Diffusers": FASTWAN21_DEFAULTS,
    "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers": FASTWAN22_TI2V_5B_DEFAULTS,
    "FastVideo/FastWan2.2-TI2V-5B-Diffusers": FASTWAN22_TI2V_5B_DEFAULTS,
    # The model cards' settings (diffusers' __call__ has no negative prompt, so no CFG): see qwen_image.py.
    "Qwen/Qwen-Image": QWEN_IMAGE_DEFAULTS,
    "Qwen/Qwen-Image-2512": QWEN_IMAGE_DEFAULTS,
    "Qwen/Qwen-Image-Edit": QWEN_IMAGE_EDIT_DEFAULTS,
    "Qwen/Qwen-Image-Edit-2509": QWEN_IMAGE_EDIT_PLUS_DEFAULTS,
    "Qwen/Qwen-Image-Edit-2511": QWEN_IMAGE_EDIT_PLUS_DEFAULTS,
    # 1024x1024, 50 steps, guidance 1.5 (diffusers' defaults, the model card's settings): see glm_image.py.
    "zai-org/GLM-Image": GLM_IMAGE_DEFAULTS,
    # The model card's settings (1024x1024, 9 steps, no CFG): see z_image.py.
    "Tongyi-MAI/Z-Image-Turbo": Z_IMAGE_TURBO_DEFAULTS,
    # 1280x720, 129 frames at 24 fps, 50 steps, embedded guidance 6, shift 7: see hunyuan_video.py.
    "hunyuanvideo-community/HunyuanVideo": HUNYUAN_VIDEO_DEFAULTS,
    # Consistency-distilled: 125 frames, 6 steps, shift 17 (the model card; FastVideo's FastHunyuanConfig). FastVideo's
    # own scripts spell the id with a capital D as well, and the local cache keeps the spelling it was fetched with.
    "FastVideo/FastHunyuan-diffusers": FAST_HUNYUAN_DEFAULTS,
    "FastVideo/FastHunyuan-Diffusers": FAST_HUNYUAN_DEFAULTS,
}  # fmt: skip


def supported_pipeline_classes() -> list[str]:
    return sorted(PIPELINES)


def native_pipeline(pipeline_class: str, hf_id: str | None) -> type[FamilyPipeline] | None:
    """The native pipeline of a checkpoint (by its Hugging Face id, else its class), or None."""
    pipeline = PIPELINES_BY_ID.get(hf_id) if hf_id else None
    return pipeline or PIPELINES.get(pipeline_class)


def load_pipeline(
    model_dir: Path,
    pipeline_class: str,
    hf_id: str | None,
    options: RuntimeOptions,
) -> StagedPipeline:
    """Loads the checkpoint with the backend `--backend` picks: auto (native when the class has a native family, else
    diffusers), native / sglang (native only), diffusers (diffusers' own pipeline, whatever the class)."""
    defaults = KNOWN_MODELS.get(hf_id) if hf_id else None
    pipeline = native_pipeline(pipeline_class, hf_id)
    if options.backend == "diffusers" or (options.backend == "auto" and pipeline is None):
        # Imported here: diffusers' pipeline machinery loads only for models that run through it.
        from .diffusers_backend import DiffusersPipeline

        with track_vae_path(options.vae_path, pipeline_class):
            return DiffusersPipeline.load(model_dir, options, defaults)
    if pipeline is None:
        raise ValueError(
            f"{model_dir} is a {pipeline_class}, which has no native implementation yet "
            f"(--backend {options.backend}); supported: {', '.join(supported_pipeline_classes())}; "
            "--backend auto or diffusers runs it through diffusers"
        )
    given = [
        name
        for name, value in (
            ("diffusers_kwargs", options.diffusers_kwargs),
            ("--trust-remote-code", options.trust_remote_code),
            ("--diffusers-attention-backend", options.diffusers_attention_backend),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: an option of the diffusers backend, and {pipeline_class} runs natively "
            "(--backend diffusers runs it through diffusers)"
        )
    with track_vae_path(options.vae_path, pipeline_class):
        return pipeline.load(model_dir, options, defaults)
