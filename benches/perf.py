"""The speed benchmark: ours against diffusers (eager and torch.compile) in one process, on one GPU.

    python benches/perf.py --workload WORKLOAD --out-dir DIR [--reps 5] [--commit SHA] [options]

Workloads (each fits one 10-minute GPU command; `benches/gpu_perf.sh` lists the commands):
  flux-forward  one FLUX.1-dev transformer forward, 1024² (4096 + 512 tokens), batch 1
  wan-forward   one Wan2.1-1.3B transformer forward, 832×480×81 (32 760 + 512 tokens), batch 1
  flux-e2e      FLUX.1-dev 1024², 28 steps: text encoding + denoising + VAE decode
  wan-e2e       Wan2.1-1.3B 832×480, 81 frames, CFG 5 (50 steps; `--steps 20` fits 5 repetitions in 10 minutes)
  qwen-forward  one Qwen-Image transformer forward, 1328² (6889 image + 128 text tokens), batch 1
  flux2-forward one FLUX.2-dev transformer forward, 1024² (4096 image + 512 text tokens), batch 1
  hunyuan-forward one HunyuanVideo transformer forward, 1280×720×129 (118 800 video tokens; `--latent-frames` fewer),
                batch 1: diffusers gets the prompt padded to 256 rows with its mask, ours its 120 real tokens (as the
                engine passes them), and ours also on diffusers' padded inputs
  qwen-e2e      Qwen-Image at the engine's defaults for Qwen/Qwen-Image (1328², 50 steps, true CFG 4 against the
                negative prompt " "): text encoding + denoising + VAE decode; `--steps` shortens, `--size 1024`
                matches SGLang's published H100 baseline (1024², 50 steps: 12.8 s), shown as a row (with
                ours projected to 50 steps: ours' time + the missing steps at ours' median step) and in the notes
  zimage-e2e    Z-Image-Turbo at the engine's defaults for Tongyi-MAI/Z-Image-Turbo (1024², 9 steps, no CFG): text
                encoding + denoising + VAE decode, full-size config with random weights; SGLang's published H100
                number (0.91 s) as a row and in the notes
  wan-vae       Wan2.1 VAE decode of 81 frames at 832×480 (`wan_vae_decode.py`, its own timing: see there)
  flux-graphs   FLUX.1-dev forwards at small shapes (batch 1 and 2): ours eager / compiled, each plain and
                replayed as a CUDA graph, against diffusers + torch.compile with and without CUDA graphs
                (`--graph-shapes`: latent sides)
  wan-graphs    the same for Wan2.1-1.3B at 480p (`--graph-shapes`: latent frame counts)

How it measures, so that a skeptic can trust the comparison:
* Diffusers gets every advantage ours takes. Compiled variants have static shapes (`dynamic=False`) on both
  sides. Where ours replays CUDA graphs (`--cuda-graphs`: in e2e workloads the engine's own rule, elsewhere
  `auto` = at most `AUTO_MAX_TOKENS` tokens, as the engine decides), diffusers gets CUDA graphs too, through
  `torch.compile(mode="reduce-overhead")` of its whole transformer (`compile_with_cuda_graphs`).
* Ours runs the engine's sampling defaults where the workload says so (qwen-e2e: the request a bare prompt
  gets for Qwen/Qwen-Image; zimage-e2e: for Tongyi-MAI/Z-Image-Turbo); its runtime options are perf.py's: `--enable-torch-compile` unless `--no-compile`
  (the engine's own default is off), CFG batching and CUDA graphs `auto` (the engine's defaults).
* Every variant gets the same warm-up, all before the first timed call: `--warmup` untimed calls (forward
  workloads) or untimed generations of the full request (e2e workloads). Ours' engine warm-up is off.
* The variants of one group are timed in alternation: `--reps` repetitions, each timing every variant of
  the group once in a fixed order (ours, diffusers, ours, diffusers, ...), so drift (clocks, heat, the
  machine's other tenants) hits all alike. One repetition times `--runs` consecutive calls and counts their
  mean (CUDA events for forwards; for a generation, the wall clock between two device synchronizations).
  `alternate` is the one timing loop of every workload here.
* Each row gives the median over repetitions, min-max, the relative spread (max - min) / median, and the
  peak device memory (`torch.cuda.max_memory_allocated`, reset before every repetition; n/a on the CPU),
  and, against its rival in the same group, the ratio of medians and a verdict: "within noise" when the
  two min-max ranges overlap, else faster / slower (`bench_stats.py` holds the rule).

Models are full size with random bf16 weights created on the GPU (forward workloads: the diffusers
model's weights are copied into ours, so outputs are comparable; end-to-end workloads: a diffusers
folder is written by `build_random_flux.py` / `build_random_wan.py` / `build_random_qwen_image.py` /
`build_random_z_image.py` and
loaded by our real loader, and the diffusers pipeline is assembled around *our loaded components'
tensors*, with no second copy).

Qwen-Image is too large for two copies: its transformer has 20.43 B parameters, 38.1 GiB in bf16, and two
copies (76.1 GiB) leave an 80 GB H100 (about 78 GiB usable) nothing for activations, compilation and the
CUDA context. So in qwen-forward ours' parameters *are* diffusers' tensors (`load_state_dict(assign=True)`
of diffusers' state dict: the module trees match key for key, as ours loads diffusers checkpoints by
name), and nothing is copied. Only the packed-QKV variant makes packed q/k/v weights (+6.3 GiB), and
unpacking afterwards gives ours its own q/k/v tensors (same values). Our Qwen-Image transformer never
replays CUDA graphs: `CudaGraphRunner` runs a call with a list argument (`img_shapes`) plainly, and
1328² (6889 tokens) is above `AUTO_MAX_TOKENS` anyway, so neither side gets CUDA-graph rows there.
The e2e folder (53.7 GiB) may not fit a 64 GiB disk: see `build_random_qwen_image.py`.

HunyuanVideo's transformer has 12.82 B parameters (23.9 GiB in bf16); hunyuan-forward shares one set too, which
leaves the room for its 118 800-token activations (and diffusers' masked attention) that a second copy would take.
Its FLOPs per forward are counted at the run's shape (FlopCounterMode over ours on the meta device, with ours'
text rows) rather than read from FORWARD_TFLOP.

FLUX.2-dev is larger still: 32.22 B parameters, 60.0 GiB in bf16, so flux2-forward shares one set of weights
the same way. Its text is always 512 rows (the pipelines pad every prompt to `max_sequence_length`), its
forward takes the embedded guidance, and ours' `auto` captures 4096 tokens, so it has CUDA-graph rows on both
sides (the graph pools hold one forward's activations, a few GiB beside the weights).

Results go to DIR/<name>.json and .md (name: `--name`, default the workload) with the card,
commit, command and date. `--tiny --device cpu` runs the same code on tiny configs (smoke test, no
timing meaning); add `--compile-backend eager` to take the compiled code paths there too.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_stats  # a sibling module, found through the path entry above

#: FLOPs per forward (FlopCounterMode counts of ../shared/reference/gpu.md) and the measured H100
#: ceilings they are compared with (dense bf16 GEMM, cuDNN attention).
FORWARD_TFLOP = {
    "flux-forward": (59.5, 14.9),
    "wan-forward": (82.0, 201.0),
    "qwen-forward": (95.4, 36.3),
    # FlopCounterMode over ours on the meta device at 1024² with 512 text rows (aten.mm and aten.bmm).
    "flux2-forward": (253.4, 29.2),
}
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
#: Qwen/Qwen-Image transformer/config.json.
QWEN_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}  # fmt: skip
TINY_QWEN = {**QWEN_CONFIG, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
             "joint_attention_dim": 16, "axes_dims_rope": [8, 4, 4]}  # fmt: skip
#: black-forest-labs/FLUX.2-dev transformer/config.json (= diffusers' Flux2Transformer2DModel defaults).
FLUX2_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "guidance_embeds": True,
}  # fmt: skip
TINY_FLUX2 = {**FLUX2_CONFIG, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
              "num_attention_heads": 2, "joint_attention_dim": 48, "axes_dims_rope": [4, 4, 4, 4]}  # fmt: skip
#: hunyuanvideo-community/HunyuanVideo transformer/config.json (= diffusers' HunyuanVideoTransformer3DModel defaults).
HUNYUAN_CONFIG: dict[str, Any] = {
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20,
    "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1,
    "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096, "pooled_projection_dim": 768,
    "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56],
}  # fmt: skip
TINY_HUNYUAN = {**HUNYUAN_CONFIG, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
                "num_single_layers": 2, "num_refiner_layers": 1, "text_embed_dim": 32, "pooled_projection_dim": 16,
                "rope_axes_dim": [4, 6, 6]}  # fmt: skip
#: hunyuan-forward's text: diffusers' pipeline pads every prompt to max_sequence_length (256) and passes the mask; the
#: prompt itself is a detailed one of 120 tokens (prompt and closing <|eot_id|> after the template crop), which is
#: all our engine passes (each prompt's real tokens, no mask).
HUNYUAN_TEXT_TOKENS = 256
HUNYUAN_PROMPT_TOKENS = 120
#: 1280×720 -> 160×90 latents; 129 frames -> 33 latent frames (HunyuanVideo's defaults: 118 800 video tokens).
HUNYUAN_LATENT_FRAMES = 33
#: flux2-forward's text rows: FLUX.2-dev pads every prompt to max_sequence_length, 512 by default.
FLUX2_TEXT_TOKENS = 512
#: qwen-forward's text rows: a detailed prompt of ~120 words after the template crop (the model card's
#: example prompts run 60-120 words; Qwen2.5-VL's tokenizer gives about one token per English word).
QWEN_TEXT_TOKENS = 128
#: 1328² pixels -> 166² latents -> 83² packed 2x2 tokens (the engine's default size for Qwen/Qwen-Image).
QWEN_LATENT_SIDE = 83

#: Distinct static shapes one compiled function keeps (dynamo's default of 8 is below a graph sweep's).
RECOMPILE_LIMIT = 64

DIFFUSERS_COMPILED = "diffusers + torch.compile"
DIFFUSERS_GRAPHS = "diffusers + torch.compile, CUDA graphs (reduce-overhead)"

MIB = 2**20


def log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# The timing loop
# --------------------------------------------------------------------------------------------------


def keep_output(out: Any) -> tuple[Any, dict[str, Any]]:
    """The default `Variant.keep`: a private copy of a tensor output, because the next replay of a CUDA
    graph (ours or torch.compile's) overwrites the buffer the output lives in."""
    return (out.detach().clone() if isinstance(out, torch.Tensor) else out), {}


@dataclasses.dataclass
class Variant:
    """One thing to time. Only `run` is timed; `prepare` and `keep` run outside the timed region."""

    name: str
    run: Callable[[], Any]
    #: Variants of one group are timed in alternation (see `alternate`).
    group: str
    #: The variant of the same group this one is judged against (ratio of medians, verdict).
    rival: str | None = None
    #: Before every call of this variant: switches state the group's variants share (fused kernels on or
    #: off, packed projections, graphs installed or not) to this variant's.
    prepare: Callable[[], None] | None = None
    #: After each timed repetition: (the output kept for quality comparisons, details of the repetition)
    #: from what `run` returned. Only the last repetition's output is kept.
    keep: Callable[[Any], tuple[Any, dict[str, Any]]] = keep_output


@dataclasses.dataclass
class Measured:
    variant: Variant
    warmup_s: float
    #: One value per repetition, in the order they ran: the mean ms of that repetition's calls.
    times_ms: list[float] = dataclasses.field(default_factory=list)
    peaks_mib: list[float] = dataclasses.field(default_factory=list)
    above_start_mib: list[float] = dataclasses.field(default_factory=list)
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    output: Any = None

    @property
    def spread(self) -> bench_stats.Spread:
        return bench_stats.spread(self.times_ms)

    @property
    def peak_mib(self) -> float | None:
        return max(self.peaks_mib) if self.peaks_mib else None

    @property
    def peak_above_start_mib(self) -> float | None:
        return max(self.above_start_mib) if self.above_start_mib else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(variants: Sequence[Variant], calls: int, device: torch.device) -> dict[str, Measured]:
    """`calls` untimed calls of every variant, in order: compilation, CUDA-graph capture, cuDNN plans and
    the allocator settle before anything is timed."""
    measured: dict[str, Measured] = {}
    with torch.inference_mode():
        for variant in variants:
            began = time.perf_counter()
            for _ in range(calls):
                if variant.prepare is not None:
                    variant.prepare()
                variant.run()
            sync(device)
            measured[variant.name] = Measured(variant, time.perf_counter() - began)
            log(f"{variant.name}: {calls} warm-up call(s) in {measured[variant.name].warmup_s:.1f} s")
    return measured


def time_alternating(
    measured: dict[str, Measured],
    reps: int,
    runs: int,
    device: torch.device,
    wall_clock: bool = False,
    after_repetition: Callable[[], None] | None = None,
) -> None:
    """`reps` repetitions; each times every variant once, in `measured`'s order, as the mean of `runs`
    consecutive calls. CUDA events bracket a forward's calls; `wall_clock` (whole generations, whose host
    work is part of the cost) reads the host clock between two device synchronizations instead."""
    events = device.type == "cuda" and not wall_clock
    with torch.inference_mode():
        for rep in range(reps):
            for m in measured.values():
                variant, out = m.variant, None
                if variant.prepare is not None:
                    variant.prepare()
                sync(device)
                start_bytes = None
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    start_bytes = torch.cuda.memory_allocated(device)
                if events:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(runs):
                        out = variant.run()
                    end.record()
                    end.synchronize()
                    ms = start.elapsed_time(end) / runs
                else:
                    began = time.perf_counter()
                    for _ in range(runs):
                        out = variant.run()
                    sync(device)
                    ms = (time.perf_counter() - began) * 1000 / runs
                if start_bytes is not None:
                    peak = torch.cuda.max_memory_allocated(device)
                    m.peaks_mib.append(peak / MIB)
                    m.above_start_mib.append((peak - start_bytes) / MIB)
                m.times_ms.append(ms)
                m.output, details = variant.keep(out)
                m.details.append(details)
            times = ", ".join(f"{name} {m.times_ms[-1]:.2f}" for name, m in measured.items())
            log(f"repetition {rep + 1}/{reps} (ms): {times}")
            if after_repetition is not None:
                after_repetition()


def check_group(variants: Sequence[Variant]) -> None:
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names repeat: {names}")
    for v in variants:
        if v.rival is not None and v.rival not in names:
            raise ValueError(f"{v.name}: its rival {v.rival!r} is not timed in the same alternation")


def alternate(variants: Sequence[Variant], args: argparse.Namespace, wall_clock: bool = False) -> dict[str, Measured]:
    """Warms every variant up, then times them in alternation (`--warmup`, `--reps`, `--runs`)."""
    check_group(variants)
    measured = warm_up(variants, args.warmup, args.device)
    time_alternating(measured, args.reps, args.runs, args.device, wall_clock)
    return measured


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def measured_rows(measured: dict[str, Measured], unit: str, device: torch.device) -> list[dict[str, Any]]:
    """One display row per variant: median, min-max, spread, peak memory, and the verdict against its rival."""
    scale = 1000.0 if unit == "s" else 1.0
    rows = []
    for name, m in measured.items():
        s = m.spread
        row: dict[str, Any] = {
            "group": m.variant.group,
            "variant": name,
            f"median {unit}": s.median / scale,
            f"min–max {unit}": f"{_fmt(s.low / scale)}–{_fmt(s.high / scale)}",
            "spread": f"{100 * s.rel_spread:.1f} %",
            "peak MiB": _peak(m.peak_mib, device),
            "peak above start MiB": _peak(m.peak_above_start_mib, device),
        }
        rival = measured.get(m.variant.rival) if m.variant.rival else None
        row["vs"] = None if rival is None else rival.variant.name
        row["ratio"] = None if rival is None else f"{s.median / rival.spread.median:.3f}×"
        row["verdict"] = None if rival is None else bench_stats.verdict(m.times_ms, rival.times_ms)
        row["warm-up s"] = m.warmup_s
        rows.append(row)
    return rows


def _peak(value: float | None, device: torch.device) -> Any:
    # Never 0 on the CPU: torch only tracks the GPU's allocator, so there is nothing to report.
    return "n/a" if device.type != "cuda" or value is None else value


def measured_json(measured: dict[str, Measured]) -> dict[str, Any]:
    out = {}
    for name, m in measured.items():
        s = m.spread
        rival = measured.get(m.variant.rival) if m.variant.rival else None
        out[name] = {
            "group": m.variant.group,
            "rival": m.variant.rival,
            "times_ms": [round(t, 4) for t in m.times_ms],
            "median_ms": s.median,
            "min_ms": s.low,
            "max_ms": s.high,
            "q1_ms": s.q1,
            "q3_ms": s.q3,
            "rel_spread": s.rel_spread,
            "peak_mib": m.peak_mib,
            "peak_above_start_mib": m.peak_above_start_mib,
            "warmup_s": m.warmup_s,
            "ratio_to_rival": None if rival is None else s.median / rival.spread.median,
            "verdict": None if rival is None else bench_stats.verdict(m.times_ms, rival.times_ms),
            "details": m.details,
        }
    return out


def scheme_note(args: argparse.Namespace, what: str) -> str:
    return (
        f"Each variant: {args.warmup} untimed warm-up {what}(s), then {args.reps} repetitions alternating with the "
        f"other variants of its group, each the mean of {args.runs} {what}(s); median, min–max and spread "
        f"(max - min) / median over the repetitions. {bench_stats.RULE}."
    )


def memory_note(device: torch.device) -> str:
    if device.type != "cuda":
        return "Peak memory: n/a on the CPU (torch.cuda.max_memory_allocated counts GPU memory only)."
    return (
        "Peak MiB: torch.cuda.max_memory_allocated, reset before each repetition, highest over the repetitions; "
        "it counts everything this process holds (both sides' weights, CUDA-graph pools captured so far). "
        "Peak above start: the same minus what was allocated when the repetition began (activations, workspaces)."
    )


def max_abs_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max())


