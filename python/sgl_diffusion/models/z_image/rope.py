"""Z-Image's rotary position embedding: three axes (caption / frame index, row, column), a table per axis.

Every token has an integer position per axis. Caption tokens sit at ``(1 + i, 0, 0)``; the image's tokens at
``(caption_length + 1, row, column)``, where ``caption_length`` is the caption's length after its padding to
a multiple of 32; the image's own pad tokens at ``(0, 0, 0)``. So the caption shifts the image along the first
axis, and two prompts whose padded lengths differ rotate the image differently.

The tables are built as the reference builds them: angles in float64, rounded to float32, and only then
turned into cos/sin (``torch.polar`` in float32). Rounding the angle first differs from the FLUX tables of
:mod:`sgl_diffusion.layers.rotary` (cos/sin in float64), so Z-Image has its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["ZImageRope"]

RopeTables = tuple[torch.Tensor, torch.Tensor]


def _axis_table(dim: int, length: int, theta: float) -> torch.Tensor:
    """``(length, dim / 2)`` complex64 rotations of positions ``0 .. length - 1`` for one axis."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq).float()
    return torch.polar(torch.ones_like(angles), angles)


class ZImageRope:
    """Per-axis rotation tables (built once on the CPU, copied to each device on first use) and the cos/sin
    tables of a token layout, in the interleaved-pair form of :func:`sgl_diffusion.layers.fused.qk_norm_rope`.

    Building a layout's tables reads nothing from the host (slices and device-side repeats of the cached
    axis tables), so a forward that builds them can be captured in a CUDA graph.
    """

    def __init__(self, axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float) -> None:
        if len(axes_dims) != 3 or len(axes_lens) != 3:
            raise ValueError(f"Z-Image RoPE has 3 axes, got axes_dims={list(axes_dims)} axes_lens={list(axes_lens)}")
        if any(d % 2 for d in axes_dims):
            raise ValueError(f"every RoPE axis dim must be even, got {list(axes_dims)}")
        self.axes_dims = tuple(int(d) for d in axes_dims)
        self.axes_lens = tuple(int(n) for n in axes_lens)
        self.theta = float(theta)
        self._cpu: tuple[torch.Tensor, ...] | None = None
        self._by_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        tables = self._by_device.get(device)
        if tables is None:
            if self._cpu is None:
                self._cpu = tuple(
                    _axis_table(dim, length, self.theta)
                    for dim, length in zip(self.axes_dims, self.axes_lens, strict=True)
                )
            tables = tuple(t.to(device) for t in self._cpu)
            self._by_device[device] = tables
        return tables

    def check_layout(self, caption_length: int, rows: int, columns: int) -> None:
        """Refuses a layout whose positions fall outside the tables (the reference would fail indexing)."""
        frame_len, row_len, column_len = self.axes_lens
        if caption_length + 1 >= frame_len:
            raise ValueError(
                f"a caption of {caption_length} padded tokens needs RoPE positions up to {caption_length + 1}; "
                f"this checkpoint's axes_lens[0] is {frame_len}"
            )
        if rows > row_len or columns > column_len:
            raise ValueError(
                f"an image of {rows}x{columns} tokens exceeds this checkpoint's RoPE table "
                f"({row_len}x{column_len} tokens, axes_lens[1:])"
            )

    @staticmethod
    def _cos_sin(rotations: torch.Tensor) -> RopeTables:
        # One rotation per (real, imaginary) channel pair: each value twice, as the pairs interleave.
        def twice(values: torch.Tensor) -> torch.Tensor:
            return values.unsqueeze(-1).expand(*values.shape, 2).flatten(-2)

        return twice(rotations.real), twice(rotations.imag)

    def image_tables(
        self, caption_length: int, rows: int, columns: int, pad_tokens: int, device: torch.device
    ) -> RopeTables:
        """``(rows * columns + pad_tokens, head_dim)`` cos and sin of the image tokens (row-major), then of
        the image's pad tokens (position 0 on every axis)."""
        frame, row, column = self._tables(device)
        tokens = rows * columns
        parts = (
            frame[caption_length + 1].expand(tokens, -1),
            # Row-major: each row's rotation for every column, the column rotations for every row
            # (expand + reshape: no index tensor to build, nothing read from the host).
            row[:rows].unsqueeze(1).expand(-1, columns, -1).reshape(tokens, -1),
            column[:columns].unsqueeze(0).expand(rows, -1, -1).reshape(tokens, -1),
        )
        rotations = torch.cat(parts, dim=-1)
        if pad_tokens:
            origin = torch.cat((frame[0], row[0], column[0]))
            rotations = torch.cat((rotations, origin.expand(pad_tokens, -1)))
        return self._cos_sin(rotations)

    def caption_tables(self, caption_length: int, device: torch.device) -> RopeTables:
        """``(caption_length, head_dim)`` cos and sin of the (padded) caption: positions ``(1 + i, 0, 0)``,
        its pad tokens included."""
        frame, row, column = self._tables(device)
        parts = (
            frame[1 : caption_length + 1],
            row[0].expand(caption_length, -1),
            column[0].expand(caption_length, -1),
        )
        return self._cos_sin(torch.cat(parts, dim=-1))
