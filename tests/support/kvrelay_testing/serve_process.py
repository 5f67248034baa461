"""``kvrelay serve`` as a subprocess, the way users and supervisors run it.

    with ServeProcess(["--prefill-workers=1"], log_path) as serve:
        serve.wait_serving(120)          # the "kvrelay serving" line, with the bound ports
        serve.http_port, serve.grpc_port
        serve.listeners()                # (pid, process name, ip, port) of the whole tree

The process runs in a session of its own; ``close`` sends SIGTERM, waits, then kills whatever is
left of the tree (Ray's GCS, raylet and workers included), so nothing outlives a test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple

import psutil

_SERVING = re.compile(r"kvrelay serving .*gRPC \S+:(\d+)\s+HTTP http://\S+:(\d+)")


class Listener(NamedTuple):
    pid: int
    name: str
    ip: str
    port: int


def kvrelay_argv() -> list[str]:
    exe = shutil.which("kvrelay")
    assert exe is not None, "the kvrelay console script is not on PATH"
    return [exe]


class ServeProcess:
    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        argv = [*kvrelay_argv(), "serve", "--grpc-port=0", "--http-port=0", *args]
        self.log = log
        self._out = log.open("w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.grpc_port = self.http_port = 0
        self.serving = threading.Event()
        self._tree: dict[int, psutil.Process] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.write(line)
            self._out.flush()
            m = _SERVING.search(line)
            if m:
                self.grpc_port, self.http_port = int(m.group(1)), int(m.group(2))
                self.serving.set()
        self.serving.set()  # exited: waiters return and look at the process

    def output(self) -> str:
        return self.log.read_text()

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        if not self.serving.wait(timeout_s) or self.proc.poll() is not None:
            raise AssertionError(f"kvrelay serve did not come up:\n{self.output()[-4000:]}")

    def processes(self) -> list[psutil.Process]:
        """The serve process and all its descendants (remembered, for teardown)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            self._tree.setdefault(p.pid, p)
        return procs

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket and unconnected UDP socket of the process tree."""
        out = []
        for p in self.processes():
            try:
                conns = p.net_connections(kind="inet")
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):
                    out.append(Listener(p.pid, name, c.laddr.ip, c.laddr.port))
        return out

    def pid_of(self, title: str) -> list[int]:
        """Pids of descendants whose process title contains ``title`` (Ray names actors
        ``ray::ClassName``)."""
        pids = []
        for p in self.processes():
            try:
                if title in " ".join(p.cmdline()) or title in p.name():
                    pids.append(p.pid)
            except psutil.NoSuchProcess:
                continue
        return pids

    def close(self) -> None:
        self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        for p in self._tree.values():  # Ray's processes, if serve could not stop them
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(self._tree.values()), timeout=30)
        self._out.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpReply(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(port: int, path: str, body: dict[str, Any] | None = None,
         timeout_s: float = 120.0) -> HttpReply:
    """GET (or POST ``body`` as JSON) on 127.0.0.1:``port``; any status comes back, none raises."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return HttpReply(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as err:
        return HttpReply(err.code, dict(err.headers), err.read())


def complete(port: int, prompt: str | list[int], max_tokens: int = 4, **extra: Any) -> HttpReply:
    models = http(port, "/v1/models").json()["data"]
    body = {"model": models[0]["id"], "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, **extra}
    return http(port, "/v1/completions", body)
