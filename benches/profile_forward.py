"""Where one denoiser forward spends its GPU time: ours against diffusers, eager or compiled.

    python benches/profile_forward.py --workload flux-forward|wan-forward --out-dir DIR [--compile]

Same models and inputs as `perf.py`'s forward workloads. Writes one torch profiler table per side
(kernels by self CUDA time) and prints a summary by kernel class: GEMM, attention, everything else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from perf import build_forward_pair, forward_inputs
from torch.profiler import ProfilerActivity, profile

#: Kernel-name fragments of each class (cuBLAS / cuBLASLt GEMMs, cuDNN / flash attention).
CLASSES = {"gemm": ("nvjet", "gemm", "cutlass", "sm90_xmma"), "attention": ("fprop", "flash", "fmha", "attention")}


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((cls for cls, parts in CLASSES.items() if any(p in lowered for p in parts)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["flux-forward", "wan-forward"], required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--compile", action="store_true", help="profile both sides under torch.compile")
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    device, dtype = torch.device("cuda"), torch.bfloat16
    reference, ours = build_forward_pair(args.workload, False, device, dtype)
    ours.fuse_projections()
    if args.compile:
        reference.compile_repeated_blocks(fullgraph=True)
        compile_repeated_blocks(ours)
    inputs = forward_inputs(args.workload, False, device, dtype)
    runs = {"diffusers": lambda: reference(**inputs, return_dict=False)[0], "ours": lambda: ours(**inputs)}
    summary = {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mode = "compiled" if args.compile else "eager"
    with torch.inference_mode():
        for name, fn in runs.items():
            for _ in range(3):  # warm-up (and compile)
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            by_class: dict[str, float] = {}
            for event in events:
                by_class[kernel_class(event.key)] = (
                    by_class.get(kernel_class(event.key), 0.0) + event.self_device_time_total / 1000
                )
            summary[name] = {k: round(v, 2) for k, v in sorted(by_class.items())} | {
                "total_ms": round(sum(by_class.values()), 2)
            }
            table = prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70
            )
            (args.out_dir / f"{args.workload}_{mode}_{name}_profile.txt").write_text(table)
            print(f"== {name} ({mode})\n{table}", flush=True)
    print(json.dumps({"workload": args.workload, "mode": mode, "gpu_ms_by_kernel_class": summary}, indent=1))
    (args.out_dir / f"{args.workload}_{mode}_profile_summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
