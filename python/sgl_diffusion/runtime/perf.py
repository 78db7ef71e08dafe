"""Per-stage and per-step timings and memory checkpoints of one batch (`--perf-dump-path`)."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

_MB = 1024 * 1024


def _synchronize(device: torch.device) -> None:
    # Without a sync, CUDA timings measure kernel launches, not the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_peak_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (_MB if sys.platform == "darwin" else 1024)


class PerfRecorder:
    """Collects the timings of one batch run; `as_dict()` is the perf-dump / metadata schema."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stages: list[dict[str, Any]] = []
        self.denoise_steps: list[dict[str, Any]] = []
        self.memory: list[dict[str, Any]] = []
        self._start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        _synchronize(self.device)
        start = time.perf_counter()
        yield
        _synchronize(self.device)
        self.stages.append({"name": name, "duration_ms": (time.perf_counter() - start) * 1000})
        self.checkpoint(name)

    def step_timer(self) -> StepTimer:
        return StepTimer(self)

    def checkpoint(self, name: str) -> None:
        if self.device.type == "cuda":
            allocated = torch.cuda.memory_allocated(self.device) / _MB
            peak = torch.cuda.max_memory_allocated(self.device) / _MB
        else:
            allocated = peak = _host_peak_mb()
        self.memory.append({"name": name, "allocated_mb": allocated, "peak_allocated_mb": peak})

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / _MB
        return _host_peak_mb()

    def as_dict(self) -> dict[str, Any]:
        _synchronize(self.device)
        return {
            "total_duration_ms": (time.perf_counter() - self._start) * 1000,
            "steps": list(self.stages),
            "denoise_steps_ms": list(self.denoise_steps),
            "memory_checkpoints": list(self.memory),
            "peak_memory_mb": self.peak_memory_mb(),
        }


class StepTimer:
    """Times consecutive denoising steps (synchronizing so each step's time is its own)."""

    def __init__(self, recorder: PerfRecorder) -> None:
        self._recorder = recorder
        _synchronize(recorder.device)
        self._last = time.perf_counter()

    def step_done(self, step: int) -> None:
        _synchronize(self._recorder.device)
        now = time.perf_counter()
        self._recorder.denoise_steps.append({"step": step, "duration_ms": (now - self._last) * 1000})
        self._last = now
