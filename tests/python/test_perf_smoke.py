"""`benches/perf.py`'s Qwen-Image, Z-Image, FLUX.2 and HunyuanVideo workloads on tiny configs on the CPU (no timing meaning): the
code paths the GPU jobs take (weights shared between the two models, the engine's defaults for Qwen/Qwen-Image and
Tongyi-MAI/Z-Image-Turbo, diffusers' pipeline over our loaded tensors, the compiled variants with the eager backend,
the SGLang rows) keep working, and both sides compute the same thing. Also `build_random_qwen_image.py`'s shrinking
of the text encoder to fit the disk.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("diffusers")

BENCHES = Path(__file__).resolve().parents[2] / "benches"


def load(name: str) -> ModuleType:
    # perf.py imports its siblings (bench_stats, the folder builders) by plain name.
    if str(BENCHES) not in sys.path:
        sys.path.insert(0, str(BENCHES))
    return importlib.import_module(name)


def run_perf(tmp_path: Path, *argv: str) -> dict:
    perf = load("perf")
    out = tmp_path / "out"
    common = ["--tiny", "--device", "cpu", "--out-dir", str(out), "--work-dir", str(tmp_path / "work")]
    common += ["--reps", "1", "--runs", "1", "--warmup", "1", "--compile-backend", "eager"]
    # The test's own flags last: they win over the common ones.
    assert perf.main([*common, *argv]) == 0
    workload = argv[argv.index("--workload") + 1]
    assert (out / f"{workload}.md").exists()
    return json.loads((out / f"{workload}.json").read_text())


def test_qwen_forward_shares_weights_and_matches_diffusers(tmp_path: Path) -> None:
    record = run_perf(tmp_path, "--workload", "qwen-forward")
    rows = {row["variant"]: row for row in record["rows"]}
    expected = {
        "diffusers eager",
        "ours eager, torch ops",
        "ours eager, fused kernels",
        "ours eager, fused kernels, packed QKV",
        "diffusers + torch.compile",
        "ours + torch.compile",
    }
    assert set(rows) == expected
    for name, row in rows.items():
        if name != "diffusers eager":
            assert row["rel L2 vs diffusers eager"] < 1e-5, name
            assert row["max rel diff"] < 1e-4, name
    assert any("ours' parameters are diffusers' tensors" in note for note in record["notes"])
    assert any("img_shapes" in note for note in record["notes"])


def test_flux2_forward_shares_weights_and_matches_diffusers(tmp_path: Path) -> None:
    # Three warm-up calls: the workload has CUDA-graph variants (none run on the CPU, but the rule holds).
    record = run_perf(tmp_path, "--workload", "flux2-forward", "--warmup", "3")
    rows = {row["variant"]: row for row in record["rows"]}
    expected = {
        "diffusers eager",
        "ours eager, torch ops",
        "ours eager, fused kernels",
        "ours eager, fused kernels, packed QKV",
        "diffusers + torch.compile",
        "ours + torch.compile",
    }
    assert set(rows) == expected
    for name, row in rows.items():
        if name != "diffusers eager":
            assert row["rel L2 vs diffusers eager"] < 1e-5, name
            assert row["max rel diff"] < 1e-4, name
    assert any("32.22 B parameters" in note for note in record["notes"])
    assert record["tflop_per_forward"] > 0


def test_hunyuan_forward_shares_weights_and_matches_diffusers(tmp_path: Path) -> None:
    # Three warm-up calls: the workload may have CUDA-graph variants (none run on the CPU, but the rule holds).
    record = run_perf(tmp_path, "--workload", "hunyuan-forward", "--warmup", "3")
    rows = {row["variant"]: row for row in record["rows"]}
    fused = "ours eager, fused kernels"
    expected = {
        "diffusers eager",
        "ours eager, torch ops",
        fused,
        f"{fused}, packed QKV",
        f"{fused}, diffusers' inputs",
        "diffusers + torch.compile",
        "ours + torch.compile",
    }
    assert set(rows) == expected
    for name, row in rows.items():
        if name != "diffusers eager":
            # Ours gets the prompt's real tokens without the mask (but one row): the same output.
            assert row["rel L2 vs diffusers eager"] < 1e-5, name
            assert row["max rel diff"] < 1e-4, name
    assert any("12.82 B parameters" in note for note in record["notes"])
    assert any("real tokens alone, no mask" in note for note in record["notes"])
    assert record["tflop_per_forward"] > 0  # counted at the run's shape
    # The long-forward job's lean variant set.
    record = run_perf(tmp_path / "lean", "--workload", "hunyuan-forward", "--warmup", "3", "--no-compile",
                      "--eager-variants", "fused", "--latent-frames", "2")  # fmt: skip
    assert {row["variant"] for row in record["rows"]} == {"diffusers eager", fused}
    assert any("Latents (2, 4, 6)" in note for note in record["notes"])


@pytest.mark.parametrize("workload", ["hunyuan-forward", "wan-forward", "flux-forward"])
def test_counted_flops_take_the_models_dtypes(workload: str) -> None:
    # The GPU runs count FLOPs on a bf16 model: a twin built in fp32 met bf16 inputs and failed (HunyuanVideo's
    # patch convolution refuses mixed dtypes).
    import torch

    perf = load("perf")
    device = torch.device("cpu")
    _, ours = perf.build_forward_pair(workload, True, device, torch.bfloat16)
    inputs = perf.ours_inputs(workload, perf.forward_inputs(workload, True, device, torch.bfloat16))
    linear, attention = perf.counted_tflop(ours, inputs)
    assert linear > 0 and attention > 0


def test_wan_forward_times_video_sparse_attention_against_dense(tmp_path: Path) -> None:
    record = run_perf(tmp_path, "--workload", "wan-forward", "--eager-variants", "fused", "--vsa-sparsity", "0", "0.9",
                      "--warmup", "3", "--cuda-graphs", "off")  # fmt: skip
    rows = {row["variant"]: row for row in record["rows"]}
    perf = load("perf")
    eager = [f"ours eager, video_sparse_attn, VSA_sparsity {s}" for s in (0.0, 0.9)]
    compiled = [f"ours + torch.compile, video_sparse_attn, VSA_sparsity {s}" for s in (0.0, 0.9)]
    dense = {"diffusers eager", "ours eager, fused kernels", "diffusers + torch.compile", "ours + torch.compile"}
    assert set(rows) == {*dense, perf.SPARSE_DENSE, *eager, *compiled}
    assert rows[perf.SPARSE_DENSE]["rel L2 vs diffusers eager"] < 1e-5
    for name in eager + compiled:
        group, rival = (
            (perf.SPARSE_GROUP, perf.SPARSE_DENSE) if "eager" in name else ("compiled", "ours + torch.compile")
        )
        assert rows[name]["group"] == group and rows[name]["vs"] == rival, name
        # The gate's compressed branch changes the output (random gates), by little at these weights' scale.
        assert 0 < rows[name]["rel L2 vs ours dense"] < 0.5, name
    for e, c in zip(eager, compiled, strict=True):  # compiled, the same model computes the same thing
        assert abs(rows[e]["rel L2 vs ours dense"] - rows[c]["rel L2 vs ours dense"]) < 1e-5
    assert any("Sparse attention rows" in note for note in record["notes"])
    with pytest.raises(SystemExit, match="wan-forward only"):
        run_perf(tmp_path / "flux", "--workload", "flux-forward", "--no-compile", "--vsa-sparsity", "0.8")


def test_hunyuan_forward_times_sliding_tile_attention_against_dense(tmp_path: Path) -> None:
    perf = load("perf")
    record = run_perf(tmp_path, "--workload", "hunyuan-forward", "--eager-variants", "fused", "--warmup", "3",
                      "--cuda-graphs", "off", "--latent-frames", "7", "--sta-window", "1", "1", "1",
                      "--sta-window", "99", "99", "99")  # fmt: skip
    rows = {row["variant"]: row for row in record["rows"]}
    small, full = (
        f"{p}, sliding_tile_attn, window {w}" for p in ("ours eager",) for w in ("(1, 1, 1)", "(99, 99, 99)")
    )
    compiled_small = "ours + torch.compile, sliding_tile_attn, window (1, 1, 1)"
    assert {perf.SPARSE_DENSE, small, full, compiled_small} <= set(rows)
    # A window covering the grid is dense attention (up to float32 rounding); a one-tile window is not.
    assert rows[full]["rel L2 vs ours dense"] < 1e-5
    assert rows[small]["rel L2 vs ours dense"] > 1e-4
    assert abs(rows[compiled_small]["rel L2 vs ours dense"] - rows[small]["rel L2 vs ours dense"]) < 1e-5
    with pytest.raises(SystemExit, match="one sparse backend per run"):
        run_perf(tmp_path / "both", "--workload", "wan-forward", "--no-compile", "--vsa-sparsity", "0.8",
                 "--sta-window", "1", "1", "1")  # fmt: skip


def test_qwen_e2e_runs_the_engine_defaults_against_diffusers(tmp_path: Path) -> None:
    record = run_perf(tmp_path, "--workload", "qwen-e2e", "--steps", "2")
    request = record["request"]
    # Qwen/Qwen-Image's card defaults, from the engine (only the size is tiny and the steps shortened).
    assert (request["negative_prompt"], request["true_cfg_scale"], request["cfg_enabled"]) == (" ", 4.0, True)
    assert (request["width"], request["num_inference_steps"]) == (64, 2)
    rows = {row["variant"]: row for row in record["rows"]}
    assert {"diffusers eager", "diffusers + torch.compile"} <= set(rows)
    ours = next(row for name, row in rows.items() if name.startswith("ours"))
    assert ours["median step ms"] > 0 and ours["projected 50 steps s"] > 0
    assert rows["diffusers eager"]["PSNR dB vs ours"] > 40  # fp32 on the CPU: the same images
    assert any(row["group"] == "published" and row["median s"] == 12.799 for row in record["rows"])
    assert any("SGLang" in note and "Not comparable" in note for note in record["notes"])


def test_zimage_e2e_runs_the_engine_defaults_against_diffusers(tmp_path: Path) -> None:
    # `--cuda-graphs on`: the variants the GPU job gets at 1024² (ours captures there), so diffusers' whole
    # transformer is compiled with fullgraph (its lazily built RoPE tables must be built first).
    record = run_perf(tmp_path, "--workload", "zimage-e2e", "--steps", "3", "--cuda-graphs", "on")
    request = record["request"]
    # Tongyi-MAI/Z-Image-Turbo's card defaults, from the engine (only the size is tiny and the steps shortened).
    assert (request["guidance_scale"], request["cfg_enabled"], request["max_sequence_length"]) == (0.0, False, 512)
    assert (request["width"], request["height"], request["num_inference_steps"]) == (64, 64, 3)
    rows = {row["variant"]: row for row in record["rows"]}
    compiled = "diffusers + torch.compile, CUDA graphs (reduce-overhead)"
    assert {"diffusers eager", compiled} <= set(rows)
    ours = next(row for name, row in rows.items() if name.startswith("ours"))
    assert ours["median step ms"] > 0 and ours["projected 9 steps s"] > 0
    for name in ("diffusers eager", compiled):
        assert rows[name]["PSNR dB vs ours"] > 40, name  # fp32 on the CPU: the same images
    published = [row["median s"] for row in record["rows"] if row.get("group") == "published"]
    assert published == [0.91, 1.069]
    assert any("SGLang" in note and "Not comparable" in note for note in record["notes"])
    assert any("Caption the transformer sees" in note for note in record["notes"])


def test_builder_shrinks_the_text_encoder_to_fit_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sgl_diffusion.testing.qwen_image import qwen_image_tokenizer

    builder = load("build_random_qwen_image")
    tokenizer = qwen_image_tokenizer()

    def encoder_bytes(layers: int) -> int:
        config = builder.text_encoder_config(tokenizer, builder.TINY_TEXT, builder.TINY_VISION, layers)
        return builder.bf16_bytes(lambda: Qwen2_5_VLForConditionalGeneration(config))

    fixed = builder.bf16_bytes(lambda: QwenImageTransformer2DModel(**builder.TINY_TRANSFORMER))
    fixed += builder.bf16_bytes(lambda: AutoencoderKLQwenImage(**builder.TINY_VAE))
    # Room for everything but the text encoder's second layer: the build keeps one of its two.
    monkeypatch.setattr(builder, "free_bytes", lambda path: fixed + encoder_bytes(1) + 1)
    out = tmp_path / "folder"
    assert builder.main([str(out), "--tiny", "--device", "cpu", "--margin-gib", "0"]) == 0
    note = json.loads((out / builder.NOTE_FILE).read_text())
    assert (note["text_encoder_layers"], note["text_encoder_layers_real"]) == (1, 2)
    config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    with pytest.raises(RuntimeError, match="does not fit"):
        builder.main([str(tmp_path / "strict"), "--tiny", "--device", "cpu", "--margin-gib", "0", "--no-fit-disk"])
