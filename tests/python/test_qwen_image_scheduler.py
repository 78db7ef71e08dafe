"""Our FlowMatchEuler schedule for Qwen-Image equals the one QwenImagePipeline builds (bit for bit).

Qwen-Image's scheduler shifts dynamically with the *exponential* rule, ``mu`` on the line through
(256 tokens, 0.5) and (8192 tokens, 0.9), then stretches the schedule so its last sigma is 0.02.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as reference_shift
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

from sgl_diffusion.schedulers import FlowMatchEulerScheduler
from sgl_diffusion.testing.qwen_image import SCHEDULER_CONFIG

# (height, width) in pixels: the tiny fixture's, the model's default 1328², its other trained aspect
# ratios, and sizes past max_image_seq_len (mu extrapolates there, in the reference too).
SIZES = [(64, 64), (512, 512), (1024, 1024), (1328, 1328), (1664, 928), (928, 1664), (1472, 1140), (2048, 2048)]
REAL_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.34.0.dev0",
    **SCHEDULER_CONFIG,
}


def image_seq_len(height: int, width: int) -> int:
    """Packed latent tokens: 8x VAE, then 2x2 patches (what ``latents.shape[1]`` is in the pipeline)."""
    return (height // 16) * (width // 16)


def reference_plan(steps: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule as QwenImagePipeline.__call__ makes it."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(REAL_CONFIG)
    mu = reference_shift(
        seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return timesteps, sched.sigmas


@pytest.mark.parametrize("steps", [3, 28, 50])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_schedule_matches_the_pipeline(steps: int, height: int, width: int) -> None:
    seq_len = image_seq_len(height, width)
    ref_t, ref_s = reference_plan(steps, seq_len)
    t, s = FlowMatchEulerScheduler.from_config(REAL_CONFIG).plan(steps, seq_len)
    assert t.dtype == s.dtype == torch.float32
    assert torch.equal(t, ref_t.float()), (t - ref_t).abs().max()
    assert torch.equal(s, ref_s.float()), (s - ref_s).abs().max()
    assert s[-2].item() == pytest.approx(0.02, abs=1e-6)  # stretched to shift_terminal (float32), then 0


def test_mu_follows_qwen_images_line() -> None:
    scheduler = FlowMatchEulerScheduler.from_config(REAL_CONFIG)
    for height, width in SIZES:
        seq_len = image_seq_len(height, width)
        assert scheduler.mu_for(seq_len) == reference_shift(seq_len, 256, 8192, 0.5, 0.9)
    assert scheduler.mu_for(256) == pytest.approx(0.5) and scheduler.mu_for(8192) == pytest.approx(0.9)
