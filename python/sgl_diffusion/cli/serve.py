"""`sgl-diffusion serve`: the OpenAI-compatible HTTP server (Rust, axum) in front of the engine.

Its flags are the model's, the scheduler's and the server's, each declared once on its Rust struct (`ModelConfig`,
`EngineConfig`, `ServerConfig`), plus `--config` and SGLang's flags. The native `sgl-diffusion-server` binary parses
the same flags in Rust (clap, from the same tables plus `python_flags_json`) and hands what it parsed to
`config_from_flags`, which merges `--config` and checks everything exactly as this command does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .. import _native
from ..fields import table
from .flags import add_flags
from .options import (
    CommandError,
    add_model_options,
    add_sglang_options,
    convert_config_value,
    engine_config,
    parse_options,
    serve_only_fields,
)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("serve", help="serve the model over OpenAI-compatible HTTP")
    configure(parser)
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_flags(parser, serve_only_fields())
    add_sglang_options(parser)


def build_config(options: dict[str, Any]) -> dict[str, Any]:
    """The JSON the Rust side takes (`sgl_python::serve::ServeConfig`), checked by the server's and the engine's
    own rules (a value out of its declared bounds is a `CommandError` naming the flag)."""
    server = {field.name: options[field.dest] for field in table("server") if options.get(field.dest) is not None}
    if options.get("model_path") is not None:
        server["model_path"] = options["model_path"]  # the name the model answers to
    engine = engine_config(options)
    try:
        _native.check_server_config(json.dumps(server))
    except ValueError as err:
        raise CommandError(str(err).removeprefix("invalid server config: ")) from err
    return {"engine": engine, "server": server}


def serve_parser(prog: str = "sgl-diffusion-server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="sgl-diffusion HTTP server")
    configure(parser)
    return parser


def parse_serve_config(argv: Sequence[str]) -> str:
    """Parses serve flags with this command's parser; exits with a usage error like the CLI does."""
    parser = serve_parser()
    args = parser.parse_args(list(argv))
    try:
        return json.dumps(build_config(parse_options(parser, args)))
    except CommandError as err:
        parser.error(str(err))
        raise  # parser.error exits; this satisfies type checkers


def python_flags_json() -> str:
    """The serve flags declared in Python (`--config`, SGLang's), as entries shaped like the Rust tables', for the
    native binary to parse: the rest of its flags it builds from the Rust tables themselves."""
    rust = {flag for field in [*table("model"), *table("engine"), *table("server")] for flag in field.flags}
    entries = []
    for group in serve_parser()._action_groups:
        for action in group._group_actions:
            if not action.option_strings or action.dest == "help" or action.option_strings[0] in rust:
                continue
            entries.append(
                {
                    "name": action.dest,
                    "flag": action.option_strings[0],
                    "aliases": action.option_strings[1:],
                    "help": action.help or "",
                    "group": group.title,
                    "kind": "integer" if action.type is int else "choice" if action.choices else "text",
                    "choices": list(action.choices or ()),
                    "optional_value": action.nargs == "?",
                    "metavar": action.metavar,
                }
            )
    return json.dumps(entries)


def config_from_flags(given_json: str) -> str:
    """The server config from the flags the native binary parsed (`{name: value}` of each flag given; values of the
    flags declared in Python as their text), through `--config` and every check of `parse_serve_config`. Raises
    `CommandError`."""
    parser = serve_parser()
    args = parser.parse_args([])
    actions = {action.dest: action for action in parser._actions}
    for name, value in json.loads(given_json).items():
        action = actions[name]
        setattr(args, name, convert_config_value(action, value, action.option_strings[0]))
    return json.dumps(build_config(parse_options(parser, args)))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = build_config(parse_options(parser, args))
    except CommandError as err:
        parser.error(str(err))
    try:
        _native.serve(json.dumps(config))
    except _native.ModelLoadError as err:
        print(f"sgl-diffusion serve: error: the model failed to load: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"sgl-diffusion serve: error: {err}", file=sys.stderr)
        return 1
    return 0
