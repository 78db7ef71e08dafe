"""Command-line options shared by commands, `--config` files, and SGLang Diffusion's options.

Every option is declared once, on its Rust struct (`ModelConfig`, `EngineConfig`, `ServerConfig`; SGLang's flags that
we only accept by name are `sglang_compat.OPTIONS`), and its flag is built from that declaration (`flags.py`). A
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

from .. import _native, sglang_compat
from ..fields import Field, table
from ..layers.attention import check_attention_backend_name
from .flags import add_flags


def model_config(options: dict[str, Any]) -> dict[str, Any]:
    """The `model` part of the engine config (`sgl_bridge::ModelConfig`), from parsed options (unset ones left
    out)."""
    return {field.name: options[field.dest] for field in table("model") if options.get(field.dest) is not None}


def engine_config(options: dict[str, Any]) -> dict[str, Any]:
    """The engine config (`sgl_bridge::EngineConfig`) from parsed options (unset ones left out), checked by the
    engine's own rules (the bounds its fields declare): a value out of bounds is a `CommandError` naming the flag."""
    scheduler = {
        field.name: options[field.dest]
        for field in table("engine")
        if field.cli and options.get(field.dest) is not None
    }
    config = {"model": model_config(options), **scheduler}
    try:
        _native.check_engine_config(json.dumps(config))
    except ValueError as err:
        raise CommandError(str(err).removeprefix("invalid engine config: ")) from err
    return config


def serve_only_fields() -> list[Field]:
    """The options only `sgl-diffusion serve` (and the native binary) takes: the server's and the engine's
    serve-only ones (`--max-queue-size`)."""
    return [field for field in table("engine") if field.serve_only] + [field for field in table("server") if field.cli]


class CommandError(Exception):
    """A usage error reported as `sgl-diffusion: error: ...` with exit code 2."""


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model's options and the scheduler's (but the serve-only ones), from their Rust declarations, and
    `--config`."""
    add_flags(parser, table("model"))
    add_flags(parser, [field for field in table("engine") if not field.serve_only])
    parser.add_argument_group("config").add_argument(
        "--config", help="JSON or YAML file with any of these options; the command line wins"
    )


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
    # Mapping options (`diffusers_kwargs`) have no flag: only a config file gives them.
    mappings = {field.name for field in table("model") if field.kind == "object" and not field.cli}
    for key, value in load_config_file(args.config).items():
        if key in mappings:
            if not isinstance(value, dict):
                raise CommandError(f"--config {args.config}: {key} must be a mapping, got {value!r}")
            values[key] = value
            spelled[key] = f"{args.config}: {key}"
            continue
        action = known.get(key)
        if action is None:
            raise CommandError(f"--config {args.config}: unknown option {key!r}")
        where = f"{args.config}: {key}"
        if action.dest in from_file:
            raise CommandError(f"--config {args.config}: {key} and {from_file[action.dest]} are the same option")
        from_file[action.dest] = key
        if values.get(action.dest) is not None and values[action.dest] != action.default:
            continue  # the command line wins
        values[action.dest] = convert_config_value(action, value, f"--config {where}")
        spelled[action.dest] = where
    return values, spelled


def convert_config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a config file (`where` says which: `--config run.yaml: num_gpus`), or a flag the native binary
    parsed (`--num-gpus`), through the option's type and choices (each item of a list option)."""
    # A list option: several values after one flag, or one per repeated flag (`--image-path`).
    if action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return None if value is None else [convert_config_value_item(action, item, where) for item in items]
    return convert_config_value_item(action, value, where)


def convert_config_value_item(action: argparse.Action, value: Any, where: str) -> Any:
    if value is not None and action.type is not None and not isinstance(value, bool):
        try:
            value = action.type(value)  # type: ignore[operator]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise CommandError(f"{where}: {err}") from err
    if value is not None and action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise CommandError(f"{where} must be one of {choices}, got {value!r}")
    return value
