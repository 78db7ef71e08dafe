"""`--warmup`: one short generation at the model's default size before the first request.

With `--enable-torch-compile` the first forward of a shape compiles (tens of seconds for a large
DiT); doing it at load time keeps that out of the first user's latency. It also settles cuDNN's
algorithm choices and the CUDA caching allocator.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..pipelines.base import StagedPipeline
from .request import Request

logger = logging.getLogger(__name__)

#: Denoising steps of the warm-up run: enough to run every compiled graph (the step function is the
#: same each step; with two experts the boundary is crossed only by longer runs, see `warm_up`).
WARMUP_STEPS = 2


def warm_up(pipeline: StagedPipeline) -> float:
    """Runs one request at the pipeline's defaults; returns the seconds it took."""
    spec = pipeline.spec
    d = spec.defaults
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sgl-warmup-") as folder:
        image_path = None
        if spec.image_input == "required":
            # Image-to-video needs an input image; a flat grey frame of the output size does.
            image_path = str(Path(folder) / "warmup.png")
            Image.new("RGB", (d.width, d.height), (128, 128, 128)).save(image_path)
        request = Request(
            id=0,
            prompt="warm-up",
            negative_prompt=d.negative_prompt,
            width=d.width,
            height=d.height,
            num_frames=d.num_frames,
            num_inference_steps=WARMUP_STEPS,
            guidance_scale=d.guidance_scale,
            true_cfg_scale=d.true_cfg_scale,
            seed=0,
            max_sequence_length=d.max_sequence_length,
            num_outputs=1,
            flow_shift=d.flow_shift,
            guidance_scale_2=d.guidance_scale_2,
            fps=d.fps,
            image_path=image_path,
            cfg_enabled=spec.guidance_mode == "classifier_free" and d.guidance_scale > 1.0,
            output_format="npy",
            output_quality=None,
            notes=(),
        )
        # Kept out of `--profile` traces: they are for real requests.
        pipeline.run([request], lambda step, total: [], profile=False)
    seconds = time.perf_counter() - started
    logger.info("warm-up at %dx%d (%d frames) took %.1f s", d.width, d.height, d.num_frames, seconds)
    return seconds
