"""Random paged-KV cases and kernel-vs-reference checks, shared by the kernel tests
(tests/unit reference + interpreter, tests/gpu) and benchmarks/kernel_bench.py.

A case scatters each sequence's tokens over randomly chosen, non-adjacent blocks of a cache
``[num_blocks, L, 2, bs, Hkv, D]`` filled with random values (never zeros: zeros hide unwritten
outputs), and pads block tables with spare columns pointing at other valid blocks, so a kernel
that reads past a sequence's length or ignores the table gets a visibly wrong answer.

Each ``check_*`` runs one op body (``ops``: the reference module, the Triton module, or an
interpreted copy of it) against the reference evaluated in fp32 on upcast copies of the same
inputs and returns the relative error ``‖out − ref‖ / ‖ref‖``; callers assert on it.
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import torch

from kvrelay.kernels import reference
from kvrelay.kernels.reference import rel_err


class PagedCase(NamedTuple):
    kv_cache: torch.Tensor  # [num_blocks, L, 2, bs, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, tokens in cache per sequence


def make_case(
    context_lens: list[int],
    *,
    block_size: int = 16,
    layers: int = 2,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    spare_columns: int = 1,
    gen: torch.Generator,
) -> PagedCase:
    needed = [(n + block_size - 1) // block_size for n in context_lens]
    width = max([*needed, 1]) + spare_columns
    num_blocks = 2 * sum(needed) + width + 1  # twice what is needed: tables are not dense
    cache = torch.randn(num_blocks, layers, 2, block_size, kv_heads, head_dim, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.empty(len(context_lens), width, dtype=torch.int32)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
        tables[i, n:] = perm[-(width - n) :].to(torch.int32) if width > n else tables[i, n:]
    return PagedCase(
        cache.to(device=device, dtype=dtype),
        tables.to(device),
        torch.tensor(context_lens, dtype=torch.int32, device=device),
    )


def check_decode(
    ops: ModuleType, case: PagedCase, heads: int, *, layer: int = 1, gen: torch.Generator, **kw: int
) -> float:
    """Decode attention of ``ops`` vs the fp32 reference; ``kw`` goes to ``ops`` (num_splits)."""
    cache, tables, lens = case
    q = torch.randn(lens.shape[0], heads, cache.shape[5], generator=gen)
    q = q.to(device=cache.device, dtype=cache.dtype)
    scale = cache.shape[5] ** -0.5
    fn = ops.paged_decode_attention_split if kw else ops.paged_decode_attention
    out = fn(q, cache, layer, tables, lens, scale, **kw)
    ref = reference.paged_decode_attention(q.float(), cache.float(), layer, tables, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    return rel_err(out, ref)


def query_start_loc(query_lens: list[int], device: str | torch.device) -> torch.Tensor:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def check_prefill(
    ops: ModuleType,
    case: PagedCase,
    heads: int,
    query_lens: list[int],
    *,
    layer: int = 1,
    gen: torch.Generator,
) -> float:
    """Prefill attention of ``ops`` (new tokens = the last ``query_lens[i]`` of each context)."""
    cache, tables, lens = case
    qsl = query_start_loc(query_lens, cache.device)
    q = torch.randn(sum(query_lens), heads, cache.shape[5], generator=gen)
    q = q.to(device=cache.device, dtype=cache.dtype)
    scale = cache.shape[5] ** -0.5
    out = ops.paged_prefill_attention(q, cache, layer, tables, qsl, lens, scale)
    ref = reference.paged_prefill_attention(
        q.float(), cache.float(), layer, tables, qsl, lens, scale
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    return rel_err(out, ref)


def check_prefill_padded(
    ops: ModuleType,
    case: PagedCase,
    heads: int,
    query_lens: list[int],
    *,
    rows: int,
    seqs: int,
    layer: int = 1,
    gen: torch.Generator,
) -> float:
    """Prefill attention of ``ops`` over inputs padded as workers/engine/prefill_graphs.py pads
    a step: ``rows`` query rows (the T real ones first, random ones after), ``seqs`` sequences
    (the B real ones first; the others own no rows: starts padded with T, context 0, table rows
    of random valid blocks), tables three random columns wider; written into a given ``out``
    filled with NaN. Asserts the padded rows kept their NaN (no sequence owns them) and returns
    the error of the T real rows against the fp32 reference of the unpadded inputs."""
    cache, tables, lens = case
    batch, tokens = lens.shape[0], sum(query_lens)
    assert rows >= tokens and seqs >= batch
    dev, dim = cache.device, cache.shape[5]
    qsl = query_start_loc(query_lens, dev)
    wide = torch.randint(cache.shape[0], (seqs, tables.shape[1] + 3), generator=gen)
    wide = wide.to(device=dev, dtype=torch.int32)
    wide[:batch, : tables.shape[1]] = tables
    starts = torch.full((seqs + 1,), tokens, dtype=torch.int32, device=dev)
    starts[: batch + 1] = qsl
    ctx = torch.zeros(seqs, dtype=torch.int32, device=dev)
    ctx[:batch] = lens
    q = torch.randn(rows, heads, dim, generator=gen).to(device=dev, dtype=cache.dtype)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    got = ops.paged_prefill_attention(q, cache, layer, wide, starts, ctx, scale, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == q.shape
    assert bool(out[tokens:].isnan().all()), "a padded row was written"
    ref = reference.paged_prefill_attention(
        q[:tokens].float(), cache.float(), layer, tables, qsl, lens, scale
    )
    return rel_err(out[:tokens], ref)


def check_prefill_live(
    ops: ModuleType,
    case: PagedCase,
    heads: int,
    query_lens: list[int],
    *,
    rows: int,
    seqs: int,
    layer: int = 1,
    gen: torch.Generator,
) -> tuple[float, float]:
    """Prefill attention of ``ops`` over padded inputs (``rows`` query rows, ``seqs``
    sequences) with ``live_seqs`` = B, the real sequence count, as prefill_graphs.py passes it,
    and garbage past the B real sequences that only the bound keeps out: starts past index B
    rising from T to at most ``rows`` (so without the bound the padded sequences would own the
    padded rows), context lengths and table rows of valid but wrong values. Written into a given
    ``out`` filled with NaN. Asserts the padded rows kept their NaN and that the reference over
    the same padded inputs and ``live_seqs`` equals the reference of the unpadded ones exactly;
    returns (error of the T real rows against the fp32 reference of the unpadded inputs, the
    largest absolute difference from ``ops``' own unpadded call, 0.0 when bit-identical)."""
    cache, tables, lens = case
    batch, tokens = lens.shape[0], sum(query_lens)
    assert rows >= tokens and seqs >= batch
    dev, dim, page = cache.device, cache.shape[5], cache.shape[3]
    qsl = query_start_loc(query_lens, dev)
    width = max(tables.shape[1] + 3, -(-rows // page))  # a padded context may cover all rows
    wide = torch.randint(cache.shape[0], (seqs, width), generator=gen)
    wide = wide.to(device=dev, dtype=torch.int32)
    wide[:batch, : tables.shape[1]] = tables
    # past B: rows T..rows shared among the padded sequences (rising starts), each with a
    # context that covers its rows and fits its (random) table row
    cuts = torch.randint(tokens, rows + 1, (seqs - batch,), generator=gen).sort().values
    starts = torch.cat([qsl.cpu(), cuts.to(torch.int32)]).to(dev)
    owned = (starts[batch + 1 :] - starts[batch:-1]).cpu()
    room = width * page - owned
    ctx_pad = owned + (torch.rand(seqs - batch, generator=gen) * (room + 1)).long()
    ctx = torch.cat([lens.cpu(), ctx_pad.to(torch.int32)]).to(dev)
    live = torch.tensor([batch], dtype=torch.int32, device=dev)
    q = torch.randn(rows, heads, dim, generator=gen).to(device=dev, dtype=cache.dtype)
    out = torch.full_like(q, float("nan"))
    scale = dim**-0.5
    args = (q, cache, layer, wide, starts, ctx, scale)
    got = ops.paged_prefill_attention(*args, out=out, live_seqs=live)
    assert got.data_ptr() == out.data_ptr() and got.shape == q.shape
    assert bool(out[tokens:].isnan().all()), "a padded row was written"
    ref_out = torch.full_like(q, float("nan"), dtype=torch.float32)
    f32 = (q.float(), cache.float(), layer, wide, starts, ctx, scale)
    reference.paged_prefill_attention(*f32, out=ref_out, live_seqs=live)
    ref = reference.paged_prefill_attention(
        q[:tokens].float(), cache.float(), layer, tables, qsl, lens, scale
    )
    assert torch.equal(ref_out[:tokens], ref), "the reference with live_seqs differs"
    assert bool(ref_out[tokens:].isnan().all()), "the reference wrote a padded row"
    eager = ops.paged_prefill_attention(q[:tokens], cache, layer, tables, qsl, lens, scale)
    diff = float((out[:tokens].float() - eager.float()).abs().max()) if tokens else 0.0
    return rel_err(out[:tokens], ref), diff


def check_write_kv(ops: ModuleType, case: PagedCase, tokens: int, *, gen: torch.Generator) -> bool:
    """Write ``tokens`` K/V rows (from strided views of a fused buffer, some slots -1) through
    ``ops`` and through the reference into copies of the cache; True when they agree exactly."""
    cache = case.kv_cache
    kv_heads, dim = cache.shape[4], cache.shape[5]
    slots_total = cache.shape[0] * cache.shape[3]
    slots = torch.randperm(slots_total, generator=gen)[:tokens]
    slots[torch.rand(tokens, generator=gen) < 0.25] = -1
    fused = torch.randn(tokens, 3 * kv_heads * dim, generator=gen).to(cache.device, cache.dtype)
    key = fused[:, kv_heads * dim : 2 * kv_heads * dim].view(tokens, kv_heads, dim)  # strided
    value = fused[:, 2 * kv_heads * dim :].view(tokens, kv_heads, dim)
    slots = slots.to(cache.device)
    got, want = cache.clone(), cache.clone()
    ops.write_kv(got, 1, key, value, slots)
    reference.write_kv(want, 1, key, value, slots)
    changed = not torch.equal(got, cache)
    return bool(torch.equal(got, want)) and changed == bool((slots >= 0).any())


def check_block_moves(
    ops: ModuleType, case: PagedCase, count: int, *, gen: torch.Generator
) -> bool:
    """pack → unpack round trip and copy_blocks of ``ops`` match the reference exactly."""
    cache = case.kv_cache
    ids = torch.randperm(cache.shape[0], generator=gen)[:count].to(cache.device)
    packed = ops.pack_blocks(cache, ids)
    if not torch.equal(packed, reference.pack_blocks(cache, ids)):
        return False
    dst_ids = torch.randperm(cache.shape[0], generator=gen)[:count].to(cache.device)
    got = torch.randn_like(cache)
    want = got.clone()
    ops.unpack_blocks(got, dst_ids, packed)
    reference.unpack_blocks(want, dst_ids, packed)
    if not torch.equal(got, want):
        return False
    got2 = torch.randn_like(cache)
    want2 = got2.clone()
    ops.copy_blocks(cache, ids, got2, dst_ids)
    reference.copy_blocks(cache, ids, want2, dst_ids)
    if not torch.equal(got2, want2):
        return False
    # Within one cache, destinations overlapping sources: every destination gets the old value.
    chain = ids[: max(1, count // 2)]
    shifted = chain.roll(1)
    got3, want3 = cache.clone(), cache.clone()
    ops.copy_blocks(got3, chain, got3, shifted)
    reference.copy_blocks(want3, chain, want3, shifted)
    return bool(torch.equal(got3, want3))
