"""Triton bodies of the KV data-movement ops: ``write_kv`` and block gathers/scatters.

``write_kv``: one program per new token writes its K and V rows (``Hkv * D`` elements each) into
``kv_cache[slot // bs, layer, 0|1, slot % bs]``; slot -1 (padding rows of a captured batch) is
skipped on the device, so the launch needs no host sync and no boolean indexing. Key and value
may be strided views of a fused qkv projection.

Block moves: with the block-major layout a block is one contiguous chunk of
``L * 2 * bs * Hkv * D`` elements, so ``pack`` (gather into ``[n, ...]``), ``unpack`` (scatter
from it) and ``copy_blocks`` (cache to cache on one GPU, one pass instead of pack + unpack) are
the same kernel: program (i, c) copies chunk c of block i with wide, coalesced loads. Anything
else (a CPU side, another GPU, a dtype change, a non-contiguous cache) goes to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvrelay.kernels import reference

CHUNK = 8192  # elements per program: 16 KiB of bf16, enough loads in flight per SM


@triton.jit
def _write_kv_kernel(
    kv_ptr, k_ptr, v_ptr, slot_ptr, layer_off,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_blk, stride_kv, stride_tok,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PAGE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < KV_HEADS * HEAD_DIM
        head = offs // HEAD_DIM
        d = offs % HEAD_DIM
        dst = kv_ptr + (slot // PAGE) * stride_blk + layer_off + (slot % PAGE) * stride_tok + offs
        k = tl.load(k_ptr + t * stride_kt + head * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + head * stride_vh + d, mask=mask)
        tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _move_blocks_kernel(
    src_ptr, src_ids_ptr, dst_ptr, dst_ids_ptr, block_elems,
    SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    c = tl.program_id(1)
    src_block = i.to(tl.int64)
    dst_block = i.to(tl.int64)
    if SRC_INDEXED:
        src_block = tl.load(src_ids_ptr + i).to(tl.int64)
    if DST_INDEXED:
        dst_block = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_elems
    x = tl.load(src_ptr + src_block * block_elems + offs, mask=mask)
    tl.store(dst_ptr + dst_block * block_elems + offs, x, mask=mask)


def write_kv(
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    slot_mapping: torch.Tensor,  # [T], -1 = skip
) -> None:
    """Same contract as ``reference.write_kv``."""
    tokens = key.shape[0]
    kv_heads, dim = kv_cache.shape[4], kv_cache.shape[5]
    if key.shape != (tokens, kv_heads, dim) or value.shape != key.shape:
        raise ValueError(
            f"key/value {tuple(key.shape)} do not fit kv_cache {tuple(kv_cache.shape)}"
        )
    if slot_mapping.shape != (tokens,) or slot_mapping.is_floating_point():
        raise ValueError("slot_mapping must be an integer [T] tensor")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer {layer} out of range [0, {kv_cache.shape[1]})")
    if key.stride(2) != 1 or value.stride(2) != 1 or kv_cache.stride(5) != 1:
        raise ValueError("key, value and kv_cache need a contiguous head_dim")
    # A token's [Hkv, D] slab in the cache must be contiguous for the flat store.
    if kv_cache.stride(4) != dim:
        raise ValueError("kv_cache needs contiguous [Hkv, D] rows")
    if tokens == 0:
        return
    st = kv_cache.stride()
    _write_kv_kernel[(tokens,)](
        kv_cache, key, value, slot_mapping, layer * st[1],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        st[0], st[2], st[3],
        KV_HEADS=kv_heads, HEAD_DIM=dim, BLOCK=triton.next_power_of_2(kv_heads * dim), PAGE=kv_cache.shape[3],
        num_warps=4,
    )  # fmt: skip


def _movable(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.is_cuda == b.is_cuda
        and a.device == b.device
        and a.dtype == b.dtype
        and a.is_contiguous()
        and b.is_contiguous()
        and a.shape[1:] == b.shape[1:]
    )


def _move(
    src: torch.Tensor, src_ids: torch.Tensor | None, dst: torch.Tensor, dst_ids: torch.Tensor | None
) -> None:
    ids = src_ids if src_ids is not None else dst_ids
    assert ids is not None
    n = ids.shape[0]
    if n == 0:
        return
    block_elems = src[0].numel()
    dev = src.device
    s_ids = src_ids.to(dev) if src_ids is not None else ids.to(dev)
    d_ids = dst_ids.to(dev) if dst_ids is not None else s_ids
    _move_blocks_kernel[(n, triton.cdiv(block_elems, CHUNK))](
        src, s_ids, dst, d_ids, block_elems,
        SRC_INDEXED=src_ids is not None, DST_INDEXED=dst_ids is not None, CHUNK=CHUNK,
        num_warps=4,
    )  # fmt: skip


def pack_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Same contract as ``reference.pack_blocks``: ``[n, L, 2, bs, Hkv, D]``."""
    if block_ids.dim() != 1 or block_ids.is_floating_point():
        raise ValueError("block_ids must be an integer [n] tensor")
    if not kv_cache.is_contiguous():
        return reference.pack_blocks(kv_cache, block_ids)
    packed = kv_cache.new_empty((block_ids.shape[0], *kv_cache.shape[1:]))
    _move(kv_cache, block_ids, packed, None)
    return packed


def unpack_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Same contract as ``reference.unpack_blocks``."""
    if (
        block_ids.dim() != 1
        or block_ids.is_floating_point()
        or packed.shape[0] != block_ids.shape[0]
    ):
        raise ValueError("block_ids must be an integer [n] tensor matching packed's first dim")
    if not _movable(packed, kv_cache):
        reference.unpack_blocks(kv_cache, block_ids, packed)
        return
    _move(packed, None, kv_cache, block_ids)


def copy_blocks(
    src_cache: torch.Tensor,
    src_ids: torch.Tensor,
    dst_cache: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    wait: bool = True,
) -> None:
    """Same contract as ``reference.copy_blocks``; one pass when both caches share a GPU."""
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError("src_ids and dst_ids must be [n] tensors of one length")
    if not _movable(src_cache, dst_cache):
        reference.copy_blocks(src_cache, src_ids, dst_cache, dst_ids, wait=wait)
    elif src_cache.data_ptr() == dst_cache.data_ptr():
        # Within one cache the source and destination sets may overlap: gather first, as the
        # reference does, so every destination receives the source's value from before the call.
        unpack_blocks(dst_cache, dst_ids, pack_blocks(src_cache, src_ids))
    else:
        _move(src_cache, src_ids, dst_cache, dst_ids)
