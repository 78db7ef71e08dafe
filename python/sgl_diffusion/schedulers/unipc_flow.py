"""UniPC multistep sampler in flow-matching mode (what every Wan checkpoint ships).

Wan's ``scheduler/scheduler_config.json`` is diffusers' ``UniPCMultistepScheduler`` with
``prediction_type="flow_prediction"``, ``use_flow_sigmas=True`` and a ``flow_shift`` (3.0 for 480p Wan2.1,
5.0 for 720p / Wan2.2 I2V / TI2V, 12.0 for Wan2.2 T2V A14B); everything else is the class default
(``solver_order=2``, ``solver_type="bh2"``, ``lower_order_final=True``, ``predict_x0=True``,
``disable_corrector=[]``, ``final_sigmas_type="zero"``).

Split in two, like :mod:`.flow_match_euler`:

* :class:`UniPCFlowScheduler` is stateless: :meth:`~UniPCFlowScheduler.plan` turns (steps, flow_shift)
  into a timestep/sigma schedule. One object serves every request.
* UniPC is a *multistep* method (it keeps the previous x0 predictions and the pre-correction sample), so
  stepping needs state: :meth:`~UniPCFlowScheduler.start` returns a :class:`UniPCFlowState` for one
  request or one batch of requests that share the schedule. Rows can be dropped with
  :meth:`UniPCFlowState.select` when the engine cancels requests.

Parity with diffusers (bit-exact in fp32 *and* in bf16 / mixed precision, on CPU and CUDA):

* The schedule is built in numpy float64 and only cast to float32 at the end; ``sigmas[0]`` (= 1 for every
  shift) is nudged down by 1e-6 so ``log(sigma)``-based lambdas stay finite. Timesteps are **int64**,
  ``sigma * 1000`` *truncated* (999, not 1000, at the first step): that integer is what diffusers feeds the
  Wan transformer and what the A14B expert switch compares.
* The step functions replay the reference's tensor ops one for one: which operands are 0-d tensors (they do
  not take part in dtype promotion, so ``sigma * bf16_output`` is a bf16 product), which 0-d sigmas live on
  the CPU (the x0 conversion) and which are moved to the sample's device first (the UniP/UniC updates; a CPU
  scalar and a 0-d CUDA tensor are not rounded the same way by CUDA kernels), the ``einsum`` for the
  history term, the 2x2 ``linalg.solve`` for the corrector weights, and the cast back to the sample dtype.
  Algebraically equal rewrites (precomputing coefficients as Python floats, fusing terms) drift by an ulp
  per step, which 50 steps turn into visible differences, so they are deliberately avoided.

Choosing the Wan2.2 A14B expert: diffusers compares the *integer* timestep of the step about to run with
``boundary_ratio * num_train_timesteps`` (875.0 for T2V, 900.0 for I2V): ``t >= boundary`` runs the
high-noise ``transformer`` (and ``guidance_scale``), otherwise the low-noise ``transformer_2`` (and
``guidance_scale_2``). With a state: ``state.timestep >= boundary_ratio * sched.config.num_train_timesteps``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config_dict import config_from_dict
from .stepping import ScheduleCursor

logger = logging.getLogger(__name__)

__all__ = [
    "UniPCFlowConfig",
    "UniPCFlowScheduler",
    "UniPCFlowState",
    "unipc_convert_model_output",
    "unipc_corrector_update",
    "unipc_predictor_update",
]

_PREDICTION_TYPES = ("flow_prediction", "epsilon", "v_prediction", "sample")
# diffusers silently maps these legacy DPM-Solver names onto bh2; accept them the same way.
_BH2_ALIASES = ("midpoint", "heun", "logrho")
# Keys a diffusers UniPC config carries that do not influence the flow-sigma schedule or the steps
# (they only build the VP beta schedule or the non-flow timestep spacings, which flow mode overwrites).
_INERT_KEYS = frozenset(
    {
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "dynamic_thresholding_ratio",
        "sample_max_value",
        "sigma_min",
        "sigma_max",
    }
)


@dataclass(frozen=True)
class UniPCFlowConfig:
    """The ``UniPCMultistepScheduler`` config fields that matter in flow mode.

    Defaults are diffusers' own class defaults, so a ``scheduler_config.json`` that omits a key behaves as it
    does there (notably ``prediction_type`` defaults to ``"epsilon"`` and ``use_flow_sigmas`` to ``False``,
    which we refuse: only flow sigmas are implemented).
    """

    num_train_timesteps: int = 1000
    solver_order: int = 2
    prediction_type: str = "epsilon"
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_flow_sigmas: bool = False
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
    shift_terminal: float | None = None
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    thresholding: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    solver_p: Any = None

    def __post_init__(self) -> None:
        # Refuse, loudly, every option whose behaviour we do not reproduce instead of sampling differently.
        if not self.use_flow_sigmas:
            raise ValueError(
                "UniPCFlowScheduler implements only flow sigmas (use_flow_sigmas=True, as Wan ships); the VP "
                "beta-schedule mode of UniPCMultistepScheduler is not supported"
            )
        unsupported = [
            name
            for name in (
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "thresholding",
                "use_dynamic_shifting",
            )
            if getattr(self, name)
        ]
        if self.solver_p is not None:
            unsupported.append("solver_p")
        if not self.predict_x0:
            unsupported.append("predict_x0=False")
        if unsupported:
            raise ValueError(f"UniPCFlowScheduler does not support {', '.join(unsupported)}")
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}")
        if self.solver_type in _BH2_ALIASES:
            object.__setattr__(self, "solver_type", "bh2")
        if self.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {self.solver_type!r}")
        if self.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigmas_type!r}")
        if self.solver_type == "bh1" and self.final_sigmas_type == "zero":
            # B(h) = h is -inf on the last step to sigma=0, and -inf * 0 makes every output NaN (in diffusers
            # too); refuse rather than return NaNs.
            raise ValueError("solver_type='bh1' needs final_sigmas_type='sigma_min' (with 'zero' it yields NaN)")
        if self.solver_order < 1:
            raise ValueError(f"solver_order must be >= 1, got {self.solver_order}")
        if self.flow_shift <= 0:
            raise ValueError(f"flow_shift must be > 0, got {self.flow_shift}")
        # JSON gives a list; a tuple keeps the frozen config hashable.
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> UniPCFlowConfig:
        return config_from_dict(cls, cfg, _INERT_KEYS)


class UniPCFlowScheduler:
    """Builds schedules and per-request stepping states; holds no per-request state itself."""

    def __init__(self, config: UniPCFlowConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | UniPCFlowConfig) -> UniPCFlowScheduler:
        return cls(cfg if isinstance(cfg, UniPCFlowConfig) else UniPCFlowConfig.from_dict(cfg))

    def plan(
        self,
        num_inference_steps: int,
        *,
        flow_shift: float | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Schedule for one request, equal to diffusers' after ``set_timesteps(num_inference_steps)``.

        Args:
            num_inference_steps: N (>= 1).
            flow_shift: per-request override of ``config.flow_shift``; equals a diffusers scheduler built
                with that ``flow_shift`` (as the Wan docs do with ``from_config(..., flow_shift=...)``).
            device: where to put the returned tensors (default CPU). Stepping reads sigmas on the CPU
                anyway, as the reference does.

        Returns:
            ``(timesteps, sigmas)``: int64 ``(N,)`` (what the transformer gets, and what the A14B expert
            switch compares) and float32 ``(N+1,)`` ending in 0 (``final_sigmas_type="zero"``).
        """
        c = self.config
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        shift = c.flow_shift if flow_shift is None else flow_shift
        if shift <= 0:
            raise ValueError(f"flow_shift must be > 0, got {shift}")

        # Everything in float64 until the final cast: the reference only rounds to float32 at the very end
        # (and truncates the float64 timesteps), so an early float32 cast would move timesteps by one.
        s = np.linspace(1, 1 / c.num_train_timesteps, num_inference_steps + 1)[:-1]
        s = shift * s / (1 + (shift - 1) * s)
        if c.shift_terminal:
            # Stretch so the last sigma lands on shift_terminal while sigma[0] stays at 1.
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - c.shift_terminal))
        if np.fabs(s[0] - 1) < 1e-6:
            # sigma=1 means alpha=0 and lambda=-inf in the first updates; the reference nudges it down.
            s[0] -= 1e-6
        timesteps = torch.from_numpy(s * c.num_train_timesteps).to(device=device, dtype=torch.int64)
        last = s[-1] if c.final_sigmas_type == "sigma_min" else 0
        sigmas = torch.from_numpy(np.concatenate([s, [last]]).astype(np.float32)).to(device)
        return timesteps, sigmas

    def start(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> UniPCFlowState:
        """A fresh stepping state for one request (or a batch sharing this schedule) from :meth:`plan`."""
        return UniPCFlowState(self.config, timesteps, sigmas)


# ---------------------------------------------------------------------------------------------------------------
# Pure step functions. ``sigmas`` is always the float32 CPU schedule; indices are step indices.
# ---------------------------------------------------------------------------------------------------------------


def unipc_convert_model_output(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str = "flow_prediction",
) -> torch.Tensor:
    """The model's output turned into an x0 (clean sample) prediction at noise level ``sigma``.

    ``sigma`` must be the 0-d CPU float32 schedule entry: as a 0-d tensor it does not promote, so with a
    bf16 ``model_output`` the product ``sigma * model_output`` is bf16 (then promoted again by an fp32
    ``sample``); the reference does exactly this.
    """
    # Flow sigmas: x_t = (1 - sigma) * x0 + sigma * noise, i.e. alpha_t = 1 - sigma, sigma_t = sigma.
    if prediction_type == "flow_prediction":
        return sample - sigma * model_output
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / (1 - sigma)
    if prediction_type == "v_prediction":
        return (1 - sigma) * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha) - log(sigma) for a flow sigma (two logs, not log of a ratio: same rounding)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _phi_terms(h: torch.Tensor, solver_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hh, h*phi_1(hh), B(h)) for the data-prediction (x0) form, where hh = -h."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    return hh, h_phi_1, b_h


