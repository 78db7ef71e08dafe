"""The single attention entry point every native model calls.

Layout contract (chosen to match how DiT blocks naturally hold projections, and what
flash-attention style kernels take without a transpose):

* inputs ``q``, ``k``, ``v``: ``(batch, seq, heads, head_dim)``; ``k``/``v`` may have a different
  ``seq`` than ``q`` (cross attention);
* output: ``(batch, seq_q, heads * head_dim)``, in ``q``'s dtype, ready for the output projection.

Backends are looked up by name so that a request/server flag (``--attention-backend``) can pick one
without the model code knowing which kernels were built:

* ``torch_sdpa`` (default, exact): ``F.scaled_dot_product_attention``; on Hopper it prefers cuDNN's
  fused attention (see :data:`SDPA_KERNEL_PREFERENCES`).
* ``fa`` (exact): FlashAttention, the first of these that imports: FlashAttention-3's forward-only build
  ``fa3_fwd_interface.flash_attn_func`` (the ``fa3-fwd`` wheel on PyPI: bf16 only), FlashAttention-3's
  ``flash_attn_interface.flash_attn_func`` (built from the ``hopper`` folder of the repository),
  FlashAttention-2's ``flash_attn.flash_attn_func``. fp16/bf16 CUDA tensors only.
* ``fa4`` (exact): FlashAttention-4 (the ``flash-attn-4`` package, CuTe-DSL kernels compiled at first use),
  ``flash_attn.cute.flash_attn_func``; fp16/bf16 on a Hopper or newer GPU only.
* ``sage_attn`` (lossy, int8 QK): SageAttention's ``sageattention.sageattn``. fp16/bf16 CUDA only.
* ``sliding_tile_attn`` / ``video_sparse_attn`` (sparse, lossy by design): FastVideo's sliding tile
  attention and video sparse attention (:mod:`.sparse_attention`). They act on a video model's
  self-attention over its token grid, which the model describes with ``video=``
  (:class:`~.sparse_attention.VideoAttention`); only models that do accept these names
  (:func:`resolve_attention_backend`'s ``video_tokens``). A pure-torch reference runs them on the CPU,
  kernels on CUDA.
* ``auto``: not a kernel; the fastest exact backend (``torch_sdpa``, ``fa``, ``fa4``: never a lossy or sparse
  one) for each attention shape, by measurement on the first call of that shape
  (:mod:`.attention_autotune`). Where only one exact backend can run (the CPU, fp32, no optional package
  installed) :func:`resolve_attention_backend` resolves it to that one.

``fa``, ``fa4`` and ``sage_attn`` come from optional packages and are checked lazily, when a name is
resolved (not only when this module is imported), so a package installed after start-up, or a stand-in
module placed in ``sys.modules`` by a test, is picked up. Asking for one whose package is missing fails
with an error naming the package and how to install it. SGLang Diffusion's names for kernels that have
no package for this platform (:data:`UNAVAILABLE_ATTENTION_BACKENDS`: ``sage_attn_3``, ``vmoba_attn``,
``aiter``) fail with "not available on this platform" and the reason. Nothing falls back silently to
another kernel: a silent fallback would make benchmark numbers lie.

SGLang's alias ``fa3`` for ``fa`` (:data:`ATTENTION_BACKEND_ALIASES`) is accepted wherever a name is
(:func:`resolve_attention_backend`, :func:`check_attention_backend_name`) and means ``fa``. SGLang also
normalises ``fa4`` to ``fa``; here ``fa4`` is FlashAttention-4 itself.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import ModuleType

import torch
import torch.nn.functional as F

from .attention_autotune import AttentionShape, MeasuredChoice, Measurement
from .sparse_attention import VideoAttention, require_kernels_package, run_video_sparse

__all__ = [
    "ATTENTION_BACKEND_ALIASES",
    "DEFAULT_ATTENTION_BACKEND",
    "UNAVAILABLE_ATTENTION_BACKENDS",
    "VIDEO_SPARSE_BACKENDS",
    "AttentionBackend",
    "AttentionFn",
    "VideoAttention",
    "attention",
    "attention_kernel_label",
    "auto_attention_measurements",
    "available_attention_backends",
    "canonical_attention_backend",
    "check_attention_backend_name",
    "register_attention_backend",
    "resolve_attention_backend",
    "set_sdpa_kernel_preference",
]

logger = logging.getLogger(__name__)


class AttentionBackend(str, Enum):
    """Every backend name the engine knows about, built or not.

    Being a ``str`` enum, members compare equal to their plain names, so either form can be passed
    around in configs.
    """

    TORCH_SDPA = "torch_sdpa"
    AUTO = "auto"
    # Optional packages: usable when they import (see the module docstring).
    FLASH_ATTN = "fa"
    FLASH_ATTN_4 = "fa4"
    SAGE_ATTN = "sage_attn"
    # Sparse attention over a video's token grid (:mod:`.sparse_attention`).
    SLIDING_TILE = "sliding_tile_attn"
    VIDEO_SPARSE = "video_sparse_attn"


DEFAULT_ATTENTION_BACKEND = AttentionBackend.TORCH_SDPA.value

# (q, k, v, attn_mask) with q/k/v in (batch, seq, heads, head_dim) -> (batch, seq_q, heads*head_dim)
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

#: SGLang Diffusion's other names for a backend built here (it normalizes them while parsing arguments).
ATTENTION_BACKEND_ALIASES = {"fa3": "fa"}

#: The sparse backends: they need the model to describe its video tokens (``attention(..., video=...)``).
VIDEO_SPARSE_BACKENDS = frozenset({AttentionBackend.SLIDING_TILE.value, AttentionBackend.VIDEO_SPARSE.value})

#: SGLang Diffusion's names for kernels this platform has no package for: (what it is, why it is not here).
#: Looked up on PyPI (2026-12): none of them has a package that runs on CUDA/CPU here.
UNAVAILABLE_ATTENTION_BACKENDS = {
    "sage_attn_3": (
        "SageAttention3",
        "FP4 attention for Blackwell GPUs, built from source per its authors' instructions; PyPI has no package",
    ),
    "vmoba_attn": (
        "V-MoBA attention",
        "SGLang's own kernel (kernel.attn.vmoba_attn.vmoba), shipped with SGLang only; PyPI has no package",
    ),
    "aiter": (
        "AMD AITER attention",
        "a ROCm library for AMD GPUs (PyPI: amd-aiter); this build runs on CUDA and CPU",
    ),
}

# Names people plausibly type for a backend under another name; used only to improve the error.
_NAME_HINTS = {
    "sliding_tile": "sliding_tile_attn",
    "sta": "sliding_tile_attn",
    "vsa": "video_sparse_attn",
    "video_sparse": "video_sparse_attn",
    "flash_attn_4": "fa4",
    "fa2": "fa",
    "flash": "fa",
    "flash_attn": "fa",
    "flash_attention": "fa",
    "sage": "sage_attn",
    "sageattn": "sage_attn",
    "sageattention": "sage_attn",
    "sdpa": "torch_sdpa",
}


def _expand_key_padding_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Turn a per-key ``(batch, seq_k)`` mask into the ``(batch, 1, 1, seq_k)`` form SDPA broadcasts.

    Any other shape is passed through untouched (SDPA itself validates it against
    ``(batch, heads, seq_q, seq_k)``). Boolean masks mean "True = attend"; float masks are additive.
    """
    if attn_mask is None:
        return None
    if attn_mask.ndim == 2 and attn_mask.shape == (q.shape[0], k.shape[1]):
        return attn_mask[:, None, None, :]
    return attn_mask


