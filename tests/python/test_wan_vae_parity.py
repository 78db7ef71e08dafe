"""Our whole-clip Wan VAE decoder against diffusers' frame-by-frame `AutoencoderKLWan.decode`.

Tiny fixtures of both VAE families (Wan2.1 z16, Wan2.2 TI2V-5B z48 with residual up blocks, DupUp3D
and patch 2), random latents of 1, 2, 5 and 9 latent frames (1, 5, 17, 33 video frames): the frame
rules of diffusers' causal caches (first frame not time-upsampled, DupUp3D's first chunk) only show
with several frames. CPU, fp32.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sgl_diffusion.layers.fused import fused_kernels_enabled, set_fused_kernels
from sgl_diffusion.models.wan import vae as vae_module
from sgl_diffusion.models.wan.vae import WanVAEDecoder, _DupUp3D
from sgl_diffusion.testing import build_fixture, seeded_component

CASES = ["wan21_t2v", "wan22_ti2v_5b"]
LATENT_FRAMES = [1, 2, 5, 9]
# Small latents keep the CPU reference fast; the decoder has no spatial constraints.
LATENT_HW = (2, 3)
# Observed ~1e-6 (float rounding of whole-clip vs per-frame convolutions); 1e-5 leaves room for other BLAS.
ATOL = 1e-5


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan_vae")
    return {name: build_fixture(name, root / name) / "vae" for name in CASES}


@pytest.fixture(scope="module")
def diffusers_vaes(vae_dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKLWan

    return {name: AutoencoderKLWan.from_pretrained(folder).eval() for name, folder in vae_dirs.items()}


@pytest.fixture(scope="module")
def references(diffusers_vaes: dict[str, torch.nn.Module]) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(latents, diffusers' decode) per fixture and latent frame count, computed once."""
    out = {}
    for name, vae in diffusers_vaes.items():
        for frames in LATENT_FRAMES:
            gen = torch.Generator().manual_seed(100 + frames)
            z = torch.randn(1, vae.config.z_dim, frames, *LATENT_HW, generator=gen)
            with torch.no_grad():
                out[name, frames] = z, vae.decode(z, return_dict=False)[0]
    return out


@pytest.mark.parametrize("frames", LATENT_FRAMES)
@pytest.mark.parametrize("name", CASES)
def test_decode_matches_diffusers(
    name: str, frames: int, vae_dirs: dict[str, Path], diffusers_vaes: dict, references: dict
) -> None:
    z, expected = references[name, frames]
    assert expected.shape[2] == 1 + 4 * (frames - 1)
    shared = WanVAEDecoder.from_diffusers(diffusers_vaes[name])
    loaded = WanVAEDecoder.from_pretrained(vae_dirs[name])
    # `shared` runs the defaults here (sub-pixel upsampling, one padded conv per causal conv); `loaded`
    # diffusers' nearest upsampling and the GPU's sliced causal convs (each slice copied in on CPU).
    loaded.upsample_mode, loaded.direct_conv_output = "nearest", True
    for ours in (shared, loaded):
        got = ours.decode(z)
        assert got.shape == expected.shape and got.dtype == expected.dtype and got.is_contiguous()
        err = (got - expected).abs().max().item()
        print(f"{name} T={frames} {ours.upsample_mode} sliced={ours.uses_direct_conv_output()}: max abs {err:.2e}")
        assert err <= ATOL, f"{ours.upsample_mode}: {err}"


@pytest.mark.parametrize("name", CASES)
def test_from_diffusers_shares_the_decoder_tensors(name: str, diffusers_vaes: dict) -> None:
    vae = diffusers_vaes[name]
    ours = WanVAEDecoder.from_diffusers(vae)
    theirs = dict(vae.named_parameters())
    names = [n for n in theirs if n.startswith(("decoder.", "post_quant_conv."))]
    assert sorted(n for n, _ in ours.named_parameters()) == sorted(names)
    flags = {n: p.requires_grad for n, p in theirs.items()}
    for n, p in ours.named_parameters():
        assert p is theirs[n], n  # the same Parameter objects: no copy, in-place updates are shared
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == flags


def test_loading_is_strict_on_decoder_keys(vae_dirs: dict[str, Path], tmp_path: Path) -> None:
    src = vae_dirs["wan21_t2v"]
    (weights,) = src.glob("*.safetensors")
    state = load_file(weights)
    assert any(k.startswith("encoder.") for k in state) and "quant_conv.weight" in state  # ignored on load
    state.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.weight")
    broken = tmp_path / "vae"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    save_file(state, broken / weights.name)
    with pytest.raises(ValueError, match="conv_shortcut"):
        WanVAEDecoder.from_pretrained(broken)


