"""The per-row LoRA seam (`layers/row_lora.py`) on every path a Linear's weight takes: a module call, a packed
projection group (`ProjectionFusion`, fused or not), `linear_gelu_tanh` and `linear_split_accumulate`; each row gets
its own request's term, and a row without adapters gets none."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sgl_diffusion.layers.linear import ProjectionFusion, linear_gelu_tanh, linear_split_accumulate
from sgl_diffusion.layers.row_lora import RowLoras, RowStack


class QKV(ProjectionFusion):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(8, 8) for _ in range(3))

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        return {"qkv": ("to_q", "to_k", "to_v")}


def stack_for(linear: nn.Linear, seed: int, rank: int = 2) -> RowStack:
    gen = torch.Generator().manual_seed(seed)
    out_features, in_features = linear.weight.shape
    # Request 0: no adapter; request 1: strength 0.5; request 2: strength 2.
    return RowStack(
        down=torch.randn(rank, in_features, generator=gen),
        up=torch.randn(out_features, rank, generator=gen),
        scales=torch.tensor([[0.0] * rank, [0.5] * rank, [2.0] * rank]),
        bias=torch.randn(3, out_features, generator=gen) * torch.tensor([[0.0], [1.0], [1.0]]),
    )


def expected(linear: nn.Linear, stack: RowStack, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = []
    for row, request in enumerate(rows.tolist()):
        weight = linear.weight + stack.scales[request, 0] * stack.up @ stack.down
        out.append(x[row] @ weight.t() + linear.bias + stack.bias[request])
    return torch.stack(out)


def test_every_path_adds_each_rows_own_term() -> None:
    torch.manual_seed(0)
    qkv = QKV()
    gelu, split = nn.Linear(8, 16), nn.Linear(24, 8)
    stacks = {qkv.to_q: stack_for(qkv.to_q, 1), qkv.to_v: stack_for(qkv.to_v, 2), gelu: stack_for(gelu, 3),
              split: stack_for(split, 4)}  # fmt: skip
    terms = RowLoras(stacks)
    x = torch.randn(4, 5, 8)
    rows = torch.tensor([2, 0, 1, 1])
    for fused in (False, True):
        if fused:
            qkv.fuse_projections()  # as models pack at load, before any batch
        with torch.no_grad(), terms.installed():
            terms.rows = rows
            q, k, v = qkv.project(x, "qkv")
            torch.testing.assert_close(q, expected(qkv.to_q, stacks[qkv.to_q], x, rows), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(k, x @ qkv.to_k.weight.t() + qkv.to_k.bias, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, expected(qkv.to_v, stacks[qkv.to_v], x, rows), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), terms.installed():
        terms.rows = rows
        got = linear_gelu_tanh(x, gelu.weight, gelu.bias)
        want = torch.nn.functional.gelu(expected(gelu, stacks[gelu], x, rows), approximate="tanh")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        parts = (torch.randn(4, 5, 10), torch.randn(4, 5, 14))
        got = linear_split_accumulate(parts, split.weight, split.bias)
        want = expected(split, stacks[split], torch.cat(parts, -1), rows)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Uninstalled: the plain Linears again.
    with torch.no_grad():
        torch.testing.assert_close(linear_gelu_tanh(x, gelu.weight, gelu.bias),
                                   torch.nn.functional.gelu(gelu(x), approximate="tanh"))  # fmt: skip


def test_rows_with_different_adapters_run_segmented_and_equal_the_dense_product(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sgl_diffusion.layers import row_lora

    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(8, 6)
    ranks = (2, 3, 4)
    spans = ((0, 2), (2, 5), (5, 9))
    # Request 0: none; 1: adapter 0; 2: adapters 1 and 2; 3: adapter 0 at another strength.
    strengths = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.5, -1.0], [2.0, 0.0, 0.0]])
    scales = torch.cat([strengths[:, j : j + 1].expand(4, rank) for j, rank in enumerate(ranks)], dim=1)
    stack = RowStack(
        down=torch.randn(sum(ranks), 8, generator=gen),
        up=torch.randn(6, sum(ranks), generator=gen),
        scales=scales,
        bias=torch.randn(4, 6, generator=gen) * (strengths.abs().sum(1, keepdim=True) > 0),
        spans=spans,
        uses=tuple(tuple(bool(s != 0) for s in row) for row in strengths),
    )
    x = torch.randn(5, 7, 8, generator=gen)
    rows = torch.tensor([3, 0, 2, 1, 2])
    want = []
    for row, request in enumerate(rows.tolist()):
        delta = sum(strengths[request, j] * stack.up[:, a:b] @ stack.down[a:b] for j, (a, b) in enumerate(spans))
        want.append(x[row] @ delta.t() + stack.bias[request])
    terms = RowLoras({linear: stack})
    monkeypatch.setattr(row_lora, "SEGMENT_MIN_RANK", 1)  # segment this small stack (dense below 1024 by default)
    with torch.no_grad(), terms.installed():
        terms.rows = rows
        segmented = linear(x) - x @ linear.weight.t() - linear.bias
        assert stack._plans[tuple(rows.tolist())].dense is None  # each row ran its own adapters' ranks alone
        torch.testing.assert_close(segmented, torch.stack(want), rtol=1e-5, atol=1e-5)
        # The dense product over every stacked rank gives the same.
        monkeypatch.setattr(row_lora, "SEGMENT_BELOW", 0.0)
        stack._plans.clear()
        dense = linear(x) - x @ linear.weight.t() - linear.bias
        assert stack._plans[tuple(rows.tolist())].dense is not None
        torch.testing.assert_close(dense, segmented, rtol=1e-5, atol=1e-5)