#: SDPA kernel order on Hopper: cuDNN's fused attention measures 615 TFLOP/s on an H100 against 370 for
#: SDPA's FlashAttention-2 (both exact), so it goes first; torch falls back down the list when a
#: kernel cannot take the inputs. "default" keeps torch's own choice (for benchmarks and parity runs).
SDPA_KERNEL_PREFERENCES = ("cudnn", "default")
_sdpa_preference = "cudnn"


def set_sdpa_kernel_preference(preference: str) -> None:
    global _sdpa_preference
    if preference not in SDPA_KERNEL_PREFERENCES:
        raise ValueError(f"SDPA kernel preference must be one of {SDPA_KERNEL_PREFERENCES}, got {preference!r}")
    _sdpa_preference = preference


@functools.cache
def _is_hopper_or_newer(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (9, 0)


def _sdpa_kernels(q: torch.Tensor) -> contextlib.AbstractContextManager[None]:
    # Under torch.compile the context manager would break the graph; torch >= 2.5 already ranks cuDNN
    # attention first on Hopper for these shapes (measured: same kernel either way).
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _sdpa_preference != "cudnn" or not q.is_cuda or not _is_hopper_or_newer(q.device):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def _torch_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    mask = _expand_key_padding_mask(attn_mask, q, k)
    # SDPA wants (batch, heads, seq, head_dim). Transposed views (no copy) keep the strides the same as
    # diffusers' native path, so on CPU torch picks the same kernel and results are bit-identical.
    with _sdpa_kernels(q):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
        )
    return out.transpose(1, 2).flatten(2, 3).to(q.dtype)


