"""Our UniPC flow sampler vs diffusers' UniPCMultistepScheduler (the Wan scheduler), on CPU.

Everything is compared bit for bit (``torch.equal``), including the bf16 and the Wan-style mixed-precision
loops (fp32 latents, bf16 transformer output): the implementation replays the reference's tensor ops, so the
tolerance is 0. Latents are tiny (B x 4 x 2 x 3 x 3) to stay cheap on shared CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import UniPCMultistepScheduler

from sgl_diffusion.schedulers import UniPCFlowConfig, UniPCFlowScheduler, UniPCFlowState

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json (Wan2.2 adds use_dynamic_shifting=false and
# time_shift_type="exponential"; 14B/720p checkpoints differ only in flow_shift).
WAN21_SCHEDULER_CONFIG: dict = {
    "_class_name": "UniPCMultistepScheduler",
    "_diffusers_version": "0.33.0.dev0",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
}
WAN22_SCHEDULER_CONFIG: dict = {
    **WAN21_SCHEDULER_CONFIG,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

# What the fixtures build: class defaults plus the three flow keys.
FLOW_KEYS = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}

SHIFTS = (3.0, 5.0, 12.0)
STEPS = (1, 2, 3, 10, 50)
SHAPE = (4, 2, 3, 3)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

Model = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def reference(cfg: dict, steps: int, device: str = "cpu") -> UniPCMultistepScheduler:
    """A diffusers scheduler set up as WanPipeline.__call__ does (set_timesteps, then set_begin_index(0))."""
    sched = UniPCMultistepScheduler.from_config(cfg)
    sched.set_timesteps(steps, device=device)
    # Without this diffusers looks the first index up by timestep value and, when the int timesteps repeat,
    # starts at the second match; the Wan pipeline always pins it to 0.
    sched.set_begin_index(0)
    return sched


def fake_model(noise: torch.Tensor, out_dtype: torch.dtype) -> Model:
    """Deterministic stand-in for the DiT: depends on the sample, the timestep and a per-step random draw.

    ``noise`` is (steps, B, ...) so a row of the batch sees the same draws whichever batch it runs in.
    """

    def model(sample: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        return (0.3 * sample.float() - 0.1 * t / 1000 + noise[k]).to(out_dtype)

    return model


def draw(steps: int, batch: int, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *SHAPE, generator=g)
    noise = torch.randn(steps, batch, *SHAPE, generator=g)
    return latents.to(device), noise.to(device)


def run_reference(cfg: dict, steps: int, latents: torch.Tensor, model: Model) -> torch.Tensor:
    sched = reference(cfg, steps, str(latents.device))
    x = latents
    for k, t in enumerate(sched.timesteps):
        x = sched.step(model(x, t, k), t, x).prev_sample
    return x


def run_ours(
    cfg: dict,
    steps: int,
    latents: torch.Tensor,
    model: Model,
    *,
    flow_shift: float | None = None,
    on_step: Callable[[int, UniPCFlowState, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    sched = UniPCFlowScheduler.from_config(cfg)
    state = sched.start(*sched.plan(steps, flow_shift=flow_shift, device=latents.device))
    x = latents
    for k in range(steps):
        x = state.step(model(x, state.timestep, k), x)
        if on_step is not None:
            x = on_step(k, state, x)
    assert state.done
    return x


# --- schedule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_schedule_matches(shift: float, steps: int) -> None:
    ref = reference({**FLOW_KEYS, "flow_shift": shift}, steps)
    t, s = UniPCFlowScheduler.from_config({**FLOW_KEYS, "flow_shift": shift}).plan(steps)
    assert t.dtype == ref.timesteps.dtype == torch.int64 and s.dtype == ref.sigmas.dtype == torch.float32
    assert t.shape == (steps,) and s.shape == (steps + 1,)
    assert torch.equal(t, ref.timesteps), (t, ref.timesteps)
    assert torch.equal(s, ref.sigmas), (s - ref.sigmas).abs().max()
    # The per-request override equals a reference built with that shift (Wan2.1's config ships 3.0).
    t2, s2 = UniPCFlowScheduler.from_config(WAN21_SCHEDULER_CONFIG).plan(steps, flow_shift=shift)
    assert torch.equal(t2, t) and torch.equal(s2, s)


def test_schedule_first_timestep_is_truncated() -> None:
    # sigma[0] is nudged to 1 - 1e-6, so the first timestep is int(999.999) = 999, never 1000.
    t, s = UniPCFlowScheduler.from_config(WAN21_SCHEDULER_CONFIG).plan(50)
    assert int(t[0]) == 999 and float(s[-1]) == 0.0 and float(s[0]) < 1.0


def test_a14b_expert_choice_follows_timesteps() -> None:
    # WanPipeline: ``t >= boundary_ratio * num_train_timesteps`` picks the high-noise expert.
    sched = UniPCFlowScheduler.from_config({**WAN22_SCHEDULER_CONFIG, "flow_shift": 12.0})
    state = sched.start(*sched.plan(40))
    ref = reference({**WAN22_SCHEDULER_CONFIG, "flow_shift": 12.0}, 40)
    boundary = 0.875 * sched.config.num_train_timesteps
    ours = []
    for _ in range(40):
        ours.append(bool(state.timestep >= boundary))
        state.step(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE))
    assert ours == [bool(t >= boundary) for t in ref.timesteps]
    assert 0 < sum(ours) < 40  # both experts run


# --- denoising loops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("shift", SHIFTS)
def test_fp32_loop_bit_equal(shift: float, steps: int, device: str) -> None:
    cfg = {**FLOW_KEYS, "flow_shift": shift}
    latents, noise = draw(steps, 2, device=device)
    model = fake_model(noise, torch.float32)
    expected = run_reference(cfg, steps, latents, model)
    got = run_ours(cfg, steps, latents, model)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("steps", (3, 10, 50))
@pytest.mark.parametrize("shift", (3.0, 12.0))
@pytest.mark.parametrize(
    ("latent_dtype", "output_dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
    ids=["bf16", "wan-mixed"],
)
def test_low_precision_loop_bit_equal(
    latent_dtype: torch.dtype, output_dtype: torch.dtype, shift: float, steps: int, device: str
) -> None:
    # "wan-mixed" is what WanPipeline does: fp32 latents, bf16 transformer output. There the reference's
    # ``sigma * model_output`` is a bf16 product (0-d sigma does not promote); the tolerance is still 0.
    cfg = {**FLOW_KEYS, "flow_shift": shift}
    latents, noise = draw(steps, 2, seed=1, device=device)
    latents = latents.to(latent_dtype)
    model = fake_model(noise, output_dtype)
    expected = run_reference(cfg, steps, latents, model)
    got = run_ours(cfg, steps, latents, model)
    assert got.dtype == expected.dtype == latent_dtype
    assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("cfg", [WAN21_SCHEDULER_CONFIG, WAN22_SCHEDULER_CONFIG], ids=["wan2.1", "wan2.2"])
def test_real_wan_config(cfg: dict) -> None:
    t, s = UniPCFlowScheduler.from_config(cfg).plan(50)
    ref = reference(cfg, 50)
    assert torch.equal(t, ref.timesteps) and torch.equal(s, ref.sigmas)
    latents, noise = draw(50, 1, seed=2)
    model = fake_model(noise, torch.float32)
    assert torch.equal(run_ours(cfg, 50, latents, model), run_reference(cfg, 50, latents, model))
    # The real config is exactly "defaults + the three flow keys".
    assert UniPCFlowConfig.from_dict(cfg) == UniPCFlowConfig.from_dict({**FLOW_KEYS, "flow_shift": 3.0})


VARIANTS = [
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"solver_type": "midpoint"},  # a legacy name diffusers maps onto bh2
    {"disable_corrector": [0, 1, 4]},
    {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min"},
    {"prediction_type": "epsilon"},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample"},
    {"shift_terminal": 0.05},
]


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_config_variants_bit_equal(extra: dict) -> None:
    cfg = {**FLOW_KEYS, "flow_shift": 5.0, **extra}
    ref = reference(cfg, 8)
    t, s = UniPCFlowScheduler.from_config(cfg).plan(8)
    assert torch.equal(t, ref.timesteps) and torch.equal(s, ref.sigmas)
    latents, noise = draw(8, 2, seed=3)
    model = fake_model(noise, torch.float32)
    expected = run_reference(cfg, 8, latents, model)
    assert torch.equal(run_ours(cfg, 8, latents, model), expected)


# --- batching -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.bfloat16])
def test_batch_rows_equal_single_runs(output_dtype: torch.dtype) -> None:
    cfg = {**FLOW_KEYS, "flow_shift": 5.0}
    latents, noise = draw(10, 3, seed=4)
    batched = run_ours(cfg, 10, latents, fake_model(noise, output_dtype))
    for r in range(3):
        alone = run_ours(cfg, 10, latents[r : r + 1], fake_model(noise[:, r : r + 1], output_dtype))
        assert torch.equal(batched[r : r + 1], alone), r


@pytest.mark.parametrize(
    ("after_step", "rows"),
    [
        (0, [0, 2]),  # before any step: nothing stored yet
        (1, [1]),  # history holds one x0, the corrector has not run yet
        (2, torch.tensor([2, 0])),  # reordering is allowed
        (6, torch.tensor([True, False, True])),
        (9, [0, 1, 2]),  # before the final (first-order) step; keeping every row changes nothing
    ],
)
def test_select_continues_like_the_kept_rows_alone(after_step: int, rows: list[int] | torch.Tensor) -> None:
    steps = 10
    cfg = {**FLOW_KEYS, "flow_shift": 12.0}
    latents, noise = draw(steps, 3, seed=5)
    idx = torch.as_tensor(rows)
    idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx
    noise_view = {"noise": noise}

    def model(sample: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
        return fake_model(noise_view["noise"], torch.float32)(sample, t, k)

    def drop_rows(k: int, state: UniPCFlowState, x: torch.Tensor) -> torch.Tensor:
        if k == after_step - 1:
            state.select(rows)
            noise_view["noise"] = noise[:, idx]
            return x[idx]
        return x

    if after_step == 0:
        # select() on a fresh state, then run with the kept rows only.
        sched = UniPCFlowScheduler.from_config(cfg)
        state = sched.start(*sched.plan(steps))
        state.select(rows)
        x, noise_view["noise"] = latents[idx], noise[:, idx]
        for k in range(steps):
            x = state.step(model(x, state.timestep, k), x)
        got = x
    else:
        got = run_ours(cfg, steps, latents, model, on_step=drop_rows)
    alone = run_reference(cfg, steps, latents[idx], fake_model(noise[:, idx], torch.float32))
    assert torch.equal(got, alone)


# --- errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"use_flow_sigmas": False},
        {"use_karras_sigmas": True},
        {"use_exponential_sigmas": True},
        {"use_beta_sigmas": True},
        {"thresholding": True},
        {"use_dynamic_shifting": True},
        {"predict_x0": False},
        {"prediction_type": "x0"},
        {"solver_type": "bh3"},
        {"final_sigmas_type": "one"},
        {"solver_type": "bh1"},  # with final_sigmas_type "zero": NaN in the last step, in diffusers too
        {"solver_order": 0},
    ],
)
def test_unsupported_config_raises(bad: dict) -> None:
    with pytest.raises(ValueError):
        UniPCFlowScheduler.from_config({**WAN21_SCHEDULER_CONFIG, **bad})


def test_default_config_is_refused() -> None:
    # diffusers' defaults are the VP (beta schedule) mode with epsilon prediction: not what we implement.
    with pytest.raises(ValueError, match="flow sigmas"):
        UniPCFlowScheduler.from_config({})


def test_misuse_raises() -> None:
    sched = UniPCFlowScheduler.from_config(WAN21_SCHEDULER_CONFIG)
    with pytest.raises(ValueError):
        sched.plan(0)
    with pytest.raises(ValueError):
        sched.plan(3, flow_shift=0.0)
    t, s = sched.plan(2)
    with pytest.raises(ValueError):
        sched.start(t, s[:-1])
    state = sched.start(t, s)
    with pytest.raises(ValueError):
        state.step(torch.zeros(4), torch.zeros(4))  # unbatched
    x = torch.zeros(1, *SHAPE)
    state.step(x, x)
    state.step(x, x)
    with pytest.raises(IndexError):
        state.step(x, x)
