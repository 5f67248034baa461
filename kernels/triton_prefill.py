"""Triton body of ``paged_prefill_attention``: causal flash attention of a packed variable-length
batch of new tokens over each sequence's paged prefix plus themselves.

Work split: one program owns (query head h, tile of ``BLOCK_M`` new tokens of one sequence).
Tiles are numbered without reading lengths on the host: sequence i owns tile ids
``[qsl[i] // BLOCK_M + i, qsl[i+1] // BLOCK_M + i + 1)`` (qsl = query_start_loc), which is at
least ``ceil(n_i / BLOCK_M)`` ids and never overlaps the next sequence, so
``T // BLOCK_M + B`` programs per head cover every tile; a program finds its sequence by binary
search over qsl and exits if its tile lies past the sequence's end (vLLM's unified-attention
trick). Heads are the fast grid axis so the ``group`` heads sharing a KV head run side by side
and hit K/V in L2; tiles run last-first so the longest causal rows start first.

Padded launches (a CUDA graph's, workers/engine/prefill_graphs.py: B = the engine's
``max_num_seqs``, sequences past the step's real ones own no rows) may pass ``live_seqs``, a
one-element device tensor holding the step's real sequence count n (a ``LIVE`` constexpr
variant; without it the kernel is the one described above). Every tile id a live sequence owns
lies below ``bound = qsl[n] // BLOCK_M + n`` (the first id sequence n would own; sequence i < n
owns ids below ``qsl[i+1] // BLOCK_M + i + 1 <= bound``), so program p of a head takes tile
``bound - 1 - p``: the live tiles, still last-first, run first, and programs p >= bound exit
after loading n and qsl[n] (the same two words for every program) with no binary search; the
search runs over [0, n - 1]. As qsl[n] <= T, bound <= T // BLOCK_M + B: the grid is unchanged
(shapes only) and still covers every live tile, and each tile's work is the same code, so the
results are those of the launch without ``live_seqs`` and of the unpadded one (bit for bit under
the interpreter, tests/unit/test_kernels_interpret.py; compiled for sm_90 the two variants' PTX
has the same floating-point instructions in the same order). Entries of qsl past n and of
``context_lens`` / ``block_tables`` from n on are not read; n is clamped to [0, B].
Why: without it, the ~B empty programs per head each paid the ~log2(B)-step dependent search and
were scheduled first; measured on an H100 in the prefill graph (T = 1024, one real sequence,
B = max_num_seqs, Llama-1B shape, bf16) the kernel took 715 us per forward (16 layers) against
426 us eagerly (grid T // BLOCK_M + 1), ~18 us a call. The bound's gain is not timed yet.

Sequence i's new tokens sit at positions ``ctx_i - n_i ... ctx_i - 1``. For a tile whose first
row is at position p0, keys below p0 are visible to every row (no mask); keys from there up to
the tile's last row take the causal mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvrelay.kernels.triton_decode import LOG2E


@triton.jit
def _attend(
    acc, l_i, m_i, q, q_pos, kv_base, bt_row, lo, hi, kv_end, scale_log2,
    stride_blk, stride_kv, stride_tok,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query tile over keys [lo, hi) (masked when CAUSAL)."""
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        tok = start + offs_n
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
        if CAUSAL:
            scores = tl.where(tok[None, :] <= q_pos[:, None], scores, float("-inf"))
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
    return acc, l_i, m_i


@triton.jit
def _prefill_tile(
    q_ptr, kv_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr,
    scale_log2, layer_off, h, tile, last_seq,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    """Tile id ``tile`` of query head ``h``, its sequence searched in ``[0, last_seq]``."""
    # Largest seq with qsl[seq] // BLOCK_M + seq <= tile (the first tile id it owns).
    lo = tl.program_id(0) * 0  # an int32 scalar, not a constexpr: it is loop-carried
    hi = lo + last_seq
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
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        m_mask = offs_m < n
        d_mask = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, D_PAD]
        if FP32_DOT:
            q = q.to(tl.float32)
        q_pos = prefix + offs_m
        kv_base = kv_ptr + layer_off + (h // GROUP) * stride_head
        bt_row = bt_ptr + seq * stride_btb
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        full_end = ((prefix + row0) // BLOCK_N) * BLOCK_N  # keys every row of the tile sees
        kv_end = prefix + tl.minimum(row0 + BLOCK_M, n)  # one past the tile's last row
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, 0, full_end, kv_end, scale_log2,
            stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, False, FP32_DOT,
        )  # fmt: skip
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, q_pos, kv_base, bt_row, full_end, kv_end, kv_end, scale_log2,
            stride_blk, stride_kv, stride_tok,
            HEAD_DIM, D_PAD, PAGE, BLOCK_N, True, FP32_DOT,
        )  # fmt: skip
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# the batch's sequence count, its query tiles and its block-table width: not specialized, as
# the decode kernel's (triton_decode.py, VARYING); the sparse prefill kernel's too
VARYING = ["num_seqs", "num_tiles", "stride_btb"]