# --------------------------------------------------------------------------------------------------
# Optional kernel packages (fa, sage_attn), looked up lazily.
# --------------------------------------------------------------------------------------------------


_HALF_DTYPES = (torch.float16, torch.bfloat16)
_SHORT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """Dtypes as errors name them, e.g. "fp16/bf16"."""
    return "/".join(_SHORT_DTYPE_NAMES[dtype] for dtype in dtypes)


@dataclass(frozen=True)
class _KernelSource:
    module: str
    attr: str
    label: str
    # The input dtypes this build has kernels for.
    dtypes: tuple[torch.dtype, ...] = _HALF_DTYPES

    @property
    def takes(self) -> str:
        """The dtypes as errors name them, e.g. "fp16/bf16"."""
        return _dtype_names(self.dtypes)


@dataclass(frozen=True)
class _OptionalBackend:
    name: str
    # Tried in order; the first that imports and has a callable ``attr`` wins.
    sources: tuple[_KernelSource, ...]
    package: str
    provides: str
    install: str
    fn: AttentionFn


@dataclass(frozen=True)
class _FoundKernel:
    source: _KernelSource
    module: ModuleType
    fn: Callable[..., object]


# Device types the fa/sage_attn wrappers accept. The real kernels are CUDA-only; tests widen this to
# run stand-in kernels (pure torch) on CPU.
_KERNEL_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

# name -> kernel found by the last probe. Kept so the per-call lookup is a dict lookup plus an identity
# check against ``sys.modules`` instead of an import attempt.
_kernel_cache: dict[str, _FoundKernel] = {}
# Why a probe failed for a source that is installed but broken (e.g. built against another torch), so the
# error can say so instead of "not installed".
_import_failures: dict[str, str] = {}
# Backends that already logged their "mask -> SDPA" fallback; logged once per process, not per call.
_mask_fallback_logged: set[str] = set()


def _probe(backend: _OptionalBackend) -> _FoundKernel | None:
    """Import the backend's package now (first source that works) and refresh the cache."""
    for source in backend.sources:
        try:
            # Also how ``sys.modules[name] = None`` (Python's way to block an import) is honoured.
            module = importlib.import_module(source.module)
        except (ImportError, OSError) as exc:
            # Optional dependency: a missing package just means "try the next source". One that is present
            # but broken (e.g. built against another torch/CUDA) is remembered for the error message.
            missing = isinstance(exc, ModuleNotFoundError) and exc.name is not None
            missing = missing and (source.module == exc.name or source.module.startswith(f"{exc.name}."))
            if not missing:
                _import_failures[source.module] = f"{source.module} failed to import ({type(exc).__name__}: {exc})"
            continue
        _import_failures.pop(source.module, None)
        fn = getattr(module, source.attr, None)
        if callable(fn):
            found = _FoundKernel(source, module, fn)
            _kernel_cache[backend.name] = found
            return found
        _import_failures[source.module] = f"{source.module} has no callable '{source.attr}'"
    _kernel_cache.pop(backend.name, None)
    return None


