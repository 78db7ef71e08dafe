"""Qwen-Image 2.1 with condition images (text-image-to-image) against diffusers' QwenImage21Pipeline(image=...)
on the tiny fixture, fp32 on CPU.

Every condition image is resized to about 1024x1024 pixels whatever its size (the reference's rule), so
each run encodes 1024x1024 images and runs the DiT over their tokens: the tests keep the number of runs
small. The oracle is the fixture's in-memory diffusers pipeline (see test_qwen_image_21_pipeline_parity.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.pipelines.qwen_image_21 import QwenImage21Pipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture, build_pipeline

PROMPT = "a photo of a cat"
CFG = {"negative_prompt": " ", "true_cfg_scale": 4.0}
#: What another condition image does to the latents on this fixture: far above any rounding.
IMAGE_EFFECT = 1e-3


def write_image(path: Path, width: int, height: int, seed: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    # Smooth-ish content so resizing is not all aliasing: a gradient plus noise (and a varying alpha).
    gradient = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 30, (height, width, channels)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("qwen21_images")
    # Landscape 3:2 (RGB) and portrait 2:3 with an alpha channel (the VAE reads it).
    return [write_image(root / "wide.png", 120, 80, 1), write_image(root / "tall.png", 64, 96, 2, "RGBA")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("qwen_image_21", tmp_path_factory.mktemp("qwen_image_21") / "model")


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folder, device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def oracle():
    pipe = build_pipeline("qwen_image_21")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, images: list[Path], seed: int, output_type: str, **kwargs: object):
    pil = [Image.open(path) for path in images]
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt=PROMPT, image=pil, generator=generator, output_type=output_type, **kwargs).images
    return out if output_type == "latent" else out[..., :3]


def request(images: list[Path], **fields: object) -> Request:
    paths = tuple(str(path) for path in images)
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": " ", "width": 64, "height": 96, "num_frames": 1,
        "num_inference_steps": 2, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "seed": 5,
        "max_sequence_length": 1024, "num_outputs": 1, "image_path": paths[0], "image_paths": paths,
        "cfg_enabled": True, "output_format": "npy", "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


def test_one_image_through_the_engine_at_its_aspect_matches_diffusers(engine, oracle, images) -> None:
    # No size given: the output takes the image's aspect at about 1024x1024 pixels, as the reference's default.
    mine = engine.generate(PROMPT, image=images[0], seed=7, output_type="np", num_inference_steps=2).images
    expected = reference(oracle, images[:1], 7, "np", num_inference_steps=2)
    assert mine[0].shape == expected[0].shape == (832, 1248, 3)
    np.testing.assert_array_equal(mine[0], expected[0])


def test_two_images_with_guidance_match_diffusers_and_the_images_act(folder, oracle, images) -> None:
    # The pipeline under the engine's stages, latents compared before decoding (no engine: fewer runs).
    pipeline = QwenImage21Pipeline.load(folder, RuntimeOptions.for_device("cpu"), None)
    state = pipeline.run([request(images)], lambda step, total: [])
    assert state["img_shapes"] == [(1, 52, 78), (1, 78, 52), (1, 6, 4)]
    expected = reference(oracle, images, 5, "latent", width=64, height=96, num_inference_steps=2, **CFG)
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)
    swapped = pipeline.run([request(images[::-1])], lambda step, total: [])
    assert (swapped["latents"] - state["latents"]).abs().max() > IMAGE_EFFECT


def test_image_requests_are_checked(engine, images, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as five:
        engine.generate(PROMPT, image=[*images, *images, images[0]], num_inference_steps=2)
    assert five.value.field == "image_paths" and "at most 4" in str(five.value)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(InvalidRequestError) as bad:
        engine.generate(PROMPT, image=not_an_image, width=32, height=32, num_inference_steps=2)
    assert bad.value.field == "image" and "notes.png" in str(bad.value)
