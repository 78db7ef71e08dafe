"""Device and precision names as users write them (`--device`, `--dit-precision`)."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str | None) -> torch.device:
    """`cuda`, `cuda:N` or `cpu`; `None` picks CUDA when present."""
    name = name or default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {name!r}") from err
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda', 'cuda:N' or 'cpu', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu")
    return device


def parse_precision(field: str, name: str) -> torch.dtype:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"{field} must be one of {', '.join(PRECISIONS)}, got {name!r}") from None


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in PRECISIONS.items() if value == dtype)