def _kernel(backend: _OptionalBackend) -> _FoundKernel:
    """The kernel to call now; raises the user-facing error when the package is missing."""
    found = _kernel_cache.get(backend.name)
    # Revalidate against sys.modules so a module that was removed or replaced is not called stale.
    if found is not None and sys.modules.get(found.source.module) is found.module:
        return found
    found = _probe(backend)
    if found is None:
        raise ValueError(_missing_package_message(backend))
    return found


def _missing_package_message(backend: _OptionalBackend) -> str:
    broken = [why for module, why in _import_failures.items() if module in _source_modules(backend)]
    state = "is installed but unusable: " + "; ".join(broken) if broken else "is not installed"
    return (
        f"attention backend '{backend.name}' needs the {backend.package} package ({backend.provides}), which {state}; "
        f"install it with {backend.install}; available: {', '.join(available_attention_backends())}"
    )


def _source_modules(backend: _OptionalBackend) -> set[str]:
    return {s.module for s in backend.sources}


def _check_kernel_inputs(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: _KernelSource | None = None
) -> None:
    # The kernels' own errors for these cases are either cryptic or (Triton) a compile failure deep in the
    # stack; say what is wrong and what to use instead.
    dtypes = source.dtypes if source is not None else _HALF_DTYPES
    for t in (q, k, v):
        if t.dtype not in dtypes or t.dtype != q.dtype:
            takes = _dtype_names(dtypes)
            build = f" ({source.label})" if source is not None else ""
            raise ValueError(
                f"attention backend '{name}'{build} takes {takes} tensors of one dtype, got q {q.dtype}, "
                f"k {k.dtype}, v {v.dtype}; use --attention-backend torch_sdpa (or auto) for other precisions"
            )
        if t.device.type not in _KERNEL_DEVICE_TYPES:
            raise ValueError(
                f"attention backend '{name}' runs on CUDA only, got tensors on {t.device}; "
                "use --attention-backend torch_sdpa (or auto)"
            )


def _check_hopper(name: str, device: torch.device) -> None:
    if device.type == "cuda" and not _is_hopper_or_newer(device):
        raise ValueError(
            f"attention backend '{name}' needs a Hopper (sm90) or newer GPU, got compute capability "
            f"{torch.cuda.get_device_capability(device)} on {device}; use --attention-backend fa or torch_sdpa"
        )


def _flash_family(name: str) -> AttentionFn:
    """The wrapper of ``fa`` or ``fa4``: FlashAttention's ``flash_attn_func`` has no key-padding/bias input, so a
    masked call (and only it) runs on exact SDPA, logged once so benchmarks can tell that some calls did not run
    FlashAttention."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        backend = _OPTIONAL[name]
        found = _kernel(backend)
        _check_kernel_inputs(name, q, k, v, found.source)
        if name == AttentionBackend.FLASH_ATTN_4.value:
            _check_hopper(name, q.device)
        if attn_mask is not None:
            if name not in _mask_fallback_logged:
                _mask_fallback_logged.add(name)
                logger.warning(
                    "attention backend '%s': flash_attn_func does not take masks; masked attention calls run on "
                    "torch_sdpa instead (exact). Unmasked calls still use %s.",
                    name,
                    found.source.label,
                )
            return _torch_sdpa(q, k, v, attn_mask)
        return _package_attention(q, k, v, name).flatten(2, 3)

    return run


def _flash_kernel(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlashAttention-2/3 (``fa``) or -4 (``fa4``) itself: (batch, seq, heads, head_dim) as-is, scale 1/sqrt(head_dim)
    by default; some releases return (out, softmax_lse), others out alone."""

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        found = _kernel(_OPTIONAL[name])
        _check_kernel_inputs(name, q, k, v, found.source)
        out = found.fn(q, k, v, causal=False)
        return out[0] if isinstance(out, tuple) else out

    return run


def _sage_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """SageAttention: LOSSY. It quantizes Q and K to int8 (per block) before QK^T, so outputs differ from
    exact attention by more than bf16 rounding. Never picked by ``auto``; opt in explicitly."""
    if attn_mask is not None:
        # sageattn has no mask input; falling back would silently mix exact and int8 calls.
        raise ValueError(
            "attention backend 'sage_attn' does not support attention masks; "
            "use --attention-backend torch_sdpa (or fa) for models that pass attn_mask"
        )
    return _package_attention(q, k, v, _SAGE_ATTN.name).flatten(2, 3)


