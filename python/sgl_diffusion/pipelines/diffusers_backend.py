"""The diffusers backend: any diffusers `DiffusionPipeline` folder behind the engine's scheduler, server, CLI and API.

`--backend auto` (the default) picks it for a model whose pipeline class has no native family; `--backend diffusers`
forces it for every model (to compare a native family with diffusers). The pipeline runs as diffusers ships it: one
stage calls `pipe(...)` with the request's fields; the spec the core reads is derived from the loaded pipeline:

* output: video when `__call__` takes `num_frames`, else image;
* defaults: `__call__`'s own (`inspect.signature`), sizes from `default_sample_size × vae_scale_factor` (or the
  transformer's `sample_size`) where the signature says None, as diffusers fills them in;
* limits: `size_multiple` = VAE scale factor × the transformer's patch size where the pipeline tells them, else 16;
  the text length at most the signature's default (and the transformer's `max_text_seq_length`, where it has one);
* guidance: classifier-free (`guidance_scale > 1`);
* image input: none unless `__call__` takes `image` (then required or optional as its default says).

Per-step progress and cancellation go through `callback_on_step_end` (or the legacy `callback`): the callback reports
the step and, when the request is cancelled (or past its deadline), raises `_Cancelled`, which leaves `__call__` at once
(setting `pipe._interrupt` would only skip the remaining steps' work and still decode). The same callback, with a
forward pre-hook on the denoiser, shows the loop's hooks (`--profile`) and the perf recorder each step
(`DiffusersCall`). Noise comes from a CPU `torch.Generator` seeded with the request's seed, as the native pipelines
draw it.

Loading: `--dit-precision` is every component's dtype but the VAE's, `--vae-precision` (`cast_vae_inputs`);
`--vae-path` goes through the shared VAE loader (`loading/vae.py`) and in as the `vae` component;
`--diffusers-attention-backend`, `--vae-tiling` / `--vae-slicing` act on the loaded pipeline; `diffusers_kwargs` splits
into `from_pretrained` and `__call__` keywords (`split_diffusers_kwargs`).

Batching: one request per batch, declared in the spec (`PipelineSpec.max_batch_requests = 1`, which the Rust
scheduler honours whatever `--max-batch-size` says). A diffusers `__call__` takes one prompt list with one generator
list and runs every row to the end together, so a batch of several requests could neither drop a cancelled one
without stopping its neighbours nor keep each request's output independent of its company; one call per request keeps
both, at the cost of batching's throughput.

Options it cannot honour are load errors naming them (`--enable-torch-compile`, `--cuda-graphs on`, ...), never ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import invalid_request
from ..loading import load_vae
from ..runtime.options import RuntimeOptions
from ..runtime.profiling import DENOISING_STAGE
from ..runtime.request import Request
from .base import BatchState, ProgressFn, Stage, StagedPipeline
from .hooks import LoopHooks, StepContext
from .images import load_image
from .spec import PipelineLimits, PipelineSpec, SamplingDefaults

#: Largest output we accept: a memory bound, as the native image families use.
MAX_PIXELS = 2048 * 2048
MAX_SIDE = 4096
#: `size_multiple` when the pipeline tells neither its VAE scale factor nor its patch size.
FALLBACK_SIZE_MULTIPLE = 16
#: Frame rate of video outputs when the pipeline's `__call__` names none (`frame_rate` / `fps`).
FALLBACK_FPS = 16
#: `DiffusionPipeline.from_pretrained`'s own keywords (diffusers 0.42) that `diffusers_kwargs` may set; the backend
#: sets `dtype`, `trust_remote_code` and the `vae` component from options of their own, so those are refused there.
FROM_PRETRAINED_KEYWORDS = frozenset(
    {
        "variant",
        "use_safetensors",
        "low_cpu_mem_usage",
        "revision",
        "custom_revision",
        "load_connected_pipeline",
        "disable_mmap",
        "use_flashpack",
    }
)
#: Options of ours with a `from_pretrained` keyword of their own.
OWN_OPTIONS = {
    "torch_dtype": "--dit-precision / --vae-precision",
    "dtype": "--dit-precision / --vae-precision",
    "trust_remote_code": "--trust-remote-code",
    "vae": "--vae-path",
}
#: `__call__` parameters the backend sets from each request (a `diffusers_kwargs` entry may not override them).
REQUEST_PARAMETERS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "height",
        "width",
        "num_frames",
        "num_inference_steps",
        "guidance_scale",
        "guidance_scale_2",
        "true_cfg_scale",
        "max_sequence_length",
        "generator",
        "image",
        "num_images_per_prompt",
        "num_videos_per_prompt",
        "output_type",
        "return_dict",
        "callback_on_step_end",
        "callback",
        "callback_steps",
        "frame_rate",
        "fps",
    }
)


class _Cancelled(Exception):
    """Raised from the step callback to leave a cancelled request's `__call__` between two steps."""


