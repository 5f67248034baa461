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
from kvrelay.kernels import sparse_reference


@dataclass(frozen=True, slots=True)
class HeadShape:
    """Blocks a head reads in decode: sink S, middle top-K, local W (W >= 1: the last block)."""

    sink: int
    topk: int
    local: int

    @property
    def width(self) -> int:
        return self.sink + self.topk + self.local

    @property
    def parts(self) -> tuple[int, int, int]:
        return self.sink, self.topk, self.local


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
    """The torch reference of ``kernels.sparse_tables``, with head shapes."""
    return sparse_reference.sparse_tables(
        context_lens, block_tables, topk, streaming, refresh_nb, dense.parts, stream.parts, bs,
        kv_heads,
    )  # fmt: skip


class DecodeStep:
    """The selection work of one decode step that depends on its batch alone (context lengths,
    block tables), done once at the step's first layer and shared by every layer, so that a
    layer pays a few ops: a selection is one ``kernels.topk_blocks`` (+ the re-rank: the
    shortlist's exact scores, read through the block table, one more ``topk_blocks``), its
    tables one ``kernels.sparse_tables`` (the picks ascending, as ``topk_blocks`` writes them). Equal, as sets of middle blocks, to :func:`select_topk`,
    :func:`rerank_topk` and :func:`build_tables` (tests/unit/test_sparse_select.py checks)."""

    def __init__(
        self,
        context_lens: torch.Tensor,  # [B] tokens, the new one included
        block_tables: torch.Tensor,  # [B, MB] int32 physical
        dense: HeadShape,
        stream: HeadShape,
        bs: int,
        kv_heads: int,
        refresh_nb: torch.Tensor | None,  # [B] blocks when the reused picks were made; None: now
    ) -> None:
        self.context_lens, self.block_tables = context_lens, block_tables
        self.dense, self.stream, self.bs, self.kv_heads = dense, stream, bs, kv_heads
        self.refresh_nb = refresh_nb
        self.nb = num_blocks(context_lens, bs)  # [B]
        self.hi = self.nb - dense.local  # [B] the middle is [sink, hi)

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:  # [B, Hkv, min(k, MB)]
        """select_topk over scores ``[B, Hkv, MB]`` (unordered)."""
        return kernels.topk_blocks(scores, k, self.dense.sink, self.hi)

    def rerank(self, short: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        """rerank_topk: the top-K of the shortlist by exact score, middle blocks first."""
        return kernels.topk_blocks(exact, self.dense.topk, self.dense.sink, self.hi, ids=short)

    def tables(
        self,
        topk: torch.Tensor | None,  # [B, Hkv, K'] the layer's dense picks (logical), ascending
        streaming: torch.Tensor | None,  # [Hkv] bool: the layer's streaming heads; None: none
        reused: bool,  # the picks were made at an earlier step (refresh_nb's)
    ) -> tuple[torch.Tensor, torch.Tensor]:  # tables [B, Hkv, NSEL] int32, lens [B, Hkv] int32
        """build_tables."""
        return kernels.sparse_tables(
            self.context_lens, self.block_tables, topk, streaming,
            self.refresh_nb if reused else None, self.dense.parts, self.stream.parts, self.bs,
            self.kv_heads,
        )  # fmt: skip


def sample_columns(
    query: torch.Tensor,  # [n, H, D] new rows of one sequence (positions ctx-n .. ctx-1)
    keys: torch.Tensor,  # [ctx, Hkv, D]
    scale: float,
    col_block: int,
    alpha: float = 0.95,
    stride: int = 20,  # sample 1 row in 20 (5%)
    last: int = 0,  # the last rows, every one sampled, choose columns of their own too
) -> tuple[torch.Tensor, torch.Tensor]:  # keep [H, NKB] bool, strided sample's mass kept [H]
    """SampleAttention column choice; NKB = ceil(ctx / col_block).

    With ``last`` > 0, the fewest columns that reach ``alpha`` of the last ``last`` rows' own
    attention join those of the strided sample (MInference estimates its patterns from the last
    64 queries alone). The strided sample holds only 1 in 20 of those rows, and its early rows'
    mass sits on the first columns, so a column that only the prompt's end reads (a pass key the
    closing question asks for) can fall outside alpha: it did for 2 of 8 pass keys at 4k on
    SmolLM2-135M (benchmarks/README.md, session 46)."""
    blocks = kernels.sampled_column_mass(query, keys, scale, col_block, stride)
    keep, share = keep_columns(blocks, alpha)
    if last > 0:
        tail = kernels.sampled_column_mass(query[-last:], keys, scale, col_block, 1)
        keep |= keep_columns(tail, alpha)[0]
        share = (blocks * keep).sum(-1) / blocks.sum(-1)
    return keep, share


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
