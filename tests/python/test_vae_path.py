"""`--vae-path`: another VAE in place of the model's own, through the one shared loader (`loading/vae.py`), for the
native families (FLUX.1, Qwen-Image, Wan, HunyuanVideo) and the diffusers backend (SD3).

A VAE with other (random) weights changes the output, and the output is what diffusers gives with the same VAE passed
to `from_pretrained(vae=...)`; the VAE may be a folder, a whole model folder (its `vae/`), one safetensors file or a
Hugging Face id in the local cache. A VAE that does not fit the pipeline is a load error naming both."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, ModelLoadError
from sgl_diffusion.loading import track_vae_path
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

PROMPT = "a lighthouse at dusk"
#: Native families against diffusers with the same VAE, fp32 on CPU: the bound of their parity tests (FLUX.1 and
#: Qwen-Image are bit-equal, Wan within 1e-6, HunyuanVideo and HunyuanVideo-1.5 within 3e-6: their pipeline parity tests); the diffusers
#: backend calls the very same pipeline, so there it is equality.
NATIVE_ATOL = 1e-5
#: What the other VAE's weights do to the output (measured 0.17 to 0.94 max abs): far above the bound.
VAE_EFFECT = 0.05
#: fixture -> (diffusers pipeline class, extra request fields).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "flux1_dev": ("FluxPipeline", {}),
    "qwen_image": ("QwenImagePipeline", {"negative_prompt": "blurry"}),  # true CFG 4 needs something to guide against
    "wan21_t2v": ("WanPipeline", {}),
    "hunyuan_video_t2v": ("HunyuanVideoPipeline", {}),
    "hunyuan_video15_t2v": ("HunyuanVideo15Pipeline", {}),
    "sd3": ("StableDiffusion3Pipeline", {}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae_path")
    return {name: build_fixture(name, root / name) for name in FAMILIES}


def vae_class(folder: Path) -> type:
    import json

    import diffusers

    return getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])


def other_vae(model_dir: Path, out: Path, seed: int = 1) -> Path:
    """The model's own VAE architecture with other weights (each scaled by 1 + 0.3 N(0, 1)), saved at `out`."""
    vae = vae_class(model_dir / "vae").from_pretrained(model_dir / "vae")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vae.parameters():
            param.mul_(1 + 0.3 * torch.randn(param.shape, generator=generator))
    vae.save_pretrained(out)
    return out


def settings(name: str) -> dict[str, Any]:
    return {**FIXTURE_REGISTRY[name].call_kwargs, **FAMILIES[name][1]}


def ours(model_dir: Path, name: str, vae_path: Path | str) -> np.ndarray:
    gen = DiffGenerator.from_pretrained(model_dir, device="cpu", vae_path=str(vae_path))
    try:
        result = gen.generate(PROMPT, seed=5, output_type="np", **settings(name))
    finally:
        gen.shutdown()
    return np.stack(result.frames if result.frames else result.images)


def diffusers_output(model_dir: Path, name: str, vae_dir: Path | None) -> np.ndarray:
    import diffusers

    components = {} if vae_dir is None else {"vae": vae_class(vae_dir).from_pretrained(vae_dir)}
    pipe = getattr(diffusers, FAMILIES[name][0]).from_pretrained(model_dir, **components)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(5), output_type="np", **settings(name))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_another_vae_folder_gives_diffusers_output_with_that_vae(
    models: Mapping[str, Path], tmp_path: Path, name: str
) -> None:
    vae_dir = other_vae(models[name], tmp_path / "vae")
    got = ours(models[name], name, vae_dir)
    expected = diffusers_output(models[name], name, vae_dir)
    assert got.shape == expected.shape
    if name == "sd3":  # the diffusers backend
        np.testing.assert_array_equal(got, expected)
    else:
        assert np.abs(got - expected).max() <= NATIVE_ATOL
    own = diffusers_output(models[name], name, None)
    assert np.abs(got - own).max() > VAE_EFFECT


