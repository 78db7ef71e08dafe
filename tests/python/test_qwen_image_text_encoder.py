"""Our Qwen-Image prompt encoding equals QwenImagePipeline.encode_prompt on the tiny fixture, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sgl_diffusion.loading import load_transformers_model
from sgl_diffusion.models.qwen_image.text_encoder import encode_prompts
from sgl_diffusion.testing import build_fixture

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("qwen_image", tmp_path_factory.mktemp("qwen_image") / "model")


@pytest.fixture(scope="module")
def reference(qwen_dir: Path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def encoder_and_tokenizer(qwen_dir: Path):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    encoder = load_transformers_model(
        Qwen2_5_VLForConditionalGeneration, qwen_dir / "text_encoder", torch.device("cpu"), torch.float32
    )
    return encoder, AutoTokenizer.from_pretrained(str(qwen_dir / "tokenizer"))


@pytest.mark.parametrize(
    ("prompts", "max_sequence_length"),
    [
        # two prompts of different lengths: the shorter is zero-padded and masked
        (["a photo of a cat", "a dragon flying over a medieval castle at sunset, highly detailed"], 512),
        # the crop at max_sequence_length cuts the longer one only
        (["dance monkey", "a dragon flying over a medieval castle at sunset, highly detailed"], 9),
        # cut below both lengths: equal rows, so no mask
        (["dance monkey", "a dragon flying over a medieval castle"], 4),
        # the default negative prompt, an empty prompt and unknown words (byte fallback)
        ([" ", "", "héllo wörld — zebra's 12345"], 64),
        (["a photo of a cat"], 512),
    ],
)
def test_matches_encode_prompt(reference, encoder_and_tokenizer, prompts: list[str], max_sequence_length: int) -> None:
    encoder, tokenizer = encoder_and_tokenizer
    expected, expected_mask = reference.encode_prompt(
        prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length
    )
    ours = encode_prompts(encoder, tokenizer, prompts, max_sequence_length=max_sequence_length)
    assert ours.embeds.dtype == expected.dtype and torch.equal(ours.embeds, expected)
    if expected_mask is None:
        assert ours.mask is None
    else:
        assert ours.mask is not None and ours.mask.dtype == expected_mask.dtype
        assert torch.equal(ours.mask, expected_mask)
    assert len(ours.lengths) == len(prompts) and max(ours.lengths) == expected.shape[1]


def test_padding_rows_are_zero_and_prompts_differ(encoder_and_tokenizer) -> None:
    encoder, tokenizer = encoder_and_tokenizer
    out = encode_prompts(encoder, tokenizer, ["a cat", "a photo of a dog sitting on a red sofa"])
    short, long = out.lengths
    assert short < long and out.mask is not None
    assert out.mask[0].tolist() == [1] * short + [0] * (long - short)
    assert torch.count_nonzero(out.embeds[0, short:]) == 0
    assert out.embeds[0, :short].abs().sum() > 0


def test_bad_arguments(encoder_and_tokenizer) -> None:
    encoder, tokenizer = encoder_and_tokenizer
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_prompts(encoder, tokenizer, ["a cat"], max_sequence_length=1025)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompts(encoder, tokenizer, [])
