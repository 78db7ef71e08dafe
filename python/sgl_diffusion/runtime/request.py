"""The resolved request as the Rust core hands it over: `sgl_core::ResolvedRequest`, field for field.

The class is built from that struct's field table, so a field added there reaches pipelines as an attribute with no
edit here; type checkers read its attributes from `_native.pyi` (`ResolvedRequest`, generated from the same table).
Optional fields default to `None` and lists to `()`, so code that builds a request by hand (tests) names only what
it needs beyond the required fields.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ..fields import table


def _from_wire(cls: type, item: dict[str, Any]) -> Any:
    """One item of the executor's batch JSON: `{"id": ..., "request": {...}}`."""
    lists = {field.name for field in table("resolved") if field.list}
    fields = {name: tuple(value) if name in lists else value for name, value in item["request"].items()}
    return cls(id=int(item["id"]), **fields)


def _request_class() -> type:
    fields: list[tuple[str, str] | tuple[str, str, Any]] = [("id", "int")]
    for field in table("resolved"):
        annotation = field.annotation(sequence="tuple")
        if field.list:
            fields.append((field.name, annotation, dataclasses.field(default=())))
        elif field.optional:
            fields.append((field.name, annotation, None))
        else:
            fields.append((field.name, annotation))
    cls = dataclasses.make_dataclass(
        "Request",
        fields,
        frozen=True,
        kw_only=True,
        namespace={
            "__doc__": "One request of a batch, every default already filled in and validated by the core.",
            "from_wire": classmethod(_from_wire),
        },
    )
    cls.__module__ = __name__  # `make_dataclass(module=...)` needs Python 3.12
    return cls


if TYPE_CHECKING:
    from .._native import ResolvedRequest

    class Request(ResolvedRequest):
        id: int

        def __init__(self, *, id: int, **fields: Any) -> None: ...
        @classmethod
        def from_wire(cls, item: dict[str, Any]) -> Request: ...

else:
    Request = _request_class()
