"""Each request field and option is declared once, in Rust; every Python face is built from, or checked against, its
field table: the flags of both commands, `DiffGenerator`'s keywords, the executor's `Request`, the choices
`RuntimeOptions` knows and the README's option list. (`test_native_stub.py` checks the generated stub; the Rust tests
check the HTTP wire and OpenAPI, and `test_native_binary.py` that the native binary lists the same flags as `serve`.)"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from sgl_diffusion import DiffGenerator
from sgl_diffusion.cli import generate, serve
from sgl_diffusion.fields import Field, names, table
from sgl_diffusion.runtime.cuda_graphs import CUDA_GRAPH_CHOICES
from sgl_diffusion.runtime.device import PRECISIONS
from sgl_diffusion.runtime.options import CFG_BATCHING_CHOICES, RuntimeOptions
from sgl_diffusion.runtime.request import Request

README = Path(__file__).parents[2] / "README.md"


def parser_of(command: str) -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="sgl-diffusion").add_subparsers()
    return generate.add_parser(commands) if command == "generate" else serve.add_parser(commands)


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def cli_fields(*tables: str) -> list[Field]:
    return [field for name in tables for field in table(name) if field.cli]  # type: ignore[arg-type]


def test_every_request_field_is_a_generate_flag_of_its_type() -> None:
    actions = option_actions(parser_of("generate"))
    for field in cli_fields("request"):
        action = actions[field.flag]
        # The flag's name on the namespace and in `--config` files (`image_path` for the list field `image_paths`,
        # whose flag `--image-path` is repeated, as SGLang's docs spell it).
        assert action.dest == field.dest and action.help == field.help, field.name
        assert action.type is {"integer": int, "number": float}.get(field.kind), field.name
        assert tuple(action.choices or ()) == field.choices, field.name


def test_every_option_is_a_flag_of_the_commands_that_take_it() -> None:
    serve_actions, generate_actions = option_actions(parser_of("serve")), option_actions(parser_of("generate"))
    for field in cli_fields("model", "engine", "server"):
        for flag in field.flags:
            assert serve_actions[flag].dest == field.dest, flag
            # Server options parse in `generate` too, to be refused by name (SGLang's docs give them to both).
            assert (generate_actions[flag].help == argparse.SUPPRESS) == (field.serve_only or field in table("server"))
    assert "--prompt" not in serve_actions


def test_generate_refuses_server_options_by_name() -> None:
    parser = parser_of("generate")
    for field in cli_fields("server"):
        with pytest.raises(generate.CommandError, match=f"{field.flag} applies to `sgl-diffusion serve` only"):
            value = {"bool": [], "integer": ["1"], "choice": [field.choices[0]] if field.choices else []}
            argv = ["--prompt", "a", field.flag, *value.get(field.kind, ["x"])]
            generate.checked_options(parser, parser.parse_args(argv))


def test_serve_config_keys_are_the_declared_names() -> None:
    config = serve.build_config({"request_timeout": 2.0, "output_ttl": 5, "cors_origin": ["*"], "model_path": "m"})
    assert config == {
        "engine": {"model": {"model_path": "m"}, "request_timeout_secs": 2.0},
        "server": {"output_ttl_secs": 5, "cors_origins": ["*"], "model_path": "m"},
    }


def test_from_pretrained_takes_exactly_the_options() -> None:
    with pytest.raises(TypeError, match="got unexpected keyword argument") as raised:
        DiffGenerator.from_pretrained(None, turbo=True)
    accepted = set(str(raised.value).split("it takes: ")[1].split(", "))
    expected = {field.name for field in table("model")} - {"model_path"}
    expected |= {field.dest for field in cli_fields("engine")}
    assert accepted == expected


def test_generate_takes_the_request_fields_as_keywords() -> None:
    generator = DiffGenerator.__new__(DiffGenerator)  # no engine: the keywords are refused before it is used
    with pytest.raises(TypeError, match="got unexpected keyword argument") as raised:
        generator.generate("a", stepz=3)
    accepted = set(str(raised.value).split("it takes: ")[1].split(", "))
    assert accepted == set(names("request")) - {"prompt", "output_format"}


def test_the_request_mirror_has_the_resolved_fields() -> None:
    assert [field.name for field in dataclasses.fields(Request)] == ["id", *names("resolved")]


def test_runtime_options_read_every_model_option_and_know_its_choices() -> None:
    fields = {field.name: field for field in table("model")}
    assert tuple(PRECISIONS) == fields["dit_precision"].choices == fields["vae_precision"].choices
    assert fields["text_encoder_precisions"].choices == tuple(PRECISIONS)
    assert CFG_BATCHING_CHOICES == fields["cfg_batching"].choices
    assert CUDA_GRAPH_CHOICES == fields["cuda_graphs"].choices
    with pytest.raises(ValueError, match="unknown model options"):
        RuntimeOptions.from_config({"device": "cpu", "turbo": True})
    # Each declared option is taken (not refused as unknown).
    values = {"bool": True, "integer": 3, "text": None, "choice": None}
    for field in fields.values():
        value = values.get(field.kind)
        if value is None:
            value = [field.choices[-1]] if field.list else (field.choices[-1] if field.choices else None)
        if field.name in ("device", "cuda_graphs"):
            value = "cpu" if field.name == "device" else "off"
        RuntimeOptions.from_config({"device": "cpu", field.name: value})


def test_the_readme_lists_every_option() -> None:
    text = README.read_text()
    missing = [flag for field in cli_fields("model", "engine", "server") for flag in field.flags if flag not in text]
    assert missing == []
    assert all(re.search(rf"{re.escape(field.flag)}\b", text) for field in cli_fields("model", "engine", "server"))