def max_abs(ref: torch.Tensor) -> float:
    return max(float(ref.float().abs().max()), 1e-12)


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
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(record, indent=1, default=str))
    first = [key for key in ("group", "variant") if any(key in row for row in rows)]
    columns = first + list(dict.fromkeys(key for row in rows for key in row if key not in first))
    lines = [
        f"# {args.name}",
        "",
        f"* **Card:** {record['card']}",
        f"* **Date:** {record['date']}",
        f"* **Commit:** `{record['commit']}`",
        f"* **Command:** `{record['command']}`",
        f"* **Software:** torch {record['torch']}, diffusers {record.get('diffusers', '-')}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    lines += [""] + [f"* {note}" for note in notes]
    (args.out_dir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
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
# Giving diffusers the same advantages
# --------------------------------------------------------------------------------------------------


def shared_twin(module: nn.Module) -> nn.Module:
    """A second diffusers model of `module`'s class and config holding the very same tensors (no copy),
    so one side can be compiled differently (whole, with CUDA graphs) while the other stays as it was
    and both can be timed in alternation."""
    with torch.device("meta"):
        twin = type(module).from_config(module.config)
    twin.load_state_dict(module.state_dict(), assign=True)
    # Non-persistent buffers (Wan's RoPE tables) are not in the state dict: share them as well.
    source = dict(module.named_buffers())
    for name, buffer in list(twin.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            twin.get_submodule(owner)._buffers[leaf] = source[name]
    share_plain_tensors(twin, module)
    meta = [name for name, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"{type(module).__name__} twin: tensors left on the meta device: {meta[:5]}")
    return twin.eval().requires_grad_(False)


def share_plain_tensors(twin: nn.Module, source: nn.Module) -> None:
    """Tensors kept as plain attributes, neither parameter nor buffer (diffusers' QwenEmbedRope keeps its
    complex RoPE tables so, since a buffer would lose their imaginary part under `.to(dtype)`), come out on
    the meta device when the twin is built there: take the source's."""
    sources = dict(source.named_modules())
    for name, module in twin.named_modules():
        for attribute, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, attribute, getattr(sources[name], attribute))


def raise_recompile_limit() -> None:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compile_with_cuda_graphs(model: nn.Module, backend: str) -> nn.Module:
    """diffusers' transformer compiled whole with `mode="reduce-overhead"` (inductor's CUDA graphs, static
    shapes): the peer's counterpart of our graph of the whole forward.

    Whole, not per block: a chain of reduce-overhead regions fails in torch 2.11 (each call starts a new
    CUDA-graph generation, which frees the previous block's output while the next block still reads it:
    pytorch/pytorch#160281). Outputs are copied out, as our `CudaGraphRunner` does, because the next replay
    overwrites the graph's output buffer (Wan's CFG keeps the conditional prediction while the
    unconditional forward runs). With another `backend` than inductor the mode is ignored: CPU smoke tests.
    """
    raise_recompile_limit()
    build_lazy_rope_tables(model)
    compiled = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))

    model.forward = forward  # an instance attribute: the pipeline keeps calling `model(...)` as before
    return model


