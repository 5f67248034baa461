"""SparseAttention's decode over many steps (keys folded into the bounds one step late for all
layers at once, selection skeletons shared by the layers of a step) against a from-scratch oracle
built from the references: every layer call recomputes the bounds of the whole context, selects
(select_topk, exact rerank_topk), builds its tables (build_tables) and attends. Outputs must be
bit-equal through refresh and reuse steps, contexts crossing blocks, a sequence leaving while
another joins on its recycled blocks, and a non-decode step between decode steps."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvrelay.kernels import sparse_reference as ref
from kvrelay.workers.model.llama import AttentionMetadata
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig
from kvrelay.workers.model.sparse_select import build_tables, num_blocks, rerank_topk, select_topk
from kvrelay_testing.sparse import next_decode_step

BS, LAYERS, HKV, GROUP, D = 16, 2, 2, 2, 8
SCALE = 0.3


class Oracle:
    """The selection state of the per-layer design: picks and context blocks per layer."""

    def __init__(self, sparse: SparseAttention) -> None:
        self.sparse = sparse
        self.topk: dict[int, torch.Tensor] = {}
        self.nb_at: dict[int, torch.Tensor] = {}

    def decode(self, layer: int, q: torch.Tensor, kv: torch.Tensor, attn: AttentionMetadata,
               refresh: bool) -> torch.Tensor:  # fmt: skip
        sp, ctx, tables = self.sparse, attn.context_lens, attn.block_tables
        bounds = torch.zeros_like(sp.bounds)
        for b, n in enumerate(ctx.tolist()):
            nb = -(-n // BS)
            fills = torch.full((nb,), BS)
            fills[-1] = n - (nb - 1) * BS
            ids = tables[b, :nb]
            bounds[ids.long(), layer] = ref.block_bounds(kv, layer, ids, fills, sp.pages)
            # every block a selection may score holds the bounds of all its keys
            scored = ids[sp.dense.sink : nb - sp.dense.local].long()
            assert torch.equal(sp.bounds[scored, layer], bounds[scored, layer]), (b, layer)
        if refresh or layer not in self.topk:
            scores = ref.block_scores(q, bounds, layer, tables)
            wide = replace(sp.dense, topk=sp.dense.topk * sp.config.rerank)
            short = select_topk(scores, ctx, BS, wide)
            per_head = tables.long().gather(1, short.flatten(1)).view_as(short)
            exact = ref.block_scores(q, ref.keys_as_bounds(kv), layer, per_head)
            self.topk[layer] = rerank_topk(short, exact, ctx, BS, sp.dense)
            self.nb_at[layer] = num_blocks(ctx, BS)
        streaming = sp.streaming[layer] if sp.has_streaming[layer] else None
        sel, lens = build_tables(ctx, tables, self.topk[layer], streaming, sp.dense, sp.stream,
                                 BS, HKV, self.nb_at[layer])  # fmt: skip
        return ref.sparse_decode_attention(q, kv, layer, sel, lens, SCALE)


def test_decode_steps_equal_the_per_layer_oracle() -> None:
    g = torch.Generator().manual_seed(11)
    kv = torch.randn(60, LAYERS, 2, BS, HKV, D, generator=g)  # block 0: padding, never owned
    streaming = torch.tensor([[False, True], [False, False]])
    config = SparseConfig(mode="decode", budget=2 * BS, page_tokens=BS, stream_sink=BS,
                          stream_local=2 * BS, reuse_steps=2)  # fmt: skip
    sparse = SparseAttention(config, kv, streaming)
    oracle = Oracle(sparse)
    # request id -> (context tokens before the step, its blocks)
    seqs = {"a": [150, list(range(1, 14))], "b": [90, list(range(14, 22))]}
    free = list(range(22, 60))
    prev: tuple[str, ...] = ()
    age = 0
    compared = refreshes = 0
    for step in range(26):
        if step == 9:  # b leaves; c joins on b's recycled blocks (its prompt is in the cache)
            free = seqs.pop("b")[1] + free
            seqs["c"] = [200, free[:13]]
            free = free[13:]
            kv[torch.tensor(seqs["c"][1])] = torch.randn(13, LAYERS, 2, BS, HKV, D, generator=g)
        if step == 17:  # a chunked prefill step in between: every row is fresh afterwards
            sparse.begin_step(list(seqs), [n for n, _ in seqs.values()], False)
            prev = ()
            continue
        keys = tuple(seqs)
        ctx, attn = next_decode_step(seqs, free, BS)
        slots = attn.slot_mapping
        refresh = keys != prev or age >= config.reuse_steps
        age = 1 if refresh else age + 1
        prev = keys
        refreshes += refresh
        sparse.begin_step(keys, ctx, True)
        for layer in range(LAYERS):
            blocks, offs = slots // BS, slots % BS
            kv[blocks, layer, :, offs] = torch.randn(
                len(ctx), 2, HKV, D, generator=g
            )  # this layer's K, V
            q = torch.randn(len(ctx), HKV * GROUP, D, generator=g)
            got = sparse.decode(layer, q, kv, attn, SCALE)
            want = oracle.decode(layer, q, kv, attn, refresh)
            assert torch.equal(got, want), (step, layer)
            compared += 1
    assert compared == 25 * LAYERS and 8 <= refreshes < 25  # both kinds of step ran
    stats = sparse.stats_extra()
    assert stats["sparse_decode_layer_steps"] == compared
    assert 0.0 < stats["sparse_decode_read_fraction"] < 1.0
