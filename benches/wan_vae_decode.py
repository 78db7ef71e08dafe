"""Times Wan VAE decoding: diffusers' `AutoencoderKLWan.decode` (fp32 and bf16) against our whole-clip
decoder `sgl_diffusion.models.wan.vae.WanVAEDecoder` (bf16 channels-last, with and without
`torch.backends.cudnn.benchmark`, plus variants), on the full-size Wan2.1 VAE (diffusers' default config)
with random weights built on the GPU, decoding random latents for 832x480x81 (z (1, 16, 21, 60, 104)).

    python benches/wan_vae_decode.py --out vae.json [--runs 3] [--z48] [--profile]
    python benches/wan_vae_decode.py --out vae.json --tiny --device cpu   # smoke test (tiny widths)

`--z48` adds the Wan2.2 TI2V-5B VAE (z48, decoder base 256, residual blocks, patch 2) at 1280x704x121
(z (1, 48, 31, 44, 80)). `--vae-dir` / `--z48-dir` load real weights from a diffusers `vae/` folder instead.

Weights: `build_random_wan.build` (same folder): N(0, 0.02), norm scales 1, created on `--device` in fp32;
the bf16 models are casts of the same weights, and ours shares the diffusers model's tensors
(`WanVAEDecoder.from_diffusers`). Each timing is one warm-up then the median of `--runs` runs, each timed
with CUDA events; a variant whose warm-up takes longer than `--slow-s` is timed once more only. Memory:
`peak_mb` is `torch.cuda.max_memory_allocated` during one decode minus what was allocated before it, plus
the decoded model's weights (comparable to a process holding only that model). Quality: PSNR (range
[-1, 1], peak-to-peak 2) and max abs difference of each output against diffusers' fp32 output.

Robustness: a watchdog (`faulthandler`) dumps the stacks and exits after `--timeout-s` (a hang fails
loudly); variants are skipped once the remaining time is short; an out-of-memory variant is recorded
(ours then retries with `--fallback-chunk` latent frames per chunk). The JSON is rewritten after each
variant, so a partial run still leaves its numbers. One JSON summary line is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_random_wan import VAE_TI2V_FULL, VAE_TI2V_TINY, VAE_Z16_FULL, VAE_Z16_TINY, build

START = time.perf_counter()


def log(message: str) -> None:
    print(f"[vae {time.perf_counter() - START:6.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf


def weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = START + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def time_decode(
    fn: Callable[[], torch.Tensor], device: torch.device, runs: int, slow_s: float
) -> tuple[dict[str, Any], torch.Tensor]:
    """Warm-up, then `runs` timed calls (one if the warm-up was slow). Returns (record, last output)."""
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    warm_s = time.perf_counter() - t0
    del out
    free(device)
    n = runs if warm_s <= slow_s else 1
    times, peaks = [], []
    for _ in range(n):
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
            peaks.append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
        else:
            t1 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t1) * 1000)
        if _ < n - 1:
            del out
    record: dict[str, Any] = {
        "warmup_ms": warm_s * 1000,
        "times_ms": times,
        "median_ms": statistics.median(times),
        "peak_over_start_mb": max(peaks) if peaks else None,
        "output_shape": list(out.shape),
        "output_finite": bool(torch.isfinite(out).all()),
    }
    if n < runs:
        record["note"] = f"warm-up took {warm_s:.0f} s > {slow_s} s: timed once"
    return record, out


def build_vae(
    config: dict[str, Any], folder: Path | None, device: torch.device, seed: int
) -> tuple[torch.nn.Module, str]:
    from diffusers import AutoencoderKLWan

    if folder is not None:
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=torch.float32).to(device).eval()
        return vae.requires_grad_(False), f"weights from {folder}"
    gen = torch.Generator(device=device).manual_seed(seed)
    vae = build("vae", lambda: AutoencoderKLWan(**config), device, torch.float32, gen)
    return vae, "random N(0, 0.02) weights, norm scales 1"


def run_family(name: str, args: argparse.Namespace, results: dict[str, Any], budget: Budget) -> None:
    from sgl_diffusion.models.wan.vae import WanVAEDecoder

    device = torch.device(args.device)
    tiny = args.tiny
    z48 = name != "wan21_z16"
    if not z48:
        config, folder, size = (VAE_Z16_TINY if tiny else VAE_Z16_FULL), args.vae_dir, (480, 832, 81)
    else:
        config, folder, size = (VAE_TI2V_TINY if tiny else VAE_TI2V_FULL), args.z48_dir, (704, 1280, 121)
    if tiny:
        size = (64, 64, 9)
    vae32, weights = build_vae(config, folder, device, args.seed)
    cfg = vae32.config
    height, width, frames = size
    shape = (
        1,
        cfg.z_dim,
        (frames - 1) // cfg.scale_factor_temporal + 1,
        height // cfg.scale_factor_spatial,
        width // cfg.scale_factor_spatial,
    )
    z32 = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    family: dict[str, Any] = {
        "weights": weights,
        "config": {k: v for k, v in dict(cfg).items() if k not in ("latents_mean", "latents_std")},
        "params_m": sum(p.numel() for p in vae32.parameters()) / 1e6,
        "decoder_params_m": sum(p.numel() for n, p in vae32.named_parameters() if not n.startswith(("encoder", "quant"))) / 1e6,
        "latent_shape": list(shape),
        "video": f"{width}x{height}x{frames}",
        "variants": {},
    }  # fmt: skip
    results["families"][name] = family
    variants = family["variants"]
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    z16 = z32.to(torch.bfloat16)
    ref: torch.Tensor | None = None
    ref_bf16: torch.Tensor | None = None

    def record(
        key: str, model: torch.nn.Module, fn: Callable[[], torch.Tensor], runs: int | None = None, **extra: Any
    ) -> torch.Tensor | None:
        if budget.left() < args.min_left_s:
            variants[key] = {"skipped": f"less than {args.min_left_s} s of the --timeout-s budget left"}
            log(f"{name} {key}: skipped (time budget)")
            return None
        try:
            rec, out = time_decode(fn, device, runs or args.runs, args.slow_s)
        except torch.OutOfMemoryError as err:
            variants[key] = {"error": f"OutOfMemoryError: {str(err).splitlines()[0]}", **extra}
            log(f"{name} {key}: out of memory")
            free(device)
            return None
        rec.update(extra)
        if rec["peak_over_start_mb"] is not None:
            rec["model_weights_mb"] = weights_mb(model)
            rec["peak_mb"] = rec["peak_over_start_mb"] + rec["model_weights_mb"]
        if ref is not None:
            rec["psnr_vs_diffusers_fp32_db"] = psnr(out, ref)
            rec["max_abs_vs_diffusers_fp32"] = (out.float() - ref).abs().max().item()
        if ref_bf16 is not None and out.dtype == torch.bfloat16:
            rec["max_abs_vs_diffusers_bf16"] = (out.float() - ref_bf16.float()).abs().max().item()
        variants[key] = rec
        log(
            f"{name} {key}: median {rec['median_ms']:.1f} ms {[round(t, 1) for t in rec['times_ms']]}, "
            f"warm-up {rec['warmup_ms']:.0f} ms, peak {rec.get('peak_mb') or 0:.0f} MiB, "
            f"PSNR {rec.get('psnr_vs_diffusers_fp32_db', float('nan')):.1f} dB {rec.get('note', '')}"
        )
        write(args.out, results)
        return out

    torch.backends.cudnn.benchmark = False
    # The z48 fp32 reference is slow (~2x its bf16 decode): timed once, it is mainly the PSNR reference.
    ref32 = record("diffusers_fp32", vae32, lambda: vae32.decode(z32, return_dict=False)[0], runs=1 if z48 else None)
    ref = None if ref32 is None else ref32.float()
    ref_bf16 = record("diffusers_bf16", vae16, lambda: vae16.decode(z16, return_dict=False)[0])

    ours16 = WanVAEDecoder.from_diffusers(vae16)
    family["ours_fused_kernels"] = ours16.uses_fused_kernels()

    def ours_variant(key: str, model: WanVAEDecoder, z: torch.Tensor, benchmark: bool, chunk: int | None = None,
                     **attrs: Any) -> None:  # fmt: skip
        defaults = {a: getattr(model, a) for a in attrs}
        for a, v in attrs.items():
            setattr(model, a, v)
        torch.backends.cudnn.benchmark = benchmark
        try:
            settings = {"cudnn_benchmark": benchmark, "temporal_chunk": chunk, **attrs}
            out = record(key, model, lambda: model.decode(z, temporal_chunk=chunk), **settings)
            if out is None and "error" in variants.get(key, {}) and chunk is None and args.fallback_chunk:
                log(f"{name} {key}: retrying with temporal_chunk={args.fallback_chunk}")
                settings["temporal_chunk"] = args.fallback_chunk
                settings["fallback"] = "whole clip ran out of memory"
                record(key + "_chunked", model, lambda: model.decode(z, temporal_chunk=args.fallback_chunk), **settings)
        finally:
            for a, v in defaults.items():
                setattr(model, a, v)
            torch.backends.cudnn.benchmark = False
        free(device)

    ours_variant("ours_bf16", ours16, z16, benchmark=False)
    ours_variant("ours_bf16_cudnn_benchmark", ours16, z16, benchmark=True)
    if args.profile and device.type == "cuda":
        profile(ours16, z16, family)
    if not args.quick and not (z48 and not args.full_z48):
        ours_variant("ours_bf16_cudnn_benchmark_nearest", ours16, z16, True, upsample_mode="nearest")
        # Unsplit convs over 2**31 elements need cuDNN >= 9.3 (else PyTorch falls back to a very slow kernel).
        if device.type != "cuda" or (torch.backends.cudnn.version() or 0) >= 90300:
            ours_variant("ours_bf16_cudnn_benchmark_unsplit_convs", ours16, z16, True, max_conv_numel=2**62)
        if family["ours_fused_kernels"]:
            ours_variant("ours_bf16_cudnn_benchmark_torch_rows", ours16, z16, True, fused_kernels=False)
        ours_variant(f"ours_bf16_cudnn_benchmark_chunk{args.chunk}", ours16, z16, True, chunk=args.chunk)
        ours32 = WanVAEDecoder.from_diffusers(vae32)
        ours_variant("ours_fp32_cudnn_benchmark", ours32, z32, benchmark=True)
    family["summary"] = summarize(variants)


def summarize(variants: dict[str, Any]) -> dict[str, Any]:
    fp32 = variants.get("diffusers_fp32", {}).get("median_ms")
    bf16 = variants.get("diffusers_bf16", {}).get("median_ms")
    # Whole-clip bf16 variants only: the chunked one trades speed for memory.
    ours = {k: v["median_ms"] for k, v in variants.items() if k.startswith("ours_bf16") and "median_ms" in v}
    whole = {k: t for k, t in ours.items() if not variants[k].get("temporal_chunk")} or ours
    best = min(whole, key=whole.__getitem__) if whole else None
    return {
        "diffusers_fp32_ms": fp32,
        "diffusers_bf16_ms": bf16,
        "ours_bf16_ms": ours.get("ours_bf16"),
        "ours_bf16_cudnn_benchmark_ms": ours.get("ours_bf16_cudnn_benchmark"),
        "ours_bf16_best_ms": whole.get(best) if best else None,
        "ours_bf16_best_variant": best,
        "ours_bf16_best_psnr_db": variants[best].get("psnr_vs_diffusers_fp32_db") if best else None,
        "speedup_vs_diffusers_bf16": bf16 / whole[best] if bf16 and best else None,
    }


def profile(model: Any, z: torch.Tensor, family: dict[str, Any]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.backends.cudnn.benchmark = True
    model.decode(z)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.decode(z)
        torch.cuda.synchronize()
    torch.backends.cudnn.benchmark = False
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)
    print(table, flush=True)
    family["profile_ours_bf16_cudnn_benchmark"] = table.splitlines()


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env.update(
            device_name=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    else:
        env["device_name"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--z48", action="store_true", help="also the Wan2.2 TI2V-5B VAE at 1280x704x121")
    parser.add_argument("--vae-dir", type=Path, default=None, help="real Wan2.1 vae/ folder instead of random")
    parser.add_argument("--z48-dir", type=Path, default=None, help="real Wan2.2 TI2V-5B vae/ folder")
    parser.add_argument("--only-z48", action="store_true", help="skip the Wan2.1 VAE")
    parser.add_argument("--full-z48", action="store_true", help="all variants for z48 too (default: the --quick set)")
    parser.add_argument("--quick", action="store_true", help="only diffusers fp32/bf16 and ours bf16 (+benchmark)")
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of our bf16 decode")
    parser.add_argument("--chunk", type=int, default=4, help="latent frames per chunk for the chunked variant")
    parser.add_argument("--fallback-chunk", type=int, default=8, help="chunk size to retry an OOM decode with")
    parser.add_argument("--slow-s", type=float, default=20.0)
    parser.add_argument("--timeout-s", type=float, default=290.0, help="hard limit: dump stacks and exit")
    parser.add_argument("--min-left-s", type=float, default=25.0, help="skip variants when less time is left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and 64x64x9 (CPU smoke test)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("[vae] --device cuda but torch.cuda.is_available() is False", file=sys.stderr, flush=True)
        return 2
    # A stuck kernel or a deadlock cannot be interrupted from Python: this C-level watchdog can.
    faulthandler.dump_traceback_later(args.timeout_s, exit=True)
    budget = Budget(args.timeout_s)
    results: dict[str, Any] = {"workload": "wan-vae-decode", **environment(device), "runs": args.runs, "families": {}}
    log(f"environment: {json.dumps({k: v for k, v in results.items() if k != 'families'})}")
    families = ([] if args.only_z48 else ["wan21_z16"]) + (["wan22_ti2v5b_z48"] if args.z48 or args.only_z48 else [])
    with torch.no_grad():
        for name in families:
            run_family(name, args, results, budget)
    results["wall_s"] = time.perf_counter() - START
    write(args.out, results)
    faulthandler.cancel_dump_traceback_later()
    summary = {name: fam.get("summary") for name, fam in results["families"].items()}
    print(json.dumps({"workload": "wan-vae-decode", "device": results["device_name"], **summary}), flush=True)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
