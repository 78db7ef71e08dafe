"""Attention kernels at the shapes that matter: cuDNN (SDPA) vs FlashAttention-4 vs sliding tile vs video sparse.

Shapes (batch 1, bf16, head_dim 128):

* ``wan``: Wan2.1-T2V-1.3B at 832x480, 81 frames: 12 heads over a 21x30x52 token grid (32 760 tokens);
* ``wan720``: the 18x48x80 grid (69 120 tokens, Wan at 1280x768, 69 frames), the only Wan grid FastVideo's
  ``st_attn`` kernel takes;
* ``flux``: FLUX.1-dev at 1024²: 24 heads over 4 096 image + 512 text tokens, joint attention. Not a video grid:
  the sparse video backends do not apply (rows say so).

Rows per shape, each timed with CUDA events (median and [min, max] of ``--reps`` repetitions of ``--calls`` calls,
after warm-up), in TFLOP/s of the *dense* attention's FLOPs (``4 * S^2 * D * heads``: a sparse kernel's figure is
its dense-equivalent speed) and with the fraction of key blocks a sparse pattern reads:

* ``sdpa_cudnn`` / ``sdpa_flash``: torch SDPA forced onto cuDNN attention / FlashAttention-2 (exact);
* ``fa``: ``--attention-backend fa``, FlashAttention-3 (``fa3-fwd``'s prebuilt forward, or a source build) or -2,
  the row naming which loaded;
* ``fa4``: ``--attention-backend fa4`` (``flash-attn-4``; needs the package, a Hopper GPU; JIT on first call);
* ``sta_triton <window>``: sliding tile attention on this repository's Triton block-sparse kernel, the whole seam
  call (tile permutation and back included) and, as ``kernel only``, the kernel on pre-tiled inputs;
* ``sta_st_attn <window>``: FastVideo's ``st_attn`` (when it loads; ``wan720`` only);
* ``vsa_triton s=<sparsity>`` / ``vsa_package s=<sparsity>``: video sparse attention (compressed branch, top-k,
  block-sparse fine branch, gate) on our Triton kernel / FastVideo's ``vsa`` (when it loads; bf16).

Every sparse row is also checked against its torch reference at the bench's own inputs (``max_abs_vs_reference``,
on the first head only, to keep the reference's S x S scores small), so a fast row cannot be a wrong one.

Usage (GPU machine; see benches/gpu_perf.sh job ``attention-kernels``):
    python benches/attention_kernels.py --out-dir $OUT [--shapes wan wan720 flux] [--reps 5 --calls 10]
CPU smoke test (tiny shapes, the references, no timing claims):
    python benches/attention_kernels.py --tiny --device cpu --out-dir /tmp/ak
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stats import spread

from sgl_diffusion.layers import sparse_attention as sa
from sgl_diffusion.layers.video_tiles import tile_layout, to_tiles

# The module (the package re-exports its `attention` function under the module's name).
attn = importlib.import_module("sgl_diffusion.layers.attention")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    grid: tuple[int, int, int] | None  # a video token grid, or None (joint image + text attention)
    tokens: int
    note: str


SHAPES = {
    "wan": Shape("wan", 12, (21, 30, 52), 32760, "Wan2.1-T2V-1.3B 832x480, 81 frames"),
    "wan720": Shape("wan720", 12, (18, 48, 80), 69120, "Wan 1280x768, 69 frames (st_attn's Wan grid)"),
    "flux": Shape("flux", 24, None, 4608, "FLUX.1-dev 1024^2: 4096 image + 512 text tokens"),
}
TINY = {
    "wan": Shape("wan", 2, (7, 10, 9), 630, "tiny video grid (CPU smoke)"),
    "wan720": Shape("wan720", 2, (12, 16, 16), 3072, "tiny whole-tile grid (CPU smoke)"),
    "flux": Shape("flux", 2, None, 320, "tiny joint attention (CPU smoke)"),
}
#: STA windows (tiles of 6x8x8) and VSA sparsities measured per video shape.
STA_WINDOWS = ((3, 3, 3), (3, 3, 5), (1, 3, 5))
VSA_SPARSITIES = (0.8, 0.9)
HEAD_DIM = 128
ERRORS = (ValueError, RuntimeError, ImportError, TypeError, AssertionError)


def log(message: str) -> None:
    print(message, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, calls: int, reps: int, warmup: int) -> list[float]:
    """Milliseconds per call, one value per repetition of `calls` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    values = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            values.append(start.elapsed_time(end) / calls)
        else:
            begin = time.perf_counter()
            for _ in range(calls):
                fn()
            values.append((time.perf_counter() - begin) * 1e3 / calls)
    return values


