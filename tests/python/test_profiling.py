"""`--profile`: torch profiler traces per batch, from the command line and the Python API, on the CPU."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.profiling import TABLE_FILE, TRACE_FILE

SMALL_FLAGS = ["--height", "32", "--width", "32", "--num-inference-steps", "3", "--max-sequence-length", "16"]
FOLDER_NAME = re.compile(r"\d{8}-\d{6}-batch\d{4}(-\d+)?")


def generate(flux_dir: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "sgl_diffusion.cli", "generate", "--model-path", str(flux_dir), "--device", "cpu",
        "--prompt", "a red fox", "--seed", "1", "--output-path", str(tmp_path / "out"), *SMALL_FLAGS, *flags,
    ]  # fmt: skip
    return subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def trace_events(folder: Path) -> list[dict[str, Any]]:
    with gzip.open(folder / TRACE_FILE, "rt") as f:
        return json.load(f)["traceEvents"]


def range_names(folder: Path) -> list[str]:
    """The `record_function` ranges of a trace, in the order they started."""
    ranges = [event for event in trace_events(folder) if event.get("cat") == "user_annotation"]
    return [event["name"] for event in sorted(ranges, key=lambda event: event["ts"])]


def only_trace_folder(profile_dir: Path) -> Path:
    (folder,) = profile_dir.iterdir()
    assert FOLDER_NAME.fullmatch(folder.name), folder.name
    assert (folder / TABLE_FILE).read_text().strip()
    return folder


def test_cli_traces_the_first_denoising_steps(flux_dir: Path, tmp_path: Path) -> None:
    profile_dir = tmp_path / "profiles"
    perf = tmp_path / "perf.json"
    proc = generate(
        flux_dir, tmp_path, "--profile", "--num-profiled-timesteps", "1", "--profile-dir", str(profile_dir),
        "--perf-dump-path", str(perf),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = only_trace_folder(profile_dir)
    image, printed = proc.stdout.splitlines()
    assert Path(image).suffix == ".png"
    assert Path(printed) == folder.resolve()
    assert json.loads(perf.read_text())["profile_trace_dir"] == printed
    names = range_names(folder)
    assert names == ["denoise_step_0"]  # one step asked for: the profiler stopped after it
    ops = {event["name"] for event in trace_events(folder) if event.get("cat") == "cpu_op"}
    assert "aten::linear" in ops  # the ops themselves, not only the step ranges


def test_cli_traces_every_stage(flux_dir: Path, tmp_path: Path) -> None:
    profile_dir = tmp_path / "profiles"
    perf = tmp_path / "perf.json"
    proc = generate(
        flux_dir, tmp_path, "--profile", "--profile-all-stages", "--profile-dir", str(profile_dir),
        "--perf-dump-path", str(perf),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = only_trace_folder(profile_dir)
    stages = [stage["name"] for stage in json.loads(perf.read_text())["steps"]]
    assert {"text_encoding", "denoising", "decoding"} <= set(stages)
    steps = ["denoise_step_0", "denoise_step_1", "denoise_step_2"]
    at = stages.index("denoising") + 1
    # Stages in order, the steps inside the denoising range (which starts before them).
    assert range_names(folder) == stages[:at] + steps + stages[at:]


def test_cli_without_profile_writes_no_trace(flux_dir: Path, tmp_path: Path) -> None:
    perf = tmp_path / "perf.json"
    proc = generate(flux_dir, tmp_path, "--profile-dir", str(tmp_path / "profiles"), "--perf-dump-path", str(perf))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 1
    assert not (tmp_path / "profiles").exists()
    assert "profile_trace_dir" not in json.loads(perf.read_text())


def test_cli_rejects_zero_profiled_timesteps(flux_dir: Path, tmp_path: Path) -> None:
    proc = generate(flux_dir, tmp_path, "--profile", "--num-profiled-timesteps", "0")
    assert proc.returncode != 0
    assert "num_profiled_timesteps must be a positive integer, got 0" in proc.stderr
    assert not (tmp_path / "profiles").exists()


def test_api_traces_each_batch_without_changing_results(
    flux_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sgl_diffusion import DiffGenerator

    request = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "np"}
    plain = DiffGenerator.from_pretrained(flux_dir, device="cpu")
    try:
        expected = [plain.generate("a cube", seed=seed, **request) for seed in (1, 2)]
    finally:
        plain.shutdown()
    profiled = DiffGenerator.from_pretrained(flux_dir, device="cpu", profile=True, profile_dir=str(tmp_path))
    caplog.set_level("INFO", logger="sgl_diffusion")
    try:
        results = [profiled.generate("a cube", seed=seed, **request) for seed in (1, 2)]
    finally:
        profiled.shutdown()
    folders = [Path(result.timings["profile_trace_dir"]) for result in results]
    assert sorted(folders) == sorted(path.resolve() for path in tmp_path.iterdir())
    assert len(set(folders)) == 2  # one folder per batch
    for folder, result, reference in zip(folders, results, expected, strict=True):
        assert range_names(folder) == ["denoise_step_0", "denoise_step_1"]  # default: 2 steps
        assert any(str(folder) in record.getMessage() for record in caplog.records)
        np.testing.assert_array_equal(result.images[0], reference.images[0])


def test_a_failing_stage_leaves_no_profiler_running(flux_dir: Path, tmp_path: Path) -> None:
    from sgl_diffusion.pipelines.flux import FluxPipeline
    from sgl_diffusion.runtime.request import Request

    options = RuntimeOptions.for_device("cpu", profile=True, profile_all_stages=True, profile_dir=str(tmp_path))
    pipeline = FluxPipeline.load(flux_dir, options, None)
    request = Request(
        id=1, prompt="a cube", negative_prompt=None, width=32, height=32, num_frames=1, num_inference_steps=2,
        guidance_scale=3.5, true_cfg_scale=1.0, seed=1, max_sequence_length=16, num_outputs=1, flow_shift=None,
        guidance_scale_2=None, fps=None, image_path=None, cfg_enabled=False, output_format="npy",
        output_quality=None, notes=(),
    )  # fmt: skip

    def fail_after_first_step(step: int, total: int) -> list[int]:
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        pipeline.run([request], fail_after_first_step)
    assert not torch._C._autograd._profiler_enabled()
    assert not list(tmp_path.iterdir())  # a failed batch writes no trace
    # The next batch traces normally, and `profile=False` (warm-up runs) traces nothing.
    pipeline.run([request], lambda step, total: [], profile=False)
    assert not list(tmp_path.iterdir())
    state = pipeline.run([request], lambda step, total: [])
    (folder,) = tmp_path.iterdir()
    assert state.perf.as_dict()["profile_trace_dir"] == str(folder.resolve())
    assert "denoise_step_1" in range_names(folder)
