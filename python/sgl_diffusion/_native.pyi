# Type stubs for the Rust extension module (crates/sgl-python). tests/python/test_native_stub.py
# checks that this file and the compiled module name the same things, and writes its generated part.
from collections.abc import Callable
from typing import Any, Literal, Protocol, TypedDict

__version__: str

class InvalidRequestError(ValueError):
    field: str | None

class QueueFullError(Exception): ...
class EngineShutdownError(Exception): ...
class RequestCancelledError(Exception): ...
class GenerationFailedError(RuntimeError): ...
class DeviceOutOfMemoryError(GenerationFailedError): ...
class DeviceFailedError(GenerationFailedError): ...
class DeadlineExceededError(TimeoutError): ...
class ModelLoadError(RuntimeError): ...

class RequestHandle:
    @property
    def id(self) -> int: ...
    @property
    def request_json(self) -> str: ...
    def cancel(self) -> None: ...
    def wait(self, on_progress: Callable[[int, int], object] | None = None) -> tuple[list[bytes], str]: ...

class Engine:
    def __init__(self, config_json: str) -> None: ...
    def info_json(self) -> str: ...
    def queue_depth(self) -> int: ...
    def submit(self, request_json: str) -> RequestHandle: ...
    def set_lora(self, request_json: str) -> str: ...
    def merge_lora(self, request_json: str) -> str: ...
    def unmerge_lora(self, request_json: str) -> str: ...
    def list_loras(self) -> str: ...
    def shutdown(self) -> None: ...

def resolve_model(name: str) -> tuple[str, str | None, str]: ...
def component_weight_files(dir: str) -> list[str]: ...
def hf_cache_dir() -> str: ...
def safetensors_tensors(path: str) -> list[tuple[str, str, list[int]]]: ...
def serve(config_json: str) -> None: ...
def openapi_json() -> str: ...
def fields_json() -> str: ...
def check_engine_config(config_json: str) -> None: ...
def check_server_config(config_json: str) -> None: ...

# --- generated from the field tables by tests/python/test_native_stub.py (type-only: the module has none of these names) ---

class RequestFields(TypedDict, total=False):
    """A request's fields (`sgl_core::GenerationRequest`): keywords of `DiffGenerator.submit` and
    `generate`."""

    prompt: str
    """What to generate (at most 10 000 characters)."""
    negative_prompt: str | None
    """What to steer away from. Classifier-free models use it as the unconditional branch; on guidance-distilled models (FLUX.1) it acts only through true CFG, so it needs `true_cfg_scale` > 1."""
    width: int | None
    """Width in pixels (a multiple of the model's size step); default: the model's."""
    height: int | None
    """Height in pixels (a multiple of the model's size step); default: the model's."""
    num_frames: int | None
    """Frames of a video (rounded down to 4k+1 for Wan); image models take 1."""
    num_inference_steps: int | None
    """Denoising steps; default: the model's."""
    guidance_scale: float | None
    """Guidance strength: the embedded guidance of distilled models (FLUX.1), classifier-free guidance of the others (on when > 1; Z-Image: on when > 0, adding this multiple of the conditional minus the unconditional prediction to the conditional one)."""
    true_cfg_scale: float | None
    """True classifier-free guidance of guidance-distilled models (FLUX.1): on when > 1, with a `negative_prompt` to guide against."""
    seed: int | None
    """Seed of this request's own noise generator (0 to 2^64-1); drawn at random when absent."""
    max_sequence_length: int | None
    """Most text-encoder tokens of the prompt; default: the model's."""
    num_outputs_per_prompt: int | None
    """Outputs of this prompt, 1-10, each from its own noise (OpenAI's `n`)."""
    flow_shift: float | None
    """Timestep shift of the sampler (video models); FLUX.1 derives its own from the size."""
    cfg_normalization: float | None
    """Caps the norm of the guided prediction at this multiple of the conditional prediction's norm (Z-Image's CFG renormalisation); 0, the default, leaves it uncapped."""
    cfg_truncation: float | None
    """Turns classifier-free guidance off for the steps whose normalised time (1 - t/1000) is above this value (Z-Image's CFG truncation); the default 1 keeps it on for every step."""
    guidance_scale_2: float | None
    """Guidance of the low-noise expert (Wan2.2 A14B); default: the model's, else `guidance_scale`."""
    fps: int | None
    """Frames per second of a video output (at most 120)."""
    image_path: str | None
    """Input image file for image-to-video (its first frame). HTTP clients upload the image (`input_reference`); the server stores the file. On the command line, `--image-path`."""
    image_paths: list[str] | None
    """Input image files, in order, for models that take several (reference images of image editing: Qwen-Image-Edit-Plus takes 1-3); `image_path` is the one-image form, give one or the other. On the command line, one `--image-path` per image."""
    last_image_path: str | None
    """Last-frame image file of first-last-frame image-to-video (Wan2.1-FLF2V, Wan2.2 I2V-A14B): the video runs from the input image to this one. HTTP clients upload it (`last_frame`)."""
    prior_token_ids: list[int] | None
    """The image tokens of an autoregressive prior, given instead of sampled (GLM-Image): one codebook id per 16x16 pixel patch of the output, row by row, as diffusers' `prior_token_ids`."""
    lora: list[dict[str, Any]] | None
    """LoRA adapters for this request alone: `[{"nickname": ..., "strength": 1.0}]`, naming adapters registered with set_lora, applied in order on top of whatever is merged (at most 8). Requests with different adapters share batches."""
    output_format: Literal["png", "jpeg", "webp", "npy", "mp4"] | None
    """How outputs are encoded: png, jpeg, webp (images), mp4 (videos) or npy (exact float arrays); default: png for images, mp4 for videos."""
    output_quality: int | None
    """Encoder quality of lossy formats (jpeg, webp), 1-100."""
    timeout_seconds: float | None
    """Seconds from submission after which the request is stopped (between two denoising steps if it runs) and fails with a deadline error (HTTP: 504 `deadline_exceeded`; a video job fails with `deadline_exceeded`); at most the engine's `--request-timeout`."""

