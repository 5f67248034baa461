"""Torch reference bodies of the sparse-attention ops (LServe page selection, SampleAttention
prefill); the Triton bodies in kernels/triton_sparse.py share their signatures.

Key bounds, one side tensor per KV pool, block-major like the pool itself::

    bounds: [num_blocks, num_layers, 2, num_kv_heads, head_dim]    # 0 = per-channel max, 1 = min

A block's bounds cover the tokens written to it so far. The page score of block n for query q is
``Σ_c max(q_c·kmax_c, q_c·kmin_c)``; since kmax ≥ kmin this is ``q⁺·kmax + q⁻·kmin`` (q⁺ = max(q,
0), q⁻ = min(q, 0)), two dot products, an upper bound on ``q·k`` for every key k in the block.

A selection is a compacted per-(sequence, KV head) block table: ``tables[b, g, :]`` lists the
physical blocks to read in ascending logical order, ending with the sequence's last (partial)
block, and ``lens[b, g]`` is the number of tokens they hold, so every listed block but the last
is full and token t of the selection lives in ``tables[b, g, t // bs]`` at offset ``t % bs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_bounds(
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_ids: torch.Tensor,  # [N] physical blocks
    fills: torch.Tensor,  # [N] tokens written to each (1..bs)
) -> torch.Tensor:  # [N, 2, Hkv, D] (max, min) over the first fills[i] tokens
    bs = kv_cache.shape[3]
    keys = kv_cache[:, layer, 0].index_select(0, block_ids.long())  # [N, bs, Hkv, D]
    valid = torch.arange(bs, device=keys.device)[None, :] < fills[:, None].to(keys.device)
    valid = valid[:, :, None, None]
    big = torch.finfo(keys.dtype).max
    kmax = torch.where(valid, keys, -big).amax(1)
    kmin = torch.where(valid, keys, big).amin(1)
    return torch.stack((kmax, kmin), 1)


def update_bounds(
    bounds: torch.Tensor,  # [num_blocks, L, 2, Hkv, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    slot_mapping: torch.Tensor,  # [T] the slots just written (no -1 padding); in block order
) -> None:
    """Fold the keys just written into their blocks' bounds; a write at offset 0 restarts the
    block (it was free or reused), so stale bounds of a recycled block never survive. Sparse
    steps run eagerly, never padded, so every slot is real (no filtering: no host sync)."""
    bs = kv_cache.shape[3]
    slots = slot_mapping.long()
    blocks, offs = slots // bs, slots % bs
    key = kv_cache[blocks, layer, 0, offs].to(bounds.dtype)  # [T, Hkv, D]
    fresh = (offs == 0)[:, None, None]
    old = bounds[blocks, layer]  # [T, 2, Hkv, D]
    kmax = torch.where(fresh, key, torch.maximum(old[:, 0], key))
    kmin = torch.where(fresh, key, torch.minimum(old[:, 1], key))
    bounds[blocks, layer] = torch.stack((kmax, kmin), 1)


def block_scores(
    query: torch.Tensor,  # [B, H, D]
    bounds: torch.Tensor,  # [num_blocks, L, 2, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, MB]
) -> torch.Tensor:  # [B, Hkv, MB] float32, max over the query heads sharing each KV head
    batch, heads, dim = query.shape
    kv_heads, mb = bounds.shape[3], block_tables.shape[1]
    kb = bounds[:, layer].index_select(0, block_tables.reshape(-1).long()).float()
    kb = kb.view(batch, mb, 2, kv_heads, dim)
    q = query.float().view(batch, kv_heads, heads // kv_heads, dim)
    s = torch.einsum("bhgd,bnhd->bhgn", q.clamp(min=0), kb[:, :, 0])
    s = s + torch.einsum("bhgd,bnhd->bhgn", q.clamp(max=0), kb[:, :, 1])
    return s.amax(2)


def sparse_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    tables: torch.Tensor,  # [B, Hkv, NSEL] physical blocks of each (sequence, KV head)
    lens: torch.Tensor,  # [B, Hkv] tokens the selection holds
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    """Decode attention of each KV head's query group over its selected blocks only."""
    batch, heads, dim = query.shape
    bs, kv_heads = kv_cache.shape[3], kv_cache.shape[4]
    nsel = tables.shape[2]
    per_head = kv_cache[:, layer].transpose(2, 3)  # [num_blocks, 2, Hkv, bs, D] (a view)
    heads_idx = torch.arange(kv_heads, device=tables.device)[None, :, None]
    kv = per_head[tables.long(), :, heads_idx]  # [B, Hkv, NSEL, 2, bs, D]
    kv = kv.transpose(3, 2).reshape(batch, kv_heads, 2, nsel * bs, dim).to(query.dtype)
    mask = torch.arange(nsel * bs, device=query.device)[None, None, :] < lens[..., None]
    out = F.scaled_dot_product_attention(
        query.view(batch, kv_heads, heads // kv_heads, dim),  # the group as query rows
        kv[:, :, 0],
        kv[:, :, 1],
        attn_mask=mask[:, :, None, :],
        scale=scale,
    )  # [B, Hkv, G, D]
    return out.reshape(batch, heads, dim)


def prefill_mask(
    query_pos: torch.Tensor,  # [n] positions of the new tokens
    ctx: int,
    keep: torch.Tensor,  # [H, NKB] bool: key column blocks every row of the head may read
    window: torch.Tensor,  # [H] int: a row reads keys less than `window` tokens behind it
    col_block: int,
) -> torch.Tensor:  # [H, n, ctx] bool, causal ∩ (window ∪ kept columns)
    k_pos = torch.arange(ctx, device=query_pos.device)
    causal = k_pos[None, :] <= query_pos[:, None]
    near = (query_pos[:, None] - k_pos[None, :])[None] < window[:, None, None]
    cols = keep[:, k_pos // col_block]  # [H, ctx]
    return causal[None] & (near | cols[:, None, :])


def sparse_prefill_attention(
    query: torch.Tensor,  # [T, H, D] packed
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: torch.Tensor,  # [B + 1]
    context_lens: torch.Tensor,  # [B]
    scale: float,
    keep: torch.Tensor,  # [B, H, NKB] bool (NKB * col_block >= every context)
    window: torch.Tensor,  # [B, H] int
    col_block: int,
) -> torch.Tensor:  # [T, H, D]
    """paged_prefill_attention restricted to :func:`prefill_mask` (heads in chunks that keep the
    score matrix near 2**27 elements)."""
    heads, kv_heads = query.shape[1], kv_cache.shape[4]
    group = heads // kv_heads
    out = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), context_lens.tolist()
    for i, ctx in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        n = q_hi - q_lo
        if n == 0:
            continue
        k, v = gather_kv(kv_cache, layer, block_tables[i], ctx)  # [ctx, Hkv, D]
        k = k.to(query.dtype).repeat_interleave(group, 1).transpose(0, 1)  # [H, ctx, D]
        v = v.to(query.dtype).repeat_interleave(group, 1).transpose(0, 1)
        q = query[q_lo:q_hi].transpose(0, 1)  # [H, n, D]
        q_pos = torch.arange(ctx - n, ctx, device=query.device)
        step = max(1, (1 << 27) // max(1, n * ctx))
        for h in range(0, heads, step):
            hs = slice(h, h + step)
            mask = prefill_mask(q_pos, ctx, keep[i, hs], window[i, hs], col_block)
            o = F.scaled_dot_product_attention(q[hs], k[hs], v[hs], attn_mask=mask, scale=scale)
            out[q_lo:q_hi, hs] = o.transpose(0, 1)
    return out


def gather_kv(
    kv_cache: torch.Tensor, layer: int, table: torch.Tensor, ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V: [ctx, Hkv, D] of one sequence
    bs, kv_heads, dim = kv_cache.shape[3], kv_cache.shape[4], kv_cache.shape[5]
    nb = -(-ctx // bs)
    kv = kv_cache[:, layer].index_select(0, table[:nb].long())  # [nb, 2, bs, Hkv, D]
    k = kv[:, 0].reshape(nb * bs, kv_heads, dim)[:ctx]
    v = kv[:, 1].reshape(nb * bs, kv_heads, dim)[:ctx]
    return k, v
