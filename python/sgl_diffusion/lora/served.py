"""The LoRA state of a served pipeline: the adapters loaded by nickname, and what each denoiser has merged.

Runs the commands the engine's worker hands over between batches (`sgl_core::lora::LoraCommand`, after the
Rust registry checked every path and header; see `crates/sgl-bridge/src/lora.rs`):

* `set`: loads the adapters (a nickname loaded before from the same file is reused), checks every one
  against its denoisers, then makes each named denoiser its base plus these adapters in order (what it had
  merged before is replaced; denoisers not named keep theirs). Any error leaves every weight as it was.
  Then it lets go of the tensors of the adapters in `drop` (the registry's byte budget, least recently used
  first) that no denoiser has set.
* `merge` / `unmerge`: merges the denoisers' adapters again (at their strengths, or one given for all) /
  restores their base weights exactly; the adapters stay set.
* `list`: the state, as every command answers (`sgl_core::lora::LoraState`).

Targets: `transformer` is the first denoiser, `transformer_2` the second (Wan2.2 A14B's low-noise expert),
`all` every denoiser the model has. No served model has a distillation critic, so `critic` is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import invalid_request
from .adapter import LoraAdapter, LoraError, read_lora
from .merge import MergedLoras, check_adapter

__all__ = ["ServedLoras"]

TARGET_NAMES = ("transformer", "transformer_2")


@dataclass
class _Loaded:
    path: str
    file: str
    adapter: LoraAdapter


@dataclass
class _Denoiser:
    merged: MergedLoras
    #: (nickname, strength) in merge order.
    active: list[tuple[str, float]] = field(default_factory=list)
    is_merged: bool = False


class ServedLoras:
    """LoRA adapters on a pipeline's denoisers (`denoisers()`), read in the layouts diffusers' `loader_class`
    reads (the pipeline's diffusers class, or the class whose checkpoints it serves)."""

    def __init__(self, denoisers: Sequence[torch.nn.Module], loader_class: str) -> None:
        self.loader_class = loader_class
        self.denoisers = {name: _Denoiser(MergedLoras(model)) for name, model in zip(TARGET_NAMES, denoisers)}
        self.loaded: dict[str, _Loaded] = {}

    def command(self, command_json: str) -> str:
        """Runs one command; returns the state after it as JSON."""
        command = json.loads(command_json)
        op = command["op"]
        if op == "set":
            self._set(command["adapters"])
            self.drop(command.get("drop", ()))
        elif op == "merge":
            self._merge(self._targets(command["target"]), command.get("strength"))
        elif op == "unmerge":
            for denoiser in self._targets(command["target"]):
                denoiser.merged.unmerge()
                denoiser.is_merged = False
        elif op != "list":
            raise ValueError(f"unknown LoRA command {op!r}")
        return json.dumps(self.state())

    def _targets(self, target: str, field_name: str = "target") -> list[_Denoiser]:
        if target == "all":
            return list(self.denoisers.values())
        if target not in self.denoisers:
            has = ", ".join(self.denoisers)
            raise invalid_request(field_name, f"this model has no {target} (its denoisers: {has}); use all or {has}")
        return [self.denoisers[target]]

    def _load(self, nickname: str, path: str, file: str, field_name: str = "lora_path") -> LoraAdapter:
        loaded = self.loaded.get(nickname)
        if loaded is None or loaded.file != file:
            try:
                adapter = read_lora(file, self.loader_class)
            except LoraError as err:
                raise invalid_request(field_name, str(err)) from err
            loaded = _Loaded(path=path, file=file, adapter=adapter)
        self.loaded[nickname] = loaded
        return loaded.adapter

    def _set(self, adapters: list[dict[str, Any]]) -> None:
        wanted: dict[int, tuple[_Denoiser, list[tuple[str, float]]]] = {}
        for entry in adapters:
            adapter = self._load(entry["nickname"], entry["path"], entry["file"])
            for denoiser in self._targets(entry["target"]):
                try:
                    check_adapter(denoiser.merged.model, adapter)
                except LoraError as err:
                    raise invalid_request("lora_path", f"adapter {entry['nickname']!r}: {err}") from err
                wanted.setdefault(id(denoiser), (denoiser, []))[1].append((entry["nickname"], entry["strength"]))
        for denoiser, active in wanted.values():
            denoiser.active = active
        self._merge([denoiser for denoiser, _ in wanted.values()], None)

    def for_requests(self, files: Mapping[str, str]) -> dict[str, LoraAdapter]:
        """The adapters requests name in their `lora` (nickname -> file, as the Rust registry resolved them), loaded
        (or found in memory) and checked against every denoiser."""
        adapters: dict[str, LoraAdapter] = {}
        for nickname, file in files.items():
            loaded = self.loaded.get(nickname)
            adapter = self._load(nickname, loaded.path if loaded is not None else file, file, field_name="lora")
            for denoiser in self.denoisers.values():
                try:
                    check_adapter(denoiser.merged.model, adapter)
                except LoraError as err:
                    raise invalid_request("lora", f"adapter {nickname!r}: {err}") from err
            adapters[nickname] = adapter
        return adapters

    def drop(self, nicknames: Sequence[str]) -> None:
        """Lets go of these adapters' tensors (the Rust registry's budget), but of none a denoiser has set: they
        stay registered there and are read from their file when set or named by a request again."""
        active = {nickname for denoiser in self.denoisers.values() for nickname, _ in denoiser.active}
        for nickname in nicknames:
            if nickname not in active:
                self.loaded.pop(nickname, None)

    def _merge(self, denoisers: list[_Denoiser], strength: float | None) -> None:
        for denoiser in denoisers:
            pairs = [
                (self.loaded[nickname].adapter, own if strength is None else strength)
                for nickname, own in denoiser.active
            ]
            if strength is not None:
                denoiser.active = [(nickname, strength) for nickname, _ in denoiser.active]
            denoiser.merged.merge(pairs)
            denoiser.is_merged = bool(pairs)

    def state(self) -> dict[str, Any]:
        """`sgl_core::lora::LoraState`."""
        return {
            "loaded_adapters": [{"nickname": name, "path": loaded.path} for name, loaded in self.loaded.items()],
            "active": {
                name: [
                    {
                        "nickname": nickname,
                        "path": self.loaded[nickname].path,
                        "merged": denoiser.is_merged,
                        "strength": strength,
                    }
                    for nickname, strength in denoiser.active
                ]
                for name, denoiser in self.denoisers.items()
                if denoiser.active
            },
        }
