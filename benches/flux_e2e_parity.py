"""Diagnostic: PSNR of our FLUX.1-dev 1024² output against diffusers' on the same random weights, with
each CUDA-only speed path switched on in turn (fused kernels, packed QKV, torch.compile).

    python benches/flux_e2e_parity.py [--steps 28]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sgl-bench"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    args = parser.parse_args()
    from sgl_diffusion.layers import fused
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    folder = perf.build_folder(args, "flux")
    fields = perf.e2e_request(args, "flux")
    request = perf.make_request(fields, seed=0)
    executor = perf.ours_executor(args, folder)
    pipeline = executor.pipeline
    transformer = pipeline.c.transformer
    dtype = transformer.x_embedder.weight.dtype
    if args.device.type == "cuda":
        transformer.unfuse_projections()
    diffusers = perf.diffusers_pipeline("flux", folder, pipeline, args.device, dtype)
    kwargs = perf.diffusers_kwargs("flux", fields)
    with torch.inference_mode():
        reference = perf.diffusers_generate(diffusers, "flux", kwargs)
    outputs = {}

    def variant(name: str) -> None:
        out = perf.ours_generate(pipeline, request)["images"][0]
        outputs[name] = out
        print(f"{name}: PSNR vs diffusers {perf.psnr(out, reference):.1f} dB, "
              f"vs torch ops {perf.psnr(out, outputs['torch ops']):.1f} dB", flush=True)  # fmt: skip

    fused.set_fused_kernels(False)
    variant("torch ops")
    fused.set_fused_kernels(True)
    variant("fused kernels")
    if args.device.type == "cuda":
        transformer.fuse_projections()
        variant("fused kernels + packed QKV")
        compile_repeated_blocks(transformer)
        variant("+ torch.compile")
    with torch.inference_mode():
        again = perf.diffusers_generate(diffusers, "flux", kwargs)
    print(f"diffusers run twice: PSNR {perf.psnr(again, reference):.1f} dB", flush=True)


if __name__ == "__main__":
    main()
