"""Model resolution and weight loading: local folders, the Hugging Face cache, shards, precisions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import T5EncoderModel

from conftest import SMALL
from determinism import deterministic_cpu, is_aligned
from sgl_diffusion import DiffGenerator, _native
from sgl_diffusion.layers.attention import resolve_attention_backend
from sgl_diffusion.loading import load_native_model, load_transformers_model
from sgl_diffusion.models.flux import FluxTransformer2DModel
from sgl_diffusion.testing import build_fixture


def test_sharded_checkpoints_load_to_the_same_output(flux_dir: Path, tmp_path: Path, generator) -> None:
    sharded = build_fixture("flux1_dev", tmp_path / "sharded", max_shard_size="100KB")
    files = _native.component_weight_files(str(sharded / "transformer"))
    assert len(files) > 1
    gen = DiffGenerator.from_pretrained(sharded, device="cpu", dit_precision="fp32", vae_precision="fp32")
    # The same weights, so the same bits: the loader gives every CPU weight aligned memory of its own
    # whatever the file layout (next test), and the thread count, which splits reductions, is held
    # fixed for both runs.
    try:
        with deterministic_cpu():
            ours = gen.generate("a cat", seed=5, output_type="np", **SMALL).images[0]
            expected = generator.generate("a cat", seed=5, output_type="np", **SMALL).images[0]
    finally:
        gen.shutdown()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_cpu_weights_do_not_depend_on_the_file_layout(flux_dir: Path, tmp_path: Path, component: str) -> None:
    # safetensors' CPU tensors are views of the memory-mapped file, aligned to their byte offset in
    # it (which sharding changes); the loader copies them so that kernels see the same 64-byte
    # alignment, hence the same summation order, for a sharded and an unsharded checkpoint.
    sharded = build_fixture("flux1_dev", tmp_path / "sharded", max_shard_size="100KB")
    cpu = torch.device("cpu")
    models = []
    for folder in (flux_dir, sharded):
        if component == "transformer":
            models.append(load_native_model(FluxTransformer2DModel.from_config, folder / component, cpu, torch.float32))
        else:
            models.append(load_transformers_model(T5EncoderModel, folder / component, cpu, torch.float32))
    whole, split = (model.state_dict() for model in models)
    assert whole.keys() == split.keys()
    for name, tensor in whole.items():
        assert torch.equal(tensor, split[name]), name
        assert is_aligned(tensor) and is_aligned(split[name]), name
    if component == "text_encoder_2":  # copying kept the tied embedding tied
        assert models[1].shared.weight is models[1].encoder.embed_tokens.weight


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    sharded = build_fixture("flux1_dev", tmp_path / "sharded", max_shard_size="100KB")
    victim = min((sharded / "transformer").glob("*-00002-of-*.safetensors"))
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        _native.component_weight_files(str(sharded / "transformer"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_load_in_the_requested_precision(flux_dir: Path, dtype: torch.dtype) -> None:
    model = load_native_model(FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not any(p.is_meta for p in model.parameters())


def test_reduced_precision_engine_runs(flux_dir: Path) -> None:
    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="bf16", vae_precision="bf16")
    try:
        assert gen.info["dit_precision"] == "bf16"
        image = gen.generate("a cat", seed=1, output_type="np", **SMALL).images[0]
    finally:
        gen.shutdown()
    assert image.dtype == np.float32 and np.isfinite(image).all()


def test_hugging_face_ids_resolve_from_the_local_cache(flux_dir: Path, tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev"
    shutil.copytree(flux_dir, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    folder, hf_id, pipeline_class = _native.resolve_model("black-forest-labs/FLUX.1-dev")
    assert Path(folder) == repo / "snapshots" / "0123abc"
    assert (hf_id, pipeline_class) == ("black-forest-labs/FLUX.1-dev", "FluxPipeline")
    gen = DiffGenerator.from_pretrained("black-forest-labs/FLUX.1-dev", device="cpu")
    try:
        # A known id brings the model card's defaults.
        assert gen.info["hf_id"] == "black-forest-labs/FLUX.1-dev"
        assert gen.info["defaults"]["num_inference_steps"] == 28
    finally:
        gen.shutdown()


def test_hf_home_is_honoured(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert _native.hf_cache_dir() == str(tmp_path / "hf" / "hub")


def test_unsupported_pipelines_and_backends_fail_clearly(flux_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(flux_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "SomeOtherPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    # --backend auto tries diffusers for a class with no native family; it has none of that name either.
    with pytest.raises(
        _native.ModelLoadError, match="SomeOtherPipeline: diffusers has no pipeline class .*FluxPipeline"
    ):
        DiffGenerator.from_pretrained(other, device="cpu")
    with pytest.raises(
        _native.ModelLoadError, match="SomeOtherPipeline, which has no native .*supported: .*FluxPipeline"
    ):
        DiffGenerator.from_pretrained(other, device="cpu", backend="native")
    with pytest.raises(
        _native.ModelLoadError, match=r"unknown attention backend 'vsa' \(did you mean 'video_sparse_attn'"
    ):
        DiffGenerator.from_pretrained(flux_dir, device="cpu", attention_backend="vsa")
    with pytest.raises(ValueError, match="available: torch_sdpa"):
        resolve_attention_backend("nonsense")
    with pytest.raises(_native.ModelLoadError, match="dit_precision must be one of"):
        DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="fp8")


def test_safetensors_headers_are_read_without_loading(flux_dir: Path) -> None:
    (file,) = _native.component_weight_files(str(flux_dir / "transformer"))
    tensors = {name: (dtype, shape) for name, dtype, shape in _native.safetensors_tensors(file)}
    assert tensors["x_embedder.weight"] == ("F32", [32, 64])
    assert "transformer_blocks.0.attn.add_q_proj.weight" in tensors


def test_per_parameter_precision_matches_diffusers(tmp_path: Path) -> None:
    # Wan keeps its modulation tables and norms in float32 under bf16, as diffusers' loader does.
    from diffusers import WanTransformer3DModel as DiffusersWan

    from sgl_diffusion.models.wan import WanTransformer3DModel

    folder = build_fixture("wan21_t2v", tmp_path / "wan")
    ours = load_native_model(
        WanTransformer3DModel.from_config, folder / "transformer", torch.device("cpu"), torch.bfloat16
    )
    reference = DiffusersWan.from_pretrained(folder / "transformer", torch_dtype=torch.bfloat16)
    expected = {name: p.dtype for name, p in reference.state_dict().items()}
    assert {name: p.dtype for name, p in ours.state_dict().items()} == expected
    assert torch.float32 in expected.values() and torch.bfloat16 in expected.values()
