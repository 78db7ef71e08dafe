"""The resolved request as the Rust core hands it over (see `sgl_core::ResolvedRequest`)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a batch, every default already filled in and validated by the core."""

    id: int
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    seed: int
    max_sequence_length: int
    num_outputs: int
    flow_shift: float | None
    guidance_scale_2: float | None
    fps: int | None
    image_path: str | None
    cfg_enabled: bool
    output_format: str
    output_quality: int | None
    notes: tuple[str, ...]

    @classmethod
    def from_wire(cls, item: dict[str, Any]) -> Request:
        fields = dict(item["request"])
        fields["notes"] = tuple(fields.get("notes", ()))
        return cls(id=int(item["id"]), **fields)
