"""`--warmup`: one short generation before the first request (see `sgl_bridge::warmup`, which builds the request).

The request is a real one, resolved by the Rust core at the model's defaults with few steps: whether it runs a
second guidance branch (CFG, FLUX's true CFG, Qwen-Image's true CFG on by default) is decided by the one rule every
request goes through, and an image-to-video model gets a grey input image of the default size.
"""

from __future__ import annotations

import logging
import time

from ..pipelines.base import StagedPipeline
from .request import Request

logger = logging.getLogger(__name__)


def warm_up(pipeline: StagedPipeline, request: Request) -> float:
    """Runs the warm-up request; returns the seconds it took."""
    started = time.perf_counter()
    # Kept out of `--profile` traces: they are for real requests.
    pipeline.run([request], lambda step, total: [], profile=False)
    seconds = time.perf_counter() - started
    logger.info(
        "warm-up at %dx%d (%d frames, %d steps%s) took %.1f s",
        request.width,
        request.height,
        request.num_frames,
        request.num_inference_steps,
        ", with CFG" if request.cfg_enabled else "",
        seconds,
    )
    return seconds
