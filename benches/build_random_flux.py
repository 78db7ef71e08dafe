"""Writes a FLUX.1-dev pipeline folder in diffusers layout with random bf16 weights at full size.

    python benches/build_random_flux.py OUT_DIR [--device cuda] [--max-shard-size 5GB] [--seed 0]
    python benches/build_random_flux.py OUT_DIR --tiny --device cpu     # smoke test of this script

Every model takes the real FLUX.1-dev config (transformer 11.9 B parameters, T5-v1.1-XXL encoder
4.8 B, CLIP-L text model, the FLUX VAE) and is built directly on `--device` in bf16 (the default dtype
and device are switched while the modules are created), so no 12 B-parameter fp32 copy is ever made
on the host. Parameters are then overwritten with N(0, 0.02) noise, except the weights of norm layers
(1) and their biases (0). The folder is written with `save_pretrained(max_shard_size=...)`, so the
transformer and T5 encoder come out as sharded safetensors with an index, as the real checkpoint does.

Tokenizers are the project's tiny offline tokenizers (`sgl_diffusion.testing.tokenizers`): the real
vocabularies cannot be downloaded here. Their ids fall inside the real-size embedding tables, and the
sequence lengths (77 CLIP tokens, up to 512 T5 tokens) are the real ones, so speed is unaffected.
The images are noise; this folder is for timing and memory only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

# FLUX.1-dev's own configs (black-forest-labs/FLUX.1-dev, */config.json).
FULL: dict[str, dict[str, Any]] = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": (16, 56, 56),
    },
    "clip": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "max_position_embeddings": 77,
    },
    "t5": {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 16,
        "norm_num_groups": 32,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.1159,
        "scaling_factor": 0.3611,
        "sample_size": 1024,
    },
}

# Same structure, tiny widths: only for checking this script on a CPU.
TINY: dict[str, dict[str, Any]] = {
    "transformer": FULL["transformer"]
    | {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 16,
        "axes_dims_rope": (4, 6, 6),
    },
    "clip": FULL["clip"]
    | {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "projection_dim": 16,
    },
    "t5": FULL["t5"] | {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 4},
    "vae": FULL["vae"] | {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
}

SCHEDULER = {
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

INIT_STD = 0.02


def log(message: str) -> None:
    print(f"[build_random_flux] {message}", flush=True)


@contextlib.contextmanager
def default_dtype_and_device(dtype: torch.dtype, device: torch.device) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm / GroupNorm, diffusers' RMSNorm, transformers' T5LayerNorm, ...
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def randomize(model: nn.Module, generator: torch.Generator, std: float = INIT_STD) -> dict[str, int]:
    """N(0, std) for every floating parameter; weight 1 / bias 0 for the parameters of norm layers.
    Returns counts of what was set."""
    counts = {"random": 0, "norm_weight": 0, "norm_bias": 0}
    for module in model.modules():
        norm = _is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            if norm and name == "weight":
                param.fill_(1.0)
                counts["norm_weight"] += param.numel()
            elif norm and name == "bias":
                param.zero_()
                counts["norm_bias"] += param.numel()
            else:
                param.normal_(0.0, std, generator=generator)
                counts["random"] += param.numel()
    return counts


def check_finite_and_placed(model: nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> int:
    total = 0
    for pname, param in model.named_parameters():
        if param.device.type != device.type:
            raise RuntimeError(f"{name}.{pname} is on {param.device}, expected {device}")
        if param.is_floating_point() and param.dtype != dtype:
            raise RuntimeError(f"{name}.{pname} has dtype {param.dtype}, expected {dtype}")
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise RuntimeError(f"{name}.{pname} has non-finite values")
        total += param.numel()
    return total


def build(
    name: str,
    factory: Callable[[], nn.Module],
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator,
) -> nn.Module:
    start = time.perf_counter()
    with default_dtype_and_device(dtype, device):
        model = factory()
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    counts = randomize(model, generator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    numel = check_finite_and_placed(model, name, device, dtype)
    log(
        f"{name}: {type(model).__name__}, {numel / 1e9:.3f} B params "
        f"({counts['random'] / 1e9:.3f} B random, {counts['norm_weight']} norm weights = 1), "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, same structure (CPU smoke test)")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from sgl_diffusion.testing.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16
    cfg = TINY if args.tiny else FULL
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()
    for tok, table in ((tokenizer, cfg["clip"]["vocab_size"]), (tokenizer_2, cfg["t5"]["vocab_size"])):
        if len(tok) > table:
            raise RuntimeError(f"{type(tok).__name__} has {len(tok)} ids, more than the table's {table}")
    log(f"tokenizers: CLIP {len(tokenizer)} ids, T5 {len(tokenizer_2)} ids")

    clip_config = CLIPTextConfig(
        **cfg["clip"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        **cfg["t5"],
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    text_encoder = build("text_encoder", lambda: CLIPTextModel(clip_config), device, dtype, generator)
    text_encoder_2 = build("text_encoder_2", lambda: T5EncoderModel(t5_config), device, dtype, generator)
    vae = build("vae", lambda: AutoencoderKL(**cfg["vae"]), device, dtype, generator)
    transformer = build("transformer", lambda: FluxTransformer2DModel(**cfg["transformer"]), device, dtype, generator)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    if device.type == "cuda":
        log(f"GPU memory allocated after build: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    t_save = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=args.max_shard_size)
    save_s = time.perf_counter() - t_save

    files = sorted(p for p in out.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    for component in ("transformer", "text_encoder_2"):
        if not list((out / component).glob("*.safetensors.index.json")) and not args.tiny:
            raise RuntimeError(f"{component} was not sharded; expected a *.safetensors.index.json")
    model_index = json.loads((out / "model_index.json").read_text())
    if model_index.get("_class_name") != "FluxPipeline":
        raise RuntimeError(f"unexpected model_index.json: {model_index}")
    log(f"saved {len(files)} files, {total_bytes / 2**30:.2f} GiB, in {save_s:.1f} s")
    for p in files:
        if p.suffix in (".safetensors", ".json"):
            log(f"  {p.relative_to(out)}  {p.stat().st_size / 2**20:.1f} MiB")
    log(f"total {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
