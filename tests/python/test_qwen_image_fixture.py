"""The Qwen-Image fixture: real diffusers layout, reloads offline, runs in QwenImagePipeline, deterministic."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import pytest
import torch

from sgl_diffusion.models.qwen_image.prompt import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS
from sgl_diffusion.testing import FIXTURE_REGISTRY, FIXTURES, build_fixture

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAME = "qwen_image"


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fixture(NAME, tmp_path_factory.mktemp(NAME) / "model")


@pytest.fixture(scope="module")
def qwen_pipe(qwen_dir: pathlib.Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, prompt: str = "a photo of a cat", **kwargs) -> np.ndarray:
    call = dict(FIXTURE_REGISTRY[NAME].call_kwargs)
    call.update(kwargs)
    out = pipe(prompt, negative_prompt=" ", generator=torch.Generator("cpu").manual_seed(0), **call).images
    return np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)


def test_registered() -> None:
    assert NAME in FIXTURES
    spec = FIXTURE_REGISTRY[NAME]
    assert spec.pipeline_class == "QwenImagePipeline"
    assert spec.call_kwargs["true_cfg_scale"] > 1  # the real model's default guidance: true CFG


def test_layout(qwen_dir: pathlib.Path) -> None:
    files = set(_tree_hashes(qwen_dir))
    assert {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    } <= files


def test_scheduler_is_qwen_images(qwen_pipe) -> None:
    config = qwen_pipe.scheduler.config
    assert type(qwen_pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert config.use_dynamic_shifting and config.time_shift_type == "exponential"
    assert (config.base_image_seq_len, config.max_image_seq_len) == (256, 8192)
    assert (config.base_shift, config.max_shift, config.shift_terminal) == (0.5, 0.9, 0.02)


def test_template_crop_lands_on_the_prompt(qwen_pipe) -> None:
    tok = qwen_pipe.tokenizer
    assert qwen_pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert qwen_pipe.prompt_template_encode_start_idx == TEMPLATE_PREFIX_TOKENS
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tok(prefix).input_ids) == TEMPLATE_PREFIX_TOKENS
    kept = tok(PROMPT_TEMPLATE.format("a photo of a cat")).input_ids[TEMPLATE_PREFIX_TOKENS:]
    assert tok.convert_ids_to_tokens(kept)[:5] == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat"]
    # The text encoder's config names the tokenizer's ids.
    config = qwen_pipe.text_encoder.config
    assert config.text_config.vocab_size == len(tok)
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")


def test_tokenizer_json_matches_transformers(qwen_dir: pathlib.Path, qwen_pipe) -> None:
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(qwen_dir / "tokenizer" / "tokenizer.json"))
    for text in ("a photo of a cat", "héllo wörld — 12345 zebra's", "", PROMPT_TEMPLATE.format("dance monkey")):
        assert raw.encode(text).ids == qwen_pipe.tokenizer(text).input_ids, text


def test_no_constant_params(qwen_pipe) -> None:
    for comp in ("transformer", "vae", "text_encoder"):
        for name, p in getattr(qwen_pipe, comp).named_parameters():
            assert p.dtype == torch.float32, (comp, name)
            if p.numel() > 1:
                flat = p.detach().reshape(-1)
                assert not torch.all(flat == flat[0]), f"{comp}.{name} is constant"


def test_runs_with_true_cfg_reproducibly(qwen_pipe) -> None:
    latents = _run(qwen_pipe, output_type="latent")
    assert latents.shape == (1, 16, 64)  # 64x64 px -> 8x8 latents -> 4x4 packed 2x2 patches of 16 ch
    assert np.isfinite(latents).all() and latents.std() > 0.1
    np.testing.assert_array_equal(_run(qwen_pipe, output_type="latent"), latents)
    other = _run(qwen_pipe, prompt="a dragon flying over a medieval castle", output_type="latent")
    assert np.linalg.norm(other - latents) / np.linalg.norm(latents) > 0.05  # the prompt matters
    image = _run(qwen_pipe, output_type="np")
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 1e-3


def test_build_is_deterministic(qwen_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # In-process (a fresh interpreter costs ~10 s of imports here); independence from the hash seed is what
    # the deterministic BPE learner guarantees, and test_fixtures.py checks that in a subprocess.
    assert _tree_hashes(build_fixture(NAME, tmp_path / "rebuild")) == _tree_hashes(qwen_dir)
