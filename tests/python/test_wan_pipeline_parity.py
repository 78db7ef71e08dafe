"""Our Wan text-to-video pipeline against diffusers' WanPipeline on the same tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

CASES = ["wan21_t2v", "wan22_t2v_a14b", "wan22_ti2v_5b"]

#: Frames are in [0, 1], fp32 on the CPU. Our Wan DiT and UniPC sampler compute diffusers' math but
#: not op for op in its order, and CFG runs as one batch-2 forward: the last bits differ (measured
#: 4.8e-7 to 1.0e-6 over every case here). The bound sits just above that, 500x under the fp32 parity
#: contract (5e-3 on pixels).
PIXEL_ATOL = 1e-5
#: What a different prompt, or a different input image, does to the frames: measured 0.054 to 0.18 max
#: abs on these fixtures, which are built so that conditioning matters (sgl_diffusion.testing.wan;
#: before that, Wan2.1-I2V's prompt and Wan2.2-I2V-A14B's image moved them by only 0.008). 1000x the
#: bound above: a pipeline that dropped or swapped either could not pass as matching.
CONDITIONING_EFFECT = 1e-2
OTHER_PROMPT = "a dragon flying over a medieval castle"


@pytest.fixture(scope="module")
def wan_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {name: build_fixture(name, root / name) for name in CASES}


def diffusers_frames(folder: Path, prompt: str, seed: int, **kwargs: object) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(out.frames)


@pytest.mark.parametrize("name", CASES)
def test_text_to_video_matches_diffusers(wan_dirs: dict[str, Path], name: str) -> None:
    settings = dict(FIXTURE_REGISTRY[name].call_kwargs)
    settings["negative_prompt"] = "blurry, static"
    gen = DiffGenerator.from_pretrained(wan_dirs[name], device="cpu")
    try:
        ours = gen.generate("a cat dancing in the rain", seed=11, output_type="np", **settings)
        other = gen.generate(OTHER_PROMPT, seed=11, output_type="np", **settings)
    finally:
        gen.shutdown()
    expected = diffusers_frames(wan_dirs[name], "a cat dancing in the rain", 11, **settings)
    assert len(ours.frames) == 1 and ours.frames[0].shape == expected[0].shape == (9, 32, 32, 3)
    assert np.abs(ours.frames[0] - expected[0]).max() <= PIXEL_ATOL
    assert np.abs(other.frames[0] - ours.frames[0]).max() > CONDITIONING_EFFECT
    assert ours.fps == 16


def test_frames_are_rounded_to_4k_plus_1_and_saved_as_mp4(wan_dirs: dict[str, Path], tmp_path: Path) -> None:
    from sgl_diffusion.runtime.video import decode_mp4

    gen = DiffGenerator.from_pretrained(wan_dirs["wan21_t2v"], device="cpu")
    try:
        res = gen.generate("a cat", seed=1, height=32, width=48, num_frames=7, fps=8, num_inference_steps=2,
                           max_sequence_length=16)  # fmt: skip
    finally:
        gen.shutdown()
    assert res.frames[0].shape == (5, 32, 48, 3) and res.frames[0].dtype == np.uint8
    assert any("rounded down to 5" in note for note in res.notes)
    frames, fps = decode_mp4(res.save(tmp_path / "cat.mp4").read_bytes())
    assert frames.shape == (5, 32, 48, 3) and fps == pytest.approx(8)


I2V_CASES = ["wan21_i2v", "wan22_i2v_a14b", "wan22_ti2v_5b"]


@pytest.fixture(scope="module")
def i2v_dirs(tmp_path_factory: pytest.TempPathFactory, wan_dirs: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_i2v")
    dirs = {name: build_fixture(name, root / name) for name in I2V_CASES if name not in wan_dirs}
    return {**dirs, "wan22_ti2v_5b": wan_dirs["wan22_ti2v_5b"]}


def random_image(folder: Path, seed: int) -> Path:
    from PIL import Image

    path = folder / f"input-{seed}.png"
    pixels = (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)  # resized by both pipelines
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def input_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image(tmp_path_factory.mktemp("images"), 0)


@pytest.fixture(scope="module")
def other_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_image(tmp_path_factory.mktemp("images"), 1)


@pytest.mark.parametrize("name", I2V_CASES)
def test_image_to_video_matches_diffusers(
    i2v_dirs: dict[str, Path], input_image: Path, other_image: Path, name: str
) -> None:
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    settings = dict(FIXTURE_REGISTRY[name].call_kwargs)
    if name == "wan22_ti2v_5b":
        settings["max_sequence_length"] = 16
    settings["negative_prompt"] = "blurry"
    gen = DiffGenerator.from_pretrained(i2v_dirs[name], device="cpu")
    try:
        ours = gen.generate("the cat turns its head", seed=5, output_type="np", image=input_image, **settings)
        other_prompt = gen.generate(OTHER_PROMPT, seed=5, output_type="np", image=input_image, **settings)
        other_input = gen.generate("the cat turns its head", seed=5, output_type="np", image=other_image, **settings)
    finally:
        gen.shutdown()
    # Both conditions act: neither the prompt nor the image can be dropped unnoticed.
    assert np.abs(other_prompt.frames[0] - ours.frames[0]).max() > CONDITIONING_EFFECT
    assert np.abs(other_input.frames[0] - ours.frames[0]).max() > CONDITIONING_EFFECT
    pipe = WanImageToVideoPipeline.from_pretrained(i2v_dirs[name])
    pipe.set_progress_bar_config(disable=True)
    with Image.open(input_image) as image:
        expected = pipe(
            image.convert("RGB"),
            "the cat turns its head",
            generator=torch.Generator("cpu").manual_seed(5),
            output_type="np",
            **settings,
        ).frames
    assert ours.frames[0].shape == expected[0].shape == (9, 32, 32, 3)
    assert np.abs(ours.frames[0] - expected[0]).max() <= PIXEL_ATOL


def test_image_rules_follow_the_checkpoint(
    i2v_dirs: dict[str, Path], wan_dirs: dict[str, Path], input_image: Path
) -> None:
    from sgl_diffusion import InvalidRequestError

    small = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 1, "max_sequence_length": 16}
    i2v = DiffGenerator.from_pretrained(i2v_dirs["wan21_i2v"], device="cpu")
    t2v = DiffGenerator.from_pretrained(wan_dirs["wan21_t2v"], device="cpu")
    try:
        with pytest.raises(InvalidRequestError) as missing:
            i2v.generate("a cat", **small)
        assert missing.value.field == "image"
        with pytest.raises(InvalidRequestError) as unwanted:
            t2v.generate("a cat", image=input_image, **small)
        assert unwanted.value.field == "image"
    finally:
        i2v.shutdown()
        t2v.shutdown()


def request(**fields: object):
    from sgl_diffusion.runtime.request import Request

    base = {
        "id": 1, "prompt": "a cat dancing in the rain", "negative_prompt": "blurry", "width": 32, "height": 32,
        "num_frames": 9, "num_inference_steps": 4, "guidance_scale": 5.0, "true_cfg_scale": 1.0, "seed": 3,
        "max_sequence_length": 16, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": 16,
        "image_path": None, "cfg_enabled": True, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


def load_ours(folder: Path):
    from sgl_diffusion.pipelines.wan import WanPipeline

    return WanPipeline.load(folder, RuntimeOptions.for_device("cpu"), None)


def test_prompt_embeddings_match_diffusers(wan_dirs: dict[str, Path]) -> None:
    from diffusers import WanPipeline

    prompts = ["a cat dancing in the rain", "  Ünïcode &amp; <b>html</b>   spaces ", ""]
    ours = load_ours(wan_dirs["wan21_t2v"]).adapter.encode_texts(prompts, 16, torch.device("cpu"))
    # The same UMT5 on the same weights and token ids: equal bits are expected. The reference runs
    # without autograd, as diffusers' __call__ runs it: with its requires_grad left on, the position
    # bias sends SDPA to its math kernel instead of the fused CPU one (measured 7.9e-7 apart).
    with torch.no_grad():
        reference, _ = WanPipeline.from_pretrained(wan_dirs["wan21_t2v"]).encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=16
        )
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert (ours[0] - ours[1]).abs().max() > 1.0  # different prompts, clearly different embeddings


# 0.0: the low-noise expert's CFG then returns its unconditional prediction; it must not fall back to guidance_scale.
@pytest.mark.parametrize("guidance_scale_2", [3.0, 0.0])
def test_latents_after_the_loop_match_and_both_a14b_experts_run(
    wan_dirs: dict[str, Path], guidance_scale_2: float
) -> None:
    from diffusers import WanPipeline

    folder = wan_dirs["wan22_t2v_a14b"]
    ours = load_ours(folder)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(ours.c, name).register_forward_hook(lambda *_, key=name: calls.__setitem__(key, calls[key] + 1))
    state = ours.run([request(guidance_scale_2=guidance_scale_2, flow_shift=12.0)], lambda step, total: [])
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0  # both experts really run
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a cat dancing in the rain", negative_prompt="blurry", height=32, width=32, num_frames=9,
        num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=guidance_scale_2, max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(3), output_type="latent",
    ).frames  # fmt: skip
    # Latents (|x| up to ~4): not op-for-op diffusers' order, measured 1.9e-6 apart; the fp32 parity
    # contract for latents is 1e-5.
    torch.testing.assert_close(state["latents"], expected, rtol=0, atol=1e-5)
