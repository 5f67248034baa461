"""Triton body of ``kernels.l2_prefetch``: read a tensor once so that its bytes sit in the GPU's L2
when the next kernel wants them (opt-in weight prefetch, workers/model/prefetch.py; issue 17).

Why: a batch-1 decode step streams every weight once, and between its GEMMs come kernels that
barely touch memory (norms, RoPE + KV write, attention over a short context); HBM idles through
them. A kernel on a side stream that reads the *next* GEMM's weight during those gaps moves
bytes the GEMM would otherwise wait for; the GEMM then reads them from L2.

    grid (programs,)   program p reads words [p*chunk, (p+1)*chunk) of the tensor viewed as
                       int32, BLOCK words a tile (8 warps: 16-byte loads, 128 bytes a thread
                       in flight), cached in L2 only (``.cg``) and marked ``evict_last`` so
                       that the GEMMs' streaming loads evict other lines first

Nothing is written unless ``emit`` (a runtime argument, so the compiler must keep the loads):
then each program stores the int64 sum of the words it read, which is how the tests check that
the programs together read every word exactly once. No host sync, no allocation: the op
captures in CUDA graphs. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors
(tests/unit/test_prefetch.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 8192  # int32 words a tile: 32 KB a program in flight


@triton.jit(do_not_specialize=["emit"])  # one binary with and without the sums
def _prefetch_kernel(src_ptr, sink_ptr, n, chunk, emit, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid.to(tl.int64) * chunk
    hi = tl.minimum(lo + chunk, n)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.int64)
    for start in range(lo, hi, BLOCK):
        idx = start + offs
        w = tl.load(
            src_ptr + idx, mask=idx < hi, other=0, cache_modifier=".cg",
            eviction_policy="evict_last",
        )  # fmt: skip
        acc += w.to(tl.int64)
    if emit != 0:
        tl.store(sink_ptr + pid, tl.sum(acc, axis=0))


@functools.lru_cache(maxsize=8)
def _sink(device: torch.device) -> torch.Tensor:
    """One int64 per device, never written without ``emit``."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def words(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as int32 words (flat; up to 3 trailing bytes are left out)."""
    flat = tensor.detach().reshape(-1).view(torch.uint8)
    return flat[: flat.numel() // 4 * 4].view(torch.int32)


def chunk_words(n: int, programs: int) -> int:
    """Words a program reads: ``n`` split over ``programs``, rounded up to whole tiles."""
    return triton.cdiv(triton.cdiv(n, max(1, programs)), BLOCK) * BLOCK


def l2_prefetch(
    tensor: torch.Tensor,  # contiguous, any dtype
    programs: int = 64,
    sums: torch.Tensor | None = None,  # [programs] int64: each program's word sum (tests)
) -> None:
    """Read ``tensor`` into L2 (see the module docstring); with ``sums``, also write each
    program's int64 sum of the int32 words it read."""
    if not tensor.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    src = words(tensor)
    n = src.numel()
    if n == 0:
        return
    chunk = chunk_words(n, programs)
    grid = triton.cdiv(n, chunk)
    if sums is not None and (sums.dtype != torch.int64 or sums.numel() < grid):
        raise ValueError(f"sums must hold {grid} int64 values")
    sink = sums if sums is not None else _sink(tensor.device)
    _prefetch_kernel[(grid,)](
        src, sink, n, chunk, int(sums is not None), BLOCK=BLOCK, num_warps=8, num_stages=1
    )
