"""The GEMM fusions of ``sgl_diffusion.layers.linear``: GELU epilogue, split-accumulate, packed projections.

On the CPU (what runs here) the dispatch functions must be *bit-identical* to the plain expressions
the models used before (the parity tests against diffusers compare at 0.0 in fp32); the custom ops
must survive ``torch.compile(fullgraph=True)`` as opaque ops; ``fuse_projections()`` must keep
state-dict keys and values, memory and outputs. :func:`test_cuda_full_size` checks the cuBLAS paths at
FLUX sizes against the unfused expressions with bf16 tolerances (run it with ``-s`` for timings).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from cuda_timing import cuda_ms
from sgl_diffusion.layers import fused, linear
from sgl_diffusion.layers.linear import linear_gelu_tanh, linear_split_accumulate
from sgl_diffusion.models.flux import FluxTransformer2DModel
from sgl_diffusion.models.wan import WanTransformer3DModel

CUDA = torch.cuda.is_available()
OPS = ("sgl_diffusion.linear_gelu_tanh", "sgl_diffusion.linear_split_accumulate")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gelu_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def _split_ref(parts: list[torch.Tensor], w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(torch.cat(parts, dim=-1), w, b)


def _gelu_inputs(dtype: torch.dtype = torch.float32, bias: bool = True, seed: int = 0):
    g = _gen(seed)
    x = torch.randn(2, 7, 24, generator=g).to(dtype)
    w = (torch.randn(40, 24, generator=g) / 24**0.5).to(dtype)
    b = torch.randn(40, generator=g).to(dtype) if bias else None
    return x, w, b


def _split_inputs(dtype: torch.dtype = torch.float32, bias: bool = True, widths=(12, 20), seed: int = 1):
    g = _gen(seed)
    parts = [torch.randn(2, 7, k, generator=g).to(dtype) for k in widths]
    w = (torch.randn(16, sum(widths), generator=g) / sum(widths) ** 0.5).to(dtype)
    b = torch.randn(16, generator=g).to(dtype) if bias else None
    return parts, w, b


# --------------------------------------------------------------------------------------------------
# CPU: exactly the unfused expressions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_bit_identical(dtype: torch.dtype, bias: bool) -> None:
    x, w, b = _gelu_inputs(dtype, bias)
    assert torch.equal(linear_gelu_tanh(x, w, b), _gelu_ref(x, w, b))
    parts, w2, b2 = _split_inputs(dtype, bias)
    assert torch.equal(linear_split_accumulate(parts, w2, b2), _split_ref(parts, w2, b2))
    # The ops' own CPU implementation is the reference too (what compiled graphs call on the CPU).
    assert torch.equal(torch.ops.sgl_diffusion.linear_gelu_tanh(x, w, b), _gelu_ref(x, w, b))
    assert torch.equal(torch.ops.sgl_diffusion.linear_split_accumulate(parts, w2, b2), _split_ref(parts, w2, b2))


def test_cpu_never_takes_the_cublas_path() -> None:
    x, w, b = _gelu_inputs()
    assert not linear._use_cublas_path(x, w, b)
    # torch's CPU _addmm_activation applies the *erf* GELU; the CPU path must not go near it.
    erf = torch._addmm_activation(b, x.reshape(-1, 24), w.t(), use_gelu=True).view(2, 7, 40)
    assert not torch.equal(erf, linear_gelu_tanh(x, w, b))


def test_switch_is_the_fused_kernels_switch() -> None:
    assert linear.fused_kernels_enabled is fused.fused_kernels_enabled
    was = fused.fused_kernels_enabled()
    try:
        fused.set_fused_kernels(False)
        x, w, b = _gelu_inputs()
        assert not linear._use_cublas_path(x, w, b)
        assert torch.equal(linear_gelu_tanh(x, w, b), _gelu_ref(x, w, b))
    finally:
        fused.set_fused_kernels(was)


def _grads(
    fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], grad_out: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """d(sum(fn(*inputs) * grad_out)) / d(inputs), every input a fresh leaf that requires grad."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        pytest.param("cuda", torch.float32, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
        pytest.param("cuda", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    ],
)
def test_gradients_are_the_references(device: str, dtype: torch.dtype) -> None:
    # When an input requires grad the dispatch runs the unfused expression itself (the cuBLAS epilogue
    # and split-accumulate paths have no backward), so its gradients are the reference's: the same
    # autograd graph on the same kernels, hence compared bit for bit, on CUDA too, where the fused
    # path would otherwise be taken. A non-uniform upstream gradient makes every element count.
    x, w, b = (t.to(device=device, dtype=dtype) for t in _gelu_inputs())
    grad_out = torch.randn(2, 7, 40, generator=_gen(5)).to(device=device, dtype=dtype)
    got = _grads(linear_gelu_tanh, [x, w, b], grad_out)
    want = _grads(_gelu_ref, [x, w, b], grad_out)
    for name, mine, theirs in zip(("x", "weight", "bias"), got, want, strict=True):
        assert torch.equal(mine, theirs), name
        assert mine.abs().max() > 0.1, name  # a real gradient, not zeros
    parts, w2, b2 = _split_inputs()
    parts = [p.to(device=device, dtype=dtype) for p in parts]
    w2, b2 = w2.to(device=device, dtype=dtype), b2.to(device=device, dtype=dtype)
    grad_out = torch.randn(2, 7, 16, generator=_gen(6)).to(device=device, dtype=dtype)
    got = _grads(lambda p0, p1, w, b: linear_split_accumulate([p0, p1], w, b), [*parts, w2, b2], grad_out)
    want = _grads(lambda p0, p1, w, b: _split_ref([p0, p1], w, b), [*parts, w2, b2], grad_out)
    for name, mine, theirs in zip(("part 0", "part 1", "weight", "bias"), got, want, strict=True):
        assert torch.equal(mine, theirs), name
        assert mine.abs().max() > 0.1, name


