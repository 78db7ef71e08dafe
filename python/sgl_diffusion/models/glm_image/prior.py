"""GLM-Image's autoregressive prior: prompts to the DiT's prior image tokens, sampled as diffusers samples them.

The prior is transformers' ``GlmImageForConditionalGeneration`` (an LLM; its ``generate`` runs here). For a
text-to-image request it samples a small preview grid of image tokens, then the target grid (one token per 32
pixels); the target grid's tokens, upsampled 2x (nearest), are the DiT's prior tokens (one per 16 pixels).

Image-to-image (editing): the request's input images come first in the prompt. The prior's vision encoder and
VQ codebook turn each into image tokens on its own 32-pixel grid (:func:`encode_prior_images`: the ids the
prior's forward puts in place of the images' placeholders; upsampled 2x they are also the DiT's prior tokens
of that image), and the prior samples only the target grid, no preview.

Seeds. diffusers' ``GlmImagePipeline`` seeds torch's global generator with the request generator's seed and
samples with the checkpoint's ``generation_config`` (its temperature / top-k / top-p warpers, then one
``torch.multinomial`` per step over the batch's rows). A request therefore gets the tokens its seed gives
when it runs alone. To sample several requests in one ``generate`` and still give each exactly those tokens,
:class:`RowSampler` (the last logits processor) applies the checkpoint's warpers itself and draws each row
from that request's own generator, seeded with its seed: the same draws, in the same order, as the global
generator makes for the request alone. It returns the chosen token as the only finite score, so the
sampling step of ``generate`` (its warpers turned off) can only pick it.

Requests share a ``generate`` when their prompts have the same token length (no padding: padded rows would
see other positions and masks than alone, and their logits, hence their samples, could change).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = [
    "PriorGrid",
    "PriorImages",
    "RowSampler",
    "encode_prior_images",
    "prior_grid",
    "sample_prior_tokens",
    "sampling_warpers",
    "upsample_tokens",
]

#: Pixels per prior token (the processor's factor).
PRIOR_TOKEN_PIXELS = 32


@dataclasses.dataclass(frozen=True)
class PriorGrid:
    """What one generation samples: ``max_new_tokens`` tokens, of which the target grid's ``rows x columns``
    start at ``offset`` (after the preview grid, in text-to-image)."""

    rows: int
    columns: int
    offset: int
    max_new_tokens: int


def prior_grid(image_grid_thw: torch.Tensor, text_to_image: bool = True) -> PriorGrid:
    """The sampling plan of one prompt from its processor grids: text-to-image ``[[1, h, w], [1, ph, pw]]``
    (target, then preview; the prior samples the preview first); image-to-image the input images' grids, then
    the target's ``[1, h, w]`` (the prior samples the target grid alone)."""
    sizes = [int(t * h * w) for t, h, w in image_grid_thw.tolist()]
    if not text_to_image:
        _, rows, columns = (int(v) for v in image_grid_thw[-1].tolist())
        return PriorGrid(rows=rows, columns=columns, offset=0, max_new_tokens=sizes[-1] + 1)
    _, rows, columns = (int(v) for v in image_grid_thw[0].tolist())
    return PriorGrid(rows=rows, columns=columns, offset=sum(sizes[1:]), max_new_tokens=sum(sizes) + 1)


def upsample_tokens(tokens: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """``(rows * columns,)`` prior tokens -> ``(4 * rows * columns,)``: each token covers 2x2 DiT tokens (the
    reference interpolates the ids as floats, nearest; exact for ids below 2**24)."""
    grid = tokens.view(1, 1, rows, columns).float()
    return F.interpolate(grid, scale_factor=2, mode="nearest").to(torch.long).view(-1)


#: Sampling settings of a generation config that :func:`sampling_warpers` turns into warpers, and the values
#: that turn each off in ``generate``.
_NEUTRAL = {
    "temperature": 1.0,
    "top_k": None,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}


def sampling_warpers(config: GenerationConfig, device: torch.device) -> LogitsProcessorList:
    """The warpers ``generate`` builds from a sampling ``config`` (one row at a time, so ``min_tokens_to_keep``
    1), in ``generate``'s order."""
    if getattr(config, "top_h", None) is not None:
        raise ValueError("the prior's generation_config sets top_h, which GLM-Image's prior sampling does not support")
    warpers = LogitsProcessorList()
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    if config.typical_p is not None and config.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    if config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0:
        warpers.append(EpsilonLogitsWarper(epsilon=config.epsilon_cutoff, min_tokens_to_keep=1))
    if config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0:
        warpers.append(EtaLogitsWarper(epsilon=config.eta_cutoff, min_tokens_to_keep=1, device=device))
    return warpers


class RowSampler(LogitsProcessor):
    """Samples each row from its own generator after the checkpoint's warpers; returns scores where only the
    chosen token is finite (see the module docstring)."""

    def __init__(self, warpers: LogitsProcessorList, generators: Sequence[torch.Generator]) -> None:
        self.warpers = warpers
        self.generators = list(generators)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows sampled with {len(self.generators)} generators")
        chosen = torch.empty(scores.shape[0], 1, dtype=torch.long, device=scores.device)
        for row, generator in enumerate(self.generators):
            # Each row alone, exactly as `generate` samples a batch of one.
            warped = self.warpers(input_ids[row : row + 1], scores[row : row + 1])
            probs = F.softmax(warped, dim=-1)
            chosen[row] = torch.multinomial(probs, num_samples=1, generator=generator)[0]
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen, 0.0)


