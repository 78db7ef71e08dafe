"""`sgl-diffusion serve`: the OpenAI-compatible HTTP server (Rust, axum) in front of the engine.

The same option parser serves the native `sgl-diffusion-server` binary, which calls
`parse_serve_config` so that both take exactly the same flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .. import _native
from .options import CommandError, add_model_options, add_sglang_options, engine_config, parse_options

#: The HTTP server's own options. `generate` knows them too, to say that they do not apply there.
SERVER_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--host", {"help": "address to bind (default 127.0.0.1)"}),
    ("--port", {"type": int, "help": "port (default 30000)"}),
    ("--api-key", {"help": "require Authorization: Bearer <key> on every route but /health"}),
    ("--max-queue-size", {"type": int, "help": "requests waiting before 429 (default 256)"}),
    ("--max-body-mb", {"type": int, "help": "largest request body in MiB (default 16)"}),
    (
        "--cors-origin",
        {"action": "append", "help": "allow this browser origin, or * for any (repeatable; default: CORS off)"},
    ),
    ("--public-url", {"help": "base of absolute url outputs (default: the request's Host)"}),
    ("--output-ttl", {"type": int, "help": "seconds url outputs stay downloadable (default 3600)"}),
    ("--output-dir", {"help": "where url outputs are stored (default: a temp folder)"}),
    (
        "--served-model-name",
        {"action": "append", "help": "extra name the model answers to, e.g. dall-e-3 (repeatable)"},
    ),
    ("--health-generate-ttl", {"type": int, "help": "seconds a /health_generate result is reused"}),
    (
        "--max-connections",
        {"type": int, "help": "connections served at once; more wait until one closes (default 512)"},
    ),
    (
        "--header-read-timeout",
        {
            "type": int,
            "help": "seconds a client has to send request headers; idle connections close after it (default 10)",
        },
    ),
    ("--body-read-timeout", {"type": int, "help": "seconds a client has to send a request body (default 60)"}),
    (
        "--max-input-pixels",
        {
            "type": int,
            "help": "largest input image (input_reference) in pixels, checked before decoding (default 50000000)",
        },
    ),
    (
        "--stall-timeout",
        {"type": int, "help": "/health answers 503 once a running batch shows no progress for this long (default 600)"},
    ),
    (
        "--log-format",
        {
            "choices": ["text", "json"],
            "help": "log lines as text (default) or JSON; the filter is SGL_DIFFUSION_LOG or RUST_LOG (default info)",
        },
    ),
    (
        "--max-finished-jobs",
        {
            "type": int,
            "help": "finished video jobs kept with their files; beyond it, those closest to expiring go first "
            "(default 10000)",
        },
    ),
)

#: Server flags that must be at least 1, by their config key.
POSITIVE_SERVER_OPTIONS = (
    "max_body_mb",
    "max_connections",
    "header_read_timeout",
    "body_read_timeout",
    "max_input_pixels",
    "stall_timeout",
    "max_finished_jobs",
)


def server_option_name(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("serve", help="serve the model over OpenAI-compatible HTTP")
    configure(parser)
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    server = parser.add_argument_group("server")
    for flag, kwargs in SERVER_OPTIONS:
        server.add_argument(flag, **kwargs)
    add_sglang_options(parser)


def build_config(options: dict[str, Any]) -> dict[str, Any]:
    """The JSON the Rust side takes (`sgl_python::serve::ServeConfig`)."""
    server = {
        "host": options.get("host"),
        "port": options.get("port"),
        "api_key": options.get("api_key"),
        "max_body_mb": options.get("max_body_mb"),
        "cors_origins": options.get("cors_origin"),
        "public_url": options.get("public_url"),
        "output_ttl_secs": options.get("output_ttl"),
        "output_dir": options.get("output_dir"),
        "served_model_names": options.get("served_model_name"),
        "model_path": options.get("model_path"),
        "health_generate_ttl_secs": options.get("health_generate_ttl"),
        "max_connections": options.get("max_connections"),
        "header_read_timeout_secs": options.get("header_read_timeout"),
        "body_read_timeout_secs": options.get("body_read_timeout"),
        "max_input_pixels": options.get("max_input_pixels"),
        "stall_timeout_secs": options.get("stall_timeout"),
        "log_format": options.get("log_format"),
        "max_finished_jobs": options.get("max_finished_jobs"),
    }
    engine = {**engine_config(options), "max_queue_size": options.get("max_queue_size")}
    if options.get("max_queue_size") is not None and options["max_queue_size"] < 1:
        raise CommandError("--max-queue-size must be at least 1")
    for name in POSITIVE_SERVER_OPTIONS:
        value = options.get(name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1")
    if options.get("port") is not None and not 0 <= options["port"] <= 65535:
        raise CommandError("--port must be between 0 and 65535")
    return {
        "engine": {key: value for key, value in engine.items() if value is not None},
        "server": {key: value for key, value in server.items() if value is not None},
    }


def parse_serve_config(argv: Sequence[str]) -> str:
    """Parses serve flags (for the native binary); exits with a usage error like the CLI does."""
    parser = argparse.ArgumentParser(prog="sgl-diffusion-server", description="sgl-diffusion HTTP server")
    configure(parser)
    args = parser.parse_args(list(argv))
    try:
        return json.dumps(build_config(parse_options(parser, args)))
    except CommandError as err:
        parser.error(str(err))
        raise  # parser.error exits; this satisfies type checkers


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
