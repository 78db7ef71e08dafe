"""Block-sparse attention: each block of 64 queries attends only to the key blocks a map selects.

The sparse video attentions (sliding tile attention, video sparse attention's fine branch) are this one
operation over tokens laid out by tiles (``sgl_diffusion.layers.video_tiles``): the sequence is cut into
blocks of :data:`BLOCK` tokens, block ``j`` holds ``block_sizes[j]`` real tokens first and padding after
them, and a boolean map ``(B, H, num_blocks, num_blocks)`` says which key blocks each query block reads.

Semantics (what :func:`block_sparse_attention_reference` computes and the kernel is tested against): for a
query ``i`` in block ``bq``, softmax attention with scale ``1/sqrt(head_dim)`` over the keys ``j`` such
that ``block_map[b, h, bq, j // BLOCK]`` and ``j % BLOCK < block_sizes[j // BLOCK]``; a query whose map
row selects no real key gets zeros (only padding queries may be in that case: their rows are thrown away).

Layout: ``q``, ``k``, ``v`` are ``(B, S, H, D)`` (the attention seam's layout, any strides with a
contiguous last dim), ``S = num_blocks * BLOCK``; the output is ``(B, S, H, D)`` contiguous in ``q``'s
dtype. The kernel is the forward of FlashAttention-2 restricted to the listed key blocks: an online
softmax in float32, ``p`` rounded to the value dtype before the ``p @ v`` product (as every flash kernel
does), one program per (query block, batch * head). The map is given to the kernel as per-row lists of
key block indices (:func:`block_map_to_index`), made once per map and reusable across calls.
"""

from __future__ import annotations

import math

import torch

from ._triton import check_launchable, jit, next_power_of_2, on_device, tl

__all__ = [
    "BLOCK",
    "block_map_to_index",
    "block_sparse_attention",
    "block_sparse_attention_reference",
]

#: Tokens per block (queries and keys alike): VSA's 4x4x4 tile, and a sixth of STA's 6x8x8 tile.
BLOCK = 64


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_sizes: torch.Tensor) -> int:
    if q.ndim != 4 or q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, S, H, D) with equal B, S, H (self-attention over one layout), got "
            f"q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if q.shape[1] % BLOCK:
        raise ValueError(f"the sequence ({q.shape[1]}) must be a multiple of the block ({BLOCK}): pad it by tiles")
    num_blocks = q.shape[1] // BLOCK
    if block_sizes.shape != (num_blocks,):
        raise ValueError(f"block_sizes must be ({num_blocks},) for {q.shape[1]} tokens, got {tuple(block_sizes.shape)}")
    return num_blocks


def _check_map(block_map: torch.Tensor, q: torch.Tensor, num_blocks: int) -> None:
    batch, _, heads, _ = q.shape
    if (
        block_map.ndim != 4
        or block_map.shape[0] not in (1, batch)
        or block_map.shape[1] not in (1, heads)
        or block_map.shape[2:] != (num_blocks, num_blocks)
    ):
        raise ValueError(
            f"block_map must be (B|1, H|1, {num_blocks}, {num_blocks}) for q{tuple(q.shape)}, "
            f"got {tuple(block_map.shape)}"
        )


#: Score elements the reference holds at once (float32): queries are taken in chunks of blocks that fit.
REFERENCE_CHUNK_ELEMENTS = 1 << 27


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_map: torch.Tensor,
    block_sizes: torch.Tensor,
) -> torch.Tensor:
    """The semantics in torch (see the module docstring), evaluated in float32 and rounded once to
    ``q.dtype``. ``block_map`` is boolean ``(B|1, H|1, num_blocks, num_blocks)``. Dense over the keys: each
    chunk of query blocks holds its full ``rows x S`` score matrix (at most :data:`REFERENCE_CHUNK_ELEMENTS`)."""
    num_blocks = _check_inputs(q, k, v, block_sizes)
    _check_map(block_map, q, num_blocks)
    batch, seq, heads, _ = q.shape
    key_real = torch.arange(BLOCK, device=q.device).repeat(num_blocks) < block_sizes.to(q.device).repeat_interleave(
        BLOCK
    )
    block_map = block_map.to(q.device, torch.bool)
    kf, vf = k.float(), v.float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    chunk = max(1, REFERENCE_CHUNK_ELEMENTS // (batch * heads * seq * BLOCK))
    out = torch.empty((batch, seq, heads, v.shape[-1]), device=q.device, dtype=q.dtype)
    for first in range(0, num_blocks, chunk):
        last = min(first + chunk, num_blocks)
        rows = slice(first * BLOCK, last * BLOCK)
        allowed = block_map[:, :, first:last].repeat_interleave(BLOCK, dim=2).repeat_interleave(BLOCK, dim=3)
        allowed = allowed & key_real.view(1, 1, 1, seq)
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, rows].float(), kf) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        # A row with no allowed key is all -inf: softmax gives NaN there; such rows are padding, made zero.
        probs = torch.nan_to_num(probs, nan=0.0)
        out[:, rows] = torch.einsum("bhqk,bkhd->bqhd", probs, vf).to(q.dtype)
    return out


