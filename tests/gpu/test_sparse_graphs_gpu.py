"""Sparse decode steps replayed as CUDA graphs (workers/engine/cuda_graphs.py recording
SparseAttention.static_step) against the same engine with graphs off: identical greedy tokens
and sparse counters while requests join and leave (fresh rows run eagerly, steady steps replay,
padding rows in the buckets), with a budget small enough that selection happens, streaming
heads, and selections refreshed every step or reused (replaying a graph that reads the
selecting graph's static picks, or with ``shortlist_steps`` its static shortlists, re-ranked);
and a replay that never synchronises the host."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.cuda_graphs import DecodeBatch, DecodeGraphs
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.llama import kv_cache_shape
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.gpu

BS = 16
# (arrival step, prompt tokens, new tokens): the batch grows to 4 and shrinks, so buckets of 1, 2
# and 4 rows replay, some with padding rows; the first request decodes 60 steps
REQUESTS = [(0, 300, 60), (0, 520, 20), (6, 180, 40), (15, 410, 30), (27, 260, 25)]
STREAMING = [[False, True], [False, False], [True, False], [False, False]]  # [L, Hkv]


@pytest.fixture(scope="module")
def model_and_heads(
    make_gpu_llama: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    heads = tmp_path_factory.mktemp("sparse-heads") / "heads.json"
    heads.write_text(json.dumps({"streaming": STREAMING}))
    return make_gpu_llama(seed=9), heads


def sparse_config(heads: Path, reuse_steps: int, shortlist_steps: int = 1) -> SparseConfig:
    # a dense head reads 1 sink + 2 picked + 1 local block: 180-580-token contexts select
    return SparseConfig(mode="decode", budget=2 * BS, page_tokens=BS, stream_sink=BS,
                        stream_local=2 * BS, reuse_steps=reuse_steps,
                        shortlist_steps=shortlist_steps, heads_path=str(heads),
                        graphs=True)  # fmt: skip


def run_engine(
    folder: Path, heads: Path, reuse_steps: int, graphs: bool, monkeypatch: pytest.MonkeyPatch,
    shortlist_steps: int = 1,
) -> tuple[Engine, dict[str, list[int]]]:  # fmt: skip
    monkeypatch.setenv("KVRELAY_CUDA_GRAPHS", "1" if graphs else "0")
    sparse = sparse_config(heads, reuse_steps, shortlist_steps)
    cfg = EngineConfig(num_blocks=512, max_num_seqs=8, max_num_batched_tokens=256,
                       cpu_num_blocks=0, sparse=sparse)  # fmt: skip
    engine = Engine(load_model(folder, dtype=torch.float32, device="cuda"), cfg, device="cuda")
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for _, n, _ in REQUESTS]
    out: dict[str, list[int]] = {}
    step = 0
    while step <= max(a for a, _, _ in REQUESTS) or engine.has_unfinished():
        for i, (arrive, _, new) in enumerate(REQUESTS):
            if arrive == step:
                params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
                engine.add_request(f"r{i}", prompts[i], params)
                out[f"r{i}"] = []
        for event in engine.step():
            out[event.request_id] += event.token_ids
        step += 1
    engine.check_integrity()
    return engine, out


@pytest.mark.parametrize(("reuse_steps", "shortlist_steps"), [(1, 1), (3, 1), (1, 3)])
def test_sparse_graphs_decode_like_eager(
    model_and_heads: tuple[Path, Path], reuse_steps: int, shortlist_steps: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    folder, heads = model_and_heads
    eager, want = run_engine(folder, heads, reuse_steps, False, monkeypatch, shortlist_steps)
    graphed, got = run_engine(folder, heads, reuse_steps, True, monkeypatch, shortlist_steps)
    assert eager.runner.graphs is None and eager.runner.graph_steps == 0
    runner = graphed.runner
    assert runner.graphs is not None
    assert [len(got[f"r{i}"]) for i in range(len(REQUESTS))] == [n for _, _, n in REQUESTS]
    assert got == want
    stats, want_stats = graphed.stats().extra, eager.stats().extra
    for key in ("sparse_decode_layer_steps", "sparse_decode_selected_tokens",
                "sparse_decode_read_fraction"):  # fmt: skip
        assert stats[key] == want_stats[key], key
    assert stats["sparse_decode_read_fraction"] < 0.7  # selection happened
    # 52 decode steps, fresh rows in ~5 (eager, with the 2 reusing steps after each at reuse
    # 3); at reuse 3 only ~16 steps select, so >= 30 replays means reusing steps replayed too
    # (at shortlist 3 likewise: only ~16 steps shortlist)
    assert runner.graph_steps >= 30, runner.graph_steps
    assert runner.eager_steps > 0 and runner.graphs.num_graphs >= 2


def test_sparse_replay_does_not_sync_the_host(
    model_and_heads: tuple[Path, Path],
) -> None:
    """Staging, the pending fold, the replay and the host's share after it raise nothing under
    sync debug mode "error"."""
    folder, heads = model_and_heads
    loaded = load_model(folder, dtype=torch.float32, device="cuda")
    cache = torch.randn(kv_cache_shape(loaded.config, 256, BS), device="cuda")
    sparse = SparseAttention(sparse_config(heads, 1), cache)
    graphs = DecodeGraphs(loaded.model, cache, max_batch=4, max_blocks=64, sparse=sparse)
    ctxs = [300, 200, 410]
    free = list(range(1, 256))
    tables = [[free.pop() for _ in range(-(-c // BS))] for c in ctxs]

    def batch(step: int) -> DecodeBatch:
        pos = [c - 1 + step for c in ctxs]
        return DecodeBatch(
            input_ids=[5, 6, 7],
            positions=pos,
            slots=[t[p // BS] * BS + p % BS for t, p in zip(tables, pos, strict=True)],
            block_tables=tables,
        )

    keys = ["a", "b", "c"]
    sparse.begin_step(keys, ctxs, True)  # first sight: fresh rows (eager in the engine)
    sparse.begin_step(keys, [c + 1 for c in ctxs], True)
    assert sparse.capturable()
    assert graphs.run(batch(1)) is not None  # capture outside the check
    sparse.begin_step(keys, [c + 2 for c in ctxs], True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replay = graphs.run(batch(2))
        assert replay is not None
        tokens = replay.logits.argmax(dim=-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (3,)
    stats = sparse.stats_extra()
    assert stats["sparse_decode_layer_steps"] == 2 * loaded.config.num_layers
    assert 0 < stats["sparse_decode_read_fraction"] < 1
