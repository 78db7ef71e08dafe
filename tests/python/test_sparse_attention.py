"""Sparse video attention on the CPU: the tile permutation, the STA and VSA torch references (against dense
attention and against hand-derived cases), STA's mask strategy file, and the backend names and refusals.

The kernels (Triton block-sparse attention, FastVideo's st_attn / vsa) are compared with these references in
`test_kernels.py` (Triton, interpreted on the CPU) and `test_sparse_attention_cuda.py` (GPU).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sgl_diffusion.layers.attention import (
    VIDEO_SPARSE_BACKENDS,
    VideoAttention,
    attention,
    available_attention_backends,
    check_attention_backend_name,
    register_attention_backend,
    resolve_attention_backend,
)
from sgl_diffusion.layers.sparse_attention import (
    STA_TILE,
    VSA_TILE,
    SlidingTileStrategy,
    VideoSparseSettings,
    implementation_for,
    sliding_tile_attention,
    sliding_tile_tile_map,
    video_sparse_attention,
    vsa_topk,
)
from sgl_diffusion.layers.video_tiles import from_tiles, tile_layout, to_tiles
from sgl_diffusion.runtime.options import RuntimeOptions, sparse_backend_speed_options, video_sparse_settings

attn = importlib.import_module("sgl_diffusion.layers.attention")

#: fp32 on the CPU: the sparse references sum in another order than SDPA (measured up to 7e-7 here).
FP32_ATOL = 1e-6


def qkv(grid: tuple[int, int, int], heads: int = 2, dim: int = 12, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, math.prod(grid), heads, dim, generator=gen) for _ in range(4)]


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, S, H, D) SDPA in float32, optionally with a (S, S) or (H, S, S) boolean mask, in (B, S, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def strategy(windows: dict[tuple[int, int, int], list[int]]) -> SlidingTileStrategy:
    return SlidingTileStrategy.from_mapping({f"{s}_{l}_{h}": w for (s, l, h), w in windows.items()})


# ---- the tile permutation --------------------------------------------------------------------------


def fastvideo_tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """FastVideo's get_tile_partition_indices, written out: tiles row-major, tokens row-major inside each."""
    t_len, h_len, w_len = grid
    index = torch.arange(math.prod(grid)).reshape(grid)
    parts = []
    for t in range(0, t_len, tile[0]):
        for h in range(0, h_len, tile[1]):
            for w in range(0, w_len, tile[2]):
                parts.append(index[t : t + tile[0], h : h + tile[1], w : w + tile[2]].flatten())
    return torch.cat(parts)


