"""Speed options on the CPU: torch.compile of the repeated blocks (no recompiles across steps and
requests of one shape), batched CFG (same result as two forwards), warm-up, VAE tiling, and the
option validation every entry point shares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion.runtime.options import RuntimeOptions


def flux_request(**fields: object):
    from sgl_diffusion.runtime.request import Request

    base = {
        "id": 1, "prompt": "a red cube", "negative_prompt": None, "width": 32, "height": 32, "num_frames": 1,
        "num_inference_steps": 3, "guidance_scale": 3.5, "true_cfg_scale": 1.0, "seed": 7,
        "max_sequence_length": 32, "num_outputs": 1, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": False, "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(**{**base, **fields})


def load_flux(flux_dir: Path, **options: object):
    from sgl_diffusion.pipelines.flux import FluxPipeline

    return FluxPipeline.load(flux_dir, RuntimeOptions.for_device("cpu", **options), None)


def run(pipeline, request) -> np.ndarray:
    return pipeline.run([request], lambda step, total: [])["images"]


def test_compiled_blocks_match_eager_and_do_not_recompile(flux_dir: Path) -> None:
    from torch._dynamo.utils import counters

    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    eager = load_flux(flux_dir)
    expected = [run(eager, flux_request(seed=seed, prompt=p)) for seed, p in ((1, "a cube"), (2, "two dogs"))]

    compiled = load_flux(flux_dir)
    # aot_eager runs dynamo's capture and guards (what decides recompiles) without inductor's C++
    # build, so the test is fast; the GPU bench uses inductor.
    n = compile_repeated_blocks(compiled.c.transformer, backend="aot_eager")
    assert n == len(compiled.c.transformer.transformer_blocks) + len(compiled.c.transformer.single_transformer_blocks)
    torch._dynamo.reset()
    counters.clear()
    first = run(compiled, flux_request(seed=1, prompt="a cube"))
    graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first == 2  # one graph per block class (double and single), shared by all blocks
    second = run(compiled, flux_request(seed=2, prompt="two dogs"))
    assert counters["stats"]["unique_graphs"] == graphs_after_first  # 3 more steps, new request: no recompile
    np.testing.assert_allclose(first, expected[0], atol=1e-5)
    np.testing.assert_allclose(second, expected[1], atol=1e-5)


def test_compile_rejects_a_model_without_blocks() -> None:
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_repeated_blocks(torch.nn.Linear(2, 2))


def test_compile_units_are_the_blocks_a_model_declares() -> None:
    from sgl_diffusion.models.flux import transformer as flux
    from sgl_diffusion.models.wan import transformer as wan
    from sgl_diffusion.runtime.compile import repeated_blocks

    class Declared(torch.nn.Module):
        _repeated_blocks = ("stack", "tail")

        def __init__(self, linears: int) -> None:
            super().__init__()
            self.stack = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(linears))
            self.tail = torch.nn.ModuleList([torch.nn.Conv1d(2, 2, 1)])  # one block alone still counts
            self.other = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))  # undeclared: left eager

    model = Declared(3)
    assert repeated_blocks(model) == [*model.stack, *model.tail]
    Declared._repeated_blocks = ("stack", "missing")
    with pytest.raises(TypeError, match="names 'missing', which is no nn.ModuleList"):
        repeated_blocks(model)
    # The native models name lists they have (a typo would fail at load time, not compile nothing).
    assert flux.FluxTransformer2DModel._repeated_blocks == ("transformer_blocks", "single_transformer_blocks")
    assert wan.WanTransformer3DModel._repeated_blocks == ("blocks",)


def test_batched_true_cfg_matches_two_forwards(flux_dir: Path) -> None:
    request = flux_request(negative_prompt="blurry", true_cfg_scale=4.0, cfg_enabled=True)
    forwards: dict[str, list[int]] = {"on": [], "off": []}
    outputs = {}
    for mode in forwards:
        pipeline = load_flux(flux_dir, cfg_batching=mode)
        pipeline.c.transformer.register_forward_hook(
            lambda module, args, kwargs, out, key=mode: forwards[key].append(kwargs["hidden_states"].shape[0]),
            with_kwargs=True,
        )
        outputs[mode] = run(pipeline, request)
    assert forwards["on"] == [2, 2, 2] and forwards["off"] == [1] * 6
    np.testing.assert_allclose(outputs["on"], outputs["off"], atol=1e-5)


def test_cfg_batching_auto_is_chosen_by_token_count() -> None:
    from sgl_diffusion.pipelines.guidance import CFG_BATCH_MAX_TOKENS, use_batched_cfg

    assert use_batched_cfg("auto", 4096 + 512) is True  # FLUX.1 1024²
    assert use_batched_cfg("auto", 17160) is True  # Wan 480p, 41 frames
    assert use_batched_cfg("auto", 32760) is False  # Wan 480p, 81 frames
    assert use_batched_cfg("auto", CFG_BATCH_MAX_TOKENS + 1) is False
    assert use_batched_cfg("on", 10**6) is True and use_batched_cfg("off", 1) is False


def test_vae_tiling_is_applied(flux_dir: Path) -> None:
    pipeline = load_flux(flux_dir, vae_tiling=True)
    vae = pipeline.c.vae
    assert vae.use_tiling
    # Force tiles at this tiny size so the tiled path really runs, and check it still decodes.
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    image = run(pipeline, flux_request(width=64, height=64))
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cfg_batching": "sometimes"}, "cfg_batching must be one of auto, on, off"),
        ({"num_profiled_timesteps": 0}, "num_profiled_timesteps must be a positive integer"),
        ({"dit_precision": "fp8"}, "dit_precision must be one of"),
        ({"turbo": True}, "unknown model options"),
    ],
)
def test_bad_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeOptions.from_config({"device": "cpu", **options})


def test_warmup_defaults_to_compile() -> None:
    assert RuntimeOptions.for_device("cpu").warmup is False
    assert RuntimeOptions.for_device("cpu", enable_torch_compile=True).warmup is True
    assert RuntimeOptions.for_device("cpu", enable_torch_compile=True, warmup=False).warmup is False


def test_api_warmup_runs_before_the_first_request(flux_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from sgl_diffusion import DiffGenerator

    with caplog.at_level("INFO", logger="sgl_diffusion.runtime.warmup"):
        gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="fp32", warmup=True)
    try:
        assert any(record.message.startswith("warm-up at") for record in caplog.records)
        result = gen.generate("a cube", height=32, width=32, num_inference_steps=2, seed=3)
        assert result.images[0].size == (32, 32)
    finally:
        gen.shutdown()


def test_warmup_is_a_request_the_core_resolves(tmp_path: Path) -> None:
    """The warm-up request is resolved by the Rust core at the model's defaults, like any request: the tiny Wan I2V
    fixture's defaults (832x480, 81 frames) are beyond its own limits (its RoPE table covers 512 pixels a side), so
    warming it up is refused at load, naming the field, instead of running a request no user could send. (The
    input image an image-to-video warm-up gets, and its guidance rules, are tested in `sgl_bridge::warmup`.)"""
    from sgl_diffusion import DiffGenerator, ModelLoadError
    from sgl_diffusion.testing import build_fixture

    folder = build_fixture("wan21_i2v", tmp_path / "wan21_i2v")
    with pytest.raises(ModelLoadError, match=r"defaults are not a valid request \(invalid `width`.*--no-warmup"):
        DiffGenerator.from_pretrained(folder, device="cpu", warmup=True)


def test_warmup_guides_as_a_default_request_does(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Qwen-Image's model card turns true CFG on by default (scale 4 against the negative prompt " "): the warm-up,
    resolved by the core, runs both branches, as a default request does; a folder with diffusers' defaults (no
    negative prompt) runs one. (A rule of its own, "classifier-free and guidance_scale > 1", ran one for both.)"""
    import shutil

    from sgl_diffusion import DiffGenerator
    from sgl_diffusion.testing import build_fixture

    model = build_fixture("qwen_image", tmp_path / "model")
    repo = tmp_path / "hub" / "models--Qwen--Qwen-Image"
    shutil.copytree(model, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    small = {"device": "cpu", "warmup": True}
    for name, with_cfg in (("Qwen/Qwen-Image", True), (str(model), False)):
        caplog.clear()
        with pytest.MonkeyPatch.context() as patch, caplog.at_level("INFO", logger="sgl_diffusion.runtime.warmup"):
            patch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
            gen = DiffGenerator.from_pretrained(name, **small)
        gen.shutdown()
        (message,) = [record.message for record in caplog.records if record.message.startswith("warm-up at")]
        assert ("with CFG" in message) == with_cfg, (name, message)


def test_api_rejects_an_unknown_speed_option(flux_dir: Path) -> None:
    from sgl_diffusion import DiffGenerator

    with pytest.raises(Exception, match="turbo"):
        DiffGenerator.from_pretrained(flux_dir, device="cpu", turbo=True)


def test_cli_compiles_with_inductor(flux_dir: Path, tmp_path: Path) -> None:
    """The real `--enable-torch-compile` path end to end (inductor's CPU backend)."""
    command = [
        sys.executable, "-m", "sgl_diffusion.cli", "generate", "--model-path", str(flux_dir),
        "--device", "cpu", "--dit-precision", "fp32", "--enable-torch-compile", "--no-warmup",
        "--prompt", "a cube", "--height", "32", "--width", "32", "--num-inference-steps", "2",
        "--output-path", str(tmp_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("*.png"))


def test_wan_decode_chunk_follows_the_slicing_option_and_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from sgl_diffusion.pipelines import wan

    clip = torch.Size((1, 16, 21, 60, 104))  # 832x480, 81 frames
    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert wan.decode_chunk(clip, 16, bf16, cpu, slicing=False) is None
    assert wan.decode_chunk(clip, 16, bf16, cpu, slicing=True) == wan.SLICED_CHUNK_FRAMES
    assert wan.decode_chunk(clip, 48, bf16, cpu, slicing=False) == wan.DECODE_CHUNK_FRAMES
    assert wan.decode_chunk(torch.Size((1, 16, 21, 90, 160)), 16, bf16, cpu, slicing=False) == wan.DECODE_CHUNK_FRAMES
    # On a GPU the whole clip needs about 24.6 GB of free memory in bf16 (twice in fp32).
    monkeypatch.setattr(wan, "available_memory", lambda device: 40e9)
    assert wan.decode_chunk(clip, 16, bf16, gpu, slicing=False) is None
    assert wan.decode_chunk(clip, 16, torch.float32, gpu, slicing=False) == wan.DECODE_CHUNK_FRAMES
    monkeypatch.setattr(wan, "available_memory", lambda device: 20e9)
    assert wan.decode_chunk(clip, 16, bf16, gpu, slicing=False) == wan.DECODE_CHUNK_FRAMES


def test_wan_vae_slicing_decodes_in_short_slices_with_the_same_result(tmp_path: Path) -> None:
    from sgl_diffusion.pipelines import wan
    from sgl_diffusion.testing import build_fixture

    folder = build_fixture("wan21_t2v", tmp_path / "wan")
    request = flux_request(
        num_frames=17, guidance_scale=5.0, cfg_enabled=True, negative_prompt="", max_sequence_length=16
    )
    videos, chunks = {}, {}
    for slicing in (False, True):
        pipeline = wan.WanPipeline.load(folder, RuntimeOptions.for_device("cpu", vae_slicing=slicing), None)
        decoder, decode = pipeline.c.decoder, pipeline.c.decoder.decode
        seen: list[int | None] = []

        def spy(latents: torch.Tensor, temporal_chunk: int | None = None, seen=seen, decode=decode) -> torch.Tensor:
            seen.append(temporal_chunk)
            return decode(latents, temporal_chunk=temporal_chunk)

        decoder.decode = spy
        videos[slicing] = pipeline.run([request], lambda step, total: [])["videos"]
        chunks[slicing] = seen
    assert chunks == {False: [None], True: [wan.SLICED_CHUNK_FRAMES]}  # 5 latent frames: sliced 4 + 1
    np.testing.assert_allclose(videos[True], videos[False], atol=1e-5)
