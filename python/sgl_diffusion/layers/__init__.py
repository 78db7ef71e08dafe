"""Building blocks shared by the native model implementations."""

from .attention import (
    DEFAULT_ATTENTION_BACKEND,
    AttentionBackend,
    AttentionFn,
    attention,
    available_attention_backends,
    register_attention_backend,
    resolve_attention_backend,
)
from .norms import LayerNormNoAffine, RMSNorm
from .rotary import apply_interleaved_rotary, multi_axis_rope_tables, rope_tables_1d

__all__ = [
    "DEFAULT_ATTENTION_BACKEND",
    "AttentionBackend",
    "AttentionFn",
    "LayerNormNoAffine",
    "RMSNorm",
    "apply_interleaved_rotary",
    "attention",
    "available_attention_backends",
    "multi_axis_rope_tables",
    "register_attention_backend",
    "resolve_attention_backend",
    "rope_tables_1d",
]
