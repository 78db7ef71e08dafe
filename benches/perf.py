"""The speed benchmark: ours against diffusers (eager and torch.compile) in one process, on one GPU.

    python benches/perf.py --workload WORKLOAD --out-dir DIR [--commit SHA] [options]

Workloads (each fits one 10-minute GPU command):
  flux-forward  one FLUX.1-dev transformer forward, 1024² (4096 + 512 tokens), batch 1
  wan-forward   one Wan2.1-1.3B transformer forward, 832×480×81 (32 760 + 512 tokens), batch 1
  flux-e2e      FLUX.1-dev 1024², 28 steps: text encoding + denoising + VAE decode
  wan-e2e       Wan2.1-1.3B 832×480, 81 frames, 50 steps, CFG 5: text encoding + denoising + decode
  wan-vae       Wan2.1 VAE decode of 81 frames at 832×480 (diffusers' decoder against ours)
  flux-graphs   FLUX.1-dev forwards at small shapes (batch 1 and 2): ours eager / compiled, each plain and
                replayed as a CUDA graph, against diffusers + torch.compile (`--graph-shapes`: latent sides)
  wan-graphs    the same for Wan2.1-1.3B at 480p (`--graph-shapes`: latent frame counts)

Models are full size with random bf16 weights created on the GPU (forward workloads: the diffusers
model's weights are copied into ours, so outputs are comparable; end-to-end workloads: a diffusers
folder is written by `build_random_flux.py` / `build_random_wan.py` and loaded by our real loader,
and the diffusers pipeline is assembled around *our loaded components' tensors*, with no second
copy). Times are CUDA-event medians after warm-up. Results go to DIR/<workload>.json and .md with
the card, commit, command and date. `--tiny --device cpu` runs the same code on tiny configs (smoke
test, no timing meaning).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

#: FLOPs per forward (FlopCounterMode counts of ../shared/reference/gpu.md) and the measured H100
#: ceilings they are compared with (dense bf16 GEMM, cuDNN attention).
FORWARD_TFLOP = {"flux-forward": (59.5, 14.9), "wan-forward": (82.0, 201.0)}
GEMM_TFLOPS, ATTENTION_TFLOPS = 797.0, 615.0

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
TINY_FLUX = {**FLUX_CONFIG, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "axes_dims_rope": [4, 6, 6]}  # fmt: skip
TINY_WAN = {**WAN_CONFIG, "num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "ffn_dim": 32,
            "num_layers": 2, "freq_dim": 16}  # fmt: skip


def log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Timing and reporting
# --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], warmup: int, runs: int, device: torch.device) -> tuple[dict[str, Any], Any]:
    """Median of `runs` timed calls after `warmup` untimed ones (CUDA events on the GPU)."""
    out = None
    with torch.inference_mode():
        for _ in range(warmup):
            out = fn()
        times = []
        for _ in range(runs):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - began) * 1000)
    return {"median_ms": statistics.median(times), "times_ms": [round(t, 3) for t in times]}, out


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def psnr(a: Any, b: Any) -> float:
    """PSNR in dB of two arrays of pixels in [0, 1]."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: Any, b: Any) -> float:
    """Mean SSIM over channels of images `(..., H, W, C)` in [0, 1] (8x8 mean windows, standard constants)."""
    x = torch.as_tensor(a, dtype=torch.float64).reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
    y = torch.as_tensor(b, dtype=torch.float64).reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    pool = torch.nn.functional.avg_pool2d
    c1, c2 = 0.01**2, 0.03**2
    mx, my = pool(x, 8, 1), pool(y, 8, 1)
    vx, vy = pool(x * x, 8, 1) - mx**2, pool(y * y, 8, 1) - my**2
    cov = pool(x * y, 8, 1) - mx * my
    value = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def card_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_results(
    args: argparse.Namespace, record: dict[str, Any], rows: list[dict[str, Any]], notes: list[str], quiet: bool = False
) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    record["rows"] = rows
    record["notes"] = notes
    (args.out_dir / f"{args.workload}.json").write_text(json.dumps(record, indent=1, default=str))
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "variant"))
    lines = [
        f"# {args.workload}",
        "",
        f"* **Card:** {record['card']}",
        f"* **Date:** {record['date']}",
        f"* **Commit:** `{record['commit']}`",
        f"* **Command:** `{record['command']}`",
        f"* **Software:** torch {record['torch']}, diffusers {record.get('diffusers', '-')}",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [_fmt(row.get(c)) for c in columns]
        lines.append(f"| {row['variant']} | " + " | ".join(cells) + " |")
    lines += [""] + [f"* {note}" for note in notes]
    (args.out_dir / f"{args.workload}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines), flush=True)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}" if abs(value) < 0.01 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Forward workloads
# --------------------------------------------------------------------------------------------------


def forward_inputs(
    workload: str, tiny: bool, device: torch.device, dtype: torch.dtype, batch: int = 1, size: int | None = None
) -> dict[str, torch.Tensor]:
    """Random inputs; `size` is the latent side in tokens (FLUX) or the latent frame count (Wan)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    if workload == "flux-forward":
        side, txt = (size or 8, 16) if tiny else (size or 64, 512)
        cfg = TINY_FLUX if tiny else FLUX_CONFIG
        axes = torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
        return {
            "hidden_states": randn(batch, side * side, cfg["in_channels"]),
            "encoder_hidden_states": randn(batch, txt, cfg["joint_attention_dim"]),
            "pooled_projections": randn(batch, cfg["pooled_projection_dim"]),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32),
            "txt_ids": torch.zeros(txt, 3, device=device, dtype=dtype),
            "img_ids": torch.stack(axes, -1).reshape(-1, 3).to(device, dtype),
        }
    frames, h, w, txt = (size or 3, 8, 8, 16) if tiny else (size or 21, 60, 104, 512)
    cfg = TINY_WAN if tiny else WAN_CONFIG
    return {
        "hidden_states": randn(batch, 16, frames, h, w),
        "timestep": torch.full((batch,), 999.0, device=device),
        "encoder_hidden_states": randn(batch, txt, cfg["text_dim"]),
    }


def build_forward_pair(workload: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """(diffusers model, ours with the same weights)."""
    if workload == "flux-forward":
        from diffusers import FluxTransformer2DModel as Reference

        from sgl_diffusion.models.flux import FluxTransformer2DModel as Ours

        config = TINY_FLUX if tiny else FLUX_CONFIG
    else:
        from diffusers import WanTransformer3DModel as Reference

        from sgl_diffusion.models.wan import WanTransformer3DModel as Ours

        config = TINY_WAN if tiny else WAN_CONFIG
    torch.manual_seed(0)
    with torch.device(device):
        reference = Reference(**config).to(dtype).eval().requires_grad_(False)
    for p in reference.parameters():
        p.data.normal_(0, 0.02)
    with torch.device("meta"):
        ours = Ours.from_config(config)
    ours = ours.to_empty(device=device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours.to(dtype).eval().requires_grad_(False)


def run_forward(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from sgl_diffusion.layers import fused
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    device, dtype = args.device, torch.bfloat16 if args.device.type == "cuda" else torch.float32
    reference, ours = build_forward_pair(args.workload, args.tiny, device, dtype)
    inputs = forward_inputs(args.workload, args.tiny, device, dtype)
    linear_tflop, attention_tflop = FORWARD_TFLOP[args.workload]
    tflop = linear_tflop + attention_tflop
    floor_ms = (linear_tflop / GEMM_TFLOPS + attention_tflop / ATTENTION_TFLOPS) * 1000
    record.update(tflop_per_forward=tflop, floor_ms=floor_ms)
    rows: list[dict[str, Any]] = []

    def add(variant: str, fn: Callable[[], torch.Tensor], expected: torch.Tensor | None) -> torch.Tensor:
        reset_peak(device)
        began = time.perf_counter()
        stats, out = timed(fn, args.warmup, args.runs, device)
        first_s = time.perf_counter() - began  # includes compile for compiled variants
        ms = stats["median_ms"]
        rows.append(
            {
                "variant": variant,
                "median ms": ms,
                "TFLOP/s": tflop / ms * 1000 if not args.tiny else None,
                "x floor": ms / floor_ms if not args.tiny else None,
                "rel L2 vs diffusers": None if expected is None else rel_l2(out, expected),
                "peak MB": peak_mb(device),
                "warm-up+runs s": first_s,
            }
        )
        record.setdefault("times_ms", {})[variant] = stats["times_ms"]
        log(f"{variant}: {ms:.2f} ms")
        return out

    expected = add("diffusers eager", lambda: reference(**inputs, return_dict=False)[0], None)
    fused.set_fused_kernels(False)
    add("ours eager, torch ops", lambda: ours(**inputs), expected)
    fused.set_fused_kernels(True)
    add("ours eager, fused kernels", lambda: ours(**inputs), expected)
    ours.fuse_projections()
    add("ours eager, fused kernels, packed QKV", lambda: ours(**inputs), expected)
    ours.unfuse_projections()  # the engine's default: packing measured no faster (see --compile-ablations)
    if args.compile:
        reference.compile_repeated_blocks(fullgraph=True)
        add("diffusers + torch.compile", lambda: reference(**inputs, return_dict=False)[0], expected)
        compile_repeated_blocks(ours)
        add("ours + torch.compile", lambda: ours(**inputs), expected)
        if args.compile_ablations:
            ours.fuse_projections()
            torch._dynamo.reset()
            add("ours + torch.compile, packed q/k/v GEMMs", lambda: ours(**inputs), expected)
            ours.unfuse_projections()
            fused.set_fused_kernels(False)
            torch._dynamo.reset()
            add("ours + torch.compile, no GEMM epilogues", lambda: ours(**inputs), expected)
            fused.set_fused_kernels(True)
    notes = [
        (
            f"{tflop:.1f} TFLOP per forward ({linear_tflop} linear + {attention_tflop} attention); floor "
            f"{floor_ms:.1f} ms = linear / {GEMM_TFLOPS:.0f} + attention / {ATTENTION_TFLOPS:.0f} TFLOP/s "
            "(gpu.md's measured H100 ceilings)."
        ),
        (
            "Both models hold the same random N(0, 0.02) bf16 weights; batch 1; "
            f"median of {args.runs} after {args.warmup} warm-ups."
        ),
    ]
    if args.cfg_shapes:
        rows += cfg_batching_rows(args, ours, device, dtype)
        notes.append("cfg rows: ours (as last configured) with both CFG branches as one batch-2 forward against "
                     "two batch-1 forwards, at several token counts.")  # fmt: skip
    return rows, notes


def cfg_batching_rows(args: argparse.Namespace, ours: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Batch-2 forward against two batch-1 forwards at smaller shapes (picks CFG_BATCH_MAX_TOKENS)."""
    rows = []
    for size in args.cfg_shapes:
        one = forward_inputs(args.workload, args.tiny, device, dtype, batch=1, size=size)
        two = forward_inputs(args.workload, args.tiny, device, dtype, batch=2, size=size)
        hidden = one["hidden_states"]
        tokens = hidden.shape[1] if args.workload == "flux-forward" else hidden[0, 0].numel() // 4
        single, _ = timed(lambda one=one: (ours(**one), ours(**one)), args.warmup, args.runs, device)
        batched, _ = timed(lambda two=two: ours(**two), args.warmup, args.runs, device)
        rows.append({"variant": f"cfg {tokens} tokens: 2 x batch 1", "median ms": single["median_ms"]})
        rows.append({"variant": f"cfg {tokens} tokens: batch 2", "median ms": batched["median_ms"]})
        log(f"cfg at {tokens} tokens: 2x1 {single['median_ms']:.2f} ms, batch 2 {batched['median_ms']:.2f} ms")
    return rows


#: `--graph-shapes` defaults: FLUX 256², 512², 768², 1024²; Wan 480p with 1, 5 and 9 frames.
GRAPH_SHAPES = {"flux-forward": [16, 32, 48, 64], "wan-forward": [1, 2, 3]}


def run_graph_sweep(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Where CUDA graphs pay (picks `cuda_graphs.AUTO_MAX_TOKENS`): one row per shape and batch size."""
    from sgl_diffusion.runtime.compile import compile_repeated_blocks
    from sgl_diffusion.runtime.cuda_graphs import CudaGraphRunner, batch_tokens

    workload = args.workload.replace("-graphs", "-forward")
    device, dtype = args.device, torch.bfloat16 if args.device.type == "cuda" else torch.float32
    reference, ours = build_forward_pair(workload, args.tiny, device, dtype)
    cases = [(size, batch) for size in (args.graph_shapes or GRAPH_SHAPES[workload]) for batch in (1, 2)]
    inputs = {case: forward_inputs(workload, args.tiny, device, dtype, batch=case[1], size=case[0]) for case in cases}
    plain = ours.forward
    tokens = batch_tokens(ours)
    rows = {case: {"variant": f"{tokens(inputs[case])} tokens (batch {case[1]})"} for case in cases}

    def measure(column: str, fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
        for case in cases:
            stats, out = timed(lambda case=case: fn(inputs[case]), args.warmup, args.runs, device)
            rows[case][column] = stats["median_ms"]
            if column.startswith("ours"):
                expected = rows[case].setdefault("_expected", out.float())
                rows[case]["max rel L2 vs ours eager"] = max(rows[case].get("max rel L2 vs ours eager", 0.0),
                                                             rel_l2(out, expected))  # fmt: skip
            log(f"{rows[case]['variant']} {column}: {stats['median_ms']:.2f} ms")

    def graphed() -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        runner = CudaGraphRunner(ours, plain, capture_all=True, tokens=tokens)
        return lambda x: runner(**x)

    measure("ours eager ms", lambda x: plain(**x))
    if device.type == "cuda":
        measure("ours eager + graph ms", graphed())
    if args.compile:
        compile_repeated_blocks(ours)
        measure("ours compiled ms", lambda x: plain(**x))
        measure("ours compiled + graph ms", graphed())
        if args.diffusers != "none":
            reference.compile_repeated_blocks(fullgraph=True)
            measure("diffusers + compile ms", lambda x: reference(**x, return_dict=False)[0])
    for row in rows.values():
        row.pop("_expected", None)
        for mode in ("eager", "compiled"):
            if f"ours {mode} + graph ms" in row:
                row[f"{mode} graph speed-up"] = row[f"ours {mode} ms"] / row[f"ours {mode} + graph ms"]
    notes = [
        (
            f"{'Tiny' if args.tiny else 'Full-size'} {workload.split('-')[0].upper()} with random weights; "
            f"{16 if args.tiny else 512} text tokens; median of {args.runs} after {args.warmup} warm-ups. "
            "A graph replay includes copying the inputs into the graph's buffers and the output out of it."
        ),
        "Tokens: image/video tokens of the whole batch (what `--cuda-graphs auto` compares with AUTO_MAX_TOKENS).",
    ]
    return list(rows.values()), notes


# --------------------------------------------------------------------------------------------------
# End-to-end workloads
# --------------------------------------------------------------------------------------------------


def build_folder(args: argparse.Namespace, family: str) -> Path:
    folder = args.work_dir / f"{family}{'-tiny' if args.tiny else ''}"
    if (folder / "model_index.json").exists():
        return folder
    import build_random_flux
    import build_random_wan

    builder = build_random_flux if family == "flux" else build_random_wan
    began = time.perf_counter()
    argv = [str(folder), "--device", args.device.type] + (["--tiny"] if args.tiny else [])
    builder.main(argv)
    free_memory()
    log(f"built {folder} in {time.perf_counter() - began:.1f} s")
    return folder


def e2e_request(args: argparse.Namespace, family: str) -> dict[str, Any]:
    if family == "flux":
        side = 64 if args.tiny else 1024
        return {"prompt": "a photo of a red fox in fresh snow, golden hour", "negative_prompt": None,
                "width": side, "height": side, "num_frames": 1, "num_inference_steps": args.steps or 28,
                "guidance_scale": 3.5, "true_cfg_scale": 1.0, "cfg_enabled": False, "fps": None,
                "max_sequence_length": 512}  # fmt: skip
    h, w, frames = (32, 32, 5) if args.tiny else (480, 832, 81)
    return {"prompt": "a red fox running through fresh snow, golden hour", "negative_prompt": "blurry",
            "width": w, "height": h, "num_frames": frames, "num_inference_steps": args.steps or 50,
            "guidance_scale": 5.0, "true_cfg_scale": 1.0, "cfg_enabled": True, "fps": 16,
            "max_sequence_length": 512}  # fmt: skip


def make_request(fields: dict[str, Any], seed: int):
    from sgl_diffusion.runtime.request import Request

    return Request(id=0, seed=seed, num_outputs=1, flow_shift=None, guidance_scale_2=None, image_path=None,
                   output_format="npy", output_quality=None, notes=(), **fields)  # fmt: skip


def ours_executor(args: argparse.Namespace, folder: Path, **options: Any):
    from sgl_diffusion.runtime.executor import PipelineExecutor

    index = json.loads((folder / "model_index.json").read_text())
    config = {
        "model_path": str(folder),
        "hf_id": None,
        "pipeline_class": index["_class_name"],
        "options": {"device": args.device.type, **options},
    }
    began = time.perf_counter()
    executor = PipelineExecutor(json.dumps(config))
    log(f"ours loaded (with {options}) in {time.perf_counter() - began:.1f} s")
    return executor


def run_ours_e2e(pipeline, request, runs: int, device: torch.device) -> tuple[list[dict[str, Any]], Any]:
    """Runs the real staged pipeline (what the engine's executor calls) `runs` times after a 2-step
    warm-up (compiles a new shape, settles cuDNN and the allocator)."""
    pipeline.run([dataclasses.replace(request, num_inference_steps=2)], lambda step, total: [])
    results = []
    out = None
    for _ in range(runs):
        reset_peak(device)
        began = time.perf_counter()
        state = pipeline.run([request], lambda step, total: [])
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - began) * 1000
        perf = state.perf.as_dict()
        out = state["videos" if pipeline.output == "video" else "images"][0]
        results.append({"wall_ms": wall, "perf": perf, "peak_mb": peak_mb(device)})
        log(f"ours run: {wall:.0f} ms")
    return results, out


def diffusers_pipeline(family: str, folder: Path, ours_pipeline, device: torch.device, dtype: torch.dtype):
    """diffusers' pipeline over our loaded components' tensors (no second copy of the weights)."""
    c = ours_pipeline.c
    if family == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        with torch.device(device):
            transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
        extra = {"text_encoder": c.clip, "tokenizer": c.clip_tokenizer, "text_encoder_2": c.t5,
                 "tokenizer_2": c.t5_tokenizer}  # fmt: skip
        pipeline_class, scheduler_class = FluxPipeline, FlowMatchEulerDiscreteScheduler
    else:
        from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

        with torch.device(device):
            transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder / "transformer"))
        extra = {"text_encoder": c.text_encoder, "tokenizer": c.tokenizer}
        pipeline_class, scheduler_class = WanPipeline, UniPCMultistepScheduler
    # Built on the device (its non-persistent buffers, e.g. Wan's RoPE table, must be real), then its
    # parameters are swapped for our loaded tensors: no second copy stays alive.
    transformer.load_state_dict(c.transformer.state_dict(), assign=True)
    transformer = transformer.to(device=device, dtype=dtype).eval()
    free_memory()
    scheduler = scheduler_class.from_pretrained(folder / "scheduler")
    pipe = pipeline_class(scheduler=scheduler, vae=c.vae, transformer=transformer, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers_e2e(pipe, family: str, fields: dict[str, Any], runs: int, device: torch.device):
    kwargs: dict[str, Any] = {
        "prompt": fields["prompt"],
        "height": fields["height"],
        "width": fields["width"],
        "num_inference_steps": fields["num_inference_steps"],
        "guidance_scale": fields["guidance_scale"],
        "max_sequence_length": fields["max_sequence_length"],
        "output_type": "np",
    }
    if family == "wan":
        kwargs.update(negative_prompt=fields["negative_prompt"], num_frames=fields["num_frames"])
    with torch.inference_mode():  # 2-step warm-up (compiles, when compiled)
        pipe(generator=torch.Generator("cpu").manual_seed(0), **{**kwargs, "num_inference_steps": 2})
    results, out = [], None
    for _ in range(runs):
        reset_peak(device)
        began = time.perf_counter()
        with torch.inference_mode():
            result = pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - began) * 1000
        out = result.frames[0] if family == "wan" else result.images[0]
        results.append({"wall_ms": wall, "peak_mb": peak_mb(device)})
        log(f"diffusers run: {wall:.0f} ms")
    return results, out


def run_e2e(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from sgl_diffusion.runtime.cuda_graphs import cuda_graph_runner

    family = "flux" if args.workload == "flux-e2e" else "wan"
    folder = build_folder(args, family)
    fields = e2e_request(args, family)
    request = make_request(fields, seed=0)
    record["request"] = fields
    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    def e2e_row(variant: str, runs: list[dict[str, Any]], ours: bool) -> dict[str, Any]:
        warm = runs[-1]
        row = {"variant": variant, "end to end s": warm["wall_ms"] / 1000, "peak MB": warm["peak_mb"]}
        if ours:
            perf = warm["perf"]
            stages = {s["name"]: s["duration_ms"] for s in perf["steps"]}
            steps = [s["duration_ms"] for s in perf["denoise_steps_ms"]]
            row.update(
                {
                    "text s": stages.get("text_encoding", 0) / 1000,
                    "denoise s": stages.get("denoising", 0) / 1000,
                    "decode s": stages.get("decoding", 0) / 1000,
                    "median step ms": statistics.median(steps) if steps else None,
                }
            )
        record.setdefault("runs", {})[variant] = runs
        return row

    options = {"enable_torch_compile": args.compile, "cfg_batching": "auto", "cuda_graphs": args.cuda_graphs}
    if args.vae_slicing:
        options["vae_slicing"] = True
    executor = ours_executor(args, folder, **options)
    ours_runs, ours_out = run_ours_e2e(executor.pipeline, request, args.runs, args.device)
    ours_name = f"ours{' + torch.compile' if args.compile else ''}, CUDA graphs {args.cuda_graphs}"
    ours_name += ", --vae-slicing" if args.vae_slicing else ""
    rows.append(e2e_row(ours_name, ours_runs, ours=True))
    write_results(args, record, rows, notes, quiet=True)  # partial results survive a time-out
    runners = [cuda_graph_runner(d) for d in executor.pipeline.denoisers()]
    if args.graph_ablation and any(runners):
        for denoiser in executor.pipeline.denoisers():
            vars(denoiser).pop("forward", None)  # back to the class's forward: no graphs
        plain_runs, plain_out = run_ours_e2e(executor.pipeline, request, args.runs, args.device)
        row = e2e_row(ours_name.replace(f"CUDA graphs {args.cuda_graphs}", "no CUDA graphs"), plain_runs, ours=True)
        row["PSNR dB vs with graphs"] = psnr(plain_out, ours_out)
        rows.append(row)
        for denoiser, runner in zip(executor.pipeline.denoisers(), runners, strict=True):
            if runner is not None:
                denoiser.forward = runner
        write_results(args, record, rows, notes, quiet=True)
    for backend in args.lossy_attention:
        executor.pipeline.c.transformer.attention_backend = backend
        lossy_runs, lossy_out = run_ours_e2e(executor.pipeline, request, args.runs, args.device)
        row = e2e_row(f"ours, attention {backend} (lossy)", lossy_runs, ours=True)
        row.update({"PSNR dB vs lossless": psnr(lossy_out, ours_out), "SSIM vs lossless": ssim(lossy_out, ours_out)})
        rows.append(row)
        write_results(args, record, rows, notes, quiet=True)
        executor.pipeline.c.transformer.attention_backend = "torch_sdpa"
    if args.diffusers != "none":
        pipe = diffusers_pipeline(family, folder, executor.pipeline, args.device, dtype)
        ref_runs, ref_out = run_diffusers_e2e(pipe, family, fields, args.runs, args.device)
        row = e2e_row("diffusers eager", ref_runs, ours=False)
        row["PSNR dB ours vs this"] = psnr(ours_out, ref_out)
        rows.append(row)
        write_results(args, record, rows, notes, quiet=True)
        if args.diffusers == "eager+compiled":
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
            ref_runs, ref_out = run_diffusers_e2e(pipe, family, fields, args.runs, args.device)
            row = e2e_row("diffusers + torch.compile", ref_runs, ours=False)
            row["PSNR dB ours vs this"] = psnr(ours_out, ref_out)
            rows.append(row)
        write_results(args, record, rows, notes, quiet=True)
    notes += [
        f"Request: {json.dumps(fields)}; seed 0; a 2-step warm-up, then {args.runs} runs, the last reported.",
        (
            "ours = the engine's staged pipeline as the executor runs it (text encoding, denoising, VAE decode to "
            "float pixels; PNG/MP4 encoding excluded); diffusers = its pipeline class over the same loaded "
            "text encoders, VAE and transformer weights, output_type='np'."
        ),
        (
            "PSNR between ours and diffusers only shows both compute the same thing on random weights (bf16 "
            "rounding differences grow over the steps)."
        ),
    ]
    return rows, notes


# --------------------------------------------------------------------------------------------------
# VAE workload
# --------------------------------------------------------------------------------------------------


def run_wan_vae(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """`wan_vae_decode.py` (diffusers' decoder against our whole-clip one), summarised as rows."""
    import wan_vae_decode

    out_json = args.work_dir / "wan_vae.json"
    argv = ["--out", str(out_json), "--runs", str(args.runs)] + (["--tiny", "--device", "cpu"] if args.tiny else [])
    wan_vae_decode.main(argv + args.vae_args)
    result = json.loads(out_json.read_text())
    record["wan_vae_decode"] = result
    rows = []
    for family, values in result.get("families", {}).items():
        for name, variant in values.get("variants", {}).items():
            rows.append(
                {
                    "variant": f"{family}: {name}",
                    "median ms": variant.get("median_ms"),
                    "peak MB": variant.get("peak_mb"),
                    "PSNR dB vs diffusers fp32": variant.get("psnr_vs_diffusers_fp32_db"),
                }
            )
    notes = [
        (
            "Wan2.1 VAE (z16) decode of latents (1, 16, 21, 60, 104) -> 832x480x81; random weights; CUDA-event "
            "median after a warm-up. PSNR on random weights only guards regressions."
        ),
    ]
    return rows, notes


# --------------------------------------------------------------------------------------------------


WORKLOADS = {
    "flux-forward": run_forward,
    "wan-forward": run_forward,
    "flux-e2e": run_e2e,
    "wan-e2e": run_e2e,
    "flux-graphs": run_graph_sweep,
    "wan-graphs": run_graph_sweep,
    "wan-vae": run_wan_vae,
}


def git_commit() -> str:
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=BENCH_DIR
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sgl-bench"), help="random model folders")
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test of this script)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="timed runs (forward) or runs, last reported (e2e)")
    parser.add_argument("--steps", type=int, help="denoising steps for e2e (default: FLUX 28, Wan 50)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile variants")
    parser.add_argument("--diffusers", choices=["none", "eager", "eager+compiled"], default="eager",
                        help="diffusers pipelines to run in e2e workloads")  # fmt: skip
    parser.add_argument("--lossy-attention", nargs="*", default=[], help="e2e: also run these attention backends")
    parser.add_argument("--compile-ablations", action="store_true",
                        help="forward: also compiled with packed q/k/v, and without GEMM epilogues")  # fmt: skip
    parser.add_argument("--cfg-shapes", type=int, nargs="*", default=[],
                        help="forward: compare batch-2 CFG at these sizes (FLUX: latent side in tokens, "
                             "Wan: latent frames)")  # fmt: skip
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto", help="e2e: ours' --cuda-graphs")
    parser.add_argument("--vae-slicing", action="store_true", help="e2e: ours with --vae-slicing")
    parser.add_argument("--graph-ablation", action="store_true", help="e2e: ours again with the graphs removed")
    parser.add_argument("--graph-shapes", type=int, nargs="*", default=[],
                        help="flux-graphs / wan-graphs: sizes (FLUX: latent side in tokens, Wan: latent frames)")  # fmt: skip
    parser.add_argument("--vae-args", nargs="*", default=[], help="wan-vae: extra flags for wan_vae_decode.py")
    parser.add_argument("--commit", default=None, help="default: $BENCH_COMMIT or git rev-parse")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cpu":
        args.compile = False  # inductor's CPU compile of full models is not what this measures
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    record: dict[str, Any] = {
        "workload": args.workload,
        "card": card_name(args.device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit or git_commit(),
        "command": "python benches/perf.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
    }
    log(f"{args.workload} on {record['card']}")
    rows, notes = WORKLOADS[args.workload](args, record)
    write_results(args, record, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
