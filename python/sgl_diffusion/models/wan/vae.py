"""Native Wan VAE decoder (Wan2.1 z16 and Wan2.2 TI2V-5B z48), whole clip per layer.

diffusers' ``AutoencoderKLWan.decode`` runs its decoder once per latent frame, carrying two frames of
causal context per convolution in ``feat_cache``: ~21 sequential passes of small convolutions at 480p.
This module computes the same function with every layer applied to the whole clip at once. Layer by
layer, the per-frame loop is equivalent to:

* causal ``conv3d`` (time kernel 3): cache = the last two *inputs* of that conv, and the very first
  chunk is zero-padded, so the loop equals one conv over the clip with two zero frames in front;
* RMS norms, SiLU, 2-D convolutions, spatial upsampling, the mid block's attention: per frame;
* ``upsample3d`` resample: on the first chunk the cache slot is set to ``"Rep"`` and the frame is *not*
  time-convolved (it passes through, one frame out); the next chunk sees the ``"Rep"`` marker and pads
  with zeros instead of the cached frame. So ``time_conv`` is a causal conv over latent frames ``1..``
  (frame 0 excluded) with zero padding, its ``2C`` outputs interleaved into two frames each; output
  frames = ``[frame 0] + 2 * [frames 1..]``;
* Wan2.2 ``DupUp3D`` shortcut: repeats every frame ``factor_t`` times and drops the first
  ``factor_t - 1`` frames on the first chunk: the same as repeating the whole clip and dropping once.

Module attribute names mirror diffusers' decoder path (``post_quant_conv``, ``decoder.*``), so the
decoder's keys of a ``vae/`` folder load strictly by name (:meth:`WanVAEDecoder.from_pretrained`, the
encoder's keys are skipped), and :meth:`WanVAEDecoder.from_diffusers` shares an ``AutoencoderKLWan``'s
parameter tensors (the pipelines keep diffusers' VAE for encoding and the latent statistics).

Speed choices (all exact in fp32 up to float rounding):

* activations are ``channels_last_3d`` with batch 1 (``decode`` loops over the batch), so a clip is a
  ``(T*H*W, C)`` row matrix: time slices and per-frame 2-D views are free, and cuDNN runs NDHWC kernels;
* no ``F.pad`` / ``torch.cat`` copy of activations for the causal padding: on CUDA the first two output
  frames are computed against explicit zeros (a 4-frame input) and the rest straight from the input
  into a slice of the output (``aten::cudnn_convolution.out``); elsewhere, the conv's own symmetric
  time padding with the two extra output frames dropped (a free prefix view);
* convolutions run without bias (cuDNN would add it in a separate pass); the bias is folded into the
  next row op: ``norm(+bias) -> *scale*gamma -> SiLU`` or ``conv + bias + residual``, one pass of the
  ``sgl_diffusion_kernels.vae_rows`` Triton kernel on CUDA (float32 in registers, no float32 tensors;
  see ``fused_kernels``), its torch reference elsewhere;
* nearest-2x upsample + 3x3 conv is computed "sub-pixel": four 2x2 convolutions on the low-resolution
  frames (weights summed per phase), 2.25x fewer FLOPs and no upsampled tensor (``upsample_mode``);
* convolutions whose per-sample input or output exceeds ``max_conv_numel`` elements run in time
  segments (cuDNN before 9.3 cannot index them; PyTorch would fall back to a very slow kernel).

The row kernel is tested against its reference on the GPU at decoder sizes by
``tests/python/test_kernels.py``; the ``out=`` convolution passes a small self-check on first use per
device (:func:`direct_conv_available`; a failure is logged and one padded conv runs instead).
Expect a few seconds of Triton compilation on the first decode of a process (cached on disk).

Not covered: encoding, spatial tiling.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...config_dict import config_from_dict
from ...layers.fused import fused_kernels_enabled

try:  # the kernels package is optional (see `layers/fused.py`): without it the rows run as torch ops
    from sgl_diffusion_kernels import triton_available as _triton_available
    from sgl_diffusion_kernels import vae_rows as _vae_rows_mod
except ImportError:  # pragma: no cover - depends on the environment
    _vae_rows_mod = None

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan

logger = logging.getLogger(__name__)

__all__ = ["WanVAEConfig", "WanVAEDecoder", "direct_conv_available"]

CL3D = torch.channels_last_3d
CL2D = torch.channels_last
#: The largest per-sample tensor cuDNN indexes with 32-bit math (see ``_causal_conv3d``).
INT32_NUMEL = 2**31 - 1
#: diffusers' ``F.normalize`` clamps the channel norm at this value.
NORM_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanVAEConfig:
    """The decoder-relevant part of ``AutoencoderKLWan``'s config (same key names and defaults)."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    is_residual: bool = False
    out_channels: int = 3
    patch_size: int | None = None

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "temperal_downsample", tuple(bool(t) for t in self.temperal_downsample))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs {len(self.dim_mult) - 1} entries: {self.temperal_downsample}")

    @property
    def dim(self) -> int:
        return self.decoder_base_dim or self.base_dim

    @property
    def temperal_upsample(self) -> tuple[bool, ...]:
        return self.temperal_downsample[::-1]

    @property
    def time_upsamples(self) -> int:
        """How many decoder stages double the frame count (each maps ``t`` frames to ``2t - 1``)."""
        return sum(self.temperal_upsample[: len(self.dim_mult) - 1])

    def num_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * 2**self.time_upsamples

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> WanVAEConfig:
        # Encoder-only and pipeline-side keys: they do not change the decoder graph.
        inert = (
            "attn_scales",
            "dropout",
            "in_channels",
            "latents_mean",
            "latents_std",
            "scale_factor_spatial",
            "scale_factor_temporal",
        )
        return config_from_dict(cls, cfg, inert=inert)


