"""Triton bodies of the model's fused elementwise ops (kernels/fused.py holds the references and
documents the contracts; the signatures are the same).

Why: at batch 1 a decode step is ~1 ms of weight-streaming GEMMs plus, unfused, ~31 tiny
elementwise kernels per layer (RMSNorm alone is 8); each costs a launch and a round trip
through memory, together more than the GEMMs. Here each fusion is one kernel:

    rms_norm / add_rms_norm   one program per row: (residual add,) fp32 sum of squares, scale,
                              weight; the row stays in registers (hidden <= 16k)
    rope_write_kv             one program per token: cos/sin gathered from the fp32 tables at
                              the token's position, q and k rotated in place in the qkv buffer,
                              K and V stored into the paged cache (slot -1 skipped on device)
    silu_mul                  programs over (row, column chunk) of the fused [gate; up] output

Numerics: loads are upcast to fp32 and every point where the reference rounds to the tensor
dtype (listed in kernels/fused.py) is rounded here too, so bf16 results match the reference up
to the last bit of transcendental functions and reduction order. Every launch passes
``enable_fp_fusion=False``: on sm_90 LLVM narrows "upcast, multiply, round" to a native bf16
multiply and would then contract it with the following add into one ``fma.rn.bf16``, skipping
the rounding the reference does between them (seen in the PTX; RoPE then differed by an ulp). Grids come from shapes only:
no host sync, so the ops capture in CUDA graphs. Under ``TRITON_INTERPRET=1`` they run on CPU
tensors (tests/unit/test_kernels_fused.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrelay.kernels.fused import NormResult

MAX_HIDDEN = 16384  # one row per program, held in registers
SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out, n, eps,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (r.to(tl.float32) + x.to(tl.float32)).to(x_ptr.dtype.element_ty)  # torch's add
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    h = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
    h = (h * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference casts, then weighs
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(
    src_ptr, tok, stride_t, cos1, sin1, cos2, sin2,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):  # fmt: skip
    """Rotate ``HEADS`` heads of token ``tok`` in place; returns the rotated halves (fp32,
    rounded to the dtype) and their [HEADS_PAD, HALF_PAD] offsets and mask."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    d = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < HEADS) & (d < HALF)
    ptr = src_ptr + tok * stride_t + heads * (2 * HALF) + d
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    dt = src_ptr.dtype.element_ty
    # reference: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
    o1 = ((x1 * cos1).to(dt).to(tl.float32) + (-x2 * sin1).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * cos2).to(dt).to(tl.float32) + (x1 * sin2).to(dt).to(tl.float32)).to(dt)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)
    return o1, o2


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, kv_ptr, slot_ptr,
    stride_t, stride_pos, layer_off, stride_blk, stride_kv, stride_tok,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS: tl.constexpr,
    KV_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    dt = qkv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_PAD)[None, :]
    dmask = d < HALF
    row = pos * stride_pos
    # the model's fp32 tables, cast to the dtype as the reference casts them
    cos1 = tl.load(cos_ptr + row + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + HALF + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin1 = tl.load(sin_ptr + row + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + HALF + d, mask=dmask, other=0.0).to(dt).to(tl.float32)
    _rotate_heads(qkv_ptr, t, stride_t, cos1, sin1, cos2, sin2, HEADS, HEADS_PAD, HALF, HALF_PAD)
    k_ptr = qkv_ptr + HEADS * 2 * HALF
    k1, k2 = _rotate_heads(
        k_ptr, t, stride_t, cos1, sin1, cos2, sin2, KV_HEADS, KV_PAD, HALF, HALF_PAD
    )
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, KV_PAD)[:, None]
        mask = (heads < KV_HEADS) & dmask
        offs = heads * (2 * HALF) + d  # a token's [Hkv, D] slab is contiguous in the cache
        dst = kv_ptr + (slot // PAGE) * stride_blk + layer_off + (slot % PAGE) * stride_tok + offs
        v_ptr = k_ptr + KV_HEADS * 2 * HALF + t * stride_t + offs
        v1 = tl.load(v_ptr, mask=mask, other=0.0)
        v2 = tl.load(v_ptr + HALF, mask=mask, other=0.0)
        cdt = kv_ptr.dtype.element_ty
        tl.store(dst, k1.to(cdt), mask=mask)
        tl.store(dst + HALF, k2.to(cdt), mask=mask)
        tl.store(dst + stride_kv, v1.to(cdt), mask=mask)
        tl.store(dst + stride_kv + HALF, v2.to(cdt), mask=mask)


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_out, n, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + offs, mask=mask, other=0.0).to(tl.float32)
    dt = x_ptr.dtype.element_ty
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # F.silu rounds before the multiply
    tl.store(out_ptr + row * stride_out + offs, (s * u).to(dt), mask=mask)


