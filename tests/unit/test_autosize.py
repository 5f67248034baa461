"""The pool autosizer's decision on a controller-shaped stub: a prefill-heavy load turns a
decode worker into a prefill worker (one switch per tick, once two ticks in a row asked for
it); decisions that alternate change nothing; too little data changes nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kvrelay.cluster.sizing.autosize import AutosizeConfig, PoolAutosizer


@dataclass
class StubClient:
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> None:
        self.calls.append((method, args))


def _worker(wid: str, role: str) -> SimpleNamespace:
    return SimpleNamespace(healthy=True, draining=False, role=role, assigned=set(),
                           client=StubClient(), info=SimpleNamespace(worker_id=wid))


def _controller(
    roles: dict[str, str], prefill_tps: float, measured: dict[str, float] | None = None
) -> SimpleNamespace:
    """``measured``: workers with a measured prefill rate (default: every worker, at
    ``prefill_tps``); the others fall back to ``prefill_tps`` as the routing default."""
    workers = {w: _worker(w, r) for w, r in roles.items()}
    rates = {w: prefill_tps for w in roles} if measured is None else measured
    return SimpleNamespace(workers=workers, routing=SimpleNamespace(
        prefill_tps=lambda w: rates.get(w, prefill_tps), measured_tps=rates.get))


def _load(sizer: PoolAutosizer, prompt: int, n: int = 10) -> None:
    sizer.arrivals.clear()
    for _ in range(n):
        sizer.on_arrival(prompt, 8)


def test_prefill_heavy_load_moves_a_decode_worker_to_prefill() -> None:
    c = _controller({"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"}, 800.0)
    sizer = PoolAutosizer(c, c.routing, AutosizeConfig(ttft_slo_s=1.0, itl_slo_s=0.5, window_s=10.0))
    _load(sizer, 1500)  # 1 req/s of 1500-token prompts (1 prefill worker does 800 tok/s)
    for batch in (1, 2, 4, 8):
        sizer.on_heartbeat(batch, 0.02 + 0.002 * batch)
    asyncio.run(sizer.tick())
    assert sizer.switches == []  # asked once: not yet
    asyncio.run(sizer.tick())
    assert len(sizer.switches) == 1
    _, wid, src, dst = sizer.switches[0]
    assert (src, dst) == ("decode", "prefill") and c.workers[wid].role == "prefill"
    assert c.workers[wid].client.calls == [("set_role", ("prefill",))]


def test_no_decision_without_measurements() -> None:
    c = _controller({"p0": "prefill", "d0": "decode"}, 800.0)
    sizer = PoolAutosizer(c, c.routing, AutosizeConfig())
    sizer.on_arrival(100, 100)
    asyncio.run(sizer.tick())
    assert sizer.switches == []
    assert [w.role for w in c.workers.values()] == ["prefill", "decode"]


def test_alternating_decisions_do_not_flap() -> None:
    c = _controller({"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"}, 800.0)
    sizer = PoolAutosizer(c, c.routing, AutosizeConfig(ttft_slo_s=1.0, itl_slo_s=0.5, window_s=10.0))
    for batch in (1, 2, 4, 8):
        sizer.on_heartbeat(batch, 0.02 + 0.002 * batch)
    for _ in range(3):  # heavy, light, heavy, light...: never the same new split twice in a row
        _load(sizer, 1500)
        asyncio.run(sizer.tick())
        _load(sizer, 20)
        asyncio.run(sizer.tick())
    assert sizer.switches == []
    _load(sizer, 1500)
    asyncio.run(sizer.tick())
    asyncio.run(sizer.tick())
    assert len(sizer.switches) == 1  # the same split asked for twice in a row: applied


def test_an_unmeasured_prefill_worker_counts_at_the_pools_measured_rate() -> None:
    # p1 was just switched to prefill and has no rate yet; the routing default (50k tokens/s)
    # would make the prefill pool look plentiful and hand a worker back to decode
    roles = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}
    c = _controller(roles, 50_000.0, measured={"p0": 800.0})
    sizer = PoolAutosizer(c, c.routing, AutosizeConfig(ttft_slo_s=1.0, itl_slo_s=0.5, window_s=10.0))
    for batch in (1, 2, 4, 8):  # decode slow enough that plentiful prefill would free a worker
        sizer.on_heartbeat(batch, 0.1 + 0.02 * batch)
    _load(sizer, 1500)
    for _ in range(3):
        asyncio.run(sizer.tick())
    # at 800 tokens/s prefill is the scarce pool: it grows (the default would have shrunk it)
    assert [(src, dst) for _, _, src, dst in sizer.switches] == [("decode", "prefill")]
