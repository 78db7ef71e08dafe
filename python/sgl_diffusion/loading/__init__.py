"""Loading checkpoint components straight onto their device in their target precision."""

from .components import load_diffusers_model, load_native_model, load_transformers_model, read_config
from .vae import OtherVae, load_pipeline_vae, load_vae, track_vae_path

__all__ = [
    "OtherVae",
    "load_diffusers_model",
    "load_native_model",
    "load_pipeline_vae",
    "load_transformers_model",
    "load_vae",
    "read_config",
    "track_vae_path",
]
