"""Exact merge and unmerge of LoRA adapters into one denoiser's weights.

Merging writes `W' = W + Σ_i (up_i @ down_i) · scale_i` into each touched Linear, summed in fp32 from the base
weight and rounded once to the weight's dtype (adapters in the order given, as diffusers fuses them one after
another). Unmerging copies the base back: the touched weights' originals are kept (on the CPU, in their own
dtype: half the bytes of an fp32 delta), so the base returns bit for bit however many times adapters are
switched; nothing is ever subtracted.

Weights are updated in place (`copy_`): the tensors stay where they are, so views of them (the packed QKV
projections), torch.compile's graphs (parameters are graph inputs) and captured CUDA graphs (they read the
weights' memory) all see the merged values, and no stale graph can run.

Every adapter is checked against the model before any weight changes: a module it names that the model lacks,
or a shape that does not fit, is a `LoraError` naming the key, and the model is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import DENOISER_PREFIX, LoraAdapter, LoraError, LoraModule

__all__ = ["MergedLoras", "check_adapter"]


def _linear(model: nn.Module, name: str) -> nn.Module:
    key = f"{DENOISER_PREFIX}{name}.lora_A.weight"
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise LoraError(key, f"the model has no module {name} (a LoRA for another model?)") from exc
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise LoraError(key, f"{name} is a {type(module).__name__}, not a Linear layer")
    return module


def check_adapter(model: nn.Module, adapter: LoraAdapter) -> None:
    """Raises `LoraError` naming the first key of `adapter` that does not fit `model`."""
    for name, lora in adapter.modules.items():
        weight = _linear(model, name).weight
        out_features, in_features = weight.shape
        if lora.down.shape[1] != in_features or lora.up.shape[0] != out_features:
            raise LoraError(
                f"{DENOISER_PREFIX}{name}.lora_A.weight",
                f"a rank-{lora.rank} update of shape ({lora.up.shape[0]}, {lora.down.shape[1]}) does not fit "
                f"{name}.weight of shape ({out_features}, {in_features}) (a LoRA for another model?)",
            )
        if lora.up_bias is not None:
            bias = getattr(_linear(model, name), "bias", None)
            if bias is None or lora.up_bias.shape != bias.shape:
                have = "no bias" if bias is None else f"a bias of shape {tuple(bias.shape)}"
                raise LoraError(
                    f"{DENOISER_PREFIX}{name}.lora_B.bias",
                    f"a bias update of shape {tuple(lora.up_bias.shape)} for {name}, which has {have}",
                )


@dataclass
class _Base:
    weight: torch.Tensor
    bias: torch.Tensor | None


def _delta(lora: LoraModule, scale: float, device: torch.device) -> torch.Tensor:
    # As PEFT's get_delta_weight: (B @ A), then times the scaling, in fp32.
    return (lora.up.to(device, torch.float32) @ lora.down.to(device, torch.float32)) * scale


class MergedLoras:
    """The adapters merged into one denoiser, and the base weights they replaced."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._base: dict[str, _Base] = {}
        self.merged: list[tuple[LoraAdapter, float]] = []

    def merge(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Makes the model its base weights plus `adapters` (each with its strength), replacing what was merged."""
        for adapter, _ in adapters:
            check_adapter(self.model, adapter)
        self.unmerge()
        touched = dict.fromkeys(name for adapter, _ in adapters for name in adapter.modules)
        with torch.no_grad():
            for name in touched:
                module = _linear(self.model, name)
                bias = getattr(module, "bias", None)
                self._base[name] = _Base(
                    weight=module.weight.detach().to("cpu", copy=True),
                    bias=None if bias is None else bias.detach().to("cpu", copy=True),
                )
                weight = module.weight.detach().to(torch.float32, copy=True)
                new_bias = None if bias is None else bias.detach().to(torch.float32, copy=True)
                for adapter, strength in adapters:
                    lora = adapter.modules.get(name)
                    if lora is None:
                        continue
                    scale = lora.scale(strength)
                    weight = weight + _delta(lora, scale, weight.device)
                    if lora.up_bias is not None and new_bias is not None:
                        new_bias = new_bias + lora.up_bias.to(new_bias.device, torch.float32) * scale
                module.weight.copy_(weight.to(module.weight.dtype))
                if new_bias is not None and bias is not None:
                    bias.copy_(new_bias.to(bias.dtype))
        self.merged = list(adapters)

    def unmerge(self) -> None:
        """Restores every touched weight to its base, bit for bit."""
        with torch.no_grad():
            for name, base in self._base.items():
                module = _linear(self.model, name)
                module.weight.copy_(base.weight)
                if base.bias is not None:
                    module.bias.copy_(base.bias)
        self._base.clear()
        self.merged = []
