"""Tests for the offline fixture builder ``sgl_diffusion.testing``."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from determinism import deterministic_cpu, own_aligned_memory
from sgl_diffusion.testing import FIXTURE_REGISTRY, FIXTURES, build_fixture

# diffusers / transformers / huggingface_hub are imported lazily (inside the fixtures below), so this
# still takes effect for them; the rebuild subprocess inherits it too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = (
    "a photo of a cat",
    "A Fox in the SNOW, highly detailed, 4k!",
    "dance monkey",
    "héllo wörld — ünknown wörds 12345 zebra's",
    "",
)


def _tree_hashes(root: pathlib.Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _run(pipe, prompt: str = "a photo of a cat", **kwargs) -> np.ndarray:
    call = dict(FIXTURE_REGISTRY["flux1_dev"].call_kwargs)
    call.update(kwargs)
    out = pipe(
        prompt=prompt,
        generator=torch.Generator("cpu").manual_seed(0),
        **call,
    ).images
    return np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fixture("flux1_dev", tmp_path_factory.mktemp("flux1_dev") / "model")


@pytest.fixture(scope="module")
def flux_pipe(flux_dir: pathlib.Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux_latents(flux_pipe) -> np.ndarray:
    return _run(flux_pipe, output_type="latent")


def test_registry() -> None:
    assert "flux1_dev" in FIXTURES
    assert FIXTURE_REGISTRY["flux1_dev"].pipeline_class == "FluxPipeline"
    with pytest.raises(KeyError):
        build_fixture("no_such_family", "/nonexistent/never-created")


def test_layout(flux_dir: pathlib.Path) -> None:
    files = set(_tree_hashes(flux_dir))
    for comp in ("transformer", "vae"):
        assert f"{comp}/config.json" in files
        assert f"{comp}/diffusion_pytorch_model.safetensors" in files
    for comp in ("text_encoder", "text_encoder_2"):
        assert f"{comp}/config.json" in files
        assert f"{comp}/model.safetensors" in files
    assert "tokenizer/tokenizer.json" in files
    assert "tokenizer_2/tokenizer.json" in files
    assert "scheduler/scheduler_config.json" in files
    assert "model_index.json" in files
    with pytest.raises(FileExistsError):
        build_fixture("flux1_dev", flux_dir)


def test_flux1_dev_runs(flux_pipe) -> None:
    img = _run(flux_pipe, output_type="np")
    assert img.shape == (1, 32, 32, 3)
    assert np.isfinite(img).all()
    assert img.std() > 1e-3


def test_no_constant_params(flux_pipe) -> None:
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        for name, p in getattr(flux_pipe, comp).named_parameters():
            assert p.dtype == torch.float32, (comp, name)
            if p.numel() > 1:
                flat = p.detach().reshape(-1)
                assert not torch.all(flat == flat[0]), f"{comp}.{name} is constant"


def test_latents_reproducible_and_prompt_sensitive(flux_pipe, flux_latents) -> None:
    assert flux_latents.shape == (1, 4, 64)
    assert np.isfinite(flux_latents).all()
    assert flux_latents.std() > 0.1
    again = _run(flux_pipe, output_type="latent")
    np.testing.assert_array_equal(again, flux_latents)
    other = _run(flux_pipe, prompt="a dragon flying over a medieval castle", output_type="latent")
    rel = np.linalg.norm(other - flux_latents) / np.linalg.norm(flux_latents)
    assert rel > 1e-3, rel


def test_tokenizer_json_matches_transformers(flux_dir: pathlib.Path, flux_pipe) -> None:
    from tokenizers import Tokenizer

    clip = Tokenizer.from_file(str(flux_dir / "tokenizer" / "tokenizer.json"))
    t5 = Tokenizer.from_file(str(flux_dir / "tokenizer_2" / "tokenizer.json"))
    tok, tok2 = flux_pipe.tokenizer, flux_pipe.tokenizer_2

    # openai-CLIP layout: specials are the last two ids; pad = eos.
    n = len(tok)
    assert tok.bos_token_id == n - 2 and tok.eos_token_id == n - 1
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.model_max_length == 77
    assert flux_pipe.text_encoder.config.eos_token_id == tok.eos_token_id
    assert flux_pipe.text_encoder.config.vocab_size == n
    assert (tok2.pad_token_id, tok2.eos_token_id, tok2.unk_token_id) == (0, 1, 2)
    assert flux_pipe.text_encoder_2.config.vocab_size == len(tok2)

    for prompt in PROMPTS:
        assert clip.encode(prompt).ids == tok(prompt).input_ids, prompt
        assert t5.encode(prompt).ids == tok2(prompt).input_ids, prompt
    # corpus words are single tokens
    assert tok("a photo of a cat").input_ids[1:-1] == [
        tok.convert_tokens_to_ids(w + "</w>") for w in ("a", "photo", "of", "a", "cat")
    ]
    assert tok2.tokenize("a photo of a cat") == ["▁a", "▁photo", "▁of", "▁a", "▁cat"]


def test_build_is_deterministic(flux_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # Rebuild in a fresh interpreter with a different hash seed: catches any dependence on set/dict
    # hash order or on global state left over from the first build.
    other = tmp_path / "rebuild"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    src = str(pathlib.Path(__file__).resolve().parents[2] / "python")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    subprocess.run(
        [sys.executable, "-m", "sgl_diffusion.testing", "flux1_dev", str(other)],
        check=True,
        env=env,
        capture_output=True,
    )
    assert _tree_hashes(other) == _tree_hashes(flux_dir)


def test_sharded_build_reloads_identically(flux_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from diffusers import FluxPipeline

    out = build_fixture("flux1_dev", tmp_path / "sharded", max_shard_size="100KB")
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (out / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert len(list((out / "transformer").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    pipes = [FluxPipeline.from_pretrained(folder) for folder in (flux_dir, out)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    # Sharding must not change a single weight (values, dtypes, names) ...
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        whole, split = (getattr(pipe, name).state_dict() for pipe in pipes)
        assert whole.keys() == split.keys(), name
        for key, tensor in whole.items():
            assert tensor.dtype == split[key].dtype and torch.equal(tensor, split[key]), f"{name}.{key}"
    # ... so the same computation on them must give the same bits. diffusers leaves its CPU weights
    # as views of the memory-mapped files, whose alignment depends on where the save put each
    # tensor (it differs between the two folders), and BLAS kernels may sum in another order for
    # another alignment; the intra-op thread count splits reductions too. Both are held fixed.
    for pipe in pipes:
        own_aligned_memory(pipe)
    with deterministic_cpu():
        unsharded, sharded = (_run(pipe, output_type="latent") for pipe in pipes)
    np.testing.assert_array_equal(sharded, unsharded)
