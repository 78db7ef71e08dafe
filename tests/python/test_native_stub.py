"""The `_native.pyi` stub names exactly what the compiled extension exports, and its generated part (the types of the
request fields and options, for `DiffGenerator`'s keywords and the executor's `Request`) is what the field tables
say: `UPDATE_STUBS=1 pytest tests/python/test_native_stub.py` rewrites that part after a field changed."""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

from sgl_diffusion import _native
from sgl_diffusion.fields import Field, table

STUB = Path(__file__).parents[2] / "python" / "sgl_diffusion" / "_native.pyi"
BEGIN = "# --- generated from the field tables"
END = "# --- end of the generated part"


def stub_members() -> dict[str, set[str]]:
    """What the stub declares, but its generated (type-only) part."""
    text = STUB.read_text()
    tree = ast.parse(text[: text.index(BEGIN)] + text[text.index(END) :])
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members[node.name] = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            members[node.name] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = set()
    return members


def test_stub_matches_the_module() -> None:
    stub = stub_members()
    exported = {name for name in dir(_native) if not name.startswith("_")} | {"__version__"}
    assert set(stub) == exported
    for name, methods in stub.items():
        obj = getattr(_native, name)
        if inspect.isclass(obj) and methods:
            public = {m for m in methods if not m.startswith("_")}
            assert public <= set(dir(obj)), f"{name}: {public - set(dir(obj))}"


def attributes(fields: list[tuple[str, Field]], *, sequence: str = "list") -> list[str]:
    lines = []
    for name, field in fields:
        lines.append(f"    {name}: {field.annotation(sequence=sequence)}")
        if field.help:
            lines.append(f'    """{field.help}"""')
    return lines


def generated() -> str:
    """The stub's generated part, from the tables."""
    request = [(field.name, field) for field in table("request")]
    options = [(field.name, field) for field in table("model") if field.name != "model_path"]
    options += [(field.dest, field) for field in table("engine") if field.cli]
    resolved = [(field.name, field) for field in table("resolved")]
    return "\n".join(
        [
            f"{BEGIN} by tests/python/test_native_stub.py (type-only: the module has none of these names) ---",
            "",
            "class RequestFields(TypedDict, total=False):",
            '    """A request\'s fields (`sgl_core::GenerationRequest`): keywords of `DiffGenerator.submit` and',
            '    `generate`."""',
            "",
            *attributes(request),
            "",
            "class EngineOptions(TypedDict, total=False):",
            '    """Model and scheduler options (`sgl_bridge::ModelConfig`, `EngineConfig`) by the names `--config` files',
            '    use: keywords of `DiffGenerator.from_pretrained`."""',
            "",
            *attributes(options),
            "",
            "class ResolvedRequest(Protocol):",
            '    """A request as pipelines receive it (`sgl_core::ResolvedRequest`; `runtime.request.Request`)."""',
            "",
            *attributes(resolved, sequence="tuple"),
            "",
            END + " ---",
        ]
    )


def test_generated_types_match_the_tables() -> None:
    text = STUB.read_text()
    start, end = text.index(BEGIN), text.index(END)
    end = text.index("\n", end) if "\n" in text[end:] else len(text)
    current = text[start:end]
    if os.environ.get("UPDATE_STUBS"):
        STUB.write_text(text[:start] + generated() + text[end:])
        return
    assert current == generated(), "a field changed: run `UPDATE_STUBS=1 pytest tests/python/test_native_stub.py`"
