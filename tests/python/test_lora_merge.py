"""LoRA files read in diffusers' layouts and merged exactly into our denoisers, against diffusers itself.

The oracle: diffusers' `load_lora_weights` + `fuse_lora` (+ `unload_lora_weights`, which keeps the fused
weights) on the same tiny checkpoint and file; our merged model's state dict must equal the fused one (both
are named by the checkpoint's keys). Unmerge must give the base back bit for bit, after any number of cycles.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_files import FLUX_MODULES, peft_key, random_lora, save_lora
from sgl_diffusion.loading import load_native_model
from sgl_diffusion.lora import LoraError, MergedLoras, read_lora
from sgl_diffusion.models.flux import FluxTransformer2DModel
from sgl_diffusion.models.wan import WanTransformer3DModel
from sgl_diffusion.testing import build_fixture

CPU = torch.device("cpu")


def ours_flux(folder: Path) -> FluxTransformer2DModel:
    return load_native_model(FluxTransformer2DModel.from_config, folder / "transformer", CPU, torch.float32)


def diffusers_fused(pipeline_cls: type, folder: Path, loras: list[tuple[Path, float]], **load: object) -> dict:
    """The transformer's state dict after diffusers fuses `loras` one after another, each at its strength (load,
    fuse, unload: the fused weights stay)."""
    pipe = pipeline_cls.from_pretrained(folder)
    for path, strength in loras:
        pipe.load_lora_weights(str(path), **load)
        pipe.fuse_lora(lora_scale=strength)
        pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


def assert_state_equal(ours: torch.nn.Module, expected: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    mine = ours.state_dict()
    assert set(expected) <= set(mine)
    worst = max(float((mine[k] - expected[k]).abs().max()) for k in expected)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def flux_folder(flux_dir: Path) -> Path:
    return flux_dir


@pytest.mark.parametrize("alpha", [None, 8.0])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_a_peft_lora_merges_as_diffusers_fuses_it(flux_folder: Path, tmp_path: Path, alpha, strength) -> None:
    from diffusers import FluxPipeline

    model = ours_flux(flux_folder)
    path = save_lora(random_lora(model, FLUX_MODULES, 4, 0, peft_key, alpha), tmp_path / "peft.safetensors")
    adapter = read_lora(path, "FluxPipeline")
    assert sorted(adapter.modules) == sorted(FLUX_MODULES)
    assert all(m.rank == 4 and m.alpha == alpha for m in adapter.modules.values())
    merged = MergedLoras(model)
    merged.merge([(adapter, strength)])
    assert_state_equal(model, diffusers_fused(FluxPipeline, flux_folder, [(path, strength)]), atol=1e-6)


def test_stacked_adapters_merge_in_order_and_unmerge_bit_for_bit(flux_folder: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    model = ours_flux(flux_folder)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    first = save_lora(random_lora(model, FLUX_MODULES, 4, 1, peft_key), tmp_path / "first.safetensors")
    second = save_lora(random_lora(model, FLUX_MODULES[2:], 2, 2, peft_key, 4.0), tmp_path / "second.safetensors")
    merged = MergedLoras(model)
    pairs = [(read_lora(first, "FluxPipeline"), 0.5), (read_lora(second, "FluxPipeline"), 1.3)]
    merged.merge(pairs)
    fused = diffusers_fused(FluxPipeline, flux_folder, [(first, 0.5), (second, 1.3)])
    assert_state_equal(model, fused, atol=1e-6)
    merged.unmerge()
    assert_state_equal(model, base)
    # Many switches never drift the base.
    for cycle in range(100):
        merged.merge([pairs[cycle % 2]])
        merged.unmerge()
    assert_state_equal(model, base)


def test_merging_in_bf16_rounds_once_from_the_fp32_sum(flux_folder: Path, tmp_path: Path) -> None:
    model = ours_flux(flux_folder).to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = random_lora(model, FLUX_MODULES[:1], 4, 3, peft_key)
    adapter = read_lora(save_lora(tensors, tmp_path / "one.safetensors"), "FluxPipeline")
    MergedLoras(model).merge([(adapter, 1.0)])
    name = f"{FLUX_MODULES[0]}.weight"
    down, up = tensors[peft_key(FLUX_MODULES[0], "down")], tensors[peft_key(FLUX_MODULES[0], "up")]
    expected = (base[name].float() + (up @ down) * 1.0).to(torch.bfloat16)
    assert torch.equal(model.state_dict()[name], expected)


def test_an_adapter_for_another_model_is_refused_naming_the_key_and_the_model_is_untouched(
    flux_folder: Path, tmp_path: Path
) -> None:
    model = ours_flux(flux_folder)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    good = random_lora(model, FLUX_MODULES[:2], 4, 4, peft_key)
    # A module this model does not have.
    missing = {**good, "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(8, 4)}  # fmt: skip
    adapter = read_lora(save_lora(missing, tmp_path / "missing.safetensors"), "FluxPipeline")
    merged = MergedLoras(model)
    with pytest.raises(
        LoraError, match=r"transformer\.blocks\.7\.attn1\.to_q\.lora_A\.weight: the model has no module"
    ):
        merged.merge([(adapter, 1.0)])
    # A shape that does not fit (the wrong rank layout: lora_A transposed).
    name = FLUX_MODULES[0]
    wrong = {**good, peft_key(name, "down"): good[peft_key(name, "down")].T.contiguous(),
             peft_key(name, "up"): good[peft_key(name, "up")].T.contiguous()}  # fmt: skip
    with pytest.raises(LoraError, match=rf"transformer\.{name}\.lora_A\.weight"):
        merged.merge([(read_lora(save_lora(wrong, tmp_path / "wrong.safetensors"), "FluxPipeline"), 1.0)])
    # Half a pair.
    half = {k: v for k, v in good.items() if k != peft_key(name, "up")}
    with pytest.raises(LoraError, match=rf"transformer\.{name}\.lora_B\.weight: missing"):
        read_lora(save_lora(half, tmp_path / "half.safetensors"), "FluxPipeline")
    # A truncated file.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "missing.safetensors").read_bytes()[:100])
    with pytest.raises(LoraError, match="no LoRA file diffusers can read"):
        read_lora(cut, "FluxPipeline")
    assert_state_equal(model, base)


def kohya_flux_key(name: str, part: str) -> str:
    suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[part]
    return f"lora_unet_{name.replace('.', '_')}.{suffix}"


def test_a_kohya_flux_lora_merges_as_diffusers_fuses_it(flux_folder: Path, tmp_path: Path) -> None:
    """kohya's FLUX layout (`lora_unet_double_blocks_0_img_attn_qkv`, fused QKV split by diffusers' converter)."""
    from diffusers import FluxPipeline

    model = ours_flux(flux_folder)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    gen = torch.Generator().manual_seed(5)
    rank = 4
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, inner, generator=gen) * 0.1,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * inner, rank, generator=gen) * 0.1,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(
            rank, model.single_transformer_blocks[0].proj_out.weight.shape[1], generator=gen
        )
        * 0.1,
        "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.randn(inner, rank, generator=gen) * 0.1,
        "lora_unet_single_blocks_0_linear2.alpha": torch.tensor(4.0),
    }
    path = save_lora(tensors, tmp_path / "kohya.safetensors")
    adapter = read_lora(path, "FluxPipeline")
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"} <= set(adapter.modules)
    MergedLoras(model).merge([(adapter, 0.8)])
    assert_state_equal(model, diffusers_fused(FluxPipeline, flux_folder, [(path, 0.8)]), atol=1e-6)


def wan_original_key(name: str, part: str) -> str:
    suffix = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}[part]
    return f"diffusion_model.{name}.{suffix}"


def test_an_original_wan_lora_merges_as_diffusers_fuses_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wan's own layout (`diffusion_model.blocks.0.self_attn.q`, lightx2v's distill LoRAs among them), with its
    `diff_b` bias deltas, into both the model's naming and diffusers' fused result."""
    from diffusers import WanPipeline

    folder = build_fixture("wan21_t2v", tmp_path_factory.mktemp("wan_lora") / "model")
    model = load_native_model(WanTransformer3DModel.from_config, folder / "transformer", CPU, torch.float32)
    gen = torch.Generator().manual_seed(6)
    rank, dim = 4, model.config.num_attention_heads * model.config.attention_head_dim
    tensors: dict[str, torch.Tensor] = {}
    for block in range(len(model.blocks)):
        for original in ("self_attn.q", "self_attn.o", "cross_attn.k", "ffn.0"):
            name = f"blocks.{block}.{original}"
            out_features = model.blocks[block].ffn.net[0].proj.weight.shape[0] if original == "ffn.0" else dim
            tensors[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, dim, generator=gen) * 0.1
            tensors[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
            tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(8.0)
            tensors[f"diffusion_model.{name}.diff_b"] = torch.randn(out_features, generator=gen) * 0.1
    path = save_lora(tensors, tmp_path_factory.mktemp("wan_lora_file") / "wan.safetensors")
    adapter = read_lora(path, "WanPipeline")
    assert "blocks.0.attn1.to_q" in adapter.modules and adapter.modules["blocks.0.attn1.to_q"].up_bias is not None
    MergedLoras(model).merge([(adapter, 0.7)])
    assert_state_equal(model, diffusers_fused(WanPipeline, folder, [(path, 0.7)]), atol=1e-6)


def test_an_xlabs_flux_lora_merges_as_diffusers_fuses_it(flux_dir: Path, tmp_path: Path) -> None:
    """XLabs' FLUX.1 layout (`double_blocks.0.processor.qkv_lora1`, fused QKV and output projections)."""
    from diffusers import FluxPipeline

    model = ours_flux(flux_dir)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    gen = torch.Generator().manual_seed(7)
    rank = 4

    def pair(prefix: str, out_features: int) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.down.weight": torch.randn(rank, inner, generator=gen) * 0.1,
            f"{prefix}.up.weight": torch.randn(out_features, rank, generator=gen) * 0.1,
        }

    tensors = {
        **pair("double_blocks.0.processor.qkv_lora1", 3 * inner),
        **pair("double_blocks.0.processor.qkv_lora2", 3 * inner),
        **pair("double_blocks.0.processor.proj_lora1", inner),
        **pair("double_blocks.0.processor.proj_lora2", inner),
    }
    path = save_lora(tensors, tmp_path / "xlabs.safetensors")
    adapter = read_lora(path, "FluxPipeline")
    assert {"transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out"} <= set(adapter.modules)
    MergedLoras(model).merge([(adapter, 0.9)])
    assert_state_equal(model, diffusers_fused(FluxPipeline, flux_dir, [(path, 0.9)]), atol=1e-6)