def test_gradients_are_the_derivatives() -> None:
    # And those gradients are the true derivatives: float64 autograd against central finite
    # differences (torch.autograd.gradcheck: eps 1e-6, atol 1e-5, rtol 1e-3), which would catch a
    # dispatch that cut the graph (zero gradients) or a backward of the wrong expression.
    x, w, b = (t.double().requires_grad_(True) for t in _gelu_inputs())
    assert torch.autograd.gradcheck(linear_gelu_tanh, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-3)
    parts, w2, b2 = _split_inputs()
    leaves = [t.double().requires_grad_(True) for t in (*parts, w2, b2)]
    assert torch.autograd.gradcheck(
        lambda p0, p1, w, b: linear_split_accumulate([p0, p1], w, b), tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-3
    )


def test_split_shape_errors() -> None:
    parts, w, _ = _split_inputs()
    with pytest.raises(ValueError, match="features in total"):
        linear._check_split(parts[:1], w)
    with pytest.raises(ValueError, match="all but the last dim"):
        linear._check_split([parts[0], parts[1][:, :3]], w)


def test_opcheck() -> None:
    x, w, b = _gelu_inputs()
    torch.library.opcheck(torch.ops.sgl_diffusion.linear_gelu_tanh.default, (x, w, b))
    torch.library.opcheck(torch.ops.sgl_diffusion.linear_gelu_tanh.default, (x, w, None))
    parts, w2, b2 = _split_inputs(widths=(8, 4, 20))
    torch.library.opcheck(torch.ops.sgl_diffusion.linear_split_accumulate.default, (parts, w2, b2))


# --------------------------------------------------------------------------------------------------
# torch.compile: the ops stay opaque
# --------------------------------------------------------------------------------------------------


def _block(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, attn: torch.Tensor
) -> torch.Tensor:
    """A FLUX single block's MLP + output projection, through the dispatch functions."""
    mlp = linear_gelu_tanh(x, w1, b1)
    return linear_split_accumulate((attn, mlp), w2, b2) * 0.5 + 1.0


def _block_inputs() -> tuple[torch.Tensor, ...]:
    g = _gen(3)
    x = torch.randn(2, 9, 16, generator=g)
    w1, b1 = torch.randn(64, 16, generator=g) / 4, torch.randn(64, generator=g)
    w2, b2 = torch.randn(16, 80, generator=g) / 9, torch.randn(16, generator=g)
    attn = torch.randn(2, 9, 16, generator=g)
    return x, w1, b1, w2, b2, attn


