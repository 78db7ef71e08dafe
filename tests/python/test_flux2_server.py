"""FLUX.2 over HTTP: `sgl-diffusion serve` on the tiny FLUX.2-dev fixture on a real port, spoken to with the
official `openai` client. `POST /v1/images/edits` with two reference images returns diffusers' `Flux2Pipeline`
image for the same images and seed (with a size, and without one: the first image's size), and
`/v1/images/generations` serves text-to-image from the same model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
from openai import BadRequestError, OpenAI
from PIL import Image

from server_util import Server, running_server
from sgl_diffusion.runtime.encode import to_uint8
from sgl_diffusion.testing import build_fixture, build_pipeline

FAST = {"num_inference_steps": 3, "max_sequence_length": 64}


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("flux2_edit_inputs")
    return [write_image(root / "first.png", 100, 72, 1), write_image(root / "second.png", 64, 64, 2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = build_fixture("flux2_dev", tmp_path_factory.mktemp("flux2_dev") / "model")
    with running_server(model) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def oracle():
    # Builds are deterministic: the in-memory pipeline holds the served folder's weights.
    pipe = build_pipeline("flux2_dev")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected_png_pixels(oracle, images: list[Path], prompt: str, seed: int, **kwargs: object) -> np.ndarray:
    pil = [Image.open(path).convert("RGB") for path in images] or None
    image = oracle(
        image=pil, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        guidance_scale=4.0, **FAST, **kwargs,
    ).images[0]  # fmt: skip
    return to_uint8(image)


def png_pixels(b64: str) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as png:
        assert png.format == "PNG"
        return png.size, np.asarray(png.convert("RGB"))


def test_models_report_flux2(server: Server) -> None:
    card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
    assert (card["task_type"], card["pipeline_class"], card["family"]) == ("T2I", "Flux2Pipeline", "flux2")


def test_openai_images_edit_with_two_images_gets_diffusers_image(client: OpenAI, oracle, images: list[Path]) -> None:
    with images[0].open("rb") as first, images[1].open("rb") as second:
        result = client.images.edit(
            image=[first, second], prompt="a red fox", size="64x48", response_format="b64_json",
            extra_body={**FAST, "seed": 7},
        )  # fmt: skip
    (image,) = result.data
    size, pixels = png_pixels(image.b64_json)
    assert size == (64, 48)
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images, "a red fox", 7, width=64, height=48))


def test_an_edit_without_a_size_takes_the_first_images(client: OpenAI, oracle, images: list[Path]) -> None:
    with images[0].open("rb") as first:
        result = client.images.edit(
            image=first, prompt="a red fox", response_format="b64_json", extra_body={**FAST, "seed": 3}
        )
    size, pixels = png_pixels(result.data[0].b64_json)
    assert size == (96, 64)  # 100x72 on the 16-pixel grid, as the reference sizes it
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images[:1], "a red fox", 3))


def test_generations_serve_text_to_image(client: OpenAI, oracle) -> None:
    result = client.images.generate(
        prompt="a lighthouse at dawn", size="64x64", response_format="b64_json", extra_body={**FAST, "seed": 5}
    )
    size, pixels = png_pixels(result.data[0].b64_json)
    assert size == (64, 64)
    np.testing.assert_array_equal(
        pixels, expected_png_pixels(oracle, [], "a lighthouse at dawn", 5, width=64, height=64)
    )


def test_bad_edits_are_400s_naming_the_field(
    client: OpenAI, server: Server, images: list[Path], tmp_path: Path
) -> None:
    tiny = write_image(tmp_path / "tiny.png", 32, 32, 3)
    with tiny.open("rb") as image, pytest.raises(BadRequestError) as small:
        client.images.edit(image=image, prompt="a red fox", size="64x64", extra_body=FAST)
    assert small.value.body["param"] == "image"  # type: ignore[index]
    assert "64" in small.value.body["message"]  # type: ignore[index]
    with images[0].open("rb") as image, images[1].open("rb") as mask, pytest.raises(BadRequestError) as masked:
        client.images.edit(image=image, mask=mask, prompt="a red fox", extra_body=FAST)
    assert masked.value.body["param"] == "mask"  # type: ignore[index]
    # The server still serves.
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
