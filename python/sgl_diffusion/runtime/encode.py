"""Encodes finished outputs to bytes: the only form in which results leave Python."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# PIL's encoder names for our output formats.
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
DEFAULT_LOSSY_QUALITY = 95


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] H×W×3 → uint8, rounding as diffusers' `numpy_to_pil` does."""
    return (image * 255).round().astype(np.uint8)


def encode_image(image: np.ndarray, output_format: str, quality: int | None = None) -> bytes:
    """Encodes one float32 H×W×3 image in [0, 1]. `npy` keeps the exact floats."""
    buffer = io.BytesIO()
    if output_format == "npy":
        np.save(buffer, np.ascontiguousarray(image, dtype=np.float32), allow_pickle=False)
        return buffer.getvalue()
    pil_format = _PIL_FORMATS.get(output_format)
    if pil_format is None:
        raise ValueError(f"unknown output format {output_format!r}; expected png, jpeg, webp or npy")
    options = {} if output_format == "png" else {"quality": quality or DEFAULT_LOSSY_QUALITY}
    Image.fromarray(to_uint8(image)).save(buffer, format=pil_format, **options)
    return buffer.getvalue()


def decode_output(data: bytes, output_format: str) -> np.ndarray | Image.Image:
    """Inverse of `encode_image` for the Python API: a float array for `npy`, else a PIL image."""
    if output_format == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if output_format == "mp4":
        raise ValueError("decode MP4 outputs with runtime.video.decode_mp4")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