def _block_reference(*args: torch.Tensor) -> torch.Tensor:
    x, w1, b1, w2, b2, attn = args
    return _split_ref([attn, _gelu_ref(x, w1, b1)], w2, b2) * 0.5 + 1.0


@pytest.fixture
def ops_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make the dispatch take the custom-op path on the CPU (the ops then run their CPU reference)."""
    monkeypatch.setattr(linear, "_use_cublas_path", lambda *args: True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_ops(fn: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, set[str]]:
    """Run ``fn`` under aot_eager (fullgraph) and return its result and the ATen-level graph's targets."""
    from torch._dynamo.backends.common import aot_autograd

    targets: set[str] = set()

    def record(gm: torch.fx.GraphModule, _inputs: object) -> Callable[..., object]:
        targets.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    backend = aot_autograd(fw_compiler=record)
    return torch.compile(fn, backend=backend, fullgraph=True)(*args), targets


@torch.no_grad()
def test_compile_aot_eager_keeps_ops(ops_on_cpu: None) -> None:
    args = _block_inputs()
    out, targets = _graph_ops(_block, args)
    assert torch.equal(out, _block_reference(*args))
    assert {f"{op}.default" for op in OPS} <= targets, targets
    assert not any("gelu" in t and "sgl_diffusion" not in t for t in targets), targets
    assert not any("cat" in t for t in targets), targets
    # The same through the stock backend name.
    torch._dynamo.reset()
    compiled = torch.compile(_block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*args), _block_reference(*args))


@torch.no_grad()
def test_compile_inductor_keeps_ops(ops_on_cpu: None) -> None:
    from torch._inductor.utils import run_and_get_code

    args = _block_inputs()
    compiled = torch.compile(_block, backend="inductor", fullgraph=True)
    out, codes = run_and_get_code(compiled, *args)
    torch.testing.assert_close(out, _block_reference(*args), rtol=1e-6, atol=1e-6)
    code = "\n".join(codes)
    for op in OPS:
        assert op in code, f"{op} was decomposed or dropped by inductor"


@torch.no_grad()
def test_compile_reference_path_on_cpu() -> None:
    # Without the patch the CPU traces the plain expressions (inductor fuses them as before).
    torch._dynamo.reset()
    args = _block_inputs()
    out, targets = _graph_ops(_block, args)
    assert torch.equal(out, _block_reference(*args))
    assert not any("sgl_diffusion" in t for t in targets), targets
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# fuse_projections()
# --------------------------------------------------------------------------------------------------

