"""Attention backends behind ``--attention-backend``: names, lazy optional packages, ``auto``, masks.

flash-attn and sageattention are not installed on CPU test machines, so their routing is proven with
stand-in modules placed in ``sys.modules`` that record calls and compute attention with torch. Entries
set to ``None`` in ``sys.modules`` block the real packages, so these tests behave the same on a GPU box
where they are installed.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sgl_diffusion.layers import attention_autotune
from sgl_diffusion.layers.attention import (
    AttentionBackend,
    attention,
    attention_kernel_label,
    auto_attention_measurements,
    available_attention_backends,
    check_attention_backend_name,
    register_attention_backend,
    resolve_attention_backend,
)
from sgl_diffusion.layers.attention_autotune import AttentionShape, MeasuredChoice

# `sgl_diffusion.layers.attention` the attribute is the function (re-exported by the package), so fetch
# the module itself to patch its internals.
attn = importlib.import_module("sgl_diffusion.layers.attention")

OPTIONAL_MODULES = ("fa3_fwd_interface", "flash_attn_interface", "flash_attn", "flash_attn.cute", "sageattention")
#: What runs anywhere: the default, `auto`, and the sparse video backends (their torch references).
ALWAYS = "torch_sdpa, auto, sliding_tile_attn, video_sparse_attn"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Block the real packages (if any) and start every test with empty caches.
    for name in OPTIONAL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(attn, "_kernel_cache", {})
    monkeypatch.setattr(attn, "_import_failures", {})
    monkeypatch.setattr(attn, "_mask_fallback_logged", set())


@pytest.fixture
def on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the fa/sage_attn wrappers accept CPU tensors so stand-in kernels can run here."""
    monkeypatch.setattr(attn, "_KERNEL_DEVICE_TYPES", ("cuda", "cpu"))


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(b, s, h, d) attention in float32, output in the same (b, s, h, d) layout and q's dtype."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def _fake_module(
    monkeypatch: pytest.MonkeyPatch, module: str, attr: str, *, returns_lse: bool = False
) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
        calls.append({"q": q, "k": k, "v": v, **kwargs})
        out = _reference(q, k, v)
        return (out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])) if returns_lse else out

    fake = types.ModuleType(module)
    setattr(fake, attr, kernel)
    monkeypatch.setitem(sys.modules, module, fake)
    return calls


def _qkv(seq_q: int = 5, seq_k: int = 7, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, seq_q, 3, 8, generator=gen).to(dtype)
    k = torch.randn(2, seq_k, 3, 8, generator=gen).to(dtype)
    v = torch.randn(2, seq_k, 3, 8, generator=gen).to(dtype)
    return q, k, v


# ---- names and errors ----------------------------------------------------------------------------


def test_names() -> None:
    assert {b.value for b in AttentionBackend} == {
        "torch_sdpa", "auto", "fa", "fa4", "sage_attn", "sliding_tile_attn", "video_sparse_attn"
    }  # fmt: skip
    assert resolve_attention_backend(None) == "torch_sdpa"
    assert resolve_attention_backend("torch_sdpa") == "torch_sdpa"
    assert resolve_attention_backend(AttentionBackend.TORCH_SDPA) == "torch_sdpa"
    assert available_attention_backends() == ALWAYS.split(", ")


