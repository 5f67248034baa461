"""The sparse Triton kernels compiled on a GPU against the torch references (the checks
tests/unit/test_sparse_interpret.py runs interpreted), at serving-like sizes: 8B-shaped heads,
bf16, ragged contexts, streaming heads, split-K."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels import sparse_reference as ref
from kvrelay.kernels.reference import rel_err
from kvrelay.workers.model.sparse_attention import prefill_tile_pairs
from kvrelay.workers.model.sparse_select import (
    HeadShape,
    build_tables,
    keep_columns,
    sample_columns,
    select_topk,
)

pytestmark = pytest.mark.gpu
BS, HKV, H, D = 16, 8, 32, 128
PAGES = 4  # 4-token sub-pages, the default


def _case(lens: list[int], seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mb = max(-(-n // BS) for n in lens)
    nblk = mb * len(lens) + 2
    kv = torch.randn(nblk, 2, 2, BS, HKV, D, device="cuda", generator=g).bfloat16()
    tables = torch.randperm(nblk - 2, device="cuda", generator=g)[: mb * len(lens)] + 2
    tables = tables.view(len(lens), mb).to(torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    bounds = torch.zeros(nblk, 2, 2, PAGES, HKV, D, device="cuda", dtype=torch.bfloat16)
    for b, n in enumerate(lens):
        nb = -(-n // BS)
        fills = torch.full((nb,), BS, device="cuda")
        fills[-1] = n - (nb - 1) * BS
        bounds[tables[b, :nb].long(), 1] = ref.block_bounds(kv, 1, tables[b, :nb], fills, PAGES)
    return kv, tables, ctx, bounds, g


def test_block_scores_gpu() -> None:
    from kvrelay.kernels import triton_sparse

    _, tables, _, bounds, g = _case([5000, 333, 17], 1)
    q = torch.randn(3, H, D, device="cuda", generator=g).bfloat16()
    got = triton_sparse.block_scores(q, bounds, 1, tables)
    assert rel_err(got, ref.block_scores(q, bounds, 1, tables)) < 1e-4


@pytest.mark.parametrize(
    ("n", "k", "with_ids"),
    [(8192, 512, False), (5000, 300, True), (512, 256, True), (20000, 1000, False)],
)
def test_topk_blocks_gpu(n: int, k: int, with_ids: bool) -> None:
    """The selection kernel keeps the reference's ids: a refresh's shortlist (k = 512 of 8192
    blocks, the row in registers at 16 warps), a shorter row with ids, the re-rank over a
    shortlist's ids, a row of several chunks; short middles, a streaming (all -inf) row, ties."""
    from kvrelay.kernels import triton_topk

    g = torch.Generator(device="cuda").manual_seed(n)
    values = torch.randn(8, 8, n, device="cuda", generator=g)
    values[3, 1] = float("-inf")
    values[5] = values[5].round()  # ties
    values[6, 2, :4] = torch.tensor([float("inf"), 3.4e38, -3.4e38, 1e-45])  # int32 key extremes
    ids = torch.randint(0, n, (8, 8, n), device="cuda", generator=g) if with_ids else None
    hi = torch.randint(1, n, (8,), device="cuda", generator=g)
    want = ref.topk_blocks(values, k, 4, hi, ids)
    got = triton_topk.topk_blocks(values, k, 4, hi, ids)
    assert torch.equal(got, want)  # the same ids in row order


def test_exact_rerank_scores_gpu() -> None:
    from kvrelay.kernels import triton_sparse

    kv, tables, _, _, g = _case([5000, 333, 17], 3)
    q = torch.randn(3, H, D, device="cuda", generator=g).bfloat16()
    pick = torch.randint(0, tables.shape[1], (3, HKV, 512), device="cuda", generator=g)
    per_head = tables.long().gather(1, pick.flatten(1)).view_as(pick)
    got = triton_sparse.block_scores(q, ref.keys_as_bounds(kv), 1, per_head)
    assert rel_err(got, ref.block_scores(q, ref.keys_as_bounds(kv), 1, per_head)) < 1e-4
    # the refresh path: the shortlist's logical ids read through the block table
    via_ids = triton_sparse.block_scores(q, ref.keys_as_bounds(kv), 1, tables, ids=pick)
    assert torch.equal(via_ids, got)


