"""Sparse attention through the engine (2-layer random-weight Llama, CPU): opt-in exactness when
the budget covers the context, metrics, and PD receipt — a decode engine that receives prompt KV
(handoff) recomputes the key bounds and decodes exactly as if it had prefilled itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.kernels.sparse_reference import block_bounds
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.sparse_attention import SparseConfig
from kvrelay.workers.types import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPT = [(7 * i + 3) % 400 + 10 for i in range(300)]


def _engine(model_dir: Path, mode: str = "off", budget: int = 32) -> Engine:
    cfg = EngineConfig(num_blocks=64, max_num_batched_tokens=512, cpu_num_blocks=0,
                       sparse=SparseConfig(mode=mode, budget=budget))  # fmt: skip
    return Engine(load_model(model_dir), cfg)


def _run(engine: Engine, rid: str = "r") -> list[int]:
    engine.add_request(rid, PROMPT, PARAMS)
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for e in engine.step() if e.request_id == rid for t in e.token_ids]
    return out


def test_budget_covering_context_decodes_like_dense(tiny_model_dir: Path) -> None:
    dense = _run(_engine(tiny_model_dir))
    engine = _engine(tiny_model_dir, "decode", budget=4096)
    assert _run(engine) == dense
    assert engine.stats().extra["sparse_decode_read_fraction"] == pytest.approx(1.0)


def test_small_budget_reads_less_and_reports_it(tiny_model_dir: Path) -> None:
    engine = _engine(tiny_model_dir, "both", budget=32)
    assert len(_run(engine)) == PARAMS.max_tokens
    extra = engine.stats().extra
    # 64 sink + 32 budget + 48-64 local tokens (+ one block while reused), of ~300
    assert 0.35 < extra["sparse_decode_read_fraction"] < 0.6
    assert extra["sparse_prefill_density"] == 1.0  # 300 tokens: under min_prefill, dense


def test_pool_sizing_counts_the_key_bounds(tiny_model_dir: Path) -> None:
    loaded = load_model(tiny_model_dir)
    sized = {}
    for mode in ("off", "prefill", "decode"):
        cfg = EngineConfig(kv_cache_gb=0.01, cpu_num_blocks=0, sparse=SparseConfig(mode=mode))
        engine = Engine(loaded, cfg)
        sized[mode] = engine.pool.num_blocks
        held = engine.kv_cache.nbytes + (engine.sparse.bounds.nbytes if engine.sparse else 0)
        assert held <= 0.01 * 2**30
    assert sized["prefill"] == sized["off"]  # no bounds without sparse decode
    # 4-token sub-pages: the bounds add a quarter of the KV bytes
    assert sized["decode"] == int(0.01 * 2**30 // (engine.block_bytes * 5 // 4))


def test_handoff_receipt_recomputes_bounds(tiny_model_dir: Path) -> None:
    own = _run(_engine(tiny_model_dir, "decode"))
    prefill = _engine(tiny_model_dir)
    prefill.add_request("r", PROMPT, PARAMS, prefill_only=True)
    first: list[int] = []
    while "r" not in prefill.handoffs:
        first += [t for e in prefill.step() for t in e.token_ids]
    src = prefill.handoff_blocks("r")
    decode = _engine(tiny_model_dir, "decode")
    dst = decode.reserve(len(src) + 1)
    assert dst is not None
    decode.kv_cache[torch.tensor(dst[: len(src)])] = prefill.kv_cache[torch.tensor(src)]
    prefill.finish_handoff("r")
    decode.add_prefilled("r", PROMPT, first, PARAMS, dst)
    out = list(first)
    while decode.has_unfinished():
        out += [t for e in decode.step() for t in e.token_ids]
    assert out == own
    # the received blocks' bounds were rebuilt from the cache (not left at zeros)
    assert decode.sparse is not None
    full = torch.tensor(dst[: len(PROMPT) // 16])
    for layer in range(decode.kv_cache.shape[1]):
        fills = torch.full((len(full),), 16)
        want = block_bounds(decode.kv_cache, layer, full, fills, decode.sparse.pages)
        assert torch.equal(decode.sparse.bounds[full, layer], want)
