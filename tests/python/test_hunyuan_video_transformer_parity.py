"""Parity of our native HunyuanVideo transformer against diffusers' HunyuanVideoTransformer3DModel (CPU, fp32).

Both models hold the fixture's weights (ours loaded by the checkpoint's key names through our loader); every case
feeds both the same random inputs. Given the reference's inputs (text padded, with its attention mask) the outputs
are bit-identical on CPU fp32 (same ops in the same order), so equality is asserted. The engine passes each prompt's
real tokens without a mask instead; that path is compared separately.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.hunyuan_video import HunyuanVideoTransformer3DModel, HunyuanVideoTransformerConfig
from sgl_diffusion.models.hunyuan_video.transformer import video_rope_tables
from sgl_diffusion.runtime.compile import compile_repeated_blocks, repeated_blocks
from sgl_diffusion.testing.hunyuan_video import TRANSFORMER_CONFIG, hunyuan_video_transformer

CHANNELS = 16
TEXT_DIM = 16
POOLED_DIM = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, HunyuanVideoTransformer3DModel]:
    """(diffusers model, ours loaded from the diffusers-saved folder by key name)."""
    ref = hunyuan_video_transformer(0).eval()
    folder = tmp_path_factory.mktemp("hunyuan_video_transformer") / "transformer"
    ref.save_pretrained(folder)
    ours = load_native_model(
        HunyuanVideoTransformer3DModel.from_config, Path(folder), torch.device("cpu"), torch.float32
    )
    return ref, ours


def _inputs(batch: int, frames: int, height: int, width: int, text_lengths: list[int], padded: int, seed: int = 2):
    """Latents, per-sample timesteps and guidance, text features padded to `padded` rows (padding random too: a
    port that let it through would show) with the mask of each row's real length."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, padded)
    for row, length in enumerate(text_lengths):
        mask[row, :length] = 1
    return {
        "hidden_states": torch.randn(batch, CHANNELS, frames, height, width, generator=gen),
        "timestep": torch.linspace(950.0, 120.0, batch),
        "encoder_hidden_states": torch.randn(batch, padded, TEXT_DIM, generator=gen),
        "pooled_projections": torch.randn(batch, POOLED_DIM, generator=gen),
        "guidance": torch.linspace(6000.0, 1000.0, batch),
        "encoder_attention_mask": mask,
    }