FLUX_CONFIG = {
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "pooled_projection_dim": 8,
    "guidance_embeds": False,
    "axes_dims_rope": [4, 6, 6],
}
WAN_CONFIG = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "image_dim": 8,
    "added_kv_proj_dim": 24,
    "rope_max_seq_len": 32,
}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = _gen(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


def _flux() -> tuple[FluxTransformer2DModel, Callable[[FluxTransformer2DModel], torch.Tensor]]:
    model = _perturbed(FluxTransformer2DModel.from_config(FLUX_CONFIG))
    g = _gen(2)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    inputs = {
        "hidden_states": torch.randn(2, 12, 16, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 24, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.tensor([0.9, 0.3]),
        "img_ids": ids.reshape(12, 3),
        "txt_ids": torch.zeros(5, 3),
    }
    return model, lambda m: m(**inputs)


def _wan() -> tuple[WanTransformer3DModel, Callable[[WanTransformer3DModel], torch.Tensor]]:
    model = _perturbed(WanTransformer3DModel.from_config(WAN_CONFIG))
    g = _gen(2)
    text = torch.cat((torch.randn(2, 16, 32, generator=g), torch.zeros(2, 512 - 16, 32)), dim=1)
    inputs = {
        "hidden_states": torch.randn(2, 36, 2, 4, 4, generator=g),
        "timestep": torch.tensor([999.0, 421.0]),
        "encoder_hidden_states": text,
        "encoder_hidden_states_image": torch.randn(2, 7, 8, generator=g),
    }
    return model, lambda m: m(**inputs)


MODELS = {"flux": (_flux, 3), "wan": (_wan, 2 * 3)}  # (builder, groups packed)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _storage_bytes(model: torch.nn.Module) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.parameters()}
    storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers()})
    return sum(storages.values())


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_fuse_projections(name: str) -> None:
    build, n_groups = MODELS[name]
    model, run = build()
    before_state, before_out, before_bytes = _state(model), run(model), _storage_bytes(model)

    assert model.fuse_projections() == n_groups
    state = model.state_dict()
    assert list(state) == list(before_state)  # same keys, same order: strict loading still works
    assert all(torch.equal(state[k], v) for k, v in before_state.items())
    assert _storage_bytes(model) == before_bytes  # each weight held once
    for module in model.modules():
        if isinstance(module, linear.ProjectionFusion):
            assert module.projections_fused
            for group in module._fused_widths:
                assert module._still_aliased(group)
    fused_out = run(model)
    torch.testing.assert_close(fused_out, before_out, rtol=1e-5, atol=1e-5)

    # Copying loads write through the views into the packed weights.
    new_state = {k: v + 0.01 for k, v in before_state.items()}
    model.load_state_dict(new_state, strict=True)
    reference, _ = build()
    reference.load_state_dict(new_state, strict=True)
    torch.testing.assert_close(run(model), run(reference), rtol=1e-5, atol=1e-5)
    # Assigning loads replace the parameters: the post hook packs again.
    model.load_state_dict(before_state, strict=True, assign=True)
    assert all(
        m._still_aliased(g) for m in model.modules() if isinstance(m, linear.ProjectionFusion) for g in m._fused_widths
    )
    torch.testing.assert_close(run(model), before_out, rtol=1e-5, atol=1e-5)
    # Conversions unpack, convert and pack again.
    model.double()
    assert _storage_bytes(model) == 2 * before_bytes
    assert all(
        m._still_aliased(g) for m in model.modules() if isinstance(m, linear.ProjectionFusion) for g in m._fused_widths
    )
    model.float()
    assert _storage_bytes(model) == before_bytes
    torch.testing.assert_close(run(model), before_out, rtol=1e-5, atol=1e-5)

    assert model.fuse_projections() == n_groups  # idempotent
    model.unfuse_projections()
    assert not any(m.projections_fused for m in model.modules() if isinstance(m, linear.ProjectionFusion))
    assert list(model.state_dict()) == list(before_state)
    assert not any(".__fused" in k or "_fused_" in k for k in model.state_dict())
    assert torch.equal(run(model), before_out)  # unfused again: the original GEMMs


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_fused_model_compiles(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As --enable-torch-compile does it: each repeated block compiled (fullgraph); one graph per block
    # class, shared by all its (packed) instances.
    from torch._dynamo.utils import counters

    from sgl_diffusion.runtime.compile import compile_repeated_blocks

    monkeypatch.setitem(FLUX_CONFIG, "num_layers", 2)
    monkeypatch.setitem(FLUX_CONFIG, "num_single_layers", 2)
    build, _ = MODELS[name]
    model, run = build()
    expected = run(model)
    model.fuse_projections()
    torch._dynamo.reset()
    counters.clear()
    compile_repeated_blocks(model, backend="aot_eager")
    torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == (2 if name == "flux" else 1)
    torch._dynamo.reset()


def test_meta_model_does_not_fuse() -> None:
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FLUX_CONFIG)
    assert model.fuse_projections() == 0


# --------------------------------------------------------------------------------------------------
# CUDA: the cuBLAS paths at FLUX sizes
# --------------------------------------------------------------------------------------------------