def build_lazy_rope_tables(model: nn.Module) -> None:
    """diffusers' Z-Image transformer builds its RoPE tables (a plain `RopeEmbedder` object's `freqs_cis`) on its
    first call, inside a `torch.device("cpu")` context that dynamo cannot trace (fullgraph fails: "Unsupported
    context manager"). Build them the same way beforehand, on the model's device, so the whole forward compiles."""
    rope = getattr(model, "rope_embedder", None)
    if rope is None or getattr(rope, "freqs_cis", ()) is not None:
        return
    device = next(model.parameters()).device
    tables = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
    rope.freqs_cis = [table.to(device) for table in tables]


def reduce_overhead_note(device: torch.device) -> str:
    """Whether inductor really gave diffusers CUDA graphs: it falls back to the compiled code without them,
    with only a log line ("skipping cudagraphs due to ..."), e.g. for an input on the CPU."""
    from torch._dynamo.utils import counters

    if device.type != "cuda":
        return "CPU: nothing is captured; the CUDA-graph rows only smoke-test this script."
    skips = int(counters["inductor"]["cudagraph_skips"])
    if skips == 0:
        return f"{DIFFUSERS_GRAPHS}: inductor reported no skipped CUDA graph (counters['inductor']['cudagraph_skips'] = 0)."
    return (
        f"**{DIFFUSERS_GRAPHS}: inductor skipped CUDA graphs {skips} time(s)**, so those rows ran (partly) without "
        "them: see the log's 'skipping cudagraphs' lines."
    )


def compile_blocks_static(model: nn.Module, backend: str) -> None:
    """diffusers' own regional compilation, with static shapes as ours uses."""
    raise_recompile_limit()
    model.compile_repeated_blocks(fullgraph=True, dynamic=False, backend=backend)


