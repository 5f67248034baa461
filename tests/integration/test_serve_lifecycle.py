"""``kvrelay serve`` as a supervisor sees it (a real subprocess on the default model): ready
means ready, SIGTERM drains and exits 0, a dead controller makes the process exit non-zero."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay_testing.serve_process import HttpReply, ServeProcess, complete, http


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready_status(port: int) -> int | None:
    try:
        return http(port, "/ready", timeout_s=5).status
    except OSError:
        return None  # not listening yet


def _grpc_health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status)


class _Stream(threading.Thread):
    """One streaming completion read to its end; ``lines`` are the SSE data payloads."""

    def __init__(self, port: int, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.port, self.model, self.max_tokens = port, model, max_tokens
        self.lines: list[str] = []
        self.started = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn = HTTPConnection("127.0.0.1", self.port, timeout=120)
            body = {"model": self.model, "prompt": "Count slowly:", "stream": True,
                    "max_tokens": self.max_tokens, "temperature": 0, "ignore_eos": True}
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    self.lines.append(line[6:])
                    self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def test_ready_means_ready_and_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    hport, gport = _free_port(), _free_port()
    with ServeProcess([f"--http-port={hport}", f"--grpc-port={gport}",
                       "--threads-per-worker=1", "--admission-wait-s=60",
                       "--shutdown-grace-s=60"], tmp_path / "serve.log") as s:
        seen: list[int | None] = []
        early: list[HttpReply] = []
        probe: threading.Thread | None = None
        deadline = time.monotonic() + 180
        while (status := _ready_status(hport)) != 200:
            seen.append(status)
            assert s.proc.poll() is None, s.output()[-3000:]
            assert time.monotonic() < deadline, f"never ready: {seen[-5:]}\n{s.output()[-3000:]}"
            if status == 503 and probe is None:  # a request sent while not ready
                assert http(hport, "/health").status == 200  # alive meanwhile
                probe = threading.Thread(
                    target=lambda: early.append(complete(hport, "Hi", max_tokens=2)),
                    daemon=True)
                probe.start()
            time.sleep(0.02)
        # the first 200 from /ready: a request right now succeeds
        first = complete(hport, "The first request after ready", max_tokens=3)
        assert first.status == 200, first
        assert _grpc_health(gport) == health_pb2.HealthCheckResponse.SERVING
        assert 503 in seen, f"/ready was never 503 before the workers were up: {set(seen)}"
        assert probe is not None
        probe.join(120)
        assert early and early[0].status in (200, 503), early  # never 500
        if early[0].status == 503:
            assert early[0].headers.get("Retry-After"), early[0].headers

        # SIGTERM with a stream in flight: it finishes, new requests get 503, exit 0
        model = http(hport, "/v1/models").json()["data"][0]["id"]
        stream = _Stream(hport, model, max_tokens=48)
        stream.start()
        assert stream.started.wait(120) and stream.error is None, stream.error
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while (r := _ready_status(hport)) not in (503, None):
            assert time.monotonic() < deadline, r
            time.sleep(0.02)
        late = complete(hport, "Too late", max_tokens=2) if r == 503 else None
        stream.join(120)
        assert stream.error is None, stream.error
        assert stream.lines and stream.lines[-1] == "[DONE]", stream.lines[-3:]
        chunks = [json.loads(x) for x in stream.lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(90) == 0, s.output()[-3000:]
        if late is not None:
            assert late.status == 503, late


def test_a_dead_controller_makes_serve_exit_nonzero(tmp_path: Path) -> None:
    with ServeProcess(["--threads-per-worker=1"], tmp_path / "serve.log") as s:
        s.wait_serving()
        assert complete(s.http_port, "Hello", max_tokens=2).status == 200
        pids = s.pid_of("ray::ControllerActor")
        assert len(pids) == 1, pids
        t0 = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        deadline = t0 + 10
        while s.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        code = s.proc.poll()
        assert code is not None, f"serve still running 10 s after its controller died:\n" \
                                 f"{s.output()[-3000:]}"
        assert code != 0
        assert "controller" in s.output().lower()
