"""Decode-step CUDA graphs (workers/engine/cuda_graphs.py) against the eager forward on the same model:
bit-identical to an eager step over the same padded bucket, and within rounding of an eager step
over the unpadded batch, across batch sizes, ragged contexts and block boundaries."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel, load_model

pytestmark = pytest.mark.gpu

BLOCK = 16
NUM_BLOCKS = 1024
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |graph - eager| / max |eager|


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def setup(
    request: pytest.FixtureRequest, make_gpu_llama: Callable[..., Path]
) -> tuple[LoadedModel, torch.Tensor, DecodeGraphs]:
    dtype = request.param
    loaded = load_model(make_gpu_llama(seed=3), dtype=dtype, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = kv_cache_shape(loaded.config, NUM_BLOCKS, BLOCK)
    cache = (torch.randn(shape, generator=gen, device="cuda") * 0.5).to(dtype)
    max_blocks = loaded.config.max_context // BLOCK  # 64: widths 16, 64
    graphs = DecodeGraphs(loaded.model, cache, max_batch=16, max_blocks=max_blocks)
    return loaded, cache, graphs


def random_batch(rng: random.Random, n: int, contexts: list[int] | None = None) -> DecodeBatch:
    """n rows with distinct random blocks; row i decodes at position ctx_i - 1."""
    ctxs = contexts or [rng.choice([1, 15, 16, 17, 33, 255, 256, 257, rng.randint(1, 1000)])
                        for _ in range(n)]  # fmt: skip
    free = rng.sample(range(NUM_BLOCKS), NUM_BLOCKS)
    tables = [[free.pop() for _ in range(-(-c // BLOCK))] for c in ctxs]
    pos = [c - 1 for c in ctxs]
    return DecodeBatch(
        input_ids=[rng.randrange(3, 512) for _ in ctxs],
        positions=pos,
        slots=[t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, pos, strict=True)],
        block_tables=tables,
    )


def eager_logits(
    loaded: LoadedModel, cache: torch.Tensor, batch: DecodeBatch, rows: int = 0, width: int = 0
) -> torch.Tensor:
    """An eager decode step; ``rows``/``width`` > 0 pad it exactly as the graph bucket does."""
    n = len(batch.input_ids)
    rows, width = max(rows, n), max(width, max(len(t) for t in batch.block_tables))
    pad = rows - n
    tables = torch.zeros((rows, width), dtype=torch.int32)
    for i, t in enumerate(batch.block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    ctx = [p + 1 for p in batch.positions] + [0] * pad

    def dev(x: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device="cuda")

    attn = AttentionMetadata(
        slot_mapping=dev([*batch.slots, *[-1] * pad]),
        block_tables=tables.cuda(),
        context_lens=dev(ctx, torch.int32),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device="cuda"),
        is_decode=True,
    )
    ids = dev([*batch.input_ids, *[0] * pad])
    pos = dev([*batch.positions, *[0] * pad])
    hidden = loaded.model(ids, pos, cache, attn)
    return loaded.model.compute_logits(hidden)[:n]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("n", [1, 2, 3, 8, 13, 16])
def test_graph_matches_eager(setup: tuple[LoadedModel, torch.Tensor, DecodeGraphs], n: int) -> None:
    loaded, cache, graphs = setup
    rng = random.Random(n)
    for _ in range(3):  # the same buckets replayed with fresh inputs: nothing stale leaks
        batch = random_batch(rng, n)
        replay = graphs.run(batch)
        assert replay is not None
        got = replay.logits.clone()
        assert got.shape == (n, loaded.config.vocab_size) and got.dtype == torch.float32
        assert torch.isfinite(got).all()
        key = graphs.bucket(n, max(len(t) for t in batch.block_tables))
        assert key is not None
        same_shape = eager_logits(loaded, cache, batch, *key)
        assert torch.equal(got, same_shape), f"graph != eager bucket: {rel_err(got, same_shape)}"
        unpadded = eager_logits(loaded, cache, batch)
        dtype = next(loaded.model.parameters()).dtype
        assert rel_err(got, unpadded) <= TOL[dtype]


def test_width_buckets_follow_the_longest_table(
    setup: tuple[LoadedModel, torch.Tensor, DecodeGraphs],
) -> None:
    loaded, cache, graphs = setup
    rng = random.Random(7)
    short = random_batch(rng, 4, [5, 16, 100, 256])  # 16 blocks: the narrow bucket
    long = random_batch(rng, 4, [5, 16, 100, 257])  # 17 blocks: the next one
    assert graphs.bucket(4, 16) == (4, 16) and graphs.bucket(4, 17) == (4, 64)
    storage = set()
    for batch in (short, long, short):
        replay = graphs.run(batch)
        assert replay is not None
        assert rel_err(replay.logits, eager_logits(loaded, cache, batch)) <= 1e-2
        storage.add(replay.logits.data_ptr())
    assert len(storage) == 1  # both widths of batch size 4 write one logits buffer


def test_batch_past_the_largest_bucket_is_refused(
    setup: tuple[LoadedModel, torch.Tensor, DecodeGraphs],
) -> None:
    _, _, graphs = setup
    assert graphs.run(random_batch(random.Random(1), 17)) is None
    too_long = random_batch(random.Random(2), 1, [1000])
    too_long = DecodeBatch(
        too_long.input_ids, too_long.positions, too_long.slots, [[0] * 65]
    )  # 65 blocks > the model's 64
    assert graphs.run(too_long) is None


def test_replay_does_not_sync_the_host(
    setup: tuple[LoadedModel, torch.Tensor, DecodeGraphs],
) -> None:
    """Staging, replay and a greedy pick raise nothing under sync debug mode "error" (a
    pageable upload, ``.item()`` or ``nonzero`` would)."""
    _, _, graphs = setup
    rng = random.Random(11)
    first = random_batch(rng, 5)
    graphs.run(first)  # capture outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replay = graphs.run(random_batch(rng, 5, [p + 1 for p in first.positions]))  # same bucket
        assert replay is not None
        tokens = replay.logits.argmax(dim=-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (5,)


def test_capture_while_another_thread_uses_the_gpu(
    make_gpu_llama: Callable[..., Path],
) -> None:
    """A worker captures while its KV transport / swap threads allocate, copy and synchronise
    on the same GPU (seen on an H100 under load: 'operation failed due to a previous error
    during capture' killed the engine loop). Those threads work inside ``GPU_GATE.work()``;
    without the gate (thread_local capture mode only) one bucket of five failed on an H100.
    Every bucket captures and matches eager, and the side thread never fails."""
    import threading

    loaded = load_model(make_gpu_llama(seed=5), dtype=torch.float32, device="cuda")
    cache = torch.zeros(kv_cache_shape(loaded.config, NUM_BLOCKS, BLOCK), device="cuda")
    graphs = DecodeGraphs(loaded.model, cache, max_batch=16, max_blocks=64)
    stop = threading.Event()
    busy = {"rounds": 0}

    errors: list[BaseException] = []

    def transport_like() -> None:  # does what the channel and the swap thread do
        try:
            side_work()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    def side_work() -> None:
        side = torch.cuda.Stream()
        while not stop.is_set():
            with GPU_GATE.work():
                with torch.cuda.stream(side):
                    # 64 sizes: the caching allocator goes to cudaMalloc for each new one
                    buf = torch.empty((1 << 20) + busy["rounds"] % 64 * (1 << 16), device="cuda")
                    buf.copy_(torch.ones(buf.numel(), pin_memory=True), non_blocking=True)
                side.synchronize()
                del buf
            busy["rounds"] += 1

    worker = threading.Thread(target=transport_like, daemon=True)
    worker.start()
    try:
        rng = random.Random(5)
        for n in (1, 2, 4, 8, 16):
            batch = random_batch(rng, n, [rng.randint(1, 250) for _ in range(n)])
            replay = graphs.run(batch)
            assert replay is not None, graphs.capture_failures
            got = replay.logits.clone()
            assert rel_err(got, eager_logits(loaded, cache, batch)) <= TOL[torch.float32]
    finally:
        stop.set()
        worker.join(10)
    assert graphs.capture_failures == {} and busy["rounds"] > 0 and errors == []
    assert GPU_GATE.captures >= 5


def test_a_failed_capture_runs_eagerly_and_gives_up_after_a_few(
    setup: tuple[LoadedModel, torch.Tensor, DecodeGraphs], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvrelay.workers.engine import cuda_graphs

    _, _, graphs = setup
    calls = {"n": 0}

    def broken(size: int, width: int, reuse: bool = False) -> None:
        calls["n"] += 1
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(graphs, "capture", broken)
    batch = random_batch(random.Random(3), 9)  # bucket (16, w): not captured by earlier tests
    key = graphs.bucket(9, max(len(t) for t in batch.block_tables))
    graphs._graphs.pop(key, None)
    for _ in range(cuda_graphs.MAX_CAPTURE_FAILURES + 2):
        assert graphs.run(batch) is None  # the runner's eager path takes the step
    assert calls["n"] == cuda_graphs.MAX_CAPTURE_FAILURES
    assert graphs.capture_failures[key] == cuda_graphs.MAX_CAPTURE_FAILURES
    graphs.capture_failures.pop(key)
