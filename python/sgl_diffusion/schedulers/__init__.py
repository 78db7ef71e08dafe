"""Native samplers (stateless schedule planners + pure step functions)."""

from .flow_match_euler import (
    FlowMatchEulerConfig,
    FlowMatchEulerScheduler,
    calculate_shift,
    euler_step,
)
from .unipc_flow import (
    UniPCFlowConfig,
    UniPCFlowScheduler,
    UniPCFlowState,
    unipc_convert_model_output,
    unipc_corrector_update,
    unipc_predictor_update,
)

__all__ = [
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "UniPCFlowConfig",
    "UniPCFlowScheduler",
    "UniPCFlowState",
    "calculate_shift",
    "euler_step",
    "unipc_convert_model_output",
    "unipc_corrector_update",
    "unipc_predictor_update",
]
