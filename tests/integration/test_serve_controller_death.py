"""A controller that dies while clients stream (issue 15): the frontends run in the driver, not in
the controller actor, so they outlive it long enough to tell every client.

* ``kvrelay serve`` (a real subprocess, default model): a streaming chat completion read by the
  official ``openai`` client raises ``APIError`` from the server's SSE error event (not a clean
  end, not a connection error); a streaming gRPC ``Generate`` ends with UNAVAILABLE naming the
  controller (not a cut socket); the process exits non-zero within 10 s, saying why.
* the same through ``kvrelay serve`` for a controller that hangs (SIGSTOP) instead of dying: Ray
  never fails the awaits on it, so serve's liveness probe gives up on it and fails every stream
  with the same errors before it stops its servers and exits non-zero.
* ``Cluster.start`` in this process (its frontends stay up after the kill, so their answers can be
  read at leisure): an in-flight non-stream request gets 503 with ``Retry-After``, ``/ready`` 503,
  gRPC health NOT_SERVING, new requests 503 / UNAVAILABLE, admin calls UNAVAILABLE, /metrics 503.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import openai
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.cluster.runtime.serve import Cluster, ServeConfig
from kvrelay.proto.kvrelay.v1 import admin_pb2 as apb
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb
from kvrelay_testing.serve_process import HttpReply, ServeProcess, complete, http

LONG = 400  # tokens: still decoding when the controller is killed (~80 ms/token here)


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ChatStream(threading.Thread):
    """A streaming chat completion through the official client, read until it ends or raises."""

    def __init__(self, port: int, model: str) -> None:
        super().__init__(daemon=True)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
        )
        self.model = model
        self.tokens = 0
        self.error: BaseException | None = None
        self.ended_cleanly = False

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": "Count to a thousand."}],
                stream=True,
                max_tokens=LONG,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    self.tokens += 1
            self.ended_cleanly = True
        except BaseException as exc:
            self.error = exc


class GrpcStream(threading.Thread):
    """A streaming ``Generate`` over a raw channel (no SDK retries): the status it ends with."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.tokens = 0
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def run(self) -> None:
        req = gpb.GenerateRequest(text="Count to a thousand.")
        req.sampling.max_tokens = LONG
        req.sampling.temperature = 0
        req.sampling.ignore_eos = True
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            call = ch.unary_stream("/kvrelay.v1.Generation/Generate")
            try:
                for raw in call(req.SerializeToString(), timeout=120):
                    self.tokens += len(gpb.GenerateResponse.FromString(raw).token_ids)
                self.code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                self.code, self.details = err.code(), err.details() or ""


def _streams_started(http_port: int, grpc_port: int) -> tuple[ChatStream, GrpcStream]:
    model = http(http_port, "/v1/models").json()["data"][0]["id"]
    chat, rpc = ChatStream(http_port, model), GrpcStream(grpc_port)
    chat.start()
    rpc.start()
    _until(lambda: chat.tokens > 0 and rpc.tokens > 0, 120, "both streams to be decoding")
    assert chat.error is None and rpc.code is None, (chat.error, rpc.code)
    return chat, rpc


