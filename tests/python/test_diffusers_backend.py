"""The diffusers backend through the Python API: pipelines with no native family (SD3, PixArt-Sigma, CogVideoX fixtures)
run through the engine's scheduler and give diffusers' own output for the same seed, bit for bit (fp32 on CPU: the
backend calls the very same `__call__` with the same CPU generator, so nothing may differ). Also: the spec read from
the pipeline, one request per batch, per-step progress and cancellation, `--backend` choosing between native and
diffusers, and the options the backend takes or refuses. The CLI and HTTP: test_diffusers_backend_entry_points.py."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import SMALL
from diffusers_backend_util import PROMPT, backend_options, build_models, call_kwargs, diffusers_output
from sgl_diffusion import DiffGenerator, ModelLoadError, RequestCancelledError
from sgl_diffusion.api import collect

#: A bf16 VAE decoding an fp32 DiT's latents against the fp32 VAE: bf16 keeps 8 bits of mantissa, so pixels move
#: by up to a few hundredths (measured 0.015 to 0.022 over three seeds); far less than what a wrong decode would do
#: (outputs span [0, 1]).
BF16_VAE_ATOL = 0.05


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("diffusers_backend"))


@pytest.fixture(scope="module")
def sd3(models: Mapping[str, Path]) -> Iterator[DiffGenerator]:
    # Batching asked for, and a long delay: the backend's one-request batches must neither merge nor wait.
    gen = DiffGenerator.from_pretrained(models["sd3"], device="cpu", max_batch_size=8, batch_delay_ms=30_000)
    yield gen
    gen.shutdown()


@pytest.mark.parametrize("name", ["sd3", "pixart_sigma", "cogvideox"])
def test_python_api_gives_diffusers_output(models: Mapping[str, Path], sd3: DiffGenerator, name: str) -> None:
    gen = sd3 if name == "sd3" else DiffGenerator.from_pretrained(models[name], device="cpu", **backend_options(name))
    try:
        kwargs = call_kwargs(name)
        result = gen.generate(PROMPT, seed=7, output_type="np", **kwargs)
        expected = diffusers_output(models[name], 7, **kwargs)
        got = np.stack(result.frames if name == "cogvideox" else result.images)
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, expected)
        assert gen.info["family"] == "diffusers" and gen.info["max_batch_requests"] == 1
    finally:
        if gen is not sd3:
            gen.shutdown()


def test_the_spec_comes_from_the_pipeline(models: Mapping[str, Path], sd3: DiffGenerator) -> None:
    info = sd3.info
    assert (info["pipeline_class"], info["task"], info["output"], info["guidance"], info["image_input"]) == (
        "StableDiffusion3Pipeline", "text-to-image", "image", "classifier_free", "none",
    )  # fmt: skip
    # __call__'s defaults: 28 steps, guidance 7, 256 T5 tokens; the size default_sample_size (4) x VAE factor (8).
    defaults = info["defaults"]
    assert (defaults["width"], defaults["height"], defaults["num_inference_steps"]) == (32, 32, 28)
    assert (defaults["guidance_scale"], defaults["max_sequence_length"]) == (7.0, 256)
    assert info["limits"]["size_multiple"] == 16  # 8x VAE x 2x2 patches
    video = DiffGenerator.from_pretrained(models["cogvideox"], device="cpu")
    try:
        assert (video.info["output"], video.info["task"], video.info["limits"]["frame_rule"]) == (
            "video", "text-to-video", "four_k_plus_one",
        )  # fmt: skip
        # The text length is the transformer's bound (16), under the signature's 226; frames its sample_frames.
        assert (video.info["defaults"]["max_sequence_length"], video.info["defaults"]["num_frames"]) == (16, 9)
        assert video.info["defaults"]["fps"] == 16
    finally:
        video.shutdown()


def test_requests_run_one_per_batch_without_waiting(sd3: DiffGenerator) -> None:
    start = time.monotonic()
    handles = [sd3.submit(prompt=PROMPT, seed=seed, output_format="npy", **call_kwargs("sd3")) for seed in (1, 2)]
    results = [collect(handle) for handle in handles]
    assert [result.batch_size for result in results] == [1, 1]
    assert time.monotonic() - start < 25  # the 30 s batch delay never applied
    assert not np.array_equal(results[0].images[0], results[1].images[0])


def test_progress_arrives_per_step(sd3: DiffGenerator) -> None:
    steps: list[tuple[int, int]] = []
    sd3.generate(PROMPT, seed=1, on_progress=lambda step, total: steps.append((step, total)), **call_kwargs("sd3"))
    assert steps == [(1, 3), (2, 3), (3, 3)]


def test_a_running_request_is_cancelled_between_steps(sd3: DiffGenerator) -> None:
    handle = sd3.submit(
        prompt=PROMPT, seed=1, output_format="npy", **{**call_kwargs("sd3"), "num_inference_steps": 100}
    )
    steps: list[int] = []

    def on_progress(step: int, total: int) -> None:
        steps.append(step)
        if step == 2:
            handle.cancel()

    with pytest.raises(RequestCancelledError):
        handle.wait(on_progress)
    assert steps[-1] < 10  # stopped right after the cancel, not after 100 steps
    # The engine goes on serving.
    assert sd3.generate(PROMPT, seed=1, output_type="np", **call_kwargs("sd3")).images[0].shape == (32, 32, 3)


def test_backend_diffusers_on_flux_equals_diffusers_flux_pipeline(flux_dir: Path, diffusers_flux: Any) -> None:
    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", backend="diffusers")
    try:
        assert (gen.info["family"], gen.info["pipeline_class"]) == ("diffusers", "FluxPipeline")
        result = gen.generate("a cat", seed=3, output_type="np", guidance_scale=3.5, **SMALL)
    finally:
        gen.shutdown()
    expected = diffusers_flux(
        "a cat", guidance_scale=3.5, output_type="np", generator=torch.Generator("cpu").manual_seed(3), **SMALL
    ).images[0]
    np.testing.assert_array_equal(result.images[0], expected)


def test_backend_native_needs_a_native_family(models: Mapping[str, Path]) -> None:
    for alias in ("native", "sglang"):
        with pytest.raises(ModelLoadError, match=r"StableDiffusion3Pipeline, which has no native implementation"):
            DiffGenerator.from_pretrained(models["sd3"], device="cpu", backend=alias)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"diffusers_attention_backend": "warp"}, r"--diffusers-attention-backend 'warp' is no diffusers attention backend; valid: .*native"),
        ({"diffusers_attention_backend": "_native_npu"}, r"--diffusers-attention-backend _native_npu: .*not usable because of missing package"),
        ({"diffusers_kwargs": {"no_such_option": 1}}, r"diffusers_kwargs.no_such_option is neither a parameter of StableDiffusion3Pipeline.__call__"),
        ({"diffusers_kwargs": {"torch_dtype": "float16"}}, r"diffusers_kwargs.torch_dtype: set it with --dit-precision"),
        ({"enable_torch_compile": True}, r"the diffusers backend cannot honour: --enable-torch-compile"),
        ({"text_encoder_precisions": ["bf16"]}, r"the diffusers backend cannot honour: --text-encoder-precisions"),
        ({"cfg_batching": "off"}, r"the diffusers backend cannot honour: --cfg-batching off"),
        ({"diffusers_kwargs": {"vae": None}}, r"diffusers_kwargs.vae: set it with --vae-path"),
    ],
)  # fmt: skip
def test_options_it_cannot_honour_are_load_errors(models: Mapping[str, Path], options: dict, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        DiffGenerator.from_pretrained(models["sd3"], device="cpu", **options)


def test_diffusers_options_on_a_native_model_are_errors(flux_dir: Path) -> None:
    with pytest.raises(
        ModelLoadError,
        match=r"--diffusers-attention-backend: an option of the diffusers backend, and FluxPipeline runs natively",
    ):
        DiffGenerator.from_pretrained(flux_dir, device="cpu", diffusers_attention_backend="native")


def test_a_custom_pipeline_needs_trust_remote_code(models: Mapping[str, Path], tmp_path: Path) -> None:
    custom = tmp_path / "custom"
    shutil.copytree(models["sd3"], custom)
    (custom / "my_pipeline.py").write_text(
        "from diffusers import StableDiffusion3Pipeline\n\n\nclass MyPipeline(StableDiffusion3Pipeline):\n    pass\n"
    )
    index = json.loads((custom / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, "_class_name": ["my_pipeline", "MyPipeline"]}))
    with pytest.raises(ModelLoadError, match=r"custom diffusers pipeline.*--trust-remote-code"):
        DiffGenerator.from_pretrained(custom, device="cpu")
    gen = DiffGenerator.from_pretrained(
        custom,
        device="cpu",
        trust_remote_code=True,
        diffusers_attention_backend="native",
        vae_slicing=True,
    )
    try:
        assert gen.info["pipeline_class"] == "MyPipeline"
        result = gen.generate(PROMPT, seed=7, output_type="np", **call_kwargs("sd3"))
    finally:
        gen.shutdown()
    np.testing.assert_array_equal(result.images[0], diffusers_output(models["sd3"], 7, **call_kwargs("sd3"))[0])


def test_the_vae_runs_in_its_own_precision(models: Mapping[str, Path]) -> None:
    # SD3 hands the VAE its latents in the DiT's dtype (fp32 here); the backend casts them for the bf16 VAE.
    gen = DiffGenerator.from_pretrained(models["sd3"], device="cpu", dit_precision="fp32", vae_precision="bf16")
    try:
        result = gen.generate(PROMPT, seed=7, output_type="np", **call_kwargs("sd3"))
    finally:
        gen.shutdown()
    expected = diffusers_output(models["sd3"], 7, **call_kwargs("sd3"))[0]
    difference = np.abs(result.images[0] - expected).max()
    assert 0 < difference <= BF16_VAE_ATOL, difference


def test_vae_tiling_is_the_vaes_own(models: Mapping[str, Path]) -> None:
    # The fixture VAE's tiles are 32 px (its sample_size): a 64 px image decodes in four blended tiles.
    kwargs = {**call_kwargs("sd3"), "height": 64, "width": 64}
    gen = DiffGenerator.from_pretrained(models["sd3"], device="cpu", vae_tiling=True)
    try:
        result = gen.generate(PROMPT, seed=7, output_type="np", **kwargs)
    finally:
        gen.shutdown()
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(models["sd3"]))
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    tiled = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(7), output_type="np", **kwargs).images[0]
    np.testing.assert_array_equal(result.images[0], tiled)
    assert not np.array_equal(tiled, diffusers_output(models["sd3"], 7, **kwargs)[0])


def test_profile_traces_the_steps_and_perf_times_them(models: Mapping[str, Path], tmp_path: Path) -> None:
    import gzip

    from sgl_diffusion.runtime.profiling import TRACE_FILE

    gen = DiffGenerator.from_pretrained(models["sd3"], device="cpu", profile=True, profile_dir=str(tmp_path))
    try:
        result = gen.generate(PROMPT, seed=7, output_type="np", **call_kwargs("sd3"))
    finally:
        gen.shutdown()
    np.testing.assert_array_equal(result.images[0], diffusers_output(models["sd3"], 7, **call_kwargs("sd3"))[0])
    with gzip.open(Path(result.timings["profile_trace_dir"]) / TRACE_FILE, "rt") as f:
        events = json.load(f)["traceEvents"]
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    # Default: the first 2 steps, each from its first denoiser forward to the step callback.
    assert [e["name"] for e in ranges] == ["denoise_step_0", "denoise_step_1"]
    assert [step["step"] for step in result.timings["denoise_steps_ms"]] == [0, 1, 2]
