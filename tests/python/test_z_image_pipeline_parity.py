"""Our Z-Image pipeline against diffusers' ZImagePipeline on the tiny fixture, fp32 on CPU, through DiffGenerator.

Two engines: the fixture folder as it is (no known id: ZImagePipeline.__call__'s defaults, CFG 5 against "") and
the same folder in a fake Hugging Face cache under `Tongyi-MAI/Z-Image-Turbo` (the model card's defaults:
1024x1024, 9 steps, no CFG).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines.z_image import ZImagePipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture

Z_IMAGE_ID = "Tongyi-MAI/Z-Image-Turbo"
#: 64x64 (16 image tokens, padded to 32), 4 steps, up to 64 prompt tokens: a few hundredths of a second per run.
SMALL = {"height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64}
PROMPT = "a photo of a cat"
#: Templated, over 32 tokens: it pads to 64 caption tokens where PROMPT and the empty negative prompt pad to 32.
LONG_PROMPT = (
    "a watercolor painting of a lighthouse at sunset, a small boat sailing across a calm blue lake under a starry "
    "sky, two cats playing with a ball of yarn"
)
#: Pixels are in [0, 1]. Our native transformer, prompt encoding and stages run diffusers' operations in
#: diffusers' order, and rows whose captions the DiT pads alike run as one forward, as in diffusers, so a
#: request computed with diffusers' shapes gives its bits (measured 0.0 at every size, CFG on and off, with
#: truncation and normalisation): equality is asserted there. Where the shapes differ (several outputs per
#: prompt: decoded one image at a time; requests batched together; a prompt and a negative prompt padded to
#: different lengths, which diffusers masks and we run apart), BLAS blocks the products differently and the
#: last bits differ; the bound sits far above that and 500x under the fp32 parity contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What a different prompt, negative prompt or guidance setting does to the image on this fixture (measured
#: 0.004 and more): so a pipeline that dropped or swapped any of them could not pass as matching.
EFFECT = 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("z_image")
    model = build_fixture("z_image_turbo", root / "model")
    repo = root / "hub" / ("models--" + Z_IMAGE_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    return {"model": model, "hub": root / "hub"}


def load_card_engine(folders: dict[str, Path], **engine: object) -> DiffGenerator:
    with pytest.MonkeyPatch.context() as patch:
        # The id is resolved (in the local cache only) when the engine loads.
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        return DiffGenerator.from_pretrained(Z_IMAGE_ID, device="cpu", **engine)


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
def diffusers_z(folders: dict[str, Path]):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    pipe = DiffusersZImagePipeline.from_pretrained(folders["model"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt: str, seed: int, output_type: str = "np", **kwargs: object):
    settings = {**SMALL, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, output_type=output_type, **settings).images


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (96, 32)])
@pytest.mark.parametrize("guidance_scale", [0.0, 3.0], ids=["no_cfg", "cfg"])
def test_whole_pipeline_matches_diffusers(card_engine, diffusers_z, height: int, width: int, guidance_scale: float):
    size = {"height": height, "width": width}
    mine = ours(card_engine, PROMPT, 7, guidance_scale=guidance_scale, **size)
    expected = reference(diffusers_z, PROMPT, 7, guidance_scale=guidance_scale, **size)
    assert mine[0].shape == (height, width, 3)
    np.testing.assert_array_equal(mine[0], expected[0])
    other = ours(card_engine, "a dragon flying over a medieval castle", 7, guidance_scale=guidance_scale, **size)
    assert np.abs(other[0] - mine[0]).max() > EFFECT


def test_guidance_counts_from_the_conditional_prediction(card_engine, diffusers_z) -> None:
    # diffusers' rule: CFG for any scale above 0, cond + 0.5 * (cond - uncond) here (a scale <= 1 guides too).
    mine = ours(card_engine, PROMPT, 4, guidance_scale=0.5)
    np.testing.assert_array_equal(mine[0], reference(diffusers_z, PROMPT, 4, guidance_scale=0.5)[0])
    assert np.abs(mine[0] - ours(card_engine, PROMPT, 4, guidance_scale=0.0)[0]).max() > EFFECT


@pytest.mark.parametrize(
    "shaping",
    [
        {"negative_prompt": "blurry, low quality, watermark"},
        # Normalised times of the 4 steps: 0, 0.1, 0.25, 0.5: guidance ends after the second step.
        {"cfg_truncation": 0.2},
        # Only the first step (normalised time 0) is guided: the others run the conditional branch alone.
        {"cfg_truncation": 0.0},
        {"cfg_normalization": 1.0},
    ],
    ids=["negative_prompt", "truncation", "first_step_only", "normalization"],
)
def test_guidance_settings_match_diffusers(card_engine, diffusers_z, shaping: dict) -> None:
    mine = ours(card_engine, PROMPT, 5, guidance_scale=4.0, **shaping)
    np.testing.assert_array_equal(mine[0], reference(diffusers_z, PROMPT, 5, guidance_scale=4.0, **shaping)[0])
    plain = ours(card_engine, PROMPT, 5, guidance_scale=4.0)
    assert np.abs(mine[0] - plain[0]).max() > EFFECT


def test_a_prompt_and_negative_prompt_padded_apart_stay_close(card_engine, diffusers_z) -> None:
    # 64 vs 32 caption tokens: diffusers pads the uncond row and masks, we run the two rows apart.
    mine = ours(card_engine, LONG_PROMPT, 2, guidance_scale=3.0)
    expected = reference(diffusers_z, LONG_PROMPT, 2, guidance_scale=3.0)
    assert np.abs(mine[0] - expected[0]).max() <= BATCHED_ATOL


def test_several_outputs_per_prompt_match_diffusers(folder_engine, diffusers_z) -> None:
    # The folder's defaults: CFG 5 against "".
    mine = ours(folder_engine, "a red fox", 3, num_outputs_per_prompt=2)
    expected = reference(diffusers_z, "a red fox", 3, guidance_scale=5.0, num_images_per_prompt=2)
    assert len(mine) == 2
    for image, theirs in zip(mine, expected, strict=True):
        assert np.abs(image - theirs).max() <= BATCHED_ATOL
    # Two draws from one generator: the outputs differ.
    assert np.abs(mine[0] - mine[1]).max() > EFFECT


def request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": None, "width": 48, "height": 80, "num_frames": 1,
        "num_inference_steps": 4, "guidance_scale": 3.0, "true_cfg_scale": 1.0, "seed": 3,
        "max_sequence_length": 64, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None,
        "cfg_normalization": 0.0, "cfg_truncation": 1.0, "fps": None, "image_path": None, "cfg_enabled": True,
        "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


@pytest.mark.parametrize("cfg_batching", ["on", "off"])
def test_latents_after_the_loop_match_diffusers(folders, diffusers_z, cfg_batching: str) -> None:
    options = RuntimeOptions.for_device("cpu", cfg_batching=cfg_batching)
    pipeline = ZImagePipeline.load(folders["model"], options, None)
    state = pipeline.run([request()], lambda step, total: [])
    expected = reference(diffusers_z, PROMPT, 3, "latent", guidance_scale=3.0, height=80, width=48)
    assert state["latents"].dtype == torch.float32
    if cfg_batching == "on":
        # Both branches in one forward, as diffusers runs them: the same bits.
        torch.testing.assert_close(state["latents"], expected, rtol=0, atol=0)
    else:
        # One forward per branch: batch-1 products, blocked differently from diffusers' batch of two.
        torch.testing.assert_close(state["latents"], expected, rtol=0, atol=1e-5)


def test_a_request_without_the_guidance_fields_is_refused(folders) -> None:
    # The core fills cfg_normalization / cfg_truncation for Z-Image; a request built around it must bring them.
    pipeline = ZImagePipeline.load(folders["model"], RuntimeOptions.for_device("cpu"), None)
    with pytest.raises(InvalidRequestError) as refused:
        pipeline.run([request(cfg_truncation=None)], lambda step, total: [])
    assert refused.value.field == "cfg_truncation"


def test_text_embeddings_match_diffusers(folders, diffusers_z) -> None:
    pipeline = ZImagePipeline.load(folders["model"], RuntimeOptions.for_device("cpu"), None)
    texts = [PROMPT, LONG_PROMPT, "", PROMPT]
    encoded = pipeline.adapter.encode_prompts(texts, 64, torch.device("cpu"))
    embeds, lengths = encoded["encoder_hidden_states"], encoded["text_lengths"]
    assert embeds.shape[0] == len(texts) and lengths.device.type == "cpu"
    for row, text in enumerate(texts):
        with torch.no_grad():
            (reference_embeds,), _ = diffusers_z.encode_prompt(
                text, do_classifier_free_guidance=False, max_sequence_length=64
            )
        length = int(lengths[row])
        assert reference_embeds.shape[0] == length
        torch.testing.assert_close(embeds[row, :length], reference_embeds, rtol=0, atol=0)
        assert not embeds[row, length:].any()  # zero padding past the prompt's own length
    assert len({int(n) for n in lengths}) == 3 and int(lengths[1]) > 32


def test_batched_requests_match_running_alone(batching_engine, card_engine) -> None:
    # Different prompts (caption lengths in two 32-buckets), seeds, scales, negative prompts and guidance
    # settings in one batch: each row keeps its own.
    fields = [
        {"prompt": PROMPT, "seed": 1, "guidance_scale": 3.0},
        {"prompt": LONG_PROMPT, "seed": 2, "guidance_scale": 0.5, "cfg_truncation": 0.2},
        {"prompt": "dance monkey", "seed": 3, "guidance_scale": 6.0, "cfg_normalization": 1.0},
        {"prompt": "a lighthouse at dawn", "seed": 4, "guidance_scale": 2.0, "negative_prompt": "fog"},
    ]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(card_engine, **request_fields)
        assert result.batch_size == 4
        assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_batched_requests_without_guidance_match_running_alone(batching_engine, card_engine) -> None:
    fields = [{"prompt": PROMPT, "seed": 1}, {"prompt": LONG_PROMPT, "seed": 2}, {"prompt": "a red fox", "seed": 3}]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    for request_fields, handle in zip(fields, handles, strict=True):
        result = collect(handle)
        assert result.batch_size == 3
        assert np.abs(result.images[0] - ours(card_engine, **request_fields)[0]).max() <= BATCHED_ATOL


def test_defaults_and_limits(folder_engine, card_engine) -> None:
    # A folder that is no known checkpoint: ZImagePipeline.__call__'s defaults.
    defaults = folder_engine.info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 50)
    assert (defaults["guidance_scale"], defaults["negative_prompt"], defaults["max_sequence_length"]) == (
        5.0,
        None,
        512,
    )
    # The known id: the model card's (registry.KNOWN_MODELS).
    card = card_engine.info["defaults"]
    assert (card["width"], card["height"], card["num_inference_steps"], card["guidance_scale"]) == (1024, 1024, 9, 0.0)
    info = card_engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "z_image", "text-to-image", "classifier_free_above_zero", "ZImagePipeline"
    )  # fmt: skip
    limits = info["limits"]
    # The fixture's RoPE table (axes_lens 256, 32, 32) bounds a side at 32 tokens and a caption at 224 tokens.
    assert (limits["size_multiple"], limits["token_size"], limits["max_side"]) == (16, 16, 512)
    assert (limits["max_sequence_length"], limits["max_steps"]) == (224, 1000)


def test_requests_the_model_cannot_run_are_refused(card_engine) -> None:
    for fields, field in (
        ({"height": 72}, "height"),
        ({"width": 528}, "width"),
        ({"max_sequence_length": 256}, "max_sequence_length"),
        ({"cfg_truncation": -0.5}, "cfg_truncation"),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            card_engine.generate(PROMPT, **{**SMALL, **fields})
        assert refused.value.field == field


def test_fixture_tokenizer_is_the_one_transformers_reads(folders) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder = folders["model"] / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    turn = [{"role": "user", "content": PROMPT}]
    thinking = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n")
    plain = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(thinking).ids == tokenizer(thinking).input_ids
    index = json.loads((folders["model"] / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"] == ["transformers", "Qwen3Model"]
