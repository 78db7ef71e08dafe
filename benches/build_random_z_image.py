"""Writes a Z-Image-Turbo pipeline folder in diffusers layout with random bf16 weights at full size.

    python benches/build_random_z_image.py OUT_DIR [--device cuda] [--max-shard-size 5GB] [--seed 0]
    python benches/build_random_z_image.py OUT_DIR --tiny --device cpu     # smoke test of this script

Every model takes the real Tongyi-MAI/Z-Image-Turbo config: the transformer (`ZImageTransformer2DModel`, 6.15 B
parameters, 11.5 GiB in bf16), the text encoder `Qwen3Model` at Qwen3-4B's size (4.02 B parameters, 7.5 GiB;
the pipeline reads its second-to-last hidden states), the FLUX VAE (`AutoencoderKL`, 16 latent channels) and the
checkpoint's scheduler config (flow-match Euler, static shift 3). As in `build_random_flux.py`, models are built
directly on `--device` in bf16, filled with N(0, 0.02) noise (norm weights 1, biases 0; the pad tokens are
ordinary parameters and get noise too) and written with `save_pretrained(max_shard_size=...)` as sharded
safetensors. The whole folder is about 19 GiB.

Tokenizer: the project's offline fixture tokenizer (`sgl_diffusion.testing.z_image.z_image_tokenizer`, byte-level
BPE with Qwen2's pre-tokenizer and a Qwen3 chat template); the real 151 k vocabulary cannot be downloaded here.
The embedding table keeps the real 151 936 rows (the fixture's ids fall inside it). The prompt's token count
differs somewhat from the real tokenizer's; perf.py reports the caption length it ran. The images are noise;
this folder is for timing and memory only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_random_flux import FULL as FLUX_FULL  # a sibling script: the FLUX VAE config, same random init
from build_random_flux import TINY as FLUX_TINY
from build_random_flux import build

# Tongyi-MAI/Z-Image-Turbo transformer/config.json.
TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    # Only sizes the RoPE tables (positions up to these); a 1024² image and a 512-token prompt use far less.
    "axes_lens": [1536, 512, 512],
}
# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json = Qwen3-4B's architecture.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}
# Same structure, tiny widths: only for checking this script (and perf.py's zimage-e2e) on a CPU.
TINY_TRANSFORMER = TRANSFORMER | {
    "dim": 32,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "cap_feat_dim": 16,
    "axes_dims": [8, 4, 4],
    "axes_lens": [256, 32, 32],
}
TINY_TEXT = TEXT_CONFIG | {
    "vocab_size": 1024,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 2048,
}

GIB = 2**30


def log(message: str) -> None:
    print(f"[build_random_z_image] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, same structure (CPU smoke test)")
    args = parser.parse_args(argv)

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from sgl_diffusion.testing.z_image import SCHEDULER_CONFIG, z_image_tokenizer

    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16
    transformer_cfg = TINY_TRANSFORMER if args.tiny else TRANSFORMER
    text_cfg = TINY_TEXT if args.tiny else TEXT_CONFIG
    vae_cfg = (FLUX_TINY if args.tiny else FLUX_FULL)["vae"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()

    tokenizer = z_image_tokenizer()
    if len(tokenizer) > text_cfg["vocab_size"]:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} ids, more than the table's {text_cfg['vocab_size']}")
    log(f"tokenizer: fixture Qwen3 BPE, {len(tokenizer)} ids; embedding table {text_cfg['vocab_size']} rows")
    text_config = Qwen3Config(
        **text_cfg,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    encoder = build("text_encoder", lambda: Qwen3Model(text_config), device, dtype, generator)
    vae = build("vae", lambda: AutoencoderKL(**vae_cfg), device, dtype, generator)
    transformer = build("transformer", lambda: ZImageTransformer2DModel(**transformer_cfg), device, dtype, generator)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    if device.type == "cuda":
        log(f"GPU memory allocated after build: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB")

    pipe = ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer
    )
    t_save = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=args.max_shard_size)
    save_s = time.perf_counter() - t_save

    files = sorted(p for p in out.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    model_index = json.loads((out / "model_index.json").read_text())
    if model_index.get("_class_name") != "ZImagePipeline":
        raise RuntimeError(f"unexpected model_index.json: {model_index}")
    log(f"saved {len(files)} files, {total_bytes / GIB:.2f} GiB, in {save_s:.1f} s")
    for p in files:
        if p.suffix in (".safetensors", ".json") and p.stat().st_size > 2**20:
            log(f"  {p.relative_to(out)}  {p.stat().st_size / 2**20:.1f} MiB")
    log(f"total {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
