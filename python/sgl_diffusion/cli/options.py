"""Command-line options shared by commands, `--config` files, and options not built yet.

Every option has one definition here. A `--config` file (JSON or YAML) uses the same names (with
`-` or `_`); an option given on the command line wins over the file.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..layers.attention import available_attention_backends
from ..runtime.cuda_graphs import CUDA_GRAPH_CHOICES
from ..runtime.options import CFG_BATCHING_CHOICES

#: Options that say how the model is loaded and run (`sgl_bridge::ModelConfig`), in every command.
MODEL_OPTIONS = (
    "model_path",
    "device",
    "dit_precision",
    "vae_precision",
    "attention_backend",
    "enable_torch_compile",
    "warmup",
    "cfg_batching",
    "cuda_graphs",
    "vae_tiling",
    "vae_slicing",
    "profile",
    "num_profiled_timesteps",
    "profile_all_stages",
    "profile_dir",
)


def model_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `model` part of the engine config, from parsed options (unset ones left out)."""
    return {name: options[name] for name in MODEL_OPTIONS if options.get(name) is not None}


class CommandError(Exception):
    """A usage error reported as `sgl-diffusion: error: ...` with exit code 2."""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-path", help="diffusers folder or Hugging Face id (local cache); default: built-in tiny model"
    )
    group.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    group.add_argument("--dit-precision", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    group.add_argument("--vae-precision", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    group.add_argument(
        "--attention-backend", help=f"attention kernels (available: {', '.join(available_attention_backends())})"
    )
    speed = parser.add_argument_group("speed and profiling")
    speed.add_argument(
        "--enable-torch-compile",
        action="store_true",
        default=None,
        help="compile the denoiser's repeated blocks with torch.compile (CUDA; first run of a shape is slow)",
    )
    speed.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run one short generation at the default size before serving (default: on with torch.compile)",
    )
    speed.add_argument(
        "--cfg-batching",
        choices=CFG_BATCHING_CHOICES,
        help="run conditional and unconditional branches in one forward: auto (by shape, default), on, off",
    )
    speed.add_argument(
        "--cuda-graphs",
        choices=CUDA_GRAPH_CHOICES,
        help="replay the denoiser's forward as a CUDA graph: auto (small shapes, default), on (every shape), off",
    )
    speed.add_argument("--vae-tiling", action="store_true", default=None, help="decode in spatial tiles (less memory)")
    speed.add_argument(
        "--vae-slicing", action="store_true", default=None, help="decode one output at a time (less memory)"
    )
    speed.add_argument("--profile", action="store_true", default=None, help="write torch profiler traces of each batch")
    speed.add_argument("--num-profiled-timesteps", type=int, help="denoising steps traced per batch (default 2)")
    speed.add_argument(
        "--profile-all-stages",
        action="store_true",
        default=None,
        help="trace every stage (text encoding, decoding), not only denoising steps",
    )
    speed.add_argument("--profile-dir", help="folder for profiler traces (default ./profiles)")
    group.add_argument("--max-batch-size", type=int, help="most images per batched forward (default 1)")
    group.add_argument("--batch-delay-ms", type=int, help="how long a request waits for batch company (default 0)")
    group.add_argument("--config", help="JSON or YAML file with any of these options; the command line wins")


#: Options users of the seed project pass that we do not support yet: accepted by the parser so the
#: error can say so, never silently ignored. Value: predicate telling whether the given value asks
#: for the missing feature (e.g. `--num-gpus 1` is fine).
NOT_SUPPORTED_YET: dict[str, tuple[dict[str, Any], Callable[[Any], bool]]] = {
    "num_gpus": ({"type": int}, lambda v: v != 1),
    "tp_size": ({"type": int}, lambda v: v != 1),
    "sp_degree": ({"type": int}, lambda v: v != 1),
    "ulysses_degree": ({"type": int}, lambda v: v != 1),
    "ring_degree": ({"type": int}, lambda v: v != 1),
    "enable_cfg_parallel": ({"action": "store_true", "default": None}, bool),
    "lora_path": ({}, lambda v: v is not None),
    "lora_nickname": ({}, lambda v: v is not None),
    "dit_cpu_offload": ({"action": "store_true", "default": None}, bool),
    "text_encoder_cpu_offload": ({"action": "store_true", "default": None}, bool),
    "vae_cpu_offload": ({"action": "store_true", "default": None}, bool),
    "cache_dit": ({"action": "store_true", "default": None}, bool),
    "enable_teacache": ({"action": "store_true", "default": None}, bool),
    "backend": ({}, lambda v: v not in (None, "native")),
}


def add_not_supported_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("not supported yet (rejected with an error)")
    for name, (kwargs, _) in NOT_SUPPORTED_YET.items():
        group.add_argument("--" + name.replace("_", "-"), help=argparse.SUPPRESS, **kwargs)


def reject_not_supported(values: dict[str, Any]) -> None:
    for name, (_, asks_for_feature) in NOT_SUPPORTED_YET.items():
        value = values.get(name)
        if value is not None and asks_for_feature(value):
            flag = "--" + name.replace("_", "-")
            raise CommandError(f"{flag} is not supported yet (got {value!r}); see the README for what works today")


def load_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CommandError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CommandError(f"--config {path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CommandError(f"--config {path}: expected a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Options from `--config`, overridden by those given on the command line; values from the file
    go through the same type conversion and choices as the command line."""
    values = vars(args).copy()
    if not args.config:
        return values
    known = {action.dest: action for action in parser._actions if action.dest not in ("help", "config")}
    for key, value in load_config_file(args.config).items():
        action = known.get(key)
        if action is None:
            raise CommandError(f"--config {args.config}: unknown option {key!r}")
        if values.get(key) is not None and values[key] != action.default:
            continue  # the command line wins
        if value is not None and action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as err:
                raise CommandError(f"--config {args.config}: {key}: {err}") from err
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise CommandError(f"--config {args.config}: {key} must be one of {choices}, got {value!r}")
        values[key] = value
    return values
