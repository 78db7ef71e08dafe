"""`sgl-diffusion generate`: one request through the engine, written to files."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from .. import _native
from ..api import DiffGenerator, GenerationResult, collect
from ..fields import table
from .flags import add_flags
from .options import (
    CommandError,
    add_model_options,
    add_sglang_options,
    engine_config,
    parse_options,
    serve_only_fields,
)


def not_here() -> dict[str, str]:
    """The server's options, given to `generate` (SGLang's docs pass them to both commands): each is an error."""
    return {
        field.dest: "applies to `sgl-diffusion serve` only: `generate` starts no HTTP server"
        for field in serve_only_fields()
    }


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("generate", help="generate images or videos from a prompt")
    # Every request field (`sgl_core::GenerationRequest`) is a flag.
    add_flags(parser, table("request"))
    output = parser.add_argument_group("output")
    output.add_argument("--output-path", help="folder for outputs (default: outputs)")
    output.add_argument("--output-file-name", help="file name (default: from the prompt, time and a hash)")
    output.add_argument(
        "--save-output", action=argparse.BooleanOptionalAction, default=None, help="write files (default: yes)"
    )
    output.add_argument("--perf-dump-path", help="write timings and memory as JSON here")
    add_model_options(parser)
    add_sglang_options(parser)
    add_flags(parser, serve_only_fields(), hidden=True)
    parser.set_defaults(run=lambda args: run(args, parser))
    return parser


def checked_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The command line and `--config` merged and checked; raises `CommandError` (a usage error)."""
    options = parse_options(parser, args, not_here())
    for field in table("request"):
        if field.required and not options.get(field.dest):
            raise CommandError(f"{field.flag} is required (on the command line or in --config)")
    engine_config(options)  # checks the scheduler options' values
    return options


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        options = checked_options(parser, args)
    except CommandError as err:
        parser.error(str(err))
    try:
        return generate(options)
    except _native.InvalidRequestError as err:
        print(f"sgl-diffusion generate: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, _native.ModelLoadError, _native.DeadlineExceededError) as err:
        print(f"sgl-diffusion generate: error: {err}", file=sys.stderr)
        return 1


def generate(options: dict[str, Any]) -> int:
    from tqdm import tqdm

    generator = DiffGenerator.from_config(engine_config(options))
    # Fields without a flag (`image_path`: `--image-path` fills the list form) come from no option.
    fields = {field.name: options.get(field.dest) for field in table("request") if field.cli}
    try:
        handle = generator.submit(**fields)
        request = json.loads(handle.request_json)
        for note in request["notes"]:
            print(note, file=sys.stderr)
        with tqdm(total=request["num_inference_steps"], desc="denoising", unit="step", file=sys.stderr) as bar:
            result = collect(handle, lambda step, total: bar.update(step - bar.n))
    finally:
        generator.shutdown()
    print(f"seed {result.seed}; {result.timings['total_duration_ms'] / 1000:.2f} s", file=sys.stderr)
    if options.get("save_output") is not False:
        for path in save_outputs(result, options):
            print(path)
    if result.timings.get("profile_trace_dir"):  # --profile: stdout lists the trace folder like other outputs
        print(result.timings["profile_trace_dir"])
    if options.get("perf_dump_path"):
        dump_perf(result, options["perf_dump_path"])
    return 0


def default_file_stem(prompt: str, seed: int) -> str:
    """The prompt, sanitized and shortened, plus a timestamp and a short hash (unique per run)."""
    words = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:48].rstrip("_") or "output"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    digest = hashlib.sha1(f"{prompt}\0{seed}\0{time.time_ns()}".encode()).hexdigest()[:8]
    return f"{words}_{stamp}_{digest}"


def save_outputs(result: GenerationResult, options: dict[str, Any]) -> list[Path]:
    folder = Path(options.get("output_path") or "outputs")
    folder.mkdir(parents=True, exist_ok=True)
    extension = "." + result.request["output_format"].replace("jpeg", "jpg")
    name = options.get("output_file_name")
    stem, suffix = (Path(name).stem, Path(name).suffix or extension) if name else (None, extension)
    stem = stem or default_file_stem(result.request["prompt"], result.seed)
    paths = []
    count = len(result.encoded)
    for index in range(count):
        path = folder / (f"{stem}{suffix}" if count == 1 else f"{stem}_{index}{suffix}")
        result.save(path, index)
        paths.append(path)
    return paths


def dump_perf(result: GenerationResult, path: str) -> None:
    record = dict(result.timings)
    record["request"] = result.request
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2))