@triton.jit(do_not_specialize=VARYING)
def _prefill_kernel(
    q_ptr, kv_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr, live_ptr,
    scale_log2, layer_off, num_seqs, num_tiles,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr, LIVE: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    if LIVE:
        # Only sequences [0, live) are real: their tile ids lie below ``bound``. Program p takes
        # tile bound - 1 - p (last-first over the live tiles, as below); p >= bound exits with
        # no search, so the padded range runs last and costs two cached loads a program.
        live = tl.minimum(tl.maximum(tl.load(live_ptr).to(tl.int32), 0), num_seqs)
        bound = tl.load(qsl_ptr + live).to(tl.int32) // BLOCK_M + live
        tile = bound - 1 - tl.program_id(1)
        if tile >= 0:
            _prefill_tile(
                q_ptr, kv_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr,
                scale_log2, layer_off, h, tile, live - 1,
                stride_qt, stride_qh, stride_ot, stride_oh,
                stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
                GROUP, HEAD_DIM, D_PAD, PAGE, BLOCK_M, BLOCK_N, FP32_DOT,
            )  # fmt: skip
    else:
        _prefill_tile(
            q_ptr, kv_ptr, bt_ptr, qsl_ptr, ctx_ptr, out_ptr,
            scale_log2, layer_off, h, num_tiles - 1 - tl.program_id(1), num_seqs - 1,
            stride_qt, stride_qh, stride_ot, stride_oh,
            stride_blk, stride_kv, stride_tok, stride_head, stride_btb,
            GROUP, HEAD_DIM, D_PAD, PAGE, BLOCK_M, BLOCK_N, FP32_DOT,
        )  # fmt: skip


class PrefillTuning(NamedTuple):
    """Launch parameters (0: pick from head_dim and dtype, as below)."""

    block_m: int = 0
    block_n: int = 0
    num_warps: int = 0
    num_stages: int = 0


def prefill_tiles(dim: int, dtype: torch.dtype, on_cuda: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the untuned kernel. Picked on an H100 (benchmarks/kernel_bench.py
    sweep, 8k causal, bf16): D 64 → (128, 64, 8 warps, 3 stages) 337 TFLOP/s; D 128 → (128, 128,
    8, 2) 351 vs 306 for (128, 64, 8, 3)."""
    d_pad = max(16, triton.next_power_of_2(dim))
    fp32_dot = dtype == torch.float32 or not on_cuda  # see triton_decode
    block_m = 64 if fp32_dot or d_pad > 128 else 128
    return block_m, 32 if fp32_dot else 128 if d_pad == 128 else 64


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D] packed
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: torch.Tensor,  # [B + 1]
    context_lens: torch.Tensor,  # [B]
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]: written in place (rows of no sequence kept)
    live_seqs: torch.Tensor | None = None,  # [1] int32 on the device: sequences [0, n) are real
) -> torch.Tensor:  # [T, H, D]
    """Same contract as ``reference.paged_prefill_attention``."""
    return paged_prefill_attention_tuned(
        query, kv_cache, layer, block_tables, query_start_loc, context_lens, scale,
        out=out, live_seqs=live_seqs,
    )  # fmt: skip


def paged_prefill_attention_tuned(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    tuning: PrefillTuning = PrefillTuning(),  # benchmarks sweep it
    out: torch.Tensor | None = None,
    live_seqs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grid is ``T // BLOCK_M + B`` tiles per head and depends on shapes only, never on
    values: padded inputs of fixed shape (prefill_graphs.py: T rows of a token bucket, B
    sequences where those past the real ones own no rows, ``query_start_loc`` padded with T)
    give one launch that a CUDA graph can replay for any step that fits them. A sequence with no
    rows reads nothing of its context length or block table row. ``live_seqs`` (the real
    sequence count, read on the device) bounds the work to the real sequences' tiles: see the
    module docstring."""
    if query.dim() != 3 or kv_cache.dim() != 6:
        raise ValueError(
            f"query must be [T,H,D], kv_cache 6-d; got {query.shape}, {kv_cache.shape}"
        )
    tokens, heads, dim = query.shape
    batch = context_lens.shape[0]
    page, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range [0, {kv_cache.shape[1]})")
    if kv_cache.shape[5] != dim or heads % kv_heads != 0:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)}"
        )
    if query_start_loc.shape != (batch + 1,) or block_tables.shape[0] != batch:
        raise ValueError("query_start_loc must be [B+1] and block_tables [B, max_blocks]")
    if query.stride(2) != 1 or kv_cache.stride(5) != 1:
        raise ValueError("query and kv_cache need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be like query {tuple(query.shape)} {query.dtype}")
    if live_seqs is not None and (
        live_seqs.numel() != 1
        or live_seqs.dtype not in (torch.int32, torch.int64)
        or live_seqs.device != query.device
    ):
        raise ValueError(
            f"live_seqs must be one int32/int64 element on {query.device}; got"
            f" {tuple(live_seqs.shape)} {live_seqs.dtype} on {live_seqs.device}"
        )
    if tokens == 0 or batch == 0:
        return out
    d_pad = max(16, triton.next_power_of_2(dim))
    fp32_dot = query.dtype == torch.float32 or not query.is_cuda  # see triton_decode
    tiles = prefill_tiles(dim, query.dtype, query.is_cuda)
    block_m = tuning.block_m or tiles[0]
    block_n = tuning.block_n or tiles[1]
    num_warps = tuning.num_warps or (8 if block_m >= 128 else 4)
    num_stages = tuning.num_stages or (3 if d_pad <= 64 else 2)
    num_tiles = tokens // block_m + batch
    st = kv_cache.stride()
    _prefill_kernel[(heads, num_tiles)](
        query, kv_cache, block_tables, query_start_loc, context_lens, out,
        context_lens if live_seqs is None else live_seqs,  # not read without LIVE
        scale * LOG2E, layer * st[1], batch, num_tiles,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        st[0], st[2], st[3], st[4], block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=dim, D_PAD=d_pad, PAGE=page,
        BLOCK_M=block_m, BLOCK_N=block_n, FP32_DOT=fp32_dot, LIVE=live_seqs is not None,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
