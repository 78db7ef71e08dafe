"""LoRA through the Python API and the CLI, on the tiny FLUX.1 fixture (CPU, fp32): `set_lora` makes the image
diffusers makes with the same file fused, `unmerge_lora` gives the base image back bit for bit, and bad adapters
are refused naming the field before the model changes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL
from lora_files import FLUX_MODULES, random_lora, save_lora
from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.flux import FluxTransformer2DModel

PROMPT = "a photo of a cat"
#: A LoRA of scale 0.3 moves the tiny model's image by much more than this (measured ~0.1); far above rounding.
LORA_EFFECT = 1e-3


@pytest.fixture(scope="module")
def engine(flux_dir: Path) -> Iterator[DiffGenerator]:
    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="module")
def lora_file(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    model = load_native_model(
        FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), torch.float32
    )
    folder = tmp_path_factory.mktemp("loras")
    return save_lora(random_lora(model, FLUX_MODULES, 4, 11, alpha=8.0, scale=0.3), folder / "style.safetensors")


def image(gen: DiffGenerator, seed: int = 5) -> np.ndarray:
    return gen.generate(PROMPT, seed=seed, output_type="np", guidance_scale=3.5, **SMALL).images[0]


def diffusers_image(flux_dir: Path, lora: Path, strength: float) -> np.ndarray:
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    settings = {**SMALL, "guidance_scale": 3.5}
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(5), output_type="np", **settings).images[0]


def test_set_unmerge_and_merge_again(engine: DiffGenerator, flux_dir: Path, lora_file: Path) -> None:
    base = image(engine)
    state = engine.set_lora("style", lora_file, strength=0.7)
    assert state == {
        "loaded_adapters": [{"nickname": "style", "path": str(lora_file)}],
        "active": {"transformer": [{"nickname": "style", "path": str(lora_file), "merged": True, "strength": 0.7}]},
    }
    styled = image(engine)
    assert np.abs(styled - base).max() > LORA_EFFECT
    assert np.abs(styled - diffusers_image(flux_dir, lora_file, 0.7)).max() <= 1e-5
    unmerged = engine.unmerge_lora()
    assert unmerged["active"]["transformer"][0]["merged"] is False
    np.testing.assert_array_equal(image(engine), base)
    engine.merge_lora()
    np.testing.assert_array_equal(image(engine), styled)
    # Re-activating the nickname without its path, at another strength, replaces the merge (from the base).
    engine.set_lora("style", strength=0.2)
    assert engine.list_loras()["active"]["transformer"][0]["strength"] == 0.2
    weaker = image(engine)
    assert np.abs(weaker - diffusers_image(flux_dir, lora_file, 0.2)).max() <= 1e-5
    engine.unmerge_lora("transformer")
    np.testing.assert_array_equal(image(engine), base)
    # 100 switches between strengths and back to the base never drift it: the base image of a fresh load.
    for cycle in range(100):
        engine.set_lora("style", strength=0.1 + cycle / 100)
        engine.unmerge_lora()
    np.testing.assert_array_equal(image(engine), base)


def test_bad_adapters_are_refused_naming_the_field_and_the_model_is_untouched(
    engine: DiffGenerator, flux_dir: Path, lora_file: Path, tmp_path: Path
) -> None:
    import torch

    engine.set_lora("style", lora_file, strength=0.4)
    before = engine.list_loras()
    styled = image(engine, seed=9)
    wrong_model = save_lora(
        {
            "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 8),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(8, 2),
        },
        tmp_path / "wan.safetensors",
    )
    cases = [
        ({"lora_nickname": "nobody"}, "lora_nickname", "no adapter is registered as `nobody`"),
        ({"lora_nickname": "x", "lora_path": str(tmp_path / "none.safetensors")}, "lora_path", "not found"),
        ({"lora_nickname": "x", "lora_path": str(flux_dir / "transformer")}, "lora_path", "not a LoRA file"),
        ({"lora_nickname": "x", "lora_path": str(wrong_model)}, "lora_path", r"blocks\.0\.attn1\.to_q\.lora_A"),
        ({"lora_nickname": "x", "lora_path": str(lora_file), "target": "transformer_2"}, "target", "no transformer_2"),
        ({"lora_nickname": "x", "lora_path": str(lora_file), "target": "critic"}, "target", "no critic"),
        ({"lora_nickname": ["a", "b"], "lora_path": str(lora_file), "strength": [1.0]}, "strength", "2 adapters"),
    ]
    for request, field, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as raised:
            engine.set_lora(**request)
        assert raised.value.field == field, (request, raised.value.field)
    # Nothing changed: the same adapters merged, the same image.
    assert {k: v for k, v in engine.list_loras().items() if k == "active"} == {"active": before["active"]}
    np.testing.assert_array_equal(image(engine, seed=9), styled)
    engine.unmerge_lora()


def test_the_cli_merges_lora_path_at_start(
    engine: DiffGenerator, lora_file: Path, flux_dir: Path, tmp_path: Path
) -> None:
    """`--lora-path` / `--lora-nickname` / `--lora-scale` (SGLang's flags) merge the adapter before the first request:
    the CLI's image is the API's after `set_lora` at that strength."""
    from PIL import Image

    from server_util import SGL_DIFFUSION

    flags = ["--height", "32", "--width", "32", "--num-inference-steps", "3", "--max-sequence-length", "32"]
    proc = subprocess.run(
        [SGL_DIFFUSION, "generate", "--model-path", str(flux_dir), "--prompt", PROMPT, "--seed", "5",
         "--guidance-scale", "3.5", "--lora-path", str(lora_file), "--lora-nickname", "style", "--lora-scale", "0.6",
         "--output-path", str(tmp_path), *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (written,) = [Path(line) for line in proc.stdout.split()]
    engine.set_lora("style", lora_file, strength=0.6)
    try:
        expected = engine.generate(PROMPT, seed=5, guidance_scale=3.5, **SMALL).images[0]
    finally:
        engine.unmerge_lora()
    np.testing.assert_array_equal(np.asarray(Image.open(written)), np.asarray(expected))
    # A nickname or scale without the adapter they describe is refused, not ignored.
    proc = subprocess.run(
        [SGL_DIFFUSION, "generate", "--model-path", str(flux_dir), "--prompt", PROMPT, "--lora-scale", "0.6", *flags],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "--lora-path" in proc.stderr, proc.stderr


def test_adapters_past_the_memory_budget_leave_and_come_back_from_their_file(flux_dir: Path, tmp_path: Path) -> None:
    import torch

    model = load_native_model(
        FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), torch.float32
    )
    files = {name: save_lora(random_lora(model, FLUX_MODULES, 4, seed, scale=0.3), tmp_path / f"{name}.safetensors")
             for name, seed in (("a", 1), ("b", 2))}  # fmt: skip
    # Room for one of these adapters (~11 kB each) at a time.
    gen = DiffGenerator.from_pretrained(
        flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32", lora_cache_gb=15e-6
    )
    try:
        gen.set_lora("a", files["a"])
        first = image(gen)
        state = gen.set_lora("b", files["b"])
        assert [entry["nickname"] for entry in state["loaded_adapters"]] == ["b"]  # a left memory
        # Both set at once: both stay (a denoiser has them set), over the budget.
        both = gen.set_lora(["a", "b"], [None, None])
        assert sorted(entry["nickname"] for entry in both["loaded_adapters"]) == ["a", "b"]
        gen.set_lora("a")  # b leaves; a, read again from its file, gives the same image
        assert [entry["nickname"] for entry in gen.list_loras()["loaded_adapters"]] == ["a"]
        np.testing.assert_array_equal(image(gen), first)
    finally:
        gen.shutdown()


def test_adapters_read_for_requests_count_against_the_memory_budget(flux_dir: Path, tmp_path: Path) -> None:
    import torch

    model = load_native_model(
        FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), torch.float32
    )
    files = {name: save_lora(random_lora(model, FLUX_MODULES, 4, seed, scale=0.3), tmp_path / f"{name}.safetensors")
             for name, seed in (("a", 1), ("b", 2), ("c", 3))}  # fmt: skip
    # Room for one of these adapters (~11 kB each) at a time.
    gen = DiffGenerator.from_pretrained(
        flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32", lora_cache_gb=15e-6
    )

    def loaded() -> list[str]:
        return sorted(entry["nickname"] for entry in gen.list_loras()["loaded_adapters"])

    def styled(nickname: str) -> np.ndarray:
        return gen.generate(PROMPT, seed=5, output_type="np", guidance_scale=3.5, lora=[{"nickname": nickname}],
                            **SMALL).images[0]  # fmt: skip

    try:
        gen.set_lora(["a", "b", "c"], [files["a"], files["b"], files["c"]])
        gen.set_lora("c")  # c stays set (merged): it never leaves memory; a and b are only registered
        gen.unmerge_lora()
        assert loaded() == ["c"]
        first = styled("a")
        assert loaded() == ["a", "c"]
        styled("b")  # a, read for the last batch, leaves: only b (and the set c) stay
        assert loaded() == ["b", "c"]
        np.testing.assert_array_equal(styled("a"), first)  # read again from its file
        assert loaded() == ["a", "c"]
    finally:
        gen.shutdown()


def test_the_diffusers_backend_refuses_lora_by_name(flux_dir: Path, lora_file: Path) -> None:
    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", backend="diffusers")
    try:
        assert gen.list_loras() == {"loaded_adapters": [], "active": {}}
        with pytest.raises(InvalidRequestError, match="diffusers backend") as raised:
            gen.set_lora("style", lora_file)
        assert raised.value.field == "lora_path"
        # Registered in Rust by the refused call, the nickname reaches the pipeline, which refuses `lora` too.
        with pytest.raises(InvalidRequestError, match="diffusers backend") as raised:
            gen.generate(PROMPT, seed=1, lora=[{"nickname": "style"}], **SMALL)
        assert raised.value.field == "lora"
    finally:
        gen.shutdown()
