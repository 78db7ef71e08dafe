"""Per-row low-rank terms on the Linears: the seam per-request LoRA adapters attach to.

Each row of a forward (one output of one request, in one guidance branch) may carry its own adapters. For a Linear
of weight `W` that any of the batch's adapters touches, its output gains, row by row,

    ((x @ A_catᵀ) * S[rows]) @ B_catᵀ  (+ Sb[rows], the adapters' bias deltas)

where `A_cat` / `B_cat` stack the adapters' low-rank pairs along the rank, `S` holds for every request of the batch
its adapters' `strength · alpha / rank` on their own rank columns (zero elsewhere), and `rows` names the request of
each row of this forward. Dense over the stacked ranks: the same shapes every step and no data-dependent control
flow.

How a Linear meets the seam (`lora_term(x, weight)`): a Linear called as a module gets a forward hook (installed by
`RowLoras.installed`); the paths that use a weight without calling its module ask explicitly —
`layers/linear.py`'s `linear_gelu_tanh` (the term goes in before the GELU), `linear_split_accumulate` (the term of the
concatenated input) and `ProjectionFusion.project` when packed (each projection's term on its slice). Terms are found
by the weight tensor itself, so a packed view and its module's parameter are the same key.

Which rows a forward sees is set per forward (`RowLoras.rows`) by the feature that owns the batch (the LoRA package:
`sgl_diffusion.lora.per_request`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RowLoras", "RowStack", "lora_active", "lora_term"]


@dataclass
class RowStack:
    """One Linear's adapters for a batch: `down` (R, in), `up` (out, R), `scales` (requests, R), and `bias`
    (requests, out) or None."""

    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None

    def term(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != rows.shape[0]:
            raise ValueError(
                f"per-request LoRA: a Linear's input has {x.shape[0]} rows, the forward {rows.shape[0]}: its input "
                "is not batch-first"
            )
        low = x.to(self.down.dtype) @ self.down.t()
        scale = self.scales[rows].view(rows.shape[0], *([1] * (low.ndim - 2)), -1)
        out = (low * scale) @ self.up.t()
        if self.bias is not None:
            out = out + self.bias[rows].view(rows.shape[0], *([1] * (out.ndim - 2)), -1)
        return out.to(x.dtype)


class RowLoras:
    """The batch's terms, by weight tensor, and the rows of the forward under way."""

    def __init__(self, stacks: Mapping[nn.Module, RowStack]) -> None:
        self.stacks = dict(stacks)
        # By the weight tensor each Linear holds when installed (packing projections replaces the parameters).
        self._by_weight: dict[int, RowStack] = {}
        self.rows: torch.Tensor | None = None

    def term(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        stack = self._by_weight.get(id(weight))
        if stack is None:
            return None
        if self.rows is None:
            raise RuntimeError("per-request LoRA: a forward ran without its rows (the step_inputs hook set none)")
        return stack.term(x, self.rows)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Active for the block: module calls of the stacked Linears get their term (forward hooks), and the
        functional paths find it through `lora_term`."""
        global _active
        if _active is not None:
            raise RuntimeError("per-request LoRA: another batch's terms are still installed")

        def add_term(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            term = self.term(args[0], module.weight)
            return output if term is None else output + term

        self._by_weight = {id(module.weight): stack for module, stack in self.stacks.items()}
        handles = [module.register_forward_hook(add_term) for module in self.stacks]
        _active = self
        try:
            yield
        finally:
            _active = None
            for handle in handles:
                handle.remove()


#: The batch's terms while installed (one thread runs Python's pipelines).
_active: RowLoras | None = None


def lora_active() -> bool:
    """Whether a batch's terms are installed: the functional paths ask this before any work of their own (a
    concatenation, a loop over projections), so batches without per-request adapters pay nothing."""
    return _active is not None


def lora_term(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """The per-row LoRA term of the Linear whose weight is `weight` on input `x`, or None (no adapter touches it, or
    none is installed): for code that uses a Linear's weight without calling the module."""
    return None if _active is None else _active.term(x, weight)
