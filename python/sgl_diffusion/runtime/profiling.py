"""`--profile`: torch profiler traces of a batch, one folder per batch.

By default only the first `num_profiled_timesteps` denoising steps are traced (the profiler starts with
the denoising stage and stops once that many steps have reported progress): steps repeat, so a few
of them show where the time goes without a trace of hundreds of megabytes. `--profile-all-stages`
traces the whole batch, each stage as a `record_function` range named after the stage. Denoising
steps are ranges named `denoise_step_<i>` in both modes: the profiler is attached to the batch's
denoising loop as a hook (`pipelines/hooks.py`), which opens a step's range when the step starts and
closes it when the step ends.

Each folder holds `trace.json.gz` (Chrome trace format: Perfetto or chrome://tracing open it) and
`key_averages.txt` (the ops that took the most time).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .options import RuntimeOptions
from .perf import PerfRecorder

if TYPE_CHECKING:
    from ..pipelines.hooks import StepContext

logger = logging.getLogger(__name__)

#: The stage that runs the denoising loop; every pipeline names it this way.
DENOISING_STAGE = "denoising"
TRACE_FILE = "trace.json.gz"
TABLE_FILE = "key_averages.txt"
#: The perf-dump / result-metadata key holding the batch's trace folder.
PERF_KEY = "profile_trace_dir"

# Process-wide, so that several engines in one process (or a server's batches) never share a folder.
_batch_numbers = itertools.count(1)


class ProfiledPerfRecorder(PerfRecorder):
    """A `PerfRecorder` whose record also names the batch's trace folder (`profile_trace_dir`)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.profile_trace_dir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        record = super().as_dict()
        if self.profile_trace_dir is not None:
            record[PERF_KEY] = str(self.profile_trace_dir)
        return record


def profiler_activities(device: torch.device) -> list[ProfilerActivity]:
    """CPU always; CUDA when the batch runs on CUDA and this torch build can trace it (asking for an
    activity that is not there makes the profiler warn)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda" and ProfilerActivity.CUDA in torch.profiler.supported_activities():
        activities.append(ProfilerActivity.CUDA)
    return activities


class BatchProfiler:
    """Profiles one batch run. Record the batch with `perf`, use `stage(name)` around each stage, attach it
    to the batch's denoising loop as a hook (`step_start` / `step_end`), call `close()` in a `finally` and
    `export()` after a successful run.

    Ranges are entered and exited by hand because a denoising step starts in one hook call and ends in
    the next; `close()` exits whatever is still open so that a failing stage leaves no profiler running.
    """

    def __init__(self, options: RuntimeOptions, device: torch.device) -> None:
        self.activities = profiler_activities(device)
        #: The batch's perf recorder: its record names the trace folder once `export()` wrote it.
        self.perf = ProfiledPerfRecorder(device)
        self.all_stages = options.profile_all_stages
        self.num_steps = options.num_profiled_timesteps
        self.profile_dir = options.profile_dir
        self.batch_number = next(_batch_numbers)
        self.started_at = time.localtime()
        self._profiler: profile | None = None
        self._running = False
        self._step_range: record_function | None = None
        self._steps_done = 0
        if self.all_stages:
            self._start()

    def _start(self) -> None:
        # One profiler per traced span, so accumulating events across cycles changes nothing; asking for
        # it keeps torch 2.11 from warning on every first start that events of earlier cycles are dropped.
        self._profiler = profile(activities=self.activities, record_shapes=True, acc_events=True)
        self._profiler.start()
        self._running = True

    def _stop(self) -> None:
        self._close_step()
        if self._running and self._profiler is not None:
            self._running = False
            self._profiler.stop()

    def _open_step(self, index: int) -> None:
        self._step_range = record_function(f"denoise_step_{index}")
        self._step_range.__enter__()

    def _close_step(self) -> None:
        if self._step_range is not None:
            step_range, self._step_range = self._step_range, None
            step_range.__exit__(None, None, None)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        denoising = name == DENOISING_STAGE
        if denoising and not self.all_stages and self._profiler is None:
            # Default mode traces the first denoising stage only, from its start.
            self._start()
        stage_range = record_function(name) if self.all_stages else None
        if stage_range is not None:
            stage_range.__enter__()
        try:
            yield
        finally:
            # A step that failed is still open here; it must close before the stage range that encloses it.
            self._close_step()
            if stage_range is not None:
                stage_range.__exit__(None, None, None)
            if denoising and not self.all_stages:
                self._stop()

    def step_start(self, step: StepContext) -> None:
        """Loop hook: the step's range opens (while tracing)."""
        if self._running:
            self._open_step(step.index)

    def step_inputs(self, step: StepContext, inputs: Any, row_owner: torch.Tensor) -> None:
        """Loop hook: nothing to add to the step's inputs."""
        del step, inputs, row_owner

    def step_end(self, step: StepContext) -> None:
        """Loop hook: the step's range closes; in the default mode tracing stops after the asked steps, before
        the engine's progress callback (cancellation, progress bars), which is no part of a step."""
        del step
        self._close_step()
        self._steps_done += 1
        if not self.all_stages and self._steps_done >= self.num_steps:
            self._stop()

    def close(self) -> None:
        """Stops tracing; safe to call more than once and after a failure."""
        self._stop()

    def folder(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", self.started_at)
        return self.profile_dir / f"{stamp}-batch{self.batch_number:04d}"

    def export(self) -> Path | None:
        """Writes the trace and the op table into a new folder; returns it (absolute), or None when
        nothing was traced or the files could not be written (logged: a trace is not worth failing
        the batch's outputs for)."""
        self.close()
        if self._profiler is None:  # a batch cancelled before denoising traces nothing by default
            logger.info("profiling: batch %d reached no denoising step, no trace written", self.batch_number)
            return None
        folder = self.folder().resolve()
        try:
            # Another process may have used the same name in the same second: add a suffix.
            for attempt in itertools.count(2):
                try:
                    folder.mkdir(parents=True)
                    break
                except FileExistsError:
                    folder = folder.with_name(f"{self.folder().name}-{attempt}")
            self._profiler.export_chrome_trace(str(folder / TRACE_FILE))
            cuda = ProfilerActivity.CUDA in self.activities
            sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=sort_by, row_limit=40)
            (folder / TABLE_FILE).write_text(table + "\n")
        except OSError as err:
            logger.warning("profiling: could not write the trace of batch %d to %s: %s", self.batch_number, folder, err)
            return None
        logger.info("profiling: wrote the trace of batch %d to %s", self.batch_number, folder)
        self.perf.profile_trace_dir = folder
        return folder
