"""The native `sgl-diffusion-server` binary (Rust `main` embedding Python): built with cargo, run as a process."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BINARY = "sgl-diffusion-server"


@pytest.fixture(scope="module")
def server_binary() -> Path:
    """Builds the binary (incremental after `cargo test --workspace`) and returns its path."""
    if shutil.which("cargo") is None:
        pytest.fail("cargo is needed to build the native binary (the README's test command installs Rust first)")
    build = subprocess.run(
        ["cargo", "build", "-p", "sgl-server", "--bin", BINARY, "--message-format=json-render-diagnostics"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    for line in build.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") == "compiler-artifact" and message["target"]["name"] == BINARY:
            return Path(message["executable"])
    raise AssertionError(f"cargo built no {BINARY}:\n{build.stdout}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, body: dict[str, object] | None = None, timeout: float = 120) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def run_binary(binary: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_serves_a_generation_and_stops_on_sigterm(server_binary: Path, flux_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [
        str(server_binary), "--python", sys.executable, "--model-path", str(flux_dir), "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the binary exited with {proc.returncode}:\n{log_path.read_text()}"
            try:
                if http(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"not healthy after 180 s:\n{log_path.read_text()}"
            time.sleep(0.2)

        status, body = http(
            f"{base}/v1/images/generations",
            {
                "prompt": "a cat",
                "size": "32x32",
                "num_inference_steps": 2,
                "max_sequence_length": 16,
                "response_format": "b64_json",
            },
        )
        assert status == 200, body
        (item,) = json.loads(body)["data"]
        with Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) as image:
            assert (image.format, image.size) == ("PNG", (32, 32))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log_text = log_path.read_text()
    assert f"listening on http://127.0.0.1:{port}" in log_text and "model ready" in log_text, log_text
    assert log_text.rstrip().endswith("stopped"), log_text


def flags_in(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))


def test_lists_the_same_flags_as_serve(server_binary: Path) -> None:
    """The binary parses its flags with clap, `serve` with argparse, both from the same declarations (the Rust field
    tables and the flags Python declares): their help lists the same flags, the binary's `--python` aside."""
    wide = {"COLUMNS": "1000"}  # argparse wraps help at the terminal's width, also inside a flag's hyphens
    binary = run_binary(server_binary, "--python", sys.executable, "--help", env=wide)
    serve = subprocess.run(
        [sys.executable, "-m", "sgl_diffusion.cli", "serve", "--help"],
        env={**os.environ, **wide},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert binary.returncode == 0 and serve.returncode == 0, (binary.stderr, serve.stderr)
    assert flags_in(binary.stdout) - {"--python"} == flags_in(serve.stdout)
    assert {"--max-connections", "--precision", "--no-warmup", "--num-gpus", "--config"} <= flags_in(binary.stdout)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-connections", "0"], "--max-connections must be at least 1"),
        (["--port", "70000"], "--port must be at most 65535"),
        (["--num-gpus", "2"], "--num-gpus is not supported yet: multi-GPU inference"),
        (["--dit-precision", "fp8"], "invalid value 'fp8' for '--dit-precision"),
        (["--portz", "1"], "unexpected argument '--portz'"),
    ],
)
def test_bad_flags_are_usage_errors(server_binary: Path, flags: list[str], message: str) -> None:
    proc = run_binary(server_binary, "--python", sys.executable, *flags)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "listening" not in proc.stderr


def test_a_missing_interpreter_is_a_clear_error(server_binary: Path) -> None:
    proc = run_binary(server_binary, "--python", "/nonexistent/python", "--port", "0")
    assert proc.returncode == 1
    assert "sgl-diffusion-server: error: cannot run the Python interpreter /nonexistent/python" in proc.stderr
    assert "listening" not in proc.stderr


def test_an_environment_without_sgl_diffusion_is_a_clear_error(server_binary: Path, tmp_path: Path) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    proc = run_binary(server_binary, "--port", "0", env={"VIRTUAL_ENV": str(venv)})
    assert proc.returncode == 1, proc.stderr
    assert f"cannot import torch in the Python environment {venv / 'bin' / 'python'} (sys.path: [" in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and "pip install sgl-diffusion" in proc.stderr


def test_runs_in_the_active_virtual_env_with_its_interpreter(server_binary: Path, tmp_path: Path) -> None:
    """A venv that sees this environment's packages: the binary takes it from VIRTUAL_ENV, mirrors its
    `sys.executable` and processes its `.pth` files (the probe below records what it saw)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    record = tmp_path / "probe.jsonl"
    here = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (site_packages / "zz_probe.pth").write_text(
        f"import site; list(map(site.addsitedir, {here!r}))\n"
        f"import json, os, sys; open({str(record)!r}, 'a').write("
        "json.dumps({'pid': os.getpid(), 'executable': sys.executable}) + chr(10))\n"
    )
    proc = subprocess.Popen(
        [str(server_binary), "--help"],
        env={**os.environ, "VIRTUAL_ENV": str(venv)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "Usage: sgl-diffusion-server" in stdout and "--python <PATH>" in stdout  # clap's help
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    # The discovery subprocess, then the embedded interpreter (the binary's own process).
    assert {entry["executable"] for entry in seen} == {str(venv / "bin" / "python")}
    assert proc.pid in {entry["pid"] for entry in seen} and len({entry["pid"] for entry in seen}) >= 2
