"""Our FLUX.2 pipelines against diffusers' Flux2Pipeline / Flux2KleinPipeline on tiny fixtures, fp32 on CPU.

Reference images (multi-image conditioning) go through `generate(image=...)` and the CLI's repeated
`--image-path`, against diffusers' `image=` list.

Three fixtures: FLUX.2-dev (Mistral3 prompts, embedded guidance), FLUX.2-klein in klein-4B's step-distilled
layout (Qwen3 prompts, no guidance) and klein-base (classifier-free guidance against the empty prompt). The
engines go through `DiffGenerator` (the Rust scheduler, resolver and executor) on the saved folders; the
oracle is diffusers loading the same folders. Known ids are served from a fake Hugging Face cache holding the
same folders, for the model cards' defaults.
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
from sgl_diffusion.pipelines.flux2 import Flux2Pipeline, empirical_mu
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture

PROMPT = "a photo of a cat"
OTHER_PROMPT = "a dragon flying over a medieval castle"
#: 64x64 (a 4x4 grid of packed tokens), 3 steps, 64 prompt tokens: a few hundredths of a second per run.
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 64}
KLEIN_SMALL = {**SMALL, "num_inference_steps": 4}
#: Where we batch what diffusers does not (several outputs of one prompt decoded one at a time; requests
#: batched together; both CFG branches in one forward), BLAS blocks the products differently and the last
#: bits move (measured up to 3e-6); the bound sits above that, 500x under the fp32 contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What another prompt, seed or guidance scale does to the image on these fixtures (measured 0.02 and more:
#: the random 30-layer encoder and the tiny VAE damp it): 100x the bound above.
EFFECT = 1e-3

#: What another reference image (or none) does at 64x48 on these fixtures (measured 0.013 to 0.029).
IMAGE_EFFECT = 1e-3

DEV_ID = "black-forest-labs/FLUX.2-dev"
KLEIN_ID = "black-forest-labs/FLUX.2-klein-4B"


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    # Smooth-ish content so resizing is not all aliasing: a gradient plus noise.
    gradient = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("flux2_images")
    # Landscape 3:2 (cropped to the 16-pixel grid: 120 -> 112), portrait, and one over 1024x1024 pixels (shrunk
    # to that area at its aspect, Lanczos, then cropped).
    return [
        write_image(root / "wide.png", 120, 80, 1),
        write_image(root / "tall.jpg", 72, 100, 2),
        write_image(root / "large.png", 1100, 1000, 3),
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux2")
    folders = {name: build_fixture(name, root / name) for name in ("flux2_dev", "flux2_klein", "flux2_klein_base")}
    for name, hf_id in (("flux2_dev", DEV_ID), ("flux2_klein", KLEIN_ID)):
        repo = root / "hub" / ("models--" + hf_id.replace("/", "--"))
        shutil.copytree(folders[name], repo / "snapshots" / "x")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("x")
    folders["hub"] = root / "hub"
    return folders


def load_card_engine(folders: dict[str, Path], hf_id: str, **engine: object) -> DiffGenerator:
    with pytest.MonkeyPatch.context() as patch:
        # The id is resolved (in the local cache only) when the engine loads.
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        return DiffGenerator.from_pretrained(hf_id, device="cpu", **engine)


@pytest.fixture(scope="module")
def dev_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folders["flux2_dev"], device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def batching_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    """The dev engine with batching on: up to 8 images, waiting up to 1.5 s for company."""
    gen = DiffGenerator.from_pretrained(folders["flux2_dev"], device="cpu", max_batch_size=8, batch_delay_ms=1500)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def klein_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = load_card_engine(folders, KLEIN_ID)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def diffusers_dev(folders: dict[str, Path]):
    from diffusers import Flux2Pipeline as DiffusersFlux2Pipeline

    pipe = DiffusersFlux2Pipeline.from_pretrained(folders["flux2_dev"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_klein(folders: dict[str, Path]):
    from diffusers import Flux2KleinPipeline

    pipes = {name: Flux2KleinPipeline.from_pretrained(folders[name]) for name in ("flux2_klein", "flux2_klein_base")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def reference(pipe, prompt: str, seed: int, output_type: str = "np", images: list[Path] = (), **kwargs: object):
    generator = torch.Generator("cpu").manual_seed(seed)
    pil = [Image.open(path).convert("RGB") for path in images] or None
    return pipe(prompt=prompt, image=pil, generator=generator, output_type=output_type, **{**SMALL, **kwargs}).images


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


# --------------------------------------------------------------------------------------------------
# FLUX.2-dev
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (96, 32)])
def test_dev_matches_diffusers(dev_engine, diffusers_dev, height: int, width: int) -> None:
    size = {"height": height, "width": width}
    mine = ours(dev_engine, PROMPT, 7, **size)
    expected = reference(diffusers_dev, PROMPT, 7, guidance_scale=4.0, **size)
    assert mine[0].shape == (height, width, 3)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = ours(dev_engine, OTHER_PROMPT, 7, **size)
    assert np.abs(other[0] - mine[0]).max() > EFFECT


def test_dev_embedded_guidance_matches_diffusers(dev_engine, diffusers_dev) -> None:
    mine = ours(dev_engine, PROMPT, 3, guidance_scale=2.5)
    np.testing.assert_array_equal(mine[0], reference(diffusers_dev, PROMPT, 3, guidance_scale=2.5)[0])
    assert np.abs(mine[0] - ours(dev_engine, PROMPT, 3)[0]).max() > EFFECT


def test_dev_several_outputs_per_prompt_match_diffusers(dev_engine, diffusers_dev) -> None:
    mine = ours(dev_engine, "a red fox", 3, num_outputs_per_prompt=2)
    expected = reference(diffusers_dev, "a red fox", 3, guidance_scale=4.0, num_images_per_prompt=2)
    assert len(mine) == 2
    for image, theirs in zip(mine, expected, strict=True):
        assert np.abs(image - theirs).max() <= BATCHED_ATOL
    # Two draws from one generator: the outputs differ.
    assert np.abs(mine[0] - mine[1]).max() > EFFECT


def request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": None, "width": 48, "height": 80, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 4.0, "true_cfg_scale": 1.0, "seed": 3,
        "max_sequence_length": 64, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": False, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


def test_dev_latents_and_embeddings_match_diffusers(folders, diffusers_dev) -> None:
    pipeline = Flux2Pipeline.load(folders["flux2_dev"], RuntimeOptions.for_device("cpu"), None)
    state = pipeline.run([request()], lambda step, total: [])
    expected = reference(diffusers_dev, PROMPT, 3, "latent", guidance_scale=4.0, height=80, width=48)
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)
    # The prompt embeddings, where a text-path bug would show most (the tiny DiT damps the prompt).
    texts = [PROMPT, OTHER_PROMPT, "", PROMPT]
    encoded = pipeline.adapter.encode_prompts(texts, 64, torch.device("cpu"))["encoder_hidden_states"]
    assert encoded.shape == (4, 64, 48)
    for row, text in enumerate(texts):
        with torch.no_grad():
            embeds, _ = diffusers_dev.encode_prompt(text, max_sequence_length=64)
        torch.testing.assert_close(encoded[row : row + 1], embeds, rtol=0, atol=0)
    assert (encoded[0] - encoded[1]).abs().max() > 1e-3


def test_empirical_mu_matches_diffusers() -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for tokens in (16, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50):
            assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)


def test_batched_requests_match_running_alone(batching_engine, dev_engine) -> None:
    # Different prompts, seeds and embedded guidance scales in one batch.
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "guidance_scale": 2.0},
        {"prompt": "dance monkey", "seed": 3, "guidance_scale": 6.0},
        {"prompt": "a lighthouse at dawn", "seed": 4, "num_outputs_per_prompt": 2},
    ]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(dev_engine, **request_fields)
        assert result.batch_size == 4  # requests (five images)
        assert len(result.images) == len(alone)
        for batched, solo in zip(result.images, alone, strict=True):
            assert np.abs(batched - solo).max() <= BATCHED_ATOL


def test_dev_defaults_limits_and_refusals(folders, dev_engine) -> None:
    # A folder that is no known checkpoint: Flux2Pipeline.__call__'s defaults.
    defaults = dev_engine.info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 50)
    assert (defaults["guidance_scale"], defaults["negative_prompt"]) == (4.0, None)
    assert defaults["max_sequence_length"] == 512
    info = dev_engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "flux2", "text-to-image", "embedded_with_true_cfg", "Flux2Pipeline"
    )  # fmt: skip
    limits = info["limits"]
    assert (limits["size_multiple"], limits["token_size"], limits["max_sequence_length"]) == (16, 16, 512)
    # The known id: the model card's (the same values as diffusers' defaults).
    card = load_card_engine(folders, DEV_ID)
    try:
        card_defaults = card.info["defaults"]
        assert (card_defaults["width"], card_defaults["num_inference_steps"], card_defaults["guidance_scale"]) == (
            1024, 50, 4.0
        )  # fmt: skip
    finally:
        card.shutdown()
    # No negative prompt in the reference: true CFG is refused, naming the field; sizes off the 16-pixel grid too.
    with pytest.raises(InvalidRequestError) as negative:
        dev_engine.generate(PROMPT, negative_prompt="blurry", true_cfg_scale=3.0, **SMALL)
    assert negative.value.field == "negative_prompt"
    with pytest.raises(InvalidRequestError) as size:
        dev_engine.generate(PROMPT, **{**SMALL, "height": 72})
    assert size.value.field == "height"


# --------------------------------------------------------------------------------------------------
# FLUX.2-klein
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_klein_matches_diffusers(klein_engine, diffusers_klein, height: int, width: int) -> None:
    size = {"height": height, "width": width}
    # The card's defaults: 4 steps, guidance 1 (none); diffusers ignores guidance for a distilled model.
    mine = klein_engine.generate(PROMPT, seed=5, output_type="np", **size, max_sequence_length=64).images
    expected = reference(diffusers_klein["flux2_klein"], PROMPT, 5, num_inference_steps=4, **size)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = ours(klein_engine, OTHER_PROMPT, 5, **{**KLEIN_SMALL, **size})
    assert np.abs(other[0] - mine[0]).max() > EFFECT


@pytest.mark.parametrize("cfg_batching", ["off", "on"])
def test_klein_base_cfg_matches_diffusers(folders, diffusers_klein, cfg_batching: str) -> None:
    pipe = diffusers_klein["flux2_klein_base"]
    gen = DiffGenerator.from_pretrained(folders["flux2_klein_base"], device="cpu", cfg_batching=cfg_batching)
    try:
        assert gen.info["defaults"]["guidance_scale"] == 4.0  # diffusers' default: CFG against ""
        for size in ({"height": 48, "width": 80}, {"height": 64, "width": 64}):
            mine = ours(gen, PROMPT, 9, **{**KLEIN_SMALL, **size})
            expected = reference(pipe, PROMPT, 9, guidance_scale=4.0, **{**KLEIN_SMALL, **size})
            if cfg_batching == "off":
                np.testing.assert_array_equal(mine[0], expected[0])
            else:
                assert np.abs(mine[0] - expected[0]).max() <= BATCHED_ATOL
        # Guidance off (scale 1): one branch, as diffusers runs it.
        unguided = ours(gen, PROMPT, 9, **KLEIN_SMALL, guidance_scale=1.0)
        np.testing.assert_array_equal(unguided[0], reference(pipe, PROMPT, 9, **KLEIN_SMALL, guidance_scale=1.0)[0])
        assert np.abs(unguided[0] - mine[0]).max() > EFFECT
    finally:
        gen.shutdown()


def test_klein_defaults_and_refusals(klein_engine) -> None:
    defaults = klein_engine.info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 4)
    assert defaults["guidance_scale"] == 1.0
    assert (klein_engine.info["guidance"], klein_engine.info["pipeline_class"]) == (
        "classifier_free", "Flux2KleinPipeline"
    )  # fmt: skip
    # Step-distilled: guidance cannot act, so asking for it (or for a negative prompt) is an error.
    with pytest.raises(InvalidRequestError) as guidance:
        klein_engine.generate(PROMPT, guidance_scale=4.0, **KLEIN_SMALL)
    assert guidance.value.field == "guidance_scale"
    with pytest.raises(InvalidRequestError) as negative:
        klein_engine.generate(PROMPT, negative_prompt="blurry", **KLEIN_SMALL)
    assert negative.value.field == "negative_prompt"


# --------------------------------------------------------------------------------------------------
# Reference images
# --------------------------------------------------------------------------------------------------

#: The fixtures and how each runs: dev with its embedded guidance, klein distilled, klein base with CFG.
REFERENCE_CASES = {
    "flux2_dev": {"guidance_scale": 4.0, "num_inference_steps": 3},
    "flux2_klein": {"num_inference_steps": 4},
    "flux2_klein_base": {"guidance_scale": 4.0, "num_inference_steps": 4},
}


@pytest.mark.parametrize("fixture", list(REFERENCE_CASES))
def test_reference_images_match_diffusers(folders, images, fixture: str) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[fixture])
    pipe.set_progress_bar_config(disable=True)
    settings = {**SMALL, **REFERENCE_CASES[fixture], "height": 48, "width": 64}
    gen = DiffGenerator.from_pretrained(folders[fixture], device="cpu", cfg_batching="off")
    try:
        plain = ours(gen, PROMPT, 5, **settings)[0]
        previous = plain
        for count in (1, 2, 3):
            chosen = images[:count]
            mine = gen.generate(PROMPT, seed=5, output_type="np", image=[str(p) for p in chosen], **settings).images
            np.testing.assert_array_equal(mine[0], reference(pipe, PROMPT, 5, images=chosen, **settings)[0])
            # Each image acts: with one more, the image differs.
            assert np.abs(mine[0] - previous).max() > IMAGE_EFFECT
            previous = mine[0]
    finally:
        gen.shutdown()


def test_without_a_size_the_output_takes_the_first_images(klein_engine, diffusers_klein, images) -> None:
    # The reference's rule (applied by the Rust core): the first image's prepared size, here 120x80 -> 112x80;
    # the second image does not count.
    assert klein_engine.info["defaults"]["size_from_inputs"] == {
        "rule": "first_input_within_area",
        "max_area": 1024 * 1024,
    }
    chosen = [str(images[0]), str(images[1])]
    mine = klein_engine.generate(PROMPT, seed=2, output_type="np", image=chosen, max_sequence_length=64).images
    assert mine[0].shape == (80, 112, 3)
    # diffusers without a size either (not through `reference`, which passes SMALL's).
    expected = diffusers_klein["flux2_klein"](
        prompt=PROMPT, image=[Image.open(p).convert("RGB") for p in images[:2]], num_inference_steps=4,
        max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(2), output_type="np",
    ).images  # fmt: skip
    np.testing.assert_array_equal(mine[0], expected[0])


def test_reference_requests_batch_and_match_running_alone(batching_engine, dev_engine, images) -> None:
    # Same images (the batch key), different prompts, seeds and guidance; two outputs for one of them.
    with_images = {**SMALL, "height": 48, "width": 64, "image_paths": [str(p) for p in images[:2]]}
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "guidance_scale": 2.5, "num_outputs_per_prompt": 2},
    ]
    handles = [batching_engine.submit(**{**with_images, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(dev_engine, **{**with_images, **request_fields})
        assert result.batch_size == 2
        for batched, solo in zip(result.images, alone, strict=True):
            assert np.abs(batched - solo).max() <= BATCHED_ATOL


def test_bad_reference_images_are_refused(klein_engine, images, tmp_path: Path) -> None:
    small = write_image(tmp_path / "small.png", 48, 96, 4)
    strip = write_image(tmp_path / "strip.png", 640, 72, 5)
    for path, says in ((small, "at least 64"), (strip, "8:1")):
        with pytest.raises(InvalidRequestError, match=says) as refused:
            klein_engine.generate(PROMPT, image=str(path), **KLEIN_SMALL)
        assert refused.value.field == "image"
    # klein takes up to 4 reference images (dev up to 10).
    assert klein_engine.info["max_input_images"] == 4
    with pytest.raises(InvalidRequestError) as too_many:
        klein_engine.generate(PROMPT, image=[str(images[0])] * 5, **KLEIN_SMALL)
    assert too_many.value.field == "image_paths"


def test_cli_takes_reference_images(folders, images, diffusers_dev, tmp_path: Path) -> None:
    from sgl_diffusion.runtime.encode import to_uint8

    command = [
        shutil.which("sgl-diffusion") or "sgl-diffusion", "generate",
        "--model-path", str(folders["flux2_dev"]), "--prompt", PROMPT,
        "--image-path", str(images[0]), "--image-path", str(images[1]),
        "--width", "64", "--height", "48", "--num-inference-steps", "3", "--max-sequence-length", "64",
        "--seed", "5", "--device", "cpu", "--output-path", str(tmp_path), "--output-file-name", "edit.png",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "edit.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    expected = reference(diffusers_dev, PROMPT, 5, images=images[:2], guidance_scale=4.0, width=64, height=48)
    np.testing.assert_array_equal(pixels, to_uint8(expected[0]))
