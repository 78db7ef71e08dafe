"""Each request its own LoRA adapters, in one batch (`lora` on requests: the unmerged low-rank path), on the tiny
FLUX.1 fixture (CPU, fp32): a request's image is the same alone or in a mixed batch, equals the image with the same
adapter merged (within rounding), and an unknown nickname fails that request alone, naming `lora`."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SMALL
from lora_files import FLUX_MODULES, random_lora, save_lora
from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.flux import FluxTransformer2DModel

PROMPT = "a photo of a cat"
#: The unmerged path (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) against the merged one (x·(W + s·B·A)ᵀ): fp32 rounding only.
MERGED_ATOL = 1e-4
#: Alone or in a batch: batched matrix products differ in the last bits (as for requests without LoRA).
BATCHED_ATOL = 1e-5
#: What an adapter of scale 0.3 does to the tiny model's image (measured ~0.1).
LORA_EFFECT = 1e-3


@pytest.fixture(scope="module")
def engine(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiffGenerator]:
    model = load_native_model(
        FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), torch.float32
    )
    folder = tmp_path_factory.mktemp("request_loras")
    files = [save_lora(random_lora(model, FLUX_MODULES, 4, seed, alpha=8.0, scale=0.3), folder / f"{name}.safetensors")
             for name, seed in (("a", 41), ("b", 42))]  # fmt: skip
    gen = DiffGenerator.from_pretrained(
        flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32", max_batch_size=8, batch_delay_ms=1500
    )
    # Registered, not merged: requests pick them.
    gen.set_lora(["a", "b"], files)
    gen.unmerge_lora()
    yield gen
    gen.shutdown()


def generate(gen: DiffGenerator, lora: list[dict] | None = None, seed: int = 5) -> np.ndarray:
    fields = {**SMALL, "guidance_scale": 3.5, "seed": seed, "output_format": "npy"}
    return collect(gen.submit(prompt=PROMPT, lora=lora, **fields)).images[0]


def test_a_requests_adapter_is_the_merged_adapter(engine: DiffGenerator) -> None:
    base = generate(engine)
    alone = generate(engine, [{"nickname": "a", "strength": 0.7}])
    assert np.abs(alone - base).max() > LORA_EFFECT
    engine.set_lora("a", strength=0.7)
    try:
        merged = generate(engine)
    finally:
        engine.unmerge_lora()
    assert np.abs(alone - merged).max() <= MERGED_ATOL
    # Two adapters stack: the same as both merged in order.
    both = generate(engine, [{"nickname": "a", "strength": 0.5}, {"nickname": "b"}])
    engine.set_lora(["a", "b"], strength=[0.5, 1.0])
    try:
        merged = generate(engine)
    finally:
        engine.unmerge_lora()
    assert np.abs(both - merged).max() <= MERGED_ATOL
    # And a request without adapters is untouched by the registered ones.
    np.testing.assert_array_equal(generate(engine), base)


def test_requests_with_different_adapters_share_a_batch_and_get_their_own(engine: DiffGenerator) -> None:
    loras = [None, [{"nickname": "a", "strength": 0.7}], [{"nickname": "a", "strength": 0.5}, {"nickname": "b"}]]
    fields = {**SMALL, "guidance_scale": 3.5, "seed": 5, "output_format": "npy"}
    handles = [engine.submit(prompt=PROMPT, lora=lora, **fields) for lora in loras]
    batched = [collect(handle) for handle in handles]
    assert [result.batch_size for result in batched] == [3, 3, 3]
    for lora, result in zip(loras, batched, strict=True):
        alone = generate(engine, lora)
        assert np.abs(result.images[0] - alone).max() <= BATCHED_ATOL, lora
    assert np.abs(batched[1].images[0] - batched[2].images[0]).max() > LORA_EFFECT


def test_an_unknown_nickname_fails_its_request_alone(engine: DiffGenerator) -> None:
    with pytest.raises(InvalidRequestError, match="ghost") as raised:
        generate(engine, [{"nickname": "ghost"}])
    assert raised.value.field == "lora"
    fields = {**SMALL, "guidance_scale": 3.5, "seed": 5, "output_format": "npy"}
    good = engine.submit(prompt=PROMPT, lora=[{"nickname": "a"}], **fields)
    bad = engine.submit(prompt=PROMPT, lora=[{"nickname": "ghost"}], **fields)
    assert collect(good).images[0].shape == (32, 32, 3)
    with pytest.raises(InvalidRequestError):
        collect(bad)
    with pytest.raises(InvalidRequestError, match="twice") as raised:
        generate(engine, [{"nickname": "a"}, {"nickname": "a"}])
    assert raised.value.field == "lora"


def test_a_video_requests_adapter_is_the_merged_adapter(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Wan2.1 (its fused GELU feed-forward and attention projections), through the same seam."""
    from sgl_diffusion.models.wan import WanTransformer3DModel
    from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

    folder = build_fixture("wan21_t2v", tmp_path_factory.mktemp("wan_request_lora") / "model")
    model = load_native_model(
        WanTransformer3DModel.from_config, folder / "transformer", torch.device("cpu"), torch.float32
    )
    modules = ["blocks.0.attn1.to_q", "blocks.0.attn2.to_k", "blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2",
               "blocks.1.attn1.to_out.0"]  # fmt: skip
    path = save_lora(
        random_lora(model, modules, 4, 43, scale=0.3), tmp_path_factory.mktemp("wan_lora") / "w.safetensors"
    )
    gen = DiffGenerator.from_pretrained(folder, device="cpu", dit_precision="fp32", vae_precision="fp32")
    fields = {**FIXTURE_REGISTRY["wan21_t2v"].call_kwargs, "seed": 3, "output_format": "npy"}
    fields.pop("guidance_scale_2", None)
    try:
        gen.set_lora("w", path, strength=0.9)
        merged = collect(gen.submit(prompt=PROMPT, **fields)).frames[0]
        gen.unmerge_lora()
        base = collect(gen.submit(prompt=PROMPT, **fields)).frames[0]
        own = collect(gen.submit(prompt=PROMPT, lora=[{"nickname": "w", "strength": 0.9}], **fields)).frames[0]
    finally:
        gen.shutdown()
    assert np.abs(own - base).max() > LORA_EFFECT
    assert np.abs(own - merged).max() <= MERGED_ATOL


