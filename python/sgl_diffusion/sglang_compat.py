"""What users bring from SGLang Diffusion's docs: its flags, config keys and environment variables, in one table.

Every name parses here. A value is either honoured (it asks for nothing we lack, e.g. `--num-gpus 1`) or rejected with
"<name> is not supported yet: <feature> (got <value>; allowed: ...)"; nothing is silently ignored.

* :data:`OPTIONS`: flags that are also `--config` keys. The CLI adds them to its parsers (`add_options`) and checks
  parsed values with `option_problems`; none of them reaches the engine.
* :data:`ENVIRONMENT`: variables SGLang reads that ask for a missing feature (Cache-DiT). `check_environment` runs
  when any entry point builds its `RuntimeOptions` (CLI, server, native binary, Python API), so it cannot be bypassed;
  the CLI also runs it while parsing, to fail before loading anything.

Options that SGLang has and we implement (`--dit-precision` with its config alias `precision`,
`--text-encoder-precisions`, `--vae-tiling`, `--vae-path`, `--profile`, the diffusers backend's `--backend`, `--trust-remote-code`,
`--diffusers-attention-backend` and `diffusers_kwargs`, `--mask-strategy-file-path` and `attention_backend_config`, ...)
are ordinary options, declared on `sgl_bridge::ModelConfig` (their flags: `cli/flags.py`); attention backend names
(`fa3`, `sage_attn_3`, ...) live in `layers/attention.py`, and `SGLANG_DIFFUSION_ATTENTION_CONFIG` (sliding tile
attention's mask strategy) is read with the options (`runtime/options.py`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENVIRONMENT",
    "OPTIONS",
    "NotSupportedYetError",
    "SGLangOption",
    "add_options",
    "check_environment",
    "environment_problems",
    "option_problems",
]


class NotSupportedYetError(ValueError):
    """Options or environment variables that ask for a feature not built yet (the message names each one)."""


_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """SGLang's boolean flags take an optional value: `--flag`, `--flag true`, `--flag false`."""
    word = str(text).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_json(value: Any) -> Any:
    """A JSON object given on the command line; a `--config` file already holds the parsed value."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected JSON, got {value!r}: {err}") from err


#: A value's problem: `None` when it is honoured, else the feature it asks for that is not built yet.
Problem = Callable[[Any], str | None]


@dataclass(frozen=True)
class SGLangOption:
    """One SGLang flag and config key. `problem` is asked only about values that were given (not `None`)."""

    name: str
    parse: Mapping[str, Any]
    help: str
    problem: Problem
    allowed: str
    aliases: tuple[str, ...] = ()

    @property
    def flags(self) -> list[str]:
        return ["--" + name.replace("_", "-") for name in (self.name, *self.aliases)]


_INT: Mapping[str, Any] = {"type": int, "metavar": "N"}
#: `--flag` alone means true, as in SGLang (`StoreBoolean`).
_BOOL: Mapping[str, Any] = {"nargs": "?", "const": True, "type": parse_bool, "metavar": "BOOL"}
_JSON: Mapping[str, Any] = {"type": parse_json, "metavar": "JSON"}


def _degree(name: str, what: str, help: str, aliases: tuple[str, ...] = ()) -> SGLangOption:
    return SGLangOption(name, _INT, help, lambda v: None if v == 1 else what, "1 (one GPU per process)", aliases)


def _off(name: str, what: str, help: str | None = None) -> SGLangOption:
    return SGLangOption(name, _BOOL, help or f"{what}: not supported yet", lambda v: what if v else None, "false")


_VAE_LOADS = ("load_encoder", "load_decoder")
_VAE_TILES = (
    "tile_sample_min_height",
    "tile_sample_min_width",
    "tile_sample_stride_height",
    "tile_sample_stride_width",
)


def _vae_config_problem(value: Any) -> str | None:
    """Both halves of the VAE are always loaded, and `--vae-tiling` uses diffusers' tiles: only those values pass."""
    if not isinstance(value, dict):
        return f"a vae_config that is not a mapping of {', '.join(_VAE_LOADS + _VAE_TILES)}"
    problems = []
    for key, item in value.items():
        if key in _VAE_LOADS:
            if item is not True:
                problems.append(f"skipping the VAE {key.removeprefix('load_')} at load time (vae_config.{key})")
        elif key in _VAE_TILES:
            if item is not None:
                problems.append(f"choosing the VAE tile size (vae_config.{key}; --vae-tiling uses diffusers' tiles)")
        else:
            problems.append(f"vae_config.{key}")
    return "; ".join(problems) or None


