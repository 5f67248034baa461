"""Triton body of sparse prefill attention (its contract in kernels/sparse_reference.py;
the decode-side sparse ops in kernels/triton_sparse.py).

``sparse_prefill_attention``: ``triton_prefill``'s causal kernel, same tiles and inner loop,
over four key ranges per query tile: the kept tiles wholly behind every row's window, read from
a per-(sequence, head) ascending list of kept tile ids (a prefix count gives how many lie there;
unmasked, so the loop pipelines as the dense one does; with a key tile wider than the column
block, the partly kept tiles from a second list under a column mask), the window's lower edge (masked:
causal ∩ (window ∪ kept)), the keys every row sees (the dense kernel's own unmasked loop) and
the causal diagonal (masked). Skipped tiles cost nothing; a streaming head (sink columns kept,
a local window) runs O(sink + window) tiles a query tile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kvrelay.kernels import sparse_reference as ref
from kvrelay.kernels.triton_decode import LOG2E
from kvrelay.kernels.triton_prefill import VARYING as PREFILL_VARYING
from kvrelay.kernels.triton_prefill import _attend
from kvrelay.kernels.triton_prefill import prefill_tiles as dense_prefill_tiles


@triton.jit
def _sparse_tiles(
    acc, l_i, m_i, q, q_pos, kv_base, bt_row, keep_row, list_row, lo, hi, kv_end, window,
    scale_log2, stride_blk, stride_kv, stride_tok,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    COL_BLOCK: tl.constexpr, MODE: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query tile over key tiles of BLOCK_N keys. MODE 0: the
    tiles named by ``list_row[lo:hi]``, kept whole and behind every row's window: every row sees
    every key, no mask. MODE 1: listed tiles behind the window of which only some column blocks
    are kept (BLOCK_N > COL_BLOCK): every row sees the kept columns. MODE 2: tiles ``lo..hi-1``
    by index under the mask causal ∩ (window ∪ kept columns), where a row may see none."""
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for i in range(lo, hi):
        if MODE == 2:
            j = i
        else:
            j = tl.load(list_row + i)
        tok = j * BLOCK_N + offs_n
        valid = tok < kv_end
        blk = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
        row = kv_base + blk * stride_blk + (tok % PAGE) * stride_tok
        k = tl.load(
            row[None, :] + offs_d[:, None], mask=valid[None, :] & d_mask[:, None], other=0.0
        )  # [D_PAD, BLOCK_N]
        v = tl.load(
            row[:, None] + stride_kv + offs_d[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, D_PAD]
        if FP32_DOT:
            scores = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            scores = tl.dot(q, k.to(q.dtype))
        scores = scores * scale_log2
        if MODE == 0:
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = m_new
        elif MODE == 1:
            kept = tl.load(keep_row + tok // COL_BLOCK, mask=valid, other=0) != 0
            scores = tl.where(kept[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = m_new
        else:
            kept = tl.load(keep_row + tok // COL_BLOCK, mask=valid, other=0) != 0
            dist = q_pos[:, None] - tok[None, :]
            ok = (dist >= 0) & (kept[None, :] | (dist < window))
            scores = tl.where(ok, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row sees none yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


# as the dense prefill kernel's (triton_prefill.VARYING); ``nkb`` and ``nt``, which grow with
# the context and index the keep and tile lists, still specialize (a new class is one compile)
@triton.jit(do_not_specialize=PREFILL_VARYING)
def _sparse_prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, qsl_ptr, ctx_ptr, keep_ptr, list_ptr, cum_ptr, win_ptr, out_ptr,
    count_ptr, scale_log2, layer_off, num_seqs, num_tiles, heads, nkb, nt,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COL_BLOCK: tl.constexpr,
    FP32_DOT: tl.constexpr, PARTIAL: tl.constexpr, COUNT: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    tile = num_tiles - 1 - tl.program_id(1)
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_M + mid
        lo = tl.where(first <= tile, mid, lo)
        hi = tl.where(first <= tile, hi, mid - 1)
    seq = lo
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    n = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    row0 = (tile - (q_start // BLOCK_M + seq)) * BLOCK_M
    if row0 < n:
        ctx = tl.load(ctx_ptr + seq).to(tl.int32)
        prefix = ctx - n
        window = tl.load(win_ptr + seq * heads + h).to(tl.int32)
        head_row = (seq * heads + h).to(tl.int64)
        keep_row = keep_ptr + head_row * nkb
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        m_mask = offs_m < n
        d_mask = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if FP32_DOT:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m
        kv_base = kv_ptr + layer_off + (h // GROUP) * stride_head
        bt_row = bt_ptr + seq * stride_btb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        kv_end = prefix + tl.minimum(row0 + BLOCK_M, n)  # one past the tile's last row
        # key tiles by what the tile's rows see of them: [0, t_a) behind every row's window
        # (only kept ones run, from the lists: wholly kept unmasked, partly kept (BLOCK_N >
        # COL_BLOCK) under a column mask), [t_a, t_b) the window's lower edge
        # (masked), [t_b, t_c) seen whole by every row (the dense kernel's unmasked loop),
        # [t_c, t_end) the causal diagonal (masked)
        t_c = (prefix + row0) // BLOCK_N
        t_end = (kv_end + BLOCK_N - 1) // BLOCK_N
        near_hi = tl.maximum(kv_end - window, 0)  # the first key the last row sees by window
        t_b = tl.minimum((near_hi + BLOCK_N - 1) // BLOCK_N, t_c)
        near_lo = tl.maximum(prefix + row0 - window + 1, 0)  # ... the first row
        t_a = tl.minimum(near_lo // BLOCK_N, t_b)
        n_far = tl.load(cum_ptr + head_row * (nt + 1) + t_a)  # wholly kept tiles below t_a
        acc, l_i, m_i = _sparse_tiles(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, keep_row, list_ptr + head_row * nt,
            0, n_far, kv_end, window, scale_log2, stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, COL_BLOCK, 0, FP32_DOT,
        )  # fmt: skip
        n_part = n_far * 0
        if PARTIAL:  # the second plane of the lists: partly kept tiles
            rows = head_row * 0 + num_seqs * heads  # int64: sequences × heads, one plane
            n_part = tl.load(cum_ptr + (rows + head_row) * (nt + 1) + t_a)
            acc, l_i, m_i = _sparse_tiles(
                acc, l_i, m_i, q, q_pos, kv_base, bt_row, keep_row,
                list_ptr + (rows + head_row) * nt, 0, n_part, kv_end, window, scale_log2,
                stride_blk, stride_kv, stride_tok,
                HEAD_DIM, D_PAD, PAGE, BLOCK_N, COL_BLOCK, 1, FP32_DOT,
            )  # fmt: skip
        acc, l_i, m_i = _sparse_tiles(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, keep_row, list_ptr,
            t_a, t_b, kv_end, window, scale_log2, stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, COL_BLOCK, 2, FP32_DOT,
        )  # fmt: skip
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, t_b * BLOCK_N, t_c * BLOCK_N, kv_end,
            scale_log2, stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, False, FP32_DOT,
        )  # fmt: skip
        acc, l_i, m_i = _sparse_tiles(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, keep_row, list_ptr,
            t_c, t_end, kv_end, window, scale_log2, stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, COL_BLOCK, 2, FP32_DOT,
        )  # fmt: skip
        if COUNT:  # tiles run per range: listed whole, listed partly, edge, whole, diagonal
            tl.atomic_add(count_ptr + 0, n_far)
            tl.atomic_add(count_ptr + 1, n_part)
            tl.atomic_add(count_ptr + 2, t_b - t_a)
            tl.atomic_add(count_ptr + 3, t_c - t_b)
            tl.atomic_add(count_ptr + 4, t_end - t_c)
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_tiles(dim: int, dtype: torch.dtype, on_cuda: bool, col_block: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the sparse prefill: the dense kernel's (triton_prefill); a key tile
    spans whole column blocks or lies in one."""
    block_m, block_n = dense_prefill_tiles(dim, dtype, on_cuda)
    if max(col_block, block_n) % min(col_block, block_n):
        raise ValueError(f"col_block {col_block} and the key tile {block_n} must nest")
    return block_m, block_n


def sparse_prefill_attention(
    query: torch.Tensor,  # [T, H, D] packed
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: torch.Tensor,  # [B + 1]
    context_lens: torch.Tensor,  # [B]
    scale: float,
    keep: torch.Tensor,  # [B, H, NKB] bool
    window: torch.Tensor,  # [B, H] int
    col_block: int,
    tile_counts: torch.Tensor | None = None,  # [5] int32: += tiles run per range (benchmarks)
) -> torch.Tensor:  # [T, H, D]
    tokens, heads, dim = query.shape
    batch = context_lens.shape[0]
    page, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    out = torch.empty_like(query)
    if tokens == 0 or batch == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(dim))
    fp32_dot = query.dtype == torch.float32 or not query.is_cuda
    block_m, block_n = prefill_tiles(dim, query.dtype, query.is_cuda, col_block)
    num_tiles = tokens // block_m + batch
    keep8 = keep.to(torch.int8).contiguous()
    # the wholly and the partly kept key tiles of each (sequence, head), ascending, and how many
    # lie below each tile
    some, whole = ref.kept_tiles(keep8, col_block, block_n)  # [B, H, NT]
    partial = block_n > col_block
    kept = torch.stack([whole, some & ~whole]) if partial else whole[None]  # [1 or 2, B, H, NT]
    nt = kept.shape[3]
    ids = torch.arange(nt, device=keep.device, dtype=torch.int32)
    tile_list = torch.where(kept, ids, nt).sort(-1).values.contiguous()
    cum = F.pad(kept.cumsum(-1, dtype=torch.int32), (1, 0)).contiguous()  # [.., NT + 1]
    win = window.to(torch.int32).contiguous()
    st = kv_cache.stride()
    _sparse_prefill_kernel[(heads, num_tiles)](
        query, kv_cache, block_tables, query_start_loc, context_lens, keep8, tile_list, cum, win,
        out, keep8 if tile_counts is None else tile_counts,
        scale * LOG2E, layer * st[1], batch, num_tiles, heads, keep8.shape[2], nt,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        st[0], st[2], st[3], st[4], block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=dim, D_PAD=d_pad, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, COL_BLOCK=col_block, FP32_DOT=fp32_dot,
        PARTIAL=partial, COUNT=tile_counts is not None, num_warps=8 if block_m >= 128 else 4,
        num_stages=3 if d_pad <= 64 else 2,
    )  # fmt: skip
    return out
