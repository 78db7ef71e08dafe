"""Input images as every image-conditioned family reads them (image-to-video, image editing).

Shared here so families never import each other for it: the decoding rules (what counts as a bad image and
what a client is told) are the engine's, not one family's.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import invalid_request

__all__ = ["load_image", "size_at_area"]


def load_image(path: str, mode: str = "RGB") -> Image.Image:
    """The input image in `mode` (RGB; RGBA for models whose VAE reads alpha). PIL reads the size from the header first: an image over its
    decompression-bomb bound (about 89 megapixels) is an invalid request, never decoded (a 17 KB PNG
    can declare 12 000 x 12 000 pixels, 1.9 GB once decoded). Messages reach HTTP clients, so they
    name the file, never the server's folder it is in."""
    name = Path(path).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise invalid_request("image", f"the input image has too many pixels to decode: {err}") from err
    except UnidentifiedImageError as err:
        raise invalid_request("image", f"the input image {name} is not an image that can be read") from err
    except OSError as err:
        # An OSError's text quotes the full path (`[Errno 2] No such file: '/srv/...'`); strerror does not.
        raise invalid_request("image", f"the input image {name} cannot be read: {err.strerror or err}") from err


def size_at_area(area: int, aspect: float, multiple: int = 32) -> tuple[int, int]:
    """(width, height) of about `area` pixels at `aspect` (width / height), each rounded to `multiple`: how
    diffusers' Qwen-Image-Edit pipelines size a reference image (their `calculate_dimensions`), Python's
    round-half-to-even included, so the same input gives the same size."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return round(width / multiple) * multiple, round(height / multiple) * multiple