def test_unknown_and_reserved_names() -> None:
    with pytest.raises(ValueError, match=rf"^unknown attention backend 'nope'; available: {ALWAYS}$"):
        resolve_attention_backend("nope")
    with pytest.raises(ValueError, match=r"unknown attention backend 'fa2' \(did you mean 'fa'\?\)"):
        resolve_attention_backend("fa2")
    with pytest.raises(ValueError, match=r"unknown attention backend 'sage' \(did you mean 'sage_attn'\?\)"):
        resolve_attention_backend("sage")
    # The names reserved before the sparse backends existed point at SGLang's names, which are ours now.
    for name, meant in (("sliding_tile", "sliding_tile_attn"), ("vsa", "video_sparse_attn")):
        with pytest.raises(ValueError, match=rf"'{name}' \(did you mean '{meant}'\?\); available: {ALWAYS}"):
            resolve_attention_backend(name)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, backend="nope")


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        (
            "fa",
            [
                "flash-attn",
                "fa3_fwd_interface",
                "flash_attn_interface",
                "`flash_attn`",
                "not installed",
                "pip install fa3-fwd",
                "pip install flash-attn",
            ],
        ),
        ("fa4", ["flash-attn-4", "`flash_attn.cute`", "not installed", "pip install --pre flash-attn-4"]),
        ("sage_attn", ["sageattention", "not installed", "pip install sageattention"]),
    ],
)
def test_missing_package_errors(name: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        resolve_attention_backend(name)
    message = str(info.value)
    assert message.startswith(f"attention backend '{name}' needs the ")
    for needle in needles:
        assert needle in message
    assert message.endswith(f"available: {ALWAYS}")
    # The same error when a model calls attention() with the unresolved name.
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"attention backend '{name}' needs the .* not installed"):
        attention(q, k, v, backend=name)


def test_broken_package_is_reported_as_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    # A module that exists but fails to import (e.g. built against another torch) is not "not installed".
    monkeypatch.delitem(sys.modules, "flash_attn")

    class _Finder:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> None:
            if name == "flash_attn":
                raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(sys, "meta_path", [_Finder(), *sys.meta_path])
    with pytest.raises(ValueError, match=r"is installed but unusable: flash_attn failed to import \(ImportError: "):
        resolve_attention_backend("fa")


def test_register_rules() -> None:
    with pytest.raises(ValueError, match="'auto' chooses among the exact backends"):
        register_attention_backend("auto", attn._torch_sdpa)
    with pytest.raises(ValueError, match="'fa' is already registered"):
        register_attention_backend("fa", attn._torch_sdpa)
    with pytest.raises(ValueError, match="'fa4' is already registered"):
        register_attention_backend("fa4", attn._torch_sdpa)
    with pytest.raises(ValueError, match="'torch_sdpa' is already registered"):
        register_attention_backend("torch_sdpa", attn._torch_sdpa)


# ---- fa ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "returns_lse"),
    [("fa3_fwd_interface", False), ("flash_attn_interface", True), ("flash_attn_interface", False),
     ("flash_attn", False)],
)  # fmt: skip
@pytest.mark.usefixtures("on_cpu")
def test_fa_routes_to_kernel(monkeypatch: pytest.MonkeyPatch, module: str, returns_lse: bool) -> None:
    calls = _fake_module(monkeypatch, module, "flash_attn_func", returns_lse=returns_lse)
    assert resolve_attention_backend("fa") == "fa"
    assert "fa" in available_attention_backends()
    q, k, v = _qkv(seq_q=5, seq_k=7)  # cross attention: seq_k != seq_q
    out = attention(q, k, v, backend="fa")
    assert len(calls) == 1
    # Passed through untouched: (batch, seq, heads, head_dim), no transpose, no copy.
    assert calls[0]["q"] is q and calls[0]["k"] is k and calls[0]["v"] is v
    assert calls[0]["causal"] is False
    assert out.shape == (2, 5, 24) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _reference(q, k, v).flatten(2, 3))


@pytest.mark.usefixtures("on_cpu")
def test_fa_prefers_fa3(monkeypatch: pytest.MonkeyPatch) -> None:
    fa3 = _fake_module(monkeypatch, "flash_attn_interface", "flash_attn_func", returns_lse=True)
    fa2 = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    attention(*_qkv(), backend="fa")
    assert (len(fa3), len(fa2)) == (1, 0)