def _reference(ref: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return ref(**inputs, return_dict=False)[0]


def _ours(model: HunyuanVideoTransformer3DModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width", "text_lengths", "padded"),
    [
        (1, 3, 4, 4, [7], 16),  # 12 video tokens, 7 real text tokens of 16
        (2, 2, 4, 6, [5, 16], 16),  # non-square; one row without padding
        (3, 1, 8, 4, [1, 9, 12], 12),  # one frame; a one-token prompt
        (2, 5, 2, 2, [16, 16], 16),  # no padding at all (the mask is all ones)
    ],
)
def test_forward_matches_diffusers(models, batch, frames, height, width, text_lengths, padded) -> None:
    ref, ours = models
    inputs = _inputs(batch, frames, height, width, text_lengths, padded)
    expected, got = _reference(ref, inputs), _ours(ours, inputs)
    assert got.shape == expected.shape == (batch, CHANNELS, frames, height, width) and got.dtype == expected.dtype
    print(f"{batch}x{frames}x{height}x{width} text {text_lengths}: max abs {(got - expected).abs().max().item():.3g}")
    assert torch.equal(got, expected)


def test_real_tokens_without_a_mask_match_the_padded_reference(models) -> None:
    """What the engine passes: each row's real tokens, no mask. The same math as the reference's padding and mask,
    over shorter rows (measured 5.1e-7 and 6.0e-7 on outputs up to 2.2)."""
    ref, ours = models
    inputs = _inputs(2, 3, 4, 6, [7, 11], 16)
    expected = _reference(ref, inputs)
    for row, length in enumerate((7, 11)):
        alone = {key: value[row : row + 1] for key, value in inputs.items()}
        alone["encoder_hidden_states"] = alone["encoder_hidden_states"][:, :length]
        del alone["encoder_attention_mask"]
        torch.testing.assert_close(_ours(ours, alone), expected[row : row + 1], rtol=0, atol=5e-6)


def test_the_padding_never_reaches_the_output(models) -> None:
    _, ours = models
    inputs = _inputs(2, 2, 4, 4, [6, 10], 16)
    before = _ours(ours, inputs)
    inputs["encoder_hidden_states"][0, 6:] = 100.0
    inputs["encoder_hidden_states"][1, 10:] = -50.0
    assert torch.equal(_ours(ours, inputs), before)


def test_rows_are_independent_of_their_batch(models) -> None:
    _, ours = models
    both = _inputs(2, 2, 4, 4, [9, 9], 9)
    together = _ours(ours, {key: value for key, value in both.items() if key != "encoder_attention_mask"})
    alone = {key: value[1:] for key, value in both.items() if key != "encoder_attention_mask"}
    torch.testing.assert_close(together[1:], _ours(ours, alone), rtol=0, atol=1e-6)


def test_every_condition_acts(models) -> None:
    """Timestep, guidance, pooled text and text features each move the output (a port that dropped one, or fed
    the refiner the wrong timestep, could not match by accident)."""
    _, ours = models
    inputs = _inputs(1, 2, 4, 4, [8], 8)
    del inputs["encoder_attention_mask"]
    before = _ours(ours, inputs)
    for key, change in (
        ("timestep", 100.0), ("guidance", 2000.0), ("pooled_projections", 1.0), ("encoder_hidden_states", 1.0),
    ):  # fmt: skip
        moved = {**inputs, key: inputs[key] + change}
        assert (_ours(ours, moved) - before).abs().max().item() > 1e-3, key


def test_rope_tables_equal_the_reference() -> None:
    """Bit-identical cos/sin for the real model's axes (16, 56, 56) at 720p x 129 frames' grid and a small one."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

    reference = HunyuanVideoRotaryPosEmbed(2, 1, [16, 56, 56], 256.0)
    for grid in ((33, 45, 80), (3, 5, 2)):
        expected_cos, expected_sin = reference(torch.zeros(1, 1, grid[0], grid[1] * 2, grid[2] * 2))
        cos, sin = video_rope_tables(grid, (16, 56, 56), 256.0, torch.device("cpu"))
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)


def test_fused_projections_keep_the_output(models) -> None:
    _, ours = models
    inputs = _inputs(2, 2, 4, 6, [5, 12], 12)
    keys = set(ours.state_dict())
    before = _ours(ours, inputs)
    config = ours.config
    assert ours.fuse_projections() == config.num_refiner_layers + 2 * config.num_layers + config.num_single_layers
    try:
        after = _ours(ours, inputs)
        assert set(ours.state_dict()) == keys
    finally:
        ours.unfuse_projections()
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_close_to_diffusers_bf16(models) -> None:
    """bf16 is not bit-identical: our q/k RMSNorms (F.rms_norm) round once where diffusers' round the normalised
    value to bf16 before the weight multiplies it. Ours must stay as close to fp32 as diffusers' bf16 is."""
    ref, ours = models
    inputs = _inputs(2, 2, 4, 6, [5, 12], 12)
    fp32 = _reference(ref, inputs)
    ref_bf16 = diffusers.HunyuanVideoTransformer3DModel.from_config(ref.config).eval()
    ref_bf16.load_state_dict(ref.state_dict())
    ours_bf16 = HunyuanVideoTransformer3DModel.from_config(ours.config).eval()
    ours_bf16.load_state_dict(ours.state_dict())
    ref_bf16.to(torch.bfloat16)
    ours_bf16.to(torch.bfloat16)
    low = dict(inputs)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections", "guidance", "encoder_attention_mask"):
        low[key] = inputs[key].bfloat16()  # the pipeline's dtypes (the timestep stays float32)
    expected, got = _reference(ref_bf16, low), _ours(ours_bf16, low)
    assert got.dtype == expected.dtype == torch.bfloat16
    gap, bf16_error, our_error = _rel_l2(got, expected), _rel_l2(expected, fp32), _rel_l2(got, fp32)
    print(f"bf16: rel L2 vs diffusers bf16 {gap:.3g}; vs fp32: diffusers {bf16_error:.3g}, ours {our_error:.3g}")
    assert gap <= 2e-2 and our_error <= 1.1 * bf16_error


def test_blocks_compile_without_graph_breaks(models) -> None:
    """The declared compile units compile with fullgraph=True (as --enable-torch-compile does it), masked or not."""
    _, loaded = models
    model = HunyuanVideoTransformer3DModel.from_config(loaded.config).eval()
    model.load_state_dict(loaded.state_dict())
    masked = _inputs(2, 2, 4, 4, [5, 8], 8)
    unmasked = {key: value for key, value in _inputs(1, 2, 4, 4, [8], 8).items() if key != "encoder_attention_mask"}
    eager = [_ours(model, masked), _ours(model, unmasked)]
    config = model.config
    assert compile_repeated_blocks(model, backend="aot_eager") == config.num_layers + config.num_single_layers
    torch.testing.assert_close(_ours(model, masked), eager[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(_ours(model, unmasked), eager[1], rtol=0, atol=1e-6)


def test_declares_its_compile_units_and_builds_on_meta() -> None:
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel.from_config(TRANSFORMER_CONFIG)
    assert HunyuanVideoTransformer3DModel._repeated_blocks == ("transformer_blocks", "single_transformer_blocks")
    assert repeated_blocks(model) == [*model.transformer_blocks, *model.single_transformer_blocks]
    assert not list(model.buffers())  # nothing but checkpoint parameters: builds on meta, loads by key
    latents = torch.empty(2, CHANNELS, 5, 6, 8, device="meta")
    assert model.tokens_per_sample(latents) == 5 * 3 * 4


def test_unsupported_configs_and_inputs_are_refused(models) -> None:
    with pytest.raises(ValueError, match="image-to-video"):
        HunyuanVideoTransformerConfig.from_dict({**TRANSFORMER_CONFIG, "image_condition_type": "token_replace"})
    with pytest.raises(ValueError, match="rope_axes_dim"):
        HunyuanVideoTransformerConfig.from_dict({**TRANSFORMER_CONFIG, "rope_axes_dim": [2, 4, 6]})
    with pytest.raises(ValueError, match="qk_norm"):
        HunyuanVideoTransformerConfig.from_dict({**TRANSFORMER_CONFIG, "qk_norm": "layer_norm"})
    _, ours = models
    inputs = _inputs(1, 2, 4, 4, [8], 8)
    with pytest.raises(ValueError, match="guidance"):
        _ours(ours, {**inputs, "guidance": None})
    with pytest.raises(ValueError, match="timestep"):
        _ours(ours, {**inputs, "timestep": torch.ones(3)})
