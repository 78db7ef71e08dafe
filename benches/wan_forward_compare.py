"""One Wan transformer forward, ours against diffusers', on the same weights (a folder's `transformer/`).

    python benches/wan_forward_compare.py MODEL_DIR --out forward.json [--height 480 --width 832
        --num-frames 81] [--warmup 2] [--runs 5] [--device cuda] [--tiny]

Both models are loaded in bf16 from MODEL_DIR/transformer (ours with `load_native_model`, as the
pipeline does; diffusers' `WanTransformer3DModel.from_pretrained(torch_dtype=bfloat16)`, which keeps its
fp32 modules in fp32 as ours does) and run on the same random latent (1, 16, F, H/8, W/8) bf16, 512
text tokens and timestep 999, eager, batch 1 (one CFG branch). Times are CUDA-event medians after the
warm-ups; the record also holds the relative difference between the two outputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


def time_forward(fn: Any, warmup: int, runs: int, device: torch.device) -> tuple[list[float], torch.Tensor, float]:
    with torch.no_grad():
        for _ in range(warmup):
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1000)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return times, out.float(), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small latent (CPU smoke test)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.height, args.width, args.num_frames, args.text_tokens = 32, 32, 5, 16

    import diffusers
    from diffusers import WanTransformer3DModel as DiffusersWan

    from sgl_diffusion.loading import load_native_model
    from sgl_diffusion.models.wan import WanTransformer3DModel as OurWan

    device = torch.device(args.device)
    dtype = torch.bfloat16
    folder = args.model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    frames = (args.num_frames - 1) // 4 + 1
    shape = (1, config["in_channels"], frames, args.height // 8, args.width // 8)
    tokens = frames * (args.height // 16) * (args.width // 16)
    gen = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(shape, generator=gen).to(device, dtype)
    text = (torch.randn(1, args.text_tokens, config["text_dim"], generator=gen) * 0.1).to(device, dtype)
    timestep = torch.full((1,), 999, dtype=torch.long, device=device)
    record: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "latent_shape": list(shape),
        "video_tokens": tokens,
        "text_tokens": args.text_tokens,
        "warmup": args.warmup,
    }

    ours = load_native_model(lambda cfg: OurWan.from_config(cfg), folder, device, dtype)
    ours_ms, ours_out, ours_peak = time_forward(
        lambda model=ours: model(latents, timestep, text), args.warmup, args.runs, device
    )
    del ours
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record["ours"] = {"forward_ms": ours_ms, "median_ms": statistics.median(ours_ms), "peak_mb": ours_peak}
    print(f"[forward] ours: median {statistics.median(ours_ms):.1f} ms {[round(t, 1) for t in ours_ms]}", flush=True)

    theirs = DiffusersWan.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
    theirs_ms, theirs_out, theirs_peak = time_forward(
        lambda: theirs(latents, timestep, text, return_dict=False)[0], args.warmup, args.runs, device
    )
    record["diffusers_eager"] = {
        "forward_ms": theirs_ms,
        "median_ms": statistics.median(theirs_ms),
        "peak_mb": theirs_peak,
    }
    print(
        f"[forward] diffusers {diffusers.__version__} eager: median {statistics.median(theirs_ms):.1f} ms "
        f"{[round(t, 1) for t in theirs_ms]}",
        flush=True,
    )
    rel = float((ours_out - theirs_out).norm() / theirs_out.norm().clamp_min(1e-12))
    record["relative_l2_difference"] = rel
    record["outputs_finite"] = bool(torch.isfinite(ours_out).all() and torch.isfinite(theirs_out).all())
    print(f"[forward] {tokens} video tokens; relative L2 difference ours vs diffusers: {rel:.2e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"[forward] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
