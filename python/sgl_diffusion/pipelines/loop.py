"""The engine's one denoising loop.

Every family runs its steps through `DenoisingLoop.run`: the loop walks the sampler's timesteps, picks
the expert for each (Wan2.2 A14B's high- and low-noise transformers), asks the family for the step's
model inputs, lets the guider produce the prediction, steps the sampler, times the step, reports
progress and drops the rows of requests cancelled meanwhile (from the batch state and the sampler's
history). Features attach at the named points of `hooks.py`; the loop has no branch per feature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from .base import BatchState, ProgressFn
from .guidance import Guider
from .hooks import LoopHooks, StepContext

if TYPE_CHECKING:
    from .family import FamilyAdapter


class Sampler(Protocol):
    """A batch's stepping state along one schedule (`schedulers/`: UniPC, flow-match Euler, DMD)."""

    @property
    def num_steps(self) -> int: ...

    @property
    def timestep(self) -> torch.Tensor:
        """The 0-d timestep of the step about to run."""
        ...

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Takes the step about to run; returns the next sample."""
        ...

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only the rows a boolean mask marks (the batch's other rows were cancelled)."""
        ...


class DenoisingLoop:
    """Runs a batch's denoising steps; `progress` is the batch's step callback (it returns the indices of
    requests cancelled so far), `hooks` the features attached to the loop."""

    def __init__(self, progress: ProgressFn, hooks: LoopHooks) -> None:
        self.progress = progress
        self.hooks = hooks

    def run(self, state: BatchState, adapter: FamilyAdapter, sampler: Sampler, guider: Guider) -> None:
        """Denoises `state["latents"]` in place (as a row tensor) with `state["conditioning"]`; returns early
        once every request of the batch was cancelled."""
        total = sampler.num_steps
        timer = state.perf.step_timer()
        for index in range(total):
            timestep = sampler.timestep
            expert = adapter.expert_for(timestep)
            step = StepContext(index=index, total=total, timestep=timestep, expert=expert)
            self.hooks.step_start(step)
            latents = state["latents"]
            inputs = adapter.model_inputs(state, latents, timestep)
            self.hooks.step_inputs(step, inputs, state.row_owner)
            prediction = guider.predict(adapter.denoiser(expert), inputs, state["conditioning"], expert)
            state.set_rows("latents", sampler.step(prediction, latents))
            timer.step_done(index)
            self.hooks.step_end(step)
            kept = state.drop_requests(self.progress(index + 1, total))
            if kept is not None:
                sampler.select(kept)
            if not state.active:
                return