def test_compiled_blocks_run_the_merged_weights_not_stale_ones(flux_dir: Path, tmp_path: Path) -> None:
    """torch.compile takes parameters as graph inputs: a merge after compilation is what the compiled blocks run
    (no recompilation), and an unmerge gives the base output back bit for bit. (CUDA graphs: test_cuda_graphs.py.)"""
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    eager = ours_flux(flux_dir)
    compiled = ours_flux(flux_dir)
    compile_repeated_blocks(compiled, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, compiled.config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, 8, compiled.config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(1, compiled.config.pooled_projection_dim, generator=gen),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "guidance": torch.tensor([3.5]),
    }
    with torch.no_grad():
        base = compiled(**inputs)
        adapter = read_lora(save_lora(random_lora(compiled, FLUX_MODULES, 4, 8, scale=0.3), tmp_path / "l.safetensors"),
                            "FluxPipeline")  # fmt: skip
        MergedLoras(eager).merge([(adapter, 1.0)])
        merged = MergedLoras(compiled)
        merged.merge([(adapter, 1.0)])
        styled = compiled(**inputs)
        torch.testing.assert_close(styled, eager(**inputs), rtol=0, atol=1e-6)
        assert (styled - base).abs().max() > 1e-3
        merged.unmerge()
        assert torch.equal(compiled(**inputs), base)


