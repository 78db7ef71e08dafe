"""The fused Triton kernels (``kernels/sgl_diffusion_kernels``) against their torch references, and the
engine's dispatch layer (``sgl_diffusion.layers.fused``).

Without CUDA the kernels run in Triton's interpreter (numpy on the CPU, tiny shapes); with CUDA the same
tests run the compiled kernels on the GPU, plus :func:`test_cuda_full_size` at FLUX / Wan sizes and
:func:`test_cuda_vae_rows_full_size` at the Wan VAE decoder's sizes.

Triton chooses between interpreting and compiling when it is *first imported* (it decorates its own
``tl.sum`` & co. then), so ``TRITON_INTERPRET=1`` is set here before this module imports anything that
imports triton. When an earlier test module already imported it (``import diffusers`` does, through
``torch._dynamo``), the interpreter cannot work in this process: the kernel tests then skip here and
:func:`test_interpreter_in_fresh_process` runs this file again in a fresh interpreter.

Tolerances (kernel vs reference; the kernels compute in float32 and round once):

* float32 outputs: rtol = atol = 1e-5 (reduction order and ``rsqrt`` only);
* bf16 / fp16 outputs of ``norm_modulate`` and ``gated_residual``: one ulp of the output dtype
  (rtol 2**-7 / 2**-10), since both sides round float32 values that differ only by reduction order;
* bf16 / fp16 ``qk_norm_rope``: the reference rounds the normalised q/k before rotating, which moves an
  output by up to half an ulp of its *pair's* magnitude (sqrt(a^2 + b^2)), so the bound is one ulp of
  the element plus one ulp of the pair magnitude;
* against a float64 evaluation the kernels are within one ulp (half from the rounding, plus float32
  noise) -- the "one rounding" claim.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Before anything imports triton (see the module docstring).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_diffusion_kernels import block_sparse_attention as bsa
from sgl_diffusion_kernels import gated_residual as gr
from sgl_diffusion_kernels import norm_modulate as nm
from sgl_diffusion_kernels import qk_norm_rope as qr
from sgl_diffusion_kernels import triton_available
from sgl_diffusion_kernels import vae_rows as vr

from cuda_timing import cuda_ms
from sgl_diffusion.layers import fused
from sgl_diffusion.layers.rotary import apply_interleaved_rotary

REPO = Path(__file__).resolve().parents[2]
DEVICE = "cuda" if CUDA else "cpu"


def _interpreter_active() -> bool:
    from triton.language import sum as tl_sum
    from triton.runtime import JITFunction

    return not isinstance(tl_sum, JITFunction)


#: Whether the kernels can run in this process (compiled on CUDA, or interpreted on the CPU).
KERNELS_RUN = triton_available() and (CUDA or _interpreter_active())
#: Triton is installed but was imported before TRITON_INTERPRET=1 could take effect.
NEEDS_FRESH_PROCESS = triton_available() and not KERNELS_RUN

needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN,
    reason="no triton"
    if not triton_available()
    else "triton was imported before TRITON_INTERPRET=1; test_interpreter_in_fresh_process runs these",
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed)) * std).to(device=DEVICE, dtype=dtype)


def assert_one_rounding_apart(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one rounding of the output dtype (see the module docstring)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[got.dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=1e-5)


def assert_within_one_ulp_of(got: torch.Tensor, truth: torch.Tensor) -> None:
    """``got`` is ``truth`` (float64) correctly rounded to ``got.dtype``, up to float32 noise."""
    err = (got.double() - truth).abs()
    bound = TOL[got.dtype] * truth.abs() + 1e-5
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


# --------------------------------------------------------------------------------------------------
# norm_modulate
# --------------------------------------------------------------------------------------------------


def _modulation(kind: str, batch: int, seq: int, dim: int, dtype: torch.dtype, seed: int):
    """(shift, scale) as the models hold them."""
    if kind == "sample_view":  # Wan: float32 views from .unbind(2) of (B, 1, 6, D): strides (6D, 6D, 1)
        mods = _randn(batch, 1, 6, dim, seed=seed, std=0.5)
        return mods[:, :, 0], mods[:, :, 1]
    if kind == "sample_chunk":  # FLUX: (B, D) chunks of (B, 6D) in the activation dtype, as [:, None]
        mods = _randn(batch, 6 * dim, dtype=dtype, seed=seed, std=0.5).chunk(6, dim=1)
        return mods[0][:, None], mods[1][:, None]
    if kind == "token_view":  # Wan2.2 TI2V: per-token (B, S, 6, D) float32 -> (B, S, D) views
        mods = _randn(batch, seq, 6, dim, seed=seed, std=0.5).unbind(2)
        return mods[3], mods[4]
    # per token, contiguous
    return _randn(batch, seq, dim, dtype=dtype, seed=seed, std=0.5), _randn(
        batch, seq, dim, dtype=dtype, seed=seed + 1, std=0.5
    )


def _norm_params(norm: str, dim: int, affine: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not affine:
        return None, None
    weight = 1 + _randn(dim, seed=7, std=0.2)
    return weight, (_randn(dim, seed=8, std=0.2) if norm == "layer" else None)


def _norm_modulate_float64(x, shift, scale, norm, eps, weight, bias) -> torch.Tensor:
    x = x.double()
    if norm == "layer":
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    else:
        y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y * (1 + scale.double()) + shift.double()


@needs_kernels
@pytest.mark.parametrize("dim", [96, 200])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_norm_modulate_matches_reference(dtype: torch.dtype, norm: str, dim: int) -> None:
    batch, seq, eps = 2, 3, 1e-6
    # Offset rows check that the mean is subtracted (LayerNorm) in float32 before squaring.
    x = _randn(batch, seq, dim, dtype=dtype, seed=1, std=2.0) + 3
    cases = [("sample_view", False), ("sample_chunk", True), ("token_view", True), ("token", False)]
    for seed, (kind, affine) in enumerate(cases):
        shift, scale = _modulation(kind, batch, seq, dim, dtype, seed=10 + seed)
        weight, bias = _norm_params(norm, dim, affine)
        args = {"norm": norm, "eps": eps, "weight": weight, "bias": bias}
        got = nm.norm_modulate(x, shift, scale, **args)
        assert got.is_contiguous()
        assert_one_rounding_apart(got, nm.norm_modulate_reference(x, shift, scale, **args))
        assert_within_one_ulp_of(got, _norm_modulate_float64(x, shift, scale, norm, eps, weight, bias))


@needs_kernels
def test_norm_modulate_strided_x_and_fp16() -> None:
    # FLUX's final norm reads the image tokens of the joint sequence: a token slice, not contiguous.
    joint = _randn(2, 5, 64, dtype=torch.float16, seed=3)
    x = joint[:, 2:]
    shift, scale = _modulation("sample_chunk", 2, 3, 64, torch.float16, seed=4)
    got = nm.norm_modulate(x, shift, scale, norm="layer", eps=1e-6)
    assert_one_rounding_apart(got, nm.norm_modulate_reference(x, shift, scale, norm="layer", eps=1e-6))


# --------------------------------------------------------------------------------------------------
# gated_residual
# --------------------------------------------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("gate_kind", ["sample_view", "token"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=["bf16", "fp32", "fp16"])
def test_gated_residual_matches_reference(dtype: torch.dtype, gate_kind: str) -> None:
    batch, seq, dim = 2, 3, 200
    x = _randn(batch, seq, dim, dtype=dtype, seed=1, std=4.0)
    y = _randn(batch, seq, dim, dtype=dtype, seed=2)
    gate, _ = _modulation(gate_kind, batch, seq, dim, dtype, seed=3)
    got = gr.gated_residual(x, y, gate)
    assert_one_rounding_apart(got, gr.gated_residual_reference(x, y, gate))
    assert_within_one_ulp_of(got, x.double() + y.double() * gate.double())


# --------------------------------------------------------------------------------------------------
# qk_norm_rope
# --------------------------------------------------------------------------------------------------


def _rope_tables(seq: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(seq, head_dim // 2, generator=_gen(5), dtype=torch.float64) * 50
    return (
        angles.cos().repeat_interleave(2, dim=1).float().to(DEVICE),
        angles.sin().repeat_interleave(2, dim=1).float().to(DEVICE),
    )


def assert_rope_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """One ulp of the element plus (for the reference's extra rounding) one ulp of its pair's magnitude."""
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = TOL[got.dtype]
    w = want.double()
    pair = w.unflatten(-1, (-1, 2)).norm(dim=-1).repeat_interleave(2, dim=-1)
    err = (got.double() - w).abs()
    bound = tol * (w.abs() + pair) + 1e-5
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@needs_kernels
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "norm_only"])
@pytest.mark.parametrize("norm_over", ["head", "all"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_qk_norm_rope_matches_reference(dtype: torch.dtype, norm_over: str, rope: bool) -> None:
    batch, seq, heads, head_dim, eps = 2, 3, 3, 20, 1e-6
    # q of a packed qkv projection: a (B, S, H, Dh) view with a token stride of 3 * H * Dh.
    qkv = _randn(batch, seq, 3 * heads * head_dim, dtype=dtype, seed=1, std=3.0)
    x = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
    width = head_dim if norm_over == "head" else heads * head_dim
    weight = (1 + _randn(width, seed=2, std=0.2)).to(dtype)
    cos, sin = _rope_tables(seq, head_dim) if rope else (None, None)
    args = {"eps": eps, "norm_over": norm_over}
    got = qr.qk_norm_rope(x, weight, cos, sin, **args)
    assert got.is_contiguous() and got.shape == x.shape
    assert_rope_close(got, qr.qk_norm_rope_reference(x, weight, cos, sin, **args))

    # Truth in float64: norm, weight, rotation.
    xd = x.double().flatten(-2) if norm_over == "all" else x.double()
    normed = (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).reshape(x.shape)
    if rope:
        a, b = normed.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos.double()[None, :, None, 0::2], sin.double()[None, :, None, 0::2]
        normed = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    assert_within_one_ulp_of(got, normed)


@needs_kernels
def test_qk_norm_rope_writes_into_slices_of_a_joint_tensor() -> None:
    # FLUX joint attention: text and image q get their own norm weights and their rows of the tables,
    # written straight into the [text, image] tensor.
    batch, n_txt, n_img, heads, head_dim = 2, 2, 3, 2, 8
    txt = _randn(batch, n_txt, heads, head_dim, dtype=torch.bfloat16, seed=1)
    img = _randn(batch, n_img, heads, head_dim, dtype=torch.bfloat16, seed=2)
    w_txt, w_img = (_randn(head_dim, seed=s).to(torch.bfloat16) for s in (3, 4))
    cos, sin = _rope_tables(n_txt + n_img, head_dim)
    joint = torch.full((batch, n_txt + n_img, heads, head_dim), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    args = {"eps": 1e-6, "norm_over": "head"}
    assert qr.qk_norm_rope(txt, w_txt, cos[:n_txt], sin[:n_txt], out=joint[:, :n_txt], **args).data_ptr() == (
        joint.data_ptr()
    )
    qr.qk_norm_rope(img, w_img, cos[n_txt:], sin[n_txt:], out=joint[:, n_txt:], **args)
    want = torch.cat(
        (
            qr.qk_norm_rope_reference(txt, w_txt, None, None, **args),
            qr.qk_norm_rope_reference(img, w_img, None, None, **args),
        ),
        dim=1,
    )
    assert_rope_close(joint, apply_interleaved_rotary(want, cos, sin))


# --------------------------------------------------------------------------------------------------
# vae_rows (the Wan VAE decoder's bias + residual + channel RMS norm + SiLU)
# --------------------------------------------------------------------------------------------------

#: The flag combinations the decoder uses (norm1 + SiLU, conv1 bias + norm2 + SiLU, attention norm,
#: conv_in bias, conv2 bias + residual), and all / none.
VAE_ROWS_CASES = [
    ("weight", "silu"),
    ("weight", "bias", "silu"),
    ("weight",),
    ("bias",),
    ("bias", "residual"),
    ("weight", "bias", "residual", "silu"),
    (),
]


def _vae_rows_args(flags: tuple[str, ...], x: torch.Tensor, seed: int) -> dict:
    c = x.shape[-1]
    args: dict = {"silu": "silu" in flags}
    if "weight" in flags:  # the decoder's gamma has the activation dtype
        args["weight"] = (0.5 + torch.rand(c, generator=_gen(seed))).to(DEVICE, x.dtype)
    if "bias" in flags:  # summed conv biases arrive in float32
        args["bias"] = _randn(c, seed=seed + 1, std=0.5)
    if "residual" in flags:
        args["residual"] = _randn(*x.shape, dtype=x.dtype, seed=seed + 2)
    return args


def _vae_rows_float64(x, *, weight=None, bias=None, residual=None, silu=False, eps=vr.NORM_EPS) -> torch.Tensor:
    y = x.double()
    if bias is not None:
        y = y + bias.double()
    if residual is not None:
        y = y + residual.double()
    if weight is not None:
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(eps) * x.shape[-1] ** 0.5 * weight.double()
    return torch.nn.functional.silu(y) if silu else y


@needs_kernels
@pytest.mark.parametrize("channels", [3, 45, 96, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vae_rows_matches_reference(dtype: torch.dtype, channels: int) -> None:
    # (1, T, H, W, C) rows, as the decoder's channels-last-3d activations view them; 30 rows leave a
    # partial block of rows at every channel count. One all-zero row: the norm's clamp keeps it zero.
    x = _randn(1, 2, 3, 5, channels, dtype=dtype, seed=1, std=2.0)
    x[0, 1, 2, 4] = 0
    for seed, flags in enumerate(VAE_ROWS_CASES):
        args = _vae_rows_args(flags, x, seed=10 * seed)
        got = vr.vae_rows(x, **args)
        assert got.is_contiguous() and got.shape == x.shape
        assert_one_rounding_apart(got, vr.vae_rows_reference(x, **args))
        assert_within_one_ulp_of(got, _vae_rows_float64(x, **args))
        if flags == ("weight",):
            assert not got[0, 1, 2, 4].any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vae_rows_in_place_on_a_channels_last_activation(dtype: torch.dtype) -> None:
    # What the decoder does: a (1, C, T, H, W) channels-last-3d activation, its (1, T, H, W, C) row view
    # written in place (out=x), and a residual that is a non-contiguous view (copied by the launcher).
    act = _randn(1, 24, 3, 4, 5, dtype=dtype, seed=1).contiguous(memory_format=torch.channels_last_3d)
    rows = act.permute(0, 2, 3, 4, 1)
    assert rows.is_contiguous()
    wide = _randn(1, 3, 4, 5, 48, dtype=dtype, seed=2)
    args = _vae_rows_args(("weight", "bias", "silu"), rows, seed=3)
    args["residual"] = wide[..., ::2]
    want = vr.vae_rows_reference(rows, **args)
    assert vr.vae_rows(rows, out=rows, **args).data_ptr() == act.data_ptr()
    assert_one_rounding_apart(rows, want)
    # The reference writes in place the same way.
    again = act.clone(memory_format=torch.channels_last_3d).permute(0, 2, 3, 4, 1)
    vr.vae_rows_reference(again, out=again, silu=True)
    assert_one_rounding_apart(vr.vae_rows(rows, silu=True), again)


def test_vae_rows_bad_arguments_are_rejected() -> None:
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        vr.vae_rows_reference(x, weight=torch.ones(4))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        vr.vae_rows_reference(x, residual=x[:1])
    with pytest.raises(ValueError, match="out must match x"):
        vr.vae_rows_reference(x, out=x.to(torch.bfloat16))
    if triton_available():
        with pytest.raises(ValueError, match="out must be contiguous"):
            vr.vae_rows(x, out=torch.zeros(2, 8, 3).transpose(1, 2))
    if NEEDS_FRESH_PROCESS:
        with pytest.raises(ValueError, match="compiled Triton kernels take CUDA tensors"):
            vr.vae_rows(x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_vae_fallback_is_close_to_the_reference(dtype: torch.dtype) -> None:
    # Without the kernels package the decoder runs its own torch expression (in the activation dtype,
    # F.rms_norm with an eps matching the clamp); it must stay the same function as the reference.
    from sgl_diffusion.models.wan import vae

    act = (torch.randn(1, 24, 3, 4, 5, generator=_gen(1)) * 2).to(dtype)
    act = act.contiguous(memory_format=torch.channels_last_3d)
    act[0, :, 1, 2, 3] = 0  # an all-zero position stays zero on both sides
    residual = torch.randn(act.shape, generator=_gen(2)).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    gamma = (0.5 + torch.rand(24, generator=_gen(3))).to(dtype)
    bias = torch.randn(24, generator=_gen(4)) * 0.5
    # bf16: the fallback rounds after each of its (up to four) ops, the reference once.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-5, "atol": 2**-6}
    for flags in VAE_ROWS_CASES:
        kw = {
            "gamma": gamma if "weight" in flags else None,
            "bias": bias if "bias" in flags else None,
            "residual": residual if "residual" in flags else None,
            "silu": "silu" in flags,
        }
        got = vae._rows_torch(act, False, **kw)
        rows = act.permute(0, 2, 3, 4, 1)
        res = None if kw["residual"] is None else residual.permute(0, 2, 3, 4, 1)
        want = vr.vae_rows_reference(rows, weight=kw["gamma"], bias=kw["bias"], residual=res, silu=kw["silu"])
        torch.testing.assert_close(got.permute(0, 2, 3, 4, 1), want, **tol)


# --------------------------------------------------------------------------------------------------
# Argument checks (no launch needed)
# --------------------------------------------------------------------------------------------------


def test_bad_arguments_are_rejected() -> None:
    x = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="norm must be one of"):
        nm.norm_modulate_reference(x, x, x, norm="group", eps=1e-6)
    with pytest.raises(ValueError, match="precision must be one of"):
        gr.gated_residual_reference(x, x, x, precision="fp64")
    with pytest.raises(ValueError, match=r"weight must be \(8,\)"):
        qr.qk_norm_rope_reference(x[..., None, :], torch.ones(4), None, None, eps=1e-6, norm_over="head")
    with pytest.raises(ValueError, match="both cos and sin"):
        qr.qk_norm_rope_reference(x[..., None, :], torch.ones(8), torch.ones(3, 8), None, eps=1e-6, norm_over="all")
    if triton_available():
        with pytest.raises(ValueError, match="must have 3 dims"):
            gr.gated_residual(x, x, x[:, 0])  # a (B, D) gate would silently broadcast as (1, B, D)
        with pytest.raises(ValueError, match=r"\(batch, seq, dim\)"):
            nm.norm_modulate(x[0], x, x, norm="layer", eps=1e-6)
    if NEEDS_FRESH_PROCESS:  # compiled kernels, CPU tensors: a clear error instead of Triton's
        with pytest.raises(ValueError, match="compiled Triton kernels take CUDA tensors"):
            gr.gated_residual(x, x, x)


# --------------------------------------------------------------------------------------------------
# The references reproduce the model code bit for bit (what the CPU parity tests rely on)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_references_are_the_model_arithmetic(dtype: torch.dtype) -> None:
    x = torch.randn(2, 4, 32, generator=_gen(1)).to(dtype)
    y = torch.randn(2, 4, 32, generator=_gen(2)).to(dtype)
    # Wan: float32 LayerNorm + modulation from float32 tables, residual upcast, all cast back once.
    shift, scale, gate = (torch.randn(2, 1, 3, 32, generator=_gen(3)) * 0.5).unbind(2)
    layer_norm32 = torch.nn.functional.layer_norm(x.float(), (32,), None, None, 1e-6)
    wan_modulated = (layer_norm32 * (1 + scale) + shift).type_as(x)
    got = nm.norm_modulate_reference(x, shift, scale, norm="layer", eps=1e-6)
    assert torch.equal(got, wan_modulated)
    assert torch.equal(gr.gated_residual_reference(x, y, gate), (x.float() + y * gate).type_as(x))
    # FLUX: every op in the activation dtype, (B, D) modulation broadcast over tokens.
    f_shift, f_scale, f_gate = (torch.randn(2, 96, generator=_gen(4)) * 0.5).to(dtype).chunk(3, dim=1)
    flux_modulated = torch.nn.functional.layer_norm(x, (32,), eps=1e-6) * (1 + f_scale[:, None]) + f_shift[:, None]
    got = nm.norm_modulate_reference(x, f_shift[:, None], f_scale[:, None], norm="layer", eps=1e-6, precision="input")
    assert torch.equal(got, flux_modulated)
    got = gr.gated_residual_reference(x, y, f_gate[:, None], precision="input")
    assert torch.equal(got, x + f_gate[:, None] * y)
    # q/k: F.rms_norm in the input dtype, then the rotation of layers/rotary.py.
    q = x.unflatten(-1, (2, 16))
    cos, sin = (torch.rand(4, 8, generator=_gen(seed)).repeat_interleave(2, dim=1) for seed in (5, 6))
    w_all = torch.randn(32, generator=_gen(6)).to(dtype)
    want = apply_interleaved_rotary(
        torch.nn.functional.rms_norm(x, (32,), w_all, 1e-6).unflatten(-1, (2, 16)), cos, sin
    )
    assert torch.equal(qr.qk_norm_rope_reference(q, w_all, cos, sin, eps=1e-6, norm_over="all"), want)
    w_head = w_all[:16]
    want = apply_interleaved_rotary(torch.nn.functional.rms_norm(q, (16,), w_head, 1e-6), cos, sin)
    assert torch.equal(qr.qk_norm_rope_reference(q, w_head, cos, sin, eps=1e-6, norm_over="head"), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_engine_fallback_equals_the_references(dtype: torch.dtype) -> None:
    # Without the kernels package the engine runs its unfused expressions: they must not drift.
    x = torch.randn(2, 4, 32, generator=_gen(1)).to(dtype)
    y = torch.randn(2, 4, 32, generator=_gen(2)).to(dtype)
    shift, scale, gate = (torch.randn(2, 1, 3, 32, generator=_gen(3)) * 0.5).unbind(2)
    weight, bias = torch.randn(32, generator=_gen(4)), torch.randn(32, generator=_gen(5))
    for precision in ("float32", "input"):
        mods = (shift, scale) if precision == "float32" else (shift.to(dtype), scale.to(dtype))
        for norm, b in (("layer", bias), ("rms", None)):
            args = {"norm": norm, "eps": 1e-6, "weight": weight.to(dtype), "bias": None if b is None else b.to(dtype)}
            want = nm.norm_modulate_reference(x, *mods, precision=precision, **args)
            assert torch.equal(fused._unfused_norm_modulate(x, *mods, precision=precision, **args), want)
        want = gr.gated_residual_reference(x, y, gate, precision=precision)
        assert torch.equal(fused._unfused_gated_residual(x, y, gate, precision=precision), want)
    q = x.unflatten(-1, (2, 16))
    cos, sin = torch.rand(4, 16, generator=_gen(6)), torch.rand(4, 16, generator=_gen(7))
    for norm_over, width in (("head", 16), ("all", 32)):
        w = torch.randn(width, generator=_gen(8)).to(dtype)
        for tables in ((cos, sin), (None, None)):
            want = qr.qk_norm_rope_reference(q, w, *tables, eps=1e-6, norm_over=norm_over)
            got = fused._unfused_qk_norm_rope(q, w, *tables, eps=1e-6, norm_over=norm_over, out=None)
            assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def test_cpu_dispatch_runs_the_reference() -> None:
    x = torch.randn(2, 4, 32, generator=_gen(1)).to(torch.bfloat16)
    shift, scale = (torch.randn(2, 1, 2, 32, generator=_gen(2)) * 0.5).unbind(2)
    want = nm.norm_modulate_reference(x, shift, scale, norm="layer", eps=1e-6)
    assert torch.equal(fused.norm_modulate(x, shift, scale, norm="layer", eps=1e-6), want)
    assert torch.equal(fused.gated_residual(x, x, shift), gr.gated_residual_reference(x, x, shift))


def test_switch_and_env_var() -> None:
    assert fused.ENV_VAR == "SGL_DIFFUSION_FUSED_KERNELS"
    before = fused.fused_kernels_enabled()
    try:
        fused.set_fused_kernels(False)
        assert not fused.fused_kernels_enabled()
        fused.set_fused_kernels(True)
        assert fused.fused_kernels_enabled()
    finally:
        fused.set_fused_kernels(before)
    assert not fused._enabled_from_env("0") and fused._enabled_from_env(None) and fused._enabled_from_env("1")


def test_missing_package_warns_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(fused, "_KERNELS_INSTALLED", False)
    monkeypatch.setattr(fused, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=fused.__name__):
        assert not fused._kernels_usable()
        assert not fused._kernels_usable()
    message = "fused Triton kernels are unavailable (sgl-diffusion-kernels (pip install ./kernels) is not installed)"
    assert [r.getMessage() for r in caplog.records] == [f"{message}: using the torch path"]


def test_references_work_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # Re-import the modules while `import triton` fails; put the real ones back afterwards.
    from sgl_diffusion_kernels import _triton

    monkeypatch.setitem(sys.modules, "triton", None)  # None in sys.modules makes the import raise
    try:
        importlib.reload(_triton)
        importlib.reload(gr)
        assert not triton_available()
        x = torch.ones(1, 2, 4)
        assert torch.equal(gr.gated_residual_reference(x, x, x), 2 * x)
        with pytest.raises(RuntimeError, match="need the `triton` package"):
            gr.gated_residual(x, x, x)
    finally:
        monkeypatch.undo()
        importlib.reload(_triton)
        importlib.reload(gr)
    assert triton_available() == (sys.modules.get("triton") is not None)


# --------------------------------------------------------------------------------------------------
# block_sparse_attention (sliding tile and video sparse attention)
# --------------------------------------------------------------------------------------------------

#: Triton's interpreter multiplies bf16 tensors wrongly in `tl.dot` (triton 3.9: it reads their raw bits), so bf16
#: runs on the GPU only; fp16 exercises the same half-precision path on the CPU.
BSA_DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if CUDA else [])]
#: kernel vs reference (float32 softmax): float32 reduction order; fp16/bf16 also round p before p @ v.
BSA_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@needs_kernels
@pytest.mark.parametrize("map_shape", ["per_row", "shared"])
@pytest.mark.parametrize("dtype", BSA_DTYPES, ids=[str(d).removeprefix("torch.") for d in BSA_DTYPES])
def test_block_sparse_attention_matches_reference(dtype: torch.dtype, map_shape: str) -> None:
    batch, heads, head_dim = 2, 3, 24  # head_dim below its power of two: the kernel masks the channels
    sizes = torch.tensor([64, 17, 0, 64, 5], device=DEVICE)  # a partial and an empty key block
    seq = bsa.BLOCK * len(sizes)
    q, k, v = (_randn(batch, seq, heads, head_dim, dtype=dtype, seed=i) for i in range(3))
    shape = (batch, heads) if map_shape == "per_row" else (1, 1)
    block_map = torch.rand(*shape, len(sizes), len(sizes), generator=_gen(7)) > 0.5
    block_map[..., 0, :] = False  # a query block that reads nothing: zeros
    block_map[..., 1, 0] = True
    block_map = block_map.to(DEVICE)
    index, count = bsa.block_map_to_index(block_map, sizes)
    assert int(count[..., 0].max()) == 0
    got = bsa.block_sparse_attention(q, k, v, index, count, sizes)
    want = bsa.block_sparse_attention_reference(q, k, v, block_map, sizes)
    assert got.shape == want.shape == (batch, seq, heads, head_dim) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=BSA_TOL[dtype])
    assert not got[:, : bsa.BLOCK].any()


@needs_kernels
def test_block_sparse_attention_strided_views_and_errors() -> None:
    # q/k/v as views of one packed (B, S, 3, H, D) projection, as attention layers produce them.
    sizes = torch.tensor([64, 64], device=DEVICE)
    packed = _randn(1, 128, 3, 2, 16, seed=3)
    q, k, v = packed.unbind(2)
    block_map = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)
    index, count = bsa.block_map_to_index(block_map, sizes)
    got = bsa.block_sparse_attention(q, k, v, index, count, sizes)
    torch.testing.assert_close(got, bsa.block_sparse_attention_reference(q, k, v, block_map, sizes), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="must be a multiple of the block"):
        bsa.block_sparse_attention(q[:, :100], k[:, :100], v[:, :100], index, count, sizes)
    with pytest.raises(ValueError, match="int32"):
        bsa.block_sparse_attention(q, k, v, index.long(), count, sizes)


@needs_kernels
@pytest.mark.parametrize("backend", ["sliding_tile_attn", "video_sparse_attn"])
def test_sparse_video_attention_kernel_matches_reference(backend: str) -> None:
    """The engine's STA / VSA on the Triton kernel vs on the torch reference (partial tiles, per-head windows)."""
    from sgl_diffusion.layers.sparse_attention import sliding_tile_attention, video_sparse_attention

    grid = (7, 10, 9)
    q, k, v, gate = (_randn(2, 630, 2, 16, seed=i) for i in range(4))
    if backend == "sliding_tile_attn":
        windows = ((1, 1, 1), (3, 1, 2))
        got = sliding_tile_attention(q, k, v, grid, windows, implementation="triton")
        want = sliding_tile_attention(q, k, v, grid, windows, implementation="reference")
    else:
        got = video_sparse_attention(q, k, v, gate, grid, 0.5, implementation="triton")
        want = video_sparse_attention(q, k, v, gate, grid, 0.5, implementation="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# A fresh process for the interpreter; the GPU at full size
# --------------------------------------------------------------------------------------------------


def _cases(function: Callable[..., object]) -> int:
    """How many test cases a test function expands to (the product of its parametrizations)."""
    count = 1
    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize":
            count *= len(mark.args[1])
    return count


def _kernel_cases() -> dict[str, int]:
    """The tests that need the kernels to run (marked `needs_kernels`), with their case counts."""
    return {
        name: _cases(value)
        for name, value in globals().items()
        if name.startswith("test_") and callable(value) and needs_kernels.mark in getattr(value, "pytestmark", [])
    }


#: What the interpreter run may skip: the GPU-only tests, and the fresh-process test itself.
CPU_INTERPRETER_SKIPS = {
    "test_cuda_full_size",
    "test_cuda_vae_rows_full_size",
    "test_cuda_wan_vae_decoder_uses_the_row_kernel",
    "test_interpreter_in_fresh_process",
}


def _junit_outcomes(report: Path) -> dict[str, str]:
    """Test case id -> passed / failed / skipped, from a pytest junit XML report."""
    from xml.etree import ElementTree

    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes[case.get("name", "")] = outcome
    return outcomes


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="the kernel tests ran in this process")
def test_interpreter_in_fresh_process(tmp_path: Path) -> None:
    # The kernel cases skipped in this process; this test exists to run them, so it passes only if
    # the fresh process really ran every one of them (a run that skipped them would exit 0 too).
    report = tmp_path / "kernels.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={report}",
         str(Path(__file__))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    log = proc.stdout[-5000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    outcomes = _junit_outcomes(report)
    assert not [case for case, outcome in outcomes.items() if outcome == "failed"], log
    skipped = {case.split("[")[0] for case, outcome in outcomes.items() if outcome == "skipped"}
    assert skipped <= CPU_INTERPRETER_SKIPS, f"unexpected skips {sorted(skipped - CPU_INTERPRETER_SKIPS)}:\n{log}"
    expected = _kernel_cases()
    assert sum(expected.values()) >= 30, expected  # the marks were found (34 kernel cases today)
    for name, count in expected.items():
        ran = sum(1 for case, outcome in outcomes.items() if case.split("[")[0] == name and outcome == "passed")
        assert ran == count, f"{name}: {ran} of {count} cases passed in the fresh process:\n{log}"


@pytest.mark.skipif(not CUDA or not KERNELS_RUN or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
@torch.inference_mode()
def test_cuda_full_size() -> None:
    """FLUX.1 (1, 4608, 3072, 24 heads) and Wan 14B (5120, 40 heads) sizes in bf16; prints timings (-s)."""
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    report = []

    def check(name: str, kernel: Callable, reference: Callable, *args: object, rope: bool = False, **kwargs) -> None:
        got, want = kernel(*args, **kwargs), reference(*args, **kwargs)
        (assert_rope_close if rope else assert_one_rounding_apart)(got, want)
        kernel_ms = cuda_ms(lambda: kernel(*args, **kwargs))
        reference_ms = cuda_ms(lambda: reference(*args, **kwargs))
        report.append(f"{name}: kernel {kernel_ms:.3f} ms, reference {reference_ms:.3f} ms")

    for seq, dim in ((4608, 3072), (4608, 5120)):
        x = torch.randn(1, seq, dim, device=dev, dtype=bf16) * 2
        y = torch.randn(1, seq, dim, device=dev, dtype=bf16)
        flux_mods = (torch.randn(1, 6 * dim, device=dev, dtype=bf16) * 0.5).chunk(6, dim=1)
        wan_mods = (torch.randn(1, seq, 6, dim, device=dev) * 0.5).unbind(2)  # TI2V: per token, float32
        for tag, shift, scale, gate in (
            ("per-sample bf16", flux_mods[0][:, None], flux_mods[1][:, None], flux_mods[2][:, None]),
            ("per-token fp32", wan_mods[0], wan_mods[1], wan_mods[2]),
        ):
            name = f"norm_modulate {tuple(x.shape)} {tag}"
            check(name, nm.norm_modulate, nm.norm_modulate_reference, x, shift, scale, norm="layer", eps=1e-6)
            check(f"gated_residual {tuple(x.shape)} {tag}", gr.gated_residual, gr.gated_residual_reference, x, y, gate)
        # The dispatch layer takes the kernel here when switched on, and the reference when switched off.
        shift, scale = flux_mods[0][:, None], flux_mods[1][:, None]
        before = fused.fused_kernels_enabled()
        try:
            fused.set_fused_kernels(True)
            got = fused.norm_modulate(x, shift, scale, norm="layer", eps=1e-6, precision="input")
            assert torch.equal(got, nm.norm_modulate(x, shift, scale, norm="layer", eps=1e-6))
            fused.set_fused_kernels(False)
            assert torch.equal(fused.gated_residual(x, y, shift), gr.gated_residual_reference(x, y, shift))
        finally:
            fused.set_fused_kernels(before)

    angles = torch.rand(4608, 64, device=dev, dtype=torch.float64) * 100
    cos, sin = (t.repeat_interleave(2, dim=1).float() for t in (angles.cos(), angles.sin()))
    for heads, norm_over in ((24, "head"), (12, "all"), (40, "all")):
        qkv = torch.randn(1, 4608, 3 * heads * 128, device=dev, dtype=bf16)
        q = qkv[..., : heads * 128].unflatten(-1, (heads, 128))
        weight = (1 + 0.2 * torch.randn(128 if norm_over == "head" else heads * 128, device=dev)).to(bf16)
        name = f"qk_norm_rope {tuple(q.shape)} {norm_over}"
        args = (q, weight, cos, sin)
        check(name, qr.qk_norm_rope, qr.qk_norm_rope_reference, *args, eps=1e-6, norm_over=norm_over, rope=True)
    print("\n" + "\n".join(report))


@pytest.mark.skipif(not CUDA or not KERNELS_RUN or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
@torch.inference_mode()
def test_cuda_vae_rows_full_size() -> None:
    """``vae_rows`` at the Wan2.1 VAE decoder's sizes for 81 frames of 480x832, bf16 channels-last rows
    (up to (1, 81, 480, 832, 96): 3.1e9 elements, int64 offsets); prints kernel vs reference vs the
    decoder's no-package torch path times (-s)."""
    from sgl_diffusion.models.wan import vae

    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    report = []

    def stage(c: int, t: int, h: int, w: int) -> None:
        x = torch.randn(1, t, h, w, c, device=dev, dtype=bf16).mul_(2)  # the row view of (1, C, T, H, W)
        res = torch.randn(1, t, h, w, c, device=dev, dtype=bf16)
        act, act_res = x.permute(0, 4, 1, 2, 3), res.permute(0, 4, 1, 2, 3)  # channels-last-3d activations
        gamma = (0.5 + torch.rand(c, device=dev)).to(bf16)
        bias = torch.randn(c, device=dev) * 0.5
        for tag, args in (
            ("norm+silu", {"weight": gamma, "silu": True}),
            ("bias+norm+silu", {"weight": gamma, "bias": bias, "silu": True}),
            ("bias+residual", {"bias": bias, "residual": res}),
        ):
            got = vr.vae_rows(x, **args)
            want = vr.vae_rows_reference(x, **args)
            for s in range(0, t, 4):  # frame slices keep assert_close's temporaries small
                assert_one_rounding_apart(got[:, s : s + 4], want[:, s : s + 4])
            del want
            if tag == "bias+residual":  # in place, as the decoder runs it
                inplace = x.clone()
                vr.vae_rows(inplace, out=inplace, **args)
                assert torch.equal(inplace, got)
                del inplace
            del got
            kernel_ms = cuda_ms(lambda args=args: vr.vae_rows(x, **args))
            reference_ms = cuda_ms(lambda args=args: vr.vae_rows_reference(x, **args))
            kw = {"gamma": args.get("weight"), "bias": args.get("bias"), "silu": args.get("silu", False)}
            kw["residual"] = act_res if "residual" in args else None
            torch_ms = cuda_ms(lambda kw=kw: vae._rows_torch(act, False, **kw))
            report.append(
                f"vae_rows {(1, c, t, h, w)} {tag}: kernel {kernel_ms:.3f} ms, reference {reference_ms:.3f} ms, "
                f"decoder torch ops {torch_ms:.3f} ms"
            )

    # (C, T, H, W) of the decoder's stages: mid block and first up block, then after each upsampling.
    for shape in ((384, 21, 60, 104), (384, 41, 120, 208), (192, 81, 240, 416), (96, 81, 480, 832)):
        stage(*shape)
        torch.cuda.empty_cache()
    print("\n" + "\n".join(report))


@pytest.mark.skipif(not CUDA or not KERNELS_RUN or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
def test_cuda_wan_vae_decoder_uses_the_row_kernel() -> None:
    """The decoder follows the engine's switch (``fused_kernels=None``) and its own ``fused_kernels``
    attribute, and a bf16 decode with the kernel matches one with the torch reference."""
    from sgl_diffusion.models.wan.vae import WanVAEDecoder

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanVAEDecoder.from_config({"base_dim": 32}).to(torch.bfloat16).eval()
    z = torch.randn(1, 16, 3, 12, 16, device="cuda")
    before = fused.fused_kernels_enabled()
    try:
        fused.set_fused_kernels(True)
        assert model.uses_fused_kernels()
        got = model.decode(z)
        model.fused_kernels = False
        assert not model.uses_fused_kernels()
        want = model.decode(z)
        model.fused_kernels = None
        fused.set_fused_kernels(False)
        assert not model.uses_fused_kernels()
        assert torch.equal(model.decode(z), want)
        model.fused_kernels = True  # forced: the kernel whatever the switch
        assert model.uses_fused_kernels()
        assert torch.equal(model.decode(z), got)
    finally:
        fused.set_fused_kernels(before)
    assert got.shape == (1, 3, 9, 96, 128) and torch.isfinite(got).all()
    mse = (got.float() - want.float()).pow(2).mean().item()
    print(f"\nWan VAE decode, row kernel vs torch reference (bf16): max abs "
          f"{(got.float() - want.float()).abs().max().item():.3g}, mse {mse:.3g}")  # fmt: skip
    # One bf16 rounding apart per row op, spread by the convolutions: mse ~1e-4 (6e-5 in the CPU
    # interpreter at this width); a wrong kernel (a missing norm, bias or SiLU) is orders of magnitude off.
    assert mse < 1e-3
