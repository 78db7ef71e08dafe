"""Command-line flags built from the field tables (`sgl_diffusion.fields`): one flag per field, with the help,
type, choices, bounds and default that the Rust declaration gives it. The native binary builds its flags from the
same tables (`crates/sgl-server/src/flags.rs`), so both list the same flags."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from ..fields import Field

#: `type=` of each kind of value (text and choices stay strings).
_TYPES: dict[str, Any] = {"integer": int, "number": float}


def flag_arguments(field: Field) -> dict[str, Any]:
    """`add_argument` keywords of a field's flag; unset flags are `None`, so that defaults stay the engine's."""
    # `%` is argparse's formatting character.
    arguments: dict[str, Any] = {"dest": field.dest, "help": field.help.replace("%", "%%"), "default": None}
    if field.kind == "bool":
        arguments["action"] = argparse.BooleanOptionalAction if field.negatable else "store_true"
        return arguments
    if field.kind in _TYPES:
        arguments["type"] = _TYPES[field.kind]
    if field.choices:
        arguments["choices"] = list(field.choices)
    if field.list:
        if field.repeat:
            arguments["action"] = "append"
        else:
            arguments["nargs"] = "+"
        if field.choices:
            # One name for each value, not the list of choices after every one.
            arguments["metavar"] = field.dest.removesuffix("s").upper()
    return arguments


def add_flags(parser: argparse.ArgumentParser, fields: Iterable[Field], *, hidden: bool = False) -> None:
    """Adds a flag for every command-line field, under its `--help` heading; `hidden` ones are parsed but not
    listed."""
    for field in fields:
        if not field.cli:
            continue
        arguments = flag_arguments(field)
        if hidden:
            arguments["help"] = argparse.SUPPRESS
        _argument_group(parser, field.group).add_argument(*field.flags, **arguments)


def _argument_group(parser: argparse.ArgumentParser, title: str) -> Any:
    """The parser's group of that title, made on first use (several tables share headings)."""
    for existing in parser._action_groups:
        if existing.title == title:
            return existing
    return parser.add_argument_group(title)