@pytest.mark.parametrize(
    ("grid", "tile"),
    [
        ((8, 8, 8), VSA_TILE),
        ((5, 6, 7), VSA_TILE),
        ((7, 10, 9), STA_TILE),
        ((21, 30, 52), STA_TILE),
        ((1, 1, 1), STA_TILE),
    ],
)
def test_tile_permutation_round_trips(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> None:
    layout = tile_layout(grid, tile)
    assert torch.equal(layout.order, fastvideo_tile_order(grid, tile))
    assert torch.equal(layout.order[layout.inverse], torch.arange(math.prod(grid)))
    x = torch.randn(2, math.prod(grid), 3, 4)
    assert torch.equal(from_tiles(to_tiles(x, layout, pad=False), layout, padded=False), x)
    padded = to_tiles(x, layout)
    assert padded.shape == (2, layout.num_tiles * math.prod(tile), 3, 4)
    assert torch.equal(from_tiles(padded, layout), x)
    # Each tile: its real tokens first (in FastVideo's order), zeros after them.
    tiles = padded.view(2, layout.num_tiles, math.prod(tile), 3, 4)
    start = 0
    for i, size in enumerate(layout.sizes.tolist()):
        assert torch.equal(tiles[:, i, :size], x[:, layout.order[start : start + size]])
        assert not tiles[:, i, size:].any()
        start += size
    assert start == math.prod(grid)
    assert layout.exact == all(g % t == 0 for g, t in zip(grid, tile, strict=True))


def test_tile_layout_errors() -> None:
    with pytest.raises(ValueError, match="grid must be three positive ints"):
        tile_layout((4, 0, 4), VSA_TILE)
    with pytest.raises(ValueError, match="do not fill the grid"):
        to_tiles(torch.zeros(1, 10, 2), tile_layout((2, 2, 2), VSA_TILE))


# ---- sliding tile attention ------------------------------------------------------------------------


def test_sta_tile_map_by_hand() -> None:
    # One axis of 4 tiles (the other two of 1). Window 3 (half 1): the window is centred on the query's tile,
    # moved inwards at the edges (tile 0 reads 0..2, tile 3 reads 1..3). Window 1: only its own tile.
    expected_3 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    expected_1 = torch.eye(4, dtype=torch.bool)
    maps = sliding_tile_tile_map((4, 1, 1), ((3, 1, 1), (1, 1, 1), (2, 1, 1), (9, 1, 1)))
    assert torch.equal(maps[0], expected_3)
    assert torch.equal(maps[1], expected_1)
    # An even window w reads w // 2 tiles each side, as FastVideo's definition does: 2 acts like 3.
    assert torch.equal(maps[2], expected_3)
    # A window at least the grid's size reads everything.
    assert maps[3].all()
    # The axes combine: a (1, 3, 1) window on a 1x4x2 tile grid is the 4x4 pattern per column, within a column.
    two_d = sliding_tile_tile_map((1, 4, 2), ((1, 3, 1),))[0].view(4, 2, 4, 2)
    for c in range(2):
        assert torch.equal(two_d[:, c, :, c], expected_3)
        assert not two_d[:, c, :, 1 - c].any()


@pytest.mark.parametrize("grid", [(7, 10, 9), (12, 8, 16)])
def test_sta_full_window_is_dense(grid: tuple[int, int, int]) -> None:
    q, k, v, _ = qkv(grid)
    out = sliding_tile_attention(q, k, v, grid, ((99, 99, 99), (2, 2, 2)))
    assert (out - dense(q, k, v)).abs().max() <= FP32_ATOL


def test_sta_by_hand_block_diagonal_in_time() -> None:
    # 12 frames of one 8x8 tile each: tiles are frames 0-5 and 6-11. Window (1, 1, 1) attends within the own
    # tile only: attention over frames 0-5 and over frames 6-11, separately.
    grid = (12, 8, 8)
    q, k, v, _ = qkv(grid, heads=1)
    out = sliding_tile_attention(q, k, v, grid, ((1, 1, 1),))
    half = 6 * 64
    expected = torch.cat(
        [dense(q[:, :half], k[:, :half], v[:, :half]), dense(q[:, half:], k[:, half:], v[:, half:])], 1
    )
    assert (out - expected).abs().max() <= FP32_ATOL
    assert (out - dense(q, k, v)).abs().max() > 0.1


def natural_order_sta_mask(grid: tuple[int, int, int], window: tuple[int, int, int]) -> torch.Tensor:
    """STA's token mask written from the definition, token by token in the model's own (row-major) order."""
    counts = [math.ceil(g / t) for g, t in zip(grid, STA_TILE, strict=True)]
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    tiles = coords // torch.tensor(STA_TILE)
    allowed = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for axis in range(3):
        half = window[axis] // 2
        centre = tiles[:, axis].clamp(min=half).clamp(max=counts[axis] - 1 - half)
        allowed &= (centre[:, None] - tiles[None, :, axis]).abs() <= half
    return allowed


def test_sta_matches_the_definition_on_partial_tiles() -> None:
    grid = (13, 17, 9)  # 3 x 3 x 2 tiles, partial at every far edge
    windows = ((1, 1, 1), (3, 1, 2))
    q, k, v, _ = qkv(grid)
    out = sliding_tile_attention(q, k, v, grid, windows)
    mask = torch.stack([natural_order_sta_mask(grid, w) for w in windows])
    assert (out - dense(q, k, v, mask)).abs().max() <= FP32_ATOL


@pytest.mark.parametrize("text", [1, 64, 70])
def test_sta_with_text_tokens_matches_the_definition(text: int) -> None:
    # HunyuanVideo's joint attention over [video, text]: video reads video within its window and all the text;
    # the text reads everything (FastVideo's text mask). Text counts below, at and above one 64-token block.
    grid = (13, 17, 9)
    windows = ((1, 1, 1), (3, 1, 2))
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n + text, 2, 12, generator=gen) for _ in range(3))
    out = sliding_tile_attention(q, k, v, grid, windows, text_tokens=text)
    mask = torch.ones(2, n + text, n + text, dtype=torch.bool)
    mask[:, :n, :n] = torch.stack([natural_order_sta_mask(grid, w) for w in windows])
    assert (out - dense(q, k, v, mask)).abs().max() <= FP32_ATOL
    full = sliding_tile_attention(q, k, v, grid, ((99, 99, 99),) * 2, text_tokens=text)
    assert (full - dense(q, k, v)).abs().max() <= FP32_ATOL


