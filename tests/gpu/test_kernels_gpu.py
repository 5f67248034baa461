"""Every Triton kernel against its torch reference (evaluated in fp32) on fresh random inputs on a
CUDA device: ragged lengths, one KV head, GQA 4 and 8, block boundaries, page sizes 8 to 64,
bf16 / fp16 / fp32, long contexts that take the split-K path, and a CUDA-graph capture that
proves the ops launch without host synchronisation."""

from __future__ import annotations

import zlib

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kvrelay import kernels  # noqa: E402
from kvrelay.kernels import reference, triton_decode, triton_ops  # noqa: E402
from kvrelay_testing import kernels as kt  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _gen(*key: object) -> torch.Generator:
    """A generator seeded from the case (stable across runs, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


# (context lengths, heads, kv_heads, block_size, head_dim)
DECODE_SHAPES = [
    ([1, 17, 100, 257], 32, 8, 16, 64),  # Llama-3.2-1B heads, ragged
    ([15, 16, 17, 31, 32, 33, 64, 65], 8, 1, 16, 128),  # block boundaries, one KV head
    ([300, 5, 1000], 32, 4, 8, 128),  # GQA 8, page 8
    ([129, 2], 16, 16, 32, 64),  # MHA, page 32
    ([500, 77], 28, 4, 64, 128),  # GQA 7 (padded group), page 64
    ([90, 45], 12, 2, 16, 96),  # head_dim 96 (padded)
]
LONG = [([5000], 32, 8, 16, 64), ([8192, 3000], 32, 8, 16, 128), ([16000, 1], 8, 1, 16, 64)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("lens", "heads", "kv_heads", "bs", "dim"), DECODE_SHAPES)
def test_decode(dtype: torch.dtype, lens, heads, kv_heads, bs, dim) -> None:
    gen = _gen(lens, heads, dtype)
    case = kt.make_case(
        lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, device=DEV, gen=gen
    )
    assert kt.check_decode(triton_ops, case, heads, gen=gen) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("lens", "heads", "kv_heads", "bs", "dim"), LONG)
def test_decode_long_context_split_k(dtype: torch.dtype, lens, heads, kv_heads, bs, dim) -> None:
    gen = torch.Generator().manual_seed(len(lens) * 1000 + heads)
    case = kt.make_case(
        lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, device=DEV, gen=gen
    )
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits, _ = triton_decode.choose_splits(
        len(lens), kv_heads, case.block_tables.shape[1] * bs, sms
    )
    assert splits > 1  # these shapes must take the split-K path
    assert kt.check_decode(triton_ops, case, heads, gen=gen) < TOL[dtype]


@pytest.mark.parametrize("splits", [1, 3, 64])
def test_decode_forced_splits(splits: int) -> None:
    gen = torch.Generator().manual_seed(splits)
    case = kt.make_case(
        [2000, 1, 700], kv_heads=2, head_dim=64, dtype=torch.float32, device=DEV, gen=gen
    )
    assert kt.check_decode(triton_decode, case, 8, gen=gen, num_splits=splits) < 1e-5


# (context lengths, new tokens per sequence, heads, kv_heads, block_size, head_dim)
PREFILL_SHAPES = [
    ([100, 40, 257], [100, 1, 130], 32, 8, 16, 64),  # whole prompt, a decode row, cached prefix
    ([15, 16, 17, 33], [15, 16, 1, 17], 8, 1, 16, 128),  # boundaries, one KV head
    ([1000, 300], [1000, 0], 32, 4, 8, 128),  # GQA 8, a sequence with no new token
    ([700], [350], 16, 16, 32, 64),  # MHA, page 32
    ([3000, 129], [2500, 129], 28, 4, 64, 128),  # long, GQA 7, page 64
    ([90, 45], [90, 45], 12, 2, 16, 96),  # head_dim 96
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("lens", "qlens", "heads", "kv_heads", "bs", "dim"), PREFILL_SHAPES)
def test_prefill(dtype: torch.dtype, lens, qlens, heads, kv_heads, bs, dim) -> None:
    gen = _gen(lens, heads, dtype)
    case = kt.make_case(
        lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, device=DEV, gen=gen
    )
    assert kt.check_prefill(triton_ops, case, heads, qlens, gen=gen) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("rows", "seqs"), [(512, 64), (1024, 3), (300, 128)])
def test_prefill_over_padded_inputs(dtype: torch.dtype, rows: int, seqs: int) -> None:
    """As a prefill graph launches it (workers/engine/prefill_graphs.py): rows padded to a
    bucket, sequences to ``max_seqs`` owning no rows, wider tables, ``out`` given."""
    lens, qlens = [100, 40, 257], [100, 1, 130]
    gen = _gen(lens, rows, dtype)
    case = kt.make_case(lens, kv_heads=8, head_dim=64, dtype=dtype, device=DEV, gen=gen)
    err = kt.check_prefill_padded(triton_ops, case, 32, qlens, rows=rows, seqs=seqs, gen=gen)
    assert err < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("kv_heads", "bs", "dim"), [(8, 16, 64), (1, 8, 128), (4, 64, 96)])
def test_write_kv(dtype: torch.dtype, kv_heads: int, bs: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(kv_heads * bs + dim)
    case = kt.make_case(
        [300, 100], block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, device=DEV, gen=gen
    )
    assert kt.check_write_kv(triton_ops, case, 257, gen=gen)


@pytest.mark.parametrize(("count", "layers"), [(1, 2), (37, 16), (200, 4)])
def test_block_moves(count: int, layers: int) -> None:
    gen = torch.Generator().manual_seed(count)
    case = kt.make_case([4000], layers=layers, kv_heads=8, head_dim=64, device=DEV, gen=gen)
    assert kt.check_block_moves(triton_ops, case, count, gen=gen)


def test_block_moves_across_devices_use_the_reference() -> None:
    gen = torch.Generator().manual_seed(7)
    cache = kt.make_case([300], kv_heads=2, head_dim=64, device=DEV, gen=gen).kv_cache
    host = torch.zeros_like(cache, device="cpu")
    ids = torch.tensor([3, 1, 4], device=DEV)
    triton_ops.copy_blocks(cache, ids, host, ids.cpu())
    assert torch.equal(host[[3, 1, 4]], cache[ids].cpu())
    triton_ops.unpack_blocks(cache, ids, host[[0, 2, 5]])  # packed on the host
    assert torch.equal(cache[ids].cpu(), host[[0, 2, 5]])


def test_dispatch_picks_triton_on_cuda() -> None:
    assert kernels._triton_ops() is triton_ops


# (context lengths, new tokens, rows, sequences) for ``live_seqs``: BLOCK_M is 128 here (bf16,
# head_dim 64 and 128)
LIVE = [
    ([40, 21, 900], [40, 1, 450], 1024, 128),  # padded rows and sequences, max_num_seqs 128
    ([300, 9, 200, 5], [300, 9, 70, 5], 512, 4),  # all live (B == Bmax)
    ([1024], [1024], 1024, 256),  # one live sequence of 256 (the measured case's shape)
    ([128, 400, 256], [128, 256, 128], 640, 8),  # lengths multiples of BLOCK_M
    ([1000, 70, 300], [128, 1, 127], 384, 16),  # cached prefixes, a decode row
]


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(("lens", "qlens", "rows", "seqs"), LIVE)
def test_prefill_live_bound(lens: list[int], qlens: list[int], rows: int, seqs: int,
                            dim: int) -> None:  # fmt: skip
    """tests/unit/test_kernels_interpret.py's case compiled: with ``live_seqs`` the padded
    launch gives the unpadded call's output bit for bit, writes no padded row, and ignores the
    garbage past the live sequences (check_prefill_live)."""
    gen = _gen(lens, qlens, rows, seqs, dim)
    case = kt.make_case(lens, kv_heads=8, head_dim=dim, device=DEV, gen=gen)
    err, diff = kt.check_prefill_live(triton_ops, case, 32, qlens, rows=rows, seqs=seqs, gen=gen)
    assert diff == 0.0 and err < TOL[torch.bfloat16]


@pytest.mark.parametrize("live", [False, True], ids=["padded", "live_seqs"])
def test_padded_prefill_replays_for_any_step_of_its_bucket(live: bool) -> None:
    """Prefill attention captured once over static padded inputs (512 rows, 8 sequences, as a
    prefill graph holds them), then replayed for steps of 1 to 8 sequences and 17 to 512 rows
    staged into them: each replay matches the reference of that step's own (unpadded) inputs
    and writes no padded row. With ``live`` the count of live sequences is staged too and the
    metadata past them is garbage (starts rising from T into the padded rows, contexts that
    cover them): the kernel's bound alone keeps those sequences out."""
    gen = torch.Generator().manual_seed(9)
    rows, seqs, heads = 512, 8, 8
    case = kt.make_case([600] * seqs, kv_heads=2, head_dim=64, device=DEV, gen=gen)
    cache, all_tables, _ = case
    q = torch.zeros(rows, heads, 64, dtype=cache.dtype, device=DEV)
    out = torch.zeros_like(q)
    tables = torch.zeros_like(all_tables)
    starts = torch.zeros(seqs + 1, dtype=torch.int32, device=DEV)
    ctx = torch.zeros(seqs, dtype=torch.int32, device=DEV)
    num_live = torch.zeros(1, dtype=torch.int32, device=DEV)
    span = all_tables.shape[1] * cache.shape[3]  # tokens a table row holds (>= rows)

    def attend() -> None:
        triton_ops.paged_prefill_attention(
            q, cache, 1, tables, starts, ctx, 0.125, out=out, live_seqs=num_live if live else None
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        attend()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attend()
    # (new tokens, cached prefix) per sequence
    steps = [[(512, 0)], [(17, 0)], [(300, 200), (1, 50), (100, 0)], [(64, 30)] * 8,
             [(128, 0), (256, 100)]]  # fmt: skip
    for step in steps:
        news = [n for n, _ in step]
        b, t = len(step), sum(news)
        qsl = kt.query_start_loc(news, DEV)
        lens = torch.tensor([n + p for n, p in step], dtype=torch.int32, device=DEV)
        q.copy_(torch.randn(q.shape, generator=gen).to(DEV, q.dtype))
        out.fill_(float("nan"))
        starts[: b + 1] = qsl
        starts[b + 1 :] = t
        ctx.zero_()
        ctx[:b] = lens
        num_live.fill_(b)
        if live and b < seqs:  # garbage past the live sequences
            cuts = torch.randint(t, rows + 1, (seqs - b,), generator=gen).sort().values
            starts[b + 1 :] = cuts.to(DEV, torch.int32)
            ctx[b:] = torch.randint(rows, span + 1, (seqs - b,), generator=gen).to(DEV)
        tables.copy_(all_tables.roll(1, 0))  # other sequences' blocks: stale rows
        tables[:b] = all_tables[:b]
        graph.replay()
        want = reference.paged_prefill_attention(
            q[:t].float(), cache.float(), 1, all_tables[:b], qsl, lens, 0.125
        )
        assert kt.rel_err(out[:t], want) < 1e-2, step
        assert bool(out[t:].isnan().all()), step


def test_decode_step_captures_in_a_cuda_graph() -> None:
    """write_kv + decode attention replayed from a graph match eager results on new inputs: the
    launches read no tensor values on the host (a sync would fail the capture)."""
    gen = torch.Generator().manual_seed(8)
    case = kt.make_case([700, 3, 64], kv_heads=2, head_dim=64, device=DEV, gen=gen)
    cache, tables, lens = case
    q = torch.randn(3, 8, 64, generator=gen).to(DEV, cache.dtype)
    k, v = torch.randn(2, 3, 2, 64, generator=gen).to(DEV, cache.dtype).unbind(0)
    bs = cache.shape[3]
    last = (lens - 1).long()
    slots = (tables.gather(1, (last // bs)[:, None])[:, 0].long() * bs + last % bs).contiguous()
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        triton_ops.write_kv(cache, 1, k, v, slots)
        out.copy_(triton_ops.paged_decode_attention(q, cache, 1, tables, lens, 0.125))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_ops.write_kv(cache, 1, k, v, slots)
        out.copy_(triton_ops.paged_decode_attention(q, cache, 1, tables, lens, 0.125))
    for _ in range(2):
        q.copy_(torch.randn(q.shape, generator=gen).to(DEV, q.dtype))
        k.copy_(torch.randn(k.shape, generator=gen).to(DEV, k.dtype))
        graph.replay()
        want_cache = cache.clone()
        reference.write_kv(want_cache, 1, k, v, slots)
        assert torch.equal(cache, want_cache)
        want = reference.paged_decode_attention(q.float(), cache.float(), 1, tables, lens, 0.125)
        assert kt.rel_err(out, want) < 1e-2
