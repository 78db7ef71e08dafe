"""What sliding tile attention needs from the denoising loop, for any family whose DiT runs it.

STA's mask strategy holds a window per (step, layer, head): the DiT must learn the index of the step being run
(its ``attention_step`` input), and a request may not run more steps than the strategy covers. A family adapter
holds a :class:`SlidingTileSteps` when the engine runs ``--attention-backend sliding_tile_attn`` (None otherwise),
checks requests with it, adds :meth:`fixed_inputs` to its model inputs, and its pipeline adds :attr:`index` to
the loop's hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import invalid_request
from ..layers.sparse_attention import SlidingTileStrategy
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from .hooks import StepIndex

__all__ = ["SlidingTileSteps"]


class SlidingTileSteps:
    """The step index hook and the strategy's step bound of one pipeline running sliding tile attention."""

    def __init__(self, strategy: SlidingTileStrategy) -> None:
        self.strategy = strategy
        self.index = StepIndex()

    @classmethod
    def from_options(cls, options: RuntimeOptions) -> SlidingTileSteps | None:
        """One for an engine running sliding tile attention, else None."""
        strategy = options.video_sparse.strategy if options.attention_backend == "sliding_tile_attn" else None
        return None if strategy is None else cls(strategy)

    def check_requests(self, requests: Sequence[Request]) -> None:
        """Rejects requests that run more denoising steps than the mask strategy covers."""
        for request in requests:
            try:
                self.strategy.check_steps(request.num_inference_steps)
            except ValueError as err:
                raise invalid_request("num_inference_steps", str(err)) from err

    def fixed_inputs(self) -> dict[str, Any]:
        """The DiT's ``attention_step`` for the step being run."""
        return {"attention_step": self.index.index}
