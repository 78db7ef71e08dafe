"""What the sparse-attention tests of the video families share: running the engine on the CPU for one video,
printing a measured difference, and the check that a mask strategy bounds a request's steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sgl_diffusion import DiffGenerator, InvalidRequestError


def frames(folder: Path, prompt: str, call: dict[str, Any], **engine: Any) -> np.ndarray:
    """The first video of `prompt` (seed 3) from an engine on the CPU with the `engine` options, float64."""
    gen = DiffGenerator.from_pretrained(folder, device="cpu", **engine)
    try:
        return np.asarray(gen.generate(prompt, seed=3, **call).frames[0], dtype=np.float64)
    finally:
        gen.shutdown()


def report(name: str, diff: np.ndarray) -> None:
    print(f"\n{name}: max abs {np.abs(diff).max():.4g}, mean abs {np.abs(diff).mean():.4g} (frames in [0, 1])")


def assert_strategy_bounds_the_steps(folder: Path, strategy: Path, prompt: str, call: dict[str, Any]) -> None:
    """A strategy with windows for `call`'s steps refuses a request with one step more, naming the field."""
    gen = DiffGenerator.from_pretrained(
        folder, device="cpu", attention_backend="sliding_tile_attn", mask_strategy_file_path=str(strategy)
    )
    steps = call["num_inference_steps"]
    try:
        with pytest.raises(
            InvalidRequestError, match=rf"has windows for {steps} denoising steps; this request runs {steps + 1}"
        ) as info:
            gen.generate(prompt, seed=3, **{**call, "num_inference_steps": steps + 1})
        assert info.value.field == "num_inference_steps"
    finally:
        gen.shutdown()
