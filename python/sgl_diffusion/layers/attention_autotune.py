"""``auto`` attention: for each attention shape, the exact kernel that measured fastest there.

Which exact kernel wins depends on the card, the shape and the installed versions (cuDNN attention through
SDPA, FlashAttention-2/3, FlashAttention-4's JIT-compiled CuTe kernels): on an H100 cuDNN beat
FlashAttention-2 by 1.7x at FLUX's shapes, and nothing says FlashAttention-4 loses or wins at Wan's or at a
short cross-attention. So ``auto`` does not pick by name: the first call of a shape (device, dtype, batch,
query and key lengths, heads, head size) times every candidate on it, and the shape keeps the winner for the
life of the process. Every candidate is exact attention, so the choice changes speed, never the math beyond
rounding.

* Eager calls measure on the call's own inputs (no extra memory; attention has no side effects).
* Under ``torch.compile`` (static shapes, ``fullgraph=True``) the choice is made while dynamo traces the
  block: :func:`traced_choice` is a ``torch._dynamo.assume_constant_result`` function, so it runs then, on
  random inputs of the shape, and the graph keeps its answer as a constant.
* Nothing can be timed inside a CUDA-graph capture; a shape first seen there runs the fallback kernel, and is
  not remembered (the engine's warm-up call before each capture measures it first).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["AttentionShape", "Kernel", "MeasuredChoice", "Measurement"]

logger = logging.getLogger(__name__)

#: (q, k, v) in (batch, seq, heads, head_dim), unmasked -> any output (only its time matters here).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttentionShape:
    """What a kernel's speed depends on: the key of a measurement."""

    device: str
    dtype: torch.dtype
    batch: int
    q_len: int
    k_len: int
    heads: int
    head_dim: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> AttentionShape:
        batch, q_len, heads, head_dim = q.shape
        return cls(str(q.device), q.dtype, int(batch), int(q_len), int(k.shape[1]), int(heads), int(head_dim))

    def random_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs of this shape, for measuring where the real ones are not at hand (tracing)."""
        q = torch.randn(self.batch, self.q_len, self.heads, self.head_dim, device=self.device, dtype=self.dtype)
        k = torch.randn(self.batch, self.k_len, self.heads, self.head_dim, device=self.device, dtype=self.dtype)
        return q, k, torch.randn_like(k)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"batch {self.batch}, {self.q_len} x {self.k_len} tokens, {self.heads} heads of {self.head_dim}, "
            f"{dtype} on {self.device}"
        )


@dataclass(frozen=True)
class Measurement:
    """One shape's measurement: milliseconds per call of each candidate that ran, why the others did not."""

    shape: AttentionShape
    choice: str
    ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.ms.items())
        failed = "".join(f"; {name} failed: {why}" for name, why in self.failed.items())
        return f"{self.shape}: {times}{failed} -> {self.choice}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernel(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one call, after one untimed call (JIT compilation, autotuning, caches)."""
    kernel(q, k, v)
    _synchronize(q.device)
    times = []
    for _ in range(repeats):
        if q.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            kernel(q, k, v)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            kernel(q, k, v)
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def _capturing(device: str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


class MeasuredChoice:
    """The winners by shape. One per process (attention.py's); tests make their own."""

    def __init__(self, fallback: str, repeats: int = 5) -> None:
        self.fallback = fallback
        self.repeats = repeats
        self._by_shape: dict[AttentionShape, Measurement] = {}

    def known(self, shape: AttentionShape) -> str | None:
        """The winner at `shape` if it was measured."""
        measurement = self._by_shape.get(shape)
        return None if measurement is None else measurement.choice

    def choose(
        self,
        shape: AttentionShape,
        kernels: Mapping[str, Kernel],
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> str:
        """The fastest of `kernels` at `shape`, measured now (on `inputs`, or random ones) if not yet."""
        known = self._by_shape.get(shape)
        if known is not None:
            return known.choice
        if len(kernels) == 1:
            return next(iter(kernels))
        if _capturing(shape.device):
            logger.warning(
                "attention 'auto': %s was first seen inside a CUDA-graph capture, where nothing can be timed; "
                "it runs %s there",
                shape,
                self.fallback,
            )
            return self.fallback
        measurement = self._measure(shape, kernels, inputs or shape.random_inputs())
        self._by_shape[shape] = measurement
        logger.info("attention 'auto' measured %s", measurement.summary())
        return measurement.choice

    def _measure(
        self,
        shape: AttentionShape,
        kernels: Mapping[str, Kernel],
        inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> Measurement:
        ms: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name, kernel in kernels.items():
            try:
                ms[name] = time_kernel(kernel, *inputs, repeats=self.repeats)
            except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
                # A kernel that cannot take this shape (head size, length limits, a JIT failure) is no
                # candidate here; the others still are.
                failed[name] = f"{type(exc).__name__}: {exc}"
        if not ms:
            raise RuntimeError(f"attention 'auto': no kernel ran at {shape}: {failed}")
        return Measurement(shape, min(ms, key=ms.__getitem__), ms, failed)

    def measurements(self) -> list[Measurement]:
        """What was measured so far, in order (for logs and benchmarks)."""
        return list(self._by_shape.values())

    def forget(self) -> None:
        self._by_shape.clear()
