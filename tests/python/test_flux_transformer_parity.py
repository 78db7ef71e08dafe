"""Parity of our native FLUX.1 transformer against diffusers' FluxTransformer2DModel (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sgl_diffusion.layers.attention import (
    attention,
    available_attention_backends,
    resolve_attention_backend,
)
from sgl_diffusion.models.flux import FluxTransformer2DModel

TINY_CONFIG: dict = {
    "_class_name": "FluxTransformer2DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}

GRID_H, GRID_W, TXT_LEN, BATCH = 4, 4, 8, 2


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_reference(guidance_embeds: bool) -> torch.nn.Module:
    cfg = {k: v for k, v in TINY_CONFIG.items() if not k.startswith("_")}
    cfg["guidance_embeds"] = guidance_embeds
    torch.manual_seed(0)
    ref = diffusers.FluxTransformer2DModel(**cfg).eval()
    # Fresh init leaves adaLN gates, norm weights and biases at 0/1; perturb everything so a swapped
    # chunk order or a wrongly-named norm weight cannot hide behind a trivial value.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ref


def make_ours(ref: torch.nn.Module, guidance_embeds: bool) -> FluxTransformer2DModel:
    cfg = dict(TINY_CONFIG, guidance_embeds=guidance_embeds)
    ours = FluxTransformer2DModel.from_config(cfg).eval()
    ref_sd = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_sd), sorted(set(ours.state_dict()) ^ set(ref_sd))
    ours.load_state_dict(ref_sd, strict=True)
    return ours


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(guidance: bool) -> dict[str, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(2)
    return {
        "hidden_states": torch.randn(BATCH, GRID_H * GRID_W, 64, generator=gen),
        "encoder_hidden_states": torch.randn(BATCH, TXT_LEN, 32, generator=gen),
        "pooled_projections": torch.randn(BATCH, 16, generator=gen),
        # The pipeline passes t/1000 (a sigma in [0, 1]) and the raw guidance scale.
        "timestep": torch.tensor([0.93, 0.41]),
        "img_ids": image_ids(GRID_H, GRID_W),
        "txt_ids": torch.zeros(TXT_LEN, 3),
        "guidance": torch.tensor([3.5, 1.0]) if guidance else None,
    }


@pytest.mark.parametrize("guidance_embeds", [True, False])
@torch.no_grad()
def test_matches_diffusers(guidance_embeds: bool) -> None:
    ref = make_reference(guidance_embeds)
    ours = make_ours(ref, guidance_embeds)
    inputs = make_inputs(guidance_embeds)
    expected = ref(**inputs, return_dict=False)[0]
    got = ours(**inputs)
    assert got.shape == expected.shape == (BATCH, GRID_H * GRID_W, 64)
    err = rel_l2(got, expected)
    print(f"guidance_embeds={guidance_embeds}: rel L2 = {err:.3e}")
    assert err <= 1e-5


@torch.no_grad()
def test_guidance_actually_matters() -> None:
    # Guards against a guidance path that is silently ignored (parity alone would not catch a
    # reference that ignores it too).
    ref = make_reference(True)
    ours = make_ours(ref, True)
    inputs = make_inputs(True)
    a = ours(**inputs)
    b = ours(**dict(inputs, guidance=torch.tensor([1.0, 3.5])))
    assert rel_l2(a, b) > 1e-3


@torch.no_grad()
def test_batch_invariance() -> None:
    ref = make_reference(True)
    ours = make_ours(ref, True)
    inputs = make_inputs(True)
    batched = ours(**inputs)
    for row in range(BATCH):
        single = {
            k: (v[row : row + 1] if k not in ("img_ids", "txt_ids") and v is not None else v) for k, v in inputs.items()
        }
        alone = ours(**single)
        err = rel_l2(batched[row : row + 1], alone)
        print(f"row {row}: batched vs alone rel L2 = {err:.3e}")
        assert err <= 1e-6


def test_constructs_on_meta_device() -> None:
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(TINY_CONFIG)
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []


def test_real_flux_dev_key_names() -> None:
    # The full-size config, built on meta (no memory): spot-check names the checkpoint index uses.
    cfg = {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0.dev0",
        "attention_head_dim": 128,
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
        "axes_dims_rope": [16, 56, 56],
    }
    with torch.device("meta"):
        keys = set(FluxTransformer2DModel.from_config(cfg).state_dict())
        ref_keys = set(diffusers.FluxTransformer2DModel(**{k: v for k, v in cfg.items() if k[0] != "_"}).state_dict())
    assert keys == ref_keys
    for k in (
        "x_embedder.weight",
        "time_text_embed.guidance_embedder.linear_1.weight",
        "transformer_blocks.18.attn.to_out.0.weight",
        "transformer_blocks.0.attn.norm_added_q.weight",
        "transformer_blocks.0.ff_context.net.2.bias",
        "single_transformer_blocks.37.proj_mlp.weight",
        "norm_out.linear.weight",
        "proj_out.bias",
    ):
        assert k in keys


def test_attention_backend_resolver() -> None:
    assert resolve_attention_backend(None) == "torch_sdpa"
    assert resolve_attention_backend("torch_sdpa") == "torch_sdpa"
    assert "torch_sdpa" in available_attention_backends()
    with pytest.raises(ValueError, match=r"'vsa' \(did you mean 'video_sparse_attn'\?\); available: torch_sdpa"):
        resolve_attention_backend("vsa")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; available: torch_sdpa"):
        resolve_attention_backend("nope")
    # FLUX has no video token grid: the sparse video backends are refused at construction.
    with pytest.raises(ValueError, match="'video_sparse_attn' is sparse attention over a video's token grid"):
        FluxTransformer2DModel.from_config(TINY_CONFIG, attention_backend="video_sparse_attn")


def test_attention_layout() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=gen) for _ in range(3))
    out = attention(q, k, v, backend="torch_sdpa")
    assert out.shape == (2, 5, 24)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    manual = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 5, 24)
    assert rel_l2(out, manual) < 1e-5
    # A (batch, seq_k) key mask hides keys: masking the last key equals dropping it.
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[:, -1] = False
    masked = attention(q, k, v, backend="torch_sdpa", attn_mask=mask)
    dropped = attention(q, k[:, :-1], v[:, :-1], backend="torch_sdpa")
    assert rel_l2(masked, dropped) < 1e-5
