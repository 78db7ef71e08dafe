"""Qwen-Image-Edit (Qwen/Qwen-Image-Edit) and Edit-Plus (Qwen-Image-Edit-2509, -2511): the edit adapters and
pipelines of the Qwen-Image family.

They match diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` on the same weights and seed. On
top of text-to-image (`qwen_image.py`), each reference image of a request

* is resized to about 1024x1024 pixels at its own aspect ratio (`images.size_at_area`), VAE-encoded (the
  distribution's mode), normalised and packed in 2x2 patches; its tokens follow the noise tokens in the
  DiT's image sequence (`img_shapes` lists one piece per image, RoPE gives piece i frame i), and only the
  noise tokens' prediction is kept. Checkpoints whose transformer sets `zero_cond_t` (2511) modulate the
  reference tokens at timestep 0 (the model does that from `img_shapes`).
* is read by the text encoder with the instruction: Edit puts the 1024x1024 image itself in its chat
  template; Edit-Plus puts a 384x384 copy of each image, as "Picture i: <image>" before the instruction.
  Negative prompts are encoded with the same images, as the reference does.

The output size defaults to the last reference image's aspect at 1024x1024 pixels (the Rust core applies
`LastInputAspectAtArea` when a request gives no size), like the reference's default.

Batching: requests batch only with requests that bring the very same image files (`image_paths` is an extra
batch-key field), since the reference images' token counts shape the batch's sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from ..errors import invalid_request
from ..loading import load_native_model, load_pipeline_vae, load_transformers_model, read_config
from ..models.qwen_image import QwenImageTransformer2DModel
from ..models.qwen_image.prompt import EDIT_PLUS_PROMPT_TEMPLATE, EDIT_PROMPT_TEMPLATE, PICTURE_TEMPLATE
from ..models.qwen_image.text_encoder import encode_prompt_with_images
from ..models.qwen_image.vision import Qwen2VLImageTextProcessor, load_image_text_processor
from ..runtime.options import RuntimeOptions
from ..runtime.request import Request
from ..schedulers import FlowMatchEulerScheduler
from .base import BatchState, per_row
from .conditioning import ModelInputs
from .family import FamilyPipeline
from .guidance import Denoiser
from .images import load_image, size_at_area
from .latents import normalize_latents, pack_latents
from .qwen_image import (
    DIFFUSERS_STEPS,
    DIFFUSERS_TRUE_CFG_SCALE,
    MAX_PIXELS,
    MAX_SIDE,
    NO_GUIDANCE_SCALE,
    QwenImageAdapter,
    QwenImageComponents,
)
from .spec import LastInputAspectAtArea, PipelineSpec, SamplingDefaults, image_limits, tokenizer_limit
from .text_lengths import TEXT_LENGTHS, pad_text_rows

#: Pixels of each reference image as the VAE sees it, and the default output's (diffusers' 1024 * 1024).
REFERENCE_AREA = 1024 * 1024
#: Pixels of each reference image as Edit-Plus's text encoder sees it (diffusers' CONDITION_IMAGE_SIZE).
PLUS_CONDITION_AREA = 384 * 384
#: The reference pipelines check max_sequence_length <= 1024 and crop nothing; prompts are not truncated.
MAX_EDIT_PROMPT_TOKENS = 1024
#: Reference images per request: Edit-Plus checkpoints are trained and documented for 1 to 3.
PLUS_MAX_IMAGES = 3


@dataclasses.dataclass(frozen=True)
class EditVariant:
    """What differs between Edit and Edit-Plus."""

    #: The chat template: Edit's holds the one image; Edit-Plus's takes PICTURE_TEMPLATE per image.
    template: str
    #: Area the text encoder's copy of each image is resized to; None: the VAE's copy itself (Edit).
    condition_area: int | None
    max_images: int

    def text(self, prompt: str, images: int) -> str:
        if self.condition_area is None:
            return self.template.format(prompt)
        pictures = "".join(PICTURE_TEMPLATE.format(i + 1) for i in range(images))
        return self.template.format(pictures + prompt)


EDIT = EditVariant(template=EDIT_PROMPT_TEMPLATE, condition_area=None, max_images=1)
EDIT_PLUS = EditVariant(
    template=EDIT_PLUS_PROMPT_TEMPLATE, condition_area=PLUS_CONDITION_AREA, max_images=PLUS_MAX_IMAGES
)


@dataclasses.dataclass(frozen=True)
class ReferenceImage:
    """One input image, resized for the VAE (`pixels`: (1, 3, H, W) in [-1, 1]) and for the text encoder."""

    pixels: torch.Tensor
    condition: Image.Image

    @property
    def latent_piece(self) -> tuple[int, int, int]:
        """Its (frames, rows, columns) of packed tokens: 8x VAE, then 2x2 patches."""
        return (1, self.pixels.shape[-2] // 16, self.pixels.shape[-1] // 16)


@dataclasses.dataclass
class QwenImageEditComponents(QwenImageComponents):
    processor: Qwen2VLImageTextProcessor | None = None


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image's adapter plus reference images: in the prompt encoding and after the noise tokens."""

    def __init__(self, components: QwenImageEditComponents, variant: EditVariant) -> None:
        super().__init__(components)
        if components.processor is None:
            raise ValueError("Qwen-Image-Edit needs the checkpoint's processor")
        self.processor = components.processor
        self.variant = variant
        self.image_processor = VaeImageProcessor(vae_scale_factor=components.vae_scale_factor * 2)

    def check_requests(self, requests: Sequence[Request]) -> None:
        tokenizer = self.processor.tokenizer
        for request in requests:
            tokens = len(tokenizer(request.prompt).input_ids)
            if tokens > request.max_sequence_length:
                raise invalid_request(
                    "max_sequence_length",
                    f"the prompt has {tokens} tokens, over max_sequence_length {request.max_sequence_length} "
                    "(edit prompts are encoded whole, with their images, as the reference pipeline does)",
                )

    def references(self, request: Request) -> list[ReferenceImage]:
        """The request's input images, resized as the reference pipeline resizes them."""
        references = []
        for path in request.image_paths:
            image = load_image(path)
            width, height = size_at_area(REFERENCE_AREA, image.width / image.height)
            # diffusers resizes with its VaeImageProcessor (PIL, Lanczos) before both uses.
            resized = self.image_processor.resize(image, height, width)
            if self.variant.condition_area is None:
                condition = resized
            else:
                c_width, c_height = size_at_area(self.variant.condition_area, image.width / image.height)
                condition = self.image_processor.resize(image, c_height, c_width)
            pixels = self.image_processor.preprocess(resized, height, width)
            references.append(ReferenceImage(pixels=pixels, condition=condition))
        return references

    def encode_prompts(
        self,
        texts: list[str],
        max_sequence_length: int,
        device: torch.device,
        owners: Sequence[Request] = (),
    ) -> Mapping[str, torch.Tensor]:
        del max_sequence_length  # checked against the prompt in check_requests; nothing is cropped
        if len(owners) != len(texts):
            raise ValueError("Qwen-Image-Edit encodes each text with its request's images: pass owners")
        # Each distinct (text, images) alone, as the reference encodes a prompt and its negative prompt.
        rows: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        conditions: dict[tuple[str, ...], list[Image.Image]] = {}
        keys = [(text, tuple(owner.image_paths)) for text, owner in zip(texts, owners, strict=True)]
        for key, owner in zip(keys, owners, strict=True):
            if key in rows:
                continue
            text, paths = key
            if paths not in conditions:
                conditions[paths] = [reference.condition for reference in self.references(owner)]
            images = conditions[paths]
            encoded = encode_prompt_with_images(
                self.c.text_encoder,
                self.processor,
                self.variant.text(text, len(images)),
                images,
                device=device,
                dtype=self.dtype,
            )
            rows[key] = encoded.embeds[0]
        embeds, lengths = pad_text_rows([rows[key] for key in keys])
        return {"encoder_hidden_states": embeds, TEXT_LENGTHS: lengths}

    def encode_images(self, state: BatchState) -> None:
        """Each request's reference images as packed, normalised VAE latents after one another, and their
        token layout (every request of a batch has the same images: `image_paths` keys batches)."""
        latents, pieces = [], None
        for request in state.requests:
            references = self.references(request)
            packed = [self.reference_latents(reference, state.device) for reference in references]
            latents.append(torch.cat(packed, dim=1))
            pieces = [reference.latent_piece for reference in references]
        state.set_rows("image_latents", per_row(torch.cat(latents), state.requests).to(self.dtype))
        state["reference_pieces"] = pieces

    def reference_latents(self, reference: ReferenceImage, device: torch.device) -> torch.Tensor:
        vae = self.c.vae
        pixels = reference.pixels.unsqueeze(2).to(device=device, dtype=vae.dtype)  # (1, 3, 1, H, W)
        encoded = vae.encode(pixels).latent_dist.mode()
        # (x - mean) / std, divided as the reference divides (not multiplied by 1/std).
        encoded = normalize_latents(encoded, vae.config.latents_mean, vae.config.latents_std, divide=True)
        return pack_latents(encoded[:, :, 0])

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        noise = super().initial_latents(state)
        ((generated,),) = state["img_shapes"]
        state["img_shapes"] = [[generated, *state["reference_pieces"]]]
        return noise

    def denoiser(self, expert: int) -> Denoiser:
        del expert  # one expert
        by_text_length = self.by_text_length

        def generated_tokens_only(**inputs: object) -> torch.Tensor:
            # The DiT predicts every image token; the step needs the generated image's (the first piece).
            frames, rows, columns = inputs["img_shapes"][0][0]  # type: ignore[index]
            return by_text_length(**inputs)[:, : frames * rows * columns]

        return generated_tokens_only

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        inputs = super().model_inputs(state, latents, timestep)
        rows = {**inputs.rows, "hidden_states": torch.cat([latents, state["image_latents"]], dim=1)}
        return ModelInputs(rows=rows, fixed=inputs.fixed)


