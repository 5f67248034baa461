"""Sparse decode steps as CUDA graphs capture them (SparseAttention.static_step), run on CPU with
the torch references: which steps may replay a graph (``capturable``), and that a step taken the
static way — over a padded bucket (padding rows of context 0 and slot -1, stale table rows, a
wider table), keys folded at the step's last layer, selected tokens summed on the device — gives
the very outputs, counters and key bounds of the eager path. The capture itself needs a GPU:
tests/gpu/test_sparse_graphs_gpu.py."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from kvrelay.workers.model.llama import AttentionMetadata
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig
from kvrelay_testing.sparse import next_decode_step

BS, LAYERS, HKV, GROUP, D = 16, 2, 2, 2, 8
SCALE = 0.3


def _config(reuse_steps: int = 1, mode: str = "decode", shortlist_steps: int = 1) -> SparseConfig:
    return SparseConfig(mode=mode, budget=2 * BS, page_tokens=BS, stream_sink=BS,
                        stream_local=2 * BS, reuse_steps=reuse_steps,
                        shortlist_steps=shortlist_steps)  # fmt: skip


def test_capturable_steps() -> None:
    kv = torch.zeros(8, LAYERS, 2, BS, HKV, D)
    sparse = SparseAttention(_config(reuse_steps=2), kv)
    decisions = []
    for keys, is_decode in [
        (("a",), False),  # a prefill step
        (("a",), True),  # a's first decode: its bounds are rebuilt (fresh rows)
        (("a",), True),  # steady, selection reused (reuse_steps 2)
        (("a",), True),  # steady, refreshing
        (("a", "b"), True),  # b joins: fresh
        (("a", "b"), True),  # reused
        (("a", "b"), True),  # refreshing
        (("a",), True),  # b left: the batch changed, a refresh with no fresh row
        (("a",), False),  # a chunked step in between
        (("a",), True),  # every row fresh again
    ]:
        sparse.begin_step(keys, [40] * len(keys), is_decode)
        decisions.append(sparse.capturable() if is_decode else None)
    assert decisions == [None, False, False, True, False, False, True, True, None, False]
    every_step = SparseAttention(_config(), kv)
    every_step.begin_step(("a",), [40], True)
    assert not every_step.capturable()
    every_step.begin_step(("a",), [40], True)
    assert every_step.capturable()  # reuse_steps 1: every steady step refreshes
    prefill_only = SparseAttention(_config(mode="prefill"), kv)
    prefill_only.begin_step(("a",), [40], True)
    assert prefill_only.capturable()  # decode is dense


def _padded(attn: AttentionMetadata, size: int, width: int, g: torch.Generator):
    """The metadata of a graph bucket: rows past the batch are padding (context 0, slot -1, a
    stale table row), every table row is ``width`` wide."""
    n, mb = attn.block_tables.shape
    tables = torch.randint(1, 60, (size, width), generator=g, dtype=torch.int32)  # stale rows
    tables[:n] = 0
    tables[:n, :mb] = attn.block_tables
    slots = torch.full((size,), -1, dtype=torch.int64)
    slots[:n] = attn.slot_mapping
    ctx = torch.zeros(size, dtype=torch.int32)
    ctx[:n] = attn.context_lens
    qsl = torch.arange(size + 1, dtype=torch.int32)
    return AttentionMetadata(slots, tables, ctx, qsl, True)


@pytest.mark.parametrize(("reuse_steps", "shortlist_steps"), [(1, 1), (3, 1), (1, 3)])
def test_static_steps_equal_the_eager_path(reuse_steps: int, shortlist_steps: int) -> None:
    """shortlist_steps 3: the steps between refreshes re-rank the refresh's shortlist, from the
    refresh graph's static shortlists when that graph made it (in its bucket), else eagerly."""
    g = torch.Generator().manual_seed(13)
    kv = torch.randn(60, LAYERS, 2, BS, HKV, D, generator=g)  # block 0: never owned
    kv_graph = kv.clone()
    streaming = torch.tensor([[False, True], [False, False]])
    config = _config(reuse_steps, shortlist_steps=shortlist_steps)
    eager = SparseAttention(config, kv, streaming)
    graphed = SparseAttention(config, kv_graph, streaming)
    seqs = {"a": [150, list(range(1, 14))], "b": [90, list(range(14, 22))]}
    free = list(range(22, 60))
    static_steps = compared = 0
    bucket_of: dict[int, tuple[int, int]] = {}  # id(replayed refresh) -> its (size, width)
    for step in range(30):
        if step == 9:  # b leaves; c joins on b's recycled blocks
            free = seqs.pop("b")[1] + free
            seqs["c"] = [200, free[:13]]
            free = free[13:]
            fresh = torch.randn(13, LAYERS, 2, BS, HKV, D, generator=g)
            kv[torch.tensor(seqs["c"][1])] = kv_graph[torch.tensor(seqs["c"][1])] = fresh
        if step == 14:  # d joins
            seqs["d"] = [70, free[:5]]
            free = free[5:]
        if step == 24:  # c's table outgrows the bucket (a spare block) between two selections
            seqs["c"][1].append(free.pop(0))
        if step == 19:  # a chunked prefill step in between
            for sp in (eager, graphed):
                sp.begin_step(list(seqs), [n for n, _ in seqs.values()], False)
            continue
        ctx, attn = next_decode_step(seqs, free, BS)
        slots, n, width = attn.slot_mapping, len(ctx), attn.block_tables.shape[1]
        for sp in (eager, graphed):
            sp.begin_step(tuple(seqs), ctx, True)
        size = 1 << n.bit_length()  # at least one padding row
        padded = _padded(attn, size, width + 3, g)
        # as DecodeGraphs.run: a reusing step replays only in the bucket of the refresh it reuses
        reuses = graphed.reused_picks()
        static = graphed.capturable() and (reuses is None or bucket_of[id(reuses)] == (size, width))
        if static:
            graphed.fold_pending(kv_graph)
        with graphed.static_step(reuses) if static else nullcontext() as captured:
            for layer in range(LAYERS):
                blocks, offs = slots // BS, slots % BS
                new = torch.randn(n, 2, HKV, D, generator=g)  # this layer's K, V
                kv[blocks, layer, :, offs] = kv_graph[blocks, layer, :, offs] = new
                q = torch.randn(size, HKV * GROUP, D, generator=g)
                want = eager.decode(layer, q[:n], kv, attn, SCALE)
                if static:
                    got = graphed.decode(layer, q, kv_graph, padded, SCALE)[:n]
                else:
                    got = graphed.decode(layer, q[:n], kv_graph, attn, SCALE)
                assert torch.equal(got, want), (step, layer, static)
                compared += 1
        if captured is not None:
            graphed.replayed(captured, n)
            bucket_of[id(captured)] = (size, width)
            static_steps += 1
    assert compared == 29 * LAYERS
    # eager: the first step, the two joins and the step after the prefill (fresh rows); with
    # reuse_steps 3 also the steps reusing those eager selections (8) and the two after c's
    # table outgrew its bucket (steps 24, 25)
    assert static_steps == (25 if reuse_steps == shortlist_steps == 1 else 15), static_steps
    assert graphed.stats_extra() == eager.stats_extra()
    for n, blocks in seqs.values():  # every full block's bounds (the last one's may lag)
        full = torch.tensor(blocks[: (n - 1) // BS])
        assert torch.equal(graphed.bounds[full], eager.bounds[full])