def test_seam_checks_text_tokens_and_vsa_refuses_them() -> None:
    grid = (6, 8, 8)
    q, k, v, _ = qkv(grid)
    settings = VideoSparseSettings(strategy=strategy({(0, 0, h): [99, 99, 99] for h in range(2)}))
    text = torch.randn(2, 5, 2, 12)
    joint = [torch.cat((t, text), 1) for t in (q, k, v)]
    video = VideoAttention(grid=grid, layer=0, settings=settings, step=0, text_tokens=5)
    out = attention(*joint, backend="sliding_tile_attn", video=video)
    assert out.shape == (2, math.prod(grid) + 5, 24)
    with pytest.raises(ValueError, match=r"video grid \(6, 8, 8\) and 4 text tokens: q/k/v need 388 tokens"):
        attention(*joint, backend="sliding_tile_attn", video=VideoAttention(grid, 0, settings, 0, text_tokens=4))
    with pytest.raises(ValueError, match="video tokens alone"):
        attention(*joint, backend="video_sparse_attn", video=VideoAttention(grid, 0, VideoSparseSettings(), 0,
                                                                            text_tokens=5))  # fmt: skip


# ---- video sparse attention ------------------------------------------------------------------------


def test_vsa_topk_rule() -> None:
    # FastVideo's compute_topk: ceil((1 - sparsity) * tiles), within [1, tiles]. Wan2.1 480p 81 frames: 624 tiles.
    assert vsa_topk(0.8, 624) == 125
    assert vsa_topk(0.0, 624) == 624
    assert vsa_topk(0.99, 3) == 1
    assert vsa_topk(0.5, 18) == 9


@pytest.mark.parametrize("grid", [(8, 8, 12), (7, 9, 10)])
def test_vsa_without_sparsity_or_gate_is_dense(grid: tuple[int, int, int]) -> None:
    q, k, v, _ = qkv(grid)
    out = video_sparse_attention(q, k, v, torch.zeros_like(q), grid, sparsity=0.0)
    assert (out - dense(q, k, v)).abs().max() <= FP32_ATOL


def test_vsa_by_hand_two_tiles() -> None:
    """A 4x4x8 grid is two 4x4x4 tiles: the tokens with w < 4 and those with w >= 4. Written from the definition:
    tile means, a 2x2 coarse softmax, each query tile keeps its best key tile (sparsity 0.5: top-1 of 2)."""
    grid = (4, 4, 8)
    q, k, v, gate = qkv(grid, heads=2, dim=16)
    tile_of = (torch.arange(math.prod(grid)) % 8) // 4  # w // 4 for row-major (t, h, w)
    members = [tile_of == 0, tile_of == 1]

    def means(x: torch.Tensor) -> torch.Tensor:  # (B, S, H, D) -> (B, H, 2, D)
        return torch.stack([x[:, m].mean(1) for m in members], dim=2)

    qc, kc, vc = means(q), means(k), means(v)
    coarse = torch.softmax(qc @ kc.transpose(-1, -2) / 4.0, dim=-1)  # (B, H, 2, 2); sqrt(16) = 4
    compressed_tiles = coarse @ vc  # (B, H, 2, D)
    best = coarse.argmax(-1)  # (B, H, 2)
    expected = torch.empty_like(q)
    for b in range(2):
        for h in range(2):
            for tile in range(2):
                rows = members[tile]
                keys = members[int(best[b, h, tile])]
                fine = dense(
                    q[b : b + 1, rows, h : h + 1], k[b : b + 1, keys, h : h + 1], v[b : b + 1, keys, h : h + 1]
                )
                expected[b, rows, h] = compressed_tiles[b, h, tile] * gate[b, rows, h] + fine[0, :, 0]
    out = video_sparse_attention(q, k, v, gate, grid, sparsity=0.5)
    assert (out - expected).abs().max() <= 2e-6
    # Without a gate the compressed branch is added as is (a gate of ones).
    ungated = video_sparse_attention(q, k, v, None, grid, sparsity=0.5)
    assert torch.equal(ungated, video_sparse_attention(q, k, v, torch.ones_like(q), grid, sparsity=0.5))
    assert (ungated - out).abs().max() > 0.01


