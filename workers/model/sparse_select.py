"""Which KV blocks a sparse head reads: pure tensor functions, no state (workers/model/sparse_attention.py
holds the state and calls these).

Decode (LServe). Every (sequence, KV head) reads, in logical blocks of a context of nb blocks::

    [0 .. S)            sink           always
    top-K of [S, nb-W)  middle         dense heads: by block score; streaming heads: K = 0
    [nb-W .. nb)        local          always; the last block is the partial one being written

so a dense head reads exactly sink (S·bs) + budget (K·bs) + local ((W-1)·bs + the last block's
tokens) at a refresh step, and a context of at most S + K + W blocks is read whole. The middle
top-K: the top R·K blocks by their bound score (a shortlist, ``select_topk``), re-ranked by the
exact ``max q·k`` over their keys (``rerank_topk``); R = 1 is LServe's bound-only selection. While a
selection is reused, the block that has left the local window since (at most one) is read too.

Prefill (SampleAttention). Per query head: sample every ``stride``-th new row (~5%), average
their causal attention over the key columns, sum it per column block, and keep the fewest blocks
whose share reaches ``alpha``; the mask is (local window ∪ kept blocks) ∩ causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay import kernels

BIG = 1 << 30


@dataclass(frozen=True, slots=True)
class HeadShape:
    """Blocks a head reads in decode: sink S, middle top-K, local W (W >= 1: the last block)."""

    sink: int
    topk: int
    local: int

    @property
    def width(self) -> int:
        return self.sink + self.topk + self.local


def num_blocks(context_lens: torch.Tensor, bs: int) -> torch.Tensor:
    return (context_lens.long() + bs - 1) // bs


def select_topk(
    scores: torch.Tensor,  # [B, Hkv, MB] page scores over logical blocks
    context_lens: torch.Tensor,  # [B]
    bs: int,
    shape: HeadShape,
) -> torch.Tensor:  # [B, Hkv, K'] logical blocks, K' = min(K, MB)
    """The top-K middle blocks by score (meaningless, and ignored, when the context is short)."""
    nb = num_blocks(context_lens, bs)[:, None]
    j = torch.arange(scores.shape[2], device=scores.device)[None, :]
    middle = (j >= shape.sink) & (j < nb - shape.local)  # [B, MB]
    masked = scores.masked_fill(~middle[:, None, :], float("-inf"))
    return masked.topk(min(shape.topk, scores.shape[2]), dim=-1).indices


def rerank_topk(
    short: torch.Tensor,  # [B, Hkv, R] logical blocks shortlisted by select_topk
    exact: torch.Tensor,  # [B, Hkv, R] their exact scores (max q·k over the block's keys)
    context_lens: torch.Tensor,  # [B]
    bs: int,
    shape: HeadShape,
) -> torch.Tensor:  # [B, Hkv, K'] logical, K' = min(K, R)
    """The top-K of the shortlist by exact score; shortlisted blocks outside the middle (picked
    only because the middle of a short context has fewer than R blocks) never win."""
    nb = num_blocks(context_lens, bs)[:, None, None]
    middle = (short >= shape.sink) & (short < nb - shape.local)
    exact = exact.masked_fill(~middle, float("-inf"))
    return short.gather(-1, exact.topk(min(shape.topk, short.shape[-1]), dim=-1).indices)


def _candidates(
    nb: torch.Tensor,  # [B] blocks in each context
    topk: torch.Tensor | None,  # [B, Hkv, K'] logical, or None when shape.topk == 0
    kv_heads: int,
    shape: HeadShape,
    width: int,  # pad to this many columns
    refresh_nb: torch.Tensor | None,  # [B] blocks when topk was chosen (None: now)
) -> torch.Tensor:  # [B, Hkv, width] logical block ids ascending, BIG = unused
    dev = nb.device
    batch = nb.shape[0]
    n = nb[:, None, None]
    sink = torch.arange(shape.sink, device=dev).expand(batch, kv_heads, -1)
    local = n - shape.local + torch.arange(shape.local, device=dev)
    local = local.expand(batch, kv_heads, -1)
    parts = [sink]
    if topk is not None and topk.shape[2] > 0:
        keep = (topk >= shape.sink) & (topk < n - shape.local)  # a reused pick may now be local
        parts.append(torch.where(keep, topk.long(), BIG))
        # A reused selection never saw the block that left the local window since it was made
        # (at most one: reuse_steps <= block size): read it too, it is the most recent past.
        if refresh_nb is not None:
            gap = (refresh_nb[:, None, None] - shape.local).expand(batch, kv_heads, 1)
            fresh = (gap < n - shape.local) & (gap >= shape.sink)
            parts.append(torch.where(fresh, gap, BIG))
    parts.append(local)
    spread = torch.cat(parts, -1)
    whole = torch.arange(spread.shape[2], device=dev).expand(batch, kv_heads, -1)
    whole = torch.where(whole < n, whole, BIG)
    cand = torch.where(n <= shape.width, whole, spread).sort(-1).values
    if cand.shape[2] < width:
        cand = torch.cat([cand, cand.new_full((batch, kv_heads, width - cand.shape[2]), BIG)], -1)
    return cand


def build_tables(
    context_lens: torch.Tensor,  # [B] tokens, the new one included
    block_tables: torch.Tensor,  # [B, MB] physical
    topk: torch.Tensor | None,  # [B, Hkv, K'] dense heads' middle picks (logical)
    streaming: torch.Tensor | None,  # [Hkv] bool: this layer's streaming heads; None: none
    dense: HeadShape,
    stream: HeadShape,
    bs: int,
    kv_heads: int,
    refresh_nb: torch.Tensor | None = None,  # [B] blocks when ``topk`` was chosen
) -> tuple[torch.Tensor, torch.Tensor]:  # tables [B, Hkv, NSEL] int32 physical, lens [B, Hkv]
    nb = num_blocks(context_lens, bs)
    width = max(dense.width + 1, stream.width if streaming is not None else 0)
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


def sample_columns(
    query: torch.Tensor,  # [n, H, D] new rows of one sequence (positions ctx-n .. ctx-1)
    keys: torch.Tensor,  # [ctx, Hkv, D]
    scale: float,
    col_block: int,
    alpha: float = 0.95,
    stride: int = 20,  # sample 1 row in 20 (5%)
) -> tuple[torch.Tensor, torch.Tensor]:  # keep [H, NKB] bool, sampled mass kept [H]
    """SampleAttention column choice; NKB = ceil(ctx / col_block)."""
    blocks = kernels.sampled_column_mass(query, keys, scale, col_block, stride)
    return keep_columns(blocks, alpha)


def keep_columns(
    blocks: torch.Tensor,  # [H, NKB] sampled attention mass per column block
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # keep [H, NKB] bool, share of the mass kept [H]
    """The fewest column blocks of each head whose share of the sampled mass reaches alpha."""
    blocks = blocks / blocks.sum(-1, keepdim=True)
    ordered, order = blocks.sort(-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the blocks ranked above
    take = before < alpha
    keep = torch.zeros_like(take).scatter_(-1, order, take)
    return keep, (ordered * take).sum(-1)
