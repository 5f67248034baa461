"""Torch reference bodies of the model's fused elementwise ops (kernels/triton_fused.py shares
every signature): correct on any device, used on CPU and as the oracle of the Triton bodies.

Each body is the plain composition the Llama decoder used before fusion, op for op, so on CPU
the model computes bit for bit what it did (and what transformers does):

    rms_norm          x.float() * rsqrt(mean(x²) + eps), cast back, times the weight
    add_rms_norm      residual = x + residual (rounded to the dtype), then rms_norm of it
    rope_write_kv     rotate_half RoPE on q and k of a fused qkv row (in place), K/V into the
                      paged cache at slot_mapping (-1 = skip)
    silu_mul          silu(gate) * up of a fused [gate; up] row

Rounding points (what the Triton bodies reproduce): the residual sum, the normalised value
before the weight multiply, each RoPE product and their sum, silu(gate) before the multiply.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kvrelay.kernels import reference


class NormResult(NamedTuple):
    out: torch.Tensor  # [T, hidden] normed, dtype of weight * x
    residual: torch.Tensor  # [T, hidden] x + residual, x's dtype (the next residual stream)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [T, hidden]`` normalised over the last dim in float32, cast back, times ``weight``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(
    x: torch.Tensor,  # [T, hidden] the new contribution (an o_proj / down_proj output)
    residual: torch.Tensor,  # [T, hidden] the residual stream so far
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> NormResult:
    """``residual + x`` (the updated residual stream) and its RMSNorm, in one pass."""
    summed = residual + x
    return NormResult(rms_norm(summed, weight, eps), summed)


def rope_tables(
    cos_table: torch.Tensor,  # [max_pos, D] float32
    sin_table: torch.Tensor,
    positions: torch.Tensor,  # [T] int
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, 1, D], [T, 1, D]) in ``dtype``
    """The rows of the fp32 cos/sin tables at ``positions``, cast as transformers casts them."""
    cos = cos_table[positions].to(dtype).unsqueeze(1)
    sin = sin_table[positions].to(dtype).unsqueeze(1)
    return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate_half RoPE: ``x [T, heads, D]``, ``cos``/``sin`` ``[T, 1, D]`` (halves repeated)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) * D]: q | k | v columns, rotated in place
    cos_table: torch.Tensor,  # [max_pos, D] float32
    sin_table: torch.Tensor,  # [max_pos, D] float32
    positions: torch.Tensor,  # [T] int, each token's position in its sequence
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T] int64, -1 = do not write
    num_heads: int,
) -> torch.Tensor:  # [T, H, D] rotated q, a view of qkv's q columns
    """RoPE on q and k of a fused qkv projection, then K and V into the paged cache.

    After the call qkv's q and k columns hold the rotated values (v untouched) and the cache
    holds each token's rotated K and its V at its slot.
    """
    tokens = qkv.shape[0]
    kv_heads, dim = kv_cache.shape[4], kv_cache.shape[5]
    q_size, kv_size = num_heads * dim, kv_heads * dim
    if qkv.dim() != 2 or qkv.shape[1] != q_size + 2 * kv_size:
        raise ValueError(
            f"qkv {tuple(qkv.shape)} does not hold {num_heads} q + 2x{kv_heads} kv heads of {dim}"
        )
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    cos, sin = rope_tables(cos_table, sin_table, positions, qkv.dtype)
    q = q.view(tokens, num_heads, dim)
    k = k.view(tokens, kv_heads, dim)
    q.copy_(rotate(q, cos, sin))
    k.copy_(rotate(k, cos, sin))
    reference.write_kv(kv_cache, layer, k, v.view(tokens, kv_heads, dim), slot_mapping)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    """SwiGLU's ``silu(gate) * up`` on a fused ``[gate; up]`` projection output."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
