"""GLM-Image image editing (`image=`) against diffusers' GlmImagePipeline on the tiny fixture, fp32 on CPU.

One and two input images, the prior sampled from the seed (only the target grid: image-to-image samples no
preview, so these runs are quick) or injected, classifier-free guidance on and off: the same prior tokens and
the same pixels as diffusers. diffusers 0.42.1 cannot tokenize input images under transformers 5 (see
`patch_reference_image_tokens`); the oracle runs with that one call mended.
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
from sgl_diffusion.models.glm_image.prior import encode_prior_images
from sgl_diffusion.pipelines.glm_image import MAX_INPUT_IMAGES, GlmImagePipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture
from sgl_diffusion.testing.glm_image import patch_reference_image_tokens

#: A 64x96 output (a 2x3 prior grid, 4x6 DiT tokens), 3 steps.
SMALL = {"height": 64, "width": 96, "num_inference_steps": 3}
PROMPT = "make it a 'red' fox"
#: The same token length as PROMPT (their priors share one `generate`).
SAME_LENGTH_PROMPT = "make it a 'tan' cat"
#: Requests batched together (several outputs of a request, several requests): BLAS may block the products
#: differently and move the last bits; far under the fp32 parity contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What another input image does to the output on this fixture: far above the bound above.
EFFECT = 1e-3


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("glm_image", tmp_path_factory.mktemp("glm_image_edit") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Sides that are multiples of 32, where the reference runs: 96x64 (a 2x3 prior grid) and 64x96."""
    root = tmp_path_factory.mktemp("glm_edit_inputs")
    return [write_image(root / "wide.png", 96, 64, 1), write_image(root / "tall.png", 64, 96, 2)]


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[DiffGenerator]:
    """Both guidance branches in separate forwards, as diffusers runs them."""
    gen = DiffGenerator.from_pretrained(folder, device="cpu", cfg_batching="off")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def diffusers_glm(folder: Path):
    from diffusers import GlmImagePipeline as DiffusersGlmImagePipeline

    pipe = DiffusersGlmImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    patch_reference_image_tokens(pipe)
    return pipe