def test_guidance_branches_and_text_length_groups_keep_each_rows_adapter(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Qwen-Image with true CFG: the two branches of a row carry its request's adapter, and rows of different prompt
    lengths run in groups of their own (`ByTextLength`) with theirs."""
    from sgl_diffusion.models.qwen_image import QwenImageTransformer2DModel
    from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

    folder = build_fixture("qwen_image", tmp_path_factory.mktemp("qwen_request_lora") / "model")
    model = load_native_model(
        QwenImageTransformer2DModel.from_config, folder / "transformer", torch.device("cpu"), torch.float32
    )
    modules = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_v_proj",
        "transformer_blocks.0.img_mlp.net.2",
    ]
    path = save_lora(
        random_lora(model, modules, 4, 44, scale=0.3), tmp_path_factory.mktemp("qwen_lora") / "q.safetensors"
    )
    gen = DiffGenerator.from_pretrained(
        folder, device="cpu", dit_precision="fp32", vae_precision="fp32", max_batch_size=8, batch_delay_ms=1500
    )
    fields = {**FIXTURE_REGISTRY["qwen_image"].call_kwargs, "output_format": "npy", "negative_prompt": "blurry",
              "true_cfg_scale": 4.0, "seed": 2}  # fmt: skip
    prompts = [PROMPT, "a much longer prompt about a red fox running through the snowy forest at dawn"]
    try:
        gen.set_lora("q", path, strength=0.8)
        merged = [collect(gen.submit(prompt=p, **fields)).images[0] for p in prompts]
        gen.unmerge_lora()
        handles = [gen.submit(prompt=p, lora=[{"nickname": "q", "strength": 0.8}], **fields) for p in prompts]
        handles.append(gen.submit(prompt=prompts[0], **fields))
        results = [collect(handle) for handle in handles]
        base = collect(gen.submit(prompt=prompts[0], **fields)).images[0]
    finally:
        gen.shutdown()
    assert [result.batch_size for result in results] == [3, 3, 3]
    for result, expected in zip(results, merged, strict=False):
        assert np.abs(result.images[0] - expected).max() <= MERGED_ATOL
    assert np.abs(results[2].images[0] - base).max() <= BATCHED_ATOL
    assert np.abs(results[0].images[0] - base).max() > LORA_EFFECT


@pytest.mark.parametrize(
    "fixture",
    ["z_image_turbo", "flux2_klein", "glm_image", "qwen_image_21", "hunyuan_video_t2v", "hunyuan_video15_t2v",
     "wan22_ti2v_5b", "wan22_t2v_a14b"],
)  # fmt: skip
def test_every_family_runs_a_requests_adapter_as_the_merged_one(
    fixture: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Every native family's Linears reach the seam: a request's adapter over Linears spread through its denoiser(s)
    gives the output of the same adapter merged."""
    import json

    from sgl_diffusion.pipelines import load_pipeline
    from sgl_diffusion.runtime.options import RuntimeOptions
    from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

    folder = build_fixture(fixture, tmp_path_factory.mktemp(f"{fixture}_request_lora") / "model")
    pipeline_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    denoiser = load_pipeline(folder, pipeline_class, None, RuntimeOptions.for_device("cpu")).denoisers()[0]
    # The Linears of the repeated blocks (what LoRAs train); embedders may see other rows than the batch's (Qwen-Image-2.1 embeds
    # an extra t = 0 row for its prefix), where a per-request adapter fails loudly.
    linears = [name for name, module in denoiser.named_modules()
               if isinstance(module, torch.nn.Linear) and re.search(r"\.\d+\.", name)]  # fmt: skip
    modules = linears[:: max(1, len(linears) // 8)][:8]
    path = save_lora(random_lora(denoiser, modules, 2, 45, scale=0.3), tmp_path_factory.mktemp("l") / "l.safetensors")
    gen = DiffGenerator.from_pretrained(folder, device="cpu", dit_precision="fp32", vae_precision="fp32")
    fields = {**FIXTURE_REGISTRY[fixture].call_kwargs, "seed": 4, "output_format": "npy"}
    try:
        gen.set_lora("x", path, strength=0.9)
        merged = collect(gen.submit(prompt=PROMPT, **fields))
        gen.unmerge_lora()
        base = collect(gen.submit(prompt=PROMPT, **fields))
        own = collect(gen.submit(prompt=PROMPT, lora=[{"nickname": "x", "strength": 0.9}], **fields))
    finally:
        gen.shutdown()
    key = "frames" if own.frames else "images"
    own_out, merged_out, base_out = (getattr(result, key)[0] for result in (own, merged, base))
    assert np.abs(own_out - base_out).max() > LORA_EFFECT
    assert np.abs(own_out - merged_out).max() <= MERGED_ATOL