# --------------------------------------------------------------------------------------------------
# Row op: y = [silu]( [rmsnorm_C]( x [+ bias] [+ residual] ) * scale * gamma ), one position per row
# --------------------------------------------------------------------------------------------------

_warned_missing = False


def _kernel_installed() -> bool:
    """Whether ``sgl_diffusion_kernels.vae_rows`` and Triton import (the kernel can launch)."""
    return _vae_rows_mod is not None and _triton_available()


def _kernel_usable_on_cuda() -> bool:
    """:func:`_kernel_installed`, logging one WARNING when not (there the missing kernel costs time)."""
    global _warned_missing
    if _kernel_installed():
        return True
    if not _warned_missing:
        _warned_missing = True
        missing = "sgl-diffusion-kernels (pip install ./kernels)" if _vae_rows_mod is None else "triton"
        logger.warning("Wan VAE: the fused row kernel is unavailable (%s is not installed): using torch ops", missing)
    return False


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(1, C, T, H, W) channels-last-3d -> the contiguous (1, T, H, W, C) row view the row op takes."""
    return x.permute(0, 2, 3, 4, 1)


def _rows_torch(
    x: torch.Tensor,
    overwrite: bool,
    gamma: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    silu: bool,
) -> torch.Tensor:
    """The row op as torch ops in the activation dtype, on (1, C, T, H, W): the fallback when the
    ``sgl_diffusion_kernels`` package is missing (otherwise its ``vae_rows_reference`` runs; the two
    agree to float rounding, see tests/python/test_kernels.py). ``gamma`` is the raw norm weight (C,);
    ``overwrite``: ``x`` may be reused for the result."""
    y, owned = x, overwrite
    if bias is not None:
        b = bias.to(y.dtype).view(1, -1, 1, 1, 1)
        y, owned = (y.add_(b) if owned else y + b), True
    if residual is not None:
        y, owned = (y.add_(residual) if owned else y + residual), True
    if gamma is not None:
        c = y.shape[1]
        # F.normalize(x, dim=C) * sqrt(C) * gamma == rms_norm over C with weight gamma; eps makes
        # sqrt(mean + eps) == max(norm, 1e-12) / sqrt(C) at the clamp (all-zero rows stay zero).
        y = F.rms_norm(_rows(y), (c,), gamma.to(y.dtype), eps=NORM_EPS**2 / c).permute(0, 4, 1, 2, 3)
        owned = True
    if silu:
        y = F.silu(y, inplace=owned) if owned else F.silu(y)
    return y


_DIRECT_CHECKED: dict[torch.device, bool] = {}


def direct_conv_available(device: torch.device | str) -> bool:
    """Whether cuDNN's ``out=`` convolution (``aten::cudnn_convolution.out``) writes correctly into a
    time slice of a channels-last-3d activation on ``device``; checked once per device against F.conv3d."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.backends.cudnn.is_available() or not torch.backends.cudnn.enabled:
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _DIRECT_CHECKED:
        ok, why = True, ""
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = _cl(torch.randn((1, 16, 6, 5, 7), generator=gen).to(device, torch.bfloat16))
            weight = (torch.randn((24, 16, 3, 3, 3), generator=gen) / 12).to(device, torch.bfloat16)
            out = _cl(torch.full((1, 24, 8, 5, 7), 7.0, device=device, dtype=torch.bfloat16))
            _conv3d_into(out[:, :, 2:6], x, weight, (1, 1))
            want = F.conv3d(x, weight, None, 1, (0, 1, 1))
            err = (out[:, :, 2:6].float() - want.float()).abs().max().item()
            untouched = bool((out[:, :, :2] == 7).all() and (out[:, :, 6:] == 7).all())
            if not (err <= 0.05 and untouched):
                ok, why = False, f"max error {err}, neighbours untouched: {untouched}"
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            logger.warning("Wan VAE: cuDNN out= convolution unusable on %s (%s); copying conv outputs", device, why)
        _DIRECT_CHECKED[device] = ok
    return _DIRECT_CHECKED[device]


