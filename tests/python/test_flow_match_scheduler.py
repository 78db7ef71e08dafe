"""Our stateless flow-match Euler scheduler vs diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.pipelines.flux.pipeline_flux import (
    calculate_shift as ref_calculate_shift,
)
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from sgl_diffusion.schedulers import (
    FlowMatchEulerScheduler,
    calculate_shift,
    euler_step,
)

# FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def reference_plan(cfg: dict, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What FluxPipeline.__call__ does to get its schedule."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = ref_calculate_shift(
        image_seq_len,
        sched.config.get("base_image_seq_len", 256),
        sched.config.get("max_image_seq_len", 4096),
        sched.config.get("base_shift", 0.5),
        sched.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, mu=mu)
    return timesteps, sched.sigmas


@pytest.mark.parametrize("steps", [1, 3, 28, 50])
@pytest.mark.parametrize("image_seq_len", [16, 256, 1024, 4096, 6000])
def test_flux_schedule_matches(steps: int, image_seq_len: int) -> None:
    ref_t, ref_s = reference_plan(FLUX_SCHEDULER_CONFIG, steps, image_seq_len)
    t, s = FlowMatchEulerScheduler.from_config(FLUX_SCHEDULER_CONFIG).plan(steps, image_seq_len)
    assert t.dtype == s.dtype == torch.float32
    assert t.shape == (steps,) and s.shape == (steps + 1,)
    assert torch.equal(t, ref_t.float()), (t - ref_t).abs().max()
    assert torch.equal(s, ref_s.float()), (s - ref_s).abs().max()


VARIANTS = [
    {"use_dynamic_shifting": False, "shift": 3.0},
    {"time_shift_type": "linear"},
    # Qwen-Image style: dynamic exponential shift with a terminal stretch.
    {"shift_terminal": 0.02, "max_image_seq_len": 8192, "max_shift": 0.9},
]


# A 1-step schedule cannot be stretched to a terminal value (it divides by 0, in diffusers too).
@pytest.mark.parametrize(
    ("extra", "steps"),
    [(extra, steps) for extra in VARIANTS for steps in (1, 7, 50) if not (steps == 1 and "shift_terminal" in extra)],
)
def test_other_config_variants_match(extra: dict, steps: int) -> None:
    cfg = dict(FLUX_SCHEDULER_CONFIG, **extra)
    ref_t, ref_s = reference_plan(cfg, steps, 1024)
    t, s = FlowMatchEulerScheduler.from_config(cfg).plan(steps, 1024)
    assert torch.equal(t, ref_t.float())
    assert torch.equal(s, ref_s.float())


def test_calculate_shift_matches() -> None:
    for n in (16, 256, 1000, 4096, 6000):
        assert calculate_shift(n, 256, 4096, 0.5, 1.15) == ref_calculate_shift(n, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_loop_matches_scheduler_step(dtype: torch.dtype) -> None:
    steps, seq = 6, 1024
    ref_sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG)
    retrieve_timesteps(
        ref_sched,
        steps,
        "cpu",
        sigmas=np.linspace(1.0, 1 / steps, steps),
        mu=calculate_shift(seq),
    )
    _, sigmas = FlowMatchEulerScheduler.from_config(FLUX_SCHEDULER_CONFIG).plan(steps, seq)

    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 16, 64, generator=gen).to(dtype)
    x_ours = x_ref.clone()
    for i, t in enumerate(ref_sched.timesteps):
        # A fake velocity that depends on the current sample, so errors would compound.
        v = (torch.randn(2, 16, 64, generator=gen) + 0.1 * x_ref.float()).to(dtype)
        x_ref = ref_sched.step(v, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, sigmas[i], sigmas[i + 1])
        assert x_ours.dtype == x_ref.dtype == dtype
        assert torch.equal(x_ours, x_ref), f"step {i}: max diff {(x_ours.float() - x_ref.float()).abs().max()}"


def test_euler_step_per_sample_sigmas() -> None:
    # Two requests at different points of their schedules in one batch: each row must equal its
    # own scalar-sigma step.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 64, generator=gen)
    v = torch.randn(2, 16, 64, generator=gen)
    sig = torch.tensor([0.9, 0.5])
    sig_next = torch.tensor([0.8, 0.25])
    batched = euler_step(x, v, sig, sig_next)
    for row in range(2):
        alone = euler_step(x[row : row + 1], v[row : row + 1], sig[row], sig_next[row])
        assert torch.equal(batched[row : row + 1], alone)
