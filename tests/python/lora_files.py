"""LoRA files for tests: random low-rank pairs for a model's Linears, saved in a given key layout."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Linears of the tiny FLUX.1 fixture across both block kinds and an embedder.
FLUX_MODULES = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.0.attn.to_v",
    "x_embedder",
)


def peft_key(name: str, part: str) -> str:
    """diffusers / PEFT names: `transformer.<module>.lora_A.weight`, `.lora_B.weight`, `.alpha`."""
    suffix = {"down": "lora_A.weight", "up": "lora_B.weight", "alpha": "alpha"}[part]
    return f"transformer.{name}.{suffix}"


def random_lora(
    model: torch.nn.Module,
    modules: Iterable[str],
    rank: int,
    seed: int,
    key: Callable[[str, str], str] = peft_key,
    alpha: float | None = None,
    scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    """A LoRA for `modules` of `model` with keys `key(module, "down"|"up"|"alpha")`."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in modules:
        out_features, in_features = model.get_submodule(name).weight.shape
        tensors[key(name, "down")] = torch.randn(rank, in_features, generator=gen) * scale
        tensors[key(name, "up")] = torch.randn(out_features, rank, generator=gen) * scale
        if alpha is not None:
            tensors[key(name, "alpha")] = torch.tensor(alpha)
    return tensors


def save_lora(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
