"""`--vae-path`: a VAE from elsewhere than the model's own `vae/` folder, for every pipeline (the native families and
the diffusers backend) through this one loader.

What `--vae-path` may name:

* a VAE folder (`config.json` + safetensors, sharded or not), or a whole pipeline folder (its `vae/` is taken), or a
  Hugging Face id found in the local cache. It brings its own architecture, which may differ from the pipeline's
  (a smaller decoder, say), but it must fit the pipeline: the same latent channels and the same spatial and temporal
  compression as the pipeline's own VAE, which are what the denoiser's latents are shaped by. A native family also
  needs the VAE class it was written for, or one of the other classes it declares (`OtherVae`): a class of ours
  that states the latents it takes (`latent_interface(config)`), which must be the ones the family hands it. So
  FLUX.2 runs on fal's tiny autoencoder (`--vae-path fal/FLUX.2-Tiny-AutoEncoder`), which takes FLUX.2's
  normalised, 2x2-patchified denoiser latents (128 channels at 16x) rather than the 32-channel VAE latents at 8x.
  The classes we implement ourselves (`NATIVE_VAES`) have no diffusers class, so the diffusers backend refuses them.
* a single `.safetensors` file: weights only. They load into the pipeline's own VAE architecture (its
  `vae/config.json`), so every tensor must be there with the shape that config gives it.

Either misfit is a load error naming both the VAE given and the pipeline's own, before any weight is read.
`track_vae_path` lets the registry check that the pipeline it loaded did take the VAE (a family that loads its VAE
some other way would otherwise ignore the option silently).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .. import _native
from .components import assign_weights

if TYPE_CHECKING:
    from ..runtime.options import RuntimeOptions

M = TypeVar("M", bound=torch.nn.Module)

#: The `--vae-path` overrides applied while a pipeline loads (`track_vae_path`); None outside a tracked load.
_APPLIED: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("vae_path_applied", default=None)


@dataclasses.dataclass(frozen=True)
class OtherVae:
    """A VAE class a native family also runs on, besides the class its checkpoints ship (the `cls` of `load_vae`).

    `cls` builds with `cls.from_config(config)` and declares the latents it takes with the classmethod
    `cls.latent_interface(config)` (`latent_interface`'s terms); a `--vae-path` folder of that class fits when
    they are `latents`, the ones the family hands it."""

    cls: type[torch.nn.Module]
    latents: Mapping[str, int]


@dataclasses.dataclass(frozen=True)
class NativeVae:
    """A VAE class we implement ourselves (there is no diffusers class of that name), for load errors."""

    module: str  #: where the class is (imported only to describe a misfit)
    fits: str  #: which pipelines run on it
    marker: str  #: a weight name only its checkpoints have


#: `_class_name` -> the VAE classes of our own, which only the native families that declare them take.
NATIVE_VAES: dict[str, NativeVae] = {
    "Flux2TinyAutoEncoder": NativeVae(
        module="sgl_diffusion.models.flux2.tiny_autoencoder",
        fits="the FLUX.2 pipelines (FLUX.2-dev, FLUX.2-klein)",
        marker="extra_decoder.weight",
    ),
}


@contextlib.contextmanager
def track_vae_path(vae_path: Path | None, pipeline_class: str) -> Iterator[None]:
    """Around a pipeline's `load`: with `--vae-path` given, the load must have taken it through `load_vae`."""
    token = _APPLIED.set([])
    try:
        yield
        if vae_path is not None and not _APPLIED.get():
            raise ValueError(
                f"--vae-path {vae_path}: {pipeline_class} does not load its VAE through the shared VAE loader "
                "(sgl_diffusion/loading/vae.py), so it cannot take another VAE"
            )
    finally:
        _APPLIED.reset(token)


def _read_json(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return json.load(f)


def _from_hf_cache(name: str) -> Path | None:
    """`org/name` in the local Hugging Face cache (the snapshot `refs/main` names, else the newest), as the model's
    own `--model-path` is looked up; None when it is not there."""
    org, _, repo = name.partition("/")
    if not org or not repo or "/" in repo:
        return None
    root = Path(_native.hf_cache_dir()) / f"models--{org}--{repo}"
    ref = root / "refs" / "main"
    if ref.is_file():
        snapshot = root / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted(p for p in (root / "snapshots").glob("*") if p.is_dir())
    return snapshots[-1] if snapshots else None


def resolve_vae_path(vae_path: Path) -> Path:
    """The VAE folder or safetensors file `--vae-path` names (see the module docstring)."""
    path = vae_path
    if not path.exists():
        cached = _from_hf_cache(str(vae_path))
        if cached is None:
            raise ValueError(
                f"--vae-path {vae_path}: no such file or folder, nor a Hugging Face id in the local cache "
                f"({_native.hf_cache_dir()})"
            )
        path = cached
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"--vae-path {vae_path}: a single VAE file must be .safetensors, got {path.name}")
        return path
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"  # a whole pipeline folder: its VAE
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--vae-path {vae_path}: a VAE folder needs a config.json (and its safetensors), or give one "
            ".safetensors file to load into the pipeline's own VAE architecture"
        )
    return path


