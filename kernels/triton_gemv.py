"""Triton body of ``kernels.linear`` at small batch: ``y = x @ W.T (+ bias)`` for ``x [M, K]`` with
M a handful of decode tokens and ``W [N, K]`` row-major (nn.Linear's layout), split over K.

Why: at batch 1 a decode step is weight streaming; every projection reads its whole ``W`` once
for a few output rows, so the only figure that matters is bytes/s. cuBLAS's small-N kernels reach
~0.72 of HBM bandwidth (issue 17); this kernel aims its whole grid at keeping HBM busy::

    grid (N tiles, K splits, M tiles)   program (n, s, m) reads W[n*BN:(n+1)*BN, its K slice]
                                        in [BN, BK] tiles (a row of a tile is BK contiguous
                                        elements: 16-byte vector loads) and x[m*BM.., K slice]

    BM == 1   FMA: an fp32 [BN, BK] accumulator of w * x, summed over K once at the end
              (chosen at M == 1)
    BM == 16  tl.dot on [16, BK] x [BK, BN] (x rows padded to 16 with zeros; W is read once
              for up to 16 rows; chosen at M > 1)

Split-K (deterministic): with S > 1 splits each program writes its fp32 partial sums to
``part [S, M, N]`` and ``_reduce_kernel`` adds the S partials in a fixed order, adds the bias
and casts; with S == 1 the one pass adds the bias and writes the output. No atomics, so a
greedy decode repeats bit for bit. ``choose`` picks tiles and S from (M, N, K, dtype, SM count)
only: no autotuning (which would time kernels inside a CUDA graph capture), no host sync, one
``torch.empty`` from the caching allocator, so the op captures in CUDA graphs.

Numerics: products and sums in fp32 (bf16/fp16 products are exact in fp32), the bias added in
fp32, one rounding to x's dtype at the end: what cuBLAS does, up to summation order. fp32 inputs
use IEEE fp32 in tl.dot (no TF32). Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors
(tests/unit/test_gemv_interpret.py); the interpreter multiplies bf16 tl.dot operands wrongly
(triton 3.9, as kernels/triton_decode.py notes), so on CPU the tl.dot path upcasts them first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvrelay.kernels.triton_decode import sm_count

MAX_SPLITS = 64
DOT_M = 16  # tl.dot's smallest M: the dot path pads x's rows to it


class GemvTuning(NamedTuple):
    """Launch parameters; ``choose`` derives them from shapes, benchmarks and tests force them."""

    block_m: int  # x rows per program: 1 = the FMA path, DOT_M = the tl.dot path
    block_n: int  # W rows per program
    block_k: int  # K elements per tile row; a split is a multiple of it
    splits: int  # K splits (1: no reduce pass)
    num_warps: int
    num_stages: int


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_lo = s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1] row pointers
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    if BLOCK_M == 1:
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
        acc = tl.sum(acc2, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            ks = k0 + offs_k
            k_mask = ks < k_hi
            w = tl.load(w_rows + ks[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_rows + ks[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if FP32_DOT:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT:
        part = part_ptr + (s * M + offs_m.to(tl.int64))[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(
    part_ptr, b_ptr, out_ptr, M, N, splits, stride_om,
    S_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """out[m, n-tile] = sum over s of part[s, m, n-tile] (+ bias), one fixed reduction tree."""
    offs_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    n_mask = offs_n < N
    part = part_ptr + (offs_s.to(tl.int64)[:, None] * M + m) * N + offs_n[None, :]
    p = tl.load(part, mask=(offs_s < splits)[:, None] & n_mask[None, :], other=0.0)
    acc = tl.sum(p, axis=0)  # [BLOCK]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def choose(m: int, n: int, k: int, element_size: int, sms: int) -> GemvTuning:
    """Tiles and K splits from shapes only (no autotuning: it would run inside graph capture).

    A tile row is 512 bytes of W (one 16-byte load per thread of a warp). No split while the
    N x M tiles alone give >= 2 programs per SM (1B gate_up: 512 programs of 128 KB each);
    below that, split K until ~4 programs per SM (1B o_proj at M=1: 64 tiles x 8 splits),
    every split at least one tile long. First guesses, to be set from benchmarks/gemv_bench.py
    on the GPU.
    """
    block_k = 512 // element_size
    if m == 1:
        block_m, block_n, num_warps, num_stages = 1, 32, 8, 2
    else:
        block_m, block_n, num_warps, num_stages = DOT_M, 64, 4, 3
    base = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    k_tiles = max(1, triton.cdiv(k, block_k))
    splits = 1 if base >= 2 * sms else min(k_tiles, MAX_SPLITS, math.ceil(4 * sms / base))
    splits = math.ceil(k_tiles / math.ceil(k_tiles / splits))  # no empty split
    return GemvTuning(block_m, block_n, block_k, splits, num_warps, num_stages)


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K], rows contiguous
    bias: torch.Tensor | None = None,  # [N]
    tuning: GemvTuning | None = None,  # None: choose from shapes; tests and benchmarks force it
) -> torch.Tensor:  # [M, N] in x's dtype
    """``F.linear(x, weight, bias)`` for a 2-d ``x``, split over K (see the module docstring)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: need [M,K], [N,K]")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, weight and bias need one dtype, got {x.dtype} and {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1 or (bias is not None and bias.stride(0) != 1):
        raise ValueError("x, weight and bias need a contiguous last dim")
    (m, k), n = x.shape, weight.shape[0]
    out = x.new_empty((m, n))
    if m == 0 or n == 0:
        return out
    t = tuning or choose(m, n, k, x.element_size(), sm_count(x.device))
    if t.block_m != 1 and t.block_m < DOT_M:
        raise ValueError(f"block_m must be 1 or >= {DOT_M}, got {t.block_m}")
    k_tiles = max(1, triton.cdiv(k, t.block_k))
    k_per_split = triton.cdiv(k_tiles, t.splits) * t.block_k
    splits = max(1, triton.cdiv(k, k_per_split))
    part = out  # unused placeholder without a split
    if splits > 1:
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    b = bias if bias is not None else out  # unused placeholder without a bias
    _gemv_kernel[(triton.cdiv(n, t.block_n), splits, triton.cdiv(m, t.block_m))](
        x, weight, b, out, part, m, n, k, k_per_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, SPLIT=splits > 1,
        HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32 or not x.is_cuda,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    if splits > 1:
        block = 256
        _reduce_kernel[(triton.cdiv(n, block), m)](
            part, b, out, m, n, splits, out.stride(0),
            S_PAD=triton.next_power_of_2(splits), BLOCK=block, HAS_BIAS=bias is not None,
            num_warps=4,
        )  # fmt: skip
    return out
