"""GLM-Image editing over `POST /v1/images/edits`: `sgl-diffusion serve` on the tiny fixture on a real port, spoken
to with the official `openai` client's `images.edit`; the PNGs it returns are diffusers' `GlmImagePipeline` images
for the same images and seed (with a size, and without one: the first image's, on the 32-pixel grid)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from server_util import Server, running_server
from sgl_diffusion.runtime.encode import to_uint8
from sgl_diffusion.testing import build_fixture, build_pipeline
from sgl_diffusion.testing.glm_image import patch_reference_image_tokens

FAST = {"num_inference_steps": 3}
PROMPT = "make it a 'red' fox"


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("glm_edit_inputs")
    return [write_image(root / "first.png", 100, 72, 1), write_image(root / "second.png", 64, 96, 2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = build_fixture("glm_image", tmp_path_factory.mktemp("glm_image") / "model")
    with running_server(model) as running:
        yield running


@pytest.fixture(scope="module")
def oracle():
    # Builds are deterministic: the in-memory pipeline holds the served folder's weights.
    pipe = build_pipeline("glm_image")
    pipe.set_progress_bar_config(disable=True)
    patch_reference_image_tokens(pipe)
    return pipe


def expected_png_pixels(oracle, images: list[Path], seed: int, width: int, height: int) -> np.ndarray:
    image = oracle(
        PROMPT, image=[Image.open(path).convert("RGB") for path in images], height=height, width=width,
        generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **FAST,
    ).images[0]  # fmt: skip
    return to_uint8(image)


def png_pixels(b64: str) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as png:
        assert png.format == "PNG"
        return png.size, np.asarray(png.convert("RGB"))


def test_openai_images_edit_gets_diffusers_images(server: Server, oracle, images: list[Path]) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    with images[0].open("rb") as first, images[1].open("rb") as second:
        result = client.images.edit(
            image=[first, second], prompt=PROMPT, size="64x96", response_format="b64_json",
            extra_body={**FAST, "seed": 7},
        )  # fmt: skip
    size, pixels = png_pixels(result.data[0].b64_json)
    assert size == (64, 96)
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images, 7, width=64, height=96))
    # No size: the first image's (100x72 on the 32-pixel grid, 96x64).
    with images[0].open("rb") as first:
        result = client.images.edit(
            image=first, prompt=PROMPT, response_format="b64_json", extra_body={**FAST, "seed": 3}
        )
    size, pixels = png_pixels(result.data[0].b64_json)
    assert size == (96, 64)
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images[:1], 3, width=96, height=64))
