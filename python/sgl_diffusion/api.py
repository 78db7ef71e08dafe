"""The Python API: `DiffGenerator.from_pretrained(...).generate(...)`.

It submits to the same Rust scheduler as the CLI and the server, in-process (no HTTP). Waiting
releases the GIL, and Ctrl-C cancels the request being waited for.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

import numpy as np
from PIL import Image

from . import _native
from .fields import names, table
from .runtime.encode import decode_output, to_uint8
from .runtime.video import decode_mp4, encode_mp4

if TYPE_CHECKING:
    from ._native import EngineOptions, RequestFields

OutputType = Literal["pil", "np"]
#: File suffixes of each engine output format.
_SUFFIXES = {"png": ("png",), "jpeg": ("jpg", "jpeg"), "webp": ("webp",), "mp4": ("mp4",), "npy": ("npy",)}
ProgressCallback = Callable[[int, int], None]


@dataclasses.dataclass
class GenerationResult:
    """What `generate` returns. For image models `images` holds PIL images, or float32 H×W×3 arrays in
    [0, 1] for `output_type="np"`; for video models `frames` holds one array per output, uint8
    T×H×W×3 (float32 in [0, 1] for `output_type="np"`). `timings` is the perf record (stages,
    denoising steps, memory)."""

    images: list[Any]
    seed: int
    timings: dict[str, Any]
    request: dict[str, Any]
    notes: list[str]
    #: How many requests shared the batch that produced these outputs.
    batch_size: int = 1
    frames: list[np.ndarray] = dataclasses.field(default_factory=list)
    #: The outputs as the engine encoded them (PNG/JPEG/WebP/MP4 files, or .npy arrays).
    encoded: list[bytes] = dataclasses.field(default_factory=list)
    #: Frame rate of video outputs.
    fps: int | None = None

    @property
    def peak_memory_mb(self) -> float:
        return float(self.timings["peak_memory_mb"])

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Writes output `index`: an MP4 for videos, else an image file (format from the suffix)."""
        path = Path(path)
        output_format = self.request.get("output_format")
        if self.encoded and path.suffix.lower().lstrip(".") in _SUFFIXES.get(output_format, ()):
            path.write_bytes(self.encoded[index])  # already in this format: no second encode
            return path
        if self.frames:
            path.write_bytes(encode_mp4(self.frames[index], fps=self.fps or 16))
            return path
        image = self.images[index]
        if isinstance(image, np.ndarray):
            image = Image.fromarray(to_uint8(image))
        image.save(path)
        return path