#: SGLang's flags and config keys that have no option of our own. Kept in the order of its docs.
OPTIONS: tuple[SGLangOption, ...] = (
    _degree("num_gpus", "multi-GPU inference", "GPUs to use: 1 (more is not supported yet)"),
    _degree("tp_size", "tensor parallelism", "tensor parallel size: 1 (more is not supported yet)"),
    _degree("sp_degree", "sequence parallelism", "sequence parallel size: 1 (more is not supported yet)", ("sp_size",)),
    _degree("ulysses_degree", "Ulysses sequence parallelism", "Ulysses degree: 1 (more is not supported yet)"),
    _degree("ring_degree", "ring-attention sequence parallelism", "ring degree: 1 (more is not supported yet)"),
    _off("enable_cfg_parallel", "CFG parallelism across GPUs"),
    _off("dit_cpu_offload", "CPU offload of the DiT"),
    _off("text_encoder_cpu_offload", "CPU offload of the text encoders"),
    _off("vae_cpu_offload", "CPU offload of the VAE"),
    SGLangOption(
        "pin_cpu_memory",
        _BOOL,
        "accepted, true or false: it pins the host copies of CPU-offloaded weights, and nothing is offloaded here "
        "(the offload options are rejected), so there is nothing to pin",
        lambda v: None,
        "true or false",
    ),
    _off("vae_sp", "sequence-parallel VAE decoding", "false only (sequence parallelism is not supported yet)"),
    SGLangOption(
        "vae_config",
        _JSON,
        "only {load_encoder: true, load_decoder: true}: both VAE halves always load; tile sizes are not supported yet",
        _vae_config_problem,
        "load_encoder: true, load_decoder: true, tile sizes null",
    ),
    _off(
        "return_frames",
        "returning raw frames from the command line, which writes files (the Python API returns them: "
        "DiffGenerator.generate(...).images / .frames)",
        "not supported yet: the command line writes files (--output-path)",
    ),
    _off("cache_dit", "Cache-DiT step caching"),
    _off("enable_teacache", "TeaCache step caching"),
)


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "SGLang Diffusion options",
        "accepted by name; a value that asks for a feature not built yet is an error that names it",
    )
    for option in OPTIONS:
        group.add_argument(*option.flags, dest=option.name, help=option.help, **option.parse)


def option_problems(values: Mapping[str, Any], spelled: Mapping[str, str]) -> list[str]:
    """One line per given option whose value asks for a missing feature; `spelled` says how the user wrote each
    name (`--num-gpus`, `run.yaml: num_gpus`)."""
    problems = []
    for option in OPTIONS:
        value = values.get(option.name)
        if value is None:
            continue
        what = option.problem(value)
        if what is not None:
            name = spelled.get(option.name, option.flags[0])
            problems.append(f"{name} is not supported yet: {what} (got {value!r}; allowed: {option.allowed})")
    return problems


@dataclass(frozen=True)
class EnvironmentRule:
    """Variables named `name`, or starting with it when it ends in `_`; an empty value counts as unset."""

    name: str
    what: str
    allowed: str
    #: Values of a matching variable that ask for nothing (`SGLANG_CACHE_DIT_ENABLED=false`).
    accepts: Callable[[str, str], bool] = lambda name, value: False

    def matches(self, variable: str) -> bool:
        return variable == self.name or (self.name.endswith("_") and variable.startswith(self.name))


ENVIRONMENT: tuple[EnvironmentRule, ...] = (
    EnvironmentRule(
        "SGLANG_CACHE_DIT_",
        "Cache-DiT step caching",
        "unset the SGLANG_CACHE_DIT_* variables, or SGLANG_CACHE_DIT_ENABLED=false alone",
        lambda name, value: name == "SGLANG_CACHE_DIT_ENABLED" and value.strip().lower() in _FALSE_WORDS,
    ),
)


def environment_problems(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per set variable that asks for a missing feature (sorted by name)."""
    environ = os.environ if environ is None else environ
    problems = []
    for variable in sorted(environ):
        value = environ[variable]
        if not value:
            continue
        for rule in ENVIRONMENT:
            if rule.matches(variable) and not rule.accepts(variable, value):
                problems.append(f"{variable}={value} is not supported yet: {rule.what} (allowed: {rule.allowed})")
    return problems


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raises `NotSupportedYetError` naming every variable that asks for a missing feature."""
    raise_problems(environment_problems(environ))


def raise_problems(problems: Iterable[str]) -> None:
    problems = list(problems)
    if problems:
        raise NotSupportedYetError("; ".join(problems))