def wants_graphs(mode: str, device: torch.device, tokens: int) -> bool:
    """Whether ours replays CUDA graphs at this shape under `--cuda-graphs mode` (the engine's rule: `auto`
    up to `AUTO_MAX_TOKENS` tokens, on a GPU). `on` on the CPU keeps the graph variants as a smoke test
    of this script: nothing is captured there."""
    from sgl_diffusion.runtime.cuda_graphs import AUTO_MAX_TOKENS

    if mode == "on":
        return True
    return mode == "auto" and device.type == "cuda" and tokens <= AUTO_MAX_TOKENS


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
    if workload == "flux2-forward":
        from sgl_diffusion.pipelines.flux2 import image_position_ids, text_position_ids

        side, txt = (size or 8, 16) if tiny else (size or 64, FLUX2_TEXT_TOKENS)
        cfg = TINY_FLUX2 if tiny else FLUX2_CONFIG
        # The ids the pipelines build: (0, row, column, 0) per image token, (0, 0, 0, index) per text row.
        return {
            "hidden_states": randn(batch, side * side, cfg["in_channels"]),
            "encoder_hidden_states": randn(batch, txt, cfg["joint_attention_dim"]),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "guidance": torch.full((batch,), 4.0, device=device, dtype=torch.float32),
            "img_ids": image_position_ids(side, side, 0, device),
            "txt_ids": text_position_ids(txt, device),
        }
    if workload == "hunyuan-forward":
        frames, height, width = (size or 3, 4, 6) if tiny else (size or HUNYUAN_LATENT_FRAMES, 90, 160)
        txt, real = (16, 9) if tiny else (HUNYUAN_TEXT_TOKENS, HUNYUAN_PROMPT_TOKENS)
        cfg = TINY_HUNYUAN if tiny else HUNYUAN_CONFIG
        # What HunyuanVideoPipeline passes: float32 timestep on the 0..1000 scale, guidance x 1000 and the text mask
        # in the transformer's dtype.
        mask = torch.zeros(batch, txt, device=device, dtype=dtype)
        mask[:, :real] = 1
        return {
            "hidden_states": randn(batch, cfg["in_channels"], frames, height, width),
            "timestep": torch.full((batch,), 900.0, device=device),
            "encoder_hidden_states": randn(batch, txt, cfg["text_embed_dim"]),
            "encoder_attention_mask": mask,
            "pooled_projections": randn(batch, cfg["pooled_projection_dim"]),
            "guidance": torch.full((batch,), 6000.0, device=device, dtype=dtype),
        }
    if workload == "qwen-forward":
        side, txt = (size or 4, 8) if tiny else (size or QWEN_LATENT_SIDE, QWEN_TEXT_TOKENS)
        cfg = TINY_QWEN if tiny else QWEN_CONFIG
        # timestep: the sigma-scale t in [0, 1] both models take (the pipelines pass scheduler t / 1000); no
        # text mask: one prompt, no padding (as either pipeline calls it for a single prompt).
        return {
            "hidden_states": randn(batch, side * side, cfg["in_channels"]),
            "encoder_hidden_states": randn(batch, txt, cfg["joint_attention_dim"]),
            "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
            "img_shapes": [[(1, side, side)]] * batch,
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
    elif workload == "qwen-forward":
        from diffusers import QwenImageTransformer2DModel as Reference

        from sgl_diffusion.models.qwen_image import QwenImageTransformer2DModel as Ours

        config = TINY_QWEN if tiny else QWEN_CONFIG
    elif workload == "flux2-forward":
        from diffusers import Flux2Transformer2DModel as Reference

        from sgl_diffusion.models.flux2 import Flux2Transformer2DModel as Ours

        config = TINY_FLUX2 if tiny else FLUX2_CONFIG
    elif workload == "hunyuan-forward":
        from diffusers import HunyuanVideoTransformer3DModel as Reference

        from sgl_diffusion.models.hunyuan_video import HunyuanVideoTransformer3DModel as Ours

        config = TINY_HUNYUAN if tiny else HUNYUAN_CONFIG
    else:
        from diffusers import WanTransformer3DModel as Reference

        from sgl_diffusion.models.wan import WanTransformer3DModel as Ours

        config = TINY_WAN if tiny else WAN_CONFIG
    torch.manual_seed(0)
    if workload in SHARED_WEIGHTS:
        # Built in the target dtype: Qwen-Image's 20.43 B parameters in fp32 (81.7 GB) would not fit an H100, nor
        # FLUX.2-dev's 32.22 B (128.9 GB).
        from build_random_flux import default_dtype_and_device

        with default_dtype_and_device(dtype, device):
            reference = Reference(**config).eval().requires_grad_(False)
    else:
        with torch.device(device):
            reference = Reference(**config).to(dtype).eval().requires_grad_(False)
    for p in reference.parameters():
        p.data.normal_(0, 0.02)
    with torch.device("meta"):
        ours = Ours.from_config(config)
    if workload in SHARED_WEIGHTS:
        # Ours' parameters become diffusers' tensors (no copy: two copies do not fit, see the docstring).
        ours.load_state_dict(reference.state_dict(), assign=True)
        if not shares_weights(ours, reference):
            raise RuntimeError(f"{workload}: ours does not alias diffusers' weights")
        return reference, ours.eval().requires_grad_(False)
    ours = ours.to_empty(device=device)
    ours.load_state_dict(reference.state_dict())
    return reference, ours.to(dtype).eval().requires_grad_(False)


#: Forward workloads whose two models share one set of weight tensors instead of holding a copy each, and why.
SHARED_WEIGHTS = {
    "qwen-forward": "two copies of 20.43 B parameters, 2 x 38.1 GiB, do not fit an 80 GB H100",
    "flux2-forward": "two copies of 32.22 B parameters, 2 x 60.0 GiB, do not fit an 80 GB H100",
    "hunyuan-forward": "a second copy of 12.82 B parameters, 23.9 GiB, would take the room 720p x 129 frames' "
    "activations need",
}
#: Forward workloads whose model ours cannot replay as a CUDA graph (`CudaGraphRunner` runs calls with a
#: list argument, Qwen-Image's `img_shapes`, without a graph).
NO_GRAPHS = {"qwen-forward": "ours' CudaGraphRunner does not capture a call with a list argument (img_shapes)"}


def ours_inputs(workload: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What ours is called with: `inputs` (diffusers' call), except where our engine passes the model something
    else. hunyuan-forward: each prompt's real tokens and no mask, as the engine's HunyuanVideo pipeline passes them
    (the padding diffusers masks out never reaches its output); every row has the same prompt length here."""
    if workload != "hunyuan-forward":
        return inputs
    mask = inputs["encoder_attention_mask"]
    real = int(mask[0].sum())
    ours = {key: value for key, value in inputs.items() if key != "encoder_attention_mask"}
    ours["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :real].contiguous()
    return ours


def counted_tflop(model: nn.Module, inputs: dict[str, Any]) -> tuple[float, float]:
    """(linear, attention) TFLOP of one forward of `model`'s architecture on `inputs`' shapes: FlopCounterMode over a
    twin on the meta device (no memory, no time). Attention is what the counter books under batched matmuls (the
    meta device runs SDPA as its math decomposition) and attention ops; the rest (GEMMs, the patch convolution) is
    linear."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = type(model).from_config(model.config)
    # The twin takes the model's own dtype per tensor (bf16 weights, any fp32 ones it keeps): from_config alone
    # builds fp32, which a bf16 input does not meet (the patch convolution refuses mixed dtypes).
    twin.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}, assign=True)
    meta = {key: torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        twin(**meta)
    linear = attention = 0.0
    for op, flops in counter.get_flop_counts()["Global"].items():
        if "bmm" in str(op) or "attention" in str(op):
            attention += flops
        else:
            linear += flops
    return linear / 1e12, attention / 1e12


def shares_weights(ours: nn.Module, reference: nn.Module) -> bool:
    """Whether every parameter of ours is the storage of diffusers' parameter of the same name."""
    theirs = dict(reference.named_parameters())
    return all(p.data_ptr() == theirs[name].data_ptr() for name, p in ours.named_parameters())


def ours_attention(model: nn.Module, backend: str | None) -> Callable[[], None]:
    """A variant's `prepare`: our model on this attention backend (None: the one it was built with). Its compiled
    blocks keep one graph per backend (the attribute is guarded), so alternating variants do not recompile."""
    default = model.attention_backend

    def prepare() -> None:
        model.attention_backend = default if backend is None else backend

    return prepare


def usable_attention_backends(
    model: nn.Module, names: list[str], device: torch.device, dtype: torch.dtype, notes: list[str]
) -> list[str]:
    """`--ours-attention`'s backends that can run here (resolved as the engine resolves them); a note for each that
    cannot, with the reason."""
    from sgl_diffusion.layers.attention import attention_kernel_label, resolve_attention_backend

    if names and not hasattr(model, "attention_backend"):
        raise SystemExit(f"--ours-attention: {type(model).__name__} has no attention_backend to switch")
    usable = []
    for name in names:
        try:
            resolved = resolve_attention_backend(name, device=device, dtype=dtype, video_tokens=True)
        except ValueError as err:
            notes.append(f"No row for attention {name}: {err}")
            continue
        if resolved == model.attention_backend or resolved in usable:
            notes.append(f"No row for attention {name}: it resolves to {resolved}, which has one.")
            continue
        usable.append(resolved)
        build = attention_kernel_label(resolved)
        notes.append(f"Attention {resolved}" + (f": {build}." if build else f" (asked as {name})."))
    return usable


class OursSwitches:
    """Puts our model in one variant's configuration before its call: the eager variants share one model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.packed = False

    def set(self, fused_kernels: bool, packed: bool) -> None:
        from sgl_diffusion.layers import fused

        fused.set_fused_kernels(fused_kernels)
        if packed != self.packed:
            if packed:
                self.model.fuse_projections()
            else:
                self.model.unfuse_projections()
            self.packed = packed


#: --vsa-sparsity / --sta-window: the group of sparse attention rows, and its dense rival's name.
SPARSE_GROUP = "lossy: sparse attention"
SPARSE_DENSE = "ours eager, fused kernels, dense attention"
#: The forward workloads whose models run each sparse backend.
SPARSE_WORKLOADS = {"video_sparse_attn": ("wan-forward",), "sliding_tile_attn": ("wan-forward", "hunyuan-forward")}


@dataclasses.dataclass
class SparseTwin:
    """--vsa-sparsity / --sta-window: ours' weights in a model on sparse video attention (VSA with FastWan's gate
    projections, random here; STA with one window for every layer and head), for the speed-up and the output
    change against dense attention. ``settings``: each row's label and the backend's settings."""

    model: nn.Module
    inputs: dict[str, Any]
    dense_state: Callable[[], None]
    settings: list[tuple[str, Any]]

    @classmethod
    def build(
        cls,
        args: argparse.Namespace,
        ours: nn.Module,
        inputs: dict[str, Any],
        dense_state: Callable[[], None],
        dtype: torch.dtype,
    ) -> SparseTwin | None:
        """None without --vsa-sparsity or --sta-window; ``inputs``: ours' (the twin gets the same)."""
        from sgl_diffusion.layers.sparse_attention import SlidingTileStrategy, VideoSparseSettings
        from sgl_diffusion.runtime.compile import repeated_blocks

        if args.vsa_sparsity and args.sta_window:
            raise SystemExit("--vsa-sparsity and --sta-window: one sparse backend per run")
        if args.vsa_sparsity:
            backend = "video_sparse_attn"
            settings = [
                (f"{backend}, VSA_sparsity {s}", VideoSparseSettings(vsa_sparsity=s)) for s in args.vsa_sparsity
            ]
        elif args.sta_window:
            backend = "sliding_tile_attn"
            heads, layers = ours.config.num_attention_heads, len(repeated_blocks(ours))
            settings = []
            for window in args.sta_window:
                every = {f"0_{layer}_{head}": list(window) for layer in range(layers) for head in range(heads)}
                strategy = SlidingTileStrategy.from_mapping(every, source=f"window {tuple(window)}")
                settings.append((f"{backend}, window {tuple(window)}", VideoSparseSettings(strategy=strategy)))
        else:
            return None
        if args.workload not in SPARSE_WORKLOADS[backend]:
            raise SystemExit(f"{backend}: {' / '.join(SPARSE_WORKLOADS[backend])} only (the models that run it)")
        with torch.device(args.device):
            sparse = type(ours).from_config(ours.config, attention_backend=backend, video_sparse=settings[0][1])
        sparse.to(dtype)
        gates = [name for name, _ in sparse.named_parameters() if "to_gate_compress" in name.split(".")]
        # assign=True: the twin's dense parameters are ours' tensors (no copy); only VSA's gates are its own.
        missing, unexpected = sparse.load_state_dict(ours.state_dict(), strict=False, assign=True)
        if sorted(missing) != sorted(gates) or unexpected:
            raise RuntimeError(f"sparse twin: missing {missing}, unexpected {unexpected}")
        for name, p in sparse.named_parameters():
            if name in gates:
                p.data.normal_(0, 0.02)
        if backend == "sliding_tile_attn":
            inputs = {**inputs, "attention_step": 0}
        return cls(sparse.eval().requires_grad_(False), inputs, dense_state, settings)

    def run(self) -> torch.Tensor:
        return self.model(**self.inputs)

    def at(self, settings: Any) -> Callable[[], None]:
        def prepare() -> None:
            self.dense_state()  # the same fused kernels as the dense rows
            self.model.video_sparse = settings

        return prepare

    def variants(self, prefix: str, group: str, rival: str) -> list[Variant]:
        return [Variant(f"{prefix}, {label}", self.run, group, rival, self.at(s)) for label, s in self.settings]


def run_forward(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from sgl_diffusion.runtime.compile import compile_repeated_blocks
    from sgl_diffusion.runtime.cuda_graphs import CudaGraphRunner, batch_tokens

    device, dtype = args.device, torch.bfloat16 if args.device.type == "cuda" else torch.float32
    reference, ours = build_forward_pair(args.workload, args.tiny, device, dtype)
    notes_before: list[str] = []
    inputs = forward_inputs(args.workload, args.tiny, device, dtype, size=args.latent_frames)
    mine = ours_inputs(args.workload, inputs)
    if args.workload in FORWARD_TFLOP:
        linear_tflop, attention_tflop = FORWARD_TFLOP[args.workload]
    else:
        linear_tflop, attention_tflop = counted_tflop(ours, mine)
    tflop = linear_tflop + attention_tflop
    floor_ms = (linear_tflop / GEMM_TFLOPS + attention_tflop / ATTENTION_TFLOPS) * 1000
    record.update(tflop_per_forward=tflop, floor_ms=floor_ms)
    switches = OursSwitches(ours)

    def call_reference(model: nn.Module = reference) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    def call_ours(call_inputs: dict[str, Any] = mine) -> torch.Tensor:
        return ours(**call_inputs)

    def ours_as(fused_kernels: bool, packed: bool) -> Callable[[], None]:
        return lambda: switches.set(fused_kernels, packed)

    eager = "diffusers eager"
    fused = "ours eager, fused kernels"
    eager_variants = [
        Variant(eager, call_reference, "eager"),
        Variant("ours eager, torch ops", call_ours, "eager", eager, ours_as(False, False)),
        Variant(fused, call_ours, "eager", eager, ours_as(True, False)),
        Variant(f"{fused}, packed QKV", call_ours, "eager", fused, ours_as(True, True)),
    ]
    if mine is not inputs:
        # The same model on diffusers' own inputs: what the engine's way of passing them is worth.
        eager_variants.append(Variant(f"{fused}, diffusers' inputs", lambda: call_ours(inputs), "eager", fused,
                                      ours_as(True, False)))  # fmt: skip
    if args.eager_variants == "fused":
        eager_variants = [v for v in eager_variants if v.name in (eager, fused)]
    measured = alternate(eager_variants, args)
    sparse = SparseTwin.build(args, ours, mine, ours_as(True, False), dtype)
    if sparse is not None:
        dense = Variant(SPARSE_DENSE, call_ours, SPARSE_GROUP, None, sparse.dense_state)
        measured |= alternate([dense, *sparse.variants("ours eager", SPARSE_GROUP, SPARSE_DENSE)], args)
    switches.set(True, False)  # the engine's default: packing measured no faster (see --compile-ablations)
    graphs = False
    if args.compile:
        graphs = wants_graphs(args.cuda_graphs, device, batch_tokens(ours)(mine)) and args.workload not in NO_GRAPHS
        twin = shared_twin(reference) if graphs else None
        compile_blocks_static(reference, args.compile_backend)
        compile_repeated_blocks(ours, backend=args.compile_backend)
        compiled = [
            Variant(DIFFUSERS_COMPILED, call_reference, "compiled"),
            Variant(
                "ours + torch.compile",
                call_ours,
                "compiled",
                DIFFUSERS_COMPILED,
                ours_attention(ours, None) if args.ours_attention else None,
            ),
        ]
        for backend in usable_attention_backends(ours, args.ours_attention, device, dtype, notes_before):
            compiled.append(Variant(f"ours + torch.compile, attention {backend}", call_ours, "compiled",
                                    "ours + torch.compile", ours_attention(ours, backend)))  # fmt: skip
        if sparse is not None:
            compile_repeated_blocks(sparse.model, backend=args.compile_backend)
            compiled += sparse.variants("ours + torch.compile", "compiled", "ours + torch.compile")
        if twin is not None:
            compile_with_cuda_graphs(twin, args.compile_backend)
            runner = CudaGraphRunner(ours, ours.forward, capture_all=True, tokens=batch_tokens(ours))
            compiled += [
                Variant(DIFFUSERS_GRAPHS, lambda: call_reference(twin), "compiled"),
                Variant("ours + torch.compile + CUDA graph", lambda: runner(**mine), "compiled", DIFFUSERS_GRAPHS),
            ]
        measured |= alternate(compiled, args)
        if args.compile_ablations:
            # Each needs a fresh compile of ours, so they run one at a time after the groups above.
            for name, fused_kernels, packed in (
                ("ours + torch.compile, packed q/k/v GEMMs", True, True),
                ("ours + torch.compile, no GEMM epilogues", False, False),
            ):
                switches.set(fused_kernels, packed)
                torch._dynamo.reset()
                measured |= alternate([Variant(name, call_ours, "ablation, timed alone")], args)
            switches.set(True, False)
    expected = measured[eager].output
    rows = measured_rows(measured, "ms", device)
    for row, m in zip(rows, measured.values(), strict=True):
        ms = m.spread.median
        same = m.variant.name == eager
        row.update(
            {
                "TFLOP/s": tflop / ms * 1000 if not args.tiny else None,
                "x floor": ms / floor_ms if not args.tiny else None,
                "rel L2 vs diffusers eager": None if same else rel_l2(m.output, expected),
                "max abs diff": None if same else max_abs_diff(m.output, expected),
                "max rel diff": None if same else max_abs_diff(m.output, expected) / max_abs(expected),
            }
        )
        if sparse is not None and m.variant.run == sparse.run:
            dense = measured[SPARSE_DENSE].output
            row["rel L2 vs ours dense"] = rel_l2(m.output, dense)
            row["max rel diff vs ours dense"] = max_abs_diff(m.output, dense) / max_abs(dense)
    record["variants"] = measured_json(measured)
    notes = [
        (
            f"{tflop:.1f} TFLOP per forward ({linear_tflop:.1f} linear + {attention_tflop:.1f} attention); floor "
            f"{floor_ms:.1f} ms = linear / {GEMM_TFLOPS:.0f} + attention / {ATTENTION_TFLOPS:.0f} TFLOP/s "
            "(gpu.md's measured H100 ceilings)."
        ),
        (
            "Both models hold the same random N(0, 0.02) weights (bf16 on the GPU); batch 1."
            if args.workload not in SHARED_WEIGHTS
            else "Random N(0, 0.02) weights (bf16 on the GPU), one set: ours' parameters are diffusers' tensors "
            f"({SHARED_WEIGHTS[args.workload]}); batch 1."
        ),
        (
            "max rel diff = max |ours - diffusers eager| / max |diffusers eager| over all output elements; "
            "rel L2 = ||ours - ref|| / ||ref||."
        ),
        scheme_note(args, "call"),
        memory_note(device),
        (
            "Compiled: both sides compile their repeated blocks with dynamic=False. "
            + (
                "Ours replays CUDA graphs at this shape (--cuda-graphs "
                f"{args.cuda_graphs}), so diffusers' whole transformer is also compiled with "
                "mode='reduce-overhead' (CUDA graphs); both copy their output out of the graph."
                if graphs
                else f"No CUDA-graph rows: {NO_GRAPHS[args.workload]}."
                if args.workload in NO_GRAPHS
                else f"No CUDA-graph rows: ours would not capture this shape (--cuda-graphs {args.cuda_graphs})."
            )
            if args.compile
            else "No compiled rows (--no-compile, or the CPU without --compile-backend)."
        ),
    ]
    if graphs:
        notes.append(reduce_overhead_note(device))
    if sparse is not None:
        notes.append(
            "Sparse attention rows (lossy, opt-in): ours with --attention-backend video_sparse_attn (FastWan's "
            "recipe; its gate projections to_gate_compress random N(0, 0.02) here) or sliding_tile_attn (one window "
            f"for every layer and head), eager in group '{SPARSE_GROUP}' against the same weights on dense "
            "attention and compiled beside ours + torch.compile, timed in alternation. TFLOP/s and x floor count "
            "the dense FLOPs. The differences (vs ours eager on dense attention) are on random weights, whose "
            "attention is nearly uniform: a trained model's attention is peaked, which is what keeping a few tiles "
            "relies on, so they overstate the loss."
        )
    notes += notes_before
    if args.workload == "hunyuan-forward":
        video = tuple(inputs["hidden_states"].shape[2:])
        notes.append(
            f"Latents {video} (frames, height, width: {ours.tokens_per_sample(inputs['hidden_states'])} video tokens). "
            f"Text: diffusers gets {inputs['encoder_hidden_states'].shape[1]} rows and the mask of "
            f"{mine['encoder_hidden_states'].shape[1]} real tokens, as HunyuanVideoPipeline pads a prompt; ours gets "
            "the real tokens alone, no mask, as our engine passes them (the same math; the padding never reaches "
            "the output), which lets attention run without a mask (cuDNN / flash kernels instead of the "
            "masked ones). The 'diffusers' inputs' row runs ours on diffusers' padded text and mask. FLOPs: ours' "
            "(its text rows), counted by FlopCounterMode at this shape."
        )
    if args.cfg_shapes:
        cfg = cfg_batching(args, ours, device, dtype)
        rows += measured_rows(cfg, "ms", device)
        record["variants"] |= measured_json(cfg)
        notes.append("cfg rows: ours (as last configured) with both CFG branches as one batch-2 forward against "
                     "two batch-1 forwards, at several token counts.")  # fmt: skip
    return rows, notes


def cfg_batching(
    args: argparse.Namespace, ours: nn.Module, device: torch.device, dtype: torch.dtype
) -> dict[str, Measured]:
    """Batch-2 forward against two batch-1 forwards at smaller shapes (picks CFG_BATCH_MAX_TOKENS)."""
    measured: dict[str, Measured] = {}
    for size in args.cfg_shapes:
        one = ours_inputs(args.workload, forward_inputs(args.workload, args.tiny, device, dtype, batch=1, size=size))
        two = ours_inputs(args.workload, forward_inputs(args.workload, args.tiny, device, dtype, batch=2, size=size))
        hidden = one["hidden_states"]
        packed = ("flux-forward", "qwen-forward", "flux2-forward")
        tokens = hidden.shape[1] if args.workload in packed else hidden[0, 0].numel() // 4
        group = f"cfg, {tokens} tokens"
        single = f"{group}: 2 x batch 1"
        measured |= alternate(
            [
                Variant(single, lambda one=one: [ours(**one), ours(**one)][1], group),
                Variant(f"{group}: batch 2", lambda two=two: ours(**two), group, single),
            ],
            args,
        )
    return measured


#: `--graph-shapes` defaults: FLUX 256², 512², 768², 1024²; Wan 480p with 1, 5 and 9 frames.
GRAPH_SHAPES = {"flux-forward": [16, 32, 48, 64], "wan-forward": [1, 2, 3]}


def run_graph_sweep(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Where CUDA graphs pay (picks `cuda_graphs.AUTO_MAX_TOKENS`): per shape and batch size, ours eager and
    compiled, each plain and replayed as a graph, against diffusers compiled with and without graphs."""
    from sgl_diffusion.runtime.compile import compile_repeated_blocks
    from sgl_diffusion.runtime.cuda_graphs import CudaGraphRunner, batch_tokens

    workload = args.workload.replace("-graphs", "-forward")
    device, dtype = args.device, torch.bfloat16 if args.device.type == "cuda" else torch.float32
    reference, ours = build_forward_pair(workload, args.tiny, device, dtype)
    cases = [(size, batch) for size in (args.graph_shapes or GRAPH_SHAPES[workload]) for batch in (1, 2)]
    inputs = {case: forward_inputs(workload, args.tiny, device, dtype, batch=case[1], size=case[0]) for case in cases}
    plain = ours.forward
    tokens = batch_tokens(ours)
    labels = {case: f"{tokens(inputs[case])} tokens (batch {case[1]})" for case in cases}
    # The graph rows need a GPU; `--cuda-graphs on` keeps them on the CPU as a smoke test (nothing captured).
    graphs = device.type == "cuda" or args.cuda_graphs == "on"
    measured: dict[str, Measured] = {}

    def graphed() -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        # One runner per mode, over all shapes, as the engine has one per model (one memory pool).
        runner = CudaGraphRunner(ours, plain, capture_all=True, tokens=tokens)
        return lambda x: runner(**x)

    eager_graph = graphed()
    for case in cases:
        x, label = inputs[case], labels[case]
        group = [Variant(f"{label}: ours eager", lambda x=x: plain(**x), f"{label}, eager")]
        if graphs:
            group.append(Variant(f"{label}: ours eager + graph", lambda x=x: eager_graph(x), f"{label}, eager",
                                 f"{label}: ours eager"))  # fmt: skip
        measured |= alternate(group, args)
    if args.compile:
        twin = shared_twin(reference) if graphs and args.diffusers != "none" else None
        compile_repeated_blocks(ours, backend=args.compile_backend)
        if args.diffusers != "none":
            compile_blocks_static(reference, args.compile_backend)
        if twin is not None:
            compile_with_cuda_graphs(twin, args.compile_backend)
        compiled_graph = graphed()
        for case in cases:
            x, label, group_name = inputs[case], labels[case], f"{labels[case]}, compiled"
            rival = f"{label}: {DIFFUSERS_COMPILED}" if args.diffusers != "none" else None
            group = [Variant(f"{label}: ours compiled", lambda x=x: plain(**x), group_name, rival)]
            if args.diffusers != "none":
                group.append(Variant(f"{label}: {DIFFUSERS_COMPILED}",
                                     lambda x=x: reference(**x, return_dict=False)[0], group_name))  # fmt: skip
            if graphs:
                graph_rival = f"{label}: {DIFFUSERS_GRAPHS}" if twin is not None else f"{label}: ours compiled"
                group.append(Variant(f"{label}: ours compiled + graph", lambda x=x: compiled_graph(x), group_name,
                                     graph_rival))  # fmt: skip
            if twin is not None:
                group.append(Variant(f"{label}: {DIFFUSERS_GRAPHS}", lambda x=x: twin(**x, return_dict=False)[0],
                                     group_name))  # fmt: skip
            measured |= alternate(group, args)
    rows = measured_rows(measured, "ms", device)
    for row, m in zip(rows, measured.values(), strict=True):
        label = m.variant.name.split(": ")[0]
        expected = measured[f"{label}: ours eager"].output
        row["rel L2 vs ours eager"] = rel_l2(m.output, expected)
    record["variants"] = measured_json(measured)
    notes = [
        (
            f"{'Tiny' if args.tiny else 'Full-size'} {workload.split('-')[0].upper()} with random weights; "
            f"{16 if args.tiny else 512} text tokens. A graph replay includes copying the inputs into the "
            "graph's buffers and the output out of it (ours and diffusers' reduce-overhead alike)."
        ),
        "Tokens: image/video tokens of the whole batch (what `--cuda-graphs auto` compares with AUTO_MAX_TOKENS).",
        scheme_note(args, "call"),
        memory_note(device),
        (
            f"Compiled rows: dynamic=False on both sides; {DIFFUSERS_GRAPHS} = diffusers' whole transformer "
            "compiled with mode='reduce-overhead'."
        ),
    ]
    if graphs and args.compile and args.diffusers != "none":
        notes.append(reduce_overhead_note(device))
    elif graphs and device.type != "cuda":
        notes.append("CPU: nothing is captured; the graph rows only smoke-test this script.")
    return rows, notes


# --------------------------------------------------------------------------------------------------
# End-to-end workloads
# --------------------------------------------------------------------------------------------------


def build_folder(args: argparse.Namespace, family: str) -> Path:
    folder = args.work_dir / f"{family}{'-tiny' if args.tiny else ''}"
    if (folder / "model_index.json").exists():
        return folder
    import build_random_flux
    import build_random_qwen_image
    import build_random_wan
    import build_random_z_image

    builder = {
        "flux": build_random_flux,
        "wan": build_random_wan,
        "qwen_image": build_random_qwen_image,
        "z_image": build_random_z_image,
    }[family]
    began = time.perf_counter()
    argv = [str(folder), "--device", args.device.type] + (["--tiny"] if args.tiny else [])
    builder.main(argv)
    free_memory()
    log(f"built {folder} in {time.perf_counter() - began:.1f} s")
    return folder


#: qwen-e2e's prompt: words of the fixture tokenizer's corpus, so its token count (29 + the template's 5
#: closing tokens reach the DiT) is about what Qwen2.5-VL's real tokenizer gives for it.
QWEN_PROMPT = ("A watercolor painting of a lighthouse at sunset, a small boat sailing across a calm blue lake "
               "under a starry sky, highly detailed, 4k")  # fmt: skip

#: SGLang's published Qwen-Image baseline (test/server/perf_baselines/h100.json, 2026-06-14, scenario
#: qwen_image_t2i; ../shared/reference/sglang_digest.md section 10): 1 H100, 1024², 50 steps, the model's
#: default true CFG, through its HTTP server.
SGLANG_QWEN = {"size": 1024, "steps": 50, "e2e_ms": 12799, "denoise_ms": 12404, "step_ms": 248.0, "text_ms": 232,
               "decode_ms": 18}  # fmt: skip


#: Z-Image-Turbo's published SGLang numbers on 1 H100 at 1024², 9 steps (the model card's request):
#: ../shared/reference/gpu.md's end-to-end anchor (0.91 s), and the CI baseline of test/server/perf_baselines/h100.json
#: (2026-06-14, scenario zimage_image_t2i, through its HTTP server; sglang_digest.md section 10), which also splits
#: the stages.
SGLANG_ZIMAGE = {"size": 1024, "steps": 9, "e2e_ms": 910}
SGLANG_ZIMAGE_CI = {"size": 1024, "steps": 9, "e2e_ms": 1069, "denoise_ms": 772, "step_ms": 85.3, "text_ms": 131,
                    "decode_ms": 134}  # fmt: skip
#: The known ids whose model-card defaults the e2e workloads run (the random folders are no known checkpoint).
ENGINE_IDS = {"qwen_image": "Qwen/Qwen-Image", "z_image": "Tongyi-MAI/Z-Image-Turbo"}


def card_request(args: argparse.Namespace, pipeline: Any) -> dict[str, Any]:
    """The request the engine makes of a bare prompt for the pipeline's known id (`ENGINE_IDS`): its defaults
    (the loaded pipeline's spec), guidance decided by the core's rule for its guidance mode. `--steps` /
    `--size` override; `--tiny` runs 64² on the CPU."""
    if pipeline.spec.family == "qwen_image":
        return qwen_request(args, pipeline)
    d = pipeline.spec.defaults
    side = 64 if args.tiny else args.size
    # Z-Image: classifier_free_above_zero (`sgl_core::resolve`): CFG for guidance_scale > 0; the neutral
    # cfg_normalization / cfg_truncation the core fills in for this family.
    return {"prompt": QWEN_PROMPT, "negative_prompt": d.negative_prompt, "width": side or d.width,
            "height": side or d.height, "num_frames": d.num_frames,
            "num_inference_steps": args.steps or d.num_inference_steps, "guidance_scale": d.guidance_scale,
            "true_cfg_scale": d.true_cfg_scale, "cfg_enabled": d.guidance_scale > 0, "cfg_normalization": 0.0,
            "cfg_truncation": 1.0, "fps": None, "max_sequence_length": d.max_sequence_length}  # fmt: skip


def qwen_request(args: argparse.Namespace, pipeline: Any) -> dict[str, Any]:
    """The request the engine makes of a bare prompt for Qwen/Qwen-Image: its defaults (the loaded
    pipeline's spec, looked up by that id), guidance decided by the core's rule for true-CFG models
    (`sgl_core::resolve`: a default negative prompt and true_cfg_scale > 1). `--steps` / `--size` override;
    `--tiny` runs 64² on the CPU."""
    d = pipeline.spec.defaults
    side = 64 if args.tiny else args.size
    return {"prompt": QWEN_PROMPT, "negative_prompt": d.negative_prompt, "width": side or d.width,
            "height": side or d.height, "num_frames": d.num_frames,
            "num_inference_steps": args.steps or d.num_inference_steps, "guidance_scale": d.guidance_scale,
            "true_cfg_scale": d.true_cfg_scale, "cfg_enabled": d.negative_prompt is not None and d.true_cfg_scale > 1,
            "fps": None, "max_sequence_length": d.max_sequence_length}  # fmt: skip


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


def ours_executor(args: argparse.Namespace, folder: Path, hf_id: str | None = None, **options: Any):
    from sgl_diffusion.runtime.executor import PipelineExecutor

    index = json.loads((folder / "model_index.json").read_text())
    config = {
        "model_path": str(folder),
        # A random folder is no known checkpoint; the id picks the model's own defaults (Qwen-Image's).
        "hf_id": hf_id,
        "pipeline_class": index["_class_name"],
        "options": {"device": args.device.type, **options},
    }
    began = time.perf_counter()
    executor = PipelineExecutor(json.dumps(config))
    log(f"ours loaded (with {options}) in {time.perf_counter() - began:.1f} s")
    return executor


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
    elif family == "qwen_image":
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

        # On the meta device: a 38 GiB transformer built for real next to ours' would not fit an 80 GB H100.
        # Its only non-parameter state, the RoPE tables (plain attributes), is rebuilt for real on the host.
        config = QwenImageTransformer2DModel.load_config(folder / "transformer")
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel.from_config(config)
        rope = transformer.pos_embed
        transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)
        transformer.load_state_dict(c.transformer.state_dict(), assign=True)
        meta = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"diffusers' Qwen-Image transformer: tensors left on the meta device: {meta[:5]}")
        extra = {"text_encoder": c.text_encoder, "tokenizer": c.tokenizer}
        pipeline_class, scheduler_class = QwenImagePipeline, FlowMatchEulerDiscreteScheduler
    elif family == "z_image":
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

        with torch.device(device):
            transformer = ZImageTransformer2DModel.from_config(
                ZImageTransformer2DModel.load_config(folder / "transformer")
            )
        extra = {"text_encoder": c.text_encoder, "tokenizer": c.tokenizer}
        pipeline_class, scheduler_class = ZImagePipeline, FlowMatchEulerDiscreteScheduler
    else:
        from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

        with torch.device(device):
            transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(folder / "transformer"))
        extra = {"text_encoder": c.text_encoder, "tokenizer": c.tokenizer}
        pipeline_class, scheduler_class = WanPipeline, UniPCMultistepScheduler
    # Built on the device (its non-persistent buffers, e.g. Wan's RoPE table, must be real), then its
    # parameters are swapped for our loaded tensors: no second copy stays alive.
    if family != "qwen_image":
        transformer.load_state_dict(c.transformer.state_dict(), assign=True)
    transformer = transformer.to(device=device, dtype=dtype).eval()
    free_memory()
    scheduler = scheduler_class.from_pretrained(folder / "scheduler")
    pipe = pipeline_class(scheduler=scheduler, vae=c.vae, transformer=transformer, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_transformer(pipe: Any, transformer: nn.Module, folder: Path) -> Any:
    """A second diffusers pipeline of `pipe`'s class and components around another transformer (a
    differently compiled twin), with a scheduler of its own."""
    components = {**pipe.components, "transformer": transformer}
    components["scheduler"] = type(pipe.scheduler).from_pretrained(folder / "scheduler")
    other = type(pipe)(**components)
    other.set_progress_bar_config(disable=True)
    return other


def diffusers_kwargs(family: str, fields: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": fields["prompt"],
        "height": fields["height"],
        "width": fields["width"],
        "num_inference_steps": fields["num_inference_steps"],
        "guidance_scale": fields["guidance_scale"],
        "max_sequence_length": fields["max_sequence_length"],
        "output_type": "np",
    }
    if family == "qwen_image":
        # No guidance embedding: diffusers warns about (and ignores) a guidance_scale; true CFG instead.
        del kwargs["guidance_scale"]
        kwargs.update(negative_prompt=fields["negative_prompt"],
                      true_cfg_scale=fields["true_cfg_scale"] if fields["cfg_enabled"] else 1.0)  # fmt: skip
    if family == "wan":
        kwargs.update(negative_prompt=fields["negative_prompt"], num_frames=fields["num_frames"])
    return kwargs


def diffusers_generate(pipe: Any, family: str, kwargs: dict[str, Any]) -> Any:
    """One generation of diffusers' pipeline (seed 0): the image or the video as float pixels."""
    result = pipe(generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    return result.frames[0] if family == "wan" else result.images[0]


def ours_generate(pipeline: Any, request: Any) -> Any:
    """One generation of the engine's staged pipeline, as its executor runs it; returns the batch state."""
    return pipeline.run([request], lambda step, total: [])


def ours_keep(pipeline: Any) -> Callable[[Any], tuple[Any, dict[str, Any]]]:
    key = pipeline.spec.output_key

    def keep(state: Any) -> tuple[Any, dict[str, Any]]:
        perf = state.perf.as_dict()
        return state[key][0], {
            "stages_ms": {stage["name"]: stage["duration_ms"] for stage in perf["steps"]},
            "steps_ms": [step["duration_ms"] for step in perf["denoise_steps_ms"]],
        }

    return keep


def run_e2e(args: argparse.Namespace, record: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    from sgl_diffusion.runtime.compile import compile_repeated_blocks
    from sgl_diffusion.runtime.cuda_graphs import cuda_graph_runner

    family = {"flux-e2e": "flux", "wan-e2e": "wan", "qwen-e2e": "qwen_image", "zimage-e2e": "z_image"}[args.workload]
    device = args.device
    folder = build_folder(args, family)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    notes: list[str] = []

    # The engine's own compile when it is inductor's; another backend (CPU smoke tests) is applied here.
    engine_compile = args.compile and args.compile_backend == "inductor"
    # The engine refuses `--cuda-graphs on` without a GPU; on the CPU `on` only keeps diffusers' graph variant.
    cuda_graphs = args.cuda_graphs if device.type == "cuda" else "auto"
    options = {"enable_torch_compile": engine_compile, "cfg_batching": "auto", "cuda_graphs": cuda_graphs,
               "warmup": False, "vae_slicing": args.vae_slicing}  # fmt: skip
    if args.attention_backend:
        options["attention_backend"] = args.attention_backend  # the engine resolves it (and refuses it by name)
    executor = ours_executor(args, folder, ENGINE_IDS.get(family), **options)
    pipeline = executor.pipeline
    fields = card_request(args, pipeline) if family in ENGINE_IDS else e2e_request(args, family)
    request = make_request(fields, seed=0)
    record["request"] = fields
    if args.compile and not engine_compile:
        for denoiser in pipeline.denoisers():
            compile_repeated_blocks(denoiser, backend=args.compile_backend)
    runners = [cuda_graph_runner(d) for d in pipeline.denoisers()]
    ablation = args.graph_ablation and any(runners)

    def graphs(on: bool) -> Callable[[], None]:
        def switch() -> None:
            for denoiser, runner in zip(pipeline.denoisers(), runners, strict=True):
                if runner is None:
                    continue
                if on:
                    denoiser.forward = runner
                else:
                    vars(denoiser).pop("forward", None)  # back to the class's forward: no graphs

        return switch

    ours_name = f"ours{' + torch.compile' if args.compile else ''}, CUDA graphs {args.cuda_graphs}"
    ours_name += ", --vae-slicing" if args.vae_slicing else ""
    ours_name += f", --attention-backend {args.attention_backend}" if args.attention_backend else ""
    keep = ours_keep(pipeline)
    ours = Variant(ours_name, lambda: ours_generate(pipeline, request), "e2e", None, graphs(True) if ablation else None,
                   keep)  # fmt: skip
    # Ours warms up first: whether it captured graphs decides how diffusers is compiled.
    measured = warm_up([ours], args.warmup, device)
    captured = any(runner is not None and runner.stats.captures for runner in runners)
    uses_graphs = captured or (args.cuda_graphs == "on" and device.type != "cuda")
    others: list[Variant] = []
    if ablation:
        plain_name = ours_name.replace(f"CUDA graphs {args.cuda_graphs}", "no CUDA graphs")
        others.append(Variant(plain_name, ours.run, "e2e", ours_name, graphs(False), keep))
    if args.diffusers != "none":
        pipe = diffusers_pipeline(family, folder, pipeline, device, dtype)
        kwargs = diffusers_kwargs(family, fields)
        if args.diffusers in ("eager", "eager+compiled"):
            others.append(Variant("diffusers eager", lambda: diffusers_generate(pipe, family, kwargs), "e2e"))
        if args.diffusers in ("compiled", "eager+compiled") and args.compile:
            flavours = [DIFFUSERS_GRAPHS] if uses_graphs else [DIFFUSERS_COMPILED]
            if uses_graphs and ablation:
                flavours.append(DIFFUSERS_COMPILED)  # the rival of ours without graphs
            for flavour in flavours:
                twin = shared_twin(pipe.transformer)
                if flavour == DIFFUSERS_GRAPHS:
                    compile_with_cuda_graphs(twin, args.compile_backend)
                else:
                    compile_blocks_static(twin, args.compile_backend)
                other = with_transformer(pipe, twin, folder)
                others.append(Variant(flavour, lambda other=other: diffusers_generate(other, family, kwargs), "e2e"))
    names = [v.name for v in others]
    ours.rival = next((n for n in (DIFFUSERS_GRAPHS, DIFFUSERS_COMPILED, "diffusers eager") if n in names), None)
    if ablation:
        others[0].rival = DIFFUSERS_COMPILED if DIFFUSERS_COMPILED in names else ours_name
    check_group([ours, *others])
    measured |= warm_up(others, args.warmup, device)

    def rows_now() -> list[dict[str, Any]]:
        rows = measured_rows(measured, "s", device)
        reference = measured[ours_name].output
        for row, m in zip(rows, measured.values(), strict=True):
            if m.details and "stages_ms" in m.details[0]:
                stage = [d["stages_ms"] for d in m.details]
                steps = [ms for d in m.details for ms in d["steps_ms"]]
                row.update(
                    {
                        "text s": statistics.median(s.get("text_encoding", 0.0) for s in stage) / 1000,
                        "denoise s": statistics.median(s.get("denoising", 0.0) for s in stage) / 1000,
                        "decode s": statistics.median(s.get("decoding", 0.0) for s in stage) / 1000,
                        "median step ms": statistics.median(steps) if steps else None,
                    }
                )
            steps = fields["num_inference_steps"]
            row["s / step (whole request / steps)"] = m.spread.median / 1000 / steps
            if m.variant.name != ours_name:
                row["PSNR dB vs ours"] = psnr(m.output, reference)
        return rows

    def save_partial() -> None:  # a time-out still leaves every repetition finished so far
        record["variants"] = measured_json(measured)
        write_results(args, record, rows_now(), notes, quiet=True)

    time_alternating(measured, args.reps, args.runs, device, wall_clock=True, after_repetition=save_partial)
    rows = rows_now()
    record["variants"] = measured_json(measured)
    if args.lossy_attention:
        transformer = pipeline.c.transformer
        lossless = transformer.attention_backend
        for backend in args.lossy_attention:
            transformer.attention_backend = backend
            for runner in runners:
                if runner is not None:
                    runner.reset()  # a graph captured with another backend would replay that backend
            name = f"ours, attention {backend} (lossy)"
            lossy = alternate([Variant(name, ours.run, f"lossy {backend}, timed alone", keep=keep)], args, True)
            row = measured_rows(lossy, "s", device)[0]
            out = lossy[name].output
            reference = measured[ours_name].output
            row.update({"PSNR dB vs ours": psnr(out, reference), "SSIM vs ours": ssim(out, reference)})
            rows.append(row)
            record["variants"] |= measured_json(lossy)
        transformer.attention_backend = lossless
    notes += [
        f"Request: {json.dumps(fields)}; seed 0.",
        scheme_note(args, "generation"),
        memory_note(device),
        (
            "ours = the engine's staged pipeline as the executor runs it (text encoding, denoising, VAE decode to "
            "float pixels; PNG/MP4 encoding excluded; its load-time warm-up off, so both sides warm up alike); "
            "diffusers = its pipeline class over the same loaded text encoders, VAE and transformer weights, "
            "output_type='np'. Stage columns: medians over ours' repetitions."
        ),
        f"Ours {'captured' if captured else 'did not capture'} CUDA graphs for this request (--cuda-graphs "
        f"{args.cuda_graphs})"
        + (
            "."
            if not {DIFFUSERS_GRAPHS, DIFFUSERS_COMPILED} & set(names)
            else ", so diffusers' transformer is compiled whole with mode='reduce-overhead' (CUDA graphs)."
            if uses_graphs
            else ", so diffusers compiles its repeated blocks without CUDA graphs."
        )
        + (" Both sides compile with dynamic=False." if args.compile else " Nothing is compiled."),
        (
            "PSNR between ours and diffusers only shows both compute the same thing on random weights (bf16 "
            "rounding differences grow over the steps)."
        ),
    ]
    if DIFFUSERS_GRAPHS in names:
        notes.append(reduce_overhead_note(device))
    if family == "qwen_image":
        sglang_row(rows, ours_name, measured[ours_name], fields["num_inference_steps"], fields["width"], SGLANG_QWEN,
                   "h100.json", "true CFG")  # fmt: skip
        notes += qwen_e2e_notes(args, folder, fields, measured[ours_name], pipeline.c.tokenizer)
    if family == "z_image":
        for published, source in ((SGLANG_ZIMAGE, "gpu.md anchor"), (SGLANG_ZIMAGE_CI, "h100.json CI baseline")):
            sglang_row(rows, ours_name, measured[ours_name], fields["num_inference_steps"], fields["width"], published,
                       source, "no CFG")  # fmt: skip
        notes += zimage_e2e_notes(fields, measured[ours_name], pipeline)
    return rows, notes


def projected_50_steps(ours: Measured, steps: int, published_steps: int = SGLANG_QWEN["steps"]) -> float:
    """Ours' median request time with its denoising loop stretched to SGLang's step count (50 for Qwen-Image)
    at ours' median step."""
    all_steps = [ms for d in ours.details for ms in d["steps_ms"]]
    if not all_steps:
        return math.nan
    return ours.spread.median / 1000 + (published_steps - steps) * statistics.median(all_steps) / 1000


def sglang_row(
    rows: list[dict[str, Any]],
    ours_name: str,
    ours: Measured,
    steps: int,
    side: int,
    sg: dict[str, Any],
    source: str,
    guidance: str,
) -> None:
    """Adds SGLang's published number `sg` as a row of its own (not run here), and ours' projection to its
    step count. Stage columns where the source splits them."""
    for row in rows:
        if row["variant"] == ours_name:
            row[f"projected {sg['steps']} steps s"] = projected_50_steps(ours, steps, sg["steps"])
    comparable = "" if side == sg["size"] else f"; not comparable at {side}²"
    row = {
        "group": "published",
        "variant": f"SGLang, 1 H100, {sg['size']}², {sg['steps']} steps, {guidance} ({source}; not run here"
        f"{comparable})",
        "median s": sg["e2e_ms"] / 1000,
    }
    for column, key, scale in (("text s", "text_ms", 1000), ("denoise s", "denoise_ms", 1000),
                               ("decode s", "decode_ms", 1000), ("median step ms", "step_ms", 1)):  # fmt: skip
        if key in sg:
            row[column] = sg[key] / scale
    row[f"projected {sg['steps']} steps s"] = sg["e2e_ms"] / 1000
    rows.append(row)


def qwen_e2e_notes(
    args: argparse.Namespace, folder: Path, fields: dict[str, Any], ours: Measured, tokenizer: Any
) -> list[str]:
    """What qwen-e2e ran (folder, text lengths) and ours against SGLang's published H100 number."""
    import build_random_qwen_image

    from sgl_diffusion.models.qwen_image.prompt import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS

    def text_rows(text: str) -> int:  # what the DiT attends to: the templated prompt less the cropped prefix
        return len(tokenizer(PROMPT_TEMPLATE.format(text)).input_ids) - TEMPLATE_PREFIX_TOKENS

    negative = fields["negative_prompt"]
    notes = [
        (
            "Weights resident on the GPU: ours' transformer 38.1 GiB + text encoder 15.4 GiB (full size) + VAE 0.24 "
            "GiB; diffusers' pipeline holds the same tensors (no second copy), and so does its compiled twin."
        ),
        f"Text rows the transformer sees: prompt {text_rows(fields['prompt'])}"
        + (f", negative prompt {text_rows(negative)}" if fields["cfg_enabled"] else "")
        + " (the fixture tokenizer's count; each branch runs unpadded, on both sides).",
    ]
    note_file = folder / build_random_qwen_image.NOTE_FILE
    if note_file.exists():
        built = json.loads(note_file.read_text())
        layers, real = built["text_encoder_layers"], built["text_encoder_layers_real"]
        notes.append(
            (
                "Random folder (tiny configs): "
                if args.tiny
                else "Random folder: transformer and VAE at the real Qwen-Image config; text encoder Qwen2.5-VL-7B "
                "size with "
            )
            + f"{layers} of {real} text-encoder decoder layers"
            + (
                " (all)."
                if layers == real
                else f" (**shrunk to fit the disk**: text encoding runs {real - layers} "
                "fewer layers than the real model; it is ~2 % of a request)."
            )
            + f" Tokenizer: {built['tokenizer']}."
        )
    steps, side = fields["num_inference_steps"], fields["width"]
    all_steps = [ms for d in ours.details for ms in d["steps_ms"]]
    stages = [d["stages_ms"] for d in ours.details] if all_steps else []
    step_ms = statistics.median(all_steps) if all_steps else math.nan
    total_s = ours.spread.median / 1000
    projected = projected_50_steps(ours, steps)
    sg = SGLANG_QWEN
    text = (
        f"SGLang's published H100 number (perf_baselines/h100.json, qwen_image_t2i): {sg['e2e_ms'] / 1000:.1f} s for "
        f"{sg['size']}², {sg['steps']} steps, true CFG (denoise {sg['denoise_ms'] / 1000:.1f} s, {sg['step_ms']:.0f} ms "
        f"per step, text {sg['text_ms']} ms, decode {sg['decode_ms']} ms; through its HTTP server). Ours here: "
        f"{total_s:.2f} s for {side}², {steps} steps ({step_ms:.1f} ms per step, median over steps and repetitions; "
        f"text {statistics.median(s.get('text_encoding', 0.0) for s in stages):.0f} ms, decode "
        f"{statistics.median(s.get('decoding', 0.0) for s in stages):.0f} ms)"
        if stages
        else "SGLang: no repetition of ours finished"
    )
    if stages and steps != sg["steps"]:
        text += f"; projected to {sg['steps']} steps: {projected:.2f} s"
    if stages and side == sg["size"]:
        text += f"; ours / SGLang = {projected / (sg['e2e_ms'] / 1000):.3f}× (per step {step_ms / sg['step_ms']:.3f}×)."
    elif stages:
        text += (f". Not comparable with SGLang's {sg['size']}² number ({(side // 16) ** 2} vs "
                 f"{(sg['size'] // 16) ** 2} image tokens): run with --size {sg['size']} for that.")  # fmt: skip
    notes.append(text)
    return notes


def zimage_e2e_notes(fields: dict[str, Any], ours: Measured, pipeline: Any) -> list[str]:
    """What zimage-e2e ran (caption lengths) and ours against SGLang's published H100 numbers."""
    from sgl_diffusion.models.z_image.text_encoder import chat_prompt
    from sgl_diffusion.models.z_image.transformer import padded_length

    tokenizer = pipeline.c.tokenizer

    def caption(text: str) -> str:  # the templated prompt's real tokens, and what the DiT pads them to
        tokens = min(len(tokenizer(chat_prompt(tokenizer, text)).input_ids), fields["max_sequence_length"])
        return f"{tokens} tokens (padded to {padded_length(tokens)})"

    notes = [
        (
            "Weights resident on the GPU: ours' transformer 11.5 GiB + text encoder (Qwen3-4B size) 7.5 GiB + FLUX VAE "
            "0.16 GiB; diffusers' pipeline holds the same tensors (no second copy), and so does its compiled twin."
        ),
        f"Caption the transformer sees: prompt {caption(fields['prompt'])}"
        + (f", negative prompt {caption(fields['negative_prompt'] or '')}" if fields["cfg_enabled"] else "")
        + " (the fixture tokenizer's count, in its Qwen3 chat template).",
    ]
    steps, side = fields["num_inference_steps"], fields["width"]
    all_steps = [ms for d in ours.details for ms in d["steps_ms"]]
    if not all_steps:
        return [*notes, "SGLang: no repetition of ours finished"]
    stages = [d["stages_ms"] for d in ours.details]
    step_ms, total_s = statistics.median(all_steps), ours.spread.median / 1000
    ci = SGLANG_ZIMAGE_CI
    text = (
        f"SGLang's published H100 numbers for Z-Image-Turbo at {ci['size']}², {ci['steps']} steps: "
        f"{SGLANG_ZIMAGE['e2e_ms'] / 1000:.2f} s (gpu.md anchor); {ci['e2e_ms'] / 1000:.3f} s in its CI baseline "
        f"(h100.json: denoise {ci['denoise_ms']} ms, {ci['step_ms']} ms per step, text {ci['text_ms']} ms, decode "
        f"{ci['decode_ms']} ms; through its HTTP server). Ours here: {total_s:.3f} s for {side}², {steps} steps "
        f"({step_ms:.1f} ms per step, median over steps and repetitions; text "
        f"{statistics.median(s.get('text_encoding', 0.0) for s in stages):.0f} ms, decode "
        f"{statistics.median(s.get('decoding', 0.0) for s in stages):.0f} ms)"
    )
    if side == ci["size"] and steps == ci["steps"]:
        text += (f"; ours / SGLang = {total_s / (SGLANG_ZIMAGE['e2e_ms'] / 1000):.3f}× (anchor), "
                 f"{total_s / (ci['e2e_ms'] / 1000):.3f}× (CI; per step {step_ms / ci['step_ms']:.3f}×).")  # fmt: skip
    else:
        text += f". Not comparable with SGLang's {ci['size']}², {ci['steps']}-step numbers."
    return [*notes, text]


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
            "median of --runs after a warm-up, each variant in turn (wan_vae_decode.py's own timing, with its "
            "out-of-memory fallbacks; not the alternating scheme of the other workloads). PSNR on random weights "
            "only guards regressions."
        ),
    ]
    return rows, notes


# --------------------------------------------------------------------------------------------------


WORKLOADS = {
    "flux-forward": run_forward,
    "wan-forward": run_forward,
    "qwen-forward": run_forward,
    "flux2-forward": run_forward,
    "hunyuan-forward": run_forward,
    "flux-e2e": run_e2e,
    "wan-e2e": run_e2e,
    "qwen-e2e": run_e2e,
    "zimage-e2e": run_e2e,
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--name", help="file name of the results, DIR/NAME.json and .md (default: the workload)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/sgl-bench"), help="random model folders")
    parser.add_argument("--device", type=torch.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test of this script)")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions of every variant")
    parser.add_argument("--runs", type=int, help="calls timed per repetition, their mean counted (default: forward "
                        "workloads 3, e2e 1 generation; wan-vae: its runs, default 3)")  # fmt: skip
    parser.add_argument("--warmup", type=int, help="untimed calls per variant first (default: forward workloads 3, "
                        "e2e 1 full generation)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="denoising steps for e2e (default: FLUX 28, Wan 50, Qwen-Image "
                        "and Z-Image the engine's defaults, 50 and 9)")  # fmt: skip
    parser.add_argument("--size", type=int, help="qwen-e2e / zimage-e2e: image side in pixels (default: the "
                        "engine's, 1328 / 1024)")  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile variants")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of both sides; on the CPU compiled variants run only with "
                             "another than inductor (e.g. eager: a smoke test of the compiled code paths)")  # fmt: skip
    parser.add_argument("--diffusers", choices=["none", "eager", "compiled", "eager+compiled"],
                        default="eager+compiled", help="e2e / graph sweeps: diffusers variants to run")  # fmt: skip
    parser.add_argument("--lossy-attention", nargs="*", default=[], help="e2e: also run these attention backends")
    parser.add_argument("--attention-backend",
                        help="e2e: ours' engine option --attention-backend (e.g. fa, auto; default the engine's, "
                             "torch_sdpa)")  # fmt: skip
    parser.add_argument("--vsa-sparsity", nargs="*", type=float, default=[],
                        help="wan-forward: also ours on video sparse attention (lossy) at these sparsities, eager "
                             "and compiled, against dense attention, with the output difference")  # fmt: skip
    parser.add_argument("--sta-window", nargs=3, type=int, action="append", default=[], metavar=("T", "H", "W"),
                        help="wan-forward / hunyuan-forward: also ours on sliding tile attention (lossy) with this "
                             "window (in 6x8x8 tiles) for every layer and head, eager and compiled, against dense "
                             "attention; repeat for several windows")  # fmt: skip
    parser.add_argument("--ours-attention", nargs="*", default=[],
                        help="forward: also ours compiled on these exact attention backends (fa, fa4, auto), each "
                             "against ours + torch.compile on the default (cuDNN on Hopper)")  # fmt: skip
    parser.add_argument("--compile-ablations", action="store_true",
                        help="forward: also compiled with packed q/k/v, and without GEMM epilogues")  # fmt: skip
    parser.add_argument(
        "--latent-frames",
        type=int,
        help=f"hunyuan-forward: latent frames at 720p (default {HUNYUAN_LATENT_FRAMES}: 129 frames)",
    )
    parser.add_argument("--eager-variants", choices=["all", "fused"], default="all",
                        help="forward: all eager variants of ours, or only the engine's (fused kernels) against "
                             "diffusers eager (shapes whose forward takes many seconds)")  # fmt: skip
    parser.add_argument("--cfg-shapes", type=int, nargs="*", default=[],
                        help="forward: compare batch-2 CFG at these sizes (FLUX: latent side in tokens, "
                             "Wan: latent frames)")  # fmt: skip
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                        help="ours' --cuda-graphs (e2e); forward: add graph variants on both sides when ours "
                             "would capture (auto: at most AUTO_MAX_TOKENS tokens)")  # fmt: skip
    parser.add_argument("--vae-slicing", action="store_true", help="e2e: ours with --vae-slicing")
    parser.add_argument("--graph-ablation", action="store_true", help="e2e: ours also with the graphs removed")
    parser.add_argument("--graph-shapes", type=int, nargs="*", default=[],
                        help="flux-graphs / wan-graphs: sizes (FLUX: latent side in tokens, Wan: latent frames)")  # fmt: skip
    parser.add_argument("--vae-args", nargs="*", default=[], help="wan-vae: extra flags for wan_vae_decode.py")
    parser.add_argument("--commit", default=None, help="default: $BENCH_COMMIT or git rev-parse")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.name = args.name or args.workload
    e2e = args.workload.endswith("-e2e")
    args.warmup = (1 if e2e else 3) if args.warmup is None else args.warmup
    args.runs = (1 if e2e else 3) if args.runs is None else args.runs
    if args.device.type == "cpu" and args.compile_backend == "inductor":
        args.compile = False  # inductor's CPU compile of full models is not what this measures
    if args.latent_frames is not None and args.workload != "hunyuan-forward":
        parser.error("--latent-frames is hunyuan-forward's")
    if args.reps < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--reps and --runs must be at least 1, --warmup at least 0")
    graph_rows = not e2e and args.workload not in NO_GRAPHS and args.cuda_graphs != "off"
    if graph_rows and args.compile and args.warmup < 3:
        # torch.compile's CUDA graphs run the first call plainly and record the second: fewer warm-up calls
        # would time diffusers' recording against our replays.
        parser.error("CUDA-graph variants need --warmup 3 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    record: dict[str, Any] = {
        "workload": args.workload,
        "card": card_name(args.device),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit or git_commit(),
        "command": "python benches/perf.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "scheme": {"warmup": args.warmup, "reps": args.reps, "runs": args.runs, "rule": bench_stats.RULE},
    }
    log(f"{args.workload} on {record['card']}")
    rows, notes = WORKLOADS[args.workload](args, record)
    write_results(args, record, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