def _sage_attn_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    found = _kernel(_SAGE_ATTN)
    _check_kernel_inputs(_SAGE_ATTN.name, q, k, v)
    # sageattn wants a unit-stride head_dim (it asserts); DiT projections already give that, so this is free.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return found.fn(q, k, v, tensor_layout="NHD", is_causal=False)


_PACKAGE_KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "fa": _flash_kernel(AttentionBackend.FLASH_ATTN.value),
    "fa4": _flash_kernel(AttentionBackend.FLASH_ATTN_4.value),
    "sage_attn": _sage_attn_kernel,
}


@torch.library.custom_op("sgl_diffusion::package_attention", mutates_args=())
def _package_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """An attention kernel from an optional package (``fa``, ``fa4``, ``sage_attn``) as one opaque op: torch.compile
    cannot trace into those packages' Python/Triton code (``fullgraph=True`` would fail), so compiled
    blocks call it as an extern kernel. Output ``(batch, seq_q, heads, head_dim_v)``, contiguous."""
    return _PACKAGE_KERNELS[backend](q, k, v).contiguous()


@_package_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_FLASH_ATTN = _OptionalBackend(
    name=AttentionBackend.FLASH_ATTN.value,
    sources=(
        # A prebuilt forward-only FlashAttention-3 (Hopper; the package ships bf16 kernels only).
        _KernelSource("fa3_fwd_interface", "flash_attn_func", "FlashAttention-3 (fa3-fwd)", (torch.bfloat16,)),
        _KernelSource("flash_attn_interface", "flash_attn_func", "FlashAttention-3"),
        _KernelSource("flash_attn", "flash_attn_func", "FlashAttention-2"),
    ),
    package="flash-attn",
    provides=("FlashAttention-3 `fa3_fwd_interface` or `flash_attn_interface`, or FlashAttention-2 `flash_attn`"),
    install=(
        "`pip install fa3-fwd` (FlashAttention-3 forward, Hopper, bf16), `pip install flash-attn "
        "--no-build-isolation` (FlashAttention-2), or FlashAttention-3 built from the `hopper` folder of "
        "https://github.com/Dao-AILab/flash-attention"
    ),
    fn=_flash_family(AttentionBackend.FLASH_ATTN.value),
)
_FLASH_ATTN_4 = _OptionalBackend(
    name=AttentionBackend.FLASH_ATTN_4.value,
    sources=(_KernelSource("flash_attn.cute", "flash_attn_func", "FlashAttention-4 (CuTe-DSL)"),),
    package="flash-attn-4",
    provides="FlashAttention-4 `flash_attn.cute`, CuTe-DSL kernels compiled at first use on Hopper/Blackwell",
    install="`pip install --pre flash-attn-4` (it brings nvidia-cutlass-dsl, quack-kernels, apache-tvm-ffi)",
    fn=_flash_family(AttentionBackend.FLASH_ATTN_4.value),
)
_SAGE_ATTN = _OptionalBackend(
    name=AttentionBackend.SAGE_ATTN.value,
    sources=(_KernelSource("sageattention", "sageattn", "SageAttention"),),
    package="sageattention",
    provides="`from sageattention import sageattn`",
    install="`pip install sageattention`",
    fn=_sage_attn,
)
_OPTIONAL: dict[str, _OptionalBackend] = {b.name: b for b in (_FLASH_ATTN, _FLASH_ATTN_4, _SAGE_ATTN)}
# Hot-path table for attention(): the wrappers themselves find (and, if missing, complain about) the kernel.
_OPTIONAL_FNS: dict[str, AttentionFn] = {name: b.fn for name, b in _OPTIONAL.items()}

_REGISTRY: dict[str, AttentionFn] = {AttentionBackend.TORCH_SDPA.value: _torch_sdpa}


