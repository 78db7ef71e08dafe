"""Qwen-Image-Edit-Plus end to end over `POST /v1/images/edits`: `sgl-diffusion serve` on the tiny 2509 fixture on
a real port, spoken to with the official `openai` client's `images.edit` and with curl; the PNG it returns is
diffusers' `QwenImageEditPlusPipeline` image for the same images and seed."""

from __future__ import annotations

import base64
import io
import json
import subprocess
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

FAST = {"num_inference_steps": 3}


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("edit_inputs")
    return [write_image(root / "first.png", 96, 64, 1), write_image(root / "second.png", 64, 64, 2)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = build_fixture("qwen_image_edit_plus", tmp_path_factory.mktemp("edit_plus") / "model")
    with running_server(model) as running:
        yield running


@pytest.fixture(scope="module")
def oracle():
    pipe = build_pipeline("qwen_image_edit_plus")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def expected_png_pixels(oracle, images: list[Path], prompt: str, seed: int, **kwargs: object) -> np.ndarray:
    pil = [Image.open(path).convert("RGB") for path in images]
    image = oracle(
        image=pil, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        **FAST, **kwargs,
    ).images[0]  # fmt: skip
    return to_uint8(image)


def png_pixels(b64: str) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as png:
        assert png.format == "PNG"
        return png.size, np.asarray(png.convert("RGB"))


def test_models_report_an_image_to_image_model(server: Server) -> None:
    card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
    assert (card["task"], card["task_type"], card["pipeline_class"]) == (
        "image-to-image", "I2I", "QwenImageEditPlusPipeline"
    )  # fmt: skip


def test_openai_images_edit_gets_diffusers_image(server: Server, oracle, images: list[Path]) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    with images[0].open("rb") as first, images[1].open("rb") as second:
        result = client.images.edit(
            image=[first, second], prompt="a red fox", size="64x48", response_format="b64_json",
            extra_body={**FAST, "seed": 7},
        )  # fmt: skip
    (image,) = result.data
    size, pixels = png_pixels(image.b64_json)
    assert size == (64, 48)
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images, "a red fox", 7, width=64, height=48))


def test_curl_with_a_data_url_and_the_default_size(server: Server, oracle, images: list[Path]) -> None:
    # One image as a data URL; no size: the image's aspect (3:2) at about 1024x1024 pixels.
    data_url = "data:image/png;base64," + base64.b64encode(images[0].read_bytes()).decode()
    proc = subprocess.run(
        [
            "curl", "-sS", "-X", "POST", f"{server.base_url}/v1/images/edits",
            # --form-string: -F would read the data URL's ";base64" as one of its own field options.
            "-F", "prompt=a red fox", "--form-string", f"url={data_url}", "-F", "seed=3",
            "-F", "num_inference_steps=3",
        ],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    body = json.loads(proc.stdout)
    assert "data" in body, body
    (image,) = body["data"]
    size, pixels = png_pixels(image["b64_json"])
    assert size == (1248, 832)
    np.testing.assert_array_equal(pixels, expected_png_pixels(oracle, images[:1], "a red fox", 3))


def test_bad_parts_are_400s_naming_them(server: Server, images: list[Path], tmp_path: Path) -> None:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    with images[0].open("rb") as image, images[1].open("rb") as mask, pytest.raises(BadRequestError) as masked:
        client.images.edit(image=image, mask=mask, prompt="a red fox", extra_body=FAST)
    assert masked.value.body["param"] == "mask"  # type: ignore[index]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    with not_an_image.open("rb") as bad, pytest.raises(BadRequestError) as refused:
        client.images.edit(image=bad, prompt="a red fox", extra_body=FAST)
    assert refused.value.body["param"] == "image"  # type: ignore[index]
    four = [path.open("rb") for path in [*images, *images]]
    try:
        with pytest.raises(BadRequestError) as too_many:
            client.images.edit(image=four, prompt="a red fox", extra_body=FAST)
    finally:
        for file in four:
            file.close()
    assert too_many.value.body["param"] == "image"  # type: ignore[index]
    assert "3" in too_many.value.body["message"]  # type: ignore[index]
    # The server still serves.
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
