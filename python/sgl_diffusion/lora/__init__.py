"""LoRA adapters: read in any layout diffusers knows (`adapter.py`), merged into and unmerged from a denoiser
exactly (`merge.py`)."""

from .adapter import LoraAdapter, LoraError, LoraModule, read_lora
from .merge import MergedLoras, check_adapter

__all__ = ["LoraAdapter", "LoraError", "LoraModule", "MergedLoras", "check_adapter", "read_lora"]
