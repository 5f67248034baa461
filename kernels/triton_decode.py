"""Triton body of ``paged_decode_attention`` (flash-decoding over the block-major paged cache).

One program owns (sequence b, KV head g, split s): it loads the ``group = H / Hkv`` query heads
that share KV head g as one ``[GROUP_PAD, D]`` tile, so every K/V byte is read once per step
whatever the GQA ratio, and streams the split's tokens in ``BLOCK_N`` tiles with an online
softmax in fp32. A token's address comes from the block table::

    kv_cache[block_tables[b, t // bs], layer, 0|1, t % bs, g, :]    # one contiguous D-row

so any power-of-two page size works and a tile may span several pages.

Split-K: when ``B * Hkv`` programs would leave the GPU idle (small batch, long context), the
context is cut into ``num_splits`` partitions, each program writes its normalised partial output
and log-sum-exp, and ``_decode_reduce_kernel`` merges them. Grid sizes come from tensor shapes
(``block_tables.shape[1]``) only, never from values, so the launch needs no host sync and can be
captured in a CUDA graph; partitions past a sequence's length exit at once.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


class DecodeTuning(NamedTuple):
    """Launch parameters; the defaults keep ~60-80 registers a thread at head_dim 64-128."""

    block_n: int = 64  # tokens per inner tile; a partition is a multiple of it
    num_warps: int = 4
    num_stages: int = 2


# Triton compiles a kernel again for each new class (a multiple of 16 or not; in some versions
# also 1) of an integer argument it specializes on, for each constexpr value, each pointer's
# element type and each pointer's 16-byte alignment. The arguments below change with the batch
# and its contexts: a serving step that gives one of them a new class compiles in the middle of
# serving (hundreds of ms; workers/engine/kernel_compiles.py counts them). The split count and
# the block table's row stride (a gather of block ids, which no alignment helps) are not
# specialized, whether the batch splits is a runtime branch (not a constexpr), the partials'
# placeholders are fp32 like the partials and the merge's split tile is fixed (S_PAD =
# MAX_SPLITS): one binary serves every batch. ``part_len`` keeps its specialization: always a
# multiple of BLOCK_N, it never changes class, and the compiler may use the partitions' aligned
# starts.
VARYING = ["num_splits", "stride_btb"]


@triton.jit(do_not_specialize=VARYING)
def _decode_kernel(
    q_ptr, kv_ptr, bt_ptr, ctx_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2, layer_off, part_len, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b).to(tl.int32)
    lo = s * part_len
    hi = tl.minimum(lo + part_len, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [GROUP_PAD, D_PAD]
    if FP32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    kv_base = kv_ptr + layer_off + kvh * stride_head
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
        valid = tok < hi
        blk = tl.load(bt_ptr + b * stride_btb + tok // PAGE, mask=valid, other=0).to(tl.int64)
        row = kv_base + blk * stride_blk + (tok % PAGE) * stride_tok  # [BLOCK_N] pointers
        k = tl.load(
            row[None, :] + offs_d[:, None], mask=valid[None, :] & d_mask[:, None], other=0.0
        )
        v = tl.load(
            row[:, None] + stride_kv + offs_d[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # k: [D_PAD, BLOCK_N], v: [BLOCK_N, D_PAD]
        if FP32_DOT:
            scores = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, k.to(q.dtype))
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # An empty partition (or context 0) has l_i == 0: write zeros and lse -inf, never NaN.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if num_splits > 1:  # a runtime branch: one binary whether the batch splits or not
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        row_id = (b * GROUP * tl.num_programs(1) + heads) * num_splits + s  # [B, H, S] flat
        tl.store(part_lse_ptr + row_id, lse, mask=g_mask)
        tl.store(part_o_ptr + row_id[:, None] * D_PAD + offs_d[None, :], out, mask=o_mask)
    else:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit(do_not_specialize=["num_splits"])  # as VARYING above
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    row_id = (b * tl.num_programs(1) + h) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row_id, mask=s_mask, other=float("-inf"))
    d_mask = offs_d < HEAD_DIM
    o = tl.load(
        part_o_ptr + row_id[:, None] * D_PAD + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [S_PAD, D_PAD]; the D padding was never written
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all partitions empty: weights 0, output 0
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """The device's SMs, for split decisions (the split-K decode here, the GEMV's tiles)."""
    if device.type != "cuda":
        return 4  # interpreter runs: a few programs per split decision is all that matters
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_splits(
    batch: int, kv_heads: int, max_tokens: int, sms: int, block_n: int = 64
) -> tuple[int, int]:
    """(num_splits, tokens per split) from shapes only.

    A program's tile loop is a chain of dependent loads (block table, then K/V), so bandwidth
    needs many programs in flight: ~8 per SM fit at ~60 registers a thread. No split once
    ``B * Hkv`` alone fills 4 per SM (H100, 1B shape, 1k context, batch 128: 89% of copy
    bandwidth unsplit, 77-83% split); below that, split until ~8 per SM or one tile per
    program (batch 8: 0.20 of bandwidth unsplit, 0.46 with 8 splits, 0.45 with 16).
    """
    tiles = max(1, math.ceil(max_tokens / block_n))
    programs = max(1, batch * kv_heads)
    splits = 1 if programs >= 4 * sms else min(tiles, MAX_SPLITS, math.ceil(8 * sms / programs))
    if splits <= 1:
        return 1, tiles * block_n
    part_len = math.ceil(tiles / splits) * block_n
    return math.ceil(tiles * block_n / part_len), part_len


@functools.lru_cache(maxsize=8)
def _placeholder(device: torch.device) -> torch.Tensor:
    """One fp32 element per device, never written (the kernels store partials only when they
    split): no allocation per layer call on the unsplit path."""
    return torch.empty(1, device=device, dtype=torch.float32)


def partials(
    batch: int, heads: int, splits: int, d_pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partitions' fp32 outputs and log-sum-exps; one-element fp32 placeholders
    when the batch does not split, so that the kernel's pointer arguments keep their dtype
    (another dtype would be another compile) whether it splits or not."""
    if splits <= 1:
        dummy = _placeholder(device)
        return dummy, dummy
    part_o = torch.empty(batch, heads, splits, d_pad, device=device, dtype=torch.float32)
    return part_o, torch.empty(batch, heads, splits, device=device, dtype=torch.float32)