@pytest.mark.parametrize("splits", [None, 1, 7])
def test_sparse_decode_gpu(splits) -> None:
    from kvrelay.kernels import triton_sparse

    kv, tables, ctx, bounds, g = _case([20000, 4097, 100, 9000], 2)
    q = torch.randn(4, H, D, device="cuda", generator=g).bfloat16()
    dense, stream = HeadShape(1, 256, 1), HeadShape(8, 0, 16)
    topk = select_topk(ref.block_scores(q, bounds, 1, tables), ctx, BS, dense)
    mask = torch.arange(HKV, device="cuda") % 2 == 0
    sel, lens = build_tables(ctx, tables, topk, mask, dense, stream, BS, HKV)
    want = ref.sparse_decode_attention(q.float(), kv.float(), 1, sel, lens, D**-0.5)
    got = triton_sparse.sparse_decode_attention(q, kv, 1, sel, lens, D**-0.5, num_splits=splits)
    assert rel_err(got.float(), want) < 1e-2


def test_sparse_prefill_gpu() -> None:
    from kvrelay.kernels import triton_sparse_prefill

    kv, tables, ctx, _, g = _case([3000, 1500], 3)
    qsl = torch.tensor([0, 3000, 3700], dtype=torch.int32, device="cuda")  # 2nd: 800 cached
    q = torch.randn(3700, H, D, device="cuda", generator=g).bfloat16()
    k, _ = ref.gather_kv(kv, 1, tables[0], 3000)
    keep, mass = sample_columns(q[:3000], k, D**-0.5, 64, alpha=0.95)
    assert bool((mass >= 0.95 - 1e-4).all())
    keep = torch.stack([keep, torch.rand(H, 47, device="cuda", generator=g) < 0.3])
    window = torch.randint(1, 2000, (2, H), device="cuda", generator=g, dtype=torch.int32)
    window[:, ::5] = 128
    want = ref.sparse_prefill_attention(
        q.float(), kv.float(), 1, tables, qsl, ctx, D**-0.5, keep, window, 64
    )
    counts = torch.zeros(5, dtype=torch.int32, device="cuda")
    got = triton_sparse_prefill.sparse_prefill_attention(
        q, kv, 1, tables, qsl, ctx, D**-0.5, keep, window, 64, tile_counts=counts
    )
    assert rel_err(got.float(), want) < 1e-2
    # the compiled kernel runs exactly the tiles where some row sees some key
    bm, bn = triton_sparse_prefill.prefill_tiles(D, torch.bfloat16, True, 64)
    pairs = [
        prefill_tile_pairs(keep[i], window[i], n - new, new, n, 64, bm, bn)[0]
        for i, (n, new) in enumerate(((3000, 3000), (1500, 700)))
    ]
    assert int(counts.sum()) == sum(pairs)


