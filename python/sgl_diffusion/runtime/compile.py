"""`--enable-torch-compile`: compile a denoiser's repeated transformer blocks.

Compiling each block rather than the whole model keeps compile time to one graph per block class
(dynamo reuses a graph across instances of the same class because module parameters are graph
inputs, not constants), and leaves the glue around the blocks (patchify, RoPE tables, embeddings)
in eager mode, where shapes vary per request. Inside a compiled block the fused-kernel dispatch
(`layers/fused.py`) hands inductor the torch reference so it can fuse the elementwise work itself.

Shapes are static (`dynamic=False`): every new (batch, tokens) shape compiles once, and steps and
requests of a shape seen before reuse it without recompiling (tests assert that).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Distinct shapes (batch x resolution x frames) one server keeps compiled graphs for before dynamo
#: falls back to eager for new ones; torch's default (8) is low for a server taking many sizes.
RECOMPILE_LIMIT = 64


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a denoiser: the members of the `nn.ModuleList`s its class names in
    `_repeated_blocks` (FLUX: `transformer_blocks`, `single_transformer_blocks`; Wan: `blocks`). A model
    must declare them: guessing from its layout would silently compile the wrong units (or none) for the
    next architecture. (diffusers' `_repeated_blocks` lists block class names instead; naming the lists
    says exactly which modules are meant.)"""
    declared = getattr(type(model), "_repeated_blocks", ())
    if not declared:
        raise ValueError(f"{type(model).__name__} declares no repeated blocks to compile (`_repeated_blocks`)")
    blocks: list[nn.Module] = []
    for name in declared:
        stack = getattr(model, name, None)
        if not isinstance(stack, nn.ModuleList):
            raise TypeError(f"{type(model).__name__}._repeated_blocks names {name!r}, which is no nn.ModuleList")
        blocks.extend(stack)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks in {list(declared)}")
    return blocks


def compile_repeated_blocks(model: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> int:
    """Compiles every repeated block of `model` in place; returns how many were compiled.

    `fullgraph=True`: a graph break inside a block is a bug in our model code (it would silently
    cost speed), so it fails loudly instead.
    """
    blocks = repeated_blocks(model)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    logger.info("torch.compile: %d blocks of %s (backend %s)", len(blocks), type(model).__name__, backend)
    return len(blocks)
