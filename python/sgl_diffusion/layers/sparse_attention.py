"""Sparse attention over a video's token grid: sliding tile attention (STA) and video sparse attention (VSA).

Both are FastVideo's (https://github.com/hao-ai-lab/FastVideo), and both are served here by
``--attention-backend sliding_tile_attn`` / ``video_sparse_attn`` through the one seam,
:func:`sgl_diffusion.layers.attention.attention`, for the *self-attention over video tokens* of a model that
tells the seam its token grid (:class:`VideoAttention`); the Wan models do, and HunyuanVideo for STA over its
joint ``[video, text]`` attention (the text tokens follow the video's: every token reads them, they read every
token). Tokens are regrouped by tiles at the seam (:mod:`.video_tiles`) and put back afterwards, so the model
keeps its row-major token order.

**Sliding tile attention** (tiles of :data:`STA_TILE` = 6x8x8 tokens). Each head of each layer has a window
``(wt, wh, ww)`` counted in tiles, per denoising step, from a *mask strategy* (:class:`SlidingTileStrategy`).
A query in tile ``(qt, qh, qw)`` of a ``nt x nh x nw`` tile grid attends to the keys of every tile
``(kt, kh, kw)`` with ``|ct - kt| <= wt // 2`` (and likewise for h, w), where the window's centre
``ct = min(max(qt, wt // 2), nt - 1 - wt // 2)`` is the query's tile moved inwards so that the window stays
on the grid (FastVideo's flex-attention definition of STA, ``generate_sta_mask``, which its CUDA kernel is
tested against). A window at least as large as the tile grid is full attention. Grids that are not a multiple
of the tile get partial edge tiles (FastVideo's kernel only takes whole tiles of three fixed shapes).

**Video sparse attention** (tiles of :data:`VSA_TILE` = 4x4x4 = 64 tokens), FastVideo's ``vsa`` package's
``video_sparse_attn``: mean-pool q, k, v over each tile's real tokens; a coarse softmax attention between the
pooled tiles gives every token its tile's *compressed* output and, per query tile, the ``topk`` key tiles
with the largest coarse scores; the *fine* output is exact attention of each query over the tokens of its
selected tiles; the result is ``compressed * gate + fine``, ``gate`` being a learned per-token, per-channel
projection (``to_gate_compress``) of the same input as q/k/v (without one: ``compressed + fine``). ``topk =
ceil((1 - sparsity) * num_tiles)``, at least 1 (FastVideo's ``compute_topk``, which counts the partial edge
tiles; SGLang and FastVideo before 2026-07 used ``ceil((1 - sparsity) * S / 64)``, fewer tiles when the
grid is not a multiple of 4 -- at 832x480, 81 frames: 512 of 624 tiles at sparsity 0 -- so sparsity 0 is
full attention in the fine branch here and not there; the two agree on FastWan2.1's 448x832 training grid).

**Where each runs.** Each backend has a pure-torch reference (exact float32 softmax over the selected keys,
``sgl_diffusion_kernels.block_sparse_attention.block_sparse_attention_reference``): the only implementation on
the CPU. On CUDA a kernel runs: FastVideo's prebuilt packages when they import and take the call (``st_attn``:
whole tiles of its shapes ``18x48x80`` / ``36x48x48``; ``vsa``: bf16), else this repository's Triton
block-sparse attention kernel (``sgl_diffusion_kernels.block_sparse_attention``), which takes any grid and
dtype. :func:`implementation_for` says which, and the first call of each logs it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch

from .video_tiles import TileLayout, from_tiles, tile_layout, to_tiles

try:
    from sgl_diffusion_kernels import block_sparse_attention as _bsa
except ImportError:  # the kernels package is optional for the engine; the sparse backends say they need it
    _bsa = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_CONFIG_ENV",
    "STA_TILE",
    "VSA_TILE",
    "SlidingTileStrategy",
    "VideoAttention",
    "VideoSparseSettings",
    "implementation_for",
    "require_kernels_package",
    "sliding_tile_attention",
    "sliding_tile_tile_map",
    "video_sparse_attention",
    "vsa_topk",
]

#: SGLang Diffusion's environment variable naming STA's mask strategy file.
ATTENTION_CONFIG_ENV = "SGLANG_DIFFUSION_ATTENTION_CONFIG"

#: What sliding tile attention without a mask strategy says.
STA_NEEDS_STRATEGY = (
    f"attention backend 'sliding_tile_attn' needs a mask strategy: --mask-strategy-file-path or ${ATTENTION_CONFIG_ENV}"
)
#: Why VSA refuses attention that holds more than the video's tokens.
VSA_VIDEO_ONLY = (
    "attention backend 'video_sparse_attn' is self-attention over video tokens alone (FastVideo's VSA, the Wan "
    "models); this model's attention also holds its text tokens (joint attention): use sliding_tile_attn"
)

STA_TILE = (6, 8, 8)
VSA_TILE = (4, 4, 4)
#: Token grids FastVideo's ``st_attn`` kernel takes (whole 6x8x8 tiles), by its ``dit_seq_shape`` names.
STA_PACKAGE_GRIDS = {(18, 48, 80): "18x48x80", (36, 48, 48): "36x48x48"}

Implementation = Literal["reference", "triton", "st_attn", "vsa"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "triton", "st_attn", "vsa")
Window = tuple[int, int, int]


# --------------------------------------------------------------------------------------------------
# Settings: the mask strategy (STA) and the sparsity (VSA)
# --------------------------------------------------------------------------------------------------

_KEY = re.compile(r"^(\d+)_(\d+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class SlidingTileStrategy:
    """STA's per-(step, layer, head) windows: FastVideo's / SGLang's mask strategy file.

    The file is a JSON object whose keys are ``"<step>_<layer>_<head>"`` (denoising step index, transformer
    layer, attention head; all from 0) and whose values are ``[wt, wh, ww]`` windows in tiles. It must cover
    steps ``0..steps-1`` with every layer and head of the model for each step (:meth:`check_model`); a request
    may run at most ``steps`` denoising steps (:meth:`check_steps`).
    """

    source: str
    windows: Mapping[tuple[int, int, int], Window]

    @classmethod
    def from_file(cls, path: str | Path) -> SlidingTileStrategy:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise ValueError(f"mask strategy file {path}: cannot read it ({err})") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"mask strategy file {path}: not JSON ({err})") from err
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "mask strategy") -> SlidingTileStrategy:
        if not isinstance(data, dict) or not data:
            raise ValueError(f'{source}: expected a non-empty JSON object of "step_layer_head": [t, h, w]')
        windows: dict[tuple[int, int, int], Window] = {}
        for key, value in data.items():
            match = _KEY.match(str(key))
            if match is None:
                raise ValueError(f'{source}: key {key!r} is not "<step>_<layer>_<head>" (three integers from 0)')
            if (
                not isinstance(value, list | tuple)
                or len(value) != 3
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
            ):
                raise ValueError(f"{source}: {key!r} must be a window [t, h, w] of three positive ints, got {value!r}")
            windows[(int(match[1]), int(match[2]), int(match[3]))] = (value[0], value[1], value[2])
        steps = {step for step, _, _ in windows}
        if steps != set(range(len(steps))):
            missing = sorted(set(range(max(steps) + 1)) - steps)
            raise ValueError(f"{source}: steps must run from 0 without gaps; no entry for step {missing[0]}")
        return cls(source=source, windows=windows)

    @property
    def steps(self) -> int:
        return 1 + max(step for step, _, _ in self.windows)

    def check_model(self, layers: int, heads: int) -> None:
        """Raises unless every step has a window for each of ``layers`` x ``heads`` and nothing else."""
        for step, layer, head in self.windows:
            if layer >= layers or head >= heads:
                raise ValueError(
                    f"{self.source}: entry '{step}_{layer}_{head}' names layer {layer} / head {head}, but the model "
                    f"has {layers} layers of {heads} heads"
                )
        for step in range(self.steps):
            for layer in range(layers):
                for head in range(heads):
                    if (step, layer, head) not in self.windows:
                        raise ValueError(
                            f"{self.source}: no window for step {step}, layer {layer}, head {head} "
                            f"('{step}_{layer}_{head}'); every step needs all {layers} x {heads} layers x heads"
                        )

    def check_steps(self, steps: int) -> None:
        if steps > self.steps:
            raise ValueError(
                f"the mask strategy {self.source} has windows for {self.steps} denoising steps; "
                f"this request runs {steps}"
            )

    def head_windows(self, step: int, layer: int, heads: int) -> tuple[Window, ...]:
        try:
            return tuple(self.windows[(step, layer, head)] for head in range(heads))
        except KeyError as err:
            raise ValueError(f"{self.source}: no window for (step, layer, head) {err.args[0]}") from err


@dataclasses.dataclass(frozen=True)
class VideoSparseSettings:
    """What the sparse backends read besides q/k/v: STA's mask strategy, VSA's sparsity (0 <= s < 1)."""

    strategy: SlidingTileStrategy | None = None
    vsa_sparsity: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.vsa_sparsity, bool) or not 0.0 <= float(self.vsa_sparsity) < 1.0:
            raise ValueError(f"VSA_sparsity must be a number in [0, 1), got {self.vsa_sparsity!r}")

    def sta_windows(self, step: int | None, layer: int, heads: int) -> torch.Tensor:
        """STA's windows of ``layer``'s heads at ``step`` as a ``(heads, 3)`` int64 CPU tensor: what a model puts
        in :attr:`VideoAttention.windows`, built outside its compiled blocks (a tensor's values are no guard, so
        one compiled graph serves every layer and step)."""
        if self.strategy is None:
            raise ValueError(STA_NEEDS_STRATEGY)
        if step is None:
            raise ValueError("attention backend 'sliding_tile_attn' needs the denoising step index")
        return torch.tensor(self.strategy.head_windows(step, layer, heads), dtype=torch.int64)

    def check_model(self, backend: str, layers: int, heads: int) -> None:
        """At a model's load: under ``sliding_tile_attn`` a mask strategy must be given and fit ``layers`` x
        ``heads`` (what the model's attention calls count as layers)."""
        if backend != "sliding_tile_attn":
            return
        if self.strategy is None:
            raise ValueError(STA_NEEDS_STRATEGY)
        self.strategy.check_model(layers, heads)


@dataclasses.dataclass(frozen=True)
class VideoAttention:
    """A self-attention call over a video's tokens, as the model describes it to the attention seam.

    ``grid`` is the token grid ``(T, H, W)`` (q/k/v rows in row-major order over it), ``layer`` the transformer
    layer, ``step`` the denoising step index (STA's strategy is per step), ``gate`` VSA's gate
    ``(B, S, heads, head_dim)`` (None: ungated), ``settings`` the backends' settings. ``text_tokens``: tokens
    after the video's in q/k/v (HunyuanVideo's joint attention over ``[video, text]``); under STA every query
    reads all of them and they read every token (FastVideo's text mask), only video reads video by tiles.
    ``windows``: STA's ``(heads, 3)`` windows for this call (:meth:`VideoSparseSettings.sta_windows`); None: looked
    up from ``settings``, ``step`` and ``layer`` at the call, which compiled blocks would specialise on.
    """

    grid: tuple[int, int, int]
    layer: int
    settings: VideoSparseSettings
    step: int | None = None
    gate: torch.Tensor | None = None
    text_tokens: int = 0
    windows: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------------
# Which implementation runs
# --------------------------------------------------------------------------------------------------

# module name -> why it did not import (for the log line saying why a package kernel was not used)
_package_failures: dict[str, str] = {}
# module name -> the probe's result; a package is probed once per process (a failing import is slow).
_packages: dict[str, ModuleType | None] = {}
_logged: set[tuple[str, str]] = set()


def _package(name: str) -> ModuleType | None:
    """FastVideo's kernel package ``name`` if it imports and its CUDA extension loaded, else None."""
    if name not in _packages:
        _packages[name] = _probe_package(name)
    return _packages[name]


def _probe_package(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(name)
    # Third-party packages whose import runs device queries: vsa asks for the CUDA capability (a RuntimeError
    # without a GPU) and both load extensions built against another torch (ImportError / OSError).
    except (ImportError, OSError, RuntimeError, AssertionError) as err:
        _package_failures[name] = f"{type(err).__name__}: {err}"
        return None
    if name == "st_attn" and not callable(getattr(module, "sta_fwd", None)):
        # st_attn swallows the failure of its extension (st_attn_cuda) and leaves sta_fwd None.
        try:
            importlib.import_module("st_attn_cuda")
        except (ImportError, OSError) as err:
            _package_failures[name] = f"st_attn_cuda: {type(err).__name__}: {err}"
        else:
            _package_failures[name] = "st_attn_cuda imported but st_attn has no sta_fwd"
        return None
    return module


def require_kernels_package() -> Any:
    """The ``sgl_diffusion_kernels.block_sparse_attention`` module (kernel and reference), or a clear error."""
    if _bsa is None:
        raise ValueError(
            "the sparse attention backends need the sgl_diffusion_kernels package (its block-sparse attention "
            "and torch reference): install it with `pip install ./kernels`"
        )
    return _bsa


def implementation_for(
    backend: str, q: torch.Tensor, grid: tuple[int, int, int], text_tokens: int = 0
) -> Implementation:
    """The implementation ``backend`` (``sliding_tile_attn`` / ``video_sparse_attn``) uses for these inputs."""
    if q.device.type != "cuda":
        return "reference"
    # FastVideo's kernels take bf16 only, and head_dim 128 (st_attn) / 64 or 128 (vsa's H100 kernel); st_attn's
    # text handling needs its own padding scheme, so calls with text tokens take the Triton kernel.
    if backend == "sliding_tile_attn":
        if (
            not text_tokens
            and tuple(grid) in STA_PACKAGE_GRIDS
            and q.dtype == torch.bfloat16
            and q.shape[-1] == 128
            and _package("st_attn") is not None
        ):
            return "st_attn"
    elif q.dtype == torch.bfloat16 and q.shape[-1] in (64, 128) and _package("vsa") is not None:
        return "vsa"
    return "triton"


def _log_once(backend: str, implementation: str) -> None:
    if (backend, implementation) in _logged:
        return
    _logged.add((backend, implementation))
    package = "st_attn" if backend == "sliding_tile_attn" else "vsa"
    why = (
        f" ({package}: {_package_failures[package]})"
        if implementation == "triton" and package in _package_failures
        else ""
    )
    logger.info("attention backend '%s' runs %s%s", backend, implementation, why)


# --------------------------------------------------------------------------------------------------
# Sliding tile attention
# --------------------------------------------------------------------------------------------------


def _check_window(window: Window) -> Window:
    if len(window) != 3 or any(not isinstance(w, int) or w < 1 for w in window):
        raise ValueError(f"an STA window must be three positive ints (t, h, w) in tiles, got {window!r}")
    return window


def sliding_tile_tile_map(counts: tuple[int, int, int], windows: tuple[Window, ...]) -> torch.Tensor:
    """``(heads, num_tiles, num_tiles)`` bool: which key tiles each query tile reads, per head's window."""
    axes = []
    for axis, count in enumerate(counts):
        per_head = []
        for window in windows:
            half = _check_window(window)[axis] // 2
            query = torch.arange(count)
            centre = torch.minimum(torch.maximum(query, torch.tensor(half)), torch.tensor(count - 1 - half))
            per_head.append((centre[:, None] - torch.arange(count)[None, :]).abs() <= half)
        axes.append(torch.stack(per_head))  # (heads, count, count)
    t, h, w = axes
    heads = len(windows)
    full = t[:, :, None, None, :, None, None] & h[:, None, :, None, None, :, None] & w[:, None, None, :, None, None, :]
    n = math.prod(counts)
    return full.reshape(heads, n, n)


@functools.lru_cache(maxsize=256)
def _sta_blocks(
    grid: tuple[int, int, int], windows: tuple[Window, ...], device: torch.device, text_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """STA's tile map at the kernel's 64-token blocks: ``(block_map, block_sizes, index, count)`` on ``device``.

    A 6x8x8 tile is six blocks of 64 slots (its real tokens first); a block reads every non-empty block of
    the tiles its tile reads. ``text_tokens`` follow the tiles in blocks of 64 (the last one partial): every
    block reads them and they read every block. Query blocks with no real token read nothing (their rows are
    padding).
    """
    bsa = require_kernels_package()
    layout = tile_layout(grid, STA_TILE, device)
    per_tile = layout.volume // bsa.BLOCK
    tile_map = sliding_tile_tile_map(layout.counts, windows)
    video_map = tile_map.repeat_interleave(per_tile, 1).repeat_interleave(per_tile, 2)
    offsets = torch.arange(per_tile) * bsa.BLOCK
    video_sizes = (layout.sizes.cpu()[:, None] - offsets[None, :]).clamp(0, bsa.BLOCK).flatten()
    text_sizes = (text_tokens - torch.arange(-(-text_tokens // bsa.BLOCK)) * bsa.BLOCK).clamp(0, bsa.BLOCK)
    block_sizes = torch.cat((video_sizes, text_sizes))
    n_video = video_sizes.numel()
    block_map = torch.ones((len(windows), block_sizes.numel(), block_sizes.numel()), dtype=torch.bool)
    block_map[:, :n_video, :n_video] = video_map
    block_map = block_map & (block_sizes > 0)[None, :, None]
    block_map = block_map[None].to(device)
    block_sizes = block_sizes.to(device)
    index, count = bsa.block_map_to_index(block_map, block_sizes)
    return block_map, block_sizes, index, count


def sliding_tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    windows: tuple[Window, ...],
    *,
    text_tokens: int = 0,
    implementation: Implementation | None = None,
) -> torch.Tensor:
    """STA over ``(B, S, H, D)`` q/k/v in the grid's row-major token order -> ``(B, S, H, D)`` in that order.

    ``windows`` holds one ``(wt, wh, ww)`` per head. ``text_tokens``: tokens after the video's (see
    :class:`VideoAttention`). ``implementation`` None picks as :func:`implementation_for`.
    """
    heads = q.shape[2]
    if len(windows) != heads:
        raise ValueError(f"sliding tile attention needs one window per head: {heads} heads, {len(windows)} windows")
    windows = tuple(tuple(int(x) for x in _check_window(tuple(w))) for w in windows)  # type: ignore[misc]
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    chosen = implementation or implementation_for("sliding_tile_attn", q, grid, text_tokens)
    layout = tile_layout(grid, STA_TILE, q.device)
    if chosen == "st_attn":
        if text_tokens:
            raise ValueError("st_attn cannot run this call: it has text tokens")
        return _sta_package(q, k, v, layout, windows)
    if chosen not in ("reference", "triton"):
        raise ValueError(f"sliding tile attention has no implementation {chosen!r}")
    bsa = require_kernels_package()
    block_map, block_sizes, index, count = _sta_blocks(grid, windows, q.device, text_tokens)
    n_video = layout.num_tokens
    qt, kt, vt = (_tiles_and_text(t, layout, bsa.BLOCK) for t in (q, k, v))
    if chosen == "reference":
        out = bsa.block_sparse_attention_reference(qt, kt, vt, block_map, block_sizes)
    else:
        out = bsa.block_sparse_attention(qt, kt, vt, index, count, block_sizes)
    video = from_tiles(out[:, : layout.padded_len], layout)
    if q.shape[1] == n_video:
        return video
    return torch.cat((video, out[:, layout.padded_len : layout.padded_len + q.shape[1] - n_video]), dim=1)


def _tiles_and_text(x: torch.Tensor, layout: TileLayout, block: int) -> torch.Tensor:
    """``(B, S, ...)`` with the grid's tokens first: those in padded tile order, then the rest (text) zero-padded
    to whole ``block``s."""
    video = to_tiles(x[:, : layout.num_tokens], layout)
    text = x[:, layout.num_tokens :]
    if text.shape[1] == 0:
        return video
    padded = x.new_zeros((x.shape[0], -(-text.shape[1] // block) * block, *x.shape[2:]))
    padded[:, : text.shape[1]] = text
    return torch.cat((video, padded), dim=1)


def _sta_package(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout, windows: tuple[Window, ...]
) -> torch.Tensor:
    package = _package("st_attn")
    shape = STA_PACKAGE_GRIDS.get(layout.grid)
    if package is None or shape is None:
        why = (
            _package_failures.get("st_attn", "") if package is None else f"grid {layout.grid} is not one of its shapes"
        )
        raise ValueError(f"st_attn cannot run this call: {why}")
    # st_attn reads (B, H, S, D) in tile order (whole tiles: no padding) and one window per head.
    qt, kt, vt = (to_tiles(t, layout, pad=False).transpose(1, 2).contiguous() for t in (q, k, v))
    out = package.sliding_tile_attention(qt, kt, vt, [list(w) for w in windows], 0, False, shape)
    return from_tiles(out.transpose(1, 2), layout, padded=False)


# --------------------------------------------------------------------------------------------------
# Video sparse attention
# --------------------------------------------------------------------------------------------------


def vsa_topk(sparsity: float, num_tiles: int) -> int:
    """Key tiles each query tile keeps: ``ceil((1 - sparsity) * num_tiles)``, clamped to [1, num_tiles]."""
    return max(1, min(math.ceil((1 - sparsity) * num_tiles), num_tiles))


def _vsa_compressed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TileLayout, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarse branch on padded tiles ``(B, Sp, H, D)``: the compressed output per token ``(B, Sp, H, D)``
    and each query tile's selected key tiles ``(B, H, n, topk)``, with vsa's arithmetic (pooling in float32,
    the coarse attention in the inputs' dtype, top-k on its softmax)."""
    batch, _, heads, dim = q.shape
    n, volume = layout.num_tiles, layout.volume
    sizes = layout.sizes.view(1, 1, n, 1)

    def pool(x: torch.Tensor) -> torch.Tensor:
        # (B, Sp, H, D) -> (B, H, n, D): the sum over a tile's slots (padding is zero) / its real tokens
        tiles = x.transpose(1, 2).reshape(batch, heads, n, volume, dim)
        return (tiles.float().sum(dim=3) / sizes).to(x.dtype)

    qc, kc, vc = pool(q), pool(k), pool(v)
    scores = torch.matmul(qc, kc.transpose(-2, -1))
    scores /= dim**0.5
    probs = torch.softmax(scores, dim=-1)
    compressed = torch.matmul(probs, vc)  # (B, H, n, D)
    selected = torch.topk(probs, topk, dim=-1).indices
    compressed = compressed.repeat_interleave(volume, dim=2).transpose(1, 2)  # (B, Sp, H, D)
    return compressed, selected


def video_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    grid: tuple[int, int, int],
    sparsity: float,
    *,
    implementation: Implementation | None = None,
) -> torch.Tensor:
    """VSA over ``(B, S, H, D)`` q/k/v (and gate) in the grid's row-major order -> ``(B, S, H, D)`` in that order."""
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    chosen = implementation or implementation_for("video_sparse_attn", q, grid)
    layout = tile_layout(grid, VSA_TILE, q.device)
    topk = vsa_topk(sparsity, layout.num_tiles)
    if gate is not None and gate.shape != q.shape:
        raise ValueError(f"the VSA gate must have q's shape {tuple(q.shape)}, got {tuple(gate.shape)}")
    qt, kt, vt = (to_tiles(t, layout) for t in (q, k, v))
    gt = None if gate is None else to_tiles(gate, layout)
    if chosen == "vsa":
        package = _package("vsa")
        if package is None:
            raise ValueError(f"vsa cannot run this call: {_package_failures.get('vsa', '')}")
        out = package.video_sparse_attn(
            *(t.transpose(1, 2).contiguous() for t in (qt, kt, vt)),
            layout.sizes,
            topk,
            VSA_TILE,
            None if gt is None else gt.transpose(1, 2).contiguous(),
        ).transpose(1, 2)
        return from_tiles(out, layout)
    if chosen not in ("reference", "triton"):
        raise ValueError(f"video sparse attention has no implementation {chosen!r}")
    bsa = require_kernels_package()
    compressed, selected = _vsa_compressed(qt, kt, vt, layout, topk)
    if chosen == "reference":
        block_map = torch.zeros((*selected.shape[:3], layout.num_tiles), dtype=torch.bool, device=q.device).scatter_(
            -1, selected, True
        )
        fine = bsa.block_sparse_attention_reference(qt, kt, vt, block_map, layout.sizes)
    else:
        # Every tile has a real token, so each query tile reads exactly topk key tiles: no host sync needed.
        index = selected.to(torch.int32).contiguous()
        count = torch.full(selected.shape[:3], topk, dtype=torch.int32, device=q.device)
        fine = bsa.block_sparse_attention(qt, kt, vt, index, count, layout.sizes)
    out = compressed + fine if gt is None else compressed * gt + fine
    return from_tiles(out, layout)


def _implementation(backend: str, q: torch.Tensor, grid: tuple[int, int, int], text_tokens: int = 0) -> Implementation:
    """:func:`implementation_for`, with the kernels package required where it runs, logged once."""
    chosen = implementation_for(backend, q, grid, text_tokens)
    if chosen in ("reference", "triton"):
        require_kernels_package()
    _log_once(backend, chosen)
    return chosen


@torch.library.custom_op("sgl_diffusion::video_sparse_attention", mutates_args=())
def _video_sparse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, grid: list[int], sparsity: float
) -> torch.Tensor:
    """VSA as one opaque op, so that a block compiled with ``fullgraph=True`` calls it as an extern kernel:
    torch.compile cannot trace the package probes, the host-side tile bookkeeping and the kernels' launch. Its
    arguments are the same for every layer and step of a request (VSA reads neither), so compiled blocks do not
    recompile per layer. ``(B, S, H, D)`` in the grid's row-major order, contiguous."""
    cube = (grid[0], grid[1], grid[2])
    chosen = _implementation("video_sparse_attn", q, cube)
    return video_sparse_attention(q, k, v, gate, cube, sparsity, implementation=chosen).contiguous()


@torch.library.custom_op("sgl_diffusion::sliding_tile_attention", mutates_args=())
def _sliding_tile_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], windows: torch.Tensor, text_tokens: int
) -> torch.Tensor:
    """STA as one opaque op, as :func:`_video_sparse_op`; the per-(step, layer) windows come as a CPU tensor,
    whose values torch.compile does not guard on, so one compiled graph serves every layer and step.
    ``(B, S, H, D)`` in q's token order, contiguous."""
    cube = (grid[0], grid[1], grid[2])
    heads = tuple((int(t), int(h), int(w)) for t, h, w in windows.tolist())
    chosen = _implementation("sliding_tile_attn", q, cube, text_tokens)
    out = sliding_tile_attention(q, k, v, cube, heads, text_tokens=text_tokens, implementation=chosen)
    return out.contiguous()


@_sliding_tile_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], windows: torch.Tensor, text_tokens: int
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@_video_sparse_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor | None, grid: list[int], sparsity: float
) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def run_video_sparse(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, video: VideoAttention
) -> torch.Tensor:
    """The seam's entry: ``backend`` for one video self-attention call -> ``(B, S, H, D)`` in grid order."""
    grid = tuple(video.grid)
    tokens = math.prod(grid) + video.text_tokens if len(grid) == 3 else None
    if tokens is None or q.shape[1] != tokens or k.shape[1] != q.shape[1] or v.shape[1] != q.shape[1]:
        raise ValueError(
            f"attention backend '{backend}' is self-attention over the video grid {grid}"
            + (f" and {video.text_tokens} text tokens" if video.text_tokens else "")
            + f": q/k/v need {tokens or '?'} tokens, got q{tuple(q.shape)} k{tuple(k.shape)}"
        )
    if backend == "video_sparse_attn":
        if video.text_tokens:
            raise ValueError(VSA_VIDEO_ONLY)
        return _video_sparse_op(q, k, v, video.gate, [int(n) for n in grid], float(video.settings.vsa_sparsity))
    if backend == "sliding_tile_attn":
        windows = video.windows
        if windows is None:
            windows = video.settings.sta_windows(video.step, video.layer, q.shape[2])
        return _sliding_tile_op(q, k, v, [int(n) for n in grid], windows, video.text_tokens)
    raise ValueError(f"{backend!r} is not a video sparse attention backend")
