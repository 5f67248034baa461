"""The frontends' calls to the controller actor (``RemoteBackend``), fewer than one per request
where the answer is known here:

- ``observe_request_finished`` batches the ended requests' figures: one fire-and-forget call
  (``observe_requests_finished``) takes every request that ended within ``OBSERVE_FLUSH_S`` of
  the first, in order, or goes at once when ``OBSERVE_BATCH`` wait; closing the backend sends
  what still waits; a dead controller gets nothing. The real cluster's metrics
  (tests/integration/test_metrics_cluster.py) count every request through this path.
- ``admit`` lets a prompt through without a call while the controller's last readiness says
  ready and the prompt fits the longest its pools hold (the controller's readiness carries it);
  otherwise the controller's ``admit`` decides."""

from __future__ import annotations

import asyncio
from typing import Any

from kvrelay.cluster.api.backend import GenerateRequest, ModelInfo, Readiness
from kvrelay.cluster.controller.config import ControllerConfig
from kvrelay.cluster.controller.controller import Controller
from kvrelay.cluster.controller.state import WorkerEntry
from kvrelay.cluster.runtime.remote_backend import OBSERVE_BATCH, RemoteBackend
from kvrelay.workers.types import SamplingParams
from kvrelay.workers.worker import WorkerInfo


class _Method:
    def __init__(self, controller: _Controller, name: str) -> None:
        self.controller, self.name = controller, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.controller.calls.append((self.name, args, kwargs))
        self.controller.called.set()
        try:  # an answer of None, awaited or not (fire and forget)
            answer = asyncio.get_running_loop().create_future()
        except RuntimeError:  # no loop runs: nobody awaits it
            return None
        answer.set_result(None)
        return answer


class _Controller:
    """A controller actor handle that records each call (name, args, kwargs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.called = asyncio.Event()

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def _backend(controller: _Controller) -> RemoteBackend:
    return RemoteBackend(controller, [ModelInfo("m", 1 << 16, 512)], tokenizer=None)  # type: ignore[arg-type]


def _observe(backend: RemoteBackend, i: int) -> None:
    backend.observe_request_finished(
        "m", "finished_stop", ttft_s=0.1 * i, itl_s_list=(0.01, 0.02), e2e_s=1.0 + i,
        prompt_tokens=i, generation_tokens=2,
    )  # fmt: skip


def test_requests_ended_together_go_in_one_call_in_order() -> None:
    async def run() -> _Controller:
        controller = _Controller()
        backend = _backend(controller)
        for i in range(3):
            _observe(backend, i)
        assert controller.calls == []  # waiting for the flush
        await asyncio.wait_for(controller.called.wait(), 5)
        return controller

    controller = asyncio.run(run())
    assert len(controller.calls) == 1
    name, (batch,), _ = controller.calls[0]
    assert name == "observe_requests_finished"
    assert [(m, o, f["prompt_tokens"], f["itl_s_list"]) for m, o, f in batch] == [
        ("m", "finished_stop", i, [0.01, 0.02]) for i in range(3)
    ]
    assert batch[2][2]["ttft_s"] == 0.1 * 2 and batch[2][2]["e2e_s"] == 3.0


def test_a_full_batch_goes_at_once_and_close_sends_the_rest() -> None:
    async def run() -> tuple[_Controller, list[int]]:
        controller = _Controller()
        backend = _backend(controller)
        for i in range(OBSERVE_BATCH + 5):
            _observe(backend, i)
        sizes_before_close = [len(args[0]) for _, args, _ in controller.calls]
        await backend.close()
        return controller, sizes_before_close

    controller, before = asyncio.run(run())
    assert before == [OBSERVE_BATCH]  # the full batch, without waiting for the timer
    assert [len(args[0]) for _, args, _ in controller.calls] == [OBSERVE_BATCH, 5]
    seen = [f["prompt_tokens"] for _, (batch,), _ in controller.calls for _, _, f in batch]
    assert seen == list(range(OBSERVE_BATCH + 5))


def test_without_a_running_loop_the_call_goes_now_and_a_dead_controller_gets_none() -> None:
    controller = _Controller()
    backend = _backend(controller)
    _observe(backend, 1)  # no event loop runs here
    assert [(name, len(args[0])) for name, args, _ in controller.calls] == [
        ("observe_requests_finished", 1)
    ]
    backend.death = "the controller died"
    _observe(backend, 2)
    backend.flush_observed()
    assert len(controller.calls) == 1


def _request(n: int) -> GenerateRequest:
    return GenerateRequest(f"r{n}", "m", tuple(range(n)), SamplingParams(max_tokens=4))


def test_admit_calls_the_controller_only_when_its_readiness_does_not_answer() -> None:
    async def run() -> tuple[list[str], int]:
        controller = _Controller()
        backend = _backend(controller)
        await backend.admit(_request(10))  # no readiness yet: the controller decides
        backend._readiness = Readiness(True, largest_prompt=100)
        await backend.admit(_request(10))
        await backend.admit(_request(100))
        await backend.admit(_request(101))  # longer than it holds: the controller refuses it
        backend._readiness = Readiness(False, ("decode",), largest_prompt=100)
        await backend.admit(_request(10))  # not ready: the controller waits for a worker
        backend._readiness = Readiness(True)
        await backend.admit(_request(10))  # ready, bound not known
        return [name for name, _, _ in controller.calls], backend.admitted_here

    names, here = asyncio.run(run())
    assert names == ["admit"] * 4 and here == 2


def test_the_controllers_readiness_carries_the_longest_prompt_its_pools_hold() -> None:
    controller = Controller(ControllerConfig(ModelInfo("m", 1 << 16, 512)), tokenizer=None)  # type: ignore[arg-type]
    assert controller.readiness().largest_prompt is None  # no worker yet
    bs = controller.config.routing.block_size
    for wid, role, blocks in (("p", "prefill", 300), ("d", "decode", 200)):
        info = WorkerInfo(wid, role, "127.0.0.1", 1, "m", bs, blocks, 1024, 1 << 16)
        controller.state.workers[wid] = WorkerEntry(None, info, role)  # type: ignore[arg-type]
    got = controller.readiness()
    assert got.ready and got.largest_prompt == 200 * bs - 1
    controller.state.workers["d"].draining = True
    assert controller.readiness().largest_prompt == 300 * bs - 1  # the prefill worker alone
