"""Torch reference bodies of kvrelay's device ops: correct on any device, used on CPU and as the
oracle for the Triton bodies (kernels/triton_ops.py shares every signature).

KV cache layout, one tensor per worker and tier::

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
                   │            │      └ 0 = K, 1 = V
                   │            └ every layer of a block lives in one contiguous chunk
                   └ the block is the outer dimension

Why block-major: the block is the unit of allocation, hashing, tiering, transfer and migration.
With the block outermost, one block is one contiguous chunk of
``num_layers * 2 * block_size * kv_heads * head_dim`` elements, so moving n blocks (a handoff, a
tier move, a migration) is one gather into a packed buffer and one message or copy, not
n × layers small copies as with per-layer caches. Attention reads a layer's K of one block as a
contiguous ``[block_size, kv_heads, head_dim]`` slab at a fixed stride, which paged kernels
handle as well as the per-layer layout.

Slots: token t of a sequence lives in block ``block_table[t // block_size]`` at offset
``t % block_size``; a slot is ``block_id * block_size + offset``. Slot -1 means "do not write"
(padding rows of a captured batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    block_size = kv_cache.shape[3]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, layer, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = value.to(kv_cache.dtype)


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one new token per sequence (already written to the cache)
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks] int32/int64, padding entries any valid id
    context_lens: torch.Tensor,  # [B] tokens in the cache per sequence, the new one included
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    batch, heads, dim = query.shape
    block_size, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    max_len = int(context_lens.max())
    num_blocks = (max_len + block_size - 1) // block_size
    span = num_blocks * block_size
    # one gather of the layer's blocks: [B * nb, 2, bs, Hkv, D] (index_select on the block dim
    # is ~10x faster on CPU than advanced indexing across the 6-D cache)
    table = block_tables[:, :num_blocks].reshape(-1).long()
    kv = kv_cache[:, layer].index_select(0, table)
    kv = kv.view(batch, num_blocks, 2, block_size, kv_heads, dim)
    keys = kv[:, :, 0].reshape(batch, span, kv_heads, dim).transpose(1, 2).to(query.dtype)
    values = kv[:, :, 1].reshape(batch, span, kv_heads, dim).transpose(1, 2).to(query.dtype)
    positions = torch.arange(span, device=query.device)
    mask = positions[None, :] < context_lens[:, None].to(query.device)  # [B, S]
    out = F.scaled_dot_product_attention(
        query.unsqueeze(2),  # [B, H, 1, D]
        keys,  # [B, Hkv, S, D]
        values,
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=heads != kv_heads,
    )
    return out.squeeze(2)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D] packed: sequence i owns rows query_start_loc[i]:[i+1]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: torch.Tensor,  # [B + 1] cumulative query lengths, starting at 0
    context_lens: torch.Tensor,  # [B] tokens in the cache per sequence, new ones included
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]: written in place (rows of no sequence kept)
    live_seqs: torch.Tensor | None = None,  # [1] int: only sequences [0, n) are attended
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new tokens over its cached prefix plus themselves.

    The new tokens of sequence i sit at positions ``context_lens[i] - n_i ... context_lens[i] - 1``
    where ``n_i`` is its query length; their K/V are already in the cache. A sequence with no
    new tokens (``n_i == 0``: padding) is skipped: its context length and table row go unused.
    ``live_seqs`` (a one-element tensor n, 0 <= n <= B, on the device in graph mode) says that
    only the first n sequences are real: ``query_start_loc`` past index n and the context
    lengths and table rows of sequences n.. are not read (the Triton kernel uses it to skip the
    padded sequences' programs; the result is that of the first n sequences alone).
    """
    heads, dim = query.shape[1], query.shape[2]
    block_size, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    if out is None:
        out = torch.empty_like(query)
    lens = context_lens.tolist()
    if live_seqs is not None:
        if live_seqs.numel() != 1 or live_seqs.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"live_seqs must be one int32/int64 element, got {live_seqs}")
        live = int(live_seqs.reshape(()).item())
        if not 0 <= live <= len(lens):
            raise ValueError(f"live_seqs {live} out of range [0, {len(lens)}]")
        lens = lens[:live]
    starts = query_start_loc[: len(lens) + 1].tolist()
    for i, ctx in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        n = q_hi - q_lo
        if n == 0:
            continue
        num_blocks = (ctx + block_size - 1) // block_size
        table = block_tables[i, :num_blocks].long()
        kv = kv_cache[:, layer].index_select(0, table)  # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(num_blocks * block_size, kv_heads, dim)[:ctx]
        v = kv[:, 1].reshape(num_blocks * block_size, kv_heads, dim)[:ctx]
        q_pos = torch.arange(ctx - n, ctx, device=query.device)
        k_pos = torch.arange(ctx, device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(
            query[q_lo:q_hi].transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
            k.transpose(0, 1).unsqueeze(0).to(query.dtype),  # [1, Hkv, ctx, D]
            v.transpose(0, 1).unsqueeze(0).to(query.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=heads != kv_heads,
        )
        out[q_lo:q_hi] = o[0].transpose(0, 1)
    return out


def pack_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Gather blocks into one contiguous buffer ``[n, L, 2, bs, Hkv, D]`` (one message)."""
    return kv_cache.index_select(0, block_ids.to(kv_cache.device, torch.long))


def unpack_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Scatter a packed buffer from :func:`pack_blocks` into ``block_ids`` of ``kv_cache``."""
    kv_cache.index_copy_(0, block_ids.to(kv_cache.device, torch.long), packed.to(kv_cache.device))


def block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """``(src start, dst start, length)`` of the maximal runs in which both ids go up by one."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids, strict=True):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(
    src_cache: torch.Tensor,
    src_ids: torch.Tensor,
    dst_cache: torch.Tensor,
    dst_ids: torch.Tensor,
    *,
    wait: bool = True,
) -> None:
    """Copy blocks between two caches of the same block shape (tier moves, swaps).

    Between a device and the host (swaps, demotion, promotion) the device side is gathered or
    scattered in one op on the device and the host side moves in runs of consecutive blocks,
    each one large copy straight out of / into the host cache: no pageable bounce buffer and
    no gather on the host (one CPU thread copying ~25 MB was most of a swap's time). With a
    pinned host cache the copies are asynchronous on the current stream; a copy into the host
    waits for it, so the destination holds the data on return either way — unless ``wait`` is
    False: then a copy into a pinned host cache is only queued on the current stream (the
    caller orders its readers after it, e.g. by an event: ``CpuTier``'s stream-ordered
    demotion).
    """
    if src_cache.device == dst_cache.device:
        unpack_blocks(dst_cache, dst_ids, pack_blocks(src_cache, src_ids))
        return
    n = src_ids.shape[0]
    rows = list(range(n))
    if dst_cache.device.type == "cpu":
        packed = pack_blocks(src_cache, src_ids)  # [n, ...] on the device
        for i, d, k in block_runs(rows, dst_ids.tolist()):
            dst_cache[d : d + k].copy_(packed[i : i + k], non_blocking=True)
        if src_cache.is_cuda and (wait or not dst_cache.is_pinned()):
            torch.cuda.current_stream(src_cache.device).synchronize()
        return
    staged = torch.empty((n, *src_cache.shape[1:]), dtype=src_cache.dtype, device=dst_cache.device)
    for s, i, k in block_runs(src_ids.tolist(), rows):
        staged[i : i + k].copy_(src_cache[s : s + k], non_blocking=True)
    unpack_blocks(dst_cache, dst_ids, staged)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when ``out`` has a non-finite value."""
    out64, ref64 = out.double(), ref.double()
    if not bool(torch.isfinite(out64).all()):
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))
