"""The torch reference ops against a dense float64 attention written here (causal, GQA, ragged
lengths, block boundaries, one KV head), plus write_kv with -1 slots and pack/unpack round trips.
The reference is the oracle of the Triton kernels, so it is checked against first principles."""

from __future__ import annotations

import pytest
import torch

from kvrelay.kernels import reference
from kvrelay_testing.kernels import (
    PagedCase,
    check_prefill_live,
    check_prefill_padded,
    make_case,
    query_start_loc,
)


def dense_attention(
    q: torch.Tensor,  # [n, H, D] queries at positions ctx - n ... ctx - 1
    k: torch.Tensor,  # [ctx, Hkv, D]
    v: torch.Tensor,  # [ctx, Hkv, D]
    scale: float,
) -> torch.Tensor:  # [n, H, D] float64
    n, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    group = heads // kv_heads
    k = k.double().repeat_interleave(group, dim=1)  # [ctx, H, D]: head h reads KV head h // group
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k) * scale
    q_pos = torch.arange(ctx - n, ctx)[:, None]
    scores = scores.masked_fill(torch.arange(ctx)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hnc,chd->nhd", torch.softmax(scores, dim=-1), v)


def contiguous_kv(case: PagedCase, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ``seq``'s K and V ``[ctx, Hkv, D]``, gathered token by token from its table."""
    cache, tables, lens = case
    bs = cache.shape[3]
    rows = [cache[int(tables[seq, t // bs]), layer, :, t % bs] for t in range(int(lens[seq]))]
    kv = torch.stack(rows)  # [ctx, 2, Hkv, D]
    return kv[:, 0], kv[:, 1]


CASES = [  # (context lengths, heads, kv_heads, block_size, head_dim)
    ([1, 17, 100], 8, 2, 16, 32),  # ragged, GQA 4
    ([15, 16, 17, 32, 33], 4, 1, 16, 16),  # around block boundaries, a single KV head
    ([40, 9], 8, 8, 8, 16),  # MHA, block size 8
    ([70], 16, 2, 32, 16),  # GQA 8, block size 32
]


@pytest.mark.parametrize(("lens", "heads", "kv_heads", "bs", "dim"), CASES)
def test_decode_matches_dense(
    lens: list[int], heads: int, kv_heads: int, bs: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    case = make_case(
        lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=torch.float32, gen=gen
    )
    q = torch.randn(len(lens), heads, dim, generator=gen)
    out = reference.paged_decode_attention(
        q, case.kv_cache, 1, case.block_tables, case.context_lens, 0.3
    )
    for i in range(len(lens)):
        k, v = contiguous_kv(case, i, 1)
        want = dense_attention(q[i : i + 1], k, v, 0.3)[0]
        torch.testing.assert_close(out[i].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("lens", "heads", "kv_heads", "bs", "dim"), CASES)
def test_prefill_matches_dense(
    lens: list[int], heads: int, kv_heads: int, bs: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    case = make_case(
        lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=torch.float32, gen=gen
    )
    # New tokens: all of the first sequence, one of the second (a decode row in a mixed batch),
    # and about half of the others (a cached prefix plus new tokens).
    qlens = [lens[0]] + [1 if i == 1 else max(1, n // 2) for i, n in enumerate(lens[1:], 1)]
    q = torch.randn(sum(qlens), heads, dim, generator=gen)
    qsl = query_start_loc(qlens, "cpu")
    out = reference.paged_prefill_attention(
        q, case.kv_cache, 0, case.block_tables, qsl, case.context_lens, 0.25
    )
    for i in range(len(lens)):
        k, v = contiguous_kv(case, i, 0)
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        torch.testing.assert_close(
            out[lo:hi].double(), dense_attention(q[lo:hi], k, v, 0.25), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(("rows", "seqs"), [(0, 0), (50, 0), (0, 5), (137, 9)])
def test_prefill_over_padded_inputs(rows: int, seqs: int) -> None:
    """Extra rows and sequences that own none (prefill_graphs.py's padding) change no real row
    and get nothing written."""
    gen = torch.Generator().manual_seed(4)
    case = make_case([40, 21, 90], kv_heads=2, head_dim=16, dtype=torch.float32, gen=gen)
    qlens = [40, 1, 45]
    err = check_prefill_padded(reference, case, 4, qlens, rows=86 + rows, seqs=3 + seqs, gen=gen)
    assert err < 1e-6


@pytest.mark.parametrize(("rows", "seqs"), [(0, 0), (50, 0), (0, 5), (137, 9)])
def test_prefill_live_seqs_reads_only_the_live_sequences(rows: int, seqs: int) -> None:
    """With ``live_seqs`` the metadata past the live sequences is not read: garbage there (that
    would give the padded rows to padded sequences) changes nothing (check_prefill_live)."""
    gen = torch.Generator().manual_seed(5)
    case = make_case([40, 21, 90], kv_heads=2, head_dim=16, dtype=torch.float32, gen=gen)
    err, diff = check_prefill_live(
        reference, case, 4, [40, 1, 45], rows=86 + rows, seqs=3 + seqs, gen=gen
    )
    assert err < 1e-6 and diff == 0.0


def test_prefill_live_seqs_out_of_range_raises() -> None:
    gen = torch.Generator().manual_seed(6)
    case = make_case([10, 5], kv_heads=2, head_dim=16, dtype=torch.float32, gen=gen)
    q = torch.randn(15, 4, 16, generator=gen)
    qsl = query_start_loc([10, 5], "cpu")
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            reference.paged_prefill_attention(
                q, case.kv_cache, 0, case.block_tables, qsl, case.context_lens, 0.25,
                live_seqs=torch.tensor([bad], dtype=torch.int32),
            )  # fmt: skip


def test_write_kv_skips_minus_one_slots() -> None:
    gen = torch.Generator().manual_seed(3)
    cache = make_case([20], kv_heads=2, head_dim=8, dtype=torch.float32, gen=gen).kv_cache
    before = cache.clone()
    key, value = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    slots = torch.tensor([5, -1, 16 * 3 + 15])  # block 0 offset 5, skipped, block 3 offset 15
    reference.write_kv(cache, 1, key, value, slots)
    assert torch.equal(cache[0, 1, 0, 5], key[0]) and torch.equal(cache[0, 1, 1, 5], value[0])
    assert torch.equal(cache[3, 1, 0, 15], key[2]) and torch.equal(cache[3, 1, 1, 15], value[2])
    changed = (cache != before).flatten(3).any(-1)  # [num_blocks, L, 2]
    assert changed.sum() == 4 and not changed[:, 0].any()  # only those rows, only layer 1


def test_write_kv_all_skipped_is_a_no_op() -> None:
    gen = torch.Generator().manual_seed(4)
    cache = make_case([20], head_dim=8, dtype=torch.float32, gen=gen).kv_cache
    before = cache.clone()
    reference.write_kv(cache, 0, torch.ones(2, 2, 8), torch.ones(2, 2, 8), torch.tensor([-1, -1]))
    assert torch.equal(cache, before)


def test_pack_unpack_round_trip_and_copy_blocks() -> None:
    gen = torch.Generator().manual_seed(5)
    cache = make_case([100], head_dim=8, gen=gen).kv_cache
    ids = torch.tensor([7, 2, 11])
    packed = reference.pack_blocks(cache, ids)
    assert packed.shape == (3, *cache.shape[1:]) and packed.is_contiguous()
    assert torch.equal(packed[1], cache[2])
    other = torch.zeros_like(cache)
    reference.unpack_blocks(other, torch.tensor([0, 1, 5]), packed)
    assert torch.equal(other[[0, 1, 5]], cache[[7, 2, 11]]) and not other[2].any()
    dst = torch.zeros_like(cache)
    reference.copy_blocks(cache, ids, dst, torch.tensor([3, 4, 6]))
    assert torch.equal(dst[[3, 4, 6]], cache[ids])
