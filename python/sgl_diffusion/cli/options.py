"""Command-line options shared by commands, `--config` files, and SGLang Diffusion's options.

Every option has one definition here (SGLang's flags that we only accept by name: `sglang_compat.OPTIONS`). A
`--config` file (JSON or YAML) uses the same names (with `-` or `_`, any of an option's spellings, e.g. `precision`
for `dit_precision`); an option given on the command line wins over the file. `parse_options` merges both and
rejects, in one error listing each, every value that asks for a feature not built yet.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .. import sglang_compat
from ..layers.attention import available_attention_backends, check_attention_backend_name
from ..runtime.cuda_graphs import CUDA_GRAPH_CHOICES
from ..runtime.device import PRECISIONS
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
    "text_encoder_precisions",
)


#: Options of the scheduler in every command, by their key in `sgl_bridge::EngineConfig`.
ENGINE_OPTIONS = {
    "max_batch_size": "max_batch_size",
    "batch_delay_ms": "batch_delay_ms",
    "max_request_cost": "max_request_cost",
    "max_request_pixels": "max_request_pixels",
    "request_timeout": "request_timeout_secs",
}


def model_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `model` part of the engine config, from parsed options (unset ones left out)."""
    return {name: options[name] for name in MODEL_OPTIONS if options.get(name) is not None}


def engine_config(options: dict[str, Any]) -> dict[str, Any]:
    """The engine config (`sgl_bridge::EngineConfig`) from parsed options (unset ones left out)."""
    for name, least in (
        ("max_batch_size", 1),
        ("batch_delay_ms", 0),
        ("max_request_cost", 1),
        ("max_request_pixels", 1),
    ):
        if options.get(name) is not None and options[name] < least:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {least}")
    if options.get("request_timeout") is not None and not options["request_timeout"] > 0:
        raise CommandError("--request-timeout must be a number of seconds > 0")
    scheduler = {key: options[name] for name, key in ENGINE_OPTIONS.items() if options.get(name) is not None}
    return {"model": model_config(options), **scheduler}


class CommandError(Exception):
    """A usage error reported as `sgl-diffusion: error: ...` with exit code 2."""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-path", help="diffusers folder or Hugging Face id (local cache); default: built-in tiny model"
    )
    group.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when present")
    # `precision` is the DiT's precision in SGLang Diffusion's config files.
    group.add_argument(
        "--dit-precision", "--precision", choices=list(PRECISIONS), help="default: bf16 on cuda, fp32 on cpu"
    )
    group.add_argument("--vae-precision", choices=list(PRECISIONS), help="default: bf16 on cuda, fp32 on cpu")
    group.add_argument(
        "--text-encoder-precisions",
        nargs="+",
        choices=list(PRECISIONS),
        metavar="PRECISION",
        help="one per text encoder, in model_index.json order (FLUX.1: CLIP T5; Wan: UMT5); default: the DiT's",
    )
    group.add_argument(
        "--attention-backend",
        help=f"attention kernels (available: {', '.join(available_attention_backends())}; fa3 and fa4 mean fa)",
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
    group.add_argument(
        "--max-request-cost",
        type=int,
        help="most token-steps (outputs x latent tokens x steps x guidance branches) one request may cost; "
        "default: 10 requests at the model's defaults",
    )
    group.add_argument(
        "--max-request-pixels",
        type=int,
        help="most output pixels (outputs x width x height x frames) one request may ask for; "
        "default: 10 requests at the model's defaults",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        help="seconds after which a request is stopped between two steps (default: none); "
        "a request's timeout_seconds may ask for less",
    )
    group.add_argument("--config", help="JSON or YAML file with any of these options; the command line wins")


def add_sglang_options(parser: argparse.ArgumentParser) -> None:
    """SGLang Diffusion's flags (and config keys) that have no option of our own: see `sglang_compat.OPTIONS`."""
    sglang_compat.add_options(parser)


def parse_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, not_here: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The options from the command line and `--config`, checked. Raises `CommandError` listing every option, config
    key and environment variable that asks for a feature not built yet, and every option in `not_here` (name: why
    it does not apply to this command) that was given."""
    values, spelled = merge_config(parser, args)
    problems = sglang_compat.option_problems(values, spelled)
    problems += [f"{spelled[name]} {why}" for name, why in (not_here or {}).items() if values.get(name) is not None]
    backend = values.get("attention_backend")
    if backend is not None:
        try:
            values["attention_backend"] = check_attention_backend_name(backend)
        except ValueError as err:
            problems.append(f"{spelled['attention_backend']}: {err}")
    problems += sglang_compat.environment_problems()
    if problems:
        raise CommandError("\n".join(problems))
    return values


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


def merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """Options from `--config`, overridden by those given on the command line; values from the file
    go through the same type conversion and choices as the command line. Also returns how each option
    was spelled (`--num-gpus`, `run.yaml: num_gpus`), for error messages."""
    values = vars(args).copy()
    actions = [action for action in parser._actions if action.dest not in ("help", "config") and action.option_strings]
    spelled = {action.dest: action.option_strings[0] for action in actions}
    if not args.config:
        return values, spelled
    # Every spelling of an option is a key: `dit_precision` and `precision`, `sp_degree` and `sp_size`.
    known = {flag.lstrip("-").replace("-", "_"): action for action in actions for flag in action.option_strings}
    from_file: dict[str, str] = {}
    for key, value in load_config_file(args.config).items():
        action = known.get(key)
        if action is None:
            raise CommandError(f"--config {args.config}: unknown option {key!r}")
        where = f"{args.config}: {key}"
        if action.dest in from_file:
            raise CommandError(f"--config {args.config}: {key} and {from_file[action.dest]} are the same option")
        from_file[action.dest] = key
        if values.get(action.dest) is not None and values[action.dest] != action.default:
            continue  # the command line wins
        values[action.dest] = convert_config_value(action, value, where)
        spelled[action.dest] = where
    return values, spelled


def convert_config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a config file through the option's type and choices (each item of a list option)."""
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return None if value is None else [convert_config_value_item(action, item, where) for item in items]
    return convert_config_value_item(action, value, where)


def convert_config_value_item(action: argparse.Action, value: Any, where: str) -> Any:
    if value is not None and action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise CommandError(f"--config {where}: {err}") from err
    if value is not None and action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise CommandError(f"--config {where} must be one of {choices}, got {value!r}")
    return value
