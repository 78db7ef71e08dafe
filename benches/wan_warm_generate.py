"""Loads a Wan folder once with `DiffGenerator` and generates a video several times in the same process.

    python benches/wan_warm_generate.py MODEL_DIR --out perf.json [--runs 2] [--height 480 --width 832]
        [--num-frames 81] [--steps 4] [--guidance-scale 5.0] [--negative-prompt blurry] [--seed 0]
        [--device cuda] [--precision bf16]

Run 0 is the warm-up (cuDNN / cuBLAS handles, allocator growth, first-call kernel selection); the CLI
`generate` only ever shows such a cold run. The JSON holds the load time, every run's perf record (as
`--perf-dump-path` writes it) and wall time, and the process-wide CUDA memory figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--num-frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--negative-prompt", default="blurry")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--prompt", default="a photo of a red fox sitting in fresh snow, golden hour")
    args = parser.parse_args(argv)

    import sgl_diffusion
    from sgl_diffusion import DiffGenerator

    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    gen = DiffGenerator.from_pretrained(
        args.model_dir, device=args.device, dit_precision=args.precision, vae_precision=args.precision
    )
    load_s = time.perf_counter() - t0
    print(f"[warm] loaded {args.model_dir} in {load_s:.1f} s", flush=True)
    after_load_mb = torch.cuda.memory_allocated() / 2**20 if cuda else None

    runs = []
    try:
        for i in range(args.runs):
            start = time.perf_counter()
            res = gen.generate(
                args.prompt,
                negative_prompt=args.negative_prompt,
                height=args.height,
                width=args.width,
                num_frames=args.num_frames,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                output_type="np",
            )
            wall_ms = (time.perf_counter() - start) * 1000
            video = res.frames[0]
            steps = [s["duration_ms"] for s in res.timings["denoise_steps_ms"]]
            stages = {s["name"]: round(s["duration_ms"], 1) for s in res.timings["steps"]}
            print(
                f"[warm] run {i}: wall {wall_ms:.0f} ms, perf total {res.timings['total_duration_ms']:.0f} ms, "
                f"median step {statistics.median(steps):.1f} ms, peak {res.timings['peak_memory_mb']:.0f} MB, "
                f"stages {stages}, video {video.shape} {video.dtype} finite={bool(np.isfinite(video).all())} "
                f"mean={float(video.mean()):.3f}",
                flush=True,
            )
            runs.append({"run": i, "warmup": i == 0, "wall_ms": wall_ms, "perf": res.timings, "notes": res.notes})
    finally:
        gen.shutdown()

    record = {
        "model_dir": str(args.model_dir),
        "sgl_diffusion_version": sgl_diffusion.__version__,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "request": {
            "prompt": args.prompt,
            "negative_prompt": args.negative_prompt,
            "height": args.height,
            "width": args.width,
            "num_frames": args.num_frames,
            "num_inference_steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "seed": args.seed,
            "precision": args.precision,
        },
        "load_s": load_s,
        "allocated_after_load_mb": after_load_mb,
        # The engine resets CUDA's peak counters at the start of each batch: these are the last run's.
        "cuda_max_allocated_mb_last_run": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "cuda_max_reserved_mb_last_run": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"[warm] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
