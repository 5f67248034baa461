"""The controller's registry and request table: one object, its invariants checked."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kvrelay.cluster.api.backend import GenerateRequest
from kvrelay.cluster.controller.flights import Flight
from kvrelay.cluster.controller.state import ControllerState, WorkerEntry
from kvrelay.workers.types import SamplingParams
from kvrelay.workers.worker import WorkerInfo


def _entry(wid: str, role: str = "decode") -> WorkerEntry:
    info = WorkerInfo(wid, role, "127.0.0.1", 1, "m", 16, 64, 1024, 2048)
    client: Any = SimpleNamespace(worker_id=wid)
    return WorkerEntry(client, info, role)


def _flight(rid: str) -> Flight:
    req = GenerateRequest(rid, "m", (1, 2, 3), SamplingParams(max_tokens=4))
    text: Any = SimpleNamespace()
    return Flight(req, text)


def test_pool_release_and_integrity() -> None:
    s = ControllerState()
    s.workers["p"], s.workers["d"] = _entry("p", "prefill"), _entry("d")
    s.workers["d"].draining = True
    assert [w.info.worker_id for w in s.pool("prefill", "decode")] == ["p"]
    f = s.flights["r1"] = _flight("r1")
    f.owner = "p"
    s.workers["p"].assigned.add("r1")
    assert s.check_integrity() == {"workers": 2, "flights": 1, "assigned": 1}
    s.release(f)
    assert s.check_integrity() == {"workers": 2, "flights": 0, "assigned": 0}


def test_integrity_names_what_is_broken() -> None:
    s = ControllerState()
    s.workers["p"] = _entry("p")
    s.workers["p"].assigned.add("ghost")
    with pytest.raises(AssertionError, match="ghost"):
        s.check_integrity()
    s.workers["p"].assigned.clear()
    s.flights["r"] = _flight("r")
    s.flights["r"].owner = "gone"
    with pytest.raises(AssertionError, match="unknown gone"):
        s.check_integrity()
    s.flights["r"].moving = 1  # a task is moving it: its owner may be dead meanwhile
    s.check_integrity()
