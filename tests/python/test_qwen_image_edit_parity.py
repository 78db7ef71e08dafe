"""Our Qwen-Image-Edit and Edit-Plus pipelines against diffusers' QwenImageEditPipeline /
QwenImageEditPlusPipeline on tiny fixtures, fp32 on CPU.

Three fixtures: Edit (one reference image, in the chat template at 1024x1024), Edit-Plus in 2509's layout
(1-3 images, each also seen by the text encoder at 384x384 as "Picture i") and 2511's (Edit-Plus whose
transformer modulates reference tokens at timestep 0, `zero_cond_t`). The oracle is the fixture's in-memory
diffusers pipeline (builds are deterministic, so it holds the saved folder's weights): loading the folder
with diffusers would need torchvision for transformers' Qwen2VLProcessor, which our processor does without.

Every reference image is resized to about 1024x1024 pixels for the VAE whatever its size (the reference's
rule), so each run encodes a 1024x1024 image; the tests keep the number of runs small.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines.qwen_image_edit import QwenImageEditPipeline, QwenImageEditPlusPipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture, build_pipeline

PROMPT = "a photo of a cat"
OTHER_PROMPT = "a dragon flying over a medieval castle"
SMALL = {"num_inference_steps": 3}
#: Where outputs are batched as diffusers does not (several outputs per prompt decoded one at a time, other
#: requests in the batch), BLAS blocks products differently: the last bits move (as for Qwen-Image, ~2e-7).
BATCHED_ATOL = 1e-5
#: What another prompt does to the output on these fixtures (measured above 1e-2): far above the bound.
EFFECT = 1e-3
#: What another reference image does at 64x48 (measured 4.5e-4: the tiny VAE damps what the reference tokens
#: change), still 45x the bound above.
IMAGE_EFFECT = 1e-4

EDIT_ID = "Qwen/Qwen-Image-Edit"
PLUS_ID = "Qwen/Qwen-Image-Edit-2509"


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    # Smooth-ish content so resizing is not all aliasing: a gradient plus noise.
    gradient = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("edit_images")
    # Landscape 3:2, portrait 2:3, and a near-square one.
    return [
        write_image(root / "wide.png", 120, 80, 1),
        write_image(root / "tall.png", 64, 96, 2),
        write_image(root / "square.jpg", 90, 88, 3),
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_image_edit")
    folders = {}
    for name in ("qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_2511"):
        folders[name] = build_fixture(name, root / name)
    # The Edit and 2509 folders also under their ids in a fake Hugging Face cache (the cards' defaults).
    for name, hf_id in (("qwen_image_edit", EDIT_ID), ("qwen_image_edit_plus", PLUS_ID)):
        repo = root / "hub" / ("models--" + hf_id.replace("/", "--"))
        shutil.copytree(folders[name], repo / "snapshots" / "x")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("x")
    folders["hub"] = root / "hub"
    return folders


@pytest.fixture(scope="module")
def oracles() -> dict[str, object]:
    pipes = {}
    for name in ("qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_2511"):
        pipe = build_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    return pipes


def card_engine(folders: dict[str, Path], hf_id: str, **engine: object) -> DiffGenerator:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        return DiffGenerator.from_pretrained(hf_id, device="cpu", **engine)


@pytest.fixture(scope="module")
def edit_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = card_engine(folders, EDIT_ID)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def plus_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = card_engine(folders, PLUS_ID, max_batch_size=4, batch_delay_ms=1500)
    yield gen
    gen.shutdown()


def reference(pipe: object, image: list[Path], prompt: str, seed: int, output_type: str = "np", **kwargs: object):
    pil = [Image.open(path).convert("RGB") for path in image]
    generator = torch.Generator("cpu").manual_seed(seed)
    settings = {"negative_prompt": " ", "true_cfg_scale": 4.0, **SMALL, **kwargs}
    return pipe(  # type: ignore[operator]
        image=pil if len(pil) > 1 else pil[0], prompt=prompt, generator=generator, output_type=output_type, **settings
    ).images


def test_edit_matches_diffusers_at_the_input_aspect(edit_engine, oracles, images) -> None:
    # No size given: the output takes the input's aspect at about 1024x1024 pixels, as diffusers' default.
    mine = edit_engine.generate(PROMPT, image=images[0], seed=7, output_type="np", **SMALL).images
    expected = reference(oracles["qwen_image_edit"], images[:1], PROMPT, 7)
    assert mine[0].shape == expected[0].shape == (832, 1248, 3)
    np.testing.assert_array_equal(mine[0], expected[0])


def test_edit_at_a_requested_size_and_another_prompt(edit_engine, oracles, images) -> None:
    size = {"width": 64, "height": 48}
    mine = edit_engine.generate(PROMPT, image=images[1], seed=3, output_type="np", **size, **SMALL).images
    expected = reference(oracles["qwen_image_edit"], images[1:2], PROMPT, 3, **size)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = edit_engine.generate(OTHER_PROMPT, image=images[1], seed=3, output_type="np", **size, **SMALL).images
    assert np.abs(other[0] - mine[0]).max() > EFFECT
    another_image = edit_engine.generate(PROMPT, image=images[0], seed=3, output_type="np", **size, **SMALL).images
    assert np.abs(another_image[0] - mine[0]).max() > IMAGE_EFFECT


@pytest.mark.parametrize("fixture", ["qwen_image_edit_plus", "qwen_image_edit_2511"])
def test_edit_plus_with_several_images_matches_diffusers(folders, oracles, images, fixture: str) -> None:
    # The pipeline under the engine's stages, latents compared before decoding (no engine: a few seconds).
    cls = QwenImageEditPlusPipeline
    pipeline = cls.load(folders[fixture], RuntimeOptions.for_device("cpu"), None)
    request = Request(
        id=1, prompt=PROMPT, negative_prompt=" ", width=64, height=48, num_frames=1, num_inference_steps=3,
        guidance_scale=1.0, true_cfg_scale=4.0, seed=5, max_sequence_length=1024, num_outputs=1,
        image_path=str(images[0]), image_paths=(str(images[0]), str(images[1])), cfg_enabled=True,
        output_format="npy", notes=(),
    )  # fmt: skip
    state = pipeline.run([request], lambda step, total: [])
    expected = reference(oracles[fixture], images[:2], PROMPT, 5, "latent", width=64, height=48)
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)


def test_edit_plus_through_the_engine_matches_diffusers(plus_engine, oracles, images) -> None:
    # Three images; the default size follows the last one (near-square 90x88 -> 1024x1024 area).
    mine = plus_engine.generate(PROMPT, image=images, seed=11, output_type="np", **SMALL).images
    expected = reference(oracles["qwen_image_edit_plus"], images, PROMPT, 11)
    assert mine[0].shape == expected[0].shape
    np.testing.assert_array_equal(mine[0], expected[0])


def test_edit_plus_outputs_per_prompt_and_batches_equal_running_alone(plus_engine, oracles, images) -> None:
    size = {"width": 48, "height": 64}
    two = plus_engine.generate(
        PROMPT, image=images[:2], seed=2, output_type="np", num_outputs_per_prompt=2, **size, **SMALL
    ).images
    expected = reference(oracles["qwen_image_edit_plus"], images[:2], PROMPT, 2, num_images_per_prompt=2, **size)
    for mine, theirs in zip(two, expected, strict=True):
        assert np.abs(mine - theirs).max() <= BATCHED_ATOL
    # Requests with the same images batch (different prompts, seeds and scales); each equals its solo run.
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "true_cfg_scale": 2.0},
    ]
    paths = [str(path) for path in images[:2]]
    handles = [
        plus_engine.submit(**{**size, **SMALL, "output_format": "npy", "image_paths": paths, **f}) for f in fields
    ]
    results = [collect(handle) for handle in handles]
    assert [result.batch_size for result in results] == [2, 2]
    for request_fields, result in zip(fields, results, strict=True):
        alone = reference(oracles["qwen_image_edit_plus"], images[:2], output_type="np", **size, **request_fields)
        assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_edit_requests_are_checked(edit_engine, plus_engine, images, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as no_image:
        edit_engine.generate(PROMPT, **SMALL)
    assert no_image.value.field == "image"
    with pytest.raises(InvalidRequestError) as two:
        edit_engine.generate(PROMPT, image=images[:2], **SMALL)
    assert two.value.field == "image_paths" and "at most 1" in str(two.value)
    with pytest.raises(InvalidRequestError) as four:
        plus_engine.generate(PROMPT, image=[*images, images[0]], **SMALL)
    assert four.value.field == "image_paths" and "at most 3" in str(four.value)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    with pytest.raises(InvalidRequestError) as bad:
        edit_engine.generate(PROMPT, image=not_an_image, width=32, height=32, **SMALL)
    assert bad.value.field == "image" and "notes.png" in str(bad.value)
    with pytest.raises(InvalidRequestError) as guidance:
        edit_engine.generate(PROMPT, image=images[0], guidance_scale=3.0, **SMALL)
    assert guidance.value.field == "guidance_scale"


def test_cards_and_spec(edit_engine, plus_engine, folders) -> None:
    edit, plus = edit_engine.info, plus_engine.info
    assert (edit["pipeline_class"], edit["task"], edit["image_input"], edit["max_input_images"]) == (
        "QwenImageEditPipeline", "image-to-image", "required", 1
    )  # fmt: skip
    assert (plus["pipeline_class"], plus["max_input_images"]) == ("QwenImageEditPlusPipeline", 3)
    assert (edit["defaults"]["num_inference_steps"], plus["defaults"]["num_inference_steps"]) == (50, 40)
    for info in (edit, plus):
        defaults = info["defaults"]
        assert (defaults["true_cfg_scale"], defaults["negative_prompt"]) == (4.0, " ")
        assert defaults["size_from_inputs"] == {"rule": "last_input_aspect_at_area", "area": 1024 * 1024}
    # A folder that is no known checkpoint: diffusers' __call__ defaults (no negative prompt, so no CFG).
    pipeline = QwenImageEditPipeline.load(folders["qwen_image_edit"], RuntimeOptions.for_device("cpu"), None)
    assert (pipeline.spec.defaults.num_inference_steps, pipeline.spec.defaults.negative_prompt) == (50, None)


def test_cli_takes_one_image_path_per_image(folders, oracles, images, tmp_path: Path) -> None:
    from sgl_diffusion.runtime.encode import to_uint8

    command = [
        shutil.which("sgl-diffusion") or "sgl-diffusion", "generate",
        "--model-path", str(folders["qwen_image_edit_plus"]), "--prompt", PROMPT,
        "--image-path", str(images[0]), "--image-path", str(images[1]),
        "--width", "64", "--height", "48", "--num-inference-steps", "3", "--seed", "5", "--device", "cpu",
        "--negative-prompt", " ", "--true-cfg-scale", "4",
        "--output-path", str(tmp_path), "--output-file-name", "edit.png",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "edit.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    expected = reference(oracles["qwen_image_edit_plus"], images[:2], PROMPT, 5, width=64, height=48)
    np.testing.assert_array_equal(pixels, to_uint8(expected[0]))
