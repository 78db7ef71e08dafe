"""Our HunyuanVideo-1.5 pipelines against diffusers' HunyuanVideo15Pipeline and HunyuanVideo15ImageToVideoPipeline
on the tiny fixtures, fp32 on CPU.

The engine runs the fixture folders as they are (no known id: the folder's guider scale, scheduler shift and the
default size its transformer's `target_size` gives).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.models.hunyuan_video15.text_encoder import TEMPLATE_CROP
from sgl_diffusion.pipelines.hunyuan_video15 import HunyuanVideo15Pipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

#: 9 frames (3 latent frames) of 32x32, 3 steps; CFG 6 from the fixture's guider.
SMALL = dict(FIXTURE_REGISTRY["hunyuan_video15_t2v"].call_kwargs)
PROMPT = "a cat dancing in the rain"
#: Another token length than PROMPT's.
OTHER_PROMPT = "a dragon flying over a medieval castle at night"
#: Quoted text: the ByT5 glyph encoder's input.
GLYPH_PROMPT = 'a neon sign saying "open late" over a door'
#: Frames are in [0, 1], fp32 on the CPU. Each prompt keeps only its real tokens where the reference pads and masks
#: (the same math over shorter rows, so the last bits differ: measured 8.9e-7 to 1.2e-6 on the text-to-video cases, 1.6e-6 to 2.6e-6 on the image-to-video ones). The bound
#: sits above that, 500x under the fp32 parity contract (5e-3 on pixels).
PIXEL_ATOL = 1e-5
#: What a different prompt does to the frames on this fixture (measured well above 0.05): 1000x the bound above.
CONDITIONING_EFFECT = 1e-2


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("hunyuan_video15_t2v", tmp_path_factory.mktemp("hunyuan_video15") / "model")


@pytest.fixture(scope="module")
def engine(folder: Path) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(folder, device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def reference_pipe(folder: Path):
    from diffusers import HunyuanVideo15Pipeline as DiffusersPipeline

    pipe = DiffusersPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, prompt: str | list[str], seed: int, **kwargs: object) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="np", **{**SMALL, **kwargs}).frames


def ours(gen: DiffGenerator, prompt: str, seed: int, **kwargs: object) -> list[np.ndarray]:
    return gen.generate(prompt, seed=seed, output_type="np", **{**SMALL, **kwargs}).frames


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 32), (32, 64)])
def test_whole_pipeline_matches_diffusers(engine, reference_pipe, height: int, width: int) -> None:
    size = {"height": height, "width": width}
    mine = ours(engine, PROMPT, 7, **size)
    expected = reference(reference_pipe, PROMPT, 7, **size)
    assert len(mine) == 1 and mine[0].shape == expected[0].shape == (9, height, width, 3)
    print(f"{height}x{width}: max abs {max_abs(mine[0], expected[0]):.3g}")
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL
    assert max_abs(ours(engine, OTHER_PROMPT, 7, **size)[0], mine[0]) > CONDITIONING_EFFECT


def test_glyph_text_and_negative_prompt_match_diffusers(engine, reference_pipe) -> None:
    mine = ours(engine, GLYPH_PROMPT, 3, negative_prompt="blurry, low quality")
    expected = reference(reference_pipe, GLYPH_PROMPT, 3, negative_prompt="blurry, low quality")
    print(f"glyph + negative: max abs {max_abs(mine[0], expected[0]):.3g}")
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL
    # The quoted text and the negative prompt act.
    assert max_abs(ours(engine, GLYPH_PROMPT.replace("open late", "closed"), 3)[0], mine[0]) > CONDITIONING_EFFECT
    assert max_abs(ours(engine, GLYPH_PROMPT, 3)[0], mine[0]) > CONDITIONING_EFFECT


def test_without_guidance_matches_diffusers(engine, reference_pipe) -> None:
    from diffusers import ClassifierFreeGuidance

    mine = ours(engine, PROMPT, 4, guidance_scale=1.0)
    guider = reference_pipe.guider
    try:
        reference_pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)
        expected = reference(reference_pipe, PROMPT, 4)
    finally:
        reference_pipe.guider = guider
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL
    assert max_abs(ours(engine, PROMPT, 4)[0], mine[0]) > CONDITIONING_EFFECT  # CFG 6 differs


def test_several_outputs_per_prompt_match_diffusers(engine, reference_pipe) -> None:
    mine = ours(engine, PROMPT, 5, num_outputs_per_prompt=2)
    # diffusers cannot run two videos in one call here (its text-to-video image tokens are per prompt, and its
    # VAE's attention fails on a batch of two), so each video runs alone on its rows of the noise both draw:
    # (2, C, F, H, W) from one generator seeded with the seed.
    latent_shape = (2, 8, 3, 2, 2)  # 8 channels, 9 frames -> 3, 32x32 -> 2x2
    noise = torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(5))
    expected = [reference(reference_pipe, PROMPT, 0, latents=noise[i : i + 1])[0] for i in range(2)]
    assert len(mine) == 2
    for video, theirs in zip(mine, expected, strict=True):
        assert max_abs(video, theirs) <= PIXEL_ATOL
    assert max_abs(mine[0], mine[1]) > CONDITIONING_EFFECT  # two draws from one generator


def test_default_size_matches_diffusers(engine, reference_pipe) -> None:
    """No size given: both take the bucket of the transformer's target_size (64) nearest 16:9."""
    fields = {"num_frames": 5, "num_inference_steps": 2}
    mine = engine.generate(PROMPT, seed=6, output_type="np", **fields).frames
    expected = reference_pipe(
        PROMPT, generator=torch.Generator("cpu").manual_seed(6), output_type="np", **fields
    ).frames  # fmt: skip
    assert mine[0].shape == expected[0].shape == (5, 48, 80, 3)
    assert max_abs(mine[0], expected[0]) <= PIXEL_ATOL


