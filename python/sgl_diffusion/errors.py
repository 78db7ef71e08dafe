"""Exceptions raised by sgl_diffusion.

They are defined once, in the Rust extension, so that the engine, the Python API and (later) the
HTTP server agree on them. ``InvalidRequestError`` is a ``ValueError`` whose ``field`` attribute names
the offending request field.
"""

from __future__ import annotations

from ._native import (
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
    "EngineShutdownError",
    "GenerationFailedError",
    "InvalidRequestError",
    "ModelLoadError",
    "QueueFullError",
    "RequestCancelledError",
    "invalid_request",
]


def invalid_request(field: str | None, message: str) -> InvalidRequestError:
    """Builds the error for a request field the pipeline cannot honour (raise it)."""
    err = InvalidRequestError(message)  # one argument: `str(err)` is the message
    err.field = field
    return err
