"""`benches/bench_stats.py`: the spread of repeated timings and the rule that calls a gap noise."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "bench_stats.py"


def load_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_stats", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench_stats = load_module()


def test_spread_of_repetitions() -> None:
    s = bench_stats.spread([12.0, 10.0, 11.0, 14.0, 13.0])
    assert (s.n, s.median, s.low, s.high) == (5, 12.0, 10.0, 14.0)
    assert (s.q1, s.q3) == (11.0, 13.0)
    assert s.rel_spread == pytest.approx(4.0 / 12.0)
    one = bench_stats.spread([7.5])
    assert (one.median, one.low, one.high, one.q1, one.q3, one.rel_spread) == (7.5, 7.5, 7.5, 7.5, 7.5, 0.0)
    assert math.isinf(bench_stats.spread([0.0, 1.0, 0.0]).rel_spread)
    with pytest.raises(ValueError):
        bench_stats.spread([])


def test_within_noise_is_overlap_of_the_ranges() -> None:
    ours, theirs = [100.0, 101.0, 102.0, 103.0, 104.0], [104.0, 105.0, 106.0, 107.0, 108.0]
    assert bench_stats.within_noise(ours, theirs)  # they touch at 104: a tie
    assert bench_stats.within_noise(theirs, ours)  # symmetric
    assert not bench_stats.within_noise(ours, [104.5, 105.0, 106.0, 107.0, 108.0])
    # A median gap of 4 % with one slow repetition on one side is still a tie: the ranges overlap.
    assert bench_stats.within_noise([100.0, 100.0, 100.0, 100.0, 110.0], [104.0, 104.0, 104.0, 104.0, 104.0])
    # One range inside the other.
    assert bench_stats.within_noise([100.0, 120.0], [105.0, 106.0])
    with pytest.raises(ValueError):
        bench_stats.within_noise([], [1.0])


def test_verdict() -> None:
    fast, slow = [10.0, 10.1, 10.2, 10.3, 10.4], [11.0, 11.1, 11.2, 11.3, 11.4]
    assert bench_stats.verdict(fast, slow) == "faster"
    assert bench_stats.verdict(slow, fast) == "slower"
    assert bench_stats.verdict(fast, [10.4, 11.0, 11.1, 11.2, 11.3]) == bench_stats.WITHIN_NOISE
    # Fewer repetitions than the rule needs: no call either way, even for disjoint ranges.
    assert bench_stats.verdict(fast[:4], slow) == f"no verdict (< {bench_stats.MIN_REPS} repetitions)"
    assert bench_stats.verdict(fast, slow[:1]).startswith("no verdict")


def test_the_rule_text_states_the_chance_level() -> None:
    # 2 / C(10, 5): every one of 5 repetitions of one side below every one of the other's, by chance.
    assert 2 / math.comb(2 * bench_stats.MIN_REPS, bench_stats.MIN_REPS) < 0.008
    assert "[min, max] ranges" in bench_stats.RULE and f">= {bench_stats.MIN_REPS}" in bench_stats.RULE