def test_batched_requests_match_running_alone(folder, engine) -> None:
    # Different prompts (token lengths, with and without glyph text), seeds, guidance and outputs per prompt.
    fields = [
        {"prompt": PROMPT, "seed": 1},
        {"prompt": OTHER_PROMPT, "seed": 2, "guidance_scale": 3.5},
        {"prompt": GLYPH_PROMPT, "seed": 3},
        {"prompt": "a lighthouse at dawn", "seed": 4, "num_outputs_per_prompt": 2},
    ]
    batching = DiffGenerator.from_pretrained(folder, device="cpu", max_batch_size=8, batch_delay_ms=1500)
    try:
        handles = [batching.submit(**{**SMALL, "output_format": "npy", **f}) for f in fields]
        results = [collect(handle) for handle in handles]
    finally:
        batching.shutdown()
    for request_fields, result in zip(fields, results, strict=True):
        alone = ours(engine, **request_fields)
        assert result.batch_size == 4
        for video, solo in zip(result.frames, alone, strict=True):
            # Rows of one text length share a forward: a GEMM over more rows blocks its sums differently on CPU,
            # which moves the last bits (measured up to 1.0e-6).
            assert max_abs(video, solo) <= PIXEL_ATOL


def test_prompt_embeddings_match_diffusers(folder, reference_pipe) -> None:
    pipeline = HunyuanVideo15Pipeline.load(folder, RuntimeOptions.for_device("cpu"), None)
    texts = [PROMPT, GLYPH_PROMPT, "", PROMPT]
    encoded = pipeline.adapter.encode_prompts(texts, 1000, torch.device("cpu"))
    lengths, glyph_lengths = encoded["text_lengths"], encoded["glyph_lengths"]
    assert lengths.device.type == "cpu" and len({int(n) for n in lengths}) == 3
    assert [int(n) for n in glyph_lengths] == [0, len('Text "open late". ') + 1, 0, 0]  # bytes + </s>
    for row, text in enumerate(texts):
        with torch.no_grad():
            embeds, mask, glyph, glyph_mask = reference_pipe.encode_prompt(text, device=torch.device("cpu"))
        length, glyph_length = int(lengths[row]), int(glyph_lengths[row])
        assert int(mask.sum()) == length and int(glyph_mask.sum()) == glyph_length
        # The rows the reference's masks keep are ours, bit for bit; the rest is zero padding of ours.
        torch.testing.assert_close(
            encoded["encoder_hidden_states"][row, :length], embeds[0][mask[0].bool()], rtol=0, atol=0
        )
        assert not encoded["encoder_hidden_states"][row, length:].any()
        torch.testing.assert_close(
            encoded["encoder_hidden_states_2"][row, :glyph_length], glyph[0][glyph_mask[0].bool()], rtol=0, atol=0
        )


