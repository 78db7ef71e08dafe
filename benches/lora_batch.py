"""Four requests with four different LoRAs: one mixed batch (the unmerged per-request path) against the same four run
one after another with merge/unmerge between them, on FLUX.1-dev's transformer (random bf16 weights) at 1024².

Per denoising step: the transformer forward of the batch of 4 without adapters, with the 4 per-request adapters
(`layers/row_lora.py`, as the engine runs a mixed batch), and the forward of 1 (what the sequential scheme runs 4
times, each after a merge). The throughput rows project a 28-step request: batched = 28 mixed-batch forwards;
sequential = 4 x (merge + 28 forwards of 1 + unmerge), merge and unmerge measured. Issue 15's targets: the batched
path wins, and its per-step overhead over no adapters is at most 10 % at rank 64.

    python benches/lora_batch.py --out-dir DIR [--rank 64] [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_merge import TARGETS, build, inputs
from perf import card_name, write_results

from sgl_diffusion.layers import row_lora
from sgl_diffusion.layers.row_lora import RowLoras
from sgl_diffusion.lora import LoraAdapter, LoraModule, MergedLoras
from sgl_diffusion.lora.per_request import _stacks

STEPS = 28


def adapters(model: torch.nn.Module, rank: int, count: int, device: torch.device) -> list[LoraAdapter]:
    result = []
    for index in range(count):
        gen = torch.Generator().manual_seed(10 + index)
        modules = {}
        for name, module in model.named_modules():
            if not name.endswith(TARGETS) or getattr(module, "weight", None) is None or module.weight.ndim != 2:
                continue
            out_features, in_features = module.weight.shape
            modules[name] = LoraModule(
                down=(torch.randn(rank, in_features, generator=gen) * 0.01).to(torch.bfloat16).to(device),
                up=(torch.randn(out_features, rank, generator=gen) * 0.01).to(torch.bfloat16).to(device),
            )
        result.append(LoraAdapter(path=f"random-{index}", modules=modules))
    return result


def batched(call: dict[str, Any], batch: int) -> dict[str, Any]:
    return {k: v.expand(batch, *v.shape[1:]).contiguous() if k in ("hidden_states", "encoder_hidden_states",
            "pooled_projections", "timestep", "guidance") else v for k, v in call.items()}  # fmt: skip


def median_ms(fn: Any, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a tiny FLUX config (CPU smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    args.name = f"lora-batch-r{args.rank}"
    model = build(args)
    count = args.requests
    loras = adapters(model, args.rank, count, args.device)
    one = inputs(model, args.device, args.dtype, 64 if args.tiny else 4096)
    many = batched(one, count)
    per_request = [[(adapter, 1.0)] for adapter in loras]
    terms = RowLoras(_stacks(model, per_request, args.device))
    rows = torch.arange(count)  # on the host, as the loop passes them
    with torch.inference_mode():
        plain_ms = median_ms(lambda: model(**many), args.device, args.reps)
        with terms.installed():
            terms.rows = rows
            mixed_ms = median_ms(lambda: model(**many), args.device, args.reps)
            # The same terms segmented by adapter (what the seam runs for large stacks, SEGMENT_MIN_RANK).
            min_rank = row_lora.SEGMENT_MIN_RANK
            row_lora.SEGMENT_MIN_RANK = 0
            for stack in terms.stacks.values():
                stack._plans.clear()
            try:
                segmented_ms = median_ms(lambda: model(**many), args.device, args.reps)
            finally:
                row_lora.SEGMENT_MIN_RANK = min_rank
        single_ms = median_ms(lambda: model(**one), args.device, args.reps)
    merged = MergedLoras(model)
    merge_ms = statistics.median(
        median_ms(lambda adapter=adapter: (merged.merge([(adapter, 1.0)]), merged.unmerge()), args.device, 1)
        for adapter in loras
    )
    batched_s = STEPS * mixed_ms / 1e3
    sequential_s = count * (merge_ms + STEPS * single_ms) / 1e3
    overhead = mixed_ms / plain_ms - 1
    rows_out = [
        {"variant": f"forward, batch {count}, no adapters", "ms": plain_ms},
        {"variant": f"forward, batch {count}, {count} different rank-{args.rank} adapters (per request, as the seam "
                    "chooses)", "ms": mixed_ms},
        {"variant": f"forward, batch {count}, the same adapters segmented by adapter (each row its own rank)",
         "ms": segmented_ms},
        {"variant": "forward, batch 1 (merged adapter: no extra cost)", "ms": single_ms},
        {"variant": "merge + unmerge of one adapter", "ms": merge_ms},
        {"variant": f"{count} requests x {STEPS} steps, one mixed batch", "s": batched_s, "images_per_s": count / batched_s},
        {"variant": f"{count} requests x {STEPS} steps, one at a time with merge/unmerge", "s": sequential_s,
         "images_per_s": count / sequential_s},
    ]  # fmt: skip
    notes = [
        (
            f"Per-step overhead of the per-request adapters over no adapters: {overhead * 100:.1f} % (target <= 10 % at "
            f"rank 64); the mixed batch is {sequential_s / batched_s:.2f}x the sequential scheme's throughput."
        ),
        (
            f"{len(loras[0].modules)} Linears per adapter (attention and feed-forward of every block); 1 x "
            f"{one['hidden_states'].shape[1]} image tokens per request; median of {args.reps}; decode and text encoding "
            "left out (the same for both schemes)."
        ),
    ]
    record: dict[str, Any] = {
        "card": card_name(args.device),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "command": "python benches/lora_batch.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "overhead": overhead,
    }
    write_results(args, record, rows_out, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
