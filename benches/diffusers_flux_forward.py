"""Times one forward of diffusers' own `FluxTransformer2DModel` (eager, bf16, random weights) on the
same card, as the reference point for our per-step time.

    python benches/diffusers_flux_forward.py --out diffusers_forward.json [--height 1024 --width 1024]
        [--text-tokens 512] [--warmup 3] [--iters 10] [--tiny --device cpu]

Shapes are those of one FLUX.1-dev denoising step at the given size without CFG: (H/16)*(W/16) image
tokens of 64 channels, 512 T5 tokens of 4096, the pooled CLIP vector, timestep and guidance. Timed with
CUDA events after warm-up; the median is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_random_flux import FULL, TINY, build


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

    import diffusers
    from diffusers import FluxTransformer2DModel

    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = (TINY if args.tiny else FULL)["transformer"]
    gen = torch.Generator(device=device).manual_seed(0)
    model = build("transformer", lambda: FluxTransformer2DModel(**cfg), device, dtype, gen)

    h, w = args.height // 16, args.width // 16
    n_img, n_txt = h * w, args.text_tokens
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, n_img, cfg["in_channels"], device=device, dtype=dtype, generator=gen),
        "encoder_hidden_states": torch.randn(
            1, n_txt, cfg["joint_attention_dim"], device=device, dtype=dtype, generator=gen
        ),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype, generator=gen),
        "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
        "guidance": torch.full((1,), 3.5, device=device, dtype=torch.float32),
        "img_ids": img_ids.reshape(n_img, 3),
        "txt_ids": torch.zeros(n_txt, 3, device=device),
        "return_dict": False,
    }

    def forward() -> torch.Tensor:
        return model(**inputs)[0]

    out = forward()
    if not bool(torch.isfinite(out).all()):
        print("[diffusers] warning: non-finite output (random weights)", flush=True)
    for _ in range(args.warmup):
        forward()
    times = []
    cuda = device.type == "cuda"
    for _ in range(args.iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            forward()
            times.append((time.perf_counter() - t) * 1000)
    record = {
        "what": "diffusers FluxTransformer2DModel forward, eager, bf16, random weights, batch 1",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "image_tokens": n_img,
        "text_tokens": n_txt,
        "warmup": args.warmup,
        "forward_ms": times,
        "median_ms": statistics.median(times),
        "sdpa_backends_enabled": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        },
        "peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(
        f"[diffusers] {n_img}+{n_txt} tokens: median forward {record['median_ms']:.1f} ms over {args.iters}", flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