def register_attention_backend(name: str, fn: AttentionFn, *, override: bool = False) -> None:
    """Make a backend callable by name (used by optional kernel packages when they import).

    Registering ``fa``, ``fa4`` or ``sage_attn`` needs ``override=True`` (it replaces the built-in wrapper);
    ``auto`` and the sparse video backends are not plain kernels and cannot be registered.
    """
    key = str(getattr(name, "value", name))
    if key == AttentionBackend.AUTO.value:
        raise ValueError("'auto' chooses among the exact backends by measurement and cannot be registered")
    if key in VIDEO_SPARSE_BACKENDS:
        raise ValueError(f"'{key}' is sparse video attention (layers/sparse_attention.py) and cannot be registered")
    if (key in _REGISTRY or key in _OPTIONAL) and not override:
        raise ValueError(f"attention backend '{key}' is already registered")
    _REGISTRY[key] = fn


def available_attention_backends() -> list[str]:
    """Names that can run in this process now: the default first, then ``auto``, then the rest sorted.

    Optional packages are probed on every call, so this reflects what is importable right now. The sparse
    video backends are always listed (their torch reference runs anywhere), though only video models take them.
    """
    others = set(_REGISTRY) | {name for name, b in _OPTIONAL.items() if _probe(b) is not None}
    others |= VIDEO_SPARSE_BACKENDS
    others -= {DEFAULT_ATTENTION_BACKEND, AttentionBackend.AUTO.value}
    return [DEFAULT_ATTENTION_BACKEND, AttentionBackend.AUTO.value, *sorted(others)]


def attention_kernel_label(name: str) -> str | None:
    """Which build an optional backend (``fa``, ``fa4``, ``sage_attn``) runs now, e.g. "FlashAttention-3 (fa3-fwd)"
    for ``fa``; ``None`` when its package is missing or the name is not an optional backend."""
    backend = _OPTIONAL.get(canonical_attention_backend(name) or "")
    found = _probe(backend) if backend is not None else None
    return found.source.label if found is not None else None


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exact_backends(device: torch.device | str | None, dtype: torch.dtype | None) -> list[str]:
    """The exact backends that can run attention on `device` in `dtype` now: ``auto``'s candidates.

    ``dtype`` ``None`` means unknown, taken as fp16/bf16 (what the engine runs on GPUs). The lossy
    ``sage_attn`` and the sparse backends are never candidates."""
    device = _default_device() if device is None else torch.device(device)
    names = [DEFAULT_ATTENTION_BACKEND]
    if device.type not in _KERNEL_DEVICE_TYPES or (dtype is not None and dtype not in _HALF_DTYPES):
        return names
    if device.type == "cuda" and not torch.cuda.is_available():
        return names
    for backend in (_FLASH_ATTN, _FLASH_ATTN_4):
        if backend is _FLASH_ATTN_4 and device.type == "cuda" and not _is_hopper_or_newer(device):
            continue
        found = _probe(backend)
        if found is not None and (dtype is None or dtype in found.source.dtypes):
            names.append(backend.name)
    return names


def _resolve_auto(device: torch.device | str | None, dtype: torch.dtype | None) -> str:
    candidates = _exact_backends(device, dtype)
    choice = candidates[0] if len(candidates) == 1 else AttentionBackend.AUTO.value
    # debug, not info: attention(backend="auto") may resolve on every call.
    logger.debug("attention backend 'auto' on %s, %s: candidates %s -> %s", device, dtype, candidates, choice)
    return choice


#: The measured winners of ``auto``, by shape, for this process.
_AUTO_CHOICES = MeasuredChoice(fallback=DEFAULT_ATTENTION_BACKEND)


def auto_attention_measurements() -> list[Measurement]:
    """What ``auto`` measured so far in this process: per shape, each candidate's time and the winner."""
    return _AUTO_CHOICES.measurements()


