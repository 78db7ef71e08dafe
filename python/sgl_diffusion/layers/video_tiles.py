"""Tokens of a video grouped by tiles: the one place the ``(T, H, W) -> tile`` permutation lives.

A video DiT flattens its latent token grid ``(T, H, W)`` row-major (frame, then row, then column). Sparse
video attention (sliding tile attention, video sparse attention) works on *tiles*, boxes of
``tile = (tt, th, tw)`` neighbouring tokens, and its kernels want each tile's tokens next to each other:

* tiles in row-major order over the tile grid ``ceil(T/tt) x ceil(H/th) x ceil(W/tw)`` (tile-frame, then
  tile-row, then tile-column);
* inside a tile, its tokens in row-major ``(t, h, w)`` order.

Tiles at the far edges of a grid that is not a multiple of the tile are smaller ("partial"). The padded
layout gives every tile the same ``volume = tt * th * tw`` slots, its real tokens first and zeros after
them, so kernels can address tile ``i`` at ``[i * volume, (i + 1) * volume)`` and mask each tile's tail
by its size. This is exactly FastVideo's VSA layout (``get_tile_partition_indices`` /
``construct_variable_block_sizes`` / ``get_non_pad_index``), so the ``vsa`` package's kernels read ours.

Layouts are cached per ``(grid, tile, device)``: the index tensors live on the device and are made once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

__all__ = ["TileLayout", "from_tiles", "tile_layout", "to_tiles"]

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True, eq=False)
class TileLayout:
    """Where every token of a ``grid`` goes when grouped by ``tile`` (see the module docstring).

    Attributes:
        grid: the token grid ``(T, H, W)``.
        tile: the tile shape ``(tt, th, tw)``.
        counts: tiles per axis, ``ceil(grid / tile)``.
        sizes: ``(num_tiles,)`` int64, the real tokens of each tile (``volume`` except at the edges).
        coords: ``(num_tiles, 3)`` int64, each tile's ``(t, h, w)`` position in the tile grid.
        order: ``(S,)`` int64, the grid index of the token at each position of the (unpadded) tile order.
        inverse: ``(S,)`` int64, the tile-order position of each grid token (``order[inverse] == arange``).
        slots: ``(S,)`` int64, the padded slot of each token in tile order (``tile * volume + rank``).
        grid_slots: ``(S,)`` int64, the padded slot of each grid token (``slots[inverse]``).
    """

    grid: Grid
    tile: Grid
    counts: Grid
    sizes: torch.Tensor
    coords: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    slots: torch.Tensor
    grid_slots: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def volume(self) -> int:
        """Slots per tile in the padded layout."""
        return math.prod(self.tile)

    @property
    def padded_len(self) -> int:
        return self.num_tiles * self.volume

    @property
    def exact(self) -> bool:
        """True when the tiles cover the grid exactly (no partial tile, no padding)."""
        return all(g % t == 0 for g, t in zip(self.grid, self.tile, strict=True))


def _check_shape(name: str, value: tuple[int, ...]) -> Grid:
    if len(value) != 3 or any(not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {value!r}")
    return (value[0], value[1], value[2])


@functools.lru_cache(maxsize=64)
def _layout(grid: Grid, tile: Grid, device: torch.device) -> TileLayout:
    counts = tuple(math.ceil(g / t) for g, t in zip(grid, tile, strict=True))
    n_t, n_h, n_w = counts
    tt, th, tw = tile
    # Each token's tile (row-major over the tile grid) and its rank among its tile's tokens (row-major
    # inside the tile): a stable sort by tile id then keeps the row-major order inside each tile.
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    tile_id = ((t // tt) * n_h + (h // th)) * n_w + (w // tw)
    tile_id = tile_id.flatten()
    order = torch.sort(tile_id, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())

    def axis_sizes(length: int, size: int, count: int) -> torch.Tensor:
        sizes = torch.full((count,), size, dtype=torch.int64)
        sizes[-1] = length - (count - 1) * size
        return sizes

    sizes = (
        axis_sizes(grid[0], tt, n_t)[:, None, None]
        * axis_sizes(grid[1], th, n_h)[None, :, None]
        * axis_sizes(grid[2], tw, n_w)[None, None, :]
    ).flatten()
    starts = torch.cumsum(sizes, 0) - sizes
    sorted_tiles = tile_id[order]
    rank = torch.arange(order.numel()) - starts[sorted_tiles]
    slots = sorted_tiles * math.prod(tile) + rank
    coords = torch.stack(torch.meshgrid(*(torch.arange(c) for c in counts), indexing="ij"), dim=-1).reshape(-1, 3)
    return TileLayout(
        grid=grid,
        tile=tile,
        counts=(n_t, n_h, n_w),
        sizes=sizes.to(device),
        coords=coords.to(device),
        order=order.to(device),
        inverse=inverse.to(device),
        slots=slots.to(device),
        grid_slots=slots[inverse].to(device),
    )


def tile_layout(grid: tuple[int, ...], tile: tuple[int, ...], device: torch.device | str = "cpu") -> TileLayout:
    """The (cached) layout of ``grid``'s tokens grouped by ``tile`` on ``device``."""
    return _layout(_check_shape("grid", grid), _check_shape("tile", tile), torch.device(device))


def to_tiles(x: torch.Tensor, layout: TileLayout, *, pad: bool = True) -> torch.Tensor:
    """``(B, S, ...)`` tokens in grid order -> tile order along dim 1.

    ``pad=True``: ``(B, num_tiles * volume, ...)``, each tile at ``[i * volume, ...)`` with its real
    tokens first and zeros after them. ``pad=False``: ``(B, S, ...)``, the tokens permuted, no padding.
    """
    if x.shape[1] != layout.num_tokens:
        raise ValueError(f"{x.shape[1]} tokens do not fill the grid {layout.grid} ({layout.num_tokens} tokens)")
    if not pad:
        return x.index_select(1, layout.order)
    out = x.new_zeros((x.shape[0], layout.padded_len, *x.shape[2:]))
    out.index_copy_(1, layout.grid_slots, x)
    return out


def from_tiles(y: torch.Tensor, layout: TileLayout, *, padded: bool = True) -> torch.Tensor:
    """The inverse of :func:`to_tiles`: tile order (padded or not) back to ``(B, S, ...)`` in grid order."""
    expected = layout.padded_len if padded else layout.num_tokens
    if y.shape[1] != expected:
        raise ValueError(f"expected {expected} tokens in tile order for the grid {layout.grid}, got {y.shape[1]}")
    return y.index_select(1, layout.grid_slots if padded else layout.inverse)