def test_the_template_crop_keeps_the_prompt(folder) -> None:
    """The fixture's tokenizer makes each system-message word one token, so the reference's hard-coded crop (108)
    falls inside the chat template's prefix and the prompt survives it whole."""
    from transformers import AutoTokenizer

    from sgl_diffusion.models.hunyuan_video15.text_encoder import SYSTEM_MESSAGE

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    chat = [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": PROMPT}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert PROMPT in tokenizer.decode(ids[TEMPLATE_CROP:])
    assert tokenizer.decode(ids[:TEMPLATE_CROP]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_defaults_and_limits(engine) -> None:
    info = engine.info
    assert (info["family"], info["task"], info["guidance"], info["pipeline_class"]) == (
        "hunyuan_video15", "text-to-video", "classifier_free", "HunyuanVideo15Pipeline"
    )  # fmt: skip
    defaults = info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_frames"], defaults["fps"]) == (80, 48, 121, 24)
    assert (defaults["num_inference_steps"], defaults["guidance_scale"], defaults["flow_shift"]) == (50, 6.0, 5.0)
    assert defaults["negative_prompt"] == "" and defaults["max_sequence_length"] == 1000
    limits = info["limits"]
    assert (limits["size_multiple"], limits["token_size"], limits["frame_rule"]) == (16, 16, "four_k_plus_one")
    assert (limits["max_frames"], limits["frames_per_latent"]) == (121, 4)


def test_what_the_model_cannot_honour_is_refused(engine, folder, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError) as size:
        engine.generate(PROMPT, **{**SMALL, "height": 40})
    assert size.value.field == "height"
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = copy / "guider" / "guider_config.json"
    config.write_text(config.read_text().replace('"guidance_rescale": 0.0', '"guidance_rescale": 0.7'))
    with pytest.raises(ValueError, match="guidance_rescale"):
        HunyuanVideo15Pipeline.load(copy, RuntimeOptions.for_device("cpu"), None)


# ------------------------------------------------------------------------------------------------------------------
# Image-to-video (HunyuanVideo15ImageToVideoPipeline)
# ------------------------------------------------------------------------------------------------------------------

I2V_SMALL = dict(FIXTURE_REGISTRY["hunyuan_video15_i2v"].call_kwargs)


@pytest.fixture(scope="module")
def i2v_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("hunyuan_video15_i2v", tmp_path_factory.mktemp("hunyuan_video15_i2v") / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random RGB images: landscape (100x60, near 16:9) and portrait (40x90)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("hunyuan_video15_images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (width, height) in {"landscape": (100, 60), "portrait": (40, 90)}.items():
        paths[name] = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def i2v_engine(i2v_folder: Path) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(i2v_folder, device="cpu")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def i2v_reference_pipe(i2v_folder: Path):
    from diffusers import HunyuanVideo15ImageToVideoPipeline as DiffusersPipeline

    pipe = DiffusersPipeline.from_pretrained(i2v_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("image", ["landscape", "portrait"])
def test_image_to_video_matches_diffusers(i2v_engine, i2v_reference_pipe, images, image: str) -> None:
    from PIL import Image

    # diffusers sizes the video by the image (the target_size bucket nearest its aspect); so does ours, given no size.
    expected = i2v_reference_pipe(
        Image.open(images[image]), PROMPT, generator=torch.Generator("cpu").manual_seed(7), output_type="np",
        **I2V_SMALL,
    ).frames[0]  # fmt: skip
    height, width = expected.shape[1:3]
    mine = i2v_engine.generate(PROMPT, image_path=str(images[image]), seed=7, output_type="np", **I2V_SMALL).frames[0]
    print(f"i2v {image} {height}x{width}: max abs {max_abs(mine, expected):.3g}")
    assert mine.shape == expected.shape
    assert max_abs(mine, expected) <= PIXEL_ATOL
    other = "portrait" if image == "landscape" else "landscape"
    changed = i2v_engine.generate(
        PROMPT, image_path=str(images[other]), seed=7, output_type="np", height=height, width=width, **I2V_SMALL
    ).frames[0]
    assert max_abs(changed, mine) > CONDITIONING_EFFECT  # the image acts


def test_image_to_video_batched_requests_match_running_alone(i2v_folder, i2v_engine, images) -> None:
    size = {"height": 48, "width": 80}
    fields = [
        {"prompt": PROMPT, "seed": 1, "image_path": str(images["landscape"])},
        {"prompt": GLYPH_PROMPT, "seed": 2, "image_path": str(images["portrait"]), "num_outputs_per_prompt": 2},
    ]
    batching = DiffGenerator.from_pretrained(i2v_folder, device="cpu", max_batch_size=8, batch_delay_ms=1500)
    try:
        handles = [batching.submit(**{**I2V_SMALL, **size, "output_format": "npy", **f}) for f in fields]
        results = [collect(handle) for handle in handles]
    finally:
        batching.shutdown()
    for request_fields, result in zip(fields, results, strict=True):
        alone = i2v_engine.generate(output_type="np", **{**I2V_SMALL, **size, **request_fields}).frames
        assert result.batch_size == 2
        for video, solo in zip(result.frames, alone, strict=True):
            assert max_abs(video, solo) <= PIXEL_ATOL


@pytest.mark.parametrize(("width", "height"), [(100, 60), (40, 90), (64, 64), (1280, 720), (30, 200), (300, 20)])
def test_image_to_video_takes_the_size_diffusers_gives_the_image(
    i2v_folder, i2v_engine, tmp_path: Path, width: int, height: int
) -> None:
    """The Rust core's bucket for the image's header equals diffusers' `calculate_default_height_width`, and a size the
    request gives wins."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
    from PIL import Image

    path = tmp_path / f"{width}x{height}.png"
    Image.new("RGB", (width, height), (200, 30, 90)).save(path)
    target_size = json.loads((i2v_folder / "transformer" / "config.json").read_text())["target_size"]
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=i2v_engine.info["limits"]["size_multiple"])
    expected_height, expected_width = processor.calculate_default_height_width(height, width, target_size)
    video = i2v_engine.generate(PROMPT, image_path=str(path), seed=1, output_type="np", **I2V_SMALL).frames[0]
    assert video.shape[1:3] == (expected_height, expected_width)
    asked = i2v_engine.generate(
        PROMPT, image_path=str(path), seed=1, output_type="np", width=48, height=32, **I2V_SMALL
    ).frames[0]
    assert asked.shape[1:3] == (32, 48)


def test_image_to_video_needs_an_image(i2v_engine) -> None:
    info = i2v_engine.info
    assert (info["task"], info["pipeline_class"]) == ("image-to-video", "HunyuanVideo15ImageToVideoPipeline")
    with pytest.raises(InvalidRequestError):
        i2v_engine.generate(PROMPT, **I2V_SMALL)


@pytest.mark.parametrize("target_size", [64, 480, 640, 720])
@pytest.mark.parametrize(("width", "height"), [(16, 9), (9, 16), (1, 1), (100, 60), (40, 90), (4, 3)])
def test_resolution_buckets_match_diffusers(target_size: int, width: int, height: int) -> None:
    """The size diffusers picks for an aspect (the default size's rule, and its image-to-video sizing)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    from sgl_diffusion.pipelines.hunyuan_video15 import bucket_size

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    expected_height, expected_width = processor.calculate_default_height_width(height, width, target_size)
    assert bucket_size(target_size, 16, (width, height)) == (expected_width, expected_height)


def test_the_videos_api_serves_image_to_video(i2v_folder, i2v_engine, images, tmp_path: Path) -> None:
    """A real `sgl-diffusion serve` process: an uploaded `input_reference` makes the video the engine makes in process
    from that image (which matches diffusers', above), through the MP4 encoder."""
    import httpx2 as httpx

    from server_util import running_server, wait_for
    from sgl_diffusion.runtime.video import decode_mp4, encode_mp4

    fields = {"seed": "4", "fps": "8", "num_frames": "9", "num_inference_steps": "2", "size": "80x48"}
    image = ("reference.png", images["landscape"].read_bytes(), "image/png")
    with running_server(i2v_folder, "--output-dir", str(tmp_path / "out")) as server:
        card = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"][0]
        assert (card["task"], card["task_type"]) == ("image-to-video", "I2V")
        url = f"{server.base_url}/v1/videos"
        # Without its image this checkpoint cannot run: a 400 naming the part.
        missing = httpx.post(url, json={"prompt": PROMPT, "size": "80x48"}, timeout=60)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "input_reference", missing.text
        form = {"prompt": (None, PROMPT), **{name: (None, value) for name, value in fields.items()}}
        created = httpx.post(url, files={**form, "input_reference": image}, timeout=60)
        assert created.status_code == 200, created.text
        job: dict[str, object] = {}

        def finished() -> bool:
            job.update(httpx.get(f"{url}/{created.json()['id']}", timeout=30).json())
            return job["status"] not in ("queued", "in_progress")

        wait_for(finished, 300, interval=0.1, what="the HunyuanVideo-1.5 image-to-video job")
        assert job["status"] == "completed", job
        served, fps = decode_mp4(httpx.get(f"{url}/{job['id']}/content", timeout=30).content)
    assert served.shape == (9, 48, 80, 3) and fps == pytest.approx(8)
    mine = i2v_engine.generate(
        PROMPT, image_path=str(images["landscape"]), seed=4, fps=8, num_frames=9, num_inference_steps=2,
        height=48, width=80, output_type="np",
    ).frames[0]  # fmt: skip
    np.testing.assert_array_equal(served, decode_mp4(encode_mp4(mine, 8))[0])
