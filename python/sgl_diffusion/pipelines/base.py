"""The pipeline framework: a pipeline is an ordered list of stages over one batch state.

Each stage declares the state entries it reads and writes; the runner checks both, so a stage that
forgets an output fails where the bug is, not three stages later. Per-family pipelines only list
their stages and describe themselves (limits, defaults) to the Rust core.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..runtime.options import RuntimeOptions
from ..runtime.perf import PerfRecorder
from ..runtime.profiling import BatchProfiler
from ..runtime.request import Request


@dataclasses.dataclass(frozen=True)
class PipelineLimits:
    """Mirrors `sgl_core::PipelineLimits`: shapes this pipeline can run, read from the checkpoint where it
    says (RoPE table, tokenizer, scheduler), and how many pixels and frames one latent token covers (the unit
    of the request cost budget)."""

    size_multiple: int
    min_size: int
    max_side: int
    max_pixels: int
    max_frames: int
    frame_rule: str  # "single" | "four_k_plus_one"
    max_sequence_length: int
    max_steps: int
    token_size: int
    frames_per_latent: int = 1


def tokenizer_limit(tokenizer: Any, reference_limit: int) -> int:
    """The longest prompt a tokenizer's config allows, at most the reference pipeline's own bound. Tokenizers
    saved without `model_max_length` report a huge sentinel (transformers' VERY_LARGE_INTEGER)."""
    declared = getattr(tokenizer, "model_max_length", None)
    return min(reference_limit, int(declared)) if isinstance(declared, int) and declared > 0 else reference_limit


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    """Mirrors `sgl_core::SamplingDefaults`: the model's own sampling parameters."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    max_sequence_length: int
    num_frames: int = 1
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    flow_shift: float | None = None
    fps: int | None = None
    guidance_scale_2: float | None = None


#: Called after each denoising step with (step, total); returns indices (into the batch's request
#: list) of requests cancelled so far.
ProgressFn = Callable[[int, int], Sequence[int]]


class BatchState:
    """Everything the stages of one batch share.

    Row-aligned tensors (one row per output image, grouped by request) are registered with
    `set_rows`, so that dropping a cancelled request removes its rows from all of them at once.
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

    def set_rows(self, key: str, value: torch.Tensor) -> None:
        """Stores a tensor whose first dimension is the current output rows."""
        if value.shape[0] != self.row_owner.shape[0]:
            raise ValueError(f"{key} has {value.shape[0]} rows, the batch has {self.row_owner.shape[0]}")
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
            tensor = self.values[key]
            self.values[key] = tensor[keep.to(tensor.device)]
        self.row_owner = self.row_owner[keep]
        self.active = [index for index in self.active if index not in gone]
        return keep


class Stage(abc.ABC):
    """One step of a pipeline. `inputs` must exist before `run`; `outputs` must exist after."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def run(self, state: BatchState) -> None: ...


class StagedPipeline(abc.ABC):
    """A loaded model: its stages plus what the core needs to know about it."""

    pipeline_class: ClassVar[str]
    family: ClassVar[str]
    task: ClassVar[str]
    #: "embedded_with_true_cfg" or "classifier_free" (see `sgl_core::GuidanceMode`).
    guidance_mode: ClassVar[str]
    supports_flow_shift: ClassVar[bool] = False
    supports_guidance_scale_2: ClassVar[bool] = False
    #: "image" or "video" (see `sgl_core::OutputKind`); stages leave `images` (B×H×W×3) or
    #: `videos` (B×T×H×W×3) float32 arrays in [0, 1] in the state.
    output: ClassVar[str] = "image"
    #: "none", "optional" or "required" (see `sgl_core::ImageInput`).
    image_input: ClassVar[str] = "none"

    def __init__(self, options: RuntimeOptions, limits: PipelineLimits, defaults: SamplingDefaults) -> None:
        self.options = options
        self.device = options.device
        self.limits = limits
        self.defaults = defaults

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
    def stages(self, progress: ProgressFn) -> list[Stage]:
        """The stages for one batch, in order; `progress` is the batch's step callback."""

    def run(self, requests: Sequence[Request], progress: ProgressFn, *, profile: bool = True) -> BatchState:
        """Runs the stages over one batch. With `--profile` on, the batch is traced into a new folder
        of `--profile-dir` (see `runtime.profiling`) unless `profile` is False (e.g. a warm-up run)."""
        # `--profile` off: no profiler object and no wrapped callback, only a null context per stage.
        profiler = BatchProfiler(self.options, self.device) if profile and self.options.profile else None
        perf = PerfRecorder(self.device) if profiler is None else profiler.perf
        state = BatchState(requests, self.device, perf)
        try:
            stages = self.stages(progress if profiler is None else profiler.wrap_progress(progress))
            with torch.inference_mode():
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
