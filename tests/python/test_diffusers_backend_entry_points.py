"""The diffusers backend from the command line and over HTTP: each of the three fixtures with no native family (SD3,
PixArt-Sigma, CogVideoX) through `sgl-diffusion generate` and through a real `sgl-diffusion serve` process on a real
port with the official `openai` client, each output equal to diffusers' own pipeline called directly with the same
seed (PNG pixels; the video's exact floats as `.npy` from the CLI, and over HTTP the very MP4 bytes our encoder makes of
diffusers' frames). The three processes of each test start together: their imports dominate and overlap."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from diffusers_backend_util import NAMES, PIXART_KWARGS, PROMPT, build_models, call_kwargs, diffusers_output
from server_util import launch_server
from sgl_diffusion.runtime.encode import to_uint8
from sgl_diffusion.runtime.video import encode_mp4
from sgl_diffusion.testing import FIXTURE_REGISTRY

# OpenAI retired its video API; the official client warns on every `videos` method.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled to permanently shut down:DeprecationWarning")

SGL_DIFFUSION = shutil.which("sgl-diffusion") or pytest.fail("the sgl-diffusion command is not installed")
#: Video jobs of the tiny CogVideoX fixture finish in well under a second; the bound allows a loaded machine.
FINISH_TIMEOUT = 120
VIDEO_FPS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("diffusers_backend_entry_points"))


def config_file(folder: Path, name: str, **extra: Any) -> Path:
    """A `--config` file: PixArt's `diffusers_kwargs` (the docs' way to pass `__call__` options), `backend`."""
    config = {"backend": "diffusers", **extra}
    if name == "pixart_sigma":
        config["diffusers_kwargs"] = PIXART_KWARGS
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def flags(settings: Mapping[str, Any]) -> list[str]:
    return [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as png:
        return np.asarray(png.convert("RGB"))


def test_cli_gives_diffusers_output(models: Mapping[str, Path], tmp_path: Path) -> None:
    runs: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    for name in NAMES:
        video = name == "cogvideox"
        output = tmp_path / f"{name}.{'npy' if video else 'png'}"
        command = [
            SGL_DIFFUSION, "generate", "--model-path", str(models[name]), "--prompt", PROMPT, "--device", "cpu",
            "--config", str(config_file(tmp_path, name, seed=5)), "--output-path", str(tmp_path),
            "--output-file-name", output.name, *flags(call_kwargs(name)),
            *(["--output-format", "npy"] if video else []),
        ]  # fmt: skip
        process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        runs[name] = (process, output)
    for name, (process, output) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}: {stderr}"
        assert stdout.split() == [str(output)], stdout
        expected = diffusers_output(models[name], 5, **call_kwargs(name))[0]
        if name == "cogvideox":
            np.testing.assert_array_equal(np.load(output), expected)  # T x H x W x 3 floats
        else:
            np.testing.assert_array_equal(png_pixels(output.read_bytes()), to_uint8(expected))


def http_settings(name: str) -> dict[str, Any]:
    """The fixture's settings as extra body fields (the size is OpenAI's `size`; videos take no text length)."""
    skip = {"height", "width"} | ({"max_sequence_length"} if name == "cogvideox" else set())
    return {key: value for key, value in call_kwargs(name).items() if key not in skip}


def test_http_openai_client_gets_diffusers_output(models: Mapping[str, Path], tmp_path: Path) -> None:
    with ExitStack() as stack:
        servers = {}
        for name in NAMES:
            server = launch_server(models[name], "--config", str(config_file(tmp_path, name)), log_dir=tmp_path)
            stack.callback(server.stop)
            servers[name] = server
        for name, server in servers.items():
            server.wait_ready(240)
            client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            card = client.models.list().data[0].to_dict()
            assert (card["family"], card["pipeline_class"]) == ("diffusers", FIXTURE_REGISTRY[name].pipeline_class)
            kwargs = call_kwargs(name)
            size = f"{kwargs['width']}x{kwargs['height']}"
            extra = {"seed": 11, **http_settings(name)}
            if name == "cogvideox":
                extra["fps"] = VIDEO_FPS
                job = client.videos.create(prompt=PROMPT, size=size, extra_body=extra)
                deadline = time.monotonic() + FINISH_TIMEOUT
                while job.status in ("queued", "in_progress"):
                    assert time.monotonic() < deadline, f"job {job.id} did not finish: {job}"
                    time.sleep(0.1)
                    job = client.videos.retrieve(job.id)
                assert job.status == "completed", job
                data = client.videos.download_content(job.id).read()
                frames = diffusers_output(models[name], 11, **kwargs)[0]
                assert data == encode_mp4(frames, fps=VIDEO_FPS)  # the same encoder on the same frames
            else:
                result = client.images.generate(prompt=PROMPT, size=size, response_format="b64_json", extra_body=extra)  # type: ignore[arg-type]
                (image,) = result.data
                expected = to_uint8(diffusers_output(models[name], 11, **kwargs)[0])
                np.testing.assert_array_equal(png_pixels(base64.b64decode(image.b64_json or "")), expected)
