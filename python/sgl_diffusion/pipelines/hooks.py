"""Named points of the denoising loop where features attach, and the registry that holds them.

A feature that acts per denoising step (profiling today; step caching, parallelism, LoRA scale
schedules next) implements the `LoopHook` protocol (every point; a no-op where it does not act) and is
added to a pipeline's `hooks`, or to one batch's (the profiler: see `StagedPipeline.run`). The loop calls
every point on every registered hook, in the order they were added, and never asks which features are
on. A protocol rather than a base class, so a feature outside the pipelines package (the profiler in
`runtime/`) implements it without importing the pipelines.

Points, in the order one step meets them:

* `step_start(step)`: before the step's model inputs are built and its denoiser runs;
* `step_inputs(step, inputs, row_owner)`: the step's model inputs are built, its denoiser not yet run; a
  feature may add batch-first row inputs (`inputs.rows`), which then travel with their rows through
  guidance branches and row groups (per-request LoRA: which request each row of a forward belongs to).
  `row_owner` is the batch request index of each row;
* `step_end(step)`: after the sampler stepped and the step's time was recorded, before the step's
  progress is reported (and cancelled requests leave the batch).

Add a point only together with the feature that needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch

from .conditioning import ModelInputs


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Where the loop is: step `index` (0-based) of `total`, its timestep and the expert that runs it."""

    index: int
    total: int
    timestep: torch.Tensor
    expert: int


@runtime_checkable
class LoopHook(Protocol):
    """A feature attached to the denoising loop: one method per point."""

    def step_start(self, step: StepContext) -> None: ...

    def step_inputs(self, step: StepContext, inputs: ModelInputs, row_owner: torch.Tensor) -> None: ...

    def step_end(self, step: StepContext) -> None: ...


class LoopHooks:
    """The hooks attached to a loop, itself a hook that calls each of them in order."""

    def __init__(self, hooks: Iterable[LoopHook] = ()) -> None:
        self._hooks: list[LoopHook] = []
        for hook in hooks:
            self.add(hook)

    def add(self, hook: LoopHook) -> None:
        if not isinstance(hook, LoopHook):
            raise TypeError(
                f"{type(hook).__name__} is no loop hook: it needs the methods step_start, step_inputs and step_end"
            )
        self._hooks.append(hook)

    def extended(self, *hooks: LoopHook) -> LoopHooks:
        """A new registry: these hooks, then `hooks` (e.g. one batch's profiler); this one is unchanged."""
        return LoopHooks([*self._hooks, *hooks])

    def step_start(self, step: StepContext) -> None:
        for hook in self._hooks:
            hook.step_start(step)

    def step_inputs(self, step: StepContext, inputs: ModelInputs, row_owner: torch.Tensor) -> None:
        for hook in self._hooks:
            hook.step_inputs(step, inputs, row_owner)

    def step_end(self, step: StepContext) -> None:
        for hook in self._hooks:
            hook.step_end(step)


class StepIndex:
    """A hook that remembers the index of the step being run, for inputs that depend on it (sliding tile
    attention's per-step windows: the Wan adapter passes it to the denoiser as ``attention_step``)."""

    def __init__(self) -> None:
        self.index = 0

    def step_start(self, step: StepContext) -> None:
        self.index = step.index

    def step_inputs(self, step: StepContext, inputs: ModelInputs, row_owner: torch.Tensor) -> None:
        del step, inputs, row_owner

    def step_end(self, step: StepContext) -> None:
        del step
