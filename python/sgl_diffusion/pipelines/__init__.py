"""Native pipelines and the registry that maps a checkpoint to one."""

from .registry import KNOWN_MODELS, load_pipeline, supported_pipeline_classes

__all__ = ["KNOWN_MODELS", "load_pipeline", "supported_pipeline_classes"]