def _check_rows(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: need [T, n], [n]")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} exceeds {MAX_HIDDEN}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x and weight need a contiguous last dim")


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> NormResult:
    _check_rows(x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
    ):
        raise ValueError("residual must match x in shape and dtype, with a contiguous last dim")
    n = x.shape[1]
    block = triton.next_power_of_2(n)
    if x.shape[0] > 0:
        _rms_norm_kernel[(x.shape[0],)](
            x, res, weight, out, res_out,
            x.stride(0), res.stride(0), out.stride(0), res_out.stride(0), n, eps,
            HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
            enable_fp_fusion=False,
        )  # fmt: skip
    return NormResult(out, res_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as ``fused.rms_norm``."""
    return _norm(x, None, weight, eps).out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> NormResult:
    """Same contract as ``fused.add_rms_norm``."""
    return _norm(x, residual, weight, eps)


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) * D]
    cos_table: torch.Tensor,  # [max_pos, D] float32
    sin_table: torch.Tensor,
    positions: torch.Tensor,  # [T]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T], -1 = skip
    num_heads: int,
) -> torch.Tensor:  # [T, H, D] view of qkv
    """Same contract as ``fused.rope_write_kv``."""
    tokens = qkv.shape[0]
    kv_heads, dim = kv_cache.shape[4], kv_cache.shape[5]
    if qkv.dim() != 2 or qkv.shape[1] != (num_heads + 2 * kv_heads) * dim:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} does not hold {num_heads} q + 2x{kv_heads} kv heads of {dim}"
        )
    if dim % 2 or cos_table.shape != sin_table.shape or cos_table.shape[1:] != (dim,):
        raise ValueError(f"cos/sin tables {tuple(cos_table.shape)} do not fit head_dim {dim}")
    if positions.shape != (tokens,) or slot_mapping.shape != (tokens,):
        raise ValueError("positions and slot_mapping must be [T] tensors")
    if positions.is_floating_point() or slot_mapping.is_floating_point():
        raise ValueError("positions and slot_mapping must be integer tensors")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range [0, {kv_cache.shape[1]})")
    if qkv.stride(1) != 1 or kv_cache.stride(5) != 1 or kv_cache.stride(4) != dim:
        raise ValueError("qkv needs contiguous rows and kv_cache contiguous [Hkv, D] slabs")
    if cos_table.stride(1) != 1 or sin_table.stride() != cos_table.stride():
        raise ValueError("cos/sin tables need one layout with contiguous rows")
    if tokens > 0:
        half = dim // 2
        st = kv_cache.stride()
        _rope_write_kv_kernel[(tokens,)](
            qkv, cos_table, sin_table, positions, kv_cache, slot_mapping,
            qkv.stride(0), cos_table.stride(0), layer * st[1], st[0], st[2], st[3],
            HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), KV_HEADS=kv_heads,
            KV_PAD=triton.next_power_of_2(kv_heads), HALF=half,
            HALF_PAD=triton.next_power_of_2(half), PAGE=kv_cache.shape[3], num_warps=4,
            enable_fp_fusion=False,
        )  # fmt: skip
    return qkv[:, : num_heads * dim].view(tokens, num_heads, dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    """Same contract as ``fused.silu_mul``."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} must be [T, 2I] with contiguous rows")
    tokens, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((tokens, n))
    if tokens > 0 and n > 0:
        _silu_mul_kernel[(tokens, triton.cdiv(n, SILU_BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK, num_warps=4,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