class EngineOptions(TypedDict, total=False):
    """Model and scheduler options (`sgl_bridge::ModelConfig`, `EngineConfig`) by the names `--config` files
    use: keywords of `DiffGenerator.from_pretrained`."""

    device: str | None
    """cuda (default when present), cuda:N or cpu."""
    vae_path: str | None
    """A VAE to use instead of the model's own: a VAE folder (config.json + safetensors) or a model folder (its vae/), a Hugging Face id in the local cache, or one .safetensors file loaded into the model's own VAE architecture. It must fit the model's latents."""
    backend: Literal["auto", "native", "sglang", "diffusers"] | None
    """Which implementation runs the model: auto (default: the native pipeline when the model's class has one, else diffusers), native (or its alias sglang: native only, an error when there is none) or diffusers (diffusers' own pipeline, any model)."""
    trust_remote_code: bool | None
    """Run pipeline code shipped in the model folder (custom diffusers pipelines); off by default."""
    diffusers_attention_backend: str | None
    """Attention of a diffusers pipeline's transformer, by diffusers' dispatcher names (native, flash, sage, xformers, ...); default: diffusers' own."""
    diffusers_kwargs: dict[str, Any] | None
    """Keyword arguments of a diffusers pipeline (a `--config` mapping): names of its `__call__`'s parameters go to every call, the others to `from_pretrained`."""
    dit_precision: Literal["fp32", "fp16", "bf16"] | None
    """Precision of the DiT; default: bf16 on cuda, fp32 on cpu."""
    vae_precision: Literal["fp32", "fp16", "bf16"] | None
    """Precision of the VAE; default: bf16 on cuda, fp32 on cpu."""
    text_encoder_precisions: list[Literal["fp32", "fp16", "bf16"]] | None
    """One precision per text encoder, in model_index.json order (FLUX.1: CLIP T5; Wan: UMT5); default: the DiT's."""
    attention_backend: str | None
    """Attention kernels: torch_sdpa (default), fa (fa3 means fa), fa4, sage_attn or auto; for video models also the sparse sliding_tile_attn and video_sparse_attn."""
    mask_strategy_file_path: str | None
    """Sliding tile attention's mask strategy: a JSON file of "step_layer_head": [t, h, w] windows in tiles (default: $SGLANG_DIFFUSION_ATTENTION_CONFIG)."""
    attention_backend_config: dict[str, Any] | None
    """Settings of the attention backend (a `--config` mapping): video_sparse_attn takes VSA_sparsity (or sparsity), from 0 (default) up to but not including 1."""
    enable_torch_compile: bool | None
    """Compile the denoiser's repeated blocks with torch.compile (CUDA; the first run of a shape is slow)."""
    warmup: bool | None
    """Run one short generation at the default size before serving (default: on with torch.compile)."""
    cfg_batching: Literal["auto", "on", "off"] | None
    """Run conditional and unconditional branches in one forward: auto (by shape, default), on, off."""
    cuda_graphs: Literal["auto", "on", "off"] | None
    """Replay the denoiser's forward as a CUDA graph: auto (small shapes, default), on (every shape), off."""
    vae_tiling: bool | None
    """Decode in spatial tiles (less memory)."""
    vae_slicing: bool | None
    """Decode one output at a time (less memory)."""
    profile: bool | None
    """Write torch profiler traces of each batch."""
    num_profiled_timesteps: int | None
    """Denoising steps traced per batch when profiling (default 2)."""
    profile_all_stages: bool | None
    """Trace every stage (text encoding, decoding), not only denoising steps."""
    profile_dir: str | None
    """Folder for profiler traces (default ./profiles)."""
    lora_path: str | None
    """A LoRA adapter merged at start: a .safetensors file, a folder holding one, or a Hugging Face id in the local cache."""
    lora_nickname: str | None
    """The nickname of --lora-path's adapter (default: default)."""
    lora_scale: float | None
    """The strength --lora-path's adapter is merged at (default 1.0)."""
    lora_dir: str | None
    """The folder every LoRA path must lie in (set_lora's included); unset: any path the process can read. A server taking LoRA paths from clients should set it."""
    lora_cache_gb: float | None
    """Most gigabytes of LoRA weights kept in memory (CPU) across nicknames (default 8); past it the least recently used leave and are read from their file when used again."""
    max_batch_size: int
    """Most images per batched forward (default 1)."""
    batch_delay_ms: int
    """How long a request waits for batch company, in milliseconds (default 0)."""
    max_queue_size: int
    """Requests waiting before 429 (default 256)."""
    max_request_cost: int | None
    """Most token-steps (outputs x latent tokens x steps x guidance branches) one request may cost; default: 10 requests at the model's defaults."""
    max_request_pixels: int | None
    """Most output pixels (outputs x width x height x frames) one request may ask for; default: 10 requests at the model's defaults."""
    request_timeout: float | None
    """Seconds after which a request is stopped between two steps (default: none); a request's timeout_seconds may ask for less."""

