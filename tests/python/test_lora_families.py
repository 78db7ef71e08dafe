"""LoRA merged into every native family's denoiser(s) as PEFT fuses the same file into diffusers' model.

For each family's tiny checkpoint: a random diffusers/PEFT LoRA over Linears spread through the denoiser, set
through the served LoRA state (`ServedLoras`, as the engine runs `set_lora`), against diffusers' own model with
`load_lora_adapter` + `fuse_lora` (+ `unload_lora`, which keeps the fused weights). Wan2.2 A14B's two experts are
targeted one at a time and together. Families diffusers has no pipeline LoRA loader for (HunyuanVideo-1.5,
GLM-Image) read the file in PEFT names as it is."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch

from lora_files import random_lora, save_lora
from sgl_diffusion.lora.served import ServedLoras
from sgl_diffusion.pipelines import load_pipeline
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.testing import build_fixture

FAMILIES = [
    "flux1_dev", "flux2_klein", "wan21_t2v", "wan22_ti2v_5b", "qwen_image", "qwen_image_21", "z_image_turbo",
    "glm_image", "hunyuan_video_t2v", "hunyuan_video15_t2v",
]  # fmt: skip


def load(fixture: str, root: Path):
    folder = build_fixture(fixture, root / fixture)
    pipeline_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    pipeline = load_pipeline(folder, pipeline_class, None, RuntimeOptions.for_device("cpu"))
    return folder, pipeline


def reference(folder: Path, component: str) -> torch.nn.Module:
    config = json.loads((folder / component / "config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_pretrained(folder / component)


def spread_linears(ours: torch.nn.Module, ref: torch.nn.Module, count: int = 6) -> list[str]:
    """`count` Linear layers spread through the model that diffusers' model has by the same name and shape."""
    names = []
    for name, module in ours.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            continue
        try:
            theirs = ref.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(theirs, torch.nn.Linear) and theirs.weight.shape == weight.shape:
            names.append(name)
    step = max(1, len(names) // count)
    return names[::step][:count]


def fused(ref: torch.nn.Module, path: Path, strength: float) -> dict[str, torch.Tensor]:
    ref.load_lora_adapter(str(path), prefix="transformer")
    ref.fuse_lora(lora_scale=strength)
    ref.unload_lora()
    return ref.state_dict()


def assert_state_equal(ours: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    mine = ours.state_dict()
    worst = max(float((mine[k] - v).abs().max()) for k, v in expected.items() if k in mine)
    assert worst <= 1e-6, worst


def set_command(path: Path, target: str, strength: float) -> str:
    adapter = {"nickname": "a", "path": str(path), "file": str(path), "target": target, "strength": strength}
    return json.dumps({"op": "set", "adapters": [adapter]})


@pytest.mark.parametrize("fixture", FAMILIES)
def test_a_peft_lora_merges_as_peft_fuses_it(fixture: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder, pipeline = load(fixture, tmp_path_factory.mktemp("lora_family"))
    (ours,) = pipeline.denoisers()
    ref = reference(folder, "transformer")
    modules = spread_linears(ours, ref)
    assert len(modules) >= 4, modules
    path = save_lora(random_lora(ours, modules, 2, 31), tmp_path_factory.mktemp("lora_file") / "peft.safetensors")
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    served = ServedLoras(pipeline.denoisers(), pipeline.lora_loader_class or pipeline.pipeline_class)
    state = json.loads(served.command(set_command(path, "all", 0.7)))
    assert state["active"]["transformer"][0]["merged"] is True
    expected = fused(ref, path, 0.7)
    assert all(f"{name}.weight" in expected and f"{name}.weight" in ours.state_dict() for name in modules)
    assert not any(torch.equal(ours.state_dict()[f"{n}.weight"], base[f"{n}.weight"]) for n in modules)
    assert_state_equal(ours, expected)
    served.command(json.dumps({"op": "unmerge", "target": "all"}))
    assert all(torch.equal(v, base[k]) for k, v in ours.state_dict().items())


def test_wan22_a14b_experts_are_targeted_one_at_a_time_or_together(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder, pipeline = load("wan22_t2v_a14b", tmp_path_factory.mktemp("lora_a14b"))
    high, low = pipeline.denoisers()
    modules = spread_linears(high, reference(folder, "transformer"))
    path = save_lora(random_lora(high, modules, 2, 32), tmp_path_factory.mktemp("lora_file") / "a14b.safetensors")
    bases = [{k: v.clone() for k, v in model.state_dict().items()} for model in (high, low)]
    served = ServedLoras(pipeline.denoisers(), pipeline.pipeline_class)
    served.command(set_command(path, "transformer_2", 0.5))
    assert all(torch.equal(v, bases[0][k]) for k, v in high.state_dict().items())  # the other expert untouched
    assert_state_equal(low, fused(reference(folder, "transformer_2"), path, 0.5))
    state = json.loads(served.command(set_command(path, "all", 1.2)))
    assert set(state["active"]) == {"transformer", "transformer_2"}
    assert_state_equal(high, fused(reference(folder, "transformer"), path, 1.2))
    assert_state_equal(low, fused(reference(folder, "transformer_2"), path, 1.2))
    served.command(json.dumps({"op": "unmerge", "target": "all"}))
    for model, base in zip((high, low), bases, strict=True):
        assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
