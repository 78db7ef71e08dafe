"""Writes a Wan2.1-T2V-1.3B pipeline folder in diffusers layout with random bf16 weights at full size,
and optionally the Wan2.2 TI2V-5B VAE (48 latent channels) as a separate folder.

    python benches/build_random_wan.py OUT_DIR [--device cuda] [--max-shard-size 5GB] [--seed 0]
        [--ti2v-vae VAE_DIR]
    python benches/build_random_wan.py OUT_DIR --ti2v-vae VAE_DIR --tiny --device cpu   # smoke test

Models take the real configs: the Wan2.1-T2V-1.3B transformer (30 layers, 12 heads of 128, FFN 8960;
1.42 B parameters), the UMT5-XXL encoder (24 layers, d_model 4096, vocabulary 256384; 5.68 B), the
Wan2.1 VAE (`AutoencoderKLWan()`'s defaults are the real z16 config) and the UniPC flow scheduler
the checkpoint ships (flow_shift 3.0). Every model is built directly on `--device` in bf16 (default
dtype and device switched while the modules are created), then its parameters are overwritten with
N(0, 0.02) noise, except norm scales (1) and norm biases (0). The folder is written by diffusers'
own `WanPipeline.save_pretrained(max_shard_size=...)`, so the UMT5 encoder comes out sharded with an
index, as in the real checkpoint.

The tokenizer is the project's tiny offline T5 tokenizer (`sgl_diffusion.testing.tokenizers`): the
real UMT5 vocabulary cannot be downloaded here. Its ids fall inside the real 256384-row embedding
table and the pipeline pads to the real 512 tokens, so speed is unaffected. Outputs are noise; these
folders are for timing and memory only.

`--ti2v-vae DIR` also writes the Wan2.2 TI2V-5B VAE (`AutoencoderKLWan` with base_dim 160, decoder
base 256, z_dim 48, residual blocks, patch 2, 16x spatial / 4x temporal compression; the
latents_mean / latents_std of Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/config.json) with random bf16
weights, for decode timing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Read-only reuse of the FLUX builder's helpers (same folder).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_random_flux import check_finite_and_placed, default_dtype_and_device

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json.
TRANSFORMER_FULL: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
# google/umt5-xxl encoder, as shipped in the Wan checkpoints' text_encoder/config.json.
UMT5_FULL: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
}
# AutoencoderKLWan() defaults are the Wan2.1 VAE (base_dim 96, z_dim 16, latents mean/std).
VAE_Z16_FULL: dict[str, Any] = {}

# Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json (`clip_output: false` there is no constructor
# argument of diffusers 0.42's AutoencoderKLWan and is left out).
TI2V_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]  # fmt: skip
TI2V_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]  # fmt: skip
VAE_TI2V_FULL: dict[str, Any] = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
    "latents_mean": TI2V_LATENTS_MEAN,
    "latents_std": TI2V_LATENTS_STD,
}

# Same structure, tiny widths: only for checking this script on a CPU.
TRANSFORMER_TINY = TRANSFORMER_FULL | {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "text_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "rope_max_seq_len": 32,
}
UMT5_TINY = UMT5_FULL | {"vocab_size": 1024, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}
VAE_Z16_TINY: dict[str, Any] = {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}
VAE_TI2V_TINY = VAE_TI2V_FULL | {"base_dim": 8, "decoder_base_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}

SCHEDULER = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}

INIT_STD = 0.02


def log(message: str) -> None:
    print(f"[build_random_wan] {message}", flush=True)


def _is_norm(module: nn.Module) -> bool:
    # nn.LayerNorm / GroupNorm, diffusers' RMSNorm / FP32LayerNorm / WanRMS_norm, UMT5LayerNorm, ...
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def randomize(model: nn.Module, generator: torch.Generator, std: float = INIT_STD) -> dict[str, int]:
    """N(0, std) for every floating parameter; scale 1 / bias 0 for norm layers (the Wan VAE's
    `WanRMS_norm` calls its scale `gamma`). Returns counts of what was set, each tied parameter once."""
    counts = {"random": 0, "norm_weight": 0, "norm_bias": 0}
    seen: set[int] = set()  # tied parameters (UMT5's shared / encoder.embed_tokens) once
    for module in model.modules():
        norm = _is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point() or id(param) in seen:
                continue
            seen.add(id(param))
            if norm and name in ("weight", "gamma"):
                param.fill_(1.0)
                counts["norm_weight"] += param.numel()
            elif norm and name in ("bias", "beta"):
                param.zero_()
                counts["norm_bias"] += param.numel()
            else:
                param.normal_(0.0, std, generator=generator)
                counts["random"] += param.numel()
    return counts


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
        f"({counts['random'] / 1e9:.3f} B random, {counts['norm_weight']} norm scales = 1), "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    return model


def list_folder(out: Path) -> None:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    log(f"{out}: {len(files)} files, {total_bytes / 2**30:.2f} GiB")
    for p in files:
        if p.suffix in (".safetensors", ".json"):
            log(f"  {p.relative_to(out)}  {p.stat().st_size / 2**20:.1f} MiB")


def check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")


def write_ti2v_vae(out: Path, device: torch.device, generator: torch.Generator, tiny: bool) -> None:
    from diffusers import AutoencoderKLWan

    check_empty(out)
    cfg = VAE_TI2V_TINY if tiny else VAE_TI2V_FULL
    vae = build("ti2v_vae", lambda: AutoencoderKLWan(**cfg), device, torch.bfloat16, generator)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    for key in ("z_dim", "decoder_base_dim", "patch_size", "scale_factor_spatial", "is_residual"):
        if saved.get(key) != cfg[key]:
            raise RuntimeError(f"{out}/config.json: {key}={saved.get(key)!r}, expected {cfg[key]!r}")
    list_folder(out)
    del vae


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ti2v-vae", type=Path, default=None, help="also write the Wan2.2 TI2V-5B VAE here")
    parser.add_argument("--tiny", action="store_true", help="tiny widths, same structure (CPU smoke test)")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from sgl_diffusion.testing.tokenizers import tiny_t5_tokenizer

    out: Path = args.out_dir
    check_empty(out)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16
    transformer_cfg = TRANSFORMER_TINY if args.tiny else TRANSFORMER_FULL
    umt5_cfg = UMT5_TINY if args.tiny else UMT5_FULL
    vae_cfg = VAE_Z16_TINY if args.tiny else VAE_Z16_FULL
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()

    tokenizer = tiny_t5_tokenizer()
    if len(tokenizer) > umt5_cfg["vocab_size"]:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, more than the table's {umt5_cfg['vocab_size']}")
    log(f"tokenizer: tiny T5 with {len(tokenizer)} ids (table {umt5_cfg['vocab_size']} rows)")
    umt5_config = UMT5Config(
        **umt5_cfg,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    text_encoder = build("text_encoder", lambda: UMT5EncoderModel(umt5_config), device, dtype, generator)
    vae = build("vae", lambda: AutoencoderKLWan(**vae_cfg), device, dtype, generator)
    transformer = build("transformer", lambda: WanTransformer3DModel(**transformer_cfg), device, dtype, generator)
    scheduler = UniPCMultistepScheduler(**SCHEDULER)
    if device.type == "cuda":
        log(f"GPU memory allocated after build: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")

    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    t_save = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=args.max_shard_size)
    log(f"saved in {time.perf_counter() - t_save:.1f} s")
    if not args.tiny and not list((out / "text_encoder").glob("*.safetensors.index.json")):
        raise RuntimeError("text_encoder was not sharded; expected a *.safetensors.index.json")
    model_index = json.loads((out / "model_index.json").read_text())
    if model_index.get("_class_name") != "WanPipeline":
        raise RuntimeError(f"unexpected model_index.json: {model_index}")
    list_folder(out)
    del pipe, text_encoder, vae, transformer

    if args.ti2v_vae is not None:
        write_ti2v_vae(args.ti2v_vae, device, generator, args.tiny)
    log(f"total {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