def test_sparse_tables_gpu() -> None:
    from kvrelay.kernels import triton_sparse

    g = torch.Generator(device="cuda").manual_seed(4)
    lens = [20000, 4097, 100, 9000]
    mb = -(-max(lens) // BS)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    tables = torch.randperm(4 * mb, device="cuda", generator=g).view(4, mb).to(torch.int32)
    scores = torch.randn(4, HKV, mb, device="cuda", generator=g)
    dense, stream = HeadShape(4, 256, 4), HeadShape(8, 0, 16)
    topk = select_topk(scores, ctx - 20, BS, dense)  # picked two blocks ago: a gap block
    topk = topk.sort(-1).values  # ascending, as topk_blocks writes them
    mask = torch.arange(HKV, device="cuda") % 2 == 0
    refresh_nb = (ctx.long() - 20 + BS - 1) // BS
    args = (ctx, tables, topk, mask, refresh_nb, dense.parts, stream.parts, BS, HKV)
    got, want = triton_sparse.sparse_tables(*args), ref.sparse_tables(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_refresh_chain_gpu() -> None:
    """A refresh layer's selection at serving size (a 64k context: 4096 blocks, shortlist 512,
    K 256; bf16; streaming heads) through the Triton bodies: the shortlist and the re-rank in
    row order equal to the reference's on the same scores, the exact scores through ``ids``
    equal to those over the gathered table, and the tables taking the picks as they come equal
    to the reference's."""
    from kvrelay.kernels import triton_sparse, triton_topk

    kv, tables, ctx, bounds, g = _case([65536, 20000], 6)
    q = torch.randn(2, H, D, device="cuda", generator=g).bfloat16()
    dense, stream = HeadShape(4, 256, 4), HeadShape(8, 0, 16)
    mask = torch.arange(HKV, device="cuda") % 2 == 0
    hi = (ctx.long() + BS - 1) // BS - dense.local
    scores = triton_sparse.block_scores(q, bounds, 1, tables, mask)
    short = triton_topk.topk_blocks(scores, 512, dense.sink, hi)
    assert torch.equal(short, ref.topk_blocks(scores, 512, dense.sink, hi))
    keys = ref.keys_as_bounds(kv)
    exact = triton_sparse.block_scores(q, keys, 1, tables, mask, ids=short)
    per_head = tables.long().gather(1, short.flatten(1)).view_as(short)
    assert torch.equal(exact, triton_sparse.block_scores(q, keys, 1, per_head, mask))
    picks = triton_topk.topk_blocks(exact, 256, dense.sink, hi, ids=short)
    assert torch.equal(picks, ref.topk_blocks(exact, 256, dense.sink, hi, ids=short))
    args = (ctx, tables, picks, mask, None, dense.parts, stream.parts, BS, HKV)
    got, want = triton_sparse.sparse_tables(*args), ref.sparse_tables(*args)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_update_bounds_gpu() -> None:
    from kvrelay.kernels import triton_sparse

    g = torch.Generator(device="cuda").manual_seed(5)
    kv = torch.randn(64, 4, 2, BS, HKV, D, device="cuda", generator=g).bfloat16()
    bounds = torch.randn(64, 4, 2, PAGES, HKV, D, device="cuda", generator=g).bfloat16()
    slots = torch.randperm(64, device="cuda", generator=g)[:9] * BS + torch.arange(9, device="cuda")
    want = bounds.clone()
    ref.update_bounds(want, kv, slots)
    triton_sparse.update_bounds(bounds, kv, slots)
    assert torch.equal(bounds, want)


@pytest.mark.parametrize(("n", "ctx"), [(5000, 5000), (777, 3001)])  # 2nd: a 2224-token prefix
def test_sampled_column_mass_gpu(n: int, ctx: int) -> None:
    from kvrelay.kernels import triton_sample

    kv, tables, _, _, g = _case([ctx], 5)
    k, _ = ref.gather_kv(kv, 1, tables[0], ctx)
    k = k[:, 1::2]  # the dense KV heads picked out, as the prefill path does: 4 of 8
    q = torch.randn(n, H // 2, D, device="cuda", generator=g).bfloat16()
    want = ref.sampled_column_mass(q.float(), k.float(), D**-0.5, 64, 20)
    got = triton_sample.sampled_column_mass(q, k, D**-0.5, 64, 20)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-2
    keep, mass = keep_columns(got, 0.95)
    want_keep, want_mass = keep_columns(want, 0.95)
    assert (keep != want_keep).float().mean() < 0.01  # bf16 scores may flip a near-tie
    assert rel_err(mass, want_mass) < 1e-3


def test_reference_ops_switch_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVRELAY_REFERENCE_OPS (what benchmarks/sparse_bench.py times the torch sampling with)
    routes the named op to its torch reference, and only that op."""
    from kvrelay import kernels
    from kvrelay.kernels import triton_sample

    kv, tables, _, _, g = _case([2000], 6)
    k, _ = ref.gather_kv(kv, 1, tables[0], 2000)
    q = torch.randn(2000, H, D, device="cuda", generator=g).bfloat16()
    args = (q, k, D**-0.5, 64, 20)
    assert torch.equal(kernels.sampled_column_mass(*args), triton_sample.sampled_column_mass(*args))
    monkeypatch.setenv("KVRELAY_REFERENCE_OPS", "block_scores,sampled_column_mass")
    assert torch.equal(kernels.sampled_column_mass(*args), ref.sampled_column_mass(*args))
