"""Our Qwen-Image 2.1 pipeline against diffusers' QwenImage21Pipeline on the tiny fixture, fp32 on CPU.

The oracle is the fixture's in-memory diffusers pipeline (builds are deterministic, so it holds the saved
folder's weights): loading the folder with diffusers would need torchvision for transformers'
Qwen3VLProcessor, which our processor does without. The engine serves the folder as it is: diffusers'
`__call__` defaults (1024x1024, 40 steps, no guidance unless a request brings a negative prompt and a
`true_cfg_scale` above 1).
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError, RequestCancelledError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines.qwen_image_21 import QwenImage21Pipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture, build_pipeline

#: 64x64 (16 latent tokens), 3 steps.
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3}
CFG = {"negative_prompt": " ", "true_cfg_scale": 4.0}
PROMPT = "a photo of a cat"
#: A prompt of another token length than PROMPT.
OTHER_PROMPT = "a dragon flying over a medieval castle at dusk"
#: Pixels are in [0, 1]. The native DiT, prompt encoding and stages run diffusers' operations in its order,
#: and rows of different prompt lengths never share a forward, so a request computed with diffusers' shapes
#: gets its bits (measured 0.0): equality is asserted there. Where we batch what diffusers does not (several
#: outputs per prompt decoded one at a time, requests batched together), BLAS may block products
#: differently; the bound sits far under the fp32 parity contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What another prompt, negative prompt or scale does to the image on this fixture: far above the bound.
PROMPT_EFFECT = 1e-3


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("qwen_image_21", tmp_path_factory.mktemp("qwen_image_21") / "model")


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folder, device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def batching_engine(folder: Path) -> Iterator[DiffGenerator]:
    """Batching on: up to 8 images, waiting up to 1.5 s for company."""
    gen = DiffGenerator.from_pretrained(folder, device="cpu", max_batch_size=8, batch_delay_ms=1500)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def oracle():
    pipe = build_pipeline("qwen_image_21")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt: str, seed: int, output_type: str = "np", **kwargs: object):
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(prompt, generator=generator, output_type=output_type, **{**SMALL, **kwargs}).images
    # The VAE decodes RGBA; the engine returns the RGB channels.
    return images if output_type == "latent" else images[..., :3]


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


@pytest.mark.parametrize(("height", "width"), [(64, 64), (64, 96), (128, 32)])
@pytest.mark.parametrize("cfg", [True, False], ids=["true_cfg", "no_cfg"])
def test_whole_pipeline_matches_diffusers(engine, oracle, height: int, width: int, cfg: bool) -> None:
    size = {"height": height, "width": width, **(CFG if cfg else {})}
    mine = ours(engine, PROMPT, 7, **size)
    expected = reference(oracle, PROMPT, 7, **size)
    assert mine[0].shape == (height, width, 3)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = ours(engine, OTHER_PROMPT, 7, **size)
    assert np.abs(other[0] - mine[0]).max() > PROMPT_EFFECT


def test_sizes_off_the_grid_are_refused(engine) -> None:
    # The reference floors sizes to multiples of 32; the engine asks for them.
    with pytest.raises(InvalidRequestError) as size:
        engine.generate(PROMPT, height=80, width=64, num_inference_steps=3)
    assert size.value.field == "height"


def test_a_negative_prompt_and_scale_of_the_request_match_diffusers(engine, oracle) -> None:
    negative = "blurry, low quality, watermark, extra fingers"
    mine = ours(engine, PROMPT, 5, negative_prompt=negative, true_cfg_scale=2.5)
    expected = reference(oracle, PROMPT, 5, negative_prompt=negative, true_cfg_scale=2.5)
    np.testing.assert_array_equal(mine[0], expected[0])
    with_blank = ours(engine, PROMPT, 5, negative_prompt=" ", true_cfg_scale=2.5)
    assert np.abs(with_blank[0] - mine[0]).max() > PROMPT_EFFECT
    stronger = ours(engine, PROMPT, 5, negative_prompt=negative, true_cfg_scale=5.0)
    assert np.abs(stronger[0] - mine[0]).max() > PROMPT_EFFECT


def test_several_outputs_per_prompt_match_diffusers(engine, oracle) -> None:
    mine = ours(engine, "a red fox", 3, num_outputs_per_prompt=2, **CFG)
    expected = reference(oracle, "a red fox", 3, num_images_per_prompt=2, **CFG)
    assert len(mine) == 2
    for image, theirs in zip(mine, expected, strict=True):
        assert np.abs(image - theirs).max() <= BATCHED_ATOL
    assert np.abs(mine[0] - mine[1]).max() > PROMPT_EFFECT


def request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": " ", "width": 96, "height": 64, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "seed": 3,
        "max_sequence_length": 1024, "num_outputs": 1, "cfg_enabled": True, "output_format": "npy", "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


@pytest.mark.parametrize("cfg_batching", ["on", "off"])
def test_latents_after_the_loop_match_diffusers_with_and_without_its_kv_cache(
    folder, oracle, cfg_batching: str
) -> None:
    # Our prefix cache is the reference's default KV cache; on CPU fp32 both give the uncached bits too.
    options = RuntimeOptions.for_device("cpu", cfg_batching=cfg_batching)
    pipeline = QwenImage21Pipeline.load(folder, options, None)
    state = pipeline.run([request()], lambda step, total: [])
    for use_kv_cache in (True, False):
        expected = reference(oracle, PROMPT, 3, "latent", width=96, use_kv_cache=use_kv_cache, **CFG)
        torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)


def test_prompt_embeddings_match_diffusers(folder, oracle) -> None:
    pipeline = QwenImage21Pipeline.load(folder, RuntimeOptions.for_device("cpu"), None)
    assert pipeline.adapter.encoder.drop == oracle._drop_idx
    texts = [PROMPT, OTHER_PROMPT, " ", "", PROMPT]
    owners = [request(prompt=text) for text in texts]  # text only: no condition images
    encoded = pipeline.adapter.encode_prompts(texts, 1024, torch.device("cpu"), owners)
    embeds, lengths = encoded["encoder_hidden_states"], encoded["text_lengths"]
    for row, text in enumerate(texts):
        with torch.no_grad():
            expected, mask, image_slots = oracle.encode_prompt(text)
        length = int(lengths[row])
        assert mask is None and not image_slots.any() and expected.shape[1] == length
        torch.testing.assert_close(embeds[row, :length], expected[0], rtol=0, atol=0)
        assert not embeds[row, length:].any()


def test_the_configured_sample_sigmas_set_the_schedule(folder, oracle, tmp_path: Path) -> None:
    sigmas = [1.0, 0.8, 0.45, 0.2]
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["sample_sigmas"] = sigmas
    (copy / "model_index.json").write_text(json.dumps(index))
    pipeline = QwenImage21Pipeline.load(copy, RuntimeOptions.for_device("cpu"), None)
    assert pipeline.spec.defaults.num_inference_steps == len(sigmas)
    state = pipeline.run([request(num_inference_steps=4)], lambda step, total: [])
    oracle.register_to_config(sample_sigmas=sigmas)
    try:
        expected = reference(oracle, PROMPT, 3, "latent", width=96, num_inference_steps=4, **CFG)
    finally:
        oracle.register_to_config(sample_sigmas=None)
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)


def test_batched_requests_match_running_alone(batching_engine, engine) -> None:
    # Different prompts (four token lengths), seeds, negative prompts and scales in one batch (requests with
    # guidance batch with requests with guidance only: the batch key holds whether CFG runs).
    fields = [
        {"prompt": PROMPT, "seed": 1, **CFG},
        {"prompt": OTHER_PROMPT, "seed": 2, "negative_prompt": " ", "true_cfg_scale": 2.0},
        {"prompt": "dance monkey", "seed": 3, "negative_prompt": " ", "true_cfg_scale": 6.0},
        {"prompt": "a lighthouse at dawn", "seed": 4, "negative_prompt": "fog", "true_cfg_scale": 3.0},
    ]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(engine, **request_fields)
        assert result.batch_size == 4
        assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_a_cancelled_request_inside_a_batch_spares_the_others(batching_engine, engine) -> None:
    # The prefix caches hold the batch's rows: after the cut they start over with the survivor's.
    slow = {"num_inference_steps": 30, **CFG}
    victim = batching_engine.submit(**{**SMALL, **slow, "prompt": OTHER_PROMPT, "seed": 1, "output_format": "npy"})
    survivor = batching_engine.submit(**{**SMALL, **slow, "prompt": "a dog", "seed": 2, "output_format": "npy"})
    cancelled = threading.Event()

    def cancel_at_step_3(step: int, total: int) -> None:
        if step == 3 and not cancelled.is_set():
            victim.cancel()
            cancelled.set()

    with pytest.raises(RequestCancelledError):
        victim.wait(cancel_at_step_3)
    result = collect(survivor)
    assert result.batch_size == 2
    alone = ours(engine, "a dog", 2, **slow)
    assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_defaults_and_limits(engine) -> None:
    info = engine.info
    defaults = info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 40)
    assert (defaults["true_cfg_scale"], defaults["negative_prompt"]) == (1.0, None)
    # With condition images the output takes the last one's aspect at 1024x1024 pixels, as the reference.
    assert defaults["size_from_inputs"] == {"rule": "last_input_aspect_at_area", "area": 1024 * 1024}
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "qwen_image_21", "text-image-to-image", "true_cfg", "QwenImage21Pipeline"
    )  # fmt: skip
    assert (info["image_input"], info["max_input_images"], info["extra_batch_key_fields"]) == (
        "optional", 4, ["image_paths"]
    )  # fmt: skip
    limits = info["limits"]
    assert (limits["size_multiple"], limits["token_size"], limits["max_sequence_length"]) == (32, 16, 1024)


def test_guidance_fields_the_model_cannot_use_are_refused(engine) -> None:
    with pytest.raises(InvalidRequestError) as guidance:
        engine.generate(PROMPT, guidance_scale=5.0, **SMALL)
    assert guidance.value.field == "guidance_scale"
    with pytest.raises(InvalidRequestError) as negative:
        engine.generate(PROMPT, negative_prompt="blurry", **SMALL)
    assert negative.value.field == "negative_prompt"