def latent_interface(config: Mapping[str, Any]) -> dict[str, int]:
    """What a VAE's config says about the latents a pipeline hands it: channels and spatial / temporal compression,
    under the names diffusers' VAE classes use (`latent_channels` or `z_dim`; `scale_factor_spatial`, Wan-style
    `temperal_downsample` or one 2x step per block after the first; `scale_factor_temporal` or
    `temporal_compression_ratio`). An image VAE compresses time by 1. Facts a config does not tell are left out."""
    facts: dict[str, int] = {}
    channels = config.get("latent_channels", config.get("z_dim"))
    if isinstance(channels, int):
        facts["latent channels"] = channels
    downsample = config.get("temperal_downsample")
    blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels")
    if isinstance(config.get("scale_factor_spatial"), int):
        facts["spatial compression"] = config["scale_factor_spatial"]
    elif isinstance(downsample, (list, tuple)):
        facts["spatial compression"] = 2 ** len(downsample)
    elif isinstance(blocks, (list, tuple)) and blocks:
        facts["spatial compression"] = 2 ** (len(blocks) - 1)
    if isinstance(config.get("scale_factor_temporal"), int):
        facts["temporal compression"] = config["scale_factor_temporal"]
    elif isinstance(config.get("temporal_compression_ratio"), int):
        facts["temporal compression"] = config["temporal_compression_ratio"]
    elif isinstance(downsample, (list, tuple)):
        facts["temporal compression"] = 2 ** sum(bool(step) for step in downsample)
    else:
        facts["temporal compression"] = 1
    return facts


def _diffusers_class(name: str, where: Path) -> type:
    import diffusers

    cls = getattr(diffusers, name, None)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        return cls
    raise ValueError(f"{where}: _class_name {name!r} is no diffusers model class")


def _describe(facts: Mapping[str, int]) -> str:
    return ", ".join(f"{fact} {value}" for fact, value in sorted(facts.items()))


def _native_interface(class_name: str, config: Mapping[str, Any]) -> dict[str, int]:
    """The latents one of `NATIVE_VAES` takes, as its class declares them."""
    module = importlib.import_module(NATIVE_VAES[class_name].module)
    return getattr(module, class_name).latent_interface(config)