class DiffGenerator:
    """A loaded model behind the engine's scheduler."""

    def __init__(self, engine: _native.Engine) -> None:
        self._engine = engine
        self.info: dict[str, Any] = json.loads(engine.info_json())

    @classmethod
    def from_pretrained(cls, model_path: str | Path | None = None, **options: Unpack[EngineOptions]) -> DiffGenerator:
        """Loads a diffusers-format folder or a Hugging Face id from the local cache.

        `model_path=None` uses the built-in tiny default model. Every other keyword is a model or scheduler option
        (declared on `sgl_bridge::ModelConfig` and `EngineConfig`), by the name `--config` files use: `_native.pyi`'s
        `EngineOptions` lists them with their help (e.g. `device`, `dit_precision`, `warmup`, `max_batch_size`,
        `request_timeout`); an unknown name is a `TypeError`. SGLang Diffusion's environment variables that ask for
        a feature not built yet (`SGLANG_CACHE_DIT_ENABLED=true`, ...) make loading fail with `ModelLoadError`
        naming them.

        `max_request_cost` is the most token-steps (outputs × latent tokens × steps × guidance branches) one
        request may cost, and `max_request_pixels` the most output pixels (outputs × width × height × frames)
        it may ask for (each by default 10 requests at the model's defaults); a request over either raises
        `InvalidRequestError`. `request_timeout` (seconds) stops every request that runs longer, between two
        denoising steps, with `DeadlineExceededError`.
        """
        model_options = {field.name for field in table("model")} - {"model_path"}
        engine_options = {field.dest: field.name for field in table("engine") if field.cli}
        _check_keywords("from_pretrained", options, model_options | set(engine_options))
        config: dict[str, Any] = {
            "model": {
                "model_path": None if model_path is None else str(model_path),
                **{name: value for name, value in options.items() if name in model_options},
            },
            **{engine_options[name]: value for name, value in options.items() if name in engine_options},
        }
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DiffGenerator:
        """Loads from an engine config as the CLI builds it (`sgl_bridge::EngineConfig`: `model` plus the
        scheduler's options; unset ones left out or None)."""
        return cls(_native.Engine(json.dumps(_drop_none(config))))

    def submit(self, **request: Unpack[RequestFields]) -> _native.RequestHandle:
        """Queues a request and returns at once; `handle.wait()` gives `(outputs, metadata_json)`.
        Fields as in `generate`, plus `output_format` (png, jpeg, webp, npy, mp4)."""
        return self._engine.submit(json.dumps(_drop_none(dict(request))))

    def generate(
        self,
        prompt: str,
        *,
        image: str | Path | Image.Image | Sequence[str | Path | Image.Image] | None = None,
        last_image: str | Path | Image.Image | None = None,
        output_type: OutputType = "pil",
        on_progress: ProgressCallback | None = None,
        **fields: Unpack[RequestFields],
    ) -> GenerationResult:
        """Generates from `prompt`. Every other keyword but these is a request field (declared on
        `sgl_core::GenerationRequest`; `_native.pyi`'s `RequestFields` lists them with their help, e.g. `height`,
        `num_inference_steps`, `seed`, `num_outputs_per_prompt`); unset fields take the model's defaults, an unknown
        name is a `TypeError`.

        `image` is the input image of image-to-video or image editing (a path or a PIL image), or a list of them
        for models that take several (Qwen-Image-Edit-Plus: 1-3 reference images, FLUX.2: up to 10, klein 4,
        GLM-Image 4; in order). `last_image` is the last frame of first-last-frame image-to-video (Wan2.1-FLF2V,
        Wan2.2 I2V-A14B), `image` being the first. `output_type` chooses the arrays
        returned ("pil" or "np"); `on_progress(step, total)` is called after each denoising step. A request still
        queued or running `timeout_seconds` after submission (at most the engine's `request_timeout`) is stopped
        and raises `DeadlineExceededError`."""
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        # `output_format` follows from `output_type` (and the model): videos come back as exact arrays and
        # `save` encodes MP4 on demand.
        _check_keywords("generate", fields, set(names("request")) - {"prompt", "output_format"})
        if image is not None and (fields.get("image_path") is not None or fields.get("image_paths") is not None):
            raise TypeError("generate() takes input images as `image`, `image_path` or `image_paths`: one of them")
        if last_image is not None and fields.get("last_image_path") is not None:
            raise TypeError("generate() takes the last frame as `last_image` or `last_image_path`: one of them")
        request: dict[str, Any] = {**fields, "prompt": prompt}
        if last_image is not None:
            request["last_image_path"] = _image_path(last_image)
        if image is not None:
            images = list(image) if isinstance(image, (list, tuple)) else [image]
            request["image_paths"] = [_image_path(each) for each in images]
        request["output_format"] = "npy" if output_type == "np" or self.info["output"] == "video" else "png"
        result = collect(self.submit(**request), on_progress)
        if self.info["output"] == "video" and output_type == "pil":
            result.frames = [to_uint8(frames) for frames in result.frames]
        return result

    def set_lora(
        self,
        lora_nickname: str | Sequence[str],
        lora_path: str | Path | Sequence[str | Path | None] | None = None,
        *,
        target: str | Sequence[str] = "all",
        strength: float | Sequence[float] = 1.0,
    ) -> dict[str, Any]:
        """Loads LoRA adapters (or re-activates nicknames loaded before, `lora_path` None) and merges them into
        the model, in order, between two batches; what the targets had merged is replaced. Lists give one value
        per nickname; a single `target` / `strength` applies to all. Targets: all (every denoiser), transformer,
        transformer_2 (Wan2.2 A14B's low-noise expert). Paths: a .safetensors file, a folder holding one, or a
        Hugging Face id in the local cache, in any layout diffusers reads for the model (diffusers/PEFT, kohya,
        original Wan, XLabs, ...). A bad adapter raises `InvalidRequestError` naming the field (and the key at
        fault), with the model untouched. Returns the LoRA state (`list_loras`)."""
        paths: Any = lora_path
        if isinstance(lora_path, (list, tuple)):
            paths = [None if path is None else str(path) for path in lora_path]
        elif lora_path is not None:
            paths = str(lora_path)
        nicknames = list(lora_nickname) if isinstance(lora_nickname, (list, tuple)) else lora_nickname
        request = {
            "lora_nickname": nicknames,
            "lora_path": paths,
            "target": list(target) if isinstance(target, (list, tuple)) else target,
            "strength": list(strength) if isinstance(strength, (list, tuple)) else strength,
        }
        return json.loads(self._engine.set_lora(json.dumps(_drop_none(request))))

    def merge_lora(self, target: str = "all", strength: float | None = None) -> dict[str, Any]:
        """Merges the targets' adapters again after `unmerge_lora` (at their own strengths, or `strength`)."""
        return json.loads(self._engine.merge_lora(json.dumps(_drop_none({"target": target, "strength": strength}))))

    def unmerge_lora(self, target: str = "all") -> dict[str, Any]:
        """Restores the targets' base weights bit for bit; the adapters stay set (`merge_lora` merges them
        again)."""
        return json.loads(self._engine.unmerge_lora(json.dumps({"target": target})))

    def list_loras(self) -> dict[str, Any]:
        """`{"loaded_adapters": [{nickname, path}], "active": {denoiser: [{nickname, path, merged, strength}]}}`."""
        return json.loads(self._engine.list_loras())

    def shutdown(self) -> None:
        """Finishes queued work and stops the engine's worker thread."""
        self._engine.shutdown()


