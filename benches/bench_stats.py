"""Statistics of repeated timings, and the one rule that calls a gap between two variants noise.

Pure Python (no torch), so the rule is unit-tested on its own (tests/python/test_bench_stats.py) and
every benchmark states the same thing the same way.

The rule (`within_noise`): two variants tie when the [min, max] ranges of their repetitions overlap.
With R alternating repetitions each and two equally fast variants, disjoint ranges (every repetition of
one faster than every repetition of the other) happen by chance with probability 2 / C(2R, R): 2/252 =
0.8 % for R = 5. So a gap is only called "faster"/"slower" when it is larger than what the run-to-run
spread of the same run shows, and only with at least `MIN_REPS` repetitions each.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence

#: Fewest repetitions per variant for a faster/slower verdict (2/252 chance level, see above).
MIN_REPS = 5

WITHIN_NOISE = "within noise"

RULE = (
    "within noise = the [min, max] ranges of the two variants' repetitions overlap (benches/bench_stats.py); "
    f"faster/slower needs >= {MIN_REPS} alternating repetitions each, where disjoint ranges arise by chance "
    "with probability 2/C(2R, R) (< 0.8 % at R = 5) if both are equally fast"
)


@dataclasses.dataclass(frozen=True)
class Spread:
    """Median and spread of one variant's repetitions (one value per repetition, any unit)."""

    n: int
    median: float
    low: float
    high: float
    #: Quartiles (inclusive method); equal to the median for a single value.
    q1: float
    q3: float

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: how far apart the repetitions of one variant landed."""
        return (self.high - self.low) / self.median if self.median else math.inf


def spread(values: Sequence[float]) -> Spread:
    if not values:
        raise ValueError("no values")
    values = [float(v) for v in values]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return Spread(len(values), statistics.median(values), min(values), max(values), q1, q3)


def within_noise(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the [min, max] ranges of two variants' repetitions overlap (the module docstring's rule)."""
    if not a or not b:
        raise ValueError("no values")
    return max(min(a), min(b)) <= min(max(a), max(b))


def verdict(ours: Sequence[float], rival: Sequence[float]) -> str:
    """`ours` against `rival` (times: lower is better): "within noise", "faster", "slower", or why no call
    can be made."""
    if min(len(ours), len(rival)) < MIN_REPS:
        return f"no verdict (< {MIN_REPS} repetitions)"
    if within_noise(ours, rival):
        return WITHIN_NOISE
    return "faster" if statistics.median(ours) < statistics.median(rival) else "slower"