def check_decode_args(
    query: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:  # fmt: skip
    """Shape checks only (no values read: that would sync the host)."""
    if query.dim() != 3 or kv_cache.dim() != 6:
        raise ValueError(
            f"query must be [B,H,D], kv_cache 6-d; got {query.shape}, {kv_cache.shape}"
        )
    batch, heads, dim = query.shape
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range [0, {kv_cache.shape[1]})")
    if kv_cache.shape[5] != dim or heads % kv_cache.shape[4] != 0:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        raise ValueError("block_tables must be [B, max_blocks] and context_lens [B]")
    if block_tables.is_floating_point() or context_lens.is_floating_point():
        raise TypeError("block_tables and context_lens must be integer tensors")


def paged_decode_attention_split(
    query: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks]
    context_lens: torch.Tensor,  # [B]
    scale: float,
    num_splits: int | None = None,  # None: choose from shapes; tests force 1 or many
    tuning: DecodeTuning = DecodeTuning(),  # benchmarks sweep it
) -> torch.Tensor:  # [B, H, D]
    check_decode_args(query, kv_cache, layer, block_tables, context_lens)
    batch, heads, dim = query.shape
    page, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    group = heads // kv_heads
    out = torch.empty_like(query)
    if batch == 0:
        return out
    if query.stride(2) != 1 or kv_cache.stride(5) != 1:
        raise ValueError("query and kv_cache need a contiguous head_dim")
    max_tokens = block_tables.shape[1] * page
    if num_splits is None:
        sms = sm_count(query.device)
        splits, part_len = choose_splits(batch, kv_heads, max_tokens, sms, tuning.block_n)
    else:
        tiles = max(1, math.ceil(max_tokens / tuning.block_n))
        part_len = math.ceil(tiles / max(1, min(num_splits, MAX_SPLITS))) * tuning.block_n
        splits = math.ceil(tiles * tuning.block_n / part_len)
    d_pad = max(16, triton.next_power_of_2(dim))
    part_o, part_lse = partials(batch, heads, splits, d_pad, query.device)
    st = kv_cache.stride()
    _decode_kernel[(batch, kv_heads, splits)](
        query, kv_cache, block_tables, context_lens, out, part_o, part_lse,
        scale * LOG2E, layer * st[1], part_len, splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        st[0], st[2], st[3], st[4], block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, D_PAD=d_pad,
        PAGE=page, BLOCK_N=tuning.block_n,
        # The interpreter multiplies bf16 tl.dot operands wrongly (triton 3.9): upcast on CPU.
        FP32_DOT=query.dtype == torch.float32 or not query.is_cuda,
        num_warps=tuning.num_warps, num_stages=tuning.num_stages,
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(batch, heads)](
            part_o, part_lse, out, splits, out.stride(0), out.stride(1),
            HEAD_DIM=dim, D_PAD=d_pad, S_PAD=MAX_SPLITS,
            num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as ``reference.paged_decode_attention``; context 0 yields zeros."""
    return paged_decode_attention_split(query, kv_cache, layer, block_tables, context_lens, scale)
