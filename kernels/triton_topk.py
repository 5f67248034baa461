"""Triton body of ``topk_blocks``, the sparse decode's block selection (contract in
kernels/sparse_reference.py; the other sparse ops are in kernels/triton_sparse.py).

One program per row finds the k-th largest value by a search over the values' order-preserving
int32 keys: 16 counting passes over the row, each counting the keys at three thresholds that
quarter the range in one reduction (halving took 32 passes; a pass is a reduction across the
program's warps, and the 32-pass kernel took 12.2 µs on a 4096-value row of an H100 whatever
the batch, i.e. latency); the row is held in registers up to 8192 elements (``TOPK_CHUNK``:
128k context in 16-token blocks), a longer one reloaded chunk by chunk on every pass. It then
writes the ids of the values above it and of the first ones equal to it in the row's order,
each at its rank among the kept (a cumsum, no sort: torch's topk sorts its k results; at
k = 512 of 8192 that was ~70 µs of a refresh layer's ~140 µs of kernels on an H100; the
two-chunk reloading path ~50 µs of a replayed refresh layer's ~137 µs). Row order makes a
selection by position ascending, which ``sparse_tables`` relies on to place the picks without
ranking them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TOPK_CHUNK = 8192  # topk_blocks keeps a row of up to this many values in registers


@triton.jit
def _topk_ids(ids_row, offs, n, HAS_IDS: tl.constexpr):
    """The elements' ids (their positions without ``ids``)."""
    ids = offs.to(tl.int64)
    if HAS_IDS:
        ids = tl.load(ids_row + offs, mask=offs < n, other=0).to(tl.int64)
    return ids


@triton.jit
def _topk_keys(
    val_row, ids_row, offs, n, lo, hi, HAS_IDS: tl.constexpr
):  # fmt: skip
    """Order-preserving int32 keys of a chunk (an element outside [lo, hi) by id is -inf, one
    past the row's end the int32 minimum, below every value's key (-inf's is -2139095041) but a
    negative NaN's with every payload bit set) and the elements' ids."""
    m = offs < n
    v = tl.load(val_row + offs, mask=m, other=float("-inf"))
    ids = _topk_ids(ids_row, offs, n, HAS_IDS)
    v = tl.where((ids >= lo) & (ids < hi), v, float("-inf"))
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 ties with +0.0 (its bits would sort it below)
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # a negative float: flipped
    return tl.where(m, key, -2147483648), ids


@triton.jit
def _topk_count3(key, m1, m2, m3):
    """Per key, whether it is at or above each of m1 <= m2 <= m3, in the 21-bit fields 0, 1, 2
    of an int64 (a row's counts stay below 2**21: ``topk_blocks`` keeps chunks smaller)."""
    ge1 = (key >= m1.to(tl.int32)).to(tl.int64)
    ge2 = (key >= m2.to(tl.int32)).to(tl.int64)
    ge3 = (key >= m3.to(tl.int32)).to(tl.int64)
    return ge1 + (ge2 << 21) + (ge3 << 42)