def block_map_to_index(block_map: torch.Tensor, block_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the key blocks to read: ``(index, count)`` for :func:`block_sparse_attention`.

    ``index`` is ``(B|1, H|1, num_blocks, width)`` int32 with the selected key blocks first (ascending),
    ``count`` ``(B|1, H|1, num_blocks)`` int32 how many of them there are. Key blocks without a real token
    are dropped (the kernel would otherwise take a softmax over nothing). Pure torch, device ops only.
    """
    if block_map.ndim != 4:
        raise ValueError(f"block_map must be 4-d (B|1, H|1, Nq, Nk), got {tuple(block_map.shape)}")
    keep = block_map.to(torch.bool) & (block_sizes.to(block_map.device) > 0).view(1, 1, 1, -1)
    count = keep.sum(-1, dtype=torch.int32)
    width = max(int(count.max().item()) if count.numel() else 0, 1)
    # Selected blocks first, each group in ascending block order (a stable sort on "not selected").
    index = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    return index.to(torch.int32).contiguous(), count.contiguous()


@jit
def _block_sparse_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    index_ptr,
    count_ptr,
    sizes_ptr,
    heads,
    scale_log2,
    q_sb,
    q_ss,
    q_sh,
    k_sb,
    k_ss,
    k_sh,
    v_sb,
    v_ss,
    v_sh,
    o_sb,
    o_ss,
    o_sh,
    i_sb,
    i_sh,
    i_sq,
    c_sb,
    c_sh,
    c_sq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < HEAD_DIM
    q_rows = q_block.to(tl.int64) * BLOCK_N + rows
    q = tl.load(q_ptr + b * q_sb + h * q_sh + q_rows[:, None] * q_ss + cols[None, :], mask=col_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_blocks = tl.load(count_ptr + b * c_sb + h * c_sh + q_block * c_sq)
    index_base = index_ptr + b * i_sb + h * i_sh + q_block * i_sq
    for i in range(n_blocks):
        kv_block = tl.load(index_base + i).to(tl.int64)
        size = tl.load(sizes_ptr + kv_block)
        kv_rows = kv_block * BLOCK_N + rows
        k = tl.load(
            k_ptr + b * k_sb + h * k_sh + kv_rows[:, None] * k_ss + cols[None, :], mask=col_ok[None, :], other=0.0
        )
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(rows[None, :] < size, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + b * v_sb + h * v_sh + kv_rows[:, None] * v_ss + cols[None, :], mask=col_ok[None, :], other=0.0
        )
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    # A query block with no key block (only padding queries) writes zeros instead of 0/0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        out_ptr + b * o_sb + h * o_sh + q_rows[:, None] * o_ss + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=col_ok[None, :],
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    count: torch.Tensor,
    block_sizes: torch.Tensor,
) -> torch.Tensor:
    """The Triton kernel (see the module docstring); ``index``/``count`` from :func:`block_map_to_index`.

    fp16/bf16 inputs use the tensor cores; float32 inputs are multiplied in full float32 (``ieee``), so
    the float32 kernel matches the reference to float32 rounding.
    """
    check_launchable(_block_sparse_fwd_kernel, q, k, v, index, count, block_sizes)
    num_blocks = _check_inputs(q, k, v, block_sizes)
    batch, _, heads, head_dim = q.shape
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need a contiguous head_dim (last dim)")
    if index.ndim != 4 or count.shape != index.shape[:3] or index.shape[2] != num_blocks:
        raise ValueError(
            f"index/count must come from block_map_to_index, got {tuple(index.shape)} / {tuple(count.shape)}"
        )
    if index.dtype != torch.int32 or count.dtype != torch.int32:
        raise ValueError("index and count must be int32 (block_map_to_index makes them)")
    index = index.contiguous()
    count = count.contiguous()
    sizes = block_sizes.to(device=q.device, dtype=torch.int32).contiguous()
    out = torch.empty((batch, q.shape[1], heads, v.shape[-1]), device=q.device, dtype=q.dtype)

    def stride(t: torch.Tensor, dim: int) -> int:
        # Broadcast dims (size 1 in a map shared by the batch or the heads) are read with stride 0.
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    block_d = max(16, next_power_of_2(head_dim))
    with on_device(q):
        _block_sparse_fwd_kernel[(num_blocks, batch * heads)](
            q,
            k,
            v,
            out,
            index,
            count,
            sizes,
            heads,
            (1.0 / math.sqrt(head_dim)) * math.log2(math.e),
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            stride(index, 0),
            stride(index, 1),
            index.stride(2),
            stride(count, 0),
            stride(count, 1),
            count.stride(2),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_N=BLOCK,
            IEEE=q.dtype == torch.float32,
            num_warps=4,
            num_stages=2 if q.device.type == "cuda" else 1,
        )
    return out