@pytest.mark.parametrize("name", CASES)
def test_temporal_chunks_equal_whole_clip(name: str, diffusers_vaes: dict, references: dict) -> None:
    z, expected = references[name, 5]
    ours = WanVAEDecoder.from_diffusers(diffusers_vaes[name])
    # Every latent frame its own chunk (the context comes from the previous chunk only).
    got = ours.decode(z, temporal_chunk=1)
    assert (got - expected).abs().max().item() <= ATOL
    # Uneven chunks (3 + 2), in a batch of two whose second sample is decoded on its own.
    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    got = ours.decode(torch.cat([z, other]), temporal_chunk=3)
    assert got.shape == (2, *expected.shape[1:])
    assert (got[:1] - expected).abs().max().item() <= ATOL
    # Not bitwise: convolutions of other shapes round differently.
    assert (got[1:] - ours.decode(other)).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", CASES)
def test_time_segmented_convs_equal_whole_clip(name: str, diffusers_vaes: dict, references: dict) -> None:
    # Convolutions over more than `max_conv_numel` elements run in time segments (cuDNN's 32-bit limit);
    # also the sliced causal convs with chunk context (`prev`), the GPU's default form.
    z, expected = references[name, 2]
    ours = WanVAEDecoder.from_diffusers(diffusers_vaes[name])
    ours.max_conv_numel = 4000  # a few frames per segment at every level
    for sliced in (False, True):
        ours.direct_conv_output = sliced
        assert (ours.decode(z) - expected).abs().max().item() <= ATOL
        assert (ours.decode(z, temporal_chunk=1) - expected).abs().max().item() <= ATOL


def _custom_vae(**config: object) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan

    return seeded_component(3, lambda: AutoencoderKLWan(**config))


@pytest.mark.parametrize(
    "config",
    [
        # Wan2.1 layout with widening blocks: halved resample outputs and a conv_shortcut.
        {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1},
        # Wan2.2 layout with a decoder width of its own: DupUp3D 16 -> 8 channels (two input channels
        # per output channel) and 16 -> 16 with a time factor.
        {
            "base_dim": 8,
            "decoder_base_dim": 4,
            "z_dim": 48,
            "in_channels": 12,
            "out_channels": 12,
            "is_residual": True,
            "patch_size": 2,
            "dim_mult": [1, 2, 4, 4],
            "num_res_blocks": 1,
            "scale_factor_spatial": 16,
        },
    ],
    ids=["z16_dim_mult_1244", "z48_dim_mult_1244"],
)
def test_non_uniform_widths_match_diffusers(config: dict) -> None:
    vae = _custom_vae(**config).eval()
    z = torch.randn(1, vae.config.z_dim, 3, *LATENT_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = vae.decode(z, return_dict=False)[0]
    ours = WanVAEDecoder.from_diffusers(vae)
    assert (ours.decode(z) - expected).abs().max().item() <= ATOL
    assert (ours.decode(z, temporal_chunk=2) - expected).abs().max().item() <= ATOL


# (16, 8, 3, 2): 6 repeats do not split the (3, 2, 2) phase digits, and (8, 16): fewer input than output
# channels; both take the materialised path.
@pytest.mark.parametrize(
    ("ci", "co", "ft", "fs"),
    [(8, 8, 2, 2), (8, 8, 1, 2), (16, 8, 1, 2), (16, 8, 2, 2), (32, 8, 1, 2), (16, 8, 3, 2), (8, 16, 2, 2)],
)
@pytest.mark.parametrize("first", [True, False])
def test_dupup3d_matches_diffusers(ci: int, co: int, ft: int, fs: int, first: bool) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_wan import DupUp3D

    gen = torch.Generator().manual_seed(ci + co + ft)
    x = torch.randn(1, ci, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    expected = DupUp3D(ci, co, ft, fs)(x, first_chunk=first)
    base = torch.randn(expected.shape, generator=gen).contiguous(memory_format=torch.channels_last_3d)
    got = _DupUp3D(ci, co, ft, fs).add_to(base.clone(), x, first_chunk=first)
    torch.testing.assert_close(got, base + expected, rtol=0, atol=0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / mse) if mse > 0 else math.inf  # video range [-1, 1]: peak-to-peak 2


@pytest.mark.parametrize("name", CASES)
def test_bf16_runs_close_to_fp32(name: str, vae_dirs: dict[str, Path], references: dict) -> None:
    z, expected = references[name, 5]
    ours = WanVAEDecoder.from_pretrained(vae_dirs[name], dtype=torch.bfloat16)
    got = ours.decode(z)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.isfinite(got).all()
    psnr = _psnr(got, expected)
    print(f"{name} bf16 vs diffusers fp32: PSNR {psnr:.1f} dB, max abs {(got.float() - expected).abs().max():.3f}")
    assert psnr > 30


def test_triton_row_kernel_in_interpreter(vae_dirs: dict[str, Path]) -> None:
    """The decoder's wiring of the fused row kernel (``sgl_diffusion_kernels.vae_rows``, the CUDA path)
    against the kernel's torch reference (the CPU path), the kernel run by Triton's CPU interpreter.
    The kernel itself is tested in tests/python/test_kernels.py."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import sys, torch
        from sgl_diffusion.models.wan.vae import WanVAEDecoder
        ours = WanVAEDecoder.from_pretrained(sys.argv[1])  # interpreting is slow: one small decode
        z = torch.randn(1, ours.config.z_dim, 2, 1, 2, generator=torch.Generator().manual_seed(0))
        assert not ours.uses_fused_kernels()  # by default only on CUDA
        want = ours.decode(z)
        ours.fused_kernels = True
        assert ours.uses_fused_kernels()
        got = ours.decode(z, temporal_chunk=1)
        err = (got - want).abs().max().item()
        assert err <= 1e-5, err
        """
    )
    root = Path(__file__).parents[2]
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join(str(root / d) for d in ("python", "kernels")),
    }
    # The residual (Wan2.2) decoder: norms with and without bias, residual sums, DupUp3D shortcuts.
    folder = str(vae_dirs["wan22_ti2v_5b"])
    cmd = [sys.executable, "-c", script, folder]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", CASES)
