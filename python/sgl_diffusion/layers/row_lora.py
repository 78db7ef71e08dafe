"""Per-row low-rank terms on the Linears: the seam per-request LoRA adapters attach to.

Each row of a forward (one output of one request, in one guidance branch) may carry its own adapters. For a Linear
of weight `W` that any of the batch's adapters touches, its output gains, row by row,

    ((x @ A_catᵀ) * S[rows]) @ B_catᵀ  (+ Sb[rows], the adapters' bias deltas)

where `A_cat` / `B_cat` stack the adapters' low-rank pairs along the rank, `S` holds for every request of the batch
its adapters' `strength · alpha / rank` on their own rank columns (zero elsewhere), and `rows` names the request of
each row of this forward. That product is computed as it stands, dense over the stacked ranks, unless the stack is
large and each row uses only part of it (many requests with different adapters): then it is segmented,
Punica-style: each adapter's pair runs on the rows that use it alone and their terms are added into place, which
costs each row its own rank instead of the batch's total (see SEGMENT_MIN_RANK for when that pays). Which rows use
which adapter is known on the host (the rows of a forward are a CPU tensor), so choosing costs no device sync; the
plan is kept per pattern of rows, which repeats from step to step.

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
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["RowLoras", "RowStack", "lora_active", "lora_term"]


@dataclass
class _Part:
    """One adapter's share of a segmented term: its rank columns, the rows that use it (`index`, None: all), their
    scales (rows, rank), and `runs`: (first row, end row, position in the gathered rows) for each run of consecutive
    rows, so the result goes back in place by slices (an index_add_ is far slower on the CPU, and atomic on GPUs)."""

    start: int
    end: int
    index: torch.Tensor | None
    scale: torch.Tensor
    runs: tuple[tuple[int, int, int], ...]


def _runs(rows: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Runs of consecutive values in the sorted `rows`: (first, end, position of first in `rows`)."""
    runs: list[tuple[int, int, int]] = []
    for position, row in enumerate(rows):
        if runs and runs[-1][1] == row:
            first, _, at = runs[-1]
            runs[-1] = (first, row + 1, at)
        else:
            runs.append((row, row + 1, position))
    return tuple(runs)


@dataclass
class _Plan:
    """How one pattern of rows computes its term: `dense` (rows, R) scales over the stacked ranks, or `parts`."""

    dense: torch.Tensor | None
    parts: list[_Part]
    bias: torch.Tensor | None


#: Segment when the rows' own ranks add up to at most this fraction of (rows x stacked rank) and the stacked rank is at
#: least SEGMENT_MIN_RANK; else dense. At small stacked ranks the pair's matrix products are bound by reading x and
#: writing the output, not by the rank, so segmenting only adds launches and passes: on an H100, FLUX.1-dev at 1024²,
#: 4 requests x 4 different rank-64 adapters (stacked rank 256), dense took 722 ms a forward and segmented 785 ms
#: (benches/results/lora_batch_h100.md). From a stacked rank of about a thousand (e.g. 16 adapters of rank 64) the
#: dense products turn compute-bound and the rows' own ranks are what counts; that threshold is not measured yet.
SEGMENT_BELOW = 0.5
SEGMENT_MIN_RANK = 1024