def _assert_told(chat: ChatStream, rpc: GrpcStream, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    chat.join(max(0.0, deadline - time.monotonic()))
    rpc.join(max(0.0, deadline - time.monotonic()))
    assert not chat.is_alive() and not rpc.is_alive(), "a stream hung after the controller died"
    assert not chat.ended_cleanly, f"the chat stream ended as if complete ({chat.tokens} tokens)"
    assert chat.tokens < LONG
    # an APIError from the SSE error event; a cut connection would be APIConnectionError
    err = chat.error
    assert isinstance(err, openai.APIError), repr(err)
    assert not isinstance(err, openai.APIConnectionError), repr(err)
    assert isinstance(err.body, dict) and err.body["code"] == "unavailable", err.body
    assert "controller" in err.message, err.message
    # UNAVAILABLE from the server, with the reason; a cut socket would say "Socket closed"
    assert rpc.code == grpc.StatusCode.UNAVAILABLE, (rpc.code, rpc.details)
    assert "controller" in rpc.details, rpc.details
    assert rpc.tokens < LONG


def test_dead_controller_ends_streams_with_errors_and_serve_exits_nonzero(tmp_path: Path) -> None:
    with ServeProcess(["--threads-per-worker=1"], tmp_path / "serve.log") as s:
        s.wait_serving()
        _until(lambda: http(s.http_port, "/ready").status == 200, 180, "/ready")
        chat, rpc = _streams_started(s.http_port, s.grpc_port)
        pids = s.pid_of("ray::ControllerActor")
        assert len(pids) == 1, pids
        t0 = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        _assert_told(chat, rpc)
        _until(
            lambda: s.proc.poll() is not None,
            10 - (time.monotonic() - t0),
            f"serve to exit after its controller died:\n{s.output()[-3000:]}",
        )
        assert s.proc.returncode != 0
        log = s.output()
        assert "controller actor died" in log and "Exiting with status 1" in log, log[-3000:]


def test_hung_controller_ends_streams_with_errors_and_serve_exits_nonzero(tmp_path: Path) -> None:
    probe = ["--controller-probe-timeout-s=1"]  # a hang is told in ~3 x (1 + 1) s, not 18
    with ServeProcess(["--threads-per-worker=1", *probe], tmp_path / "serve.log") as s:
        s.wait_serving()
        _until(lambda: http(s.http_port, "/ready").status == 200, 180, "/ready")
        chat, rpc = _streams_started(s.http_port, s.grpc_port)
        pids = s.pid_of("ray::ControllerActor")
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGSTOP)
        try:
            # serve gives up after its missed liveness probes (~3 x (1 + 1) s), then flushes
            _assert_told(chat, rpc, within_s=60)
            _until(
                lambda: s.proc.poll() is not None,
                30,
                f"serve to exit after its controller hung:\n{s.output()[-3000:]}",
            )
        finally:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[0], sig)
        assert s.proc.returncode != 0
        log = s.output()
        assert "did not answer" in log and "Exiting with status 1" in log, log[-3000:]
        assert "streams had not ended" not in log, log[-3000:]


def _status(port: int, path: str) -> int:
    return http(port, path, timeout_s=10).status


def test_frontends_outlive_the_controller_and_refuse_with_503(tmp_path: Path) -> None:
    cluster = Cluster.start(ServeConfig(grpc_port=0, http_port=0, threads_per_worker=1))
    try:
        hport, gport = int(cluster.ports["http_port"]), int(cluster.ports["grpc_port"])
        _until(lambda: _status(hport, "/ready") == 200, 120, "/ready")
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:  # admin works through the move
            status = ch.unary_unary("/kvrelay.v1.Admin/ClusterStatus")(
                apb.ClusterStatusRequest().SerializeToString(), timeout=30
            )
        assert len(apb.ClusterStatusResponse.FromString(status).workers) == 2
        assert b"kvrelay_requests_total" in http(hport, "/metrics").body
        chat, rpc = _streams_started(hport, gport)
        whole: list[HttpReply] = []  # a non-stream request in flight
        collect = threading.Thread(
            target=lambda: whole.append(
                complete(hport, "Count:", max_tokens=LONG, ignore_eos=True)
            ),
            daemon=True,
        )
        collect.start()
        _until(lambda: cluster.call("in_flight") == 3, 60, "the non-stream request to start")

        import ray

        ray.kill(cluster.controller, no_restart=True)
        _assert_told(chat, rpc)
        collect.join(30)
        assert whole and whole[0].status == 503, whole
        assert int(whole[0].headers["Retry-After"]) >= 1
        assert "controller" in whole[0].json()["error"]["message"]

        _until(lambda: _status(hport, "/ready") == 503, 10, "/ready to say 503")
        assert "controller" in http(hport, "/ready").json()["reason"]
        with grpc.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            _until(
                lambda: (
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                5,
                "gRPC health NOT_SERVING",
            )
            calls = (
                lambda: list(
                    ch.unary_stream("/kvrelay.v1.Generation/Generate")(
                        gpb.GenerateRequest(text="hi").SerializeToString(), timeout=10
                    )
                ),
                lambda: ch.unary_unary("/kvrelay.v1.Admin/ClusterStatus")(
                    apb.ClusterStatusRequest().SerializeToString(), timeout=10
                ),
            )
            for call in calls:
                try:
                    call()
                    raise AssertionError("answered without a controller")
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        late = complete(hport, "Too late", max_tokens=2)
        assert late.status == 503 and late.headers.get("Retry-After"), late
        assert _status(hport, "/metrics") == 503
    finally:
        cluster.shutdown()
