"""Qwen-Image's 3-axis rotary position embedding (frame, row, column), centred on the image.

Every image token gets a position per axis; each axis rotates its own slice of a head's channels
(``axes_dims``, e.g. 16 / 56 / 56 of 128), channel pairs interleaved like FLUX's. What is particular:

* rows and columns are *centred*: a grid of height ``h`` uses rows ``-ceil(h/2) .. floor(h/2) - 1``
  (same for columns), so a position means the same offset from the centre at every resolution;
* an image made of several pieces (the edit layout: the image being generated, then each reference
  image) gives piece ``i`` frame position ``i``, so the pieces share rows/columns but not frames;
* text tokens come after the image on all three axes at once: text token ``j`` sits at position
  ``m + j`` on every axis, with ``m`` the largest ``max(h // 2, w // 2)`` over the pieces.

The reference precomputes per-axis tables for positions ``-4096 .. 4095`` on the CPU in float32 (angle =
float32 position times float32 inverse frequency, turned into a unit complex number by ``torch.polar``);
the tables here are computed the same way, so the cos/sin values are bit-identical to it. They are then
gathered on the model's device for each token layout (no host round trip per layout).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ImagePiece", "QwenImageRope", "rope_row_positions"]

#: (frames, rows, columns) of one piece of the image token sequence, in latent patches.
ImagePiece = tuple[int, int, int]

#: Positions the reference's tables cover on each side of 0 (it raises past them; so do we).
POSITION_LIMIT = 4096
_ROPE_THETA = 10000.0


def rope_row_positions(size: int) -> torch.Tensor:
    """Centred positions of ``size`` rows (or columns): ``-ceil(size/2) .. floor(size/2) - 1``."""
    return torch.arange(size) - (size - size // 2)


def _axis_angle_table(axis_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(2 * POSITION_LIMIT, axis_dim // 2)`` float32 for positions ``-POSITION_LIMIT ..
    POSITION_LIMIT - 1`` (row ``p + POSITION_LIMIT`` is position ``p``), one column per frequency."""
    if axis_dim % 2 != 0:
        raise ValueError(f"every RoPE axis needs an even number of channels, got {axis_dim}")
    positions = torch.arange(-POSITION_LIMIT, POSITION_LIMIT)
    # float32 throughout, like the reference's table: float64 angles would be more accurate but would
    # rotate long text sequences measurably differently from what the checkpoint was run with.
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2).to(torch.float32).div(axis_dim))
    angles = torch.outer(positions, inv_freq)
    unit = torch.polar(torch.ones_like(angles), angles)
    return unit.real.contiguous(), unit.imag.contiguous()


class QwenImageRope:
    """Builds the interleaved cos/sin tables ``(seq, head_dim)`` for the text and image tokens.

    Holds no parameters and no module buffers (the model must load from a checkpoint that has no RoPE
    tensors, and is built on the meta device): the per-axis tables are computed once per device and
    kept in a plain dict.
    """

    def __init__(self, axes_dims: Sequence[int], theta: float = _ROPE_THETA) -> None:
        self.axes_dims = tuple(int(d) for d in axes_dims)
        if len(self.axes_dims) != 3:
            raise ValueError(f"Qwen-Image RoPE has 3 axes (frame, row, column), got axes_dims={self.axes_dims}")
        self.theta = theta
        self._tables: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _axis_tables(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        tables = self._tables.get(device)
        if tables is None:
            tables = [
                tuple(t.to(device) for t in _axis_angle_table(dim, self.theta))  # type: ignore[misc]
                for dim in self.axes_dims
            ]
            self._tables[device] = tables
        return tables

    @staticmethod
    def _check_positions(positions: torch.Tensor, what: str) -> None:
        low, high = int(positions.min()), int(positions.max())
        if low < -POSITION_LIMIT or high >= POSITION_LIMIT:
            raise ValueError(
                f"{what} need RoPE positions {low}..{high}, beyond the model's table of "
                f"{-POSITION_LIMIT}..{POSITION_LIMIT - 1}"
            )

    def _gather(
        self, axis_positions: Sequence[torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for tokens whose per-axis positions are given (three ``(seq,)`` tensors), interleaved."""
        cos_parts, sin_parts = [], []
        for (cos, sin), positions in zip(self._axis_tables(device), axis_positions, strict=True):
            rows = positions.to(device) + POSITION_LIMIT
            cos_parts.append(cos[rows])
            sin_parts.append(sin[rows])
        # Each frequency serves a (real, imaginary) channel pair: repeat it for both channels.
        cos = torch.cat(cos_parts, dim=-1).repeat_interleave(2, dim=-1)
        sin = torch.cat(sin_parts, dim=-1).repeat_interleave(2, dim=-1)
        return cos, sin

    def image_tables(self, pieces: Sequence[ImagePiece], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for the image tokens of ``pieces`` in order, each piece row-major over (frame, row, column)."""
        frame_pos, row_pos, col_pos = [], [], []
        for index, (frames, height, width) in enumerate(pieces):
            grid = torch.meshgrid(
                torch.arange(index, index + frames),
                rope_row_positions(height),
                rope_row_positions(width),
                indexing="ij",
            )
            frame_pos.append(grid[0].reshape(-1))
            row_pos.append(grid[1].reshape(-1))
            col_pos.append(grid[2].reshape(-1))
        positions = [torch.cat(p) for p in (frame_pos, row_pos, col_pos)]
        for axis, p in zip(("frames", "rows", "columns"), positions, strict=True):
            self._check_positions(p, f"image {axis}")
        return self._gather(positions, device)

    def text_tables(
        self, pieces: Sequence[ImagePiece], text_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for ``text_len`` text tokens following an image made of ``pieces``."""
        start = max(max(height // 2, width // 2) for _, height, width in pieces)
        positions = torch.arange(start, start + text_len)
        self._check_positions(positions, "text tokens")
        return self._gather([positions] * 3, device)
