"""Shared by the diffusers backend's tests: the tiny fixtures of pipelines with no native family, their sampling
settings, and diffusers' own output on them (the oracle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

#: The fixtures: two image pipelines (SD3 with `callback_on_step_end`, PixArt-Sigma with the legacy `callback`) and a
#: video one (CogVideoX).
NAMES = ("sd3", "pixart_sigma", "cogvideox")
#: PixArt-Sigma's resolution binning maps sizes onto the real checkpoints' 256-2048 px buckets: off for the tiny
#: fixture, through `diffusers_kwargs` (a `__call__` keyword, as SGLang's docs pass them).
PIXART_KWARGS = {"use_resolution_binning": False}
PROMPT = "a red fox in the snow"


def build_models(root: Path) -> dict[str, Path]:
    return {name: build_fixture(name, root / name) for name in NAMES}


def call_kwargs(name: str) -> dict[str, Any]:
    """The fixture's small sampling settings, less what the backend gets as a `__call__` option."""
    return {k: v for k, v in FIXTURE_REGISTRY[name].call_kwargs.items() if k not in PIXART_KWARGS}


def backend_options(name: str) -> dict[str, Any]:
    """What `DiffGenerator.from_pretrained` needs for the fixture."""
    return {"diffusers_kwargs": PIXART_KWARGS} if name == "pixart_sigma" else {}


def diffusers_output(model_dir: Path, seed: int, **kwargs: Any) -> np.ndarray:
    """diffusers' own pipeline on the folder: the float [0, 1] images (B×H×W×3) or videos (B×T×H×W×3)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    if type(pipe).__name__ == "PixArtSigmaPipeline":
        kwargs = {**PIXART_KWARGS, **kwargs}
    output = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(output.frames if hasattr(output, "frames") else output.images, dtype=np.float32)
