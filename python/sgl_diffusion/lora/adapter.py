"""A LoRA file read into one form: for each Linear of a denoiser, its low-rank pair, bias delta and alpha.

LoRA files come in many layouts (diffusers/PEFT, kohya `lora_unet_*`, original Wan `diffusion_model.*`, XLabs,
ai-toolkit, musubi, ...). diffusers already knows them all, per family, and it is the oracle our merged weights
are compared against, so the conversion to diffusers' module names is its own: the family's diffusers pipeline
class's `lora_state_dict` (pure name and layout work on CPU tensors; nothing is loaded into a model). Our models
mirror diffusers' module tree, so those names are ours too.

For a family diffusers has no LoRA loader for (HunyuanVideo-1.5, GLM-Image), files are read in
diffusers/PEFT names as they are. What diffusers' conversion leaves is read here: `<prefix>.<module>.lora_A.weight` (rank x in),
`.lora_B.weight` (out x rank), `.lora_B.bias` (a bias delta, from `diff_b`), and alphas (`.alpha` keys, the
network alphas FLUX's loader returns, or the PEFT config saved in the file's metadata). Anything else is an
error naming the key, never dropped silently.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoraAdapter", "LoraError", "LoraModule", "read_lora"]

#: The component prefix diffusers gives a denoiser's keys; text encoders' LoRAs are not served.
DENOISER_PREFIX = "transformer."
_PART = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|alpha)$")


class LoraError(ValueError):
    """An adapter that cannot apply, naming the first key at fault (`key`) and why."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


@dataclass(frozen=True)
class LoraModule:
    """One Linear's update: `W + scale * (up @ down)` and `bias + scale * up_bias`, `scale = strength * alpha / rank`
    (alpha defaulting to the rank)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    up_bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, strength: float) -> float:
        """PEFT's scaling: alpha / rank, times the strength (in that order, as `scale_layer` multiplies it)."""
        return (self.alpha / self.rank if self.alpha is not None else 1.0) * strength


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file in the denoiser's module names."""

    path: str
    modules: Mapping[str, LoraModule]

    @property
    def nbytes(self) -> int:
        tensors = [t for m in self.modules.values() for t in (m.down, m.up, m.up_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _diffusers_loader(pipeline_class: str) -> Any:
    import diffusers

    loader = getattr(diffusers, pipeline_class, None)
    return loader if loader is not None and hasattr(loader, "lora_state_dict") else None


def _peft_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """A file in diffusers/PEFT names as it is, for families diffusers has no LoRA loader for (what diffusers'
    `save_lora_weights` writes, and what PEFT training scripts for them save)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(path))
        with safe_open(str(path), framework="pt") as file:
            raw = (file.metadata() or {}).get("lora_adapter_metadata")
    except (SafetensorError, OSError) as exc:
        raise LoraError(None, f"{path} is no LoRA file diffusers can read: {exc}") from exc
    return state_dict, {}, json.loads(raw) if raw else {}


def _diffusers_state_dict(path: Path, pipeline_class: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """(state dict in diffusers' names, network alphas, the PEFT config from the file's metadata)."""
    loader = _diffusers_loader(pipeline_class)
    if loader is None:
        return _peft_state_dict(path)
    parameters = inspect.signature(loader.lora_state_dict).parameters
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    if "return_alphas" in parameters:
        kwargs["return_alphas"] = True
    try:
        out = loader.lora_state_dict(str(path), **kwargs)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise LoraError(None, f"{path} is no LoRA file diffusers can read for {pipeline_class}: {exc}") from exc
    if "return_alphas" in kwargs:
        state_dict, alphas, metadata = out
    else:
        (state_dict, metadata), alphas = out, None
    return dict(state_dict), dict(alphas or {}), dict(metadata or {})


def _config_alpha(config: Mapping[str, Any], module: str) -> float | None:
    """The alpha PEFT's saved config gives `module`: its `alpha_pattern` entry (a key matching the module's name or
    its end), else `lora_alpha`."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith(f".{pattern}") or re.fullmatch(pattern, module):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def read_lora(path: str | Path, pipeline_class: str) -> LoraAdapter:
    """Reads a LoRA `.safetensors` file for a pipeline of class `pipeline_class`, on the CPU. (Which file a user's
    path names — a folder, a cached Hugging Face id — the Rust registry decides: `sgl_weights::lora`.)

    Raises `LoraError` naming the first key that is not a denoiser's LoRA weight, or whose pair is incomplete.
    """
    file = Path(path)
    state_dict, network_alphas, metadata = _diffusers_state_dict(file, pipeline_class)
    # The denoiser's PEFT config, as diffusers saves it: its keys prefixed with the component's name.
    config = {
        key.removeprefix(DENOISER_PREFIX): value for key, value in metadata.items() if key.startswith(DENOISER_PREFIX)
    }
    if config.get("use_dora"):
        raise LoraError(None, f"{file} is a DoRA adapter, which is not supported (LoRA is)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in {**state_dict, **network_alphas}.items():
        name = key.removeprefix(DENOISER_PREFIX)
        if name == key and "." in key and key.split(".", 1)[0].startswith("text_encoder"):
            raise LoraError(key, "text-encoder LoRA weights are not supported (only the denoiser's)")
        match = _PART.match(name)
        if match is None:
            raise LoraError(key, "not a LoRA weight this engine applies (lora_A/lora_B weights, lora_B bias, alpha)")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise LoraError(None, f"{file} holds no LoRA weights")
    modules: dict[str, LoraModule] = {}
    for module, found in sorted(parts.items()):
        down, up = found.get("lora_A.weight"), found.get("lora_B.weight")
        if down is None or up is None:
            missing = "lora_A.weight" if down is None else "lora_B.weight"
            raise LoraError(f"{DENOISER_PREFIX}{module}.{missing}", "missing: a LoRA needs both halves of each pair")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(
                f"{DENOISER_PREFIX}{module}.lora_A.weight",
                f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are no rank-r pair (r x in, out x r)",
            )
        alpha_tensor = found.get("alpha")
        alpha = float(alpha_tensor) if alpha_tensor is not None else _config_alpha(config, module)
        modules[module] = LoraModule(down=down, up=up, alpha=alpha, up_bias=found.get("lora_B.bias"))
    return LoraAdapter(path=str(file), modules=modules)