def test_a_comfyui_flux_lora_merges_as_diffusers_fuses_it(flux_dir: Path, tmp_path: Path) -> None:
    """ComfyUI / ai-toolkit's FLUX.1 layout: the original checkpoint's names (`diffusion_model.double_blocks.0.img_attn.qkv`)
    with kohya's `lora_down` / `lora_up` / `alpha`."""
    from diffusers import FluxPipeline

    model = ours_flux(flux_dir)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    gen = torch.Generator().manual_seed(9)
    tensors = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, inner, generator=gen) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(3 * inner, 4, generator=gen) * 0.1,
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
        "diffusion_model.double_blocks.0.txt_mlp.0.lora_down.weight": torch.randn(4, inner, generator=gen) * 0.1,
        "diffusion_model.double_blocks.0.txt_mlp.0.lora_up.weight": torch.randn(4 * inner, 4, generator=gen) * 0.1,
        "diffusion_model.double_blocks.0.txt_mlp.0.alpha": torch.tensor(4.0),
    }
    path = save_lora(tensors, tmp_path / "comfy.safetensors")
    adapter = read_lora(path, "FluxPipeline")
    assert {"transformer_blocks.0.attn.to_k", "transformer_blocks.0.ff_context.net.0.proj"} <= set(adapter.modules)
    MergedLoras(model).merge([(adapter, 1.1)])
    assert_state_equal(model, diffusers_fused(FluxPipeline, flux_dir, [(path, 1.1)]), atol=1e-6)


