"""The `_native.pyi` stub names exactly what the compiled extension exports."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from sgl_diffusion import _native

STUB = Path(__file__).parents[2] / "python" / "sgl_diffusion" / "_native.pyi"


def stub_members() -> dict[str, set[str]]:
    tree = ast.parse(STUB.read_text())
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