def sdpa_context(kernel: str) -> contextlib.AbstractContextManager[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[kernel]
    return sdpa_kernel([chosen])


def sta_density(grid: tuple[int, int, int], window: tuple[int, int, int]) -> float:
    """The fraction of key tokens a query reads, averaged over queries (real tokens only)."""
    layout = tile_layout(grid, sa.STA_TILE)
    tile_map = sa.sliding_tile_tile_map(layout.counts, (window,))[0].float()
    sizes = layout.sizes.float().cpu()
    return float((sizes @ tile_map @ sizes) / sizes.sum() ** 2)


def run_shape(shape: Shape, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, gate = (
        torch.randn(1, shape.tokens, shape.heads, HEAD_DIM, generator=gen, device=device, dtype=torch.float32).to(dtype)
        for _ in range(4)
    )
    flops = 4.0 * shape.tokens**2 * HEAD_DIM * shape.heads
    rows: list[dict[str, Any]] = []

    def measure(name: str, fn: Callable[[], object], **extra: Any) -> None:
        row: dict[str, Any] = {"shape": shape.name, "row": name, **extra}
        try:
            times = time_calls(fn, device, args.calls, args.reps, args.warmup)
        except ERRORS as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"  {name}: {row['error']}")
            rows.append(row)
            return
        s = spread(times)
        row.update(ms=s.median, ms_min=s.low, ms_max=s.high, dense_equiv_tflops=flops / (s.median * 1e-3) / 1e12)
        log(f"  {name}: {s.median:.3f} ms [{s.low:.3f}, {s.high:.3f}]  {row['dense_equiv_tflops']:.0f} TFLOP/s dense-equivalent"
            + (f"  density {extra['density']:.3f}" if "density" in extra else ""))  # fmt: skip
        rows.append(row)

    def check(row_name: str, got: Callable[[], torch.Tensor], want: Callable[[], torch.Tensor]) -> None:
        """max |got - want| on the first head, recorded in the row just measured (the same name)."""
        try:
            diff = float((got().float() - want().float()).abs().max())
        except ERRORS as err:
            diff = f"{type(err).__name__}: {str(err)[:200]}"  # type: ignore[assignment]
        for row in rows:
            if row["row"] == row_name:
                row["max_abs_vs_reference"] = diff
        log(f"    {row_name} vs reference (head 0): {diff}")

    if device.type == "cuda":
        for kernel in ("cudnn", "flash"):

            def run_sdpa(kernel: str = kernel) -> torch.Tensor:
                with sdpa_context(kernel):
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

            measure(f"sdpa_{kernel}", run_sdpa)
    else:
        measure("sdpa (CPU)", lambda: attn.attention(q, k, v))
    for backend in ("fa", "fa4"):
        try:
            attn.resolve_attention_backend(backend, device=device, dtype=dtype)
        except ValueError as err:
            rows.append({"shape": shape.name, "row": backend, "error": str(err)[:300]})
            log(f"  {backend}: {str(err)[:200]}")
        else:
            build = attn.attention_kernel_label(backend)
            measure(backend, lambda backend=backend: attn.attention(q, k, v, backend=backend), build=build)
    # What the engine's `auto` runs here: its own measurement of the exact kernels installed (the first call),
    # then the winner's time as a row of its own.
    auto = attn.resolve_attention_backend("auto", device=device, dtype=dtype)
    measure("auto", lambda: attn.attention(q, k, v, backend="auto"), resolved=auto)
    chosen = attn.auto_attention_measurements()
    if auto == "auto" and chosen:
        rows[-1]["auto_choice"] = chosen[-1].choice
        rows[-1]["auto_measured_ms"] = chosen[-1].ms
        log(f"    auto: {chosen[-1].summary()}")

    if shape.grid is None:
        rows.append({"shape": shape.name, "row": "sta / vsa", "error": "not a video token grid (joint attention)"})
        return rows
    grid = shape.grid
    head0 = [t[:, :, :1] for t in (q, k, v, gate)]
    impl = "triton" if device.type == "cuda" else "reference"
    for window in STA_WINDOWS:
        density = sta_density(grid, window)
        sta_rows = [(f"sta_{impl} {window}", impl)]
        if grid in sa.STA_PACKAGE_GRIDS and device.type == "cuda":
            sta_rows.append((f"sta_st_attn {window}", "st_attn"))
        for name, which in sta_rows:
            all_heads = functools.partial(
                sa.sliding_tile_attention, q, k, v, grid, (window,) * shape.heads, implementation=which
            )
            measure(name, all_heads, density=density)
            one_head = functools.partial(sa.sliding_tile_attention, *head0[:3], grid, (window,))
            check(
                name,
                functools.partial(one_head, implementation=which),
                functools.partial(one_head, implementation="reference"),
            )
        if impl == "triton":
            layout = tile_layout(grid, sa.STA_TILE, device)
            _, sizes, index, count = sa._sta_blocks(grid, (window,) * shape.heads, device)
            from sgl_diffusion_kernels.block_sparse_attention import block_sparse_attention

            tiled = [to_tiles(t, layout) for t in (q, k, v)]
            kernel = functools.partial(block_sparse_attention, *tiled, index, count, sizes)
            measure(f"sta_{impl} {window} kernel only", kernel, density=density)
    layout = tile_layout(grid, sa.VSA_TILE)
    for sparsity in VSA_SPARSITIES:
        density = sa.vsa_topk(sparsity, layout.num_tiles) / layout.num_tiles
        for which in (impl, "vsa") if device.type == "cuda" else (impl,):
            name = f"vsa_{'package' if which == 'vsa' else which} s={sparsity}"
            measure(name, functools.partial(sa.video_sparse_attention, q, k, v, gate, grid, sparsity, implementation=which),
                    density=density)  # fmt: skip
            one_head = functools.partial(sa.video_sparse_attention, *head0, grid, sparsity)
            check(
                name,
                functools.partial(one_head, implementation=which),
                functools.partial(one_head, implementation="reference"),
            )
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
        import triton

        env["triton"] = triton.__version__
    for package in ("st_attn", "vsa"):
        loaded = sa._package(package) if device.type == "cuda" else None
        env[package] = "loads" if loaded is not None else sa._package_failures.get(package, "not probed (CPU)")
    return env


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# Attention kernels on {env.get('gpu', env['device'])}",
        "",
        (
            f"`{results['command']}`, commit {results['commit']}; torch {env['torch']}, "
            f"triton {env.get('triton', '-')}; st_attn: {env['st_attn']}; vsa: {env['vsa']}."
        ),
        "",
        (
            "TFLOP/s count the dense attention's FLOPs (4 S² D heads): a sparse row's figure is its dense-equivalent "
            "speed. density: the fraction of keys a query reads. ms: median [min, max] of the repetitions."
        ),
        "",
        "| shape | row | ms | TFLOP/s (dense-eq.) | density | max abs vs reference (head 0) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['shape']} | {row['row']} | n/a: {row['error']} | | | |")
            continue
        density = f"{row['density']:.3f}" if "density" in row else "1"
        check = row.get("max_abs_vs_reference", "")
        check = f"{check:.3g}" if isinstance(check, float) else check
        name = row["row"]
        if "auto_choice" in row:
            name += f" (measured {row['auto_choice']})"
        elif "resolved" in row:
            name += f" (resolved {row['resolved']})"
        elif row.get("build"):
            name += f" ({row['build']})"
        lines.append(
            f"| {row['shape']} | {name} | {row['ms']:.3f} [{row['ms_min']:.3f}, {row['ms_max']:.3f}] | "
            f"{row['dense_equiv_tflops']:.0f} | {density} | {check} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["wan", "wan720", "flux"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny:
        args.reps, args.calls, args.warmup = min(args.reps, 2), 1, 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": " ".join(["python benches/attention_kernels.py", *(argv if argv is not None else sys.argv[1:])]),
        "commit": args.commit,
        "environment": environment(device),
        "rows": [],
    }
    log(json.dumps(results["environment"]))
    with torch.inference_mode():
        for name in args.shapes:
            shape = (TINY if args.tiny else SHAPES)[name]
            log(f"== {name}: {shape.note}, {shape.heads} heads x {shape.tokens} tokens")
            results["rows"] += run_shape(shape, args, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    gpu = results["environment"].get("gpu", "cpu").lower()
    tag = "tiny" if args.tiny else next((card for card in ("h100", "h200") if card in gpu), "gpu")
    (args.out_dir / f"attention_kernels_{tag}.json").write_text(json.dumps(results, indent=1))
    (args.out_dir / f"attention_kernels_{tag}.md").write_text(markdown(results))
    medians = [row["ms"] for row in results["rows"] if "ms" in row]
    log(f"wrote {args.out_dir}; {len(medians)} rows timed, median of medians {statistics.median(medians):.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