# ---- the mask strategy file ------------------------------------------------------------------------


def test_mask_strategy_file(tmp_path: Path) -> None:
    entries = {f"{s}_{l}_{h}": [1 + s, 2, 3 + h] for s in range(2) for l in range(3) for h in range(2)}
    path = tmp_path / "mask_strategy.json"
    path.write_text(json.dumps(entries))
    parsed = SlidingTileStrategy.from_file(path)
    assert parsed.steps == 2 and parsed.source == str(path)
    parsed.check_model(layers=3, heads=2)
    assert parsed.head_windows(1, 2, 2) == ((2, 2, 3), (2, 2, 4))
    parsed.check_steps(2)
    with pytest.raises(ValueError, match=r"has windows for 2 denoising steps; this request runs 3"):
        parsed.check_steps(3)
    with pytest.raises(
        ValueError, match=r"entry '0_0_1' names layer 0 / head 1, but the model has 3 layers of 1 heads"
    ):
        parsed.check_model(layers=3, heads=1)
    with pytest.raises(ValueError, match=r"no window for step 0, layer 3, head 0 \('0_3_0'\)"):
        parsed.check_model(layers=4, heads=2)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "expected a non-empty JSON object"),
        ([1, 2], "expected a non-empty JSON object"),
        ({"0_0": [1, 1, 1]}, "key '0_0' is not \"<step>_<layer>_<head>\""),
        ({"a_0_0": [1, 1, 1]}, "key 'a_0_0' is not"),
        ({"0_0_0": [1, 1]}, r"'0_0_0' must be a window \[t, h, w\] of three positive ints, got \[1, 1\]"),
        ({"0_0_0": [0, 1, 1]}, "three positive ints"),
        ({"0_0_0": [1, True, 1]}, "three positive ints"),
        ({"0_0_0": "3,3,3"}, "three positive ints"),
        ({"0_0_0": [1, 1, 1], "2_0_0": [1, 1, 1]}, "steps must run from 0 without gaps; no entry for step 1"),
    ],
)
def test_mask_strategy_errors(data: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlidingTileStrategy.from_mapping(data, source="m.json")


def test_mask_strategy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask strategy file .*nope.json: cannot read it"):
        SlidingTileStrategy.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        SlidingTileStrategy.from_file(bad)


def test_options_read_the_strategy_and_the_sparsity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"0_0_0": [1, 1, 1]}))
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG", raising=False)
    options = RuntimeOptions.from_config(
        {"device": "cpu", "attention_backend": "sliding_tile_attn", "mask_strategy_file_path": str(path)}
    )
    assert options.attention_backend == "sliding_tile_attn" and options.cuda_graphs == "off"
    assert options.video_sparse.strategy is not None and options.video_sparse.strategy.windows == {(0, 0, 0): (1, 1, 1)}
    # SGLang's environment variable names the file too.
    monkeypatch.setenv("SGLANG_DIFFUSION_ATTENTION_CONFIG", str(path))
    from_env = RuntimeOptions.from_config({"device": "cpu", "attention_backend": "sliding_tile_attn"})
    assert from_env.video_sparse.strategy == options.video_sparse.strategy
    with pytest.raises(
        ValueError, match="SGLANG_DIFFUSION_ATTENTION_CONFIG=.*read by attention_backend sliding_tile_attn only"
    ):
        RuntimeOptions.from_config({"device": "cpu"})
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG")
    vsa = RuntimeOptions.from_config(
        {"device": "cpu", "attention_backend": "video_sparse_attn", "attention_backend_config": {"VSA_sparsity": 0.8}}
    )
    assert vsa.video_sparse == VideoSparseSettings(strategy=None, vsa_sparsity=0.8)
    alias = RuntimeOptions.from_config(
        {"device": "cpu", "attention_backend": "video_sparse_attn", "attention_backend_config": {"sparsity": 0.5}}
    )
    assert alias.video_sparse.vsa_sparsity == 0.5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"attention_backend": "sliding_tile_attn"}, "sliding_tile_attn needs a mask strategy file"),
        ({"mask_strategy_file_path": "m.json"}, "mask_strategy_file_path: a mask strategy is read by .* only"),
        (
            {"attention_backend": "video_sparse_attn", "attention_backend_config": {"topk": 3}},
            r"unknown key\(s\) \['topk'\]",
        ),
        (
            {"attention_backend": "video_sparse_attn", "attention_backend_config": {"VSA_sparsity": 1.0}},
            r"must be a number in \[0, 1\)",
        ),
        (
            {
                "attention_backend": "video_sparse_attn",
                "attention_backend_config": {"sparsity": 0.1, "VSA_sparsity": 0.1},
            },
            "not both",
        ),
        ({"attention_backend_config": {"VSA_sparsity": 0.5}}, "read by attention_backend video_sparse_attn only"),
    ],
)
def test_options_refuse_what_the_backend_does_not_read(
    config: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG", raising=False)
    with pytest.raises(ValueError, match=message):
        RuntimeOptions.from_config({"device": "cpu", **config})


def test_sparse_backends_and_speed_options() -> None:
    # (cuda_graphs=on needs a CUDA device to reach this check through the options.)
    with pytest.raises(ValueError, match="cuda_graphs=on is not supported with attention_backend sliding_tile_attn"):
        sparse_backend_speed_options("sliding_tile_attn", "on")
    assert sparse_backend_speed_options("video_sparse_attn", "auto") == "off"
    assert sparse_backend_speed_options("sliding_tile_attn", "auto") == "off"
    assert sparse_backend_speed_options("torch_sdpa", "on") == "on"


def test_option_and_environment_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="name different files; give one"):
        video_sparse_settings("sliding_tile_attn", "a.json", None, {"SGLANG_DIFFUSION_ATTENTION_CONFIG": "b.json"})


