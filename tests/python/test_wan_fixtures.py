"""The Wan fixtures load and run in diffusers' own pipelines, offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

WAN_FIXTURES = ["wan21_t2v", "wan21_i2v", "wan22_ti2v_5b", "wan22_t2v_a14b", "wan22_i2v_a14b"]


def run(pipe, name: str, prompt: str = "a cat dancing") -> np.ndarray:
    kwargs = dict(FIXTURE_REGISTRY[name].call_kwargs)
    args: tuple = (prompt,)
    if "ImageToVideo" in type(pipe).__name__:
        image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
        args = (image, prompt)
    out = pipe(
        *args, negative_prompt="blurry", generator=torch.Generator("cpu").manual_seed(0), output_type="np", **kwargs
    )
    return np.asarray(out.frames)


@pytest.mark.parametrize("name", WAN_FIXTURES)
def test_wan_fixture_runs_in_diffusers(name: str, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    folder = build_fixture(name, tmp_path / name)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == FIXTURE_REGISTRY[name].pipeline_class
    calls = {"transformer": 0, "transformer_2": 0}
    for attr in calls:
        module = getattr(pipe, attr, None)
        if module is not None:
            module.register_forward_hook(lambda *_, key=attr: calls.__setitem__(key, calls[key] + 1))
    frames = run(pipe, name)
    assert frames.shape == (1, 9, 32, 32, 3)
    assert np.isfinite(frames).all() and frames.std() > 1e-3
    np.testing.assert_array_equal(frames, run(pipe, name))  # seeded: reproducible
    if name.endswith("a14b"):
        assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts really run