@pytest.mark.usefixtures("on_cpu")
def test_fa_prefers_the_prebuilt_fa3_forward_for_bf16_and_says_it_has_no_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    fa3_fwd = _fake_module(monkeypatch, "fa3_fwd_interface", "flash_attn_func")
    fa3 = _fake_module(monkeypatch, "flash_attn_interface", "flash_attn_func", returns_lse=True)
    attention(*_qkv(), backend="fa")
    assert (len(fa3_fwd), len(fa3)) == (1, 0)
    assert attention_kernel_label("fa3") == "FlashAttention-3 (fa3-fwd)"
    assert attention_kernel_label("fa4") is None and attention_kernel_label("torch_sdpa") is None
    with pytest.raises(ValueError, match=r"'fa' \(FlashAttention-3 \(fa3-fwd\)\) takes bf16 only"):
        resolve_attention_backend("fa", dtype=torch.float16)  # at load time, for a --dit-precision fp16 model
    # Nor is it one of auto's candidates for fp16.
    assert resolve_attention_backend("auto", device="cpu", dtype=torch.float16) == "torch_sdpa"
    assert resolve_attention_backend("auto", device="cpu", dtype=torch.bfloat16) == "auto"
    # The fa3-fwd wheel ships bf16 kernels only: fp16 is refused by name before the kernel is called.
    q, k, v = (t.half() for t in _qkv())
    with pytest.raises(ValueError, match=r"'fa' \(FlashAttention-3 \(fa3-fwd\)\) takes bf16 tensors"):
        attention(q, k, v, backend="fa")
    assert len(fa3_fwd) == 1


@pytest.mark.usefixtures("on_cpu")
def test_sglang_name_fa3_means_fa_and_fa4_is_flash_attention_4(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="attention backend 'fa' needs"):  # the same error as `fa` itself
        resolve_attention_backend("fa3")
    _fake_module(monkeypatch, "flash_attn_interface", "flash_attn_func", returns_lse=True)
    assert resolve_attention_backend("fa3") == "fa"
    assert check_attention_backend_name("fa3") == "fa"
    # SGLang normalises fa4 to fa too; here it is FlashAttention-4, whose own package is missing.
    assert check_attention_backend_name("fa4") == "fa4"
    with pytest.raises(ValueError, match="attention backend 'fa4' needs the flash-attn-4 package"):
        resolve_attention_backend("fa4")


@pytest.mark.usefixtures("on_cpu")
def test_fa_registration_is_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Installed" after this module was imported: picked up at resolve time.
    assert "fa" not in available_attention_backends()
    calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    assert "fa" in available_attention_backends()
    assert resolve_attention_backend("fa") == "fa"
    attention(*_qkv(), backend="fa")
    assert len(calls) == 1
    # Removed again: the cached kernel is not called stale, and the name stops resolving.
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with pytest.raises(ValueError, match="not installed"):
        attention(*_qkv(), backend="fa")
    with pytest.raises(ValueError, match="not installed"):
        resolve_attention_backend("fa")
    assert len(calls) == 1


@pytest.mark.usefixtures("on_cpu")
def test_fa_mask_falls_back_to_sdpa_once_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, -2:] = False
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        first = attention(q, k, v, backend="fa", attn_mask=mask)
        second = attention(q, k, v, backend="fa", attn_mask=mask)
    assert calls == []  # the kernel cannot take a mask, so it is never called with one
    # Exact: the same numbers torch_sdpa gives, which equal dropping the masked keys.
    assert torch.equal(first, attention(q, k, v, backend="torch_sdpa", attn_mask=mask))
    assert torch.equal(first, second)
    # (bf16 SDPA vs an fp32 reference rounded once: allow bf16-level differences.)
    torch.testing.assert_close(first, _reference(q, k[:, :-2], v[:, :-2]).flatten(2, 3), atol=1e-2, rtol=1e-2)
    fallback_logs = [r for r in caplog.records if "does not take masks" in r.getMessage()]
    assert len(fallback_logs) == 1 and "FlashAttention-2" in fallback_logs[0].getMessage()
    # Unmasked calls still go to the kernel.
    attention(q, k, v, backend="fa")
    assert len(calls) == 1


