"""Triton body of ``sampled_column_mass`` (contract in kernels/sparse_reference.py): SampleAttention's
sampled rows' causal softmax, summed per key tile, without the [H, rows, ctx] score matrix.

One program owns (query head h, tile of ``BLOCK_M`` sampled rows); heads are the fast grid axis so
a KV head's ``group`` query heads read its keys side by side (L2), and tiles run last-first (the
longest causal rows). Sampled row i is new row ``first + i·stride`` (``first = (n-1) % stride``:
the last row is sampled), at position ``ctx - n + first + i·stride``. Two passes over the keys the
tile's last row sees, recomputing the scores (``triton_prefill``'s online softmax, log2 units):

    pass 1   m_r, l_r = running max and sum of exp2(s_rk - m_r) over keys k <= pos_r
    pass 2   part[h, tile, k // BLOCK_N] = Σ_r Σ_k∈tile exp2(s_rk - m_r) / l_r

The partials ([H, row tiles, key tiles] fp32, zeros where a tile's rows see no key) are summed over
row tiles and grouped into column blocks on the host side of the launch (plain torch ops; no sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvrelay.kernels.triton_decode import LOG2E


@triton.jit
def _scores(
    q, k_base, start, kv_end, q_pos, scale_log2, stride_kt,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """Causal scores (log2 units) of the tile's rows against keys [start, start + BLOCK_N)."""
    offs_d = tl.arange(0, D_PAD)
    tok = start + tl.arange(0, BLOCK_N)
    k = tl.load(
        k_base + tok[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
        mask=(tok < kv_end)[None, :] & (offs_d < HEAD_DIM)[:, None],
        other=0.0,
    )  # [D_PAD, BLOCK_N]
    if FP32_DOT:
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k.to(q.dtype))
    return tl.where(tok[None, :] <= q_pos[:, None], s * scale_log2, float("-inf"))


@triton.jit
def _column_mass_kernel(
    q_ptr, k_ptr, part_ptr, scale_log2, n, ctx, rows, first, sample_stride, num_ktiles,
    stride_qt, stride_qh, stride_kt, stride_kh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)
    offs_i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    i_mask = offs_i < rows
    r = first + offs_i * sample_stride  # new rows; past the last sampled row they are masked
    q = tl.load(
        q_ptr + r[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
        mask=i_mask[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )  # [BLOCK_M, D_PAD]
    if FP32_DOT:
        q = q.to(tl.float32)
    # unmasked rows past `rows` sit at positions >= ctx: they see every key, so stay finite
    q_pos = ctx - n + r
    last = tl.minimum(tile * BLOCK_M + BLOCK_M, rows) - 1
    kv_end = ctx - n + first + last * sample_stride + 1  # one past the tile's last row
    k_base = k_ptr + (h // GROUP) * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, kv_end, BLOCK_N):  # key 0 is in every row's first tile: m_i finite
        s = _scores(
            q, k_base, start, kv_end, q_pos, scale_log2, stride_kt,
            HEAD_DIM, D_PAD, BLOCK_N, FP32_DOT,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = tl.where(i_mask, 1.0 / l_i, 0.0)
    part_row = part_ptr + (h * tl.num_programs(1) + tile).to(tl.int64) * num_ktiles
    for start in range(0, kv_end, BLOCK_N):
        s = _scores(
            q, k_base, start, kv_end, q_pos, scale_log2, stride_kt,
            HEAD_DIM, D_PAD, BLOCK_N, FP32_DOT,
        )  # fmt: skip
        p = tl.exp2(s - m_i[:, None]) * inv_l[:, None]
        tl.store(part_row + start // BLOCK_N, tl.sum(tl.sum(p, 1), 0))


def sampled_column_mass(
    query: torch.Tensor,  # [n, H, D] new rows of one sequence (positions ctx-n .. ctx-1)
    keys: torch.Tensor,  # [ctx, Hkv, D] (any strides; head_dim contiguous)
    scale: float,
    col_block: int,
    stride: int,
) -> torch.Tensor:  # [H, NKB] float32
    n, heads, dim = query.shape
    ctx, kv_heads = keys.shape[0], keys.shape[1]
    nkb = -(-ctx // col_block)
    if n == 0:
        return torch.zeros(heads, nkb, device=query.device, dtype=torch.float32)
    if query.stride(2) != 1 or keys.stride(2) != 1:
        raise ValueError("query and keys need a contiguous head_dim")
    d_pad = max(16, triton.next_power_of_2(dim))
    fp32_dot = query.dtype == torch.float32 or not query.is_cuda  # see triton_decode
    block_m = 64 if query.is_cuda else 16  # the interpreter: small tiles
    block_n = min(col_block, 64 if query.is_cuda else 16)
    if col_block % block_n:
        raise ValueError(f"col_block {col_block} must be a multiple of {block_n}")
    rows = (n - 1) // stride + 1
    row_tiles = triton.cdiv(rows, block_m)
    num_ktiles = triton.cdiv(ctx, block_n)
    part = torch.zeros(heads, row_tiles, num_ktiles, device=query.device, dtype=torch.float32)
    _column_mass_kernel[(heads, row_tiles)](
        query, keys, part, scale * LOG2E, n, ctx, rows, (n - 1) % stride, stride, num_ktiles,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=dim, D_PAD=d_pad,
        BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=fp32_dot, num_warps=4, num_stages=2,
    )  # fmt: skip
    per_tile = part.sum(1)  # [H, num_ktiles]
    per_block = col_block // block_n
    per_tile = F.pad(per_tile, (0, nkb * per_block - num_ktiles))
    return per_tile.view(heads, nkb, per_block).sum(-1)
