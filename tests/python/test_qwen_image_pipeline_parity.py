"""Our Qwen-Image pipeline against diffusers' QwenImagePipeline on the tiny fixture, fp32 on CPU.

Two engines: the fixture folder as it is (no known id: QwenImagePipeline.__call__'s defaults, no negative
prompt, so no CFG unless a request brings one) and the same folder in a fake Hugging Face cache under
`Qwen/Qwen-Image` (the model card's defaults: 1328x1328, true CFG 4 against the negative prompt " ").
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError, RequestCancelledError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines.qwen_image import QwenImagePipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture

QWEN_IMAGE_ID = "Qwen/Qwen-Image"
#: 64x64 (16 packed tokens), 3 steps, up to 64 prompt tokens: a few hundredths of a second per run.
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 64}
PROMPT = "a photo of a cat"
#: A prompt of another token length than PROMPT (and than the negative prompts below).
OTHER_PROMPT = "a dragon flying over a medieval castle at dusk"
#: Pixels are in [0, 1]. Our native transformer, prompt encoding and stages run diffusers' operations in
#: diffusers' order, and rows of different text lengths never share a forward (text_lengths.py), so a
#: request computed with diffusers' shapes gives its bits (measured 0.0 at every size, CFG on and off):
#: equality is asserted there. Where we batch what diffusers does not (several outputs per prompt: decoded
#: one image at a time; requests batched together: their equal-length rows, e.g. the shared negative prompt,
#: run as one forward), BLAS blocks the products differently and the last bits differ (measured 1.5e-7 to
#: 2.1e-7); the bound sits above that, 500x under the fp32 parity contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What a different prompt, negative prompt or true CFG scale does to the image on this fixture (measured
#: 0.0029 to 0.020 max abs; its tiny VAE damps what the latents show): 100x the bound above, so a pipeline
#: that dropped or swapped any of them could not pass as matching.
PROMPT_EFFECT = 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen_image")
    model = build_fixture("qwen_image", root / "model")
    repo = root / "hub" / ("models--" + QWEN_IMAGE_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    return {"model": model, "hub": root / "hub"}


def load_card_engine(folders: dict[str, Path], **engine: object) -> DiffGenerator:
    with pytest.MonkeyPatch.context() as patch:
        # The id is resolved (in the local cache only) when the engine loads.
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        return DiffGenerator.from_pretrained(QWEN_IMAGE_ID, device="cpu", **engine)


@pytest.fixture(scope="module")
def folder_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folders["model"], device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def card_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = load_card_engine(folders)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def batching_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    """The card engine with batching on: up to 8 images, waiting up to 1.5 s for company."""
    gen = load_card_engine(folders, max_batch_size=8, batch_delay_ms=1500)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def diffusers_qwen(folders: dict[str, Path]):
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

    pipe = DiffusersQwenImagePipeline.from_pretrained(folders["model"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt: str, seed: int, output_type: str = "np", **kwargs: object):
    settings = {**SMALL, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, output_type=output_type, **settings).images


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (96, 32)])
@pytest.mark.parametrize("cfg", [True, False], ids=["true_cfg", "no_cfg"])
def test_whole_pipeline_matches_diffusers(card_engine, diffusers_qwen, height: int, width: int, cfg: bool) -> None:
    size = {"height": height, "width": width}
    # The card's defaults: true CFG 4 against " "; true_cfg_scale 1 turns it off (diffusers: no negative prompt).
    mine = ours(card_engine, PROMPT, 7, **size, **({} if cfg else {"true_cfg_scale": 1.0}))
    expected = reference(diffusers_qwen, PROMPT, 7, **size, **({"negative_prompt": " "} if cfg else {}))
    assert mine[0].shape == (height, width, 3)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = ours(card_engine, OTHER_PROMPT, 7, **size, **({} if cfg else {"true_cfg_scale": 1.0}))
    assert np.abs(other[0] - mine[0]).max() > PROMPT_EFFECT


def test_a_negative_prompt_and_scale_of_the_request_match_diffusers(folder_engine, diffusers_qwen) -> None:
    # Prompt, negative prompt and " " all have different token lengths: both branches run unpadded.
    negative = "blurry, low quality, watermark, extra fingers"
    mine = ours(folder_engine, PROMPT, 5, negative_prompt=negative, true_cfg_scale=2.5)
    expected = reference(diffusers_qwen, PROMPT, 5, negative_prompt=negative, true_cfg_scale=2.5)
    np.testing.assert_array_equal(mine[0], expected[0])
    # The negative prompt acts: against " " the image differs.
    with_blank = ours(folder_engine, PROMPT, 5, negative_prompt=" ", true_cfg_scale=2.5)
    assert np.abs(with_blank[0] - mine[0]).max() > PROMPT_EFFECT


def test_several_outputs_per_prompt_match_diffusers(card_engine, diffusers_qwen) -> None:
    mine = ours(card_engine, "a red fox", 3, num_outputs_per_prompt=2)
    expected = reference(diffusers_qwen, "a red fox", 3, negative_prompt=" ", num_images_per_prompt=2)
    assert len(mine) == 2
    for image, theirs in zip(mine, expected, strict=True):
        assert np.abs(image - theirs).max() <= BATCHED_ATOL
    # Two draws from one generator: the outputs differ.
    assert np.abs(mine[0] - mine[1]).max() > PROMPT_EFFECT


def request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": " ", "width": 48, "height": 80, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 1.0, "true_cfg_scale": 4.0, "seed": 3,
        "max_sequence_length": 64, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": True, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


@pytest.mark.parametrize("cfg_batching", ["on", "off"])
def test_latents_after_the_loop_match_diffusers(folders, diffusers_qwen, cfg_batching: str) -> None:
    # Both branches in one call of the guider or two: either way each text length runs on its own.
    options = RuntimeOptions.for_device("cpu", cfg_batching=cfg_batching)
    pipeline = QwenImagePipeline.load(folders["model"], options, None)
    state = pipeline.run([request()], lambda step, total: [])
    expected = reference(diffusers_qwen, PROMPT, 3, "latent", negative_prompt=" ", height=80, width=48)
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)


def test_text_embeddings_match_diffusers(folders, diffusers_qwen) -> None:
    pipeline = QwenImagePipeline.load(folders["model"], RuntimeOptions.for_device("cpu"), None)
    texts = [PROMPT, OTHER_PROMPT, " ", PROMPT]
    encoded = pipeline.adapter.encode_prompts(texts, 64, torch.device("cpu"))
    embeds, lengths = encoded["encoder_hidden_states"], encoded["text_lengths"]
    assert embeds.shape[0] == len(texts) and lengths.device.type == "cpu"
    for row, text in enumerate(texts):
        with torch.no_grad():
            reference_embeds, mask = diffusers_qwen.encode_prompt(text, max_sequence_length=64)
        length = int(lengths[row])
        assert mask is None and reference_embeds.shape[1] == length  # one prompt: diffusers does not pad
        torch.testing.assert_close(embeds[row, :length], reference_embeds[0], rtol=0, atol=0)
        assert not embeds[row, length:].any()  # zero padding past the prompt's own length
    assert len({int(n) for n in lengths}) == 3


def test_batched_requests_match_running_alone(batching_engine, card_engine) -> None:
    # Different prompts (three token lengths), seeds and true CFG scales in one batch.
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "true_cfg_scale": 2.0},
        {"prompt": "dance monkey", "seed": 3, "true_cfg_scale": 6.0},
        {"prompt": "a lighthouse at dawn", "seed": 4, "negative_prompt": "fog"},
    ]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(card_engine, **request_fields)
        assert result.batch_size == 4
        assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_a_cancelled_request_inside_a_batch_spares_the_others(batching_engine, card_engine) -> None:
    slow = {"num_inference_steps": 40}
    # Prompts of different lengths: the survivor's rows must stay aligned with its own text after the cut.
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
    alone = ours(card_engine, "a dog", 2, **slow)
    assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_defaults_and_limits(folder_engine, card_engine) -> None:
    # A folder that is no known checkpoint: QwenImagePipeline.__call__'s defaults (no negative prompt).
    defaults = folder_engine.info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 50)
    assert (defaults["true_cfg_scale"], defaults["negative_prompt"]) == (4.0, None)
    assert defaults["max_sequence_length"] == 512
    # The known id: the model card's.
    card = card_engine.info["defaults"]
    assert (card["width"], card["height"], card["num_inference_steps"]) == (1328, 1328, 50)
    assert (card["true_cfg_scale"], card["negative_prompt"]) == (4.0, " ")
    info = card_engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "qwen_image", "text-to-image", "true_cfg", "QwenImagePipeline"
    )  # fmt: skip
    limits = info["limits"]
    assert (limits["size_multiple"], limits["token_size"], limits["max_sequence_length"]) == (16, 16, 1024)
    assert limits["max_steps"] == 1000


def test_guidance_fields_the_model_cannot_use_are_refused(card_engine, folder_engine) -> None:
    with pytest.raises(InvalidRequestError) as guidance:
        card_engine.generate(PROMPT, guidance_scale=5.0, **SMALL)
    assert guidance.value.field == "guidance_scale"
    with pytest.raises(InvalidRequestError) as negative:
        card_engine.generate(PROMPT, negative_prompt="blurry", true_cfg_scale=1.0, **SMALL)
    assert negative.value.field == "negative_prompt"
    with pytest.raises(InvalidRequestError) as size:
        folder_engine.generate(PROMPT, height=72, width=64)
    assert size.value.field == "height"