@dataclasses.dataclass(frozen=True)
class PriorImages:
    """A request's input images as the prior reads them, encoded once for every generation over them.

    ``images`` are the pictures themselves (the prompt's chat template places them), ``grids`` are the processor's ``(1, rows, columns)`` per image (32-pixel tokens of the image as the
    processor resizes it), ``features`` the vision encoder's output (``pooler_output``: one ``(hidden, rows,
    columns)`` map per image, what ``generate`` would compute from the pixels), ``tokens`` each image's codebook
    ids upsampled 2x to the DiT's 16-pixel grid, ``(2 rows * 2 columns,)``."""

    images: tuple[Image.Image, ...]
    grids: torch.Tensor
    features: BaseModelOutputWithPooling
    tokens: tuple[torch.Tensor, ...]

    def dit_grid(self, index: int) -> tuple[int, int]:
        """Image ``index``'s ``(rows, columns)`` of DiT tokens (its prior grid upsampled 2x)."""
        _, rows, columns = (int(v) for v in self.grids[index].tolist())
        return 2 * rows, 2 * columns


@torch.inference_mode()
def encode_prior_images(model: Any, processor: Any, images: Sequence[Image.Image], device: torch.device) -> PriorImages:
    """The prior's view of a request's input images (see :class:`PriorImages`), in the prompt's order."""
    processed = processor.image_processor(images=list(images), return_tensors="pt")
    pixel_values = processed["pixel_values"].to(device)
    grids = processed["image_grid_thw"].to(device)
    features = model.get_image_features(pixel_values, grids, return_dict=True)
    # Each image's map through the VQ codebook, as the prior's forward tokenizes its input images (diffusers
    # 0.42.1 concatenates the maps along their channels first, which transformers 5's get_image_tokens cannot
    # read: these are the tokens it was written to get).
    codes = model.get_image_tokens(features.pooler_output).view(-1)
    per_image = torch.split(codes, grids.prod(dim=-1).tolist())
    tokens = tuple(upsample_tokens(ids, int(grid[1]), int(grid[2])) for ids, grid in zip(per_image, grids, strict=True))
    return PriorImages(images=tuple(images), grids=grids, features=features, tokens=tokens)


def _generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    # diffusers seeds torch's default generator of the device that samples (`torch.manual_seed`, and
    # `torch.cuda.manual_seed` on CUDA): a fresh generator of that device with the same seed draws the same.
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def _encode(
    processor: Any, prompt: str, height: int, width: int, device: torch.device, images: Sequence[Image.Image] = ()
) -> dict[str, torch.Tensor]:
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    messages = [[{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]]
    inputs = processor.apply_chat_template(
        messages,
        tokenize=True,
        padding=False,
        target_h=height,
        target_w=width,
        return_dict=True,
        return_tensors="pt",
    )
    return {key: value.to(device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}


@torch.inference_mode()
def sample_prior_tokens(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    height: int,
    width: int,
    device: torch.device,
    images: PriorImages | None = None,
) -> torch.Tensor:
    """The DiT's prior tokens ``(len(prompts), (height / 16) * (width / 16))``, each as diffusers samples it
    for that prompt and seed alone. Prompts of one token length share a ``generate``.

    Image-to-image: every prompt is read after the same input ``images`` (:func:`encode_prior_images`), whose
    features are given to ``generate`` instead of their pixels: the vision encoder runs once per request's
    images, not once per generation."""
    pictures = () if images is None else images.images
    encoded = [_encode(processor, prompt, height, width, device, pictures) for prompt in prompts]
    groups: dict[int, list[int]] = {}
    for index, inputs in enumerate(encoded):
        groups.setdefault(int(inputs["input_ids"].shape[-1]), []).append(index)
    config = model.generation_config
    warpers = sampling_warpers(config, device)
    # generate's own warpers off: RowSampler applies them, row by row.
    neutral = copy.deepcopy(config)
    for name, value in _NEUTRAL.items():
        setattr(neutral, name, value)
    neutral.do_sample = True

    tokens: list[torch.Tensor | None] = [None] * len(prompts)
    for members in groups.values():
        batch: dict[str, Any] = {
            key: torch.cat([encoded[i][key] for i in members]) for key in encoded[members[0]] if key != "pixel_values"
        }
        if images is not None:
            # The features of each row's images, in the rows' order (one copy of the list per row).
            maps = list(images.features.pooler_output) * len(members)
            batch["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=maps)}
        plan = prior_grid(encoded[members[0]]["image_grid_thw"], text_to_image=images is None)
        sampler = RowSampler(warpers, _generators([seeds[i] for i in members], device))
        neutral.max_new_tokens = plan.max_new_tokens
        # generate's sampling step draws from torch's global generator too (always the one finite token):
        # keep the engine's global RNG state as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            outputs = model.generate(
                **batch,
                generation_config=neutral,
                logits_processor=LogitsProcessorList([sampler]),
            )
        generated = outputs[:, batch["input_ids"].shape[-1] :]
        target = generated[:, plan.offset : plan.offset + plan.rows * plan.columns]
        if target.shape[1] != plan.rows * plan.columns:
            raise RuntimeError(
                f"the prior stopped after {generated.shape[1]} tokens, before its {plan.rows}x{plan.columns} grid"
            )
        for row, index in enumerate(members):
            tokens[index] = upsample_tokens(target[row], plan.rows, plan.columns)
    return torch.stack(tokens)  # type: ignore[arg-type]