def pictures(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


def reference(pipe, prompt: str, seed: int, paths: list[Path], **kwargs: object) -> np.ndarray:
    settings = {**SMALL, "guidance_scale": 1.5, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, image=pictures(paths), generator=generator, output_type="np", **settings).images


def ours(gen: DiffGenerator, prompt: str, seed: int, paths: list[Path], **kwargs: object) -> list[np.ndarray]:
    image = [str(path) for path in paths]
    return gen.generate(prompt, image=image, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


def test_prior_tokens_match_diffusers(folder, diffusers_glm, images) -> None:
    """The input images' tokens, and the target tokens sampled from each seed (two prompts of one length in one
    `generate`): diffusers' for that prompt and seed alone."""
    pipeline = GlmImagePipeline.load(folder, RuntimeOptions.for_device("cpu"), None)
    cpu = torch.device("cpu")
    encoded = encode_prior_images(pipeline.c.prior, pipeline.c.processor, pictures(images), cpu)
    assert encoded.grids.tolist() == [[1, 2, 3], [1, 3, 2]]  # 32-pixel tokens
    requests = [(PROMPT, 11), (SAME_LENGTH_PROMPT, 12)]
    got = pipeline.adapter.prior_tokens(
        [_request(prompt=p, seed=s, image_paths=[str(i) for i in images]) for p, s in requests], cpu, encoded
    )
    for (prompt, seed), row in zip(requests, got, strict=True):
        expected, image_ids, grids = diffusers_glm.generate_prior_tokens(
            prompt, 64, 96, image=[pictures(images)], device=cpu, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(row, expected[0]), prompt
        assert torch.equal(torch.cat(encoded.tokens), image_ids[0])
        assert grids[0].tolist() == [[1, 4, 6], [1, 6, 4]]
    assert not torch.equal(got[0], got[1])


@pytest.mark.parametrize("count", [1, 2], ids=["one_image", "two_images"])
@pytest.mark.parametrize("guidance_scale", [1.5, 1.0], ids=["cfg", "no_cfg"])
def test_edit_matches_diffusers(engine, diffusers_glm, images, count: int, guidance_scale: float) -> None:
    """The prior sampled from the seed after the images, their keys and values in the conditional branch only,
    the prior and the images dropped in the unconditional one: the same bits."""
    chosen = images[:count]
    mine = ours(engine, PROMPT, 7, chosen, guidance_scale=guidance_scale)
    expected = reference(diffusers_glm, PROMPT, 7, chosen, guidance_scale=guidance_scale)
    assert mine[0].shape == (64, 96, 3)
    np.testing.assert_array_equal(mine[0], expected[0])


def test_injected_prior_tokens_with_images_match_diffusers(engine, diffusers_glm, images) -> None:
    """Injected target tokens: the images still act through their own tokens and keys and values."""
    prior = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    _, image_ids, grids = diffusers_glm.generate_prior_tokens(
        PROMPT, 64, 96, image=[pictures(images)], device=torch.device("cpu"), generator=torch.Generator()
    )
    mine = ours(engine, PROMPT, 5, images, prior_token_ids=prior[0].tolist())
    expected = reference(
        diffusers_glm, PROMPT, 5, images, prior_token_ids=prior, prior_token_image_ids=image_ids,
        source_image_grid_thw=grids,
    )  # fmt: skip
    np.testing.assert_array_equal(mine[0], expected[0])
    # Each image acts, and the images act beyond the prior tokens they lead the prior to.
    one = ours(engine, PROMPT, 5, images[:1], prior_token_ids=prior[0].tolist())
    assert np.abs(one[0] - mine[0]).max() > EFFECT
    plain = engine.generate(PROMPT, seed=5, output_type="np", prior_token_ids=prior[0].tolist(), **SMALL).images
    assert np.abs(plain[0] - one[0]).max() > EFFECT


def test_stacked_guidance_runs_the_branches_apart(folder, engine, images) -> None:
    """`--cfg-batching on` would stack the two branches; the images' keys and values are the conditional
    branch's alone, so they still run as two forwards: the same bits as with it off."""
    stacked = DiffGenerator.from_pretrained(folder, device="cpu", cfg_batching="on")
    try:
        on = ours(stacked, PROMPT, 9, images)
    finally:
        stacked.shutdown()
    np.testing.assert_array_equal(on[0], ours(engine, PROMPT, 9, images)[0])


def test_edits_batch_and_match_running_alone(folder, engine, images) -> None:
    """Same images (the batch key), other prompts, seeds, guidance, an injected prior and two outputs of one
    request in one batch; a request with other images runs in a batch of its own."""
    paths = [str(path) for path in images]
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": SAME_LENGTH_PROMPT, "seed": 2, "guidance_scale": 3.0, "num_outputs_per_prompt": 2},
        {"prompt": "a bird", "seed": 3, "prior_token_ids": list(range(24))},
    ]
    batching = DiffGenerator.from_pretrained(folder, device="cpu", max_batch_size=8, batch_delay_ms=1500)
    try:
        handles = [batching.submit(**SMALL, image_paths=paths, output_format="npy", **f) for f in fields]
        other = batching.submit(**SMALL, image_paths=paths[:1], output_format="npy", prompt=PROMPT, seed=1)
        results = [collect(handle) for handle in handles]
        alone_other = collect(other)
    finally:
        batching.shutdown()
    assert alone_other.batch_size == 1
    for request_fields, result in zip(fields, results, strict=True):
        prompt, seed = request_fields["prompt"], request_fields["seed"]
        rest = {k: v for k, v in request_fields.items() if k not in ("prompt", "seed")}
        alone = ours(engine, prompt, seed, images, **rest)
        assert result.batch_size == 3
        assert len(result.images) == len(alone)
        for batched, solo in zip(result.images, alone, strict=True):
            assert np.abs(batched - solo).max() <= BATCHED_ATOL
    # Two draws from one seed: the outputs of one request differ.
    assert np.abs(results[1].images[0] - results[1].images[1]).max() > EFFECT


def test_without_a_size_the_output_takes_the_first_images(engine, diffusers_glm, tmp_path: Path, images) -> None:
    """The reference's `height or image_height` (given the size it would fail without): the first image's
    size floored to the 32-pixel grid, 100x72 -> 96x64; the second image does not count."""
    assert engine.info["defaults"]["size_from_inputs"] == {"rule": "first_input_within_area", "max_area": 2048 * 2048}
    first = write_image(tmp_path / "first.png", 100, 72, 4)
    mine = engine.generate(PROMPT, image=[str(first), str(images[1])], seed=2, output_type="np",
                           num_inference_steps=3).images  # fmt: skip
    assert mine[0].shape == (64, 96, 3)
    np.testing.assert_array_equal(mine[0], reference(diffusers_glm, PROMPT, 2, [first, images[1]])[0])


def test_images_off_the_prior_grid_are_read_at_its_size(engine, diffusers_glm, tmp_path: Path) -> None:
    """80x80: the VAE grid of its 16-pixel floor (5x5) is not the prior's (2x2, upsampled 4x4), and the
    reference fails. Here the VAE reads the image at the prior grid's size (64x64)."""
    odd = write_image(tmp_path / "odd.png", 80, 80, 5)
    with pytest.raises(RuntimeError):
        reference(diffusers_glm, PROMPT, 1, [odd])
    mine = ours(engine, PROMPT, 1, [odd])
    plain = engine.generate(PROMPT, seed=1, output_type="np", **SMALL).images
    assert mine[0].shape == (64, 96, 3) and np.abs(mine[0] - plain[0]).max() > EFFECT


def test_spec_and_bad_images(engine, images, tmp_path: Path) -> None:
    info = engine.info
    assert (info["image_input"], info["max_input_images"]) == ("optional", MAX_INPUT_IMAGES)
    assert info["extra_batch_key_fields"] == ["image_paths"]
    strip = write_image(tmp_path / "strip.png", 330, 64, 6)
    tiny = write_image(tmp_path / "tiny.png", 12, 40, 7)
    for path, says in ((strip, "4:1"), (tiny, "at least 16")):
        with pytest.raises(InvalidRequestError, match=says) as refused:
            ours(engine, PROMPT, 1, [path])
        assert refused.value.field == "image"
    with pytest.raises(InvalidRequestError) as too_many:
        ours(engine, PROMPT, 1, [images[0]] * (MAX_INPUT_IMAGES + 1))
    assert too_many.value.field == "image_paths"


def test_cli_takes_input_images(folder, diffusers_glm, images, tmp_path: Path) -> None:
    from sgl_diffusion.runtime.encode import to_uint8

    command = [
        shutil.which("sgl-diffusion") or "sgl-diffusion", "generate",
        "--model-path", str(folder), "--prompt", PROMPT,
        "--image-path", str(images[0]), "--image-path", str(images[1]),
        "--width", "96", "--height", "64", "--num-inference-steps", "3",
        "--seed", "5", "--device", "cpu", "--output-path", str(tmp_path), "--output-file-name", "edit.png",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "edit.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(pixels, to_uint8(reference(diffusers_glm, PROMPT, 5, images)[0]))


def _request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": None, "width": 96, "height": 64, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 1.5, "true_cfg_scale": 1.0, "seed": 3,
        "max_sequence_length": 2048, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": True, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})
