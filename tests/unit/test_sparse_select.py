"""Sparse attention decision cores and torch references (kernels/sparse_reference.py,
workers/model/sparse_select.py): selection shape, exact token counts, overlap with the exact top
blocks, and equality with dense attention where the sparse mask keeps everything."""

from __future__ import annotations

from dataclasses import replace

import torch

from kvrelay.kernels import reference as dense
from kvrelay.kernels import sparse_reference as ref
from kvrelay.kernels.reference import rel_err
from kvrelay.workers.model.calibrate_heads import pick_streaming
from kvrelay.workers.model.sparse_select import (
    DecodeStep,
    HeadShape,
    build_tables,
    rerank_topk,
    sample_columns,
    select_topk,
)

BS, HKV, GROUP, D = 16, 2, 3, 32
PAGES = 4  # sub-pages per block


def _cache(num_blocks: int, structured: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(num_blocks, 1, 2, BS, HKV, D, generator=g)
    if structured:  # tokens of a block share a direction, as neighbouring keys do in LLMs
        shared = torch.randn(num_blocks, 1, 1, HKV, D, generator=g)
        kv[:, :, 0] = 0.3 * kv[:, :, 0] + 2 * shared
    return kv


def _bounds(
    kv: torch.Tensor, tables: torch.Tensor, ctx: torch.Tensor, pages: int = PAGES
) -> torch.Tensor:
    bounds = torch.zeros(kv.shape[0], 1, 2, pages, HKV, D)
    for b in range(tables.shape[0]):
        nb = -(-int(ctx[b]) // BS)
        fills = torch.full((nb,), BS)
        fills[-1] = int(ctx[b]) - (nb - 1) * BS
        bounds[tables[b, :nb].long(), 0] = ref.block_bounds(kv, 0, tables[b, :nb], fills, pages)
    return bounds


def _setup(ctx_list: list[int], structured: bool = False):
    mb = max(-(-c // BS) for c in ctx_list)
    kv = _cache(mb * len(ctx_list) + 3, structured)
    perm = torch.randperm(kv.shape[0] - 3, generator=torch.Generator().manual_seed(1)) + 3
    tables = perm[: mb * len(ctx_list)].view(len(ctx_list), mb).to(torch.int32)
    ctx = torch.tensor(ctx_list, dtype=torch.int32)
    q = torch.randn(len(ctx_list), HKV * GROUP, D, generator=torch.Generator().manual_seed(2))
    return kv, tables, ctx, q


def test_bounds_incremental_equal_recomputed() -> None:
    kv, tables, ctx, _ = _setup([45])
    kv2 = torch.cat([kv, -kv], 1)  # two layers, folded by one call
    bounds = torch.full(
        (kv.shape[0], 2, 2, PAGES, HKV, D), 99.0
    )  # stale values of a recycled block
    for t in range(45):
        slot = tables[0, t // BS].long() * BS + t % BS
        ref.update_bounds(bounds, kv2, slot.view(1))
    used = tables[0, :3].long()
    assert torch.equal(bounds[used, :1], _bounds(kv, tables, ctx)[used])
    assert torch.equal(bounds[used, 1:], _bounds(-kv, tables, ctx)[used])


def test_decode_reads_exactly_budget_sink_local() -> None:
    ctx_list = [1000, 777, 64, 129]
    kv, tables, ctx, q = _setup(ctx_list)
    dense_shape = HeadShape(sink=1, topk=8, local=1)  # budget 128 tokens
    stream_shape = HeadShape(sink=2, topk=0, local=3)
    scores = ref.block_scores(q, _bounds(kv, tables, ctx), 0, tables)
    topk = select_topk(scores, ctx, BS, dense_shape)
    streaming = torch.tensor([False, True])
    sel, lens = build_tables(ctx, tables, topk, streaming, dense_shape, stream_shape, BS, HKV)
    for b, c in enumerate(ctx_list):
        last = c - (-(-c // BS) - 1) * BS
        dense_want = min(c, BS + 8 * BS + last) if c > 10 * BS else c
        stream_want = min(c, 2 * BS + 2 * BS + last) if c > 5 * BS else c
        assert lens[b, 0] == dense_want and lens[b, 1] == stream_want, (b, lens[b])
        nb = -(-c // BS)
        assert sel[b, 0, (int(lens[b, 0]) - 1) // BS] == tables[b, nb - 1]  # last block last
        assert sel[b, 1, 0] == tables[b, 0]  # sink first
    # every listed block is distinct
    n = (int(lens[0, 0]) + BS - 1) // BS
    assert len(set(sel[0, 0, :n].tolist())) == n


def test_selection_overlaps_exact_top_blocks() -> None:
    ctx_list = [2048, 1900]
    kv, tables, ctx, q = _setup(ctx_list, structured=True)
    shape = HeadShape(sink=1, topk=16, local=1)
    topk = select_topk(ref.block_scores(q, _bounds(kv, tables, ctx), 0, tables), ctx, BS, shape)
    overlaps = []
    for b, c in enumerate(ctx_list):
        nb = -(-c // BS)
        k, _ = ref.gather_kv(kv, 0, tables[b], c)  # [c, Hkv, D]
        for g in range(HKV):
            qk = q[b, g * GROUP : (g + 1) * GROUP] @ k[:, g].T  # [G, c]
            exact = torch.nn.functional.pad(qk.amax(0), (0, nb * BS - c), value=-1e9)
            exact = exact.view(nb, BS).amax(1)[1 : nb - 1]
            want = set((exact.topk(16).indices + 1).tolist())
            overlaps.append(len(want & set(topk[b, g].tolist())) / 16)
    assert sum(overlaps) / len(overlaps) >= 0.9 and min(overlaps) >= 0.75, overlaps


def test_sparse_decode_whole_selection_equals_dense() -> None:
    ctx_list = [300, 17, 160]
    kv, tables, ctx, q = _setup(ctx_list)
    shape = HeadShape(sink=1, topk=100, local=1)  # budget past every context: read everything
    topk = select_topk(ref.block_scores(q, _bounds(kv, tables, ctx), 0, tables), ctx, BS, shape)
    sel, lens = build_tables(ctx, tables, topk, None, shape, shape, BS, HKV)
    assert torch.equal(lens, ctx[:, None].expand(-1, HKV).to(torch.int32))
    out = ref.sparse_decode_attention(q, kv, 0, sel, lens, 0.2)
    want = dense.paged_decode_attention(q, kv, 0, tables, ctx, 0.2)
    assert rel_err(out, want) < 1e-5


def test_sparse_prefill_full_mask_equals_dense_and_window_masks() -> None:
    ctx_list = [200, 130]
    kv, tables, ctx, _ = _setup(ctx_list)
    qsl = torch.tensor([0, 200, 250], dtype=torch.int32)  # the 2nd has 80 cached tokens
    q = torch.randn(250, HKV * GROUP, D, generator=torch.Generator().manual_seed(3))
    keep = torch.ones(2, HKV * GROUP, 4, dtype=torch.bool)
    window = torch.full((2, HKV * GROUP), 1 << 30, dtype=torch.int32)
    out = ref.sparse_prefill_attention(q, kv, 0, tables, qsl, ctx, 0.2, keep, window, 64)
    want = dense.paged_prefill_attention(q, kv, 0, tables, qsl, ctx, 0.2)
    assert rel_err(out, want) < 1e-5
    keep[:] = False
    window[:] = 1  # each row sees itself only: the output is its own value
    out = ref.sparse_prefill_attention(q, kv, 0, tables, qsl, ctx, 0.2, keep, window, 64)
    _, v = ref.gather_kv(kv, 0, tables[0], 200)
    assert rel_err(out[:200, 0], v[:, 0]) < 1e-5


def test_sample_columns_reaches_alpha() -> None:
    g = torch.Generator().manual_seed(4)
    ctx = 1024
    k = torch.randn(ctx, HKV, D, generator=g)
    k[::97] *= 4  # a few loud keys take most of the attention
    q = torch.randn(ctx, HKV * GROUP, D, generator=g)
    keep, mass = sample_columns(q, k, 0.5, 64, alpha=0.9)
    assert keep.shape == (HKV * GROUP, 16)
    assert bool((mass >= 0.9 - 1e-5).all())
    assert bool((keep.sum(1) < 16).any())  # something was skipped


def test_sample_columns_keeps_what_only_the_last_rows_read() -> None:
    """A column only the prompt's last rows read (a pass key its closing question asks for):
    the strided sample's mass sits on the sink, so alpha leaves the column out; the last rows'
    own choice brings it back, and the strided mass kept still reaches alpha."""
    g = torch.Generator().manual_seed(5)
    ctx, cb, last = 1024, 64, 8
    k = 0.1 * torch.randn(ctx, HKV, D, generator=g)
    k[0, :, 0] = 10.0  # the sink every row reads
    k[530, :, 1] = 10.0  # in column block 8: read by the last rows only
    q = 0.1 * torch.randn(ctx, HKV * GROUP, D, generator=g)
    q[:, :, 0] += 3.0
    q[-last:, :, 0] = 0.0
    q[-last:, :, 1] = 3.0
    without, mass = sample_columns(q, k, 0.5, cb, alpha=0.95)
    assert not bool(without[:, 8].any())  # the strided sample alone drops it
    assert bool((mass >= 0.95 - 1e-5).all())
    keep, mass = sample_columns(q, k, 0.5, cb, alpha=0.95, last=last)
    assert bool(keep[:, 8].all())
    assert bool((keep >= without).all())  # a union: nothing the strided sample kept is lost
    assert bool((mass >= 0.95 - 1e-5).all())
    assert int(keep.sum()) < keep.numel() // 2  # still sparse


def test_only_the_chunk_that_ends_a_prefill_samples_its_last_rows() -> None:
    """The engine prefills in chunks: the last rows of the chunk that ends the prompt (its
    closing question) choose columns of their own; an earlier chunk's last rows do not."""
    from kvrelay.workers.model.llama import AttentionMetadata
    from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig

    g = torch.Generator().manual_seed(5)
    ctx, cb, last = 1024, 64, 8
    k = 0.1 * torch.randn(ctx, HKV, D, generator=g)
    k[0, :, 0] = 10.0
    k[530, :, 1] = 10.0  # column block 8, read by the last rows only
    q = 0.1 * torch.randn(ctx, HKV * GROUP, D, generator=g)
    q[:, :, 0] += 3.0
    q[-last:, :, 0] = 0.0
    q[-last:, :, 1] = 3.0
    kv = torch.zeros(ctx // BS, 1, 2, BS, HKV, D)
    kv[:, 0, 0] = k.view(ctx // BS, BS, HKV, D)
    attn = AttentionMetadata(
        torch.arange(ctx), torch.arange(ctx // BS, dtype=torch.int32)[None],
        torch.tensor([ctx], dtype=torch.int32), torch.tensor([0, ctx], dtype=torch.int32), False,
    )  # fmt: skip
    cfg = SparseConfig(mode="prefill", sample_last=last, min_prefill=256, col_block=cb)
    sparse = SparseAttention(cfg, kv)
    kept = {}
    for ends in (None, [True], [False]):
        sparse.begin_step(["r"], [ctx], False, ends)
        keep, _ = sparse.prefill_masks(0, q, kv, attn, 0.5)
        kept[str(ends)] = bool(keep[0, :, 8].all()), bool(keep[0, :, 8].any())
    assert kept["None"] == kept["[True]"] == (True, True)
    assert kept["[False]"] == (False, False)


def test_reused_selection_reads_the_block_that_left_the_local_window() -> None:
    kv, tables, _, q = _setup([660])  # a table with room to grow
    shape = HeadShape(sink=1, topk=4, local=1)
    at_refresh = torch.tensor([640], dtype=torch.int32)  # 40 full blocks; local = block 39
    scores = ref.block_scores(q, _bounds(kv, tables, at_refresh), 0, tables)
    topk = select_topk(scores, at_refresh, BS, shape)
    assert not bool((topk == 39).any())
    now = torch.tensor([641], dtype=torch.int32)  # block 40 started: 39 is no longer local
    refresh_nb = torch.tensor([40])
    sel, lens = build_tables(now, tables, topk, None, shape, shape, BS, HKV, refresh_nb)
    for g in range(HKV):
        n = -(-int(lens[0, g]) // BS)
        assert int(tables[0, 39]) in sel[0, g, :n].tolist()
        assert int(lens[0, g]) == (1 + 4 + 1) * BS + 1  # sink + top-4 + block 39 + 1 token


def test_keys_as_bounds_score_is_the_exact_block_max() -> None:
    kv, tables, _, q = _setup([200])
    exact = ref.block_scores(q, ref.keys_as_bounds(kv), 0, tables)  # [1, Hkv, MB]
    k, _ = ref.gather_kv(kv, 0, tables[0], 200)
    for g in range(HKV):
        qk = (q[0, g * GROUP : (g + 1) * GROUP] @ k[:, g].T).amax(0)  # [200]
        want = torch.nn.functional.pad(qk, (0, 8), value=-1e9).view(13, BS).amax(1)
        assert torch.allclose(exact[0, g, :12], want[:12], atol=1e-4)  # the full blocks


def test_sub_pages_tighten_the_bound_and_rerank_finds_the_exact_top() -> None:
    kv, tables, ctx, q = _setup([1500])
    shape = HeadShape(sink=1, topk=10, local=1)
    exact = ref.block_scores(q, ref.keys_as_bounds(kv), 0, tables)
    coarse = ref.block_scores(q, _bounds(kv, tables, ctx, pages=1), 0, tables)
    fine = ref.block_scores(q, _bounds(kv, tables, ctx, pages=PAGES), 0, tables)
    nb = -(-1500 // BS)
    # every bound is above the exact max, and sub-pages never loosen it
    assert bool((fine[..., :nb] >= exact[..., :nb] - 1e-4).all())
    assert bool((coarse[..., :nb] >= fine[..., :nb] - 1e-4).all())
    want = select_topk(exact, ctx, BS, shape).sort(-1).values
    short = select_topk(fine, ctx, BS, HeadShape(1, nb, 1))  # a shortlist of every block
    got = rerank_topk(short, exact.gather(-1, short), ctx, BS, shape).sort(-1).values
    assert torch.equal(got, want)
    # the shortlist's non-middle entries (sink, local, past the context) never win
    assert bool(((got >= 1) & (got < nb - 1)).all())


def test_pick_streaming_never_takes_retrieval_heads() -> None:
    mass = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.95, 0.5]])  # (sink ∪ local) mass on plain text
    assert pick_streaming(mass, 0.5).tolist() == [[True, True, False], [False, True, False]]
    retrieving = torch.tensor([[False, True, False], [False, True, True]])
    got = pick_streaming(mass, 0.5, retrieving)
    assert got.tolist() == [[True, False, True], [True, False, False]]
    # too few heads left: all of them, no more
    assert int(pick_streaming(mass, 0.9, retrieving).sum()) == 3


def _middle_sets(picks: torch.Tensor, lens: torch.Tensor, dense: HeadShape) -> list[list[int]]:
    """Each row's picks inside the middle [sink, nb - local), sorted (what the tables read)."""
    hi = ((lens.long() + BS - 1) // BS - dense.local)[:, None, None]
    inside = (picks >= dense.sink) & (picks < hi)
    rows = zip(picks.flatten(0, 1), inside.flatten(0, 1), strict=True)
    return [sorted(row[ok].tolist()) for row, ok in rows]


def test_decode_step_equals_the_references_on_random_batches() -> None:
    """DecodeStep (kernels.topk_blocks, per-step bounds shared by the layers) picks the very
    middle blocks of select_topk / rerank_topk, and its tables and lens are build_tables' for
    the reference picks: fresh selections, reused ones after the contexts grew (a block may have
    left the local window), short contexts (fewer middle blocks than picks: the rest of the picks
    lie outside and are never read), streaming heads. (On CPU its ops are the references; the
    Triton bodies are checked in tests/unit/test_sparse_interpret.py.)"""
    g = torch.Generator().manual_seed(7)
    short_rows = 0  # trials with a context whose middle is shorter than the shortlist
    for trial in range(40):
        batch = int(torch.randint(1, 5, (1,), generator=g))
        grown = torch.randint(0, 2 * BS, (batch,), generator=g)  # tokens since the refresh
        at_refresh = torch.randint(1, 40 * BS, (batch,), generator=g)
        ctx = (at_refresh + grown).to(torch.int32)
        mb = int(-(-ctx.max() // BS)) + int(torch.randint(0, 3, (1,), generator=g))
        tables = torch.randperm(mb * batch + 5, generator=g)[: mb * batch].view(batch, mb)
        tables = tables.to(torch.int32)
        dense = HeadShape(trial % 3, int(torch.randint(0, 12, (1,), generator=g)), 1 + trial % 2)
        stream = HeadShape(1 + trial % 2, 0, int(torch.randint(1, 20, (1,), generator=g)))
        q = torch.randn(batch, HKV * GROUP, D, generator=g)
        bounds = torch.randn(tables.numel() + 5, 1, 2, PAGES, HKV, D, generator=g)
        scores = ref.block_scores(q, bounds, 0, tables)
        streaming = torch.rand(HKV, generator=g) < 0.5 if trial % 4 else None
        refresh_nb = (at_refresh.long() + BS - 1) // BS
        chosen = DecodeStep(at_refresh, tables, dense, stream, BS, HKV, None)
        exact = torch.randn(batch, HKV, 2 * dense.topk, generator=g)
        topk = got_topk = None
        if dense.topk:
            topk = select_topk(scores, at_refresh, BS, dense)
            got_topk = chosen.select(scores, dense.topk)
            assert got_topk.shape == topk.shape
            assert _middle_sets(got_topk, at_refresh, dense) == _middle_sets(
                topk, at_refresh, dense
            )
            short = select_topk(scores, at_refresh, BS, replace(dense, topk=2 * dense.topk))
            got_short = chosen.select(scores, 2 * dense.topk)
            assert _middle_sets(got_short, at_refresh, dense) == _middle_sets(
                short, at_refresh, dense
            )
            exact = exact[..., : short.shape[2]]
            want = rerank_topk(short, exact, at_refresh, BS, dense)
            got = chosen.rerank(short, exact)
            assert _middle_sets(got, at_refresh, dense) == _middle_sets(want, at_refresh, dense)
            middle = (at_refresh.long() + BS - 1) // BS - dense.sink - dense.local
            short_rows += bool((middle < short.shape[2]).any())
        for step, lens_now, nb_then, reused in (
            (chosen, at_refresh, None, False),
            (DecodeStep(ctx, tables, dense, stream, BS, HKV, refresh_nb), ctx, refresh_nb, True),
        ):
            want_t, want_l = build_tables(
                lens_now, tables, topk, streaming, dense, stream, BS, HKV, nb_then
            )
            got_t, got_l = step.tables(got_topk, streaming, reused)
            assert torch.equal(got_t, want_t) and torch.equal(got_l, want_l), trial
            assert got_t.dtype == want_t.dtype == torch.int32 == got_l.dtype
    assert 5 <= short_rows <= 35  # both regimes: middles longer and shorter than the shortlist
