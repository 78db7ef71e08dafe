"""Our GLM-Image pipeline against diffusers' GlmImagePipeline on the tiny fixture, fp32 on CPU.

The prior samples 261 tokens per request (a 16x16 preview grid, then the target grid), a few seconds each on
this fixture: most cases inject the prior tokens (`prior_token_ids`, as diffusers takes them) and the prior
itself is compared where it matters: the same seed gives diffusers' tokens, alone and batched.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines.base import BatchState
from sgl_diffusion.pipelines.glm_image import GlmImagePipeline, glyph_texts
from sgl_diffusion.pipelines.stages import CheckBatch
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.perf import PerfRecorder
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.testing import build_fixture

GLM_IMAGE_ID = "zai-org/GLM-Image"
#: 64x64: a 2x2 prior grid, 4x4 DiT tokens; 3 steps.
SMALL = {"height": 64, "width": 64, "num_inference_steps": 3}
PROMPT = "a photo of a cat"
#: The same token length as PROMPT (their priors share one `generate`).
SAME_LENGTH_PROMPT = "a photo of a dog"
#: Quoted text: the glyph encoder reads "hello world" and 'sunset' (two sequences, so one pad token first).
GLYPH_PROMPT = "a sign that says \"hello world\" at 'sunset'"
#: Where we batch what diffusers does not (several outputs of a prompt decoded one at a time; requests batched
#: together), BLAS blocks the products differently and the last bits may differ; far under the fp32 parity
#: contract (5e-3 on pixels).
BATCHED_ATOL = 1e-5
#: What a different prompt or prior does to the image on this fixture: far above the bound above.
EFFECT = 1e-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glm_image")
    model = build_fixture("glm_image", root / "model")
    repo = root / "hub" / ("models--" + GLM_IMAGE_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    return {"model": model, "hub": root / "hub"}


@pytest.fixture(scope="module")
def engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    """Both guidance branches in separate forwards, as diffusers runs them: the same bits. (Batched into one
    forward, which `auto` does when the two glyph rows have one length, BLAS blocks the products differently:
    measured 1.8e-6 on the pixels; the batched test below runs that way.)"""
    gen = DiffGenerator.from_pretrained(folders["model"], device="cpu", cfg_batching="off")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def diffusers_glm(folders: dict[str, Path]):
    from diffusers import GlmImagePipeline as DiffusersGlmImagePipeline

    pipe = DiffusersGlmImagePipeline.from_pretrained(folders["model"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipeline(folders: dict[str, Path]) -> GlmImagePipeline:
    return GlmImagePipeline.load(folders["model"], RuntimeOptions.for_device("cpu"), None)


def reference(pipe, prompt: str, seed: int, prior: torch.Tensor | None = None, **kwargs: object) -> np.ndarray:
    settings = {**SMALL, "guidance_scale": 1.5, **kwargs}
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="np", prior_token_ids=prior, **settings).images


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).images


def prior_ids(seed: int, height: int, width: int) -> torch.Tensor:
    """Random prior tokens (1, DiT tokens) for injection."""
    return torch.randint(0, 128, (1, (height // 16) * (width // 16)), generator=torch.Generator().manual_seed(seed))


def request(**fields: object) -> Request:
    base = {
        "id": 1, "prompt": PROMPT, "negative_prompt": None, "width": 96, "height": 64, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 1.5, "true_cfg_scale": 1.0, "seed": 3,
        "max_sequence_length": 2048, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": True, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


def test_prior_tokens_match_diffusers_alone_and_batched(pipeline, diffusers_glm) -> None:
    """Two prompts of one token length sample in one `generate`, a third alone: each gets the tokens diffusers
    samples for its prompt and seed alone (a 64x96 image: a 2x3 prior grid, upsampled to 4x6)."""
    cases = [(PROMPT, 11), (SAME_LENGTH_PROMPT, 12), (GLYPH_PROMPT, 13)]
    requests = [request(id=i, prompt=p, seed=s) for i, (p, s) in enumerate(cases)]
    got = pipeline.adapter.prior_tokens(requests, torch.device("cpu"))
    for (prompt, seed), row in zip(cases, got, strict=True):
        expected, _, _ = diffusers_glm.generate_prior_tokens(
            prompt, 64, 96, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(row, expected[0]), prompt
    assert not torch.equal(got[0], got[1])  # other prompt and seed, other tokens


def test_whole_pipeline_matches_diffusers(engine, diffusers_glm) -> None:
    """Prior sampled from the seed, glyphs, CFG with the prior dropped, denoising and decoding: the same bits."""
    mine = ours(engine, PROMPT, 7)
    expected = reference(diffusers_glm, PROMPT, 7)
    assert mine[0].shape == (64, 64, 3)
    np.testing.assert_array_equal(mine[0], expected[0])


@pytest.mark.parametrize(("height", "width"), [(64, 96), (96, 32)])
@pytest.mark.parametrize("guidance_scale", [1.5, 1.0], ids=["cfg", "no_cfg"])
def test_injected_prior_tokens_match_diffusers(
    engine, diffusers_glm, height: int, width: int, guidance_scale: float
) -> None:
    prior = prior_ids(height + width, height, width)
    size = {"height": height, "width": width, "guidance_scale": guidance_scale}
    mine = ours(engine, GLYPH_PROMPT, 5, prior_token_ids=prior[0].tolist(), **size)
    expected = reference(diffusers_glm, GLYPH_PROMPT, 5, prior, **size)
    assert mine[0].shape == (height, width, 3)
    np.testing.assert_array_equal(mine[0], expected[0])
    # The glyphs and the prior both act.
    plain = ours(engine, PROMPT, 5, prior_token_ids=prior[0].tolist(), **size)
    assert np.abs(plain[0] - mine[0]).max() > EFFECT
    other_prior = ours(engine, GLYPH_PROMPT, 5, prior_token_ids=prior_ids(1, height, width)[0].tolist(), **size)
    assert np.abs(other_prior[0] - mine[0]).max() > EFFECT


def test_several_outputs_per_prompt_match_diffusers(engine, diffusers_glm) -> None:
    prior = prior_ids(3, 64, 64)
    mine = ours(engine, GLYPH_PROMPT, 3, num_outputs_per_prompt=2, prior_token_ids=prior[0].tolist())
    expected = reference(diffusers_glm, GLYPH_PROMPT, 3, prior, num_images_per_prompt=2)
    assert len(mine) == 2
    for image, theirs in zip(mine, expected, strict=True):
        assert np.abs(image - theirs).max() <= BATCHED_ATOL
    # Two draws from one generator (one prior): the outputs differ.
    assert np.abs(mine[0] - mine[1]).max() > EFFECT


def test_batched_requests_match_running_alone(folders, engine) -> None:
    """Different prompts (three glyph lengths), seeds, guidance scales and priors (one sampled) in one batch."""
    fields = [
        {"prompt": GLYPH_PROMPT, "seed": 1, "prior_token_ids": prior_ids(1, 64, 64)[0].tolist()},
        {"prompt": PROMPT, "seed": 2, "guidance_scale": 3.0, "prior_token_ids": prior_ids(2, 64, 64)[0].tolist()},
        {"prompt": "a 'red' fox", "seed": 3},
    ]
    batching = DiffGenerator.from_pretrained(folders["model"], device="cpu", max_batch_size=8, batch_delay_ms=1500)
    try:
        handles = [batching.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
        results = [collect(handle) for handle in handles]
    finally:
        batching.shutdown()
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(engine, **request_fields)
        assert result.batch_size == 3
        assert np.abs(result.images[0] - alone[0]).max() <= BATCHED_ATOL


def test_glyph_texts_follow_the_reference(diffusers_glm) -> None:
    for prompt in (PROMPT, GLYPH_PROMPT, "“curly” and 「corner」 and 'a' \"b\""):
        assert glyph_texts(prompt) == (diffusers_glm.get_glyph_texts(prompt)[0] or [""])


def test_text_embeddings_match_diffusers(pipeline, diffusers_glm) -> None:
    texts = [PROMPT, GLYPH_PROMPT, "'one' quote", ""]
    encoded = pipeline.adapter.encode_prompts(texts, 2048, torch.device("cpu"))
    for row, text in enumerate(texts):
        with torch.no_grad():
            expected = diffusers_glm._get_glyph_embeds(text, 2048, torch.device("cpu"), torch.float32)
        length = int(encoded["text_lengths"][row])
        assert expected.shape[1] == length
        torch.testing.assert_close(encoded["encoder_hidden_states"][row, :length], expected[0], rtol=0, atol=0)


def test_defaults_limits_and_the_known_id(engine, folders) -> None:
    info = engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "glm_image", "text-to-image", "classifier_free", "GlmImagePipeline"
    )  # fmt: skip
    defaults = info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (1024, 1024, 50)
    assert (defaults["guidance_scale"], defaults["max_sequence_length"]) == (1.5, 2048)
    assert (info["limits"]["size_multiple"], info["limits"]["token_size"]) == (32, 16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        card = DiffGenerator.from_pretrained(GLM_IMAGE_ID, device="cpu")
    try:
        assert card.info["defaults"]["guidance_scale"] == 1.5
        assert (card.info["defaults"]["width"], card.info["defaults"]["num_inference_steps"]) == (1024, 50)
    finally:
        card.shutdown()


def test_bad_requests_name_their_field(engine, pipeline) -> None:
    with pytest.raises(InvalidRequestError) as negative:
        ours(engine, PROMPT, 1, negative_prompt="blurry", prior_token_ids=prior_ids(1, 64, 64)[0].tolist())
    assert negative.value.field == "negative_prompt"
    with pytest.raises(InvalidRequestError) as short:
        ours(engine, PROMPT, 1, prior_token_ids=[1, 2, 3])
    assert short.value.field == "prior_token_ids"
    with pytest.raises(InvalidRequestError) as outside:
        ours(engine, PROMPT, 1, prior_token_ids=[128] * 16)
    assert outside.value.field == "prior_token_ids"
    with pytest.raises(InvalidRequestError) as size:
        engine.generate(PROMPT, height=48, width=64)
    assert size.value.field == "height"
    # A pipeline without a prior refuses injected tokens (the engine's batch check).
    check = CheckBatch(pipeline.adapter, dataclasses.replace(pipeline.spec, takes_prior_token_ids=False))
    state = BatchState([request(prior_token_ids=(1,) * 24)], torch.device("cpu"), PerfRecorder(torch.device("cpu")))
    with pytest.raises(InvalidRequestError) as refused:
        check.run(state)
    assert refused.value.field == "prior_token_ids"
