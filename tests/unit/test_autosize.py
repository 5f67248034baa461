"""The pool autosizer's decision on a controller-shaped stub: a prefill-heavy load turns a
decode worker into a prefill worker (one switch per tick); too little data changes nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from kvrelay.cluster.autosize import AutosizeConfig, PoolAutosizer


@dataclass
class StubClient:
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> None:
        self.calls.append((method, args))


def _worker(wid: str, role: str) -> SimpleNamespace:
    return SimpleNamespace(healthy=True, draining=False, role=role, assigned=set(),
                           client=StubClient(), info=SimpleNamespace(worker_id=wid))


def _controller(roles: dict[str, str], prefill_tps: float) -> SimpleNamespace:
    workers = {w: _worker(w, r) for w, r in roles.items()}
    return SimpleNamespace(workers=workers, routing=SimpleNamespace(_tps=lambda _w: prefill_tps))


def test_prefill_heavy_load_moves_a_decode_worker_to_prefill() -> None:
    c = _controller({"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"}, 800.0)
    sizer = PoolAutosizer(c, AutosizeConfig(ttft_slo_s=1.0, itl_slo_s=0.5, window_s=10.0))
    for _ in range(10):  # 1 req/s of 1500-token prompts (1 prefill worker does 800 tok/s)
        sizer.on_arrival(1500, 8)
    for batch in (1, 2, 4, 8):
        sizer.on_heartbeat(batch, 0.02 + 0.002 * batch)
    asyncio.run(sizer.tick())
    assert len(sizer.switches) == 1
    _, wid, src, dst = sizer.switches[0]
    assert (src, dst) == ("decode", "prefill") and c.workers[wid].role == "prefill"
    assert c.workers[wid].client.calls == [("set_role", ("prefill",))]


def test_no_decision_without_measurements() -> None:
    c = _controller({"p0": "prefill", "d0": "decode"}, 800.0)
    sizer = PoolAutosizer(c, AutosizeConfig())
    sizer.on_arrival(100, 100)
    asyncio.run(sizer.tick())
    assert sizer.switches == []
    assert [w.role for w in c.workers.values()] == ["prefill", "decode"]
