"""`--vae-path fal/FLUX.2-Tiny-AutoEncoder`: FLUX.2-dev / -klein decoding (and encoding reference images) with
fal's tiny autoencoder, fp32 on CPU.

The published repository cannot be fetched here, and its remote-code module is not ours to copy, so the oracle is
a reference written in this file from the published description (fal's module: diffusers' TAESD-style
`AutoencoderTiny` with a quarter of the latent channels, a 4x4 stride-2 convolution / transposed convolution to and
from 128 channels, each followed by a residual conv-GroupNorm-SiLU-conv branch; TAESD's published layer order),
in plain `torch.nn.functional` calls over the saved tensors: independent of our model class and of diffusers'
`AutoencoderTiny`. The tiny folder is `build_flux2_tiny_autoencoder`'s, in the published layout, whose module tree
is built independently of ours too.

The latent contract (what SGLang and Modular MAX do with this checkpoint): the tiny autoencoder takes the
denoiser's latents as they are, normalised and in 2x2 patches (128 channels at 16x). So the pipeline oracle is
diffusers' own Flux2Pipeline / Flux2KleinPipeline on the same folders with its VAE replaced by the reference
presented the way those pipelines drive a VAE, with identity BatchNorm statistics (mean 0, variance 1, eps 0: exact
no-ops) so that the latents it is handed are exactly the denoiser's (2x2 unpatchify then patchify is a pure
permutation).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from sgl_diffusion import DiffGenerator, ModelLoadError
from sgl_diffusion.loading import OtherVae, load_vae
from sgl_diffusion.models.flux2.tiny_autoencoder import Flux2TinyAutoEncoder
from sgl_diffusion.testing import build_fixture
from sgl_diffusion.testing.flux2 import (
    TINY_AUTOENCODER_CONFIG,
    TINY_AUTOENCODER_WEIGHTS,
    build_flux2_tiny_autoencoder,
)

PROMPT = "a photo of a cat"
HUB_ID = "fal/FLUX.2-Tiny-AutoEncoder"
SMALL = {"height": 64, "width": 64, "max_sequence_length": 64}
CALLS: dict[str, dict[str, Any]] = {
    "flux2_dev": {**SMALL, "num_inference_steps": 3, "guidance_scale": 4.0},
    "flux2_klein": {**SMALL, "num_inference_steps": 4},
}
#: What the tiny autoencoder does to the image instead of FLUX.2's own VAE (measured far above): a misrouted
#: decode cannot hide under it.
VAE_EFFECT = 0.05
#: What a reference image (or another) does to the image (measured above 0.01 on these fixtures).
IMAGE_EFFECT = 1e-3


# --------------------------------------------------------------------------------------------------
# The reference, from the published description
# --------------------------------------------------------------------------------------------------


def _conv(state: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """A convolution with padding 1: 3x3 keeps the size (at stride 1), 4x4 at stride 2 halves it."""
    return F.conv2d(x, state[f"{name}.weight"], state.get(f"{name}.bias"), stride=stride, padding=1)


def _act(config: Mapping[str, Any], x: torch.Tensor) -> torch.Tensor:
    return {"silu": F.silu, "relu": F.relu}[config["act_fn"]](x)


def _taesd_block(state: Mapping[str, torch.Tensor], name: str, config: Mapping[str, Any], x: torch.Tensor):
    """TAESD's block: conv, act, conv, act, conv; plus the input; ReLU."""
    h = _act(config, _conv(state, f"{name}.conv.0", x))
    h = _act(config, _conv(state, f"{name}.conv.2", h))
    return F.relu(_conv(state, f"{name}.conv.4", h) + x)


