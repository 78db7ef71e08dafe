"""Where one denoiser forward spends its GPU time, ours against diffusers (torch profiler tables).

python benches/profile_forward.py --workload wan-forward --out-dir DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformer_forward import TFLOP, build_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(TFLOP), required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    reference, ours, reference_kwargs, inputs = build_pair(args.workload)
    runs = {"diffusers": lambda: reference(**reference_kwargs)[0], "ours": lambda: ours(**inputs)}
    with torch.inference_mode():
        for name, fn in runs.items():
            for _ in range(2):  # warm-up
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
            (args.out_dir / f"{args.workload}_{name}_profile.txt").write_text(table)
            print(f"== {name}\n{table}")


if __name__ == "__main__":
    main()
