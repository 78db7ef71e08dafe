"""Compares two perf dumps (`sgl-diffusion generate --perf-dump-path FILE`) as a Markdown table.

    python benches/compare_perf.py a.json b.json [--label-a A] [--label-b B] [--out FILE]

Rows: end-to-end time, each stage's time (a stage that ran in only one of the two shows `–` for the
other), the denoising steps' mean / median / min / max, and peak memory (device memory on CUDA, the
process's peak RSS on CPU). Columns: A, B, B − A and B / A, so below 1× means B is faster or smaller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Request fields worth a warning when A and B differ in them: the times are then not like for like.
REQUEST_FIELDS = ("width", "height", "num_frames", "num_inference_steps", "num_outputs", "cfg_enabled")


class PerfFileError(ValueError):
    """A file that is not a perf dump (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class Row:
    metric: str
    a: float | None
    b: float | None
    #: Digits after the point for A, B and B − A.
    digits: int = 2

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def ratio(self) -> float | None:
        return None if self.a is None or self.b is None or self.a == 0 else self.b / self.a


def load(path: str | Path) -> dict[str, Any]:
    """Reads a perf dump, checking the fields the table needs."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PerfFileError(f"{path}: {err}") from err
    if not isinstance(record, dict):
        raise PerfFileError(f"{path}: not a --perf-dump-path file (not a JSON object)")
    missing = [key for key in ("total_duration_ms", "steps", "peak_memory_mb") if key not in record]
    if missing:
        raise PerfFileError(f"{path}: not a --perf-dump-path file (no {', '.join(missing)})")
    return record


def stage_times(record: dict[str, Any]) -> dict[str, float]:
    """Stage name -> ms, in run order; a stage that ran twice becomes `name #2` (kept apart, not summed,
    so both runs stay visible)."""
    times: dict[str, float] = {}
    for stage in record["steps"]:
        name, count = stage["name"], 1
        while name in times:
            count += 1
            name = f"{stage['name']} #{count}"
        times[name] = float(stage["duration_ms"])
    return times


def merged_order(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """The names of both lists, in `first`'s order, each name of `second` only after its predecessor."""
    order = list(first)
    for index, name in enumerate(second):
        if name in order:
            continue
        # After the closest earlier stage of `second` that `first` knows (else at the start).
        earlier = [order.index(prev) for prev in second[:index] if prev in order]
        order.insert(max(earlier) + 1 if earlier else 0, name)
    return order


def step_stats(record: dict[str, Any]) -> dict[str, float | None]:
    steps = [float(step["duration_ms"]) for step in record.get("denoise_steps_ms", [])]
    if not steps:
        return dict.fromkeys(("mean", "median", "min", "max"))
    return {
        "mean": statistics.fmean(steps),
        "median": statistics.median(steps),
        "min": min(steps),
        "max": max(steps),
    }


def rows(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    stages_a, stages_b = stage_times(a), stage_times(b)
    steps_a, steps_b = step_stats(a), step_stats(b)
    table = [Row("end to end (ms)", float(a["total_duration_ms"]), float(b["total_duration_ms"]))]
    for name in merged_order(list(stages_a), list(stages_b)):
        table.append(Row(f"stage {name} (ms)", stages_a.get(name), stages_b.get(name)))
    count_a, count_b = len(a.get("denoise_steps_ms", [])), len(b.get("denoise_steps_ms", []))
    table.append(Row("denoising steps (count)", count_a, count_b, digits=0))
    for stat in ("mean", "median", "min", "max"):
        table.append(Row(f"denoising step {stat} (ms)", steps_a[stat], steps_b[stat]))
    table.append(Row("peak memory (MiB)", float(a["peak_memory_mb"]), float(b["peak_memory_mb"]), digits=1))
    return table


def fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def request_notes(a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str) -> list[str]:
    req_a, req_b = a.get("request") or {}, b.get("request") or {}
    notes = []
    for label, req in ((label_a, req_a), (label_b, req_b)):
        if req:
            size = f"{req.get('width')}×{req.get('height')}"
            if (req.get("num_frames") or 1) > 1:
                size += f"×{req['num_frames']} frames"
            notes.append(f"{label}: {size}, {req.get('num_inference_steps')} steps")
    differ = [field for field in REQUEST_FIELDS if req_a and req_b and req_a.get(field) != req_b.get(field)]
    if differ:
        notes.append(f"**the requests differ in {', '.join(differ)}**: not a like-for-like comparison")
    return notes


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(a: dict[str, Any], b: dict[str, Any], label_a: str = "A", label_b: str = "B") -> str:
    lines = [
        f"| metric | {escape(label_a)} | {escape(label_b)} | B − A | B / A |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows(a, b):
        ratio = "–" if row.ratio is None else f"{row.ratio:.3f}×"
        lines.append(
            f"| {escape(row.metric)} | {fmt(row.a, row.digits)} | {fmt(row.b, row.digits)} "
            f"| {fmt(row.delta, row.digits, signed=True)} | {ratio} |"
        )
    lines.append("")
    lines.append(f"A = {label_a}, B = {label_b}; B / A below 1× means B is faster (or uses less memory).")
    lines.extend(f"* {note}" for note in request_notes(a, b, label_a, label_b))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="perf dump A (the baseline)")
    parser.add_argument("b", help="perf dump B")
    parser.add_argument("--label-a", help="name of A in the table (default: its file name)")
    parser.add_argument("--label-b", help="name of B in the table (default: its file name)")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        a, b = load(args.a), load(args.b)
    except PerfFileError as err:
        print(f"compare_perf.py: error: {err}", file=sys.stderr)
        return 2
    text = markdown(a, b, args.label_a or Path(args.a).name, args.label_b or Path(args.b).name)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
