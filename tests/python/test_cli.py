"""`sgl-diffusion generate` as a user runs it: a real process writing real files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

# The installed console command, as users run it.
SGL_DIFFUSION = shutil.which("sgl-diffusion") or pytest.fail("the sgl-diffusion command is not installed")
SMALL_FLAGS = ["--num-inference-steps", "2", "--max-sequence-length", "16", "--device", "cpu"]


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SGL_DIFFUSION, "generate", *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_writes_a_png_and_a_perf_dump(flux_dir: Path, tmp_path: Path) -> None:
    perf = tmp_path / "perf.json"
    proc = run_cli(
        "--model-path", str(flux_dir), "--prompt", "a red fox", "--height", "48", "--width", "32", "--seed", "3",
        "--output-path", str(tmp_path / "out"), "--perf-dump-path", str(perf), *SMALL_FLAGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (written,) = [Path(line) for line in proc.stdout.split()]
    assert written.parent == tmp_path / "out"
    assert written.name.startswith("a_red_fox_") and written.suffix == ".png"
    assert image_size(written) == (32, 48)
    record = json.loads(perf.read_text())
    assert [s["name"] for s in record["steps"]] == [
        "input_validation",
        "text_encoding",
        "latent_preparation",
        "timestep_preparation",
        "denoising",
        "decoding",
    ]
    assert [s["step"] for s in record["denoise_steps_ms"]] == [0, 1]
    assert record["total_duration_ms"] > 0 and record["peak_memory_mb"] > 0
    assert record["memory_checkpoints"] and record["request"]["seed"] == 3
    assert "denoising" in proc.stderr  # the progress bar


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_with_the_command_line_winning(flux_dir: Path, tmp_path: Path, suffix: str) -> None:
    options = {
        "model_path": str(flux_dir),
        "prompt": "from the config",
        "height": 64,
        "width": 64,
        "num-inference-steps": 2,
        "max_sequence_length": 16,
        "device": "cpu",
        "output_path": str(tmp_path),
        "output_file_name": "image.png",
    }
    config = tmp_path / f"config{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(options))
    else:
        config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in options.items()))
    proc = run_cli("--config", str(config), "--width", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert image_size(tmp_path / "image.png") == (32, 64)  # width from the command line


def test_several_outputs_get_numbered_files(flux_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "--model-path", str(flux_dir), "--prompt", "cats", "--height", "32", "--width", "32",
        "--num-outputs-per-prompt", "2", "--output-file-name", "cats.jpg", "--output-format", "jpeg",
        "--output-path", str(tmp_path), *SMALL_FLAGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("cats_*.jpg")) == ["cats_0.jpg", "cats_1.jpg"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-gpus", "2"], "--num-gpus is not supported yet"),
        (["--cache-dit"], "--cache-dit is not supported yet"),
        (["--sp-degree", "2"], "--sp-degree is not supported yet"),
    ],
)
def test_unsupported_options_are_rejected_clearly(tmp_path: Path, flags: list[str], message: str) -> None:
    proc = run_cli("--prompt", "a", *flags, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bad_input_names_the_field(flux_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "--model-path", str(flux_dir), "--prompt", "a", "--negative-prompt", "ugly", *SMALL_FLAGS, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "negative_prompt" in proc.stderr and "true_cfg_scale" in proc.stderr
    proc = run_cli("--model-path", str(flux_dir), "--prompt", "a", "--width", "40", *SMALL_FLAGS, cwd=tmp_path)
    assert proc.returncode == 2 and "multiple of 16" in proc.stderr
    # The message alone, as written (not the exception's argument tuple).
    assert "sgl-diffusion generate: error: invalid `width`: must be a multiple of 16" in proc.stderr
    proc = run_cli("--model-path", str(flux_dir), "--prompt", "a", "--width", "1024", "--height", "1024",
                   "--num-inference-steps", "1000", "--device", "cpu", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "sgl-diffusion generate: error: this request costs" in proc.stderr
    proc = run_cli("--prompt", "a", "--config", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_unknown_config_keys_are_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("prompt: a\nstepz: 3\n")
    proc = run_cli("--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2 and "unknown option 'stepz'" in proc.stderr


def test_a_missing_model_names_where_it_looked(tmp_path: Path) -> None:
    proc = run_cli("--model-path", "nobody/nothing", "--prompt", "a", "--device", "cpu", cwd=tmp_path,
                   env={"HF_HUB_CACHE": str(tmp_path / "hub")})  # fmt: skip
    assert proc.returncode == 1
    assert "nobody/nothing" in proc.stderr and str(tmp_path / "hub") in proc.stderr


def test_the_builtin_default_model_needs_no_model_path(tmp_path: Path) -> None:
    env = {"SGL_DIFFUSION_CACHE": str(tmp_path / "cache")}
    proc = run_cli("--prompt", "a lighthouse", "--device", "cpu", "--output-path", str(tmp_path), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (written,) = [Path(line) for line in proc.stdout.split()]
    assert image_size(written) == (1024, 1024)  # the model's own default size
    assert (tmp_path / "cache" / "sgl-diffusion" / "tiny-flux1-random-v1" / "model_index.json").is_file()


#: A tqdm progress line of the CLI's denoising bar after at least one finished step, e.g.
#: "denoising:   0%|          | 3/1000 [00:00<01:35, 10.4step/s]"; group 1 is the step count.
DENOISING_PROGRESS = re.compile(r"denoising:\s*\d+%\|[^|\r\n]*\|\s*([1-9]\d*)/1000\b")


def test_ctrl_c_cancels_the_running_request(flux_dir: Path, tmp_path: Path) -> None:
    # Synchronised on an event, not on timing: SIGINT goes out once the CLI has printed a finished
    # denoising step, so the request is known to be running. 1000 steps at 1024x1024 take ~80 s on 2 CPU
    # cores: that is the margin this process has to send the signal, not a guess at how fast the run goes.
    # Once cancelled, the CLI stops at the next step boundary. The child gets SIGINT's default action, as a
    # terminal's foreground command has: a test run started in the background of a non-interactive shell
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler (the run went on to
    # the end, exit 0).
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        # A handler here is reset to the default action in the child (an ignored signal would stay ignored).
        inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
        proc = subprocess.Popen(
            [SGL_DIFFUSION, "generate", "--model-path", str(flux_dir), "--prompt", "a", "--height", "1024",
             "--width", "1024", "--num-inference-steps", "1000", "--max-request-cost", "5000000", "--device", "cpu", "--output-path", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        signal.signal(signal.SIGINT, inherited)
        try:
            deadline = time.monotonic() + 180
            while not DENOISING_PROGRESS.search(log.read_text()):
                assert proc.poll() is None, f"the CLI exited with {proc.returncode} before a step:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no denoising step finished:\n{log.read_text()}"
                time.sleep(0.1)
            assert proc.poll() is None, "the 1000-step run finished before the signal; make it longer"
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:  # never leave a 1000-step run behind on a failure
                proc.kill()
                proc.communicate()
    text = log.read_text()
    assert proc.returncode == 130, text
    assert "cancelled" in text
    steps_done = [int(n) for n in DENOISING_PROGRESS.findall(text)]
    assert max(steps_done) < 1000, "the run went on to the end instead of stopping"
    assert out == "" and not list(tmp_path.glob("*.png"))


def test_generate_writes_an_mp4_for_video_models(tmp_path: Path) -> None:
    from sgl_diffusion.runtime.video import decode_mp4
    from sgl_diffusion.testing import build_fixture

    wan = build_fixture("wan21_t2v", tmp_path / "wan")
    proc = run_cli(
        "--model-path", str(wan), "--prompt", "a cat", "--height", "32", "--width", "48", "--num-frames", "11",
        "--fps", "12", "--output-file-name", "cat.mp4", "--output-path", str(tmp_path), *SMALL_FLAGS,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rounded down to 9" in proc.stderr
    frames, fps = decode_mp4((tmp_path / "cat.mp4").read_bytes())
    assert frames.shape == (9, 32, 48, 3) and fps == pytest.approx(12)


def test_generate_image_to_video_from_an_image_path(tmp_path: Path) -> None:
    from sgl_diffusion.runtime.video import decode_mp4
    from sgl_diffusion.testing import build_fixture

    wan = build_fixture("wan21_i2v", tmp_path / "wan")
    image = tmp_path / "first.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    proc = run_cli(
        "--model-path", str(wan), "--prompt", "a red square", "--image-path", str(image), "--height", "32",
        "--width", "32", "--num-frames", "5", "--output-file-name", "i2v.mp4", "--output-path", str(tmp_path),
        "--device", "cpu", "--num-inference-steps", "2",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    frames, _ = decode_mp4((tmp_path / "i2v.mp4").read_bytes())
    assert frames.shape == (5, 32, 32, 3)
    # A relative path is the working directory's; `--image-path` repeated gives several images, and this model
    # takes one.
    small = ["--height", "32", "--width", "32", "--num-frames", "5", "--device", "cpu", "--num-inference-steps", "2"]
    proc = run_cli(
        "--model-path", str(wan), "--prompt", "a red square", "--image-path", "first.png", *small,
        "--output-file-name", "listed.mp4", "--output-path", str(tmp_path), "--seed", "1", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(
        "--model-path",
        str(wan),
        "--prompt",
        "a",
        "--image-path",
        "first.png",
        "--image-path",
        "first.png",
        *small,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "image_paths" in proc.stderr and "at most 1 input image, got 2" in proc.stderr
    # The fixture's RoPE table (32 positions per axis) cannot run diffusers' default 832x480: give a size.
    proc = run_cli(
        "--model-path", str(wan), "--prompt", "a", "--device", "cpu", "--height", "32", "--width", "32", cwd=tmp_path
    )  # fmt: skip
    assert proc.returncode == 2 and "image" in proc.stderr
