"""The Triton kernels, run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1) at
small sizes, against the fp32 reference: the same checks tests/gpu/test_kernels_gpu.py runs on a
GPU, so CI catches indexing, masking and split-K errors without one.

Triton fixes interpreted-vs-compiled when it decorates a ``@triton.jit`` function, and its own
standard library (``tl.zeros``, ``tl.maximum``...) is decorated when ``triton`` is imported; so
the variable must be set before the first ``import triton`` of the process. This module sets it
only where it cannot change anything else: triton not yet imported and no CUDA device (where
compiled Triton cannot run at all), and it restores the environment once the kernels are
imported, so subprocesses started by later tests do not inherit it. Elsewhere it skips, saying
why; on a GPU machine tests/gpu runs the same checks on compiled kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from kvrelay_testing import kernels as kt

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'kvrelay[test]')", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/gpu checks the compiled kernels", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip(
        "triton was imported before this module without TRITON_INTERPRET=1; run this file alone",
        allow_module_level=True,
    )


class _InterpretEnv:
    """TRITON_INTERPRET=1 while entered, the previous value restored after."""

    def __enter__(self) -> None:
        self.saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = self.saved


# Imported at collection, before any other module can import triton compiled. Triton also
# checks the variable lazily at the first launch, hence the fixture below sets it again.
with _InterpretEnv():
    _OPS = importlib.import_module("kvrelay.kernels.triton_ops")
    _DECODE = importlib.import_module("kvrelay.kernels.triton_decode")


@pytest.fixture(scope="module")
def interp() -> Iterator[ModuleType]:
    """kvrelay.kernels.triton_ops, interpreted (``.decode``: its decode module, for split-K)."""
    assert type(_DECODE._decode_kernel).__name__ == "InterpretedFunction"
    _OPS.decode = _DECODE  # type: ignore[attr-defined]
    with _InterpretEnv():
        yield _OPS


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SHAPES = [  # (context lengths, heads, kv_heads, block_size, head_dim)
    ([1, 17, 100], 8, 2, 16, 32),  # ragged, GQA 4
    ([15, 16, 17, 32, 33], 4, 1, 8, 16),  # block boundaries, one KV head, block size 8
    ([70, 3], 8, 1, 32, 24),  # GQA 8, block size 32, head_dim not a power of two
]
# Every dtype on the first shape, bf16 on the others (the interpreter is slow).
CASES = [(d, *SHAPES[0]) for d in DTYPES] + [(torch.bfloat16, *s) for s in SHAPES[1:]]


@pytest.mark.parametrize(("dtype", "lens", "heads", "kv_heads", "bs", "dim"), CASES)
def test_decode(interp: ModuleType, dtype: torch.dtype, lens, heads, kv_heads, bs, dim) -> None:
    gen = torch.Generator().manual_seed(10)
    case = kt.make_case(lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, gen=gen)
    assert kt.check_decode(interp, case, heads, gen=gen) < TOL[dtype]


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_split_k(interp: ModuleType, splits: int) -> None:
    """Forced partitions (incl. ones past a short sequence's end) merge to the same result."""
    gen = torch.Generator().manual_seed(11)
    case = kt.make_case([300, 5, 129], kv_heads=2, head_dim=16, dtype=torch.float32, gen=gen)
    assert kt.check_decode(interp.decode, case, 4, gen=gen, num_splits=splits) < 1e-5


def test_decode_chooses_split_k_from_shapes(interp: ModuleType) -> None:
    assert interp.decode.choose_splits(1, 8, 1024, 132)[0] > 1
    assert interp.decode.choose_splits(128, 8, 1024, 132)[0] == 1


@pytest.mark.parametrize(("dtype", "lens", "heads", "kv_heads", "bs", "dim"), CASES)
def test_prefill(interp: ModuleType, dtype: torch.dtype, lens, heads, kv_heads, bs, dim) -> None:
    gen = torch.Generator().manual_seed(12)
    case = kt.make_case(lens, block_size=bs, kv_heads=kv_heads, head_dim=dim, dtype=dtype, gen=gen)
    # All of the first sequence new, one new token in the second, about half new in the rest.
    qlens = [lens[0]] + [1 if i == 1 else max(1, n // 2) for i, n in enumerate(lens[1:], 1)]
    assert kt.check_prefill(interp, case, heads, qlens, gen=gen) < TOL[dtype]


def test_prefill_sequence_without_new_tokens(interp: ModuleType) -> None:
    gen = torch.Generator().manual_seed(13)
    case = kt.make_case([20, 33, 7], kv_heads=1, head_dim=16, dtype=torch.float32, gen=gen)
    assert kt.check_prefill(interp, case, 2, [4, 0, 7], gen=gen) < 1e-5


# (context lengths, new tokens, rows, sequences): padded as prefill_graphs.py pads a step;
# BLOCK_M is 64 under the interpreter
PADDED = [
    ([40, 21, 90], [40, 1, 45], 128, 8),  # padded rows and sequences
    ([64, 100], [64, 64], 256, 2),  # T a multiple of BLOCK_M, rows only
    ([30, 9, 200, 5], [30, 9, 70, 5], 114, 7),  # sequences only (rows == T)
    ([1], [1], 64, 128),  # one row, 127 empty sequences
]


@pytest.mark.parametrize(("lens", "qlens", "rows", "seqs"), PADDED)
def test_prefill_over_padded_inputs(
    interp: ModuleType, lens: list[int], qlens: list[int], rows: int, seqs: int
) -> None:
    """The fixed grid of a prefill graph (``rows // BLOCK_M + seqs`` tiles per head): real rows
    as without padding, padded rows not written (check_prefill_padded asserts it)."""
    gen = torch.Generator().manual_seed(17)
    case = kt.make_case(lens, kv_heads=2, head_dim=16, dtype=torch.float32, gen=gen)
    err = kt.check_prefill_padded(interp, case, 4, qlens, rows=rows, seqs=seqs, gen=gen)
    assert err < 1e-5


# (context lengths, new tokens, rows, sequences, dtype) for the bound of ``live_seqs``: BLOCK_M
# is 64 under the interpreter
LIVE = [
    ([40, 21, 90], [40, 1, 45], 128, 8, torch.float32),  # padded rows and sequences
    ([30, 9, 200, 5], [30, 9, 70, 5], 128, 4, torch.float32),  # all live (B == Bmax)
    ([1], [1], 64, 128, torch.float32),  # one live of 128, one row
    ([100], [100], 256, 16, torch.bfloat16),  # one live sequence, several tiles
    ([64, 200, 128], [64, 128, 64], 320, 6, torch.float32),  # lengths multiples of BLOCK_M
    ([130, 70, 300], [64, 1, 63], 192, 5, torch.bfloat16),  # cached prefixes, a decode row
]


@pytest.mark.parametrize(("lens", "qlens", "rows", "seqs", "dtype"), LIVE)
def test_prefill_live_bound(
    interp: ModuleType,
    lens: list[int],
    qlens: list[int],
    rows: int,
    seqs: int,
    dtype: torch.dtype,
) -> None:
    """With ``live_seqs`` the padded launch gives exactly the unpadded call's output (the tiles
    are remapped, their work is the same) and writes no padded row, though the metadata past
    the live sequences is garbage that would give the padded rows to padded sequences: the bound
    alone keeps their programs out (check_prefill_live)."""
    gen = torch.Generator().manual_seed(19)
    case = kt.make_case(lens, kv_heads=2, head_dim=16, dtype=dtype, gen=gen)
    err, diff = kt.check_prefill_live(interp, case, 4, qlens, rows=rows, seqs=seqs, gen=gen)
    assert diff == 0.0 and err < TOL[dtype]


def test_prefill_live_none_and_bad(interp: ModuleType) -> None:
    """``live_seqs`` 0 (a graph's warm-up) writes nothing, as the reference; a count of more
    than one element or of a float dtype is refused."""
    from kvrelay.kernels import reference

    gen = torch.Generator().manual_seed(20)
    cache, tables, lens = kt.make_case([40, 7], kv_heads=2, head_dim=16, dtype=torch.float32,
                                       gen=gen)  # fmt: skip
    q = torch.randn(64, 4, 16, generator=gen)
    qsl = kt.query_start_loc([40, 7], "cpu")
    for ops in (interp, reference):
        out = torch.full_like(q, float("nan"))
        none = torch.zeros(1, dtype=torch.int32)
        ops.paged_prefill_attention(q, cache, 1, tables, qsl, lens, 0.25, out=out, live_seqs=none)
        assert bool(out.isnan().all())
        for bad in (torch.ones(2, dtype=torch.int32), torch.ones(1)):
            with pytest.raises(ValueError):
                ops.paged_prefill_attention(q, cache, 1, tables, qsl, lens, 0.25, live_seqs=bad)


def test_prefill_graph_forward_with_the_kernel(
    interp: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PrefillGraphs' forward on CPU (capture off) with its attention through the interpreted
    kernel over the padded metadata, the plain forward through the reference: the same hidden
    states, three steps of falling size (stale metadata of a larger step left in the buffers).
    Imports here: the engine's modules are not needed before the kernels are interpreted."""
    from kvrelay import kernels
    from kvrelay.kernels import reference
    from kvrelay.workers.engine.prefill_graphs import PrefillGraphs
    from kvrelay.workers.engine.runner import prepare_inputs
    from kvrelay.workers.engine.scheduler import ScheduledSeq
    from kvrelay.workers.engine.sequence import Sequence
    from kvrelay.workers.model.llama import kv_cache_shape
    from kvrelay.workers.types import SamplingParams
    from kvrelay_testing.tiny_llama import VOCAB, tiny_llama

    def attention(
        *args: torch.Tensor, out: torch.Tensor | None = None, live_seqs: torch.Tensor | None = None
    ) -> torch.Tensor:
        ops = reference if out is None else interp  # the graph path passes ``out``, the bound
        assert (out is None) == (live_seqs is None)
        return ops.paged_prefill_attention(*args, out=out, live_seqs=live_seqs)

    monkeypatch.setattr(kernels, "paged_prefill_attention", attention)
    model, bs = tiny_llama(), 16
    gen = torch.Generator().manual_seed(18)
    cache = torch.randn(kv_cache_shape(model.config, 64, bs), generator=gen)
    plain_cache = cache.clone()
    graphs = PrefillGraphs(model, cache, capture=False, max_seqs=6)
    free = torch.randperm(64, generator=gen).tolist()
    seqs = []
    for i, n in enumerate((500, 120, 40)):
        seq = Sequence(f"s{i}", torch.randint(VOCAB, (n,), generator=gen).tolist(),
                       SamplingParams(max_tokens=1))  # fmt: skip
        seq.block_ids = [free.pop() for _ in range(-(-n // bs))]
        seqs.append(seq)
    a, b, c = seqs
    # 320 rows of 3 sequences (bucket 512), 50 of 2 (64), 280 of 1 (512): with 5 padded
    # sequences a 280-row one needs them to own no tile of its own
    for chunks in ([(a, 200), (b, 80), (c, 40)], [(a, 20), (b, 30)], [(a, 280)]):
        items = [ScheduledSeq(s, n) for s, n in chunks]
        inputs = prepare_inputs(items, bs, torch.device("cpu"))
        args = (inputs.input_ids, inputs.positions)
        ours = graphs.run(*args, inputs.attn)
        ref = model(*args, plain_cache, inputs.attn)
        assert ours is not None
        assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5
        for s, n in chunks:
            s.num_computed += n
    assert float((cache - plain_cache).abs().max()) < 1e-5 and graphs.steps == 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv(interp: ModuleType, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(14)
    case = kt.make_case([40, 9], kv_heads=2, head_dim=16, dtype=dtype, gen=gen)
    assert kt.check_write_kv(interp, case, 12, gen=gen)


def test_block_moves(interp: ModuleType) -> None:
    gen = torch.Generator().manual_seed(15)
    case = kt.make_case([100, 50], kv_heads=2, head_dim=16, gen=gen)
    assert kt.check_block_moves(interp, case, 4, gen=gen)


def test_bad_shapes_raise(interp: ModuleType) -> None:
    gen = torch.Generator().manual_seed(16)
    cache, tables, lens = kt.make_case([10], kv_heads=2, head_dim=16, gen=gen)
    q = torch.randn(1, 3, 16, dtype=cache.dtype)  # 3 heads do not divide over 2 KV heads
    with pytest.raises(ValueError):
        interp.paged_decode_attention(q, cache, 0, tables, lens, 1.0)
    with pytest.raises(ValueError):
        interp.paged_decode_attention(q[:, :2], cache, 5, tables, lens, 1.0)  # no layer 5
    with pytest.raises(ValueError):
        interp.write_kv(cache, 0, torch.ones(2, 2, 8), torch.ones(2, 2, 8), torch.tensor([0, 1]))
