"""gRPC frontend + client SDK: round trips, streaming, cancel, disconnect, deadlines, errors,
admin calls, health and reflection, in-process against the EchoBackend (the same API against a real
1P+1D cluster: tests/integration/test_api_cluster.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvrelay.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    RetryPolicy,
    UnavailableError,
)
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay_testing.frontend import (
    EchoBackend,
    FrontendThread,
    wait_blocks_free,
    wait_blocks_held,
)

LONG = 400  # tokens: a stream that is still running when the test acts on it


@pytest.fixture(scope="module")
def srv() -> Iterator[FrontendThread]:
    with FrontendThread(EchoBackend(step_delay_s=0.005)) as server:
        yield server


@pytest.fixture()
def client(srv: FrontendThread) -> Iterator[Client]:
    with Client(f"127.0.0.1:{srv.grpc_port}", timeout=20) as c:
        yield c
    assert srv.call(wait_blocks_free(srv.backend)) == 0, "KV blocks leaked"


def test_generate_round_trip(client: Client) -> None:
    model = client.models()[0]
    res = client.generate("hello world", max_tokens=8, temperature=0, model=model.id)
    assert res.finish_reason == "length" and len(res.token_ids) == 8
    assert res.usage.completion_tokens == 8 and res.usage.prompt_tokens > 0
    assert res.request_id and res.text
    assert 0 <= res.timing.queue_s <= res.timing.ttft_s <= res.timing.e2e_s
    # greedy is deterministic, and token ids in give the same as text in
    again = client.generate("hello world", max_tokens=8, temperature=0)
    assert again.text == res.text and again.request_id != res.request_id


def test_stream_first_event_is_the_request_id(client: Client) -> None:
    chunks = list(
        client.generate("abc", max_tokens=5, temperature=0, stream=True, request_id="my-req-1")
    )
    assert chunks[0].request_id == "my-req-1" and not chunks[0].token_ids
    assert all(c.request_id == "my-req-1" for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage and last.usage.completion_tokens == 5
    assert sum(len(c.token_ids) for c in chunks) == 5


def test_chat_and_stop(client: Client, srv: FrontendThread) -> None:
    res = client.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    assert res.usage.completion_tokens <= 6 and res.finish_reason in ("stop", "length")
    if type(srv.backend).__name__ == "EchoBackend":  # echo: output repeats the prompt
        res = client.generate("abcdef", max_tokens=20, temperature=0, stop=["de"])
        assert res.text == "abc" and res.finish_reason == "stop"


def test_async_client_round_trip(srv: FrontendThread) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncClient(f"127.0.0.1:{srv.grpc_port}", timeout=20) as ac:
            res = await ac.generate("hello", max_tokens=4, temperature=0)
            text = "".join(
                [c.text async for c in ac.generate_stream("hello", max_tokens=4, temperature=0)]
            )
            models = await ac.models()
            assert models and models[0].max_context > 0
            return res.text, text  # type: ignore[union-attr]

    full, streamed = asyncio.run(main())
    assert full == streamed and full


def test_cancel_ends_stream_and_frees_blocks(client: Client, srv: FrontendThread) -> None:
    stream = client.generate("cancel me", max_tokens=LONG, ignore_eos=True, stream=True)
    rid = next(stream).request_id
    next(stream)  # a token: the request holds blocks now
    assert client.cancel(rid) is True
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    assert sum(len(c.token_ids) for c in rest) < LONG
    assert srv.call(wait_blocks_free(srv.backend)) == 0
    assert client.cancel(rid) is False  # gone


def test_client_disconnect_frees_blocks(client: Client, srv: FrontendThread) -> None:
    stream = client.generate("disconnect", max_tokens=LONG, ignore_eos=True, stream=True)
    next(stream)
    next(stream)
    assert srv.call(wait_blocks_held(srv.backend)) > 0
    stream.close()  # GeneratorExit -> call.cancel(): the server sees the client go away
    assert srv.call(wait_blocks_free(srv.backend)) == 0


def test_deadline_exceeded_frees_blocks(client: Client, srv: FrontendThread) -> None:
    with pytest.raises(DeadlineExceededError):
        client.generate("slow", max_tokens=LONG, ignore_eos=True, timeout=0.3)
    assert srv.call(wait_blocks_free(srv.backend)) == 0


def test_errors_are_typed(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="top_p"):
        client.generate("x", top_p=0.0)
    with pytest.raises(InvalidArgumentError, match="empty"):
        client.generate("")
    with pytest.raises(NotFoundError, match="nope"):
        client.generate("x", model="nope")
    with pytest.raises(InvalidArgumentError, match="context"):
        client.generate("x", max_tokens=10**9)
    stream = client.generate("x", max_tokens=LONG, ignore_eos=True, stream=True, request_id="dup-1")
    next(stream)
    with pytest.raises(AlreadyExistsError):
        client.generate("y", request_id="dup-1")
    stream.close()


def test_admin_calls(client: Client, srv: FrontendThread) -> None:
    status = client.cluster_status()
    assert status.workers and all(w.role for w in status.workers)
    worker = status.workers[0].worker_id
    assert client.notify_preemption(worker, 30.0) is True
    assert client.drain(worker) is True
    assert client.drain("no-such-worker") is False
    with pytest.raises(InvalidArgumentError):
        client.notify_preemption(worker, -1)
    if hasattr(srv.backend, "preempted"):
        (_, deadline), *_ = srv.backend.preempted
        assert abs(deadline - (time.time() + 30)) < 5  # relative on the wire, absolute inside


def test_health_and_reflection(srv: FrontendThread) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        hstub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvrelay.v1.Generation"):
            resp = hstub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        rstub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(rstub.ServerReflectionInfo(iter([req]), timeout=5))
        names = {s.name for s in resp.list_services_response.service}
        assert {"kvrelay.v1.Generation", "kvrelay.v1.Admin", "grpc.health.v1.Health"} <= names


def test_raw_bytes_that_are_not_protobuf_get_invalid_argument(srv: FrontendThread) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        call = ch.unary_stream("/kvrelay.v1.Generation/Generate")  # identity serializers
        with pytest.raises(grpc.RpcError) as info:
            list(call(b"\xff\xff\xff\xff", timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kvrelay.v1.GenerateRequest" in info.value.details()


def test_retry_honors_resource_exhausted_hint() -> None:
    backend = EchoBackend(step_delay_s=0.005)
    limits = FrontendLimits(max_streams=1, max_queue=0, retry_after_s=0.05)
    with FrontendThread(backend, limits=limits) as srv:
        target = f"127.0.0.1:{srv.grpc_port}"
        with (
            Client(target, timeout=20) as hog,
            Client(target, timeout=20, retry=RetryPolicy(max_attempts=1)) as impatient,
            Client(target, timeout=20, retry=RetryPolicy(max_attempts=200)) as patient,
        ):
            stream = hog.generate("hog", max_tokens=60, ignore_eos=True, stream=True)
            next(stream)
            with pytest.raises(ResourceExhaustedError) as info:
                impatient.generate("x", max_tokens=2)
            assert info.value.retry_after == pytest.approx(0.05)
            res = patient.generate("x", max_tokens=2)  # waits for the hog, then gets in
            assert res.finish_reason == "length"
            assert list(stream)[-1].finish_reason == "length"
        assert srv.call(wait_blocks_free(srv.backend)) == 0


def test_unavailable_is_retried_then_raised() -> None:
    with Client(
        "127.0.0.1:1", timeout=5, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01)
    ) as c:
        with pytest.raises(UnavailableError):
            c.models()


class Recorder:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict[str, object]]] = []

    def observe_request_finished(self, model: str, outcome: str, **figures: object) -> None:
        self.records.append((model, outcome, figures))


def test_request_observer_sees_every_outcome() -> None:
    rec = Recorder()
    backend = EchoBackend(step_delay_s=0.005)
    with (
        FrontendThread(backend, request_observer=rec) as srv,
        Client(f"127.0.0.1:{srv.grpc_port}", timeout=20) as c,
    ):
        c.generate("abc", max_tokens=4, ignore_eos=True)
        with pytest.raises(InvalidArgumentError):
            c.generate("abc", temperature=-1)
        stream = c.generate("abc", max_tokens=LONG, ignore_eos=True, stream=True)
        next(stream)
        next(stream)
        stream.close()
        assert srv.call(wait_blocks_free(srv.backend)) == 0
    # leaving the block stopped the server: every handler has reported
    outcomes = [o for _, o, _ in rec.records]
    assert outcomes == ["finished_length", "rejected", "aborted"]
    figures = rec.records[0][2]
    assert figures["generation_tokens"] == 4 and 1 <= len(figures["itl_s_list"]) <= 3  # type: ignore[arg-type]
    assert 0 < figures["ttft_s"] <= figures["e2e_s"]  # type: ignore[operator]
