"""The field tables declared in Rust, as the Python faces read them.

Each request field and each option is declared once, on its Rust struct (`sgl_core::declare_fields!`):
`GenerationRequest` (what a request may ask for), `ResolvedRequest` (what a pipeline receives), `ModelConfig`,
`EngineConfig` and `ServerConfig` (options). The extension exports their tables (`_native.fields_json`), and the
Python faces are built from them: the flags of `sgl-diffusion generate` and `serve` (`cli/flags.py`), the keywords of
`DiffGenerator`, the executor's `Request` and the generated part of `_native.pyi`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Literal

from . import _native

#: The tables by name (see `sgl_python::fields::tables`).
Table = Literal["request", "resolved", "model", "engine", "server"]


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a table (`sgl_core::fields::FieldSpec`, as `table_json` writes it)."""

    name: str
    help: str
    kind: Literal["bool", "integer", "number", "text", "choice", "object"]
    optional: bool
    list: bool
    choices: tuple[str, ...]
    min: float | None
    min_exclusive: bool
    max: float | None
    required: bool
    flag: str
    aliases: tuple[str, ...]
    group: str
    repeat: bool
    negatable: bool
    cli: bool
    serve_only: bool
    routes: tuple[str, ...]
    default: Any

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Field:
        values = {field.name: entry[field.name] for field in dataclasses.fields(cls)}
        for name in ("choices", "aliases", "routes"):
            values[name] = tuple(values[name])
        return cls(**values)

    @property
    def dest(self) -> str:
        """The option's name on the command line's namespace, in `--config` files and as a Python keyword (the flag
        without dashes: `request_timeout` for `request_timeout_secs`)."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def flags(self) -> list[str]:
        return [self.flag, *self.aliases]

    def annotation(self, *, sequence: str = "list") -> str:
        """The Python type of the field's value, as a stub writes it."""
        if self.kind == "choice":
            base = "Literal[" + ", ".join(json.dumps(choice) for choice in self.choices) + "]"
        else:
            base = {"bool": "bool", "integer": "int", "number": "float", "text": "str", "object": "dict[str, Any]"}[
                self.kind
            ]
        if self.list:
            base = f"tuple[{base}, ...]" if sequence == "tuple" else f"list[{base}]"
        return f"{base} | None" if self.optional else base


@functools.cache
def _tables() -> dict[str, tuple[Field, ...]]:
    tables = json.loads(_native.fields_json())
    return {name: tuple(Field.from_json(entry) for entry in entries) for name, entries in tables.items()}


def table(name: Table) -> tuple[Field, ...]:
    """The fields of a table, in declaration order."""
    return _tables()[name]


def names(name: Table) -> tuple[str, ...]:
    return tuple(field.name for field in table(name))
