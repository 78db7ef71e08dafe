"""Times diffusers' `AutoencoderKLWan.decode` (what our Wan pipeline's `decoding` stage calls) on random
latents: the Wan2.1 z16 VAE at 832x480x81 frames (fp32 and bf16) and the Wan2.2 TI2V-5B z48 VAE at
1280x704x121 frames (bf16).

    python benches/wan_vae_decode.py --z16 MODEL_DIR/vae --z48 TI2V_VAE_DIR --out vae.json [--runs 3]
    python benches/wan_vae_decode.py --z16 DIR --z48 DIR --out vae.json --tiny --device cpu   # smoke test

Each case loads the VAE from its folder in the case's dtype, decodes once as a warm-up, then `--runs`
times, each timed with CUDA events; the reported time is the median. Peak memory is
`torch.cuda.max_memory_allocated` during one decode (counters reset before it; the VAE's weights
included). A case whose warm-up takes longer than `--slow-s` is timed once more only; one that runs out
of memory is retried with fewer frames (`--fallback-frames`) and the record says so.
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def latent_shape(z: int, spatial: int, temporal: int, height: int, width: int, frames: int) -> tuple[int, ...]:
    return (1, z, (frames - 1) // temporal + 1, height // spatial, width // spatial)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_once(vae: Any, latents: torch.Tensor, device: torch.device) -> tuple[float, float | None, tuple, bool]:
    """One decode: (ms, peak MiB, output shape, finite)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        video = vae.decode(latents, return_dict=False)[0]
        end.record()
        torch.cuda.synchronize(device)
        ms = start.elapsed_time(end)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        t0 = time.perf_counter()
        video = vae.decode(latents, return_dict=False)[0]
        ms = (time.perf_counter() - t0) * 1000
        peak = None
    shape, finite = tuple(video.shape), bool(torch.isfinite(video).all())
    del video
    return ms, peak, shape, finite


@torch.no_grad()
def run_case(
    name: str, folder: Path, precision: str, size: tuple[int, int, int], args: argparse.Namespace
) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan

    device = torch.device(args.device)
    dtype = DTYPES[precision]
    height, width, frames = size
    vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype).to(device).eval()
    cfg = vae.config
    sync(device)
    weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    record: dict[str, Any] = {
        "name": name,
        "folder": str(folder),
        "precision": precision,
        "z_dim": cfg.z_dim,
        "decoder_base_dim": cfg.decoder_base_dim or cfg.base_dim,
        "params_m": sum(p.numel() for p in vae.parameters()) / 1e6,
        "weights_allocated_mb": weights_mb,
    }
    for attempt_frames in [frames, *([args.fallback_frames] if args.fallback_frames < frames else [])]:
        shape = latent_shape(
            cfg.z_dim, cfg.scale_factor_spatial, cfg.scale_factor_temporal, height, width, attempt_frames
        )
        gen = torch.Generator(device="cpu").manual_seed(0)
        latents = torch.randn(shape, generator=gen).to(device, dtype)
        record.update(height=height, width=width, frames=attempt_frames, latent_shape=list(shape))
        if attempt_frames != frames:
            record["fallback"] = f"{frames} frames failed ({record.pop('error')}); retried with {attempt_frames}"
        try:
            t0 = time.perf_counter()
            warm_ms, warm_peak, out_shape, finite = decode_once(vae, latents, device)
            warm_wall = time.perf_counter() - t0
            runs = args.runs if warm_wall <= args.slow_s else 1
            times, peaks = [], []
            for _ in range(runs):
                ms, peak, out_shape, finite = decode_once(vae, latents, device)
                times.append(ms)
                peaks.append(peak)
            record.update(
                warmup_ms=warm_ms,
                warmup_peak_mb=warm_peak,
                decode_ms=times,
                median_ms=statistics.median(times),
                peak_mb=max(peaks) if peaks[0] is not None else None,
                output_shape=list(out_shape),
                output_finite=finite,
            )
            if runs < args.runs:
                record["note"] = f"warm-up took {warm_wall:.0f} s > {args.slow_s} s: timed {runs} run(s) only"
            break
        except torch.OutOfMemoryError as err:
            record["error"] = f"OutOfMemoryError: {str(err).splitlines()[0]}"
        finally:
            del latents
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(
        f"[vae] {name} {precision} {record.get('latent_shape')} -> {record.get('output_shape')}: "
        f"median {record.get('median_ms', float('nan')):.1f} ms over {record.get('decode_ms')}, "
        f"warm-up {record.get('warmup_ms', float('nan')):.1f} ms, peak {record.get('peak_mb')} MiB, "
        f"finite {record.get('output_finite')} {record.get('note', '')} {record.get('error', '')}",
        flush=True,
    )
    del vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--z16", type=Path, required=True, help="Wan2.1 VAE folder (MODEL_DIR/vae)")
    parser.add_argument("--z48", type=Path, default=None, help="Wan2.2 TI2V-5B VAE folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--slow-s", type=float, default=45.0)
    parser.add_argument("--fallback-frames", type=int, default=81, help="z48 frames to retry with after an OOM")
    parser.add_argument("--z16-precisions", default="fp32,bf16")
    parser.add_argument("--tiny", action="store_true", help="small frames (CPU smoke test)")
    args = parser.parse_args(argv)

    z16_size = (64, 64, 5) if args.tiny else (480, 832, 81)
    z48_size = (64, 64, 5) if args.tiny else (704, 1280, 121)
    if args.tiny:
        args.fallback_frames = min(args.fallback_frames, 5)
    cases = []
    for precision in args.z16_precisions.split(","):
        cases.append(run_case("wan21_vae_z16", args.z16, precision, z16_size, args))
    if args.z48 is not None:
        cases.append(run_case("wan22_ti2v5b_vae_z48", args.z48, "bf16", z48_size, args))
    record = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "runs": args.runs,
        "cases": cases,
    }
    import diffusers

    record["diffusers"] = diffusers.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"[vae] wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
