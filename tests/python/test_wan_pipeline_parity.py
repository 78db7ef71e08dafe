"""Our Wan text-to-video pipeline against diffusers' WanPipeline on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

CASES = ["wan21_t2v", "wan22_t2v_a14b", "wan22_ti2v_5b"]


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {name: build_fixture(name, root / name) for name in CASES}


def diffusers_frames(folder: Path, prompt: str, seed: int, **kwargs: object) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(out.frames)


@pytest.mark.parametrize("name", CASES)
def test_text_to_video_matches_diffusers(wan_dirs: dict[str, Path], name: str) -> None:
    settings = dict(FIXTURE_REGISTRY[name].call_kwargs)
    settings["negative_prompt"] = "blurry, static"
    gen = DiffGenerator.from_pretrained(wan_dirs[name], device="cpu")
    try:
        ours = gen.generate("a cat dancing in the rain", seed=11, output_type="np", **settings)
    finally:
        gen.shutdown()
    expected = diffusers_frames(wan_dirs[name], "a cat dancing in the rain", 11, **settings)
    assert len(ours.frames) == 1 and ours.frames[0].shape == expected[0].shape == (9, 32, 32, 3)
    assert np.abs(ours.frames[0] - expected[0]).max() <= 1e-3
    assert ours.fps == 16


def test_frames_are_rounded_to_4k_plus_1_and_saved_as_mp4(wan_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sgl_diffusion.runtime.video import decode_mp4

    gen = DiffGenerator.from_pretrained(wan_dirs["wan21_t2v"], device="cpu")
    try:
        res = gen.generate("a cat", seed=1, height=32, width=48, num_frames=7, fps=8, num_inference_steps=2,
                           max_sequence_length=16)  # fmt: skip
    finally:
        gen.shutdown()
    assert res.frames[0].shape == (5, 32, 48, 3) and res.frames[0].dtype == np.uint8
    assert any("rounded down to 5" in note for note in res.notes)
    frames, fps = decode_mp4(res.save(tmp_path / "cat.mp4").read_bytes())
    assert frames.shape == (5, 32, 48, 3) and fps == pytest.approx(8)