class QwenImageEditPipeline(FamilyPipeline):
    """Qwen/Qwen-Image-Edit: one reference image, in the chat template at 1024x1024."""

    pipeline_class = "QwenImageEditPipeline"
    variant = EDIT

    def __init__(
        self, components: QwenImageEditComponents, options: RuntimeOptions, defaults: SamplingDefaults
    ) -> None:
        token = components.vae_scale_factor * 2
        limits = image_limits(
            token=token,
            max_side=MAX_SIDE,
            max_pixels=MAX_PIXELS,
            max_sequence_length=tokenizer_limit(components.tokenizer, MAX_EDIT_PROMPT_TOKENS),
            max_steps=components.scheduler.config.num_train_timesteps,
        )
        spec = PipelineSpec(
            pipeline_class=self.pipeline_class,
            family="qwen_image",
            task="image-to-image",
            guidance_mode="true_cfg",
            limits=limits,
            defaults=defaults,
            image_input="required",
            max_input_images=self.variant.max_images,
            extra_batch_key_fields=("image_paths",),
        )
        super().__init__(spec, QwenImageEditAdapter(components, self.variant), options)
        self.c = components

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> QwenImageEditPipeline:
        def build_transformer(config: dict) -> QwenImageTransformer2DModel:
            return QwenImageTransformer2DModel.from_config(config, attention_backend=options.attention_backend)

        vae = load_pipeline_vae(AutoencoderKLQwenImage, model_dir, options)
        (text_encoder_dtype,) = options.text_encoder_dtypes_for(("text_encoder (Qwen2.5-VL)",))
        # The processor's tokenizer is the one the reference encodes with (the folder also has `tokenizer/`).
        processor = load_image_text_processor(model_dir / "processor")
        components = QwenImageEditComponents(
            tokenizer=processor.tokenizer,
            text_encoder=load_transformers_model(
                Qwen2_5_VLForConditionalGeneration, model_dir / "text_encoder", options.device, text_encoder_dtype
            ),
            transformer=load_native_model(
                build_transformer, model_dir / "transformer", options.device, options.dit_dtype
            ),
            vae=vae,
            scheduler=FlowMatchEulerScheduler.from_config(read_config(model_dir / "scheduler")),
            vae_scale_factor=2 ** len(vae.config.temperal_downsample),
            processor=processor,
        )
        return cls(components, options, defaults or edit_diffusers_defaults())


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen/Qwen-Image-Edit-2509 and -2511: 1 to 3 reference images, each also seen by the text encoder at
    384x384 as "Picture i"."""

    pipeline_class = "QwenImageEditPlusPipeline"
    variant = EDIT_PLUS


def edit_defaults(steps: int, negative_prompt: str | None) -> SamplingDefaults:
    """Edit sampling defaults: the output at the last input image's aspect, about 1024x1024 pixels (1024x1024
    is what a request without images would get, and those are refused), true CFG 4."""
    side = 1024
    return SamplingDefaults(
        width=side,
        height=side,
        num_inference_steps=steps,
        guidance_scale=NO_GUIDANCE_SCALE,
        max_sequence_length=MAX_EDIT_PROMPT_TOKENS,
        true_cfg_scale=DIFFUSERS_TRUE_CFG_SCALE,
        negative_prompt=negative_prompt,
        size_from_inputs=LastInputAspectAtArea(REFERENCE_AREA),
    )


def edit_diffusers_defaults() -> SamplingDefaults:
    """The reference pipelines' own `__call__` defaults, for folders that are no known checkpoint: 50 steps,
    true_cfg_scale 4 but no negative prompt (so no CFG unless a request brings one)."""
    return edit_defaults(DIFFUSERS_STEPS, None)


#: Qwen/Qwen-Image-Edit's model card: 50 steps, true CFG 4 against " ".
QWEN_IMAGE_EDIT_DEFAULTS = edit_defaults(50, " ")
#: Qwen/Qwen-Image-Edit-2509 and -2511's model cards: 40 steps, true CFG 4 against " ".
QWEN_IMAGE_EDIT_PLUS_DEFAULTS = edit_defaults(40, " ")
