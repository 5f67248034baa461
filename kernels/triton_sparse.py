"""Triton bodies of the sparse-attention ops for decode (contracts and layouts in
kernels/sparse_reference.py; the block selection, ``topk_blocks``, is in kernels/triton_topk.py;
sparse prefill in kernels/triton_sparse_prefill.py).

- ``block_scores``: one program per (sequence, KV head, chunk of BLOCK_B logical blocks, 64
  (block, sub-page) columns: 16 blocks of 4 sub-pages, 4 of 16 keys) loads the group's queries
  and every sub-page of its blocks in one [D, 64] load per plane (all its bytes in flight at
  once; programs of 64 blocks looping over the sub-pages read the bounds at ~1.5 TB/s on an
  H100, by the bench's eager timing), and computes ``q⁺·kmax + q⁻·kmin`` as two ``tl.dot`` (one
  ``q·k`` over keys seen as bounds); the max over sub-pages and the group is stored. Given
  ``ids`` (the shortlist's logical blocks) it reads the blocks through the block table (no
  gathered copy of it). 16-bit operands run on tensor cores with fp32 accumulation (exact
  products), fp32 ones as ieee dots; a streaming head's program only stores -inf.
- ``sparse_decode_attention``: ``triton_decode``'s flash-decoding kernel with one block table and
  one length per (sequence, KV head) — the compacted selection — instead of one per sequence, so
  a program reads only its head's selected blocks. Split-K and the reduce kernel are shared.
- ``update_bounds``: one program per (written slot, layer) folds the key into its sub-page's
  max and min (the torch reference is ~18 ops, once per decode step); slot -1 (a padding row of
  a captured step) folds nothing.
- ``sparse_tables``: one program per (sequence, KV head) writes its compacted table in one
  launch (the torch reference is ~20 ops): sink, local, gap and short-context columns by
  position, and the dense picks, which come ascending (``topk_blocks`` writes its ids in row
  order), as one run after the sink: no rank, no loop (ranking them by [32, K] compares in a
  loop of dependent loads took 12–14 µs a call on an H100 at every size measured).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvrelay.kernels.triton_decode import (
    LOG2E,
    MAX_SPLITS,
    _decode_reduce_kernel,
    choose_splits,
    partials,
    sm_count,
)


@triton.jit
def _scores_kernel(
    q_ptr, bnd_ptr, bt_ptr, ids_ptr, stream_ptr, out_ptr, layer_off, mb,
    stride_qb, stride_qh, stride_blk, stride_mm, stride_sub, stride_head, stride_btb, stride_bth,
    stride_ib, stride_ih,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGES: tl.constexpr, P_PAD: tl.constexpr, BLOCK_B: tl.constexpr, EXACT: tl.constexpr,
    HAS_IDS: tl.constexpr, HAS_STREAM: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_j = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    out = out_ptr + (b * tl.num_programs(1) + kvh) * mb + offs_j
    streamed = 0
    if HAS_STREAM:
        streamed = tl.load(stream_ptr + kvh).to(tl.int32)
    if streamed != 0:  # a streaming head reads no middle blocks: nothing to rank
        tl.store(out, tl.full([BLOCK_B], float("-inf"), tl.float32), mask=offs_j < mb)
    else:
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D_PAD)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + b * stride_qb + (kvh * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [GROUP_PAD, D_PAD]
        if IEEE:
            q = q.to(tl.float32)
        # max(q, 0) and min(q, 0) are exact in q's dtype and a 16-bit product is exact in fp32,
        # so 16-bit operands with fp32 accumulation (tensor cores) change only the order of the
        # sum; fp32 operands keep the ieee dot, as do 16-bit ones on CPU (the interpreter
        # multiplies bf16 tl.dot operands wrongly, as in triton_decode)
        q_pos = tl.maximum(q, 0.0).to(q.dtype)
        q_neg = tl.minimum(q, 0.0).to(q.dtype)
        # one column per (block, sub-page): every page of the chunk's blocks in one load (a
        # program issues all its bytes at once instead of one page after another)
        offs_c = tl.arange(0, BLOCK_B * P_PAD)
        col_j = tl.program_id(2) * BLOCK_B + offs_c // P_PAD
        page = offs_c % P_PAD
        c_mask = (col_j < mb) & (page < PAGES)
        col = col_j
        if HAS_IDS:  # logical columns of the block table (the shortlist), read through it
            col = tl.load(ids_ptr + b * stride_ib + kvh * stride_ih + col_j, mask=c_mask, other=0)
        bt = bt_ptr + b * stride_btb + kvh * stride_bth
        blk = tl.load(bt + col, mask=c_mask, other=0).to(tl.int64)
        base = bnd_ptr + layer_off + kvh * stride_head + blk * stride_blk + page * stride_sub
        m = c_mask[None, :] & d_mask[:, None]
        kmax = tl.load(base[None, :] + offs_d[:, None], mask=m, other=0.0)  # [D_PAD, COLS]
        if EXACT:  # keys seen as one-token bounds (max = min = k): the score is q·k
            if IEEE:
                s = tl.dot(q, kmax.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kmax, out_dtype=tl.float32)
        else:
            kmin = tl.load(base[None, :] + stride_mm + offs_d[:, None], mask=m, other=0.0)
            if IEEE:
                s = tl.dot(q_pos, kmax.to(tl.float32), input_precision="ieee")
                s += tl.dot(q_neg, kmin.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q_pos, kmax, out_dtype=tl.float32)
                s += tl.dot(q_neg, kmin, out_dtype=tl.float32)  # [GROUP_PAD, COLS]
        # the block's score: the max over the query group and over its sub-pages
        s = tl.where(g_mask[:, None] & (page < PAGES)[None, :], s, float("-inf"))
        best = tl.max(tl.reshape(tl.max(s, 0), (BLOCK_B, P_PAD)), 1)
        tl.store(out, best, mask=offs_j < mb)


def block_scores(
    query: torch.Tensor,  # [B, H, D]
    bounds: torch.Tensor,  # [num_blocks, L, 2, P, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, MB], or [B, Hkv, MB]: one table per KV head
    streaming: torch.Tensor | None = None,  # [Hkv] bool: heads not scored (-inf)
    ids: torch.Tensor | None = None,  # [B, Hkv, N] columns of the tables to score; None: all
) -> torch.Tensor:  # [B, Hkv, MB or N] float32
    batch, heads, dim = query.shape
    pages, kv_heads = bounds.shape[3], bounds.shape[4]
    mb = block_tables.shape[-1] if ids is None else ids.shape[2]
    if block_tables.dim() == 2:
        block_tables = block_tables[:, None].expand(-1, kv_heads, -1)  # stride 0: one table
    out = torch.empty(batch, kv_heads, mb, device=query.device, dtype=torch.float32)
    if batch == 0 or mb == 0:
        return out
    if bounds.dtype != query.dtype:
        raise ValueError(f"block_scores: query {query.dtype}, bounds {bounds.dtype}")
    if ids is not None and ids.stride(2) != 1:
        ids = ids.contiguous()
    group = heads // kv_heads
    p_pad = triton.next_power_of_2(pages)
    block_b = max(1, 64 // p_pad)  # 64 (block, sub-page) columns a program: 16 KB of bf16 bounds
    st = bounds.stride()
    sid = (0, 0) if ids is None else ids.stride()[:2]
    _scores_kernel[(batch, kv_heads, triton.cdiv(mb, block_b))](
        query, bounds, block_tables, block_tables if ids is None else ids,
        block_tables if streaming is None else streaming, out,
        layer * st[1], mb, query.stride(0), query.stride(1), st[0], st[2], st[3], st[4],
        block_tables.stride(0), block_tables.stride(1), sid[0], sid[1],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim,
        D_PAD=max(16, triton.next_power_of_2(dim)), PAGES=pages, P_PAD=p_pad, BLOCK_B=block_b,
        EXACT=st[2] == 0, HAS_IDS=ids is not None, HAS_STREAM=streaming is not None,
        IEEE=query.dtype == torch.float32 or not query.is_cuda,
    )  # fmt: skip
    return out


@triton.jit
def _fold_kernel(
    bnd_ptr, kv_ptr, slot_ptr,
    stride_bblk, stride_bl, stride_bmm, stride_bsub, stride_bh,
    stride_kblk, stride_kl, stride_ktok, stride_kh,
    BS: tl.constexpr, SUB: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HD_PAD: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    # -1: a padding row of a captured step, nothing to fold (every lane masked)
    lanes = tl.where(slot >= 0, KV_HEADS * HEAD_DIM, 0)
    slot = tl.maximum(slot, 0)
    blk = slot // BS
    off = slot % BS
    offs = tl.arange(0, HD_PAD)  # (KV head, channel) flattened
    head = offs // HEAD_DIM
    d = offs % HEAD_DIM
    m = offs < lanes
    key_row = kv_ptr + blk * stride_kblk + layer * stride_kl + off * stride_ktok  # K: plane 0
    key = tl.load(key_row + head * stride_kh + d, mask=m, other=0.0)
    base = bnd_ptr + blk * stride_bblk + layer * stride_bl + (off // SUB) * stride_bsub
    ptrs = base + head * stride_bh + d
    kmax = tl.load(ptrs, mask=m, other=0.0)
    kmin = tl.load(ptrs + stride_bmm, mask=m, other=0.0)
    dtype = kmax.dtype
    # max / min in fp32 (exact: the result is one of the inputs); the key rounded to the bounds'
    # dtype first, as the reference does
    key = key.to(dtype).to(tl.float32)
    restart = (off % SUB) == 0  # a sub-page's first token: its old bounds are stale
    kmax = tl.where(restart, key, tl.maximum(kmax.to(tl.float32), key))
    kmin = tl.where(restart, key, tl.minimum(kmin.to(tl.float32), key))
    tl.store(ptrs, kmax.to(dtype), mask=m)
    tl.store(ptrs + stride_bmm, kmin.to(dtype), mask=m)


def update_bounds(
    bounds: torch.Tensor,  # [num_blocks, L, 2, P, Hkv, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] distinct blocks; -1: skip
) -> None:
    tokens = slot_mapping.shape[0]
    _, layers, _, pages, kv_heads, dim = bounds.shape
    if tokens == 0 or layers == 0:
        return
    bs = kv_cache.shape[3]
    sb, sk = bounds.stride(), kv_cache.stride()
    if sb[5] != 1 or sk[5] != 1:
        raise ValueError("update_bounds needs contiguous channels in the bounds and the cache")
    _fold_kernel[(tokens, layers)](
        bounds, kv_cache, slot_mapping,
        sb[0], sb[1], sb[2], sb[3], sb[4], sk[0], sk[1], sk[3], sk[4],
        BS=bs, SUB=bs // pages, KV_HEADS=kv_heads, HEAD_DIM=dim,
        HD_PAD=triton.next_power_of_2(kv_heads * dim),
    )  # fmt: skip


@triton.jit
def _tables_kernel(
    ctx_ptr, bt_ptr, topk_ptr, stream_ptr, rnb_ptr, tables_ptr, lens_ptr,
    mb, width, n_picks, stride_btb, stride_kb, stride_kh, stride_kk,
    D_SINK: tl.constexpr, D_TOPK: tl.constexpr, D_LOCAL: tl.constexpr,
    S_SINK: tl.constexpr, S_LOCAL: tl.constexpr, BS: tl.constexpr,
    HAS_PICKS: tl.constexpr, HAS_STREAM: tl.constexpr, HAS_GAP: tl.constexpr,
    W_PAD: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    n_tok = tl.load(ctx_ptr + b).to(tl.int32)
    nb = (n_tok + BS - 1) // BS
    bt = bt_ptr + b * stride_btb
    out = tables_ptr + row.to(tl.int64) * width
    # per-row scalars are ints (vector masks only ever compare vectors against them)
    streamed = n_tok * 0
    if HAS_STREAM:
        streamed = tl.load(stream_ptr + h).to(tl.int32)
    sink = tl.where(streamed != 0, S_SINK, D_SINK)
    local = tl.where(streamed != 0, S_LOCAL, D_LOCAL)
    small = nb <= tl.where(streamed != 0, S_SINK + S_LOCAL, D_SINK + D_TOPK + D_LOCAL)
    whole = tl.where(small, W_PAD, 0)  # columns read as logical j: a short context, whole
    kept = n_tok * 0
    gap_col = n_tok * 0 - 1  # the gap block's column, -1: none
    gap = n_tok * 0
    if HAS_PICKS:  # dense heads of long contexts: picks in the middle [sink, hi)
        hi = tl.where((streamed == 0) & (small == 0), nb - D_LOCAL, D_SINK)  # empty: no picks
        pick_row = topk_ptr + b * stride_kb + h * stride_kh
        i = tl.arange(0, K_PAD)
        live = i < n_picks
        t = tl.load(pick_row + i * stride_kk, mask=live, other=-1).to(tl.int32)
        ok = live & (t >= D_SINK) & (t < hi)
        kept = tl.sum(ok.to(tl.int32), 0)
        # ascending picks: the kept ones are a run after those below the sink, in place
        below = tl.sum((live & (t < D_SINK)).to(tl.int32), 0)
        blk = tl.load(bt + t, mask=ok, other=0)
        tl.store(out + D_SINK + i - below, blk, mask=ok)
        if HAS_GAP:  # the block that left the local window since the picks were made
            gap = tl.load(rnb_ptr + b).to(tl.int32) - D_LOCAL
            gap_col = tl.where((gap >= D_SINK) & (gap < hi), D_SINK + kept, -1)
    first_local = sink + kept + (gap_col >= 0).to(tl.int32)
    count = tl.where(small, nb, first_local + local)
    j = tl.arange(0, W_PAD)
    logical = tl.where(j < sink, j, nb - local + (j - first_local))
    logical = tl.where(j == gap_col, gap, logical)
    logical = tl.where(j < whole, j, logical)
    logical = tl.where(j < count, logical, mb - 1)  # unused: the table's last column
    write = (j < width) & ((j < sink) | (j >= sink + kept))  # not the picks' columns
    blk = tl.load(bt + logical, mask=write, other=0)
    tl.store(out + j, blk, mask=write)
    tl.store(lens_ptr + row, (count - 1) * BS + n_tok - (nb - 1) * BS)


def sparse_tables(
    context_lens: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, MB] int32
    topk: torch.Tensor | None,  # [B, Hkv, K'] logical, ascending (as topk_blocks writes them)
    streaming: torch.Tensor | None,  # [Hkv] bool
    refresh_nb: torch.Tensor | None,  # [B]
    dense: tuple[int, int, int],
    stream: tuple[int, int, int],
    bs: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # tables [B, Hkv, NSEL] int32, lens [B, Hkv] int32
    batch, mb = block_tables.shape
    width = max(sum(dense) + 1, sum(stream) if streaming is not None else 0)
    dev = block_tables.device
    tables = torch.empty(batch, kv_heads, width, device=dev, dtype=torch.int32)
    lens = torch.empty(batch, kv_heads, device=dev, dtype=torch.int32)
    if batch == 0:
        return tables, lens
    picks = 0 if topk is None else topk.shape[2]
    k_pad = max(16, triton.next_power_of_2(picks))
    st = topk.stride() if topk is not None and picks else (0, 0, 0)
    _tables_kernel[(batch, kv_heads)](
        context_lens, block_tables, topk if picks else block_tables,
        block_tables if streaming is None else streaming,
        block_tables if refresh_nb is None else refresh_nb, tables, lens,
        mb, width, picks, block_tables.stride(0), st[0], st[1], st[2],
        D_SINK=dense[0], D_TOPK=dense[1], D_LOCAL=dense[2], S_SINK=stream[0], S_LOCAL=stream[2],
        BS=bs, HAS_PICKS=picks > 0, HAS_STREAM=streaming is not None,
        HAS_GAP=picks > 0 and refresh_nb is not None,
        W_PAD=triton.next_power_of_2(width), K_PAD=k_pad, num_warps=4,
    )  # fmt: skip
    return tables, lens


@triton.jit(do_not_specialize=["num_splits", "stride_btr"])  # as triton_decode.VARYING
def _sparse_decode_kernel(
    q_ptr, kv_ptr, bt_ptr, len_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    scale_log2, layer_off, part_len, num_splits,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_btr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    row_sel = b * tl.num_programs(1) + kvh  # this (sequence, KV head)'s selection
    ctx = tl.load(len_ptr + row_sel).to(tl.int32)
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
        blk = tl.load(bt_ptr + row_sel * stride_btr + tok // PAGE, mask=valid, other=0)
        row = kv_base + blk.to(tl.int64) * stride_blk + (tok % PAGE) * stride_tok
        k = tl.load(
            row[None, :] + offs_d[:, None], mask=valid[None, :] & d_mask[:, None], other=0.0
        )
        v = tl.load(
            row[:, None] + stride_kv + offs_d[None, :],
            mask=valid[:, None] & d_mask[None, :],
            other=0.0,
        )
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

    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_mask = g_mask[:, None] & d_mask[None, :]
    if num_splits > 1:  # a runtime branch: one binary whether the batch splits or not
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        row_id = (b * GROUP * tl.num_programs(1) + heads) * num_splits + s
        tl.store(part_lse_ptr + row_id, lse, mask=g_mask)
        tl.store(part_o_ptr + row_id[:, None] * D_PAD + offs_d[None, :], out, mask=o_mask)
    else:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


def sparse_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    tables: torch.Tensor,  # [B, Hkv, NSEL]
    lens: torch.Tensor,  # [B, Hkv]
    scale: float,
    num_splits: int | None = None,
    block_n: int = 64,
) -> torch.Tensor:  # [B, H, D]
    batch, heads, dim = query.shape
    page, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    out = torch.empty_like(query)
    if batch == 0:
        return out
    tables = tables.reshape(batch * kv_heads, -1)
    lens = lens.reshape(-1).contiguous()
    max_tokens = tables.shape[1] * page
    if num_splits is None:
        # the programs are (B, Hkv) as for dense decode, over a shorter context
        splits, part_len = choose_splits(batch, kv_heads, max_tokens, sm_count(query.device))
    else:
        tiles = max(1, math.ceil(max_tokens / block_n))
        part_len = math.ceil(tiles / max(1, min(num_splits, MAX_SPLITS))) * block_n
        splits = math.ceil(tiles * block_n / part_len)
    d_pad = max(16, triton.next_power_of_2(dim))
    part_o, part_lse = partials(batch, heads, splits, d_pad, query.device)
    st = kv_cache.stride()
    group = heads // kv_heads
    _sparse_decode_kernel[(batch, kv_heads, splits)](
        query, kv_cache, tables, lens, out, part_o, part_lse,
        scale * LOG2E, layer * st[1], part_len, splits,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        st[0], st[2], st[3], st[4], tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, D_PAD=d_pad,
        PAGE=page, BLOCK_N=block_n,
        FP32_DOT=query.dtype == torch.float32 or not query.is_cuda,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if splits > 1:
        _decode_reduce_kernel[(batch, heads)](
            part_o, part_lse, out, splits, out.stride(0), out.stride(1),
            HEAD_DIM=dim, D_PAD=d_pad, S_PAD=MAX_SPLITS,
            num_warps=4,
        )  # fmt: skip
    return out
