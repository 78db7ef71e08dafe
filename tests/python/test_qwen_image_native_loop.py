"""The native Qwen-Image pieces compose to diffusers' QwenImagePipeline output on the tiny fixture.

There is no native Qwen-Image pipeline yet; this test writes the denoising loop itself (true CFG with the
pipeline's norm rescale, Euler steps) around our prompt encoding, our transformer (loaded by key name from
the fixture's folder) and our scheduler, and compares the final packed latents with the pipeline's for the
same injected initial noise.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sgl_diffusion.loading import load_native_model, load_transformers_model, read_config
from sgl_diffusion.models.qwen_image import QwenImageTransformer2DModel
from sgl_diffusion.models.qwen_image.text_encoder import QwenPromptEmbeds, encode_prompts
from sgl_diffusion.schedulers import FlowMatchEulerScheduler
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOLERANCE = 1e-5
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture("qwen_image", tmp_path_factory.mktemp("qwen_image") / "model")


def _velocity(
    model: QwenImageTransformer2DModel,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    img_shapes: list,
    cond: QwenPromptEmbeds,
    uncond: QwenPromptEmbeds,
    true_cfg_scale: float,
) -> torch.Tensor:
    t = timestep.expand(latents.shape[0]).to(latents.dtype) / 1000
    pos = model(latents, cond.embeds, t, img_shapes, cond.mask)
    neg = model(latents, uncond.embeds, t, img_shapes, uncond.mask)
    guided = neg + true_cfg_scale * (pos - neg)
    # Qwen-Image's true CFG keeps each token's velocity norm at the conditional prediction's.
    return guided * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80)])
def test_native_loop_matches_the_pipeline(qwen_dir: Path, height: int, width: int) -> None:
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    call = dict(FIXTURE_REGISTRY["qwen_image"].call_kwargs, height=height, width=width)
    prompt, negative = "a photo of a cat", " "
    rows, cols = height // 16, width // 16
    noise = torch.randn(1, rows * cols, 64, generator=torch.Generator().manual_seed(0))

    pipe = QwenImagePipeline.from_pretrained(qwen_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt, negative_prompt=negative, latents=noise.clone(), output_type="latent", **call).images

    encoder = load_transformers_model(Qwen2_5_VLForConditionalGeneration, qwen_dir / "text_encoder", CPU, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir / "tokenizer"))
    model = load_native_model(QwenImageTransformer2DModel.from_config, qwen_dir / "transformer", CPU, torch.float32)
    scheduler = FlowMatchEulerScheduler.from_config(read_config(qwen_dir / "scheduler"))

    max_len = call["max_sequence_length"]
    cond = encode_prompts(encoder, tokenizer, [prompt], max_sequence_length=max_len)
    uncond = encode_prompts(encoder, tokenizer, [negative], max_sequence_length=max_len)
    state = scheduler.start(*scheduler.plan(call["num_inference_steps"], rows * cols))
    latents = noise.clone()
    with torch.no_grad():
        while not state.done:
            v = _velocity(model, latents, state.timestep, [[(1, rows, cols)]], cond, uncond, call["true_cfg_scale"])
            latents = state.step(v, latents)

    diff = (latents - expected).abs().max().item()
    print(f"{height}x{width}: max abs diff of the final latents {diff:.3g}")
    assert diff <= TOLERANCE
