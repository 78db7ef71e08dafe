"""Compares perf dumps (`sgl-diffusion generate --perf-dump-path FILE`) as a Markdown table: one baseline
and any number of new dumps, the way SGLang's own `compare_perf.py` is called.

    python benches/compare_perf.py baseline.json new.json [new2.json ...] [--label NAME ...] [--out FILE]

Rows: end-to-end time, each stage's time (a stage that ran in only some of the files shows `–` for the
others), the denoising steps' count and mean / median / min / max, and peak memory (device memory on
CUDA, the process's peak RSS on CPU). Columns: the baseline A, then for each new dump B, C, ... its value,
its difference to A and its ratio to A, so below 1× means that dump is faster or smaller than A.

Labels: `--label` once per file, in the order of the files (the baseline's first); files without one are
named by their file name. `--label-a` / `--label-b` still name the baseline and the first new dump.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Request fields worth a warning when a dump differs from the baseline in them: the times are then not
#: like for like.
REQUEST_FIELDS = ("width", "height", "num_frames", "num_inference_steps", "num_outputs", "cfg_enabled")

#: Column letters: A is the baseline.
LETTERS = string.ascii_uppercase


class PerfFileError(ValueError):
    """A file that is not a perf dump (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class Row:
    metric: str
    #: One value per file, the baseline's first; None where a file has no such value.
    values: tuple[float | None, ...]
    #: Digits after the point for the values and differences.
    digits: int = 2

    def delta(self, index: int) -> float | None:
        """File `index` minus the baseline."""
        base, value = self.values[0], self.values[index]
        return None if base is None or value is None else value - base

    def ratio(self, index: int) -> float | None:
        """File `index` over the baseline."""
        base, value = self.values[0], self.values[index]
        return None if base is None or value is None or base == 0 else value / base


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


def rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    """The table's rows for the baseline `records[0]` and the new dumps after it."""
    stages = [stage_times(record) for record in records]
    steps = [step_stats(record) for record in records]
    order: list[str] = []
    for times in stages:
        order = merged_order(order, list(times))
    table = [Row("end to end (ms)", tuple(float(r["total_duration_ms"]) for r in records))]
    for name in order:
        table.append(Row(f"stage {name} (ms)", tuple(times.get(name) for times in stages)))
    table.append(Row("denoising steps (count)", tuple(len(r.get("denoise_steps_ms", [])) for r in records), digits=0))
    for stat in ("mean", "median", "min", "max"):
        table.append(Row(f"denoising step {stat} (ms)", tuple(s[stat] for s in steps)))
    table.append(Row("peak memory (MiB)", tuple(float(r["peak_memory_mb"]) for r in records), digits=1))
    return table


def fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def request_notes(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[str]:
    requests = [record.get("request") or {} for record in records]
    notes = []
    for label, req in zip(labels, requests, strict=True):
        if req:
            size = f"{req.get('width')}×{req.get('height')}"
            if (req.get("num_frames") or 1) > 1:
                size += f"×{req['num_frames']} frames"
            notes.append(f"{label}: {size}, {req.get('num_inference_steps')} steps")
    base = requests[0]
    for letter, req in zip(LETTERS[1:], requests[1:], strict=False):
        differ = [field for field in REQUEST_FIELDS if base and req and base.get(field) != req.get(field)]
        if differ:
            notes.append(
                f"**the requests of A and {letter} differ in {', '.join(differ)}**: not a like-for-like comparison"
            )
    return notes


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(records: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> str:
    """The table for the baseline `records[0]` against every later record, with a legend and notes."""
    if len(records) < 2:
        raise ValueError("need a baseline and at least one new dump")
    if len(records) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} files")
    labels = list(labels) if labels is not None else [LETTERS[i] for i in range(len(records))]
    letters = LETTERS[: len(records)]
    header = [f"| metric | {escape(labels[0])} |"]
    rule = ["|---|---:|"]
    for letter, label in zip(letters[1:], labels[1:], strict=True):
        header.append(f" {escape(label)} | {letter} − A | {letter} / A |")
        rule.append("---:|---:|---:|")
    lines = ["".join(header), "".join(rule)]
    for row in rows(records):
        cells = [f"| {escape(row.metric)} | {fmt(row.values[0], row.digits)} |"]
        for index in range(1, len(records)):
            ratio = row.ratio(index)
            cells.append(
                f" {fmt(row.values[index], row.digits)} | {fmt(row.delta(index), row.digits, signed=True)} "
                f"| {'–' if ratio is None else f'{ratio:.3f}×'} |"
            )
        lines.append("".join(cells))
    lines.append("")
    legend = ", ".join(f"{letter} = {label}" for letter, label in zip(letters[1:], labels[1:], strict=True))
    lines.append(
        f"A = {labels[0]} (baseline), {legend}; a ratio below 1× means that dump is faster (or uses less memory) "
        "than A. A dump is one generation: a gap smaller than the run-to-run spread (benches/perf.py measures "
        "it) is noise."
    )
    lines.extend(f"* {note}" for note in request_notes(records, labels))
    return "\n".join(lines) + "\n"


def resolve_labels(args: argparse.Namespace, files: Sequence[str]) -> list[str]:
    labels = [Path(f).name for f in files]
    if len(args.label) > len(files):
        raise ValueError(f"{len(args.label)} --label for {len(files)} files")
    labels[: len(args.label)] = args.label
    if args.label_a:
        labels[0] = args.label_a
    if args.label_b:
        labels[1] = args.label_b
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="perf dump A, the baseline")
    parser.add_argument("new", nargs="+", help="perf dumps B, C, ... compared with A")
    parser.add_argument("--label", action="append", default=[],
                        help="name of a file in the table, once per file in order (default: the file names)")  # fmt: skip
    parser.add_argument("--label-a", help="name of the baseline (same as the first --label)")
    parser.add_argument("--label-b", help="name of the first new dump (same as the second --label)")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    args = parser.parse_intermixed_args(argv)  # files and options in any order
    files = [args.baseline, *args.new]
    if len(files) > len(LETTERS):
        parser.error(f"at most {len(LETTERS)} files")
    try:
        labels = resolve_labels(args, files)
    except ValueError as err:
        parser.error(str(err))
    try:
        records = [load(path) for path in files]
    except PerfFileError as err:
        print(f"compare_perf.py: error: {err}", file=sys.stderr)
        return 2
    text = markdown(records, labels)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
