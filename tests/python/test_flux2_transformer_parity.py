"""Parity of our native FLUX.2 transformer against diffusers' Flux2Transformer2DModel (CPU, fp32).

Both models hold the same weights (ours loaded from the diffusers-saved folder by the checkpoint's key names);
every case feeds both the same random inputs, with position ids laid out as the reference pipelines lay them
out (text (0, 0, 0, i), generated image (0, row, column, 0), reference image j (10 + 10 j, row, column, 0)).
On CPU fp32 the outputs are bit-identical (same ops in the same order), which is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.flux2 import Flux2Transformer2DModel
from sgl_diffusion.runtime.compile import repeated_blocks

TINY_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": [4, 4, 4, 4],
    "rope_theta": 2000,
}


def _reference(guidance_embeds: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = diffusers.Flux2Transformer2DModel(**TINY_CONFIG, guidance_embeds=guidance_embeds).eval()
    # Fresh init leaves norm weights at 1: perturb everything so a swapped chunk or a dropped weight shows.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ref


@pytest.fixture(scope="module", params=[True, False], ids=["dev_guidance_embed", "klein_no_guidance"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(diffusers model, ours loaded from the diffusers-saved folder by key name)."""
    ref = _reference(guidance_embeds=request.param)
    folder = tmp_path_factory.mktemp("flux2_transformer") / "transformer"
    ref.save_pretrained(folder)
    ours = load_native_model(Flux2Transformer2DModel.from_config, Path(folder), torch.device("cpu"), torch.float32)
    return ref, ours


def _ids(grids: list[tuple[int, int]], text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """txt_ids (T, 4) and img_ids (N, 4) as the pipelines build them: the generated image's grid first."""
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    pieces = []
    for index, (rows, columns) in enumerate(grids):
        time = torch.tensor([0 if index == 0 else 10 * index])
        pieces.append(torch.cartesian_prod(time, torch.arange(rows), torch.arange(columns), torch.arange(1)))
    return txt, torch.cat(pieces)


def _inputs(grids: list[tuple[int, int]], batch: int, text_len: int, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    txt_ids, img_ids = _ids(grids, text_len)
    return {
        "hidden_states": torch.randn(batch, img_ids.shape[0], 128, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_len, 48, generator=gen),
        # The pipelines pass t / 1000; per-sample values here, and per-sample embedded guidance.
        "timestep": torch.linspace(0.95, 0.2, batch),
        "guidance": torch.linspace(4.0, 2.5, batch),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
    }


CASES = {
    "square": ([(4, 4)], 2, 12),
    "nonsquare": ([(3, 5)], 2, 7),
    "batch_of_one": ([(2, 6)], 1, 9),
    # reference images: their tokens follow the generated image's, with time coordinates 10, 20
    "one_reference_image": ([(4, 4), (3, 5)], 2, 8),
    "two_reference_images": ([(2, 4), (4, 2), (3, 3)], 2, 6),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_diffusers(models, case: str) -> None:
    ref, ours = models
    grids, batch, text_len = CASES[case]
    inputs = _inputs(grids, batch, text_len)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        # The pipelines hand the reference (B, S, 4) ids; ours takes (S, 4) (or the same batched form).
        got = ours(**inputs)
        got_batched_ids = ours(**{**inputs, "img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None]})
    assert got.shape == expected.shape == (batch, inputs["img_ids"].shape[0], 128)
    print(f"{case} guidance_embeds={ours.config.guidance_embeds}: max abs diff {(got - expected).abs().max():.3g}")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_batched_ids, got, rtol=0, atol=0)


def test_guidance_acts_only_with_a_guidance_embedding(models) -> None:
    _, ours = models
    inputs = _inputs([(4, 4)], 2, 8)
    with torch.no_grad():
        base = ours(**inputs)
        other = ours(**{**inputs, "guidance": torch.tensor([1.0, 7.0])})
    if ours.config.guidance_embeds:
        assert (base - other).abs().max() > 1e-3
        with pytest.raises(ValueError, match="guidance"):
            ours(**{**inputs, "guidance": None})
    else:
        # klein has no guidance embedding: the value is ignored, as the reference ignores it.
        torch.testing.assert_close(base, other, rtol=0, atol=0)


def test_reference_tokens_change_the_generated_tokens(models) -> None:
    """Reference images act through attention: dropping them changes the generated image's prediction."""
    _, ours = models
    with_reference = _inputs([(4, 4), (3, 5)], 2, 8)
    alone = {**with_reference, "hidden_states": with_reference["hidden_states"][:, :16]}
    alone["img_ids"] = with_reference["img_ids"][:16]
    with torch.no_grad():
        assert (ours(**with_reference)[:, :16] - ours(**alone)).abs().max() > 1e-3


def test_checkpoint_keys_and_compile_units(models) -> None:
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())
    blocks = repeated_blocks(ours)
    assert len(blocks) == 4
    assert {type(b).__name__ for b in blocks} == {"Flux2TransformerBlock", "Flux2SingleTransformerBlock"}


def test_fused_projections_keep_the_output(models) -> None:
    _, ours = models
    inputs = _inputs([(4, 4)], 2, 8)
    with torch.no_grad():
        before = ours(**inputs)
        assert ours.fuse_projections() == 2 * TINY_CONFIG["num_layers"]
        try:
            after = ours(**inputs)
        finally:
            ours.unfuse_projections()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_bad_position_ids_are_refused(models) -> None:
    _, ours = models
    inputs = _inputs([(4, 4)], 1, 8)
    with pytest.raises(ValueError, match="img_ids"):
        ours(**{**inputs, "img_ids": inputs["img_ids"][:-1]})
    with pytest.raises(ValueError, match="txt_ids"):
        ours(**{**inputs, "txt_ids": inputs["txt_ids"][:, :3]})
