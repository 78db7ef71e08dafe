"""Parity of our native Wan transformer against diffusers' WanTransformer3DModel (CPU, fp32 unless noted).

Tiny configs are the fixtures' (docs: fixtures.md §5). Inputs follow the real pipelines' layouts: the
Wan2.1 I2V text context is zero-padded to 512 tokens and the CLIP image context has 257 tokens;
Wan2.2 TI2V passes one timestep per video token.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sgl_diffusion.models.wan import WanTransformer3DModel, WanTransformerConfig
from sgl_diffusion.models.wan.transformer import wan_rope_axis_dims

BASE_CONFIG: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.42.1",
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 256,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 32,
    "pos_embed_seq_len": None,
    "window_size": [-1, -1],  # an original-Wan key some configs carry: must be ignored
}
VARIANTS: dict[str, dict[str, Any]] = {
    "t2v": {},
    "i2v": {"in_channels": 36, "image_dim": 8, "added_kv_proj_dim": 24},
    "flf2v": {"in_channels": 36, "image_dim": 8, "added_kv_proj_dim": 24, "pos_embed_seq_len": 2 * 257},
    "ti2v": {"in_channels": 48, "out_channels": 48},
}

BATCH, FRAMES, HEIGHT, WIDTH = 2, 3, 4, 4
SEQ = FRAMES * (HEIGHT // 2) * (WIDTH // 2)  # video tokens after the (1, 2, 2) patchify
TEXT_LEN, I2V_TEXT_LEN, CLIP_TOKENS = 16, 512, 257
TIMESTEPS = torch.tensor([999.0, 421.0])  # different per sample: requests at different steps batched


def config_for(variant: str) -> dict[str, Any]:
    return dict(BASE_CONFIG, **VARIANTS[variant])


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_reference(cfg: dict[str, Any]) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = diffusers.WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in REF_ARGS}).eval()
    # Fresh init leaves norms at 1, biases and pos_embed at 0; perturb everything so a wrongly-named or
    # unused parameter cannot hide behind a trivial value.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ref


def make_ours(ref: torch.nn.Module, cfg: dict[str, Any]) -> WanTransformer3DModel:
    ours = WanTransformer3DModel.from_config(cfg).eval()
    ref_sd = ref.state_dict()
    assert set(ours.state_dict()) == set(ref_sd), sorted(set(ours.state_dict()) ^ set(ref_sd))
    ours.load_state_dict(ref_sd, strict=True)
    return ours


REF_ARGS = {
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "image_dim",
    "added_kv_proj_dim",
    "rope_max_seq_len",
    "pos_embed_seq_len",
}


def make_inputs(variant: str) -> dict[str, torch.Tensor | None]:
    cfg = config_for(variant)
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(BATCH, cfg["in_channels"], FRAMES, HEIGHT, WIDTH, generator=gen)
    text = torch.randn(BATCH, TEXT_LEN, 32, generator=gen)
    image = None
    if cfg["image_dim"] is not None:
        # WanImageToVideoPipeline: prompt embeds zero-padded to max_sequence_length=512.
        text = torch.cat((text, torch.zeros(BATCH, I2V_TEXT_LEN - TEXT_LEN, 32)), dim=1)
        # First-last-frame checkpoints get [first; last] CLIP tokens as consecutive batch rows.
        rows = 2 * BATCH if cfg["pos_embed_seq_len"] else BATCH
        image = torch.randn(rows, CLIP_TOKENS, cfg["image_dim"], generator=gen)
    timestep: torch.Tensor = TIMESTEPS
    if variant == "ti2v":
        # WanPipeline(expand_timesteps=True) / TI2V I2V: mask * t per token, 0 on the first latent frame.
        mask = torch.ones(FRAMES, HEIGHT // 2, WIDTH // 2)
        mask[0] = 0
        timestep = mask.flatten()[None] * TIMESTEPS[:, None]
    return {
        "hidden_states": latents,
        "timestep": timestep,
        "encoder_hidden_states": text,
        "encoder_hidden_states_image": image,
    }


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, WanTransformer3DModel]:
    cfg = config_for(request.param)
    ref = make_reference(cfg)
    return request.param, ref, make_ours(ref, cfg)


@torch.no_grad()
def test_matches_diffusers(models: tuple[str, torch.nn.Module, WanTransformer3DModel]) -> None:
    variant, ref, ours = models
    inputs = make_inputs(variant)
    expected = ref(**inputs, return_dict=False)[0]
    got = ours(**inputs)
    out_ch = config_for(variant)["out_channels"]
    assert got.shape == expected.shape == (BATCH, out_ch, FRAMES, HEIGHT, WIDTH)
    err = rel_l2(got, expected)
    print(f"{variant}: rel L2 = {err:.3e}")
    assert err <= 1e-5


@torch.no_grad()
def test_batch_invariance(models: tuple[str, torch.nn.Module, WanTransformer3DModel]) -> None:
    variant, _, ours = models
    inputs = make_inputs(variant)
    batched = ours(**inputs)
    for row in range(BATCH):
        single = {k: (v[row : row + 1] if v is not None else None) for k, v in inputs.items()}
        if variant == "flf2v":
            # [first; last] CLIP tokens come as two consecutive rows per sample.
            single["encoder_hidden_states_image"] = inputs["encoder_hidden_states_image"][2 * row : 2 * row + 2]
        err = rel_l2(batched[row : row + 1], ours(**single))
        print(f"{variant} row {row}: batched vs alone rel L2 = {err:.3e}")
        assert err <= 1e-6


@torch.no_grad()
def test_conditioning_matters() -> None:
    # Parity alone would not catch an input ignored by both models; check each one moves the output.
    cfg = config_for("i2v")
    ours = make_ours(make_reference(cfg), cfg)
    inputs = make_inputs("i2v")
    base = ours(**inputs)
    image = inputs["encoder_hidden_states_image"]
    text = inputs["encoder_hidden_states"]
    assert image is not None and text is not None
    gen = torch.Generator().manual_seed(5)
    # Random (not constant) changes: the image embedder's first LayerNorm removes a constant offset.
    for name, value in {
        "timestep": TIMESTEPS.flip(0),
        "encoder_hidden_states_image": image + torch.randn(image.shape, generator=gen),
        "encoder_hidden_states": torch.cat(
            (text[:, :TEXT_LEN] + torch.randn(BATCH, TEXT_LEN, 32, generator=gen), text[:, TEXT_LEN:]), dim=1
        ),
    }.items():
        assert rel_l2(ours(**dict(inputs, **{name: value})), base) > 1e-3, name


@torch.no_grad()
def test_i2v_misplaced_text_length_matches_reference(caplog: pytest.LogCaptureFixture) -> None:
    # diffusers splits image/text at `len(context) - 512`; a short text context is mis-split the same
    # way in ours (parity), and ours says so.
    cfg = config_for("i2v")
    ref = make_reference(cfg)
    ours = make_ours(ref, cfg)
    inputs = make_inputs("i2v")
    text = inputs["encoder_hidden_states"]
    assert text is not None
    inputs["encoder_hidden_states"] = text[:, :TEXT_LEN]
    with caplog.at_level(logging.WARNING):
        got = ours(**inputs)
    assert "mis-split" in caplog.text
    assert rel_l2(got, ref(**inputs, return_dict=False)[0]) <= 1e-5


@torch.no_grad()
def test_scalar_and_2d_uniform_timestep_agree() -> None:
    # A per-token timestep that is constant per sample must equal the per-sample form.
    cfg = config_for("ti2v")
    ours = make_ours(make_reference(cfg), cfg)
    inputs = make_inputs("ti2v")
    per_sample = ours(**dict(inputs, timestep=TIMESTEPS))
    per_token = ours(**dict(inputs, timestep=TIMESTEPS[:, None].expand(BATCH, SEQ)))
    assert rel_l2(per_token, per_sample) <= 1e-6
    scalar = ours(**dict(inputs, timestep=500.0))
    assert rel_l2(scalar, ours(**dict(inputs, timestep=torch.tensor([500, 500])))) == 0.0


@torch.no_grad()
def test_bf16_matches_diffusers_bf16(tmp_path: Path) -> None:
    # diffusers' from_pretrained(torch_dtype=bf16) keeps its `_keep_in_fp32_modules` (time embedder,
    # modulation tables, norms) in float32; `param_dtype` reproduces that per key, and with the same
    # parameter dtypes on both sides the bf16 roundings match too.
    cfg = config_for("i2v")
    make_reference(cfg).save_pretrained(tmp_path)
    ref = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours = WanTransformer3DModel.from_config(cfg).eval()
    ours.load_state_dict(
        {
            name: t.to(WanTransformer3DModel.param_dtype(name, torch.bfloat16))
            for name, t in diffusers.WanTransformer3DModel.from_pretrained(tmp_path).state_dict().items()
        },
        strict=True,
        assign=True,
    )
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    assert {n: p.dtype for n, p in ours.named_parameters()} == ref_dtypes
    assert ref_dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert ref_dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16

    inputs = make_inputs("i2v")
    inputs = {k: (v.to(torch.bfloat16) if k != "timestep" and v is not None else v) for k, v in inputs.items()}
    expected = ref(**inputs, return_dict=False)[0]
    got = ours(**inputs)
    assert got.dtype == expected.dtype == torch.bfloat16
    err = rel_l2(got, expected)
    print(f"i2v bf16: rel L2 = {err:.3e}")
    assert err <= 1e-3


def test_constructs_on_meta_device() -> None:
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config_for("i2v"))
    assert all(p.is_meta for p in model.parameters())
    assert list(model.buffers()) == []


def test_config_from_dict() -> None:
    cfg = WanTransformerConfig.from_dict(config_for("i2v"))
    assert cfg.patch_size == (1, 2, 2) and cfg.inner_dim == 24 and cfg.image_dim == 8
    assert WanTransformerConfig.from_dict({"in_channels": 36, "out_channels": None}).resolved_out_channels == 36
    assert wan_rope_axis_dims(128) == (44, 42, 42)
    assert wan_rope_axis_dims(12) == (4, 4, 4)


def test_input_validation() -> None:
    ours = WanTransformer3DModel.from_config(config_for("t2v"))
    inputs = make_inputs("t2v")
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        ours(**dict(inputs, timestep=torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="columns for 12 video tokens"):
        ours(**dict(inputs, timestep=torch.zeros(BATCH, SEQ + 1)))
    with pytest.raises(ValueError, match="no image_dim"):
        ours(**dict(inputs, encoder_hidden_states_image=torch.zeros(BATCH, CLIP_TOKENS, 8)))


FULL_T2V_1_3B: dict[str, Any] = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.33.0.dev0",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
FULL_I2V_14B: dict[str, Any] = dict(
    FULL_T2V_1_3B,
    added_kv_proj_dim=5120,
    ffn_dim=13824,
    image_dim=1280,
    in_channels=36,
    num_attention_heads=40,
    num_layers=40,
)


@pytest.mark.parametrize("cfg", [FULL_T2V_1_3B, FULL_I2V_14B], ids=["wan21_t2v_1.3b", "wan21_i2v_14b"])
def test_real_config_key_names_and_shapes(cfg: dict[str, Any]) -> None:
    # Full-size configs on meta (no memory): names and shapes must be the checkpoint's.
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WanTransformer3DModel.from_config(cfg).state_dict().items()}
        ref_model = diffusers.WanTransformer3DModel(**{k: v for k, v in cfg.items() if k in REF_ARGS})
        ref = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    assert ours == ref
    n_layers = cfg["num_layers"]
    assert f"blocks.{n_layers - 1}.ffn.net.2.weight" in ours
    if cfg["image_dim"] is not None:
        assert ours["blocks.0.attn2.add_k_proj.weight"] == (5120, 5120)
        assert ours["condition_embedder.image_embedder.ff.net.0.proj.weight"] == (1280, 1280)
        assert ours["condition_embedder.image_embedder.norm2.weight"] == (5120,)
        assert ours["patch_embedding.weight"] == (5120, 36, 1, 2, 2)
