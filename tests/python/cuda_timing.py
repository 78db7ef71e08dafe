"""GPU timing for the CUDA-only test cases that report how fast a fused op is against its unfused form."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_ms(fn: Callable[[], object], runs: int = 20) -> float:
    """Mean milliseconds per call of `fn` over `runs` calls after 3 untimed ones (CUDA events)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs
