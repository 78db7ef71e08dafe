"""How a model is loaded and run: `sgl_bridge::ModelConfig`'s options, resolved for torch.

The options are declared once, on `ModelConfig` (their names, flags, help and choices: `sgl_diffusion.fields`); the
Rust side passes them exactly as the user gave them (`None` = default), and this module turns them into one validated
object that pipelines receive at load time (dtypes, the attention backend chosen for the device), so a new option is
one field here instead of one more argument on every `load` signature. `tests/python/test_fields.py` checks that every
declared option is read here and that the choices below are the declared ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..fields import names
from ..layers.attention import VIDEO_SPARSE_BACKENDS, resolve_attention_backend
from ..layers.sparse_attention import ATTENTION_CONFIG_ENV, SlidingTileStrategy, VideoSparseSettings
from ..sglang_compat import check_environment
from .cuda_graphs import CUDA_GRAPH_CHOICES
from .device import parse_device, parse_precision

CFG_BATCHING_CHOICES = ("auto", "on", "off")
#: `--backend`: which implementation runs the model (`pipelines/registry.py`); SGLang's `sglang` means `native`.
BACKEND_CHOICES = ("auto", "native", "sglang", "diffusers")


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    device: torch.device
    dit_dtype: torch.dtype
    vae_dtype: torch.dtype
    attention_backend: str = "torch_sdpa"
    #: The sparse attention backends' settings (`--mask-strategy-file-path`, `attention_backend_config`).
    video_sparse: VideoSparseSettings = dataclasses.field(default_factory=VideoSparseSettings)
    enable_torch_compile: bool = False
    warmup: bool = False
    cfg_batching: str = "auto"
    cuda_graphs: str = "auto"
    vae_tiling: bool = False
    vae_slicing: bool = False
    profile: bool = False
    num_profiled_timesteps: int = 2
    profile_all_stages: bool = False
    profile_dir: Path = Path("profiles")
    #: One precision per text encoder (`--text-encoder-precisions`); `None`: the DiT's precision.
    text_encoder_dtypes: tuple[torch.dtype, ...] | None = None
    #: `--vae-path`: a VAE in place of the model's own (`loading/vae.py`); None: the model's `vae/`.
    vae_path: Path | None = None
    #: `--backend`, with `sglang` read as its alias `native`: auto, native or diffusers.
    backend: str = "auto"
    #: The diffusers backend's options (`pipelines/diffusers_backend.py`).
    trust_remote_code: bool = False
    diffusers_attention_backend: str | None = None
    diffusers_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def text_encoder_dtypes_for(self, encoders: tuple[str, ...]) -> tuple[torch.dtype, ...]:
        """The precision of each of a pipeline's text encoders, named in `model_index.json` order."""
        if self.text_encoder_dtypes is None:
            return (self.dit_dtype,) * len(encoders)
        if len(self.text_encoder_dtypes) != len(encoders):
            raise ValueError(
                f"text_encoder_precisions: this model has {len(encoders)} text encoder(s) ({', '.join(encoders)}), "
                f"got {len(self.text_encoder_dtypes)} precision(s)"
            )
        return self.text_encoder_dtypes

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides: Any) -> RuntimeOptions:
        """Defaults for a device (bf16 on CUDA, fp32 on CPU), with fields overridden by name."""
        return cls.from_config({"device": str(device), **overrides})

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RuntimeOptions:
        """Validates the options as given on the command line / API; errors name the option.

        Every entry point builds its options here, so this is also where SGLang's environment variables that ask
        for a missing feature (`SGLANG_CACHE_DIT_ENABLED=true`, ...) are refused."""
        check_environment()
        unknown = sorted(set(config) - set(names("model")))
        if unknown:
            raise ValueError(f"unknown model options {unknown}")
        device = parse_device(config.get("device"))
        # bf16 on GPUs (what real checkpoints ship); fp32 on CPU, where bf16 matmuls are slow.
        default_precision = "bf16" if device.type == "cuda" else "fp32"
        dtypes = {
            name: parse_precision(name, config.get(name) or default_precision)
            for name in ("dit_precision", "vae_precision")
        }
        compile_blocks = bool(config.get("enable_torch_compile") or False)
        cfg_batching = config.get("cfg_batching") or "auto"
        if cfg_batching not in CFG_BATCHING_CHOICES:
            raise ValueError(f"cfg_batching must be one of {', '.join(CFG_BATCHING_CHOICES)}, got {cfg_batching!r}")
        cuda_graphs = config.get("cuda_graphs") or "auto"
        if cuda_graphs not in CUDA_GRAPH_CHOICES:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_CHOICES)}, got {cuda_graphs!r}")
        if cuda_graphs == "on" and device.type != "cuda":
            raise ValueError(f"cuda_graphs=on needs a CUDA device (device is {device}); use auto or off")
        steps = config.get("num_profiled_timesteps")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"num_profiled_timesteps must be a positive integer, got {steps!r}")
        warmup = config.get("warmup")
        backend = config.get("backend") or "auto"
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {', '.join(BACKEND_CHOICES)}, got {backend!r}")
        diffusers_kwargs = config.get("diffusers_kwargs") or {}
        if not isinstance(diffusers_kwargs, dict):
            raise TypeError(f"diffusers_kwargs must be a mapping, got {diffusers_kwargs!r}")
        attention_backend = resolve_attention_backend(
            config.get("attention_backend"), device=device, dtype=dtypes["dit_precision"], video_tokens=True
        )
        video_sparse = video_sparse_settings(
            attention_backend, config.get("mask_strategy_file_path"), config.get("attention_backend_config")
        )
        cuda_graphs = sparse_backend_speed_options(attention_backend, cuda_graphs)
        text_encoder_precisions = config.get("text_encoder_precisions")
        if text_encoder_precisions is not None and (
            isinstance(text_encoder_precisions, str) or not text_encoder_precisions
        ):
            raise ValueError(f"text_encoder_precisions must be a non-empty list, got {text_encoder_precisions!r}")
        return cls(
            device=device,
            dit_dtype=dtypes["dit_precision"],
            vae_dtype=dtypes["vae_precision"],
            attention_backend=attention_backend,
            video_sparse=video_sparse,
            enable_torch_compile=compile_blocks,
            warmup=compile_blocks if warmup is None else bool(warmup),
            cfg_batching=cfg_batching,
            cuda_graphs=cuda_graphs,
            vae_tiling=bool(config.get("vae_tiling") or False),
            vae_slicing=bool(config.get("vae_slicing") or False),
            profile=bool(config.get("profile") or False),
            num_profiled_timesteps=steps or 2,
            profile_all_stages=bool(config.get("profile_all_stages") or False),
            profile_dir=Path(config.get("profile_dir") or "profiles"),
            text_encoder_dtypes=None
            if text_encoder_precisions is None
            else tuple(parse_precision("text_encoder_precisions", name) for name in text_encoder_precisions),
            vae_path=Path(config["vae_path"]) if config.get("vae_path") else None,
            backend="native" if backend == "sglang" else backend,
            trust_remote_code=bool(config.get("trust_remote_code") or False),
            diffusers_attention_backend=config.get("diffusers_attention_backend"),
            diffusers_kwargs=dict(diffusers_kwargs),
        )


