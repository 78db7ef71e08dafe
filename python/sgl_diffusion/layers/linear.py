"""GEMMs with the memory passes around them folded in: the model code's entry point for them.

``torch.compile`` fuses the elementwise ops *between* our GEMMs, but not into them: inductor calls
cuBLAS as an extern kernel, so whatever touches a GEMM's output is one more pass over it. This module
removes the two such passes that the DiT blocks still pay for, and packs projections that read the
same input into one GEMM:

* :func:`linear_gelu_tanh` -- ``gelu(linear(x), approximate="tanh")`` with the bias and the GELU in
  cuBLASLt's epilogue (``torch._addmm_activation(bias, x, w.t(), use_gelu=True)``, which reaches
  ``CUBLASLT_EPILOGUE_GELU_BIAS``), so the ``(tokens, 4 * dim)`` FFN activation is written once and
  never read back just to be activated.
* :func:`linear_split_accumulate` -- ``linear(cat(parts, -1))`` without materialising the
  concatenation: one GEMM per part against a column slice of the (single, checkpoint-keyed) weight,
  accumulated into one output (FLUX single blocks' ``proj_out`` over ``[attn | mlp]``).
* :class:`ProjectionFusion` -- ``fuse_projections()`` for attention modules: the weights of e.g.
  ``to_q``/``to_k``/``to_v`` move into one buffer that the Linears keep as *views* (state_dict keys
  and memory unchanged), and the forward runs one GEMM instead of three.

Dispatch (the first two functions). The fused CUDA path runs when all of these hold, otherwise the
plain torch expression runs -- on the CPU exactly the expression the models used before, so CPU
results (and the fp32 parity tests against diffusers) are bit-identical:

* fused kernels are enabled: the switch of :mod:`sgl_diffusion.layers.fused`
  (:func:`~sgl_diffusion.layers.fused.set_fused_kernels`, env ``SGL_DIFFUSION_FUSED_KERNELS=0``);
* ``x`` is a CUDA tensor of dtype fp16 / bf16 / fp32, with weight (and bias) of the same dtype;
* no input needs a gradient (the ops have no backward).

Unlike the Triton kernels of :mod:`~sgl_diffusion.layers.fused`, these also run *under*
``torch.compile``: there they are traced as the opaque custom ops ``sgl_diffusion::linear_gelu_tanh``
and ``sgl_diffusion::linear_split_accumulate`` (with fake implementations for shape propagation), so
inductor keeps them as extern kernels instead of decomposing ``_addmm_activation`` back into
``addmm`` + ``gelu`` -- which is exactly the pass this module exists to remove. In eager mode the same
implementation is called directly, without the custom-op dispatch overhead.

Numerics on CUDA (bf16/fp16), both within about one ulp of the output dtype of the unfused path:

* ``linear_gelu_tanh`` rounds once (GELU applied to the float32 accumulator + bias) where the unfused
  path rounds the GEMM output to bf16 and then rounds the GELU again. The epilogue's GELU is the tanh
  approximation: torch's own fallback for the same op, when cuBLASLt is not used, applies
  ``gelu(approximate="tanh")`` (``aten/src/ATen/native/cuda/Blas.cpp``, ``addmm_out_cuda_impl``), and
  its decomposition does the same for CUDA tensors (``torch/_decomp/decompositions.py``). Note that
  ``_addmm_activation`` on the *CPU* applies the exact (erf) GELU -- one more reason the CPU path here
  never calls it.
* ``linear_split_accumulate`` rounds the first part's partial product (+ bias) to the output dtype
  before the next part's GEMM adds to it (``beta=1``, accumulated in float32), where the
  concatenated GEMM accumulates all of K in float32 and rounds once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fused import fused_kernels_enabled
from .row_lora import lora_active, lora_term

__all__ = [
    "ProjectionFusion",
    "fuse_model_projections",
    "linear_gelu_tanh",
    "linear_split_accumulate",
    "unfuse_model_projections",
]

#: dtypes that cuBLASLt's bias / GELU epilogues take (``isInputCompliesAddmmCudaLt`` also takes
#: float64, which no model here runs in).
_GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_cublas_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *others: torch.Tensor) -> bool:
    """Whether to run the fused CUDA implementation (see the module docstring) for these inputs."""
    if not fused_kernels_enabled() or x.device.type != "cuda" or x.dtype not in _GEMM_DTYPES:
        return False
    if weight.ndim != 2 or weight.dtype != x.dtype or any(t.dtype != x.dtype for t in others):
        return False
    if bias is not None and (bias.ndim != 1 or bias.dtype != x.dtype):
        return False
    if torch.is_grad_enabled():
        tensors = (x, weight, bias, *others)
        if any(t is not None and t.requires_grad for t in tensors):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# linear + GELU(tanh)
# --------------------------------------------------------------------------------------------------


def _linear_gelu_tanh_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def _linear_gelu_tanh_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.device.type != "cuda" or bias is None:
        # The epilogue needs the bias vector (no model here has a bias-free GELU projection).
        return _linear_gelu_tanh_reference(x, weight, bias)
    # addmm takes 2-D operands: a contiguous (B, S, K) activation folds into (B*S, K) as a view. The
    # Lt (epilogue) path is taken because beta == 1, the bias is 1-D contiguous with N entries, the
    # result is a fresh contiguous 2-D tensor, the dtype is fp16/bf16/fp32 and both GEMM dims are > 1
    # (``isInputCompliesAddmmCudaLt``); otherwise torch runs a plain GEMM and then gelu_(tanh) in
    # place -- the same values, one more pass. weight.t() is a transposed view (no copy): cuBLAS
    # reads it through its transpose flag.
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("sgl_diffusion::linear_gelu_tanh", mutates_args=())
def _linear_gelu_tanh_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _linear_gelu_tanh_impl(x, weight, bias)


@_linear_gelu_tanh_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.shape[-1] == weight.shape[1], lambda: "linear_gelu_tanh: x and weight disagree on in_features")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")``, the GELU in the GEMM's epilogue on CUDA.

    ``x`` is ``(..., in_features)``; returns ``(..., out_features)``. Off CUDA (or with fused kernels
    switched off) exactly the expression above runs. With a per-request LoRA term on ``weight``
    (:mod:`.row_lora`) the term joins the linear output before the GELU, unfused.
    """
    term = lora_term(x, weight) if lora_active() else None
    if term is not None:
        return F.gelu(F.linear(x, weight, bias) + term, approximate="tanh")
    if not _use_cublas_path(x, weight, bias):
        return _linear_gelu_tanh_reference(x, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.sgl_diffusion.linear_gelu_tanh(x, weight, bias)
    return _linear_gelu_tanh_impl(x, weight, bias)


# --------------------------------------------------------------------------------------------------
# linear over a concatenation, without the concatenation
# --------------------------------------------------------------------------------------------------


def _linear_split_accumulate_reference(
    parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return F.linear(torch.cat(tuple(parts), dim=-1), weight, bias)


def _check_split(parts: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
    if not parts:
        raise ValueError("linear_split_accumulate needs at least one part")
    lead = parts[0].shape[:-1]
    if any(p.shape[:-1] != lead for p in parts):
        raise ValueError(f"parts must agree on all but the last dim, got {[tuple(p.shape) for p in parts]}")
    width = sum(p.shape[-1] for p in parts)
    if width != weight.shape[1]:
        raise ValueError(f"parts have {width} features in total, the weight takes {weight.shape[1]}")


def _linear_split_accumulate_impl(
    parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if parts[0].device.type != "cuda":
        return _linear_split_accumulate_reference(parts, weight, bias)
    _check_split(parts, weight)
    lead = parts[0].shape[:-1]
    out: torch.Tensor | None = None
    start = 0
    for part in parts:
        width = part.shape[-1]
        # weight[:, start:start+width] is a column slice: sizes (N, width), strides (K, 1); its .t() has
        # sizes (width, N), strides (1, K). cuBLAS takes that as is -- prepare_matrix_for_cublas (in
        # aten/src/ATen/native/cuda/Blas.cpp) only copies a matrix that has no unit stride or whose
        # leading stride is smaller than the other dim; here stride(0) == 1 and stride(1) == K >= width,
        # so it passes the slice's pointer with lda = K and a transpose flag, without clone(). (On CUDA
        # >= 12.1 the Lt path has no "leading dim >> rows" restriction either.) The CUDA test checks
        # with the profiler that no aten::copy_/clone runs.
        w_t = weight[:, start : start + width].t()
        p2d = part.reshape(-1, width)
        if out is None:
            # Bias in the Lt epilogue (the same kernel family F.linear uses); result rounded once here.
            out = torch.addmm(bias, p2d, w_t) if bias is not None else torch.mm(p2d, w_t)
        else:
            # In place, beta = 1: cuBLAS reads the partial sum as C and accumulates onto it in float32.
            out.addmm_(p2d, w_t)
        start += width
    assert out is not None
    return out.view(*lead, weight.shape[0])


@torch.library.custom_op("sgl_diffusion::linear_split_accumulate", mutates_args=())
def _linear_split_accumulate_op(
    parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _linear_split_accumulate_impl(parts, weight, bias)


@_linear_split_accumulate_op.register_fake
def _(parts: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(
        sum(p.shape[-1] for p in parts) == weight.shape[1],
        lambda: "linear_split_accumulate: the parts' widths must add up to the weight's in_features",
    )
    return parts[0].new_empty((*parts[0].shape[:-1], weight.shape[0]))


def linear_split_accumulate(
    parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(torch.cat(parts, -1), weight, bias)`` without the concatenation on CUDA.

    Each part is ``(..., k_i)`` (same leading dims) and ``sum(k_i) == weight.shape[1]``; part ``i``
    meets the column slice ``weight[:, k_0 + ... + k_{i-1} :][:, :k_i]`` -- a view, the parameter
    stays the checkpoint's single tensor. Off CUDA (or switched off) exactly the expression above runs.
    With a per-request LoRA term on ``weight`` (:mod:`.row_lora`) it is the concatenated input's, added.
    """
    if parts and lora_active():
        term = lora_term(torch.cat(tuple(parts), dim=-1), weight)
        if term is not None:
            return _linear_split_accumulate_reference(parts, weight, bias) + term
    if not parts or not _use_cublas_path(parts[0], weight, bias, *parts[1:]):
        return _linear_split_accumulate_reference(parts, weight, bias)
    if torch.compiler.is_compiling():
        return torch.ops.sgl_diffusion.linear_split_accumulate(list(parts), weight, bias)
    return _linear_split_accumulate_impl(parts, weight, bias)


# --------------------------------------------------------------------------------------------------
# Packed projections
# --------------------------------------------------------------------------------------------------


def _is_view_at(t: torch.Tensor, base: torch.Tensor, offset: int) -> bool:
    """Whether ``t`` is the contiguous block of ``base``'s storage starting ``offset`` elements in."""
    return (
        t.device == base.device
        and t.dtype == base.dtype
        and t.is_contiguous()
        and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
        and t.storage_offset() == base.storage_offset() + offset
    )


class ProjectionFusion(nn.Module):
    """Mixin for modules whose ``nn.Linear`` children come in groups that read the same input.

    A subclass lists its groups in :meth:`projection_groups` (group name -> attribute names of the
    Linears) and gets their outputs from :meth:`project`. Until :meth:`fuse_projections` that runs each
    Linear; afterwards one GEMM per group, against a weight ``cat([w_1, w_2, ...], 0)`` kept as a
    non-persistent buffer, returning views of the packed output.

    After fusing, each Linear's ``weight``/``bias`` is an ``nn.Parameter`` *view* into the packed
    buffer, so the module holds each weight once, ``state_dict()`` has the same keys (and values) as
    before, and in-place updates of a Linear's weight (``load_state_dict`` without ``assign``,
    ``weight.copy_``) reach the packed weight. Replacing a parameter object is detected where it can
    be: ``load_state_dict`` (a post hook re-packs when the parameters no longer alias the buffer) and
    ``.to()`` / ``.half()`` / ``.cuda()`` (:meth:`_apply` unpacks, converts, re-packs). Assigning
    ``linear.weight = ...`` by hand after fusing is not detected: call :meth:`fuse_projections` again.
    Saving such a state dict with safetensors needs ``unfuse_projections()`` first (shared storage).
    """

    def __init__(self) -> None:
        super().__init__()
        # group -> output widths of its Linears, for the groups currently packed.
        self._fused_widths: dict[str, tuple[int, ...]] = {}
        self.register_load_state_dict_post_hook(ProjectionFusion._refuse_after_load)

    def projection_groups(self) -> dict[str, tuple[str, ...]]:
        """Group name -> names of the ``nn.Linear`` attributes that take the same input."""
        raise NotImplementedError

    @property
    def projections_fused(self) -> bool:
        return bool(self._fused_widths)

    def project(self, x: torch.Tensor, group: str) -> tuple[torch.Tensor, ...]:
        """The outputs of ``group``'s Linears on ``x``, in the group's order."""
        widths = self._fused_widths.get(group)
        if widths is None:
            return tuple(getattr(self, name)(x) for name in self.projection_groups()[group])
        weight = getattr(self, f"_fused_{group}_weight")
        bias = getattr(self, f"_fused_{group}_bias")
        outputs = F.linear(x, weight, bias).split(widths, dim=-1)
        if not lora_active():
            return outputs
        # Per-request LoRA terms (`row_lora`), each on its projection's slice: the packed GEMM calls no module.
        terms = [lora_term(x, linear.weight) for linear in self._linears(group)]
        if all(term is None for term in terms):
            return outputs
        return tuple(out if term is None else out + term for out, term in zip(outputs, terms, strict=True))

    def _linears(self, group: str) -> list[nn.Linear]:
        return [getattr(self, name) for name in self.projection_groups()[group]]

    def _fusable(self, linears: list[nn.Linear]) -> bool:
        first = linears[0].weight
        if first.device.type == "meta":
            return False
        return all(
            lin.weight.ndim == 2
            and lin.weight.shape[1] == first.shape[1]
            and lin.weight.dtype == first.dtype
            and lin.weight.device == first.device
            and (lin.bias is None) == (linears[0].bias is None)
            for lin in linears
        )

    def fuse_projections(self) -> int:
        """Pack every fusable group (idempotent; re-packs groups already packed). Returns the count."""
        self.unfuse_projections()
        fused = 0
        for group in self.projection_groups():
            linears = self._linears(group)
            if len(linears) < 2 or not self._fusable(linears):
                continue
            with torch.no_grad():
                weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
                has_bias = linears[0].bias is not None
                bias = torch.cat([lin.bias.detach() for lin in linears], dim=0) if has_bias else None
            start = 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight = nn.Parameter(weight[start : start + n], requires_grad=lin.weight.requires_grad)
                if bias is not None:
                    lin.bias = nn.Parameter(bias[start : start + n], requires_grad=lin.bias.requires_grad)
                start += n
            self.register_buffer(f"_fused_{group}_weight", weight, persistent=False)
            self.register_buffer(f"_fused_{group}_bias", bias, persistent=False)
            self._fused_widths[group] = tuple(lin.weight.shape[0] for lin in linears)
            fused += 1
        return fused

    def unfuse_projections(self) -> None:
        """Give every Linear of the packed groups its own tensors again and drop the packed buffers."""
        for group in list(self._fused_widths):
            for lin in self._linears(group):
                lin.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=lin.weight.requires_grad)
                if lin.bias is not None:
                    lin.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=lin.bias.requires_grad)
            delattr(self, f"_fused_{group}_weight")
            delattr(self, f"_fused_{group}_bias")
            del self._fused_widths[group]

    def _still_aliased(self, group: str) -> bool:
        weight = getattr(self, f"_fused_{group}_weight")
        bias = getattr(self, f"_fused_{group}_bias")
        start = 0
        for lin in self._linears(group):
            n = lin.weight.shape[0]
            if not _is_view_at(lin.weight, weight, start * weight.shape[1]):
                return False
            if bias is not None and (lin.bias is None or not _is_view_at(lin.bias, bias, start)):
                return False
            start += n
        return start == weight.shape[0]

    @staticmethod
    def _refuse_after_load(module: nn.Module, incompatible_keys: object) -> None:
        # load_state_dict(assign=True) replaces the parameters; copying loads keep the aliasing.
        assert isinstance(module, ProjectionFusion)
        if module._fused_widths and not all(module._still_aliased(g) for g in module._fused_widths):
            module.fuse_projections()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> ProjectionFusion:
        # .to()/.half()/... convert parameters and buffers one by one, which would leave the packed
        # buffer and the Linears' views as separate tensors: unpack first, convert, pack again.
        was_fused = bool(self._fused_widths)
        if was_fused:
            self.unfuse_projections()
        result = super()._apply(fn, recurse)
        if was_fused:
            self.fuse_projections()
        return result


def fuse_model_projections(model: nn.Module) -> int:
    """:meth:`ProjectionFusion.fuse_projections` on every such submodule; returns the groups packed."""
    return sum(m.fuse_projections() for m in model.modules() if isinstance(m, ProjectionFusion))


def unfuse_model_projections(model: nn.Module) -> None:
    """Undo :func:`fuse_model_projections`."""
    for m in model.modules():
        if isinstance(m, ProjectionFusion):
            m.unfuse_projections()


class GeluTanhFeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear, keyed ``net.0.proj`` and ``net.2`` like diffusers' ``FeedForward``
    (FLUX.1 and Qwen-Image checkpoints).

    On CUDA the GELU runs in the first GEMM's epilogue (:func:`linear_gelu_tanh`).
    """

    class _ProjGelu(nn.Module):
        def __init__(self, dim_in: int, dim_out: int) -> None:
            super().__init__()
            self.proj = nn.Linear(dim_in, dim_out)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return linear_gelu_tanh(x, self.proj.weight, self.proj.bias)

    def __init__(self, dim: int, mult: float = 4) -> None:
        super().__init__()
        inner = int(dim * mult)  # diffusers' rule (HunyuanVideo's config gives mlp_ratio as a float)
        # Index 1 is a (parameter-free) dropout slot in the reference; an Identity keeps the output
        # Linear at index 2 so its checkpoint key is ``net.2``.
        self.net = nn.ModuleList([self._ProjGelu(dim, inner), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))
