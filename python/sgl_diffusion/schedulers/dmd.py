"""DMD sampling (distribution-matching distillation students, e.g. FastWan), as a stepping state.

At each fixed timestep the model's flow prediction `v` gives the clean sample `x0 = x_t - sigma_t * v`;
unless it is the last step, `x0` is re-noised with *fresh* Gaussian noise to the next timestep,
`x_next = (1 - sigma_next) * x0 + sigma_next * noise`; the last `x0` is the result. The fresh noise comes
from each request's own CPU generator, continued from the one that drew its initial noise, so a
request's output does not depend on its batch. See `pipelines/fastwan.py` for the sigma table and where
this follows FastVideo's `DmdDenoisingStage`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .stepping import ScheduleCursor


def table_sigmas(timesteps: Sequence[int], shift: float, num_train_timesteps: int) -> list[float]:
    """Sigma of each DMD timestep: the entry of a shifted flow-match table whose timestep is nearest.

    The table is built as a flow-match Euler scheduler builds it at construction (float32, 1000 steps
    from 1.0 down to 0.001, then shifted), so each sigma is bit-identical to FastVideo's lookup.
    """
    grid = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    sigmas = torch.from_numpy(grid) / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    table = (sigmas * num_train_timesteps).double()
    return [float(sigmas[torch.argmin((table - t).abs())]) for t in timesteps]


class DmdState(ScheduleCursor):
    """Steps a batch `(B, C, ...)` along fixed DMD timesteps: `x = state.step(v, x)` per timestep.

    `generators[i]` is request i's generator (the one its initial noise came from) and `outputs[i]` its
    number of rows; rows are grouped by request in that order. Latents and the re-noising stay float32."""

    def __init__(
        self,
        timesteps: Sequence[int],
        sigmas: Sequence[float],
        generators: Sequence[torch.Generator],
        outputs: Sequence[int],
        device: torch.device,
    ) -> None:
        # Every DMD sigma is a float32 table entry, so the float32 schedule keeps the exact values.
        schedule = torch.tensor([*sigmas, 0.0], dtype=torch.float32)
        super().__init__(torch.tensor(timesteps, dtype=torch.int64), schedule)
        if len(generators) != len(outputs):
            raise ValueError(f"{len(generators)} generators for {len(outputs)} requests")
        self.requests: list[tuple[torch.Generator, int]] = list(zip(generators, outputs, strict=True))
        self.device = device

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Predicts x0 from the flow at this step's sigma; re-noises it to the next step's unless last."""
        i = self._begin_step()
        clean = sample - float(self.sigmas[i]) * model_output.float()
        if i + 1 < self.num_steps:
            sigma_next = float(self.sigmas[i + 1])
            clean = (1 - sigma_next) * clean + sigma_next * self.fresh_noise(sample.shape[1:])
        self._end_step()
        return clean

    def fresh_noise(self, shape: torch.Size) -> torch.Tensor:
        """One float32 sample of `shape` per row, each request's rows from its own generator."""
        noise = [
            torch.randn((outputs, *shape), generator=generator, dtype=torch.float32)
            for generator, outputs in self.requests
        ]
        return torch.cat(noise).to(self.device)

    def select(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keeps only the requests whose rows `rows` (indices, or a bool mask) keeps: a request leaves the
        batch whole, so its rows are kept or dropped together."""
        selected = torch.as_tensor(rows)
        if selected.dtype != torch.bool:
            total = sum(outputs for _, outputs in self.requests)
            selected = torch.zeros(total, dtype=torch.bool).index_fill_(0, selected.long().flatten(), True)
        keep = selected.tolist()
        kept, start = [], 0
        for generator, outputs in self.requests:
            if any(keep[start : start + outputs]):
                kept.append((generator, outputs))
            start += outputs
        self.requests = kept