def _residual_branch(state: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    h = _conv(state, f"{name}.0", x)
    h = F.group_norm(h, 8, state[f"{name}.1.weight"], state[f"{name}.1.bias"], eps=1e-5)
    return _conv(state, f"{name}.3", F.silu(h))


def reference_encode(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], pixels: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> (B, 128, H/16, W/16)."""
    x, index = (pixels + 1) / 2, 0  # TAESD works on [0, 1] images
    for level, blocks in enumerate(config["num_encoder_blocks"]):
        # Each level opens with a convolution, stride 2 after the first (bias-free there).
        x = _conv(state, f"tiny_vae.encoder.layers.{index}", x, stride=1 if level == 0 else 2)
        index += 1
        for _ in range(blocks):
            x = _taesd_block(state, f"tiny_vae.encoder.layers.{index}", config, x)
            index += 1
    inner = _conv(state, f"tiny_vae.encoder.layers.{index}", x)
    compressed = _conv(state, "extra_encoder", inner, stride=2)
    return _residual_branch(state, "residual_encoder", compressed) + compressed


def reference_decode(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], latents: torch.Tensor):
    """(B, 128, h, w) -> (B, 3, 16h, 16w), nominally in [-1, 1]."""
    weight = state["extra_decoder.weight"]
    decompressed = F.conv_transpose2d(latents, weight, state["extra_decoder.bias"], stride=2, padding=1)
    x = _residual_branch(state, "residual_decoder", decompressed) + decompressed
    x = torch.tanh(x / 3) * 3  # TAESD's soft clamp of the latents
    x = _act(config, _conv(state, "tiny_vae.decoder.layers.0", x))
    index = 2
    levels = config["num_decoder_blocks"]
    for level, blocks in enumerate(levels):
        for _ in range(blocks):
            x = _taesd_block(state, f"tiny_vae.decoder.layers.{index}", config, x)
            index += 1
        if level < len(levels) - 1:
            x = F.interpolate(x, scale_factor=config["upsampling_scaling_factor"], mode="nearest")
            index += 1
        x = _conv(state, f"tiny_vae.decoder.layers.{index}", x)
        index += 1
    return x * 2 - 1  # TAESD's [0, 1] images


class ReferenceAsFlux2Vae(torch.nn.Module):
    """The reference, driven the way diffusers' FLUX.2 pipelines drive their VAE: BatchNorm statistics that are
    exact no-ops, latents handed over unpatchified (32 channels at 8x) and taken back the same way."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.state = load_file(str(folder / TINY_AUTOENCODER_WEIGHTS))
        self.tiny_config = json.loads((folder / "config.json").read_text())
        self.bn = torch.nn.BatchNorm2d(self.tiny_config["latent_channels"], affine=False)  # mean 0, variance 1
        self.config = SimpleNamespace(block_out_channels=(0,) * 4, batch_norm_eps=0.0)  # 8x; std = sqrt(1 + 0)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self.bn.running_mean.device

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        unpatched = unpatchify(reference_encode(self.state, self.tiny_config, pixels))
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: unpatched))

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (reference_decode(self.state, self.tiny_config, patchify(latents)),)


