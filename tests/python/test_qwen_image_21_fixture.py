"""The Qwen-Image 2.1 fixture: published layout, deterministic, its processor reloads without torchvision."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch

from sgl_diffusion.models.qwen_image_21.prompt import T2I_TEMPLATE
from sgl_diffusion.models.qwen_image_21.vision import load_image_text_processor
from sgl_diffusion.testing import FIXTURE_REGISTRY, FIXTURES, build_fixture, build_pipeline

NAME = "qwen_image_21"


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fixture(NAME, tmp_path_factory.mktemp(NAME) / "model")


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline(NAME)


def test_registered() -> None:
    assert NAME in FIXTURES
    assert FIXTURE_REGISTRY[NAME].pipeline_class == "QwenImage21Pipeline"


def test_published_layout(folder: pathlib.Path) -> None:
    assert {
        "model_index.json",
        "processor/chat_template.jinja",
        "processor/processor_config.json",
        "processor/tokenizer.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    } <= set(_tree_hashes(folder))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert index["text_encoder"] == ["transformers", "Qwen3VLForConditionalGeneration"]
    assert index["sample_sigmas"] is None


def test_the_system_turn_is_what_is_dropped(pipe) -> None:
    tokenizer = pipe.processor.tokenizer
    ids = tokenizer(T2I_TEMPLATE.format("a photo of a cat")).input_ids
    kept = tokenizer.convert_ids_to_tokens(ids[pipe._drop_idx :])
    assert kept[:3] == ["<|im_start|>", "user", "Ċ"]
    assert kept[3:8] == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat"]  # template words are single tokens
    config = pipe.text_encoder.config
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_the_saved_processor_reloads_without_torchvision(folder: pathlib.Path, pipe) -> None:
    processor = load_image_text_processor(folder / "processor")
    texts = [T2I_TEMPLATE.format("a photo of a cat"), T2I_TEMPLATE.format(" ")]
    kwargs = {"padding": True, "padding_side": "left", "return_tensors": "pt"}
    mine, theirs = processor(text=texts, **kwargs), pipe.processor(text=texts, **kwargs)
    assert set(mine) == set(theirs) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    for key in mine:
        assert torch.equal(mine[key], theirs[key])
    system = [{"role": "system", "content": [{"type": "text", "text": "x"}]}]
    assert processor.apply_chat_template(system) == pipe.processor.apply_chat_template(system)


def test_no_constant_params(pipe) -> None:
    for component in ("transformer", "vae", "text_encoder"):
        for name, p in getattr(pipe, component).named_parameters():
            if p.numel() > 1:
                flat = p.detach().reshape(-1)
                assert not torch.all(flat == flat[0]), f"{component}.{name} is constant"


def test_build_is_deterministic(folder: pathlib.Path, tmp_path: pathlib.Path) -> None:
    assert _tree_hashes(build_fixture(NAME, tmp_path / "rebuild")) == _tree_hashes(folder)