def test_one_safetensors_file_a_model_folder_and_a_hub_id_load_the_same_vae(
    models: Mapping[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "sd3"
    vae_dir = other_vae(models[name], tmp_path / "other_model" / "vae")
    expected = diffusers_output(models[name], name, vae_dir)
    # One file: weights only, in the model's own VAE architecture (the folder's config.json is not read).
    single = tmp_path / "vae.safetensors"
    shutil.copy(vae_dir / "diffusion_pytorch_model.safetensors", single)
    np.testing.assert_array_equal(ours(models[name], name, single), expected)
    # A whole model folder: its vae/.
    np.testing.assert_array_equal(ours(models[name], name, tmp_path / "other_model"), expected)
    # A Hugging Face id, from the local cache only.
    repo = tmp_path / "hub" / "models--someone--tiny-vae"
    shutil.copytree(vae_dir, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    np.testing.assert_array_equal(ours(models[name], name, "someone/tiny-vae"), expected)


def save_vae(out: Path, cls_name: str, **config: Any) -> Path:
    import diffusers

    getattr(diffusers, cls_name)(**config).save_pretrained(out)
    return out


SD_VAE = {"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 4}  # fmt: skip
WAN_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1, "temperal_downsample": [False, True, True]}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "vae", "message"),
    [
        # Other latent channels and another spatial compression than FLUX.1's 16 channels at 8x.
        ("flux1_dev", ("AutoencoderKL", SD_VAE), r"does not fit .*flux1_dev's VAE \(AutoencoderKL\): latent channels 4 \(the pipeline's: 16\); spatial compression 2 \(the pipeline's: 8\)"),
        # A native family runs on the VAE class it was written for.
        ("qwen_image", ("AutoencoderKLWan", WAN_VAE), r"is a AutoencoderKLWan, and .*qwen_image's pipeline runs natively on a AutoencoderKLQwenImage"),
        # The diffusers backend takes other classes, but a video VAE compresses time: SD3's latents have none.
        ("sd3", ("AutoencoderKLWan", WAN_VAE), r"does not fit .*sd3's VAE \(AutoencoderKL\): temporal compression 4 \(the pipeline's: 1\)"),
    ],
)  # fmt: skip
def test_a_vae_that_does_not_fit_is_a_load_error_naming_both(
    models: Mapping[str, Path], tmp_path: Path, name: str, vae: tuple[str, dict[str, Any]], message: str
) -> None:
    vae_dir = save_vae(tmp_path / "misfit", vae[0], **vae[1])
    with pytest.raises(ModelLoadError, match=rf"--vae-path {vae_dir} .*{message}"):
        DiffGenerator.from_pretrained(models[name], device="cpu", vae_path=str(vae_dir))


def test_a_file_that_does_not_fit_the_architecture_names_both(models: Mapping[str, Path], tmp_path: Path) -> None:
    misfit = save_vae(tmp_path / "misfit", "AutoencoderKL", **SD_VAE) / "diffusion_pytorch_model.safetensors"
    flux = models["flux1_dev"]
    with pytest.raises(ModelLoadError) as err:
        DiffGenerator.from_pretrained(flux, device="cpu", vae_path=str(misfit))
    text = str(err.value)
    assert f"--vae-path {misfit} does not fit {flux}'s VAE architecture ({flux / 'vae' / 'config.json'})" in text, text
    assert "'decoder.conv_in.weight [8, 4, 3, 3] (expected [8, 16, 3, 3])'" in text, text
    assert (
        "unexpected ['post_quant_conv.bias', 'post_quant_conv.weight', 'quant_conv.bias', 'quant_conv.weight']" in text
    )


def test_a_missing_vae_path_is_a_load_error(models: Mapping[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"--vae-path .*nowhere: no such file or folder, nor a Hugging Face id"):
        DiffGenerator.from_pretrained(models["flux1_dev"], device="cpu", vae_path=str(tmp_path / "nowhere"))


def test_a_pipeline_that_ignored_the_vae_path_would_be_an_error() -> None:
    # The registry wraps every load in this check: a family loading its VAE some other way cannot drop the option.
    refused = pytest.raises(ValueError, match=r"--vae-path v: SomePipeline does not load its VAE through the shared")
    with refused, track_vae_path(Path("v"), "SomePipeline"):
        pass
    with track_vae_path(None, "SomePipeline"):
        pass
