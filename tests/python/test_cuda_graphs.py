"""`--cuda-graphs`: option validation and the runner's bookkeeping on the CPU; replay against the plain
forward, per model and through the whole engine, on CUDA (those tests skip on the CPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sgl_diffusion.runtime.cuda_graphs import CudaGraphRunner, cuda_graph_runner, enable_cuda_graphs
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.testing import build_fixture

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cuda_graphs": "always"}, "cuda_graphs must be one of auto, on, off"),
        ({"cuda_graphs": "on"}, "cuda_graphs=on needs a CUDA device"),
    ],
)
def test_bad_cuda_graph_options_name_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuntimeOptions.from_config({"device": "cpu", **options})


def test_cuda_graphs_default_to_auto_and_do_nothing_on_the_cpu(flux_dir: Path) -> None:
    from sgl_diffusion.pipelines.flux import FluxPipeline

    options = RuntimeOptions.for_device("cpu")
    assert options.cuda_graphs == "auto"
    pipeline = FluxPipeline.load(flux_dir, options, None)
    transformer = pipeline.c.transformer
    assert enable_cuda_graphs(transformer, "auto", options.device) is None
    assert cuda_graph_runner(transformer) is None


def test_api_takes_cuda_graphs_and_rejects_bad_values(flux_dir: Path) -> None:
    from sgl_diffusion import DiffGenerator

    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", cuda_graphs="off")
    try:
        assert gen.generate("a cube", height=32, width=32, num_inference_steps=2, seed=3).images[0].size == (32, 32)
    finally:
        gen.shutdown()
    with pytest.raises(Exception, match="cuda_graphs must be one of auto, on, off"):
        DiffGenerator.from_pretrained(flux_dir, device="cpu", cuda_graphs="sometimes")


def test_runner_runs_cpu_and_grad_calls_without_a_graph() -> None:
    model = torch.nn.Linear(4, 4)
    runner = CudaGraphRunner(model, model.forward, capture_all=True, tokens=lambda inputs: 1)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(runner(x), model.forward(x))  # no graph: the plain forward itself
    runner(x)  # gradients on: never captured
    assert runner.stats.plain_calls == 2 and runner.stats.captures == 0 and not runner.graphs


def test_wan_rope_tables_are_made_once_and_match_the_per_grid_tables() -> None:
    from sgl_diffusion.layers.rotary import rope_tables_1d
    from sgl_diffusion.models.wan.transformer import WanTransformer3DModel, wan_rope_axis_dims

    model = WanTransformer3DModel.from_config(
        {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1, "ffn_dim": 32, "text_dim": 8,
         "freq_dim": 16, "in_channels": 4, "out_channels": 4, "rope_max_seq_len": 64}
    )  # fmt: skip
    cpu = torch.device("cpu")
    for grid in ((3, 4, 5), (1, 8, 2), (3, 4, 5)):
        cos, sin = model._rope(grid, cpu)
        # Straight from the definition: each axis's positions 0..n-1, token (f, h, w) in row-major order.
        axes = [rope_tables_1d(d, torch.arange(n)) for d, n in zip(wan_rope_axis_dims(16), grid, strict=True)]
        f, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        for which, table in ((0, cos), (1, sin)):
            expected = torch.cat([axes[a][which][idx.flatten()] for a, idx in enumerate((f, h, w))], dim=-1)
            assert torch.equal(table, expected)
    assert list(model._rope_axes) == [cpu]  # one set of tables for every grid: a graph can keep reading it


# --------------------------------------------------------------------------------------------------
# CUDA: replay against the plain forward
#
# Compared bit for bit. A replay launches the very kernels the captured forward launched, with the same
# launch configurations, on static inputs that are clones of the arguments (same shape, dtype and
# strides, which are part of the graph's key), so it must produce the same bits as the plain forward on
# the same arguments; with torch.compile the blocks are compiled with `dynamic=False`, so a shape is
# always served by the one static compilation the graph captured. A difference means a replay read
# something stale (an input not copied in, a table left on the host, weights that moved): exactly the
# bugs these tests are for, which a tolerance of 1e-2 on bf16 outputs of |x| ~ 1 could hide.
# --------------------------------------------------------------------------------------------------


def assert_same_bits(replayed: torch.Tensor, plain: torch.Tensor) -> None:
    assert replayed.dtype == plain.dtype and replayed.shape == plain.shape
    assert torch.equal(replayed, plain), f"max abs diff {(replayed.float() - plain.float()).abs().max().item():.3g}"


def flux_inputs(transformer: Any, batch: int, side: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    text = 8
    axes = torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")
    return {
        "hidden_states": torch.randn(batch, side * side, cfg.in_channels, generator=g).cuda().to(dtype),
        "encoder_hidden_states": torch.randn(batch, text, cfg.joint_attention_dim, generator=g).cuda().to(dtype),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g).cuda().to(dtype),
        "timestep": torch.rand(batch, generator=g).cuda().to(dtype),
        "img_ids": torch.stack(axes, -1).reshape(-1, 3).cuda(),
        "txt_ids": torch.zeros(text, 3).cuda(),
        "guidance": torch.full((batch,), 3.5).cuda(),
    }


def wan_inputs(transformer: Any, batch: int, frames: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, frames, 8, 12, generator=g).cuda().to(dtype),
        "timestep": (torch.rand(batch, generator=g) * 1000).cuda(),
        "encoder_hidden_states": torch.randn(batch, 16, cfg.text_dim, generator=g).cuda().to(dtype),
    }


def load_pipeline(name: str, root: Path, **options: object):
    from sgl_diffusion.pipelines import load_pipeline as load
    from sgl_diffusion.testing import FIXTURE_REGISTRY

    folder = build_fixture(name, root / name)
    return load(folder, FIXTURE_REGISTRY[name].pipeline_class, None, RuntimeOptions.for_device("cuda", **options))


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_flux_replay_matches_the_plain_forward(tmp_path: Path, compiled: bool) -> None:
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    transformer = load_pipeline("flux1_dev", tmp_path).c.transformer
    if compiled:
        compile_repeated_blocks(transformer)
    plain = transformer.forward
    runner = enable_cuda_graphs(transformer, "on", torch.device("cuda"))
    assert runner is not None and cuda_graph_runner(transformer) is runner
    with torch.inference_mode():
        for batch, side, seed in ((1, 4, 0), (1, 4, 1), (2, 4, 2), (1, 6, 3), (1, 4, 4)):
            inputs = flux_inputs(transformer, batch, side, seed, torch.bfloat16)
            assert_same_bits(transformer(**inputs), plain(**inputs))
        # Two calls of one shape (the two CFG branches) get separate outputs.
        first = transformer(**flux_inputs(transformer, 1, 4, 5, torch.bfloat16))
        kept = first.clone()
        transformer(**flux_inputs(transformer, 1, 4, 6, torch.bfloat16))
        assert torch.equal(first, kept)
    assert runner.stats.captures == 3 and runner.stats.failed_captures == 0  # (1, 16), (2, 16), (1, 36) tokens
    assert runner.stats.replays == 7


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_lora_merged_after_capture_is_what_the_graph_replays(tmp_path: Path, compiled: bool) -> None:
    """LoRA merges write the weights in place, so a graph captured before a merge replays the merged model and,
    after an unmerge, the base again: no stale graph runs."""
    from lora_files import FLUX_MODULES, random_lora, save_lora
    from sgl_diffusion.lora import MergedLoras, read_lora
    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    transformer = load_pipeline("flux1_dev", tmp_path).c.transformer
    if compiled:
        compile_repeated_blocks(transformer)
    plain = transformer.forward
    enable_cuda_graphs(transformer, "on", torch.device("cuda"))
    tensors = random_lora(transformer, FLUX_MODULES, 4, 3, scale=0.3)
    adapter = read_lora(save_lora(tensors, tmp_path / "lora.safetensors"), "FluxPipeline")
    merged = MergedLoras(transformer)
    with torch.inference_mode():
        inputs = flux_inputs(transformer, 1, 4, 0, torch.bfloat16)
        base = transformer(**inputs).clone()  # captured here
        merged.merge([(adapter, 1.0)])
        styled = transformer(**inputs)
        assert_same_bits(styled, plain(**inputs))
        assert not torch.equal(styled, base)
        merged.unmerge()
        assert_same_bits(transformer(**inputs), base)


@needs_cuda
def test_wan_replay_alternating_grids_matches_the_plain_forward(tmp_path: Path) -> None:
    transformer = load_pipeline("wan21_t2v", tmp_path).c.transformer
    plain = transformer.forward
    runner = enable_cuda_graphs(transformer, "on", torch.device("cuda"))
    assert runner is not None
    with torch.inference_mode():
        for frames, seed in ((3, 0), (2, 1), (3, 2), (2, 3), (3, 4)):
            inputs = wan_inputs(transformer, 1, frames, seed, torch.bfloat16)
            assert_same_bits(transformer(**inputs), plain(**inputs))
    assert runner.stats.captures == 2 and runner.stats.replays == 5


@needs_cuda
def test_auto_captures_only_small_batches(tmp_path: Path) -> None:
    transformer = load_pipeline("flux1_dev", tmp_path).c.transformer
    runner = enable_cuda_graphs(transformer, "auto", torch.device("cuda"))
    assert runner is not None
    runner.max_tokens = 32  # the tiny model's shapes straddle this
    with torch.inference_mode():
        transformer(**flux_inputs(transformer, 1, 4, 0, torch.bfloat16))  # 16 tokens: captured
        transformer(**flux_inputs(transformer, 2, 6, 0, torch.bfloat16))  # 72 tokens: plain
    assert runner.stats.captures == 1 and runner.stats.plain_calls == 1


def executor_outputs(folder: Path, pipeline_class: str, cuda_graphs: str, request: dict[str, Any]) -> list[bytes]:
    from sgl_diffusion.runtime.executor import PipelineExecutor

    config = {"model_path": str(folder), "hf_id": None, "pipeline_class": pipeline_class,
              "options": {"device": "cuda", "cuda_graphs": cuda_graphs}}  # fmt: skip
    executor = PipelineExecutor(json.dumps(config))
    runners = [cuda_graph_runner(d) for d in executor.pipeline.denoisers()]
    assert all((r is None) == (cuda_graphs == "off") for r in runners)
    results = executor.run_batch(json.dumps({"items": [request], "lora_files": {}, "lora_drop": []}), lambda s, t: [])
    if cuda_graphs == "on":
        assert all(r is not None and r.stats.replays > 0 and r.stats.failed_captures == 0 for r in runners)
    assert results[0] is not None
    return results[0][0]


def wire_request(**fields: Any) -> dict[str, Any]:
    base = {
        "prompt": "a red cube", "negative_prompt": "blurry", "width": 32, "height": 32, "num_frames": 1,
        "num_inference_steps": 4, "guidance_scale": 3.5, "true_cfg_scale": 1.0, "seed": 7,
        "max_sequence_length": 16, "num_outputs": 2, "flow_shift": None, "guidance_scale_2": None, "fps": None,
        "image_path": None, "cfg_enabled": False, "output_format": "npy", "output_quality": None, "notes": [],
    }  # fmt: skip
    return {"id": 1, "request": {**base, **fields}}


@needs_cuda
@pytest.mark.parametrize(
    ("fixture", "fields"),
    [
        ("flux1_dev", {}),
        # Two experts (two runners), CFG in one batch-2 forward.
        ("wan22_t2v_a14b", {"num_frames": 9, "guidance_scale": 5.0, "guidance_scale_2": 3.0, "cfg_enabled": True}),
    ],
)
def test_engine_outputs_are_the_same_with_and_without_graphs(tmp_path: Path, fixture: str, fields: dict) -> None:
    from sgl_diffusion.testing import FIXTURE_REGISTRY

    folder = build_fixture(fixture, tmp_path / fixture)
    pipeline_class = FIXTURE_REGISTRY[fixture].pipeline_class
    request = wire_request(**fields)
    with_graphs = executor_outputs(folder, pipeline_class, "on", request)
    without = executor_outputs(folder, pipeline_class, "off", request)
    assert len(with_graphs) == len(without) == 2
    # Every denoiser call replays the kernels the plain forward runs, on the same shapes and strides
    # (see above), and the rest of the pipeline is the same eager code: the whole output is the same
    # bits (the H100 end-to-end runs measured identical output with and without graphs).
    for a, b in zip(with_graphs, without, strict=True):
        np.testing.assert_array_equal(decode_npy(a), decode_npy(b))
    assert np.abs(decode_npy(with_graphs[0]) - decode_npy(with_graphs[1])).max() > 1e-2  # two real outputs


def decode_npy(data: bytes) -> np.ndarray:
    import io

    return np.load(io.BytesIO(data))