@triton.jit
def _topk_kernel(
    val_ptr, ids_ptr, hi_ptr, out_ptr, n, k, lo, heads, stride_vr, stride_ir,
    HAS_IDS: tl.constexpr, CHUNK: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    hi = tl.load(hi_ptr + r // heads).to(tl.int64)
    val_row = val_ptr + r.to(tl.int64) * stride_vr
    ids_row = ids_ptr + r.to(tl.int64) * stride_ir
    offs = tl.arange(0, CHUNK)
    if SINGLE:  # the row fits one chunk: its keys (alone) stay in registers across the passes
        key0, _ids = _topk_keys(val_row, ids_row, offs, n, lo, hi, HAS_IDS)
    # the k-th largest key T: the largest T with #(key >= T) >= k, in [t_lo, t_hi] (int64
    # bounds: no overflow; every threshold fits int32); each pass counts the keys at or above
    # three thresholds that quarter the range, in one reduction (the counts packed in 21-bit
    # fields of an int64), and keeps the quarter holding T: 16 passes cover the 2**32 keys
    # where halving took 32 (a pass is a reduction across the program's warps: latency)
    t_lo = tl.zeros([], tl.int64) - 2147483648
    t_hi = tl.zeros([], tl.int64) + 2147483647
    for _step in range(16):
        w = t_hi - t_lo
        m1 = t_lo + (w + 3) // 4
        m2 = t_lo + (2 * w + 3) // 4
        m3 = t_lo + (3 * w + 3) // 4
        if SINGLE:
            packed = tl.sum(_topk_count3(key0, m1, m2, m3), 0)
        else:
            packed = tl.sum(tl.zeros([CHUNK], tl.int64), 0)
            for c in range(0, n, CHUNK):
                key, _ids = _topk_keys(val_row, ids_row, c + offs, n, lo, hi, HAS_IDS)
                packed += tl.sum(_topk_count3(key, m1, m2, m3), 0)
        c1 = packed & 0x1FFFFF
        c2 = (packed >> 21) & 0x1FFFFF
        c3 = packed >> 42
        t_hi = tl.where(c3 >= k, t_hi, tl.where(c2 >= k, m3, tl.where(c1 >= k, m2, m1)) - 1)
        t_lo = tl.where(c3 >= k, m3, tl.where(c2 >= k, m2, tl.where(c1 >= k, m1, t_lo)))
    t = t_lo.to(tl.int32)
    # every key above T is kept; keys equal to T fill the remaining places, lowest position first
    # (``< n``: past the row's end nothing is equal, even to a T a negative NaN brought down);
    # the kept elements are written in row order (at their rank among the kept)
    out_row = out_ptr + r.to(tl.int64) * k
    if SINGLE:
        gt = key0 > t
        eq = (key0 == t) & (offs < n)
        n_gt = tl.sum(gt.to(tl.int32), 0)
        keep = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= k - n_gt))
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1
        ids0 = _topk_ids(ids_row, offs, n, HAS_IDS)  # loaded again: not held through the passes
        tl.store(out_row + pos, ids0, mask=keep)
    else:
        n_gt = tl.sum(tl.zeros([CHUNK], tl.int32), 0)
        for c in range(0, n, CHUNK):
            key, _ids = _topk_keys(val_row, ids_row, c + offs, n, lo, hi, HAS_IDS)
            n_gt += tl.sum((key > t).to(tl.int32), 0)
        done_keep = n_gt * 0
        done_eq = n_gt * 0
        for c in range(0, n, CHUNK):
            key, ids = _topk_keys(val_row, ids_row, c + offs, n, lo, hi, HAS_IDS)
            gt = key > t
            eq = (key == t) & (c + offs < n)
            keep = gt | (eq & (done_eq + tl.cumsum(eq.to(tl.int32), 0) <= k - n_gt))
            pos = done_keep + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(out_row + pos, ids, mask=keep)
            done_keep += tl.sum(keep.to(tl.int32), 0)
            done_eq += tl.sum(eq.to(tl.int32), 0)


def topk_blocks(
    values: torch.Tensor,  # [B, H, N] float32
    k: int,
    lo: int,
    hi: torch.Tensor,  # [B] int
    ids: torch.Tensor | None = None,  # [B, H, N] int: the elements' ids; None: their positions
    chunk: int = TOPK_CHUNK,  # a power of two: the longest row kept in registers
) -> torch.Tensor:  # [B, H, min(k, N)] int64 ids, in row order
    batch, heads, n = values.shape
    kk = min(k, n)
    out = torch.empty(batch, heads, kk, device=values.device, dtype=torch.int64)
    if batch * heads == 0 or kk == 0:
        return out
    if values.dtype != torch.float32 or values.stride(2) != 1:
        raise ValueError("topk_blocks needs float32 values with contiguous rows")
    if n >= 1 << 21:  # the counts' packed fields
        raise ValueError(f"topk_blocks: rows of {n} values, at most 2**21 - 1")
    if values.stride(0) != heads * values.stride(1):
        values = values.contiguous()
    if ids is not None and (ids.stride(2) != 1 or ids.stride(0) != heads * ids.stride(1)):
        ids = ids.contiguous()
    chunk = min(triton.next_power_of_2(n), chunk)
    # 16 values a thread from 4096 on (8192: 16 warps), as many registers a value at every size
    warps = 4 if chunk <= 1024 else 8 if chunk <= 4096 else 16
    _topk_kernel[(batch * heads,)](
        values, values if ids is None else ids, hi, out, n, kk, lo, heads, values.stride(1),
        0 if ids is None else ids.stride(1),
        HAS_IDS=ids is not None, CHUNK=chunk, SINGLE=n <= chunk, num_warps=warps,
    )  # fmt: skip
    return out
