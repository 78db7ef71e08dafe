"""`benches/compare_perf.py`: a baseline perf dump (written by the CLI on the built-in model) against one or more
new dumps, as Markdown."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benches" / "compare_perf.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_perf", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


compare_perf = load_script()


@pytest.fixture(scope="module")
def cli_perf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real perf dump: `sgl-diffusion generate` on the built-in tiny model (built into a fresh cache)."""
    folder = tmp_path_factory.mktemp("cli_perf")
    path = folder / "perf.json"
    command = [
        sys.executable, "-m", "sgl_diffusion.cli", "generate", "--prompt", "hi", "--device", "cpu",
        "--height", "32", "--width", "32", "--num-inference-steps", "3", "--max-sequence-length", "16",
        "--no-save-output", "--perf-dump-path", str(path),
    ]  # fmt: skip
    env = {**os.environ, "SGL_DIFFUSION_CACHE": str(folder / "cache")}
    proc = subprocess.run(command, check=False, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header cells, metric -> value cells) of the Markdown table."""
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("| ")
    ]
    header, *body = rows
    return header, {cells[0]: cells[1:] for cells in body}


def slower(record: dict[str, Any]) -> dict[str, Any]:
    """B: every stage twice as slow, no `latent_preparation`, a new `safety_check` stage after decoding,
    steps of 10, 20, 30, 100 ms, and 1.5× the memory."""
    other = copy.deepcopy(record)
    other["steps"] = [
        {"name": stage["name"], "duration_ms": 2 * stage["duration_ms"]}
        for stage in record["steps"]
        if stage["name"] != "latent_preparation"
    ] + [{"name": "safety_check", "duration_ms": 5.0}]
    other["denoise_steps_ms"] = [{"step": i, "duration_ms": ms} for i, ms in enumerate((10.0, 20.0, 30.0, 100.0))]
    other["total_duration_ms"] = 2 * record["total_duration_ms"]
    other["peak_memory_mb"] = 1.5 * record["peak_memory_mb"]
    return other


def faster(record: dict[str, Any]) -> dict[str, Any]:
    """C: end to end and every stage at half the time, a new `prompt_check` stage first, memory unchanged."""
    other = copy.deepcopy(record)
    other["steps"] = [{"name": "prompt_check", "duration_ms": 1.0}] + [
        {"name": stage["name"], "duration_ms": stage["duration_ms"] / 2} for stage in record["steps"]
    ]
    other["total_duration_ms"] = record["total_duration_ms"] / 2
    return other


def test_table_rows_and_numbers(cli_perf: Path) -> None:
    a = compare_perf.load(cli_perf)
    b = slower(a)
    header, cells = table(compare_perf.markdown([a, b], ["base", "new"]))
    assert header == ["metric", "base", "new", "B − A", "B / A"]
    stages = [stage["name"] for stage in a["steps"]]
    assert {"text_encoding", "latent_preparation", "denoising", "decoding"} <= set(stages)
    expected_metrics = (
        ["end to end (ms)"]
        + [f"stage {name} (ms)" for name in [*stages, "safety_check"]]
        + ["denoising steps (count)"]
        + [f"denoising step {stat} (ms)" for stat in ("mean", "median", "min", "max")]
        + ["peak memory (MiB)"]
    )
    assert list(cells) == expected_metrics

    total = a["total_duration_ms"]
    assert cells["end to end (ms)"] == [f"{total:.2f}", f"{2 * total:.2f}", f"{total:+.2f}", "2.000×"]
    decoding = next(stage["duration_ms"] for stage in a["steps"] if stage["name"] == "decoding")
    assert cells["stage decoding (ms)"] == [f"{decoding:.2f}", f"{2 * decoding:.2f}", f"{decoding:+.2f}", "2.000×"]
    # A stage of one file only: the other side and the differences are blank.
    latents = next(stage["duration_ms"] for stage in a["steps"] if stage["name"] == "latent_preparation")
    assert cells["stage latent_preparation (ms)"] == [f"{latents:.2f}", "–", "–", "–"]
    assert cells["stage safety_check (ms)"] == ["–", "5.00", "–", "–"]

    steps_a = [step["duration_ms"] for step in a["denoise_steps_ms"]]
    assert len(steps_a) == 3
    assert cells["denoising steps (count)"] == ["3", "4", "+1", "1.333×"]
    assert cells["denoising step mean (ms)"][:2] == [f"{sum(steps_a) / 3:.2f}", "40.00"]
    assert cells["denoising step median (ms)"][:2] == [f"{sorted(steps_a)[1]:.2f}", "25.00"]
    assert cells["denoising step min (ms)"][:2] == [f"{min(steps_a):.2f}", "10.00"]
    max_a = max(steps_a)
    assert cells["denoising step max (ms)"] == [f"{max_a:.2f}", "100.00", f"{100 - max_a:+.2f}", f"{100 / max_a:.3f}×"]
    peak = a["peak_memory_mb"]
    assert cells["peak memory (MiB)"] == [f"{peak:.1f}", f"{1.5 * peak:.1f}", f"{0.5 * peak:+.1f}", "1.500×"]


def test_one_baseline_against_several_new_dumps(cli_perf: Path) -> None:
    a = compare_perf.load(cli_perf)
    b, c = slower(a), faster(a)
    text = compare_perf.markdown([a, b, c], ["main", "slow", "fast"])
    header, cells = table(text)
    assert header == ["metric", "main", "slow", "B − A", "B / A", "fast", "C − A", "C / A"]
    total = a["total_duration_ms"]
    assert cells["end to end (ms)"] == [
        f"{total:.2f}", f"{2 * total:.2f}", f"{total:+.2f}", "2.000×", f"{total / 2:.2f}", f"{-total / 2:+.2f}", "0.500×",
    ]  # fmt: skip
    # Stages of all three files, each where it ran: C's first stage first, B's last stage after decoding.
    stage_rows = [metric for metric in cells if metric.startswith("stage ")]
    names = [stage["name"] for stage in a["steps"]]
    assert stage_rows == [f"stage {name} (ms)" for name in ["prompt_check", *names, "safety_check"]]
    assert cells["stage prompt_check (ms)"] == ["–", "–", "–", "–", "1.00", "–", "–"]
    assert cells["stage safety_check (ms)"] == ["–", "5.00", "–", "–", "–", "–", "–"]
    decoding = next(stage["duration_ms"] for stage in a["steps"] if stage["name"] == "decoding")
    assert cells["stage decoding (ms)"][4:] == [f"{decoding / 2:.2f}", f"{-decoding / 2:+.2f}", "0.500×"]
    peak = a["peak_memory_mb"]
    assert cells["peak memory (MiB)"][4:] == [f"{peak:.1f}", "+0.0", "1.000×"]
    assert "A = main (baseline), B = slow, C = fast;" in text

    # The request check is per new dump, against the baseline.
    c["request"]["width"] = 64
    text = compare_perf.markdown([a, b, c], ["main", "slow", "fast"])
    assert "the requests of A and C differ in width" in text and "A and B differ" not in text


def test_identical_runs_and_request_notes(cli_perf: Path) -> None:
    a = compare_perf.load(cli_perf)
    text = compare_perf.markdown([a, a])
    _, cells = table(text)
    assert all(row[2].lstrip("+") in ("0.00", "0.0", "0") and row[3] == "1.000×" for row in cells.values())
    assert "32×32, 3 steps" in text and "differ" not in text
    b = copy.deepcopy(a)
    b["request"]["num_inference_steps"] = 4
    assert "the requests of A and B differ in num_inference_steps" in compare_perf.markdown([a, b])
    with pytest.raises(ValueError, match="at least one new dump"):
        compare_perf.markdown([a])


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60)


def test_script_as_a_command(cli_perf: Path, tmp_path: Path) -> None:
    base = json.loads(cli_perf.read_text())
    b_path, c_path = tmp_path / "b.json", tmp_path / "c.json"
    b_path.write_text(json.dumps(slower(base)))
    c_path.write_text(json.dumps(faster(base)))
    files = [str(cli_perf), str(b_path), str(c_path)]
    records = [compare_perf.load(path) for path in files]

    # As the SGLang docs call it: a baseline and any number of new dumps, the table on the console.
    proc = run_script(*files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == compare_perf.markdown(records, ["perf.json", "b.json", "c.json"])
    assert proc.stdout.startswith("| metric | perf.json | b.json | B − A | B / A | c.json | C − A | C / A |")
    _, cells = table(proc.stdout)
    assert cells["end to end (ms)"][3] == "2.000×" and cells["end to end (ms)"][6] == "0.500×"

    # --label once per file, in order, and --out (a new folder) instead of stdout.
    out = tmp_path / "report" / "compare.md"
    proc = run_script(*files, "--label", "main", "--label", "slow", "--label", "fast", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert out.read_text() == compare_perf.markdown(records, ["main", "slow", "fast"])
    # Fewer labels than files: the rest keep their file names; options may come before the files.
    proc = run_script("--label", "main", *files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| metric | main | b.json | B − A | B / A | c.json |")
    # The two-file options of before still work.
    proc = run_script(*files[:2], "--label-a", "main", "--label-b", "patched")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == compare_perf.markdown(records[:2], ["main", "patched"])

    proc = run_script(*files[:2], "--label", "x", "--label", "y", "--label", "z")
    assert proc.returncode == 2
    assert "3 --label for 2 files" in proc.stderr
    proc = run_script(str(cli_perf))
    assert proc.returncode == 2  # a baseline alone: nothing to compare

    c_path.write_text(json.dumps({"runs": []}))
    proc = run_script(*files)
    assert proc.returncode == 2
    assert f"{c_path}: not a --perf-dump-path file (no total_duration_ms, steps, peak_memory_mb)" in proc.stderr
