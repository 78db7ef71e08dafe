"""Sparse video attention kernels on the GPU against their torch references (skipped without CUDA).

* this repository's Triton block-sparse kernel (`sgl_diffusion_kernels.block_sparse_attention`) under STA and VSA
  at Wan-like shapes, and STA with HunyuanVideo's trailing text tokens, bf16 and fp32, against the float32 torch
  reference;
* FastVideo's `st_attn` (sliding tile attention, its 18x48x80 grid) and `vsa` (video sparse attention) packages,
  when they import with this torch, against the same reference (`pytest -rs` says why one was skipped);
* FlashAttention-3/2 (`--attention-backend fa`: `fa3-fwd`, `flash_attn_interface` or `flash_attn`) and
  FlashAttention-4 (`flash-attn-4`, `--attention-backend fa4`) against SDPA, when they import on a Hopper GPU.

Tolerances: bf16 kernels round `p` to bf16 before `p @ v` and write bf16 outputs (|out| ~ 1 here), so they sit
within a few bf16 ulps of the float32 reference: max abs 2e-2, mean abs 2e-3. float32 (Triton, `ieee` dots):
1e-4 (reduction order over up to 32k keys).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

BF16_MAX, BF16_MEAN, FP32_MAX = 2e-2, 2e-3, 1e-4


def tensors(grid: tuple[int, int, int], heads: int, dim: int, dtype: torch.dtype, count: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, math.prod(grid), heads, dim, generator=gen, device="cuda").to(dtype) for _ in range(count)]


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want.float()).abs()
    if got.dtype == torch.float32:
        assert err.max() <= FP32_MAX, err.max()
    else:
        assert err.max() <= BF16_MAX and err.mean() <= BF16_MEAN, (err.max(), err.mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("grid", [(12, 16, 24), (7, 30, 26)], ids=["whole_tiles", "partial_tiles"])
@torch.inference_mode()
def test_triton_sta_matches_reference(grid: tuple[int, int, int], dtype: torch.dtype) -> None:
    from sgl_diffusion.layers.sparse_attention import sliding_tile_attention

    heads = 4
    q, k, v, _ = tensors(grid, heads, 128, dtype)
    windows = ((1, 1, 1), (3, 3, 3), (1, 3, 5), (99, 99, 99))
    got = sliding_tile_attention(q, k, v, grid, windows, implementation="triton")
    want = sliding_tile_attention(q, k, v, grid, windows, implementation="reference")
    assert_close_to_reference(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("text", [1, 120, 256])
@torch.inference_mode()
def test_triton_sta_with_text_matches_reference(text: int, dtype: torch.dtype) -> None:
    # HunyuanVideo's joint attention: the text tokens after the video's read and are read by every token.
    from sgl_diffusion.layers.sparse_attention import sliding_tile_attention

    grid = (7, 30, 26)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, math.prod(grid) + text, 4, 128, generator=gen, device="cuda").to(dtype) for _ in range(3))
    windows = ((1, 1, 1), (3, 3, 3), (1, 3, 5), (99, 99, 99))
    got = sliding_tile_attention(q, k, v, grid, windows, text_tokens=text, implementation="triton")
    want = sliding_tile_attention(q, k, v, grid, windows, text_tokens=text, implementation="reference")
    assert_close_to_reference(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("grid", [(8, 16, 16), (7, 30, 26)], ids=["whole_tiles", "partial_tiles"])
@torch.inference_mode()
def test_triton_vsa_matches_reference(grid: tuple[int, int, int], dtype: torch.dtype) -> None:
    from sgl_diffusion.layers.sparse_attention import video_sparse_attention

    q, k, v, gate = tensors(grid, 4, 128, dtype)
    got = video_sparse_attention(q, k, v, gate, grid, 0.8, implementation="triton")
    want = video_sparse_attention(q, k, v, gate, grid, 0.8, implementation="reference")
    assert_close_to_reference(got, want)


@torch.inference_mode()
def test_st_attn_package_matches_reference() -> None:
    from sgl_diffusion.layers import sparse_attention as sa

    if sa._package("st_attn") is None:
        pytest.skip(f"st_attn does not load here: {sa._package_failures.get('st_attn')}")
    grid = (18, 48, 80)  # the package's Wan shape (whole 6x8x8 tiles), 69 120 tokens
    heads = 2
    q, k, v, _ = tensors(grid, heads, 128, torch.bfloat16)
    windows = ((3, 3, 5), (3, 1, 10))  # FastVideo's own test windows
    got = sa.sliding_tile_attention(q, k, v, grid, windows, implementation="st_attn")
    triton = sa.sliding_tile_attention(q, k, v, grid, windows, implementation="triton")
    want = sa.sliding_tile_attention(q, k, v, grid, windows, implementation="reference")
    assert_close_to_reference(got, want)
    assert_close_to_reference(triton, want)


@torch.inference_mode()
def test_vsa_package_matches_reference() -> None:
    from sgl_diffusion.layers import sparse_attention as sa

    if sa._package("vsa") is None:
        pytest.skip(f"vsa does not load here: {sa._package_failures.get('vsa')}")
    grid = (8, 16, 16)
    q, k, v, gate = tensors(grid, 4, 128, torch.bfloat16)
    got = sa.video_sparse_attention(q, k, v, gate, grid, 0.8, implementation="vsa")
    want = sa.video_sparse_attention(q, k, v, gate, grid, 0.8, implementation="reference")
    assert_close_to_reference(got, want)


@pytest.mark.parametrize("backend", ["fa", "fa4"])
@torch.inference_mode()
def test_flash_attention_matches_sdpa(backend: str) -> None:
    # The module itself: `sgl_diffusion.layers.attention` the attribute is the function the package re-exports.
    attention_mod = importlib.import_module("sgl_diffusion.layers.attention")

    try:
        attention_mod.resolve_attention_backend(backend, device="cuda", dtype=torch.bfloat16)
    except ValueError as err:
        pytest.skip(str(err))
    q, k, v = tensors((1, 32, 128), 8, 128, torch.bfloat16, count=3)
    got = attention_mod.attention(q, k, v, backend=backend)
    want = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert_close_to_reference(got, want.flatten(2, 3))


@torch.inference_mode()
def test_seam_picks_a_kernel_on_cuda() -> None:
    from sgl_diffusion.layers.sparse_attention import implementation_for

    q = torch.zeros(1, 64, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert implementation_for("sliding_tile_attn", q, (4, 4, 4)) == "triton"  # not one of st_attn's grids
    assert implementation_for("video_sparse_attn", q, (4, 4, 4)) in ("vsa", "triton")
    assert implementation_for("video_sparse_attn", q.float(), (4, 4, 4)) == "triton"


@pytest.mark.parametrize("backend", ["video_sparse_attn", "sliding_tile_attn"])
@pytest.mark.parametrize("grid", [(8, 16, 16), (7, 30, 26)], ids=["whole_tiles", "partial_tiles"])
@torch.inference_mode()
def test_sparse_ops_compile_with_inductor(grid: tuple[int, int, int], backend: str) -> None:
    # `--enable-torch-compile` with a sparse backend: its op inside a fullgraph inductor graph runs the same Triton
    # kernel on the same inputs as eager, and one graph serves every layer and step (STA's windows, which change
    # per layer, come as a tensor: no recompile).
    from torch._dynamo.utils import counters

    from sgl_diffusion.layers.attention import attention
    from sgl_diffusion.layers.sparse_attention import VideoAttention, VideoSparseSettings

    q, k, v, gate = tensors(grid, 4, 128, torch.bfloat16)
    settings = VideoSparseSettings(vsa_sparsity=0.8)
    windows = [torch.tensor([[1, 1, 1], [3, 3, 3], [1, 3, 5], [9, 9, 9]]).roll(i, 0) for i in range(3)]

    def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video: VideoAttention) -> torch.Tensor:
        return attention(q * 1.0, k, v, backend=backend, video=video) + 1.0

    compiled = torch.compile(layer, fullgraph=True, dynamic=False, backend="inductor")
    torch._dynamo.reset()
    counters.clear()
    for index in range(3):
        video = VideoAttention(grid, index, settings, index, gate=gate, windows=windows[index])
        torch.testing.assert_close(compiled(q, k, v, video), layer(q, k, v, video), rtol=0, atol=BF16_MAX)
    assert counters["stats"]["unique_graphs"] == 1
