"""sgl-diffusion: an inference engine for image and video diffusion models.

from sgl_diffusion import DiffGenerator
gen = DiffGenerator.from_pretrained("black-forest-labs/FLUX.1-dev", device="cuda")
res = gen.generate(prompt="a red fox in snow", seed=0)
res.images[0].save("fox.png")
"""

from __future__ import annotations

from ._native import __version__
from .api import DiffGenerator, GenerationResult
from .errors import (
    DeadlineExceededError,
    DeviceFailedError,
    DeviceOutOfMemoryError,
    EngineShutdownError,
    GenerationFailedError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    RequestCancelledError,
)

__all__ = [
    "DeadlineExceededError",
    "DeviceFailedError",
    "DeviceOutOfMemoryError",
    "DiffGenerator",
    "EngineShutdownError",
    "GenerationFailedError",
    "GenerationResult",
    "InvalidRequestError",
    "ModelLoadError",
    "QueueFullError",
    "RequestCancelledError",
    "__version__",
]
