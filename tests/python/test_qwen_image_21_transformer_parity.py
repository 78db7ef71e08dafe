"""Parity of our native Qwen-Image 2.1 transformer against diffusers' QwenImage21Transformer2DModel (CPU, fp32).

Both hold the same weights (ours loaded by the checkpoint's key names through our loader from the folder
diffusers saved); every case feeds both the same random inputs. On CPU fp32 the outputs are bit-equal
(same ops in the same order, attention split into the same segments as diffusers' default processor).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.qwen_image_21 import PrefixCache, QwenImage21Transformer2DModel
from sgl_diffusion.runtime.compile import repeated_blocks

CONTEXT_DIM = 24
TINY_CONFIG: dict = {
    "in_channels": 64,
    "out_channels": 64,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "context_in_dim": CONTEXT_DIM,
    "axes_dims_rope": (4, 6, 6),
}


@pytest.fixture(scope="module", params=[True, False], ids=["causal_condition", "no_causal_condition"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(diffusers model, ours loaded from the diffusers-saved folder by key name)."""
    torch.manual_seed(0)
    ref = diffusers.QwenImage21Transformer2DModel(**TINY_CONFIG, causal_condition=request.param).eval()
    # Fresh init leaves the zero-centred norm and modulation at trivial values: perturb everything.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    folder = tmp_path_factory.mktemp("qwen21_transformer") / "transformer"
    ref.save_pretrained(folder)
    ours = load_native_model(
        QwenImage21Transformer2DModel.from_config, Path(folder), torch.device("cpu"), torch.float32
    )
    return ref, ours


def _inputs(
    batch: int, text_len: int, target: tuple[int, int], conditions: list[tuple[int, int, int]] = (), seed: int = 2
) -> dict:
    """Random inputs; `conditions` are (text tokens before it, rows, columns) of each condition image."""
    gen = torch.Generator().manual_seed(seed)
    slots: list[bool] = []
    shapes = []
    latent_tokens = 0
    for before, rows, columns in conditions:
        slots += [False] * before + [True] * (rows * columns // 4)
        shapes.append((1, rows, columns))
        latent_tokens += rows * columns
    slots += [False] * text_len
    rows, columns = target
    shapes.append((1, rows, columns))
    latent_tokens += rows * columns
    text_mask = torch.tensor(slots).expand(batch, -1)
    return {
        "hidden_states": torch.randn(batch, latent_tokens, 64, generator=gen),
        "encoder_hidden_states": torch.randn(batch, len(slots), CONTEXT_DIM, generator=gen),
        "timestep": torch.full((batch,), 0.7),
        "img_shapes": [shapes] * batch,
        "img_mask": torch.cat([text_mask, torch.ones(batch, rows * columns // 4, dtype=torch.bool)], dim=1),
    }


CASES = {
    "square": (2, 7, (4, 4), []),
    "nonsquare_odd": (1, 5, (2, 6), []),
    "tall": (2, 3, (6, 2), []),
    "one_condition_image": (2, 4, (4, 4), [(3, 2, 6)]),
    "two_condition_images": (1, 2, (4, 2), [(3, 4, 4), (1, 2, 2)]),
}


def _ours(inputs: dict, **extra: object) -> dict:
    """The reference's keywords as ours takes them: the encoder's slots without the target's."""
    text_len = inputs["encoder_hidden_states"].shape[1]
    return {**inputs, "img_mask": inputs["img_mask"][:, :text_len], **extra}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_diffusers(models, case: str) -> None:
    ref, ours = models
    inputs = _inputs(*CASES[case])
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        got = ours(**_ours(inputs))
    assert got.shape == expected.shape
    assert torch.equal(got, expected), (got - expected).abs().max().item()


def test_padded_prompts_match(models) -> None:
    """A padding mask over the text keys (diffusers masks them in every attention call)."""
    ref, ours = models
    inputs = _inputs(2, 6, (4, 4), [(2, 2, 2)])
    mask = torch.ones(2, inputs["encoder_hidden_states"].shape[1], dtype=torch.bool)
    mask[1, -3:] = False
    with torch.no_grad():
        expected = ref(**inputs, encoder_hidden_states_mask=mask, return_dict=False)[0]
        got = ours(**_ours(inputs, encoder_hidden_states_mask=mask))
    assert torch.equal(got, expected)


def test_prefix_cache_matches_diffusers_kv_cache(models) -> None:
    """Our prefix cache is diffusers' KV cache: the filling step and a cached step give its outputs, and the
    cached step equals the uncached forward's target rows."""
    ref, ours = models
    if not ours.config.causal_condition:
        with pytest.raises(ValueError, match="causal_condition"):
            ours(**_ours(_inputs(1, 3, (2, 2))), prefix_cache=PrefixCache())
        return
    inputs = _inputs(2, 5, (4, 4), [(2, 2, 4)])
    later = {**inputs, "timestep": torch.full((2,), 0.3)}
    cache, ref_cache = PrefixCache(), QwenImage21KVCache(len(ref.transformer_blocks))
    with torch.no_grad():
        first = ref(**inputs, kv_cache=ref_cache, kv_cache_mode="extract", return_dict=False)[0]
        second = ref(**later, kv_cache=ref_cache, kv_cache_mode="cached", return_dict=False)[0]
        assert torch.equal(ours(**_ours(inputs), prefix_cache=cache), first)
        got = ours(**_ours(later), prefix_cache=cache)
        uncached = ours(**_ours(later))
    assert got.shape == second.shape == (2, 16, 64)
    assert torch.equal(got, second)
    assert torch.equal(got, uncached[:, -16:])


def test_layout_mismatch_is_refused(models) -> None:
    _, ours = models
    inputs = _ours(_inputs(1, 3, (4, 4)))
    inputs["img_shapes"] = [[(1, 2, 2)]]
    with pytest.raises(ValueError, match="img_shapes accounts for"):
        ours(**inputs)


def test_declares_its_repeated_blocks(models) -> None:
    _, ours = models
    assert repeated_blocks(ours) == list(ours.transformer_blocks)