# --------------------------------------------------------------------------------------------------
# Layout helpers (every activation is (1, C, T, H, W) channels_last_3d)
# --------------------------------------------------------------------------------------------------


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL3D)


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(1, C, T, H, W) channels-last-3d -> (T, C, H, W) channels-last 2-D: a view."""
    return x[0].transpose(0, 1)


def _unframes(x: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) channels-last 2-D -> (1, C, T, H, W) channels-last-3d: a view."""
    return x.contiguous(memory_format=CL2D).transpose(0, 1).unsqueeze(0)


def _empty_cl(like: torch.Tensor, c: int, t: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((1, c, t, h, w), dtype=like.dtype, device=like.device, memory_format=CL3D)


# --------------------------------------------------------------------------------------------------
# Run state
# --------------------------------------------------------------------------------------------------


class _Run:
    """Options of one decode call, and the causal context carried between temporal chunks.

    ``ctx`` maps each causal conv to the last ``kt - 1`` frames of its (zero-padded) input; ``None``
    means the whole clip is decoded in one call (zero padding everywhere). ``first`` is whether the
    current chunk starts the clip (the ``upsample3d`` / ``DupUp3D`` first-frame rules).
    """

    def __init__(self, *, fused: bool, direct: bool, upsample_mode: str, max_conv_numel: int, chunked: bool) -> None:
        self.fused = fused
        self.direct = direct
        self.upsample_mode = upsample_mode
        self.max_conv_numel = max_conv_numel
        self.ctx: dict[nn.Module, torch.Tensor] | None = {} if chunked else None
        self.first = True

    def rows(
        self,
        x: torch.Tensor,
        *,
        norm: _RMSNorm | None = None,
        bias: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        silu: bool = False,
        inplace: bool = False,
    ) -> torch.Tensor:
        """``[silu](norm_C(x + bias + residual))`` with any part left out. ``inplace``: ``x`` may be
        overwritten (use the returned tensor)."""
        x = _cl(x)
        if residual is not None:
            residual = _cl(residual)
        gamma = None if norm is None else norm.gamma.reshape(norm.dim)
        if _vae_rows_mod is None:
            return _cl(_rows_torch(x, inplace, gamma, bias, residual, silu))
        # The Triton kernel, or its torch reference (float32 math, one rounding: the same result).
        op = _vae_rows_mod.vae_rows if self.fused else _vae_rows_mod.vae_rows_reference
        out = x if inplace else torch.empty_like(x)
        res = None if residual is None else _rows(residual)
        op(_rows(x), weight=gamma, bias=bias, residual=res, silu=silu, eps=NORM_EPS, out=_rows(out))
        return out


def _segments(total: int, per_frame: int, extra: int, limit: int) -> list[tuple[int, int]]:
    """Splits ``total`` output frames so that (frames + extra) * per_frame <= limit per segment."""
    # At least `extra` frames per segment, so only the first segment reads the causal padding.
    most = max(extra, 1, limit // max(per_frame, 1) - extra)
    n = -(-total // most)
    size = -(-total // n)
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def _conv3d_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pad_hw: tuple[int, int]) -> None:
    """``out[...] = conv3d(x, weight)`` (no bias, no time padding). On CUDA cuDNN writes straight into
    ``out`` (a time slice of a larger activation); elsewhere the conv's result is copied in."""
    if out.is_cuda:
        cudnn = torch.backends.cudnn
        torch.ops.aten.cudnn_convolution.out(
            x, weight, [0, *pad_hw], [1, 1, 1], [1, 1, 1], 1,
            cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, out=out,
        )  # fmt: skip
    else:
        out.copy_(F.conv3d(x, weight, None, 1, (0, *pad_hw)))


def _causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    prev: torch.Tensor | None,
    pad_hw: tuple[int, int],
    limit: int,
    direct: bool,
) -> torch.Tensor:
    """Causal conv (no bias) of ``x`` (1, C, T, H, W) with ``kt - 1`` frames of context ``prev`` (zeros
    when None) in front, stride 1, "same" spatial padding. Returns (1, C_out, T, H, W) channels-last-3d."""
    pad_t = weight.shape[2] - 1
    _, _, t, h, w = x.shape
    co = weight.shape[0]
    if prev is not None:
        x = torch.cat([prev, x], 2)  # chunked decoding only: real context, output s reads x[s : s + kt]
    # Outputs [0, lo) read zero padding; the others read frames of x only: x[s - shift : e + pad_t - shift].
    lo, shift = (0, 0) if prev is not None else (min(pad_t, t), pad_t)
    per_frame = max(x[0, :, 0].numel(), co * h * w)
    segments = [(lo + a, lo + b) for a, b in _segments(t - lo, per_frame, pad_t, limit)] if t > lo else []
    if not direct and len(segments) <= 1:
        # One conv: the conv's own symmetric time padding, then drop the last pad_t outputs. No F.pad
        # copy; with batch 1 in channels-last-3d the prefix slice is contiguous. (pad_t / T extra FLOPs.)
        y = F.conv3d(x, weight, None, 1, (0 if prev is not None else pad_t, *pad_hw))
        return _cl(y[:, :, :t])
    out = _empty_cl(x, co, t, h, w)
    if lo:  # the first frames against explicit zeros: a copy of `lo` input frames, no wasted outputs
        head = _cl(torch.cat([torch.zeros_like(x[:, :, :1]).expand(-1, -1, pad_t, -1, -1), x[:, :, :lo]], 2))
        _conv3d_into(out[:, :, :lo], head, weight, pad_hw)
    for start, end in segments:  # inputs are contiguous views of x: no copies
        _conv3d_into(out[:, :, start:end], x[:, :, start - shift : end + pad_t - shift], weight, pad_hw)
    return out


def _tail(prev: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` frames of ``cat([prev or zeros(n), x])``: the next chunk's causal context."""
    if x.shape[2] >= n:
        return _cl(x[:, :, -n:].clone())
    if prev is None:
        prev = torch.zeros_like(x[:, :, :1]).expand(-1, -1, n, -1, -1)
    return _cl(torch.cat([prev, x], 2)[:, :, -n:])


# --------------------------------------------------------------------------------------------------
# Layers (parameter names and shapes as in diffusers' autoencoder_kl_wan.py)
# --------------------------------------------------------------------------------------------------


class _CausalConv3d(nn.Conv3d):
    """``WanCausalConv3d``'s parameters; ``forward`` returns the conv *without* bias (callers fold it)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int], padding: int | tuple
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        # The conv's time padding p becomes 2p frames of causal context (diffusers' `_padding`).
        if self.kernel_size[0] - 1 != 2 * self.padding[0]:
            raise ValueError(f"unsupported causal conv: kernel {self.kernel_size}, padding {self.padding}")

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:  # type: ignore[override]
        pad_hw = (self.padding[1], self.padding[2])
        if self.kernel_size[0] == 1:
            return _cl(F.conv3d(x, self.weight, None, 1, (0, *pad_hw)))
        prev = None
        if run.ctx is not None:
            prev = run.ctx.get(self)
            run.ctx[self] = _tail(prev, x, self.kernel_size[0] - 1)
        return _causal_conv3d(x, self.weight, prev, pad_hw, run.max_conv_numel, run.direct)


class _RMSNorm(nn.Module):
    """``WanRMS_norm`` (no bias in the decoder): ``F.normalize(x, dim=C) * sqrt(C) * gamma``."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))


class _ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(in_dim, images=False)
        self.conv1 = _CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = _RMSNorm(out_dim, images=False)
        self.conv2 = _CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = _CausalConv3d(in_dim, out_dim, 1, padding=0) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        h, bias = x, self.conv2.bias
        if self.conv_shortcut is not None:
            h = self.conv_shortcut(x, run)
            bias = bias.float() + self.conv_shortcut.bias.float()  # both biases land on the block output
        y = run.rows(x, norm=self.norm1, silu=True)
        y = self.conv1(y, run)
        y = run.rows(y, norm=self.norm2, bias=self.conv1.bias, silu=True, inplace=True)
        y = self.conv2(y, run)
        return run.rows(y, bias=bias, residual=h, inplace=True)


class _AttentionBlock(nn.Module):
    """Single-head self-attention over each frame's pixels (frames are the SDPA batch)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = _RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        _, c, t, h, w = x.shape
        y = run.rows(x, norm=self.norm)
        # channels-last: the (T, H*W, C) token matrix is a view, and 1x1 convs are linears on it.
        tokens = y.permute(0, 2, 3, 4, 1).reshape(t, h * w, c)
        qkv = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
        del y, tokens, qkv
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        del q, k, v
        o = F.linear(o, self.proj.weight.view(c, c), self.proj.bias)
        return o.view(1, t, h, w, c).permute(0, 4, 1, 2, 3).add_(x)


class _MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([_AttentionBlock(dim)])
        self.resnets = nn.ModuleList([_ResidualBlock(dim, dim), _ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        x = self.resnets[0](x, run)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, run), run)
        return x


def _subpixel_weight(w: torch.Tensor) -> torch.Tensor:
    """3x3 kernel on a nearest-2x upsampled image -> four 2x2 kernels on the original (one per output
    phase, stacked as output channels ``(2a + b) * C_out + c``).

    Output row ``2i`` reads upsampled rows ``2i-1, 2i, 2i+1`` = original ``i-1, i, i`` (taps {0}, {1, 2});
    row ``2i+1`` reads ``i, i, i+1`` (taps {0, 1}, {2}). Zero padding agrees: upsampled row -1 is
    original row -1. Summed in float32.
    """
    wf = w.float()
    groups = (((0,), (1, 2)), ((0, 1), (2,)))

    def taps(t: torch.Tensor, dim: int, sel: tuple[int, ...]) -> torch.Tensor:
        return sum(t.select(dim, i) for i in sel)  # type: ignore[return-value]

    phases = []
    for rows in groups:
        r = torch.stack([taps(wf, 2, sel) for sel in rows], 2)  # (Co, Ci, 2, 3)
        for cols in groups:
            phases.append(torch.stack([taps(r, 3, sel) for sel in cols], 3))  # (Co, Ci, 2, 2)
    return torch.cat(phases, 0).to(w.dtype)


def _upsample_conv(frames: torch.Tensor, conv: nn.Conv2d, mode: str) -> torch.Tensor:
    """``Conv2d(3x3, pad 1)(nearest_exact_2x(frames))`` for (T, C, H, W) channels-last frames."""
    if mode == "nearest":
        # diffusers' WanUpsample goes through float32, which changes nothing for a nearest copy.
        up = F.interpolate(frames, scale_factor=2.0, mode="nearest-exact")
        return F.conv2d(up.contiguous(memory_format=CL2D), conv.weight, conv.bias, padding=1)
    t, _, h, w = frames.shape
    co = conv.out_channels
    p = F.conv2d(frames, _subpixel_weight(conv.weight), None, padding=1)  # (T, 4 Co, H+1, W+1)
    p = p.contiguous(memory_format=CL2D)
    st, _, sh, sw = p.stride()
    # out[t, 2i+a, 2j+b, c] = p[t, i+a, j+b, (2a+b) Co + c]: one strided view of p, copied once.
    src = p.as_strided((t, h, 2, w, 2, co), (st, sh, sh + 2 * co, sw, sw + co, 1), p.storage_offset())
    out = torch.empty((t, co, 2 * h, 2 * w), dtype=p.dtype, device=p.device, memory_format=CL2D)
    torch.add(src, conv.bias.to(p.dtype), out=out.permute(0, 2, 3, 1).view(t, h, 2, w, 2, co))
    return out


class _Resample(nn.Module):
    """``WanResample`` in ``upsample2d`` / ``upsample3d`` mode."""

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d"):
            raise ValueError(f"decoder resample mode {mode!r}")
        self.dim = dim
        self.mode = mode
        # Index 0 is diffusers' parameterless WanUpsample: keeps the conv at key `resample.1`.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, upsample_out_dim or dim // 2, 3, padding=1))
        if mode == "upsample3d":
            self.time_conv = _CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def _time_upsample(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        _, c, _, h, w = x.shape
        head = 1 if run.first else 0  # the clip's first frame is not time-upsampled (diffusers' "Rep")
        rest = x[:, :, head:]
        n = rest.shape[2]
        out = _empty_cl(x, c, head + 2 * n, h, w)
        if head:
            out[:, :, :1].copy_(x[:, :, :1])
        if n:
            raw = self.time_conv(rest, run)  # (1, 2C, n, H, W), no bias
            # Output channel block s of frame t becomes frame 2t + s: one strided copy adding the bias.
            src = raw[0].permute(1, 2, 3, 0).view(n, h, w, 2, c).permute(0, 3, 1, 2, 4)
            dst = out[0, :, head:].permute(1, 2, 3, 0).view(n, 2, h, w, c)
            torch.add(src, self.time_conv.bias.to(raw.dtype).view(2, 1, 1, c), out=dst)
        return out

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, run)
        return _unframes(_upsample_conv(_frames(x), self.resample[1], run.upsample_mode))


class _DupUp3D(nn.Module):
    """Wan2.2's parameterless shortcut: channels spread over ``factor_t x factor_s x factor_s`` phases."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.factor_t = factor_t
        self.factor_s = factor_s
        self.factor = factor_t * factor_s * factor_s
        if out_channels * self.factor % in_channels:
            raise ValueError(f"DupUp3D: {in_channels} -> {out_channels} with factor {self.factor}")
        self.repeats = out_channels * self.factor // in_channels

    def reference(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """diffusers' ``DupUp3D.forward`` (materialised)."""
        ft, fs = self.factor_t, self.factor_s
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_channels, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_channels, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first_chunk else x

    def add_to(self, out: torch.Tensor, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        """``out += DupUp3D(x)`` in place, reading ``x`` through a broadcast view (no repeated copy)."""
        ft, fs, co = self.factor_t, self.factor_s, self.out_channels
        _, ci, t, h, w = x.shape
        phases = None
        if ci % co == 0:
            # Input channel of (out channel o, phase p) is o * g + p // repeats, g = ci / co.
            g = ci // co
            rows = x[0].permute(1, 2, 3, 0).view(t, h, w, co, g, 1).expand(t, h, w, co, g, self.repeats)
            try:  # a view when `repeats` splits the (ft, fs, fs) phase digits; else materialise below
                phases = rows.view(t, h, w, co, ft, fs, fs).permute(0, 4, 1, 5, 2, 6, 3)
            except RuntimeError:
                phases = None
        if phases is None:
            return out.add_(self.reference(x, first_chunk))
        dst = out[0].permute(1, 2, 3, 0)  # (T_out, H*fs, W*fs, Co)
        drop = ft - 1 if first_chunk else 0
        if drop:
            # The first input frame contributes only its last time phase.
            dst[:1].view(1, 1, h, fs, w, fs, co).add_(phases[:1, ft - 1 :])
            dst, phases = dst[1:], phases[1:]
        if phases.shape[0]:
            dst.view(phases.shape[0], ft, h, fs, w, fs, co).add_(phases)
        return out


class _UpBlock(nn.Module):
    """``WanUpBlock`` (Wan2.1)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([_ResidualBlock(a, b) for a, b in itertools.pairwise(dims)])
        self.upsamplers = nn.ModuleList([_Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, run)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, run)
        return x


class _ResidualUpBlock(nn.Module):
    """``WanResidualUpBlock`` (Wan2.2)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_upsample: bool, up_flag: bool) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([_ResidualBlock(a, b) for a, b in itertools.pairwise(dims)])
        self.avg_shortcut = None
        self.upsampler = None
        if up_flag:
            self.avg_shortcut = _DupUp3D(in_dim, out_dim, factor_t=2 if temperal_upsample else 1, factor_s=2)
            mode = "upsample3d" if temperal_upsample else "upsample2d"
            self.upsampler = _Resample(out_dim, mode, upsample_out_dim=out_dim)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        x_in = x
        for resnet in self.resnets:
            x = resnet(x, run)
        if self.upsampler is not None:
            x = self.upsampler(x, run)
        if self.avg_shortcut is not None:
            x = self.avg_shortcut.add_to(x, x_in, first_chunk=run.first)
        return x


class _Decoder3d(nn.Module):
    """``WanDecoder3d``."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dim, mult = config.dim, config.dim_mult
        dims = [dim * u for u in [mult[-1], *mult[::-1]]]
        self.conv_in = _CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = _MidBlock(dims[0])
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(itertools.pairwise(dims)):
            if i > 0 and not config.is_residual:
                in_dim //= 2  # Wan2.1's resample convs halve the channels
            up_flag = i != len(mult) - 1
            temporal = up_flag and config.temperal_upsample[i]
            if config.is_residual:
                blocks.append(_ResidualUpBlock(in_dim, out_dim, config.num_res_blocks, temporal, up_flag))
            else:
                mode = ("upsample3d" if temporal else "upsample2d") if up_flag else None
                blocks.append(_UpBlock(in_dim, out_dim, config.num_res_blocks, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = _RMSNorm(dims[-1], images=False)
        self.conv_out = _CausalConv3d(dims[-1], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, run: _Run) -> torch.Tensor:
        """Latents after ``post_quant_conv`` -> decoder output without ``conv_out``'s bias."""
        x = run.rows(self.conv_in(x, run), bias=self.conv_in.bias, inplace=True)
        x = self.mid_block(x, run)
        for block in self.up_blocks:
            x = block(x, run)
        x = run.rows(x, norm=self.norm_out, silu=True)
        return self.conv_out(x, run)


# --------------------------------------------------------------------------------------------------
# Public model
# --------------------------------------------------------------------------------------------------


class WanVAEDecoder(nn.Module):
    """The decoder half of ``AutoencoderKLWan`` with diffusers' parameter names.

    Build with :meth:`from_pretrained` (a ``vae/`` folder), :meth:`from_diffusers` (shares a loaded
    ``AutoencoderKLWan``'s tensors) or :meth:`from_config`; decode with :meth:`decode`.

    Attributes (may be changed between calls):
        upsample_mode: ``"subpixel"`` (default, fewer FLOPs) or ``"nearest"`` (diffusers' op order).
        fused_kernels: ``None`` (default) = the Triton row kernel (``sgl_diffusion_kernels.vae_rows``)
            on CUDA when that package and Triton import and the engine's switch is on
            (``sgl_diffusion.layers.fused.fused_kernels_enabled()``, env ``SGL_DIFFUSION_FUSED_KERNELS``)
            and torch is not compiling, else the kernel's torch reference (plain torch ops without the
            package); ``False`` = never the kernel; ``True`` = always, whatever the switch (CUDA, or CPU
            tensors under ``TRITON_INTERPRET=1``: how the tests run it).
        direct_conv_output: ``None`` = on CUDA when its self-check passes, causal convs write their
            output in place through ``aten::cudnn_convolution.out`` (first frames against explicit zeros,
            the rest in time slices: no padded copy, no wasted output frames, no segment copies);
            ``False`` = one conv with symmetric time padding and its last two frames dropped; ``True``
            = force the sliced form (on CPU each slice is copied in: how the tests cover it).
        max_conv_numel: per-sample element count above which a conv3d runs in time segments.
    """

    #: Checkpoint key components that belong to the encoder: skipped by the loader.
    ignore_unexpected_key_components: ClassVar[tuple[str, ...]] = ("encoder", "quant_conv")

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.post_quant_conv = _CausalConv3d(config.z_dim, config.z_dim, 1, padding=0)
        self.decoder = _Decoder3d(config)
        self.upsample_mode: Literal["subpixel", "nearest"] = "subpixel"
        self.fused_kernels: bool | None = None
        self.direct_conv_output: bool | None = None
        self.max_conv_numel = INT32_NUMEL

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | WanVAEConfig) -> WanVAEDecoder:
        """Build from a ``vae/config.json`` dict (parameters allocated, or meta under a meta device)."""
        return cls(cfg if isinstance(cfg, WanVAEConfig) else WanVAEConfig.from_dict(cfg))

    @classmethod
    def from_pretrained(
        cls, vae_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> WanVAEDecoder:
        """Load the decoder from a diffusers ``vae/`` folder by key (strict on the decoder's keys)."""
        from ...loading.components import load_native_model

        return load_native_model(cls.from_config, Path(vae_dir), torch.device(device), dtype)

    @classmethod
    def from_diffusers(cls, vae: AutoencoderKLWan) -> WanVAEDecoder:
        """Wrap a loaded diffusers ``AutoencoderKLWan``: the same parameter tensors, no copy."""
        with torch.device("meta"):
            model = cls.from_config(dict(vae.config))
        params = dict(vae.named_parameters())
        state = {name: params[name] for name in model.state_dict()}
        # assign=True keeps the very Parameter objects: updates to the diffusers VAE are seen here.
        # (requires_grad is left alone: it is the diffusers model's flag too; decode runs under no_grad.)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    # -- decode ------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def uses_fused_kernels(self) -> bool:
        """Whether :meth:`decode` will run the Triton row kernel (see ``fused_kernels``)."""
        if self.fused_kernels is False:
            return False
        if self.fused_kernels:
            if not _kernel_installed():
                raise RuntimeError("fused_kernels=True needs sgl-diffusion-kernels (pip install ./kernels) and Triton")
            return True
        if self.device.type != "cuda" or not fused_kernels_enabled() or torch.compiler.is_compiling():
            return False
        return _kernel_usable_on_cuda()

    def uses_direct_conv_output(self) -> bool:
        """Whether :meth:`decode` splits causal convs into in-place slices (see ``direct_conv_output``)."""
        if self.direct_conv_output is False:
            return False
        available = direct_conv_available(self.device)
        if self.direct_conv_output and self.device.type == "cuda" and not available:
            raise RuntimeError("direct_conv_output=True but cuDNN's out= convolution failed its self-check")
        # Forced on elsewhere (tests): the same slicing, with each slice's result copied in.
        return available or bool(self.direct_conv_output)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, temporal_chunk: int | None = None) -> torch.Tensor:
        """Latents ``(B, z_dim, T, h, w)`` (already un-normalised with latents_mean/std, as diffusers'
        ``decode`` takes them) -> video ``(B, 3, 1 + (T-1) * 4, H, W)`` clamped to [-1, 1], in the
        decoder's dtype.

        ``temporal_chunk``: decode this many latent frames at a time, carrying each causal conv's two
        frames of context between chunks (bounded memory; same result as the whole clip).
        """
        if z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"expected latents (B, {self.config.z_dim}, T, h, w), got {tuple(z.shape)}")
        if temporal_chunk is not None and temporal_chunk < 1:
            raise ValueError(f"temporal_chunk must be >= 1, got {temporal_chunk}")
        b, t = z.shape[0], z.shape[2]
        chunk = t if temporal_chunk is None else min(temporal_chunk, t)
        z = z.to(self.device, self.dtype)
        fused = self.uses_fused_kernels()
        direct = self.uses_direct_conv_output()
        out: torch.Tensor | None = None
        for i in range(b):  # one sample at a time: batch-1 channels-last activations are row matrices
            run = _Run(fused=fused, direct=direct, upsample_mode=self.upsample_mode,
                       max_conv_numel=self.max_conv_numel, chunked=chunk < t)  # fmt: skip
            x = run.rows(self.post_quant_conv(_cl(z[i : i + 1]), run), bias=self.post_quant_conv.bias, inplace=True)
            done = 0
            for start in range(0, t, chunk):
                run.first = start == 0
                y = self._finish(self.decoder(x[:, :, start : start + chunk], run))
                if out is None:
                    shape = (b, y.shape[1], self.config.num_frames(t), *y.shape[3:])
                    out = torch.empty(shape, dtype=y.dtype, device=y.device)
                out[i, :, done : done + y.shape[2]] = y[0]
                done += y.shape[2]
                del y
            if done != out.shape[2]:
                raise AssertionError(f"decoded {done} frames, expected {out.shape[2]}")
        assert out is not None
        return out

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """conv_out's bias, diffusers' unpatchify, clamp; back to the standard (contiguous) layout."""
        x = x + self.decoder.conv_out.bias.to(x.dtype).view(1, -1, 1, 1, 1)
        p = self.config.patch_size
        if p is not None and p > 1:
            b, cp, f, h, w = x.shape
            c = cp // (p * p)
            # out[c, f, h*p + q, w*p + r] = x[c*p*p + r*p + q, f, h, w] (diffusers' unpatchify)
            x = x.view(b, c, p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, f, h * p, w * p)
        return x.clamp_(-1.0, 1.0).contiguous()

    def forward(self, z: torch.Tensor, temporal_chunk: int | None = None) -> torch.Tensor:
        return self.decode(z, temporal_chunk=temporal_chunk)

    def extra_repr(self) -> str:
        c = self.config
        return f"z_dim={c.z_dim}, dim={c.dim}, dim_mult={c.dim_mult}, residual={c.is_residual}, patch={c.patch_size}"
