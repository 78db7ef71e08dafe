"""The schedule bookkeeping every stepping sampler shares: where in its timesteps a batch is."""

from __future__ import annotations

import torch


class ScheduleCursor:
    """Timesteps (N,) and sigmas (N+1, ending in the final noise level) of one schedule, and the index of
    the step about to run. Samplers subclass it and call :meth:`_begin_step` / :meth:`_end_step`."""

    def __init__(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        if timesteps.ndim != 1 or sigmas.ndim != 1 or sigmas.shape[0] != timesteps.shape[0] + 1:
            raise ValueError(
                f"need timesteps (N,) and sigmas (N+1,) from plan(); got {tuple(timesteps.shape)}, "
                f"{tuple(sigmas.shape)}"
            )
        self.timesteps = timesteps
        self.sigmas = sigmas
        self.num_steps = int(timesteps.shape[0])
        self.step_index = 0

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def timestep(self) -> torch.Tensor:
        """The 0-d timestep of the step about to run (feed it to the model; compare it for A14B)."""
        if self.done:
            raise IndexError("all steps have been taken")
        return self.timesteps[self.step_index]

    @property
    def sigma(self) -> float:
        """The noise level of the sample about to be denoised."""
        return float(self.sigmas[self.step_index])

    def _begin_step(self) -> int:
        """The index of the step to run now; raises once every step has been taken."""
        if self.done:
            raise IndexError(f"all {self.num_steps} steps have been taken")
        return self.step_index

    def _end_step(self) -> None:
        self.step_index += 1