def test_a_musubi_wan_lora_merges_as_diffusers_fuses_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    """musubi-tuner's Wan layout (`lora_unet_blocks_0_self_attn_q`, every attention and feed-forward Linear)."""
    from diffusers import WanPipeline

    folder = build_fixture("wan21_t2v", tmp_path_factory.mktemp("wan_musubi") / "model")
    model = load_native_model(WanTransformer3DModel.from_config, folder / "transformer", CPU, torch.float32)
    gen = torch.Generator().manual_seed(10)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    ffn = model.config.ffn_dim
    tensors: dict[str, torch.Tensor] = {}
    for block in range(len(model.blocks)):
        shapes = {f"self_attn_{o}": (dim, dim) for o in "qkvo"} | {f"cross_attn_{o}": (dim, dim) for o in "qkvo"}
        shapes |= {"ffn_0": (ffn, dim), "ffn_2": (dim, ffn)}
        for name, (out_features, in_features) in shapes.items():
            key = f"lora_unet_blocks_{block}_{name}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, in_features, generator=gen) * 0.1
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_features, 2, generator=gen) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    path = save_lora(tensors, tmp_path_factory.mktemp("musubi_file") / "musubi.safetensors")
    adapter = read_lora(path, "WanPipeline")
    assert "blocks.1.ffn.net.2" in adapter.modules
    MergedLoras(model).merge([(adapter, 0.6)])
    assert_state_equal(model, diffusers_fused(WanPipeline, folder, [(path, 0.6)]), atol=1e-6)


def test_a_peft_config_saved_in_the_files_metadata_gives_the_alphas(flux_dir: Path, tmp_path: Path) -> None:
    """diffusers' `save_lora_weights(..., transformer_lora_adapter_metadata=...)` writes PEFT's config into the
    safetensors metadata: `lora_alpha`, and `alpha_pattern` for modules of their own."""
    import json

    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    model = ours_flux(flux_dir)
    tensors = random_lora(model, FLUX_MODULES, 4, 11)
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"x_embedder": 2}, "target_modules": list(FLUX_MODULES)}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = tmp_path / "with_config.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    adapter = read_lora(path, "FluxPipeline")
    assert adapter.modules["x_embedder"].alpha == 2 and adapter.modules["transformer_blocks.0.attn.to_q"].alpha == 8
    MergedLoras(model).merge([(adapter, 1.0)])
    assert_state_equal(model, diffusers_fused(FluxPipeline, flux_dir, [(path, 1.0)]), atol=1e-6)
