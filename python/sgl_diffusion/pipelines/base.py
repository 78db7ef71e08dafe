"""The pipeline framework: a pipeline is an ordered list of stages over one batch state.

Each stage declares the state entries it reads and writes; the runner checks both, so a stage that
forgets an output fails where the bug is, not three stages later. A pipeline describes itself to the
Rust core with a frozen `PipelineSpec` (`spec.py`); its stages are the engine's standard ones over a
family adapter (`family.py`, `stages.py`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from ..runtime.options import RuntimeOptions
from ..runtime.perf import PerfRecorder
from ..runtime.profiling import BatchProfiler
from ..runtime.request import Request
from .hooks import LoopHook, LoopHooks
from .spec import PipelineSpec, SamplingDefaults

#: Called after each denoising step with (step, total); returns indices (into the batch's request
#: list) of requests cancelled so far.
ProgressFn = Callable[[int, int], Sequence[int]]


class BatchFeature(LoopHook, contextlib.AbstractContextManager, Protocol):
    """A feature of one batch (`StagedPipeline.run(features=...)`): entered around the batch, and a loop hook
    during it."""


class RowAligned(Protocol):
    """A container of row tensors (one row per output) that `BatchState` can cut like a tensor."""

    @property
    def num_rows(self) -> int: ...

    def select_rows(self, keep: torch.Tensor) -> RowAligned:
        """A copy holding only the rows the boolean mask `keep` marks."""
        ...


def per_row(values: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repeats per-request rows (dim 0) once per output of each request."""
    counts = torch.tensor([r.num_outputs for r in requests], device=values.device)
    return values.repeat_interleave(counts, dim=0)


class BatchState:
    """Everything the stages of one batch share.

    Row-aligned tensors (one row per output image, grouped by request) and row containers
    (`RowAligned`, e.g. the conditioning) are registered with `set_rows`, so that dropping a cancelled
    request removes its rows from all of them at once.
    """

    def __init__(self, requests: Sequence[Request], device: torch.device, perf: PerfRecorder) -> None:
        self.requests: list[Request] = list(requests)
        self.device = device
        self.perf = perf
        self.values: dict[str, Any] = {}
        self._row_keys: set[str] = set()
        # request index (into the original batch) of each output row.
        owners = [index for index, request in enumerate(self.requests) for _ in range(request.num_outputs)]
        self.row_owner = torch.tensor(owners, dtype=torch.long)
        self.active = list(range(len(self.requests)))

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        self.values[key] = value

    def set_rows(self, key: str, value: torch.Tensor | RowAligned) -> None:
        """Stores a tensor whose first dimension is the current output rows, or a container of such."""
        rows = value.shape[0] if isinstance(value, torch.Tensor) else value.num_rows
        if rows != self.row_owner.shape[0]:
            raise ValueError(f"{key} has {rows} rows, the batch has {self.row_owner.shape[0]}")
        self.values[key] = value
        self._row_keys.add(key)

    def drop_requests(self, cancelled: Sequence[int]) -> torch.Tensor | None:
        """Removes the rows of cancelled requests (original batch indices) from every row tensor.
        Returns the boolean mask of rows kept (for per-row state held elsewhere, e.g. a sampler's
        history), or None when nothing was dropped."""
        gone = set(cancelled) & set(self.active)
        if not gone:
            return None
        keep = torch.tensor([int(owner) not in gone for owner in self.row_owner], dtype=torch.bool)
        for key in self._row_keys:
            value = self.values[key]
            if isinstance(value, torch.Tensor):
                self.values[key] = value[keep.to(value.device)]
            else:
                self.values[key] = value.select_rows(keep)
        self.row_owner = self.row_owner[keep]
        self.active = [index for index in self.active if index not in gone]
        return keep


class Stage(abc.ABC):
    """One step of a pipeline. `inputs` must exist before `run`; `outputs` must exist after."""

    name: ClassVar[str]
    # Class attributes a stage may also set per instance (a stage whose output entry depends on the pipeline).
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @abc.abstractmethod
    def run(self, state: BatchState) -> None: ...


class StagedPipeline(abc.ABC):
    """A loaded model: its stages, its spec (what the core needs to know about it) and the features
    attached to its denoising loop (`hooks`)."""

    def __init__(self, spec: PipelineSpec, options: RuntimeOptions) -> None:
        self.spec = spec
        self.options = options
        self.device = options.device
        self.hooks = LoopHooks()

    @classmethod
    @abc.abstractmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> StagedPipeline:
        """Loads the checkpoint folder; `defaults` None means the pipeline's diffusers defaults."""

    @abc.abstractmethod
    def denoisers(self) -> list[torch.nn.Module]:
        """The denoising transformers (what `--enable-torch-compile` compiles)."""

    @abc.abstractmethod
    def stages(self, progress: ProgressFn, hooks: LoopHooks) -> list[Stage]:
        """The stages for one batch, in order; `progress` is the batch's step callback and `hooks` the
        features attached to its denoising loop."""

    def run(
        self,
        requests: Sequence[Request],
        progress: ProgressFn,
        *,
        profile: bool = True,
        features: Sequence[BatchFeature] = (),
    ) -> BatchState:
        """Runs the stages over one batch. With `--profile` on, the batch is traced into a new folder
        of `--profile-dir` (see `runtime.profiling`) unless `profile` is False (e.g. a warm-up run).
        `features` act on this batch alone: each is entered around the batch and hooks its loop (per-request
        LoRA adapters)."""
        # `--profile` off: no profiler object and no extra hook, only a null context per stage.
        profiler = BatchProfiler(self.options, self.device) if profile and self.options.profile else None
        perf = PerfRecorder(self.device) if profiler is None else profiler.perf
        extra: list[LoopHook] = [*features, *([] if profiler is None else [profiler])]
        hooks = self.hooks.extended(*extra) if extra else self.hooks
        state = BatchState(requests, self.device, perf)
        try:
            stages = self.stages(progress, hooks)
            with torch.inference_mode(), contextlib.ExitStack() as entered:
                for feature in features:
                    entered.enter_context(feature)
                for stage in stages:
                    missing = [key for key in stage.inputs if key not in state]
                    if missing:
                        raise RuntimeError(f"stage {stage.name} is missing its inputs {missing}")
                    traced = contextlib.nullcontext() if profiler is None else profiler.stage(stage.name)
                    with perf.stage(stage.name), traced:
                        stage.run(state)
                    absent = [key for key in stage.outputs if key not in state]
                    if absent:
                        raise RuntimeError(f"stage {stage.name} did not produce {absent}")
                    if not state.active:
                        break
        finally:
            if profiler is not None:
                # Also on failure: a profiler left running would trace every later batch.
                profiler.close()
        if profiler is not None:
            profiler.export()  # names the trace folder in the batch's perf record
        return state
