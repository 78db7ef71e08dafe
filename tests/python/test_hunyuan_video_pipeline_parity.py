"""Our HunyuanVideo pipeline against diffusers' HunyuanVideoPipeline on the tiny fixture, fp32 on CPU.

Engines: the fixture folder as it is (no known id: `__call__`'s defaults with the folder's shift), and the same
folder in a fake Hugging Face cache under FastHunyuan's id (its model card's 6 steps and shift 17).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.models.hunyuan_video.text_encoder import PROMPT_TEMPLATE, TEMPLATE_CROP
from sgl_diffusion.pipelines.hunyuan_video import HunyuanVideoPipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

FAST_HUNYUAN_ID = "FastVideo/FastHunyuan-diffusers"
#: 9 frames (3 latent frames) of 32x32, 3 steps, prompts padded to 16 Llama tokens by the reference.
SMALL = dict(FIXTURE_REGISTRY["hunyuan_video_t2v"].call_kwargs)
PROMPT = "a cat dancing in the rain"
#: Another token length than PROMPT's.
OTHER_PROMPT = "a dragon flying over a medieval castle at night"
#: Frames are in [0, 1], fp32 on the CPU. Our DiT computes diffusers' operations in diffusers' order, but each
#: prompt keeps only its real tokens where the reference pads it to `max_sequence_length` and masks the padding:
#: the same math, with softmaxes and means over shorter rows, so the last bits differ (measured 1.7e-6 to 2.6e-6
#: on these cases; the transformer alone is bit-exact given the reference's padding and mask). The bound sits
#: above that, 500x under the fp32 parity contract (5e-3 on pixels).
PIXEL_ATOL = 1e-5
#: What a different prompt, negative prompt or guidance scale does to the frames on this fixture (a different
#: prompt: measured 0.084 to 0.28 max abs): 1000x the bound above, so a pipeline that dropped or swapped one
#: could not pass as matching.
CONDITIONING_EFFECT = 1e-2


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hunyuan_video")
    model = build_fixture("hunyuan_video_t2v", root / "model")
    repo = root / "hub" / ("models--" + FAST_HUNYUAN_ID.replace("/", "--"))
    shutil.copytree(model, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    return {"model": model, "hub": root / "hub"}


@pytest.fixture(scope="module")
def engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folders["model"], device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def batching_engine(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    """The folder engine with batching on: up to 8 videos, waiting up to 1.5 s for company."""
    gen = DiffGenerator.from_pretrained(folders["model"], device="cpu", max_batch_size=8, batch_delay_ms=1500)
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def fast_hunyuan(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    with pytest.MonkeyPatch.context() as patch:
        # The id is resolved (in the local cache only) when the engine loads.
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        gen = DiffGenerator.from_pretrained(FAST_HUNYUAN_ID, device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def reference_pipe(folders: dict[str, Path]):
    from diffusers import HunyuanVideoPipeline as DiffusersPipeline

    pipe = DiffusersPipeline.from_pretrained(folders["model"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt: str, seed: int, output_type: str = "np", **kwargs: object):
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, output_type=output_type, **{**SMALL, **kwargs}).frames


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).frames


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 32), (32, 64)])
@pytest.mark.parametrize("cfg", [False, True], ids=["embedded_guidance", "true_cfg"])
def test_whole_pipeline_matches_diffusers(engine, reference_pipe, height: int, width: int, cfg: bool) -> None:
    size = {"height": height, "width": width}
    negative = {"negative_prompt": "blurry, low quality", "true_cfg_scale": 3.0} if cfg else {}
    mine = ours(engine, PROMPT, 7, **size, **negative)
    expected = reference(reference_pipe, PROMPT, 7, **size, **negative)
    assert len(mine) == 1 and mine[0].shape == expected[0].shape == (9, height, width, 3)
    print(f"{height}x{width} cfg={cfg}: max abs {max_abs(mine[0], expected[0]):.3g}")
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL
    other = ours(engine, OTHER_PROMPT, 7, **size, **negative)
    assert max_abs(other[0], mine[0]) > CONDITIONING_EFFECT


def test_the_negative_prompt_and_guidance_scale_act(engine) -> None:
    base = ours(engine, PROMPT, 3, negative_prompt="blurry", true_cfg_scale=3.0)
    assert max_abs(ours(engine, PROMPT, 3, negative_prompt="a dog", true_cfg_scale=3.0)[0], base[0]) > (
        CONDITIONING_EFFECT
    )
    plain = ours(engine, PROMPT, 3)
    assert max_abs(ours(engine, PROMPT, 3, guidance_scale=2.0)[0], plain[0]) > CONDITIONING_EFFECT


def test_several_outputs_per_prompt_match_diffusers(engine, reference_pipe) -> None:
    mine = ours(engine, PROMPT, 5, num_outputs_per_prompt=2)
    expected = reference(reference_pipe, PROMPT, 5, num_videos_per_prompt=2)
    assert len(mine) == 2
    for video, theirs in zip(mine, expected, strict=True):
        assert max_abs(video, theirs) <= PIXEL_ATOL
    assert max_abs(mine[0], mine[1]) > CONDITIONING_EFFECT  # two draws from one generator


def test_batched_requests_match_running_alone(batching_engine, engine) -> None:
    # Different prompts (four token lengths), seeds, embedded guidance scales and outputs per prompt in one batch.
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "guidance_scale": 3.5},
        {"prompt": "dance monkey", "seed": 3},
        {"prompt": "a lighthouse at dawn", "seed": 4, "num_outputs_per_prompt": 2},
    ]
    handles = [batching_engine.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
    results = [collect(handle) for handle in handles]
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(engine, **request_fields)
        assert result.batch_size == 4
        for video, solo in zip(result.frames, alone, strict=True):
            # Rows of one text length share a forward, rows of others do not: measured 0.0 on CPU.
            assert max_abs(video, solo) <= 1e-6


def test_prompt_embeddings_match_diffusers(folders, reference_pipe) -> None:
    pipeline = HunyuanVideoPipeline.load(folders["model"], RuntimeOptions.for_device("cpu"), None)
    texts = [PROMPT, OTHER_PROMPT, "", PROMPT]
    encoded = pipeline.adapter.encode_prompts(texts, 16, torch.device("cpu"))
    embeds, lengths, pooled = encoded["encoder_hidden_states"], encoded["text_lengths"], encoded["pooled_projections"]
    assert lengths.device.type == "cpu" and len({int(n) for n in lengths}) == 3
    for row, text in enumerate(texts):
        with torch.no_grad():
            reference_embeds, reference_pooled, mask = reference_pipe.encode_prompt(text, max_sequence_length=16)
        length = int(lengths[row])
        # The rows the reference's mask keeps are ours, bit for bit; the rest is zero padding of ours.
        assert int(mask.sum()) == length and bool(mask[0, :length].all())
        torch.testing.assert_close(embeds[row, :length], reference_embeds[0, :length], rtol=0, atol=0)
        assert not embeds[row, length:].any()
        torch.testing.assert_close(pooled[row], reference_pooled[0], rtol=0, atol=0)


def test_the_template_crop_lands_on_the_prompt(folders) -> None:
    """The fixture's tokenizer makes each template word one token, so the reference's hard-coded crop (95) cuts
    exactly the template's prefix, as with Llama-3's vocabulary; the tokenizer reloads tokenizer.json as it is."""
    from tokenizers import Tokenizer

    from sgl_diffusion.models.hunyuan_video.text_encoder import load_llama_tokenizer

    tokenizer = load_llama_tokenizer(folders["model"] / "tokenizer")
    raw = Tokenizer.from_file(str(folders["model"] / "tokenizer" / "tokenizer.json"))
    text = PROMPT_TEMPLATE.format(PROMPT)
    ids = tokenizer(text).input_ids
    assert ids == raw.encode(text).ids
    assert tokenizer.decode(ids[TEMPLATE_CROP:]) == PROMPT + "<|eot_id|>"
    assert tokenizer.decode(ids[:1]) == "<|begin_of_text|>" and tokenizer.padding_side == "right"


def test_fast_hunyuan_defaults_match_its_card_and_diffusers(fast_hunyuan, reference_pipe) -> None:
    defaults = fast_hunyuan.info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_frames"], defaults["fps"]) == (1280, 720, 125, 24)
    assert (defaults["num_inference_steps"], defaults["flow_shift"], defaults["guidance_scale"]) == (6, 17.0, 6.0)
    assert defaults["negative_prompt"] is None and defaults["true_cfg_scale"] == 1.0
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Steps and shift from the defaults; the size of the tiny fixture.
    small = {key: SMALL[key] for key in ("height", "width", "num_frames", "max_sequence_length")}
    mine = fast_hunyuan.generate(PROMPT, seed=2, output_type="np", **small).frames
    scheduler = reference_pipe.scheduler
    try:
        reference_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=17.0)
        expected = reference(reference_pipe, PROMPT, 2, num_inference_steps=6)
    finally:
        reference_pipe.scheduler = scheduler
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL
    # The shift really is 17: the folder's own (7) gives other frames.
    assert max_abs(mine[0], reference(reference_pipe, PROMPT, 2, num_inference_steps=6)[0]) > CONDITIONING_EFFECT


def test_a_requests_flow_shift_matches_a_reference_scheduler_with_it(engine, reference_pipe) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    mine = ours(engine, PROMPT, 4, flow_shift=2.5)
    scheduler = reference_pipe.scheduler
    try:
        reference_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=2.5)
        expected = reference(reference_pipe, PROMPT, 4)
    finally:
        reference_pipe.scheduler = scheduler
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL


def test_defaults_and_limits(engine) -> None:
    info = engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "hunyuan_video", "text-to-video", "embedded_with_true_cfg", "HunyuanVideoPipeline"
    )  # fmt: skip
    # A folder that is no known checkpoint: HunyuanVideoPipeline.__call__'s defaults, the folder's shift.
    defaults = info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_frames"]) == (1280, 720, 129)
    assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["flow_shift"]) == (50, 6.0, 7.0)
    assert defaults["max_sequence_length"] == 256
    limits = info["limits"]
    assert (limits["size_multiple"], limits["token_size"], limits["frame_rule"]) == (16, 16, "four_k_plus_one")
    assert (limits["max_frames"], limits["frames_per_latent"], limits["max_sequence_length"]) == (129, 4, 256)


def test_frames_are_rounded_to_4k_plus_1(engine) -> None:
    result = engine.generate(PROMPT, seed=1, **{**SMALL, "num_frames": 7, "num_inference_steps": 1})
    assert result.frames[0].shape == (5, 32, 32, 3) and result.fps == 24
    assert any("rounded down to 5" in note for note in result.notes)


def test_what_the_model_cannot_honour_is_refused(engine) -> None:
    # HunyuanVideo is guidance-distilled: a negative prompt acts only through true CFG (true_cfg_scale > 1).
    with pytest.raises(InvalidRequestError) as negative:
        engine.generate(PROMPT, negative_prompt="blurry", **SMALL)
    assert negative.value.field == "negative_prompt"
    with pytest.raises(InvalidRequestError) as size:
        engine.generate(PROMPT, **{**SMALL, "height": 40})
    assert size.value.field == "height"


def test_the_videos_api_serves_the_pipelines_video(folders, engine, reference_pipe, tmp_path: Path) -> None:
    """A real `sgl-diffusion serve` process: the model card names the family, and a `/v1/videos` job's MP4 holds
    the video the engine generates in process (which matches diffusers', above)."""
    import httpx2 as httpx

    from server_util import running_server, wait_for
    from sgl_diffusion.runtime.video import decode_mp4, encode_mp4

    # The videos API takes no max_sequence_length: the model's own (256) applies on both sides.
    fields = {"seed": 9, "fps": 8, "num_frames": 9, "num_inference_steps": 3}
    with running_server(folders["model"], "--output-dir", str(tmp_path / "out")) as server:
        card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
        assert (card["family"], card["task"], card["task_type"]) == ("hunyuan_video", "text-to-video", "T2V")
        assert card["pipeline_name"] == "hunyuan_video_pipeline"
        url = f"{server.base_url}/v1/videos"
        created = httpx.post(url, json={"prompt": PROMPT, "size": "48x32", **fields}, timeout=60)
        assert created.status_code == 200, created.text
        job: dict[str, object] = {}

        def finished() -> bool:
            job.update(httpx.get(f"{url}/{created.json()['id']}", timeout=30).json())
            return job["status"] not in ("queued", "in_progress")

        wait_for(finished, 300, interval=0.1, what="the HunyuanVideo job")
        assert job["status"] == "completed", job
        served, fps = decode_mp4(httpx.get(f"{url}/{job['id']}/content", timeout=30).content)
    assert served.shape == (9, 32, 48, 3) and fps == pytest.approx(8)
    mine = engine.generate(PROMPT, output_type="np", height=32, width=48, **fields).frames[0]
    np.testing.assert_array_equal(served, decode_mp4(encode_mp4(mine, 8))[0])
    # And that is diffusers' video: a pixel rounded to the other 8-bit level changes what x264 does nearby, so
    # through the encoder they differ here and there (measured: 0.045 levels on average).
    expected = reference(reference_pipe, PROMPT, 9, height=32, width=48, max_sequence_length=256)[0]
    assert np.abs(served.astype(np.float64) - decode_mp4(encode_mp4(expected, 8))[0]).mean() <= 0.5