def _check_tensors(model: torch.nn.Module, files: list[str], given: str, architecture: str) -> None:
    """Every weight of `model` in `files` with the shape the model gives it, nothing else: else an error naming the
    weights (`given`) and where the architecture came from (`architecture`). Reads safetensors headers only."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        for name, _dtype, shape in _native.safetensors_tensors(file):
            found[name] = tuple(int(size) for size in shape)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = [
        f"{name} {list(found[name])} (expected {list(shape)})"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    problems = [
        f"{label} {items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)} in all)"
        for label, items in (("shapes differ:", reshaped), ("missing", missing), ("unexpected", unexpected))
        if items
    ]
    if problems:
        # A checkpoint of one of our own classes handed over as a bare file: its config is what is missing.
        native = [
            f" ({given} holds a {name}'s weights: give its folder, config.json included)"
            for name, spec in NATIVE_VAES.items()
            if spec.marker in found and name != type(model).__name__
        ]
        raise ValueError(
            f"{given} does not fit {architecture}, a {type(model).__name__}: " + "; ".join(problems) + "".join(native)
        )


def load_pipeline_vae(cls: type[M], model_dir: Path, options: RuntimeOptions, others: Sequence[OtherVae] = ()) -> M:
    """A native family's VAE as the run's options ask: `model_dir/vae` or `--vae-path` (`others`: as for
    `load_vae`), in `--vae-precision`, tiled with `--vae-tiling` (a VAE that cannot tile says so by name)."""
    vae = load_vae(cls, model_dir, options.vae_path, options.device, options.vae_dtype, others=others)
    if options.vae_tiling:
        vae.enable_tiling()  # type: ignore[attr-defined]
    return vae


def load_vae(
    cls: type[M] | None,
    model_dir: Path,
    vae_path: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    others: Sequence[OtherVae] = (),
) -> M | torch.nn.Module:
    """The pipeline's VAE in `dtype` on `device`: `model_dir/vae`, or `--vae-path` (see the module docstring).

    `cls`: the VAE class a native family is written for; None (the diffusers backend): the class the config names,
    from diffusers. `others`: further classes the family runs on (only a `--vae-path` folder can bring one); the
    caller tells them apart by type."""
    own_dir = model_dir / "vae"
    if not (own_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no vae/config.json{f' (--vae-path {vae_path})' if vae_path else ''}")
    own_config = _read_json(own_dir / "config.json")
    own_class = own_config.get("_class_name", "")
    if vae_path is None:
        source, config, files = own_dir, own_config, _native.component_weight_files(str(own_dir))
        given, architecture = f"the weights in {own_dir}", f"its config {own_dir / 'config.json'}"
    else:
        path = resolve_vae_path(vae_path)
        if path.is_file():
            # Weights only: the pipeline's own architecture.
            source, config, files = path, own_config, [str(path)]
            given, architecture = (
                f"--vae-path {vae_path}",
                f"{model_dir}'s VAE architecture ({own_dir / 'config.json'})",
            )
        else:
            source, config, files = path, _read_json(path / "config.json"), _native.component_weight_files(str(path))
            given, architecture = f"--vae-path {vae_path}", f"its config {path / 'config.json'}"
            cls = _check_fits_pipeline(vae_path, config, own_config, model_dir, cls, others)
    class_name = config.get("_class_name", own_class)
    vae_cls: type[torch.nn.Module] = cls if cls is not None else _diffusers_class(class_name, source)
    with torch.device("meta"):
        model = vae_cls.from_config(config)  # type: ignore[attr-defined]
    _check_tensors(model, files, given, architecture)
    model = assign_weights(model, source, device, dtype, files=files)
    if vae_path is not None:
        applied = _APPLIED.get()
        if applied is not None:
            applied.append(vae_path)
    return model


def _check_fits_pipeline(
    vae_path: Path,
    config: Mapping[str, Any],
    own_config: Mapping[str, Any],
    model_dir: Path,
    cls: type[M] | None,
    others: Sequence[OtherVae],
) -> type[torch.nn.Module] | None:
    """A VAE folder against the pipeline: a class the native family runs on (its own, or one of `others`) or, for
    the diffusers backend (`cls` None), a diffusers class; then the latents it takes. Returns the class to build
    (None: the diffusers class the config names)."""
    given_class = config.get("_class_name", "?")
    own_class = own_config.get("_class_name", "?")
    own = latent_interface(own_config)
    if cls is None and given_class in NATIVE_VAES:
        raise ValueError(
            f"--vae-path {vae_path} is a {given_class}, a VAE sgl-diffusion implements itself for "
            f"{NATIVE_VAES[given_class].fits}; the diffusers backend runs {model_dir} on diffusers' classes "
            f"(its own VAE: {own_class}): use --backend native where the model has a native pipeline"
        )
    other = next((o for o in others if o.cls.__name__ == given_class), None)
    if cls is not None and given_class != cls.__name__ and other is None:
        accepted = " or a ".join([cls.__name__, *(o.cls.__name__ for o in others)])
        if given_class in NATIVE_VAES:
            # One of ours for other pipelines: say what it and this pipeline's VAE each take.
            given_facts = _describe(_native_interface(given_class, config))
            hint = f"; a {given_class} ({given_facts}) fits {NATIVE_VAES[given_class].fits}"
            own_facts = f", {_describe(own)}"
        else:
            hint, own_facts = "; --backend diffusers takes other VAE classes", ""
        raise ValueError(
            f"--vae-path {vae_path} is a {given_class}, and {model_dir}'s pipeline runs natively on a {accepted} "
            f"(its own VAE: {own_class} in {model_dir / 'vae'}{own_facts}){hint}"
        )
    if other is not None:
        # Another class: it states the latents it takes; the family states the latents it hands over.
        given, needed, against = other.cls.latent_interface(config), other.latents, "latents"  # type: ignore[attr-defined]
    else:
        given, needed, against = latent_interface(config), own, f"VAE ({own_class})"
    differ = [
        f"{fact} {given[fact]} (the pipeline's: {needed[fact]})"
        for fact in given.keys() & needed.keys()
        if given[fact] != needed[fact]
    ]
    if differ:
        raise ValueError(
            f"--vae-path {vae_path} ({given_class}) does not fit {model_dir}'s {against}: " + "; ".join(sorted(differ))
        )
    return other.cls if other is not None else cls
