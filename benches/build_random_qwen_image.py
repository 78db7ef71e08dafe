"""Writes a Qwen-Image pipeline folder in diffusers layout with random bf16 weights at full size.

    python benches/build_random_qwen_image.py OUT_DIR [--device cuda] [--max-shard-size 5GB] [--seed 0]
    python benches/build_random_qwen_image.py OUT_DIR --tiny --device cpu     # smoke test of this script

Every model takes the real Qwen/Qwen-Image config: the transformer (20.43 B parameters, 38.1 GiB in bf16),
the text encoder `Qwen2_5_VLForConditionalGeneration` at Qwen2.5-VL-7B's size (8.29 B parameters with its
vision tower and LM head, 15.4 GiB; the pipeline runs only its text model), the Wan-style VAE
(`AutoencoderKLQwenImage` defaults = the checkpoint's config) and the checkpoint's scheduler config. As in
`build_random_flux.py`, models are built directly on `--device` in bf16, filled with N(0, 0.02) noise (norm
weights 1, biases 0) and written with `save_pretrained(max_shard_size=...)` as sharded safetensors.

Disk. The full folder is about 53.7 GiB; a GPU box of 64 GiB disk may have less free. Before anything is
built, the free space of OUT_DIR's file system is checked against the folder's size (computed on the meta
device) plus `--margin-gib`. If it does not fit, the text encoder keeps its real widths and vocabulary but
gets fewer decoder layers (28 -> N, about 0.43 GiB each) until it fits; `bench_folder.json` in the folder
records that, and perf.py's qwen-e2e prints it in its notes (the text encoder is ~2 % of a 50-step request:
SGLang's H100 baseline spends 232 of 12 799 ms there). `--text-encoder-layers N` forces a layer count;
`--no-fit-disk` fails instead of shrinking. If even the transformer does not fit, it fails.

Tokenizer: the project's offline fixture tokenizer (`sgl_diffusion.testing.qwen_image.qwen_image_tokenizer`,
byte-level BPE with Qwen2's pre-tokenizer, learned so that the chat template splits exactly where the
pipeline's 34-token crop expects); the real 151 k vocabulary cannot be downloaded here. The embedding table
and LM head keep the real 152 064 rows (the fixture's ids fall inside it), and the config names the
fixture's special-token ids. The prompt's token count differs somewhat from the real tokenizer's (words of
the fixture corpus are one token each, others split into bytes); perf.py reports the text lengths it ran.
The images are noise; this folder is for timing and memory only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_random_flux import build  # a sibling script: same random init and checks

# Qwen/Qwen-Image transformer/config.json (also diffusers' defaults).
TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# Qwen/Qwen-Image text_encoder/config.json = Qwen2.5-VL-7B-Instruct's architecture.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"mrope_section": [16, 24, 24], "rope_type": "default", "rope_theta": 1000000.0},
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "in_channels": 3,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "hidden_act": "silu",
}
# Same structure, tiny widths: only for checking this script on a CPU.
TINY_TRANSFORMER = TRANSFORMER | {
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "axes_dims_rope": (8, 4, 4),
}
TINY_TEXT = TEXT_CONFIG | {
    "vocab_size": 1024,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_parameters": {"mrope_section": [1, 1, 2], "rope_type": "default", "rope_theta": 1000000.0},
}
TINY_VISION = VISION_CONFIG | {
    "depth": 2,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_heads": 2,
    "out_hidden_size": 16,
    "fullatt_block_indexes": [1],
}
TINY_VAE: dict[str, Any] = {"base_dim": 8, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1}

#: What the build wrote besides the diffusers files: how it differs from the real checkpoint, if at all.
NOTE_FILE = "bench_folder.json"
GIB = 2**30


def log(message: str) -> None:
    print(f"[build_random_qwen_image] {message}", flush=True)


def text_encoder_config(tokenizer: Any, text: dict[str, Any], vision: dict[str, Any], layers: int) -> Any:
    """Qwen2.5-VL's config at the given sizes, naming the fixture tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    def token_id(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    return Qwen2_5_VLConfig(
        text_config=text
        | {
            "num_hidden_layers": layers,
            "bos_token_id": token_id("<|endoftext|>"),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=vision,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )


