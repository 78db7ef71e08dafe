"""The GLM-Image fixture: a deterministic build whose processor and tokenizers reload as built."""

from __future__ import annotations

import pathlib

import pytest

from sgl_diffusion.testing import build_fixture, build_pipeline
from sgl_diffusion.testing.glm_image import CODEBOOK, IMAGE_START, IMAGE_TOKEN


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fixture("glm_image", tmp_path_factory.mktemp("glm") / "model")


def test_build_is_deterministic(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = build_fixture("glm_image", tmp_path / "again")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name


def test_processor_reloads_with_its_special_tokens(folder: pathlib.Path) -> None:
    from transformers import AutoProcessor

    built = build_pipeline("glm_image").processor
    loaded = AutoProcessor.from_pretrained(str(folder / "processor"))
    assert (loaded.image_token, loaded.grid_bos_token, loaded.grid_eos_token) == (IMAGE_TOKEN, "<sop>", "<eop>")
    assert loaded.bos_token == IMAGE_START
    messages = [[{"role": "user", "content": [{"type": "text", "text": "a 'red' fox"}]}]]
    kwargs = {"tokenize": True, "target_h": 64, "target_w": 96, "return_dict": True, "return_tensors": "pt"}
    ours, theirs = built.apply_chat_template(messages, **kwargs), loaded.apply_chat_template(messages, **kwargs)
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    # Target grid (2x3 tokens of 32 pixels), then the preview grid; the prompt ends with the image start.
    assert theirs["image_grid_thw"].tolist() == [[1, 2, 3], [1, 13, 19]]
    assert theirs["input_ids"][0, -1].item() == loaded.tokenizer.convert_tokens_to_ids(IMAGE_START)


def test_prior_samples_only_codebook_ids(folder: pathlib.Path) -> None:
    from transformers import GlmImageForConditionalGeneration

    prior = GlmImageForConditionalGeneration.from_pretrained(str(folder / "vision_language_encoder"))
    assert prior.lm_head.out_features == CODEBOOK
    assert prior.generation_config.do_sample
    assert prior.config.image_end_token_id >= CODEBOOK  # the prior can never stop before its grids
