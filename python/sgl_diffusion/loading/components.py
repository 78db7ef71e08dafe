"""Component loaders.

Models are built on the meta device and then take their tensors from the safetensors files one at a
time, read directly onto the target device and cast to the target dtype there. No full-precision
copy of a model ever sits in host memory. Which files make up a component (sharded checkpoints
follow their `*.index.json`) is the Rust core's bookkeeping (`_native.component_weight_files`).

On the CPU every weight is copied out of the checkpoint into memory of its own. safetensors hands
out views of the memory-mapped file there, aligned only to the tensor's byte offset in the file
(8 or even 4 bytes), which differs between a sharded and an unsharded save of the same weights; BLAS
libraries only promise reproducible results for aligned operands (oneMKL's reproducibility conditions
ask for 64-byte alignment), so the output could depend on how the checkpoint was split. The CPU
allocator aligns to 64 bytes. (On a GPU the tensors are device copies already.)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open

from .. import _native

M = TypeVar("M", bound=torch.nn.Module)


def read_config(component_dir: Path) -> dict[str, Any]:
    """A component's config: `config.json` for models, `scheduler_config.json` for schedulers."""
    for name in ("config.json", "scheduler_config.json"):
        path = component_dir / name
        if path.is_file():
            with path.open() as f:
                return json.load(f)
    raise FileNotFoundError(f"{component_dir} has no config.json; is this a diffusers-format model folder?")


def _stream_state_dict(
    files: list[str], device: torch.device, dtype_of: Callable[[str], torch.dtype], skip: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        # safe_open reads each tensor straight onto `device`; only one source tensor is alive at a time.
        with safe_open(file, framework="pt", device=str(device)) as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if skip(name):
                    continue
                tensor = weights.get_tensor(name)
                # copy on the CPU: our own 64-byte-aligned memory, not a view of the mapped file.
                dtype = dtype_of(name) if tensor.is_floating_point() else tensor.dtype
                state[name] = tensor.to(dtype, copy=device.type == "cpu")
    return state


def _own_cpu_memory(model: M) -> M:
    """Replaces CPU parameters and buffers that view a memory-mapped checkpoint with aligned copies
    (see the module docstring); tied parameters stay tied (the Parameter objects are kept)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu":
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()
    return model


def assign_weights(
    model: M, component_dir: Path, device: torch.device, dtype: torch.dtype, files: list[str] | None = None
) -> M:
    """Loads a model built on the meta device from `component_dir`'s safetensors (or `files`, e.g. one file that
    `--vae-path` names), strictly by name."""
    # Models may keep some parameters in float32 whatever the target precision (Wan keeps its
    # modulation tables and norms in fp32, as diffusers does), may name checkpoint keys that the
    # reference loader drops, and parameters a checkpoint may lack, which then start at zero (Wan's VSA
    # gates). A model with `loaded_key_report` is told which keys went either way (it says so in the log).
    param_dtype = getattr(model, "param_dtype", None)
    ignored = tuple(getattr(model, "ignore_unexpected_key_components", ()))
    zero_if_missing = tuple(getattr(model, "zero_missing_key_components", ()))
    skipped: list[str] = []

    def dtype_of(name: str) -> torch.dtype:
        return param_dtype(name, dtype) if param_dtype is not None else dtype

    def skip(name: str) -> bool:
        if any(part in ignored for part in name.split(".")):
            skipped.append(name)
            return True
        return False

    if files is None:
        files = _native.component_weight_files(str(component_dir))
    state = _stream_state_dict(files, device, dtype_of, skip)
    expected_shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    expected = set(expected_shapes)
    zeroed = sorted(
        name for name in expected - state.keys() if any(part in zero_if_missing for part in name.split("."))
    )
    for name in zeroed:
        state[name] = torch.zeros(expected_shapes[name], device=device, dtype=dtype_of(name))
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights in {component_dir} do not match {type(model).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    report = getattr(model, "loaded_key_report", None)
    if report is not None:
        report(skipped, zeroed)
    return model.eval().requires_grad_(False)


def load_native_model(
    factory: Callable[[dict[str, Any]], M], component_dir: Path, device: torch.device, dtype: torch.dtype
) -> M:
    """Builds one of our models from the component's config.json and loads its weights by name."""
    config = read_config(component_dir)
    with torch.device("meta"):
        model = factory(config)
    return assign_weights(model, component_dir, device, dtype)


def load_diffusers_model(cls: type[M], component_dir: Path, device: torch.device, dtype: torch.dtype) -> M:
    """A diffusers model class (e.g. the VAE until ours replaces it), loaded the same way."""
    config = cls.load_config(str(component_dir))  # type: ignore[attr-defined]
    with torch.device("meta"):
        model = cls.from_config(config)  # type: ignore[attr-defined]
    return assign_weights(model, component_dir, device, dtype)


def load_transformers_model(cls: type[M], component_dir: Path, device: torch.device, dtype: torch.dtype) -> M:
    """Text encoders from transformers; its loader already streams to `device_map`."""
    from transformers.utils import logging as transformers_logging

    # Our CLI shows its own progress; transformers' per-component "Loading weights" bars are noise.
    bars_were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(component_dir), dtype=dtype, device_map=str(device))  # type: ignore[attr-defined]
    finally:
        if bars_were_on:
            transformers_logging.enable_progress_bar()
    return _own_cpu_memory(model).eval().requires_grad_(False)
