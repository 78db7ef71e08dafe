"""Flow-matching Euler sampler (what FLUX.1, Z-Image, HunyuanVideo... use).

Stateless by design: :meth:`FlowMatchEulerScheduler.plan` turns (steps, image tokens) into a
timestep/sigma schedule, and :func:`euler_step` is a pure function of its arguments. A batch of
requests can therefore share one scheduler object while each carries its own schedule and step
index.

Parity notes (values must equal diffusers' ``FlowMatchEulerDiscreteScheduler`` bit for bit):

* the sigma schedule is shifted in **numpy float32** (the reference casts the sigmas to float32
  before shifting, and numpy keeps Python-float operands "weak", so every op rounds to float32);
* ``mu`` is computed in Python float64 with the same operation order as the reference;
* timesteps are ``sigmas * num_train_timesteps`` in float32, and the sigma list gets a trailing 0.

:meth:`FlowMatchEulerScheduler.plan_default` is the other schedule the reference builds: what
``set_timesteps(N)`` gives without custom sigmas (WanPipeline). Timesteps are spaced between the
shifted ends of the training schedule and then shifted once more, all in float64 (see there).
:class:`FlowMatchEulerState` steps a batch along one schedule, with the interface of the UniPC state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config_dict import config_from_dict
from .stepping import ScheduleCursor

logger = logging.getLogger(__name__)

__all__ = [
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "FlowMatchEulerState",
    "calculate_shift",
    "euler_step",
]


def calculate_shift(
    image_seq_len: int,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift ``mu``: a line through (base_len, base_shift) and (max_len, max_shift).

    Not clamped: sequences longer than ``max_image_seq_len`` extrapolate, as in the reference.
    """
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    intercept = base_shift - slope * base_image_seq_len
    return image_seq_len * slope + intercept