def _unmasked_kernel(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    fn = _REGISTRY.get(name) or _OPTIONAL_FNS[name]
    return lambda q, k, v: fn(q, k, v, None)


def _measured_choice(
    shape: AttentionShape, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> str:
    known = _AUTO_CHOICES.known(shape)
    if known is not None:  # the hot path: no package probing once a shape is measured
        return known
    candidates = _exact_backends(shape.device, shape.dtype)
    return _AUTO_CHOICES.choose(shape, {name: _unmasked_kernel(name) for name in candidates}, inputs)


@torch._dynamo.assume_constant_result
def _traced_choice(
    device: str, dtype: torch.dtype, batch: int, q_len: int, k_len: int, heads: int, head_dim: int
) -> str:
    """``auto``'s choice while torch.compile traces a block: runs (and measures, on random inputs of the shape)
    at trace time; the compiled graph keeps the answer as a constant. Shapes are static there, so the
    arguments are plain constants."""
    return _measured_choice(AttentionShape(device, dtype, batch, q_len, k_len, heads, head_dim))


def _auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    # Masked calls run on SDPA whatever wins: fa and fa4 take no masks (they would hand them to SDPA).
    if attn_mask is not None or q.dtype not in _HALF_DTYPES or q.device.type not in _KERNEL_DEVICE_TYPES:
        return _torch_sdpa(q, k, v, attn_mask)
    if torch.compiler.is_compiling():
        batch, q_len, heads, head_dim = q.shape
        name = _traced_choice(str(q.device), q.dtype, batch, q_len, k.shape[1], heads, head_dim)
    else:
        name = _measured_choice(AttentionShape.of(q, k), (q, k, v))
    fn = _REGISTRY.get(name) or _OPTIONAL_FNS[name]
    return fn(q, k, v, None)


def canonical_attention_backend(name: str | None) -> str | None:
    """The backend's own name for one of SGLang's aliases (``fa3``: ``fa``); other names unchanged."""
    if name is None:
        return None
    key = str(getattr(name, "value", name))
    return ATTENTION_BACKEND_ALIASES.get(key, key)


def check_attention_backend_name(name: str | AttentionBackend) -> str:
    """Rejects names that are unknown or have no kernel for this platform, without probing packages (that
    happens at load time); returns the name. For parsers, which should fail before a model loads."""
    key = canonical_attention_backend(str(getattr(name, "value", name))) or ""
    if key in _REGISTRY or key in _OPTIONAL or key in VIDEO_SPARSE_BACKENDS or key == AttentionBackend.AUTO.value:
        return key
    raise _name_error(key)


def _name_error(key: str) -> ValueError:
    available = ", ".join(available_attention_backends())
    if key in UNAVAILABLE_ATTENTION_BACKENDS:
        what, why = UNAVAILABLE_ATTENTION_BACKENDS[key]
        return ValueError(
            f"attention backend '{key}' ({what}) is not available on this platform: {why}; available: {available}"
        )
    hint = f" (did you mean '{_NAME_HINTS[key]}'?)" if key in _NAME_HINTS else ""
    return ValueError(f"unknown attention backend '{key}'{hint}; available: {available}")


def resolve_attention_backend(
    name: str | AttentionBackend | None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    video_tokens: bool = False,
) -> str:
    """Validate a backend name and return the concrete backend to run; ``None`` means ``torch_sdpa``.

    ``auto`` stays ``auto`` where several exact backends can run (a CUDA GPU, fp16/bf16, with ``fa`` or, on
    Hopper and newer, ``fa4`` installed): :func:`attention` then measures them per shape and runs the
    fastest. Elsewhere it becomes the one exact backend there is, ``torch_sdpa`` (never the lossy
    ``sage_attn`` or a sparse one).

    Args:
        name: a backend name (see :class:`AttentionBackend`), ``auto`` or ``None``.
        device: where attention will run; ``None`` means the current CUDA device if CUDA is available,
            else the CPU.
        dtype: the attention inputs' dtype; ``None`` means unknown, taken as fp16/bf16 (what the engine
            runs on GPUs). When given, an explicit ``fa``/``fa4``/``sage_attn`` is also checked against it.
        video_tokens: the caller passes ``video=`` for its self-attention over video tokens (the Wan models,
            HunyuanVideo's joint attention, and option parsing, which does not know the model yet). Without it
            the sparse video backends are refused: a model that cannot describe its token grid would otherwise
            run them nowhere.

    Raises ``ValueError`` naming the available backends when the name is unknown, has no kernel for this
    platform, or needs a package that is not installed, so a bad CLI flag fails at startup rather than deep
    inside a forward pass.
    """
    if name is None:
        return DEFAULT_ATTENTION_BACKEND
    key = canonical_attention_backend(str(getattr(name, "value", name))) or ""
    if key == AttentionBackend.AUTO.value:
        return _resolve_auto(device, dtype)
    if key in _REGISTRY:
        return key
    if key in VIDEO_SPARSE_BACKENDS:
        if not video_tokens:
            raise ValueError(
                f"attention backend '{key}' is sparse attention over a video's token grid; this model does not "
                "describe its video tokens to the attention (the Wan models and HunyuanVideo do); use torch_sdpa, "
                "fa, fa4, sage_attn or auto"
            )
        require_kernels_package()  # its kernel and torch reference: fail at load time without it
        return key
    optional = _OPTIONAL.get(key)
    if optional is not None:
        found = _probe(optional)
        if found is None:
            raise ValueError(_missing_package_message(optional))
        if dtype is not None and dtype not in found.source.dtypes:
            source = found.source
            raise ValueError(f"attention backend '{key}' ({source.label}) takes {source.takes} only, got {dtype}")
        if device is not None and torch.device(device).type not in _KERNEL_DEVICE_TYPES:
            raise ValueError(f"attention backend '{key}' runs on CUDA only, got device {device}")
        if key == _FLASH_ATTN_4.name and device is not None:
            _check_hopper(key, torch.device(device))
        return key
    raise _name_error(key)


def _video_sparse_fn(backend: str) -> Callable[..., torch.Tensor]:
    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        video: VideoAttention | None = None,
    ) -> torch.Tensor:
        if video is None:
            raise ValueError(
                f"attention backend '{backend}' needs the video token grid: a video model passes "
                "attention(..., video=VideoAttention(...)) for its self-attention (and an exact backend elsewhere)"
            )
        if attn_mask is not None:
            raise ValueError(f"attention backend '{backend}' does not take attention masks")
        return run_video_sparse(backend, q, k, v, video).flatten(2, 3).to(q.dtype)

    return run


_VIDEO_SPARSE_FNS = {name: _video_sparse_fn(name) for name in VIDEO_SPARSE_BACKENDS}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = DEFAULT_ATTENTION_BACKEND,
    attn_mask: torch.Tensor | None = None,
    video: VideoAttention | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention (scale ``1/sqrt(head_dim)``, no dropout, not causal).

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)``.
        backend: a name accepted by :func:`resolve_attention_backend`; ``auto`` runs the exact backend that
            measured fastest at these inputs' shape (measured at the first call of the shape).
        attn_mask: optional; ``(batch, seq_k)`` key mask (bool: True = keep, float: additive) or any
            shape broadcastable to ``(batch, heads, seq_q, seq_k)``. ``fa``/``fa4`` run masked calls on
            ``torch_sdpa`` (exact; logged once); ``sage_attn`` and the sparse backends reject masks.
        video: what a video model says about a self-attention over its token grid (grid, layer, step, VSA's
            gate); required by the sparse backends, ignored by the others (their attention is dense).

    Returns:
        ``(batch, seq_q, heads * head_dim)`` in ``q.dtype``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects (batch, seq, heads, head_dim) tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    sparse = _VIDEO_SPARSE_FNS.get(backend)
    if sparse is not None:
        return sparse(q, k, v, attn_mask, video)
    fn = _REGISTRY.get(backend) or _OPTIONAL_FNS.get(backend)
    if fn is None and backend == AttentionBackend.AUTO.value:
        fn = _auto_attention
    if fn is None:
        # Resolve only on the slow path so the hot path is a dict lookup; this raises the user-facing
        # error message, or gives the backend an alias names.
        resolved = resolve_attention_backend(backend, device=q.device, dtype=q.dtype)
        fn = (
            _auto_attention
            if resolved == AttentionBackend.AUTO.value
            else _REGISTRY.get(resolved) or _OPTIONAL_FNS[resolved]
        )
    return fn(q, k, v, attn_mask)