def bf16_bytes(factory: Any) -> int:
    """Bytes of a model's parameters in bf16, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = factory()
    return 2 * sum(p.numel() for p in model.parameters())


def free_bytes(path: Path) -> int:
    """Free space of the file system that will hold `path` (its nearest existing ancestor)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny widths, same structure (CPU smoke test)")
    parser.add_argument("--text-encoder-layers", type=int, help="decoder layers of the text encoder (default: 28, "
                        "or fewer when the folder would not fit the disk)")  # fmt: skip
    parser.add_argument("--no-fit-disk", dest="fit_disk", action="store_false",
                        help="fail rather than shrink the text encoder when the folder does not fit")  # fmt: skip
    parser.add_argument("--margin-gib", type=float, default=2.0, help="disk space to leave free")
    args = parser.parse_args(argv)

    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sgl_diffusion.testing.qwen_image import SCHEDULER_CONFIG, qwen_image_tokenizer

    out: Path = args.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    dtype = torch.bfloat16
    transformer_cfg = TINY_TRANSFORMER if args.tiny else TRANSFORMER
    text_cfg, vision_cfg = (TINY_TEXT, TINY_VISION) if args.tiny else (TEXT_CONFIG, VISION_CONFIG)
    vae_cfg = TINY_VAE if args.tiny else {}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()

    tokenizer = qwen_image_tokenizer()
    if len(tokenizer) > text_cfg["vocab_size"]:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} ids, more than the table's {text_cfg['vocab_size']}")
    log(f"tokenizer: fixture Qwen2 BPE, {len(tokenizer)} ids; embedding table {text_cfg['vocab_size']} rows")

    def text_encoder(layers: int) -> Any:
        config = text_encoder_config(tokenizer, text_cfg, vision_cfg, layers)
        return lambda: Qwen2_5_VLForConditionalGeneration(config)

    # Disk: the folder's size from meta-device counts, against the free space, before anything is built.
    full_layers = text_cfg["num_hidden_layers"]
    layers = args.text_encoder_layers or full_layers
    fixed = bf16_bytes(lambda: QwenImageTransformer2DModel(**transformer_cfg))
    fixed += bf16_bytes(lambda: AutoencoderKLQwenImage(**vae_cfg))
    encoder_bytes = bf16_bytes(text_encoder(layers))
    free, margin = free_bytes(out), int(args.margin_gib * GIB)
    log(f"needs {(fixed + encoder_bytes) / GIB:.2f} GiB (text encoder {encoder_bytes / GIB:.2f} GiB, {layers} layers); "
        f"{free / GIB:.2f} GiB free at {out}")  # fmt: skip
    if fixed + encoder_bytes + margin > free:
        if not args.fit_disk or args.text_encoder_layers:
            raise RuntimeError(f"the folder ({(fixed + encoder_bytes) / GIB:.1f} GiB + {args.margin_gib} GiB margin) "
                               f"does not fit the {free / GIB:.1f} GiB free at {out}")  # fmt: skip
        per_layer = (encoder_bytes - bf16_bytes(text_encoder(0))) / full_layers
        room = free - margin - fixed - bf16_bytes(text_encoder(0))
        layers = int(room // per_layer)
        if layers < 1:
            raise RuntimeError(f"not even the transformer and a 1-layer text encoder fit the {free / GIB:.1f} GiB "
                               f"free at {out}; free some disk or choose another --work-dir")  # fmt: skip
        log(f"shrinking the text encoder to {layers} of {full_layers} decoder layers to fit the disk")
    note = {
        "text_encoder_layers": layers,
        "text_encoder_layers_real": full_layers,
        "tokenizer": f"fixture Qwen2 BPE ({len(tokenizer)} ids), not the real Qwen2.5-VL tokenizer",
        "free_gib_before": round(free / GIB, 2),
    }

    encoder = build("text_encoder", text_encoder(layers), device, dtype, generator)
    vae = build("vae", lambda: AutoencoderKLQwenImage(**vae_cfg), device, dtype, generator)
    transformer = build("transformer", lambda: QwenImageTransformer2DModel(**transformer_cfg), device, dtype,
                        generator)  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    if device.type == "cuda":
        log(f"GPU memory allocated after build: {torch.cuda.memory_allocated(device) / GIB:.2f} GiB")

    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer, transformer=transformer
    )
    t_save = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True, max_shard_size=args.max_shard_size)
    (out / NOTE_FILE).write_text(json.dumps(note, indent=1) + "\n")
    save_s = time.perf_counter() - t_save

    files = sorted(p for p in out.rglob("*") if p.is_file())
    total_bytes = sum(p.stat().st_size for p in files)
    model_index = json.loads((out / "model_index.json").read_text())
    if model_index.get("_class_name") != "QwenImagePipeline":
        raise RuntimeError(f"unexpected model_index.json: {model_index}")
    log(f"saved {len(files)} files, {total_bytes / GIB:.2f} GiB, in {save_s:.1f} s")
    for p in files:
        if p.suffix in (".safetensors", ".json") and p.stat().st_size > 2**20:
            log(f"  {p.relative_to(out)}  {p.stat().st_size / 2**20:.1f} MiB")
    log(f"total {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
