"""Wan folders that ship FlowMatchEulerDiscreteScheduler: schedule, step and whole pipeline against diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sgl_diffusion import DiffGenerator
from sgl_diffusion.schedulers.flow_match_euler import FlowMatchEulerScheduler
from sgl_diffusion.testing import build_fixture

SETTINGS: dict[str, object] = {
    "height": 32,
    "width": 32,
    "num_frames": 9,
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "negative_prompt": "blurry",
    "max_sequence_length": 16,
}
PROMPT = "a cat dancing in the rain"
#: Frames in [0, 1], fp32 CPU: our DiT and sampler are not op-for-op diffusers' order, and CFG runs as
#: one batch-2 forward, so the last bits differ (measured 7.5e-7); the bound sits just above that,
#: 500x under the fp32 parity contract (5e-3 on pixels).
PIXEL_ATOL = 1e-5


def use_euler(folder: Path, shift: float) -> None:
    """Swap the folder's scheduler for flow-match Euler with ``shift``."""
    (folder / "scheduler" / "scheduler_config.json").unlink()
    FlowMatchEulerDiscreteScheduler(shift=shift).save_config(folder / "scheduler")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index_path.write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def euler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = build_fixture("wan21_t2v", tmp_path_factory.mktemp("wan_euler") / "wan21_t2v")
    use_euler(folder, 7.0)
    return folder


def diffusers_frames(folder: Path, seed: int, shift: float | None = None) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    if shift is not None:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **SETTINGS)
    return np.asarray(out.frames)[0]


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0, 12.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_default_schedule_matches_set_timesteps(shift: float, steps: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    # From the config's shift, and as a per-request override of another config's shift.
    for sched, override in ((FlowMatchEulerScheduler.from_config(dict(ref.config)), None),
                            (FlowMatchEulerScheduler.from_config({"shift": 5.0}), shift)):  # fmt: skip
        timesteps, sigmas = sched.plan_default(steps, shift=override)
        assert timesteps.dtype == sigmas.dtype == torch.float32
        assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)


def test_shift_terminal_schedule_matches() -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=5.0, shift_terminal=0.1)
    ref.set_timesteps(8)
    timesteps, sigmas = FlowMatchEulerScheduler.from_config(dict(ref.config)).plan_default(8)
    assert torch.equal(timesteps, ref.timesteps) and torch.equal(sigmas, ref.sigmas)


def test_flux_plan_is_unchanged_by_default_path() -> None:
    # FLUX's custom-sigma path and the default path give different schedules for the same config.
    sched = FlowMatchEulerScheduler.from_config({"shift": 3.0})
    assert not torch.equal(sched.plan(4)[0], sched.plan_default(4)[0])


@pytest.mark.parametrize("sample_dtype", [torch.float32, torch.bfloat16])
def test_stepper_matches_scheduler_step_with_bf16_model(sample_dtype: torch.dtype) -> None:
    # WanPipeline's latents start float32 while a bf16 model answers; the reference returns bf16 samples.
    ref = FlowMatchEulerDiscreteScheduler(shift=7.0)
    ref.set_timesteps(5)
    ref.set_begin_index(0)
    ours = FlowMatchEulerScheduler.from_config(dict(ref.config))
    state = ours.start(*ours.plan_default(5))
    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 4, 3, 8, 8, generator=gen).to(sample_dtype)
    x_ours = x_ref.clone()
    for t in ref.timesteps:
        assert torch.equal(state.timestep, t)
        v = (torch.randn(x_ref.shape, generator=gen) + 0.1 * x_ref.float()).bfloat16()
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = state.step(v, x_ours)
        assert x_ours.dtype == x_ref.dtype == torch.bfloat16
        assert torch.equal(x_ours, x_ref)
    assert state.done


def test_unknown_scheduler_is_rejected(tmp_path: Path) -> None:
    from sgl_diffusion.pipelines.wan import build_scheduler

    with pytest.raises(ValueError, match="DDIMScheduler is not supported"):
        build_scheduler({"_class_name": "DDIMScheduler"}, tmp_path)


@pytest.mark.parametrize("flow_shift", [None, 3.0])
def test_pipeline_matches_diffusers(euler_dir: Path, flow_shift: float | None) -> None:
    gen = DiffGenerator.from_pretrained(euler_dir, device="cpu")
    try:
        ours = gen.generate(PROMPT, seed=5, output_type="np", flow_shift=flow_shift, **SETTINGS)
    finally:
        gen.shutdown()
    expected = diffusers_frames(euler_dir, 5, shift=flow_shift)
    assert ours.frames[0].shape == expected.shape == (9, 32, 32, 3)
    assert np.abs(ours.frames[0] - expected).max() <= PIXEL_ATOL
    if flow_shift is not None:
        # The override must act: the folder's own shift (7) gives another video (measured 0.046 apart,
        # thousands of times the bound above, so a dropped override could not pass as matching).
        assert np.abs(expected - diffusers_frames(euler_dir, 5)).max() > 1000 * PIXEL_ATOL