def patchify(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_unshuffle(latents, 2)  # channel c * 4 + 2 * dy + dx, as FLUX.2 patchifies


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(latents, 2)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux2_tiny")
    folders = {name: build_fixture(name, root / name) for name in CALLS}
    folders["tiny"] = build_flux2_tiny_autoencoder(root / "tiny")
    # The Hugging Face id, from a local cache only (as the engine resolves --vae-path ids).
    repo = root / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    shutil.copytree(folders["tiny"], repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    folders["hub"] = root / "hub"
    return folders


@pytest.fixture(scope="module")
def reference_pipes(folders: dict[str, Path]) -> Iterator[dict[str, Any]]:
    from diffusers import DiffusionPipeline

    pipes = {}
    for name in CALLS:
        pipe = DiffusionPipeline.from_pretrained(folders[name])
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
    yield pipes


def reference(pipe: Any, folder: Path | None, seed: int, images: list[Path] = (), **call: Any) -> np.ndarray:
    """diffusers' pipeline on its own VAE (`folder` None) or on the reference tiny autoencoder in `folder`."""
    own = pipe.vae
    if folder is not None:
        pipe.vae = ReferenceAsFlux2Vae(folder)
    try:
        pil = [Image.open(path).convert("RGB") for path in images] or None
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt=PROMPT, image=pil, generator=generator, output_type="np", **call).images[0]
    finally:
        pipe.vae = own


def ours(model: Path, vae_path: str | Path | None, seed: int, images: list[Path] = (), **call: Any) -> np.ndarray:
    gen = DiffGenerator.from_pretrained(model, device="cpu", vae_path=None if vae_path is None else str(vae_path))
    try:
        paths = [str(path) for path in images] or None
        return gen.generate(PROMPT, seed=seed, image=paths, output_type="np", **call).images[0]
    finally:
        gen.shutdown()


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
    Image.fromarray(np.clip(gradient + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_the_fixture_has_the_published_layout(folders: dict[str, Path]) -> None:
    tiny = folders["tiny"]
    assert sorted(p.name for p in tiny.iterdir()) == ["config.json", TINY_AUTOENCODER_WEIGHTS]
    config = json.loads((tiny / "config.json").read_text())
    # The published config.json's keys and class, its remote-code pointer included.
    assert config == TINY_AUTOENCODER_CONFIG
    assert sorted(config) == sorted([
        "_class_name", "_diffusers_version", "auto_map", "act_fn", "decoder_block_out_channels",
        "encoder_block_out_channels", "force_upcast", "in_channels", "latent_channels", "latent_magnitude",
        "latent_shift", "num_decoder_blocks", "num_encoder_blocks", "out_channels", "scaling_factor",
        "upsampling_scaling_factor",
    ])  # fmt: skip
    assert config["_class_name"] == "Flux2TinyAutoEncoder" and config["latent_channels"] == 128
    keys = set(load_file(str(tiny / TINY_AUTOENCODER_WEIGHTS)))
    # The published block counts place the decoder's last convolution at layer 18, the encoder's at 14.
    for name in (
        "tiny_vae.encoder.layers.0.weight", "tiny_vae.encoder.layers.1.conv.4.bias", "tiny_vae.encoder.layers.14.bias",
        "tiny_vae.decoder.layers.0.weight", "tiny_vae.decoder.layers.6.weight", "tiny_vae.decoder.layers.18.bias",
        "extra_encoder.weight", "extra_decoder.bias", "residual_encoder.3.weight", "residual_decoder.1.bias",
    ):  # fmt: skip
        assert name in keys, name
    # Stride-2 downsampling convolutions and the inner upsampling convolutions have no bias.
    assert "tiny_vae.encoder.layers.2.bias" not in keys and "tiny_vae.decoder.layers.6.bias" not in keys
    # Our model loads exactly these names.
    assert set(Flux2TinyAutoEncoder.from_config(config).state_dict()) == keys


def test_decode_and_encode_match_the_reference(folders: dict[str, Path]) -> None:
    from diffusers import AutoencoderKLFlux2

    # Through the shared loader, as the FLUX.2 pipelines call it.
    packed = {"latent channels": 128, "spatial compression": 16, "temporal compression": 1}
    tiny = load_vae(
        AutoencoderKLFlux2,
        folders["flux2_klein"],
        folders["tiny"],
        torch.device("cpu"),
        torch.float32,
        others=(OtherVae(Flux2TinyAutoEncoder, packed),),
    )
    assert isinstance(tiny, Flux2TinyAutoEncoder)
    state = load_file(str(folders["tiny"] / TINY_AUTOENCODER_WEIGHTS))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 128, 3, 5, generator=generator)
    pixels = torch.rand(2, 3, 48, 80, generator=generator) * 2 - 1
    with torch.no_grad():
        decoded = tiny.decode(latents)
        encoded = tiny.encode(pixels)
        assert decoded.shape == (2, 3, 48, 80) and encoded.shape == (2, 128, 3, 5)
        torch.testing.assert_close(decoded, reference_decode(state, TINY_AUTOENCODER_CONFIG, latents), rtol=0, atol=0)
        torch.testing.assert_close(encoded, reference_encode(state, TINY_AUTOENCODER_CONFIG, pixels), rtol=0, atol=0)
    # The fixture's images span the range (no pixel-wide clamping) and depend on the latents.
    assert float((decoded * 0.5 + 0.5).clamp(0, 1).std()) > 0.05
    assert float((decoded[0] - decoded[1]).abs().max()) > 0.1


@pytest.mark.parametrize("name", list(CALLS))
def test_generation_decodes_the_denoiser_latents_as_the_reference_does(
    folders: dict[str, Path], reference_pipes: dict[str, Any], name: str
) -> None:
    mine = ours(folders[name], folders["tiny"], 5, **CALLS[name])
    expected = reference(reference_pipes[name], folders["tiny"], 5, **CALLS[name])
    np.testing.assert_array_equal(mine, expected)
    # Not FLUX.2's own VAE's image: the tiny autoencoder decoded it.
    own = reference(reference_pipes[name], None, 5, **CALLS[name])
    assert np.abs(mine - own).max() > VAE_EFFECT


def test_reference_images_are_encoded_by_the_tiny_autoencoder(
    folders: dict[str, Path], reference_pipes: dict[str, Any], tmp_path: Path
) -> None:
    images = [write_image(tmp_path / "wide.png", 120, 80, 1), write_image(tmp_path / "tall.png", 72, 100, 2)]
    call = {**CALLS["flux2_klein"], "height": 48, "width": 64}
    pipe = reference_pipes["flux2_klein"]
    previous = ours(folders["flux2_klein"], folders["tiny"], 3, **call)
    for count in (1, 2):
        mine = ours(folders["flux2_klein"], folders["tiny"], 3, images[:count], **call)
        np.testing.assert_array_equal(mine, reference(pipe, folders["tiny"], 3, images[:count], **call))
        assert np.abs(mine - previous).max() > IMAGE_EFFECT  # each image acts
        previous = mine


def test_the_hub_id_through_the_cli(folders: dict[str, Path], reference_pipes: dict[str, Any], tmp_path: Path) -> None:
    from sgl_diffusion.runtime.encode import to_uint8

    command = [
        shutil.which("sgl-diffusion") or "sgl-diffusion", "generate",
        "--model-path", str(folders["flux2_klein"]), "--vae-path", HUB_ID, "--prompt", PROMPT,
        "--width", "64", "--height", "64", "--num-inference-steps", "4", "--max-sequence-length", "64",
        "--seed", "5", "--device", "cpu", "--output-path", str(tmp_path), "--output-file-name", "tiny.png",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_CACHE": str(folders["hub"])}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(tmp_path / "tiny.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    expected = reference(reference_pipes["flux2_klein"], folders["tiny"], 5, **CALLS["flux2_klein"])
    np.testing.assert_array_equal(pixels, to_uint8(expected))


def test_vae_tiling_is_refused_with_the_tiny_autoencoder(folders: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match=r"--vae-tiling: the tiny autoencoder .* decodes whole images"):
        DiffGenerator.from_pretrained(
            folders["flux2_klein"], device="cpu", vae_path=str(folders["tiny"]), vae_tiling=True
        )


def save_tiny(out: Path, **config: Any) -> Path:
    """A tiny autoencoder folder with `config` changed from the fixture's (random weights of that shape)."""
    out.mkdir()
    changed = {**TINY_AUTOENCODER_CONFIG, **config}
    (out / "config.json").write_text(json.dumps(changed))
    model = Flux2TinyAutoEncoder.from_config(changed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / TINY_AUTOENCODER_WEIGHTS))
    return out


@pytest.fixture(scope="module")
def other_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("not_flux2")
    return {name: build_fixture(name, root / name) for name in ("flux1_dev", "wan21_t2v")}


#: What each VAE takes, as the errors spell it.
TINY_LATENTS = r"latent channels 128, spatial compression 16, temporal compression 1"


@pytest.mark.parametrize(
    ("name", "own", "own_latents"),
    [
        ("flux1_dev", "AutoencoderKL", "latent channels 16, spatial compression 8, temporal compression 1"),
        ("wan21_t2v", "AutoencoderKLWan", "latent channels 16, spatial compression 8, temporal compression 4"),
    ],
)
def test_the_tiny_autoencoder_is_refused_where_it_does_not_fit_naming_both(
    folders: dict[str, Path], other_models: dict[str, Path], name: str, own: str, own_latents: str
) -> None:
    tiny, model = folders["tiny"], other_models[name]
    with pytest.raises(ModelLoadError) as refused:
        DiffGenerator.from_pretrained(model, device="cpu", vae_path=str(tiny))
    text = str(refused.value)
    assert (
        f"--vae-path {tiny} is a Flux2TinyAutoEncoder, and {model}'s pipeline runs natively on a {own} "
        f"(its own VAE: {own} in {model / 'vae'}, {own_latents}); a Flux2TinyAutoEncoder ({TINY_LATENTS}) fits the "
        "FLUX.2 pipelines (FLUX.2-dev, FLUX.2-klein)"
    ) in text, text


def test_the_diffusers_backend_refuses_it_naming_both(folders: dict[str, Path]) -> None:
    tiny, model = folders["tiny"], folders["flux2_klein"]
    with pytest.raises(ModelLoadError) as refused:
        DiffGenerator.from_pretrained(model, device="cpu", vae_path=str(tiny), backend="diffusers")
    text = str(refused.value)
    assert (
        f"--vae-path {tiny} is a Flux2TinyAutoEncoder, a VAE sgl-diffusion implements itself for the FLUX.2 "
        f"pipelines (FLUX.2-dev, FLUX.2-klein); the diffusers backend runs {model} on diffusers' classes (its own "
        "VAE: AutoencoderKLFlux2): use --backend native"
    ) in text, text


def test_a_tiny_autoencoder_of_other_latents_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    # 64 latent channels at 8x (three levels): neither is what FLUX.2's denoiser makes.
    levels = {"encoder_block_out_channels": [8] * 3, "decoder_block_out_channels": [8] * 3}
    counts = {"num_encoder_blocks": [1, 1, 1], "num_decoder_blocks": [1, 1, 1]}
    misfit = save_tiny(tmp_path / "misfit", latent_channels=64, **levels, **counts)
    model = folders["flux2_klein"]
    with pytest.raises(ModelLoadError) as refused:
        DiffGenerator.from_pretrained(model, device="cpu", vae_path=str(misfit))
    assert (
        f"--vae-path {misfit} (Flux2TinyAutoEncoder) does not fit {model}'s latents: latent channels 64 (the "
        "pipeline's: 128); spatial compression 8 (the pipeline's: 16)"
    ) in str(refused.value)


def test_its_weights_file_alone_is_refused_asking_for_the_folder(folders: dict[str, Path]) -> None:
    weights, model = folders["tiny"] / TINY_AUTOENCODER_WEIGHTS, folders["flux2_klein"]
    with pytest.raises(ModelLoadError) as refused:
        DiffGenerator.from_pretrained(model, device="cpu", vae_path=str(weights))
    text = str(refused.value)
    assert f"--vae-path {weights} does not fit {model}'s VAE architecture" in text, text
    assert "a AutoencoderKLFlux2: " in text and "unexpected ['extra_decoder.bias'" in text, text
    assert (
        f"(--vae-path {weights} holds a Flux2TinyAutoEncoder's weights: give its folder, config.json included)" in text
    )
