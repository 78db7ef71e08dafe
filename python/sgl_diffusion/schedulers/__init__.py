"""Native samplers (stateless schedule planners + pure step functions)."""

from .flow_match_euler import (
    FlowMatchEulerConfig,
    FlowMatchEulerScheduler,
    calculate_shift,
    euler_step,
)

__all__ = [
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "calculate_shift",
    "euler_step",
]
