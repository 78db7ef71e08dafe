"""Tiny random diffusers pipelines ("fixtures") in real diffusers layout, built fully offline.

Each family is one builder function registered with :func:`register_fixture`; it returns an
in-memory ``diffusers`` pipeline whose components follow the recipe in the project's fixture notes
(tiny configs, real shape logic: real latent channels, real VAE downsampling, real packing).
:func:`build_fixture` saves it with ``save_pretrained``. Builds are deterministic: every component is
created right after ``torch.manual_seed(seed)`` and then :func:`perturb_constant_params` is applied
with its own seeded generator, so two builds are byte-identical.

Adding a family::

    @register_fixture("wan21_t2v", pipeline_class="WanPipeline", call_kwargs={...})
    def _wan21_t2v() -> DiffusionPipeline:
        tok = tiny_t5_tokenizer()
        text_encoder = seeded_component(0, lambda: UMT5EncoderModel(UMT5Config(...)))
        ...
        return WanPipeline(...)
"""

from __future__ import annotations

import os
import pathlib
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FIXTURE_REGISTRY",
    "FixtureSpec",
    "build_fixture",
    "build_pipeline",
    "perturb_constant_params",
    "register_fixture",
    "seeded_component",
]

PERTURB_STD = 0.05

M = TypeVar("M", bound=torch.nn.Module)


@dataclass(frozen=True)
class FixtureSpec:
    """A registered fixture: how to build it and how the oracle pipeline is called on it."""

    name: str
    pipeline_class: str
    build: Callable[[], DiffusionPipeline]
    call_kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: Called with the saved folder: puts files into the published checkpoints' layout where
    #: ``save_pretrained`` of today's libraries writes them differently.
    finish: Callable[[pathlib.Path], None] | None = None


FIXTURE_REGISTRY: dict[str, FixtureSpec] = {}


def register_fixture(
    name: str,
    *,
    pipeline_class: str,
    call_kwargs: Mapping[str, Any] | None = None,
    finish: Callable[[pathlib.Path], None] | None = None,
) -> Callable[[Callable[[], DiffusionPipeline]], Callable[[], DiffusionPipeline]]:
    """Decorator registering a zero-argument builder that returns an unsaved diffusers pipeline.

    ``call_kwargs`` are the recommended ``__call__`` arguments for the tiny fixture (resolution,
    steps, guidance, max_sequence_length...), excluding the prompt and generator.
    """

    def decorator(
        fn: Callable[[], DiffusionPipeline],
    ) -> Callable[[], DiffusionPipeline]:
        if name in FIXTURE_REGISTRY:
            raise ValueError(f"fixture {name!r} registered twice")
        FIXTURE_REGISTRY[name] = FixtureSpec(
            name=name,
            pipeline_class=pipeline_class,
            build=fn,
            call_kwargs=MappingProxyType(dict(call_kwargs or {})),
            finish=finish,
        )
        return fn

    return decorator


@torch.no_grad()
def perturb_constant_params(
    model: torch.nn.Module,
    std: float = PERTURB_STD,
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Add ``N(0, std)`` noise to every parameter whose elements are all equal.

    After init, norm weights are 1, biases 0 and some projections zero-initialised; a native port that
    drops such a parameter would still match. Parameters are visited in ``named_parameters`` order, so
    with a seeded ``generator`` the result is deterministic. Returns the perturbed parameter names.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    perturbed: list[str] = []
    for name, param in model.named_parameters():
        if param.numel() == 0:
            continue
        flat = param.detach().reshape(-1)
        if bool(torch.all(flat == flat[0])):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            param.add_(noise.to(device=param.device, dtype=param.dtype))
            perturbed.append(name)
    return perturbed


def seeded_component(seed: int, factory: Callable[[], M], *, perturb_std: float | None = PERTURB_STD) -> M:
    """Create a model with ``torch.manual_seed(seed)`` set, perturb its constant params, fp32, eval.

    The perturbation uses a dedicated generator seeded from ``seed`` (independent of the global RNG).
    """
    torch.manual_seed(seed)
    model = factory()
    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.to(torch.float32)
    if perturb_std:
        gen = torch.Generator().manual_seed(zlib.crc32(f"perturb-{seed}".encode()))
        perturb_constant_params(model, perturb_std, generator=gen)
    model.eval()
    return model


def flux_vae(seed: int = 0) -> torch.nn.Module:
    """FLUX.1-style ``AutoencoderKL``: 16 latent channels, 8x downsampling, shift/scale factors."""
    from diffusers import AutoencoderKL

    return seeded_component(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
    )


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------


@register_fixture(
    "flux1_dev",
    pipeline_class="FluxPipeline",
    call_kwargs={
        "height": 32,
        "width": 32,
        "num_inference_steps": 3,
        "guidance_scale": 3.5,
        "max_sequence_length": 32,
    },
)
def _flux1_dev() -> DiffusionPipeline:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_t5_tokenizer()

    text_encoder = seeded_component(
        0,
        lambda: CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=16,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                projection_dim=16,
                hidden_act="quick_gelu",
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        ),
    )
    text_encoder_2 = seeded_component(
        0,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        ),
    )
    vae = flux_vae(0)
    transformer = seeded_component(
        0,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=4096,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _spec(name: str) -> FixtureSpec:
    try:
        return FIXTURE_REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(FIXTURE_REGISTRY))
        raise KeyError(f"unknown fixture {name!r}; known fixtures: {known}") from None


def build_pipeline(name: str) -> DiffusionPipeline:
    """Build fixture ``name`` in memory (not saved)."""
    return _spec(name).build()


def build_fixture(
    name: str,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
) -> pathlib.Path:
    """Build fixture ``name`` and save it in diffusers layout under ``out_dir``; returns the path.

    ``out_dir`` must not exist or be empty (so stale files, e.g. shards of an earlier build, can
    never mix in). ``max_shard_size`` (e.g. ``"100KB"``) is passed to ``save_pretrained`` to produce
    sharded safetensors checkpoints with ``*.index.json``.
    """
    spec = _spec(name)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"fixture output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    pipe = spec.build()
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    pipe.save_pretrained(out, **save_kwargs)
    if spec.finish is not None:
        spec.finish(out)
    return out
