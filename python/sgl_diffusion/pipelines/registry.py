"""Which native pipeline serves a checkpoint, and the sampling defaults of known checkpoints.

A folder is matched by its `model_index.json` `_class_name`; a known Hugging Face id also brings
the model card's defaults (models.md). Folders that are no known id take their pipeline's
diffusers defaults.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import SamplingDefaults, StagedPipeline
from .flux import FluxPipeline

#: Native pipelines by diffusers pipeline class.
PIPELINES: dict[str, type[StagedPipeline]] = {FluxPipeline.pipeline_class: FluxPipeline}

#: Known checkpoints' own sampling defaults, by Hugging Face id.
KNOWN_MODELS: dict[str, SamplingDefaults] = {
    "black-forest-labs/FLUX.1-dev": SamplingDefaults(
        width=1024, height=1024, num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512
    ),
    # schnell is timestep-distilled without a guidance embedding: 4 steps, no guidance, 256 T5 tokens.
    "black-forest-labs/FLUX.1-schnell": SamplingDefaults(
        width=1024, height=1024, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256
    ),
}


def supported_pipeline_classes() -> list[str]:
    return sorted(PIPELINES)


def load_pipeline(
    model_dir: Path,
    pipeline_class: str,
    hf_id: str | None,
    device: torch.device,
    dit_dtype: torch.dtype,
    vae_dtype: torch.dtype,
    attention_backend: str,
) -> StagedPipeline:
    pipeline = PIPELINES.get(pipeline_class)
    if pipeline is None:
        raise ValueError(
            f"{model_dir} is a {pipeline_class}, which has no native implementation yet; "
            f"supported: {', '.join(supported_pipeline_classes())}"
        )
    defaults = KNOWN_MODELS.get(hf_id) if hf_id else None
    return pipeline.load(model_dir, device, dit_dtype, vae_dtype, attention_backend, defaults)