# ---- names, selection and refusals -----------------------------------------------------------------


def test_sparse_backend_names() -> None:
    assert VIDEO_SPARSE_BACKENDS == {"sliding_tile_attn", "video_sparse_attn"}
    assert {"sliding_tile_attn", "video_sparse_attn"} <= set(available_attention_backends())
    for name in VIDEO_SPARSE_BACKENDS:
        assert check_attention_backend_name(name) == name
        assert resolve_attention_backend(name, video_tokens=True) == name
        # A model that cannot describe its video tokens refuses them at load time.
        with pytest.raises(ValueError, match=rf"'{name}' is sparse attention over a video's token grid; this model"):
            resolve_attention_backend(name)
        with pytest.raises(ValueError, match="cannot be registered"):
            register_attention_backend(name, attn._torch_sdpa)
    with pytest.raises(ValueError, match=r"unknown attention backend 'vsa' \(did you mean 'video_sparse_attn'\?\)"):
        resolve_attention_backend("vsa")
    with pytest.raises(
        ValueError, match=r"unknown attention backend 'sliding_tile' \(did you mean 'sliding_tile_attn'\?\)"
    ):
        resolve_attention_backend("sliding_tile")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("sage_attn_3", "SageAttention3.*PyPI has no package"),
        ("vmoba_attn", "V-MoBA attention.*SGLang's own kernel"),
        ("aiter", "AMD AITER attention.*ROCm library for AMD GPUs"),
    ],
)
def test_backends_without_a_package_here(name: str, why: str) -> None:
    for check in (check_attention_backend_name, resolve_attention_backend):
        with pytest.raises(ValueError, match=rf"attention backend '{name}' \({why}.*; available: torch_sdpa, auto"):
            check(name)


def test_sparse_backends_need_the_video_grid() -> None:
    grid = (2, 4, 4)
    q, k, v, _ = qkv(grid)
    settings = VideoSparseSettings(strategy=strategy({(0, 0, 0): [1, 1, 1], (0, 0, 1): [1, 1, 1]}))
    for name in VIDEO_SPARSE_BACKENDS:
        with pytest.raises(ValueError, match=rf"'{name}' needs the video token grid"):
            attention(q, k, v, backend=name)
        video = VideoAttention(grid=grid, layer=0, settings=settings, step=0)
        with pytest.raises(ValueError, match="does not take attention masks"):
            attention(q, k, v, backend=name, video=video, attn_mask=torch.ones(2, 32, dtype=torch.bool))
        with pytest.raises(ValueError, match=r"self-attention over the video grid \(2, 4, 5\)"):
            attention(q, k, v, backend=name, video=VideoAttention(grid=(2, 4, 5), layer=0, settings=settings, step=0))
        out = attention(q, k, v, backend=name, video=video)
        assert out.shape == (2, 32, 24) and out.dtype == q.dtype
    with pytest.raises(ValueError, match="needs a mask strategy"):
        attention(q, k, v, backend="sliding_tile_attn", video=VideoAttention(grid, 0, VideoSparseSettings(), step=0))
    with pytest.raises(ValueError, match="needs the denoising step index"):
        attention(q, k, v, backend="sliding_tile_attn", video=VideoAttention(grid, 0, settings))
    with pytest.raises(ValueError, match=r"no window for \(step, layer, head\) \(0, 1, 0\)"):
        attention(q, k, v, backend="sliding_tile_attn", video=VideoAttention(grid, 1, settings, step=0))