@dataclass(frozen=True)
class FlowMatchEulerConfig:
    """Fields of a ``scheduler/scheduler_config.json`` that this sampler understands."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")
        # Fail loudly on features whose schedules we do not reproduce rather than sample differently.
        unsupported = [
            name
            for name in (
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            )
            if getattr(self, name)
        ]
        if unsupported:
            raise ValueError(f"FlowMatchEulerScheduler does not support {', '.join(unsupported)} yet")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> FlowMatchEulerConfig:
        return config_from_dict(cls, cfg)


class FlowMatchEulerScheduler:
    """Builds sigma/timestep schedules; holds no per-request state."""

    def __init__(self, config: FlowMatchEulerConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | FlowMatchEulerConfig) -> FlowMatchEulerScheduler:
        return cls(cfg if isinstance(cfg, FlowMatchEulerConfig) else FlowMatchEulerConfig.from_dict(cfg))

    def mu_for(self, image_seq_len: int) -> float:
        """``mu`` for dynamic shifting from the config's (base/max len, base/max shift) line."""
        c = self.config
        base_shift = 0.5 if c.base_shift is None else c.base_shift
        max_shift = 1.15 if c.max_shift is None else c.max_shift
        return calculate_shift(
            image_seq_len,
            c.base_image_seq_len,
            c.max_image_seq_len,
            base_shift,
            max_shift,
        )

    def _time_shift(self, mu: float, sigmas: np.ndarray) -> np.ndarray:
        # Both shift families map sigma=1 to 1 and push mass towards high noise as mu grows.
        # ``** 1.0`` is kept (exponent "sigma"=1 in the reference formula) so float32 rounding matches.
        odds = (1 / sigmas - 1) ** 1.0
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + odds)
        return mu / (mu + odds)

    def plan(
        self,
        num_inference_steps: int,
        image_seq_len: int | None = None,
        *,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        shift: float | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule for one request, as FluxPipeline + ``set_timesteps`` produce it.

        Args:
            num_inference_steps: N.
            image_seq_len: packed image tokens (``(H/16) * (W/16)`` for FLUX.1); needed for ``mu``
                when ``use_dynamic_shifting`` and ``mu`` is not given.
            sigmas: custom unshifted sigmas (length N); default ``linspace(1, 1/N, N)`` as FluxPipeline.
            mu: explicit dynamic shift, overriding ``image_seq_len``.
            shift: static shift overriding ``config.shift`` (a request's ``flow_shift``): equals a reference
                scheduler built with ``shift=shift``.
            device: where to put the returned tensors (default CPU).

        Returns:
            ``(timesteps, sigmas)``: float32 tensors of length N and N+1 (trailing 0). Step ``i``
            feeds ``timesteps[i] / 1000`` to the FLUX transformer and moves from ``sigmas[i]`` to
            ``sigmas[i+1]``.
        """
        c = self.config
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if sigmas is None:
            base = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        else:
            if len(sigmas) != num_inference_steps:
                raise ValueError(f"got {len(sigmas)} sigmas for {num_inference_steps} steps")
            base = np.asarray(sigmas)
        s = base.astype(np.float32)

        if c.use_dynamic_shifting:
            if shift is not None:
                raise ValueError("a static shift does not apply to a schedule with use_dynamic_shifting (give mu)")
            if mu is None:
                if image_seq_len is None:
                    raise ValueError("use_dynamic_shifting needs image_seq_len (or an explicit mu)")
                mu = self.mu_for(image_seq_len)
            s = self._time_shift(mu, s)
        else:
            shift = c.shift if shift is None else shift
            if shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}")
            s = shift * s / (1 + (shift - 1) * s)

        if c.shift_terminal:
            # Stretch so the last sigma lands exactly on shift_terminal (keeps sigma[0]=1 fixed).
            one_minus = 1 - s
            scale = one_minus[-1] / (1 - c.shift_terminal)
            s = 1 - (one_minus / scale)

        sig = torch.from_numpy(np.ascontiguousarray(s)).to(dtype=torch.float32, device=device)
        timesteps = sig * c.num_train_timesteps
        sig = torch.cat([sig, torch.zeros(1, dtype=torch.float32, device=sig.device)])
        return timesteps, sig

    def training_sigma_range(self, shift: float | None = None) -> tuple[float, float]:
        """``(sigma_max, sigma_min)`` of the shifted training schedule, as the reference's ``__init__`` leaves them.

        The training sigmas are ``k / num_train_timesteps`` for ``k = T..1`` and are shifted in
        **float32** (a float32 tensor with a Python-float ``shift``); only the two ends matter.
        """
        c = self.config
        shift = c.shift if shift is None else shift
        ends = torch.tensor([c.num_train_timesteps, 1], dtype=torch.float32) / c.num_train_timesteps
        if not c.use_dynamic_shifting:
            ends = shift * ends / (1 + (shift - 1) * ends)
        return float(ends[0]), float(ends[1])

    def plan_default(
        self,
        num_inference_steps: int,
        *,
        shift: float | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule for one request, equal to the reference's ``set_timesteps(num_inference_steps)`` (no
        custom sigmas, no ``mu``): what WanPipeline builds.

        Args:
            num_inference_steps: N (>= 1).
            shift: per-request override of ``config.shift``; equals a reference scheduler built with
                ``shift=shift`` (both the training-schedule ends and the second shift use it).
            device: where to put the returned tensors (default CPU).

        Returns:
            ``(timesteps, sigmas)``: float32 ``(N,)`` (``sigmas * num_train_timesteps``, fed to the model
            and compared for the A14B expert switch) and float32 ``(N+1,)`` ending in 0.
        """
        c = self.config
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if c.use_dynamic_shifting:
            # The reference needs ``mu`` here, and pipelines that call set_timesteps(N) pass none.
            raise ValueError("plan_default needs a static shift (use_dynamic_shifting=False); use plan() with mu")
        shift = c.shift if shift is None else shift
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sigma_max, sigma_min = self.training_sigma_range(shift)
        # Timesteps evenly spaced between the (already shifted) ends, back to sigmas and shifted a second
        # time, all in float64 with Python-float operands; the only float32 rounding is the final cast.
        t = np.linspace(sigma_max * c.num_train_timesteps, sigma_min * c.num_train_timesteps, num_inference_steps)
        s = t / c.num_train_timesteps
        s = shift * s / (1 + (shift - 1) * s)
        if c.shift_terminal:
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        sig = torch.from_numpy(np.ascontiguousarray(s)).to(dtype=torch.float32, device=device)
        timesteps = sig * c.num_train_timesteps
        sig = torch.cat([sig, torch.zeros(1, dtype=torch.float32, device=sig.device)])
        return timesteps, sig

    def start(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> FlowMatchEulerState:
        """A stepping state for a batch following one schedule from :meth:`plan` or :meth:`plan_default`."""
        return FlowMatchEulerState(timesteps, sigmas)


class FlowMatchEulerState(ScheduleCursor):
    """Steps a batch ``(B, C, ...)`` whose rows all follow one schedule: ``x = state.step(v, x)`` per timestep.

    The same interface as the UniPC state, for pipelines that take either sampler. Euler keeps no history,
    so :meth:`select` only has to accept the call. Like the reference, the returned sample has the model
    output's dtype (float32 latents become bf16 after a step with a bf16 model).
    """

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        super().__init__(timesteps, sigmas.to(torch.float32))

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[i]`` to ``sigmas[i+1]``; returns the next sample."""
        i = self._begin_step()
        prev = euler_step(sample, model_output, self.sigmas[i], self.sigmas[i + 1])
        self._end_step()
        return prev

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only ``rows`` of the batch: nothing is stored per row, so there is nothing to cut."""
        del rows


def _as_sigma(value: torch.Tensor | float, ref: torch.Tensor) -> torch.Tensor:
    """float32 sigma on ``ref``'s device; ``(B,)`` tensors are shaped to broadcast over ``ref``."""
    t = (
        value.to(device=ref.device, dtype=torch.float32)
        if isinstance(value, torch.Tensor)
        else torch.tensor(value, dtype=torch.float32, device=ref.device)
    )
    if t.ndim == 1 and ref.ndim > 1:
        t = t.reshape(-1, *([1] * (ref.ndim - 1)))
    return t


def euler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
) -> torch.Tensor:
    """One Euler step of the flow ODE: ``x_next = x + (sigma_next - sigma) * v``.

    ``sigma``/``sigma_next`` are floats, 0-d tensors, or ``(B,)`` tensors (one per sample, so a
    batch may mix requests at different steps). Rounding follows the reference exactly:

    * ``dt`` is a float32 difference of float32 sigmas;
    * the reference multiplies that 0-d float32 ``dt`` with the model output, which type-promotes to
      the output's dtype: ``dt`` itself is first rounded to ``model_output.dtype`` (bf16 keeps only 8
      mantissa bits of it!), the product is formed in float32 and rounded to ``model_output.dtype``;
    * the sum is formed in float32 (the sample is upcast) and cast back to ``model_output.dtype``.

    Spelling each rounding out (rather than relying on 0-d promotion) keeps ``(B,)`` sigmas, which
    would otherwise promote to float32, bit-identical to the per-request scalar step.
    """
    s = _as_sigma(sigma, sample)
    s_next = _as_sigma(sigma_next, sample)
    out_dtype = model_output.dtype
    dt = (s_next - s).to(out_dtype).float()
    delta = (dt * model_output.float()).to(out_dtype)
    return (sample.float() + delta).to(out_dtype)
