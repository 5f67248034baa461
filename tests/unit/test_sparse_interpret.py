"""The sparse Triton kernels (kernels/triton_sparse.py, triton_sparse_prefill.py, triton_topk.py,
triton_sample.py) through
Triton's interpreter on CPU, at small sizes, against the torch references
(kernels/sparse_reference.py). Run this file in its own pytest process (as
tests/unit/test_kernels_interpret.py: the interpreter must be chosen before triton is first
imported); tests/gpu/test_sparse_gpu.py runs the same checks compiled."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import replace
from types import ModuleType

import pytest
import torch

from kvrelay.kernels import sparse_reference as ref
from kvrelay.kernels.reference import rel_err
from kvrelay.workers.model.sparse_attention import prefill_tile_pairs
from kvrelay.workers.model.sparse_select import (
    HeadShape,
    build_tables,
    keep_columns,
    rerank_topk,
    sample_columns,
    select_topk,
)

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/gpu checks the compiled kernels", allow_module_level=True)


def _private_copy(name: str) -> ModuleType:
    """triton.jit picks the interpreter when the kernels are defined (TRITON_INTERPRET read then),
    whenever triton itself was imported: a private copy of the module, loaded with it set."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    _SPARSE = _private_copy("kvrelay.kernels.triton_sparse")
    _SPARSE_PREFILL = _private_copy("kvrelay.kernels.triton_sparse_prefill")
    _TOPK = _private_copy("kvrelay.kernels.triton_topk")
    _SAMPLE = _private_copy("kvrelay.kernels.triton_sample")
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]


def _interpreting(module: ModuleType) -> Iterator[ModuleType]:
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield module
    if saved is None:
        del os.environ["TRITON_INTERPRET"]


@pytest.fixture(scope="module")
def sparse() -> Iterator[ModuleType]:
    yield from _interpreting(_SPARSE)


@pytest.fixture(scope="module")
def sparse_prefill() -> Iterator[ModuleType]:
    yield from _interpreting(_SPARSE_PREFILL)


@pytest.fixture(scope="module")
def topk() -> Iterator[ModuleType]:
    yield from _interpreting(_TOPK)


@pytest.fixture(scope="module")
def sample() -> Iterator[ModuleType]:
    yield from _interpreting(_SAMPLE)


