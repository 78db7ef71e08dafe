"""Bit-exact CPU comparisons: what a test must hold fixed when equality (not closeness) is the point.

torch promises identical bits only for the same operation on the same inputs, in the same memory
layout, with the same number of threads (intra-op parallel reductions are split per thread). A test
that compares two runs of the same computation (a reload of the same weights, a request alone and in
a batch) fixes all three with these helpers and then asserts equality.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One intra-op thread and deterministic algorithms inside the block (process-wide, so the
    engine's executor thread runs under them too); the previous settings come back afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def own_aligned_memory(pipe: Any) -> None:
    """Copies every weight of a diffusers pipeline's torch components into memory of its own.

    diffusers and transformers load CPU weights as views of the memory-mapped safetensors files,
    aligned only to each tensor's byte offset in its file: a sharded and an unsharded save of the
    same weights then differ in alignment, and BLAS kernels may pick other code paths (another
    summation order) for other alignments. Copies get the CPU allocator's 64-byte alignment, as the
    engine's own loader gives them. Parameter objects are kept, so tied weights stay tied.
    """
    with torch.no_grad():
        for component in pipe.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for param in component.parameters():
                param.data = param.data.clone()
            for module in component.modules():
                for name, buffer in module.named_buffers(recurse=False):
                    module._buffers[name] = buffer.clone()


def is_aligned(tensor: torch.Tensor, alignment: int = 64) -> bool:
    return tensor.data_ptr() % alignment == 0
