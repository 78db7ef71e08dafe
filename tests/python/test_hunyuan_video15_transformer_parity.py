"""Parity of our native HunyuanVideo-1.5 transformer against diffusers' HunyuanVideo15Transformer3DModel (CPU, fp32).

Both models hold the fixture's weights (ours loaded by the checkpoint's key names through our loader). The reference
takes text padded with masks (and, for text-to-video, all-zero image tokens it masks out); ours takes each row's
real tokens only and attends without a mask (the engine's path), so each row runs alone and the two agree up to the
last bits of softmaxes and means over shorter rows. With nothing to mask (image-to-video, no padding) the two run
the same operations in the same order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.hunyuan_video15 import HunyuanVideo15Transformer3DModel, HunyuanVideo15TransformerConfig
from sgl_diffusion.runtime.compile import compile_repeated_blocks, repeated_blocks
from sgl_diffusion.testing.hunyuan_video15 import TRANSFORMER_CONFIG, hunyuan_video15_transformer

CHANNELS = TRANSFORMER_CONFIG["in_channels"]
TEXT_DIM = TRANSFORMER_CONFIG["text_embed_dim"]
GLYPH_DIM = TRANSFORMER_CONFIG["text_embed_2_dim"]
IMAGE_DIM = TRANSFORMER_CONFIG["image_embed_dim"]
IMAGE_TOKENS = 9
#: Measured 1.2e-7 to 3.6e-7 on these cases (float32 sums over shorter rows); a wide margin.
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, HunyuanVideo15Transformer3DModel]:
    """(diffusers model, ours loaded from the diffusers-saved folder by key name)."""
    ref = hunyuan_video15_transformer(0).eval()
    folder = tmp_path_factory.mktemp("hunyuan_video15_transformer") / "transformer"
    ref.save_pretrained(folder)
    ours = load_native_model(
        HunyuanVideo15Transformer3DModel.from_config, Path(folder), torch.device("cpu"), torch.float32
    )
    return ref, ours


def _mask(lengths: list[int], padded: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), padded)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


def _inputs(
    batch: int, grid: tuple[int, int, int], lengths: list[int], padded: int, glyph_lengths: list[int],
    glyph_padded: int, image: bool, seed: int = 2,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The reference's inputs: random latents, per-sample timesteps, text and glyph features padded (padding random
    too, so a port that let it through would show) with their masks, image features (zeros: text-to-video)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, CHANNELS, *grid, generator=gen),
        "timestep": torch.linspace(950.0, 120.0, batch),
        "encoder_hidden_states": torch.randn(batch, padded, TEXT_DIM, generator=gen),
        "encoder_attention_mask": _mask(lengths, padded),
        "encoder_hidden_states_2": torch.randn(batch, glyph_padded, GLYPH_DIM, generator=gen),
        "encoder_attention_mask_2": _mask(glyph_lengths, glyph_padded),
        "image_embeds": torch.randn(batch, IMAGE_TOKENS, IMAGE_DIM, generator=gen)
        if image
        else torch.zeros(batch, IMAGE_TOKENS, IMAGE_DIM),
    }


def _reference(ref: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return ref(**inputs, return_dict=False)[0]


def _ours_per_row(
    model: HunyuanVideo15Transformer3DModel, inputs: dict[str, torch.Tensor], image: bool
) -> torch.Tensor:
    """Each row alone on its real tokens, as the engine runs rows of one length."""
    rows = []
    with torch.no_grad():
        for row in range(inputs["hidden_states"].shape[0]):
            text = inputs["encoder_hidden_states"][row][inputs["encoder_attention_mask"][row].bool()]
            glyph = inputs["encoder_hidden_states_2"][row][inputs["encoder_attention_mask_2"][row].bool()]
            rows.append(
                model(
                    hidden_states=inputs["hidden_states"][row : row + 1],
                    timestep=inputs["timestep"][row : row + 1],
                    encoder_hidden_states=text[None],
                    encoder_hidden_states_2=glyph[None],
                    image_embeds=inputs["image_embeds"][row : row + 1] if image else None,
                )
            )
    return torch.cat(rows)


@pytest.mark.parametrize(
    ("batch", "grid", "lengths", "padded", "glyph_lengths", "glyph_padded", "image"),
    [
        (1, (3, 2, 2), [7], 16, [0], 6, False),  # text-to-video, no glyph text
        (2, (2, 2, 3), [5, 16], 16, [4, 0], 6, False),  # non-square; one row unpadded, one with glyph text
        (3, (1, 4, 2), [1, 9, 12], 12, [6, 2, 6], 6, False),  # one frame; a one-token prompt
        (2, (2, 3, 2), [10, 4], 10, [3, 6], 6, True),  # image-to-video's image tokens
    ],
)
def test_forward_matches_diffusers(models, batch, grid, lengths, padded, glyph_lengths, glyph_padded, image) -> None:
    ref, ours = models
    inputs = _inputs(batch, grid, lengths, padded, glyph_lengths, glyph_padded, image)
    expected, got = _reference(ref, inputs), _ours_per_row(ours, inputs, image)
    assert got.shape == expected.shape == (batch, TRANSFORMER_CONFIG["out_channels"], *grid)
    diff = (got - expected).abs().max().item()
    print(f"max abs {diff:.3g}")
    assert diff <= ATOL


def test_unpadded_rows_of_one_length_batch_like_alone(models) -> None:
    _, ours = models
    inputs = _inputs(3, (2, 2, 2), [8, 8, 8], 8, [3, 3, 3], 3, False)
    with torch.no_grad():
        batched = ours(
            hidden_states=inputs["hidden_states"],
            timestep=inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            encoder_hidden_states_2=inputs["encoder_hidden_states_2"],
        )
    torch.testing.assert_close(batched, _ours_per_row(ours, inputs, False), rtol=0, atol=1e-6)


def test_conditioning_reaches_the_output(models) -> None:
    """Prompt, glyph text, image and timestep each move the prediction (a dropped input could not pass)."""
    _, ours = models
    inputs = _inputs(1, (2, 2, 2), [6], 6, [3], 3, True)
    base = _ours_per_row(ours, inputs, True)
    gen = torch.Generator().manual_seed(5)
    for key in ("encoder_hidden_states", "encoder_hidden_states_2", "image_embeds", "timestep"):
        # Random changes: each feature input starts with a LayerNorm, blind to a constant shift.
        changed = dict(inputs, **{key: inputs[key] + torch.randn(inputs[key].shape, generator=gen) * 10})
        assert (_ours_per_row(ours, changed, True) - base).abs().max() > 1e-3, key


def test_state_dict_keys_are_the_checkpoints(models) -> None:
    ref, ours = models
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_compiled_blocks_match_eager(models) -> None:
    _, ours = models
    config = HunyuanVideo15TransformerConfig.from_dict(TRANSFORMER_CONFIG)
    model = HunyuanVideo15Transformer3DModel(config)
    model.load_state_dict(ours.state_dict())
    inputs = _inputs(2, (2, 2, 2), [5, 7], 7, [2, 0], 2, False)
    eager = _ours_per_row(model, inputs, False)
    assert compile_repeated_blocks(model, backend="aot_eager") == config.num_layers
    torch.testing.assert_close(_ours_per_row(model, inputs, False), eager, rtol=0, atol=1e-6)


def test_declares_its_compile_units_and_builds_on_meta() -> None:
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel.from_config(TRANSFORMER_CONFIG)
    assert HunyuanVideo15Transformer3DModel._repeated_blocks == ("transformer_blocks",)
    assert repeated_blocks(model) == list(model.transformer_blocks)
    assert not list(model.buffers())  # nothing but checkpoint parameters: builds on meta, loads by key
    assert model.tokens_per_sample(torch.empty(2, CHANNELS, 5, 6, 8, device="meta")) == 5 * 6 * 8


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="rope_axes_dim"):
        HunyuanVideo15TransformerConfig.from_dict({**TRANSFORMER_CONFIG, "rope_axes_dim": [2, 4, 6]})
    with pytest.raises(ValueError, match="qk_norm"):
        HunyuanVideo15TransformerConfig.from_dict({**TRANSFORMER_CONFIG, "qk_norm": "layer_norm"})
    with pytest.raises(ValueError, match="use_meanflow"):
        HunyuanVideo15TransformerConfig.from_dict({**TRANSFORMER_CONFIG, "use_meanflow": True})