class ResolvedRequest(Protocol):
    """A request as pipelines receive it (`sgl_core::ResolvedRequest`; `runtime.request.Request`)."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    max_sequence_length: int
    num_outputs: int
    """Outputs of the request (its `num_outputs_per_prompt`)."""
    flow_shift: float | None
    guidance_scale_2: float | None
    """Guidance of the low-noise expert, for pipelines that have one."""
    cfg_normalization: float | None
    """CFG renormalisation cap (0: none), for pipelines whose guidance takes it (Z-Image)."""
    cfg_truncation: float | None
    """CFG truncation point in normalised time (1: none), for pipelines whose guidance takes it."""
    fps: int | None
    """Frame rate of video outputs; `None` for images."""
    image_path: str | None
    """Input image file for image-to-video: the first of `image_paths` (what one-image pipelines read)."""
    image_paths: tuple[str, ...]
    """Every input image file, in order."""
    last_image_path: str | None
    """Last-frame image file of first-last-frame image-to-video."""
    prior_token_ids: tuple[int, ...]
    """Prior image tokens given with the request (empty: the pipeline samples its own)."""
    lora: tuple[dict[str, Any], ...]
    """This request's own LoRA adapters, in order (empty: none beyond what is merged)."""
    cfg_enabled: bool
    """Whether this request runs a second, unconditional branch (classifier-free guidance)."""
    output_format: Literal["png", "jpeg", "webp", "npy", "mp4"]
    output_quality: int | None
    notes: tuple[str, ...]
    """Adjustments made while resolving (e.g. a frame count rounded down), for the user to see."""

# --- end of the generated part ---