def test_fa_rejects_unsupported_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    with pytest.raises(ValueError, match=r"'fa' \(FlashAttention-2\) takes fp16/bf16 .* got q torch.float32"):
        attention(*_qkv(dtype=torch.float32), backend="fa")
    with pytest.raises(ValueError, match="'fa' runs on CUDA only, got tensors on cpu"):
        attention(*_qkv(dtype=torch.bfloat16), backend="fa")
    with pytest.raises(ValueError, match=r"'fa' \(FlashAttention-2\) takes fp16/bf16 only"):
        resolve_attention_backend("fa", dtype=torch.float32)
    with pytest.raises(ValueError, match="'fa' runs on CUDA only, got device cpu"):
        resolve_attention_backend("fa", device="cpu")
    assert resolve_attention_backend("fa", device="cuda:0", dtype=torch.float16) == "fa"
    assert calls == []


# ---- sage_attn -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("on_cpu")
def test_sage_attn_routes_to_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_module(monkeypatch, "sageattention", "sageattn")
    assert resolve_attention_backend("sage_attn") == "sage_attn"
    assert available_attention_backends() == [*ALWAYS.split(", ")[:2], "sage_attn", *ALWAYS.split(", ")[2:]]
    q, k, v = _qkv(dtype=torch.float16)
    out = attention(q, k, v, backend="sage_attn")
    assert len(calls) == 1
    assert calls[0]["q"] is q and calls[0]["k"] is k and calls[0]["v"] is v
    assert calls[0]["tensor_layout"] == "NHD" and calls[0]["is_causal"] is False
    assert out.shape == (2, 5, 24) and out.dtype == torch.float16
    torch.testing.assert_close(out, _reference(q, k, v).flatten(2, 3))


