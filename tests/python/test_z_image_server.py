"""Z-Image end to end: `sgl-diffusion serve` on the tiny fixture, on a real port, spoken to with the official
`openai` client; the PNG it returns is diffusers' image for the same seed and guidance settings."""

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
def z_image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("z_image_turbo", tmp_path_factory.mktemp("z_image") / "model")


@pytest.fixture(scope="module")
def server(z_image_dir: Path) -> Iterator[Server]:
    with running_server(z_image_dir) as running:
        yield running


def test_models_report_the_family(server: Server) -> None:
    card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
    assert (card["family"], card["task"], card["task_type"]) == ("z_image", "text-to-image", "T2I")
    assert (card["pipeline_class"], card["pipeline_name"]) == ("ZImagePipeline", "z_image_pipeline")


def test_openai_client_gets_diffusers_image(server: Server, z_image_dir: Path) -> None:
    from diffusers import ZImagePipeline

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    # Z-Image's own guidance fields travel as extra body fields, like any request field.
    guidance = {"guidance_scale": 2.0, "cfg_truncation": 0.2, "cfg_normalization": 1.5}
    extra = {**FAST, **guidance, "seed": 7}
    result = client.images.generate(prompt="a red fox", size="80x48", response_format="b64_json", extra_body=extra)
    (image,) = result.data
    with Image.open(io.BytesIO(base64.b64decode(image.b64_json))) as png:
        assert (png.format, png.size) == ("PNG", (80, 48))
        pixels = np.asarray(png.convert("RGB"))
    pipe = ZImagePipeline.from_pretrained(z_image_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a red fox", width=80, height=48, output_type="np", generator=torch.Generator("cpu").manual_seed(7),
        **guidance, **FAST,
    ).images[0]  # fmt: skip
    # Equal float images (test_z_image_pipeline_parity), rounded to 8 bits the same way.
    np.testing.assert_array_equal(pixels, to_uint8(expected))