@dataclass
class RowStack:
    """One Linear's adapters for a batch: `down` (R, in), `up` (out, R), `scales` (requests, R), `bias` (requests, out)
    or None, and `spans`: each adapter's rank columns [start, end), with `uses[i][j]` whether request `i` uses
    adapter `j` (None: every request uses every adapter)."""

    down: torch.Tensor
    up: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None = None
    spans: tuple[tuple[int, int], ...] = ()
    uses: tuple[tuple[bool, ...], ...] | None = None
    _plans: dict[tuple[int, ...], _Plan] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.spans:
            self.spans = ((0, self.down.shape[0]),)

    def _segments(self, rows: tuple[int, ...]) -> list[list[int]] | None:
        """Per adapter, the rows (positions in `rows`) that use it, when segmenting pays (see SEGMENT_BELOW and
        SEGMENT_MIN_RANK); None for the dense product."""
        stacked = self.down.shape[0]
        if stacked < SEGMENT_MIN_RANK:
            return None
        users = [
            [row for row, owner in enumerate(rows) if self.uses is None or self.uses[owner][j]]
            for j in range(len(self.spans))
        ]
        own_ranks = sum(len(rows_of) * (end - start) for rows_of, (start, end) in zip(users, self.spans, strict=True))
        return None if own_ranks > SEGMENT_BELOW * len(rows) * stacked else users

    def _plan(self, rows: tuple[int, ...]) -> _Plan:
        plan = self._plans.get(rows)
        if plan is not None:
            return plan
        device = self.scales.device
        owners = torch.tensor(rows, device=device)
        bias = None if self.bias is None else self.bias[owners]
        users = self._segments(rows)
        if users is None:
            plan = _Plan(dense=self.scales[owners], parts=[], bias=bias)
        else:
            parts = []
            for rows_of, (start, end) in zip(users, self.spans, strict=True):
                if not rows_of:
                    continue
                runs = _runs(rows_of)
                # One run: a slice of the rows, no gather.
                index = None if len(runs) == 1 else torch.tensor(rows_of, device=device)
                chosen = owners[runs[0][0] : runs[0][1]] if index is None else owners[index]
                parts.append(_Part(start, end, index, self.scales[chosen, start:end], runs))
            plan = _Plan(dense=None, parts=parts, bias=bias)
        self._plans[rows] = plan
        return plan

    def term(self, x: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
        if x.shape[0] != len(rows):
            raise ValueError(
                f"per-request LoRA: a Linear's input has {x.shape[0]} rows, the forward {len(rows)}: its input "
                "is not batch-first"
            )
        plan = self._plan(rows)
        x = x.to(self.down.dtype)
        if plan.dense is not None:
            out = self._pair(x, 0, self.down.shape[0], plan.dense)
        else:
            out = x.new_zeros((*x.shape[:-1], self.up.shape[0]))
            for part in plan.parts:
                if part.index is None:
                    first, end, _ = part.runs[0]
                    out[first:end] += self._pair(x[first:end], part.start, part.end, part.scale)
                    continue
                term = self._pair(x.index_select(0, part.index), part.start, part.end, part.scale)
                for first, end, at in part.runs:
                    out[first:end] += term[at : at + end - first]
        if plan.bias is not None:
            out = out + plan.bias.view(len(rows), *([1] * (out.ndim - 2)), -1)
        return out

    def _pair(self, x: torch.Tensor, start: int, end: int, scale: torch.Tensor) -> torch.Tensor:
        """((x · A[start:end]ᵀ) ⊙ scale) · B[:, start:end]ᵀ, `scale` (rows of x, end - start)."""
        low = x @ self.down[start:end].t()
        low = low * scale.view(x.shape[0], *([1] * (low.ndim - 2)), -1)
        return low @ self.up[:, start:end].t()


class RowLoras:
    """The batch's terms, by weight tensor, and the rows of the forward under way."""

    def __init__(self, stacks: Mapping[nn.Module, RowStack]) -> None:
        self.stacks = dict(stacks)
        # By the weight tensor each Linear holds when installed (packing projections replaces the parameters).
        self._by_weight: dict[int, RowStack] = {}
        self._rows: tuple[int, ...] | None = None

    @property
    def rows(self) -> tuple[int, ...] | None:
        """The request of each row of the forward under way (set per forward; None between forwards)."""
        return self._rows

    @rows.setter
    def rows(self, rows: torch.Tensor | None) -> None:
        # A CPU tensor (as the loop passes it) costs no device sync here.
        self._rows = None if rows is None else tuple(int(row) for row in rows.tolist())

    def term(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        stack = self._by_weight.get(id(weight))
        if stack is None:
            return None
        if self._rows is None:
            raise RuntimeError("per-request LoRA: a forward ran without its rows (the step_inputs hook set none)")
        return stack.term(x, self._rows).to(x.dtype)

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