@pytest.mark.usefixtures("on_cpu")
def test_package_kernels_run_inside_torch_compile_fullgraph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled blocks call package kernels as one opaque op (dynamo cannot trace into them)."""
    calls = _fake_module(monkeypatch, "sageattention", "sageattn")
    q, k, v = _qkv(dtype=torch.float16)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, backend="sage_attn") * 2, fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(compiled(q, k, v), 2 * _reference(q, k, v).flatten(2, 3))
    assert len(calls) == 1


@pytest.mark.usefixtures("on_cpu")
def test_sage_attn_rejects_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_module(monkeypatch, "sageattention", "sageattn")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention backend 'sage_attn' does not support attention masks"):
        attention(q, k, v, backend="sage_attn", attn_mask=torch.ones(2, 7, dtype=torch.bool))
    assert calls == []


def test_sage_attn_rejects_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_module(monkeypatch, "sageattention", "sageattn")
    with pytest.raises(ValueError, match="'sage_attn' takes fp16/bf16"):
        attention(*_qkv(dtype=torch.float32), backend="sage_attn")


# ---- auto ----------------------------------------------------------------------------------------


def test_auto_on_cpu() -> None:
    assert resolve_attention_backend("auto", device="cpu") == "torch_sdpa"
    assert resolve_attention_backend(AttentionBackend.AUTO, device="cpu", dtype=torch.bfloat16) == "torch_sdpa"
    if not torch.cuda.is_available():
        assert resolve_attention_backend("auto") == "torch_sdpa"
    q, k, v = _qkv(dtype=torch.float32)
    assert torch.equal(attention(q, k, v, backend="auto"), attention(q, k, v, backend="torch_sdpa"))


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[tuple[int, int]], None]:
    def set_capability(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(attn, "_is_hopper_or_newer", lambda device: capability >= (9, 0))

    return set_capability


def test_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, fake_gpu: Callable[[tuple[int, int]], None]) -> None:
    # Installed lossy kernel: never a candidate, so the one exact backend is named.
    _fake_module(monkeypatch, "sageattention", "sageattn")
    fake_gpu((8, 0))
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.bfloat16) == "torch_sdpa"
    # FlashAttention-4 runs on Hopper and newer only: no candidate on an A100.
    _fake_module(monkeypatch, "flash_attn.cute", "flash_attn_func")
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.bfloat16) == "torch_sdpa"
    assert attn._exact_backends("cuda:0", torch.bfloat16) == ["torch_sdpa"]
    # Two exact kernels: `auto` stays `auto`, measured per shape when attention runs.
    _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.bfloat16) == "auto"
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.float16) == "auto"
    assert resolve_attention_backend("auto", device="cuda:0") == "auto"  # dtype unknown: taken as bf16
    assert attn._exact_backends("cuda:0", torch.bfloat16) == ["torch_sdpa", "fa"]
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.float32) == "torch_sdpa"
    assert resolve_attention_backend("auto", device="cpu", dtype=torch.bfloat16) == "torch_sdpa"
    fake_gpu((9, 0))
    assert attn._exact_backends("cuda:0", torch.bfloat16) == ["torch_sdpa", "fa", "fa4"]
    assert resolve_attention_backend("auto", device="cuda:0", dtype=torch.bfloat16) == "auto"


# ---- auto: measured per shape ----------------------------------------------------------------------


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch, on_cpu: None) -> MeasuredChoice:
    """`auto` on the CPU with a stand-in `fa` (the wrappers accept CPU tensors here), a fresh table of winners."""
    choices = MeasuredChoice(fallback="torch_sdpa", repeats=2)
    monkeypatch.setattr(attn, "_AUTO_CHOICES", choices)
    return choices


def _slowed(monkeypatch: pytest.MonkeyPatch, name: str, seconds: float) -> list[int]:
    """Makes backend `name` take `seconds` longer per call; returns its call log (one entry per call)."""
    table = attn._REGISTRY if name in attn._REGISTRY else attn._OPTIONAL_FNS
    inner = table[name]
    calls: list[int] = []

    def slow(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        calls.append(q.shape[1])
        time.sleep(seconds)
        return inner(q, k, v, attn_mask)

    monkeypatch.setitem(table, name, slow)
    return calls


def test_auto_runs_the_kernel_that_measured_fastest_at_each_shape(
    monkeypatch: pytest.MonkeyPatch, measured: MeasuredChoice
) -> None:
    fa_calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    assert resolve_attention_backend("auto", device="cpu", dtype=torch.bfloat16) == "auto"
    sdpa = _slowed(monkeypatch, "torch_sdpa", 0.02)
    q, k, v = _qkv(seq_q=5, seq_k=7)
    out = attention(q, k, v, backend="auto")
    # Measured once: an untimed call and `repeats` timed ones of each candidate, then the winner's run.
    assert len(fa_calls) == 1 + 2 + 1 and len(sdpa) == 1 + 2
    assert torch.equal(out, attention(q, k, v, backend="fa"))
    [measurement] = auto_attention_measurements()
    assert measurement.choice == "fa" and set(measurement.ms) == {"torch_sdpa", "fa"}
    assert measurement.ms["torch_sdpa"] > 20 > measurement.ms["fa"]
    assert measurement.shape == AttentionShape("cpu", torch.bfloat16, 2, 5, 7, 3, 8)
    assert "-> fa" in measurement.summary() and "5 x 7 tokens" in measurement.summary()
    # The same shape again: no new measurement, one call of the winner.
    fa_before = len(fa_calls)
    attention(q, k, v, backend="auto")
    assert len(fa_calls) == fa_before + 1 and len(sdpa) == 3
    # Another shape (a cross-attention's key length) is measured on its own; here SDPA is the fast one.
    monkeypatch.setitem(attn._REGISTRY, "torch_sdpa", attn._torch_sdpa)
    _slowed(monkeypatch, "fa", 0.02)
    q2, k2, v2 = _qkv(seq_q=5, seq_k=3)
    assert torch.equal(attention(q2, k2, v2, backend="auto"), attention(q2, k2, v2, backend="torch_sdpa"))
    assert [m.choice for m in auto_attention_measurements()] == ["fa", "torch_sdpa"]


def test_auto_leaves_out_a_kernel_that_fails_at_a_shape(
    monkeypatch: pytest.MonkeyPatch, measured: MeasuredChoice
) -> None:
    def broken(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("head size 8 is not supported")

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_func = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    q, k, v = _qkv()
    assert torch.equal(attention(q, k, v, backend="auto"), attention(q, k, v, backend="torch_sdpa"))
    [measurement] = auto_attention_measurements()
    assert measurement.choice == "torch_sdpa" and list(measurement.ms) == ["torch_sdpa"]
    assert "head size 8 is not supported" in measurement.failed["fa"]


def test_auto_runs_masked_and_fp32_calls_on_sdpa_without_measuring(
    monkeypatch: pytest.MonkeyPatch, measured: MeasuredChoice
) -> None:
    fa_calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 2:] = False
    assert torch.equal(
        attention(q, k, v, backend="auto", attn_mask=mask), attention(q, k, v, backend="torch_sdpa", attn_mask=mask)
    )
    q32, k32, v32 = _qkv(dtype=torch.float32)
    assert torch.equal(attention(q32, k32, v32, backend="auto"), attention(q32, k32, v32, backend="torch_sdpa"))
    assert fa_calls == [] and auto_attention_measurements() == []


def test_auto_under_torch_compile_measures_while_tracing(
    monkeypatch: pytest.MonkeyPatch, measured: MeasuredChoice
) -> None:
    fa_calls = _fake_module(monkeypatch, "flash_attn", "flash_attn_func")
    _slowed(monkeypatch, "torch_sdpa", 0.02)

    class Block(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q * 1, k, v, backend="auto")

    block = Block()
    # The engine compiles blocks this way (runtime/compile.py); "eager" skips code generation, not tracing.
    block.compile(fullgraph=True, dynamic=False, backend="eager")
    torch._dynamo.reset()
    q, k, v = _qkv()
    out = block(q, k, v)
    [measurement] = auto_attention_measurements()
    assert measurement.choice == "fa"
    # Measured at trace time on random inputs of the shape, then the graph calls the winner on the real ones.
    measured_on = fa_calls[:3]
    assert all(call["q"].shape == q.shape and not torch.equal(call["q"], q) for call in measured_on)
    assert torch.equal(fa_calls[-1]["q"], q) and torch.equal(out, attention(q, k, v, backend="fa"))
    calls = len(fa_calls)
    block(q, k, v)  # no retrace, no new measurement
    assert len(fa_calls) == calls + 1 and len(auto_attention_measurements()) == 1


def test_a_shape_first_seen_in_a_cuda_graph_capture_runs_the_fallback_unremembered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    choices = MeasuredChoice(fallback="sdpa")
    monkeypatch.setattr(attention_autotune, "_capturing", lambda device: True)
    shape = AttentionShape("cuda:0", torch.bfloat16, 1, 4, 4, 2, 8)
    kernels = {"sdpa": lambda q, k, v: q, "fast": lambda q, k, v: q}
    assert choices.choose(shape, kernels) == "sdpa"
    assert choices.known(shape) is None and choices.measurements() == []


# ---- torch_sdpa unchanged ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_sdpa_matches_sdpa_bitwise(dtype: torch.dtype) -> None:
    q, k, v = _qkv(dtype=dtype)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3] = False
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
    )
    out = attention(q, k, v, backend="torch_sdpa", attn_mask=mask)
    assert torch.equal(out, expected.transpose(1, 2).flatten(2, 3))
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="torch_sdpa"))