def collect(handle: _native.RequestHandle, on_progress: ProgressCallback | None = None) -> GenerationResult:
    """Waits for a submitted request and decodes its outputs."""
    outputs, metadata_json = handle.wait(on_progress)
    metadata = json.loads(metadata_json)
    request = json.loads(handle.request_json)
    # A video output is a T×H×W×3 array (npy) or an MP4 file.
    is_video = request.get("fps") is not None
    if request["output_format"] == "mp4":
        decoded = [decode_mp4(data)[0] for data in outputs]
    else:
        decoded = [decode_output(data, request["output_format"]) for data in outputs]
    return GenerationResult(
        images=[] if is_video else decoded,
        frames=decoded if is_video else [],
        fps=request.get("fps"),
        encoded=list(outputs),
        seed=metadata["seed"],
        timings=metadata["perf"],
        request=request,
        notes=metadata["notes"],
        batch_size=metadata["batch_size"],
    )


def _image_path(image: str | Path | Image.Image) -> str:
    """The engine takes input images as files (and makes their paths absolute); a PIL image is written to a
    temporary PNG (removed when the process exits)."""
    if isinstance(image, (str, Path)):
        return str(image)
    fd, path = tempfile.mkstemp(suffix=".png", prefix="sgl-diffusion-input-")
    with os.fdopen(fd, "wb") as f:
        image.save(f, format="PNG")
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    return path


def _check_keywords(function: str, given: Mapping[str, Any], known: set[str]) -> None:
    """Refuses keywords that are no field of the table a function takes (as Python refuses unknown ones)."""
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(
            f"{function}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(sorted(known))}"
        )


def _drop_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}
