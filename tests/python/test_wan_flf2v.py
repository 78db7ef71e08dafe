"""Wan first-last-frame image-to-video against diffusers' WanImageToVideoPipeline(last_image=...).

Two checkpoint kinds take a last frame: Wan2.1-FLF2V (CLIP tokens of both frames under a learned position
embedding; it needs the last frame) and Wan2.2 I2V-A14B (no CLIP; the last frame enters through the frame
mask and the VAE condition only; optional). Checkpoints that cannot take one refuse it by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

#: As in test_wan_pipeline_parity.py: fp32 on the CPU, not op for op diffusers' order (measured ~1e-6).
PIXEL_ATOL = 1e-5
#: What a different last frame does to the frames, far above the parity bound: Wan2.1-FLF2V sees it through
#: CLIP and the VAE (measured above 1e-2); this tiny Wan2.2 I2V-A14B only through the VAE's last latent frame
#: (measured 1.2e-4, still 10x the bound and ~100x the measured parity gap).
LAST_FRAME_EFFECT = {"wan21_flf2v": 1e-2, "wan22_i2v_a14b": 6e-5}
PROMPT = "the cat turns its head"
FLF_CASES = ["wan21_flf2v", "wan22_i2v_a14b"]


def random_image(folder: Path, seed: int) -> Path:
    path = folder / f"frame-{seed}.png"
    pixels = (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)  # resized by both pipelines
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_flf2v")
    return {name: build_fixture(name, root / name) for name in [*FLF_CASES, "wan21_i2v"]}


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("frames")
    return [random_image(folder, seed) for seed in range(3)]


@pytest.fixture(scope="module")
def flf_engine(dirs: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(dirs["wan21_flf2v"], device="cpu")
    yield gen
    gen.shutdown()


def settings(name: str) -> dict[str, object]:
    return {**FIXTURE_REGISTRY[name].call_kwargs, "negative_prompt": "blurry"}


def diffusers_frames(folder: Path, first: Path, last: Path | None, seed: int, **kwargs: object) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with Image.open(first) as image:
        last_image = Image.open(last).convert("RGB") if last is not None else None
        out = pipe(
            image.convert("RGB"),
            PROMPT,
            last_image=last_image,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **kwargs,
        )
    return np.asarray(out.frames)


@pytest.mark.parametrize("name", FLF_CASES)
def test_first_last_frame_matches_diffusers(dirs: dict[str, Path], frames: list[Path], name: str) -> None:
    gen = DiffGenerator.from_pretrained(dirs[name], device="cpu")
    try:
        ours = gen.generate(PROMPT, image=frames[0], last_image=frames[1], seed=5, output_type="np", **settings(name))
        other_last = gen.generate(
            PROMPT, image=frames[0], last_image=frames[2], seed=5, output_type="np", **settings(name)
        )
    finally:
        gen.shutdown()
    expected = diffusers_frames(dirs[name], frames[0], frames[1], 5, **settings(name))
    assert ours.frames[0].shape == expected[0].shape == (9, 32, 32, 3)
    assert np.abs(ours.frames[0] - expected[0]).max() <= PIXEL_ATOL
    # The last frame acts: a pipeline that dropped it could not pass as matching.
    assert np.abs(other_last.frames[0] - ours.frames[0]).max() > LAST_FRAME_EFFECT[name]


def test_the_last_frame_is_optional_where_the_checkpoint_allows_it(dirs: dict[str, Path], frames: list[Path]) -> None:
    # Wan2.2 I2V-A14B without a last frame is plain image-to-video, as diffusers' without `last_image`.
    gen = DiffGenerator.from_pretrained(dirs["wan22_i2v_a14b"], device="cpu")
    try:
        ours = gen.generate(PROMPT, image=frames[0], seed=6, output_type="np", **settings("wan22_i2v_a14b"))
        assert gen.info["last_image_input"] == "optional"
    finally:
        gen.shutdown()
    expected = diffusers_frames(dirs["wan22_i2v_a14b"], frames[0], None, 6, **settings("wan22_i2v_a14b"))
    assert np.abs(ours.frames[0] - expected[0]).max() <= PIXEL_ATOL


def test_batched_first_last_frame_requests_equal_solo(dirs: dict[str, Path], frames: list[Path], flf_engine) -> None:
    # Different last frames, prompts and seeds in one batch: each request keeps its own CLIP pair and mask.
    gen = DiffGenerator.from_pretrained(dirs["wan21_flf2v"], device="cpu", max_batch_size=4, batch_delay_ms=1500)
    small = {**settings("wan21_flf2v"), "num_inference_steps": 2, "output_format": "npy"}
    requests = [
        {"prompt": PROMPT, "seed": 1, "image_path": str(frames[0]), "last_image_path": str(frames[1])},
        {"prompt": "a dog", "seed": 2, "image_path": str(frames[1]), "last_image_path": str(frames[2])},
    ]
    try:
        results = [collect(handle) for handle in [gen.submit(**small, **fields) for fields in requests]]
    finally:
        gen.shutdown()
    for fields, result in zip(requests, results, strict=True):
        assert result.batch_size == 2
        alone = collect(flf_engine.submit(**small, **fields))
        assert np.abs(result.frames[0] - alone.frames[0]).max() <= PIXEL_ATOL


def test_checkpoints_say_whether_they_take_a_last_frame(dirs: dict[str, Path], frames: list[Path], flf_engine) -> None:
    small = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 1, "max_sequence_length": 512}
    # FLF2V needs both frames.
    assert flf_engine.info["last_image_input"] == "required"
    with pytest.raises(InvalidRequestError) as missing:
        flf_engine.generate(PROMPT, image=frames[0], **small)
    assert missing.value.field == "last_image_path" and "last frame is required" in str(missing.value)
    with pytest.raises(TypeError, match="last_image"):
        flf_engine.generate(PROMPT, image=frames[0], last_image=frames[1], last_image_path=str(frames[1]), **small)
    # Wan2.1 I2V (CLIP without the pair embedding) cannot take one.
    i2v = DiffGenerator.from_pretrained(dirs["wan21_i2v"], device="cpu")
    try:
        assert i2v.info["last_image_input"] == "none"
        with pytest.raises(InvalidRequestError) as refused:
            i2v.generate(PROMPT, image=frames[0], last_image=frames[1], **small)
        assert refused.value.field == "last_image_path" and "takes no last frame" in str(refused.value)
    finally:
        i2v.shutdown()


def test_the_cli_takes_a_last_frame(dirs: dict[str, Path], frames: list[Path], tmp_path: Path) -> None:
    import shutil
    import subprocess

    out = tmp_path / "out"
    command = [
        shutil.which("sgl-diffusion") or "sgl-diffusion", "generate", "--model-path", str(dirs["wan21_flf2v"]),
        "--device", "cpu", "--prompt", PROMPT, "--image-path", str(frames[0]), "--last-image-path", str(frames[1]),
        "--height", "32", "--width", "32", "--num-frames", "5", "--num-inference-steps", "1",
        "--max-sequence-length", "512", "--seed", "3", "--output-path", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert [path.suffix for path in out.iterdir()] == [".mp4"]


def test_the_videos_api_takes_a_last_frame(dirs: dict[str, Path], frames: list[Path], tmp_path: Path) -> None:
    import httpx2 as httpx

    from server_util import running_server, wait_for
    from sgl_diffusion.runtime.video import decode_mp4

    fields = {"prompt": (None, PROMPT), "size": (None, "32x32"), "num_frames": (None, "5"), "seed": (None, "3")}
    fields |= {"num_inference_steps": (None, "1")}
    first = ("first.png", frames[0].read_bytes(), "image/png")
    last = ("last.png", frames[1].read_bytes(), "image/png")
    with running_server(dirs["wan21_flf2v"], "--output-dir", str(tmp_path / "out")) as server:
        url = f"{server.base_url}/v1/videos"
        # Without its last frame this checkpoint cannot run: a 400 naming the part.
        missing = httpx.post(url, files={**fields, "input_reference": first}, timeout=60)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "last_frame", missing.text
        created = httpx.post(url, files={**fields, "input_reference": first, "last_frame": last}, timeout=60)
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]
        done: dict[str, object] = {}

        def finished() -> bool:
            done.update(httpx.get(f"{url}/{job_id}", timeout=30).json())
            return done["status"] not in ("queued", "in_progress")

        wait_for(finished, 300, interval=0.1, what="the first-last-frame job")
        assert done["status"] == "completed", done
        video = httpx.get(f"{url}/{job_id}/content", timeout=30)
        assert decode_mp4(video.content)[0].shape == (5, 32, 32, 3)