def sparse_backend_speed_options(backend: str, cuda_graphs: str) -> str:
    """The CUDA-graph mode to use with `backend`. Both sparse video backends run as one opaque op inside compiled
    blocks (one graph for every layer and step: STA's windows come as a tensor), but neither was validated under
    CUDA graphs (host-side tile bookkeeping around the kernels): `on` is an error naming it, and `auto` graphs
    stay off for them."""
    if backend not in VIDEO_SPARSE_BACKENDS:
        return cuda_graphs
    if cuda_graphs == "on":
        raise ValueError(f"cuda_graphs=on is not supported with attention_backend {backend} yet")
    return "off"


#: `attention_backend_config` keys: SGLang's `VSA_sparsity` and its shorter alias `sparsity`.
VSA_SPARSITY_KEYS = ("VSA_sparsity", "sparsity")


def video_sparse_settings(
    backend: str,
    mask_strategy_file_path: str | None,
    backend_config: Mapping[str, Any] | None,
    environ: Mapping[str, str] | None = None,
) -> VideoSparseSettings:
    """The sparse backends' settings from the options and `$SGLANG_DIFFUSION_ATTENTION_CONFIG`; each setting given
    for a backend that does not read it is an error naming it (nothing is silently ignored)."""
    environ = os.environ if environ is None else environ
    from_env = environ.get(ATTENTION_CONFIG_ENV) or None
    strategy_path = mask_strategy_file_path or from_env
    if mask_strategy_file_path and from_env and Path(mask_strategy_file_path) != Path(from_env):
        raise ValueError(
            f"mask_strategy_file_path={mask_strategy_file_path} and {ATTENTION_CONFIG_ENV}={from_env} name different "
            "files; give one"
        )
    strategy = None
    if strategy_path is not None:
        if backend != "sliding_tile_attn":
            where = "mask_strategy_file_path" if mask_strategy_file_path else f"{ATTENTION_CONFIG_ENV}={from_env}"
            raise ValueError(
                f"{where}: a mask strategy is read by attention_backend sliding_tile_attn only (got {backend})"
            )
        strategy = SlidingTileStrategy.from_file(strategy_path)
    elif backend == "sliding_tile_attn":
        raise ValueError(
            "attention_backend sliding_tile_attn needs a mask strategy file: mask_strategy_file_path "
            f"(--mask-strategy-file-path) or {ATTENTION_CONFIG_ENV}"
        )
    if not isinstance(backend_config or {}, Mapping):
        raise TypeError(f"attention_backend_config must be a mapping, got {backend_config!r}")
    config = dict(backend_config or {})
    unknown = sorted(set(config) - set(VSA_SPARSITY_KEYS))
    if unknown:
        raise ValueError(
            f"attention_backend_config: unknown key(s) {unknown}; allowed: {', '.join(VSA_SPARSITY_KEYS)} "
            "(video_sparse_attn)"
        )
    given = [key for key in VSA_SPARSITY_KEYS if key in config]
    if len(given) > 1:
        raise ValueError("attention_backend_config: give VSA_sparsity or sparsity, not both")
    sparsity = 0.0
    if given:
        if backend != "video_sparse_attn":
            raise ValueError(
                f"attention_backend_config.{given[0]} is read by attention_backend video_sparse_attn only (got {backend})"
            )
        value = config[given[0]]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ValueError(f"attention_backend_config.{given[0]} must be a number in [0, 1), got {value!r}")
        sparsity = float(value)
    return VideoSparseSettings(strategy=strategy, vsa_sparsity=sparsity)
