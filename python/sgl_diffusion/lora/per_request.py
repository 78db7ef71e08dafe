"""Different LoRA adapters per request, in one batch: the unmerged low-rank path.

A request's `lora` (`[{"nickname", "strength"}]`, adapters registered with set_lora) applies to that request's rows
alone, on top of what is merged: for one batch, `RequestLoras` stacks the batch's adapters on every Linear they
touch (`layers/row_lora.py`, the seam every model's Linears run through) and tells each forward which request each of
its rows belongs to. It is a batch feature (`StagedPipeline.run(features=...)`):

* entered around the batch: the terms are installed; the denoisers' CUDA graphs are suspended and torch.compile's
  graphs bypassed (`force_eager`) for the batch, since a captured or compiled forward would not see the terms;
* a loop hook: at `step_inputs` it adds the rows' request indices as a batch-first input (`LORA_ROWS`), which
  travels with its rows through CFG branches stacked into one forward and through groups of rows run apart
  (`text_lengths.ByTextLength`); a forward pre-hook on each denoiser takes it out before the model sees its inputs.

Requests without `lora` in such a batch get exact zeros added (their scale rows are zero). Requests of a batch with
no `lora` at all never meet this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import torch
from torch import nn

from ..layers.row_lora import RowLoras, RowStack
from ..runtime.cuda_graphs import cuda_graph_runner
from .adapter import LoraAdapter

__all__ = ["LORA_ROWS", "RequestLoras"]

#: The batch-first input naming each row's request (popped before the model's forward).
LORA_ROWS = "lora_rows"


def _stacks(
    model: nn.Module, per_request: Sequence[Sequence[tuple[LoraAdapter, float]]], device: torch.device
) -> dict[nn.Module, RowStack]:
    """Every touched Linear of `model`: the batch's adapters stacked, and each request's scales on them."""
    names = dict.fromkeys(name for adapters in per_request for adapter, _ in adapters for name in adapter.modules)
    stacks: dict[nn.Module, RowStack] = {}
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        # The distinct adapters that touch this Linear, each with its rank columns and its position among them.
        owners: dict[int, tuple[LoraAdapter, int, int]] = {}
        downs, ups = [], []
        column = 0
        for adapters in per_request:
            for adapter, _ in adapters:
                lora = adapter.modules.get(name)
                if lora is None or id(adapter) in owners:
                    continue
                owners[id(adapter)] = (adapter, column, len(owners))
                downs.append(lora.down.to(device, torch.float32))
                ups.append(lora.up.to(device, torch.float32))
                column += lora.rank
        scales = torch.zeros(len(per_request), column, dtype=torch.float32)
        has_bias = any(adapter.modules[name].up_bias is not None for adapter, _, _ in owners.values())
        bias = torch.zeros(len(per_request), weight.shape[0], device=device) if has_bias else None
        spans = [(start, start + adapter.modules[name].rank) for adapter, start, _ in owners.values()]
        uses = [[False] * len(spans) for _ in per_request]
        for request, adapters in enumerate(per_request):
            for adapter, strength in adapters:
                lora = adapter.modules.get(name)
                if lora is None:
                    continue
                _, start, position = owners[id(adapter)]
                scale = lora.scale(strength)
                scales[request, start : start + lora.rank] = scale
                uses[request][position] |= scale != 0
                if bias is not None and lora.up_bias is not None:
                    bias[request] += lora.up_bias.to(device, torch.float32) * scale
        dtype = weight.dtype
        stacks[module] = RowStack(
            down=torch.cat(downs).to(dtype),
            up=torch.cat(ups, dim=1).to(dtype),
            scales=scales.to(device, dtype),
            bias=None if bias is None else bias.to(dtype),
            spans=tuple(spans),
            uses=tuple(tuple(row) for row in uses),
        )
    return stacks


class RequestLoras:
    """One batch's per-request adapters on `denoisers`; `per_request[i]` are request `i`'s (adapter, strength)."""

    def __init__(
        self,
        denoisers: Sequence[nn.Module],
        per_request: Sequence[Sequence[tuple[LoraAdapter, float]]],
        device: torch.device,
    ) -> None:
        self.denoisers = list(denoisers)
        stacks: dict[nn.Module, RowStack] = {}
        for model in self.denoisers:
            stacks.update(_stacks(model, per_request, device))
        self.terms = RowLoras(stacks)
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> Self:
        stack = self._exit.__enter__()
        stack.enter_context(self.terms.installed())
        stack.enter_context(torch.compiler.set_stance("force_eager"))
        for model in self.denoisers:
            runner = cuda_graph_runner(model)
            if runner is not None:
                stack.enter_context(runner.suspended())
            handle = model.register_forward_pre_hook(self._take_rows, with_kwargs=True)
            stack.callback(handle.remove)
            # Rows hold for one forward: a Linear run outside a denoiser's forward then fails loudly, never with
            # another forward's rows.
            handle = model.register_forward_hook(self._forget_rows)
            stack.callback(handle.remove)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool | None:
        return self._exit.__exit__(kind, error, traceback)

    def _take_rows(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        rows = kwargs.pop(LORA_ROWS, None)
        if rows is None:
            raise RuntimeError(f"per-request LoRA: {type(module).__name__} was called without the rows' requests")
        self.terms.rows = rows
        return args, kwargs

    def _forget_rows(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        del module, args, output
        self.terms.rows = None

    # -- loop hook ----------------------------------------------------------------------------------------------------

    def step_start(self, step: Any) -> None:
        del step

    def step_inputs(self, step: Any, inputs: Any, row_owner: torch.Tensor) -> None:
        del step
        # On the host: the seam plans each forward's terms from it without a device sync (`RowStack`). The loop's
        # row operations (CFG stacking, text-length groups) take CPU tensors as they take the device's.
        inputs.rows[LORA_ROWS] = row_owner.cpu()  # the adapters build `rows` as a dict of their own

    def step_end(self, step: Any) -> None:
        del step


def request_adapters(
    requests: Sequence[Any], adapters: Mapping[str, LoraAdapter]
) -> list[list[tuple[LoraAdapter, float]]]:
    """Each request's (adapter, strength) pairs, from its `lora` field."""
    return [[(adapters[entry["nickname"]], float(entry["strength"])) for entry in request.lora] for request in requests]
