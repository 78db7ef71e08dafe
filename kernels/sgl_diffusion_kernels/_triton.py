"""The optional Triton import and the launch helpers every kernel module shares.

Triton is imported here, guarded, so that the kernel modules -- and with them the pure-torch
references -- import on machines without Triton. Kernels are decorated with :func:`jit`, which is
``triton.jit`` when Triton is present and a no-op otherwise (the undecorated function is then never
launched: :func:`check_launchable` refuses first).

Triton decides between compiling and interpreting (``TRITON_INTERPRET=1``, numpy on the CPU) when
``triton`` is first imported -- its own ``tl.sum`` & co. are decorated then -- so the variable must be
set before anything in the process imports triton (torch._dynamo does, e.g. through diffusers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: only the launchers need it, the references do not.
    triton = None
    tl = None

__all__ = [
    "MAX_BLOCK",
    "block_num_warps",
    "broadcast_strides",
    "check_block",
    "check_launchable",
    "jit",
    "next_power_of_2",
    "on_device",
    "tl",
    "triton",
    "triton_available",
]

FnT = TypeVar("FnT", bound=Callable[..., Any])

#: The largest row a kernel holds in one block (elements, power of two); DiT widths are 1536..5120.
MAX_BLOCK = 65536


def triton_available() -> bool:
    """True when ``triton`` imported (the kernels can launch on CUDA tensors, or interpreted)."""
    return triton is not None


def jit(fn: FnT) -> FnT:
    """``triton.jit`` when Triton is importable; the plain function otherwise."""
    return triton.jit(fn) if triton is not None else fn


def _interpreted(kernel: object) -> bool:
    # Under TRITON_INTERPRET=1 `triton.jit` returns an interpreter wrapper instead of a JITFunction.
    return triton is not None and not isinstance(kernel, triton.runtime.JITFunction)


def check_launchable(kernel: object, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error before Triton would fail cryptically (no Triton, CPU tensors, mixed devices)."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the `triton` package; use the *_reference functions without it")
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if not _interpreted(kernel) and any(t.device.type != "cuda" for t in present):
        raise ValueError(
            "compiled Triton kernels take CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            "triton is first imported (the interpreter), or use the *_reference function"
        )


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_block(block: int, what: str) -> None:
    if block > MAX_BLOCK:
        raise ValueError(f"{what} needs a block of {block} elements; the kernels hold at most {MAX_BLOCK} per row")


def block_num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~512 elements per warp, 1..8 warps."""
    return max(1, min(8, block // 512))


def broadcast_strides(t: torch.Tensor, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Element strides of ``t`` expanded to ``shape`` (0 on broadcast dims); no copy, any view.

    ``t`` must have as many dims as ``shape``, so that a ``(B, D)`` tensor is never silently read as
    ``(1, B, D)``.
    """
    if t.ndim != len(shape):
        raise ValueError(f"{name} must have {len(shape)} dims broadcastable to {tuple(shape)}, got {tuple(t.shape)}")
    try:
        return t.expand(shape).stride()
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {tuple(shape)}") from err