def test_decode_without_the_kernels_package(
    name: str, diffusers_vaes: dict, references: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without sgl_diffusion_kernels the decoder runs its own torch expression of the row op.
    monkeypatch.setattr(vae_module, "_vae_rows_mod", None)
    z, expected = references[name, 5]
    ours = WanVAEDecoder.from_diffusers(diffusers_vaes[name])
    assert not ours.uses_fused_kernels()
    assert (ours.decode(z) - expected).abs().max().item() <= ATOL
    ours.fused_kernels = True
    with pytest.raises(RuntimeError, match="needs sgl-diffusion-kernels"):
        ours.uses_fused_kernels()


def test_row_kernel_dispatch(
    diffusers_vaes: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``fused_kernels=None`` takes the kernel only on CUDA, with the engine's switch on, outside
    torch.compile, and with the package installed (else one WARNING); ``True`` / ``False`` force."""
    ours = WanVAEDecoder.from_diffusers(diffusers_vaes["wan21_t2v"])
    assert not ours.uses_fused_kernels()  # CPU
    ours.fused_kernels = False
    assert not ours.uses_fused_kernels()
    monkeypatch.setattr(WanVAEDecoder, "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(vae_module, "_kernel_installed", lambda: True)
    assert not ours.uses_fused_kernels()
    ours.fused_kernels = None
    before = fused_kernels_enabled()
    try:
        set_fused_kernels(True)
        assert ours.uses_fused_kernels()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not ours.uses_fused_kernels()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
        set_fused_kernels(False)
        assert not ours.uses_fused_kernels()
        ours.fused_kernels = True  # forced, whatever the switch
        assert ours.uses_fused_kernels()
        ours.fused_kernels = None
        set_fused_kernels(True)
        monkeypatch.setattr(vae_module, "_kernel_installed", lambda: False)
        monkeypatch.setattr(vae_module, "_vae_rows_mod", None)
        monkeypatch.setattr(vae_module, "_warned_missing", False)
        with caplog.at_level(logging.WARNING, logger=vae_module.__name__):
            assert not ours.uses_fused_kernels()
            assert not ours.uses_fused_kernels()
    finally:
        set_fused_kernels(before)
    missing = "sgl-diffusion-kernels (pip install ./kernels) is not installed"
    message = f"Wan VAE: the fused row kernel is unavailable ({missing}): using torch ops"
    assert [r.getMessage() for r in caplog.records] == [message]
