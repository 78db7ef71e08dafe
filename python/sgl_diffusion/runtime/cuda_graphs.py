"""`--cuda-graphs auto|on|off`: replay a denoiser's whole forward as one CUDA graph.

At small shapes a DiT forward is bound by the CPU launching its kernels (FLUX.1 launches a couple of
thousand per forward, even compiled), not by the GPU running them. A CUDA graph records the kernels of
one forward once and replays them with a single launch, so the GPU never waits for Python.

How it works. `enable_cuda_graphs` replaces the model's `forward` with a `CudaGraphRunner`; the
pipelines call the model exactly as before. Per *input signature* (the shape, dtype and strides of every
tensor argument plus the value of every other argument) the runner:

1. runs the eager (or compiled) forward a few times on a side stream, so lazy initialisation, cuDNN
   plans and torch.compile's compilation happen outside the capture;
2. captures one forward into a graph that reads static copies of the inputs;
3. on every later call, copies the arguments into those static inputs, replays the graph and returns a
   copy of its output (so two calls of one shape, e.g. the two CFG branches, never share an output).

Which shapes: `auto` captures when the batch has at most `AUTO_MAX_TOKENS` image/video tokens, where
graphs measured faster (benches/results/perf_h100.md); larger shapes are GPU-bound and run as before.
`on` captures every shape. Both stop capturing after `MAX_GRAPHS` signatures (each graph keeps its
static inputs; a model's graphs share one memory pool, which is safe because replays never overlap and
outputs are copied out at once). A shape whose capture fails falls back to the plain forward, with a
warning, and is not tried again.

What a graph assumes: the weights stay where they are (in-place updates are seen, replaced tensors are
not: call `CudaGraphRunner.reset()` after swapping weights) and the forward reads nothing from the host
(no `.item()`, no CPU tensors moved to the GPU) -- the models keep their RoPE tables on the device for
that reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

CUDA_GRAPH_CHOICES = ("auto", "on", "off")

#: `auto` captures batches with at most this many image/video tokens (all samples together). On an H100
#: (bf16, full-size FLUX.1-dev and Wan2.1-1.3B, benches/results/perf_{flux,wan}-graphs_h100.md) graphs
#: were faster at every shape up to 6 240 tokens, compiled by 1.9-60 % (Wan 1 560 tokens: 18.3 -> 12.0 ms;
#: FLUX 1024², 4 096 tokens: 154.5 -> 151.7 ms), and within +-1 % (noise) at 8 192 and 9 360 tokens,
#: where the GPU, not the launches, sets the pace and a graph only holds memory.
AUTO_MAX_TOKENS = 6400

#: Most input signatures one model keeps graphs for; later new shapes run without a graph.
MAX_GRAPHS = 32

#: Plain forwards run before capturing a signature (compilation, cuDNN/cuBLAS plans, allocator).
WARMUP_CALLS = 2


@dataclasses.dataclass
class _CapturedForward:
    graph: torch.cuda.CUDAGraph
    static_inputs: dict[str, torch.Tensor]
    output: torch.Tensor


@dataclasses.dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    plain_calls: int = 0
    failed_captures: int = 0


class CudaGraphRunner:
    """Stands in for a model's `forward` (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[..., torch.Tensor],
        capture_all: bool,
        tokens: Callable[[dict[str, Any]], int],
        max_tokens: int = AUTO_MAX_TOKENS,
        max_graphs: int = MAX_GRAPHS,
    ) -> None:
        self.model_name = type(model).__name__
        self.forward = forward
        self.signature = inspect.signature(forward)
        self.capture_all = capture_all
        self.tokens = tokens
        self.max_tokens = max_tokens
        self.max_graphs = max_graphs
        self.graphs: dict[Hashable, _CapturedForward] = {}
        self.uncapturable: set[Hashable] = set()
        self.stats = GraphStats()
        self._warned_full = False
        # While above zero every call runs plainly, neither captured nor replayed (`suspended`).
        self._suspended = 0
        # The memory pool of this model's graphs: made by the first capture, alive while its graphs are
        # (a pool handle outliving every graph that used it must not be captured into again).
        self._pool: tuple[int, int] | None = None

    def reset(self) -> None:
        """Drops every captured graph (after the model's weights were replaced)."""
        self.graphs.clear()
        self.uncapturable.clear()
        self._pool = None

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        inputs = dict(bound.arguments)
        key = self._signature_key(inputs)
        captured = None if key is None else self._graph_for(key, inputs)
        if captured is None:
            self.stats.plain_calls += 1
            return self.forward(**inputs)
        for name, static in captured.static_inputs.items():
            static.copy_(inputs[name])
        captured.graph.replay()
        self.stats.replays += 1
        return captured.output.clone()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Calls inside run plainly: for a batch whose forward differs from the captured one in ways the
        signature does not see (per-request LoRA hooks on its Linears)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def _signature_key(self, inputs: dict[str, Any]) -> Hashable | None:
        """What a graph is specialised on, or None when this call must run without one."""
        if torch.is_grad_enabled() or self._suspended:
            return None
        parts: list[Hashable] = []
        saw_tensor = False
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                if value.device.type != "cuda" or value.requires_grad:
                    return None
                parts.append((name, tuple(value.shape), tuple(value.stride()), value.dtype, value.device))
                saw_tensor = True
            elif value is None or isinstance(value, bool | int | float | str):
                parts.append((name, value))  # baked into the graph, so part of its identity
            else:
                return None
        if not saw_tensor:
            return None
        # Asked last: only once a CUDA tensor showed that CUDA works here. Nested capture: run plainly.
        return None if torch.cuda.is_current_stream_capturing() else tuple(parts)

    def _graph_for(self, key: Hashable, inputs: dict[str, Any]) -> _CapturedForward | None:
        captured = self.graphs.get(key)
        if captured is not None:
            return captured
        if key in self.uncapturable:
            return None
        if not self.capture_all and self.tokens(inputs) > self.max_tokens:
            return None
        if len(self.graphs) >= self.max_graphs:
            if not self._warned_full:
                logger.warning(
                    "CUDA graphs: %s has %d captured shapes; new shapes run without one",
                    self.model_name,
                    self.max_graphs,
                )
                self._warned_full = True
            return None
        try:
            captured = self._capture(inputs)
        except (RuntimeError, TypeError) as err:  # cannot be captured: run this shape without a graph
            logger.warning("CUDA graph capture of %s failed (%s); this shape runs without one", self.model_name, err)
            self.uncapturable.add(key)
            self.stats.failed_captures += 1
            return None
        self.graphs[key] = captured
        self.stats.captures += 1
        return captured

    def _capture(self, inputs: dict[str, Any]) -> _CapturedForward:
        # Static inputs come from the ordinary allocator (not the graph pool), so no replay of any
        # graph can overwrite them.
        static_inputs = {name: v.clone() for name, v in inputs.items() if isinstance(v, torch.Tensor)}
        arguments = {**inputs, **static_inputs}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.forward(**arguments)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.forward(**arguments)
        if self._pool is None:
            self._pool = graph.pool()
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"forward returned {type(output).__name__}, not a tensor")
        return _CapturedForward(graph, static_inputs, output)


def batch_tokens(model: nn.Module) -> Callable[[dict[str, Any]], int]:
    """Image/video tokens of a call's whole batch, from the model's own `tokens_per_sample`."""
    counter = getattr(model, "tokens_per_sample", None)
    if counter is None:
        raise TypeError(f"{type(model).__name__} does not say how many tokens a sample has (tokens_per_sample)")

    def count(inputs: dict[str, Any]) -> int:
        hidden = inputs["hidden_states"]
        return int(hidden.shape[0]) * int(counter(hidden))

    return count


def enable_cuda_graphs(model: nn.Module, mode: str, device: torch.device) -> CudaGraphRunner | None:
    """Installs a `CudaGraphRunner` as `model.forward` for `--cuda-graphs mode`; None when off."""
    if mode not in CUDA_GRAPH_CHOICES:
        raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_CHOICES)}, got {mode!r}")
    if mode == "off" or device.type != "cuda":
        return None
    runner = CudaGraphRunner(model, model.forward, capture_all=mode == "on", tokens=batch_tokens(model))
    model.forward = runner  # instance attribute: nn.Module.__call__ now reaches the runner
    return runner


def cuda_graph_runner(model: nn.Module) -> CudaGraphRunner | None:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, CudaGraphRunner) else None
