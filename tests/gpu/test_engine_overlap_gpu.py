"""The overlapped engine on CUDA (CUDA graphs on, the default) against the plain engine: the same
tokens and finish reasons request by request (greedy, seeded, repetition penalty, a stop token,
max_tokens, an abort), with and without preemption by swap and by recompute; pools clean."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import FinishReason, SamplingParams

pytestmark = pytest.mark.gpu
Outputs = dict[str, tuple[list[int], FinishReason | None]]


def _params(stop_id: int | None) -> list[SamplingParams]:
    stop = (stop_id,) if stop_id is not None else ()
    out = []
    for i in range(12):
        kind = i % 4
        if kind == 0:
            out.append(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
        elif kind == 1:
            out.append(SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=i))
        elif kind == 2:
            out.append(
                SamplingParams(max_tokens=28, temperature=0.0, stop_token_ids=stop, ignore_eos=True)
            )
        else:
            out.append(
                SamplingParams(
                    max_tokens=16, temperature=0.8, top_k=40, seed=i, repetition_penalty=1.3
                )
            )
    return out


def _run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> Outputs:
    out: Outputs = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"g{i}", p, sp)
        out[f"g{i}"] = ([], None)
    while engine.has_unfinished():
        for ev in engine.step():
            tokens, reason = out[ev.request_id]
            assert reason is None, f"{ev.request_id} emitted after it finished"
            out[ev.request_id] = (tokens + list(ev.token_ids), ev.finish_reason)
            if ev.request_id == "g0" and len(out["g0"][0]) == 3 and ev.finish_reason is None:
                assert engine.abort("g0")
                out["g0"] = (out["g0"][0], FinishReason.ABORT)
        engine.check_integrity()
    s = engine.stats()
    assert s.pool.used == 0 and (s.cpu_pool is None or s.cpu_pool.used == 0)
    return out


def _engine(loaded: LoadedModel, overlap: bool, **kw: object) -> Engine:
    base: dict[str, object] = dict(
        block_size=16,
        num_blocks=256,
        cpu_num_blocks=0,
        max_num_batched_tokens=64,
        overlap_schedule=overlap,
    )
    base.update(kw)
    engine = Engine(loaded, EngineConfig(**base), device="cuda")  # type: ignore[arg-type]
    assert engine.overlap is overlap and engine.runner.graphs is not None
    return engine


@pytest.mark.parametrize(
    "pool",
    [
        {},
        {"num_blocks": 14, "preemption_mode": "recompute"},
        {"num_blocks": 14, "cpu_num_blocks": 256, "preemption_mode": "swap"},
    ],
    ids=["roomy", "recompute", "swap"],
)
def test_overlapped_engine_equals_plain_on_cuda(
    make_gpu_llama: Callable[..., Path], pool: dict[str, object]
) -> None:
    loaded = load_model(str(make_gpu_llama(seed=4)), device="cuda")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(8, 60))] for _ in range(12)]
    stop_id = _run(_engine(loaded, False), prompts, _params(None))["g2"][0][5]
    params = _params(stop_id)
    plain = _engine(loaded, False, **pool)
    ref = _run(plain, prompts, params)
    over = _engine(loaded, True, **pool)
    assert _run(over, prompts, params) == ref
    assert ref["g2"][1] is FinishReason.STOP
    s = over.stats()
    assert over.runner.graph_steps > 0 and s.extra["overlap_discarded_tokens"] > 0
    if pool:
        assert s.preemptions > 0
    over.close()
    plain.close()


def test_overlap_is_the_cuda_default(make_gpu_llama: Callable[..., Path]) -> None:
    loaded = load_model(str(make_gpu_llama(seed=4)), device="cuda")
    assert Engine(loaded, EngineConfig(num_blocks=64), device="cuda").overlap
    cpu = load_model(str(make_gpu_llama(seed=4)))
    assert not Engine(cpu, EngineConfig(num_blocks=64)).overlap
