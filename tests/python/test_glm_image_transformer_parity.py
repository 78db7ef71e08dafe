"""Parity of our native GLM-Image DiT against diffusers' GlmImageTransformer2DModel (CPU, fp32).

Both models hold the same weights (ours loaded by the checkpoint's key names through our loader, strict);
every case feeds both the same random inputs: square and non-square token grids, per-row timesteps and
sizes, glyph texts of several lengths (none too), the prior tokens dropped in some rows (the unconditional
branch), and the image-editing path (condition-image keys and values written at timestep 0, then read in
front of the generated image's). Measured max abs differences are printed (``pytest -s``); on CPU fp32 they
are 0 (same ops in the same order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.glm_image import GlmImageTransformer2DModel
from sgl_diffusion.runtime.compile import repeated_blocks

TOLERANCE = 1e-5
CODEBOOK = 64

TINY_CONFIG: dict = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "text_embed_dim": 24,
    "time_embed_dim": 16,
    "condition_dim": 8,
    "prior_vq_quantizer_codebook_size": CODEBOOK,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    """(diffusers model, ours loaded from the diffusers-saved folder by key name)."""
    torch.manual_seed(0)
    ref = diffusers.GlmImageTransformer2DModel(**TINY_CONFIG).eval()
    # Fresh init leaves biases at 0: perturb everything so a swapped chunk order or a dropped bias cannot hide.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("glm_transformer") / "transformer"
    ref.save_pretrained(folder)
    ours = load_native_model(GlmImageTransformer2DModel.from_config, Path(folder), torch.device("cpu"), torch.float32)
    return ref, ours


def _inputs(batch: int, rows: int, columns: int, text_len: int, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = rows * columns
    drop = torch.zeros(batch, tokens, dtype=torch.bool)
    drop[batch // 2 :] = True  # the second half of the rows is an unconditional branch
    return {
        "hidden_states": torch.randn(batch, 16, 2 * rows, 2 * columns, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_len, 24, generator=gen),
        "prior_token_id": torch.randint(0, CODEBOOK, (batch, tokens), generator=gen),
        "prior_token_drop": drop,
        # The pipeline passes the scheduler timestep minus 1; per-sample values here.
        "timestep": torch.linspace(999.0, 300.0, batch),
        "target_size": torch.tensor([[32.0 * rows, 32.0 * columns]] * batch) + torch.arange(batch)[:, None] * 16,
        "crop_coords": torch.zeros(batch, 2),
    }


@pytest.mark.parametrize(
    ("batch", "rows", "columns", "text_len"),
    [(1, 4, 4, 1), (2, 4, 6, 7), (3, 6, 2, 0), (2, 2, 2, 12)],
    ids=["square-1", "wide-2", "tall-3-no-text", "small-2-long-text"],
)
@torch.no_grad()
def test_forward_matches_diffusers(models, batch: int, rows: int, columns: int, text_len: int) -> None:
    ref, ours = models
    inputs = _inputs(batch, rows, columns, text_len)
    expected = ref(**inputs, return_dict=False)[0]
    got = ours(**inputs)
    diff = (got - expected).abs().max().item()
    print(f"GLM-Image DiT {batch}x{rows}x{columns} text {text_len}: max abs diff {diff:.3g}")
    assert got.shape == expected.shape
    assert diff <= TOLERANCE


@torch.no_grad()
def test_per_row_drop_flag_equals_per_token_mask(models) -> None:
    """The engine passes one drop flag per row; the reference a per-token mask: same prediction."""
    _, ours = models
    inputs = _inputs(2, 4, 4, 3)
    per_row = dict(inputs, prior_token_drop=inputs["prior_token_drop"][:, 0])
    assert torch.equal(ours(**inputs), ours(**per_row))
    # And the flag matters: the dropped row changes when its prior tokens come back.
    kept = dict(inputs, prior_token_drop=torch.zeros(2, dtype=torch.bool))
    assert not torch.equal(ours(**inputs)[1], ours(**kept)[1])


@torch.no_grad()
def test_condition_kv_matches_diffusers_cache(models) -> None:
    """Image editing: two condition images' keys and values written at timestep 0, then read in front of the
    generated image's in the conditional branch."""
    ref, ours = models
    gen = torch.Generator().manual_seed(5)
    conditions = [(4, 4), (2, 6)]
    latents = [torch.randn(1, 16, 2 * r, 2 * c, generator=gen) for r, c in conditions]
    prior_ids = [torch.randint(0, CODEBOOK, (1, r * c), generator=gen) for r, c in conditions]
    sizes = [torch.tensor([[16.0 * r, 16.0 * c]]) for r, c in conditions]

    cache = GlmImageKVCache(num_layers=TINY_CONFIG["num_layers"])
    cache.set_mode("write")
    for latent, ids, size in zip(latents, prior_ids, sizes, strict=True):
        ref(
            hidden_states=latent,
            encoder_hidden_states=torch.zeros(1, 0, 24),
            prior_token_id=ids,
            prior_token_drop=torch.zeros_like(ids, dtype=torch.bool),
            timestep=torch.zeros(1),
            target_size=size,
            crop_coords=torch.zeros(1, 2),
            kv_caches=cache,
        )
    cache.set_mode("read")
    inputs = _inputs(2, 4, 4, 5, seed=6)
    inputs["prior_token_drop"] = torch.zeros(2, 16, dtype=torch.bool)
    expected = ref(**inputs, kv_caches=cache, return_dict=False)[0]

    per_image = [ours.condition_kv(latent, ids, size) for latent, ids, size in zip(latents, prior_ids, sizes)]
    kv = [
        (torch.cat([layers[i][0] for layers in per_image], dim=1), torch.cat([layers[i][1] for layers in per_image], 1))
        for i in range(TINY_CONFIG["num_layers"])
    ]
    got = ours(**inputs, condition_kv=kv)
    diff = (got - expected).abs().max().item()
    print(f"GLM-Image DiT with condition images: max abs diff {diff:.3g}")
    assert diff <= TOLERANCE
    # The condition images matter.
    assert (got - ours(**inputs)).abs().max().item() > 1e-3


def test_state_dict_keys_match_diffusers(models) -> None:
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_declares_its_compile_unit(models) -> None:
    _, ours = models
    blocks = repeated_blocks(ours)
    assert [type(b).__name__ for b in blocks] == ["GlmImageTransformerBlock"] * TINY_CONFIG["num_layers"]


@torch.no_grad()
def test_fused_projections_keep_the_prediction(models) -> None:
    _, ours = models
    inputs = _inputs(2, 4, 4, 3)
    before = ours(**inputs)
    assert ours.fuse_projections() == TINY_CONFIG["num_layers"]
    try:
        after = ours(**inputs)
    finally:
        ours.unfuse_projections()
    assert (after - before).abs().max().item() <= TOLERANCE


def test_bad_prior_token_shape_names_the_argument(models) -> None:
    _, ours = models
    inputs = _inputs(1, 4, 4, 1)
    inputs["prior_token_id"] = inputs["prior_token_id"][:, :5]
    with pytest.raises(ValueError, match="prior_token_id"):
        ours(**inputs)
