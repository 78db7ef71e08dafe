"""Prints a Markdown table from perf dumps (`--perf-dump-path` files, `flux_warm_generate.py` and
`diffusers_flux_forward.py` outputs).

    python benches/summarize_perf.py LABEL=FILE.json [LABEL=FILE.json ...]

For a `flux_warm_generate.py` file, every run after the warm-up becomes a row.
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def stage(perf: dict[str, Any], name: str) -> float | None:
    for s in perf["steps"]:
        if s["name"] == name:
            return s["duration_ms"]
    return None


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


HEADER = (
    "| run | size, steps | text encoding ms | denoising ms | median step ms (min–max) | decoding ms "
    "| total ms | peak GPU memory MiB |\n|---|---|---|---|---|---|---|---|"
)


def row(label: str, perf: dict[str, Any], request: dict[str, Any] | None) -> str:
    steps = [s["duration_ms"] for s in perf["denoise_steps_ms"]]
    req = request or perf.get("request") or {}
    size = f"{req.get('width', '?')}×{req.get('height', '?')}, {req.get('num_inference_steps', len(steps))}"
    spread = f"{statistics.median(steps):.1f} ({min(steps):.1f}–{max(steps):.1f})" if steps else "–"
    return (
        f"| {label} | {size} | {fmt(stage(perf, 'text_encoding'))} | {fmt(stage(perf, 'denoising'))} | {spread} "
        f"| {fmt(stage(perf, 'decoding'))} | {fmt(perf['total_duration_ms'])} | {fmt(perf['peak_memory_mb'], 0)} |"
    )


def main(argv: list[str]) -> int:
    rows, extra = [], []
    for arg in argv:
        label, _, path = arg.partition("=")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            extra.append(f"{label}: {path} missing")
            continue
        if "runs" in data:  # flux_warm_generate.py
            extra.append(f"{label}: load {data['load_s']:.1f} s on {data['device_name']}")
            for run in data["runs"]:
                tag = "warm-up" if run["warmup"] else f"run {run['run']}"
                rows.append(row(f"{label} {tag}", run["perf"], data["request"]))
        elif "median_ms" in data:  # diffusers_flux_forward.py
            extra.append(
                f"{label}: diffusers {data['diffusers']} FluxTransformer2DModel eager forward, "
                f"{data['image_tokens']}+{data['text_tokens']} tokens: median {data['median_ms']:.1f} ms "
                f"(min {min(data['forward_ms']):.1f}, max {max(data['forward_ms']):.1f}) on {data['device_name']}"
            )
        else:
            rows.append(row(label, data, None))
    print(HEADER)
    print("\n".join(rows))
    for line in extra:
        print(f"\n* {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
