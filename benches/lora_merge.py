"""What a LoRA switch costs on a full-size model: read, check and merge an adapter into FLUX.1-dev's transformer, then
unmerge it, with random weights on the GPU.

The adapter is a random rank-R PEFT LoRA over every attention and feed-forward Linear of every block (what style
LoRAs touch), saved to a file and read through the engine's own path (`sgl_diffusion.lora`: diffusers' layout
conversion, the checks against the model, the exact fp32 merge in place). Rows: reading the file, merging (the
originals kept on the CPU, the fp32 sum rounded once), a forward with the adapter merged against the plain forward
(a merged adapter costs nothing per step), unmerging, and whether the base weights came back bit for bit.

    python benches/lora_merge.py --out-dir DIR [--rank 64] [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf import FLUX_CONFIG, TINY_FLUX, card_name, write_results

from sgl_diffusion.lora import MergedLoras, read_lora
from sgl_diffusion.models.flux import FluxTransformer2DModel

#: The Linears a style LoRA for FLUX.1 trains (attention and feed-forward of both block kinds).
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
           "ff_context.net.2", "proj_mlp", "proj_out")  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, (time.perf_counter() - start) * 1e3


def build(args: argparse.Namespace) -> FluxTransformer2DModel:
    config = TINY_FLUX if args.tiny else FLUX_CONFIG
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model = model.to_empty(device=args.device).to(args.dtype).eval().requires_grad_(False)
    torch.manual_seed(0)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.02)
    return model


def write_lora(model: torch.nn.Module, rank: int, path: Path) -> tuple[int, int]:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if not name.endswith(TARGETS) or getattr(module, "weight", None) is None or module.weight.ndim != 2:
            continue
        out_features, in_features = module.weight.shape
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, in_features, generator=gen) * 0.01).to(
            torch.bfloat16
        )
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(out_features, rank, generator=gen) * 0.01).to(
            torch.bfloat16
        )
    save_file(tensors, str(path))
    return len(tensors) // 2, path.stat().st_size


def inputs(model: FluxTransformer2DModel, device: torch.device, dtype: torch.dtype, tokens: int) -> dict[str, Any]:
    config = model.config
    gen = torch.Generator(device=device).manual_seed(2)
    text = 512 if tokens >= 1024 else 16
    return {
        "hidden_states": torch.randn(1, tokens, config.in_channels, generator=gen, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, text, config.joint_attention_dim, generator=gen, device=device,
                                             dtype=dtype),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=gen, device=device, dtype=dtype),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "img_ids": torch.zeros(tokens, 3, device=device),
        "txt_ids": torch.zeros(text, 3, device=device),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
    }  # fmt: skip


def forward_ms(model: torch.nn.Module, call: dict[str, Any], device: torch.device, reps: int) -> tuple[Any, float]:
    with torch.inference_mode():
        out = model(**call)
        times = [timed(lambda: model(**call), device)[1] for _ in range(reps)]
    return out, statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a tiny FLUX config (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    args.name = "lora-merge"
    model = build(args)
    path = args.out_dir / "lora.safetensors" if args.tiny else Path("/tmp/sgl-bench-lora.safetensors")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    modules, file_bytes = write_lora(model, args.rank, path)
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()} if args.tiny else None
    call = inputs(model, args.device, args.dtype, 64 if args.tiny else 4096)
    plain_out, plain_ms = forward_ms(model, call, args.device, args.reps)
    adapter, read_ms = timed(lambda: read_lora(path, "FluxPipeline"), args.device)
    merged = MergedLoras(model)
    _, merge_ms = timed(lambda: merged.merge([(adapter, 0.8)]), args.device)
    kept = sum(t.weight.numel() * t.weight.element_size() for t in merged._base.values())
    lora_out, lora_ms = forward_ms(model, call, args.device, args.reps)
    _, unmerge_ms = timed(merged.unmerge, args.device)
    back_out, _ = forward_ms(model, call, args.device, 1)
    restored = torch.equal(back_out, plain_out)
    if base is not None:
        restored = restored and all(torch.equal(t, base[n]) for n, t in model.state_dict().items())
    rows = [
        {"variant": "read + convert the file", "ms": read_ms},
        {"variant": f"merge (rank {args.rank}, {modules} Linears, strength 0.8)", "ms": merge_ms},
        {"variant": "unmerge (copy the originals back)", "ms": unmerge_ms},
        {"variant": "forward, base weights", "ms": plain_ms},
        {"variant": "forward, adapter merged", "ms": lora_ms},
    ]
    notes = [
        (
            f"LoRA file {file_bytes / 2**20:.1f} MiB; originals kept on the CPU while merged: {kept / 2**30:.2f} GiB "
            f"(in the weights' dtype, {args.dtype})."
        ),
        (
            f"The merged adapter changes the output (max abs {float((lora_out - plain_out).abs().max()):.3g}); after "
            f"unmerge the output (and, tiny: every weight) equals the base bit for bit: {restored}."
        ),
        "Reading includes the first import of diffusers' LoRA conversion (seconds, once per process).",
        f"Forward: 1 x {call['hidden_states'].shape[1]} image tokens, median of {args.reps}.",
    ]
    record: dict[str, Any] = {
        "card": card_name(args.device),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "command": "python benches/lora_merge.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "restored_bit_for_bit": restored,
    }
    write_results(args, record, rows, notes)
    json.loads((args.out_dir / "lora-merge.json").read_text())  # written whole
    if not args.tiny:
        path.unlink(missing_ok=True)
    return 0 if restored else 1


if __name__ == "__main__":
    raise SystemExit(main())
