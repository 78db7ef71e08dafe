"""Wan with sparse attention on the CPU (the torch references), end to end through `DiffGenerator`.

The tiny Wan2.1 text-to-video fixture at 25 frames of 160x144: a 7x10x9 token grid, i.e. 2x2x2 sliding tiles
(6x8x8, partial at the far edges) and 2x3x3 VSA tiles (4x4x4). The VSA copy of the fixture carries FastVideo's
gate projections (`blocks.N.to_gate_compress`, random, seeded) as the FastWan2.1 checkpoints do.

What is shown:
* dense attention is unchanged: the native transformer still equals diffusers' bit for bit, and the copy with
  VSA gates gives the very same frames under the dense backend (the gates are dropped with a warning);
* STA with windows covering the grid, and VSA at sparsity 0 without gates, equal dense up to float32 rounding;
* STA with small windows and VSA at sparsity 0.5 with gates change the frames by a clear, measured amount
  (printed; `-s` shows it), and repeat exactly;
* sliding tile attention's per-step windows reach the model: a strategy whose step 1 differs changes the output;
* a request with more steps than the strategy covers is refused, naming the field.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sparse_video
from sgl_diffusion import DiffGenerator, ModelLoadError
from sgl_diffusion.testing import build_fixture
from sparse_video import assert_strategy_bounds_the_steps, report

#: 25 frames (7 latent frames) of 160x144 (20x18 latents, 10x9 tokens after 2x2 patches), 2 steps.
CALL: dict[str, Any] = {
    "height": 160,
    "width": 144,
    "num_frames": 25,
    "num_inference_steps": 2,
    "guidance_scale": 5.0,
    "max_sequence_length": 16,
    "output_type": "np",
}
PROMPT = "a cat dancing in the rain"
LAYERS, HEADS = 2, 2
#: Frames are in [0, 1], fp32. The sparse references sum in another order than SDPA: equal up to rounding.
ROUNDING = 1e-5
#: A sparse pattern that really drops keys must move the frames by far more than rounding (measured 0.03-0.2).
SPARSE_EFFECT = 1e-3


def write_strategy(path: Path, windows: dict[int, list[list[int]]]) -> Path:
    """A mask strategy: `windows[step][head]` for every layer."""
    data = {f"{s}_{l}_{h}": w for s, heads in windows.items() for l in range(LAYERS) for h, w in enumerate(heads)}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_sparse")
    dense = build_fixture("wan21_t2v", root / "wan21_t2v")
    gated = root / "wan21_t2v_vsa_gates"
    shutil.copytree(dense, gated)
    weights = gated / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    dim = state["blocks.0.attn1.to_q.weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    for layer in range(LAYERS):
        state[f"blocks.{layer}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=gen) / dim**0.5
        state[f"blocks.{layer}.to_gate_compress.bias"] = torch.randn(dim, generator=gen)
    save_file(state, weights)
    strategies = root / "strategies"
    strategies.mkdir()
    return {
        "dense": dense,
        "gated": gated,
        "sta_full": write_strategy(strategies / "full.json", {s: [[9, 9, 9], [9, 9, 9]] for s in range(2)}),
        "sta_small": write_strategy(strategies / "small.json", {s: [[1, 1, 1], [1, 3, 1]] for s in range(2)}),
        "sta_step1": write_strategy(strategies / "step1.json", {0: [[1, 1, 1], [1, 3, 1]], 1: [[9, 9, 9], [9, 9, 9]]}),
    }


def frames(folder: Path, **engine: Any) -> np.ndarray:
    return sparse_video.frames(folder, PROMPT, CALL, **engine)


@pytest.fixture(scope="module")
def dense_frames(folders: dict[str, Path]) -> np.ndarray:
    return frames(folders["dense"])


@pytest.fixture(autouse=True)
def _no_sglang_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG", raising=False)
    yield


def test_dense_transformer_still_matches_diffusers_bitwise(folders: dict[str, Path]) -> None:
    from diffusers import WanTransformer3DModel as DiffusersWan

    from sgl_diffusion.loading import load_native_model
    from sgl_diffusion.models.wan import WanTransformer3DModel

    folder = folders["dense"] / "transformer"
    ours = load_native_model(WanTransformer3DModel.from_config, folder, torch.device("cpu"), torch.float32)
    theirs = DiffusersWan.from_pretrained(folder).eval()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 7, 20, 18, generator=gen)
    text = torch.randn(1, 16, 32, generator=gen)
    t = torch.tensor([700.0])
    with torch.no_grad():
        assert torch.equal(ours(latents, t, text), theirs(latents, t, text, return_dict=False)[0])
    assert ours.sparse_attention is None and all(block.to_gate_compress is None for block in ours.blocks)


def test_vsa_gates_are_dropped_by_dense_attention(
    folders: dict[str, Path], dense_frames: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        gated = frames(folders["gated"])
    assert np.array_equal(gated, dense_frames)
    assert any("4 VSA gate tensors (to_gate_compress)" in r.getMessage() for r in caplog.records)


def test_sta_with_full_windows_is_dense(folders: dict[str, Path], dense_frames: np.ndarray) -> None:
    out = frames(
        folders["dense"], attention_backend="sliding_tile_attn", mask_strategy_file_path=str(folders["sta_full"])
    )
    report("STA full windows vs dense", out - dense_frames)
    assert np.abs(out - dense_frames).max() <= ROUNDING


def test_sta_with_small_windows_differs_by_a_measured_amount(
    folders: dict[str, Path], dense_frames: np.ndarray
) -> None:
    out = frames(
        folders["dense"], attention_backend="sliding_tile_attn", mask_strategy_file_path=str(folders["sta_small"])
    )
    report("STA windows (1,1,1)/(1,3,1) vs dense", out - dense_frames)
    assert np.abs(out - dense_frames).max() > SPARSE_EFFECT
    assert np.isfinite(out).all()
    again = frames(
        folders["dense"], attention_backend="sliding_tile_attn", mask_strategy_file_path=str(folders["sta_small"])
    )
    assert np.array_equal(out, again)
    # The windows follow the denoising step: sparse at step 0, full at step 1 is neither of the two above.
    per_step = frames(
        folders["dense"], attention_backend="sliding_tile_attn", mask_strategy_file_path=str(folders["sta_step1"])
    )
    assert np.abs(per_step - out).max() > SPARSE_EFFECT
    assert np.abs(per_step - dense_frames).max() > SPARSE_EFFECT


def test_sta_strategy_must_cover_the_request(folders: dict[str, Path]) -> None:
    assert_strategy_bounds_the_steps(folders["dense"], folders["sta_small"], PROMPT, CALL)


def test_sta_strategy_must_fit_the_model(folders: dict[str, Path], tmp_path: Path) -> None:
    three_heads = write_strategy(tmp_path / "m.json", {0: [[1, 1, 1], [1, 1, 1], [1, 1, 1]]})
    with pytest.raises(ModelLoadError, match=r"'0_0_2' names layer 0 / head 2, but the model has 2 layers of 2 heads"):
        DiffGenerator.from_pretrained(
            folders["dense"],
            device="cpu",
            attention_backend="sliding_tile_attn",
            mask_strategy_file_path=str(three_heads),
        )


def test_vsa_at_sparsity_zero_without_gates_is_dense(
    folders: dict[str, Path], dense_frames: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpoint without gates loads them as zeros (FastVideo's rule), so only the fine branch acts; at
    # sparsity 0 every tile is kept (7x10x9 tokens: 18 tiles, partial ones counted), which is dense attention.
    with caplog.at_level("WARNING"):
        out = frames(folders["dense"], attention_backend="video_sparse_attn")
    report("VSA sparsity 0, zero gates vs dense", out - dense_frames)
    assert np.abs(out - dense_frames).max() <= ROUNDING
    assert any("has no VSA gates (to_gate_compress, 4 tensors)" in r.getMessage() for r in caplog.records)


def test_vsa_with_gates_and_sparsity_differs_by_a_measured_amount(
    folders: dict[str, Path], dense_frames: np.ndarray
) -> None:
    config = {"VSA_sparsity": 0.5}
    out = frames(folders["gated"], attention_backend="video_sparse_attn", attention_backend_config=config)
    report("VSA sparsity 0.5 with gates vs dense", out - dense_frames)
    assert np.abs(out - dense_frames).max() > SPARSE_EFFECT
    assert np.isfinite(out).all()
    # The gates act: the same sparsity without them (zeros) is another video.
    ungated = frames(folders["dense"], attention_backend="video_sparse_attn", attention_backend_config=config)
    report("VSA sparsity 0.5 without gates vs dense", ungated - dense_frames)
    assert np.abs(out - ungated).max() > SPARSE_EFFECT
    assert np.array_equal(
        out, frames(folders["gated"], attention_backend="video_sparse_attn", attention_backend_config=config)
    )


def test_vsa_compiles_to_the_same_video(folders: dict[str, Path]) -> None:
    # VSA runs as one opaque op inside the compiled blocks (inductor here, as on a GPU), the same at every layer
    # and step: the compiled engine gives the eager engine's video.
    from torch._dynamo.utils import counters

    config = {"VSA_sparsity": 0.5}
    eager = frames(folders["gated"], attention_backend="video_sparse_attn", attention_backend_config=config)
    torch._dynamo.reset()
    counters.clear()
    compiled = frames(
        folders["gated"],
        attention_backend="video_sparse_attn",
        attention_backend_config=config,
        enable_torch_compile=True,
        warmup=False,  # the fixture's size limit is below Wan's default size, which the warm-up runs
    )
    report("VSA sparsity 0.5 compiled vs eager", compiled - eager)
    assert np.abs(compiled - eager).max() <= ROUNDING
    # One graph for the block class: not one per layer or step (2 layers x 2 steps x 2 CFG branches ran).
    assert counters["stats"]["unique_graphs"] == 1


def test_sta_compiles_to_the_same_video(folders: dict[str, Path]) -> None:
    # STA's per-(step, layer) windows reach the compiled blocks as a tensor: one graph for every layer and step.
    from torch._dynamo.utils import counters

    strategy = {"attention_backend": "sliding_tile_attn", "mask_strategy_file_path": str(folders["sta_step1"])}
    eager = frames(folders["dense"], **strategy)
    torch._dynamo.reset()
    counters.clear()
    compiled = frames(folders["dense"], **strategy, enable_torch_compile=True, warmup=False)
    report("STA compiled vs eager", compiled - eager)
    assert np.abs(compiled - eager).max() <= ROUNDING
    assert counters["stats"]["unique_graphs"] == 1


def test_other_models_refuse_sparse_backends(tmp_path: Path) -> None:
    folder = build_fixture("flux1_dev", tmp_path / "flux")
    with pytest.raises(
        ModelLoadError, match="'video_sparse_attn' is sparse attention over a video's token grid; this model"
    ):
        DiffGenerator.from_pretrained(folder, device="cpu", attention_backend="video_sparse_attn")