def pipeline_class_of(model_dir: Path, trust_remote_code: bool) -> type:
    """The class `DiffusionPipeline.from_pretrained` would build for the folder, found as diffusers finds it. A custom
    pipeline (code in the folder) needs `--trust-remote-code`."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_loading_utils import _get_pipeline_class, _resolve_custom_pipeline_and_cls

    config = DiffusionPipeline.load_config(str(model_dir))
    custom_pipeline, custom_class = _resolve_custom_pipeline_and_cls(
        folder=str(model_dir), config=config, custom_pipeline=None
    )
    if custom_pipeline is not None and not trust_remote_code:
        raise ValueError(
            f"{model_dir} is a custom diffusers pipeline ({config['_class_name']}): its code ships in the folder and "
            "runs only with --trust-remote-code (config key trust_remote_code: true)"
        )
    try:
        return _get_pipeline_class(
            DiffusionPipeline,
            config=config,
            custom_pipeline=custom_pipeline,
            class_name=custom_class,
            trust_remote_code=trust_remote_code,
        )
    except AttributeError as err:
        from .registry import supported_pipeline_classes  # here: the registry imports this module

        raise ValueError(
            f"{model_dir} is a {config['_class_name']}: diffusers has no pipeline class of that name, and it has no "
            f"native implementation either (supported natively: {', '.join(supported_pipeline_classes())})"
        ) from err


def split_diffusers_kwargs(kwargs: Mapping[str, Any], pipeline_class: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """`diffusers_kwargs` split into (`from_pretrained` keywords, `__call__` keywords): a name of a `__call__` parameter
    goes to every call (SGLang's docs: `cross_attention_kwargs`), a `from_pretrained` keyword or a name of a
    component (`__init__` parameter) to loading; any other name is an error, as diffusers would ignore it."""
    call_parameters = set(inspect.signature(pipeline_class.__call__).parameters) - {"self"}
    init_parameters = set(inspect.signature(pipeline_class.__init__).parameters) - {"self"}
    load: dict[str, Any] = {}
    call: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name in OWN_OPTIONS:
            raise ValueError(f"diffusers_kwargs.{name}: set it with {OWN_OPTIONS[name]}")
        if name in REQUEST_PARAMETERS:
            raise ValueError(f"diffusers_kwargs.{name}: the backend sets it from each request (a request field)")
        if name in call_parameters:
            call[name] = value
        elif name in FROM_PRETRAINED_KEYWORDS or name in init_parameters:
            load[name] = value
        else:
            raise ValueError(
                f"diffusers_kwargs.{name} is neither a parameter of {pipeline_class.__name__}.__call__ nor a "
                f"from_pretrained keyword; {pipeline_class.__name__}.__call__ takes: "
                f"{', '.join(sorted(call_parameters - REQUEST_PARAMETERS))}"
            )
    return load, call


def refuse_unsupported_options(options: RuntimeOptions) -> None:
    """Options of the native pipelines that diffusers' own pipeline cannot honour: errors naming each."""
    problems = []
    if options.enable_torch_compile:
        problems.append("--enable-torch-compile (compiles native denoisers only)")
    if options.cuda_graphs == "on":
        problems.append("--cuda-graphs on (captures native denoisers only)")
    if options.cfg_batching != "auto":
        problems.append(f"--cfg-batching {options.cfg_batching} (diffusers decides how it runs guidance)")
    if options.text_encoder_dtypes is not None:
        problems.append("--text-encoder-precisions (diffusers loads every component in --dit-precision)")
    if options.attention_backend != "torch_sdpa":
        problems.append(
            f"--attention-backend {options.attention_backend} (native kernels; use --diffusers-attention-backend)"
        )
    if problems:
        raise ValueError("the diffusers backend cannot honour: " + "; ".join(problems))


def set_attention_backend(pipe: Any, name: str) -> None:
    """`--diffusers-attention-backend`: diffusers' attention dispatcher on the pipeline's denoiser."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    valid = [backend.value for backend in AttentionBackendName]
    if name not in valid:
        raise ValueError(
            f"--diffusers-attention-backend {name!r} is no diffusers attention backend; valid: {', '.join(valid)}"
        )
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None or not hasattr(denoiser, "set_attention_backend"):
        raise ValueError(
            f"--diffusers-attention-backend: {type(pipe).__name__}'s denoiser "
            f"({type(denoiser).__name__}) does not take diffusers' attention backends"
        )
    try:
        denoiser.set_attention_backend(name)
    except (RuntimeError, ValueError, ImportError) as err:
        # diffusers checks the backend's package (flash-attn, sageattention, a hub kernel) here.
        raise ValueError(f"--diffusers-attention-backend {name}: {err}") from err


def cast_vae_inputs(pipe: Any) -> None:
    """`--vae-precision` other than `--dit-precision`: many diffusers pipelines cast latents to `vae.dtype` before
    decoding, but some (SD3, FLUX.1, CogVideoX) hand them over in the denoiser's dtype, which the VAE's convolutions
    refuse. So this VAE's own `encode` and `decode` (instance attributes: no other VAE changes) cast their input."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise ValueError(f"--vae-precision: {type(pipe).__name__} has no VAE")
    for method in ("encode", "decode"):
        original = getattr(vae, method, None)
        if original is None:
            continue

        def cast(sample: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            if isinstance(sample, torch.Tensor) and sample.is_floating_point():
                sample = sample.to(vae.dtype)
            return _original(sample, *args, **kwargs)

        setattr(vae, method, cast)


def enable_vae_option(pipe: Any, flag: str, method: str) -> None:
    """`--vae-tiling` / `--vae-slicing` through the VAE's own method; an error where the VAE has none."""
    vae = getattr(pipe, "vae", None)
    enable = getattr(vae, method, None)
    if enable is None:
        raise ValueError(f"{flag}: {type(pipe).__name__}'s VAE ({type(vae).__name__}) has no {method}()")
    enable()


def _signature_default(parameters: Mapping[str, inspect.Parameter], name: str) -> Any:
    parameter = parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _as_int(value: Any) -> int | None:
    """An int config value, or the last of a tuple (Wan-style `(1, 2, 2)` patch sizes)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[-1]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _config(module: Any) -> Mapping[str, Any]:
    config = getattr(module, "config", None)
    return config if isinstance(config, Mapping) else {}


class PipelineFacts:
    """What the spec needs to know about a loaded diffusers pipeline, read once from the pipeline and its `__call__`."""

    def __init__(self, pipe: Any) -> None:
        self.parameters = dict(inspect.signature(type(pipe).__call__).parameters)
        self.parameters.pop("self", None)
        params = self.parameters
        self.video = "num_frames" in params
        self.image_input = "none"
        if "image" in params:
            self.image_input = "required" if params["image"].default is inspect.Parameter.empty else "optional"
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        denoiser_config = _config(denoiser)
        self.vae_scale = _as_int(
            getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
        )
        self.patch = _as_int(denoiser_config.get("patch_size")) or 1
        self.size_multiple = self.vae_scale * self.patch if self.vae_scale else FALLBACK_SIZE_MULTIPLE
        self.temporal = _as_int(
            getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", None)
        )
        self.callback = (
            "callback_on_step_end"
            if "callback_on_step_end" in params
            else "callback"
            if "callback" in params and "callback_steps" in params
            else None
        )
        self.outputs_per_prompt = next(
            (name for name in ("num_images_per_prompt", "num_videos_per_prompt") if name in params), None
        )
        self.fps_parameter = next((name for name in ("frame_rate", "fps") if name in params), None)
        width, height = self._default_size(pipe, denoiser_config)
        text_default = _signature_default(params, "max_sequence_length")
        text_bound = _as_int(denoiser_config.get("max_text_seq_length"))
        tokenizer_length = _as_int(getattr(getattr(pipe, "tokenizer", None), "model_max_length", None))
        if text_default is None:
            # No text-length parameter: the length is the tokenizer's, and a request may not ask for another.
            text_default = tokenizer_length if tokenizer_length and tokenizer_length < 100_000 else 77
        if text_bound is not None:
            text_default = min(text_default, text_bound)
        frames = 1
        if self.video:
            frames = _signature_default(params, "num_frames") or _as_int(denoiser_config.get("sample_frames")) or 1
        scheduler_config = _config(getattr(pipe, "scheduler", None))
        negative = _signature_default(params, "negative_prompt")
        self.defaults = SamplingDefaults(
            width=width,
            height=height,
            num_inference_steps=int(_signature_default(params, "num_inference_steps") or 50),
            guidance_scale=float(_signature_default(params, "guidance_scale") or 1.0),
            max_sequence_length=int(text_default),
            num_frames=int(frames),
            true_cfg_scale=float(_signature_default(params, "true_cfg_scale") or 1.0),
            negative_prompt=negative if isinstance(negative, str) and negative else None,
            fps=(int(_signature_default(params, self.fps_parameter) or FALLBACK_FPS) if self.video else None),
            guidance_scale_2=None,
        )
        self.max_steps = int(scheduler_config.get("num_train_timesteps") or 1000)

    def _default_size(self, pipe: Any, denoiser_config: Mapping[str, Any]) -> tuple[int, int]:
        """`__call__`'s default size: its signature's, else what diffusers computes for None."""
        params = self.parameters
        width = _signature_default(params, "width")
        height = _signature_default(params, "height")
        if width is not None and height is not None:
            return int(width), int(height)
        scale = self.vae_scale or 8
        sample = _as_int(getattr(pipe, "default_sample_size", None))
        if sample is None:
            sample = _as_int(denoiser_config.get("sample_size"))
        if sample is not None:
            side = sample * scale
            return int(width or side), int(height or side)
        sample_height = _as_int(denoiser_config.get("sample_height"))
        sample_width = _as_int(denoiser_config.get("sample_width"))
        if sample_height and sample_width:
            return int(width or sample_width * scale), int(height or sample_height * scale)
        return int(width or 1024), int(height or 1024)

    def spec(self, pipeline_class: str) -> PipelineSpec:
        temporal = self.temporal or 1
        limits = PipelineLimits(
            size_multiple=self.size_multiple,
            min_size=self.size_multiple,
            max_side=MAX_SIDE,
            max_pixels=MAX_PIXELS,
            max_frames=1024 if self.video else 1,
            frame_rule="four_k_plus_one" if self.video else "single",
            max_sequence_length=self.defaults.max_sequence_length,
            max_steps=self.max_steps,
            token_size=self.size_multiple,
            frames_per_latent=temporal if self.video else 1,
        )
        kind = "video" if self.video else "image"
        source = "text" if self.image_input == "none" else "image"
        return PipelineSpec(
            pipeline_class=pipeline_class,
            family="diffusers",
            task=f"{source}-to-{kind}",
            guidance_mode="classifier_free",
            limits=limits,
            defaults=self.defaults,
            output=kind,
            image_input=self.image_input,
            supports_guidance_scale_2="guidance_scale_2" in self.parameters,
            max_batch_requests=1,
        )


class DiffusersCall(Stage):
    """The whole diffusers pipeline for the batch's one request, into the spec's output entry.

    Named as the native pipelines' denoising stage, so that `--profile` (which by default traces the denoising stage
    from its start for `--num-profiled-timesteps` steps) traces this call: its text encoding, then its first steps.
    The loop's hooks see each step as the native loop shows it: `step_start` when the step's first denoiser forward
    begins (a forward pre-hook on the pipeline's `transformer` / `transformer_2` / `unet`), `step_end` from the step
    callback, after the step's time is recorded and before its progress is reported."""

    name = DENOISING_STAGE

    def __init__(self, pipeline: DiffusersPipeline, progress: ProgressFn, hooks: LoopHooks) -> None:
        self.pipeline = pipeline
        self.progress = progress
        self.hooks = hooks
        self.outputs = (pipeline.spec.output_key,)

    def run(self, state: BatchState) -> None:
        if len(state.requests) != 1:
            raise RuntimeError(f"the diffusers backend runs one request per batch, got {len(state.requests)}")
        request = state.requests[0]
        pipe = self.pipeline.pipe
        kwargs = {**self.pipeline.call_kwargs, **self.pipeline.request_kwargs(request)}
        timer = state.perf.step_timer()
        # The step under way: its index, and the expert whose forward opened it (None: not opened yet).
        step = {"index": 0, "expert": None}

        def total() -> int:
            # diffusers may run fewer steps than asked (img2img strength): its own count wins once it is set.
            return int(getattr(pipe, "_num_timesteps", None) or request.num_inference_steps)

        def step_start(expert: int, timestep: Any) -> None:
            if step["expert"] is None:
                step["expert"] = expert
                self.hooks.step_start(StepContext(step["index"], total(), _as_tensor(timestep), expert))

        def step_end(index: int, timestep: Any) -> None:
            step_start(0, timestep)  # a pipeline whose denoiser has no hook point opens the step here
            timer.step_done(index)
            self.hooks.step_end(StepContext(index, total(), _as_tensor(timestep), int(step["expert"] or 0)))
            step.update(index=index + 1, expert=None)
            if 0 in self.progress(index + 1, total()):
                raise _Cancelled

        if self.pipeline.facts.callback == "callback_on_step_end":

            def on_step_end(_pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                step_end(index, timestep)
                return tensors

            kwargs["callback_on_step_end"] = on_step_end
        else:
            kwargs["callback"] = lambda index, timestep, _latents: step_end(index, timestep)
            kwargs["callback_steps"] = 1
        handles = [
            denoiser.register_forward_pre_hook(
                lambda _module, args, forward_kwargs, expert=expert: step_start(
                    expert, forward_kwargs.get("timestep", args[1] if len(args) > 1 else None)
                ),
                with_kwargs=True,
            )
            for expert, denoiser in enumerate(self.pipeline.diffusers_denoisers())
        ]
        try:
            output = pipe(**kwargs)
        except _Cancelled:
            state.drop_requests([0])
            state[self.pipeline.spec.output_key] = np.zeros((0,), dtype=np.float32)
            return
        finally:
            for handle in handles:
                handle.remove()
        state[self.pipeline.spec.output_key] = self.pipeline.outputs_of(output, request)


def _as_tensor(timestep: Any) -> torch.Tensor:
    """A step's timestep as `StepContext` holds it (NaN where the pipeline tells none)."""
    if isinstance(timestep, torch.Tensor):
        return timestep.detach().reshape(-1)[:1].squeeze(0) if timestep.numel() else torch.tensor(float("nan"))
    return torch.tensor(float("nan") if timestep is None else float(timestep))


class DiffusersPipeline(StagedPipeline):
    """A diffusers pipeline as the engine runs it (see the module docstring)."""

    def __init__(
        self,
        pipe: Any,
        facts: PipelineFacts,
        call_kwargs: Mapping[str, Any],
        options: RuntimeOptions,
    ) -> None:
        super().__init__(facts.spec(type(pipe).__name__), options)
        self.pipe = pipe
        self.facts = facts
        self.call_kwargs = dict(call_kwargs)

    @classmethod
    def load(
        cls,
        model_dir: Path,
        options: RuntimeOptions,
        defaults: SamplingDefaults | None,
    ) -> DiffusersPipeline:
        from diffusers import DiffusionPipeline

        refuse_unsupported_options(options)
        pipeline_class = pipeline_class_of(model_dir, options.trust_remote_code)
        load_kwargs, call_kwargs = split_diffusers_kwargs(options.diffusers_kwargs, pipeline_class)
        if options.vae_path is not None:
            # The shared loader checks that the VAE fits this pipeline's latents (`loading/vae.py`).
            load_kwargs["vae"] = load_vae(None, model_dir, options.vae_path, options.device, options.vae_dtype)
        pipe = DiffusionPipeline.from_pretrained(
            str(model_dir),
            # Every component in the DiT's precision but the VAE, in its own.
            dtype={"default": options.dit_dtype, "vae": options.vae_dtype},
            trust_remote_code=options.trust_remote_code,
            **load_kwargs,
        )
        if options.vae_dtype != options.dit_dtype:
            cast_vae_inputs(pipe)
        pipe.to(options.device)
        pipe.set_progress_bar_config(disable=True)
        if options.diffusers_attention_backend is not None:
            set_attention_backend(pipe, options.diffusers_attention_backend)
        if options.vae_tiling:
            enable_vae_option(pipe, "--vae-tiling", "enable_tiling")
        if options.vae_slicing:
            enable_vae_option(pipe, "--vae-slicing", "enable_slicing")
        facts = PipelineFacts(pipe)
        if facts.callback is None:
            raise ValueError(
                f"{type(pipe).__name__}.__call__ takes no step callback (callback_on_step_end or callback): "
                "the engine could neither report its progress nor cancel it"
            )
        pipeline = cls(pipe, facts, call_kwargs, options)
        if defaults is not None:
            # A known checkpoint's card defaults replace the signature's.
            pipeline.spec = PipelineSpec(**{**pipeline.spec.__dict__, "defaults": defaults})
        return pipeline

    def denoisers(self) -> list[torch.nn.Module]:
        # None of ours: what this names gets torch.compile (refused at load) and CUDA graphs (native denoisers only).
        return []

    def diffusers_denoisers(self) -> list[torch.nn.Module]:
        """diffusers' own denoisers in the pipeline (`transformer`, a second expert's `transformer_2`, or a `unet`):
        where the start of a step is seen."""
        found = [getattr(self.pipe, name, None) for name in ("transformer", "transformer_2", "unet")]
        return [module for module in found if isinstance(module, torch.nn.Module)]

    def stages(self, progress: ProgressFn, hooks: LoopHooks) -> list[Stage]:
        return [DiffusersCall(self, progress, hooks)]

    def request_kwargs(self, request: Request) -> dict[str, Any]:
        """The `__call__` keywords of one request; a field the pipeline has no parameter for must be its default."""
        params = self.facts.parameters
        defaults = self.spec.defaults
        kwargs: dict[str, Any] = {
            "prompt": request.prompt,
            "num_inference_steps": request.num_inference_steps,
            "generator": torch.Generator("cpu").manual_seed(request.seed),
            "output_type": "np",
        }
        optional: list[tuple[str, Any, Any]] = [
            ("height", request.height, defaults.height),
            ("width", request.width, defaults.width),
            ("guidance_scale", request.guidance_scale, defaults.guidance_scale),
            ("true_cfg_scale", request.true_cfg_scale, defaults.true_cfg_scale),
            ("max_sequence_length", request.max_sequence_length, defaults.max_sequence_length),
            ("negative_prompt", request.negative_prompt, defaults.negative_prompt),
        ]
        if self.facts.video:
            optional.append(("num_frames", request.num_frames, defaults.num_frames))
        if "guidance_scale_2" in params and request.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = request.guidance_scale_2
        for name, value, default in optional:
            if name in params:
                if value is not None:
                    kwargs[name] = value
            elif value != default:
                raise invalid_request(name, f"{type(self.pipe).__name__} takes no {name}: leave it at its default")
        if request.num_outputs > 1:
            if self.facts.outputs_per_prompt is None:
                raise invalid_request(
                    "num_outputs_per_prompt", f"{type(self.pipe).__name__} makes one output per prompt"
                )
            kwargs[self.facts.outputs_per_prompt] = request.num_outputs
        if self.facts.video and self.facts.fps_parameter is not None and request.fps is not None:
            kwargs[self.facts.fps_parameter] = request.fps
        temporal = self.facts.temporal
        if self.facts.video and temporal and (request.num_frames - 1) % temporal:
            raise invalid_request(
                "num_frames", f"{type(self.pipe).__name__} makes {temporal}k+1 frames; got {request.num_frames}"
            )
        images = list(request.image_paths) or ([request.image_path] if request.image_path else [])
        if images:
            kwargs["image"] = load_image(images[-1]) if len(images) == 1 else [load_image(path) for path in images]
        return kwargs

    def outputs_of(self, output: Any, request: Request) -> np.ndarray:
        """diffusers' `np` output as the engine's float32 [0, 1] rows: (B, H, W, 3) or (B, T, H, W, 3)."""
        values = output.frames if self.facts.video else output.images
        array = np.asarray(values, dtype=np.float32)
        expected = 5 if self.facts.video else 4
        if array.ndim != expected:
            raise RuntimeError(
                f"{type(self.pipe).__name__} returned {self.spec.output}s of shape {array.shape}, "
                f"expected {expected} dimensions"
            )
        if array.shape[0] != request.num_outputs:
            raise RuntimeError(
                f"{type(self.pipe).__name__} returned {array.shape[0]} outputs, asked {request.num_outputs}"
            )
        return np.clip(array, 0.0, 1.0)