def _order_conditions(
    rks: torch.Tensor, hh: torch.Tensor, h_phi_1: torch.Tensor, b_h: torch.Tensor, order: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vandermonde matrix R[i, k] = r_k**i and right-hand side b[i] = i! * h*phi_{i+1}(hh) / B(h).

    phi_{k+1} follows the recurrence phi_{k+1}(h) = (phi_k(h) - 1/k!) / h, starting from phi_1 = expm1(h)/h.
    """
    rows, rhs = [], []
    phi_k = h_phi_1 / hh - 1
    fact = 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(phi_k * fact / b_h)
        fact *= i + 1
        phi_k = phi_k / hh - 1 / fact
    return torch.stack(rows), torch.stack(rhs)


def _history_terms(
    x0_history: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    s0_index: int,
    order: int,
    lambda_s0: torch.Tensor,
    h: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Relative step ratios r_k and divided differences D_k = (m_k - m0) / r_k over older x0 predictions.

    ``x0_history[-1]`` is m0, predicted at ``sigmas[s0_index]``; ``x0_history[-(k+1)]`` was predicted at
    ``sigmas[s0_index - k]``. ``order - 1`` older predictions are used; r ends with a 1 for the new point.
    """
    m0 = x0_history[-1]
    rks: list[torch.Tensor] = []
    diffs: list[torch.Tensor] = []
    for k in range(1, order):
        lambda_k = _log_snr(sigmas[s0_index - k].to(device))
        rk = (lambda_k - lambda_s0) / h
        rks.append(rk)
        diffs.append((x0_history[-(k + 1)] - m0) / rk)
    rks.append(torch.ones((), device=device))
    return torch.stack(rks), diffs


def unipc_predictor_update(
    sample: torch.Tensor,
    x0_history: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    step_index: int,
    order: int,
    solver_type: str = "bh2",
) -> torch.Tensor:
    """UniP-``order``: move ``sample`` from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``.

    ``x0_history`` holds the x0 predictions, newest (the one at ``sigmas[step_index]``) last, at least
    ``order`` of them.
    """
    device = sample.device
    # Moved to the sample's device before any arithmetic, as the reference does (see module docstring).
    sigma_t = sigmas[step_index + 1].to(device)
    sigma_s0 = sigmas[step_index].to(device)
    alpha_t = 1 - sigma_t
    lambda_s0 = _log_snr(sigma_s0)
    h = _log_snr(sigma_t) - lambda_s0
    rks, diffs = _history_terms(x0_history, sigmas, step_index, order, lambda_s0, h, device)
    hh, h_phi_1, b_h = _phi_terms(h, solver_type)

    m0 = x0_history[-1]
    x_t_ = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
    if diffs:
        d1s = torch.stack(diffs, dim=1)
        if order == 2:
            # The 1x1 system has the closed-form solution 1/2 (the reference hard-codes it, in sample dtype).
            rhos_p = torch.ones(1, dtype=sample.dtype, device=device) * 0.5
        else:
            r, b = _order_conditions(rks, hh, h_phi_1, b_h, order)
            rhos_p = torch.linalg.solve(r[:-1, :-1], b[:-1]).to(device).to(sample.dtype)
        pred_res = torch.einsum("k,bkc...->bc...", rhos_p, d1s)
    else:
        pred_res = 0
    x_t = x_t_ - alpha_t * b_h * pred_res
    return x_t.to(sample.dtype)


def unipc_corrector_update(
    this_x0: torch.Tensor,
    last_sample: torch.Tensor,
    this_sample: torch.Tensor,
    x0_history: Sequence[torch.Tensor],
    sigmas: torch.Tensor,
    step_index: int,
    order: int,
    solver_type: str = "bh2",
) -> torch.Tensor:
    """UniC-``order``: redo the last step ``sigmas[step_index - 1] -> sigmas[step_index]`` from
    ``last_sample`` with the fresh x0 prediction ``this_x0`` (evaluated at the predictor's ``this_sample``).

    ``x0_history`` is the history *before* ``this_x0`` is appended; ``order`` is the previous step's
    predictor order.
    """
    device = this_sample.device
    sigma_t = sigmas[step_index].to(device)
    sigma_s0 = sigmas[step_index - 1].to(device)
    alpha_t = 1 - sigma_t
    lambda_s0 = _log_snr(sigma_s0)
    h = _log_snr(sigma_t) - lambda_s0
    rks, diffs = _history_terms(x0_history, sigmas, step_index - 1, order, lambda_s0, h, device)
    hh, h_phi_1, b_h = _phi_terms(h, solver_type)

    x = last_sample
    m0 = x0_history[-1]
    if order == 1:
        rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        r, b = _order_conditions(rks, hh, h_phi_1, b_h, order)
        rhos_c = torch.linalg.solve(r, b).to(device).to(x.dtype)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], torch.stack(diffs, dim=1)) if diffs else 0
    d1_t = this_x0 - m0
    x_t = x_t_ - alpha_t * b_h * (corr_res + rhos_c[-1] * d1_t)
    return x_t.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Per-request (per-batch) state.
