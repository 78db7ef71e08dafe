"""Qwen-Image end to end: `sgl-diffusion serve` on the tiny fixture, on a real port, spoken to with the official
`openai` client; the PNG it returns is diffusers' image for the same seed."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from server_util import Server, running_server
from sgl_diffusion.runtime.encode import to_uint8
from sgl_diffusion.testing import build_fixture

#: 3 steps, up to 64 prompt tokens: well under a second per image on CPU.
FAST = {"num_inference_steps": 3, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("qwen_image", tmp_path_factory.mktemp("qwen_image") / "model")


@pytest.fixture(scope="module")
def server(qwen_dir: Path) -> Iterator[Server]:
    with running_server(qwen_dir) as running:
        yield running


def test_models_report_the_family(server: Server) -> None:
    card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
    assert (card["family"], card["task"], card["task_type"]) == ("qwen_image", "text-to-image", "T2I")
    assert (card["pipeline_class"], card["pipeline_name"]) == ("QwenImagePipeline", "qwen_image_pipeline")


def test_openai_client_gets_diffusers_image(server: Server, qwen_dir: Path) -> None:
    from diffusers import QwenImagePipeline

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {**FAST, "seed": 7, "negative_prompt": " ", "true_cfg_scale": 4.0}
    result = client.images.generate(prompt="a red fox", size="80x48", response_format="b64_json", extra_body=extra)
    (image,) = result.data
    with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as png:
        assert (png.format, png.size) == ("PNG", (80, 48))
        pixels = np.asarray(png.convert("RGB"))
    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a red fox", negative_prompt=" ", true_cfg_scale=4.0, width=80, height=48, output_type="np",
        generator=torch.Generator("cpu").manual_seed(7), **FAST,
    ).images[0]  # fmt: skip
    # Equal float images (test_qwen_image_pipeline_parity), rounded to 8 bits the same way.
    np.testing.assert_array_equal(pixels, to_uint8(expected))