def _case(
    lens: list[int], kv_heads: int, bs: int, dim: int, dtype: torch.dtype, seed: int, pages: int = 2
):
    g = torch.Generator().manual_seed(seed)
    mb = max(-(-n // bs) for n in lens)
    nblk = mb * len(lens) + 2
    kv = torch.randn(nblk, 2, 2, bs, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(nblk - 2, generator=g) + 2
    tables = perm[: mb * len(lens)].view(len(lens), mb).to(torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    bounds = torch.zeros(nblk, 2, 2, pages, kv_heads, dim, dtype=dtype)
    for b, n in enumerate(lens):
        nb = -(-n // bs)
        fills = torch.full((nb,), bs)
        fills[-1] = n - (nb - 1) * bs
        bounds[tables[b, :nb].long(), 1] = ref.block_bounds(kv, 1, tables[b, :nb], fills, pages)
    return kv, tables, ctx, bounds, g


@pytest.mark.parametrize(
    ("dtype", "pages", "bs", "lens"),
    [
        (torch.float32, 1, 8, [100, 37, 70]),
        (torch.float32, 4, 8, [100, 37, 70]),
        (torch.bfloat16, 2, 8, [100, 37, 70]),
        (torch.float32, 3, 12, [400, 37, 270]),  # 3 sub-pages padded to 4 columns a block
        (torch.float32, 4, 16, [1000, 37, 270]),  # 63 blocks: 4 programs of 16, the last short
    ],
)
def test_block_scores(
    sparse: ModuleType, dtype: torch.dtype, pages: int, bs: int, lens: list[int]
) -> None:
    _, tables, _, bounds, g = _case(lens, 2, bs, 24, dtype, 1, pages)
    q = torch.randn(3, 6, 24, generator=g).to(dtype)
    want = ref.block_scores(q, bounds, 1, tables)
    got = sparse.block_scores(q, bounds, 1, tables)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_scores_over_per_head_tables(sparse: ModuleType, dtype: torch.dtype) -> None:
    """The exact scores of a shortlist per KV head: over its physical blocks (a per-head
    table), and over its logical ids read through the sequence's block table (``ids``, the
    refresh path: no gathered table), equal to each other and to the reference."""
    kv, tables, _, _, g = _case([100, 37, 70], 2, 8, 24, dtype, 4)
    q = torch.randn(3, 6, 24, generator=g).to(dtype)
    pick = torch.randint(0, tables.shape[1], (3, 2, 5), generator=g)  # a shortlist per KV head
    per_head = tables.long().gather(1, pick.flatten(1)).view_as(pick)
    want = ref.block_scores(q, ref.keys_as_bounds(kv), 1, per_head)
    got = sparse.block_scores(q, ref.keys_as_bounds(kv), 1, per_head)
    assert rel_err(got, want) < 1e-5
    via_ids = sparse.block_scores(q, ref.keys_as_bounds(kv), 1, tables, ids=pick)
    assert torch.equal(via_ids, got)
    assert torch.equal(ref.block_scores(q, ref.keys_as_bounds(kv), 1, tables, ids=pick), want)


@pytest.mark.parametrize(
    ("n", "k", "with_ids", "ties", "chunk"),
    [
        (100, 17, False, False, None),
        (100, 17, True, False, None),
        (90, 40, False, True, None),
        (5000, 300, False, True, None),
        (8192, 512, False, True, None),
        (8200, 512, False, True, None),
        (5000, 300, True, True, 1024),
    ],
)
def test_topk_blocks(
    topk: ModuleType, n: int, k: int, with_ids: bool, ties: bool, chunk: int | None
) -> None:
    """The same ids as the reference (its ties: lowest position first): rows whose range holds
    fewer than k elements (the rest -inf), an all -inf row (a streaming head), ids given (the
    re-rank's shortlist), repeated values (-0.0 equal to +0.0); rows held in registers whole
    (up to TOPK_CHUNK = 8192, 5000 of them padding a power of two) and rows reloaded chunk by
    chunk on every pass (8200 elements; 5000 in chunks of 1024, with ids); ±inf, the largest
    finite and the smallest subnormal values; the kept ids in row order."""
    g = torch.Generator().manual_seed(n + k)
    values = torch.randn(3, 4, n, generator=g)
    if ties:
        values = torch.randint(0, 6, (3, 4, n), generator=g).float()
    values[1, 2] = float("-inf")
    values[2, 3] = torch.tensor([-0.0, 0.0]).repeat(n)[:n]  # -0.0 ties with +0.0
    # keys at both ends of the int32 range (the search's first thresholds)
    values[0, 1, :6] = torch.tensor([float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, float("inf")])
    ids = torch.randint(0, n + 20, (3, 4, n), generator=g) if with_ids else None
    hi = torch.tensor([n // 2, 9, n + 20], dtype=torch.int32)
    want = ref.topk_blocks(values, k, 2, hi, ids)
    got = topk.topk_blocks(values, k, 2, hi, ids, **({} if chunk is None else {"chunk": chunk}))
    assert got.shape == want.shape == (3, 4, min(k, n)) and got.dtype == torch.int64
    assert torch.equal(got, want)  # the same ids in the same (row) order
    if ids is None:  # positions: ascending (sparse_tables places the picks so)
        assert bool((got[..., 1:] > got[..., :-1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scores_skip_streaming_heads(sparse: ModuleType, dtype: torch.dtype) -> None:
    """A streaming head reads no middle blocks: its scores are -inf (the kernel skips it), the
    dense heads' are unchanged; over bounds and over keys seen as bounds."""
    kv, tables, _, bounds, g = _case([100, 37, 70], 2, 8, 24, dtype, 5)
    q = torch.randn(3, 6, 24, generator=g).to(dtype)
    streaming = torch.tensor([True, False])
    for source in (bounds, ref.keys_as_bounds(kv)):
        for impl in (ref, sparse):
            got = impl.block_scores(q, source, 1, tables, streaming)
            assert torch.isneginf(got[:, 0]).all()
            assert rel_err(got[:, 1], ref.block_scores(q, source, 1, tables)[:, 1]) < 1e-5


@pytest.mark.parametrize(
    ("dtype", "splits", "streaming"),
    [(torch.float32, 1, False), (torch.float32, 3, True), (torch.bfloat16, None, True)],
)
def test_sparse_decode(sparse: ModuleType, dtype: torch.dtype, splits, streaming: bool) -> None:
    bs = 8
    kv, tables, ctx, bounds, g = _case([300, 41, 9, 170], 2, bs, 16, dtype, 2)
    q = torch.randn(4, 8, 16, generator=g).to(dtype)
    dense, stream = HeadShape(1, 6, 1), HeadShape(2, 0, 3)
    topk = select_topk(ref.block_scores(q, bounds, 1, tables), ctx, bs, dense)
    mask = torch.tensor([False, True]) if streaming else None
    sel, lens = build_tables(ctx, tables, topk, mask, dense, stream, bs, 2)
    want = ref.sparse_decode_attention(q.float(), kv.float(), 1, sel, lens, 0.25)
    got = sparse.sparse_decode_attention(q, kv, 1, sel, lens, 0.25, num_splits=splits)
    assert rel_err(got.float(), want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_prefill(sparse_prefill: ModuleType, dtype: torch.dtype) -> None:
    lens = [200, 90]  # 200 and 30 new tokens
    kv, tables, ctx, _, g = _case(lens, 2, 16, 16, dtype, 3)
    qsl = torch.tensor([0, 200, 230], dtype=torch.int32)
    q = torch.randn(230, 4, 16, generator=g).to(dtype)
    keep = torch.rand(2, 4, 4, generator=g) < 0.4
    window = torch.tensor([[1, 40, 70, 1 << 30], [5, 64, 33, 2]], dtype=torch.int32)
    want = ref.sparse_prefill_attention(
        q.float(), kv.float(), 1, tables, qsl, ctx, 0.25, keep, window, 64
    )
    got = sparse_prefill.sparse_prefill_attention(q, kv, 1, tables, qsl, ctx, 0.25, keep, window, 64)
    assert rel_err(got.float(), want) < (1e-5 if dtype == torch.float32 else 1e-2)


def _visible_tiles(
    qsl: list[int], lens: list[int], keep: torch.Tensor, window: torch.Tensor, cb: int,
    bm: int, bn: int,
) -> int:  # fmt: skip
    """(head, query tile, key tile) triples where the mask (ref.prefill_mask) shows a row any key."""
    total = 0
    for i, ctx in enumerate(lens):
        n = qsl[i + 1] - qsl[i]
        pos = torch.arange(ctx - n, ctx)
        mask = ref.prefill_mask(pos, ctx, keep[i], window[i], cb)  # [H, n, ctx]
        rows, cols = -(-n // bm) * bm, -(-ctx // bn) * bn
        mask = torch.nn.functional.pad(mask, (0, cols - ctx, 0, rows - n))
        total += int(mask.unflatten(2, (-1, bn)).unflatten(1, (-1, bm)).any(4).any(2).sum())
    return total


@pytest.mark.parametrize(("seed", "col_block"), [(5, 64), (6, 32), (7, 16), (8, 16), (9, 64)])
def test_sparse_prefill_runs_only_visible_tiles(
    sparse_prefill: ModuleType, seed: int, col_block: int
) -> None:
    """Random keeps, windows from 1 to past the context and cached prefixes: the output is the
    reference's, and the tiles the kernel counts are exactly the (query tile, key tile) pairs
    where some row sees some key; a streaming head (sink columns, a short window) runs
    O(sink + window) tiles a query tile, not O(context)."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(70, 400, (3,), generator=g)]
    news = [int(torch.randint(1, n + 1, (1,), generator=g)) for n in lens]
    qsl = [0]
    for n in news:
        qsl.append(qsl[-1] + n)
    heads, nkb = 4, -(-max(lens) // col_block)
    kv, tables, ctx, _, _ = _case(lens, 2, 16, 16, torch.float32, seed)
    q = torch.randn(qsl[-1], heads, 16, generator=g)
    keep = torch.rand(3, heads, nkb, generator=g) < torch.rand(3, heads, 1, generator=g)
    window = torch.randint(1, 500, (3, heads), generator=g, dtype=torch.int32)
    window[0, 0] = 1 << 30
    keep[:, 1] = torch.arange(nkb) < 1  # a streaming head: the sink column block only
    window[:, 1] = 40
    counts = torch.zeros(5, dtype=torch.int32)
    qsl_t = torch.tensor(qsl, dtype=torch.int32)
    args = (q, kv, 1, tables, qsl_t, ctx, 0.3, keep, window, col_block)
    got = sparse_prefill.sparse_prefill_attention(*args, tile_counts=counts)
    assert rel_err(got, ref.sparse_prefill_attention(*args)) < 1e-5
    bm, bn = sparse_prefill.prefill_tiles(16, torch.float32, False, col_block)
    assert int(counts.sum()) == _visible_tiles(qsl, lens, keep, window, col_block, bm, bn)
    pairs = [  # the tile-level count the engine's density and sparse_bench use
        prefill_tile_pairs(keep[i], window[i], n - new, new, n, col_block, bm, bn)[0]
        for i, (n, new) in enumerate(zip(lens, news, strict=True))
    ]
    assert int(counts.sum()) == sum(pairs)
    kv, tables, ctx, _, _ = _case([700], 2, 16, 16, torch.float32, seed)  # stream heads only
    counts.zero_()
    sparse_prefill.sparse_prefill_attention(
        torch.randn(700, heads, 16, generator=g), kv, 1, tables,
        torch.tensor([0, 700], dtype=torch.int32), ctx, 0.3,
        (torch.arange(-(-700 // col_block)) < 1).expand(1, heads, -1), torch.full((1, heads), 40),
        col_block,
        tile_counts=counts,
    )  # fmt: skip
    q_tiles = -(-700 // bm)
    per_tile = -(-col_block // bn) + -(-(40 + bm) // bn) + 1  # sink + window + edge
    assert int(counts.sum()) <= heads * q_tiles * per_tile


def test_sparse_tables_equal_the_reference_on_random_batches(sparse: ModuleType) -> None:
    """One program per (sequence, KV head), ascending picks placed in order: the very tables
    and lens of
    the torch reference, for fresh and reused picks (the gap block), short contexts read whole,
    streaming heads, picks outside the middle (a short middle), and no picks at all."""
    g = torch.Generator().manual_seed(5)
    bs, kv_heads = 8, 3
    for trial in range(30):
        batch = int(torch.randint(1, 5, (1,), generator=g))
        at_refresh = torch.randint(1, 40 * bs, (batch,), generator=g)
        ctx = (at_refresh + torch.randint(0, 2 * bs, (batch,), generator=g)).to(torch.int32)
        mb = int(-(-ctx.max() // bs)) + int(torch.randint(0, 3, (1,), generator=g))
        tables = torch.randperm(mb * batch + 5, generator=g)[: mb * batch].view(batch, mb)
        tables = tables.to(torch.int32)
        dense = (trial % 3, int(torch.randint(0, 40, (1,), generator=g)), 1 + trial % 2)
        stream = (1 + trial % 2, 0, int(torch.randint(1, 20, (1,), generator=g)))
        scores = torch.randn(batch, kv_heads, mb, generator=g)
        topk = None
        if dense[1]:  # ascending, as topk_blocks writes them (torch's topk: by value)
            topk = select_topk(scores, at_refresh.to(torch.int32), bs, HeadShape(*dense))
            topk = topk.sort(-1).values
        streaming = torch.rand(kv_heads, generator=g) < 0.5 if trial % 4 else None
        refresh_nb = (at_refresh + bs - 1) // bs if trial % 2 else None
        args = (ctx, tables, topk, streaming, refresh_nb, dense, stream, bs, kv_heads)
        want_t, want_l = ref.sparse_tables(*args)
        got_t, got_l = sparse.sparse_tables(*args)
        assert torch.equal(got_l, want_l), trial
        assert torch.equal(got_t, want_t), trial


def test_refresh_chain_equals_the_references(sparse: ModuleType, topk: ModuleType) -> None:
    """A refresh layer's selection as the GPU runs it (bound scores, the shortlist's
    topk_blocks, the exact scores of its logical ids read through the block table, the re-rank,
    the tables taking the picks in the order topk_blocks writes them) gives the tables and lens
    of the torch references (select_topk, rerank_topk over a gathered table, build_tables):
    a long context, one whose middle is shorter than the shortlist, one read whole; a
    streaming head."""
    bs, kv_heads = 8, 2
    kv, tables, ctx, bounds, g = _case([400, 100, 37], kv_heads, bs, 24, torch.float32, 9, 2)
    q = torch.randn(3, 6, 24, generator=g)
    dense, stream = HeadShape(2, 6, 2), HeadShape(1, 0, 3)
    streaming = torch.tensor([False, True])
    hi = (ctx.long() + bs - 1) // bs - dense.local
    scores = sparse.block_scores(q, bounds, 1, tables, streaming)
    short = topk.topk_blocks(scores, 2 * dense.topk, dense.sink, hi)
    exact = sparse.block_scores(q, ref.keys_as_bounds(kv), 1, tables, streaming, ids=short)
    picks = topk.topk_blocks(exact, dense.topk, dense.sink, hi, ids=short)
    args = (streaming, None, dense.parts, stream.parts, bs, kv_heads)
    got_t, got_l = sparse.sparse_tables(ctx, tables, picks, *args)
    r_short = select_topk(ref.block_scores(q, bounds, 1, tables), ctx, bs,
                          replace(dense, topk=2 * dense.topk))  # fmt: skip
    per_head = tables.long().gather(1, r_short.flatten(1)).view_as(r_short)
    r_exact = ref.block_scores(q, ref.keys_as_bounds(kv), 1, per_head)
    r_picks = rerank_topk(r_short, r_exact, ctx, bs, dense)
    want_t, want_l = build_tables(ctx, tables, r_picks, streaming, dense, stream, bs, kv_heads)
    assert torch.equal(got_l, want_l) and torch.equal(got_t, want_t)
    assert int(got_l[0, 0]) == (2 + 6 + 1) * bs + 400 - 49 * bs  # sink + picks + local


def test_shortlist_rerank_chain_equals_the_references(sparse: ModuleType, topk: ModuleType) -> None:
    """A step between shortlist refreshes (``shortlist_steps`` > 1) as the GPU runs it: the
    exact scores of a shortlist made at an earlier step, with this step's query, the re-rank
    over this step's middle, the tables with the refresh's block counts (the gap block read)
    give the tables and lens of the torch references; one context crossed a block since."""
    bs, kv_heads = 8, 2
    kv, tables, ctx, bounds, g = _case([402, 103, 38], kv_heads, bs, 24, torch.float32, 4, 2)
    at_refresh = torch.tensor([399, 97, 37], dtype=torch.int32)  # 50, 13, 5 blocks
    q_then, q_now = torch.randn(2, 3, 6, 24, generator=g)
    dense, stream = HeadShape(2, 6, 2), HeadShape(1, 0, 3)
    streaming = torch.tensor([False, True])
    refresh_nb = (at_refresh.long() + bs - 1) // bs
    scores = sparse.block_scores(q_then, bounds, 1, tables, streaming)
    short = topk.topk_blocks(scores, 2 * dense.topk, dense.sink, refresh_nb - dense.local)
    hi = (ctx.long() + bs - 1) // bs - dense.local
    exact = sparse.block_scores(q_now, ref.keys_as_bounds(kv), 1, tables, streaming, ids=short)
    picks = topk.topk_blocks(exact, dense.topk, dense.sink, hi, ids=short)
    args = (streaming, refresh_nb, dense.parts, stream.parts, bs, kv_heads)
    got_t, got_l = sparse.sparse_tables(ctx, tables, picks, *args)
    per_head = tables.long().gather(1, short.flatten(1)).view_as(short)
    r_exact = ref.block_scores(q_now, ref.keys_as_bounds(kv), 1, per_head)
    r_picks = rerank_topk(short, r_exact, ctx, bs, dense)
    want_t, want_l = build_tables(
        ctx, tables, r_picks, streaming, dense, stream, bs, kv_heads, refresh_nb
    )
    assert torch.equal(got_l, want_l) and torch.equal(got_t, want_t)
    # sink + picks + the gap block (48: local at the refresh, middle now) + local
    assert int(got_l[0, 0]) == (2 + 6 + 1 + 1) * bs + 402 - 50 * bs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_bounds(sparse: ModuleType, dtype: torch.dtype) -> None:
    """The fold of one decode step's keys into every layer's sub-page bounds: restarts at a
    sub-page's first offset, max / min elsewhere; bit-equal to the reference."""
    g = torch.Generator().manual_seed(6)
    kv = torch.randn(12, 3, 2, 8, 2, 24, generator=g).to(dtype)
    bounds = torch.randn(12, 3, 2, 4, 2, 24, generator=g).to(dtype)
    slots = torch.tensor([5 * 8 + 0, 7 * 8 + 3, 2 * 8 + 6, 11 * 8 + 7, 9 * 8 + 4])
    want = bounds.clone()
    ref.update_bounds(want, kv, slots)
    assert int((want != bounds).sum()) > 5 * 3 * 2 * 24  # every (slot, layer) changed some
    sparse.update_bounds(bounds, kv, slots)
    assert torch.equal(bounds, want)


def test_update_bounds_skips_padding_slots(sparse: ModuleType) -> None:
    """Slot -1 (a padding row of a step captured in a CUDA graph) folds nothing, in both
    bodies: the result is the fold of the real slots alone."""
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(12, 3, 2, 8, 2, 24, generator=g)
    bounds = torch.randn(12, 3, 2, 4, 2, 24, generator=g)
    real = torch.tensor([5 * 8 + 0, 7 * 8 + 3, 11 * 8 + 7])
    padded = torch.tensor([-1, 5 * 8 + 0, -1, 7 * 8 + 3, 11 * 8 + 7, -1])
    want = bounds.clone()
    ref.update_bounds(want, kv, real)
    assert not torch.equal(want, bounds)
    got_ref = bounds.clone()
    ref.update_bounds(got_ref, kv, padded)
    assert torch.equal(got_ref, want)
    sparse.update_bounds(bounds, kv, padded)
    assert torch.equal(bounds, want)
    untouched = bounds.clone()
    sparse.update_bounds(bounds, kv, torch.full((4,), -1))  # a step of padding only
    assert torch.equal(bounds, untouched)


@pytest.mark.parametrize(
    ("n", "ctx", "heads", "kv_heads", "stride", "col_block", "dtype"),
    [
        (100, 100, 4, 2, 7, 32, torch.float32),  # whole prompt; tiles of 16 rows, 2 row tiles
        (50, 173, 4, 1, 5, 16, torch.float32),  # a 123-token prefix, ragged ctx, GQA group 4
        (40, 40, 2, 2, 1, 16, torch.float32),  # every row: row 0 sees key 0 only
        (1, 37, 3, 1, 20, 16, torch.float32),  # one row, the last (stride > n)
        (70, 90, 4, 2, 3, 32, torch.bfloat16),
    ],
)
def test_sampled_column_mass(
    sample: ModuleType, n, ctx, heads, kv_heads, stride, col_block, dtype
) -> None:
    g = torch.Generator().manual_seed(n + ctx)
    q = torch.randn(n, heads, 24, generator=g).to(dtype)
    k = torch.randn(ctx, kv_heads, 24, generator=g).to(dtype)
    want = ref.sampled_column_mass(q.float(), k.float(), 0.3, col_block, stride)
    got = sample.sampled_column_mass(q, k, 0.3, col_block, stride)
    assert got.shape == want.shape == (heads, -(-ctx // col_block))
    assert rel_err(got, want) < 1e-5
    # each sampled row's probabilities sum to one
    rows = (n - 1) // stride + 1
    assert torch.allclose(got.sum(-1), torch.full((heads,), float(rows)), rtol=1e-5)


def test_sampled_column_mass_strided_keys(sample: ModuleType) -> None:
    """The keys as the prefill path passes them: a view into the gathered cache (the dense KV
    heads picked out), not a contiguous tensor."""
    kv, tables, _, _, g = _case([150], 4, 16, 32, torch.float32, 6)
    k, _ = ref.gather_kv(kv, 1, tables[0], 150)  # [150, 4, 32]
    k = k[:, 1:3]
    q = torch.randn(60, 8, 32, generator=g)[:, ::2]  # a strided query, 4 heads
    want = ref.sampled_column_mass(q, k, 0.2, 32, 9)
    assert rel_err(sample.sampled_column_mass(q, k, 0.2, 32, 9), want) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fused_sampling_keeps_the_same_columns(sample: ModuleType, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ctx, heads, kv_heads, cb, alpha = 300, 4, 2, 16, 0.9
    k = torch.randn(ctx, kv_heads, 16, generator=g)
    k[torch.randperm(ctx, generator=g)[:12]] *= 3  # a few loud keys: a real choice of columns
    q = torch.randn(200, heads, 16, generator=g)  # 100 cached tokens before the chunk
    keep, mass = sample_columns(q, k, 0.5, cb, alpha, stride=4)  # CPU: the torch reference
    blocks = sample.sampled_column_mass(q, k, 0.5, cb, 4)
    got_keep, got_mass = keep_columns(blocks, alpha)
    assert bool((keep.sum(-1) < keep.shape[1]).all())  # every head skipped some columns
    assert rel_err(got_mass, mass) < 1e-5
    # compare the heads whose choice no rounding can flip: the cumulative share before each
    # block (in rank order) is not within 1e-4 of alpha
    share = blocks / blocks.sum(-1, keepdim=True)
    ordered = share.sort(-1, descending=True).values
    margin = ((ordered.cumsum(-1) - ordered) - alpha).abs().amin(-1)  # [H]
    clear = margin > 1e-4
    assert int(clear.sum()) >= heads - 1
    assert torch.equal(got_keep[clear], keep[clear])