# ---------------------------------------------------------------------------------------------------------------


class UniPCFlowState(ScheduleCursor):
    """Stepping state of one schedule, for a batch ``(B, C, ...)`` whose rows all follow that schedule.

    ``latents = state.step(model_output, latents)`` once per timestep, in order. The state keeps references
    to the tensors it is given (the reference does too): do not modify a passed ``sample`` in place.
    """

    def __init__(self, config: UniPCFlowConfig, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        # The reference keeps sigmas on the CPU and reads its conversion sigma from there (a CPU scalar):
        # keep it that way so CUDA rounding is the same too. One device-to-host copy per request.
        super().__init__(timesteps, sigmas.detach().to(device="cpu", dtype=torch.float32))
        self.config = config
        self._x0_history: list[torch.Tensor] = []
        self._last_sample: torch.Tensor | None = None
        self._lower_order_nums = 0
        self._this_order = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One UniPC step (corrector on ``sample``, then predictor); returns the sample for the next step."""
        c = self.config
        if sample.ndim < 2:
            raise ValueError(f"sample must be batched (B, C, ...), got shape {tuple(sample.shape)}")
        i = self._begin_step()

        x0 = unipc_convert_model_output(model_output, sample, self.sigmas[i], c.prediction_type)
        # The corrector refines the sample the previous predictor produced, now that the model has been
        # evaluated there; that evaluation is then reused by the predictor (UniPC's "free" correction).
        if i > 0 and (i - 1) not in c.disable_corrector and self._last_sample is not None:
            sample = unipc_corrector_update(
                x0, self._last_sample, sample, self._x0_history, self.sigmas, i, self._this_order, c.solver_type
            )
        self._x0_history = [*self._x0_history, x0][-c.solver_order :]

        # Warm up from order 1 (not enough history yet), and with lower_order_final drop the order again
        # near the end (the last step to sigma=0 is first order).
        order = min(c.solver_order, self.num_steps - i) if c.lower_order_final else c.solver_order
        order = min(order, self._lower_order_nums + 1)
        self._this_order = order
        self._last_sample = sample
        prev = unipc_predictor_update(sample, self._x0_history, self.sigmas, i, order, c.solver_type)
        self._lower_order_nums = min(self._lower_order_nums + 1, c.solver_order)
        self._end_step()
        return prev

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep only ``rows`` (indices, or a bool mask) of the batch, e.g. after requests were cancelled.

        The next :meth:`step` must then get model outputs and samples with just those rows, in that order.
        """
        tensors = [*self._x0_history, self._last_sample]
        ref = next((t for t in tensors if t is not None), None)
        if ref is None:
            return  # nothing stored yet: the schedule itself has no batch dimension
        idx = torch.as_tensor(rows, device=ref.device)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.long)
        self._x0_history = [t.index_select(0, idx) for t in self._x0_history]
        if self._last_sample is not None:
            self._last_sample = self._last_sample.index_select(0, idx)