def test_dense_backends_ignore_the_video_description() -> None:
    grid = (2, 4, 4)
    q, k, v, _ = qkv(grid)
    video = VideoAttention(grid=grid, layer=0, settings=VideoSparseSettings(), step=0, gate=torch.ones_like(q))
    assert torch.equal(attention(q, k, v, video=video), attention(q, k, v))


def test_sparse_backends_need_the_kernels_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_diffusion.layers import sparse_attention

    monkeypatch.setattr(sparse_attention, "_bsa", None)
    with pytest.raises(ValueError, match=r"need the sgl_diffusion_kernels package .*`pip install ./kernels`"):
        resolve_attention_backend("video_sparse_attn", video_tokens=True)


def test_cpu_runs_the_reference() -> None:
    q = torch.zeros(1, 8, 1, 4)
    assert implementation_for("sliding_tile_attn", q, (2, 2, 2)) == "reference"
    assert implementation_for("video_sparse_attn", q.bfloat16(), (2, 2, 2)) == "reference"


# ---- fa4 (FlashAttention-4, stand-in package on the CPU) --------------------------------------------


@pytest.fixture
def fa4_stand_in(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A `flash_attn.cute` module whose flash_attn_func computes attention with torch and records its calls."""
    monkeypatch.setattr(attn, "_kernel_cache", {})
    monkeypatch.setattr(attn, "_import_failures", {})
    calls: list[dict[str, Any]] = []

    def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
        calls.append({"q": q, **kwargs})
        return dense(q.float(), k.float(), v.float()).to(q.dtype), None

    package = types.ModuleType("flash_attn")
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    package.cute = cute  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    return calls


def test_fa4_is_its_own_backend(monkeypatch: pytest.MonkeyPatch, fa4_stand_in: list[dict[str, Any]]) -> None:
    monkeypatch.setattr(attn, "_KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    assert resolve_attention_backend("fa4") == "fa4" and check_attention_backend_name("fa4") == "fa4"
    assert "fa4" in available_attention_backends()
    q, k, v, _ = qkv((2, 2, 2), dim=8)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    out = attention(q, k, v, backend="fa4")
    assert len(fa4_stand_in) == 1 and fa4_stand_in[0]["q"] is q and fa4_stand_in[0]["causal"] is False
    assert out.shape == (2, 8, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, dense(q.float(), k.float(), v.float()).flatten(2, 3).bfloat16())
    # fa3 still means fa (FlashAttention-3/2), not fa4.
    assert attn.canonical_attention_backend("fa3") == "fa"


def test_fa4_needs_hopper(monkeypatch: pytest.MonkeyPatch, fa4_stand_in: list[dict[str, Any]]) -> None:
    monkeypatch.setattr(attn, "_is_hopper_or_newer", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(
        ValueError, match=r"'fa4' needs a Hopper \(sm90\) or newer GPU, got compute capability \(8, 0\)"
    ):
        resolve_attention_backend("fa4", device="cuda:0", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'fa4' runs on CUDA only"):
        attention(*(t.bfloat16() for t in qkv((2, 2, 2))[:3]), backend="fa4")
    assert fa4_stand_in == []


def test_fa4_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn, "_kernel_cache", {})
    monkeypatch.setattr(attn, "_import_failures", {})
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(ValueError) as info:
        resolve_attention_backend("fa4")
    message = str(info.value)
    assert message.startswith("attention backend 'fa4' needs the flash-attn-4 package")
    assert "is not installed" in message and "pip install --pre flash-attn-4" in message