def _cpu_op_names(fn: Callable[[], object]) -> set[str]:
    # acc_events: keep every event of the one cycle (and no "clears events" warning on torch 2.11).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
            fn()
    return {event.name for event in prof.events()}


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@torch.no_grad()
def test_cuda_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    dev, bf16 = "cuda", torch.bfloat16
    monkeypatch.setattr(fused, "_enabled", True)
    g = torch.Generator(device=dev).manual_seed(0)
    tokens, dim, mlp_dim = 4608, 3072, 12288
    x = torch.randn(1, tokens, dim, device=dev, generator=g).to(bf16)
    w1 = (torch.randn(mlp_dim, dim, device=dev, generator=g) / dim**0.5).to(bf16)
    b1 = (0.1 * torch.randn(mlp_dim, device=dev, generator=g)).to(bf16)
    assert linear._use_cublas_path(x, w1, b1)

    # GELU epilogue: within bf16 rounding of the unfused path, and no closer to float32 worse than it.
    got = linear_gelu_tanh(x, w1, b1)
    want = _gelu_ref(x, w1, b1)
    exact = _gelu_ref(x.float(), w1.float(), b1.float())
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=2**-6)
    err_fused = (got.float() - exact).abs().max().item()
    err_unfused = (want.float() - exact).abs().max().item()
    print(f"\nlinear_gelu_tanh max |err| vs fp32: fused {err_fused:.3e}, unfused {err_unfused:.3e}")
    assert err_fused <= 1.5 * err_unfused + 1e-3
    ops = _cpu_op_names(lambda: linear_gelu_tanh(x, w1, b1))
    assert not {"aten::gelu", "aten::gelu_"} & ops, f"GELU ran as its own kernel (no cuBLASLt epilogue): {ops}"
    fused_ms = cuda_ms(lambda: linear_gelu_tanh(x, w1, b1))
    unfused_ms = cuda_ms(lambda: _gelu_ref(x, w1, b1))
    print(f"linear_gelu_tanh ({tokens}x{dim} @ {dim}x{mlp_dim}): fused {fused_ms:.3f} ms, unfused {unfused_ms:.3f} ms")

    # Split-accumulate against the concatenation (FLUX single block proj_out: 3072 + 12288 -> 3072).
    tokens = 4608 + 512
    attn = torch.randn(1, tokens, dim, device=dev, generator=g).to(bf16)
    mlp = F.gelu(torch.randn(1, tokens, mlp_dim, device=dev, generator=g), approximate="tanh").to(bf16)
    w2 = (torch.randn(dim, dim + mlp_dim, device=dev, generator=g) / (dim + mlp_dim) ** 0.5).to(bf16)
    b2 = (0.1 * torch.randn(dim, device=dev, generator=g)).to(bf16)
    got = linear_split_accumulate((attn, mlp), w2, b2)
    want = _split_ref([attn, mlp], w2, b2)
    exact = _split_ref([attn.float(), mlp.float()], w2.float(), b2.float())
    partial = F.linear(attn.float(), w2[:, :dim].float(), b2.float())
    # The split path rounds the first partial sum once more: half an ulp of |partial| on top.
    bound = 2**-7 * (partial.abs() + exact.abs()) + 2**-10
    assert ((got.float() - exact).abs() <= bound).all()
    assert ((got.float() - want.float()).abs() <= bound + 2**-8 * exact.abs()).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-5, atol=2**-5)
    # The weight's column slices go to cuBLAS as they are: no copy, no clone, no concatenation.
    ops = _cpu_op_names(lambda: linear_split_accumulate((attn, mlp), w2, b2))
    assert not {"aten::copy_", "aten::clone", "aten::contiguous", "aten::cat"} & ops, ops
    split_ms = cuda_ms(lambda: linear_split_accumulate((attn, mlp), w2, b2))
    cat_ms = cuda_ms(lambda: _split_ref([attn, mlp], w2, b2))
    print(
        f"linear_split_accumulate ({tokens} tokens, {dim}+{mlp_dim} -> {dim}): split {split_ms:.3f} ms, cat {cat_ms:.3f} ms"
    )

    # Under torch.compile (inductor) the custom ops run and give the eager results.
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda a, m: linear_split_accumulate((a, linear_gelu_tanh(m, w1, b1)), w2, b2), fullgraph=True
    )
    h = torch.randn(1, tokens, dim, device=dev, generator=g).to(bf16)
    eager = linear_split_accumulate((attn, linear_gelu_tanh(h, w1, b1)), w2, b2)
    torch.testing.assert_close(compiled(attn, h), eager)
    torch._dynamo.reset()
