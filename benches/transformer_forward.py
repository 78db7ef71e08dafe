"""One denoiser forward: diffusers' transformer against ours (torch's SDPA choice, and cuDNN attention
first) on the same random bf16 weights, full size, batch 1.

    python benches/transformer_forward.py --workload flux-forward|wan-forward --out result.json [--runs 5]

Weights are created directly on the GPU. Times are CUDA-event medians after warm-ups. Achieved TFLOP/s
use the FLOP counts of ../shared/reference/gpu.md (FLUX.1-dev 1024²: 74.4 TFLOP; Wan2.1-1.3B
832×480×81: 283 TFLOP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sgl_diffusion.layers.attention import set_sdpa_kernel_preference

FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
WAN_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
TFLOP = {"flux-forward": 74.4, "wan-forward": 283.0}


def median_ms(fn: Callable[[], torch.Tensor], warmup: int, runs: int) -> tuple[float, list[float], torch.Tensor]:
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), times, out


def build_pair(workload: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(diffusers model, our model with the same weights, diffusers kwargs, our kwargs)."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    if workload == "flux-forward":
        from diffusers import FluxTransformer2DModel as Reference

        from sgl_diffusion.models.flux import FluxTransformer2DModel as Ours

        config = FLUX_CONFIG
        img, txt = 4096, 512
        inputs = {
            "hidden_states": torch.randn(1, img, 64, device=device, dtype=dtype),
            "encoder_hidden_states": torch.randn(1, txt, 4096, device=device, dtype=dtype),
            "pooled_projections": torch.randn(1, 768, device=device, dtype=dtype),
            "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "guidance": torch.tensor([3.5], device=device, dtype=torch.float32),
            "txt_ids": torch.zeros(txt, 3, device=device, dtype=dtype),
            "img_ids": torch.stack(
                torch.meshgrid(torch.zeros(1), torch.arange(64.0), torch.arange(64.0), indexing="ij"), -1
            )
            .reshape(-1, 3)
            .to(device, dtype),
        }
        reference_kwargs = {**inputs, "return_dict": False}
    else:
        from diffusers import WanTransformer3DModel as Reference

        from sgl_diffusion.models.wan import WanTransformer3DModel as Ours

        config = WAN_CONFIG
        inputs = {
            "hidden_states": torch.randn(1, 16, 21, 60, 104, device=device, dtype=dtype),
            "timestep": torch.tensor([999.0], device=device),
            "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, dtype=dtype),
        }
        reference_kwargs = {**inputs, "return_dict": False}
    with torch.device(device):
        reference = Reference(**config).to(dtype).eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.02)
    with torch.device("meta"):
        ours = Ours.from_config(config)
    ours = ours.to_empty(device=device)
    ours.load_state_dict(reference.state_dict())
    ours = ours.to(dtype).eval()
    return reference, ours, reference_kwargs, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(TFLOP), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    reference, ours, reference_kwargs, inputs = build_pair(args.workload)
    results: dict[str, Any] = {
        "workload": args.workload,
        "card": subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=False
        ).stdout.strip(),
        "torch": torch.__version__,
        "tflop_per_forward": TFLOP[args.workload],
    }
    ms, times, expected = median_ms(lambda: reference(**reference_kwargs)[0], args.warmup, args.runs)
    results["diffusers_eager"] = {"median_ms": ms, "times_ms": times}
    for preference in ("default", "cudnn"):
        set_sdpa_kernel_preference(preference)
        ms, times, out = median_ms(lambda: ours(**inputs), args.warmup, args.runs)
        rel = float((out.float() - expected.float()).norm() / expected.float().norm())
        results[f"ours_sdpa_{preference}"] = {"median_ms": ms, "times_ms": times, "rel_l2_vs_diffusers": rel}
    for key in ("diffusers_eager", "ours_sdpa_default", "ours_sdpa_cudnn"):
        results[key]["tflops"] = TFLOP[args.workload] / (results[key]["median_ms"] / 1000)
    results["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "times_ms"}
                      for k, v in results.items()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
