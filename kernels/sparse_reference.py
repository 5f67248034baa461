"""Torch reference bodies of the sparse-attention ops (LServe page selection, SampleAttention
prefill); the Triton bodies in kernels/triton_sparse.py and kernels/triton_topk.py share their
signatures.

Key bounds, one side tensor per KV pool, block-major like the pool itself::

    bounds: [num_blocks, num_layers, 2, P, num_kv_heads, head_dim]   # 0 = per-channel max, 1 = min

LServe's hierarchical paging: a block (the physical page, ``bs`` tokens) is split into P logical
sub-pages of ``bs / P`` tokens, each with its own per-channel max and min over the tokens written
to it so far. The score of sub-page p for query q is ``Σ_c max(q_c·kmax_c, q_c·kmin_c)``; since
kmax ≥ kmin this is ``q⁺·kmax + q⁻·kmin`` (q⁺ = max(q, 0), q⁻ = min(q, 0)), two dot products, an
upper bound on ``q·k`` for every key k of the sub-page. A block's score is the max over its
sub-pages (and over the query heads sharing the KV head): the smaller the sub-page, the tighter the
bound (P = bs: exactly the block's max ``q·k``). Sub-pages not yet written (past the fill of the
last block, which is always read whole and never scored against the others) hold no meaning.

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
    pages: int,  # P sub-pages per block
) -> torch.Tensor:  # [N, 2, P, Hkv, D] (max, min) of each sub-page over its written tokens
    bs = kv_cache.shape[3]
    keys = kv_cache[:, layer, 0].index_select(0, block_ids.long())  # [N, bs, Hkv, D]
    valid = torch.arange(bs, device=keys.device)[None, :] < fills[:, None].to(keys.device)
    valid = valid[:, :, None, None]
    big = torch.finfo(keys.dtype).max
    kmax = torch.where(valid, keys, -big).unflatten(1, (pages, bs // pages)).amax(2)
    kmin = torch.where(valid, keys, big).unflatten(1, (pages, bs // pages)).amin(2)
    written = valid.unflatten(1, (pages, bs // pages)).any(2)  # [N, P, 1, 1]
    return torch.stack((kmax, kmin), 1).where(written[:, None], 0.0)  # unwritten: 0, not ±big


def update_bounds(
    bounds: torch.Tensor,  # [num_blocks, L, 2, P, Hkv, D]
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] slots written in every layer, distinct blocks; -1: skip
) -> None:
    """Fold the keys written at the slots, in every layer at once, into their sub-pages' bounds;
    a write at a sub-page's first offset restarts it (the block was free or reused), so stale
    bounds of a recycled block never survive a sub-page's first token. Slot -1 (a padding row of
    a step captured in a CUDA graph, where the Triton body runs) folds nothing."""
    bs, pages = kv_cache.shape[3], bounds.shape[3]
    slots = slot_mapping.long()
    slots = slots[slots >= 0]
    blocks, offs = slots // bs, slots % bs
    sub = offs // (bs // pages)
    key = kv_cache[blocks, :, 0, offs].to(bounds.dtype)  # [T, L, Hkv, D]
    fresh = (offs % (bs // pages) == 0)[:, None, None, None]
    old = bounds[blocks, :, :, sub]  # [T, L, 2, Hkv, D]
    kmax = torch.where(fresh, key, torch.maximum(old[:, :, 0], key))
    kmin = torch.where(fresh, key, torch.minimum(old[:, :, 1], key))
    bounds[blocks, :, :, sub] = torch.stack((kmax, kmin), 2)


BIG = 1 << 30  # an unused candidate: sorts after every block


def _candidates(
    nb: torch.Tensor,  # [B] blocks in each context
    topk: torch.Tensor | None,  # [B, Hkv, K'] logical, or None when the shape has no top-K
    kv_heads: int,
    shape: tuple[int, int, int],  # sink, top-K, local blocks
    width: int,  # pad to this many columns
    refresh_nb: torch.Tensor | None,  # [B] blocks when topk was chosen (None: now)
) -> torch.Tensor:  # [B, Hkv, width] logical block ids ascending, BIG = unused
    dev = nb.device
    batch = nb.shape[0]
    n = nb[:, None, None]
    s, _, w = shape
    sink = torch.arange(s, device=dev).expand(batch, kv_heads, -1)
    local = n - w + torch.arange(w, device=dev)
    local = local.expand(batch, kv_heads, -1)
    parts = [sink]
    if topk is not None and topk.shape[2] > 0:
        keep = (topk >= s) & (topk < n - w)  # a reused pick may now be local
        parts.append(torch.where(keep, topk.long(), BIG))
        # A reused selection never saw the block that left the local window since it was made
        # (at most one: reuse_steps <= block size): read it too, it is the most recent past.
        if refresh_nb is not None:
            gap = (refresh_nb[:, None, None] - w).expand(batch, kv_heads, 1)
            fresh = (gap < n - w) & (gap >= s)
            parts.append(torch.where(fresh, gap, BIG))
    parts.append(local)
    spread = torch.cat(parts, -1)
    whole = torch.arange(spread.shape[2], device=dev).expand(batch, kv_heads, -1)
    whole = torch.where(whole < n, whole, BIG)
    cand = torch.where(n <= sum(shape), whole, spread).sort(-1).values
    if cand.shape[2] < width:
        cand = torch.cat([cand, cand.new_full((batch, kv_heads, width - cand.shape[2]), BIG)], -1)
    return cand


def sparse_tables(
    context_lens: torch.Tensor,  # [B] tokens, the new one included
    block_tables: torch.Tensor,  # [B, MB] physical
    topk: torch.Tensor | None,  # [B, Hkv, K'] dense heads' middle picks (logical), ascending
    streaming: torch.Tensor | None,  # [Hkv] bool: this layer's streaming heads; None: none
    refresh_nb: torch.Tensor | None,  # [B] blocks when ``topk`` was chosen; None: now
    dense: tuple[int, int, int],  # sink, top-K, local blocks of a dense head
    stream: tuple[int, int, int],  # ... of a streaming head (top-K 0)
    bs: int,
    kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # tables [B, Hkv, NSEL] int32 physical, lens [B, Hkv]
    """The selection of every (sequence, KV head) as a compacted block table (module doc): in
    logical blocks of a context of nb, sink ``[0, S)``, the picks in the middle ``[S, nb - W)``
    (and, for picks made at an earlier step, the block that left the local window since),
    local ``[nb - W, nb)``, ascending; a context of at most S + K + W blocks whole. NSEL =
    max(S + K + W + 1 of dense heads, that of streaming heads when there are any); unused
    entries repeat the block table's last column. The picks come ascending (``topk_blocks``
    writes them in row order): the Triton body places them in that order; this one sorts."""
    nb = (context_lens.long() + bs - 1) // bs
    width = max(sum(dense) + 1, sum(stream) if streaming is not None else 0)
    cand = _candidates(nb, topk, kv_heads, dense, width, refresh_nb)
    if streaming is not None:
        cand_s = _candidates(nb, None, kv_heads, stream, width, None)
        cand = torch.where(streaming[None, :, None], cand_s, cand)
    count = (cand < BIG).sum(-1)  # [B, Hkv]
    logical = cand.clamp(max=block_tables.shape[1] - 1)
    batch = nb.shape[0]
    tables = block_tables.long().gather(1, logical.view(batch, -1)).view_as(logical)
    last_fill = context_lens.long() - (nb - 1) * bs  # [B]
    lens = (count - 1) * bs + last_fill[:, None]
    return tables.to(torch.int32), lens.to(torch.int32)


def block_scores(
    query: torch.Tensor,  # [B, H, D]
    bounds: torch.Tensor,  # [num_blocks, L, 2, P, Hkv, D]
    layer: int,
    block_tables: torch.Tensor,  # [B, MB] physical, or [B, Hkv, MB]: one table per KV head
    streaming: torch.Tensor | None = None,  # [Hkv] bool: heads not scored (-inf)
    ids: torch.Tensor | None = None,  # [B, Hkv, N] columns of the tables to score; None: all
) -> torch.Tensor:  # [B, Hkv, MB or N] float32: max over the sub-pages and the query group
    """Block scores from the bounds; given :func:`keys_as_bounds` (P = bs, kmax = kmin = k) they
    are the exact ``max q·k`` over each block's keys. Given ``ids`` (logical blocks, e.g. a
    shortlist), the blocks scored are ``block_tables[b, (h,) ids[b, h, n]]`` (the kernel reads
    them through the table: no gathered copy). A streaming head reads no middle blocks, so its
    scores are -inf (the kernel skips its work)."""
    batch, heads, dim = query.shape
    kv_heads = bounds.shape[4]
    if block_tables.dim() == 2:
        block_tables = block_tables[:, None].expand(-1, kv_heads, -1)
    if ids is not None:
        block_tables = block_tables.gather(2, ids.long())
    heads_idx = torch.arange(kv_heads, device=block_tables.device)[None, :, None]
    kb = bounds[:, layer][block_tables.long(), :, :, heads_idx].float()  # [B, Hkv, MB, 2, P, D]
    q = query.float().view(batch, kv_heads, heads // kv_heads, dim)
    s = torch.einsum("bhgd,bhnpd->bhgnp", q.clamp(min=0), kb[:, :, :, 0])
    s = s + torch.einsum("bhgd,bhnpd->bhgnp", q.clamp(max=0), kb[:, :, :, 1])
    scores = s.amax(4).amax(2)
    if streaming is not None:
        scores = scores.masked_fill(streaming.to(scores.device)[None, :, None], float("-inf"))
    return scores


def topk_blocks(
    values: torch.Tensor,  # [B, H, N] float32
    k: int,
    lo: int,  # an element counts if lo <= its id < hi[b]; one outside counts as -inf
    hi: torch.Tensor,  # [B] int
    ids: torch.Tensor | None = None,  # [B, H, N] int: the elements' ids; None: their positions
) -> torch.Tensor:  # [B, H, min(k, N)] int64 ids, in row order
    """The ids of the k largest values whose ids lie in [lo, hi[b]), in the order of their
    positions in the row (ascending ids when ``ids`` is None or ascending: ``sparse_tables``'s
    Triton body needs its picks so). Ties (elements outside the range, when fewer than k lie
    inside, are all -inf) go to the lowest positions first: the kernel breaks them so;
    torch.topk may choose others, but never a different set of inside elements when their
    values are distinct."""
    n = values.shape[2]
    pos = torch.arange(n, device=values.device).expand_as(values)
    ident = pos if ids is None else ids.long()
    inside = (ident >= lo) & (ident < hi.to(values.device).long()[:, None, None])
    v = values.masked_fill(~inside, float("-inf"))
    # a stable descending sort picks the lowest positions among equals (the kernel's rule)
    order = v.sort(dim=-1, descending=True, stable=True).indices[..., : min(k, n)]
    return ident.gather(-1, order.sort(-1).values)


def keys_as_bounds(
    kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
) -> torch.Tensor:  # [num_blocks, L, 2, bs, Hkv, D] view: every key its own sub-page
    """The keys seen as bounds of one-token sub-pages (max = min = the key; a view, no copy), so
    that :func:`block_scores` over them is the exact ``max q·k`` of each block."""
    return kv_cache[:, :, :1].expand(-1, -1, 2, -1, -1, -1)


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


def kept_tiles(
    keep: torch.Tensor,  # [..., NKB] bool or int, per column block
    col_block: int,
    block_n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # [..., NT] bool: some column kept, every column kept
    """Per key tile of ``block_n`` keys, from the keep of ``col_block``-column blocks (the two
    tile sizes nest; columns past the last block count as not kept)."""
    kept = keep != 0
    if block_n <= col_block:
        kept = kept.repeat_interleave(col_block // block_n, -1)
        return kept, kept
    per = block_n // col_block
    kept = F.pad(kept, (0, -kept.shape[-1] % per)).unflatten(-1, (-1, per))
    return kept.any(-1), kept.all(-1)


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


def sampled_column_mass(
    query: torch.Tensor,  # [n, H, D] new rows of one sequence (positions ctx-n .. ctx-1)
    keys: torch.Tensor,  # [ctx, Hkv, D]
    scale: float,
    col_block: int,
    stride: int,
) -> torch.Tensor:  # [H, NKB] float32, NKB = ceil(ctx / col_block)
    """SampleAttention's column statistic: for the sampled rows n-1, n-1-stride, ... (the last row
    included), each row's causal softmax over the keys, summed over the rows and over each
    ``col_block`` of key columns (row chunks keep a chunk's scores near 2**27 elements)."""
    n, heads, dim = query.shape
    ctx, kv_heads = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    rows = torch.arange(n - 1, -1, -stride, device=query.device).flip(0)
    q_pos = ctx - n + rows
    k_pos = torch.arange(ctx, device=query.device)
    row_chunk = max(1, (1 << 27) // (heads * ctx))
    mass = torch.zeros(heads, ctx, device=query.device, dtype=torch.float32)
    k = keys.to(query.dtype).permute(1, 2, 0)  # [Hkv, D, ctx]
    for lo in range(0, rows.numel(), row_chunk):
        qs = query[rows[lo : lo + row_chunk]].permute(1, 0, 2)  # [H, r, D]
        s = torch.matmul(qs.reshape(kv_heads, group * qs.shape[1], dim), k).float() * scale
        s = s.view(heads, -1, ctx)
        causal = k_pos[None, :] <= q_pos[lo : lo + row_chunk, None]
        s = s.masked_fill(~causal[None], float("-inf"))
        mass += torch.softmax(s, -1).sum(1)
    nkb = -(-ctx // col_block)
    return F.pad(mass, (0, nkb * col_block - ctx)).view(heads, nkb, col_block).sum(-1)


def gather_kv(
    kv_cache: torch.Tensor, layer: int, table: torch.Tensor, ctx: int
) -> tuple[torch.Tensor, torch.Tensor]:  # K, V: [ctx, Hkv, D] of one sequence
    bs, kv_heads, dim = kv_cache.shape[3], kv_cache.shape[4], kv_cache.shape[5]
    nb = -(-ctx // bs)
    kv = kv_cache[:, layer].index_select(0, table[:nb].long())  # [nb, 2, bs, Hkv, D]
    k = kv[:, 0].reshape(nb * bs, kv_heads, dim)[:ctx]
    v = kv[:, 1].reshape(nb * bs, kv_heads, dim)[:ctx]
    return k, v
