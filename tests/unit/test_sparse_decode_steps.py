"""SparseAttention's decode over many steps (keys folded into the bounds one step late for all
layers at once, selection skeletons shared by the layers of a step) against a from-scratch oracle
built from the references: every layer call recomputes the bounds of the whole context, selects
(select_topk, exact rerank_topk), builds its tables (build_tables) and attends. Outputs must be
bit-equal through refresh and reuse steps, contexts crossing blocks, a sequence leaving while
another joins on its recycled blocks, and a non-decode step between decode steps. With
``shortlist_steps`` > 1 the oracle keeps each refresh's shortlist and, at the steps between,
re-ranks it by brute force with the step's own query (exact max q·k over every key)."""

from __future__ import annotations

from dataclasses import replace

import pytest
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
        self.short: dict[int, torch.Tensor] = {}  # shortlist_steps > 1: the refresh's shortlist

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
            self.short[layer] = short
        elif sp.config.shortlist_steps > 1:
            self.topk[layer] = self.brute_rerank(layer, q, kv, attn, self.short[layer])
        streaming = sp.streaming[layer] if sp.has_streaming[layer] else None
        sel, lens = build_tables(ctx, tables, self.topk[layer], streaming, sp.dense, sp.stream,
                                 BS, HKV, self.nb_at[layer])  # fmt: skip
        return ref.sparse_decode_attention(q, kv, layer, sel, lens, SCALE)

    def brute_rerank(self, layer: int, q: torch.Tensor, kv: torch.Tensor,
                     attn: AttentionMetadata, short: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """[B, Hkv, K] the K shortlisted middle blocks of highest max q·k over their keys, for
        this step's query, one (sequence, KV head) at a time."""
        sp, out = self.sparse, []
        for b, n in enumerate(attn.context_lens.tolist()):
            k, _ = ref.gather_kv(kv, layer, attn.block_tables[b], n)  # [n, Hkv, D]
            nb = -(-n // BS)
            rows = []
            for h in range(HKV):
                qk = (q[b, h * GROUP : (h + 1) * GROUP] @ k[:, h].T).amax(0)  # [n]
                best = [float(qk[j * BS : (j + 1) * BS].max()) for j in range(nb)]
                middle = [int(j) for j in short[b, h] if sp.dense.sink <= j < nb - sp.dense.local]
                rows.append(sorted(sorted(middle, key=lambda j: -best[j])[: sp.dense.topk]))
            out.append(rows)
        return torch.tensor(out)


@pytest.mark.parametrize(("reuse_steps", "shortlist_steps"), [(1, 1), (2, 1), (1, 2), (1, 3)])
def test_decode_steps_equal_the_per_layer_oracle(reuse_steps: int, shortlist_steps: int) -> None:
    g = torch.Generator().manual_seed(11)
    kv = torch.randn(60, LAYERS, 2, BS, HKV, D, generator=g)  # block 0: padding, never owned
    streaming = torch.tensor([[False, True], [False, False]])
    config = SparseConfig(mode="decode", budget=2 * BS, page_tokens=BS, stream_sink=BS,
                          stream_local=2 * BS, reuse_steps=reuse_steps,
                          shortlist_steps=shortlist_steps)  # fmt: skip
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
        refresh = keys != prev or age >= max(reuse_steps, shortlist_steps)
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
    assert compared == 25 * LAYERS
    assert refreshes == 25 if reuse_steps == shortlist_steps == 1 else 8 <= refreshes < 25
    stats = sparse.stats_extra()
    assert stats["sparse_decode_layer_steps"] == compared
    assert 0.0 < stats["sparse_decode_read_fraction"] < 1.0


def test_shortlist_refreshes_on_schedule_and_on_batch_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """shortlist_steps 3: the bound scores over every block (block_scores without ``ids``) run
    at the first step, every third step after, and at once when the batch changes or a prefill
    step comes between; every step scores a shortlist exactly (block_scores with ``ids``)."""
    from kvrelay import kernels

    calls: list[bool] = []  # per block_scores call: scored over every block (a refresh)
    scores = kernels.block_scores

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw.get("ids") is None)
        return scores(*args, **kw)

    monkeypatch.setattr(kernels, "block_scores", spy)
    g = torch.Generator().manual_seed(5)
    kv = torch.randn(60, LAYERS, 2, BS, HKV, D, generator=g)
    config = SparseConfig(mode="decode", budget=2 * BS, page_tokens=BS, stream_sink=BS,
                          stream_local=2 * BS, shortlist_steps=3)  # fmt: skip
    sparse = SparseAttention(config, kv)
    seqs = {"a": [150, list(range(1, 14))], "b": [90, list(range(14, 22))]}
    free = list(range(22, 60))
    full: list[bool] = []
    for step in range(10):
        if step == 4:  # b leaves: the batch changed
            free = seqs.pop("b")[1] + free
        if step == 8:  # a prefill step in between
            sparse.begin_step(list(seqs), [n for n, _ in seqs.values()], False)
        ctx, attn = next_decode_step(seqs, free, BS)
        sparse.begin_step(tuple(seqs), ctx, True)
        calls.clear()
        for layer in range(LAYERS):
            q = torch.randn(len(ctx), HKV * GROUP, D, generator=g)
            sparse.decode(layer, q, kv, attn, SCALE)
        assert calls.count(False) == LAYERS, step  # the exact re-rank, every step
        assert calls.count(True) in (0, LAYERS), step
        full.append(calls.count(True) == LAYERS)
    assert full == [True, False, False, True, True, False, False, True, True, False]


def test_shortlist_steps_config() -> None:
    assert SparseConfig().shortlist_steps == 1  # the default: today's selection every step
    with pytest.raises(ValueError, match="shortlist_steps"):
        SparseConfig(shortlist_steps=0)
    with pytest.raises(ValueError, match="reuse_steps 1"):
        SparseConfig(shortlist_steps=2, reuse_steps=2)
    with pytest.raises(ValueError, match="rerank > 1"):
        SparseConfig(shortlist_steps=2, rerank=1)
    kv = torch.zeros(4, LAYERS, 2, BS, HKV, D)
    with pytest.raises(ValueError, match="block size"):
        SparseAttention(SparseConfig(mode="decode", shortlist_steps=BS + 1), kv)
