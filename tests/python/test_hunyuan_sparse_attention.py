"""HunyuanVideo with sliding tile attention on the CPU (the torch reference), end to end through `DiffGenerator`.

HunyuanVideo's blocks attend jointly over ``[video, text]``: under STA the video reads the video by tiles plus all
the text, the text reads everything (FastVideo's HunyuanVideo STA). The tiny fixture at 25 frames of 160x144 has a
7x10x9 video token grid (2x2x2 sliding tiles, partial at the far edges) and 4 blocks (2 dual-stream, then 2
single-stream) of 2 heads: a mask strategy names layers 0-3, dual-stream blocks first.

What is shown: windows covering the grid give the dense video; small windows change it by a measured amount and
repeat exactly; the per-step and per-layer windows reach the blocks; a strategy that does not fit the model, a
request with more steps than the strategy and VSA (video-only attention) are refused by name; compiled blocks
give the eager video with one graph per block class.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sparse_video
from sgl_diffusion import DiffGenerator, ModelLoadError
from sgl_diffusion.testing import build_fixture
from sparse_video import assert_strategy_bounds_the_steps, report

CALL: dict[str, Any] = {
    "height": 160,
    "width": 144,
    "num_frames": 25,
    "num_inference_steps": 2,
    "guidance_scale": 6.0,
    "max_sequence_length": 16,
    "output_type": "np",
}
PROMPT = "a cat dancing in the rain"
LAYERS, HEADS = 4, 2
#: Frames are in [0, 1], fp32: the STA reference sums in another order than SDPA.
ROUNDING = 1e-5
#: What a sparse pattern must change at least (measured changes are printed with `-s`).
SPARSE_EFFECT = 1e-3
FULL, SMALL = [9, 9, 9], [1, 1, 1]


def write_strategy(path: Path, windows: dict[tuple[int, int], list[list[int]]]) -> Path:
    """A mask strategy: `windows[(step, layer)][head]`."""
    data = {f"{s}_{l}_{h}": w for (s, l), heads in windows.items() for h, w in enumerate(heads)}
    path.write_text(json.dumps(data))
    return path


def every(steps: int, heads: list[list[int]]) -> dict[tuple[int, int], list[list[int]]]:
    return {(s, layer): heads for s in range(steps) for layer in range(LAYERS)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hunyuan_sparse")
    strategies = root / "strategies"
    strategies.mkdir()
    # Small windows in one block only (the last single-stream one, layer 3): the layer index reaches it.
    last_layer = every(2, [FULL, FULL]) | {(s, 3): [SMALL, [1, 3, 1]] for s in range(2)}
    return {
        "model": build_fixture("hunyuan_video_t2v", root / "model"),
        "full": write_strategy(strategies / "full.json", every(2, [FULL, FULL])),
        "small": write_strategy(strategies / "small.json", every(2, [SMALL, [1, 3, 1]])),
        "last_layer": write_strategy(strategies / "last_layer.json", last_layer),
        "step1": write_strategy(strategies / "step1.json", every(2, [FULL, FULL]) | every(1, [SMALL, [1, 3, 1]])),
    }


@pytest.fixture(autouse=True)
def _no_sglang_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG", raising=False)
    yield


def frames(folder: Path, **engine: Any) -> np.ndarray:
    return sparse_video.frames(folder, PROMPT, CALL, **engine)


def sta(folders: dict[str, Path], strategy: str) -> np.ndarray:
    return frames(
        folders["model"], attention_backend="sliding_tile_attn", mask_strategy_file_path=str(folders[strategy])
    )


@pytest.fixture(scope="module")
def dense_frames(folders: dict[str, Path]) -> np.ndarray:
    return frames(folders["model"])


def test_sta_with_full_windows_is_dense(folders: dict[str, Path], dense_frames: np.ndarray) -> None:
    out = sta(folders, "full")
    report("HunyuanVideo STA full windows vs dense", out - dense_frames)
    assert np.abs(out - dense_frames).max() <= ROUNDING


def test_sta_windows_act_per_layer_and_step(folders: dict[str, Path], dense_frames: np.ndarray) -> None:
    small = sta(folders, "small")
    report("HunyuanVideo STA windows (1,1,1)/(1,3,1) vs dense", small - dense_frames)
    assert np.abs(small - dense_frames).max() > SPARSE_EFFECT
    assert np.isfinite(small).all()
    assert np.array_equal(small, sta(folders, "small"))
    # Small windows in the last single-stream block alone: another video than all-small and than dense.
    last = sta(folders, "last_layer")
    assert np.abs(last - dense_frames).max() > SPARSE_EFFECT
    assert np.abs(last - small).max() > SPARSE_EFFECT
    # Small at step 0, full at step 1: neither of the two.
    per_step = sta(folders, "step1")
    assert np.abs(per_step - small).max() > SPARSE_EFFECT
    assert np.abs(per_step - dense_frames).max() > SPARSE_EFFECT


def test_sta_strategy_must_fit_the_model_and_the_request(folders: dict[str, Path], tmp_path: Path) -> None:
    three_layers = write_strategy(tmp_path / "three.json", {(0, layer): [FULL, FULL] for layer in range(3)})
    with pytest.raises(ModelLoadError, match=r"no window for step 0, layer 3, head 0"):
        DiffGenerator.from_pretrained(
            folders["model"],
            device="cpu",
            attention_backend="sliding_tile_attn",
            mask_strategy_file_path=str(three_layers),
        )
    assert_strategy_bounds_the_steps(folders["model"], folders["small"], PROMPT, CALL)


def test_vsa_is_refused(folders: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="video tokens alone.*use sliding_tile_attn"):
        DiffGenerator.from_pretrained(folders["model"], device="cpu", attention_backend="video_sparse_attn")


def test_sta_compiles_to_the_same_video(folders: dict[str, Path]) -> None:
    # STA runs as one opaque op in the compiled blocks (inductor here, as on a GPU), its windows a tensor built
    # outside them: one graph per block class (dual- and single-stream) for every layer and step.
    from torch._dynamo.utils import counters

    eager = sta(folders, "small")
    torch._dynamo.reset()
    counters.clear()
    compiled = frames(
        folders["model"],
        attention_backend="sliding_tile_attn",
        mask_strategy_file_path=str(folders["small"]),
        enable_torch_compile=True,
        warmup=False,  # the fixture's size limit is below HunyuanVideo's default size, which the warm-up runs
    )
    report("HunyuanVideo STA compiled vs eager", compiled - eager)
    assert np.abs(compiled - eager).max() <= ROUNDING
    assert counters["stats"]["unique_graphs"] == 2
